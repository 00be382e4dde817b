"""Sweeps over the alignment weight alpha, the tapped layer sets, lambda_self and the loss-zoo extras on Ray Tune.

Each trial runs :func:`mpalign.train.run_training` — the training code itself, not a copy — with the trial's
parameters applied to the base config, in its own folder ``<tune.output_dir>/trials/<trial id>``. Trials report the
validation metrics of every validation to Tune (``TuneReportCallback``), so ASHA can stop the weak ones early. The
objective is ``tune.metric``: a fidelity score (DINO, M-DINO, CLIP-I or a registered per-subject metric) of a fixed
held-out set each validation generates (``mpalign.eval.fidelity``), or the held-out diffusion loss
(``mpalign.training.validation``); both are measured identically for every trial. The entry point is
``tune/sweep_alpha.py``; docs/sweeps.md explains the outputs.
"""

from __future__ import annotations

import copy
import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune import Callback

from mpalign.cli import UserInputError, check_writable, start_ray, verbose_console
from mpalign.config import MOSAIC_BLOCKS, Config, ConfigError, config_from_dict
from mpalign.data.output import OutputFolder, StagedFolder
from mpalign.eval.benchmarks import BUILTIN_BENCHMARKS
from mpalign.eval.fidelity import (
    REPORTED,
    below_clip_t_floor,
    benchmark_requests,
    check_metric,
    metric_key,
    metric_mode,
    subject_metric_names,
)
from mpalign.storage import absolute

logger = logging.getLogger("mpalign.sweep")

EXPERIMENT = "sweep"
TRIALS = "trials"
BLOCKS = ("down", "mid", "up")
EXTRAS = ("attn", "disentangle")
RESULTS_CSV = "results.csv"
PLOT_PNG = "objective_vs_alpha.png"
BEST_YAML = "best_config.yaml"
TRIAL_ACTOR_CPUS = 0.01  # a trial's own actor only waits on its TorchTrainer; the training workers hold the resources
SEARCHES = ("grid", "optuna")
# the trial parameters a search point sets (seed = the trial's train.seed); beta is model.method=mosaic's (nan for
# ms_adapter), lambda_self and loss_extras are ms_adapter's (nan and "none" for mosaic): see UNUSED_PARAMS
PARAMS = ("alpha", "beta", "layer_set", "lambda_self", "loss_extras", "seed")
UNUSED_PARAMS = {"beta": math.nan, "lambda_self": math.nan, "loss_extras": "none"}


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
    check_metric(tune.metric)
    if tune.search not in SEARCHES:
        raise ConfigError(f"tune.search must be one of {list(SEARCHES)}, got '{tune.search}'")
    if tune.search == "optuna":
        if not 0 < tune.alpha_min < tune.alpha_max:
            raise ConfigError("tune.search=optuna searches log-alpha: it needs 0 < tune.alpha_min < tune.alpha_max")
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search=optuna needs Optuna: pip install 'mpalign[optuna]'") from None
    if not tune.seeds:
        raise ConfigError("tune.seeds is empty: give at least one train.seed")
    if tune.metric != "diffusion" and tune.eval_samples < 1:
        raise ConfigError(f"tune.metric={tune.metric} scores generated images: set tune.eval_samples >= 1")
    if tune.eval_samples < 0 or tune.eval_steps < 1:
        raise ConfigError("tune.eval_samples must be >= 0 and tune.eval_steps >= 1")
    if tune.alpha_search not in ("grid", "loguniform"):
        raise ConfigError(f"tune.alpha_search must be 'grid' or 'loguniform', got '{tune.alpha_search}'")
    if tune.alpha_search == "loguniform" and not 0 < tune.alpha_min < tune.alpha_max:
        raise ConfigError("tune.alpha_search=loguniform needs 0 < tune.alpha_min < tune.alpha_max")
    if tune.alpha_search == "grid" and not tune.alphas:
        raise ConfigError("tune.alphas is empty")
    if tune.scheduler not in ("asha", "fifo"):
        raise ConfigError(f"tune.scheduler must be 'asha' or 'fifo', got '{tune.scheduler}'")
    if cfg.train.val_every < 1:
        raise ConfigError("sweeps rank trials by validation: set train.val_every >= 1")
    if tune.num_samples < 1 or tune.max_concurrent_trials < 1:
        raise ConfigError("tune.num_samples and tune.max_concurrent_trials must be >= 1")


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """The base config with one trial's parameters: alpha, tapped blocks, lambda_self, loss extras, train.seed; for
    model.method=mosaic: alpha (SCAL), beta (MDL), the blocks the losses read and train.seed."""
    cfg = copy.deepcopy(cfg)
    cfg.train.seed = int(params["seed"])
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


