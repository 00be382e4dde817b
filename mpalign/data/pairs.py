"""Frame pairs (MS-Diffusion appendix A): the target frame gives the caption, phrases and boxes; its references come
from another frame of the same clip, subjects matched with the Hungarian algorithm on DINOv2 CLS similarity. A target
subject left unmatched (or matched below ``match_min_similarity``) falls back to its own crop from the target."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.maximum(np.linalg.norm(a, axis=-1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
    return a @ b.T


def match_subjects(target_cls: np.ndarray, reference_cls: np.ndarray, min_similarity: float
                   ) -> list[tuple[int | None, float]]:
    """For each target subject: (index of its reference subject or None, similarity). One-to-one, maximising the
    total cosine similarity of the matched pairs."""
    out: list[tuple[int | None, float]] = [(None, 0.0)] * len(target_cls)
    if len(target_cls) == 0 or len(reference_cls) == 0:
        return out
    sim = cosine_similarity(np.asarray(target_cls, np.float64), np.asarray(reference_cls, np.float64))
    rows, cols = linear_sum_assignment(-sim)
    for r, c in zip(rows, cols):
        if sim[r, c] >= min_similarity:
            out[r] = (int(c), float(sim[r, c]))
    return out


def reference_frames(frames: Sequence[dict[str, Any]], seed: int) -> dict[str, dict[str, Any] | None]:
    """For every frame of one clip (its id → frame), the frame that supplies its references: another frame chosen
    with a generator seeded by the seed and the clip, so reruns pick the same one; None for a clip of one frame."""
    ordered = sorted(frames, key=lambda f: (f["frame_idx"] if f["frame_idx"] is not None else -1, f["id"]))
    if len(ordered) < 2:
        return {f["id"]: None for f in ordered}
    rng = random.Random(f"{seed}:{ordered[0]['video_id']}")
    return {f["id"]: rng.choice([o for o in ordered if o["id"] != f["id"]]) for f in ordered}
