"""The dataset builder: input records → Ray Data stages → Parquet shards of samples and rejects, resumably.

Layout of the output folder::

    samples/shard-00000.parquet ...   training rows (``ray.data.read_parquet(<out>/samples)``)
    rejects/shard-00000.parquet ...   one row per dropped record, with its reason
    stats.json                        counts and throughput per stage
    config.yaml                       the resolved config
    manifest.json                     what the shards were built from (resuming checks it)

The output is a local folder or a prefix on object storage (``s3://``; ``mpalign.data.output.OutputFolder``). Records
are split into shards up front (a clip's frames stay in one shard). A shard is finished in one place, which assembles
its frame pairs and writes its two files atomically: in the ``chain`` layout the Ray actor that ran the stages on it
(so the output must be object storage or a folder every node shares), in the ``per_stage`` layout one of
``data.shard_writers`` writer actors, which collects the shard's rows from the last pool. Either way samples never
pass through the driver, which gets a summary per finished shard. A rerun skips every shard whose samples file exists,
so a killed build resumes where it stopped and produces the same rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from mpalign.cli import start_ray
from mpalign.config import STAGE_LAYOUTS, ActorPoolConfig, Config, ConfigError, StageConfig
from mpalign.data.assemble import assemble_shard, safe_reject_row
from mpalign.data.output import OutputFolder
from mpalign.data.records import assign_shards, fingerprint, read_records
from mpalign.data.schema import (
    CONFIG_FILE,
    MANIFEST_FILE,
    REJECT_SCHEMA,
    REJECTS_DIR,
    SAMPLES_DIR,
    STATS_FILE,
    sample_schema,
)
from mpalign.data.segmentation import CROP_STYLES
from mpalign.data.stages import STAGE_NAMES, WORK_SCHEMA, StageChain

MANIFEST_VERSION = 1
# Where and how to build, not what: changing these between runs keeps the finished shards.
NOT_ROW_DATA_SETTINGS = ("path", "input", "sample", "stage_layout", "chain", "stages", "shard_writers")
# The model settings rows depend on (the frozen encoders); adapter sizes or the device may change between runs.
ROW_MODEL_SETTINGS = ("preset", "toy_weights", "dtype", "seed", "sdxl", "image_encoder", "image_encoder_subfolder",
                      "dinov2", "grounding_dino", "sam", "spacy")
# ... and with data.correspondences, the FLUX whose token grid the correspondence indices are on
CORRESPONDENCE_MODEL_SETTINGS = ("flux",)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def write_shard(out: OutputFolder, index: int, samples: list[dict[str, Any]], rejects: list[dict[str, Any]],
                cfg: Config) -> tuple[int, int]:
    """Rejects first, samples last: the samples file existing is what marks a shard finished. A sample the
    samples schema cannot hold becomes a ``stage_error`` reject of stage "write" instead of failing the shard
    (the reader already refuses what it knows would not fit; this is the net for what it does not know).
    Returns the (samples, rejects) written."""
    schema = sample_schema(cfg.data)
    try:
        table = pa.Table.from_pylist(samples, schema=schema)
    except (pa.ArrowException, ValueError, TypeError, OverflowError):  # find the rows that fail; keep the others
        kept = []
        for sample in samples:
            try:
                pa.Table.from_pylist([sample], schema=schema)
                kept.append(sample)
            except (pa.ArrowException, ValueError, TypeError, OverflowError) as row_exc:
                rejects.append(safe_reject_row({**sample, "reason": "stage_error", "stage": "write",
                                                "detail": f"{type(row_exc).__name__}: {row_exc}"[:500]}))
        samples, table = kept, pa.Table.from_pylist(kept, schema=schema)
    out.write_parquet(pa.Table.from_pylist(rejects, schema=REJECT_SCHEMA), REJECTS_DIR, shard_name(index))
    out.write_parquet(table, SAMPLES_DIR, shard_name(index))
    return len(samples), len(rejects)


def finish_shard(out: OutputFolder, index: int, rows: list[dict[str, Any]], cfg: Config) -> dict[str, Any]:
    """Assemble and write one shard from all its finished work rows; returns the summary the driver keeps: counts,
    and each row's reject stage and stage times (for stats.json)."""
    samples, rejects, pair_counts = assemble_shard(rows, cfg.data)
    n_samples, n_rejects = write_shard(out, index, samples, rejects, cfg)
    return {"shard": index, "samples": n_samples, "rejects": n_rejects, "frame_pairs": dict(pair_counts),
            "writer": _this_node(), "writer_pid": os.getpid(),
            "rows": [{k: row[k] for k in ("reject_stage", *(f"t_{n}" for n in STAGE_NAMES))} for row in rows]}


