"""The face policy of uploaded avatars: how wide the face is, and when that is a warning or a refusal.

A face narrower than ``avatar.min_face_px`` on air carries little visible lip-sync (docs/avatars.md,
"Face size"): a prepared upload whose face is under the limit at its own size gets a
``face_too_small`` warning in its record, and a channel on which it would be under the limit is
refused with 409 ``face_too_small`` (unless the client forces it). Frames without a face are a
``face_lost`` warning. The face is measured in the preparation's child process (:func:`measure_face`).
"""

from __future__ import annotations

from latentsync.serving.avatars.catalogue import AvatarError, AvatarRecord


def measure_face(avatar, video: str) -> dict:
    """The prepared avatar's face width at its size and in its source video's pixels, and the source's size.

    Args:
        avatar: The prepared :class:`latentsync.avatar.Avatar` (its ``meta``: ``face_width_px``,
            ``frame_size``, ``framing``).
        video: The video it was prepared from (probed for its displayed size, rotation applied).

    Returns:
        ``{"source_size": [w, h], "face_width_px": float, "face_px": float}``: widths in pixels,
        rounded to 0.1 (the :class:`~latentsync.serving.avatars.catalogue.AvatarRecord` fields).

    Raises:
        latentsync.media.MediaProbeError: If ``video`` cannot be probed.
    """
    from latentsync.media.framing import face_scale
    from latentsync.media.probe import probe_media
    from latentsync.media.video import VIDEO_FORMATS, display_size

    meta = avatar.meta
    face_px = float(meta.get("face_width_px", {}).get("median", 0.0))
    size = tuple(meta["frame_size"])
    framing = meta.get("framing")
    info = probe_media(video, formats=VIDEO_FORMATS)
    source = display_size(video, (info.width, info.height))  # rotation applied
    if framing and framing.get("crop"):  # cover: the window, however large, is scaled to the frame
        scale = size[0] / framing["crop"][2]
    else:
        scale = face_scale(source, size, framing["fit"] if framing else "stretch")
    return {
        "source_size": list(source),
        "face_width_px": round(face_px / scale, 1),
        "face_px": round(face_px, 1),
    }


def lost_face_warnings(faces_found: int, num_frames: int) -> list[dict]:
    """``face_lost`` when the face was not found in some of the ``num_frames`` frames of a prepared video.

    Those frames are shown as filmed (frames near a detected face take its interpolated position;
    farther ones are never pasted into: :attr:`latentsync.avatar.Avatar.pasteable`), so speech
    that plays over them has no lip-sync.
    """
    missing = num_frames - faces_found
    if missing <= 0:
        return []
    return [
        {
            "code": "face_lost",
            "message": f"no face in {missing} of {num_frames} frames (the person leaves the picture or turns "
            "away): speech over those frames is not lip-synced",
            "frames_without_face": missing,
            "num_frames": num_frames,
        }
    ]


class FacePolicy:
    """The ``avatar.min_face_px`` rule: a warning on a prepared upload, a refusal on a channel.

    Args:
        min_face_px: ``avatar.min_face_px``: the narrowest face, in pixels on air, that is accepted.
        face_fraction: ``avatar.face_fraction``: how ``cover`` sizes its window
            (:func:`latentsync.media.framing.cover_width`), so the face's width on a channel is foreseen.
    """

    def __init__(self, min_face_px: int, face_fraction: float = 0.3):
        self.min_face_px = min_face_px
        self.face_fraction = face_fraction

    def face_on_air(self, record: AvatarRecord, size: tuple[int, int], fit: str) -> tuple[float, float]:
        """The face's width on a channel of ``size``, and the widest the video allows there without upscaling.

        Args:
            record: A ready avatar's record with its face measured (``source_size``, ``face_width_px``).
            size: The channel's ``(width, height)`` in pixels.
            fit: The channel's ``avatar.fit``.

        Returns:
            ``(face_px, largest_px)`` in output pixels: as the channel would frame it (``cover``: the
            window :func:`~latentsync.media.framing.cover_width` sizes on this face), and framed with
            ``cover`` in the narrowest window that does not upscale
            (:func:`~latentsync.media.framing.largest_face_px`).

        Raises:
            ValueError: If the record has no face measured.
        """
        from latentsync.media.framing import Fit, cover_width, face_scale, largest_face_px

        if record.face_width_px is None or record.source_size is None:
            raise ValueError(f"avatar {record.id} has no face measured")
        source = (int(record.source_size[0]), int(record.source_size[1]))
        face = float(record.face_width_px)
        if Fit(fit) is Fit.cover:
            scale = size[0] / cover_width(source, size, face, self.face_fraction, self.min_face_px)
        else:
            scale = face_scale(source, size, fit)
        return face * scale, largest_face_px(source, size, face)

    def too_small_warnings(self, face_px: float, size) -> list[dict]:
        """``face_too_small`` when ``face_px`` (at ``size``) is under ``avatar.min_face_px``.

        Args:
            face_px: The face's median width in pixels at ``size``.
            size: ``(width, height)`` in pixels the avatar is prepared at.

        Returns:
            ``[]``, or one ``{"code": "face_too_small", "message", "face_px", "min_face_px"}``.
        """
        limit = self.min_face_px
        if face_px >= limit:
            return []
        return [
            {
                "code": "face_too_small",
                "message": f"the face is {face_px:.0f} px across at {size[0]}x{size[1]}, under avatar.min_face_px = "
                f"{limit}: lip-sync will be hard to see",
                "face_px": round(face_px, 1),
                "min_face_px": limit,
            }
        ]

    def check(self, record: AvatarRecord, size: tuple[int, int] | None, fit: str) -> None:
        """Refuse an avatar whose face would be narrower than ``avatar.min_face_px`` on a channel of ``size``.

        Args:
            record: A ready avatar's record (without its face measured: nothing is checked).
            size: The channel's ``(width, height)`` (None: not known yet; nothing is checked).
            fit: The channel's ``avatar.fit``.

        Raises:
            AvatarError: 409 ``face_too_small`` naming the width it would have, the required width and the
                largest the video allows at that size without upscaling.
        """
        if size is None or record.face_width_px is None or record.source_size is None:
            return
        face_px, largest_px = self.face_on_air(record, size, fit)
        if face_px < self.min_face_px:
            raise AvatarError(
                "face_too_small",
                f"avatar {record.id}'s face would be {face_px:.0f} px across at {size[0]}x{size[1]} ({fit}), under "
                f"avatar.min_face_px = {self.min_face_px}; the largest this video allows at {size[0]}x{size[1]} "
                f'without upscaling is {largest_px:.0f} px (cover); send "force": true to put it on air anyway',
            )
