"""CLIP-I, CLIP-T, DINO and M-DINO: the image- and text-fidelity metrics of MS-Diffusion (sec. 4.1).

Exact definitions, for one generated image G with prompt p and subjects s = 1..S, each with reference images R_s,1..n
and box b_s (normalised [x0, y0, x1, y1]); ``cos`` is cosine similarity, ``clip`` the projected CLIP image (or text)
embedding, ``dino`` the final-layer CLS token of the self-supervised ViT:

- ``sim_clip(s) = mean_j cos(clip(G), clip(R_s,j))``; **CLIP-I** ``= mean_s sim_clip(s)``  (whole generated image)
- **CLIP-T** ``= cos(clip(G), clip_text(p))``  (raw cosine, not scaled by 100 or 2.5)
- ``sim_dino(s) = mean_j cos(dino(G), dino(R_s,j))``; **DINO** ``= mean_s sim_dino(s)``  (whole generated image)
- ``region_dino(s) = mean_j cos(dino(crop(G, b_s)), dino(R_s,j))``, where ``crop`` cuts the box out of G in pixels;
  **M-DINO** ``= prod_s max(region_dino(s), 0)``. The product falls to ~0 as soon as one subject is missing from its
  box, which the mean hides (MS-Diffusion's "subject neglect"); clamping at 0 keeps two negative similarities from
  multiplying into a good score.

For a single subject M-DINO is simply the region DINO. Aggregates (per sample, per group, overall) are plain means
over generated images, so every image weighs the same.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import pandas as pd
import torch
from PIL import Image

from mpalign.encoders import clip_image_embeds, clip_text_embeds, dinov2_features
from mpalign.zoo import EncoderWithProcessor

METRICS = ("clip_i", "clip_t", "dino", "m_dino")
# The toy benchmark's exact scores (mpalign.toy.benchmark): present only in its evaluations
IDENTITY_METRICS = ("identity", "identity_color", "identity_shape", "identity_texture", "placement")
METRIC_NAMES = {"clip_i": "CLIP-I", "clip_t": "CLIP-T", "dino": "DINO", "m_dino": "M-DINO", "identity": "identity",
                "identity_color": "identity: colour", "identity_shape": "identity: shape",
                "identity_texture": "identity: texture", "placement": "placement"}


def scored_metrics(scores: pd.DataFrame) -> list[str]:
    """The metric columns an evaluation has: always ``METRICS``, the identity scores on the toy benchmark."""
    return [m for m in (*METRICS, *IDENTITY_METRICS) if m in scores.columns]


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
                 reference_embeds: Sequence[Sequence[tuple[torch.Tensor, torch.Tensor]]]) -> list[dict[str, Any]]:
    """Scores of a batch of generated images; ``reference_embeds[i][s]`` is ``(clip (n_s, P), dino (n_s, D))`` of
    image i's subject s (see :func:`embed_images`), so the caller can compute each reference once."""
    gen_clip, gen_dino = embed_images(clip, dino, generated)
    text_clip = clip_text_embeds(clip, prompts).cpu()
    crops = [crop_box(image, box) for image, image_boxes in zip(generated, boxes) for box in image_boxes]
    region_dino = dinov2_features(dino, crops)[0].cpu()
    out, start = [], 0
    for i, image_boxes in enumerate(boxes):
        refs = reference_embeds[i]
        out.append(sample_scores(gen_clip[i], text_clip[i], gen_dino[i], region_dino[start:start + len(image_boxes)],
                                 [r[0] for r in refs], [r[1] for r in refs]))
        start += len(image_boxes)
    return out


def aggregate(scores: pd.DataFrame, by: Sequence[str]) -> pd.DataFrame:
    """Mean of every metric and the number of generated images, per combination of the ``by`` columns."""
    grouped = scores.groupby(list(by), sort=True)
    return grouped[scored_metrics(scores)].mean().join(grouped.size().rename("images")).reset_index()