def uses_fidelity(cfg: Config) -> bool:
    """Whether trials generate and score the held-out set at each validation."""
    return cfg.tune.eval_samples > 0


def grid_points(cfg: Config) -> list[dict[str, Any]]:
    """The grid's trials, each a full set of :data:`PARAMS`, without duplicates: alpha = 0 taps nothing, so its
    trials with different layer sets or lambda_self train the same model (bit-identical objectives) and only the first
    runs. Extras other than ``none`` read attention maps of the tapped blocks even at alpha = 0: those stay. With
    ``alpha_search: loguniform`` alpha is left out (drawn by Tune). model.method=mosaic: alpha x beta x layer set x
    seed, all kept (beta weighs MDL, which reads the layer set's blocks even at alpha = 0)."""
    space = cfg.tune
    alphas = list(space.alphas) if space.alpha_search == "grid" else [None]
    if cfg.model.method == "mosaic":
        mosaic = [{"beta": beta, "layer_set": layer_set, "seed": seed}
                  for beta in space.betas for layer_set in space.layer_sets for seed in space.seeds]
        return [point if alpha is None else {"alpha": alpha, **point} for alpha in alphas for point in mosaic]
    points, seen = [], set()
    for alpha in alphas:
        for layer_set in space.layer_sets:
            for lambda_self in space.lambda_self:
                for extras in space.loss_extras:
                    for seed in space.seeds:
                        idle = alpha == 0 and not parse_extras(extras)
                        key = ((alpha, extras, seed) if idle else (alpha, layer_set, lambda_self, extras, seed))
                        if key in seen:
                            continue
                        seen.add(key)
                        point = {"layer_set": layer_set, "lambda_self": lambda_self, "loss_extras": extras,
                                 "seed": seed}
                        points.append(point if alpha is None else {"alpha": alpha, **point})
    return points


def search_space(cfg: Config) -> dict[str, Any]:
    """Tune's param_space. Grid: one grid over :func:`grid_points` (the deduplicated product), alpha drawn per point
    when ``alpha_search: loguniform``. Optuna: log-alpha in [alpha_min, alpha_max] and the lists as choices (the
    seed is ``tune.seeds[0]``: TPE must not tune the seed)."""
    from ray import tune

    space = cfg.tune
    if space.search == "optuna":
        alpha = tune.loguniform(space.alpha_min, space.alpha_max)
        if cfg.model.method == "mosaic":
            return {"alpha": alpha, "beta": tune.choice(list(space.betas)),
                    "layer_set": tune.choice(list(space.layer_sets))}
        return {"alpha": alpha, "layer_set": tune.choice(list(space.layer_sets)),
                "lambda_self": tune.choice(list(space.lambda_self)), "loss_extras": tune.choice(list(space.loss_extras))}
    out: dict[str, Any] = {"point": tune.grid_search(grid_points(cfg))}
    if space.alpha_search == "loguniform":
        out["alpha"] = tune.loguniform(space.alpha_min, space.alpha_max)
    return out


def drawn_params(trial_config: dict[str, Any]) -> dict[str, Any]:
    """The values Tune gave a trial: its grid point and any sampled ones, in one flat dict."""
    return {**trial_config.get("point", {}), **{k: v for k, v in trial_config.items() if k != "point"}}


