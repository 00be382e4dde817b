"""CLIP-I, CLIP-T, DINO and M-DINO: the image- and text-fidelity metrics of MS-Diffusion (sec. 4.1).

Exact definitions, for one generated image G with prompt p and subjects s = 1..S, each with reference images R_s,1..n
and box b_s (normalised [x0, y0, x1, y1]); ``cos`` is cosine similarity, ``clip`` the projected CLIP image (or text)
embedding, ``dino`` the final-layer CLS token of the self-supervised ViT:

- ``sim_clip(s) = mean_j cos(clip(G), clip(R_s,j))``; **CLIP-I** ``= mean_s sim_clip(s)``  (whole generated image)
- **CLIP-T** ``= cos(clip(G), clip_text(p))``  (raw cosine, not scaled by 100 or 2.5)
- ``sim_dino(s) = mean_j cos(dino(G), dino(R_s,j))``; **DINO** ``= mean_s sim_dino(s)``  (whole generated image)
- ``region_dino(s) = mean_j cos(dino(crop(G, b_s)), dino(R_s,j))``, where ``crop`` cuts the box out of G in pixels
  and pads it to a square (black), so the scorer's resize and centre crop keep the whole subject; **M-DINO** ``= prod_s max(region_dino(s), 0)``. The product falls to ~0 as soon as one subject is missing from its
  box, which the mean hides (MS-Diffusion's "subject neglect"); clamping at 0 keeps two negative similarities from
  multiplying into a good score.

For a single subject M-DINO is simply the region DINO. Aggregates (per sample, per group, overall) are plain means
over generated images, so every image weighs the same.

A benchmark can add its own per-subject scores: :func:`register_subject_metric` names a function of (generated image,
subject box, request row, subject index) -> score; ``eval.subject_metrics`` lists the names to compute, and each
becomes a column (the mean over the image's subjects) next to the four above, in ``mpalign.evaluate`` and in sweeps.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
import torch
from PIL import Image

from mpalign.config import ConfigError
from mpalign.encoders import clip_image_embeds, clip_text_embeds, dinov2_features
from mpalign.zoo import EncoderWithProcessor

METRICS = ("clip_i", "clip_t", "dino", "m_dino")
METRIC_NAMES = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO", "m_dino": "M-DINO", "identity": "identity",
                "identity_color": "identity: colour", "identity_shape": "identity: shape",
                "identity_texture": "identity: texture", "placement": "placement"}

# (generated image, the subject's normalised box, the request row it was generated from, subject index) -> score
SubjectMetric = Callable[[Image.Image, Sequence[float], Mapping[str, Any], int], float]
SUBJECT_METRICS: dict[str, SubjectMetric] = {}
# name -> module whose import registers it: a worker process resolves a metric by name without its caller importing
# the module first (the toy world's "identity" goes here with the toy preset)
SUBJECT_METRIC_MODULES: dict[str, str] = {
    name: "mpalign.toy.benchmark"
    for name in ("identity", "identity_color", "identity_shape", "identity_texture", "placement")
}


def register_subject_metric(name: str, metric: SubjectMetric) -> None:
    """Make ``name`` a per-subject score ``eval.subject_metrics`` (and ``tune.metric``) can ask for."""
    if name in METRICS or name == "diffusion":
        raise ValueError(f"'{name}' is a built-in metric")
    SUBJECT_METRICS[name] = metric


def known_subject_metrics() -> set[str]:
    return set(SUBJECT_METRICS) | set(SUBJECT_METRIC_MODULES)


def subject_metrics(names: Sequence[str]) -> dict[str, SubjectMetric]:
    """The registered functions of ``names``, importing their modules when needed."""
    out = {}
    for name in names:
        if name not in SUBJECT_METRICS and name in SUBJECT_METRIC_MODULES:
            importlib.import_module(SUBJECT_METRIC_MODULES[name])
        if name not in SUBJECT_METRICS:
            known = ", ".join(sorted(known_subject_metrics())) or "none registered"
            raise ConfigError(f"no per-subject metric '{name}' (eval.subject_metrics / tune.metric); known: {known}")
        out[name] = SUBJECT_METRICS[name]
    return out


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise cosine similarity of the rows of ``a`` (N, D) and ``b`` (M, D): (N, M)."""
    a = torch.nn.functional.normalize(a.float(), dim=-1)
    b = torch.nn.functional.normalize(b.float(), dim=-1)
    return a @ b.T


def box_pixels(box: Sequence[float], width: int, height: int) -> tuple[int, int, int, int]:
    """A normalised box as a pixel rectangle (left, top, right, bottom), at least one pixel each way."""
    x0, y0, x1, y1 = box
    left, top = min(math.floor(x0 * width), width - 1), min(math.floor(y0 * height), height - 1)
    right, bottom = max(math.ceil(x1 * width), left + 1), max(math.ceil(y1 * height), top + 1)
    return left, top, min(right, width), min(bottom, height)


