"""The two Ray Data stages of an evaluation: generate images with an adapter, then score them.

Each stage is a class that loads its models once in ``__init__`` (one copy per actor) and maps a batch, a
``pyarrow.Table`` of rows, to a table of rows; the work in between is done by plain functions
(:func:`generate_rows`, :func:`score_rows`), testable without Ray. Devices follow ``model.device`` ("auto" = CUDA
when the actor has a GPU), and :func:`run_evaluation` gives each actor ``eval.num_gpus`` GPUs.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import torch
from PIL import Image

from mpalign.config import Config
from mpalign.eval.metrics import embed_images, score_images
from mpalign.zoo import load_clip_model, load_dinov2

log = logging.getLogger(__name__)

# Request fields the scored rows do not carry on: the report takes them from the samples themselves.
_REQUEST_ONLY = ("references", "boxes")


def load_rgb(path: str) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


def safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "adapter"


def generate_rows(pipe: Any, requests: list[dict[str, Any]], cfg: Config, adapter: str,
                  image_dir: Path) -> list[dict[str, Any]]:
    """Generate ``eval.images_per_prompt`` images per request (a sample and a seed) with ``pipe`` (an
    ``MPAlignPipeline``), save them as PNG under ``image_dir`` and return one row per image."""
    image_dir.mkdir(parents=True, exist_ok=True)
    ev = cfg.eval
    rows = []
    for req in requests:
        images = pipe.generate(
            req["prompt"], [load_rgb(refs[0]) for refs in req["references"]], req["boxes"], req["phrases"],
            guidance_scale=ev.guidance_scale, num_inference_steps=ev.num_inference_steps, seed=req["seed"],
            height=ev.height, width=ev.width, num_images=ev.images_per_prompt,
        )
        for k, image in enumerate(images):
            path = image_dir / f"{safe_name(req['sample_id'])}-seed{req['seed']}-{k}.png"
            image.save(path)
            rows.append({**req, "adapter": adapter, "image_index": k, "image_path": str(path)})
    return rows


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


class ReferenceCache:
    """CLIP and DINO embeddings of reference images, computed once per path (a benchmark reuses its few dozen
    subject images across thousands of samples)."""

    def __init__(self, clip, dino):
        self.clip, self.dino = clip, dino
        self.embeds: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, references: list[list[str]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per subject: (CLIP (n, P), DINO (n, D)) of its n reference images."""
        new = sorted({p for refs in references for p in refs} - self.embeds.keys())
        if new:
            clip, dino = embed_images(self.clip, self.dino, [load_rgb(p) for p in new])
            self.embeds.update({p: (clip[i], dino[i]) for i, p in enumerate(new)})
        return [(torch.stack([self.embeds[p][0] for p in refs]), torch.stack([self.embeds[p][1] for p in refs]))
                for refs in references]


def score_rows(rows: list[dict[str, Any]], clip, dino, references: ReferenceCache) -> list[dict[str, Any]]:
    """Score generated-image rows (as :func:`generate_rows` returns them); adds the metric columns."""
    if not rows:
        return []
    scores = score_images(clip, dino, [load_rgb(r["image_path"]) for r in rows], [r["prompt"] for r in rows],
                          [r["boxes"] for r in rows], [references.get(r["references"]) for r in rows])
    return [{**{k: v for k, v in row.items() if k not in _REQUEST_ONLY}, **s} for row, s in zip(rows, scores)]


class ScoringStage:
    """Ray Data actor: the CLIP (``eval.clip_model``) and DINO (``eval.dino_model``) scorers, loaded once."""

    def __init__(self, cfg: Config):
        self.clip = load_clip_model(cfg.model, cfg.eval.clip_model)
        self.dino = load_dinov2(cfg.model, name=cfg.eval.dino_model)
        self.references = ReferenceCache(self.clip, self.dino)

    def __call__(self, batch: pa.Table) -> pa.Table:
        return pa.Table.from_pylist(score_rows(batch.to_pylist(), self.clip, self.dino, self.references))


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
