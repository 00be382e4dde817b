"""The sweep's search space, objective and per-trial settings, without running training."""

from __future__ import annotations

import math

import pytest

from mpalign.config import ConfigError, load_config
from mpalign.eval.fidelity import objective
from mpalign.sweep import (
    _scheduler,
    _search_algorithm,
    apply_params,
    best_row,
    check_tune_config,
    expected_trials,
    grace_period,
    grid_points,
    search_space,
    trial_params,
    trial_training_config,
)


def test_trial_parameters_reach_the_training_config(tmp_path):
    cfg = load_config(overrides=["train.val_every=3", "train.checkpoint_every=4", "tune.gpus_per_trial=0.5",
                                 "tune.cpus_per_trial=2", "train.num_workers=2"])
    params = {"alpha": 0.03, "layer_set": "down+mid+up", "lambda_self": 0.5, "loss_extras": "attn+disentangle",
              "seed": 7}
    trial = trial_training_config(cfg, params, str(tmp_path))
    assert trial.train.alpha == 0.03 and trial.model.align_blocks == ["down", "mid", "up"]
    assert trial.train.lambda_self == 0.5 and trial.train.seed == 7
    assert trial.train.attn_loss_weight == cfg.tune.attn_loss_weight > 0
    assert trial.train.disentangle_weight == cfg.tune.disentangle_weight > 0
    assert trial.train.log_every == 3 and trial.train.checkpoint_every == 6  # every report carries the objective
    assert trial.train.use_gpu and trial.train.gpus_per_worker == 0.25 and trial.train.cpus_per_worker == 1.0
    plain = apply_params(cfg, {**params, "loss_extras": "none"})
    assert plain.train.attn_loss_weight == 0.0 and plain.train.disentangle_weight == 0.0