class ShardCollector:
    """The per-stage layout's shard writer: work rows of any shards, in any order and any batches → each shard
    finished (assembled and written) as soon as all its rows are in. In the build it runs as Ray actors
    (``data.shard_writers``), each collecting the shards ``ToShardWriters`` routes to it; ``add`` returns the
    summaries of the shards it finished. Rows are kept by id, so a batch handed over twice (one Ray Data retried) counts
    once."""

    def __init__(self, cfg: Config, out: OutputFolder, shard_sizes: dict[int, int]) -> None:
        self.cfg, self.out, self.shard_sizes = cfg, out, shard_sizes
        self.pending: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)

    def add(self, batch: pa.Table) -> list[dict[str, Any]]:
        finished = []
        for row in batch.to_pylist():
            rows = self.pending[row["shard"]]
            rows[row["id"]] = row
            if len(rows) == self.shard_sizes[row["shard"]]:
                finished.append(finish_shard(self.out, row["shard"], list(self.pending.pop(row["shard"]).values()),
                                             self.cfg))
        return finished


class ToShardWriters:
    """The per-stage layout's last step, a Ray Data actor pool (actors, not tasks: a task's fresh worker would import
    the builder each time once Ray has reaped the idle one): hands each shard's rows to the writer actor that collects
    that shard (shard index mod the number of writers; the rows go from the object store to the writer, never through
    the driver) and passes on, as JSON, the summaries of the shards they finished. It waits for the writers, so Ray
    Data's backpressure also holds back a stream the writers cannot keep up with."""

    def __init__(self, writers: list[Any]) -> None:
        self.writers = writers

    def __call__(self, batch: pa.Table) -> pa.Table:
        import pyarrow.compute as pc
        import ray

        shard = batch.column("shard")
        calls = [self.writers[i % len(self.writers)].add.remote(batch.filter(pc.equal(shard, i)))
                 for i in pc.unique(shard).to_pylist()]
        summaries = [json.dumps(summary) for finished in ray.get(calls) for summary in finished]
        return pa.table({"summary": pa.array(summaries, pa.string())})


def _shard_writers(cfg: Config, out: OutputFolder, shard_sizes: dict[int, int]) -> list[Any]:
    """The per-stage layout's writer actors. They reserve no CPU: the stage pools are already scaled to fill the
    cluster, and a reservation on top could never be granted (the build would wait forever). A local output folder
    is written on the driver's node, so a multi-node build needs no shared filesystem; object storage from anywhere."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    placement = "SPREAD" if not out.local else NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=False)
    writer = ray.remote(ShardCollector).options(num_cpus=0, scheduling_strategy=placement)
    return [writer.remote(cfg, out, shard_sizes) for _ in range(cfg.data.shard_writers)]


def _this_node() -> str:
    """The Ray node id of the process that wrote a shard (stats.json counts shards per writer node), or the host name
    outside Ray."""
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else os.uname().nodename


class ShardBuilder:
    """Every stage, then the shard's writing, in one actor: each batch Ray Data hands it is one shard's records
    (``batch_size=None`` over one block per shard), each output row one shard's summary as JSON."""

    def __init__(self, cfg: Config, out: OutputFolder) -> None:
        self.cfg, self.out = cfg, out
        self.chain = StageChain(cfg)

    def build(self, index: int, records: list[dict[str, Any]]) -> dict[str, Any]:
        return finish_shard(self.out, index, self.chain.run([dict(r) for r in records]), self.cfg)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if not self.out.visible_here(SAMPLES_DIR):
            raise ConfigError(f"output '{self.out}' is not on this Ray node ({os.uname().nodename}): the chain layout "
                              f"writes shards from the workers, so the output must be object storage (s3://) or a "
                              f"file system every node shares; or set data.stage_layout=per_stage")
        shards: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for record in batch.to_pylist():
            shards[record["shard"]].append(record)
        return pa.table({"summary": [json.dumps(self.build(i, records)) for i, records in shards.items()]})



