"""Benchmark definitions come from the files in the shared data folder (or a user's file), never from code."""

from __future__ import annotations

import json
import logging
from collections import Counter

import pytest
from PIL import Image

from mpalign.cli import UserInputError
from mpalign.config import EvalConfig
from mpalign.eval.benchmarks import DREAMBENCH_BOX, expand_runs, load_benchmark


def test_msbench_from_its_files(shared_data, caplog):
    meta = json.loads((shared_data / "msbench/msbench_meta.json").read_text())
    combos = json.loads((shared_data / "msbench/combinations.json").read_text())["combinations"]
    present = {p.stem for p in (shared_data / "msbench/images").rglob("*.jpg")}
    kept = [c for c in combos if set(c["subjects"]) <= present]
    with caplog.at_level(logging.WARNING, logger="mpalign.eval.benchmarks"):
        samples = load_benchmark(EvalConfig(benchmark="msbench", data_root=str(shared_data), limit=0))
    types = meta["two_subject_combinations"] + meta["three_subject_combinations"]
    assert len(types) == 13 and {s.group for s in samples} == set(types)
    expected = Counter()
    for c in kept:
        expected[c["combination_type"]] += len(meta["subject_combination_prompts"][c["combination_type"]])
    assert Counter(s.group for s in samples) == expected
    if len(kept) < len(combos):  # the shared copy lacks cat1: skipped and counted, not an error
        assert f"skipped {len(combos) - len(kept)} of {len(combos)} combinations" in caplog.text
    for s in samples[:50]:
        assert s.boxes == meta["subject_combination_boxes"][s.group]
        assert len(s.references) == len(s.phrases) == len(s.boxes) and all(len(r) == 1 for r in s.references)
        assert "{" not in s.prompt and all(p in s.prompt for p in s.phrases)
    assert len({s.sample_id for s in samples}) == len(samples)


def test_msbench_limit_spreads_over_combination_types(shared_data):
    samples = load_benchmark(EvalConfig(benchmark="msbench", data_root=str(shared_data), limit=16))
    assert len(samples) == 16
    assert len({s.group for s in samples[:13]}) == 13  # the first 13 are one of each type


def test_dreambench_subjects_times_templates(shared_data):
    prompts = json.loads((shared_data / "dreambench/prompts.json").read_text())
    samples = load_benchmark(EvalConfig(benchmark="dreambench", data_root=str(shared_data), limit=0))
    subjects = {s.subjects[0] for s in samples}
    assert len(samples) == len(subjects) * len(prompts["object_prompts"])
    assert all(s.boxes == [DREAMBENCH_BOX] for s in samples)
    dog = [s for s in samples if s.subjects == ["dog"]]
    assert {s.group for s in dog} == {"live"} and dog[0].phrases == ["dog"]
    assert dog[0].prompt == prompts["live_subject_prompts"][0].format("", "dog").replace("  ", " ")
    assert all(len(s.references[0]) >= 1 for s in samples)
    first = load_benchmark(EvalConfig(benchmark="dreambench", data_root=str(shared_data), limit=5))
    assert len({s.subjects[0] for s in first}) == 5


def test_missing_benchmark_folder_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_benchmark(EvalConfig(benchmark="msbench", data_root=str(tmp_path)))
    with pytest.raises(UserInputError, match="neither"):
        load_benchmark(EvalConfig(benchmark=str(tmp_path / "nope.jsonl")))


def _write_images(folder, names):
    for name in names:
        Image.new("RGB", (16, 16), "red").save(folder / name)


def test_user_jsonl_file(tmp_path):
    _write_images(tmp_path, ["dog.png", "cat.png", "cat2.png"])
    lines = [
        {"prompt": "a dog and a cat", "subject_images": ["dog.png", ["cat.png", "cat2.png"]],
         "boxes": [[0, 0.25, 0.5, 0.75], [0.5, 0.25, 1, 0.75]], "phrases": ["dog", "cat"], "group": "pets"},
        {"prompt": "a dog", "subject_images": [str(tmp_path / "dog.png")], "boxes": [[0.25, 0.25, 0.75, 0.75]],
         "phrases": ["dog"], "id": "solo"},
    ]
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    samples = load_benchmark(EvalConfig(benchmark=str(path), limit=0))
    assert [s.sample_id for s in samples] == ["mine-0001", "solo"]
    assert samples[0].references == [[str(tmp_path / "dog.png")], [str(tmp_path / "cat.png"), str(tmp_path / "cat2.png")]]
    assert samples[0].group == "pets" and samples[1].group == "1-subject"
    runs = expand_runs(samples, [0, 3])
    assert [(r["sample_id"], r["seed"]) for r in runs] == [("mine-0001", 0), ("mine-0001", 3), ("solo", 0), ("solo", 3)]
    (tmp_path / "mine.json").write_text(json.dumps({"samples": lines}))
    assert len(load_benchmark(EvalConfig(benchmark=str(tmp_path / "mine.json"), limit=1))) == 1


@pytest.mark.parametrize("change, message", [
    ({"boxes": [[0.5, 0.2, 0.4, 0.9]]}, "x0 < x1"),
    ({"boxes": [[0, 0, 1.5, 1]]}, r"\[0, 1\]"),
    ({"boxes": [[0, 0, 1]]}, r"\[x0, y0, x1, y1\]"),
    ({"subject_images": ["missing.png"]}, "not found"),
    ({"phrases": ["dog", "cat"]}, "one of each per subject"),
    ({"prompt": None, "phrases": None}, None),
])
def test_user_file_mistakes_are_named(tmp_path, change, message):
    _write_images(tmp_path, ["dog.png"])
    entry = {"prompt": "a dog", "subject_images": ["dog.png"], "boxes": [[0.25, 0.25, 0.75, 0.75]], "phrases": ["dog"]}
    entry.update(change)
    if message is None:  # keys absent altogether
        entry = {k: v for k, v in entry.items() if v is not None}
        message = "lacks prompt, phrases"
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(entry) + "\n")
    with pytest.raises(UserInputError, match=message):
        load_benchmark(EvalConfig(benchmark=str(path)))