@pytest.mark.parametrize("override, message", [
    ("tune.layer_sets=[down+side]", "tune.layer_sets entry 'down+side'"),
    ("tune.loss_extras=[dropout]", "tune.loss_extras entry 'dropout'"),
    ("tune.scheduler=pbt", "tune.scheduler must be"),
    ("train.val_every=0", "train.val_every >= 1"),
    ("tune.metric=objective", "tune.metric must be one of"),
    ("tune.metric=sharpness", "tune.metric must be one of"),
    ("tune.search=bayes", "tune.search must be one of"),
    ("tune.seeds=[]", "tune.seeds is empty"),
    ("tune.eval_samples=0", "set tune.eval_samples >= 1"),
])
def test_bad_sweep_settings_are_config_errors(override, message):
    cfg = load_config(overrides=["train.val_every=5", override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")):
        check_tune_config(cfg)


def test_alpha_zero_runs_once_per_seed():
    """alpha = 0 taps nothing: with configs/sdxl.yaml's grid (6 alphas x 4 layer sets) 3 of its 24 trials repeat the
    first; with two seeds each seed keeps its own alpha = 0 run. Extras that read the tapped blocks' attention maps
    keep one alpha = 0 trial per layer set."""
    cfg = load_config("configs/sdxl.yaml", ["tune.seeds=[0,1]"])
    points = grid_points(cfg)
    assert len(points) == 2 * (5 * 4 + 1) == expected_trials(cfg)
    zero = [p for p in points if p["alpha"] == 0]
    assert [(p["layer_set"], p["seed"]) for p in zero] == [("down", 0), ("down", 1)]
    assert len({tuple(sorted(p.items())) for p in points}) == len(points)
    extras = load_config("configs/sdxl.yaml", ["tune.loss_extras=[none,attn]"])
    assert len([p for p in grid_points(extras) if p["alpha"] == 0]) == 1 + 4
    params = trial_params({"point": points[0]}, cfg)
    assert math.isnan(params.pop("beta")) and params == points[0]  # beta is MOSAIC's: nan for ms_adapter


def test_first_rung_comes_after_the_warm_up():
    """configs/sdxl.yaml: warm-up 2000 = val_every, so validation 1 is the same model in every trial of a seed."""
    cfg = load_config("configs/sdxl.yaml", ["tune.grace_period=1", "train.max_steps=20000"])
    assert grace_period(cfg) == 2
    rungs = [milestone for milestone, _ in _scheduler(cfg)._brackets[0]._rungs]
    assert min(rungs) == 2
    later = load_config("configs/sdxl.yaml", ["tune.grace_period=1", "train.warmup_steps=5000"])
    assert grace_period(later) == 3  # validations at 2000 and 4000 are inside the warm-up
    assert grace_period(load_config("configs/sdxl.yaml", ["tune.grace_period=4"])) == 4


def test_the_chosen_metric_is_the_objective():
    metrics = {"val_diffusion": 0.8, "eval_dino": 0.4, "eval_m_dino": 0.1, "eval_clip_i": 0.6, "eval_clip_t": 0.3}
    assert objective(metrics, "dino", None) == 0.4
    assert objective(metrics, "m_dino", None) == 0.1
    assert objective(metrics, "clip_i", None) == 0.6
    assert objective(metrics, "diffusion", None) == 0.8


def test_clip_t_floor_ranks_a_prompt_ignoring_trial_last():
    low = {"val_diffusion": 0.8, "eval_dino": 0.9, "eval_clip_t": 0.1}
    high = {"val_diffusion": 0.9, "eval_dino": 0.5, "eval_clip_t": 0.3}
    assert objective(low, "dino", 0.2) == -math.inf  # best DINO, but it ignores the prompt
    assert objective(high, "dino", 0.2) == 0.5
    assert objective(low, "diffusion", 0.2) == math.inf
    assert objective(low, "dino", None) == 0.9

    def row(alpha, value, below, seed=0):  # beta: MOSAIC's, nan (a new object per row, as trial_params makes them)
        return {"alpha": alpha, "beta": float("nan"), "layer_set": "down+mid", "lambda_self": 1.0,
                "loss_extras": "none", "seed": seed, "objective": value, "below_clip_t_floor": below,
                "status": "finished", "early_stopped": False}

    rows = [row(0.1, 0.9, True), row(0.01, 0.5, False), row(0.01, 0.7, False, seed=1), row(0.0, 0.55, False)]
    best = best_row(rows, "max")
    assert best["alpha"] == 0.01 and best["objective"] == pytest.approx(0.6) and best["seeds"] == 2  # mean of seeds


@pytest.mark.slow
def test_optuna_searches_log_alpha(ray_local, tmp_path):
    """Optuna's TPE through Ray Tune's integration proposes alphas inside [alpha_min, alpha_max] and the listed
    layer sets; a cheap function stands in for training (the sweep test runs the real trainable)."""
    pytest.importorskip("optuna", reason="Optuna is in the dev extra: pip install 'mpalign[optuna]'")
    from ray import tune

    cfg = load_config(overrides=["tune.search=optuna", "tune.alpha_min=1e-4", "tune.alpha_max=1e-1",
                                 "tune.num_samples=4"])
    check_tune_config(cfg)
    assert expected_trials(cfg) == 4

    def trainable(config):
        return {"objective": -abs(math.log10(config["alpha"]) + 2)}

    grid = tune.Tuner(tune.with_resources(trainable, {"CPU": 0.01}), param_space=search_space(cfg),
                      tune_config=tune.TuneConfig(metric="objective", mode="max", search_alg=_search_algorithm(cfg),
                                                  num_samples=cfg.tune.num_samples),
                      run_config=tune.RunConfig(storage_path=str(tmp_path), verbose=0)).fit()
    params = [trial_params(r.config, cfg) for r in grid]
    assert len(params) == 4
    assert all(1e-4 <= p["alpha"] <= 1e-1 and p["layer_set"] in cfg.tune.layer_sets for p in params)
    assert len({p["alpha"] for p in params}) == 4 and all(p["seed"] == 0 for p in params)


def test_each_ended_trial_is_one_console_line(tmp_path, caplog):
    """Tune's status table is off unless --verbose (RunConfig(verbose=0)); this line is what the console shows."""
    import json
    import logging
    from types import SimpleNamespace

    from mpalign.data.output import OutputFolder
    from mpalign.sweep import TRIAL_END, TrialEnds

    ends = TrialEnds(OutputFolder(tmp_path), "identity_color", total=2)
    trial = SimpleNamespace(trial_id="t1", config={"point": {"alpha": 0.01, "layer_set": "down+mid", "seed": 0}},
                            last_result={"objective": 0.1875, "step": 750})
    with caplog.at_level(logging.INFO, logger="mpalign.sweep"):
        ends.on_trial_complete(0, [], trial)
        ends.on_trial_error(0, [], SimpleNamespace(trial_id="t2", config={"alpha": 0.5}, last_result=None,
                                                   error_file="/runs/t2/error.txt", local_path="/runs/t2"))
    assert caplog.messages == [
        "trial 1/2 finished at step 750 (alpha=0.01, layer_set=down+mid, seed=0): identity_color 0.1875",
        "trial 2/2 error at step - (alpha=0.5): identity_color -",
        "trial t2 failed; its error: /runs/t2/error.txt"]  # its workers' traceback is not on the console
    assert json.loads((tmp_path / "t1" / TRIAL_END).read_text()) == {"status": "finished"}
