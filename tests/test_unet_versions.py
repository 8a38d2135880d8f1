"""Tests of the LatentSync 1.5 / 1.6 U-Net (temporal layers) and of telling the versions apart.

The layout facts checked here are those of docs/latentsync.md, "Versions" (the original code at the 1.5 release,
bytedance/LatentSync 75a4a17, and at the 1.6 release, d058a61).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from latentsync.config import LATENTSYNC_VERSIONS, ConfigError, LatentSyncConfig, load_config, validate_latentsync
from latentsync.models.loading import (
    CheckpointError,
    CheckpointVersionError,
    check_version,
    detect_version,
    load_unet,
)
from latentsync.models.motion_module import PositionEncoding, TemporalTransformer, sinusoidal_position_table
from latentsync.models.unet3d import VERSIONS, UNet3DConditionModel, UNet3DConfig
from tests.datafiles import data_file, load_script

#: Parameters of the 1.5 / 1.6 U-Net: 1.0's 849,962,244 plus 20 motion modules of 22 C^2 + 19 C each
#: (C = 320 x5, 640 x5, 1280 x10); the 40 position tables (1, 24, C) are buffers, not parameters.
PARAMETER_COUNT_1_5 = 1_267_099_844

# The model section of stage2.yaml at the 1.5 release (stage2_512.yaml at 1.6 has the same one).
STAGE2_MODEL = {
    "act_fn": "silu",
    "add_audio_layer": True,
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": ["CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"],
    "mid_block_type": "UNetMidBlock3DCrossAttn",
    "up_block_types": ["UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 13,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": "1e-5",
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "resnet_time_scale_shift": "default",
    "use_motion_module": True,
    "motion_module_resolutions": [1, 2, 4, 8],
    "motion_module_mid_block": False,
    "motion_module_decoder_only": False,
    "motion_module_type": "Vanilla",
    "motion_module_kwargs": {
        "num_attention_heads": 8,
        "num_transformer_block": 1,
        "attention_block_types": ["Temporal_Self", "Temporal_Self"],
        "temporal_position_encoding": True,
        "temporal_position_encoding_max_len": 24,
        "temporal_attention_dim_div": 1,
        "zero_initialize": True,
    },
}

MOTION_MODULE_SUFFIXES = [
    ("temporal_transformer.norm.weight", ("C",)),
    ("temporal_transformer.norm.bias", ("C",)),
    ("temporal_transformer.proj_in.weight", ("C", "C")),
    ("temporal_transformer.proj_in.bias", ("C",)),
    *[
        (f"temporal_transformer.transformer_blocks.0.attention_blocks.{k}.{name}", shape)
        for k in (0, 1)
        for name, shape in (
            ("to_q.weight", ("C", "C")),
            ("to_k.weight", ("C", "C")),
            ("to_v.weight", ("C", "C")),
            ("to_out.0.weight", ("C", "C")),
            ("to_out.0.bias", ("C",)),
            ("pos_encoder.pe", (1, 24, "C")),
        )
    ],
    *[(f"temporal_transformer.transformer_blocks.0.norms.{k}.{p}", ("C",)) for k in (0, 1) for p in ("weight", "bias")],
    ("temporal_transformer.transformer_blocks.0.ff.net.0.proj.weight", ("8C", "C")),
    ("temporal_transformer.transformer_blocks.0.ff.net.0.proj.bias", ("8C",)),
    ("temporal_transformer.transformer_blocks.0.ff.net.2.weight", ("C", "4C")),
    ("temporal_transformer.transformer_blocks.0.ff.net.2.bias", ("C",)),
    ("temporal_transformer.transformer_blocks.0.ff_norm.weight", ("C",)),
    ("temporal_transformer.transformer_blocks.0.ff_norm.bias", ("C",)),
    ("temporal_transformer.proj_out.weight", ("C", "C")),
    ("temporal_transformer.proj_out.bias", ("C",)),
]


def shape_of(symbolic: tuple, channels: int) -> tuple[int, ...]:
    sizes = {"C": channels, "4C": 4 * channels, "8C": 8 * channels}
    return tuple(sizes.get(d, d) if isinstance(d, str) else d for d in symbolic)


def official_1_5_listing() -> dict[str, tuple[int, ...]]:
    """1.0's listing with the audio layers renamed, plus the motion modules of every down and up block."""
    listing = {}
    for line in data_file("latentsync_1_0_unet_state_dict.txt").read_text().splitlines():
        if line.strip():
            name, shape = line.split(" ", 1)
            name = name.replace("audio_cross_attn.norm.", "norm2.").replace("audio_cross_attn.attn.", "attn2.")
            listing[name] = tuple(ast.literal_eval(shape))
    blocks = [(f"down_blocks.{i}", c, 2) for i, c in enumerate((320, 640, 1280, 1280))]
    blocks += [(f"up_blocks.{i}", c, 3) for i, c in enumerate((1280, 1280, 640, 320))]
    for prefix, channels, modules in blocks:
        for j in range(modules):
            for suffix, shape in MOTION_MODULE_SUFFIXES:
                listing[f"{prefix}.motion_modules.{j}.{suffix}"] = shape_of(shape, channels)
    return listing


