"""Evaluate adapters on MS-Bench, DreamBench or your own file; scores CLIP-I, CLIP-T, DINO and M-DINO (and any
per-subject metrics of ``eval.subject_metrics``) and writes an HTML report with one column per adapter.

    python -m mpalign.evaluate --benchmark msbench --adapter outputs/tiny/train/adapter --out outputs/tiny/eval
    python -m mpalign.evaluate --benchmark dreambench --adapter A --adapter B --limit 20 --seeds 0,1

Without ``--adapter`` a freshly initialised adapter of the model preset is evaluated (a baseline, not a trained
model). Generation and scoring run as Ray Data batch inference; see docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
from collections.abc import Sequence
from pathlib import Path

from mpalign import methods
from mpalign.cli import USER_ERRORS, UserInputError, check_writable, run_cli, start_ray
from mpalign.config import Config, add_config_args, config_from_args
from mpalign.eval.benchmarks import BenchmarkSample, expand_runs, load_benchmark
from mpalign.storage import local_copy

log = logging.getLogger("mpalign.evaluate")

FRESH_ADAPTER = "fresh-adapter"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpalign.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", help="msbench, dreambench, or a JSON/JSONL file of samples (default: eval.benchmark)")
    parser.add_argument("--adapter", action="append", default=[], metavar="DIR",
                        help="adapter folder (save_pretrained layout; local or s3://...), repeatable: one report "
                             "column each; none = a freshly initialised adapter")
    parser.add_argument("--out", help="output folder (default: eval.output_dir)")
    parser.add_argument("--limit", type=int, help="at most N prompts, spread over combination types; 0 = all "
                                                  "(default: eval.limit)")
    parser.add_argument("--seeds", help="comma-separated seeds, e.g. 0,1 (default: eval.seeds)")
    parser.add_argument("--images-per-prompt", type=int, help="images per prompt and seed (default: eval.images_per_prompt)")
    return add_config_args(parser)


def resolve_config(args: argparse.Namespace) -> Config:
    """The config with the command-line flags applied on top of ``--config`` / ``--set``."""
    flags = {"eval.benchmark": args.benchmark, "eval.output_dir": args.out, "eval.limit": args.limit,
             "eval.images_per_prompt": args.images_per_prompt}
    overrides = [f"{key}={value}" for key, value in flags.items() if value is not None]
    if args.seeds is not None:
        try:
            seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise UserInputError(f"--seeds must be comma-separated integers, got '{args.seeds}'") from None
        overrides.append(f"eval.seeds=[{','.join(map(str, seeds))}]")
    cfg = config_from_args(args, overrides)
    if not cfg.eval.seeds:
        raise UserInputError("eval.seeds is empty: give at least one seed")
    if cfg.eval.images_per_prompt < 1:
        raise UserInputError(f"--images-per-prompt must be >= 1, got {cfg.eval.images_per_prompt}")
    return cfg


def local_adapters(folders: Sequence[str], output_dir: str) -> list[str]:
    """The ``--adapter`` folders as local paths: one on object storage is copied to
    ``<output_dir>/adapters/<bucket>/<prefix>``; evaluation actors read it there, as they write their images there (a
    temporary folder of the driver would not be on the other nodes)."""
    return [local_copy(f, str(Path(output_dir) / "adapters" / f.partition("://")[2]), "--adapter") for f in folders]


def adapter_columns(folders: Sequence[str]) -> dict[str, str | None]:
    """Report column name -> adapter folder: the folder's name, made unique with its parent's when two clash."""
    for folder in folders:
        if not (Path(folder) / "config.json").is_file():
            raise UserInputError(f"--adapter '{folder}' holds no adapter (no config.json): give a folder written by "
                                 f"training (save_adapter) or python -m mpalign.convert_msdiffusion")
    if not folders:
        return {FRESH_ADAPTER: None}
    names = [Path(f).resolve().name for f in folders]
    columns: dict[str, str | None] = {}
    for folder, name in zip(folders, names):
        if names.count(name) > 1:
            name = f"{Path(folder).resolve().parent.name}/{name}"
        while name in columns:
            name += "'"
        columns[name] = folder
    return columns


def check_subject_counts(samples: Sequence[BenchmarkSample], adapters: dict[str, str | None], cfg: Config) -> None:
    """Every sample must fit every adapter's ``max_subjects``: fail before any model loads, not inside an actor."""
    most = max(len(s.subjects) for s in samples)
    for name, folder in adapters.items():
        limit = methods.adapter_max_subjects(folder) if folder else cfg.model.max_subjects
        if most > limit:
            raise UserInputError(f"adapter '{name}' takes at most {limit} subjects, the benchmark has samples with {most}")


