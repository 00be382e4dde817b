"""Sweep alpha and the alignment layer sets (and lambda_self, loss extras) on Ray Tune with early stopping.

    python tune/sweep_alpha.py --config CONFIG [--set key=value ...] [--resume | --overwrite]

The search space, scheduler and per-trial resources come from the config's ``tune`` section; every trial trains with
``mpalign.train`` and is ranked by ``tune.metric`` (a fidelity score of images it generates at each validation, or
the held-out diffusion loss). Outputs in ``tune.output_dir``: results.csv (one row per trial), objective_vs_alpha.png
and best_config.yaml (run it with ``python -m mpalign.train --config .../best_config.yaml``). See docs/sweeps.md.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence

from mpalign.cli import run_cli
from mpalign.config import add_config_args, config_from_args
from mpalign.sweep import run_sweep


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python tune/sweep_alpha.py", description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--resume", action="store_true", help="restore the interrupted sweep in tune.output_dir")
    group.add_argument("--overwrite", action="store_true", help="delete the sweep in tune.output_dir and start over")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    outcome = run_sweep(cfg, resume=args.resume, overwrite=args.overwrite)
    for row in outcome.rows:
        flag = " (stopped early)" if row["early_stopped"] else "" if row["status"] == "finished" else f" ({row['status']})"
        if row["below_clip_t_floor"]:
            flag += " (CLIP-T below tune.min_clip_t)"
        cost = f" eval_share={row['eval_share']:.0%}" if row["eval_share"] == row["eval_share"] else ""
        knobs = (f"beta={row['beta']:<5g}" if not math.isnan(row["beta"])
                 else f"lambda_self={row['lambda_self']:<4g} extras={row['loss_extras']:<10}")
        print(f"alpha={row['alpha']:<8g} layers={row['layer_set']:<12} {knobs} "
              f"seed={row['seed']:<3} {row['metric']}={row['objective']:.5f} "
              f"diffusion={row['diffusion']:.5f}{cost} step={row['step']}{flag}")
    shares = [row["eval_share"] for row in outcome.rows if row["eval_share"] == row["eval_share"]]
    if shares:
        print(f"fidelity evaluations took {min(shares):.0%}-{max(shares):.0%} of the trials' training time")
    print(f"results: {outcome.results_csv}\nplot: {outcome.plot_png}")
    if any(row["status"] == "unfinished" for row in outcome.rows) or len(outcome.rows) < outcome.expected_trials:
        print("the sweep was interrupted before every trial finished: run the same command with --resume")
    if outcome.best_yaml:
        best = outcome.best
        print(f"best: alpha={best['alpha']:g} layers={best['layer_set']} mean {best['metric']}={best['objective']:.5f} "
              f"over {best['seeds']} seed(s) -> {outcome.best_yaml}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
