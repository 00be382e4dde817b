"""The Ray-free core of training: the step (alpha curriculum, accumulation), exact checkpoint round trips, the
DeepSpeed config, and the CLI's one-line errors. No Ray cluster: these run in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from model_batches import build_batch, one_thread, sample_examples

from mpalign.config import REPO_ROOT, load_config
from mpalign.models.training_module import MPAlignTrainingModule
from mpalign.training.checkpoint import (
    ADAPTER_DIR,
    EMA_ADAPTER_DIR,
    OPTIMIZER_FILE,
    STATE_FILE,
    DataPosition,
    TrainingState,
    load_checkpoint,
    save_checkpoint,
    worker_file,
)
from mpalign.training.step import (
    build_ema,
    build_lr_scheduler,
    build_optimizer,
    micro_batches,
    train_step,
)

CPU = torch.device("cpu")
WARMUP, ALPHA, LAMBDA_SELF = 2, 0.05, 0.5


def make_module(*overrides: str) -> MPAlignTrainingModule:
    cfg = load_config(overrides=[f"train.warmup_steps={WARMUP}", f"train.alpha={ALPHA}",
                                 f"train.lambda_self={LAMBDA_SELF}", "train.lr=1e-3", *overrides])
    return MPAlignTrainingModule.from_config(cfg, device="cpu").train()


def make_state(module: MPAlignTrainingModule, seed: int = 0) -> TrainingState:
    optimizer = build_optimizer(module, module.cfg.train)
    return TrainingState(optimizer=optimizer, lr_scheduler=build_lr_scheduler(optimizer, module.cfg.train),
                         generator=torch.Generator().manual_seed(seed), ema=build_ema(module, module.cfg.train))


def step(module: MPAlignTrainingModule, state: TrainingState, batch: dict, **kwargs) -> dict[str, float]:
    metrics = train_step(module, state.optimizer, batch, state.step, device=CPU, lr_scheduler=state.lr_scheduler,
                         ema=state.ema, generator=state.generator, **kwargs)
    state.step += 1
    return metrics


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def shared_module() -> MPAlignTrainingModule:
    """For tests that only read weights or restore what they change."""
    return make_module()


@pytest.fixture(scope="module")
def batch(shared_module, tmp_path_factory) -> dict[str, torch.Tensor]:
    return build_batch(shared_module, sample_examples(tmp_path_factory.mktemp("sample"), num_images=4), cached=True)


def clone(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_alignment_contributes_nothing_during_warmup_and_exactly_alpha_after(batch):
    module = make_module()
    state = make_state(module)
    projectors, adapter = list(module.projectors.parameters()), list(module.adapter.parameters())
    for _ in range(WARMUP):
        before_proj, before_adapter = clone(projectors), clone(adapter)
        metrics = step(module, state, batch)
        assert metrics["alpha"] == 0.0
        assert metrics["loss"] == metrics["diffusion"]
        # no gradient reached the projectors: AdamW left them exactly as they were (not even weight decay)
        assert all(torch.equal(a, b) for a, b in zip(before_proj, projectors))
        assert any(not torch.equal(a, b) for a, b in zip(before_adapter, adapter))
    before_proj = clone(projectors)
    metrics = step(module, state, batch)
    assert metrics["alpha"] == pytest.approx(ALPHA)
    expected = metrics["diffusion"] + ALPHA * (metrics["cross"] + LAMBDA_SELF * metrics["self"])
    assert metrics["loss"] == pytest.approx(expected, abs=1e-6)
    assert metrics["cross"] > 0 and metrics["self"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before_proj, projectors))


def test_projector_gradients_scale_exactly_with_alpha(shared_module, batch):
    """The projectors learn only from the alignment term, so their gradient is alpha times that term's gradient."""
    grads = {}
    for alpha in (ALPHA, 2 * ALPHA):
        shared_module.cfg.train.alpha = alpha
        out = shared_module(batch, WARMUP, generator=torch.Generator().manual_seed(5))
        out["loss"].backward()
        grads[alpha] = torch.cat([p.grad.flatten() for p in shared_module.projectors.parameters()])
        shared_module.zero_grad(set_to_none=True)
    shared_module.cfg.train.alpha = ALPHA
    assert grads[ALPHA].abs().sum() > 0
    torch.testing.assert_close(grads[2 * ALPHA], 2 * grads[ALPHA], rtol=1e-5, atol=1e-9)


