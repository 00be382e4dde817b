"""One GPU suite: the figures the performance goals ask for, in one JSON and one table (issue 18).

    python benchmarks/gpu_suite.py --json gpu_suite.json            # one GPU, ~8 minutes at most
    python benchmarks/gpu_suite.py --check-with-tiny-models         # CPU: the same code paths with the tiny preset

Three parts, each in its own try/except under its own wall-time budget (an OOM or a timeout is recorded in the JSON
and the next part still runs):
  train_step  SDXL size (bf16, 1024 px, random weights, ``configs/sdxl-1gpu-48gb.yaml``), batch 8, without and with
              gradient checkpointing: the frozen UNet's forward + backward, the adapter step without and with the
              alignment losses (benchmarks/bench_train_step.py's functions);
  build       the dataset builder's stages at full size, each alone, and the whole chain (benchmarks/bench_build.py's
              ``bench_full``, run without Ray: the GPU machine has none);
  generation  SDXL, 30 steps, guidance 7.5, 1024 px, with the adapter (``MPAlignPipeline`` over the training module's
              models) and without it (diffusers' ``StableDiffusionXLPipeline`` on the same UNet, default processors).
On CUDA the process's memory is capped at an L40S's 48 GB (``torch.cuda.set_per_process_memory_fraction``) for the
whole suite, so a part that would not fit on that card fails here with an OOM. No Ray is imported.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmarks, run as a script or imported

import torch
from bench_build import bench_full
from bench_train_step import adapter_step, build_sdxl_module, cached_batch, frozen_unet_step, measure

from mpalign.config import REPO_ROOT, add_config_args, load_config
from mpalign.models.training_module import MPAlignTrainingModule
from mpalign.training.memory import SDXL_VAE
from mpalign.zoo import resolve_device

L40S_BYTES = 46068 * 2**20  # what nvidia-smi reports for an L40S ("48 GB")
TRAIN_BATCH, GENERATION_STEPS, GUIDANCE = 8, 30, 7.5
# Seconds per part on one GPU: together under 8 minutes with model building and saving included.
BUDGETS_S = {"train_step": 200, "build": 170, "generation": 90}
GOALS = {
    "training_step": "adapter step with alignment >= 0.85x frozen UNet fwd+bwd (img/s)",
    "alignment_overhead": "alignment losses add <= 3 % to the adapter step time",
    "fits_48gb": "configs/sdxl-1gpu-48gb.yaml (batch 8, 1024 px, checkpointing) fits 48 GB",
    "build_gpu_busy": "dataset build keeps one GPU >= 80 % busy",
    "generation_overhead": "adapter adds <= 10 % to SDXL generation time (30 steps)",
}
GPU_STAGES = ("detect", "segment", "encode")  # bench_full gives these a GPU share, the others run on CPU


class PartTimeout(Exception):
    """A part ran past its wall-time budget."""


@contextlib.contextmanager
def wall_budget(seconds: float) -> Iterator[None]:
    """Raise PartTimeout in the main thread after ``seconds`` (between Python bytecodes, so a running kernel ends
    first)."""
    def expire(signum, frame):
        raise PartTimeout(f"over its {seconds:.0f} s budget")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _attempt(record: dict[str, Any], key: str, device: torch.device, fn: Callable[[], Any]) -> None:
    """``record[key] = fn()``, or the error (an OOM, say) so the rest of the part still runs; a timeout propagates."""
    try:
        record[key] = fn()
    except PartTimeout:
        raise
    except Exception as error:  # noqa: BLE001 - recorded in the JSON, the suite goes on
        record[key] = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"}
    finally:
        _release(device)


def _cuda_seconds(run: Callable[[], Any], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _peak_gib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def _module(tiny: bool, device: torch.device, precision: str, generation: bool = False) -> MPAlignTrainingModule:
    """The tiny preset's module, or the full-size random one of bench_train_step (with the real SDXL VAE and a CLIP
    processor for generation, which that benchmark's cached batches do not need)."""
    torch.manual_seed(0)
    overrides = [f"model.device={device}", "train.warmup_steps=1"]
    if tiny:
        return MPAlignTrainingModule.from_config(load_config(overrides=overrides), device=device,
                                                 generation=generation)
    cfg = load_config(REPO_ROOT / "configs" / "sdxl-1gpu-48gb.yaml", overrides)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
    module = build_sdxl_module(cfg, device, dtype)
    if generation:
        from diffusers import AutoencoderKL
        from transformers import CLIPImageProcessor

        with torch.device(device):
            module.sdxl.vae = AutoencoderKL(**SDXL_VAE).to(dtype).requires_grad_(False).eval()
        module.image_encoder.processor = CLIPImageProcessor()  # 224 px, as CLIP ViT-bigG/14
    return module