def tiny_temporal_model(seed: int = 0, **overrides) -> UNet3DConditionModel:
    """Tiny 1.5-layout model with every parameter random (the zero-initialised proj_out too)."""
    torch.manual_seed(seed)
    model = UNet3DConditionModel(UNet3DConfig.for_version("1.5", **{**tiny_values(), **overrides}))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
            if isinstance(module, TemporalTransformer):
                module.proj_out.weight.normal_(0, 0.2)
                module.proj_out.bias.normal_(0, 0.2)
    return model.eval()


def tiny_values() -> dict:
    tiny = UNet3DConfig.tiny()
    return {k: getattr(tiny, k) for k in ("block_out_channels", "down_block_types", "up_block_types")} | {
        "norm_num_groups": tiny.norm_num_groups,
        "attention_heads": tiny.attention_heads,
        "sample_size": tiny.sample_size,
    }


def inputs(frames: int = 4, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 13, frames, 8, 8, generator=g), torch.randn(1, frames, 50, 384, generator=g)


def test_full_size_1_5_state_dict_has_the_official_layout():
    model = UNet3DConditionModel(UNet3DConfig.for_version("1.5"), device="meta")
    ours = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    expected = official_1_5_listing()
    assert len(ours) == len(expected) == 1246
    assert sorted(set(ours) ^ set(expected)) == []
    assert ours == expected
    assert sum(p.numel() for p in model.parameters()) == PARAMETER_COUNT_1_5
    assert not any(".motion_modules." in name for name in ours if name.startswith("mid_block."))


def test_versions_and_original_yaml_sections():
    assert VERSIONS == LATENTSYNC_VERSIONS == ("1.0", "1.5", "1.6")
    assert UNet3DConfig.for_version("1.0") == UNet3DConfig()
    assert UNet3DConfig.for_version("1.6") == UNet3DConfig.for_version("1.5")  # 1.6: same network, 512 px data
    assert UNet3DConfig.from_original(STAGE2_MODEL) == UNet3DConfig.for_version("1.5")
    shipped = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs/unet/stage2.yaml").read_text())
    assert UNet3DConfig.from_original(shipped["model"]) == UNet3DConfig.for_version("1.5")
    with pytest.raises(ValueError, match="unknown LatentSync version"):
        UNet3DConfig.for_version("2.0")
    for bad in (
        {"attention_block_types": ["Temporal_Self", "Temporal_Cross"]},
        {"temporal_attention_dim_div": 2},
        {"cross_frame_attention_mode": "x"},
        {"unknown_key": 1},
    ):
        section = {**STAGE2_MODEL, "motion_module_kwargs": {**STAGE2_MODEL["motion_module_kwargs"], **bad}}
        with pytest.raises(ValueError, match="motion_module_kwargs"):
            UNet3DConfig.from_original(section)
    with pytest.raises(ValueError, match="motion_module_heads"):
        UNet3DConfig.for_version("1.5", motion_module_heads=6)


def test_position_table_is_the_transformer_sinusoid():
    table = sinusoidal_position_table(24, 8)
    assert table.shape == (1, 24, 8)
    p, i = 5, 3
    angle = p / 10000 ** (2 * i / 8)
    assert table[0, p, 2 * i].item() == pytest.approx(torch.sin(torch.tensor(angle)).item(), abs=1e-6)
    assert table[0, p, 2 * i + 1].item() == pytest.approx(torch.cos(torch.tensor(angle)).item(), abs=1e-6)
    encoder = PositionEncoding(8, max_len=24)
    with pytest.raises(ValueError, match="25 frames exceed"):
        encoder(torch.zeros(2, 25, 8))