def test_micro_batches_split_the_batch_evenly(batch):
    parts = micro_batches(batch, 2)
    assert [len(p["latents"]) for p in parts] == [2, 2]
    torch.testing.assert_close(torch.cat([p["boxes"] for p in parts]), batch["boxes"])
    with pytest.raises(ValueError, match="equal micro-batches"):
        micro_batches(batch, 3)


def test_gradient_accumulation_runs_one_optimizer_step(shared_module, batch):
    state = make_state(shared_module)
    before = clone(shared_module.trainable_parameters())
    metrics = step(shared_module, state, batch, grad_accum_steps=2)
    assert state.optimizer.state_dict()["state"][0]["step"].item() == 1
    assert {"loss", "diffusion", "grad_norm", "lr"} <= set(metrics)
    with torch.no_grad():  # leave the shared module as it was
        for param, value in zip(shared_module.trainable_parameters(), before):
            param.copy_(value)


def test_a_non_finite_step_is_skipped_and_counted_and_leaves_the_weights_unchanged(batch):
    """One NaN latent makes the loss and the gradient norm NaN; AdamW would write NaN into every adapter weight. The
    step skips the update (optimizer, EMA) and says so; the next finite step trains as usual."""
    module = make_module("train.ema_decay=0.9")
    state = make_state(module)
    poisoned = dict(batch, latents=batch["latents"].clone())
    poisoned["latents"][1] = float("nan")
    before = clone(module.trainable_parameters())
    ema_before = clone(state.ema.shadow_params)
    metrics = step(module, state, poisoned)
    assert metrics["skipped"] == 1.0 and not torch.isfinite(torch.tensor(metrics["grad_norm"]))
    after = module.trainable_parameters()
    assert all(torch.isfinite(p).all() and torch.equal(a, p) for a, p in zip(before, after))
    assert all(torch.equal(a, b) for a, b in zip(ema_before, state.ema.shadow_params))
    assert state.optimizer.state_dict()["state"] == {}  # AdamW never stepped: no moments, no step count
    assert all(p.grad is None for p in after)  # nothing of the NaN gradient carries into the next step
    metrics = step(module, state, batch)
    assert metrics["skipped"] == 0.0
    assert all(torch.isfinite(p).all() for p in module.trainable_parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, module.trainable_parameters()))


def test_checkpoint_round_trip_resumes_exactly(batch, tmp_path):
    """Optimizer moments, lr schedule, EMA, RNGs and step survive save/load: the next step is bit-identical."""
    overrides = ("train.ema_decay=0.9", "train.lr_scheduler=cosine", "train.max_steps=10")
    module = make_module(*overrides)
    state = make_state(module, seed=3)
    for _ in range(WARMUP + 1):  # past the warm-up: the projectors have optimizer state too
        step(module, state, batch)
    state.position = DataPosition(epoch=1, batches_in_epoch=2)
    save_checkpoint(tmp_path, module, state, rank=0)
    assert {ADAPTER_DIR, EMA_ADAPTER_DIR, OPTIMIZER_FILE, STATE_FILE, worker_file(0)} <= {
        p.name for p in tmp_path.iterdir()}

    resumed = make_module(*overrides)
    resumed_state = make_state(resumed, seed=99)
    load_checkpoint(tmp_path, resumed, resumed_state, rank=0, seed=0)
    assert resumed_state.step == state.step
    assert resumed_state.position == DataPosition(epoch=1, batches_in_epoch=2)
    saved_opt, loaded_opt = state.optimizer.state_dict(), resumed_state.optimizer.state_dict()
    assert saved_opt["state"].keys() == loaded_opt["state"].keys()
    for key, moments in saved_opt["state"].items():
        for name, value in moments.items():
            assert torch.equal(value, loaded_opt["state"][key][name]), (key, name)
    assert resumed_state.lr_scheduler.state_dict() == state.lr_scheduler.state_dict()
    assert torch.equal(resumed_state.generator.get_state(), state.generator.get_state())
    for a, b in zip(state.ema.shadow_params, resumed_state.ema.shadow_params):
        assert torch.equal(a, b)

    torch_rng = torch.get_rng_state()
    expected = step(module, state, batch)
    torch.set_rng_state(torch_rng)
    got = step(resumed, resumed_state, batch)
    assert got == expected
    for a, b in zip(module.trainable_parameters(), resumed.trainable_parameters()):
        assert torch.equal(a, b)