def train_step_part(tiny: bool, device: torch.device, precision: str, resolution: int, batch_size: int,
                    warmup: int, iters: int) -> dict[str, Any]:
    from diffusers.models.attention_processor import AttnProcessor2_0

    module = _module(tiny, device, precision)
    module.train()
    batch = cached_batch(module, batch_size, resolution)
    out: dict[str, Any] = {"batch": batch_size, "resolution": resolution, "precision": precision}
    adapter_processors = module.unet.attn_processors
    module.unet.set_attn_processor(AttnProcessor2_0())  # the frozen UNet as diffusers ships it
    _attempt(out, "a_frozen_unet", device, lambda: measure(frozen_unet_step(module, batch, device, precision),
                                                           batch_size, device, warmup, iters))
    module.unet.set_attn_processor(dict(adapter_processors))  # it empties the dict it is given
    for checkpointing in (False, True):
        if checkpointing:
            module.enable_gradient_checkpointing()
        run: dict[str, Any] = {}
        for key, step in (("b_adapter_step", 0), ("c_adapter_step_with_alignment", 1)):
            _attempt(run, key, device, lambda step=step: measure(adapter_step(module, batch, device, precision, step),
                                                                 batch_size, device, warmup, iters))
        out["gradient_checkpointing" if checkpointing else "no_checkpointing"] = run
    return out


def build_part(tiny: bool, work: Path) -> dict[str, Any]:
    parser = add_config_args(argparse.ArgumentParser())
    args = parser.parse_args([])
    args.check_with_tiny_models = tiny
    args.num_images, args.batch_size = (4, 2) if tiny else (64, 8)
    args.pipeline_executor = "local"  # the suite runs without Ray, on the GPU machine and in CI alike
    return bench_full(args, work)


def generation_part(tiny: bool, device: torch.device, precision: str, resolution: int, steps: int) -> dict[str, Any]:
    from diffusers.models.attention_processor import AttnProcessor2_0
    from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import StableDiffusionXLPipeline
    from PIL import Image

    from mpalign.training.validation import module_generation

    module = _module(tiny, device, precision, generation=True)
    module.eval()
    prompt, phrases = "a dog and a cat on a sofa", ["dog", "cat"]
    subjects = [Image.new("RGB", (256, 256), colour) for colour in ("brown", "gray")]
    boxes = [[0.05, 0.3, 0.45, 0.9], [0.55, 0.3, 0.95, 0.9]]
    out: dict[str, Any] = {"steps": steps, "resolution": resolution, "guidance_scale": GUIDANCE,
                           "precision": precision}
    with module_generation(module) as pipeline, torch.autocast(device.type, torch.bfloat16,
                                                               enabled=precision == "bf16"):
        def with_adapter(n: int) -> Any:
            return pipeline.generate(prompt, subjects, boxes, phrases, guidance_scale=GUIDANCE,
                                     num_inference_steps=n, height=resolution, width=resolution)

        adapter_processors = module.unet.attn_processors
        plain = StableDiffusionXLPipeline(**module.sdxl.as_pipeline_kwargs())
        plain.set_progress_bar_config(disable=True)

        def without_adapter(n: int) -> Any:
            module.unet.set_attn_processor(AttnProcessor2_0())
            try:
                return plain(prompt, guidance_scale=GUIDANCE, num_inference_steps=n, height=resolution,
                             width=resolution, generator=torch.Generator("cpu").manual_seed(0))
            finally:
                module.unet.set_attn_processor(dict(adapter_processors))  # it empties the dict it is given

        for key, run in (("without_adapter_s", without_adapter), ("with_adapter_s", with_adapter)):
            run(2)  # warm-up: kernels, allocator
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            out[key] = _cuda_seconds(lambda run=run: run(steps), device)
            out[key.replace("_s", "_peak_mem_gib")] = _peak_gib(device)
    out["adapter_overhead_pct"] = 100 * (out["with_adapter_s"] / out["without_adapter_s"] - 1)
    return out


