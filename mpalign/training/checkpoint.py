"""The training checkpoint: everything needed to continue a run exactly where it stopped.

Layout of one checkpoint folder (Ray Train merges the files every worker writes into one folder):

| file | written by | holds |
|---|---|---|
| ``adapter/`` | rank 0 | the adapter (``save_pretrained``: JSON config + safetensors) and the alignment projectors |
| ``adapter_ema/`` | rank 0, EMA on | the same with the EMA weights (what the final export uses) |
| ``optimizer.pt`` | rank 0, DDP | optimizer state (AdamW moments, step counts) |
| ``deepspeed/`` | every rank, DeepSpeed | the engine's own checkpoint (module, ZeRO optimizer shards, lr schedule) |
| ``training_state.pt`` | rank 0 | step, lr schedule, EMA, grad scaler |
| ``worker_rank{r}.pt`` | rank r | that worker's RNG states (Python, NumPy, torch CPU/CUDA, the noise generator) and its data position |

Data position semantics: a worker records ``(epoch, batches consumed in that epoch)`` of its own dataset shard. On
resume each worker restarts that epoch and skips that many batches of its shard. Epochs are shuffled from
``train.seed + epoch``, so with one worker the resumed run sees exactly the batches the uninterrupted run would have
seen; with several workers Ray Data hands blocks to workers dynamically, so each worker resumes after the right
*number* of batches of the epoch, but which rows fall into the skipped part may differ. When the world size changes
between runs, ranks without their own file take rank 0's data position and a fresh RNG seeded from the step.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mpalign.training.step import is_deepspeed_engine, unwrap

ADAPTER_DIR = "adapter"
EMA_ADAPTER_DIR = "adapter_ema"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "training_state.pt"
DEEPSPEED_DIR = "deepspeed"
DEEPSPEED_TAG = "state"


def worker_file(rank: int) -> str:
    return f"worker_rank{rank}.pt"


@dataclass
class DataPosition:
    epoch: int = 0
    batches_in_epoch: int = 0


@dataclass
class TrainingState:
    """What a worker needs besides the module: the optimizer and friends, and where it was."""

    optimizer: Any  # None under DeepSpeed (the engine owns it)
    lr_scheduler: Any
    generator: torch.Generator
    ema: Any = None
    grad_scaler: Any = None
    step: int = 0
    skipped_steps: int = 0  # steps whose update was skipped for a non-finite loss or gradient norm
    position: DataPosition = None  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.position is None:
            self.position = DataPosition()


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "generator_device": str(generator.device),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state["name"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def ema_weights(module: nn.Module, ema: Any) -> Iterator[None]:
    """Inside the block the trainable weights are the EMA's (no-op without EMA); outside, the trained ones."""
    if ema is None:
        yield
        return
    params = list(unwrap(module).trainable_parameters())
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def save_adapter_weights(module: nn.Module, directory: Path, ema: Any = None) -> None:
    """``adapter/`` with the trained weights and, with EMA, ``adapter_ema/`` with the averaged ones."""
    inner = unwrap(module)
    inner.save_adapter(directory / ADAPTER_DIR)
    if ema is not None:
        with ema_weights(inner, ema):
            inner.save_adapter(directory / EMA_ADAPTER_DIR)


def save_checkpoint(directory: str | Path, module: nn.Module, state: TrainingState, rank: int) -> None:
    """Write this worker's part of a checkpoint of ``state`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    deepspeed = is_deepspeed_engine(module)
    if deepspeed:
        # every rank writes its ZeRO shard; the engine also stores module weights and its lr schedule
        module.save_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    if rank == 0:
        save_adapter_weights(module, directory, state.ema)
        if not deepspeed:
            torch.save(state.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        torch.save({
            "step": state.step,
            "skipped_steps": state.skipped_steps,
            "lr_scheduler": None if deepspeed or state.lr_scheduler is None else state.lr_scheduler.state_dict(),
            "ema": None if state.ema is None else state.ema.state_dict(),
            "grad_scaler": None if state.grad_scaler is None else state.grad_scaler.state_dict(),
            "position": asdict(state.position),
        }, directory / STATE_FILE)
    torch.save({"rng": _rng_state(state.generator), "position": asdict(state.position)}, directory / worker_file(rank))


def load_checkpoint(directory: str | Path, module: nn.Module, state: TrainingState, rank: int, seed: int) -> None:
    """Restore ``module`` and ``state`` in place from a checkpoint written by :func:`save_checkpoint`."""
    directory = Path(directory)
    saved = torch.load(directory / STATE_FILE, map_location="cpu", weights_only=True)
    if is_deepspeed_engine(module):
        module.load_checkpoint(str(directory / DEEPSPEED_DIR), tag=DEEPSPEED_TAG)
    else:
        unwrap(module).load_adapter(directory / ADAPTER_DIR)
        state.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True))
        if state.lr_scheduler is not None and saved["lr_scheduler"] is not None:
            state.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    if state.ema is not None and saved["ema"] is not None:
        state.ema.load_state_dict(saved["ema"])
    if state.grad_scaler is not None and saved["grad_scaler"] is not None:
        state.grad_scaler.load_state_dict(saved["grad_scaler"])
    state.step = int(saved["step"])
    state.skipped_steps = int(saved.get("skipped_steps", 0))  # absent in checkpoints from before the count
    own = directory / worker_file(rank)
    if own.exists():
        worker = torch.load(own, map_location="cpu", weights_only=True)
        _set_rng_state(worker["rng"], state.generator)
        state.position = DataPosition(**worker["position"])
    else:
        state.position = DataPosition(**saved["position"])
        reseed = seed + 1000 * rank + state.step
        random.seed(reseed)
        np.random.seed(reseed % 2**32)
        torch.manual_seed(reseed)
        state.generator.manual_seed(reseed)


def checkpoint_step(directory: str | Path) -> int:
    """The step a checkpoint folder was written at."""
    return int(torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)["step"])
