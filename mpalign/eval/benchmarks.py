"""Benchmark definitions, read from files: MS-Bench, DreamBench, or a user's own JSON/JSONL.

Nothing about a benchmark is written in code: MS-Bench's combination types, preset boxes and prompt templates come from
``msbench/msbench_meta.json`` and its combinations from ``msbench/combinations.json``; DreamBench's subjects and prompt
templates from ``dreambench/subjects.csv`` and ``dreambench/prompts.json`` (all under ``eval.data_root``, see
``/work/shared/data/README.md`` for where they come from).

A :class:`BenchmarkSample` is one prompt with its subjects. Each subject has one or more reference images: the first
conditions the generation, all of them are scored against (DreamBench has two images per subject here, MS-Bench one).
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from itertools import zip_longest
from pathlib import Path
from typing import Any

from mpalign.cli import UserInputError
from mpalign.config import REPO_ROOT, EvalConfig

log = logging.getLogger(__name__)

BUILTIN_BENCHMARKS = ("msbench", "dreambench", "toy")
DREAMBENCH_BOX = [0.25, 0.25, 0.75, 0.75]  # MS-Diffusion sec. 4.1: every DreamBench input box is preset to this


@dataclass(frozen=True)
class BenchmarkSample:
    sample_id: str
    benchmark: str
    group: str  # what per-type tables aggregate by: the MS-Bench combination type, DreamBench's live/object
    prompt: str
    subjects: list[str]
    phrases: list[str]
    boxes: list[list[float]]  # normalised x0, y0, x1, y1, one per subject
    references: list[list[str]]  # per subject: absolute image paths; [0] conditions the generation

    def to_row(self) -> dict[str, Any]:
        return asdict(self)


def data_root(cfg: EvalConfig) -> Path:
    """``eval.data_root``, else ``$MPALIGN_SHARED_DATA``, else ``<repo>/../shared/data``."""
    if cfg.data_root:
        return Path(cfg.data_root)
    return Path(os.environ.get("MPALIGN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def load_benchmark(cfg: EvalConfig) -> list[BenchmarkSample]:
    """The samples of ``cfg.benchmark`` (``msbench``, ``dreambench`` or a JSON/JSONL file), at most ``cfg.limit``
    (0 = all) taken round-robin over groups so that a small limit still covers every combination type."""
    if cfg.benchmark == "toy":  # made, not read: held-out identities of the toy world (mpalign.toy.benchmark)
        from mpalign.toy.benchmark import toy_samples

        samples, interleave_by = toy_samples(Path(cfg.output_dir) / "toy-references"), _by_group
    elif cfg.benchmark in BUILTIN_BENCHMARKS:
        root = data_root(cfg)
        if not (root / cfg.benchmark).is_dir():
            raise UserInputError(f"benchmark data '{root / cfg.benchmark}' not found: set eval.data_root or "
                                 f"MPALIGN_SHARED_DATA to the folder that holds msbench/ and dreambench/")
        if cfg.benchmark == "msbench":
            samples, interleave_by = msbench_samples(root / "msbench"), _by_group
        else:  # DreamBench has two groups only (live, object): interleave subjects instead
            samples, interleave_by = dreambench_samples(root / "dreambench"), _by_subject
    else:
        samples, interleave_by = file_samples(Path(cfg.benchmark)), _by_group
    if cfg.limit < 0:
        raise UserInputError(f"eval.limit must be >= 0 (0 = every sample), got {cfg.limit}")
    samples = round_robin(samples, interleave_by)
    return samples[: cfg.limit] if cfg.limit else samples


def _by_group(sample: BenchmarkSample) -> str:
    return sample.group


def _by_subject(sample: BenchmarkSample) -> str:
    return sample.subjects[0]


def round_robin(samples: list[BenchmarkSample], key: Callable[[BenchmarkSample], str]) -> list[BenchmarkSample]:
    """First sample of each group, then the second of each, ...; groups in order of first appearance."""
    groups: dict[str, list[BenchmarkSample]] = {}
    for sample in samples:
        groups.setdefault(key(sample), []).append(sample)
    return [s for layer in zip_longest(*groups.values()) for s in layer if s is not None]


def _read_json(path: Path) -> Any:
    if not path.is_file():
        raise UserInputError(f"benchmark file '{path}' not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserInputError(f"benchmark file '{path}' is not valid JSON: {exc}") from None


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise UserInputError(f"benchmark file '{path}' not found")
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------------------------------
# MS-Bench
# --------------------------------------------------------------------------------------------------------------------


def msbench_samples(folder: Path) -> list[BenchmarkSample]:
    """Every combination × every prompt template of its type (4488 samples when all images are present); a
    combination whose subject image is missing (``cat1`` in the shared copy) is skipped and counted in the log."""
    meta = _read_json(folder / "msbench_meta.json")
    combinations = _read_json(folder / "combinations.json")["combinations"]
    files = {row["subject_name"]: row["file"] for row in _read_csv(folder / "subjects.csv")}
    templates: dict[str, list[str]] = meta["subject_combination_prompts"]
    samples: list[BenchmarkSample] = []
    skipped: dict[str, int] = {}
    for index, combo in enumerate(combinations):
        paths = [folder / files[name] if files.get(name) else None for name in combo["subjects"]]
        missing = [name for name, p in zip(combo["subjects"], paths) if p is None or not p.is_file()]
        if missing:
            for name in missing:
                skipped[name] = skipped.get(name, 0) + 1
            continue
        kind = combo["combination_type"]
        for t, template in enumerate(templates[kind]):
            samples.append(BenchmarkSample(
                sample_id=f"msbench-{index:04d}-p{t}", benchmark="msbench", group=kind,
                prompt=template.format(*combo["phrases"]), subjects=list(combo["subjects"]),
                phrases=list(combo["phrases"]), boxes=[list(map(float, b)) for b in combo["boxes"]],
                references=[[str(p)] for p in paths],
            ))
    if skipped:
        log.warning("MS-Bench: skipped %d of %d combinations whose subject image is missing (%s)",
                    sum(skipped.values()), len(combinations),
                    ", ".join(f"{name}: {count}" for name, count in sorted(skipped.items())))
    return samples


# --------------------------------------------------------------------------------------------------------------------
# DreamBench
# --------------------------------------------------------------------------------------------------------------------


def dreambench_samples(folder: Path) -> list[BenchmarkSample]:
    """30 subjects × their 25 templates (live or object), single subject in the preset box. Zero-shot methods use no
    unique token, so the ``{0}`` slot is left empty: "a {0} {1} in the snow" -> "a dog in the snow"."""
    prompts = _read_json(folder / "prompts.json")
    samples: list[BenchmarkSample] = []
    skipped = 0
    for row in _read_csv(folder / "subjects.csv"):
        name, cls, kind = row["subject_name"], row["class_name"], row["live_or_object"]
        paths = [folder / f for f in row["files"].split(";") if f and (folder / f).is_file()]
        if not paths:
            skipped += 1
            continue
        templates = prompts["live_subject_prompts" if kind == "live" else "object_prompts"]
        for t, template in enumerate(templates):
            samples.append(BenchmarkSample(
                sample_id=f"dreambench-{name}-p{t:02d}", benchmark="dreambench", group=kind,
                prompt=re.sub(r"\s+", " ", template.format("", cls)).strip(), subjects=[name], phrases=[cls],
                boxes=[list(DREAMBENCH_BOX)], references=[[str(p) for p in paths]],
            ))
    if skipped:
        log.warning("DreamBench: skipped %d subjects without images", skipped)
    return samples


# --------------------------------------------------------------------------------------------------------------------
# A user's file
# --------------------------------------------------------------------------------------------------------------------


def file_samples(path: Path) -> list[BenchmarkSample]:
    """A JSONL file (one sample a line) or a JSON file (a list of samples, or ``{"samples": [...]}``). A sample::

        {"prompt": "a dog and a cat on the beach", "subject_images": ["dog.jpg", "cat.jpg"],
         "boxes": [[0, 0.25, 0.5, 0.75], [0.5, 0.25, 1, 0.75]], "phrases": ["dog", "cat"],
         "id": "optional", "group": "optional, what the per-group tables aggregate by"}

    Image paths are relative to the file (absolute paths work too); an entry of ``subject_images`` may itself be a
    list: its first image conditions the generation, all are scored against."""
    if not path.is_file():
        raise UserInputError(f"--benchmark is neither {' nor '.join(BUILTIN_BENCHMARKS)} nor an existing file: '{path}'")
    if path.suffix == ".jsonl":
        entries: list[Any] = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserInputError(f"{path}:{n} is not valid JSON: {exc}") from None
    else:
        data = _read_json(path)
        entries = data.get("samples") if isinstance(data, dict) else data
        if not isinstance(entries, list):
            raise UserInputError(f"{path} must hold a list of samples or {{\"samples\": [...]}}")
    return [_file_sample(entry, path, n) for n, entry in enumerate(entries, 1)]


def _file_sample(entry: Any, path: Path, n: int) -> BenchmarkSample:
    where = f"{path} sample {n}"
    if not isinstance(entry, dict):
        raise UserInputError(f"{where} must be an object with prompt, subject_images, boxes, phrases")
    missing = [k for k in ("prompt", "subject_images", "boxes", "phrases") if k not in entry]
    if missing:
        raise UserInputError(f"{where} lacks {', '.join(missing)}")
    images, boxes, phrases = entry["subject_images"], entry["boxes"], entry["phrases"]
    if not (isinstance(images, list) and isinstance(boxes, list) and isinstance(phrases, list)) or not images:
        raise UserInputError(f"{where}: subject_images, boxes and phrases must be non-empty lists")
    if not len(images) == len(boxes) == len(phrases):
        raise UserInputError(f"{where}: {len(images)} subject_images, {len(boxes)} boxes and {len(phrases)} phrases; "
                             f"one of each per subject")
    references = []
    for item in images:
        paths = [Path(p) if Path(p).is_absolute() else path.parent / p for p in (item if isinstance(item, list) else [item])]
        absent = [str(p) for p in paths if not p.is_file()]
        if absent or not paths:
            raise UserInputError(f"{where}: subject image '{absent[0] if absent else item}' not found")
        references.append([str(p) for p in paths])
    return BenchmarkSample(
        sample_id=str(entry.get("id", f"{path.stem}-{n:04d}")), benchmark=path.stem,
        group=str(entry.get("group", f"{len(images)}-subject")), prompt=str(entry["prompt"]),
        subjects=[Path(r[0]).stem for r in references], phrases=[str(p) for p in phrases],
        boxes=[validate_box(b, f"{where} box {i + 1}") for i, b in enumerate(boxes)], references=references,
    )


def validate_box(box: Any, where: str) -> list[float]:
    """A normalised ``[x0, y0, x1, y1]`` inside [0, 1] with x0 < x1 and y0 < y1."""
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box):
        raise UserInputError(f"{where} must be [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0.0 <= x0 < x1 <= 1.0 and 0.0 <= y0 < y1 <= 1.0):
        raise UserInputError(f"{where} must lie in [0, 1] with x0 < x1 and y0 < y1, got {list(box)}")
    return [x0, y0, x1, y1]


def expand_runs(samples: Iterable[BenchmarkSample], seeds: list[int]) -> list[dict[str, Any]]:
    """One generation request per (sample, seed): the rows the generation stage reads."""
    return [{**sample.to_row(), "seed": int(seed)} for sample in samples for seed in seeds]
