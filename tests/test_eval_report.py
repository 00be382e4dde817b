"""The report from constructed scores: tables with one column per adapter, image grid, CSV and Parquet."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest
from PIL import Image

from mpalign.eval.benchmarks import BenchmarkSample
from mpalign.eval.metrics import METRICS
from mpalign.eval.report import draw_layout, metric_table, write_report


@pytest.fixture()
def evaluated(tmp_path):
    ref = tmp_path / "ref.png"
    Image.new("RGB", (40, 30), "blue").save(ref)
    samples = [
        BenchmarkSample(f"s{i}", "toy", group, f"a dog and a cat {i}", ["dog", "cat"], ["dog", "cat"],
                        [[0, 0.25, 0.5, 0.75], [0.5, 0.25, 1, 0.75]], [[str(ref)], [str(ref)]])
        for i, group in enumerate(["pair", "pair", "other"])
    ]
    rows = []
    for adapter, base in (("alpha", 0.5), ("beta", 0.25)):
        (tmp_path / "images" / adapter).mkdir(parents=True)
        for i, sample in enumerate(samples):
            for seed in (0, 1):
                path = tmp_path / "images" / adapter / f"{sample.sample_id}-{seed}.png"
                Image.new("RGB", (64, 64), "gray").save(path)
                rows.append({"sample_id": sample.sample_id, "group": sample.group, "prompt": sample.prompt,
                             "adapter": adapter, "seed": seed, "image_index": 0, "image_path": str(path),
                             "clip_i": base + 0.1 * i, "clip_t": base, "dino": base + seed, "m_dino": base * base,
                             "region_dino_per_subject": [base, base]})
    return tmp_path, samples, pd.DataFrame(rows)


def test_metric_tables_have_one_column_per_adapter(evaluated):
    _, _, scores = evaluated
    overall = metric_table(scores, ["beta", "alpha"], by=None)
    assert list(overall.columns) == ["beta", "alpha"]
    assert overall.loc["clip_i", "alpha"] == pytest.approx(0.6)  # mean of 0.5, 0.6, 0.7 over two seeds each
    assert overall.loc["images", "beta"] == 6
    groups = metric_table(scores, ["alpha", "beta"], by="group")
    assert groups.loc[("clip_i", "pair"), "alpha"] == pytest.approx(0.55)
    assert groups.loc[("dino", "other"), "beta"] == pytest.approx(0.75)


def test_write_report(evaluated):
    out, samples, scores = evaluated
    report = write_report(out, scores, samples, {"alpha": "/runs/a", "beta": "/runs/b"}, title="toy eval",
                          settings={"steps": 2}, grid_samples=2)
    page = report.read_text()
    for name in ("alpha", "beta", "/runs/a", "CLIP-I", "CLIP-T", "DINO", "M-DINO", "pair", "other"):
        assert name in page
    assert "<th>alpha</th><th>beta</th>" in page
    assert "<b>0.6000</b>" in page  # alpha beats beta on CLIP-I
    assert page.count("-layout.png") == 2  # grid limited to grid_samples
    for src in re.findall(r"src='([^']+)'", page):
        assert (out / src).is_file(), src
    csv = pd.read_csv(out / "scores.csv")
    parquet = pd.read_parquet(out / "scores.parquet")
    for frame in (csv, parquet):
        assert set(METRICS) | {"adapter", "sample_id", "seed", "group"} <= set(frame.columns)
        assert len(frame) == len(scores)
    assert json.loads(csv["region_dino_per_subject"][0]) == [0.5, 0.5]
    summary = pd.read_csv(out / "summary.csv")
    assert set(summary["level"]) == {"overall", "group", "sample"}
    row = summary[(summary.level == "overall") & (summary.adapter == "beta") & (summary.metric == "m_dino")]
    assert row["value"].item() == pytest.approx(0.0625) and row["images"].item() == 6


def test_layout_draws_each_box():
    sample = BenchmarkSample("s", "b", "g", "p", ["a", "b"], ["dog", "cat"],
                             [[0, 0.25, 0.5, 0.75], [0.5, 0.25, 1, 0.75]], [["x"], ["y"]])
    layout = draw_layout(sample, size=64)
    assert layout.getpixel((0, 32)) != (255, 255, 255)  # left edge of the first box
    assert layout.getpixel((63, 32)) != (255, 255, 255)  # right edge of the second
    assert layout.getpixel((32, 2)) == (255, 255, 255)  # above both boxes