def trial_params(trial_config: dict[str, Any], cfg: Config) -> dict[str, Any]:
    """A trial's :data:`PARAMS` from its Tune config (a grid point and/or sampled values); the parameters its method
    does not use are :data:`UNUSED_PARAMS`."""
    flat = {**UNUSED_PARAMS, **drawn_params(trial_config)}
    flat.setdefault("seed", cfg.tune.seeds[0])
    return {key: flat[key] for key in PARAMS}


def _search_algorithm(cfg: Config):
    if cfg.tune.search != "optuna":
        return None
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=cfg.tune.seeds[0]))


def sweep_trial(params: dict[str, Any], base_config: dict[str, Any]) -> None:
    """One trial: the trial's parameters on the base config, trained by ``mpalign.train`` (resuming the trial's own
    run when Tune restores an interrupted sweep)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from mpalign.train import run_training

    base = config_from_dict(base_config)
    trial_dir = OutputFolder(base.tune.output_dir).uri(TRIALS, tune.get_context().get_trial_id())
    cfg = trial_training_config(base, trial_params(params, base), trial_dir)
    run_training(cfg, resume=True, callbacks=[TuneReportCallback()], fidelity=uses_fidelity(cfg))


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
                         grace_period=min(grace_period(cfg), validations),
                         reduction_factor=cfg.tune.reduction_factor)


def warmup_validations(cfg: Config) -> int:
    """Validations at or before the end of the alignment warm-up: alpha is 0 until ``train.warmup_steps``, so every
    trial of a seed has trained the very same model there, and a rung there would carry no information."""
    return cfg.train.warmup_steps // cfg.train.val_every


def grace_period(cfg: Config) -> int:
    """ASHA's first rung, in validations: ``tune.grace_period``, moved after the warm-up when that is longer."""
    return max(cfg.tune.grace_period, warmup_validations(cfg) + 1)


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

    def __init__(self, trials: OutputFolder, metric: str = "", total: int = 0):
        self.trials = trials
        self.metric, self.total, self.ended = metric, total, 0

    def _ended(self, trial: Any, status: str) -> None:
        import ray
        from ray.util.placement_group import PlacementGroup, remove_placement_group

        self.trials.make_folders(trial.trial_id)
        self.trials.write_text(f"{trial.trial_id}/{TRIAL_END}", json.dumps({"status": status}))
        result = trial.last_result or {}
        self.ended += 1
        point = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in sorted(drawn_params(trial.config).items()))
        objective = result.get("objective")
        logger.info("trial %d/%d %s at step %s (%s): %s %s", self.ended, self.total, status, result.get("step", "-"),
                    point, self.metric, "-" if objective is None else f"{objective:.4f}")
        if status == "error":  # its workers' output stays in Ray's logs unless --verbose: say where the trace is
            logger.warning("trial %s failed; its error: %s", trial.trial_id, trial.error_file or trial.local_path)
        pg_id = result.get("placement_group_id")
        info = ray.util.placement_group_table().get(pg_id) if pg_id else None
        if info and info["state"] != "REMOVED":
            remove_placement_group(PlacementGroup(ray.PlacementGroupID.from_hex(pg_id)))
            logger.debug("released the workers of trial %s", trial.trial_id)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._ended(trial, "error")


@dataclass
class SweepOutcome:  # the paths: local, or URIs (s3://...) as tune.output_dir
    output_dir: str
    rows: list[dict[str, Any]]
    best: dict[str, Any] | None
    results_csv: str
    plot_png: str
    best_yaml: str | None
    expected_trials: int


def expected_trials(cfg: Config) -> int:
    """How many trials the search makes: the deduplicated grid times ``num_samples``, or ``num_samples`` (Optuna)."""
    if cfg.tune.search == "optuna":
        return cfg.tune.num_samples
    return len(grid_points(cfg)) * cfg.tune.num_samples


def result_columns(cfg: Config) -> list[str]:
    """results.csv's columns: the parameters, the objective, every score (fidelity and diffusion), the evaluation's
    cost, and how the trial ended."""
    scores = ["diffusion", *((*REPORTED, *subject_metric_names(cfg)) if uses_fidelity(cfg) else ())]
    return ["trial_id", *PARAMS, "metric", "objective", "below_clip_t_floor", *scores, "eval_share", "eval_seconds",
            "step", "max_steps", "early_stopped", "status", "val_cos_cross", "val_cos_self", "output_dir"]