def test_temporal_transformer_equals_a_loop_over_positions():
    torch.manual_seed(3)
    layer = TemporalTransformer(32, heads=4, groups=8, num_layers=1, attentions=2, max_len=24, zero_initialize=False)
    batch, frames, h, w = 2, 5, 3, 4
    x = torch.randn(batch * frames, 32, h, w)
    with torch.no_grad():
        out = layer(x, frames)
        normed = layer.norm(x).view(batch, frames, 32, h, w)
        expected = torch.empty(batch, frames, 32, h, w)
        for b in range(batch):
            for i in range(h):
                for j in range(w):
                    tokens = layer.proj_in(normed[b, :, :, i, j][None])  # (1, F, C): one position's frames
                    block = layer.transformer_blocks[0]
                    for attention, norm in zip(block.attention_blocks, block.norms, strict=True):
                        t = norm(tokens) + attention.pos_encoder.pe[:, :frames]
                        q, k, v = attention.to_q(t), attention.to_k(t), attention.to_v(t)
                        heads = [
                            torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / 8**0.5, dim=-1) @ v[..., s]
                            for s in (slice(8 * n, 8 * n + 8) for n in range(4))
                        ]
                        tokens = attention.to_out[0](torch.cat(heads, dim=-1)) + tokens
                    tokens = block.ff(block.ff_norm(tokens)) + tokens
                    expected[b, :, :, i, j] = layer.proj_out(tokens)[0]
    expected = expected.reshape(batch * frames, 32, h, w) + x
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    channels_last = layer(x.contiguous(memory_format=torch.channels_last), frames)
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(channels_last, out, rtol=1e-5, atol=1e-5)


def test_tiny_1_5_forward_mixes_frames_through_the_temporal_layers():
    # Per-frame ResNet norms, so that the temporal layers are the only path between frames.
    model = tiny_temporal_model(joint_frame_norm=False)
    sample, audio = inputs(frames=4)
    changed = sample.clone()
    changed[:, :, 3] += torch.randn(changed[:, :, 3].shape, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        ref = model(sample, 500, audio)
        out = model(changed, 500, audio)
    assert ref.shape == (1, 4, 4, 8, 8) and torch.isfinite(ref).all()
    assert (out[:, :, 0] - ref[:, :, 0]).abs().max() > 1e-3  # frame 0 sees frame 3

    # Freshly built (proj_out zero-initialised, as the original): the temporal layers are the identity.
    fresh = UNet3DConditionModel(UNet3DConfig.for_version("1.5", joint_frame_norm=False, **tiny_values())).eval()
    with torch.inference_mode():
        torch.testing.assert_close(fresh(changed, 500, audio)[:, :, :3], fresh(sample, 500, audio)[:, :, :3])


def test_tiny_1_5_audio_reaches_the_output_and_backward_reaches_every_parameter():
    model = tiny_temporal_model()
    sample, audio = inputs(frames=3)
    with torch.inference_mode():
        assert not torch.allclose(model(sample, 10, audio), model(sample, 10, audio * 0))
    model.train()
    model(sample, 10, audio).square().mean().backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum()]
    assert no_grad == []


def save(path, state_dict):
    torch.save({"global_step": 7, "state_dict": state_dict}, path)
    return path


def test_tiny_1_5_checkpoint_loads_strictly_and_runs_the_same(tmp_path):
    model = tiny_temporal_model()
    path = save(tmp_path / "latentsync_unet.pt", model.state_dict())
    loaded = load_unet(path, config=model.config, version="1.6")
    sample, audio = inputs()
    with torch.inference_mode():
        torch.testing.assert_close(loaded(sample, 300, audio), model(sample, 300, audio), rtol=1e-5, atol=1e-5)

    state = model.state_dict()
    key = "up_blocks.1.motion_modules.2.temporal_transformer.transformer_blocks.0.attention_blocks.1.to_v.weight"
    del state[key]
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\), first: " + key.replace(".", r"\.")):
        load_unet(save(tmp_path / "broken.pt", state), config=model.config, version="1.5")


