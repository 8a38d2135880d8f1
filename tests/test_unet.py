"""Tests of the LatentSync 1.0 U-Net: checkpoint layout, shapes, gradients, frame coupling, dtypes.

The 1.5 / 1.6 temporal layers are tested in tests/test_unet_versions.py.
"""

from __future__ import annotations

import ast

import pytest
import torch
from torch import nn

from latentsync.models.attention import Attention
from latentsync.models.resnet import JointGroupNorm
from latentsync.models.unet3d import UNet3DConditionModel, UNet3DConfig
from tests.datafiles import data_file

OFFICIAL_PARAMETER_COUNT = 849_962_244  # docs/latentsync.md


def read_listing() -> list[tuple[str, tuple[int, ...]]]:
    rows = []
    for line in data_file("latentsync_1_0_unet_state_dict.txt").read_text().splitlines():
        if line.strip():
            name, shape = line.split(" ", 1)
            rows.append((name, tuple(ast.literal_eval(shape))))
    return rows


def tiny_model(seed: int = 0, **overrides) -> UNet3DConditionModel:
    torch.manual_seed(seed)
    model = UNet3DConditionModel(UNet3DConfig.tiny(**overrides))
    # Non-trivial norm affine parameters so that the tests see them.
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.GroupNorm | nn.LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)
    return model.eval()


