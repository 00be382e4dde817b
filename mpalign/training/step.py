"""One optimisation step of the adapter, the same function for every caller.

:func:`train_step` takes one batch (``train.batch_size x train.grad_accum_steps`` rows on any device), splits it into
``grad_accum_steps`` micro-batches, runs forward/backward on each under the configured autocast (skipping DDP's
gradient all-reduce on all but the last), then clips, steps the optimizer and the learning-rate schedule and updates
the EMA. A DeepSpeed engine does accumulation, clipping and the schedule itself; the step hands it each micro-batch.
"""

from __future__ import annotations

import contextlib
import random
import sys
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from mpalign.config import ConfigError, TrainConfig

MIXED_PRECISION = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STRATEGIES = ("ddp", "deepspeed")
VAE_LATENTS = ("sample", "mean")
OPTIMIZERS = ("adamw", "adamw_fused", "adamw_8bit")


def check_train_config(train_cfg: TrainConfig) -> None:
    """User mistakes in the ``train`` section, found before any worker starts."""
    if train_cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"train.mixed_precision must be one of {list(MIXED_PRECISION)}, got '{train_cfg.mixed_precision}'")
    if train_cfg.vae_latents not in VAE_LATENTS:
        raise ConfigError(f"train.vae_latents must be one of {list(VAE_LATENTS)}, got '{train_cfg.vae_latents}'")
    if train_cfg.optimizer not in OPTIMIZERS:
        raise ConfigError(f"train.optimizer must be one of {list(OPTIMIZERS)}, got '{train_cfg.optimizer}'")
    if train_cfg.optimizer == "adamw_8bit":
        _bitsandbytes()
    if train_cfg.strategy not in STRATEGIES:
        raise ConfigError(f"train.strategy must be one of {list(STRATEGIES)}, got '{train_cfg.strategy}'")
    if train_cfg.strategy == "deepspeed" and train_cfg.mixed_precision == "fp16":
        raise ConfigError("train.strategy=deepspeed runs mixed precision through autocast: use "
                          "train.mixed_precision=bf16 (fp16 needs loss scaling that only the ddp strategy provides)")
    for key in ("max_steps", "batch_size", "grad_accum_steps", "num_workers", "log_every"):
        if getattr(train_cfg, key) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {getattr(train_cfg, key)}")
    if train_cfg.checkpoint_every < 1:
        raise ConfigError(f"train.checkpoint_every must be >= 1, got {train_cfg.checkpoint_every}")
    if not 0.0 <= train_cfg.ema_decay < 1.0:
        raise ConfigError(f"train.ema_decay must be in [0, 1), got {train_cfg.ema_decay}")


def unwrap(module: nn.Module) -> nn.Module:
    """The training module inside a DDP wrapper or a DeepSpeed engine."""
    while hasattr(module, "module") and isinstance(module.module, nn.Module):
        module = module.module
    return module


def is_deepspeed_engine(module: nn.Module) -> bool:
    deepspeed = sys.modules.get("deepspeed")
    return deepspeed is not None and isinstance(module, deepspeed.DeepSpeedEngine)