def actor_pools(cfg: Config, cluster: dict[str, float]) -> list[tuple[tuple[str, ...], ActorPoolConfig]]:
    """The Ray pipeline's actor pools, in order: (the stages each actor runs, the pool's settings).

    ``data.stage_layout`` picks one pool per stage (``data.stages.<name>``) or one pool running the whole chain
    (``data.chain``). CPU/GPU shares are scaled down when the pools together ask for more than the cluster has:
    every pool must be able to run at once, or the stream stalls (five 1-CPU actors never fit on two cores)."""
    data = cfg.data
    if data.stage_layout not in STAGE_LAYOUTS:
        raise ConfigError(f"data.stage_layout must be one of {', '.join(STAGE_LAYOUTS)}, got '{data.stage_layout}'")
    unknown = sorted(set(data.stages) - set(STAGE_NAMES))
    if unknown:
        raise ConfigError(f"unknown dataset stage(s) {', '.join(unknown)} in data.stages; stages: {', '.join(STAGE_NAMES)}")
    per_stage = {name: data.stages.get(name, StageConfig()) for name in STAGE_NAMES}
    layout = data.stage_layout
    if layout == "auto":  # GPUs asked of the chain, or none anywhere: the chain; else one pool per stage
        stages_want_gpus = any(s.num_gpus > 0 for s in per_stage.values())
        chain = data.chain.num_gpus > 0 or not (cluster.get("GPU", 0.0) > 0 or stages_want_gpus)
        layout = "chain" if chain else "per_stage"
    chosen = [(STAGE_NAMES, data.chain)] if layout == "chain" else [((n,), s) for n, s in per_stage.items()]
    pools = []
    for names, settings in chosen:
        settings = dataclasses.replace(settings)
        if settings.concurrency <= 0:
            settings.concurrency = _actors_that_fit(settings, cluster)
        pools.append((names, settings))
    for resource, field in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        wanted = sum(getattr(s, field) * s.concurrency for _, s in pools)
        have = cluster.get(resource, 0.0)
        if wanted > 0 and resource == "GPU" and have == 0:
            raise ConfigError("the dataset stages ask for GPUs but the Ray cluster has none: set "
                              "data.stages.<stage>.num_gpus / data.chain.num_gpus to 0")
        if wanted > have > 0:
            scale = have / wanted
            print(f"[build] stages ask for {wanted:g} {resource}s, the cluster has {have:g}: each pool gets "
                  f"{scale:.2f}x its {field}", flush=True)
            for _, s in pools:
                setattr(s, field, getattr(s, field) * scale)
    memory = sum(s.memory_gb * s.concurrency for _, s in pools) * 2**30
    if memory > cluster.get("memory", float("inf")):
        raise ConfigError(f"the dataset's actor pools reserve {memory / 2**30:.1f} GB of memory (memory_gb x "
                          f"concurrency), the Ray cluster has {cluster['memory'] / 2**30:.1f} GB: lower their "
                          f"concurrency or memory_gb")
    return pools


def _actors_that_fit(settings: ActorPoolConfig, cluster: dict[str, float]) -> int:
    shares = (("CPU", settings.num_cpus), ("GPU", settings.num_gpus), ("memory", settings.memory_gb * 2**30))
    fits = [cluster.get(resource, 0.0) / share for resource, share in shares if share > 0]
    return max(1, int(min(fits))) if fits else 1


# A progress line per fifth of the shards or per minute, whichever comes first, and one for the last shard: a few
# lines for a small build, a steady pulse for a long one.
PROGRESS_FRACTION, PROGRESS_SECONDS = 0.2, 60.0


def progress_due(written: int, total: int, last_logged: int, seconds_since: float) -> bool:
    return (written == total or written - last_logged >= PROGRESS_FRACTION * total
            or seconds_since >= PROGRESS_SECONDS)


def _start_ray(cfg: Config, report: dict[str, Any]) -> list[tuple[tuple[str, ...], ActorPoolConfig]]:
    import ray

    start_ray(worker_logs=False, include_dashboard=False)  # shards report to the driver, which logs progress
    pools = actor_pools(cfg, ray.cluster_resources())
    report["actor_pools"] = {"+".join(names): vars(s) for names, s in pools}
    print("[build] Ray Data actor pools: " + "; ".join(f"{'+'.join(names)} x{s.concurrency} ({s.num_cpus:g} CPU, "
                                                       f"{s.num_gpus:g} GPU each)" for names, s in pools), flush=True)
    return pools


