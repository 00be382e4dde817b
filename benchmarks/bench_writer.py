"""The per-stage layout's writer: how many full-size rows per second become finished Parquet shards, written by one
process (where the driver wrote them until writing moved into actors) and by ``data.shard_writers`` Ray actors (how
the build writes them now), side by side.

    python benchmarks/bench_writer.py [--rows 96] [--subjects 2] [--rows-per-shard 24] [--writers 4] [--rounds 5]

In the per-stage layout (``data.stage_layout=per_stage``, the default on a GPU cluster) every work row leaves the
last actor pool for a writer, which assembles each shard (frame pairs, per-subject arrays) and writes it
(``ShardCollector`` in ``mpalign/data/build.py``, the class timed here). At SDXL size a row is several
MB: a 1024 px PNG, a 1-bit mask and a 224 px reference crop per subject, VAE latents 4x128x128 fp16, prompt embeds
77x2048 fp16, CLIP ViT-bigG hidden states 257x1664 fp16 per subject, DINOv2-base vectors. Values are synthetic
(smooth noise for the pixels, so PNG compresses like a photo, random numbers for the tensors, which zstd cannot
shrink: the worst case for the writer), shapes are the real ones. The rows start as Arrow batches (in the process;
for the actors, in Ray's object store, as the last stage leaves them), so the figures include the Arrow → Python
conversion, the assembly and the zstd write (and for the actors the routing, ``ToShardWriters``), not the stages.
Prints rows/s and MB/s for each part in one process, then both writers' rates, measured in turns in each round (so
load from other processes on a shared machine hits both alike).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mpalign.config import load_config
from mpalign.data.assemble import assemble_shard
from mpalign.data.build import ShardCollector, ToShardWriters, _shard_writers, write_shard
from mpalign.data.output import OutputFolder
from mpalign.data.schema import encode_png, pack_array
from mpalign.data.stages import STAGE_NAMES, WORK_SCHEMA

IMAGE, CROP, LATENT, TOKENS, TEXT_DIM, POOLED_DIM, CLIP_TOKENS, CLIP_DIM, DINO_DIM, PHRASE_DIM = (
    1024, 224, 128, 77, 2048, 1280, 257, 1664, 768, 768)


def photo_like(rng: np.random.Generator, side: int) -> np.ndarray:
    """Smooth colour fields plus sensor noise: compresses in PNG about as well as a photo (neither flat nor noise)."""
    coarse = rng.integers(0, 256, (side // 32, side // 32, 3)).astype(np.float32)
    smooth = np.kron(coarse, np.ones((32, 32, 1), np.float32))
    return np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)


def work_row(rng: np.random.Generator, index: int, subjects: int, shard: int) -> dict:
    f16 = np.float16
    mask = np.zeros((IMAGE, IMAGE), bool)
    mask[100:600, 200:700] = True
    row = {name: None for name in WORK_SCHEMA.names}
    row.update(
        id=f"rec-{index:06d}", image_path=f"/data/img-{index:06d}.jpg", caption="a dog and a cat on a sofa",
        shard=shard, image=encode_png(photo_like(rng, IMAGE)), original_size=[IMAGE, IMAGE], crop_top_left=[0, 0],
        phrases=["dog", "cat", "ball", "cube"][:subjects], phrase_char_spans=[[2, 5]] * subjects,
        phrase_token_positions=[[2]] * subjects, boxes=[[0.1, 0.1, 0.5, 0.5]] * subjects, box_scores=[0.9] * subjects,
        masks=[encode_png(mask)] * subjects, crops=[encode_png(photo_like(rng, CROP)) for _ in range(subjects)],
        dino_cls=pack_array(rng.standard_normal((subjects, DINO_DIM), np.float32)),
        dino_ref_patch_pooled=pack_array(rng.standard_normal((subjects, DINO_DIM), np.float32)),
        dino_patch_pooled=pack_array(rng.standard_normal(DINO_DIM, np.float32)),
        clip_hidden=pack_array(rng.standard_normal((subjects, CLIP_TOKENS, CLIP_DIM), np.float32).astype(f16)),
        latents=pack_array(rng.standard_normal((4, LATENT, LATENT), np.float32).astype(f16)),
        prompt_embeds=pack_array(rng.standard_normal((TOKENS, TEXT_DIM), np.float32).astype(f16)),
        pooled_prompt_embeds=pack_array(rng.standard_normal(POOLED_DIM, np.float32)),
        phrase_embeds=pack_array(rng.standard_normal((subjects, PHRASE_DIM), np.float32)),
        **{f"t_{name}": 0.0 for name in STAGE_NAMES},
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--subjects", type=int, default=2, help="subjects per row (1-4)")
    parser.add_argument("--rows-per-shard", type=int, default=24)
    parser.add_argument("--batch-rows", type=int, default=8, help="rows per Arrow batch leaving the last stage")
    parser.add_argument("--writers", type=int, default=None, help="writer actors (default: data.shard_writers)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds of each writer (the best counts)")
    parser.add_argument("--out", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    overrides = ["data.image_size=1024", f"data.crop_size={CROP}", f"data.rows_per_shard={args.rows_per_shard}"]
    cfg = load_config(overrides=overrides + ([f"data.shard_writers={args.writers}"] if args.writers else []))
    rng = np.random.default_rng(0)
    # every row its own values (~0.3 s a row to make, not timed): repeated values would let Parquet's dictionary
    # encoding skip most of the compression and overstate the rate
    rows = [work_row(rng, i, args.subjects, i // args.rows_per_shard) for i in range(args.rows)]
    batches = [pa.Table.from_pylist(rows[i:i + args.batch_rows], schema=WORK_SCHEMA)
               for i in range(0, len(rows), args.batch_rows)]
    row_mb = sum(b.nbytes for b in batches) / len(rows) / 2**20
    sizes = {s: sum(r["shard"] == s for r in rows) for s in {r["shard"] for r in rows}}
    print(f"{args.rows} rows of {row_mb:.2f} MB ({args.subjects} subjects each) in {len(sizes)} shards, "
          f"Arrow batches of {args.batch_rows}, {os.cpu_count()} CPUs")

    n = args.rows
    with tempfile.TemporaryDirectory(prefix="bench-writer-", dir=args.out) as tmp:
        out = OutputFolder(tmp)
        out.make_folders("samples", "rejects")
        start = time.perf_counter()
        py_rows = [r for b in batches for r in b.to_pylist()]
        t_convert = time.perf_counter() - start
        start = time.perf_counter()
        assembled = [assemble_shard([r for r in py_rows if r["shard"] == s], cfg.data) for s in sizes]
        t_assemble = time.perf_counter() - start
        start = time.perf_counter()
        for s, (samples, rejects, _) in zip(sizes, assembled):
            write_shard(out, s, samples, rejects, cfg)
        t_write = time.perf_counter() - start
        written_mb = sum(p.stat().st_size for p in (Path(tmp) / "samples").iterdir()) / 2**20
        for name, seconds in (("Arrow -> Python rows", t_convert), ("assemble (pairs, per-subject arrays)", t_assemble),
                              ("Parquet zstd write", t_write)):
            print(f"{name:38s} {n / seconds:8.1f} rows/s  {n * row_mb / seconds:8.1f} MB/s in")
        print(f"written: {written_mb / n:.2f} MB per row on disk")

        (one_process, one_process_cpu), (actors, actors_cpu) = compare_writers(cfg, out, sizes, batches, args.rounds)

    writers = cfg.data.shard_writers
    # CPU seconds as well: on a shared machine wall time also counts the time other processes held the cores
    print(f"best of {args.rounds} rounds, both from Ray's object store  rows/s  MB/s in  rows per CPU-second")
    for name, seconds, cpu in (("one process (the old driver path)", one_process, one_process_cpu),
                               (f"{writers} writer actors (the build now)", actors, actors_cpu.sum())):
        print(f"{name:42s} {n / seconds:8.1f} {n * row_mb / seconds:8.1f}  {n / cpu:8.1f}")
    print(f"  of which the writers {n / actors_cpu[0]:.1f} rows per CPU-second, the routers (ToShardWriters) "
          f"{n / actors_cpu[1]:.1f}")
    print(f"the actors write {one_process / actors:.2f}x the rows per second of one process (at most "
          f"{min(writers, len(sizes))} shards at once, on {os.cpu_count()} CPUs); a multi-GPU build produces ~100 rows/s")


def compare_writers(cfg, out: OutputFolder, sizes: dict[int, int], batches: list[pa.Table], rounds: int
                    ) -> tuple[tuple[float, float], tuple[float, np.ndarray]]:
    """(wall, CPU) seconds of the best round of one process (``ShardCollector`` in the driver, as the build wrote
    before) and of the build's writer actors (the batches routed by as many ``ToShardWriters`` actors as the build
    runs) to finish every shard. Both start from batches in Ray's object store, where the last stage leaves them;
    starting the actors is not timed, and the first rounds in fresh processes are slower (best of ``rounds``)."""
    import ray

    from mpalign.cli import start_ray

    start_ray(include_dashboard=False)
    try:
        writers = _shard_writers(cfg, out, sizes)
        routers = [ray.remote(ToShardWriters).options(num_cpus=0).remote(writers) for _ in writers]
        ray.get([actor.__ray_ready__.remote() for actor in writers + routers])
        refs = [ray.put(b) for b in batches]
        one_process, actors = [], []

        def actors_cpu() -> np.ndarray:  # CPU seconds of the writers and of the routers so far
            seconds = ray.get([actor.__ray_call__.remote(lambda _: time.process_time()) for actor in writers + routers])
            return np.array([sum(seconds[:len(writers)]), sum(seconds[len(writers):])])

        for _ in range(rounds):
            start, cpu = time.perf_counter(), time.process_time()
            collector = ShardCollector(cfg, out, sizes)
            finished = [summary for ref in refs for summary in collector.add(ray.get(ref))]
            one_process.append((time.perf_counter() - start, time.process_time() - cpu))
            assert len(finished) == len(sizes)

            start, cpu = time.perf_counter(), actors_cpu()
            running, finished, idle = {}, [], list(routers)  # one batch per router at a time, as Ray Data hands them
            for ref in refs:
                if not idle:
                    [done], _ = ray.wait(list(running))
                    finished.append(ray.get(done))
                    idle.append(running.pop(done))
                router = idle.pop()
                running[router.__call__.remote(ref)] = router
            finished += ray.get(list(running))
            actors.append((time.perf_counter() - start, actors_cpu() - cpu))
            assert sum(t.num_rows for t in finished) == len(sizes)
    finally:
        ray.shutdown()
    return min(one_process), min(actors)


if __name__ == "__main__":
    main()
