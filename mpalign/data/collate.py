"""Rows of a built dataset → the training batch of ``mpalign/batch.py``.

``rows_to_batch`` takes a batch of sample rows as Ray Data's ``iter_batches(batch_format="numpy")`` yields them (or
as ``pyarrow.Table.to_pydict()`` gives them), pads subjects to ``model.max_subjects`` and returns torch tensors: the
cached encoder outputs the dataset carries, and the raw inputs (pixels, token ids, reference crops) for every cache it
does not. ``RowsCollateFn`` wraps it for ``ds.iter_torch_batches(collate_fn=...)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mpalign.config import Config, ModelConfig
from mpalign.data.schema import SAMPLES_DIR, decode_png, unpack_array

try:  # Ray is only needed to iterate a Ray Dataset; the function itself runs without it
    from ray.data.collate_fn import NumpyBatchCollateFn
except ImportError:  # pragma: no cover - the GPU benchmark machine has no Ray
    NumpyBatchCollateFn = object  # type: ignore[misc,assignment]

_TOKENIZERS: dict[tuple[str, str], tuple[Any, Any]] = {}


def sdxl_tokenizers(cfg: ModelConfig) -> tuple[Any, Any]:
    """The two SDXL tokenizers, loaded once per process."""
    from mpalign.zoo import load_sdxl_tokenizers

    key = (cfg.preset, cfg.sdxl)
    if key not in _TOKENIZERS:
        _TOKENIZERS[key] = load_sdxl_tokenizers(cfg)
    return _TOKENIZERS[key]


def _column(rows: dict[str, Any], name: str) -> list[Any] | None:
    values = rows.get(name)
    if values is None:
        return None
    values = list(values)
    return None if any(v is None for v in values) else values


def _padded(arrays: Sequence[np.ndarray], size: int) -> tuple[torch.Tensor, list[int]]:
    """Stack per-row (n_i, ...) arrays into (B, size, ...) float32, zero-padded (extra subjects cut)."""
    trailing = next((a.shape[1:] for a in arrays if a.ndim >= 1 and a.shape[0] > 0), None)
    out = np.zeros((len(arrays), size, *(trailing or ())), dtype=np.float32)
    counts = []
    for i, a in enumerate(arrays):
        n = min(len(a), size)
        if n:
            out[i, :n] = a[:n]
        counts.append(n)
    return torch.from_numpy(out), counts


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


PER_SUBJECT_CACHES = ("dino_cls", "dino_ref_patch_pooled", "clip_hidden", "phrase_embeds")
PER_IMAGE_CACHES = ("dino_patch_pooled", "dino_ref_image_patch_pooled", "latents", "latents_std", "prompt_embeds",
                    "pooled_prompt_embeds", "dino_patch_grid")
ALWAYS_READ = ("id", "boxes", "image_size", "original_size", "crop_top_left")
# the raw columns rows_to_batch falls back to when a dataset was built without a cache
RAW_FOR_MISSING_CACHE = {"latents": ("image",), "prompt_embeds": ("caption", "phrases"),
                         "phrase_embeds": ("caption", "phrases"), "clip_hidden": ("reference_crops",)}


def training_columns(available: Sequence[str]) -> list[str]:
    """The columns :func:`rows_to_batch` reads from a dataset with ``available`` columns: what training projects
    its reads on (target PNGs, masks and crops stay on disk when their caches exist)."""
    present = set(available)
    columns = [c for c in (*ALWAYS_READ, *PER_SUBJECT_CACHES, *PER_IMAGE_CACHES) if c in present]
    for cache, raw in RAW_FOR_MISSING_CACHE.items():
        if cache not in present:
            columns += [c for c in raw if c not in columns]
    return columns


def rows_to_batch(rows: dict[str, Any], cfg: Config) -> dict[str, torch.Tensor]:
    from mpalign.encoders import add_time_ids

    S = cfg.model.max_subjects
    ids = list(rows["id"])
    B = len(ids)
    boxes = [np.asarray([np.asarray(b, np.float32) for b in row], np.float32).reshape(-1, 4) for row in rows["boxes"]]
    batch: dict[str, torch.Tensor] = {}
    batch["boxes"], counts = _padded(boxes, S)
    batch["subject_mask"] = torch.arange(S)[None, :] < torch.tensor(counts)[:, None]
    for name in PER_SUBJECT_CACHES:
        values = _column(rows, name)
        if values is not None:
            batch[name] = _padded([unpack_array(v) for v in values], S)[0]
    for name in PER_IMAGE_CACHES:
        values = _column(rows, name)
        if values is not None:
            batch[name] = torch.from_numpy(np.stack([unpack_array(v) for v in values]).astype(np.float32))
    sizes = [int(s) for s in rows["image_size"]]
    batch["time_ids"] = torch.tensor([add_time_ids(tuple(int(v) for v in o), tuple(int(v) for v in c), (s, s))
                                      for o, c, s in zip(rows["original_size"], rows["crop_top_left"], sizes)])

    if "latents" not in batch:
        from PIL import Image

        from mpalign.encoders import images_to_tensor

        images = [Image.fromarray(decode_png(v)) for v in rows["image"]]
        batch["pixel_values"] = torch.cat([images_to_tensor([im], s) for im, s in zip(images, sizes)])
    if "prompt_embeds" not in batch or "phrase_embeds" not in batch:
        tokenizer, tokenizer_2 = sdxl_tokenizers(cfg.model)
        captions = [str(c) for c in rows["caption"]]
        batch["input_ids"], batch["input_ids_2"] = _tokenize(tokenizer, captions), _tokenize(tokenizer_2, captions)
        phrases = [[str(p) for p in row][:S] for row in rows["phrases"]]
        flat = _tokenize(tokenizer, [p for row in phrases for p in row] + [""])
        phrase_ids = flat[-1:].repeat(B, S, 1)  # padding subjects: the empty prompt
        k = 0
        for i, row in enumerate(phrases):
            phrase_ids[i, :len(row)] = flat[k:k + len(row)]
            k += len(row)
        batch["phrase_input_ids"] = phrase_ids
    if "clip_hidden" not in batch:
        crops = [[decode_png(c) for c in row][:S] for row in rows["reference_crops"]]
        side = next((c.shape[0] for row in crops for c in row), cfg.data.crop_size)
        pixels = torch.zeros(B, S, 3, side, side)
        for i, row in enumerate(crops):
            for j, crop in enumerate(row):
                pixels[i, j] = torch.tensor(crop).permute(2, 0, 1).float() / 255.0
        batch["reference_pixels"] = pixels
    return batch


class RowsCollateFn(NumpyBatchCollateFn):
    """``ds.iter_torch_batches(collate_fn=RowsCollateFn(cfg))``: Ray 2.60 hands a subclass of
    ``NumpyBatchCollateFn`` the batch as a dict of NumPy arrays."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        return rows_to_batch(batch, self.cfg)


def load_dataset_split(path: str | Path, split: str):
    """The samples of one split ("train" / "val") of a built dataset as a Ray Dataset."""
    import ray
    from ray.data.expressions import col

    return ray.data.read_parquet(str(Path(path) / SAMPLES_DIR)).filter(expr=col("split") == split)
