"""The training module on the tiny preset: the loss terms, what trains and what stays frozen, cached vs raw inputs,
the alpha schedule, determinism of validation losses, adapter persistence."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from model_batches import build_batch, one_thread, sample_examples

from mpalign.config import load_config
from mpalign.models.alignment import (
    AlignmentProjectors,
    alpha_at,
    attention_map_loss,
    cosine_alignment,
    cross_alignment_loss,
    disentanglement_loss,
    self_alignment_loss,
)
from mpalign.models.attention import AlignmentRecorder
from mpalign.models.training_module import MPAlignTrainingModule, diffusion_target


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def module():
    return MPAlignTrainingModule.from_config(load_config(overrides=["train.warmup_steps=5"]))


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    return sample_examples(tmp_path_factory.mktemp("sample"), num_images=4)


@pytest.fixture(scope="module")
def batches(module, examples):
    return build_batch(module, examples, cached=True), build_batch(module, examples, cached=False)


def frozen_state(module: MPAlignTrainingModule) -> dict[str, torch.Tensor]:
    """Every weight of the frozen models (the UNet's own, not the adapter processors installed in it)."""
    return {k: v.detach().clone() for k, v in module.frozen.state_dict().items() if ".processor." not in k}


def test_alpha_schedule():
    cfg = load_config(overrides=["train.warmup_steps=10", "train.alpha=0.05"]).train
    assert [alpha_at(s, cfg) for s in (0, 9, 10, 500)] == [0.0, 0.0, 0.05, 0.05]


def test_forward_reports_every_term_and_cached_equals_raw(module, batches):
    cached, raw = batches
    a, b = module.validation_losses(cached, step=10), module.validation_losses(raw, step=10)
    assert {"loss", "diffusion", "cross", "self", "align", "alpha", "cos_cross", "cos_self"} <= set(a)
    assert "attn" not in a and "disentangle" not in a
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
    assert float(a["alpha"]) == pytest.approx(0.01)
    torch.testing.assert_close(a["loss"], a["diffusion"] + 0.01 * (a["cross"] + a["self"]))
    torch.testing.assert_close(a["cos_cross"], 1 - a["cross"])
    # deterministic: same seed, same terms; another seed, other noise
    torch.testing.assert_close(module.validation_losses(cached, step=10), a)
    assert module.validation_losses(cached, step=10, seed=1)["diffusion"] != a["diffusion"]


def test_alignment_is_not_captured_during_warmup(module, batches, monkeypatch):
    module.train()
    module.zero_grad()
    out = module(batches[0], step=0)
    out["loss"].backward()
    assert float(out["alpha"]) == 0.0 and float(out["cross"]) == 0.0 and float(out["self"]) == 0.0
    assert all(p.grad is None for p in module.projectors.parameters())
    module.zero_grad()


def test_attention_probabilities_are_materialised_only_for_the_attention_map_losses(module, batches, monkeypatch):
    calls = []
    real_softmax = torch.softmax

    def counting_softmax(*args, **kwargs):
        calls.append(1)
        return real_softmax(*args, **kwargs)

    monkeypatch.setattr(torch, "softmax", counting_softmax)
    out = module.validation_losses(batches[0], step=10)
    assert float(out["cross"]) > 0 and not calls  # alignment on, SDPA path only
    monkeypatch.setattr(module.cfg.train, "attn_loss_weight", 0.01)
    monkeypatch.setattr(module.cfg.train, "disentangle_weight", 0.01)
    out = module.validation_losses(batches[0], step=10)
    assert calls and {"attn", "disentangle"} <= set(out)
    assert 0 < float(out["attn"]) < 1 and float(out["disentangle"]) < 0


def test_losses_vanish_when_projections_equal_targets():
    torch.manual_seed(0)
    x = torch.randn(3, 4, 8)
    loss, cos = cosine_alignment(x, 2.5 * x, torch.ones(3, 4))
    assert abs(float(loss)) < 1e-6 and abs(float(cos) - 1) < 1e-6
    projectors = AlignmentProjectors(cross_widths={"down_blocks.1": 16}, self_widths={"mid_block": 12}, out_dim=8,
                                     hidden_dim=32).eval()
    pooled, pooled_self = torch.randn(2, 3, 16), torch.randn(2, 12)
    subjects = torch.tensor([[True, True, False], [True, False, False]])
    with torch.no_grad():
        target = projectors.project_cross("down_blocks.1", pooled)
        target_self = projectors.project_self("mid_block", pooled_self)
    target[~subjects] = torch.randn(int((~subjects).sum()), 8)  # padded subjects do not count
    loss, _ = cross_alignment_loss([("down_blocks.1", pooled)] * 2, projectors, target, subjects)
    assert abs(float(loss)) < 1e-6
    loss, _ = self_alignment_loss([("mid_block", pooled_self)], projectors, target_self)
    assert abs(float(loss)) < 1e-6
    # attention maps: all mass inside each box -> 0; subjects attending to the same cells -> 0 divergence
    regions = torch.zeros(1, 2, 16, dtype=torch.bool)
    regions[0, 0, :8], regions[0, 1, 8:] = True, True
    inside = regions.float() * torch.rand(1, 2, 16)
    assert abs(float(attention_map_loss([(inside, regions)], torch.ones(1, 2, dtype=torch.bool)))) < 1e-6
    same = torch.rand(1, 1, 16).expand(1, 2, 16)
    assert abs(float(disentanglement_loss([(same, regions)], torch.ones(1, 2, dtype=torch.bool)))) < 1e-6
    assert float(disentanglement_loss([(inside + 1e-3, regions)], torch.ones(1, 2, dtype=torch.bool))) < -1.0


def test_gradients_reach_only_trainable_parameters_and_the_unet_does_not_change(module, batches, monkeypatch):
    monkeypatch.setattr(module.cfg.train, "attn_loss_weight", 0.01)
    monkeypatch.setattr(module.cfg.train, "disentangle_weight", 0.01)
    before = frozen_state(module)
    trainable = module.trainable_parameters()
    trainable_ids = {id(p) for p in trainable}
    adapter_before = [p.detach().clone() for p in trainable]
    optimizer = torch.optim.AdamW(trainable, lr=1e-3)
    module.train()
    for step in range(3):
        optimizer.zero_grad()
        module(batches[step % 2], step=10 + step)["loss"].backward()
        for name, p in module.named_parameters():
            if id(p) not in trainable_ids:
                assert p.grad is None and not p.requires_grad, name
        optimizer.step()
    optimizer.zero_grad()
    after = frozen_state(module)
    assert before.keys() == after.keys() and len(before) > 100
    assert all(torch.equal(before[k], after[k]) for k in before)
    moved = sum(not torch.equal(a, p) for a, p in zip(adapter_before, trainable))
    assert moved >= 0.8 * len(trainable)  # a few (e.g. dummy tokens, only used without layout) may get no gradient
    assert trainable_ids == {id(p) for p in (*module.adapter.parameters(), *module.projectors.parameters())}


def test_drops_happen_only_in_training(module, batches, monkeypatch):
    monkeypatch.setattr(module.cfg.train, "drop_image_prob", 1.0)
    monkeypatch.setattr(module.cfg.train, "drop_text_prob", 0.0)
    monkeypatch.setattr(module.cfg.train, "drop_both_prob", 0.0)
    module.train()
    with torch.no_grad():
        out = module(batches[0], step=10, generator=torch.Generator().manual_seed(0))
    # every reference dropped: no subject is asked to match its reference
    assert float(out["cross"]) == 0.0 and float(out["self"]) > 0
    evaluated = module.validation_losses(batches[0], step=10, seed=0)
    assert float(evaluated["cross"]) > 0
    assert module.training  # validation_losses restores the mode


def test_grounding_tokens_drop_per_sample_by_default_or_per_subject(module, monkeypatch):
    monkeypatch.setattr(module.cfg.model, "grounding_drop_prob", 0.5)
    per_sample = module._grounding_drops(64, 4, torch.Generator().manual_seed(0))
    # the release: one draw per training element drops all of its subjects' grounding tokens together
    assert (per_sample == per_sample[:, :1]).all() and per_sample.any() and not per_sample.all()
    monkeypatch.setattr(module.cfg.model, "grounding_drop_per", "subject")
    per_subject = module._grounding_drops(64, 4, torch.Generator().manual_seed(0))
    assert not (per_subject == per_subject[:, :1]).all()
    with pytest.raises(ValueError, match="grounding_drop_per must be one of"):
        MPAlignTrainingModule(load_config(overrides=["model.grounding_drop_per=element"]), *[None] * 5)


def test_v_prediction_target():
    config = DDPMScheduler().config
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.equal(diffusion_target(DDPMScheduler.from_config(config), latents, noise, t), noise)
    v_sched = DDPMScheduler.from_config(config, prediction_type="v_prediction")
    alphas = v_sched.alphas_cumprod[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(diffusion_target(v_sched, latents, noise, t),
                               alphas.sqrt() * noise - (1 - alphas).sqrt() * latents)


def test_save_and_load_adapter_round_trip(module, batches, tmp_path):
    module.save_adapter(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "config.json").is_file()
    assert (tmp_path / "adapter" / "projectors" / "config.json").is_file()
    reloaded = MPAlignTrainingModule.from_config(module.cfg, adapter_dir=tmp_path / "adapter")
    for a, b in ((module.adapter, reloaded.adapter), (module.projectors, reloaded.projectors)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    torch.testing.assert_close(reloaded.validation_losses(batches[0], 10), module.validation_losses(batches[0], 10))
    # into a freshly initialised module, as a resumed run does
    fresh = MPAlignTrainingModule.from_config(module.cfg)
    with torch.no_grad():
        for p in fresh.trainable_parameters():
            p.add_(1.0)
    fresh.load_adapter(tmp_path / "adapter")
    for a, b in ((module.adapter, fresh.adapter), (module.projectors, fresh.projectors)):
        assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not any(k.startswith("unet.") for k in fresh.state_dict())  # the UNet is registered once


def test_gradient_checkpointing_gives_the_same_gradients(module, batches):
    module.train()

    def grads() -> list[torch.Tensor]:
        module.zero_grad()
        module(batches[0], step=10, generator=torch.Generator().manual_seed(0))["loss"].backward()
        return [p.grad.clone() for p in module.trainable_parameters() if p.grad is not None]

    plain = grads()
    module.enable_gradient_checkpointing()
    try:
        checkpointed = grads()
    finally:
        module.unet.disable_gradient_checkpointing()
        module.zero_grad()
    assert len(plain) == len(checkpointed) > 0
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_up_blocks_can_be_tapped(batches):
    module = MPAlignTrainingModule.from_config(load_config(overrides=["model.align_blocks=[up]"]))
    assert set(module.projectors.cross) == {"up_blocks_0", "up_blocks_1"}
    assert float(module.validation_losses(batches[0], step=100)["cross"]) > 0


def pooled_cross_features(module: MPAlignTrainingModule, batch, latents: torch.Tensor, t: int,
                          feature: str) -> list[torch.Tensor]:
    recorder = AlignmentRecorder(blocks=("down", "mid"), cross_feature=feature)
    with torch.no_grad():
        module.denoise(module.prepare_conditions(batch), latents, torch.full((latents.shape[0],), t), recorder)
    return [pooled for _, pooled in recorder.cross]


@pytest.mark.parametrize("feature", ["hidden_state", "image_branch"])
def test_cross_feature_follows_the_noisy_latents_unless_the_ablation_is_chosen(module, batches, feature):
    """L_cross must align a diffusion feature: pure noise at t = 999 and a zero latent at t = 1 have to give clearly
    different pooled features. The image branch alone (the first implementation, kept as an ablation) barely moves:
    it is nearly a function of the reference crop."""
    batch = batches[0]
    noise = torch.randn(batch["latents"].shape, generator=torch.Generator().manual_seed(0))
    noisy = pooled_cross_features(module, batch, noise, 999, feature)
    clean = pooled_cross_features(module, batch, torch.zeros_like(noise), 1, feature)
    real = batch["subject_mask"]
    cosines = torch.stack([torch.nn.functional.cosine_similarity(a, b, dim=-1)[real].mean() for a, b in zip(noisy, clean)])
    assert len(cosines) == 3  # down_blocks.1, down_blocks.2, mid_block of the tiny UNet
    if feature == "hidden_state":
        assert float(cosines.max()) < 0.9, cosines
    else:
        assert float(cosines.min()) > 0.97, cosines


def test_every_self_tap_passes_gradient_to_the_adapter(module, batches):
    """The first attn1 layer runs before any adapter weight: tapped, it would train only its projector. It is not
    tapped (the tiny UNet's down_blocks.1 has one transformer layer, so that block has no self projector at all)."""
    assert set(module.projectors.self_attn) == {"down_blocks_2", "mid_block"}
    cond = module.prepare_conditions(batches[0])
    latents = cond["latents"]
    t = torch.full((latents.shape[0],), 500)
    recorder = AlignmentRecorder(blocks=("down", "mid"))
    module.denoise(cond, latents + torch.randn(latents.shape, generator=torch.Generator().manual_seed(0)), t, recorder)
    assert [block for block, _ in recorder.self_attn] == ["down_blocks.2", "mid_block"]
    params = list(module.adapter.parameters())
    for block, pooled in recorder.self_attn:
        loss, _ = cosine_alignment(module.projectors.project_self(block, pooled), cond["dino_ref_image_patch_pooled"],
                                   torch.ones(latents.shape[0]))
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        assert sum(float(g.norm()) for g in grads if g is not None) > 0, block


def test_training_draws_latents_from_the_cached_posterior(module, batches, monkeypatch):
    """train.vae_latents=sample (the release: latent_dist.sample()) draws mean + std * noise each training step; the
    posterior mean is used in eval and with train.vae_latents=mean."""
    cached = batches[0]
    module.train()

    def diffusion(batch) -> float:
        with torch.no_grad():
            return float(module(batch, step=0, generator=torch.Generator().manual_seed(3))["diffusion"])

    sampled = diffusion(cached)
    assert sampled == diffusion(cached)  # same generator, same draw
    without_spread = diffusion({**cached, "latents_std": torch.zeros_like(cached["latents_std"])})
    monkeypatch.setattr(module.cfg.train, "vae_latents", "mean")
    assert diffusion(cached) == without_spread != sampled
    monkeypatch.setattr(module.cfg.train, "vae_latents", "sample")
    with pytest.raises(ValueError, match="latents_std"):
        diffusion({k: v for k, v in cached.items() if k != "latents_std"})


def test_cached_encodings_leave_the_frozen_encoders_unloaded(module, batches, monkeypatch):
    """With every encoding cached, training keeps only the UNet: no VAE, text encoders, CLIP image encoder or DINOv2
    (DINOv2 is never even loaded; the text and image encoders only for the null conditions), and the losses are
    those of the fully loaded module."""
    from mpalign import zoo
    from mpalign.batch import ALWAYS_KEYS, CACHED_KEYS
    from mpalign.models.training_module import encoders_to_load

    module = MPAlignTrainingModule.from_config(module.cfg)  # fully loaded, same initial adapter (other tests train theirs)

    def no_dinov2(*args, **kwargs):
        raise AssertionError("DINOv2 loaded although the dataset caches its features")

    monkeypatch.setattr(zoo, "load_dinov2", no_dinov2)
    cached = {*CACHED_KEYS, *ALWAYS_KEYS}
    assert encoders_to_load(cached) == set()
    assert encoders_to_load(cached, generation=True) == {"vae", "text_encoders", "image_encoder"}
    assert encoders_to_load(cached - {"clip_hidden"}) == {"image_encoder"}
    lean = MPAlignTrainingModule.from_config(module.cfg, cached_keys=cached)
    assert lean.image_encoder is None and lean.dinov2 is None
    assert lean.sdxl.vae is None and lean.sdxl.text_encoder is None and lean.sdxl.text_encoder_2 is None
    assert list(lean.frozen) == [lean.unet]
    for name in ("empty_prompt_embeds", "empty_pooled_prompt_embeds", "null_clip_hidden"):
        torch.testing.assert_close(getattr(lean, name), getattr(module, name))
    torch.testing.assert_close(lean.validation_losses(batches[0], step=10), module.validation_losses(batches[0], step=10))
    with pytest.raises(ValueError, match="built without the vae"):
        lean.validation_losses(batches[1], step=10)  # raw pixels need the VAE this module does not hold


def test_frozen_weights_take_bf16_under_bf16_autocast():
    from mpalign.models.training_module import frozen_dtype

    assert frozen_dtype(load_config(overrides=["model.dtype=float16", "train.mixed_precision=bf16"])) == torch.bfloat16
    assert frozen_dtype(load_config(overrides=["model.dtype=float16", "train.mixed_precision=fp16"])) == torch.float16
    assert frozen_dtype(load_config(overrides=["model.dtype=float32", "train.mixed_precision=bf16"])) == torch.float32


def test_validation_grid_shares_the_training_models(module, batches, examples):
    from mpalign.data.schema import encode_png
    from mpalign.training.validation import ValidationExample, ValidationGrid, module_generation

    example = examples[0]
    grid = ValidationGrid(module.cfg, [ValidationExample(example.caption, example.phrases, example.boxes,
                                                         [encode_png(np.asarray(c)) for c in example.crops()])])
    before = module.validation_losses(batches[0], step=10)
    with module_generation(module) as pipeline:
        image = grid.render(pipeline)
    size = module.cfg.data.image_size
    assert image.size == ((len(example.boxes) + 1) * size, size)
    pipe = pipeline.pipe
    assert pipe.unet is module.unet and pipe.vae is module.sdxl.vae and pipeline.adapter is module.adapter
    assert all(p.requires_grad and p.dtype == torch.float32 for p in module.adapter.parameters())
    assert all(processor.scale == 1.0 for processor in module.adapter.ip_layers)  # training scale restored
    torch.testing.assert_close(module.validation_losses(batches[0], step=10), before)
