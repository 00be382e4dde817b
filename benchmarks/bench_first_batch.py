"""Time to the first training batch as the dataset grows: the training read (mpalign.train.load_datasets) against the
old read with ``randomize_block_order``, an all-to-all step that reads every file before the first batch.

    python benchmarks/bench_first_batch.py                       # builds a small tiny-preset dataset first
    python benchmarks/bench_first_batch.py --source outputs/tiny/dataset --files 40 --scale 10

From a built dataset (``--source``; default: the tiny preset's builder on a small embedded sample) it writes two
datasets of the real schema: ``--files`` shards of ``--rows-per-file`` rows, and one ``--scale`` times as many shards
(rows are the source's, repeated with new ids). For each it times, on a local Ray, the first batch of the training
iterator (the worker's ``iter_batches`` arguments, streaming: ``train.materialize_max_gb=0``) and of the old plan,
``--repeats`` times each, and prints the medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mpalign.cli import ray_runtime_env
from mpalign.config import load_config
from mpalign.data.schema import SAMPLES_DIR


def build_source(out: Path) -> Path:
    from mpalign.data.build import build_dataset

    if not (out / "stats.json").is_file():
        cfg = load_config(overrides=["data.sample.num_images=8", "data.sample.num_videos=2", f"data.path={out}"])
        build_dataset(cfg, output=str(out), overwrite=True, log=lambda _: None)
    return out


def write_shards(source: Path, out: Path, files: int, rows_per_file: int) -> Path:
    """``files`` Parquet shards of the source's rows (repeated, ids made unique), consecutive rows in each."""
    if (out / SAMPLES_DIR).is_dir() and len(list((out / SAMPLES_DIR).glob("*.parquet"))) == files:
        return out
    table = pq.read_table(source / SAMPLES_DIR)
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    for shard in range(files):
        rows = [(shard * rows_per_file + i) % table.num_rows for i in range(rows_per_file)]
        part = table.take(pa.array(rows))
        ids = pc.binary_join_element_wise(part["id"], pa.array([f"#rep{shard}-{i}" for i in range(len(rows))]), "")
        part = part.set_column(part.schema.get_field_index("id"), "id", ids)
        pq.write_table(part, out / SAMPLES_DIR / f"shard-{shard:05d}.parquet", compression="zstd")
    return out


def first_batch_seconds(dataset: Path, old_plan: bool) -> float:
    import ray.data
    from ray.data.expressions import col

    from mpalign.train import load_datasets

    cfg = load_config(overrides=[f"data.path={dataset}", "train.materialize_max_gb=0"])
    train = cfg.train
    start = time.perf_counter()
    if old_plan:  # what mpalign.train did before: every column, a fixed-seed all-to-all block shuffle
        ds = ray.data.read_parquet(str(dataset / SAMPLES_DIR)).filter(expr=col("split") == "train")
        ds = ds.randomize_block_order(seed=train.seed)
        buffer = 4 * train.batch_size
    else:
        ds = load_datasets(cfg)["train"]
        buffer = max(train.shuffle_buffer_rows, train.batch_size)
    batches = ds.iter_batches(batch_size=train.batch_size, batch_format="numpy", drop_last=True,
                              local_shuffle_buffer_size=buffer, local_shuffle_seed=train.seed)
    next(iter(batches))
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", default="", help="a built dataset (default: build a small tiny-preset one)")
    parser.add_argument("--out", default="outputs/bench-first-batch")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--rows-per-file", type=int, default=32)
    parser.add_argument("--scale", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    out = Path(args.out)
    source = Path(args.source) if args.source else build_source(out / "source")
    sizes = {"1x": args.files, f"{args.scale}x": args.files * args.scale}
    datasets = {name: write_shards(source, out / name, files, args.rows_per_file) for name, files in sizes.items()}
    if ray.is_initialized():  # the source build ran on its own local Ray; this one gets a fixed CPU count
        ray.shutdown()
    ray.init(address="local", num_cpus=min(os.cpu_count() or 2, 4), object_store_memory=1 << 30,
             include_dashboard=False, log_to_driver=False, runtime_env=ray_runtime_env())
    results = {}
    for name, path in datasets.items():
        stored = sum(f.stat().st_size for f in (path / SAMPLES_DIR).glob("*.parquet")) / 2**20
        for plan in ("training", "old"):
            times = [first_batch_seconds(path, old_plan=plan == "old") for _ in range(args.repeats)]
            results[f"{name}/{plan}"] = {"files": sizes[name], "rows": sizes[name] * args.rows_per_file,
                                         "stored_mib": round(stored, 1), "median_s": round(statistics.median(times), 3),
                                         "runs_s": [round(t, 3) for t in times]}
    ray.shutdown()
    print(f"time to first batch (median of {args.repeats}; local Ray, {min(os.cpu_count() or 2, 4)} CPUs)")
    for key, r in results.items():
        print(f"  {key:16s} {r['files']:5d} files {r['rows']:6d} rows {r['stored_mib']:8.1f} MiB  "
              f"{r['median_s']:7.3f} s  {r['runs_s']}")
    big = f"{args.scale}x"
    for plan in ("training", "old"):
        ratio = results[f"{big}/{plan}"]["median_s"] / results[f"1x/{plan}"]["median_s"]
        print(f"  {plan} read: {big} dataset / 1x dataset = {ratio:.2f}")
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