def test_a_rank_without_its_own_file_takes_rank_zero_position_and_a_fresh_rng(shared_module, tmp_path):
    state = make_state(shared_module)
    state.position = DataPosition(epoch=2, batches_in_epoch=1)
    save_checkpoint(tmp_path, shared_module, state, rank=0)
    other = make_state(shared_module, seed=1)
    load_checkpoint(tmp_path, shared_module, other, rank=3, seed=0)
    assert other.position == DataPosition(epoch=2, batches_in_epoch=1)
    assert not torch.equal(other.generator.get_state(), state.generator.get_state())


def test_deepspeed_config_fills_auto_entries_from_the_train_section():
    from mpalign.train import _deepspeed_config

    cfg = load_config(overrides=["train.strategy=deepspeed", "train.batch_size=3", "train.grad_accum_steps=2",
                                 "train.max_grad_norm=0.5", "train.lr=2e-4", "train.weight_decay=0.02",
                                 f"train.deepspeed_config={REPO_ROOT / 'configs/deepspeed_zero2.json'}"])
    ds = _deepspeed_config(cfg, world_size=2)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["gradient_clipping"] == 0.5 and ds["zero_optimization"]["stage"] == 2
    assert ds["optimizer"]["params"]["lr"] == 2e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.02
    assert ds["optimizer"]["params"]["torch_adam"] is True  # no compiled fused Adam needed (CPU-capable)
    assert "auto" not in json.dumps(ds)


@pytest.mark.parametrize("overrides, message", [
    (["train.strategy=fsdp"], "train.strategy must be one of"),
    (["train.mixed_precision=fp8"], "train.mixed_precision must be one of"),
    (["train.logger=wandb"], "train.logger must be one of"),
    (["train.batch_size=0"], "train.batch_size must be >= 1"),
    (["train.optimizer=sgd"], "train.optimizer must be one of"),
    (["train.vae_latents=mode"], "train.vae_latents must be one of"),
    (["model.align_cross_feature=attn1"], "model.align_cross_feature must be one of"),
    (["model.align_self_target=crop"], "model.align_self_target' must be one of"),
    (["data.path=/nonexistent/dataset"], "no built dataset at '/nonexistent/dataset'"),
])
def test_cli_reports_user_mistakes_in_one_line(overrides, message, capsys):
    from mpalign.cli import run_cli
    from mpalign.train import main

    argv = [arg for o in overrides for arg in ("--set", o)]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_deepspeed_strategy_without_deepspeed_installed_is_a_one_line_error(capsys):
    pytest.importorskip("ray")
    try:
        import deepspeed  # noqa: F401
        pytest.skip("DeepSpeed is installed: the missing-package message cannot be shown")
    except ImportError:
        pass
    from mpalign.cli import run_cli
    from mpalign.train import main

    assert run_cli(main, ["--set", "train.strategy=deepspeed"]) == 2
    assert "pip install 'mpalign[deepspeed]'" in capsys.readouterr().err


def test_optimizer_choices(shared_module):
    fused = build_optimizer(shared_module, load_config(overrides=["train.optimizer=adamw_fused"]).train)
    assert isinstance(fused, torch.optim.AdamW) and fused.param_groups[0]["fused"]
    plain = build_optimizer(shared_module, shared_module.cfg.train)
    assert not plain.param_groups[0]["fused"]
    try:
        import bitsandbytes
    except ImportError:
        from mpalign.config import ConfigError

        with pytest.raises(ConfigError, match=r"pip install 'mpalign\[bnb\]'"):
            build_optimizer(shared_module, load_config(overrides=["train.optimizer=adamw_8bit"]).train)
    else:
        eight_bit = build_optimizer(shared_module, load_config(overrides=["train.optimizer=adamw_8bit"]).train)
        assert isinstance(eight_bit, bitsandbytes.optim.AdamW8bit)


def test_a_dataset_without_the_posterior_std_is_refused_before_training_when_latents_are_drawn():
    from mpalign.config import ConfigError
    from mpalign.methods import check_dataset_columns

    cfg = load_config()
    assert cfg.train.vae_latents == "sample"
    with pytest.raises(ConfigError, match="train.vae_latents=mean"):
        check_dataset_columns(cfg, ["id", "latents"])
    check_dataset_columns(cfg, ["id", "latents", "latents_std"])
    check_dataset_columns(cfg, ["id", "image"])  # no VAE cache: training encodes on the fly
    cfg.train.vae_latents = "mean"
    check_dataset_columns(cfg, ["id", "latents"])
