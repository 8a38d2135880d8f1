"""CPU ``parametric`` lip-sync engine: mouth motion from the speech envelope, drawn by warping.

No model: a per-frame mouth-opening signal (speech-band loudness with a short look-ahead, low-pass
filtered, gated to exactly zero in silence) and a mouth-spread signal (spectral centroid: wide for
front vowels, rounded for back vowels) drive a displacement field on the lower half of the aligned
256x256 face: the jaw and lower lip drop, the upper lip lifts a little, the corners move out or in.
The gap that opens between the lips is painted as a mouth interior (dark cavity, upper and lower
teeth, tongue), shaded by the face's own brightness. Everything happens inside the generated area
of the fixed LatentSync mask, and the displacement fades to zero at its border, so the result
composes with the base face exactly like a LatentSync output would.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import signal

from latentsync.engines.base import ENGINE_SAMPLE_RATE_HZ, ChunkRequest, ChunkResult, num_output_frames

#: Hop of the internal loudness envelope, in seconds (100 Hz).
_HOP_S = 0.01
#: Analysis window of the loudness envelope, in seconds.
_WIN_S = 0.03
#: Inner-lip gap (aligned pixels) still counted as a closed mouth: landmark noise on small faces.
_CLOSED_GAP_PX = 1.5
#: The lip opening spans this multiple of the corner-to-corner half width (corners stay sealed).
_LIP_SPAN = 1.0
#: Exponent of the opening's horizontal profile ``(1 - u^2)^p``: 0.5 an ellipse, larger is pointier.
_LIP_SHAPE = 0.8


@dataclass(frozen=True, kw_only=True)
class ParametricOptions:
    """Settings of the parametric engine (all have working defaults).

    Attributes:
        band_hz: Speech band ``(low, high)`` in Hz whose loudness drives the mouth.
        look_ahead_s: The mouth leads the sound by this many seconds (lips move before the voice).
        smoothing_hz: Cut-off of the zero-phase low-pass on the envelope, in Hz (no flicker above it).
        gate_below_peak_db: Loudness more than this many dB under the utterance's loud level is
            silence (mouth closed).
        gate_ramp_db: Width of the soft transition from closed to open, in dB.
        max_open_ratio: Inner-lip gap at full opening, as a fraction of the mouth width.
        upper_lip_share: Fraction of the opening taken by the upper lip lifting (rest: jaw drop).
        max_spread_ratio: Corner displacement at full spread/rounding, as a fraction of mouth width.
        open_gamma: Exponent on the normalised loudness (< 1 opens the mouth more at medium levels).

    """

    band_hz: tuple[float, float] = (250.0, 4000.0)
    look_ahead_s: float = 0.04
    smoothing_hz: float = 6.0
    gate_below_peak_db: float = 30.0
    gate_ramp_db: float = 8.0
    max_open_ratio: float = 0.34
    upper_lip_share: float = 0.22
    max_spread_ratio: float = 0.06
    open_gamma: float = 0.7


def band_rms_envelope(
    audio: np.ndarray, sample_rate_hz: int, band_hz: tuple[float, float], hop_s: float = _HOP_S
) -> tuple[np.ndarray, np.ndarray]:
    """Root-mean-square level of the speech band, on a regular time grid.

    Args:
        audio: ``(N,)`` float mono audio in [-1, 1].
        sample_rate_hz: Its sample rate in Hz.
        band_hz: ``(low, high)`` pass band in Hz (4th-order Butterworth, zero phase).
        hop_s: Spacing of the envelope samples in seconds; each sample covers a 30 ms window
            centred on ``(j + 0.5) * hop_s``.

    Returns:
        ``(rms, centroid_hz)``: two ``(ceil(N / hop),) float32`` arrays, the band RMS level
        (linear, same unit as ``audio``) and the band's spectral centroid in Hz.

    """
    x = np.asarray(audio, np.float64)
    hop = max(int(round(hop_s * sample_rate_hz)), 1)
    n_out = max(-(-len(x) // hop), 1)
    high = min(band_hz[1], 0.45 * sample_rate_hz)
    sos = signal.butter(4, [band_hz[0], high], btype="bandpass", fs=sample_rate_hz, output="sos")
    y = signal.sosfiltfilt(sos, x) if len(x) > 60 else x
    win = max(int(round(_WIN_S * sample_rate_hz)), hop)
    centres = (np.arange(n_out) * hop + hop // 2).astype(np.int64)
    pad = win // 2
    yp = np.pad(y, (pad, pad + hop))
    idx = centres[:, None] + np.arange(win)[None, :]
    frames = yp[np.clip(idx, 0, len(yp) - 1)] * np.hanning(win)[None, :]
    rms = np.sqrt(np.mean(frames**2, axis=1) / np.mean(np.hanning(win) ** 2))
    spec = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(win, 1.0 / sample_rate_hz)
    band = (freqs >= band_hz[0]) & (freqs <= high)
    centroid = (spec[:, band] @ freqs[band]) / (spec[:, band].sum(axis=1) + 1e-20)
    return rms.astype(np.float32), centroid.astype(np.float32)


def mouth_signal(audio_16k: np.ndarray, fps: int, options: ParametricOptions | None = None) -> np.ndarray:
    """Per-frame mouth controls from speech.

    Args:
        audio_16k: ``(N,)`` float32 mono audio at 16 kHz in [-1, 1] (int16 is rescaled).
        fps: Output frame rate in frames per second.
        options: Signal settings (defaults: :class:`ParametricOptions`).

    Returns:
        ``(ceil(N * fps / 16000), 2) float32``: column 0 the mouth opening in [0, 1] (exactly 0
        in silence), column 1 the spread in [-1, 1] (positive: wide, negative: rounded).

    """
    opt = options or ParametricOptions()
    x = np.asarray(audio_16k)
    if x.dtype == np.int16:
        x = x.astype(np.float32) / 32768.0
    n_frames = num_output_frames(len(x), fps)
    if n_frames == 0:
        return np.zeros((0, 2), np.float32)
    rms, centroid = band_rms_envelope(x, ENGINE_SAMPLE_RATE_HZ, opt.band_hz)
    env_rate = 1.0 / _HOP_S
    level_db = 20.0 * np.log10(rms + 1e-7)
    loud = np.percentile(level_db, 95)
    voiced = level_db > loud - opt.gate_below_peak_db
    if not voiced.any() or loud < -70.0:  # digital silence
        return np.zeros((n_frames, 2), np.float32)
    # Loudness -> opening: amplitude relative to the loud level, compressed, then gated in dB.
    ref = np.percentile(rms[voiced], 95) + 1e-9
    amp = np.clip(rms / ref, 0.0, 1.2) ** opt.open_gamma / 1.2**opt.open_gamma
    gate_lo = loud - opt.gate_below_peak_db
    gate = np.clip((level_db - gate_lo) / opt.gate_ramp_db, 0.0, 1.0)
    raw_open = amp * gate
    # Spread: spectral centroid, standardised over voiced frames.
    c = (centroid - np.median(centroid[voiced])) / (np.std(centroid[voiced]) + 1e-6)
    raw_spread = np.clip(c / 1.5, -1.0, 1.0) * gate
    # Zero-phase low-pass: smooth without delay, never flickers faster than smoothing_hz.
    sos = signal.butter(2, opt.smoothing_hz, fs=env_rate, output="sos")
    padlen = min(len(raw_open) - 1, 30)
    if padlen > 6:
        open_s = signal.sosfiltfilt(sos, raw_open, padlen=padlen)
        spread_s = signal.sosfiltfilt(sos, raw_spread, padlen=padlen)
    else:
        open_s, spread_s = raw_open, raw_spread
    # Sample at frame centres plus the look-ahead.
    t = (np.arange(n_frames) + 0.5) / fps + opt.look_ahead_s
    grid = (np.arange(len(open_s)) + 0.5) * _HOP_S
    mouth_open = np.interp(t, grid, open_s)
    spread = np.interp(t, grid, spread_s)
    # Closed means closed: a low-passed envelope rings a little around silences.
    mouth_open = np.clip((mouth_open - 0.04) / 0.96, 0.0, 1.0)
    spread = np.clip(spread, -1.0, 1.0) * np.minimum(mouth_open * 4.0, 1.0)
    return np.stack([mouth_open, spread], axis=1).astype(np.float32)


def _smoothstep(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


@dataclass(frozen=True, kw_only=True)
class _MouthGeometry:
    """Where the mouth is in one aligned face (all in aligned 256x256 pixels)."""

    centre_x: float
    half_width: float
    inner_x: np.ndarray  # (K,) increasing x samples of the inner-lip curves, corner to corner
    upper_y: np.ndarray  # (K,) upper inner lip y at inner_x
    lower_y: np.ndarray  # (K,) lower inner lip y at inner_x
    upper_thickness: float
    lower_thickness: float
    chin_y: float
    jaw_half_width: float

    @classmethod
    def from_landmarks(cls, lm: np.ndarray) -> _MouthGeometry:
        lm = np.asarray(lm, np.float64)
        left, right = lm[48], lm[54]
        centre_x = (left[0] + right[0]) / 2
        half_width = max((right[0] - left[0]) / 2, 4.0)
        upper = np.array([left, lm[61], lm[62], lm[63], right])
        lower = np.array([left, lm[67], lm[66], lm[65], right])
        xs = np.linspace(left[0], right[0], 33)
        ux = np.maximum.accumulate(upper[:, 0])
        lx = np.maximum.accumulate(lower[:, 0])
        upper_y = np.interp(xs, ux + np.arange(5) * 1e-6, upper[:, 1])
        lower_y = np.interp(xs, lx + np.arange(5) * 1e-6, lower[:, 1])
        lower_y = np.maximum(lower_y, upper_y)
        return cls(
            centre_x=centre_x,
            half_width=half_width,
            inner_x=xs,
            upper_y=upper_y,
            lower_y=lower_y,
            upper_thickness=max(lm[62, 1] - lm[51, 1], 3.0),
            lower_thickness=max(lm[57, 1] - lm[66, 1], 3.0),
            chin_y=float(lm[8, 1]),
            jaw_half_width=max((lm[12, 0] - lm[4, 0]) / 2, half_width * 1.2),
        )

    def curve(self, which: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Inner-lip y at ``x`` (float32, like the pixel grids); flat continuation beyond the corners."""
        return np.interp(x, self.inner_x, which).astype(np.float32)


