"""Sweeps over the alignment weight alpha, the tapped layer sets, lambda_self and the loss-zoo extras on Ray Tune.

Each trial runs :func:`mpalign.train.run_training` — the training code itself, not a copy — with the trial's
parameters applied to the base config, in its own folder ``<tune.output_dir>/trials/<trial id>``. Trials report the
validation metrics of every validation to Tune (``TuneReportCallback``), so ASHA can stop the weak ones early; the
objective is the held-out diffusion loss with fixed noise and timesteps (``mpalign.training.validation``), identical
for every trial. The entry point is ``tune/sweep_alpha.py``; docs/sweeps.md explains the outputs.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from mpalign.cli import UserInputError
from mpalign.config import Config, ConfigError, config_from_dict

logger = logging.getLogger("mpalign.sweep")

EXPERIMENT = "sweep"
TRIALS = "trials"
BLOCKS = ("down", "mid", "up")
MOSAIC_BLOCKS = ("early", "middle", "late")  # model.method=mosaic: thirds of FLUX's blocks (mpalign.models.mosaic)
EXTRAS = ("attn", "disentangle")
RESULTS_CSV = "results.csv"
PLOT_PNG = "objective_vs_alpha.png"
BEST_YAML = "best_config.yaml"
TRIAL_ACTOR_CPUS = 0.01  # a trial's own actor only waits on its TorchTrainer; the training workers hold the resources
RESULT_COLUMNS = ("trial_id", "alpha", "beta", "layer_set", "lambda_self", "loss_extras", "objective", "step", "max_steps",
                  "early_stopped", "status", "val_cos_cross", "val_cos_self", "output_dir")


def parse_layer_set(name: str, method: str = "ms_adapter") -> list[str]:
    valid = MOSAIC_BLOCKS if method == "mosaic" else BLOCKS
    blocks = [b.strip() for b in name.split("+") if b.strip()]
    unknown = [b for b in blocks if b not in valid]
    if not blocks or unknown:
        raise ConfigError(f"tune.layer_sets entry '{name}' must join blocks from {list(valid)} with '+', "
                          f"e.g. {valid[0]}+{valid[1]}")
    return blocks


def parse_extras(name: str) -> list[str]:
    if name.strip() in ("", "none"):
        return []
    extras = [e.strip() for e in name.split("+")]
    unknown = [e for e in extras if e not in EXTRAS]
    if unknown:
        raise ConfigError(f"tune.loss_extras entry '{name}' must be 'none' or join {list(EXTRAS)} with '+'")
    return extras


def check_tune_config(cfg: Config) -> None:
    tune = cfg.tune
    for name in tune.layer_sets:
        parse_layer_set(name, cfg.model.method)
    if cfg.model.method == "mosaic" and not tune.betas:
        raise ConfigError("tune.betas is empty")
    for name in tune.loss_extras:
        parse_extras(name)
    if tune.alpha_search not in ("grid", "loguniform"):
        raise ConfigError(f"tune.alpha_search must be 'grid' or 'loguniform', got '{tune.alpha_search}'")
    if tune.alpha_search == "loguniform" and not 0 < tune.alpha_min < tune.alpha_max:
        raise ConfigError("tune.alpha_search=loguniform needs 0 < tune.alpha_min < tune.alpha_max")
    if tune.alpha_search == "grid" and not tune.alphas:
        raise ConfigError("tune.alphas is empty")
    if tune.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"tune.scheduler must be 'asha' or 'fifo', got '{tune.scheduler}'")
    if tune.mode not in ("min", "max"):
        raise ConfigError(f"tune.mode must be 'min' or 'max', got '{tune.mode}'")
    if cfg.train.val_every < 1:
        raise ConfigError("sweeps rank trials by validation: set train.val_every >= 1")
    if tune.num_samples < 1 or tune.max_concurrent_trials < 1:
        raise ConfigError("tune.num_samples and tune.max_concurrent_trials must be >= 1")


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's parameters: alpha, tapped blocks, lambda_self, loss extras; for
    model.method=mosaic: alpha (SCAL), beta (MDL) and the blocks the losses read."""
    cfg = copy.deepcopy(cfg)
    cfg.train.alpha = float(params["alpha"])
    if cfg.model.method == "mosaic":
        cfg.train.beta = float(params["beta"])
        cfg.model.mosaic_loss_blocks = parse_layer_set(params["layer_set"], "mosaic")
        return cfg
    cfg.model.align_blocks = parse_layer_set(params["layer_set"])
    cfg.train.lambda_self = float(params["lambda_self"])
    extras = parse_extras(params["loss_extras"])
    cfg.train.attn_loss_weight = cfg.tune.attn_loss_weight if "attn" in extras else 0.0
    cfg.train.disentangle_weight = cfg.tune.disentangle_weight if "disentangle" in extras else 0.0
    return cfg


