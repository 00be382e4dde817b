"""The per-stage layout's writer: how many full-size rows per second the driver turns into finished Parquet shards.

    python benchmarks/bench_writer.py [--rows 96] [--subjects 2] [--rows-per-shard 32] [--out DIR]

In the per-stage layout (``data.stage_layout=per_stage``, the default on a GPU cluster) every work row leaves the
last actor pool for the driver, which assembles each shard (frame pairs, per-subject arrays) and writes it
(``finish_shards_from_batches`` in ``mpalign/data/build.py``, the function timed here). At SDXL size a row is several
MB: a 1024 px PNG, a 1-bit mask and a 224 px reference crop per subject, VAE latents 4x128x128 fp16, prompt embeds
77x2048 fp16, CLIP ViT-bigG hidden states 257x1664 fp16 per subject, DINOv2-base vectors. Values are synthetic
(smooth noise for the pixels, so PNG compresses like a photo, random numbers for the tensors, which zstd cannot
shrink: the worst case for the writer), shapes are the real ones. The rows start as the Arrow batches Ray Data
hands the driver, so the figure includes the driver's Arrow → Python conversion, the assembly and the zstd write,
but not the transfer from the actors. Prints rows/s and MB/s for each part and for the whole.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from mpalign.config import load_config
from mpalign.data.assemble import assemble_shard
from mpalign.data.build import finish_shards_from_batches, write_shard
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
    parser.add_argument("--rows-per-shard", type=int, default=32)
    parser.add_argument("--batch-rows", type=int, default=8, help="rows per Arrow batch reaching the driver")
    parser.add_argument("--out", default=None, help="where to write (default: a temporary folder)")
    args = parser.parse_args()

    cfg = load_config(overrides=["data.image_size=1024", f"data.crop_size={CROP}",
                                 f"data.rows_per_shard={args.rows_per_shard}"])
    rng = np.random.default_rng(0)
    unique = [work_row(rng, i, args.subjects, 0) for i in range(min(args.rows, 8))]  # making rows is slow, not timed
    rows = [{**unique[i % len(unique)], "id": f"rec-{i:06d}", "shard": i // args.rows_per_shard}
            for i in range(args.rows)]
    batches = [pa.Table.from_pylist(rows[i:i + args.batch_rows], schema=WORK_SCHEMA)
               for i in range(0, len(rows), args.batch_rows)]
    row_mb = sum(b.nbytes for b in batches) / len(rows) / 2**20
    sizes = {s: sum(r["shard"] == s for r in rows) for s in {r["shard"] for r in rows}}
    print(f"{args.rows} rows of {row_mb:.2f} MB ({args.subjects} subjects each) in {len(sizes)} shards, "
          f"Arrow batches of {args.batch_rows}")

    with tempfile.TemporaryDirectory(prefix="bench-writer-", dir=args.out) as tmp:
        out = Path(tmp)
        for sub in ("samples", "rejects"):
            (out / sub).mkdir()
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
        written_mb = sum(p.stat().st_size for p in (out / "samples").iterdir()) / 2**20

        start, cpu_start = time.perf_counter(), time.process_time()
        finished = list(finish_shards_from_batches(batches, sizes, out, cfg))
        t_total, cpu_total = time.perf_counter() - start, time.process_time() - cpu_start
    assert len(finished) == len(sizes)

    n = args.rows
    for name, seconds in (("Arrow -> Python rows", t_convert), ("assemble (pairs, per-subject arrays)", t_assemble),
                          ("Parquet zstd write", t_write), ("whole driver path", t_total)):
        print(f"{name:38s} {n / seconds:8.1f} rows/s  {n * row_mb / seconds:8.1f} MB/s in")
    print(f"written: {written_mb / n:.2f} MB per row on disk")
    # CPU seconds as well: on a shared machine wall time also counts the time other processes held the core
    print(f"whole driver path per CPU-second: {n / cpu_total:.1f} rows/s (wall {t_total:.1f} s, CPU {cpu_total:.1f} s)")
    verdict = "below" if n / t_total < 100 else "above"
    print(f"the driver writes {n / t_total:.1f} rows/s: {verdict} the ~100 rows/s a multi-GPU build produces")


if __name__ == "__main__":
    main()
