"""Import of the official MS-Diffusion checkpoint: a synthetic file in the official layout (keys and shapes written
out here from the facts about the release, random values) converts, round-trips, and bad files fail by name."""

from __future__ import annotations

import pytest
import torch

from mpalign.convert_msdiffusion import main as convert_main
from mpalign.models.adapter import MSAdapter

# The official SDXL configuration (docs: ../shared/reference/ms-diffusion-facts.md)
DIM, DEPTH, HEADS, DIM_HEAD, TOKENS, CLIP_DIM, OUT_DIM, FF = 1280, 4, 20, 64, 16, 1664, 2048, 4
GROUNDING_IN = 768 + 64  # phrase embedding + 8 Fourier frequencies x sin/cos x 4 coordinates


def official_resampler_shapes(dim=DIM, depth=DEPTH, inner=HEADS * DIM_HEAD, tokens=TOKENS, clip_dim=CLIP_DIM,
                              out_dim=OUT_DIM, ff=FF, grounding_in=GROUNDING_IN) -> dict[str, tuple[int, ...]]:
    shapes = {"proj_in.weight": (dim, clip_dim), "proj_in.bias": (dim,)}
    for i in range(depth):
        for norm in ("norm1", "norm2"):
            shapes[f"layers.{i}.0.{norm}.weight"] = shapes[f"layers.{i}.0.{norm}.bias"] = (dim,)
        shapes[f"layers.{i}.0.to_q.weight"] = (inner, dim)
        shapes[f"layers.{i}.0.to_kv.weight"] = (2 * inner, dim)
        shapes[f"layers.{i}.0.to_out.weight"] = (dim, inner)
        shapes[f"layers.{i}.1.0.weight"] = shapes[f"layers.{i}.1.0.bias"] = (dim,)
        shapes[f"layers.{i}.1.1.weight"] = (dim * ff, dim)
        shapes[f"layers.{i}.1.3.weight"] = (dim, dim * ff)
    for name, size in (("attention_norm", dim), ("norm_out", out_dim), ("latent_norm", dim)):
        shapes[f"{name}.weight"] = shapes[f"{name}.bias"] = (size,)
    shapes.update({
        "proj_out.weight": (out_dim, dim), "proj_out.bias": (out_dim,),
        "grounding_latents": (1, tokens, dim),
        "latent_proj.0.weight": (2 * grounding_in, grounding_in), "latent_proj.0.bias": (2 * grounding_in,),
        "latent_proj.2.weight": (tokens * dim, 2 * grounding_in), "latent_proj.2.bias": (tokens * dim,),
    })
    return shapes


def official_checkpoint(resampler_shapes: dict, ip_widths: list[int], token_dim: int, num_dummy: int = 4,
                        dtype=torch.float16) -> dict:
    """``ms_adapter`` indexes all processors (self and cross alternate), weights at the odd (cross) positions."""
    gen = torch.Generator().manual_seed(0)

    def rand(shape):
        return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)

    ms_adapter = {}
    for i, width in enumerate(ip_widths):
        ms_adapter[f"{2 * i + 1}.to_k_ip.weight"] = rand((width, token_dim))
        ms_adapter[f"{2 * i + 1}.to_v_ip.weight"] = rand((width, token_dim))
    return {"image_proj": {k: rand(s) for k, s in resampler_shapes.items()}, "ms_adapter": ms_adapter,
            "dummy_image_tokens": rand((1, num_dummy, token_dim))}


TINY_IP_WIDTHS = [64] * 7  # the tiny UNet: 14 processors, the 7 odd ones are attn2 layers of width 64


def assert_holds_official(adapter: MSAdapter, ckpt: dict) -> None:
    state = adapter.state_dict()
    for key, value in ckpt["image_proj"].items():
        assert torch.equal(state[f"resampler.{key}"], value), key
    for key, value in ckpt["ms_adapter"].items():
        position, rest = key.split(".", 1)
        assert torch.equal(state[f"ip_layers.{(int(position) - 1) // 2}.{rest}"], value), key
    assert torch.equal(state["dummy_tokens"], ckpt["dummy_image_tokens"])
    assert len(state) == len(ckpt["image_proj"]) + len(ckpt["ms_adapter"]) + 1