def trial_training_config(cfg: Config, params: dict[str, Any], output_dir: str) -> Config:
    """What a trial trains with: :func:`apply_params`, its own folder, Tune-friendly reporting (every report carries
    the objective) and the per-trial resources of the ``tune`` section."""
    cfg = apply_params(cfg, params)
    train, tune = cfg.train, cfg.tune
    train.output_dir = output_dir
    train.storage_path = ""
    train.log_every = train.val_every
    train.checkpoint_every = math.ceil(train.checkpoint_every / train.val_every) * train.val_every
    train.use_gpu = tune.gpus_per_trial > 0
    train.cpus_per_worker = tune.cpus_per_trial / train.num_workers
    train.gpus_per_worker = tune.gpus_per_trial / train.num_workers
    return cfg


def search_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    space = cfg.tune
    alpha = (tune.grid_search(list(space.alphas)) if space.alpha_search == "grid"
             else tune.loguniform(space.alpha_min, space.alpha_max))
    if cfg.model.method == "mosaic":
        return {"alpha": alpha, "beta": tune.grid_search(list(space.betas)),
                "layer_set": tune.grid_search(list(space.layer_sets))}
    return {"alpha": alpha, "layer_set": tune.grid_search(list(space.layer_sets)),
            "lambda_self": tune.grid_search(list(space.lambda_self)),
            "loss_extras": tune.grid_search(list(space.loss_extras))}


