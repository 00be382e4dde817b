"""``python -m mpalign.toy.experiment``: does an adapter trained by this pipeline carry a reference's identity into its
box, and do MultiPersona-Align's alignment losses help? One command, in the toy world:

1. builds the toy dataset when ``data.path`` holds none (``pipelines/build_dataset.py``'s code, on Ray Data);
2. trains adapters with ``mpalign.train``'s own ``run_training`` (Ray Train), equal steps and data, one per seed:
   ``alpha=0`` (plain MS-Diffusion) and the paper's ``curriculum`` (diffusion loss alone for ``train.warmup_steps``,
   then ``train.alpha``);
3. evaluates them on the toy benchmark with ``mpalign.evaluate``'s Ray Data stages, beside two baselines: ``untrained``
   (a freshly initialised adapter per seed) and ``text-only`` (no image branch: ``model.scale=0``; its seeds are
   generation seeds);
4. writes ``results.csv`` (one row per condition and seed), ``summary.md`` (mean ± std over seeds) and
   ``identity.png`` under ``--out``.

With ``--config configs/toy-mosaic.yaml`` (``model.method: mosaic``) the same for MOSAIC's reference LoRA on the toy
FLUX: ``flow only`` (``alpha = beta = 0``) against ``SCAL+MDL`` (``train.alpha`` after the warm-up, ``train.beta``),
beside ``untrained`` (a zero LoRA: the frozen FLUX with the references in its attention). MOSAIC has no text-only
switch, so no text-only row.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mpalign.cli import UserInputError, run_cli, start_ray
from mpalign.config import Config, add_config_args, config_from_args
from mpalign.eval.metrics import METRIC_NAMES, METRICS
from mpalign.toy.benchmark import IDENTITY_METRICS

log = logging.getLogger("mpalign.toy.experiment")

CONDITIONS = ("text-only", "untrained", "trained, alpha=0", "trained, curriculum")
MOSAIC_CONDITIONS = ("untrained", "trained, flow only", "trained, SCAL+MDL")
SHOWN = (*IDENTITY_METRICS, *METRICS)


def _with(cfg: Config, **sections: dict) -> Config:
    """A copy of ``cfg`` with some fields of some sections replaced."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **fields)
                                       for name, fields in sections.items()})


def conditions(cfg: Config) -> tuple[str, ...]:
    """The method's conditions, baselines first; the last two are trained without and with its alignment losses."""
    return MOSAIC_CONDITIONS if cfg.model.method == "mosaic" else CONDITIONS


def training_config(cfg: Config, condition: str, seed: int, out: Path) -> Config:
    off, on = conditions(cfg)[-2:]
    if condition not in (off, on):
        raise ValueError(f"'{condition}' is not a trained condition of model.method={cfg.model.method}")
    losses = {"alpha": 0.0, "beta": 0.0} if condition == off else {}
    name = "no-alignment" if condition == off else "alignment"
    return _with(cfg, model={"seed": seed},
                 train={"seed": seed, **losses, "output_dir": str(out / "train" / f"{name}-seed{seed}"),
                        "val_every": 0, "checkpoint_every": cfg.train.max_steps})


def train_adapters(cfg: Config, seeds: Sequence[int], out: Path) -> tuple[dict[tuple[str, int], str], dict]:
    from mpalign.train import run_training

    adapters, seconds = {}, {}
    for seed in seeds:
        for condition in conditions(cfg)[-2:]:
            run_cfg = training_config(cfg, condition, seed, out)
            started = time.perf_counter()
            outcome = run_training(run_cfg, overwrite=True)
            seconds[(condition, seed)] = time.perf_counter() - started
            adapters[(condition, seed)] = outcome.adapter_dir
            log.info("%s, seed %d: %d steps in %.0f s -> %s", condition, seed, cfg.train.max_steps,
                     seconds[(condition, seed)], outcome.adapter_dir)
    return adapters, seconds


def evaluate_all(cfg: Config, adapters: dict[tuple[str, int], str], seeds: Sequence[int], out: Path) -> pd.DataFrame:
    from mpalign.eval.benchmarks import expand_runs, load_benchmark
    from mpalign.eval.stages import run_evaluation

    eval_cfg = _with(cfg, eval={"benchmark": "toy", "output_dir": str(out / "eval")})
    samples = load_benchmark(eval_cfg.eval)
    frames = []
    # text-only: one model, the seeds are generation seeds
    runs = ([("text-only", seeds[0], _with(eval_cfg, model={"scale": 0.0}), None, list(seeds))]
            if "text-only" in conditions(cfg) else [])
    runs += [("untrained", seed, _with(eval_cfg, model={"seed": seed}), None, [0]) for seed in seeds]
    runs += [(condition, seed, eval_cfg, folder, [0]) for (condition, seed), folder in adapters.items()]
    for condition, seed, run_cfg, folder, gen_seeds in runs:
        name = f"{condition} seed {seed}" if condition != "text-only" else "text-only"
        started = time.perf_counter()
        scores = run_evaluation(expand_runs(samples, gen_seeds), run_cfg, {name: folder}, out / "eval" / "images")
        scores["condition"] = condition
        scores["run_seed"] = scores["seed"] if condition == "text-only" else seed
        frames.append(scores)
        log.info("evaluated %s: identity %.3f (%.0f s)", name, scores["identity"].mean(), time.perf_counter() - started)
    return pd.concat(frames, ignore_index=True)


