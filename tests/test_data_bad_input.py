"""Hostile input to the dataset builder: one record never kills a build, every bad record is one reject row with its
reason, no good record is lost or silently altered. Built with the Ray-free executor (the same stages and writer as
the Ray pipeline, which tests/test_data_build.py compares against it)."""

from __future__ import annotations

import codecs
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from mpalign.config import ConfigError, load_config
from mpalign.data.build import build_dataset
from mpalign.data.images import to_rgb
from mpalign.data.phrases import unsupported_language
from mpalign.data.records import read_records
from mpalign.data.schema import REJECT_REASONS, REJECT_SCHEMA, decode_png

CAPTION = "a dog on the grass"


def _line(record: dict, ascii_only: bool = True) -> bytes:
    return json.dumps(record, ensure_ascii=ascii_only).encode()


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, shared_data):
    """An input with one good record first behind a byte-order mark, then every kind of hostile line, built once."""
    root = tmp_path_factory.mktemp("hostile")
    dog = str(shared_data / "dreambench" / "dog" / "00.jpg")
    gray16 = root / "gray16.png"  # 16-bit grey, every value above 255: Pillow's convert("RGB") made it all white
    values = np.linspace(4000, 60000, 96 * 96).reshape(96, 96).astype(np.uint16)
    Image.fromarray(values).save(gray16)
    rgba = root / "rgba.png"  # a dog photo whose left half is transparent (black transparent pixels)
    pixels = np.asarray(Image.open(dog).convert("RGBA").resize((128, 128))).copy()
    pixels[:, :64] = 0
    Image.fromarray(pixels).save(rgba)
    good = {  # id -> record; each must become a sample (or at least a row the stages judged, not the reader)
        "bom-first": {"id": "bom-first", "image": dog, "caption": CAPTION},
        "line-sep": {"id": "line-sep", "image": dog, "caption": "a dog\u2028on the grass\u2029"},
        "gray16": {"id": "gray16", "image": str(gray16), "caption": CAPTION},
        "rgba": {"id": "rgba", "image": str(rgba), "caption": CAPTION},
        "x": {"id": "x", "image": dog, "caption": CAPTION},
        "x#dup1": {"id": "x#dup1", "image": dog, "caption": "a dog"},
        "claimed": {"id": "claimed", "image": dog, "caption": CAPTION},
        "crlf": {"id": "crlf", "image": dog, "caption": CAPTION},
    }
    lines = [
        codecs.BOM_UTF8 + _line(good["bom-first"]),
        _line(good["line-sep"], ascii_only=False),  # raw U+2028/U+2029, as json.dumps(ensure_ascii=False) writes
        b'{"id": "surrogate", "image": "%s", "caption": "a dog \\ud83d on the grass"}' % dog.encode(),
        b'{"id": "lone-\\udc00", "image": "%s", "caption": "a dog"}' % dog.encode(),
        _line({"id": "timestamp", "image": dog, "caption": CAPTION, "video_id": "v", "frame_idx": 1_700_000_000_000}),
        b"[" * 200_000 + b"]" * 200_000,  # RecursionError in json.loads
        b'{"id": "long-int", "image": "x.png", "caption": "a dog", "frame_idx": ' + b"9" * 5000 + b"}",
        '{"id": "latin1", "image": "%s", "caption": "a caf\u00e9 dog"}'.replace("%s", dog).encode("latin-1"),
        _line(good["gray16"]), _line(good["rgba"]),
        _line({"id": "german", "image": dog, "caption": "Ein brauner Hund auf dem Gras"}, ascii_only=False),
        _line({"id": "chinese", "image": dog, "caption": "草地上的一只狗"}, ascii_only=False),
        _line({"id": "arabic", "image": dog, "caption": "كلب على العشب"}, ascii_only=False),
        _line(good["x"]), _line(good["x#dup1"]),
        _line({"id": "x", "image": dog, "caption": "a dog"}),  # a real duplicate: its suffix must not be x#dup1
        _line({"id": "claimed", "image": 7, "caption": CAPTION}),  # a bad record first must not reject the good one
        _line(good["claimed"]),
        _line({"id": "nul-path", "image": dog + "\x00.png", "caption": CAPTION}),
        _line(good["crlf"]) + b"\r",
    ]
    expected_rejects = {"surrogate": "bad_record", "lone-\\udc00": "bad_record", "timestamp": "bad_record",
                        "latin1": None, "german": "unsupported_language", "chinese": "unsupported_language",
                        "arabic": "unsupported_language", "x#dup2": "duplicate_id", "claimed#dup1": "bad_record",
                        "nul-path": "missing_image"}
    (root / "in.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    cfg = load_config(overrides=["data.rows_per_shard=6"])
    stats = build_dataset(cfg, input=str(root / "in.jsonl"), output=str(root / "out"), executor="local",
                          log=lambda _: None)
    samples = pq.read_table(root / "out" / "samples").to_pylist()
    rejects = pq.read_table(root / "out" / "rejects").to_pylist()
    return {"root": root, "cfg": cfg, "stats": stats, "lines": len(lines), "good": good,
            "expected_rejects": expected_rejects, "samples": {r["id"]: r for r in samples},
            "rejects": {r["id"]: r for r in rejects}, "reject_list": rejects}


def test_every_line_is_exactly_one_row_and_the_build_finishes(hostile):
    samples, rejects = hostile["samples"], hostile["reject_list"]
    assert len(samples) + len(rejects) == hostile["lines"] == hostile["stats"]["records"]
    assert len(set(samples) | {r["id"] for r in rejects}) == hostile["lines"], "ids must be unique across the output"
    assert all(r["reason"] in REJECT_REASONS and r["detail"] for r in rejects)


def test_bad_records_are_rejected_with_their_reason(hostile):
    rejects = hostile["rejects"]
    for rid, reason in hostile["expected_rejects"].items():
        if reason:
            assert rejects[rid]["reason"] == reason, (rid, rejects[rid])
    assert "32-bit" in rejects["timestamp"]["detail"]
    assert "surrogate" in rejects["surrogate"]["detail"] and "\\ud83d" in rejects["surrogate"]["caption"]
    by_detail = {r["detail"]: r for r in hostile["reject_list"] if r["reason"] == "bad_record"}
    assert any("nested too deeply" in d for d in by_detail)
    assert any("4300" in d or "digits" in d for d in by_detail)
    assert any("not UTF-8" in d and "0xe9" in d for d in by_detail), "Latin-1 is refused, never mangled"
    assert not any("\ufffd" in (r["caption"] or "") for r in hostile["reject_list"])


def test_no_good_record_is_lost_or_altered(hostile):
    samples, rejects = hostile["samples"], hostile["rejects"]
    judged_by_stages = {rid: (samples.get(rid) or rejects.get(rid)) for rid in hostile["good"]}
    for rid, row in judged_by_stages.items():
        assert row is not None, f"good record {rid} lost"
        assert rid in samples or row["stage"] not in ("read", "write"), (rid, row)
    for rid in ("bom-first", "x", "x#dup1", "claimed", "crlf", "line-sep"):
        assert rid in samples, (rid, rejects.get(rid))
    assert samples["line-sep"]["caption"] == "a dog\u2028on the grass\u2029"


def test_high_bit_depth_and_transparent_images_follow_the_documented_rules(hostile):
    samples = hostile["samples"]
    for rid in ("gray16", "rgba"):
        assert rid in samples, hostile["rejects"].get(rid)
    gray = decode_png(samples["gray16"]["image"]).astype(int)
    assert gray.max() < 250 and gray.min() > 10 and gray.std() > 20, "16-bit grey is scaled, not clipped to white"
    rgba = decode_png(samples["rgba"]["image"])
    assert (rgba[:, :40] == 255).all(), "transparent pixels are composited on white"


def test_to_rgb_scales_every_high_bit_depth_mode_and_keeps_plain_images():
    ramp16 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(ramp16))[0, :, 0].tolist() == [0, 100, 255]
    ramp32 = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.int32))
    assert np.asarray(to_rgb(ramp32))[0, :, 0].tolist() == [0, 100, 255]
    unit_float = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit_float))[0, :, 0].tolist() == [0, 128, 255]
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30] * 256)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette))[0, 0].tolist() == [255, 255, 255]
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert np.asarray(to_rgb(half))[0, 0].tolist() == [127, 127, 127]
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert np.asarray(to_rgb(rgb))[0, 0].tolist() == [1, 2, 3]


