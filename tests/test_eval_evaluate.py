"""End to end on the tiny preset: a limited MS-Bench subset through Ray Data generation and scoring to the report,
two adapters side by side; the generation stage without Ray; the CLI's one-line errors."""

from __future__ import annotations

import re

import pandas as pd
import pytest
from PIL import Image

from mpalign.cli import run_cli
from mpalign.config import load_config
from mpalign.eval.benchmarks import expand_runs, load_benchmark
from mpalign.eval.metrics import METRICS
from mpalign.eval.stages import generate_rows
from mpalign.evaluate import FRESH_ADAPTER, adapter_columns, main, user_error_in
from mpalign.pipeline import MPAlignPipeline

TINY = ["--set", "eval.height=64", "--set", "eval.width=64", "--set", "eval.num_inference_steps=2",
        "--set", "eval.concurrency=1", "--set", "model.device=cpu"]


@pytest.fixture(scope="module")
def two_adapters(tmp_path_factory):
    """Two freshly initialised adapters of different seeds (pipelines and folders), saved the way training saves
    them; the two folders share a name, as two runs' ``adapter`` folders do."""
    root = tmp_path_factory.mktemp("adapters")
    pipes, folders = [], []
    for seed in (1, 2):
        pipes.append(MPAlignPipeline.from_config(load_config(overrides=[f"model.seed={seed}", "model.device=cpu"])))
        folders.append(str(root / f"seed{seed}" / "adapter"))
        pipes[-1].adapter.save_pretrained(folders[-1])
    return pipes, folders


def test_generation_stage_rows(shared_data, two_adapters, tmp_path):
    cfg = load_config(overrides=["model.device=cpu", f"eval.data_root={shared_data}", "eval.benchmark=dreambench",
                                 "eval.limit=1", "eval.images_per_prompt=2"])
    requests = expand_runs(load_benchmark(cfg.eval), [3])
    rows = generate_rows(two_adapters[0][0], requests, cfg, "mine", tmp_path)
    assert [(r["seed"], r["image_index"], r["adapter"]) for r in rows] == [(3, 0, "mine"), (3, 1, "mine")]
    assert rows[0]["references"] == requests[0]["references"]  # the scoring stage needs them
    with Image.open(rows[0]["image_path"]) as image:
        assert image.size == (cfg.eval.width, cfg.eval.height)


def test_adapter_columns(tmp_path):
    assert adapter_columns([]) == {FRESH_ADAPTER: None}
    for name in ("a/adapter", "b/adapter", "c/final"):
        (tmp_path / name).mkdir(parents=True)
        (tmp_path / name / "config.json").write_text("{}")
    folders = [str(tmp_path / n) for n in ("a/adapter", "b/adapter", "c/final")]
    assert list(adapter_columns(folders)) == ["a/adapter", "b/adapter", "final"]


def test_msbench_subset_two_adapters_side_by_side(shared_data, ray_local, two_adapters, tmp_path, capsys):
    """A limited MS-Bench run through Ray Data with two adapters: every score column, one report column each."""
    out = tmp_path / "eval"
    folders = two_adapters[1]
    code = main(["--benchmark", "msbench", "--out", str(out), "--limit", "3", "--seeds", "0,1", "--adapter", folders[0],
                 "--adapter", folders[1], "--set", f"eval.data_root={shared_data}", *TINY])
    assert code == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    scores = pd.read_parquet(out / "scores.parquet")
    names = ["seed1/adapter", "seed2/adapter"]
    assert sorted(scores["adapter"].unique()) == names
    assert len(scores) == 2 * 3 * 2  # adapters x prompts x seeds x 1 image
    expected_columns = {"adapter", "sample_id", "group", "prompt", "subjects", "phrases", "seed", "image_index",
                        "image_path", *METRICS, "clip_i_per_subject", "dino_per_subject", "region_dino_per_subject"}
    assert expected_columns <= set(scores.columns)
    assert set(pd.read_csv(out / "scores.csv").columns) == set(scores.columns)
    assert scores["group"].nunique() == 3  # a limit of 3 covers 3 combination types
    assert scores[list(METRICS)].notna().all().all()
    for row in scores.itertuples():
        assert row.m_dino == pytest.approx(float(pd.Series(row.region_dino_per_subject).clip(lower=0).prod()), rel=1e-5)
    per_adapter = scores.set_index(["adapter", "sample_id", "seed"]).sort_index()
    a, b = per_adapter.loc[names[0]], per_adapter.loc[names[1]]
    assert list(a.index) == list(b.index)
    # different adapters, same prompts and seeds: different images, hence different scores
    assert (a["clip_i"] - b["clip_i"]).abs().max() > 1e-6
    page = (out / "report.html").read_text()
    assert f"<th>{names[0]}</th><th>{names[1]}</th>" in page
    for text in ("CLIP-I", "CLIP-T", "DINO", "M-DINO", *scores["group"].unique()):
        assert text in page
    for src in re.findall(r"src='([^']+)'", page):
        assert (out / src).is_file()
    summary = pd.read_csv(out / "summary.csv")
    overall = summary[summary.level == "overall"]
    assert set(overall["adapter"]) == set(names) and set(overall["metric"]) == set(METRICS)
    assert (out / "config.yaml").is_file()


def test_cli_mistakes_are_one_line(tmp_path, capsys):
    assert run_cli(main, ["--adapter", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --adapter") and "\n" not in err
    assert run_cli(main, ["--seeds", "a,b", "--out", str(tmp_path)]) == 2
    assert "--seeds" in capsys.readouterr().err
    assert run_cli(main, ["--benchmark", str(tmp_path / "none.jsonl"), "--out", str(tmp_path)]) == 2
    assert "neither msbench nor dreambench" in capsys.readouterr().err


def test_user_errors_inside_actors_become_one_line():
    text = ("ray.exceptions.ActorDiedError: The actor died ...\n  File \"zoo.py\", line 56\n"
            "mpalign.zoo.ModelLoadError: cannot load the CLIP model from 'x': not cached\n  Get it with ...")
    assert user_error_in(RuntimeError(text)) == "cannot load the CLIP model from 'x': not cached"
    assert user_error_in(RuntimeError("ZeroDivisionError: division by zero")) is None