def _ray_options(pool: ActorPoolConfig) -> dict[str, Any]:
    import ray

    return {"compute": ray.data.ActorPoolStrategy(size=pool.concurrency), "num_cpus": pool.num_cpus,
            "num_gpus": pool.num_gpus, **({"memory": pool.memory_gb * 2**30} if pool.memory_gb > 0 else {})}


def _ray_shards(cfg: Config, shards: dict[int, list[dict[str, Any]]], out: OutputFolder, report: dict[str, Any]
                ) -> Iterator[dict[str, Any]]:
    """Shard summaries from the Ray Data pipeline, streaming, in the layout ``actor_pools`` picks."""
    import ray

    pools = _start_ray(cfg, report)
    if pools[0][0] == STAGE_NAMES:  # the chain: its actors build and write whole shards
        blocks = [pa.Table.from_pylist(records, schema=WORK_SCHEMA) for records in shards.values()]
        ds = ray.data.from_arrow(blocks).map_batches(ShardBuilder, fn_constructor_args=(cfg, out),
                                                     batch_size=None, batch_format="pyarrow", **_ray_options(pools[0][1]))
    else:  # one pool per stage, streaming rows; writer actors finish each shard once all its rows are out
        records = [r for rs in shards.values() for r in rs]
        first = pools[0][1]
        first.batch_size = min(first.batch_size, math.ceil(len(records) / first.concurrency))  # small inputs reach every actor
        ds = ray.data.from_items(records, override_num_blocks=math.ceil(len(records) / first.batch_size))
        for names, pool in pools:
            ds = ds.map_batches(StageChain, fn_constructor_args=(cfg, names), batch_format="pyarrow",
                                batch_size=pool.batch_size, **_ray_options(pool))
        writers = _shard_writers(cfg, out, {i: len(rs) for i, rs in shards.items()})
        ds = ds.map_batches(ToShardWriters, fn_constructor_args=(writers,), batch_format="pyarrow", batch_size=None,
                            compute=ray.data.ActorPoolStrategy(size=len(writers)), num_cpus=0)
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        yield from (json.loads(summary) for summary in batch.column("summary").to_pylist())
    report["ray_data_stats"] = ds.stats()


def _local_shards(cfg: Config, shards: dict[int, list[dict[str, Any]]], out: OutputFolder, report: dict[str, Any]
                  ) -> Iterator[dict[str, Any]]:
    """The same stage chain and shard writing in a plain loop: no Ray needed (the GPU benchmark machine has none)
    and the baseline the Ray pipeline is measured against."""
    builder = ShardBuilder(cfg, out)
    for index, records in shards.items():
        yield builder.build(index, records)


EXECUTORS = {"ray": _ray_shards, "local": _local_shards}


# What a build writes: deleted by --overwrite, and when an earlier build of other data finished no shard.
BUILD_FILES = (SAMPLES_DIR, REJECTS_DIR, STATS_FILE, MANIFEST_FILE, CONFIG_FILE)


def _check_manifest(out: OutputFolder, manifest: dict[str, Any], overwrite: bool) -> None:
    if overwrite:
        out.remove(*BUILD_FILES)
    elif out.exists(MANIFEST_FILE):
        try:
            old = json.loads(out.read_text(MANIFEST_FILE))
        except (ValueError, UnicodeDecodeError):
            old = {}
        if old.get("fingerprint") != manifest["fingerprint"] and not _parquet_files(out, SAMPLES_DIR):
            # a build that failed before finishing any shard: nothing to keep, so it never blocks the fixed rerun
            out.remove(*BUILD_FILES)  # rejects-only files of its unfinished shards included
        elif old.get("fingerprint") != manifest["fingerprint"]:
            raise ConfigError(f"output '{out}' holds a dataset built from another input or config; pass --overwrite "
                              f"to rebuild it or choose another --output")
    elif not out.is_empty():
        raise ConfigError(f"output '{out}' exists and is not a dataset built by this tool; pass --overwrite or choose "
                          f"another --output")
    out.make_folders(SAMPLES_DIR, REJECTS_DIR)
    out.write_text(MANIFEST_FILE, json.dumps(manifest, indent=1))


def _parquet_files(out: OutputFolder, subfolder: str) -> set[str]:
    return {name for name in out.file_names(subfolder) if name.endswith(".parquet")}