def crop_box(image: Image.Image, box: Sequence[float]) -> Image.Image:
    return image.crop(box_pixels(box, *image.size))


def region_crop(image: Image.Image, box: Sequence[float]) -> Image.Image:
    """The box cut out of ``image`` and padded (black, centred) to a square: scorers' processors resize and centre-
    crop, which would cut the ends off a tall or wide subject."""
    crop = crop_box(image, box)
    side = max(crop.size)
    square = Image.new("RGB", (side, side))
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square


def m_dino(region_scores: Sequence[float]) -> float:
    """M-DINO: the product over subjects of each subject's region DINO score, each clamped at 0."""
    return math.prod(max(float(s), 0.0) for s in region_scores)


def sample_scores(gen_clip: torch.Tensor, text_clip: torch.Tensor, gen_dino: torch.Tensor, region_dino: torch.Tensor,
                  ref_clip: Sequence[torch.Tensor], ref_dino: Sequence[torch.Tensor]) -> dict[str, Any]:
    """All metrics of one generated image from embeddings: ``gen_clip`` (P,), ``text_clip`` (P,), ``gen_dino`` (D,),
    ``region_dino`` (S, D) of its box crops; per subject s, ``ref_clip[s]`` (n_s, P) and ``ref_dino[s]`` (n_s, D)."""
    clip_per_subject = [cosine(gen_clip[None], refs).mean().item() for refs in ref_clip]
    dino_per_subject = [cosine(gen_dino[None], refs).mean().item() for refs in ref_dino]
    region_per_subject = [cosine(region_dino[s][None], refs).mean().item() for s, refs in enumerate(ref_dino)]
    return {
        "clip_i": sum(clip_per_subject) / len(clip_per_subject),
        "clip_t": cosine(gen_clip[None], text_clip[None]).item(),
        "dino": sum(dino_per_subject) / len(dino_per_subject),
        "m_dino": m_dino(region_per_subject),
        "clip_i_per_subject": clip_per_subject,
        "dino_per_subject": dino_per_subject,
        "region_dino_per_subject": region_per_subject,
    }


def embed_images(clip: EncoderWithProcessor, dino: EncoderWithProcessor,
                 images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP image embeddings (N, P) and DINO CLS tokens (N, D), in one batched pass each."""
    return clip_image_embeds(clip, images).cpu(), dinov2_features(dino, images)[0].cpu()


def score_images(clip: EncoderWithProcessor, dino: EncoderWithProcessor, generated: Sequence[Image.Image],
                 prompts: Sequence[str], boxes: Sequence[Sequence[Sequence[float]]],
                 reference_embeds: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]],
                 rows: Sequence[Mapping[str, Any]] = (),
                 extra_metrics: Mapping[str, SubjectMetric] | None = None) -> list[dict[str, Any]]:
    """Scores of a batch of generated images; ``reference_embeds[i][s]`` is ``(clip (n_s, P), dino (n_s, D))`` of
    image i's subject s (see :func:`embed_images`), so the caller can compute each reference once. Each of
    ``extra_metrics`` scores every subject of image i given ``rows[i]`` (its request) and adds ``name`` (the mean over
    subjects) and ``name_per_subject``."""
    gen_clip, gen_dino = embed_images(clip, dino, generated)
    text_clip = clip_text_embeds(clip, prompts).cpu()
    crops = [region_crop(image, box) for image, image_boxes in zip(generated, boxes) for box in image_boxes]
    region_dino = dinov2_features(dino, crops)[0].cpu()
    out, start = [], 0
    for i, image_boxes in enumerate(boxes):
        refs = reference_embeds[i]
        scores = sample_scores(gen_clip[i], text_clip[i], gen_dino[i], region_dino[start:start + len(image_boxes)],
                               [r[0] for r in refs], [r[1] for r in refs])
        for name, metric in (extra_metrics or {}).items():
            per_subject = [float(metric(generated[i], box, rows[i], s)) for s, box in enumerate(image_boxes)]
            scores.update({name: sum(per_subject) / len(per_subject), f"{name}_per_subject": per_subject})
        out.append(scores)
        start += len(image_boxes)
    return out


def metric_columns(scores: pd.DataFrame) -> list[str]:
    """The built-in metrics, then any per-subject extras the scores carry (a column with a ``_per_subject`` twin)."""
    return [*METRICS, *(c for c in scores.columns if c not in METRICS and f"{c}_per_subject" in scores.columns)]


def aggregate(scores: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean of every metric and the number of generated images, per combination of the ``by`` columns."""
    grouped = scores.groupby(list(by), sort=True)
    return grouped[metric_columns(scores)].mean().join(grouped.size().rename("images")).reset_index()