class MouthRenderer:
    """Opens, spreads and rounds the mouth of aligned 256x256 faces.

    Args:
        keep_mask: ``(256, 256)`` float keep-mask (1 = keep, 0 = generated), the fixed LatentSync mask.
        options: Engine settings.

    """

    def __init__(self, keep_mask: np.ndarray, options: ParametricOptions | None = None) -> None:
        self.options = options or ParametricOptions()
        self.keep_mask = np.asarray(keep_mask, np.float32)
        generated = (self.keep_mask < 0.5).astype(np.uint8)
        self._generated = generated.astype(bool)
        self._binary_mask = bool(np.isin(self.keep_mask, (0.0, 1.0)).all())
        # Displacement weight: 0 on the border of the generated region, 1 from 14 px inside it.
        dist = cv2.distanceTransform(generated, cv2.DIST_L2, 5)
        self._fade = _smoothstep(dist / 14.0).astype(np.float32)
        size = self.keep_mask.shape[0]
        self._yy, self._xx = np.mgrid[0:size, 0:size].astype(np.float32)

    def _unit_fields(
        self, g: _MouthGeometry, box: tuple[int, int, int, int]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Forward displacement per unit of spread and of opening, on the integer pixel grid of ``box``.

        The field of one pose is ``dx = spread_px * dx_unit`` and ``dy = amount * dy_unit`` (upper lip
        or lower lip and jaw): the shapes depend only on the face's geometry, so they are computed
        once per frame, with the terms that depend on one axis only (lip curves, jaw, chin) as
        ``(1, W)`` or ``(H, 1)`` arrays broadcast over the box.

        Args:
            g: The face's mouth geometry.
            box: ``(x0, y0, x1, y1)`` in aligned pixels (:meth:`_region`).

        Returns:
            ``(dx_unit, dy_upper, dy_lower)``, each ``(y1 - y0, x1 - x0) float32``, already faded
            to 0 at the border of the generated region.

        """
        x0, y0, x1, y1 = box
        x = np.arange(x0, x1, dtype=np.float32)[None, :]
        y = np.arange(y0, y1, dtype=np.float32)[:, None]
        upper_c, lower_c = g.curve(g.upper_y, x), g.curve(g.lower_y, x)
        u = (x - g.centre_x) / (g.half_width * _LIP_SPAN)
        ell = np.clip(1.0 - u * u, 0.0, 1.0) ** _LIP_SHAPE
        fade = self._fade[y0:y1, x0:x1]
        # Lower lip and jaw: the lip follows fully, the skin under it partly (the jaw), nothing under the chin.
        lip = np.exp(-np.maximum(y - lower_c, 0.0) / (0.9 * g.lower_thickness))
        jaw = 1.0 - _smoothstep((np.abs(x - g.centre_x) / g.jaw_half_width - 0.45) / 0.55)
        chin_fall = max(g.chin_y - float(g.curve(g.lower_y, np.array([g.centre_x]))[0]), 10.0) * 0.6
        under_chin = 1.0 - _smoothstep((y - g.chin_y) / chin_fall)
        dy_lower = (lip * ell + (1.0 - lip) * 0.92 * jaw) * under_chin * fade
        # Upper lip: lifts, fading out above it.
        dy_upper = -ell * np.exp(-np.maximum(upper_c - y, 0.0) / (1.3 * g.upper_thickness)) * fade
        # Corners: out (spread) or in (rounded), around the mouth only.
        mid_y = (upper_c + lower_c) / 2
        around = np.exp(
            -(((x - g.centre_x) / (1.5 * g.half_width)) ** 2) - ((y - mid_y) / (2.2 * g.lower_thickness)) ** 2
        )
        dx_unit = np.clip(u, -1.5, 1.5) * around * fade
        return (
            dx_unit.astype(np.float32, copy=False),
            dy_upper.astype(np.float32, copy=False),
            dy_lower.astype(np.float32, copy=False),
        )

    @staticmethod
    def _backward(
        xx: np.ndarray,
        yy: np.ndarray,
        dx_unit: np.ndarray,
        dy_unit: np.ndarray,
        spread_px: float,
        amount: float,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Source coordinates of output pixels ``(xx, yy)``: two fixed-point steps of ``s = p - d(s)``.

        The first step takes the field at the output pixels (the grid itself); the second samples
        it at the first estimate, bilinearly from the grid (the field is smooth; outside the box
        it is negligible, the border is replicated).
        """
        x0, y0 = float(xx[0, 0]), float(yy[0, 0])
        sx, sy = xx - spread_px * dx_unit, yy - amount * dy_unit
        at = cv2.remap(
            cv2.merge([dx_unit, dy_unit]), sx - x0, sy - y0, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE
        )
        return xx - spread_px * at[..., 0], yy - amount * at[..., 1]

    @staticmethod
    def _region(g: _MouthGeometry, size: int) -> tuple[int, int, int, int]:
        """Box ``(x0, y0, x1, y1)`` outside which the displacement is negligible (< 0.05 of it)."""
        half = max(g.jaw_half_width, 3.2 * g.half_width) + 2
        x0 = int(max(g.centre_x - half, 0))
        x1 = int(min(g.centre_x + half + 1, size))
        y0 = int(max(g.upper_y.min() - 4.5 * g.upper_thickness - 2, 0))
        return x0, y0, x1, size

    def render(self, face: np.ndarray, landmarks: np.ndarray, mouth_open: float, spread: float) -> np.ndarray:
        """Draw one face with the given mouth pose.

        Args:
            face: ``(256, 256, 3) uint8`` RGB aligned face (mouth as in the base video).
            landmarks: ``(68, 2)`` landmarks of that face in aligned pixels.
            mouth_open: Opening in [0, 1]; 0 closes the mouth (a closed base mouth is returned
                unchanged, an open one is closed).
            spread: Spread in [-1, 1] (positive wide, negative rounded).

        Returns:
            ``(256, 256, 3) uint8`` RGB face; pixels where the keep-mask is 1 are the input's.

        """
        out_face = np.array(face, copy=True)
        base_gap = float(landmarks[66][1] - landmarks[62][1])
        if mouth_open <= 1e-3 and abs(spread) <= 1e-3 and base_gap <= _CLOSED_GAP_PX:
            return out_face
        opt = self.options
        g = _MouthGeometry.from_landmarks(landmarks)
        width = 2 * g.half_width
        # Target gap between the inner lips; a base frame whose mouth is already open (a talking
        # base video) gets only the difference, or is closed when it is more open than the target.
        target = float(np.clip(mouth_open, 0, 1)) * opt.max_open_ratio * width
        base_gap = max(float(landmarks[66][1] - landmarks[62][1]) - _CLOSED_GAP_PX, 0.0)
        total = target - base_gap
        up_amount, low_amount = total * opt.upper_lip_share, total * (1 - opt.upper_lip_share)
        spread_px = float(np.clip(spread, -1, 1)) * opt.max_spread_ratio * width
        x0, y0, x1, y1 = self._region(g, face.shape[0])
        xx, yy = self._xx[y0:y1, x0:x1], self._yy[y0:y1, x0:x1]
        dx_unit, dy_upper, dy_lower = self._unit_fields(g, (x0, y0, x1, y1))
        ux, uy = self._backward(xx, yy, dx_unit, dy_upper, spread_px, up_amount)
        lx, ly = self._backward(xx, yy, dx_unit, dy_lower, spread_px, low_amount)
        upper_ok = uy <= g.curve(g.upper_y, ux) + 0.5
        lower_ok = ly >= g.curve(g.lower_y, lx) - 0.5
        mid = (g.curve(g.upper_y, xx[0]) + g.curve(g.lower_y, xx[0])) / 2
        use_upper = upper_ok & (~lower_ok | (yy < mid))
        map_x = np.where(use_upper, ux, lx).astype(np.float32)
        map_y = np.where(use_upper, uy, ly).astype(np.float32)
        src = np.ascontiguousarray(face)
        warped = cv2.remap(src, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        inside = (~upper_ok & ~lower_ok).astype(np.float32)
        rows, cols = np.flatnonzero(inside.any(axis=1)), np.flatnonzero(inside.any(axis=0))
        if len(rows):
            # Paint only around the opening (+3 px for the antialiased edge).
            r0, r1 = max(rows[0] - 3, 0), rows[-1] + 4
            c0, c1 = max(cols[0] - 3, 0), cols[-1] + 4
            box = (slice(r0, r1), slice(c0, c1))
            painted = self._paint_interior(
                warped[box].astype(np.float32), face, g, xx[box], yy[box], inside[box], up_amount, low_amount, spread_px
            )
            warped[box] = np.clip(painted + 0.5, 0, 255).astype(np.uint8)
        region = out_face[y0:y1, x0:x1]
        if self._binary_mask:  # the LatentSync mask: generated pixels replaced, the rest kept as they are
            np.copyto(region, warped, where=self._generated[y0:y1, x0:x1, None])
        else:
            keep = self.keep_mask[y0:y1, x0:x1, None]
            blend = warped.astype(np.float32) * (1.0 - keep) + face[y0:y1, x0:x1].astype(np.float32) * keep
            region[...] = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
        return out_face

    def _paint_interior(self, out, face, g, xx, yy, inside, up_amount, low_amount, spread_px) -> np.ndarray:
        """Paint the opened mouth (cavity, teeth, tongue) where ``inside`` is 1."""
        u = (xx - g.centre_x) / (g.half_width * _LIP_SPAN + spread_px * 0.6)
        ell = np.clip(1.0 - u * u, 0.0, 1.0) ** _LIP_SHAPE
        top = g.curve(g.upper_y, xx) - up_amount * ell
        bottom = g.curve(g.lower_y, xx) + low_amount * ell
        gap = np.maximum(bottom - top, 1e-3)
        t = np.clip((yy - top) / gap, 0.0, 1.0)
        # The skin's brightness (under the nose) sets the exposure of the painted interior.
        cx, cy = int(g.centre_x), int(max(g.upper_y.min() - 1.8 * g.upper_thickness, 0))
        skin = face[max(cy - 4, 0) : cy + 4, max(cx - 12, 0) : cx + 12].reshape(-1, 3).astype(np.float32)
        light = float(np.clip(np.median(skin.mean(axis=1)) / 190.0, 0.45, 1.25))
        lip_rgb = np.median(
            face[
                int(g.lower_y.max()) : int(g.lower_y.max() + g.lower_thickness),
                int(g.centre_x - g.half_width / 2) : int(g.centre_x + g.half_width / 2),
            ]
            .reshape(-1, 3)
            .astype(np.float32),
            axis=0,
        )
        cavity = np.array([48.0, 18.0, 22.0]) * light
        edge = np.exp(-np.minimum(t, 1 - t) * gap / 2.0)[..., None]  # the lips' inner edge, 2 px
        colour = cavity[None, None, :] * (1 - 0.6 * edge) + 0.6 * edge * (0.5 * lip_rgb[None, None, :])
        # Upper teeth: a band under the upper lip, shaded towards the corners.
        width = 2 * g.half_width
        teeth_h = np.minimum(0.45 * gap, 0.13 * width)
        teeth_rgb = np.array([236.0, 230.0, 220.0]) * light
        tu = np.clip(1.0 - (np.abs(u) / 0.8) ** 2, 0.0, 1.0)
        depth = yy - top
        upper_teeth = _smoothstep((teeth_h - depth) / 1.2) * _smoothstep((depth - 0.6) / 1.0) * tu**0.5
        fall = 1.0 - 0.2 * depth / np.maximum(teeth_h, 1)
        teeth_shade = ((0.55 + 0.45 * tu) * fall)[..., None]
        colour = colour * (1 - upper_teeth[..., None]) + upper_teeth[..., None] * teeth_rgb * teeth_shade
        # Lower teeth and tongue show only when the mouth is well open.
        low_h = np.minimum(0.16 * gap, 0.05 * width)
        lower_teeth = _smoothstep((yy - (bottom - low_h)) / 1.0) * _smoothstep((bottom - yy - 0.8) / 1.0) * tu
        lower_teeth *= _smoothstep((gap - 0.14 * width) / (0.08 * width))
        colour = colour * (1 - 0.6 * lower_teeth[..., None]) + 0.6 * lower_teeth[..., None] * teeth_rgb * 0.75
        tongue_c = np.array([140.0, 58.0, 62.0]) * light
        ty = (yy - (bottom - 0.25 * gap)) / np.maximum(0.35 * gap, 1.0)
        tongue = np.clip(1 - (u / 0.6) ** 2 - ty**2, 0, 1) * _smoothstep((gap - 0.18 * width) / (0.1 * width))
        tongue *= 1 - lower_teeth
        colour = colour * (1 - 0.6 * tongue[..., None]) + 0.6 * tongue[..., None] * tongue_c
        # Antialiased edge, and fade in over the first pixels of opening (no pop).
        alpha = cv2.GaussianBlur(inside, (0, 0), 0.7) * np.clip(gap / 2.0, 0.0, 1.0)
        alpha = alpha[..., None]
        return out * (1 - alpha) + colour * alpha


class ParametricEngine:
    """Lip sync without a model, for CPU servers and tests (engine name ``"parametric"``).

    Args:
        avatar: The prepared :class:`latentsync.avatar.Avatar` (aligned faces, aligned landmarks,
            keep-mask, fps).
        options: Signal and drawing settings.

    """

    name = "parametric"

    def __init__(self, avatar, options: ParametricOptions | None = None) -> None:
        self.avatar = avatar
        self.options = options or ParametricOptions()
        self._renderer: MouthRenderer | None = None

    def load(self) -> None:
        """Prepare the renderer (mask fade field); safe to call twice."""
        if self._renderer is None:
            self._renderer = MouthRenderer(np.asarray(self.avatar.mask), self.options)

    def close(self) -> None:
        """Drop the renderer; safe to call twice or before :meth:`load`."""
        self._renderer = None

    def features(self, audio_16k: np.ndarray, start_frame: int = 0, end_frame: int | None = None) -> np.ndarray:
        """Per-frame mouth controls of a task (see :func:`mouth_signal`), or of frames ``[start, end)``.

        Args:
            audio_16k: ``(N,) float32`` mono audio at 16 kHz in [-1, 1].
            start_frame: First output frame.
            end_frame: One past the last (None: all); frames past the audio repeat the last row.

        Returns:
            ``(end_frame - start_frame, 2) float32``: opening in [0, 1], spread in [-1, 1]; all rows
            (``ceil(N * fps / 16000)``) by default.

        """
        signal_rows = mouth_signal(audio_16k, self.avatar.fps, self.options)  # whole clip: smoothing sees it all
        end = len(signal_rows) if end_frame is None else int(end_frame)
        if len(signal_rows) == 0:
            return np.zeros((max(end - start_frame, 0), 2), np.float32)
        return signal_rows[np.minimum(np.arange(start_frame, end), len(signal_rows) - 1)]

    def generate_batch(self, requests: list[ChunkRequest]) -> list[ChunkResult]:
        """Render several chunks, one after the other (faces are independent: nothing to batch)."""
        return [self.generate(request) for request in requests]

    def generate(self, request: ChunkRequest) -> ChunkResult:
        """Render the chunk's faces.

        Args:
            request: Chunk with ``features`` rows from :meth:`features`.

        Returns:
            :class:`ChunkResult` with ``(len(frame_indices), 256, 256, 3) uint8`` faces.

        Raises:
            RuntimeError: If :meth:`load` was not called.
            ValueError: If a frame index is outside the avatar.

        """
        if self._renderer is None:
            raise RuntimeError("ParametricEngine.generate() before load()")
        t0 = time.perf_counter()
        idx = np.asarray(request.frame_indices, np.int64)
        if idx.min() < 0 or idx.max() >= len(self.avatar.faces):
            raise ValueError(f"frame index out of range [0, {len(self.avatar.faces)}): {idx.tolist()}")
        feats = np.asarray(request.features, np.float32)
        faces = np.empty((len(idx), *self.avatar.faces.shape[1:]), np.uint8)
        for k, i in enumerate(idx):
            faces[k] = self._renderer.render(
                np.asarray(self.avatar.faces[i]),
                self.avatar.aligned_landmarks[i],
                float(feats[k, 0]),
                float(feats[k, 1]),
            )
        elapsed = time.perf_counter() - t0
        return ChunkResult(
            task_id=request.task_id,
            chunk_index=request.chunk_index,
            frame_indices=idx,
            faces=faces,
            generate_s=elapsed,
            timings_s={"render": elapsed},
        )