def _dataset_counts(out: OutputFolder) -> dict[str, Any]:
    """Counts over every finished shard (this run's and earlier runs'), read from the files themselves."""
    samples = out.read_parquet(SAMPLES_DIR, ["split", "num_subjects"]) if _parquet_files(out, SAMPLES_DIR) else (
        pa.table({"split": [], "num_subjects": []}))
    rejects = out.read_parquet(REJECTS_DIR, ["reason", "stage"]) if _parquet_files(out, REJECTS_DIR) else (
        pa.table({"reason": [], "stage": []}))
    return {
        "samples": samples.num_rows,
        "rejects": rejects.num_rows,
        "splits": dict(sorted(Counter(samples["split"].to_pylist()).items())),
        "subjects_per_sample": {str(k): v for k, v in sorted(Counter(samples["num_subjects"].to_pylist()).items())},
        "reject_reasons": dict(sorted(Counter(rejects["reason"].to_pylist()).items())),
    }


def _stage_stats(rows_seen: list[dict[str, Any]]) -> dict[str, Any]:
    """Rows each stage saw (live ones), rejected, and its busy time / throughput per actor-second."""
    order = {name: i for i, name in enumerate(STAGE_NAMES)}
    stats = {}
    for i, name in enumerate(STAGE_NAMES):
        entered = [r for r in rows_seen if r["reject_stage"] != "read" and order.get(r["reject_stage"], 99) >= i]
        busy = sum(r[f"t_{name}"] or 0.0 for r in rows_seen)
        stats[name] = {"rows_in": len(entered), "rejected": sum(r["reject_stage"] == name for r in rows_seen),
                       "busy_s": round(busy, 4), "rows_per_busy_s": round(len(entered) / busy, 3) if busy else None}
    return stats


def _steady_rate(arrivals: list[tuple[float, int]]) -> float | None:
    """Records per second over the last three quarters of the output: what a large build runs at, without the
    start-up (actors, models, the first batches). Not from the first batch on: parallel actors deliver their first
    batches together, which would count a burst as a rate. None under 8 batches: too few to tell a rate from a burst."""
    if len(arrivals) < 8:
        return None
    total, done = sum(n for _, n in arrivals), 0
    for when, n in arrivals:
        done += n
        if done >= total / 4:
            span = arrivals[-1][0] - when
            return round((total - done) / span, 3) if span > 0 else None
    return None


