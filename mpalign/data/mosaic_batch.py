"""Rows of a built dataset -> the MOSAIC training batch (``model.method: mosaic``).

MOSAIC encodes with FLUX's VAE and text encoders, which the dataset does not cache (its caches are SDXL's), so the
batch carries raw inputs; the correspondences come from the dataset's correspondence stage (docs/mosaic.md).

| key | shape | dtype | meaning |
|---|---|---|---|
| ``pixel_values`` | (B, 3, H, H) | float | target image in [-1, 1] |
| ``reference_pixels`` | (B, S, 3, R, R) | float | reference crops in [0, 1] (zeros for padding) |
| ``subject_mask`` | (B, S) | bool | True for real subjects |
| ``boxes`` | (B, S, 4) | float | target boxes (not a MOSAIC input; kept for the report and validation) |
| ``input_ids`` | (B, 77) | long | CLIP token ids (FLUX's pooled conditioning) |
| ``t5_input_ids`` | (B, L) | long | T5 token ids (FLUX's sequence conditioning) |
| ``ref_tokens`` | (B, S, P) | long | per subject: reference-token index u of each correspondence |
| ``target_tokens`` | (B, S, P) | long | per subject: target-token index v of each correspondence |
| ``point_mask`` | (B, S, P) | bool | True for real correspondences (P = the most any subject of the batch has) |
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from PIL import Image

from mpalign.config import Config, ModelConfig
from mpalign.data.collate import NumpyBatchCollateFn, _padded
from mpalign.data.schema import decode_png

_TOKENIZERS: dict[tuple[str, str], tuple[Any, Any]] = {}


def flux_tokenizers(cfg: ModelConfig) -> tuple[Any, Any]:
    """FLUX's two tokenizers, loaded once per process."""
    from mpalign.zoo import load_flux_tokenizers

    key = (cfg.preset, cfg.flux, cfg.toy_weights)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_flux_tokenizers(cfg)
    return _TOKENIZERS[key]


def tokenize_for_flux(cfg: ModelConfig, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(CLIP ids (B, 77), T5 ids (B, L)) padded to each tokenizer's length, as ``FluxPipeline.encode_prompt`` does."""
    clip, t5 = flux_tokenizers(cfg)
    clip_ids = clip(captions, padding="max_length", max_length=clip.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    t5_ids = t5(captions, padding="max_length", max_length=t5.model_max_length, truncation=True,
                return_tensors="pt").input_ids
    return clip_ids, t5_ids


def correspondence_tensors(ref_rows: list[Any], target_rows: list[Any], num_subjects: int
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row, per-subject token index lists -> (B, S, P) long tensors and their (B, S, P) mask."""
    lists = [[list(map(int, points)) for points in (row if row is not None else [])][:num_subjects] for row in ref_rows]
    targets = [[list(map(int, points)) for points in (row if row is not None else [])][:num_subjects]
               for row in target_rows]
    most = max([len(points) for row in lists for points in row] + [1])
    shape = (len(lists), num_subjects, most)
    ref_tokens, target_tokens = torch.zeros(shape, dtype=torch.long), torch.zeros(shape, dtype=torch.long)
    mask = torch.zeros(shape, dtype=torch.bool)
    for i, (row, target_row) in enumerate(zip(lists, targets)):
        for s, (points, target_points) in enumerate(zip(row, target_row)):
            ref_tokens[i, s, :len(points)] = torch.tensor(points, dtype=torch.long)
            target_tokens[i, s, :len(points)] = torch.tensor(target_points, dtype=torch.long)
            mask[i, s, :len(points)] = True
    return ref_tokens, target_tokens, mask


def mosaic_rows_to_batch(rows: dict[str, Any], cfg: Config) -> dict[str, torch.Tensor]:
    from mpalign.encoders import images_to_tensor

    num_subjects = cfg.model.max_subjects
    boxes = [np.asarray([np.asarray(b, np.float32) for b in row], np.float32).reshape(-1, 4) for row in rows["boxes"]]
    batch: dict[str, torch.Tensor] = {}
    batch["boxes"], counts = _padded(boxes, num_subjects)
    batch["subject_mask"] = torch.arange(num_subjects)[None, :] < torch.tensor(counts)[:, None]
    sizes = [int(s) for s in rows["image_size"]]
    batch["pixel_values"] = torch.cat([images_to_tensor([Image.fromarray(decode_png(v))], s)
                                       for v, s in zip(rows["image"], sizes)])
    crops = [[decode_png(c) for c in row][:num_subjects] for row in rows["reference_crops"]]
    side = next((c.shape[0] for row in crops for c in row), cfg.data.crop_size)
    pixels = torch.zeros(len(crops), num_subjects, 3, side, side)
    for i, row in enumerate(crops):
        for j, crop in enumerate(row):
            pixels[i, j] = torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1).float() / 255.0
    batch["reference_pixels"] = pixels
    batch["input_ids"], batch["t5_input_ids"] = tokenize_for_flux(cfg.model, [str(c) for c in rows["caption"]])
    empty = [None] * len(crops)
    ref_rows = rows.get("correspondence_ref_tokens")
    target_rows = rows.get("correspondence_target_tokens")
    batch["ref_tokens"], batch["target_tokens"], batch["point_mask"] = correspondence_tensors(
        list(ref_rows) if ref_rows is not None else empty, list(target_rows) if target_rows is not None else empty,
        num_subjects)
    return batch


class MosaicCollateFn(NumpyBatchCollateFn):
    """``ds.iter_torch_batches(collate_fn=MosaicCollateFn(cfg))``."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return mosaic_rows_to_batch(batch, self.cfg)