def summarize(scores: pd.DataFrame, seconds: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per condition and seed: metric means and training seconds; per condition: mean and std over seeds)."""
    per_seed = scores.groupby(["condition", "run_seed"])[list(SHOWN)].mean().reset_index()
    per_seed["train_seconds"] = [seconds.get((c, s), 0.0) for c, s in zip(per_seed["condition"], per_seed["run_seed"])]
    order = {c: i for i, c in enumerate(dict.fromkeys(CONDITIONS + MOSAIC_CONDITIONS))}
    per_seed = per_seed.sort_values(["condition", "run_seed"], key=lambda col: col.map(order) if col.name ==
                                    "condition" else col).reset_index(drop=True)
    summary = per_seed.groupby("condition", sort=False)[[*SHOWN, "train_seconds"]].agg(["mean", "std"])
    return per_seed, summary


def markdown_table(summary: pd.DataFrame, seeds: int) -> str:
    head = "| condition | " + " | ".join(METRIC_NAMES[m] for m in SHOWN) + " | training (s) |"
    lines = [head, "|" + "---|" * (len(SHOWN) + 2)]
    for condition, row in summary.iterrows():
        # one seed has no standard deviation (pandas gives NaN): the mean alone
        cells = [f"{row[(m, 'mean')]:.3f}" + (f" ± {row[(m, 'std')]:.3f}" if seeds > 1 else "") for m in SHOWN]
        train = row[("train_seconds", "mean")]
        lines.append(f"| {condition} | " + " | ".join([*cells, f"{train:.0f}" if train else "-"]) + " |")
    spread = f"Mean ± standard deviation over {seeds} seeds." if seeds > 1 else "One seed: no standard deviation."
    return "\n".join(lines) + f"\n\n{spread}\n"


def plot(per_seed: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["identity", "identity_color", "identity_shape", "identity_texture", "placement"]
    grouped = per_seed.groupby("condition", sort=False)[metrics]
    means, stds = grouped.mean(), grouped.std().fillna(0.0)
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(means)
    for i, condition in enumerate(means.index):
        xs = [k + i * width for k in range(len(metrics))]
        ax.bar(xs, means.loc[condition], width, yerr=stds.loc[condition], capsize=3, label=condition)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(metrics))], [METRIC_NAMES[m] for m in metrics])
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (attribute classifier)")
    ax.set_title("Toy benchmark: held-out identities, kind-only prompts")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpalign.toy.experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="outputs/toy/experiment", help="output folder")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (training and adapter init)")
    add_config_args(parser)
    parser.set_defaults(config="configs/toy.yaml")  # after add_config_args: its own default would win otherwise
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UserInputError(f"--seeds must be comma-separated integers, got '{args.seeds}'") from None
    if not seeds:
        raise UserInputError("--seeds is empty")
    if cfg.model.preset != "toy":
        raise UserInputError(f"the experiment runs in the toy world (model.preset: toy), not '{cfg.model.preset}'")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    if not (Path(cfg.data.path) / "stats.json").is_file():
        from mpalign.data.build import build_dataset

        print(f"building the toy dataset in {cfg.data.path}")
        build_dataset(cfg)
    # with the dashboard, as mpalign.train starts Ray: Ray Train's placement-group cleaner asks the state API
    # (served by it) whether the controller lives, and without it warns on every check (100+ lines a run)
    start_ray()
    adapters, seconds = train_adapters(cfg, seeds, out)
    scores = evaluate_all(cfg, adapters, seeds, out)
    scores.drop(columns=[c for c in scores.columns if c.endswith("_per_subject")]).to_csv(out / "scores.csv",
                                                                                          index=False)
    per_seed, summary = summarize(scores, seconds)
    per_seed.to_csv(out / "results.csv", index=False)
    table = markdown_table(summary, len(seeds))
    (out / "summary.md").write_text(table)
    plot(per_seed, out / "identity.png")
    print(table)
    print(f"toy experiment done in {(time.perf_counter() - started) / 60:.1f} min: {out}/results.csv, summary.md, "
          f"identity.png")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
