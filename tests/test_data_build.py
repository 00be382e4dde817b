"""End-to-end tiny builds on a local Ray: real images, procedural frame pairs and a planted set of bad records go
through every stage; the output must match the documented schema, reject exactly the bad records with their reasons,
resume after an interruption to the same rows, and feed the training batch contract."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpalign.batch import ALWAYS_KEYS, CACHED_KEYS, RAW_KEYS
from mpalign.config import SampleDataConfig, load_config
from mpalign.data.build import build_dataset, shard_name
from mpalign.data.collate import RowsCollateFn, load_dataset_split, rows_to_batch
from mpalign.data.schema import REJECT_REASONS, REJECT_SCHEMA, decode_png, sample_schema, unpack_array
from mpalign.data.stages import STAGE_NAMES
from mpalign.sample_data import generate_sample_dataset

REPO_ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent
OVERRIDES = ["data.rows_per_shard=8"]

# (relative path under shared/data, caption, video_id, frame_idx)
REAL = [
    ("dreambench/dog/00.jpg", "a dog on the grass", "dog-clip", 0),
    ("dreambench/dog/01.jpg", "a dog on the grass", "dog-clip", 1),
    ("dreambench/backpack/00.jpg", "a photo of a backpack", None, None),
    ("dreambench/teapot/00.jpg", "a teapot on a table", None, None),
    ("msbench/images/object/clock.jpg", "a clock", None, None),
    ("dreambench/cat/00.jpg", "a cat and a red ball", None, None),
]


def _bad_records(folder, shared_data) -> list[tuple[dict, str]]:
    """(record, expected reject reason) for one defect each."""
    folder.mkdir()
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    real = (shared_data / "dreambench" / "dog" / "00.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(real[: len(real) // 3])
    Image.new("RGB", (1, 1), "red").save(folder / "tiny.png")
    Image.new("1", (9000, 9000)).save(folder / "huge.png", compress_level=1)  # rejected from its header alone
    Image.new("RGB", (400, 40), "blue").save(folder / "thin.png")
    ok = str(shared_data / "dreambench" / "dog" / "00.jpg")
    return [
        ({"id": "bad-corrupt", "image": str(folder / "corrupt.jpg"), "caption": "a dog"}, "unreadable_image"),
        ({"id": "bad-truncated", "image": str(folder / "truncated.jpg"), "caption": "a dog"}, "unreadable_image"),
        ({"id": "bad-1x1", "image": str(folder / "tiny.png"), "caption": "a dog"}, "image_too_small"),
        ({"id": "bad-huge", "image": str(folder / "huge.png"), "caption": "a dog"}, "image_too_large"),
        ({"id": "bad-thin", "image": str(folder / "thin.png"), "caption": "a dog"}, "bad_aspect_ratio"),
        ({"id": "bad-missing", "image": str(folder / "nowhere.png"), "caption": "a dog"}, "missing_image"),
        ({"id": "bad-empty-caption", "image": ok, "caption": "   "}, "empty_caption"),
        ({"id": "bad-no-entity", "image": ok, "caption": "it is raining"}, "no_subject_phrase"),
        ({"id": "bad-too-many", "image": ok, "caption": "a dog, a cat, a ball, a cube and a star"},
         "too_many_subjects"),
        ({"id": "bad-no-image", "caption": "a dog"}, "bad_record"),
        ({"id": "img-real-0", "image": ok, "caption": "a dog"}, "duplicate_id"),
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory, shared_data, ray_local):
    """One input mixing every kind of record, built once for the module."""
    root = tmp_path_factory.mktemp("data-build")
    sample = generate_sample_dataset(root / "sample", SampleDataConfig(num_images=4, num_videos=3, image_size=128))
    records = []
    for line in sample.read_text().splitlines():
        rec = json.loads(line)
        rec["image"] = str(sample.parent / rec.pop("image"))
        rec.pop("objects")
        records.append(rec)
    good = [r["id"] for r in records]
    for i, (path, caption, video, frame) in enumerate(REAL):
        records.append({"id": f"img-real-{i}", "image": str(shared_data / path), "caption": caption,
                        "video_id": video, "frame_idx": frame})
        good.append(f"img-real-{i}")
    bad = _bad_records(root / "bad", shared_data)
    records += [r for r, _ in bad]
    lines = [json.dumps(r) for r in records] + ["{this line is not json"]
    (root / "records.jsonl").write_text("\n".join(lines) + "\n")
    cfg = load_config(overrides=OVERRIDES)
    stats = build_dataset(cfg, input=str(root / "records.jsonl"), output=str(root / "out"), log=lambda _: None)
    return {"root": root, "out": root / "out", "cfg": cfg, "stats": stats, "good": good,
            "bad": {r["id"]: reason for r, reason in bad}, "input": root / "records.jsonl", "records": len(lines),
            "shared_data": shared_data}


def _samples(out):
    return pq.read_table(out / "samples").sort_by("id")


def assert_same_rows(left, right):
    """Equal rows: everything bit for bit, except float caches, whose last bits depend on how records were batched
    (CPU matrix kernels pick their blocking by batch size)."""
    left, right = left.to_pylist(), right.to_pylist()
    assert [r["id"] for r in left] == [r["id"] for r in right]
    for a, b in zip(left, right):
        for key in a:
            if isinstance(a[key], bytes) and a[key].startswith(b"\x93NUMPY"):
                x, y = unpack_array(a[key]), unpack_array(b[key])
                assert x.dtype == y.dtype and x.shape == y.shape
                tol = 2 * float(np.finfo(x.dtype).eps) if x.dtype.kind == "f" else 0.0  # a rounding flip or two
                np.testing.assert_allclose(x.astype(np.float64), y.astype(np.float64), rtol=max(tol, 1e-5),
                                           atol=max(tol, 1e-5) * 0.1, err_msg=f"{a['id']}.{key}")
            else:
                assert a[key] == b[key], (a["id"], key)


def test_output_has_exactly_the_documented_schema_and_files(built):
    out, cfg = built["out"], built["cfg"]
    assert {p.name for p in out.iterdir()} >= {"samples", "rejects", "stats.json", "config.yaml", "manifest.json"}
    shards = sorted(p.name for p in (out / "samples").iterdir())
    assert shards == sorted(p.name for p in (out / "rejects").iterdir()) == [shard_name(i) for i in range(len(shards))]
    for path in (out / "samples").iterdir():
        assert pq.read_schema(path).remove_metadata() == sample_schema(cfg.data)
    for path in (out / "rejects").iterdir():
        assert pq.read_schema(path).remove_metadata() == REJECT_SCHEMA
    assert pq.ParquetFile(next((out / "samples").iterdir())).metadata.row_group(0).column(0).compression == "ZSTD"
    assert load_config(out / "config.yaml").data.path == str(out)


def test_every_good_record_is_a_sample_with_consistent_shapes(built):
    cfg = built["cfg"].data
    rows = _samples(built["out"]).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(built["good"])
    size = cfg.image_size
    for r in rows:
        n = r["num_subjects"]
        assert 1 <= n <= cfg.max_subjects and r["split"] in ("train", "val")
        assert len(r["phrases"]) == len(r["boxes"]) == len(r["masks"]) == len(r["reference_crops"]) == n
        assert len(r["phrase_token_positions"]) == len(r["reference_ids"]) == len(r["box_scores"]) == n
        for phrase, (start, end) in zip(r["phrases"], r["phrase_char_spans"]):
            assert r["caption"][start:end] == phrase
        boxes = np.array(r["boxes"])
        assert ((0 <= boxes) & (boxes <= 1)).all() and (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
        assert decode_png(r["image"]).shape == (size, size, 3) and r["image_size"] == size
        for mask, crop in zip(r["masks"], r["reference_crops"]):
            assert decode_png(mask).shape == (size, size) and decode_png(mask).dtype == bool
            assert decode_png(crop).shape == (cfg.crop_size, cfg.crop_size, 3)
        assert unpack_array(r["dino_cls"]).shape == (n, 32)
        assert unpack_array(r["dino_ref_patch_pooled"]).shape == (n, 32)
        assert unpack_array(r["dino_patch_pooled"]).shape == (32,)
        assert unpack_array(r["clip_hidden"]).shape == (n, 17, 48)
        assert unpack_array(r["clip_hidden"]).dtype == np.float16
        assert unpack_array(r["latents"]).shape == (4, size // 8, size // 8)
        assert unpack_array(r["prompt_embeds"]).shape == (77, 64)
        assert unpack_array(r["pooled_prompt_embeds"]).shape == (32,)
        assert unpack_array(r["phrase_embeds"]).shape == (n, 32)
        assert all(1 <= p <= 75 for pos in r["phrase_token_positions"] for p in pos)
    real = {r["id"]: r for r in rows if r["id"].startswith("img-real")}
    assert "dog" in real["img-real-0"]["phrases"] and "grass" not in real["img-real-0"]["phrases"]
    assert real["img-real-5"]["phrases"] == ["cat", "red ball"]
    with Image.open(built["shared_data"] / REAL[3][0]) as teapot:
        assert real["img-real-3"]["original_size"] == [teapot.height, teapot.width]


def test_frame_pairs_take_references_from_the_other_frame(built):
    rows = {r["id"]: r for r in _samples(built["out"]).to_pylist()}
    pairs = [r for r in rows.values() if r["video_id"] is not None]
    assert len(pairs) == 2 * 3 + 2  # every frame of every clip is a target once
    for r in pairs:
        partner = {o["id"] for o in rows.values() if o["video_id"] == r["video_id"] and o["id"] != r["id"]}
        assert set(r["reference_ids"]) <= partner | {r["id"]}
        for ref_id, ref_box, sim in zip(r["reference_ids"], r["reference_boxes"], r["reference_similarity"]):
            if ref_id == r["id"]:
                assert sim == 1.0  # fallback: the target's own crop
            else:
                assert ref_box in rows[ref_id]["boxes"] and sim >= built["cfg"].data.match_min_similarity
        # L_self's reference-image target: the whole frame the references were cut from
        frame = next((i for i in r["reference_ids"] if i != r["id"]), r["id"])
        assert r["dino_ref_image_patch_pooled"] == rows[frame]["dino_patch_pooled"]
    for r in rows.values():
        if r["video_id"] is None:
            assert r["dino_ref_image_patch_pooled"] == r["dino_patch_pooled"]
    assert any(set(r["reference_ids"]) & {o for o in rows if o != r["id"]} for r in pairs)
    assert rows["img-real-0"]["split"] == rows["img-real-1"]["split"]  # a clip never straddles splits
    assert built["stats"]["frame_pairs"]["pair_samples"] == len(pairs)


def test_bad_records_are_rejected_with_their_reason_and_nothing_else_is(built):
    rejects = pq.read_table(built["out"] / "rejects").to_pylist()
    by_id = {r["id"]: r for r in rejects}
    planted = {rid: by_id.get(rid, {}).get("reason") for rid in built["bad"]}
    planted["img-real-0"] = by_id.get("img-real-0#dup1", {}).get("reason")
    assert planted == built["bad"]
    invalid_json = [r for r in rejects if r["reason"] == "bad_record" and "invalid JSON" in r["detail"]]
    assert len(invalid_json) == 1
    assert len(rejects) == len(built["bad"]) + 1
    assert all(r["reason"] in REJECT_REASONS and r["detail"] for r in rejects)
    stats = built["stats"]
    assert stats["samples"] + stats["rejects"] == stats["records"] == built["records"]
    assert sum(stats["reject_reasons"].values()) == stats["rejects"]
    stages = stats["this_run"]["stages"]
    assert stages["decode"]["rows_in"] == built["records"] - 3  # the three rejected while reading never entered
    assert stages["encode"]["rows_in"] == stats["samples"]
    # correspond is a pass-through without data.correspondences (MOSAIC): every other stage did work
    assert all(s["busy_s"] > 0 for name, s in stages.items() if name != "correspond")
    assert json.loads((built["out"] / "stats.json").read_text()) == stats


def test_rows_collate_to_the_training_batch_contract(built):
    cfg = built["cfg"]
    rows = _samples(built["out"]).slice(0, 5).to_pydict()
    batch = rows_to_batch(rows, cfg)
    assert set(batch) == set(ALWAYS_KEYS) | set(CACHED_KEYS)
    S = cfg.model.max_subjects
    assert batch["subject_mask"].sum(1).tolist() == rows["num_subjects"]
    assert batch["boxes"].shape == (5, S, 4) and batch["dino_cls"].shape == (5, S, 32)
    assert batch["clip_hidden"].shape == (5, S, 17, 48) and batch["latents"].shape == (5, 4, 16, 16)
    assert (batch["boxes"][~batch["subject_mask"]] == 0).all()
    assert batch["time_ids"][:, 4:].eq(cfg.data.image_size).all()

    no_caches = load_config(overrides=OVERRIDES + ["data.cache_clip=false", "data.cache_vae=false",
                                                   "data.cache_text=false"])
    raw = rows_to_batch({k: v for k, v in rows.items() if k not in CACHED_KEYS}, no_caches)
    assert set(raw) == set(ALWAYS_KEYS) | set(RAW_KEYS)
    assert raw["pixel_values"].shape == (5, 3, 128, 128) and -1 <= raw["pixel_values"].min()
    assert raw["reference_pixels"].shape == (5, S, 3, 64, 64) and raw["reference_pixels"].max() <= 1
    assert raw["phrase_input_ids"].shape == (5, S, 77) and raw["input_ids"].shape == (5, 77)


def test_ray_dataset_split_feeds_iter_torch_batches(built):
    train = load_dataset_split(built["out"], "train")
    n_train = train.count()
    assert n_train + load_dataset_split(built["out"], "val").count() == built["stats"]["samples"]
    batches = list(train.iter_torch_batches(batch_size=4, collate_fn=RowsCollateFn(built["cfg"])))
    assert sum(b["boxes"].shape[0] for b in batches) == n_train
    assert set(batches[0]) == set(ALWAYS_KEYS) | set(CACHED_KEYS)


@pytest.mark.slow
def test_an_interrupted_build_resumes_to_the_same_rows(built):
    """Also the determinism check: two separate runs over the same input and seed, batched differently."""
    out = built["root"] / "resumed"
    first = build_dataset(built["cfg"], input=str(built["input"]), output=str(out), max_shards=1, log=lambda _: None)
    total = first["shards"]["total"]
    assert first["shards"]["finished"] == 1 < total
    # a kill while writing leaves a temp file and possibly a rejects file without its samples file
    (out / "samples" / f".{shard_name(1)}.tmp").write_bytes(b"half a parquet file")
    (out / "rejects" / shard_name(1)).write_bytes(b"stale")
    again = build_dataset(built["cfg"], input=str(built["input"]), output=str(out), log=lambda _: None)
    assert again["shards"] == {"total": total, "built_now": total - 1, "skipped": 1, "finished": total}
    assert_same_rows(_samples(out), _samples(built["out"]))
    rejects = [pq.read_table(o / "rejects").sort_by("id") for o in (out, built["out"])]
    assert rejects[0].equals(rejects[1])
    # nothing left to do: a third run builds nothing and changes nothing
    assert build_dataset(built["cfg"], input=str(built["input"]), output=str(out),
                         log=lambda _: None)["shards"]["built_now"] == 0


@pytest.mark.slow
def test_a_build_killed_with_sigkill_resumes_to_the_same_rows(built):
    """A real kill: the CLI's whole process group (driver, its local Ray, the actors) gets SIGKILL right after the
    first shard lands; one actor builds the shards one after another, so the others are still to come."""
    out = built["root"] / "killed"
    cmd = [sys.executable, str(REPO_ROOT / "pipelines" / "build_dataset.py"), "--input", str(built["input"]),
           "--output", str(out), *(a for o in OVERRIDES for a in ("--set", o)),
           "--set", "data.chain.concurrency=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not any((out / "samples").glob("shard-*.parquet")):
            assert proc.poll() is None and time.monotonic() < deadline, "the build ended or stalled before a shard"
            time.sleep(0.02)
    finally:
        with contextlib.suppress(ProcessLookupError):  # already gone: the assertion above says why
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    total = json.loads((out / "manifest.json").read_text())["shards"]
    finished = len(list((out / "samples").glob("shard-*.parquet")))
    assert 1 <= finished < total
    again = build_dataset(built["cfg"], input=str(built["input"]), output=str(out), log=lambda _: None)
    assert again["shards"] == {"total": total, "built_now": total - finished, "skipped": finished, "finished": total}
    assert_same_rows(_samples(out), _samples(built["out"]))
    rejects = [pq.read_table(o / "rejects").sort_by("id") for o in (out, built["out"])]
    assert rejects[0].equals(rejects[1])


def test_the_ray_free_local_executor_builds_the_same_rows(built):
    """The sequential loop the benchmark compares against (and the GPU machine without Ray runs) is the same builder."""
    out = built["root"] / "local"
    stats = build_dataset(built["cfg"], input=str(built["input"]), output=str(out), executor="local",
                          log=lambda _: None)
    assert stats["this_run"]["executor"] == "local" and stats["reject_reasons"] == built["stats"]["reject_reasons"]
    assert stats["this_run"]["shards_written_by_driver"] == stats["shards"]["built_now"]
    assert_same_rows(_samples(out), _samples(built["out"]))


def test_output_of_another_input_is_refused_without_overwrite(built, tmp_path):
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "image": "x.png", "caption": "a dog"}) + "\n")
    with pytest.raises(Exception, match="--overwrite"):
        build_dataset(built["cfg"], input=str(other), output=str(built["out"]), log=lambda _: None)


def test_resuming_is_refused_when_the_encoders_the_rows_came_from_change(built):
    """The toy weights are encoders too; FLUX only matters to rows with correspondences (its token grid)."""
    import dataclasses

    cfg = built["cfg"]
    for model in (dataclasses.replace(cfg.model, toy_weights="other-toy-weights"),
                  dataclasses.replace(cfg.model, sdxl="other-sdxl")):
        with pytest.raises(Exception, match="--overwrite"):
            build_dataset(dataclasses.replace(cfg, model=model), input=str(built["input"]),
                          output=str(built["out"]), log=lambda _: None)
    assert not cfg.data.correspondences
    other_flux = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, flux="other-flux"))
    again = build_dataset(other_flux, input=str(built["input"]), output=str(built["out"]), log=lambda _: None)
    assert again["shards"]["built_now"] == 0  # every shard kept


def test_cli_reports_user_mistakes_in_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "pipelines" / "build_dataset.py"), "--input",
                           str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: input") and len(proc.stderr.strip().splitlines()) == 1


def test_one_actor_pool_per_stage_builds_the_same_rows(built):
    """The default on a CPU-only Ray is one pool of actors running the whole chain; per-stage pools (the GPU layout)
    must give the same dataset. In both, Ray workers write the shards, never the driver."""
    assert list(built["stats"]["this_run"]["actor_pools"]) == ["+".join(STAGE_NAMES)]
    assert built["stats"]["this_run"]["shards_written_by_driver"] == 0
    cfg = load_config(overrides=OVERRIDES + ["data.stage_layout=per_stage", "data.shard_writers=2"])
    out = built["root"] / "per-stage"
    stats = build_dataset(cfg, input=str(built["input"]), output=str(out), log=lambda _: None)
    assert list(stats["this_run"]["actor_pools"]) == list(STAGE_NAMES)
    assert stats["this_run"]["shards_written_by_driver"] == 0 and stats["shards"]["built_now"] > 1
    assert stats["reject_reasons"] == built["stats"]["reject_reasons"]
    assert_same_rows(_samples(out), _samples(built["out"]))


def test_a_non_finite_cache_is_rejected_with_its_column_and_the_other_records_pass(tmp_path, monkeypatch):
    """A float16 SDXL VAE can return NaN latents for some images: the builder rejects that record (naming the
    column) instead of storing a cache that turns a training step into NaN weights."""
    import torch

    import mpalign.encoders

    real_vae_posterior = mpalign.encoders.vae_posterior
    calls = []

    def vae_posterior_nan_on_second_record(*args, **kwargs):
        mean, std = real_vae_posterior(*args, **kwargs)
        calls.append(len(mean))
        return (torch.full_like(mean, float("nan")) if len(calls) == 2 else mean), std

    monkeypatch.setattr(mpalign.encoders, "vae_posterior", vae_posterior_nan_on_second_record)
    sample = generate_sample_dataset(tmp_path / "sample", SampleDataConfig(num_images=4, num_videos=0, image_size=64))
    cfg = load_config(overrides=[*OVERRIDES, "data.stages.encode.batch_size=1"])
    stats = build_dataset(cfg, input=str(sample), output=str(tmp_path / "out"), executor="local", log=lambda _: None)
    assert calls == [1] * len(calls) and len(calls) >= 3
    rejects = pq.read_table(tmp_path / "out" / "rejects").to_pylist()
    non_finite = [r for r in rejects if r["reason"] == "non_finite_cache"]
    assert len(non_finite) == 1 and "latents" in non_finite[0]["detail"] and non_finite[0]["stage"] == "encode"
    samples = pq.read_table(tmp_path / "out" / "samples").to_pylist()
    assert len(samples) == len(calls) - 1 == stats["samples"]
    assert non_finite[0]["id"] not in {s["id"] for s in samples}
    assert all(np.isfinite(unpack_array(s["latents"])).all() for s in samples)
