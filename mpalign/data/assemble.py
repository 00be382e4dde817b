"""From finished work rows of one shard to output rows: samples (frame pairs assembled) and rejects."""

from __future__ import annotations

from typing import Any

import numpy as np

from mpalign.config import DataConfig
from mpalign.data.pairs import match_subjects, reference_frames
from mpalign.data.records import INT32_RANGE, printable, split_of
from mpalign.data.schema import REJECT_SCHEMA, pack_array, unpack_array

# Per-subject columns a reference brings from the frame it was cropped from.
_REFERENCE_ARRAYS = ("dino_cls", "dino_ref_patch_pooled", "clip_hidden")
_TARGET_COLUMNS = ("id", "caption", "phrases", "phrase_char_spans", "phrase_token_positions", "boxes", "box_scores",
                   "image", "original_size", "crop_top_left", "masks", "video_id", "frame_idx", "dino_patch_pooled",
                   "dino_patch_grid", "latents", "latents_std", "prompt_embeds", "pooled_prompt_embeds", "phrase_embeds")


def safe_reject_row(row: dict[str, Any]) -> dict[str, Any]:
    """The REJECT_SCHEMA columns of ``row``, made storable whatever the record held: a reject row must never fail
    its shard (strings as UTF-8 with lone surrogates escaped, a frame index outside int32 left out)."""
    out = {name: row.get(name) for name in REJECT_SCHEMA.names}
    for name in ("id", "reason", "stage", "detail", "caption", "source", "video_id"):
        if isinstance(out[name], str):
            out[name] = printable(out[name])
    if not (isinstance(out["frame_idx"], int) and INT32_RANGE[0] <= out["frame_idx"] <= INT32_RANGE[1]):
        out["frame_idx"] = None
    return out


def reject_row(row: dict[str, Any]) -> dict[str, Any]:
    return safe_reject_row({**row, "reason": row["reject_reason"], "stage": row["reject_stage"],
                            "detail": row["reject_detail"] or "", "source": row["image_path"] or "",
                            "caption": row["caption"] or ""})


def sample_row(target: dict[str, Any], reference: dict[str, Any] | None, cfg: DataConfig) -> tuple[dict[str, Any], int]:
    """The sample whose target is ``target``; references from ``reference`` (another frame) where the Hungarian
    match is good enough, else the target's own crops. Returns the row and how many subjects were matched."""
    n = len(target["phrases"])
    sources: list[tuple[dict[str, Any], int, float]] = [(target, i, 1.0) for i in range(n)]
    if reference is not None:
        matches = match_subjects(unpack_array(target["dino_cls"]), unpack_array(reference["dino_cls"]),
                                 cfg.match_min_similarity)
        sources = [(reference, j, sim) if j is not None else (target, i, 1.0) for i, (j, sim) in enumerate(matches)]
    correspondences = None
    if target.get("correspondence_ref_tokens") is not None:
        sources, correspondences = _correspondences(target, sources, cfg)
    row = {name: target.get(name) for name in _TARGET_COLUMNS}
    split_key = target["video_id"] if target["video_id"] is not None else target["id"]
    row.update(
        split=split_of(split_key, cfg.val_fraction, cfg.seed),
        num_subjects=n,
        image_size=cfg.image_size,
        source=target["image_path"] or "",
        reference_crops=[src["crops"][j] for src, j, _ in sources],
        reference_ids=[src["id"] for src, _, _ in sources],
        reference_boxes=[src["boxes"][j] for src, j, _ in sources],
        reference_similarity=[sim for _, _, sim in sources],
    )
    if correspondences is not None:
        row["correspondence_ref_tokens"] = [m.ref_tokens.tolist() for m in correspondences]
        row["correspondence_target_tokens"] = [m.target_tokens.tolist() for m in correspondences]
    for name in _REFERENCE_ARRAYS:
        if target.get(name) is not None:
            row[name] = pack_array(np.stack([unpack_array(src[name])[j] for src, j, _ in sources]))
    matched = sum(src is not target for src, _, _ in sources)
    # L_self's "reference_image" target (MultiPersona-Align 3.3.2): the whole frame the references were cut from,
    # i.e. the other frame when any subject was matched there, else the target itself (its own crops)
    row["dino_ref_image_patch_pooled"] = (reference if matched else target)["dino_patch_pooled"]
    return row, matched


def _correspondences(target: dict[str, Any], sources: list[tuple[dict[str, Any], int, float]], cfg: DataConfig):
    """(sources, matches): the correspondence stage matched each subject's own crop; a subject whose reference comes
    from another frame is matched again with that crop's features, and falls back to its own crop when that gives
    fewer than ``data.correspondence_min_points``. Disjointness (eq. 2) is applied over the final references."""
    from mpalign.data.correspondence import match_subjects

    if all(src is target for src, _, _ in sources):
        from mpalign.data.correspondence import Matches

        return sources, [Matches(np.asarray(u, np.int64), np.asarray(v, np.int64), np.zeros(len(u), np.float32))
                         for u, v in zip(target["correspondence_ref_tokens"], target["correspondence_target_tokens"])]
    target_features = unpack_array(target["corr_target_features"])
    regions = list(unpack_array(target["corr_target_regions"]))

    def match(chosen):
        features = [unpack_array(src["corr_crop_features"])[j] for src, j, _ in chosen]
        foreground = [unpack_array(src["corr_crop_foreground"])[j] for src, j, _ in chosen]
        return match_subjects(features, foreground, target_features, regions, cfg.correspondence_min_similarity,
                              cfg.correspondence_points)

    matches = match(sources)
    poor = [i for i, ((src, _, _), m) in enumerate(zip(sources, matches))
            if src is not target and len(m) < cfg.correspondence_min_points]
    if poor:
        sources = [(target, i, 1.0) if i in poor else source for i, source in enumerate(sources)]
        matches = match(sources)
    return sources, matches


def assemble_shard(rows: list[dict[str, Any]], cfg: DataConfig) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                                                           dict[str, int]]:
    """(samples, rejects, pair counts) of one shard, both sorted by id so the files do not depend on the order rows
    arrived in."""
    rows = sorted(rows, key=lambda r: r["id"])
    good = [r for r in rows if r["reject_reason"] is None]
    clips: dict[str, list[dict[str, Any]]] = {}
    for row in good:
        if row["video_id"] is not None:
            clips.setdefault(row["video_id"], []).append(row)
    partner: dict[str, dict[str, Any] | None] = {}
    for frames in clips.values():
        partner.update(reference_frames(frames, cfg.seed))
    samples, counts = [], {"pair_samples": 0, "matched_subjects": 0, "fallback_subjects": 0}
    for row in good:
        reference = partner.get(row["id"])
        sample, matched = sample_row(row, reference, cfg)
        samples.append(sample)
        if reference is not None:
            counts["pair_samples"] += 1
            counts["matched_subjects"] += matched
            counts["fallback_subjects"] += sample["num_subjects"] - matched
    return samples, [reject_row(r) for r in rows if r["reject_reason"] is not None], counts
