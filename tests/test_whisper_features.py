"""Tests of the Whisper-tiny feature path: checkpoint format, mel, frame slicing, windowed encoding."""

from __future__ import annotations

from pathlib import Path

import librosa
import numpy as np
import pytest
import soundfile
import torch

from latentsync.models.whisper_features import (
    POSITIONS_PER_WINDOW,
    WHISPER_TINY_DIMS,
    WhisperAudioEncoder,
    WhisperCheckpointError,
    WhisperDims,
    WhisperFeatureExtractor,
    frame_positions,
    load_whisper_encoder,
    log_mel_spectrogram,
    mel_filterbank,
    num_positions,
    slice_frame_features,
    window_of_position,
    window_spans,
    windows_for_frames,
)
from tests.datafiles import media_file


def speech_audio(name: str, sample_rate_hz: int = 16_000) -> np.ndarray:
    path = media_file(f"audio/{name}")
    audio, rate = soundfile.read(path, dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if rate != sample_rate_hz:
        audio = librosa.resample(audio, orig_sr=rate, target_sr=sample_rate_hz)  # soxr_hq
    return audio


def random_tiny_checkpoint(path: Path, seed: int = 0) -> Path:
    """Write a tiny.pt-format file: real dims, random encoder weights, a token decoder stub."""
    torch.manual_seed(seed)
    encoder = WhisperAudioEncoder(WhisperDims.from_checkpoint_dims(WHISPER_TINY_DIMS))
    with torch.no_grad():
        for name, p in encoder.named_parameters():
            if "ln" in name:
                p.add_(0.1 * torch.randn_like(p))
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    state["decoder.ln.weight"] = torch.ones(384)  # the real file has a text decoder: it must be ignored
    state["decoder.positional_embedding"] = torch.zeros(448, 384)
    torch.save({"dims": dict(WHISPER_TINY_DIMS), "model_state_dict": state}, path)
    return path


@pytest.fixture(scope="module")
def extractor(tmp_path_factory) -> WhisperFeatureExtractor:
    path = random_tiny_checkpoint(tmp_path_factory.mktemp("whisper") / "tiny.pt")
    return WhisperFeatureExtractor.from_checkpoint(path)


def test_mel_filterbank_and_silence():
    filters = mel_filterbank()
    assert filters.shape == (80, 201) and filters.dtype == torch.float32
    mel = log_mel_spectrogram(np.zeros(16_000 + 100, dtype=np.float32))
    assert mel.shape == (80, 100)  # num_samples // 160: the last STFT frame is dropped
    torch.testing.assert_close(mel, torch.full_like(mel, -1.5))  # (log10(1e-10) + 4) / 4
    with pytest.raises(ValueError, match="too short"):
        log_mel_spectrogram(np.zeros(200, dtype=np.float32))
    with pytest.raises(ValueError, match="1-D"):
        log_mel_spectrogram(np.zeros((2, 16_000), dtype=np.float32))


def test_mel_floor_is_clip_max_minus_8():
    t = np.arange(32_000) / 16_000
    mel = log_mel_spectrogram((0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32))
    assert mel.max() - mel.min() <= 2.0 + 1e-6  # 8 decades / 4
    assert np.isclose(float(mel.min()), float(mel.max()) - 2.0, atol=1e-6)


def test_frame_positions_clamp_at_both_ends():
    assert frame_positions(0, 480) == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert frame_positions(1, 480) == [0, 0, 0, 1, 2, 3, 4, 5, 6, 7]
    assert frame_positions(10, 480) == list(range(16, 26))
    assert frame_positions(239, 480) == [474, 475, 476, 477, 478, 479, 479, 479, 479, 479]
    assert frame_positions(500, 480) == [479] * 10  # past the audio: its last position
    assert frame_positions(3, 100, fps=50) == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]  # centre int(i * 50 / fps) = 3
    with pytest.raises(ValueError):
        frame_positions(0, 0)


def test_window_mapping():
    assert window_spans(3973) == [(0, 3000), (3000, 3973)]
    assert window_spans(3000) == [(0, 3000)]
    assert num_positions(3973) == 1500 + 486
    assert [window_of_position(p) for p in (0, 1499, 1500, 2999, 3000)] == [0, 0, 1, 1, 2]
    assert windows_for_frames(0, 16, 1986) == [0]
    assert windows_for_frames(736, 752, 1986) == [0, 1]  # frame 747 needs positions up to 1499, 748 from 1492
    assert windows_for_frames(752, 768, 1986) == [1]
    assert windows_for_frames(2000, 2016, 1986) == [1]  # past the end: clamped into the last window


def test_checkpoint_loads_encoder_only(tmp_path):
    path = random_tiny_checkpoint(tmp_path / "tiny.pt")
    encoder = load_whisper_encoder(path, dtype=torch.float32)
    assert encoder.dims == WhisperDims()
    stored = torch.load(path, weights_only=True)["model_state_dict"]
    for name, tensor in encoder.state_dict().items():
        assert torch.equal(tensor, stored[f"encoder.{name}"]), name
    assert not any(p.requires_grad for p in encoder.parameters())


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tiny.pt"):
        load_whisper_encoder(tmp_path / "tiny.pt")
    path = random_tiny_checkpoint(tmp_path / "tiny.pt")
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["model_state_dict"]["encoder.blocks.3.mlp.2.bias"]
    torch.save(checkpoint, tmp_path / "broken.pt")
    with pytest.raises(WhisperCheckpointError, match=r"broken\.pt.*encoder\.blocks\.3\.mlp\.2\.bias"):
        load_whisper_encoder(tmp_path / "broken.pt")
    torch.save({"dims": {**WHISPER_TINY_DIMS, "n_mels": 128}, "model_state_dict": {}}, tmp_path / "large.pt")
    with pytest.raises(WhisperCheckpointError, match="n_mels=80"):
        load_whisper_encoder(tmp_path / "large.pt")
    torch.save({"state_dict": {}}, tmp_path / "other.pt")
    with pytest.raises(WhisperCheckpointError, match="not an OpenAI Whisper checkpoint"):
        load_whisper_encoder(tmp_path / "other.pt")