def autocast(device: torch.device, mixed_precision: str) -> contextlib.AbstractContextManager:
    dtype = MIXED_PRECISION[mixed_precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(train_cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    if train_cfg.mixed_precision != "fp16":
        return None
    return torch.amp.GradScaler(device.type)


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("train.optimizer=adamw_8bit needs bitsandbytes (CUDA GPUs): pip install 'mpalign[bnb]', or "
                          "use train.optimizer=adamw_fused") from None
    return bitsandbytes


def build_optimizer(module: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters, per ``train.optimizer``."""
    params = list(unwrap(module).trainable_parameters())
    if train_cfg.optimizer == "adamw_8bit":
        return _bitsandbytes().optim.AdamW8bit(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                             fused=train_cfg.optimizer == "adamw_fused")


def build_lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig) -> torch.optim.lr_scheduler.LRScheduler:
    """diffusers' schedules by name (constant, constant_with_warmup, cosine, linear, ...)."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(train_cfg.lr_scheduler, optimizer, num_warmup_steps=train_cfg.lr_warmup_steps,
                         num_training_steps=train_cfg.max_steps)


def build_ema(module: nn.Module, train_cfg: TrainConfig):
    """An exponential moving average of the trainable weights (diffusers' ``EMAModel``), or None when disabled."""
    if train_cfg.ema_decay <= 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(list(unwrap(module).trainable_parameters()), decay=train_cfg.ema_decay)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def batch_to(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {key: value.to(device, non_blocking=True) for key, value in batch.items()}


def micro_batches(batch: Mapping[str, torch.Tensor], count: int) -> list[dict[str, torch.Tensor]]:
    """Split along the batch dimension into ``count`` equal parts."""
    size = len(next(iter(batch.values())))
    if size % count:
        raise ValueError(f"a batch of {size} rows does not split into {count} equal micro-batches")
    part = size // count
    return [{key: value[i * part:(i + 1) * part] for key, value in batch.items()} for i in range(count)]


def _no_sync_unless(last: bool, module: nn.Module) -> contextlib.AbstractContextManager:
    if last or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def _scalars(out: Mapping[str, Any], device: torch.device) -> Iterator[tuple[str, torch.Tensor]]:
    """The forward's scalar outputs as 0-d float tensors on ``device`` (kept there: no sync per term)."""
    for key, value in out.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            yield key, value.detach().float().reshape(()).to(device)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield key, torch.tensor(float(value), device=device)


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer | None, batch: Mapping[str, torch.Tensor], step: int,
               *, device: torch.device, grad_accum_steps: int = 1, mixed_precision: str = "no",
               max_grad_norm: float = 1.0, lr_scheduler: Any = None, grad_scaler: torch.amp.GradScaler | None = None,
               ema: Any = None, generator: torch.Generator | None = None) -> dict[str, float]:
    """One optimizer step at global step ``step`` (0-based: the number of steps already taken).

    ``module`` is the training module, bare, DDP-wrapped or a DeepSpeed engine (then ``optimizer`` and
    ``lr_scheduler`` are the engine's and may be None). Returns the mean of every scalar the module's forward
    reports over the micro-batches, plus ``lr``, ``grad_norm`` (pre-clipping) and ``skipped``: 1.0 when the loss or
    the gradient norm was non-finite and the update was skipped (not under DeepSpeed, whose engine steps itself).
    """
    deepspeed = is_deepspeed_engine(module)
    parts = micro_batches(batch, grad_accum_steps)
    sums: dict[str, torch.Tensor] = {}
    lr = float((module.optimizer if deepspeed else optimizer).param_groups[0]["lr"])
    for index, part in enumerate(parts):
        with _no_sync_unless(index == len(parts) - 1 or deepspeed, module):
            with autocast(device, mixed_precision):
                out = module(batch_to(part, device), step, generator=generator)
            if deepspeed:
                module.backward(out["loss"])  # the engine divides by its gradient_accumulation_steps itself
                module.step()  # and applies the update, clipping and lr schedule only at the accumulation boundary
            else:
                loss = out["loss"] / grad_accum_steps
                (grad_scaler.scale(loss) if grad_scaler is not None else loss).backward()
        for key, value in _scalars(out, device):
            sums[key] = sums[key] + value if key in sums else value
    params = list(unwrap(module).trainable_parameters())
    if deepspeed:
        norm = module.get_global_grad_norm()
        grad_norm = torch.tensor(float(norm) if norm is not None else float("nan"), device=device)
    else:
        if grad_scaler is not None:
            grad_scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    sums["grad_norm"] = grad_norm.detach().float().to(device) * len(parts)
    if not deepspeed:  # the engine has already applied its update inside module.step()
        sums["skipped"] = _all_workers_nonfinite(sums["loss"], grad_norm) * len(parts)
    keys = list(sums)
    values = (torch.stack([sums[k] for k in keys]) / len(parts)).tolist()  # the step's one device sync
    metrics = dict(zip(keys, values))
    metrics["lr"] = lr
    skip = metrics.get("skipped", 0.0) > 0
    if not deepspeed:
        # A non-finite loss or gradient norm would make AdamW write NaN into every weight (bf16 has no GradScaler to
        # catch it): skip the update (the fp16 scaler still lowers its scale), keep the schedule on the step count.
        if not skip:
            if grad_scaler is not None:
                grad_scaler.step(optimizer)
            else:
                optimizer.step()
        if grad_scaler is not None:
            grad_scaler.update()
        optimizer.zero_grad(set_to_none=True)
        if lr_scheduler is not None:
            lr_scheduler.step()
    if ema is not None and not skip:
        ema.step(params)
    return metrics


def _all_workers_nonfinite(loss_sum: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """1.0 when the loss or the gradient norm is non-finite on any worker, else 0.0. The gradient norm is the same
    on every DDP worker (all-reduced gradients), the loss is not: the flag is reduced so all workers skip together
    and the replicas stay identical."""
    flag = (~(torch.isfinite(loss_sum) & torch.isfinite(grad_norm.to(loss_sum.device)))).float()
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return flag