def test_a_checkpoint_of_the_other_version_is_refused_by_name(tmp_path):
    torch.manual_seed(0)
    v10 = save(tmp_path / "v10.pt", UNet3DConditionModel(UNet3DConfig.tiny()).state_dict())
    v15 = save(tmp_path / "v15.pt", tiny_temporal_model().state_dict())
    setting = "engine.latentsync.version"
    message = f"{v10} holds a LatentSync 1.0 U-Net (no motion-module tensors) but {setting} is 1.6"
    with pytest.raises(
        CheckpointVersionError, match=message.replace(".", r"\.").replace("(", r"\(").replace(")", r"\)")
    ):
        load_unet(v10, config=UNet3DConfig.for_version("1.6", **tiny_values()), version="1.6", version_setting=setting)
    with pytest.raises(
        CheckpointVersionError, match=r"holds a LatentSync 1\.5 or 1\.6 U-Net \(\d+ motion-module tensors\) but"
    ):
        load_unet(v15, config=UNet3DConfig.tiny(), version="1.0")
    with pytest.raises(CheckpointVersionError):  # no version: the config's decides
        load_unet(v15, config=UNet3DConfig.tiny())
    with pytest.raises(ValueError, match="version is 1.5 but the U-Net config is LatentSync 1.0"):
        load_unet(v10, config=UNet3DConfig.tiny(), version="1.5")


def test_detect_version():
    assert detect_version(UNet3DConditionModel(UNet3DConfig.tiny(), device="meta").state_dict()) == "1.0"
    assert detect_version(tiny_temporal_model().state_dict()) == "1.5"
    check_version({"down_blocks.0.motion_modules.0.x": 0}, "1.6", "file")
    with pytest.raises(ValueError, match="unknown LatentSync version"):
        check_version({}, "2.0", "file")


def test_config_version_is_validated(tmp_path):
    config = load_config(None, ["engine.latentsync.version=1.5"])
    assert config.engine.latentsync.version == "1.5"
    assert load_config(None, []).engine.latentsync.version == "1.0"
    with pytest.raises(ConfigError, match=r"engine\.latentsync\.version"):
        validate_latentsync(LatentSyncConfig(version="2.0"))


@pytest.mark.parametrize("version", ["1.0", "1.5", "1.6"])
def test_tiny_checkpoints_of_each_version_load_and_are_reported(tmp_path, version, capsys):
    paths = load_script("make_tiny_checkpoints").make_tiny_checkpoints(tmp_path, version=version)
    section = yaml.safe_load(paths["unet_config"].read_text())
    assert section["data"]["resolution"] == (512 if version == "1.6" else 256)
    config = UNet3DConfig.from_original(section["model"])
    model = load_unet(paths["unet_path"], config=config, version=version)
    assert config.use_motion_module == (version != "1.0")
    if version != "1.0":  # the zero-initialised projections were re-randomised: the temporal layers act
        proj_out = [p for n, p in model.named_parameters() if n.endswith("temporal_transformer.proj_out.weight")]
        assert proj_out and all(p.abs().sum() > 0 for p in proj_out)
    check = load_script("check_checkpoints")
    other = "1.0" if version != "1.0" else "1.5"
    report = check.check_unet(paths["unet_path"], other)
    assert report.problems and "holds a LatentSync" in report.problems[0]
    assert ("1.5 or 1.6 U-Net" in report.notes[0]) == (version != "1.0")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_1_5_channels_last_half_precision_close_to_float32(dtype):
    model = tiny_temporal_model()
    sample, audio = inputs(frames=16)
    with torch.inference_mode():
        expected = model(sample, 700, audio)
        model = model.to("cuda", dtype).to(memory_format=torch.channels_last)
        out = model(sample.to("cuda", dtype), 700, audio.to("cuda", dtype))
    assert out.dtype == dtype and out.is_contiguous()
    assert (out.float().cpu() - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_1_5_compiled_forward_matches_eager():
    model = tiny_temporal_model().to("cuda").to(memory_format=torch.channels_last)
    sample, audio = (t.to("cuda") for t in inputs(frames=16))
    compiled = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        expected = model(sample, torch.tensor(700, device="cuda"), audio)
        out = compiled(sample, torch.tensor(700, device="cuda"), audio)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