def test_features_of_demo_audio_16k(extractor):
    audio = speech_audio("demo1_audio.wav")  # 9.6 s at 16 kHz
    assert len(audio) == 153_600
    clip = extractor.prepare(audio)
    assert clip.num_windows == 1 and clip.num_positions == 480
    chunk = clip.frames(0, 16)
    assert chunk.shape == (16, 50, 384) and chunk.dtype == torch.float32
    assert clip.encoded_windows == (0,)
    features = clip.all_positions()
    assert features.shape == (480, 5, 384)
    # Row layout: 10 positions x 5 embeddings, position-major.
    torch.testing.assert_close(chunk[5].view(10, 5, 384), features[6:16], rtol=0, atol=0)
    torch.testing.assert_close(clip.frames(230, 246), slice_frame_features(features, 230, 246), rtol=0, atol=0)


def test_features_of_48k_audio_resampled(extractor):
    audio = speech_audio("7s_shan_0801_01.wav")  # 48 kHz mono, resampled by librosa (soxr)
    clip = extractor.prepare(audio)
    assert clip.mel.shape == (80, len(audio) // 160)
    assert clip.num_positions == len(audio) // 160 // 2
    assert clip.frames(160, 176).shape == (16, 50, 384)


def test_windowed_features_equal_whole_clip(extractor):
    names = ["demo1_audio.wav", "7s_shan_0801_01.wav", "4s_Wavfile_1719704064_11.wav", "0716-2001.wav"]
    audio = np.concatenate([speech_audio(n) for n in names])  # ~30.2 s: two windows, the second one short
    whole = extractor.encode(audio)
    clip = extractor.prepare(audio)
    assert clip.num_windows == 2
    assert whole.shape == (clip.num_positions, 5, 384)
    assert clip.num_positions > POSITIONS_PER_WINDOW
    frames_total = clip.num_positions // 2 + 3  # a few frames past the end
    first = clip.frames(0, 16)
    assert clip.encoded_windows == (0,)  # the first chunk needs only the first window
    torch.testing.assert_close(first, slice_frame_features(whole, 0, 16), rtol=0, atol=0)
    for start in range(16, frames_total, 16):
        stop = min(start + 16, frames_total)
        torch.testing.assert_close(clip.frames(start, stop), slice_frame_features(whole, start, stop), rtol=0, atol=0)
    assert clip.encoded_windows == (0, 1)
    streamed = torch.cat([f for _, f in clip.iter_windows()])
    torch.testing.assert_close(streamed, whole, rtol=0, atol=0)


def test_encoder_matches_transformers_whisper_encoder(extractor):
    """Independent check of the encoder math: Hugging Face's WhisperEncoder with converted weights."""
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    ours = extractor.encoder
    config = WhisperConfig(
        num_mel_bins=80,
        d_model=384,
        encoder_layers=4,
        encoder_attention_heads=6,
        encoder_ffn_dim=1536,
        max_source_positions=1500,
        activation_function="gelu",
    )
    hf = WhisperEncoder(config).eval()
    sd = ours.state_dict()
    converted = {
        "conv1.weight": sd["conv1.weight"],
        "conv1.bias": sd["conv1.bias"],
        "conv2.weight": sd["conv2.weight"],
        "conv2.bias": sd["conv2.bias"],
        "embed_positions.weight": sd["positional_embedding"],
        "layer_norm.weight": sd["ln_post.weight"],
        "layer_norm.bias": sd["ln_post.bias"],
    }
    names = {
        "self_attn.q_proj": "attn.query",
        "self_attn.k_proj": "attn.key",
        "self_attn.v_proj": "attn.value",
        "self_attn.out_proj": "attn.out",
        "self_attn_layer_norm": "attn_ln",
        "fc1": "mlp.0",
        "fc2": "mlp.2",
        "final_layer_norm": "mlp_ln",
    }
    for i in range(4):
        for theirs, mine in names.items():
            for kind in ("weight", "bias"):
                if f"blocks.{i}.{mine}.{kind}" in sd:
                    converted[f"layers.{i}.{theirs}.{kind}"] = sd[f"blocks.{i}.{mine}.{kind}"]
    missing, unexpected = hf.load_state_dict(converted, strict=False)
    assert unexpected == [] and missing == []
    mel = extractor.log_mel(speech_audio("4s_Wavfile_1719704064_11.wav"))
    window = torch.nn.functional.pad(mel, (0, 3000 - mel.shape[1]))[None]
    with torch.inference_mode():
        mine = ours(window)[0]
        hidden = hf(window, output_hidden_states=True).hidden_states
    for layer in range(4):
        torch.testing.assert_close(mine[:, layer], hidden[layer][0], rtol=1e-4, atol=1e-4)
    # HF's last hidden state has ln_post applied; LatentSync keeps the value before it.
    torch.testing.assert_close(ours.ln_post(mine[:, 4]), hidden[4][0], rtol=1e-4, atol=1e-4)
