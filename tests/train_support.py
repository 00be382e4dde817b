"""Shared by the training and sweep tests: one tiny built dataset per test session, and TensorBoard readers."""

from __future__ import annotations

from pathlib import Path

from mpalign.config import Config, load_config

# Small enough to build in well under a minute on 2 cores, big enough for 2 workers x batch 1 and a val split.
DATASET_OVERRIDES = ["data.sample.num_images=8", "data.sample.num_videos=2"]


def tiny_dataset(tmp_path_factory) -> Path:
    """The tiny preset's dataset built by the real builder, once per session (every test module asks for the same
    folder under the session's base temp dir)."""
    from mpalign.data.build import build_dataset

    out = tmp_path_factory.getbasetemp() / "tiny-train-dataset"
    if not (out / "stats.json").is_file():
        cfg = load_config(overrides=[*DATASET_OVERRIDES, f"data.path={out}"])
        build_dataset(cfg, output=str(out), overwrite=True)
    return out


def train_config(dataset: Path, output_dir: Path, *overrides: str) -> Config:
    """The tiny preset on ``dataset``, quiet and fast: batch 1 per worker, no generation grid unless asked."""
    return load_config(overrides=[f"data.path={dataset}", f"train.output_dir={output_dir}", "train.batch_size=1",
                                  "train.val_num_images=0", "train.warmup_steps=0", *overrides])


def tensorboard_scalars(log_dir: Path, tag: str) -> dict[int, float]:
    """step -> value of one scalar over every event file in ``log_dir`` (later files win on repeated steps)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values: dict[int, float] = {}
    for events in sorted(log_dir.glob("events.out.tfevents.*"), key=lambda p: p.stat().st_mtime):
        accumulator = EventAccumulator(str(events), size_guidance={"scalars": 0})
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values