def report_settings(cfg: Config, num_prompts: int, seconds: float) -> dict[str, object]:
    """What the report's settings list shows: enough to tell two reports' runs apart."""
    ev = cfg.eval
    tiny = f"tiny random model of the '{cfg.model.preset}' preset"
    return {
        "benchmark": ev.benchmark, "prompts": num_prompts, "seeds": ev.seeds, "images per prompt": ev.images_per_prompt,
        "model preset": cfg.model.preset, "steps": ev.num_inference_steps, "guidance scale": ev.guidance_scale,
        "negative prompt": ev.negative_prompt or "(none)",
        "size": f"{ev.width}x{ev.height}", "CLIP": ev.clip_model if cfg.model.preset == "pretrained" else tiny,
        "DINO": ev.dino_model if cfg.model.preset == "pretrained" else tiny, "wall time": f"{seconds:.1f} s",
    }


def user_error_in(exc: BaseException) -> str | None:
    """The first line of a user mistake (say, a model that cannot load) raised inside a Ray actor: it reaches the
    driver only as the text of a Ray error, not as the original exception."""
    names = "|".join(cls.__name__ for cls in USER_ERRORS)
    match = re.search(rf"\b(?:{names}): (.+)", str(exc))
    return match.group(1).strip() if match else None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cfg = resolve_config(args)
    check_writable(cfg.eval.output_dir, "--out", folder=True)
    adapters = adapter_columns(local_adapters(args.adapter, cfg.eval.output_dir))
    for folder in filter(None, adapters.values()):  # a damaged folder fails here in seconds, not inside an actor
        methods.check_adapter(folder)
    samples = load_benchmark(cfg.eval)
    if not samples:
        raise UserInputError(f"benchmark '{cfg.eval.benchmark}' has no samples to evaluate")
    check_subject_counts(samples, adapters, cfg)
    if not args.adapter:
        print(f"no --adapter given: evaluating a freshly initialised (untrained) adapter of the "
              f"'{cfg.model.preset}' preset as '{FRESH_ADAPTER}'")
    out = Path(cfg.eval.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg.save(out / "config.yaml")
    requests = expand_runs(samples, cfg.eval.seeds)
    log.info("%s: %d prompts x %d seeds x %d images per prompt, %d adapter(s) -> %s", cfg.eval.benchmark,
             len(samples), len(cfg.eval.seeds), cfg.eval.images_per_prompt, len(adapters), out)

    import ray

    from mpalign.eval.metrics import METRIC_NAMES
    from mpalign.eval.report import metric_table, write_report
    from mpalign.eval.stages import run_evaluation

    started = time.monotonic()
    start_ray(worker_logs=False, include_dashboard=False)
    try:
        scores = run_evaluation(requests, cfg, adapters, out / "images")
    except ray.exceptions.RayError as exc:
        message = user_error_in(exc)
        if message is None:
            raise
        raise UserInputError(message) from None
    settings = report_settings(cfg, len(samples), time.monotonic() - started)
    sources = {name: folder or f"freshly initialised adapter ({cfg.model.preset} preset, seed {cfg.model.seed})"
               for name, folder in adapters.items()}
    report = write_report(out, scores, samples, sources, title=f"mpalign evaluation: {cfg.eval.benchmark}",
                          settings=settings, grid_samples=cfg.eval.report_samples)
    print(metric_table(scores, list(adapters), by=None).rename(index=METRIC_NAMES).to_string(float_format="{:.4f}".format))
    print(f"report: {report.resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
