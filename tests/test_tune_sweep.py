"""Sweeps on Ray Tune over the tiny preset: one row per trial with the fidelity objective, the diffusion loss and the
evaluation's cost share, early stopping on the fidelity objective marked, a best config that trains as is, and a
restored sweep that does not rerun finished trials."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest
from train_support import tiny_dataset, train_config

from mpalign.config import load_config
from mpalign.sweep import BEST_YAML, PLOT_PNG, run_sweep

pytestmark = pytest.mark.slow

MAX_STEPS = 4
# Two trials (each starts its own Ray Train run: most of this module's time). Grid order is list order; the second
# trial scores a worse DINO at the first validation than the first on the tiny preset (computation on CPU is
# deterministic), so ASHA (grace 1, reduction 2) stops it. alpha 1.0, not the default 0.01: the best config must carry
# the trial's alpha, not the base config's.
ALPHAS = [1.0]
LAYER_SETS = ["down+mid+up", "down+mid"]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, ray_local):
    dataset = tiny_dataset(tmp_path_factory)
    out = tmp_path_factory.mktemp("sweep")
    cfg = train_config(dataset, out / "unused", f"train.max_steps={MAX_STEPS}", "train.val_every=1",
                       "train.val_batches=1", f"tune.output_dir={out}", f"tune.alphas={ALPHAS}",
                       f"tune.layer_sets=[{','.join(LAYER_SETS)}]", "tune.scheduler=asha", "tune.grace_period=1",
                       "tune.reduction_factor=2", "tune.max_concurrent_trials=1", "tune.metric=dino",
                       "tune.eval_samples=2", "tune.eval_steps=2")
    return cfg, run_sweep(cfg)


def trial_dirs(out: Path) -> list[Path]:
    return sorted(p for p in (out / "trials").iterdir() if p.is_dir())


def test_a_row_per_trial_with_alpha_layer_set_and_objective(sweep):
    cfg, outcome = sweep
    with Path(outcome.results_csv).open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == len(ALPHAS) * len(LAYER_SETS)
    assert {(float(r["alpha"]), r["layer_set"]) for r in rows} == {(a, s) for a in ALPHAS for s in LAYER_SETS}
    for row in rows:
        assert row["status"] == "finished" and row["metric"] == "dino"
        assert row["objective"] == row["dino"] and -1 <= float(row["objective"]) <= 1
        assert math.isfinite(float(row["diffusion"])) and float(row["diffusion"]) > 0
        assert all(-1 <= float(row[name]) <= 1 for name in ("m_dino", "clip_i", "clip_t"))
        assert 0 < float(row["eval_share"]) < 1 and float(row["eval_seconds"]) > 0
        assert row["below_clip_t_floor"] == "False"
        assert 1 <= int(row["step"]) <= MAX_STEPS
    plot_png = Path(outcome.plot_png)
    assert plot_png.name == PLOT_PNG and plot_png.stat().st_size > 1000
    assert len(trial_dirs(Path(cfg.tune.output_dir))) == len(rows)


def test_early_stopped_trials_are_marked(sweep):
    _, outcome = sweep
    for row in outcome.rows:
        assert row["early_stopped"] == (row["step"] < MAX_STEPS)
    assert any(row["early_stopped"] for row in outcome.rows), "ASHA stopped no trial"
    assert any(not row["early_stopped"] for row in outcome.rows)


def test_best_config_trains_with_mpalign_train_as_is(sweep):
    from mpalign.train import run_training

    _, outcome = sweep
    best = outcome.best
    assert not best["early_stopped"]
    assert best["objective"] == max(r["objective"] for r in outcome.rows if not r["early_stopped"])  # DINO: higher
    best_cfg = load_config(outcome.best_yaml)
    assert Path(outcome.best_yaml).name == BEST_YAML
    assert best_cfg.train.alpha == best["alpha"]
    assert "+".join(best_cfg.model.align_blocks) == best["layer_set"]
    result = run_training(best_cfg)
    assert result.metrics["step"] == MAX_STEPS
    assert (Path(result.adapter_dir) / "config.json").is_file()


def test_a_restored_sweep_does_not_rerun_finished_trials(sweep):
    cfg, outcome = sweep
    out = Path(cfg.tune.output_dir)

    def footprint() -> dict[str, tuple[int, int]]:
        """Per trial: TensorBoard event files (each training start opens one) and checkpoints."""
        return {d.name: (len(list((d / "tensorboard").glob("events.*"))), len(list((d / "run").glob("checkpoint_2*"))))
                for d in trial_dirs(out)}

    before = footprint()
    restored = run_sweep(cfg, resume=True)
    assert footprint() == before
    assert [(r["alpha"], r["layer_set"], r["objective"], r["step"]) for r in restored.rows] == [
        (r["alpha"], r["layer_set"], r["objective"], r["step"]) for r in outcome.rows]
