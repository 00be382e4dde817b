"""The sweep's search space and per-trial settings, without running Ray Tune."""

from __future__ import annotations

import pytest

from mpalign.config import ConfigError, load_config
from mpalign.sweep import apply_params, check_tune_config, trial_training_config


def test_trial_parameters_reach_the_training_config(tmp_path):
    cfg = load_config(overrides=["train.val_every=3", "train.checkpoint_every=4", "tune.gpus_per_trial=0.5",
                                 "tune.cpus_per_trial=2", "train.num_workers=2"])
    params = {"alpha": 0.03, "layer_set": "down+mid+up", "lambda_self": 0.5, "loss_extras": "attn+disentangle"}
    trial = trial_training_config(cfg, params, str(tmp_path))
    assert trial.train.alpha == 0.03 and trial.model.align_blocks == ["down", "mid", "up"]
    assert trial.train.lambda_self == 0.5
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
])
def test_bad_sweep_settings_are_config_errors(override, message):
    cfg = load_config(overrides=["train.val_every=5", override])
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")):
        check_tune_config(cfg)