def build_dataset(cfg: Config, input: str | None = None, output: str | None = None, overwrite: bool = False,
                  max_shards: int | None = None, log: Callable[[str], None] | None = None,
                  executor: str = "ray") -> dict[str, Any]:
    """Build (or finish building) the dataset; returns the stats also written to ``<output>/stats.json``.

    ``input``: JSONL / Parquet / image folder (default ``cfg.data.input``, else the embedded sample); ``output``:
    default ``cfg.data.path``. ``max_shards`` builds at most that many unfinished shards and stops (incremental
    builds; the resume test). ``executor``: "ray" (the Ray Data pipeline; starts a local Ray when none is running)
    or "local" (the same stages in a plain loop, without Ray)."""
    from mpalign.sample_data import ensure_sample_dataset

    log = log or (lambda msg: print(msg, flush=True))
    if max_shards is not None and max_shards < 1:
        raise ConfigError(f"--max-shards must be at least 1, got {max_shards} (leave it out to build every shard)")
    if executor not in EXECUTORS:
        raise ConfigError(f"unknown executor '{executor}', expected one of {', '.join(EXECUTORS)}")
    if not cfg.data.cache_dinov2:
        raise ConfigError("data.cache_dinov2 must stay true: DINOv2 features are the alignment targets and always cached")
    if cfg.data.crop_style not in CROP_STYLES:
        raise ConfigError(f"data.crop_style must be one of {', '.join(CROP_STYLES)}, got '{cfg.data.crop_style}'")
    from mpalign.zoo import resolve_dtype

    try:
        resolve_dtype(cfg.data.vae_dtype)
    except ValueError as exc:
        raise ConfigError(f"data.vae_dtype: {exc}") from None
    out = OutputFolder(output or cfg.data.path)
    out.check_reachable()
    input_path = Path(input or cfg.data.input or ensure_sample_dataset(cfg.data.sample)).resolve()
    records = read_records(input_path)
    if not records:
        raise ConfigError(f"input '{input_path}' holds no records")
    shards = assign_shards(records, cfg.data.rows_per_shard)
    settings_key = {"data": {k: v for k, v in vars(cfg.data).items() if k not in NOT_ROW_DATA_SETTINGS},
                    "model": {k: getattr(cfg.model, k) for k in ROW_MODEL_SETTINGS
                              + (CORRESPONDENCE_MODEL_SETTINGS if cfg.data.correspondences else ())},
                    "version": MANIFEST_VERSION}
    manifest = {"input": str(input_path), "records": len(records), "shards": len(shards),
                "fingerprint": fingerprint(records, settings_key)}
    _check_manifest(out, manifest, overwrite)
    resolved = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, input=str(input_path), path=str(out)))
    out.write_text(CONFIG_FILE, resolved.to_yaml())

    finished = _parquet_files(out, SAMPLES_DIR)
    todo = [i for i in range(len(shards)) if shard_name(i) not in finished]
    skipped = len(shards) - len(todo)
    if max_shards is not None:
        todo = todo[:max_shards]
    log(f"[build] {len(records)} records in {len(shards)} shards from {input_path}: {skipped} already built, "
        f"building {len(todo)} → {out}")
    start = time.perf_counter()
    rows_seen: list[dict[str, Any]] = []
    arrivals: list[tuple[float, int]] = []  # (seconds since start, records) of each finished shard
    pair_counts: Counter[str] = Counter()
    writers: Counter[str] = Counter()  # shards written per node
    by_driver = 0  # shards written in this process: all of them without Ray, none in either Ray layout
    report: dict[str, Any] = {}
    last_logged, logged_at = 0, start
    if todo:
        work = {i: [{**r, "shard": i} for r in shards[i]] for i in todo}
        for written, summary in enumerate(EXECUTORS[executor](cfg, work, out, report), start=1):
            index, rows = summary["shard"], summary["rows"]
            arrivals.append((time.perf_counter() - start, len(rows)))
            if len(rows) != len(shards[index]):  # cannot happen unless a stage lost rows; never a silently short shard
                raise RuntimeError(f"shard {index} was written from {len(rows)} of its {len(shards[index])} records")
            if not out.exists(SAMPLES_DIR, shard_name(index)):
                raise ConfigError(f"shard {index} was written by a Ray worker but '{out}' does not show it here: the "
                                  f"chain layout writes shards from the workers, so the output must be object storage "
                                  f"(s3://) or a file system every node shares; or set data.stage_layout=per_stage")
            rows_seen += rows
            pair_counts.update(summary["frame_pairs"])
            writers[summary["writer"]] += 1
            by_driver += summary["writer"] == _this_node() and summary["writer_pid"] == os.getpid()
            now = time.perf_counter()
            if progress_due(written, len(todo), last_logged, now - logged_at):
                rate = len(rows_seen) / (now - start)
                log(f"[build] {written}/{len(todo)} shards written (last: shard {index}, {summary['samples']} samples, "
                    f"{summary['rejects']} rejects), {rate:.2f} records/s")
                last_logged, logged_at = written, now
        if len(arrivals) != len(todo):  # cannot happen unless a stage lost rows; never end with shards missing
            raise RuntimeError(f"{len(todo) - len(arrivals)} shard(s) never received all their records")
        if "ray_data_stats" in report:
            out.write_text("ray_data_stats.txt", report["ray_data_stats"])
    wall = time.perf_counter() - start
    stats = {
        "input": str(input_path),
        "records": len(records),
        "shards": {"total": len(shards), "built_now": len(todo), "skipped": skipped,
                   "finished": len(_parquet_files(out, SAMPLES_DIR) & {shard_name(i) for i in range(len(shards))})},
        **_dataset_counts(out),
        "frame_pairs": dict(pair_counts),
        "this_run": {"executor": executor, "records": len(rows_seen), "wall_s": round(wall, 3),
                     "records_per_s": round(len(rows_seen) / wall, 3) if rows_seen and wall else None,
                     "first_output_s": round(arrivals[0][0], 3) if arrivals else None,
                     "steady_records_per_s": _steady_rate(arrivals),
                     "actor_pools": report.get("actor_pools"),
                     "shards_by_writer_node": dict(writers),
                     "shards_written_by_driver": by_driver,
                     "stages": _stage_stats(rows_seen)},
    }
    out.write_text(STATS_FILE, json.dumps(stats, indent=1))
    log(f"[build] done: {stats['samples']} samples, {stats['rejects']} rejects "
        f"({', '.join(f'{k} {v}' for k, v in stats['reject_reasons'].items()) or 'none'}) → {out}")
    return stats