def test_official_sdxl_layout_converts_and_round_trips(tmp_path, capsys):
    ckpt = official_checkpoint(official_resampler_shapes(), TINY_IP_WIDTHS, OUT_DIM)
    torch.save(ckpt, tmp_path / "ms_adapter.bin")
    assert convert_main([str(tmp_path / "ms_adapter.bin"), str(tmp_path / "converted")]) == 0
    assert "resampler 1280-d x4 (20 heads)" in capsys.readouterr().out

    adapter = MSAdapter.from_pretrained(tmp_path / "converted")
    c = adapter.config
    assert (c.resampler_dim, c.resampler_depth, c.resampler_heads, c.num_tokens, c.image_embed_dim,
            c.cross_attention_dim, c.phrase_dim, c.num_dummy_tokens) == (1280, 4, 20, 16, 1664, 2048, 768, 4)
    assert_holds_official(adapter, ckpt)
    # our resampler module takes the official image_proj state dict as is
    adapter.resampler.load_state_dict(ckpt["image_proj"], strict=True)

    adapter.save_pretrained(tmp_path / "again")
    assert_holds_official(MSAdapter.from_pretrained(tmp_path / "again"), ckpt)


def tiny_official_checkpoint() -> dict:
    """The official layout at the tiny preset's sizes (resampler 32-d, CLIP 48-d, phrases 32-d, tokens 64-d)."""
    shapes = official_resampler_shapes(dim=32, depth=1, inner=32, tokens=4, clip_dim=48, out_dim=64, ff=2,
                                       grounding_in=32 + 64)
    return official_checkpoint(shapes, TINY_IP_WIDTHS, 64, num_dummy=2, dtype=torch.float32)


@pytest.mark.parametrize("damage, message", [
    (lambda c: c["image_proj"].pop("layers.0.0.to_kv.weight"), "missing key(s) image_proj.layers.0.0.to_kv.weight"),
    (lambda c: c["ms_adapter"].pop("5.to_v_ip.weight"), "missing key(s) ms_adapter.5.to_v_ip.weight"),
    (lambda c: c["image_proj"].pop("latent_norm.bias"), "missing key(s) image_proj.latent_norm.bias"),
    (lambda c: c["image_proj"].__setitem__("proj_out.weight", torch.zeros(64, 31)),
     "image_proj.proj_out.weight has shape (64, 31), expected (64, 32)"),
    (lambda c: c["ms_adapter"].__setitem__("3.to_k_ip.weight", torch.zeros(64, 63)),
     "ms_adapter.3.to_k_ip.weight has shape (64, 63), expected (64, 64)"),
    (lambda c: c["ms_adapter"].__setitem__("4.to_k_ip.weight", torch.zeros(64, 64)), "unexpected key ms_adapter.4"),
    (lambda c: c["image_proj"].__setitem__("latents", torch.zeros(1, 4, 32)), "unexpected key(s) image_proj.latents"),
    (lambda c: c.pop("dummy_image_tokens"), "checkpoint has no ['dummy_image_tokens']"),
])
def test_bad_checkpoints_are_reported_by_name(tmp_path, capsys, damage, message):
    ckpt = tiny_official_checkpoint()
    damage(ckpt)
    torch.save(ckpt, tmp_path / "bad.bin")
    assert convert_main([str(tmp_path / "bad.bin"), str(tmp_path / "out"), "--dim-head", "16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_unreadable_checkpoint_is_one_line_error(tmp_path, capsys):
    (tmp_path / "junk.bin").write_bytes(b"not a checkpoint")
    assert convert_main([str(tmp_path / "junk.bin"), str(tmp_path / "out")]) == 2
    assert convert_main([str(tmp_path / "absent.bin"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err) and "does not exist" in err[1]
