"""One box per subject phrase with Grounding DINO (transformers' ``GroundingDinoForObjectDetection``).

All phrases of a caption go to the detector as one prompt ("striped red ball . dotted cube ."), as Grounding DINO
was trained. A query's score for a phrase is its best token probability over the phrase's tokens. Each phrase, in
caption order, takes the highest-scoring query whose box passes the rules: score >= ``text_threshold`` for the phrase,
best score over all tokens >= ``box_threshold`` (Grounding DINO's own two thresholds), area within
[``min_box_area``, ``max_box_area``], side ratio <= ``max_box_aspect_ratio``, and IoU <= ``max_box_overlap_iou`` with
every box already taken (so two phrases never share one object). A phrase with no such query is dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from mpalign.config import DataConfig
from mpalign.zoo import EncoderWithProcessor

PHRASE_SEPARATOR_IDS = (1012, 1029)  # BERT's "." and "?": Grounding DINO splits its prompt into phrases at them


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 normalised to [0, 1]
    score: float


def detector_prompt(phrases: Sequence[str]) -> str:
    """Lower case, "." separated, "." terminated; dots inside a phrase would split it, so they go."""
    return " ".join(p.lower().replace(".", " ").replace("?", " ").strip() + " ." for p in phrases)


def phrase_token_spans(input_ids: Sequence[int], num_phrases: int) -> list[list[int]]:
    """Token positions of each phrase: the tokens between [CLS] / a separator and the next separator."""
    spans: list[list[int]] = [[]]
    for pos, tok in enumerate(input_ids[1:], start=1):
        if tok in PHRASE_SEPARATOR_IDS or tok in (0, 102):
            spans.append([])
            if len(spans) > num_phrases:
                break
        else:
            spans[-1].append(pos)
    return (spans + [[]] * num_phrases)[:num_phrases]


def annotated_boxes(phrases: Sequence[str], annotated_phrases: Sequence[str],
                    boxes: Sequence[Sequence[float]]) -> list[Detection | None]:
    """Boxes a record brings with it (``data.boxes: annotations``) for the caption's subject phrases: a phrase takes the
    first unused annotation whose phrase it contains, word for word ("a red ball" takes "red ball" or "ball");
    phrases no annotation names get None and are dropped, like phrases the detector finds no box for."""
    used: set[int] = set()
    out: list[Detection | None] = []
    for phrase in phrases:
        words = f" {' '.join(phrase.lower().split())} "
        match = next((i for i, name in enumerate(annotated_phrases)
                      if i not in used and f" {' '.join(name.lower().split())} " in words), None)
        if match is None:
            out.append(None)
        else:
            used.add(match)
            out.append(Detection(tuple(float(v) for v in boxes[match]), 1.0))
    return out


def cxcywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    cx, cy, w, h = boxes[..., 0], boxes[..., 1], boxes[..., 2], boxes[..., 3]
    return np.clip(np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1), 0.0, 1.0)


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def box_passes_rules(box: Sequence[float], cfg: DataConfig) -> bool:
    """Too small, too large or too thin subjects make poor references (MS-Diffusion appendix A)."""
    w, h = box[2] - box[0], box[3] - box[1]
    if w <= 0 or h <= 0:
        return False
    return cfg.min_box_area <= w * h <= cfg.max_box_area and max(w / h, h / w) <= cfg.max_box_aspect_ratio


def select_boxes(probs: np.ndarray, boxes: np.ndarray, spans: Sequence[Sequence[int]], cfg: DataConfig
                 ) -> list[Detection | None]:
    """Assign one box per phrase. ``probs`` (Q, T) token probabilities per query, ``boxes`` (Q, 4) normalised xyxy,
    ``spans`` the token positions of each phrase."""
    best_any = probs.max(axis=1)
    taken: list[tuple[float, float, float, float]] = []
    out: list[Detection | None] = []
    for span in spans:
        if not span:
            out.append(None)
            continue
        phrase_score = probs[:, span].max(axis=1)
        chosen = None
        for q in np.argsort(-phrase_score, kind="stable"):
            score = float(phrase_score[q])
            if score < cfg.text_threshold:
                break  # sorted by this score: no later query passes either
            if best_any[q] < cfg.box_threshold:
                continue
            box = tuple(float(v) for v in boxes[q])
            if box_passes_rules(box, cfg) and all(box_iou(box, t) <= cfg.max_box_overlap_iou for t in taken):
                chosen = Detection(box, score)
                break
        if chosen is not None:
            taken.append(chosen.box)
        out.append(chosen)
    return out


@torch.no_grad()
def detect_boxes(detector: EncoderWithProcessor, images: Sequence[np.ndarray], phrases: Sequence[Sequence[str]],
                 cfg: DataConfig) -> list[list[Detection | None]]:
    """Batched Grounding DINO over images (uint8 (H, W, 3)), one prompt per image; one entry per phrase."""
    model, processor = detector.model, detector.processor
    param = next(model.parameters())
    max_len = model.config.max_text_len
    inputs = processor(images=list(images), text=[detector_prompt(p) for p in phrases], return_tensors="pt",
                       padding=True, truncation=True, max_length=max_len)
    inputs = {k: (v.to(param.device, param.dtype) if v.is_floating_point() else v.to(param.device))
              for k, v in inputs.items()}
    outputs = model(**inputs)
    probs = outputs.logits.sigmoid().float().cpu().numpy()
    boxes = cxcywh_to_xyxy(outputs.pred_boxes.float().cpu().numpy())
    ids = inputs["input_ids"].cpu().tolist()
    return [select_boxes(probs[i], boxes[i], phrase_token_spans(ids[i], len(phrases[i])), cfg)
            for i in range(len(images))]
