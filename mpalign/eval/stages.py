"""The two Ray Data stages of an evaluation: generate images with an adapter, then score them.

Each stage is a class that loads its models once in ``__init__`` (one copy per actor) and maps a batch, a
``pyarrow.Table`` of rows, to a table of rows; the work in between is done by the plain functions of
``mpalign.eval.scoring`` (:func:`generate_rows`, :func:`score_rows`), testable without Ray and shared with the
fidelity evaluation of sweep trials. Devices follow ``model.device`` ("auto" = CUDA when the actor has a GPU), and
:func:`run_evaluation` gives each actor ``eval.num_gpus`` GPUs.
"""

from __future__ import annotations

import copy
import logging
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa

from mpalign.config import Config
from mpalign.eval.scoring import Scorers, generate_rows, safe_name, score_rows

log = logging.getLogger(__name__)


class GenerationStage:
    """Ray Data actor: one pipeline per actor, of the method that wrote the adapter in ``adapter_dir`` (an
    ``MPAlignPipeline`` or a ``MosaicPipeline``), or a fresh adapter of ``model.method``."""

    def __init__(self, cfg: Config, adapter_dir: str | None, adapter: str, image_dir: str):
        from mpalign import methods

        self.cfg, self.adapter, self.image_dir = cfg, adapter, Path(image_dir)
        if adapter_dir:  # each column generates with the method that trained its adapter
            cfg = copy.deepcopy(cfg)
            cfg.model.method = methods.adapter_method(adapter_dir)
        self.pipe = methods.pipeline(cfg, adapter_dir=adapter_dir)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(generate_rows(self.pipe, batch.to_pylist(), self.cfg, self.adapter, self.image_dir))


class ScoringStage:
    """Ray Data actor: the scorers of ``eval`` (CLIP, DINO, per-subject extras), loaded once."""

    def __init__(self, cfg: Config):
        self.scorers = Scorers.load(cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(score_rows(batch.to_pylist(), self.scorers))


def actor_gpus(cfg: Config) -> float:
    """``eval.num_gpus`` per actor; -1 = half a GPU each when the Ray cluster has any (so a generation actor and a
    scoring actor fit on one GPU together and stream), else none."""
    import ray

    if cfg.eval.num_gpus >= 0:
        return cfg.eval.num_gpus
    return 0.5 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0


def run_evaluation(requests: list[dict[str, Any]], cfg: Config, adapters: dict[str, str | None],
                   image_dir: Path) -> pd.DataFrame:
    """Generate and score every request with every adapter (name -> folder, None = a fresh adapter); one row per
    generated image. Adapters run one after the other so that each gets the whole actor pool."""
    import ray

    ev = cfg.eval
    gpus = actor_gpus(cfg)
    frames = []
    for name, folder in adapters.items():
        started = time.monotonic()
        log.info("adapter '%s': generating %d images (%d requests x %d per prompt), %d steps at %dx%d, %s",
                 name, len(requests) * ev.images_per_prompt, len(requests), ev.images_per_prompt,
                 ev.num_inference_steps, ev.width, ev.height, f"{gpus:g} GPU per actor" if gpus else "CPU")
        scored = (
            ray.data.from_items(requests)
            .map_batches(GenerationStage, fn_constructor_kwargs={"cfg": cfg, "adapter_dir": folder, "adapter": name,
                                                                  "image_dir": str(image_dir / safe_name(name))},
                         batch_size=ev.batch_size, batch_format="pyarrow", num_gpus=gpus,
                         compute=ray.data.ActorPoolStrategy(size=ev.concurrency))
            .map_batches(ScoringStage, fn_constructor_kwargs={"cfg": cfg}, batch_size=ev.batch_size,
                         batch_format="pyarrow", num_gpus=gpus, compute=ray.data.ActorPoolStrategy(size=ev.concurrency))
        )
        # via Arrow rows: Dataset.to_pandas would give list columns an ArrowDtype that Parquet metadata cannot round-trip
        table = pa.concat_tables(ray.get(scored.to_arrow_refs()), promote_options="default")
        frame = pd.DataFrame(table.to_pylist())
        log.info("adapter '%s': %d images scored in %.1f s", name, len(frame), time.monotonic() - started)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
