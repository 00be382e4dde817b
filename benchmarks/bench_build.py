"""Dataset-builder throughput: the Ray Data pipeline against a plain sequential loop over the same stage classes.

    python benchmarks/bench_build.py                     # CPU, tiny models: Ray pipeline vs sequential loop
    python benchmarks/bench_build.py --size full         # GPU: random full-size Grounding DINO (Swin-T), SAM ViT-H,
                                                         # DINOv2-base; each stage alone vs the whole pipeline

Every run goes through ``build_dataset`` (same records, same stages, same shard writing); only the executor differs.
Throughput is reported end to end (model loading / actor start included) and as the steady rate over the last
three quarters of the records (what a large build runs at), with the fixed start-up cost that separates the two and
the number of records from which the Ray build's longer start-up is paid back. The sequential loop runs with
torch's default thread count and with one thread (what each 1-CPU actor gets); the Ray pipeline runs with both
stage layouts (``data.stage_layout``: one actor pool running the whole chain, the default on CPUs, and one pool per
stage) and its chain layout is compared with the faster sequential run. The sequential runs share this warm process
(imports done), while Ray's actors import torch, transformers and spaCy afresh, so the start-up comparison favours
the sequential loop. ``--size full`` needs no Ray for the stage-alone timings; the whole pipeline runs on Ray when it is
installed (and not --pipeline-executor local), else sequentially (and says so). Without spaCy (the GPU image lacks it) the phrase stage is skipped and
the sample's ground-truth phrases feed the detector.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch

from mpalign.cli import ray_runtime_env
from mpalign.config import Config, SampleDataConfig, StageConfig, add_config_args, config_from_args
from mpalign.data.build import build_dataset
from mpalign.data.records import read_records
from mpalign.data.stages import STAGE_NAMES, STAGES
from mpalign.sample_data import generate_sample_dataset


def bench_tiny(cfg: Config, num_images: int, work: Path) -> dict[str, Any]:
    import ray

    path = generate_sample_dataset(work / "input", SampleDataConfig(num_images=num_images,
                                                                   num_videos=max(1, num_images // 8)))
    records = len(read_records(path))
    print(f"{records} records (images + frame pairs), {os.cpu_count()} CPU cores")
    default_threads = torch.get_num_threads()
    runs = [("sequential", "local", default_threads, "auto"), ("sequential", "local", 1, "auto"),
            ("Ray Data", "ray", None, "chain"), ("Ray Data", "ray", None, "per_stage")]
    results = {}
    for label, executor, threads, layout in runs:
        if executor == "ray" and not ray.is_initialized():
            ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                     runtime_env=ray_runtime_env())
        torch.set_num_threads(threads or default_threads)
        run_cfg = copy.deepcopy(cfg)
        run_cfg.data.stage_layout = layout
        stats = build_dataset(run_cfg, input=str(path), output=str(work / f"out-{len(results)}"), overwrite=True,
                              executor=executor, log=lambda _: None)
        this = stats["this_run"]
        key = (f"{label}, {threads} torch thread{'s' if threads != 1 else ''}" if threads
               else f"{label}, {layout} layout")
        # wall ≈ start_up + records / steady: the fixed cost (imports, models, actors) a build pays before its rate
        start_up = this["wall_s"] - records / this["steady_records_per_s"]
        results[key] = {"wall_s": this["wall_s"], "records_per_s": this["records_per_s"], "start_up_s": start_up,
                        "first_output_s": this["first_output_s"], "steady_records_per_s": this["steady_records_per_s"],
                        "samples": stats["samples"], "stages": this["stages"], "actor_pools": this["actor_pools"]}
        print(f"  {key:36s} {records} records in {this['wall_s']:6.1f} s = {this['records_per_s']:6.2f} rec/s end to "
              f"end; steady {this['steady_records_per_s']:6.2f} rec/s after a {start_up:4.1f} s start-up", flush=True)
    torch.set_num_threads(default_threads)
    assert len({r["samples"] for r in results.values()}) == 1, "the executors disagree"
    sequential = [r for k, r in results.items() if k.startswith("sequential")]
    best_steady = max(sequential, key=lambda r: r["steady_records_per_s"])
    ray_run = results["Ray Data, chain layout"]
    ratio_steady = ray_run["steady_records_per_s"] / best_steady["steady_records_per_s"]
    ratio_e2e = ray_run["records_per_s"] / max(r["records_per_s"] for r in sequential)
    break_even = max(_break_even(ray_run, r) for r in sequential)  # faster end to end than every sequential run
    print(f"Ray (chain layout) / best sequential: {ratio_steady:.2f}x steady (goal >= 1.5x), {ratio_e2e:.2f}x end to "
          f"end over {records} records; its longer start-up is paid back from ~{break_even:.0f} records on")
    for key, run in results.items():
        print(f"  stage busy s ({key}):", ", ".join(f"{k} {v['busy_s']:.2f}" for k, v in run["stages"].items()))
    return {"records": records, **results, "ratio_steady": ratio_steady, "ratio_end_to_end": ratio_e2e,
            "break_even_records": break_even}


def _break_even(fast: dict[str, Any], slow: dict[str, Any]) -> float:
    saved = 1 / slow["steady_records_per_s"] - 1 / fast["steady_records_per_s"]
    extra = fast["start_up_s"] - slow["start_up_s"]
    return max(0.0, extra / saved) if saved > 0 else float("inf")


# ------------------------------------------------------------------------------------------------------------------
# --size full: random-initialised full-size models, written in the layout real checkpoints use
# ------------------------------------------------------------------------------------------------------------------

def save_full_size_models(out: Path, dtype: torch.dtype) -> list[str]:
    """Grounding DINO (Swin-T + BERT-base, as grounding-dino-tiny), SAM ViT-H, DINOv2-base; tokenizers are the
    offline tiny ones (their ids are valid in BERT's / CLIP's real vocabularies). Returns the model.* overrides."""
    from transformers import (
        BitImageProcessor,
        Dinov2Config,
        Dinov2Model,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SamConfig,
        SamImageProcessor,
        SamModel,
        SamProcessor,
        SamVisionConfig,
    )

    from mpalign.tokenizers import tiny_bert_tokenizer, tiny_clip_tokenizer

    torch.manual_seed(0)
    parts = {
        "grounding_dino": (GroundingDinoForObjectDetection(GroundingDinoConfig()),
                           GroundingDinoProcessor(image_processor=GroundingDinoImageProcessor(),
                                                  tokenizer=tiny_bert_tokenizer())),
        "sam": (SamModel(SamConfig(vision_config=SamVisionConfig(hidden_size=1280, num_hidden_layers=32,
                                                                 num_attention_heads=16,
                                                                 global_attn_indexes=[7, 15, 23, 31]))),
                SamProcessor(image_processor=SamImageProcessor())),
        "dinov2": (Dinov2Model(Dinov2Config(image_size=518)),
                   BitImageProcessor(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224},
                                     do_center_crop=True, image_mean=[0.485, 0.456, 0.406],
                                     image_std=[0.229, 0.224, 0.225])),
    }
    for role, (model, processor) in parts.items():
        n = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"  {role}: {n:.0f}M parameters (random)")
        model.to(dtype).save_pretrained(out / role)
        processor.save_pretrained(out / role)
    for sub in ("tokenizer", "tokenizer_2"):  # the phrase stage's token positions
        tiny_clip_tokenizer().save_pretrained(out / "sdxl" / sub)
    return ["model.preset=pretrained", f"model.grounding_dino={out / 'grounding_dino'}", f"model.sam={out / 'sam'}",
            f"model.dinov2={out / 'dinov2'}", f"model.sdxl={out / 'sdxl'}"]


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _ground_truth_phrases(rows: list[dict[str, Any]], records_file: Path) -> None:
    truth = {json.loads(line)["id"]: json.loads(line)["objects"] for line in records_file.read_text().splitlines()}
    for row in rows:
        if row["reject_reason"] is None:
            row["phrases"] = [o["phrase"] for o in truth[row["id"]]]


def bench_full(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if device == "cuda" else torch.float32
    if args.check_with_tiny_models:
        from mpalign.zoo import save_tiny_zoo

        print(f"checking the --size full code path with the tiny zoo, saved to {work / 'models'}")
        overrides = [f"{k}={v}" for k, v in save_tiny_zoo(work / "models").items()] + ["data.image_size=128",
                                                                                     "data.crop_size=64"]
    else:
        print(f"device {device}, dtype {dtype}; writing random full-size models to {work / 'models'}")
        overrides = save_full_size_models(work / "models", dtype) + ["data.image_size=1024", "data.crop_size=224"]
    overrides += [f"model.device={device}", f"model.dtype={str(dtype).removeprefix('torch.')}",
                  "data.cache_clip=false", "data.cache_vae=false", "data.cache_text=false",
                  "data.box_threshold=0", "data.text_threshold=0", "data.min_box_area=0.0001",
                  f"data.rows_per_shard={args.batch_size}"]  # the chain's unit of work is a shard
    cfg = config_from_args(args, overrides)
    records_file = generate_sample_dataset(work / "input", SampleDataConfig(num_images=args.num_images, num_videos=0,
                                                                             image_size=512))
    rows = [{**r, "shard": 0} for r in read_records(records_file)]
    try:
        import spacy  # noqa: F401

        names = list(STAGE_NAMES)
    except ImportError:
        print("spaCy is not installed here: the phrase stage is skipped, ground-truth phrases feed the detector")
        names = [n for n in STAGE_NAMES if n != "phrases"]
    stages = {}
    for name in names:
        start = time.perf_counter()
        stages[name] = STAGES[name](cfg)
        print(f"  loaded {name} stage in {time.perf_counter() - start:.1f} s")
    batch = args.batch_size

    def run(stage, inputs):
        return [r for i in range(0, len(inputs), batch) for r in stage.run(inputs[i:i + batch])]

    inputs, alone = {}, {}
    current = rows
    for name in names:  # one pass to produce every stage's inputs (and warm every model up)
        inputs[name] = copy.deepcopy(current)
        current = run(stages[name], copy.deepcopy(current))
        if name == "decode" and "phrases" not in names:
            _ground_truth_phrases(current, records_file)
    for name in names:
        timed = copy.deepcopy(inputs[name])
        _sync()
        start = time.perf_counter()
        run(stages[name], timed)
        _sync()
        alone[name] = (time.perf_counter() - start) / len(rows)
    total = sum(alone.values())
    print(f"{len(rows)} images of 512 px → {cfg.data.image_size} px training images, batch {batch}")
    for name, seconds in alone.items():
        print(f"  {name:8s} alone: {1000 * seconds:8.1f} ms/img  {1 / seconds:8.2f} img/s")
    print(f"  sum of stages: {1000 * total:.1f} ms/img → ideal pipelined rate 1/sum = {1 / total:.2f} img/s")
    executor = "local"
    if args.pipeline_executor == "auto" and "phrases" in names:
        try:
            import ray  # noqa: F401

            executor = "ray"
        except ImportError:
            pass
    if executor == "local":
        print("  whole pipeline: sequential loop (Ray or spaCy missing here, or --pipeline-executor local): no "
              "overlap to measure")
    gpus = {"detect": 0.25, "segment": 0.5, "encode": 0.25}
    for name in STAGE_NAMES:
        cfg.data.stages.setdefault(name, StageConfig(batch_size=batch, num_gpus=gpus.get(name, 0.0)
                                                     if device == "cuda" else 0.0))
    if executor == "local":
        start = time.perf_counter()
        out = run_whole_locally(stages, names, rows, records_file, batch)
        wall = time.perf_counter() - start
        rate = len(out) / wall
    else:
        # the steady rate: actor start-up and model loading are not in the stage-alone times either
        rate = build_dataset(cfg, input=str(records_file), output=str(work / "dataset"), overwrite=True,
                             executor=executor, log=lambda _: None)["this_run"]["steady_records_per_s"]
    print(f"  whole pipeline ({executor}): {rate:.2f} img/s = {rate * total:.2f} x the ideal (goal >= 0.8)")
    return {"device": device, "per_image_s_alone": alone, "ideal_img_per_s": 1 / total, "pipeline_img_per_s": rate,
            "executor": executor, "fraction_of_ideal": rate * total}


def run_whole_locally(stages, names, rows, records_file, batch):
    out = []
    for i in range(0, len(rows), batch):
        current = copy.deepcopy(rows[i:i + batch])
        for name in names:
            current = stages[name].run(current)
            if name == "decode" and "phrases" not in names:
                _ground_truth_phrases(current, records_file)
        out += current
    _sync()
    return out


def main() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_args(parser)
    parser.add_argument("--size", choices=("tiny", "full"), default="tiny")
    parser.add_argument("--num-images", type=int, default=None, help="default: 1200 (tiny), 64 (full)")
    parser.add_argument("--batch-size", type=int, default=8, help="--size full: batch size of every stage")
    parser.add_argument("--work-dir", default=None, help="where inputs/outputs go (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--check-with-tiny-models", action="store_true",
                        help="--size full with the tiny zoo instead: a quick CPU check of that code path")
    parser.add_argument("--pipeline-executor", choices=("auto", "local"), default="auto",
                        help="--size full: the whole pipeline on Ray where it is installed (auto) or the sequential "
                             "loop (local; benchmarks/gpu_suite.py runs without Ray)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work_dir or tmp)
        if args.size == "tiny":
            result = bench_tiny(config_from_args(args), args.num_images or 1200, work)
        else:
            args.num_images = args.num_images or 64
            result = bench_full(args, work)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