def _absolute_paths(cfg: Config) -> Config:
    cfg = copy.deepcopy(cfg)
    cfg.tune.output_dir = absolute(cfg.tune.output_dir)
    cfg.data.path = absolute(cfg.data.path)
    if cfg.tune.eval_benchmark and cfg.tune.eval_benchmark not in BUILTIN_BENCHMARKS:  # a samples file
        cfg.tune.eval_benchmark = str(Path(cfg.tune.eval_benchmark).expanduser().resolve())
    return cfg


def run_sweep(cfg: Config, *, resume: bool = False, overwrite: bool = False) -> SweepOutcome:
    """Run (or with ``resume``, restore and finish) the sweep, then write the results table, plot and best config."""

    from ray import tune

    from mpalign.train import check_config

    check_writable(cfg.tune.output_dir, "tune.output_dir", folder=True, remote_ok=True)
    OutputFolder(cfg.tune.output_dir).check_reachable("tune.output_dir")  # s3://: one error line, not a hang in Tune
    check_tune_config(cfg)
    # checked as the widest trial runs it (its GPU share, the layer set that taps the most blocks: most projectors)
    widest = {"alpha": cfg.tune.alpha_max, "layer_set": max(cfg.tune.layer_sets, key=lambda n: len(parse_layer_set(n))),
              "lambda_self": cfg.tune.lambda_self[0], "loss_extras": cfg.tune.loss_extras[0],
              "beta": max(cfg.tune.betas), "seed": cfg.tune.seeds[0]}
    check_config(trial_training_config(cfg, widest, cfg.tune.output_dir))
    cfg = _absolute_paths(cfg)
    if uses_fidelity(cfg) and cfg.tune.eval_benchmark:
        benchmark_requests(cfg)  # a missing or malformed benchmark fails here, not in every trial
    if warmup_validations(cfg) >= math.ceil(cfg.train.max_steps / cfg.train.val_every):
        logger.warning("every validation falls inside the alignment warm-up (train.warmup_steps=%d): all trials of a "
                       "seed train the same model and the sweep can tell nothing apart", cfg.train.warmup_steps)
    out = OutputFolder(cfg.tune.output_dir)
    experiment = out.uri(EXPERIMENT)
    if out.exists(EXPERIMENT) and not resume:
        if not overwrite:
            raise UserInputError(f"'{experiment}' already holds a sweep: pass --resume to finish it, --overwrite to "
                                 f"start over, or set tune.output_dir to another folder")
        out.remove(EXPERIMENT, TRIALS)
    out.make_folders()
    out.write_text("config.yaml", cfg.to_yaml())
    start_ray(worker_logs=False)  # the driver prints a line per trial (TrialEnds)
    trainable = _trainable(cfg)
    trial_ends = TrialEnds(OutputFolder(out.uri(TRIALS)), cfg.tune.metric, expected_trials(cfg))
    logger.info("sweep: %d trials of %d steps, ranked by %s, in %s", trial_ends.total, cfg.train.max_steps,
                cfg.tune.metric, out)
    if resume and tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        if resume:
            logger.info("nothing to resume in %s: starting the sweep", experiment)
        tuner = tune.Tuner(
            trainable, param_space=search_space(cfg),
            tune_config=tune.TuneConfig(metric="objective", mode=metric_mode(cfg.tune.metric),
                                        scheduler=_scheduler(cfg), search_alg=_search_algorithm(cfg),
                                        num_samples=cfg.tune.num_samples,
                                        max_concurrent_trials=cfg.tune.max_concurrent_trials),
            # verbose=0: no status table every 30 s; TrialEnds prints one line per trial instead
            run_config=tune.RunConfig(name=EXPERIMENT, storage_path=str(out), callbacks=[trial_ends],
                                      verbose=None if verbose_console() else 0),
        )
    grid = tuner.fit()
    rows = result_rows(grid, cfg)
    best = best_row(rows, metric_mode(cfg.tune.metric))
    summary = StagedFolder(str(out))  # the writers below take local paths
    write_results(rows, summary.path / RESULTS_CSV, result_columns(cfg))
    plot_objective(rows, summary.path / PLOT_PNG, cfg.tune.metric)
    if best:
        write_best_config(cfg, best, summary.path / BEST_YAML)
    summary.close()
    return SweepOutcome(str(out), rows, best, out.uri(RESULTS_CSV), out.uri(PLOT_PNG),
                        out.uri(BEST_YAML) if best else None, expected_trials(cfg))


