"""The on-disk format of a built dataset: Parquet schemas of samples and rejects, and the tensor/image encodings.

Tensors are stored as NumPy ``.npy`` bytes (dtype and shape travel in the header, so a reader needs nothing but
``numpy.load``); images, reference crops and masks as PNG bytes (lossless: the raw-pixel training path sees exactly
the pixels the caches were computed from). ``docs/dataset.md`` documents every column.
"""

from __future__ import annotations

import io
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from mpalign.config import ConfigError, DataConfig

SAMPLES_DIR = "samples"
REJECTS_DIR = "rejects"
STATS_FILE = "stats.json"
CONFIG_FILE = "config.yaml"
MANIFEST_FILE = "manifest.json"

# Optional cache columns, keyed by the ``data.cache_*`` switch that turns them on.
CACHE_COLUMNS = {
    "cache_dinov2_patch_grid": ("dino_patch_grid",),
    "cache_clip": ("clip_hidden",),
    "cache_vae": ("latents", "latents_std"),
    "cache_text": ("prompt_embeds", "pooled_prompt_embeds", "phrase_embeds"),
    "correspondences": ("correspondence_ref_tokens", "correspondence_target_tokens"),
}

BOX = pa.list_(pa.float32(), 4)
_SAMPLE_FIELDS = [
    ("id", pa.string()),
    ("split", pa.string()),
    ("caption", pa.string()),
    ("phrases", pa.list_(pa.string())),
    ("phrase_char_spans", pa.list_(pa.list_(pa.int32(), 2))),
    ("phrase_token_positions", pa.list_(pa.list_(pa.int32()))),
    ("num_subjects", pa.int32()),
    ("boxes", pa.list_(BOX)),
    ("box_scores", pa.list_(pa.float32())),
    ("image", pa.binary()),
    ("image_size", pa.int32()),
    ("original_size", pa.list_(pa.int32(), 2)),
    ("crop_top_left", pa.list_(pa.int32(), 2)),
    ("masks", pa.list_(pa.binary())),
    ("reference_crops", pa.list_(pa.binary())),
    ("reference_ids", pa.list_(pa.string())),
    ("reference_boxes", pa.list_(BOX)),
    ("reference_similarity", pa.list_(pa.float32())),
    ("video_id", pa.string()),
    ("frame_idx", pa.int32()),
    ("source", pa.string()),
    ("dino_cls", pa.binary()),
    ("dino_patch_pooled", pa.binary()),
    ("dino_ref_patch_pooled", pa.binary()),
    ("dino_ref_image_patch_pooled", pa.binary()),
    ("dino_patch_grid", pa.binary()),
    ("clip_hidden", pa.binary()),
    ("latents", pa.binary()),
    ("latents_std", pa.binary()),
    ("prompt_embeds", pa.binary()),
    ("pooled_prompt_embeds", pa.binary()),
    ("phrase_embeds", pa.binary()),
    ("correspondence_ref_tokens", pa.list_(pa.list_(pa.int32()))),
    ("correspondence_target_tokens", pa.list_(pa.list_(pa.int32()))),
]

REJECT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("reason", pa.string()),
    ("stage", pa.string()),
    ("detail", pa.string()),
    ("caption", pa.string()),
    ("source", pa.string()),
    ("video_id", pa.string()),
    ("frame_idx", pa.int32()),
])

# Reasons a record is rejected; every reject row carries one of these.
REJECT_REASONS = {
    "bad_record": "the input record is malformed (not UTF-8, not a JSON object, wrong field types or ranges, text that "
                  "is not Unicode, no image field)",
    "duplicate_id": "another record earlier in the input has the same id",
    "empty_caption": "the caption is empty or whitespace",
    "missing_image": "the image file does not exist",
    "unreadable_image": "the image cannot be decoded (corrupt, truncated, not an image)",
    "image_too_small": "the shorter side is below data.min_image_side",
    "image_too_large": "the longer side is above data.max_image_side (checked before decoding)",
    "bad_aspect_ratio": "long/short side ratio above data.max_aspect_ratio",
    "unsupported_language": "the caption is not English, which the phrase model reads (data.caption_language)",
    "no_subject_phrase": "the caption has no visual subject phrase",
    "too_many_subjects": "the caption names more subjects than data.max_subjects",
    "no_detection": "no phrase got a box that passes the thresholds and the box rules",
    "non_finite_cache": "an encoder output has NaN/inf values (the detail names the columns), e.g. a float16 VAE",
    "poor_correspondence": "a subject got fewer than data.correspondence_min_points reference/target matches",
    "stage_error": "a stage raised on this record alone, or its sample did not fit the schema (stage \"write\"); the "
                   "detail names the exception",
}


def split_counts(samples_dir: str | Path) -> Counter[str]:
    """Rows per split of a built dataset's local samples folder, from the ``split`` column alone; a ConfigError
    when the folder holds no shard or something that is not a shard of ours (an empty or foreign folder)."""
    shards = sorted(Path(samples_dir).glob("*.parquet"))
    if not shards:
        raise ConfigError(f"'{samples_dir}' holds no Parquet shards: build the dataset with "
                          f"`python pipelines/build_dataset.py --output {Path(samples_dir).parent}`")
    counts: Counter[str] = Counter()
    for shard in shards:
        try:
            counts.update(pq.read_table(shard, columns=["split"])["split"].to_pylist())
        except (pa.ArrowException, OSError, KeyError) as exc:
            raise ConfigError(f"'{shard}' is not a shard of a built dataset ({' '.join(str(exc).split())[:200]})") \
                from None
    return counts


def disabled_columns(cfg: DataConfig) -> set[str]:
    return {col for switch, cols in CACHE_COLUMNS.items() if not getattr(cfg, switch) for col in cols}


def sample_schema(cfg: DataConfig) -> pa.Schema:
    """The samples table's schema: every column above except the caches the config switches off."""
    off = disabled_columns(cfg)
    return pa.schema([pa.field(name, tp) for name, tp in _SAMPLE_FIELDS if name not in off])


def pack_array(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def unpack_array(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_png(array: np.ndarray) -> bytes:
    """uint8 (H, W, 3) RGB or bool (H, W) mask as PNG bytes (masks as 1-bit PNG)."""
    image = Image.fromarray(array) if array.dtype != np.bool_ else Image.fromarray(array).convert("1")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Back to uint8 (H, W, 3) for images and crops, bool (H, W) for masks."""
    image = Image.open(io.BytesIO(data))
    if image.mode == "1":
        return np.asarray(image, dtype=np.bool_)
    return np.asarray(image.convert("RGB"))