def sweep_trial(params: dict[str, Any], base_config: dict[str, Any]) -> None:
    """One trial: the trial's parameters on the base config, trained by ``mpalign.train`` (resuming the trial's own
    run when Tune restores an interrupted sweep)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mpalign.train import run_training

    base = config_from_dict(base_config)
    trial_dir = Path(base.tune.output_dir) / TRIALS / tune.get_context().get_trial_id()
    cfg = trial_training_config(base, params, str(trial_dir))
    run_training(cfg, resume=True, callbacks=[TuneReportCallback()])


def _trainable(cfg: Config):
    from ray import tune

    return tune.with_resources(tune.with_parameters(sweep_trial, base_config=cfg.to_dict()),
                               {"CPU": TRIAL_ACTOR_CPUS})


def _scheduler(cfg: Config):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    # Time is counted in validations (each Tune result is one), so grace_period is a number of validations. max_t is
    # one more than a full trial reports: ASHA must never stop a trial at its last report, or Tune would kill it
    # while it is still exporting its adapter.
    validations = math.ceil(cfg.train.max_steps / cfg.train.val_every)
    return ASHAScheduler(time_attr="training_iteration", max_t=validations + 1,
                         grace_period=min(cfg.tune.grace_period, validations),
                         reduction_factor=cfg.tune.reduction_factor)


TRIAL_END = "trial_end.json"


class TrialEnds(Callback):
    """Runs in the sweep's driver when a trial ends: records how (``trial_end.json`` in the trial's folder: finished —
    by itself or stopped by the scheduler — or error; it survives ``Tuner.restore``, unlike Tune's in-memory trial
    state) and releases the placement group of the trial's Ray Train workers.

    A trial that the scheduler stops early is killed by Tune in the middle of training; its Ray Train controller dies
    with it and leaves its workers' placement group behind. Ray Train's own cleaner notices dead controllers through
    the dashboard's state API, which a Ray started without a dashboard does not have: there, every stopped trial would
    hold its workers' CPUs/GPUs until the sweep ends, starving the trials after it. The workers report their
    placement group (``placement_group_id``) so the driver can release it."""

    def __init__(self, trials_dir: str):
        self.trials_dir = trials_dir

    def _ended(self, trial: Any, status: str) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        folder = Path(self.trials_dir) / trial.trial_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / TRIAL_END).write_text(json.dumps({"status": status}))
        pg_id = (trial.last_result or {}).get("placement_group_id")
        info = ray.util.placement_group_table().get(pg_id) if pg_id else None
        if info and info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            logger.info("released the workers of trial %s", trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "error")


@dataclass
class SweepOutcome:
    output_dir: Path
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    results_csv: Path
    plot_png: Path
    best_yaml: Path | None
    expected_trials: int


def expected_trials(cfg: Config) -> int:
    """How many trials the search space makes: the grid's product, times ``num_samples``."""
    space = cfg.tune
    alphas = len(space.alphas) if space.alpha_search == "grid" else 1
    if cfg.model.method == "mosaic":
        return alphas * len(space.betas) * len(space.layer_sets) * space.num_samples
    return alphas * len(space.layer_sets) * len(space.lambda_self) * len(space.loss_extras) * space.num_samples


def _absolute_paths(cfg: Config) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.tune.output_dir = str(Path(cfg.tune.output_dir).expanduser().resolve())
    if "://" not in cfg.data.path:
        cfg.data.path = str(Path(cfg.data.path).expanduser().resolve())
    return cfg


def run_sweep(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> SweepOutcome:
    """Run (or with ``resume``, restore and finish) the sweep, then write the results table, plot and best config."""
    import os

    import ray
    from ray import tune

    from mpalign.train import check_config

    check_tune_config(cfg)
    check_config(cfg)
    cfg = _absolute_paths(cfg)
    out = Path(cfg.tune.output_dir)
    experiment = out / EXPERIMENT
    if experiment.exists() and not resume:
        if not overwrite:
            raise UserInputError(f"'{experiment}' already holds a sweep: pass --resume to finish it, --overwrite to "
                                 f"start over, or set tune.output_dir to another folder")
        shutil.rmtree(experiment)
        shutil.rmtree(out / TRIALS, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "local"))
    trainable = _trainable(cfg)
    if resume and tune.Tuner.can_restore(str(experiment)):
        tuner = tune.Tuner.restore(str(experiment), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            logger.info("nothing to resume in %s: starting the sweep", experiment)
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(metric=cfg.tune.metric, mode=cfg.tune.mode, scheduler=_scheduler(cfg),
                                        num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent_trials),
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), callbacks=[TrialEnds(str(out / TRIALS))]),
        )
    grid = tuner.fit()
    rows = result_rows(grid, cfg)
    results_csv = write_results(rows, out / RESULTS_CSV)
    plot_png = plot_objective(rows, out / PLOT_PNG, cfg.tune.metric)
    best = best_row(rows, cfg.tune.mode)
    best_yaml = write_best_config(cfg, best, out / BEST_YAML) if best else None
    return SweepOutcome(out, rows, best, results_csv, plot_png, best_yaml, expected_trials(cfg))


