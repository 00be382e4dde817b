"""Generating and scoring benchmark requests: the plain functions both ``mpalign.evaluate`` (inside its Ray Data
stages) and a sweep trial's fidelity evaluation (inside a training worker) call, so the two score the same way. No Ray.

A request row is one sample and a seed (``mpalign.eval.benchmarks.expand_runs``); :func:`generate_rows` turns it into
one row per generated image (saved as PNG), :func:`score_rows` adds the metric columns of ``mpalign.eval.metrics``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mpalign.config import Config
from mpalign.eval.metrics import SubjectMetric, embed_images, score_images, subject_metrics
from mpalign.zoo import EncoderWithProcessor, load_clip_model, load_dino_scorer

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
    ``MPAlignPipeline`` or a ``MosaicPipeline``, which takes no ``eval.negative_prompt``), save them as PNG under
    ``image_dir`` and return one row per image."""
    image_dir.mkdir(parents=True, exist_ok=True)
    ev = cfg.eval
    rows = []
    for req in requests:
        images = pipe.generate(
            req["prompt"], [load_rgb(refs[0]) for refs in req["references"]], req["boxes"], req["phrases"],
            negative_prompt=ev.negative_prompt if pipe.takes_negative_prompt else "", guidance_scale=ev.guidance_scale,
            num_inference_steps=ev.num_inference_steps, seed=req["seed"], height=ev.height, width=ev.width,
            num_images=ev.images_per_prompt,
        )
        for k, image in enumerate(images):
            path = image_dir / f"{safe_name(req['sample_id'])}-seed{req['seed']}-{k}.png"
            image.save(path)
            rows.append({**req, "adapter": adapter, "image_index": k, "image_path": str(path)})
    return rows


class ReferenceCache:
    """CLIP and DINO embeddings of reference images, computed once per path (a benchmark reuses its few dozen
    subject images across thousands of samples)."""

    def __init__(self, clip: EncoderWithProcessor, dino: EncoderWithProcessor):
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


@dataclass
class Scorers:
    """The scoring models of ``cfg.eval``: CLIP (``clip_model``), DINO (``dino_model``), the per-subject extras
    (``subject_metrics``) and a cache of reference embeddings."""

    clip: EncoderWithProcessor
    dino: EncoderWithProcessor
    extra_metrics: dict[str, SubjectMetric] = field(default_factory=dict)
    references: ReferenceCache = field(init=False)

    def __post_init__(self) -> None:
        self.references = ReferenceCache(self.clip, self.dino)

    @classmethod
    def load(cls, cfg: Config, device: str | torch.device | None = None) -> Scorers:
        return cls(load_clip_model(cfg.model, cfg.eval.clip_model, device=device),
                   load_dino_scorer(cfg.model, cfg.eval.dino_model, device=device),
                   subject_metrics(cfg.eval.subject_metrics))


def score_rows(rows: list[dict[str, Any]], scorers: Scorers) -> list[dict[str, Any]]:
    """Score generated-image rows (as :func:`generate_rows` returns them); adds the metric columns."""
    if not rows:
        return []
    scores = score_images(scorers.clip, scorers.dino, [load_rgb(r["image_path"]) for r in rows],
                          [r["prompt"] for r in rows], [r["boxes"] for r in rows],
                          [scorers.references.get(r["references"]) for r in rows], rows, scorers.extra_metrics)
    return [{**{k: v for k, v in row.items() if k not in _REQUEST_ONLY}, **s} for row, s in zip(rows, scores)]