@pytest.mark.parametrize(("caption", "readable"), [
    ("a dog on the grass", True), ("red ball, blue cube", True), ("a café in Köln", True),
    ("a sks can in the jungle", True), ("Ein roter Ball auf dem Gras", False), ("un chat sur le canapé", False),
    ("un perro en la playa", False), ("草地上的一只狗", False), ("Собака на траве", False),
])
def test_the_language_rule(caption, readable):
    assert (unsupported_language(caption) is None) == readable


def test_any_caption_language_switches_the_check_off(hostile, tmp_path):
    cfg = load_config(overrides=["data.caption_language=any"])
    dog = hostile["good"]["x"]["image"]
    (tmp_path / "in.jsonl").write_text(json.dumps({"id": "de", "image": dog, "caption": "ein Hund"}) + "\n")
    stats = build_dataset(cfg, input=str(tmp_path / "in.jsonl"), output=str(tmp_path / "out"), executor="local",
                          log=lambda _: None)
    assert "unsupported_language" not in stats["reject_reasons"]


def test_folder_input_refuses_non_utf8_captions_and_file_names(tmp_path, shared_data):
    dog = (shared_data / "dreambench" / "dog" / "00.jpg").read_bytes()
    for name in ("good", "latin1", "bom"):
        (tmp_path / f"{name}.jpg").write_bytes(dog)
    (tmp_path / "good.txt").write_text("a dog")
    (tmp_path / "latin1.txt").write_bytes("a caf\u00e9 dog".encode("latin-1"))
    (tmp_path / "bom.txt").write_bytes(codecs.BOM_UTF8 + b"a dog")
    (tmp_path / b"odd-\xff.jpg".decode("utf-8", "surrogateescape")).write_bytes(dog)
    records = {r["id"]: r for r in read_records(tmp_path)}
    assert records["good"]["reject_reason"] is None and records["bom"]["caption"] == "a dog"
    assert records["latin1"]["reject_reason"] == "bad_record" and "not UTF-8" in records["latin1"]["reject_detail"]
    odd = records["odd-\\udcff"]
    assert odd["reject_reason"] == "bad_record" and "file name" in odd["reject_detail"]