def result_rows(grid: Any, cfg: Config) -> list[dict[str, Any]]:
    """One row per trial. ``status``: finished (the trial ended by itself or the scheduler stopped it), error, or
    unfinished (the sweep was interrupted first); ``early_stopped``: finished before ``train.max_steps``."""
    rows = []
    for result in grid:
        params, metrics = result.config, result.metrics or {}
        trial_id = str(metrics.get("trial_id", ""))  # "" for a trial that never reported (interrupted before)
        folder = Path(cfg.tune.output_dir) / TRIALS / trial_id
        end = folder / TRIAL_END
        ended = json.loads(end.read_text())["status"] if trial_id and end.is_file() else "unfinished"
        status = "error" if result.error else ended
        step = int(metrics.get("step", 0))
        rows.append({
            "trial_id": trial_id, "alpha": float(params["alpha"]), "beta": float(params.get("beta", float("nan"))),
            "layer_set": params["layer_set"], "lambda_self": float(params.get("lambda_self", float("nan"))),
            "loss_extras": params.get("loss_extras", ""),
            "objective": metrics.get(cfg.tune.metric, float("nan")), "step": step,
            "max_steps": cfg.train.max_steps,
            "early_stopped": status == "finished" and step < cfg.train.max_steps,
            "status": status,
            "val_cos_cross": metrics.get("val_cos_cross", float("nan")),
            "val_cos_self": metrics.get("val_cos_self", float("nan")),
            "output_dir": str(folder) if trial_id else "",
        })
    rows.sort(key=lambda r: (r["layer_set"], r["loss_extras"], r["lambda_self"], r["beta"], r["alpha"]))
    return rows


def write_results(rows: list[dict[str, Any]], path: Path) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best trial that trained to the end (an early-stopped one only if none did)."""
    scored = [r for r in rows if r["status"] == "finished" and not math.isnan(float(r["objective"]))]
    scored = [r for r in scored if not r["early_stopped"]] or scored
    if not scored:
        return None
    pick = min if mode == "min" else max
    return pick(scored, key=lambda r: float(r["objective"]))


def write_best_config(cfg: Config, best: dict[str, Any], path: Path) -> Path:
    """The base config with the best trial's parameters, training into ``<tune.output_dir>/best/train``."""
    best_cfg = apply_params(cfg, best)
    best_cfg.train.output_dir = str(Path(cfg.tune.output_dir) / "best" / "train")
    return best_cfg.save(path)


def plot_objective(rows: list[dict[str, Any]], path: Path, metric: str) -> Path:
    """Objective against alpha, one line per layer set (and per lambda_self / extras when those vary too); early-
    stopped trials drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    vary_lambda = len({r["lambda_self"] for r in rows if not math.isnan(r["lambda_self"])}) > 1
    vary_extras = len({r["loss_extras"] for r in rows}) > 1
    vary_beta = len({r["beta"] for r in rows if not math.isnan(r["beta"])}) > 1
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        label = row["layer_set"]
        if vary_lambda:
            label += f", λ_self={row['lambda_self']:g}"
        if vary_extras:
            label += f", {row['loss_extras']}"
        if vary_beta:
            label += f", β={row['beta']:g}"
        groups.setdefault(label, []).append(row)
    for label, group in groups.items():
        group = sorted((r for r in group if not math.isnan(float(r["objective"]))), key=lambda r: r["alpha"])
        if not group:
            continue
        xs, ys = [r["alpha"] for r in group], [float(r["objective"]) for r in group]
        (line,) = axis.plot(xs, ys, "-", label=label)
        for r, x, y in zip(group, xs, ys):
            axis.plot(x, y, "o", color=line.get_color(), markerfacecolor="none" if r["early_stopped"] else
                      line.get_color())
    positive = [r["alpha"] for r in rows if r["alpha"] > 0]
    if positive:
        axis.set_xscale("symlog", linthresh=min(positive))  # alpha = 0 stays on the axis
    axis.set_xlabel("alpha")
    axis.set_ylabel(f"{metric} (held-out diffusion loss)" if metric == "objective" else metric)
    axis.set_title("Sweep: objective vs alpha (hollow: stopped early)")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