def tiny_inputs(frames: int = 2, size: tuple[int, int] = (16, 16), batch: int = 1, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(batch, 13, frames, *size, generator=g)
    audio = torch.randn(batch, frames, 50, 384, generator=g)
    return sample, audio


def test_full_size_state_dict_matches_official_listing():
    model = UNet3DConditionModel(device="meta")
    ours = [(name, tuple(t.shape)) for name, t in model.state_dict().items()]
    official = read_listing()
    assert len(official) == 686
    assert ours == official  # same names, shapes and order
    assert sum(t.numel() for t in model.state_dict().values()) == OFFICIAL_PARAMETER_COUNT


def test_tiny_forward_shape_and_dtype():
    model = tiny_model()
    sample, audio = tiny_inputs()
    with torch.inference_mode():
        out = model(sample, 951, audio)
    assert out.shape == (1, 4, 2, 16, 16)
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    assert torch.isfinite(out).all()


def test_tiny_forward_is_deterministic_across_builds():
    sample, audio = tiny_inputs()
    with torch.inference_mode():
        first = tiny_model(seed=3)(sample, torch.tensor(501), audio)
        second = tiny_model(seed=3)(sample, torch.tensor(501), audio)
    assert torch.equal(first, second)


def test_tiny_backward_reaches_every_parameter():
    model = tiny_model().train()
    sample, audio = tiny_inputs()
    sample.requires_grad_(True)
    model(sample, torch.tensor([10]), audio).square().mean().backward()
    assert sample.grad is not None and sample.grad.abs().sum() > 0
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert no_grad == []


def test_audio_layouts_and_timestep_forms_agree():
    model = tiny_model()
    sample, audio = tiny_inputs(frames=3, batch=2)
    with torch.inference_mode():
        ref = model(sample, 250, audio)
        flat = model(sample, torch.tensor([250, 250]), audio.flatten(0, 1))
        zero_d = model(sample, torch.tensor(250.0), audio)
    torch.testing.assert_close(flat, ref, rtol=0, atol=0)
    torch.testing.assert_close(zero_d, ref, rtol=1e-6, atol=1e-6)


def test_odd_latent_size_is_supported():
    model = tiny_model()
    sample, audio = tiny_inputs(frames=2, size=(15, 17))
    with torch.inference_mode():
        assert model(sample, 1, audio).shape == (1, 4, 2, 15, 17)


def test_bad_shapes_raise_value_error():
    model = tiny_model()
    sample, audio = tiny_inputs(frames=2)
    with pytest.raises(ValueError, match="sample must be"):
        model(sample[:, :12], 1, audio)
    with pytest.raises(ValueError, match="audio_embeds must be"):
        model(sample, 1, audio[:, :1])
    with pytest.raises(ValueError, match="timestep"):
        model(sample, torch.tensor([1, 2, 3]), audio)


def test_joint_group_norm_equals_group_norm_on_5d_video():
    torch.manual_seed(0)
    batch, frames, channels, h, w = 2, 3, 16, 5, 7
    video = random_pattern((batch, channels, frames, h, w), seed=51) * 3 + 1
    reference = nn.GroupNorm(4, channels, eps=1e-5)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
    ours = JointGroupNorm(4, channels, eps=1e-5)
    ours.load_state_dict(reference.state_dict())
    flat = video.transpose(1, 2).reshape(batch * frames, channels, h, w)
    expected = reference(video).transpose(1, 2).reshape(batch * frames, channels, h, w)
    torch.testing.assert_close(ours(flat, frames), expected, rtol=1e-5, atol=1e-5)
    cl = flat.contiguous(memory_format=torch.channels_last)
    out_cl = ours(cl, frames)  # the fused CPU kernel on a channels_last_3d view
    torch.testing.assert_close(out_cl, expected, rtol=1e-5, atol=1e-5)
    assert out_cl.is_contiguous(memory_format=torch.channels_last)


def conv_layouts(model: nn.Module, sample: torch.Tensor, audio: torch.Tensor) -> dict[str, set[str]]:
    """Memory layouts met by the Conv2d layers in one forward pass: ``{"weights": ..., "inputs": ...}``.

    A layout is ``"contiguous"``, ``"channels_last"``, ``"both"`` (1x1 kernels and 1-channel tensors are
    both at once, so they fit either) or ``"other"``.
    """

    def layout(t: torch.Tensor) -> str:
        plain, cl = t.is_contiguous(), t.is_contiguous(memory_format=torch.channels_last)
        return "both" if plain and cl else "contiguous" if plain else "channels_last" if cl else "other"

    seen: dict[str, set[str]] = {"weights": set(), "inputs": set()}

    def hook(module, args):
        weight, x = layout(module.weight), layout(args[0])
        seen["weights"].add(weight)
        seen["inputs"].add(x)
        assert "both" in (weight, x) or weight == x, f"{weight} weights, {x} input: converted on every call"

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.inference_mode():
            model(sample, 500, audio)
    finally:
        for handle in handles:
            handle.remove()
    return seen


def test_one_memory_layout_end_to_end():
    # A conv whose input layout differs from its weights' converts the weights on every call (the issue-15
    # profile: ~640 ms of aten::copy_ per full-size CPU forward). Every conv must see its weights' layout.
    sample, audio = tiny_inputs(frames=2, size=(16, 16))
    assert conv_layouts(tiny_model(), sample, audio) == {"weights": {"contiguous", "both"}, "inputs": {"contiguous"}}
    channels_last = tiny_model().to(memory_format=torch.channels_last)
    layouts = conv_layouts(channels_last, sample, audio)
    assert layouts == {"weights": {"channels_last", "both"}, "inputs": {"channels_last"}}


def random_pattern(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """A seeded random perturbation: no normalisation layer can cancel it (unlike a constant shift)."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_frames_are_coupled_through_the_joint_group_norm_only():
    joint = tiny_model()
    per_frame = UNet3DConditionModel(UNet3DConfig.tiny(joint_frame_norm=False)).eval()
    per_frame.load_state_dict(joint.state_dict())
    sample, audio = tiny_inputs(frames=3)
    changed_sample = sample.clone()
    changed_sample[:, :, 2] += random_pattern(changed_sample[:, :, 2].shape, seed=21)
    changed_audio = audio.clone()
    changed_audio[:, 2] += random_pattern(changed_audio[:, 2].shape, seed=22)

    with torch.inference_mode():
        for model, coupled in ((joint, True), (per_frame, False)):
            ref = model(sample, 500, audio)
            by_frame = model(changed_sample, 500, audio)
            by_audio = model(sample, 500, changed_audio)
            for out in (by_frame, by_audio):
                assert not torch.allclose(out[:, :, 2], ref[:, :, 2])  # the changed frame itself
                if coupled:  # original LatentSync 1.0: frame 1 sees frame 2 through the GroupNorm statistics
                    assert (out[:, :, 1] - ref[:, :, 1]).abs().max() > 1e-4
                else:  # everything else (convs, attention) is per frame
                    torch.testing.assert_close(out[:, :, :2], ref[:, :, :2], rtol=0, atol=1e-6)


def test_attention_modules_are_per_frame():
    model = tiny_model()
    block = model.down_blocks[0].attentions[0].transformer_blocks[0]
    seen: dict[str, list[torch.Tensor]] = {}

    def keep(name):
        def hook(module, args, output):
            seen.setdefault(name, []).append(output.detach().clone())

        return hook

    block.attn1.register_forward_hook(keep("self"))
    block.audio_cross_attn.attn.register_forward_hook(keep("audio"))
    frames = 3
    tokens = random_pattern((frames, 64, 32), seed=31)
    audio = random_pattern((frames, 50, 384), seed=32)
    changed_tokens, changed_audio = tokens.clone(), audio.clone()
    # Random patterns, not constant shifts: LayerNorm removes a constant added to every channel of a token.
    changed_tokens[2] += random_pattern((64, 32), seed=33)
    changed_audio[2] += random_pattern((50, 384), seed=34)
    with torch.inference_mode():
        for t, a in ((tokens, audio), (changed_tokens, audio), (tokens, changed_audio)):
            block(t, a)
    ref_self, tok_self, _ = seen["self"]
    ref_audio, tok_audio, aud_audio = seen["audio"]
    torch.testing.assert_close(tok_self[:2], ref_self[:2], rtol=0, atol=0)
    assert not torch.allclose(tok_self[2], ref_self[2])
    torch.testing.assert_close(aud_audio[:2], ref_audio[:2], rtol=0, atol=0)
    assert not torch.allclose(aud_audio[2], ref_audio[2])
    assert not torch.allclose(tok_audio[2], ref_audio[2])


def test_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    attention = Attention(32, heads=4, context_dim=24)
    x, context = random_pattern((2, 9, 32), seed=41), random_pattern((2, 5, 24), seed=42)
    q = attention.to_q(x).view(2, 9, 4, 8).transpose(1, 2)
    k = attention.to_k(context).view(2, 5, 4, 8).transpose(1, 2)
    v = attention.to_v(context).view(2, 5, 4, 8).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) / 8**0.5).softmax(-1)
    expected = attention.to_out[0]((weights @ v).transpose(1, 2).reshape(2, 9, 32))
    torch.testing.assert_close(attention(x, context), expected, rtol=1e-5, atol=1e-6)


def test_channels_last_and_bfloat16():
    model = tiny_model()
    sample, audio = tiny_inputs(frames=2)
    with torch.inference_mode():
        ref = model(sample, 700, audio)
        model_cl = tiny_model().to(memory_format=torch.channels_last)
        torch.testing.assert_close(model_cl(sample, 700, audio), ref, rtol=1e-4, atol=1e-4)
        model_bf16 = UNet3DConditionModel(model.config, dtype=torch.bfloat16).eval()
        model_bf16.load_state_dict(model.state_dict())
        out = model_bf16(sample.bfloat16(), 700, audio)
    assert model_bf16.dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_config_from_original_yaml_section():
    section = {
        "act_fn": "silu",
        "add_audio_layer": True,
        "attention_head_dim": 8,
        "block_out_channels": [320, 640, 1280, 1280],
        "cross_attention_dim": 384,
        "in_channels": 13,
        "norm_eps": "1e-5",
        "use_motion_module": False,
        "motion_module_kwargs": {"num_attention_heads": 8},
    }
    assert UNet3DConfig.from_original(section) == UNet3DConfig()
    # use_motion_module: true is LatentSync 1.5 / 1.6 (tests/test_unet_versions.py); other motion modules are refused.
    assert UNet3DConfig.from_original({**section, "use_motion_module": True}).use_motion_module
    with pytest.raises(ValueError, match="motion_module_type"):
        UNet3DConfig.from_original({**section, "use_motion_module": True, "motion_module_type": "Conv"})
    with pytest.raises(ValueError, match="unet_use_temporal_attention"):
        UNet3DConfig.from_original({**section, "unet_use_temporal_attention": True})
    with pytest.raises(ValueError, match="same length"):
        UNet3DConfig(block_out_channels=(32, 64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_channels_last_half_precision_close_to_float32(dtype):
    reference = tiny_model()
    sample, audio = tiny_inputs(frames=3)
    with torch.inference_mode():
        expected = reference(sample, 700, audio)
        model = tiny_model().to("cuda", dtype).to(memory_format=torch.channels_last)
        out = model(sample.to("cuda", dtype), 700, audio.to("cuda", dtype))
    assert out.dtype == dtype and out.is_contiguous()
    assert (out.float().cpu() - expected).abs().max() < 0.05 * expected.abs().max()
    assert conv_layouts(model, sample.to("cuda", dtype), audio.to("cuda", dtype))["inputs"] == {"channels_last"}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_joint_group_norm_equals_cpu():
    norm = JointGroupNorm(4, 16)
    with torch.no_grad():
        norm.weight.copy_(random_pattern((16,), seed=61))
        norm.bias.copy_(random_pattern((16,), seed=62))
    x = (random_pattern((6, 16, 5, 7), seed=63) * 3 + 1).contiguous(memory_format=torch.channels_last)
    expected = norm(x, 3)
    out = norm.to("cuda")(x.to("cuda"), 3)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    for dtype in (torch.float16, torch.bfloat16):
        half = norm.to(dtype)(x.to("cuda", dtype), 3)
        assert half.dtype == dtype
        torch.testing.assert_close(half.float().cpu(), expected, rtol=0.02, atol=0.02)
        norm.float()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_compiled_forward_matches_eager():
    model = tiny_model().to("cuda").to(memory_format=torch.channels_last)
    sample, audio = (t.to("cuda") for t in tiny_inputs(frames=2))
    compiled = torch.compile(model, dynamic=False)
    with torch.inference_mode():
        expected = model(sample, torch.tensor(700, device="cuda"), audio)
        out = compiled(sample, torch.tensor(700, device="cuda"), audio)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)


def test_a_short_first_chunk_would_change_latentsync_frames_so_it_stays_16():
    """``engine.first_chunk_frames`` (docs/streaming-speech.md): a 4-frame first chunk is not LatentSync 1.0's.

    The same 4 frames (same inputs, same repeated noise) through the U-Net alone and inside a
    16-frame chunk: with the official joint GroupNorm their outputs differ far beyond 1e-5, so the
    latentsync engine keeps 16-frame chunks (the config refuses another first chunk for it). With
    per-frame norms they would agree, which shows the GroupNorm is the only reason.
    """
    from latentsync.config import ConfigError, load_config

    joint = tiny_model(seed=4)
    per_frame = UNet3DConditionModel(UNet3DConfig.tiny(joint_frame_norm=False)).eval()
    per_frame.load_state_dict(joint.state_dict())
    sample, audio = tiny_inputs(frames=16, seed=5)
    noise = torch.randn(1, 4, 1, 16, 16, generator=torch.Generator().manual_seed(6))
    sample[:, :4] = noise.expand(-1, -1, 16, -1, -1)  # LatentSync 1.0: one noise sample repeated over the frames
    with torch.inference_mode():
        for model, tolerance_ok in ((joint, False), (per_frame, True)):
            whole = model(sample, 951, audio)[:, :, :4]
            alone = model(sample[:, :, :4].contiguous(), 951, audio[:, :4].contiguous())
            error = (whole - alone).abs().max().item()
            assert (error <= 1e-5) is tolerance_ok, (model.config.joint_frame_norm, error)
    with pytest.raises(ConfigError, match="engine.first_chunk_frames.*normalises over all 16 frames"):
        load_config(None, ["engine.name=latentsync", "engine.first_chunk_frames=4"])
    assert load_config(None, ["engine.name=parametric", "engine.first_chunk_frames=4"]).engine.first_chunk_frames == 4