def result_rows(grid: Any, cfg: Config) -> list[dict[str, Any]]:
    """One row per trial. ``status``: finished (the trial ended by itself or the scheduler stopped it), error, or
    unfinished (the sweep was interrupted first); ``early_stopped``: finished before ``train.max_steps``; ``objective``
    is ``tune.metric``'s value, also for a trial ``below_clip_t_floor`` (which ASHA saw as the worst)."""
    nan = float("nan")
    out = OutputFolder(cfg.tune.output_dir)
    scores = ["diffusion", *((*REPORTED, *subject_metric_names(cfg)) if uses_fidelity(cfg) else ())]
    rows = []
    for result in grid:
        if result.config is None:  # restored by --resume but lost before it reported again: nothing to tabulate
            logger.warning("a trial without config or results is left out of results.csv (%s)", result.path)
            continue
        params, metrics = trial_params(result.config, cfg), result.metrics or {}
        trial_id = str(metrics.get("trial_id", ""))  # "" for a trial that never reported (interrupted before)
        end = f"{TRIALS}/{trial_id}/{TRIAL_END}"
        ended = json.loads(out.read_text(end))["status"] if trial_id and out.exists(end) else "unfinished"
        status = "error" if result.error else ended
        step = int(metrics.get("step", 0))
        rows.append({
            "trial_id": trial_id, "alpha": float(params["alpha"]), "beta": float(params["beta"]),
            "layer_set": params["layer_set"], "lambda_self": float(params["lambda_self"]),
            "loss_extras": params["loss_extras"],
            "seed": int(params["seed"]), "metric": cfg.tune.metric,
            "objective": float(metrics.get(metric_key(cfg.tune.metric), nan)),
            "below_clip_t_floor": below_clip_t_floor(metrics, cfg.tune.min_clip_t),
            **{name: float(metrics.get(metric_key(name), nan)) for name in scores},
            "eval_share": float(metrics.get("eval_share", nan)),
            "eval_seconds": float(metrics.get("eval_seconds", nan)),
            "step": step, "max_steps": cfg.train.max_steps,
            "early_stopped": status == "finished" and step < cfg.train.max_steps,
            "status": status,
            "val_cos_cross": metrics.get("val_cos_cross", float("nan")),
            "val_cos_self": metrics.get("val_cos_self", float("nan")),
            "output_dir": out.uri(TRIALS, trial_id) if trial_id else "",
        })
    rows.sort(key=lambda r: _params_key(r, ("layer_set", "loss_extras", "lambda_self", "beta", "alpha", "seed")))
    return rows


