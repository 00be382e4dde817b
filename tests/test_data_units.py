"""The dataset builder's pure functions: matching, box rules, crops, image validation, records and shards."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpalign.config import ConfigError, DataConfig, load_config
from mpalign.data.build import ShardBuilder, _steady_rate, actor_pools
from mpalign.data.detection import box_passes_rules, detector_prompt, phrase_token_spans, select_boxes
from mpalign.data.images import RejectRecord, decode_image
from mpalign.data.output import OutputFolder
from mpalign.data.pairs import match_subjects, reference_frames
from mpalign.data.records import assign_shards, read_records, split_of
from mpalign.data.schema import decode_png
from mpalign.data.segmentation import BACKGROUND_FILL, background_filled_crop, clean_mask, reference_crop
from mpalign.data.stages import STAGE_NAMES, WORK_SCHEMA, DecodeStage, DetectStage, Stage

# --- Hungarian matching -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_hungarian_matching_recovers_a_known_permutation(seed):
    rng = np.random.default_rng(seed)
    n = 2 + seed % 3
    target = rng.normal(size=(n, 64))
    perm = rng.permutation(n)  # target subject i is reference subject perm[i]
    reference = np.empty_like(target)
    reference[perm] = target + 0.3 * rng.normal(size=target.shape)
    matches = match_subjects(target, reference, min_similarity=0.5)
    assert [j for j, _ in matches] == perm.tolist()
    assert all(sim > 0.8 for _, sim in matches)


def test_matching_is_global_not_greedy():
    """Target 0 sits closest to reference 0, but only reference 0 suits target 1: greedy would pair (0, 0) and leave
    target 1 an orthogonal match; the Hungarian optimum pairs (0, 1) and (1, 0)."""
    def unit(deg):
        return [np.cos(np.radians(deg)), np.sin(np.radians(deg))]

    target = np.array([unit(10), unit(-60)])
    reference = np.array([unit(0), unit(30)])
    assert [j for j, _ in match_subjects(target, reference, 0.0)] == [1, 0]


def test_unmatched_and_dissimilar_subjects_fall_back():
    rng = np.random.default_rng(0)
    shared = rng.normal(size=(2, 32))
    stranger = np.zeros((1, 32))
    stranger[0, 0] = 1.0
    target = np.concatenate([shared, stranger, rng.normal(size=(1, 32))])  # 4 subjects, reference has 3
    reference = np.concatenate([shared[::-1], -stranger])  # the third is the stranger's opposite
    matches = match_subjects(target, reference, min_similarity=0.5)
    assert [j for j, _ in matches[:2]] == [1, 0]
    assert matches[2][0] is None  # matched to its opposite (cosine -1): below the threshold
    assert matches[3][0] is None  # no reference subject left for it
    assert match_subjects(target, np.zeros((0, 32)), 0.5) == [(None, 0.0)] * 4


def test_reference_frames_pair_each_frame_with_another_frame_of_its_clip():
    frames = [{"id": f"v-f{i}", "video_id": "v", "frame_idx": i} for i in range(4)]
    chosen = reference_frames(frames, seed=0)
    assert set(chosen) == {f["id"] for f in frames}
    assert all(ref is not None and ref["id"] != fid for fid, ref in chosen.items())
    assert chosen == reference_frames(list(reversed(frames)), seed=0)  # input order does not matter
    assert reference_frames(frames[:1], seed=0) == {"v-f0": None}


# --- detection rules --------------------------------------------------------------------------------------------

def test_phrase_token_spans_split_at_separators():
    ids = [101, 11, 12, 1012, 13, 1012, 102, 0, 0]
    assert phrase_token_spans(ids, 2) == [[1, 2], [4]]
    assert phrase_token_spans(ids, 3) == [[1, 2], [4], []]
    assert detector_prompt(["St. Bernard", "red ball"]) == "st  bernard . red ball ."


def test_box_rules():
    cfg = DataConfig()
    assert box_passes_rules((0.1, 0.1, 0.5, 0.5), cfg)
    assert not box_passes_rules((0.1, 0.1, 0.1, 0.5), cfg)  # degenerate
    assert not box_passes_rules((0.1, 0.1, 0.12, 0.12), cfg)  # too small
    assert not box_passes_rules((0.0, 0.0, 1.0, 1.0), cfg)  # too large
    assert not box_passes_rules((0.0, 0.4, 0.95, 0.5), cfg)  # too thin


def test_select_boxes_one_per_phrase_with_thresholds_and_overlap():
    cfg = DataConfig(box_threshold=0.3, text_threshold=0.25, max_box_overlap_iou=0.5)
    boxes = np.array([[0.1, 0.1, 0.5, 0.5], [0.12, 0.1, 0.5, 0.5], [0.6, 0.6, 0.9, 0.9], [0.0, 0.0, 1.0, 1.0]])
    probs = np.array([  # tokens: 1 = phrase A, 2 = phrase B, 3 = phrase C
        [0, 0.9, 0.8, 0.0],
        [0, 0.1, 0.7, 0.0],
        [0, 0.0, 0.4, 0.0],
        [0, 0.0, 0.0, 0.99],
    ])
    found = select_boxes(probs, boxes, [[1], [2], [3]], cfg)
    assert found[0].box == pytest.approx((0.1, 0.1, 0.5, 0.5)) and found[0].score == pytest.approx(0.9)
    # B's best queries overlap A's box; the next acceptable one is taken
    assert found[1].box == pytest.approx((0.6, 0.6, 0.9, 0.9))
    assert found[2] is None  # C's only query is the whole image: too large
    assert select_boxes(probs, boxes, [[1], []], cfg)[1] is None
    strict = DataConfig(box_threshold=0.95, text_threshold=0.95)
    assert select_boxes(probs, boxes, [[1]], strict) == [None]


def test_detect_stage_rejects_records_without_an_acceptable_box():
    cfg = load_config(overrides=["data.box_threshold=1.01"])
    rows = [{"id": "a", "reject_reason": None, "phrases": ["red ball"], "image_rgb": None,
             "phrase_char_spans": [[2, 10]], "phrase_token_positions": [[1, 2]]}]
    from mpalign.data.schema import pack_array

    rows[0]["image_rgb"] = pack_array(np.full((128, 128, 3), 90, np.uint8))
    out = DetectStage(cfg).run(rows)
    assert out[0]["reject_reason"] == "no_detection" and out[0]["reject_stage"] == "detect"


@pytest.mark.parametrize("override", ["data.boxes=gt", "data.masks=grabcut", "data.sample.caption_style=terse"])
def test_annotation_settings_are_checked_at_load(override):
    with pytest.raises(ConfigError, match=override.split("=")[0]):
        load_config(overrides=[override])


def test_annotated_boxes_go_to_the_phrases_that_name_them():
    from mpalign.data.detection import annotated_boxes

    found = annotated_boxes(["striped ball", "ring", "sand"], ["ring", "ball", "ball"],
                            [[0.5, 0.5, 1, 1], [0, 0, 0.4, 0.4], [0.1, 0.1, 0.2, 0.2]])
    assert found[0].box == (0, 0, 0.4, 0.4) and found[1].box == (0.5, 0.5, 1, 1) and found[2] is None
    assert annotated_boxes(["ball", "ball"], ["ball"], [[0, 0, 1, 1]])[1] is None  # one annotation, one phrase
    assert annotated_boxes(["football"], ["ball"], [[0, 0, 1, 1]]) == [None]  # whole words only


def test_annotation_stages_use_the_records_boxes_and_box_masks():
    from mpalign.data.schema import pack_array
    from mpalign.data.stages import SegmentStage

    cfg = load_config(overrides=["data.boxes=annotations", "data.masks=box"])
    detect, segment = DetectStage(cfg), SegmentStage(cfg)
    assert detect.detector is None and segment.sam is None  # no model loaded that the rows do not need
    rows = [{"id": "a", "reject_reason": None, "phrases": ["ball", "sky"], "phrase_char_spans": [[2, 6], [14, 17]],
             "phrase_token_positions": [[1], [4]], "annotated_phrases": ["ball"],
             "annotated_boxes": [[0.25, 0.25, 0.75, 0.75]],
             "image_rgb": pack_array(np.full((64, 64, 3), 90, np.uint8))}]
    rows = segment.run(detect.run(rows))
    assert rows[0]["phrases"] == ["ball"] and rows[0]["boxes"] == [[0.25, 0.25, 0.75, 0.75]]
    assert decode_png(rows[0]["masks"][0]).sum() == 32 * 32 * (255 if decode_png(rows[0]["masks"][0]).max() > 1 else 1)


def test_records_carry_their_objects_and_bad_objects_are_rejected(tmp_path):
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    lines = [{"id": "ok", "image": "a.png", "caption": "a ball", "objects": [{"phrase": "ball", "box": [0, 0, 0.5, 0.5]}]},
             {"id": "bad", "image": "a.png", "caption": "a ball", "objects": [{"phrase": "ball", "box": [0.5, 0, 0.2, 1]}]}]
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    ok, bad = read_records(tmp_path / "r.jsonl")
    assert ok["annotated_phrases"] == ["ball"] and ok["annotated_boxes"] == [[0, 0, 0.5, 0.5]]
    assert bad["reject_reason"] == "bad_record" and "not a normalised box" in bad["reject_detail"]


def test_a_stage_error_costs_only_the_record_that_caused_it():
    class Fragile(Stage):
        name = "decode"

        def process(self, rows):
            for row in rows:
                if row["id"] == "bad":
                    raise ValueError("boom")
                row["caption"] = "done"

    rows = [{"id": i, "reject_reason": None, "caption": ""} for i in ("a", "bad", "c")]
    out = Fragile(load_config()).run(rows)
    assert [r["caption"] for r in out] == ["done", "", "done"]
    assert out[1]["reject_reason"] == "stage_error" and "boom" in out[1]["reject_detail"]
    assert all(r["t_decode"] >= 0 for r in out)


# --- masks and crops ----------------------------------------------------------------------------------------------

def test_background_filled_crop_keeps_only_the_masked_subject():
    image = np.zeros((100, 100, 3), np.uint8)
    image[20:40, 30:70] = (200, 10, 10)
    mask = np.zeros((100, 100), bool)
    mask[20:40, 30:70] = True
    crop = background_filled_crop(image, mask, (0.3, 0.2, 0.7, 0.4), 32)
    assert crop.shape == (32, 32, 3)
    # a 40x20 box padded to a square: subject band in the middle, background fill above and below
    assert (crop[0] == BACKGROUND_FILL).all() and (crop[-1] == BACKGROUND_FILL).all()
    assert np.abs(crop[16].astype(int) - (200, 10, 10)).max() < 20


def test_release_crop_blacks_out_the_background_and_stretches_the_box():
    image = np.full((100, 100, 3), 90, np.uint8)  # grey background inside the box too
    image[20:40, 30:50] = (200, 10, 10)
    mask = np.zeros((100, 100), bool)
    mask[20:40, 30:50] = True  # the left half of a 40x20 box
    crop = reference_crop(image, mask, (0.3, 0.2, 0.7, 0.4), 32, "release")
    assert crop.shape == (32, 32, 3)
    # the 40x20 box fills the whole square (stretched, no padding): subject on the left, black on the right
    assert np.abs(crop[:, :14].astype(int) - (200, 10, 10)).max() < 20
    assert (crop[:, 18:] == 0).all()
    square = reference_crop(image, mask, (0.3, 0.2, 0.7, 0.4), 32, "white_square")
    assert np.array_equal(square, background_filled_crop(image, mask, (0.3, 0.2, 0.7, 0.4), 32))
    with pytest.raises(ValueError, match="crop_style"):
        reference_crop(image, mask, (0.3, 0.2, 0.7, 0.4), 32, "grey")


def test_failed_sam_masks_fall_back_to_the_box():
    empty = np.zeros((50, 50), bool)
    assert clean_mask(empty, (0.2, 0.2, 0.6, 0.6)).sum() == 20 * 20
    full = np.ones((50, 50), bool)
    assert clean_mask(full, (0.2, 0.2, 0.6, 0.6)).sum() == 20 * 20  # never outside its box


# --- image validation -------------------------------------------------------------------------------------------

def _png(size, mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize("data, reason", [
    (_png((1, 1)), "image_too_small"),
    (_png((400, 40)), "bad_aspect_ratio"),
    (b"definitely not an image", "unreadable_image"),
    (_png((300, 300))[:200], "unreadable_image"),
])
def test_decode_rejects_bad_images(data, reason):
    with pytest.raises(RejectRecord) as err:
        decode_image("", data, DataConfig())
    assert err.value.reason == reason


def test_decode_resizes_to_the_training_square_and_reports_the_crop():
    pixels, original, crop = decode_image("", _png((200, 100)), DataConfig(image_size=64))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert original == (100, 200) and crop == (0, 32)
    with pytest.raises(RejectRecord) as err:
        decode_image("/no/such/file.png", None, DataConfig())
    assert err.value.reason == "missing_image"


# --- records, ids, shards, splits -------------------------------------------------------------------------------

def test_read_records_from_jsonl_parquet_and_folder(tmp_path):
    lines = [json.dumps({"id": "a", "image": "a.png", "caption": "a dog"}),
             "{not json",
             json.dumps({"image": "b.png", "caption": "a cat", "video_id": "v", "frame_idx": 3}),
             json.dumps({"id": "a", "image": "c.png", "caption": "a cow"}),
             json.dumps({"id": "d", "caption": "no image"}),
             json.dumps({"id": "e", "image": "e.png", "caption": 5})]
    (tmp_path / "r.jsonl").write_text("\n".join(lines) + "\n")
    records = read_records(tmp_path / "r.jsonl")
    assert [r["reject_reason"] for r in records] == [None, "bad_record", None, "duplicate_id", "bad_record",
                                                    "bad_record"]
    assert records[0]["image_path"] == str(tmp_path / "a.png")
    assert records[2]["id"].startswith("rec-") and records[2]["id"] == read_records(tmp_path / "r.jsonl")[2]["id"]
    assert records[2]["video_id"] == "v" and records[2]["frame_idx"] == 3
    assert len({r["id"] for r in records}) == len(records)

    pq.write_table(pa.table({"id": ["p"], "image": [_png((64, 64))], "caption": ["a ball"]}), tmp_path / "in.parquet")
    (parquet,) = read_records(tmp_path / "in.parquet")
    assert parquet["image_bytes"].startswith(b"\x89PNG") and parquet["reject_reason"] is None
    (decoded,) = DecodeStage(load_config()).run([dict(parquet)])  # inline bytes decode like files do
    assert decoded["reject_reason"] is None and decoded["image_bytes"] is None
    assert decoded["original_size"] == [64, 64] and decode_png(decoded["image"]).shape == (128, 128, 3)

    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    (folder / "sub" / "x.png").write_bytes(_png((64, 64)))
    (folder / "sub" / "x.txt").write_text("a red ball\n")
    (folder / "y.jpg").write_bytes(b"junk")
    got = read_records(folder)
    assert [(r["id"], r["caption"]) for r in got] == [("sub/x", "a red ball"), ("y", "")]


def test_shards_keep_clips_together_and_splits_are_deterministic():
    records = [{"id": f"r{i}", "video_id": None, "reject_reason": None} for i in range(5)]
    records += [{"id": f"v{i}", "video_id": "clip", "reject_reason": None} for i in range(3)]
    records.insert(1, {"id": "late", "video_id": "clip", "reject_reason": None})
    shards = assign_shards(records, rows_per_shard=3)
    clip_shards = {i for i, s in enumerate(shards) for r in s if r["video_id"] == "clip"}
    assert len(clip_shards) == 1
    assert sorted(r["id"] for s in shards for r in s) == sorted(r["id"] for r in records)
    assert shards == assign_shards(records, rows_per_shard=3)
    splits = [split_of(f"id-{i}", 0.2) for i in range(2000)]
    assert splits == [split_of(f"id-{i}", 0.2) for i in range(2000)]
    assert 0.15 < splits.count("val") / len(splits) < 0.25


# --- the documented format ----------------------------------------------------------------------------------------

def _documented_columns(section: str) -> list[str]:
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "docs" / "dataset.md").read_text()
    table = text.split(f"### {section}\n", 1)[1].strip().split("\n\n", 1)[0]
    names = []
    for line in table.splitlines()[2:]:
        cell = line.split("|")[1]
        names += [c.strip(" `") for c in cell.split(",")]
    return names


def test_docs_describe_exactly_the_written_columns():
    from mpalign.data.schema import REJECT_SCHEMA, sample_schema

    everything_on = DataConfig(cache_dinov2_patch_grid=True, correspondences=True)
    assert _documented_columns("samples") == sample_schema(everything_on).names
    assert _documented_columns("rejects") == REJECT_SCHEMA.names


def _pools(overrides, cluster):
    return [(names, vars(s)) for names, s in actor_pools(load_config(overrides=overrides), cluster)]


def test_auto_layout_chains_every_stage_on_cpus_and_splits_them_on_gpus():
    cpu_only = _pools([], {"CPU": 2.0})
    assert cpu_only == [(STAGE_NAMES, {"concurrency": 2, "num_cpus": 1.0, "num_gpus": 0.0, "memory_gb": 0.0})]
    gpu = _pools(["data.stages.encode.num_gpus=1", "data.stages.encode.concurrency=2"], {"CPU": 16.0, "GPU": 2.0})
    assert [names for names, _ in gpu] == [(name,) for name in STAGE_NAMES]
    assert [s["concurrency"] for _, s in gpu] == [1, 1, 1, 1, 2, 1] and gpu[4][1]["num_gpus"] == 1.0
    chain_on_gpus = _pools(["data.chain.num_gpus=0.5"], {"CPU": 16.0, "GPU": 2.0})  # asked for: not ignored
    assert chain_on_gpus == [(STAGE_NAMES, {"concurrency": 4, "num_cpus": 1.0, "num_gpus": 0.5, "memory_gb": 0.0})]


def test_pools_are_scaled_down_to_fit_the_cluster():
    per_stage = _pools(["data.stage_layout=per_stage"], {"CPU": 2.0})
    assert [s["num_cpus"] for _, s in per_stage] == pytest.approx([1 / 3] * 6)  # six 1-CPU actors on two cores
    chain = _pools(["data.stage_layout=chain", "data.chain.num_gpus=0.5"], {"CPU": 8.0, "GPU": 2.0})
    assert chain == [(STAGE_NAMES, {"concurrency": 4, "num_cpus": 1.0, "num_gpus": 0.5, "memory_gb": 0.0})]
    big_models = _pools(["data.stage_layout=chain", "data.chain.memory_gb=16"], {"CPU": 64.0, "memory": 100 * 2**30})
    assert big_models[0][1]["concurrency"] == 6  # memory, not the 64 cores, bounds the actors
    too_many = _pools(["data.stage_layout=chain", "data.chain.concurrency=4"], {"CPU": 2.0})
    assert too_many[0][1]["num_cpus"] == pytest.approx(0.5)


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.stage_layout=pipelined"], "data.stage_layout' must be one of auto, chain, per_stage"),
    (["data.stages.decoder.batch_size=4"], "unknown dataset stage"),
    (["data.stages.encode.num_gpus=1"], "ask for GPUs but the Ray cluster has none"),
    (["data.stage_layout=chain", "data.chain.num_gpus=1"], "ask for GPUs but the Ray cluster has none"),
    (["data.chain.concurrency=2", "data.chain.memory_gb=16"], "reserve 32.0 GB of memory"),
])
def test_bad_pool_settings_are_config_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        _pools(overrides, {"CPU": 2.0, "memory": 24 * 2**30})


def test_steady_rate_skips_the_start_up_and_the_first_burst():
    # two actors after a 10 s start-up, each delivering 32 records every 0.5 s: 128 records/s
    arrivals = [(10.0 + 0.5 * (i // 2) + 0.01 * (i % 2), 32) for i in range(40)]
    assert _steady_rate(arrivals) == pytest.approx(128, rel=0.03)
    assert _steady_rate(arrivals[:7]) is None  # too few batches to tell a rate from a burst


def test_a_chain_actor_that_cannot_see_the_output_asks_for_shared_storage(tmp_path):
    builder = ShardBuilder(load_config(), OutputFolder(tmp_path / "on-another-node"))
    with pytest.raises(ConfigError, match="every node shares"):
        builder(pa.Table.from_pylist([], schema=WORK_SCHEMA))


def test_a_flat_folder_and_a_file_upload_into_local_folders_that_do_not_exist_yet(tmp_path):
    """A MOSAIC adapter is one flat folder (config + LoRA): uploading it made no destination folder (make demo)."""
    source = tmp_path / "adapter"
    source.mkdir()
    (source / "config.json").write_text("{}")
    out = OutputFolder(tmp_path / "train")
    out.upload(source, "adapter")
    out.upload(source / "config.json", "validation", "config.json")
    assert (tmp_path / "train" / "adapter" / "config.json").read_text() == "{}"
    assert (tmp_path / "train" / "validation" / "config.json").is_file()


def test_build_progress_is_a_few_lines_for_a_small_build_and_a_pulse_for_a_long_one():
    from mpalign.data.build import progress_due

    logged, last = [], 0
    for written in range(1, 33):  # 32 shards written within seconds
        if progress_due(written, 32, last, seconds_since=1.0):
            logged.append(written)
            last = written
    assert logged == [7, 14, 21, 28, 32]
    assert progress_due(3, 1000, 2, seconds_since=61.0)  # a slow build still shows it is alive every minute
