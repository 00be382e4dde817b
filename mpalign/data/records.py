"""Reading raw input records (JSONL, Parquet, or a folder of images with ``.txt`` captions) into one flat form.

Every input record becomes exactly one output row, a sample or a reject, so this module never drops anything: a
record it cannot use is kept with ``reject_reason`` set. It also gives records their ids (from the input, else
derived from the content), their split, and their shard: shards are the unit of parallel writing and of resuming,
and keep all frames of a clip together so frame pairs can be assembled from one shard.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from mpalign.config import ConfigError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
IMAGE_FIELDS = ("image", "image_path", "path", "file")  # accepted names of the image column/field
CAPTION_FIELDS = ("caption", "text", "prompt")


def _digest(*parts: Any) -> str:
    h = hashlib.sha1()
    for part in parts:
        h.update(part if isinstance(part, bytes) else repr(part).encode())
    return h.hexdigest()


def derived_id(image_key: Any, caption: Any) -> str:
    """A stable id for records that have none: same image reference and caption, same id."""
    return "rec-" + _digest(image_key, caption)[:16]


def split_of(key: str, val_fraction: float, seed: int = 0) -> str:
    """"val" for a deterministic ``val_fraction`` of keys (a clip's frames share the key: no leakage across splits)."""
    bucket = int(_digest("split", seed, key)[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def _record(rid: str | None, image_path: str, image_bytes: bytes | None, caption: Any, video_id: Any = None,
            frame_idx: Any = None, reject: tuple[str, str] | None = None,
            annotations: tuple[list[str], list[list[float]]] | None = None) -> dict[str, Any]:
    return {"id": rid, "image_path": image_path, "image_bytes": image_bytes, "caption": caption,
            "video_id": video_id, "frame_idx": frame_idx,
            "annotated_phrases": annotations[0] if annotations else None,
            "annotated_boxes": annotations[1] if annotations else None,
            "reject_reason": reject[0] if reject else None, "reject_detail": reject[1] if reject else None,
            "reject_stage": "read" if reject else None}


def _from_mapping(raw: Any, base: Path, line: int) -> dict[str, Any]:
    """One JSON object / Parquet row → a record; malformed ones come back already rejected."""
    if not isinstance(raw, dict):
        return _record(None, "", None, "", reject=("bad_record", f"line {line}: not a JSON object"))
    image = next((raw[k] for k in IMAGE_FIELDS if raw.get(k) is not None), None)
    caption = next((raw[k] for k in CAPTION_FIELDS if k in raw), None)
    rid = raw.get("id")
    video_id, frame_idx = raw.get("video_id"), raw.get("frame_idx")
    image_path, image_bytes = "", None
    if isinstance(image, (bytes, bytearray)):
        image_bytes = bytes(image)
    elif isinstance(image, dict) and isinstance(image.get("bytes"), (bytes, bytearray)):  # HF datasets' Image()
        image_bytes = bytes(image["bytes"])
    elif isinstance(image, str) and image:
        image_path = str(Path(image) if Path(image).is_absolute() else base / image)
    problem = None
    if image_path == "" and image_bytes is None:
        problem = f"no image (expected one of the fields {', '.join(IMAGE_FIELDS)})"
    elif caption is not None and not isinstance(caption, str):
        problem = f"caption must be a string, got {type(caption).__name__}"
    elif rid is not None and not isinstance(rid, (str, int)):
        problem = f"id must be a string or integer, got {type(rid).__name__}"
    elif video_id is not None and not isinstance(video_id, (str, int)):
        problem = f"video_id must be a string or integer, got {type(video_id).__name__}"
    elif frame_idx is not None and (isinstance(frame_idx, bool) or not isinstance(frame_idx, int)):
        problem = f"frame_idx must be an integer, got {frame_idx!r}"
    annotations = None
    if problem is None and raw.get("objects") is not None:
        annotations, problem = _annotations(raw["objects"])
    if rid is None:
        rid = derived_id(image_path or _digest(image_bytes or b""), caption)
    record = _record(str(rid), image_path, image_bytes, caption if isinstance(caption, str) else "",
                     None if video_id is None else str(video_id), frame_idx if isinstance(frame_idx, int) else None,
                     annotations=annotations)
    if problem:
        record.update(reject_reason="bad_record", reject_detail=f"line {line}: {problem}", reject_stage="read")
    return record


def _annotations(objects: Any) -> tuple[tuple[list[str], list[list[float]]] | None, str | None]:
    """A record's ``objects`` (``[{"phrase": ..., "box": [x0, y0, x1, y1]}, ...]``, boxes normalised): the boxes the
    builder uses with ``data.boxes: annotations``. Returns (phrases, boxes) or the problem with them."""
    if not isinstance(objects, list):
        return None, f"objects must be a list, got {type(objects).__name__}"
    phrases, boxes = [], []
    for i, obj in enumerate(objects):
        box = obj.get("box") if isinstance(obj, dict) else None
        phrase = obj.get("phrase") if isinstance(obj, dict) else None
        if not isinstance(phrase, str) or not phrase.strip():
            return None, f"objects[{i}] needs a non-empty 'phrase'"
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                                 for v in box)):
            return None, f"objects[{i}].box must be [x0, y0, x1, y1]"
        if not (0 <= box[0] < box[2] <= 1 and 0 <= box[1] < box[3] <= 1):
            return None, f"objects[{i}].box {box} is not a normalised box (0 <= x0 < x1 <= 1, same for y)"
        phrases.append(phrase)
        boxes.append([float(v) for v in box])
    return (phrases, boxes), None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for line_no, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            rec = _record(derived_id("jsonl-line", line), "", None, "",
                          reject=("bad_record", f"line {line_no}: invalid JSON ({exc.msg})"))
            records.append(rec)
            continue
        records.append(_from_mapping(raw, path.parent, line_no))
    return records


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    records = []
    for file in files:
        for row_no, raw in enumerate(pq.read_table(file).to_pylist(), start=1):
            records.append(_from_mapping(raw, file.parent, row_no))
    return records


def _read_folder(path: Path) -> list[dict[str, Any]]:
    """Images anywhere under ``path``; the caption of ``x/y.jpg`` is ``x/y.txt`` (missing → empty caption)."""
    records = []
    for image in sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        caption_file = image.with_suffix(".txt")
        caption = caption_file.read_text(errors="replace").strip() if caption_file.exists() else ""
        rid = str(image.relative_to(path).with_suffix(""))
        records.append(_record(rid, str(image), None, caption))
    return records


def read_records(input_path: str | Path) -> list[dict[str, Any]]:
    """All records of an input, in input order, with ids; duplicates after the first are rejected."""
    path = Path(input_path)
    if not path.exists():
        raise ConfigError(f"input '{path}' does not exist (give a .jsonl / .parquet file or a folder of images)")
    if path.is_file() and path.suffix == ".jsonl":
        records = _read_jsonl(path)
    elif path.suffix == ".parquet" or (path.is_dir() and any(path.rglob("*.parquet"))):
        records = _read_parquet(path)
    elif path.is_dir():
        records = _read_folder(path)
    else:
        raise ConfigError(f"input '{path}' is neither a .jsonl / .parquet file nor a folder of images")
    seen: set[str] = set()
    for record in records:
        if record["id"] in seen and record["reject_reason"] is None:
            record.update(reject_reason="duplicate_id", reject_detail=f"id '{record['id']}' appeared before",
                          reject_stage="read")
        seen.add(record["id"])
    # rejected duplicates still need unique ids in the output
    counts: dict[str, int] = {}
    for record in records:
        if record["reject_reason"] == "duplicate_id":
            counts[record["id"]] = counts.get(record["id"], 0) + 1
            record["id"] = f"{record['id']}#dup{counts[record['id']]}"
    return records


def assign_shards(records: list[dict[str, Any]], rows_per_shard: int) -> list[list[dict[str, Any]]]:
    """Consecutive groups of about ``rows_per_shard`` records, never splitting a clip (all frames of a
    ``video_id`` land in the shard of its first frame). Deterministic in the input order."""
    units: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        key = f"video:{record['video_id']}" if record["video_id"] is not None and not record["reject_reason"] \
            else f"record:{record['id']}"
        units.setdefault(key, []).append(record)
    shards: list[list[dict[str, Any]]] = [[]]
    for unit in units.values():
        if shards[-1] and len(shards[-1]) + len(unit) > rows_per_shard:
            shards.append([])
        shards[-1].extend(unit)
    return [s for s in shards if s]


def fingerprint(records: list[dict[str, Any]], settings: dict[str, Any]) -> str:
    """What the output depends on: every record and the data/model settings. Resuming requires it unchanged."""
    h = hashlib.sha256()
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for r in records:
        h.update(json.dumps([r["id"], r["image_path"], r["caption"], r["video_id"], r["frame_idx"],
                             r["reject_reason"], r.get("annotated_phrases"), r.get("annotated_boxes")]).encode())
        if r["image_bytes"] is not None:
            h.update(hashlib.sha1(r["image_bytes"]).digest())
    return h.hexdigest()
