"""Tests of the U-Net checkpoint loader: formats, dtypes, clear errors, a full-size round trip."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from latentsync.models.loading import CheckpointError, load_unet, read_state_dict, resolve_dtype
from latentsync.models.unet3d import UNet3DConditionModel, UNet3DConfig

TINY = UNet3DConfig.tiny()


def tiny_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return UNet3DConditionModel(TINY).state_dict()


def save_official(path, state_dict, global_step=1000):
    torch.save({"global_step": global_step, "state_dict": state_dict}, path)
    return path


def assert_same_weights(model, state_dict):
    ours = model.state_dict()
    assert list(ours) == list(state_dict)
    for name, tensor in state_dict.items():
        assert torch.equal(ours[name].to(tensor.dtype), tensor), name


@pytest.mark.parametrize("wrapped", [True, False], ids=["official-dict", "bare-state-dict"])
def test_round_trip_tiny(tmp_path, wrapped):
    state_dict = tiny_state_dict()
    path = tmp_path / "unet.pt"
    if wrapped:
        save_official(path, state_dict)
    else:
        torch.save(state_dict, path)
    model = load_unet(path, config=TINY)
    assert_same_weights(model, state_dict)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert model.dtype == torch.float32 and model.device.type == "cpu"


def test_loaded_model_runs_and_matches_source(tmp_path):
    torch.manual_seed(0)
    source = UNet3DConditionModel(TINY).eval()
    path = save_official(tmp_path / "unet.pt", source.state_dict())
    generator = torch.Generator().manual_seed(1)
    sample, audio = torch.randn(1, 13, 2, 16, 16, generator=generator), torch.randn(1, 2, 50, 384, generator=generator)
    with torch.inference_mode():
        expected = source(sample, 5, audio)
        contiguous = load_unet(path, config=TINY, channels_last=False)
        torch.testing.assert_close(contiguous(sample, 5, audio), expected, rtol=0, atol=0)
        # The default converts the conv weights to channels-last once, at load: same result up to rounding.
        model = load_unet(path, config=TINY)
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(model(sample, 5, audio), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, "fp32"])
def test_target_dtype_and_channels_last(tmp_path, dtype):
    state_dict = tiny_state_dict()
    model = load_unet(save_official(tmp_path / "unet.pt", state_dict), config=TINY, dtype=dtype, channels_last=True)
    assert model.dtype == resolve_dtype(dtype, "cpu")
    assert all(p.dtype == model.dtype for p in model.parameters())
    assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(model.conv_out.bias.float(), state_dict["conv_out.bias"], rtol=1e-2, atol=1e-2)


def test_resolve_dtype_defaults_and_rejects():
    assert resolve_dtype(None, "cpu") == torch.float32
    assert resolve_dtype(None, "cuda:0") == torch.float16
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype("int8", "cpu")
    with pytest.raises(ValueError, match="unsupported dtype"):
        resolve_dtype(torch.float64, "cpu")


def test_missing_file_names_the_path(tmp_path):
    path = tmp_path / "nowhere" / "latentsync_unet.pt"
    with pytest.raises(FileNotFoundError, match="nowhere/latentsync_unet.pt"):
        load_unet(path, config=TINY)


def test_truncated_file_is_a_clear_error(tmp_path):
    path = save_official(tmp_path / "unet.pt", tiny_state_dict())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"unet\.pt.*truncated"):
        load_unet(path, config=TINY)


def test_not_a_checkpoint_is_a_clear_error(tmp_path):
    path = tmp_path / "unet.pt"
    path.write_text("definitely not a checkpoint")
    with pytest.raises(CheckpointError, match="unet.pt"):
        read_state_dict(path)
    torch.save([torch.zeros(1)], path)
    with pytest.raises(CheckpointError, match="neither a state dict"):
        read_state_dict(path)


def test_missing_keys_are_named(tmp_path):
    state_dict = tiny_state_dict()
    del state_dict["conv_in.weight"]
    del state_dict["mid_block.resnets.1.conv2.bias"]
    path = save_official(tmp_path / "unet.pt", state_dict)
    with pytest.raises(CheckpointError) as info:
        load_unet(path, config=TINY)
    message = str(info.value)
    assert str(path) in message
    assert "2 missing key(s)" in message
    assert "conv_in.weight" in message and "mid_block.resnets.1.conv2.bias" in message


def test_shape_mismatches_are_named(tmp_path):
    state_dict = tiny_state_dict()
    state_dict["conv_in.weight"] = torch.zeros(32, 9, 3, 3)
    path = save_official(tmp_path / "unet.pt", state_dict)
    with pytest.raises(CheckpointError, match=r"conv_in.weight: file \(32, 9, 3, 3\) != model \(32, 13, 3, 3\)"):
        load_unet(path, config=TINY)


def test_wrong_architecture_lists_first_keys_only(tmp_path):
    # The tiny file against the full-size model: hundreds of problems, a readable message.
    path = save_official(tmp_path / "unet.pt", tiny_state_dict())
    with pytest.raises(CheckpointError) as info:
        load_unet(path)
    message = str(info.value)
    assert "missing key(s)" in message and "shape mismatch(es)" in message
    assert len(message) < 3000


def test_extra_keys_only_warn(tmp_path, caplog):
    state_dict = tiny_state_dict()
    state_dict["motion_module.extra.weight"] = torch.zeros(3)
    path = save_official(tmp_path / "unet.pt", state_dict)
    with caplog.at_level(logging.WARNING, logger="latentsync.models.loading"):
        model = load_unet(path, config=TINY)
    assert "motion_module.extra.weight" in caplog.text
    assert "motion_module.extra.weight" not in model.state_dict()


@pytest.mark.slow
def test_full_size_random_checkpoint_round_trip(tmp_path):
    """A random checkpoint of the real size (3.4 GB) in the official format loads through mmap."""
    shapes = {k: v.shape for k, v in UNet3DConditionModel(device="meta").state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    state_dict = {k: torch.empty(shape).uniform_(-0.1, 0.1, generator=generator) for k, shape in shapes.items()}
    path = save_official(tmp_path / "latentsync_unet.pt", state_dict, global_step=123456)
    picks = [
        "conv_in.weight",
        "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.weight",
        "mid_block.resnets.1.conv2.weight",
        "up_blocks.1.resnets.2.conv_shortcut.weight",
        "conv_out.bias",
    ]
    expected = {k: state_dict[k].clone() for k in picks}
    del state_dict

    model = load_unet(path)
    ours = model.state_dict()
    assert [(k, v.shape) for k, v in ours.items()] == list(shapes.items())
    for name, tensor in expected.items():
        assert torch.equal(ours[name], tensor), name
    path.unlink()


def load_check_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts/check_checkpoints.py"
    spec = importlib.util.spec_from_file_location("check_checkpoints", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_check_checkpoints_reports_problems(tmp_path, capsys):
    import json

    from latentsync.models.vae import sd_vae_ft_mse_config

    script = load_check_script()
    unet = save_official(tmp_path / "latentsync_unet.pt", tiny_state_dict())  # wrong architecture
    vae = tmp_path / "vae"
    vae.mkdir()
    config = {**sd_vae_ft_mse_config(), "latent_channels": 16, "scaling_factor": 0.13025}
    (vae / "config.json").write_text(json.dumps(config))
    code = script.main(["--unet", str(unet), "--whisper", str(tmp_path / "tiny.pt"), "--vae", str(vae)])
    out = capsys.readouterr().out
    assert code == 1
    assert "[FAIL] U-Net" in out and "missing key(s)" in out and "latentsync_unet.pt" in out
    assert "[FAIL] Whisper" in out and "not found" in out
    assert "latent_channels = 16" in out and "scaling_factor 0.13025" in out
    assert "no weight file" in out
