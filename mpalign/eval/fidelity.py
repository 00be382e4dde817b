"""A sweep trial's fidelity objective: at each validation the trial generates a small fixed held-out set with its
adapter (the EMA weights when EMA is on) and scores it with the evaluation's own functions
(``mpalign.eval.scoring``: the same generation and metrics as ``python -m mpalign.evaluate``). Runs inside a training
worker, without Ray.

The held-out set is ``tune.eval_samples`` samples of the dataset's val split (their reference crops written as PNGs
into the trial's folder) or of the benchmark ``tune.eval_benchmark``; every sample is generated from the latents of
seed ``tune.eval_seed`` with ``tune.eval_steps`` sampling steps, so every trial and every validation is scored on the
same prompts, boxes, references and starting noise. See docs/sweeps.md.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from mpalign.config import Config, ConfigError
from mpalign.eval.metrics import known_subject_metrics
from mpalign.eval.scoring import Scorers, generate_rows, score_rows
from mpalign.training.validation import ValidationExample

DIFFUSION = "diffusion"  # the held-out diffusion loss (lower is better); every other objective: higher is better
FIDELITY_METRICS = ("dino", "m_dino", "clip_i")
REPORTED = ("dino", "m_dino", "clip_i", "clip_t")  # what each fidelity evaluation reports (plus subject extras)
FIDELITY_DIR = "fidelity"


def check_metric(metric: str) -> None:
    allowed = [DIFFUSION, *FIDELITY_METRICS, *sorted(known_subject_metrics())]
    if metric not in allowed:
        raise ConfigError(f"tune.metric must be one of {allowed}, got '{metric}'")


def metric_key(metric: str) -> str:
    """The report key of ``tune.metric``: ``val_diffusion``, or ``eval_<metric>`` for a fidelity score."""
    return "val_diffusion" if metric == DIFFUSION else f"eval_{metric}"


def metric_mode(metric: str) -> str:
    return "min" if metric == DIFFUSION else "max"


def below_clip_t_floor(metrics: Mapping[str, Any], min_clip_t: float | None) -> bool:
    """Whether the trial's CLIP-T fell below ``tune.min_clip_t`` (never, without a floor or a fidelity evaluation)."""
    clip_t = metrics.get("eval_clip_t")
    return min_clip_t is not None and clip_t is not None and float(clip_t) < min_clip_t


def objective(metrics: Mapping[str, Any], metric: str, min_clip_t: float | None) -> float:
    """What ASHA ranks: the value of ``metric``, or the worst possible value when CLIP-T is below the floor (a trial
    that buys identity by ignoring the prompt must not survive a rung on it)."""
    if below_clip_t_floor(metrics, min_clip_t):
        return -math.inf if metric_mode(metric) == "max" else math.inf
    return float(metrics[metric_key(metric)])


def subject_metric_names(cfg: Config) -> list[str]:
    """``eval.subject_metrics``, plus ``tune.metric`` when that is a per-subject metric (e.g. identity)."""
    names = list(cfg.eval.subject_metrics)
    if cfg.tune.metric not in (DIFFUSION, *FIDELITY_METRICS) and cfg.tune.metric not in names:
        names.append(cfg.tune.metric)
    return names


def fidelity_config(cfg: Config) -> Config:
    """The evaluation settings of a trial's fidelity evaluation: ``eval`` with ``tune.eval_steps`` steps, one image
    per sample, and the per-subject metrics ``tune.metric`` needs."""
    cfg = copy.deepcopy(cfg)
    cfg.eval.num_inference_steps = cfg.tune.eval_steps
    cfg.eval.images_per_prompt = 1
    cfg.eval.subject_metrics = subject_metric_names(cfg)
    return cfg


def benchmark_requests(cfg: Config) -> list[dict[str, Any]]:
    """Requests for the first ``tune.eval_samples`` samples of ``tune.eval_benchmark`` (loaded on the driver; the
    reference paths must be readable by the workers, as for ``mpalign.evaluate``)."""
    from mpalign.eval.benchmarks import expand_runs, load_benchmark

    tune = cfg.tune
    samples = load_benchmark(dataclasses.replace(cfg.eval, benchmark=tune.eval_benchmark, limit=tune.eval_samples))
    return expand_runs(samples, [tune.eval_seed])


def example_requests(examples: Sequence[ValidationExample], folder: Path, seed: int) -> list[dict[str, Any]]:
    """Requests for held-out val-split examples: each reference crop written once as a PNG under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    requests = []
    for index, example in enumerate(examples):
        references = []
        for s, image in enumerate(example.subject_images()):
            path = folder / f"val-{index:03d}-{s}.png"
            image.save(path)
            references.append([str(path)])
        requests.append({"sample_id": f"val-{index:03d}", "benchmark": "val", "group": f"{len(references)}-subject",
                         "prompt": example.caption, "subjects": list(example.phrases),
                         "phrases": list(example.phrases), "boxes": example.boxes, "references": references,
                         "seed": seed})
    return requests


class FidelityEvaluation:
    """Generates the held-out requests with an adapter and scores them; the scorers load on first use."""

    def __init__(self, cfg: Config, requests: list[dict[str, Any]], out_dir: Path, device: torch.device):
        self.cfg = fidelity_config(cfg)
        self.requests, self.out_dir, self.device = requests, out_dir, device
        self.scorers: Scorers | None = None

    def __call__(self, pipeline: Any, step: int) -> dict[str, float]:
        """Generate with ``pipeline`` (an ``MPAlignPipeline``; in training ``module_generation``'s) and score:
        ``eval_<metric>`` means over the held-out images and ``eval_seconds``, this evaluation's wall time."""
        started = time.perf_counter()
        if self.scorers is None:
            self.scorers = Scorers.load(self.cfg, device=self.device)
        rows = generate_rows(pipeline, self.requests, self.cfg, "trial", self.out_dir / f"step_{step:07d}")
        scored = score_rows(rows, self.scorers)
        names = [*REPORTED, *self.cfg.eval.subject_metrics]
        metrics = {f"eval_{name}": sum(float(r[name]) for r in scored) / len(scored) for name in names}
        metrics["eval_seconds"] = time.perf_counter() - started
        return metrics