def _figure(part: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        if not isinstance(part, dict) or key not in part or "error" in part:
            return None
        part = part[key]
    return part


def goals(parts: dict[str, Any], device: torch.device, cap_gib: float | None) -> dict[str, dict[str, Any]]:
    """Each goal beside its measured figure; ``met`` is None where the figure is missing or not what the goal means
    (the CPU check; the build without an overlapping executor)."""
    on_gpu = device.type == "cuda"
    train = parts.get("train_step", {})
    a = _figure(train, "a_frozen_unet", "img_per_s")
    out = {}
    ratios, overheads = {}, {}
    for mode in ("no_checkpointing", "gradient_checkpointing"):
        b = _figure(train, mode, "b_adapter_step", "step_s")
        c_rate = _figure(train, mode, "c_adapter_step_with_alignment", "img_per_s")
        c = _figure(train, mode, "c_adapter_step_with_alignment", "step_s")
        ratios[mode] = c_rate / a if a and c_rate else None
        overheads[mode] = 100 * (c / b - 1) if b and c else None
    ratio = ratios["no_checkpointing"]
    out["training_step"] = {"measured": ratios, "unit": "x frozen UNet img/s",
                            "met": ratio >= 0.85 if on_gpu and ratio is not None else None,
                            "note": "the goal is read without checkpointing (the frozen reference has none)"}
    overhead = overheads["no_checkpointing"]
    out["alignment_overhead"] = {"measured": overheads, "unit": "% step time (c over b)",
                                 "met": overhead <= 3 if on_gpu and overhead is not None else None}
    peak = _figure(train, "gradient_checkpointing", "c_adapter_step_with_alignment", "peak_mem_gib") if on_gpu else None
    fits = None
    if on_gpu:
        fits = peak is not None and cap_gib is not None and peak <= cap_gib
    out["fits_48gb"] = {"measured": peak, "unit": f"GiB peak allocated, process capped at {cap_gib} GiB",
                        "met": fits,
                        "note": "batch 8 with checkpointing, alignment on; an OOM under the cap means it does not fit"}
    build = parts.get("build", {})
    alone = _figure(build, "per_image_s_alone") or {}
    share = (sum(alone.get(s, 0.0) for s in GPU_STAGES) / sum(alone.values())) if alone else None
    out["build_gpu_busy"] = {
        "measured": {"gpu_stage_share_pct": None if share is None else 100 * share,
                     "pipeline_fraction_of_ideal": _figure(build, "fraction_of_ideal"),
                     "executor": _figure(build, "executor")},
        "unit": "% of the per-image time spent in GPU stages (detect, segment, encode), each stage alone",
        "met": None,
        "note": "GPU busy needs the stages overlapped (Ray, absent on the GPU machine); run back to back the GPU is "
                "busy at most this share of the time",
    }
    gen = _figure(parts.get("generation", {}), "adapter_overhead_pct")
    out["generation_overhead"] = {"measured": gen, "unit": "% generation time",
                                  "met": gen <= 10 if on_gpu and gen is not None else None}
    for key, goal in out.items():
        goal["goal"] = GOALS[key]
    return out


def _strict(value: Any) -> Any:
    """NaN (``measure``'s peak memory on a CPU) as null: the JSON stays strict JSON."""
    if isinstance(value, dict):
        return {k: _strict(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k} {_show(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.3g}"
    return "n/a" if value is None else str(value)


def print_table(result: dict[str, Any]) -> None:
    print(f"\n{result['device']} | memory cap {_show(result['memory_cap_gib'])} GiB | "
          f"{'tiny preset (CPU check)' if result['tiny'] else 'SDXL size, random weights'}")
    for name, part in result["parts"].items():
        print(f"  part {name:10s} {'ERROR ' + part['error'] if 'error' in part else 'ok'} ({part['wall_s']:.1f} s)")
    for goal in result["goals"].values():
        met = {True: "MET", False: "NOT MET", None: "-"}[goal["met"]]
        print(f"  [{met:7s}] {goal['goal']}\n            measured: {_show(goal['measured'])} ({goal['unit']})")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-with-tiny-models", action="store_true",
                        help="the same code paths with the tiny preset, small sizes and short budgets (CPU, CI)")
    parser.add_argument("--json", default="gpu_suite.json", help="where the results go (default: %(default)s)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--parts", default=",".join(BUDGETS_S), help="comma-separated subset of %(default)s")
    args = parser.parse_args(argv)
    tiny = args.check_with_tiny_models
    device = resolve_device(args.device)
    precision = "bf16" if device.type == "cuda" else "no"
    cap_gib = None
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, L40S_BYTES / total), device)
        cap_gib = min(L40S_BYTES, total) / 2**30
    resolution = 128 if tiny else 1024
    runs: dict[str, Callable[[Path], dict[str, Any]]] = {
        "train_step": lambda work: train_step_part(tiny, device, precision, resolution, 2 if tiny else TRAIN_BATCH,
                                                   warmup=1 if tiny else 2, iters=1 if tiny else 5),
        "build": lambda work: build_part(tiny, work),
        "generation": lambda work: generation_part(tiny, device, precision, resolution,
                                                   2 if tiny else GENERATION_STEPS),
    }
    wanted = [p for p in args.parts.split(",") if p]
    unknown = sorted(set(wanted) - set(runs))
    if unknown:
        parser.exit(2, f"error: unknown part(s) {', '.join(unknown)}; choose from {', '.join(runs)}\n")
    name_of_device = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    result: dict[str, Any] = {"device": name_of_device, "tiny": tiny, "memory_cap_gib": cap_gib, "parts": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for name in wanted:
            budget = BUDGETS_S[name]  # the tiny check too: a loaded CI machine is slow, and it only checks paths
            print(f"== {name} (budget {budget:.0f} s)", flush=True)
            start = time.perf_counter()
            part: dict[str, Any] = {}
            try:
                with wall_budget(budget):
                    _attempt(part, "result", device, lambda name=name: runs[name](Path(tmp) / name))
            except PartTimeout as error:
                part["result"] = {"error": f"PartTimeout: {error}"}
            part = part["result"]
            part.update(wall_s=time.perf_counter() - start, budget_s=budget)
            result["parts"][name] = part
    result["goals"] = goals(result["parts"], device, cap_gib)
    result["ray_imported"] = "ray" in sys.modules
    Path(args.json).write_text(json.dumps(_strict(result), indent=1, default=str, allow_nan=False))
    print_table(result)
    print(f"  JSON: {args.json}; Ray imported: {result['ray_imported']}")
    return result


if __name__ == "__main__":
    main()
