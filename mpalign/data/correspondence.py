"""Semantic point correspondences between each subject's reference crop and its region of the target image, for
MOSAIC's SCAL and MDL (paper eqs. 1-2; docs/mosaic.md). Pure NumPy: the stage computes the features, these functions
decide the matches.

Features are DINOv2 patch tokens computed at the model's token grid (one DINOv2 patch per FLUX token: the image is
fed at ``tokens per side x patch size`` pixels, no centre crop), so a patch index *is* a token index: reference
token u = row * ref_grid + col of the crop, target token v = row * target_grid + col of the target image.

1. Candidates: reference tokens on the subject (not the crop's background fill), target tokens inside the subject's
   box and, where the subject's mask covers enough of the box, on the mask ("targeted masking" of the paper's
   appendix B, stage 5).
2. Mutual nearest neighbours of cosine similarity between the two candidate sets (the zero-shot DINOv2 matching
   the paper cites), kept above ``min_similarity``.
3. Disjointness (eq. 2): a target token claimed by several references goes to the most similar match.
4. At most ``max_points`` per subject (the most similar).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_CELL_FOREGROUND = 0.5  # a token counts as the subject's when at least half its pixels are


@dataclass
class Matches:
    """One subject's correspondences: reference token u, target token v, cosine similarity; most similar first."""

    ref_tokens: np.ndarray
    target_tokens: np.ndarray
    similarity: np.ndarray

    def __len__(self) -> int:
        return len(self.ref_tokens)

    def take(self, keep: np.ndarray) -> Matches:
        return Matches(self.ref_tokens[keep], self.target_tokens[keep], self.similarity[keep])


def cell_fractions(mask: np.ndarray, grid: int) -> np.ndarray:
    """(grid * grid,) fraction of each token cell of a (H, W) bool mask that is set (H, W multiples of grid)."""
    height, width = mask.shape
    cells = mask[: height - height % grid, : width - width % grid].reshape(grid, height // grid, grid, width // grid)
    return cells.mean(axis=(1, 3)).reshape(-1)


def foreground_tokens(crop: np.ndarray, grid: int, fill: int, tolerance: int = 12) -> np.ndarray:
    """(grid * grid,) bool: reference tokens on the subject, i.e. not the background fill of a background-filled
    crop (uint8 (R, R, 3))."""
    subject = np.abs(crop.astype(np.int16) - fill).max(axis=-1) > tolerance
    return cell_fractions(subject, grid) >= MIN_CELL_FOREGROUND


def target_region_tokens(box: list[float], mask: np.ndarray | None, grid: int) -> np.ndarray:
    """(grid * grid,) bool: target tokens whose centre is inside ``box`` (x0, y0, x1, y1 fractions; a box smaller
    than a token: the tokens it overlaps) and, when the subject's ``mask`` covers at least half of one of those
    tokens, that the mask covers."""
    centres = (np.arange(grid) + 0.5) / grid
    x0, y0, x1, y1 = box
    inside = ((centres[None, :] >= x0) & (centres[None, :] <= x1) & (centres[:, None] >= y0)
              & (centres[:, None] <= y1)).reshape(-1)
    if not inside.any():
        starts, ends = np.arange(grid) / grid, (np.arange(grid) + 1) / grid
        columns, rows = (starts < x1) & (ends > x0), (starts < y1) & (ends > y0)
        inside = (rows[:, None] & columns[None, :]).reshape(-1)
    if mask is None:
        return inside
    on_mask = inside & (cell_fractions(mask, grid) >= MIN_CELL_FOREGROUND)
    return on_mask if on_mask.any() else inside


def _normalise(features: np.ndarray) -> np.ndarray:
    features = features.astype(np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=-1, keepdims=True), 1e-8)


def mutual_nearest_neighbours(ref_features: np.ndarray, target_features: np.ndarray, ref_ok: np.ndarray,
                              target_ok: np.ndarray, min_similarity: float) -> Matches:
    """Pairs (u, v) of candidate tokens that are each other's most similar candidate, similarity >= threshold."""
    ref_index, target_index = np.flatnonzero(ref_ok), np.flatnonzero(target_ok)
    empty = Matches(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if len(ref_index) == 0 or len(target_index) == 0:
        return empty
    similarity = _normalise(ref_features[ref_index]) @ _normalise(target_features[target_index]).T
    best_target = similarity.argmax(axis=1)
    best_ref = similarity.argmax(axis=0)
    rows = np.flatnonzero(best_ref[best_target] == np.arange(len(ref_index)))
    cols = best_target[rows]
    scores = similarity[rows, cols]
    keep = scores >= min_similarity
    rows, cols, scores = rows[keep], cols[keep], scores[keep]
    order = np.argsort(-scores, kind="stable")
    return Matches(ref_index[rows[order]], target_index[cols[order]], scores[order].astype(np.float32))


def enforce_disjoint(matches: list[Matches]) -> list[Matches]:
    """Eq. 2: no target token in two references' sets. A contested token stays with the reference whose match is
    most similar (the earlier subject on a tie)."""
    owner: dict[int, tuple[float, int]] = {}
    for k, m in enumerate(matches):
        for v, s in zip(m.target_tokens.tolist(), m.similarity.tolist()):
            if v not in owner or s > owner[v][0]:
                owner[v] = (s, k)
    return [m.take(np.array([owner[v][1] == k for v in m.target_tokens.tolist()], dtype=bool)) if len(m) else m
            for k, m in enumerate(matches)]


def match_subjects(ref_features: list[np.ndarray], ref_ok: list[np.ndarray], target_features: np.ndarray,
                   target_ok: list[np.ndarray], min_similarity: float, max_points: int) -> list[Matches]:
    """Every subject's correspondences with the disjointness rule applied, at most ``max_points`` each.
    ref_features[k] (n_ref, D), ref_ok[k] (n_ref,), target_features (n_target, D), target_ok[k] (n_target,)."""
    matches = [mutual_nearest_neighbours(f, target_features, ok, region, min_similarity)
               for f, ok, region in zip(ref_features, ref_ok, target_ok)]
    return [m.take(np.arange(min(len(m), max_points))) for m in enforce_disjoint(matches)]


def check_matches(matches: list[Matches], phrases: list[str], min_points: int) -> str | None:
    """Why these matches are too poor to train on (a subject with fewer than ``min_points``), or None."""
    poor = [f"'{phrase}' {len(m)}" for phrase, m in zip(phrases, matches) if len(m) < min_points]
    if poor:
        return f"fewer than {min_points} correspondences for {', '.join(poor)}"
    return None