def write_results(rows: list[dict[str, Any]], path: Path, columns: list[str]) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def best_row(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    """The best parameter set by its mean objective over seeds, among trials that trained to the end (early-stopped
    ones only if none did) and never below the CLIP-T floor: its first trial's row, with that mean as ``objective``
    and the number of seeds it averages as ``seeds``."""
    scored = [r for r in rows if r["status"] == "finished" and not math.isnan(float(r["objective"]))
              and not r["below_clip_t_floor"]]
    scored = [r for r in scored if not r["early_stopped"]] or scored
    if not scored:
        return None
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in scored:
        groups.setdefault(_params_key(row, [key for key in PARAMS if key != "seed"]), []).append(row)
    means = {key: sum(float(r["objective"]) for r in group) / len(group) for key, group in groups.items()}
    best = (min if mode == "min" else max)(means, key=means.__getitem__)
    return {**groups[best][0], "objective": means[best], "seeds": len(groups[best])}


def write_best_config(cfg: Config, best: dict[str, Any], path: Path) -> None:
    """The base config with the best trial's parameters, training into ``<tune.output_dir>/best/train``."""
    best_cfg = apply_params(cfg, best)
    best_cfg.train.output_dir = OutputFolder(cfg.tune.output_dir).uri("best", "train")
    best_cfg.save(path)


def _params_key(row: dict[str, Any], keys: Sequence[str]) -> tuple:
    """``row``'s values at ``keys`` as a sortable, hashable key: a parameter the method does not use (nan) becomes
    -inf, since nan equals nothing, not even itself."""
    return tuple(-math.inf if isinstance(row[k], float) and math.isnan(row[k]) else row[k] for k in keys)


def _curve_groups(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Plot lines: one per layer set (and per lambda_self / extras / beta when those vary). The deduplicated
    ms_adapter alpha = 0 trials (no extras) are every line's baseline."""
    vary_lambda = len({r["lambda_self"] for r in rows if not math.isnan(r["lambda_self"])}) > 1
    vary_extras = len({r["loss_extras"] for r in rows}) > 1
    vary_beta = len({r["beta"] for r in rows if not math.isnan(r["beta"])}) > 1
    baseline = [r for r in rows if r["alpha"] == 0 and r["loss_extras"] == "none" and math.isnan(r["beta"])]
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        if row in baseline:
            continue
        label = row["layer_set"]
        if vary_lambda:
            label += f", λ_self={row['lambda_self']:g}"
        if vary_extras:
            label += f", {row['loss_extras']}"
        if vary_beta:
            label += f", β={row['beta']:g}"
        groups.setdefault(label, []).append(row)
    for label, group in groups.items():
        if group[0]["loss_extras"] == "none":
            group.extend(baseline)
    return groups or ({"alpha = 0": baseline} if baseline else {})


def plot_objective(rows: list[dict[str, Any]], path: Path, metric: str) -> None:
    """The objective (and CLIP-T, when trials scored generations) against alpha: per line the mean over seeds with
    error bars of one standard deviation, every trial as a dot (hollow: stopped early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("objective", f"{metric} (held-out diffusion loss)" if metric == "diffusion" else metric)]
    if any(not math.isnan(float(r.get("clip_t", math.nan))) for r in rows):
        panels.append(("clip_t", "clip_t (prompt fidelity)"))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.2), squeeze=False)
    seeds = len({r["seed"] for r in rows})
    for axis, (column, ylabel) in zip(axes[0], panels):
        for label, group in _curve_groups(rows).items():
            valid = [r for r in group if not math.isnan(float(r[column])) and math.isfinite(float(r[column]))]
            if not valid:
                continue
            by_alpha: dict[float, list[float]] = {}
            for r in valid:
                by_alpha.setdefault(r["alpha"], []).append(float(r[column]))
            xs = sorted(by_alpha)
            means = [sum(by_alpha[x]) / len(by_alpha[x]) for x in xs]
            stds = [_std(by_alpha[x]) for x in xs]
            line = axis.errorbar(xs, means, yerr=stds, fmt="-", capsize=3, label=label).lines[0]
            for r in valid:
                axis.plot(r["alpha"], float(r[column]), "o", markersize=4, color=line.get_color(),
                          markerfacecolor="none" if r["early_stopped"] else line.get_color())
        positive = [r["alpha"] for r in rows if r["alpha"] > 0]
        if positive:
            axis.set_xscale("symlog", linthresh=min(positive))  # alpha = 0 stays on the axis
        axis.set_xlabel("alpha")
        axis.set_ylabel(ylabel)
        axis.legend(fontsize=8)
    axes[0][0].set_title(f"Sweep: mean ± std over {seeds} seed(s) (hollow: stopped early)", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _std(values: list[float]) -> float:
    """Sample standard deviation (0 for a single value)."""
    if len(values) < 2:
        return 0.0
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
