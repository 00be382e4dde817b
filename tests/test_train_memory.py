"""The GPU memory estimate (mpalign.training.memory): parameter counts from configs on the meta device, and the
check that refuses a config that cannot fit the GPU before any worker starts. No GPU, no Ray, no weights."""

from __future__ import annotations

import pytest

from mpalign.config import ConfigError, load_config
from mpalign.training.memory import check_gpu_memory, estimate_memory, model_sizes

# configs/sdxl-multinode.yaml as shipped before the fix: batch 8 at 1024 px, no gradient checkpointing, the
# generation grid on (sdxl.yaml turns it off now)
OLD_MULTINODE = ["train.gradient_checkpointing=false", "train.val_num_images=2"]


def test_full_size_parameter_counts_come_from_the_configs_without_weights():
    sizes = model_sizes(load_config("configs/sdxl.yaml"))
    assert sizes.unet == 2_567_463_684  # SDXL base 1.0's UNet
    # VAE 84 M + CLIP-L text 123 M + bigG text 695 M + ViT-bigG/14 vision 1.84 B + DINOv2-base 87 M
    assert 2.7e9 < sizes.frozen_encoders < 2.9e9
    assert 1e8 < sizes.trainable < 1e9  # resampler, one to_k_ip/to_v_ip per cross-attention layer, projectors


def test_the_old_multinode_preset_is_refused_on_a_48gb_gpu_and_the_fixed_one_fits():
    old = load_config("configs/sdxl-multinode.yaml", OLD_MULTINODE)
    with pytest.raises(ConfigError, match=r"needs about \d+\.\d GiB per worker .* 43\.7 GiB is usable"):
        check_gpu_memory(old, log=lambda _: None)
    lines = []
    fixed = load_config("configs/sdxl-multinode.yaml")
    assert fixed.train.gpu_memory_gb == 48
    estimate = check_gpu_memory(fixed, log=lines.append)
    assert estimate.total_gib < 43.7 and lines[-1].startswith("fits:")
    assert estimate.activations_gib < 0.3 * estimate_memory(old).activations_gib  # checkpointing


def test_half_a_48gb_gpu_per_sweep_trial_is_refused():
    """docs/sweeps.md used to suggest tune.gpus_per_trial=0.5 with the 48 GB preset: one trial alone needs more."""
    cfg = load_config("configs/sdxl-1gpu-48gb.yaml")
    assert check_gpu_memory(cfg, log=lambda _: None).total_gib < 43.7
    cfg.train.gpus_per_worker = 0.5
    with pytest.raises(ConfigError, match="0.5 GPU per worker"):
        check_gpu_memory(cfg, log=lambda _: None)


def test_the_estimate_grows_with_batch_and_resolution_and_fits_the_calibration():
    """Calibration: the frozen SDXL UNet's forward + backward at batch 8, 1024 px, bf16 peaks at 43.7 GiB."""
    cfg = load_config("configs/sdxl.yaml", ["train.val_num_images=0", "model.dtype=bfloat16"])
    sizes = model_sizes(cfg)
    base = estimate_memory(cfg)
    unet_weights_gib = sizes.unet * 2 / 2**30
    assert unet_weights_gib + base.activations_gib / 1.15 == pytest.approx(43.7, abs=0.01)
    cfg.train.batch_size = 4
    assert estimate_memory(cfg).activations_gib == pytest.approx(base.activations_gib / 2)
    cfg.data.image_size = 512
    assert estimate_memory(cfg).activations_gib == pytest.approx(base.activations_gib / 8)


def test_the_training_cli_refuses_it_in_one_line(capsys):
    from mpalign.cli import run_cli
    from mpalign.train import main

    argv = ["--config", "configs/sdxl-multinode.yaml", *[arg for o in OLD_MULTINODE for arg in ("--set", o)]]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: this config needs about") and "gradient_checkpointing" in err and "\n" not in err


def test_cpu_training_is_not_checked_unless_a_target_gpu_is_given():
    cfg = load_config()  # tiny preset, CPU
    assert check_gpu_memory(cfg, log=lambda _: None) is None
    cfg.train.gpu_memory_gb = 0.001
    with pytest.raises(ConfigError, match="needs about"):
        check_gpu_memory(cfg, log=lambda _: None)