def test_a_failed_build_leaves_nothing_that_blocks_the_fixed_rerun(hostile, tmp_path, monkeypatch):
    dog = hostile["good"]["x"]["image"]
    out = tmp_path / "out"
    (tmp_path / "a.jsonl").write_text(json.dumps({"id": "a", "image": dog, "caption": CAPTION}) + "\n")
    monkeypatch.setattr("mpalign.data.build.finish_shard", lambda *a, **k: (_ for _ in ()).throw(MemoryError("boom")))
    with pytest.raises(MemoryError):
        build_dataset(hostile["cfg"], input=str(tmp_path / "a.jsonl"), output=str(out), executor="local",
                      log=lambda _: None)
    monkeypatch.undo()
    stray = {"id": "old", "reason": "bad_record", "stage": "read", "detail": "from the failed run"}
    pq.write_table(pa.Table.from_pylist([stray], schema=REJECT_SCHEMA), out / "rejects" / "shard-00003.parquet")
    (tmp_path / "fixed.jsonl").write_text(json.dumps({"id": "b", "image": dog, "caption": CAPTION}) + "\n")
    stats = build_dataset(hostile["cfg"], input=str(tmp_path / "fixed.jsonl"), output=str(out), executor="local",
                          log=lambda _: None)
    assert stats["samples"] + stats["rejects"] == 1, "nothing of the failed run is kept or counted"


def test_max_shards_below_one_is_a_config_error(hostile, tmp_path):
    with pytest.raises(ConfigError, match="--max-shards"):
        build_dataset(hostile["cfg"], input=str(tmp_path / "none.jsonl"), output=str(tmp_path / "o"), max_shards=-1)
