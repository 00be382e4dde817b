import json

from mpalign.config import SampleDataConfig
from mpalign.sample_data import ensure_sample_dataset, generate_sample_dataset


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generator_is_deterministic(tmp_path):
    cfg = SampleDataConfig(num_images=6, num_videos=2, image_size=64, seed=3)
    a = generate_sample_dataset(tmp_path / "a", cfg)
    b = generate_sample_dataset(tmp_path / "b", cfg)
    assert a.read_text() == b.read_text()
    for rec in _read(a):
        assert (a.parent / rec["image"]).read_bytes() == (b.parent / rec["image"]).read_bytes()
    c = generate_sample_dataset(tmp_path / "c", SampleDataConfig(num_images=6, num_videos=2, image_size=64, seed=4))
    assert c.read_text() != a.read_text()


def test_records_name_every_object_and_pair_frames(tmp_path):
    records = _read(generate_sample_dataset(tmp_path, SampleDataConfig(num_images=8, num_videos=3, image_size=64)))
    assert len(records) == 8 + 2 * 3
    assert len({r["id"] for r in records}) == len(records)
    assert {len(r["objects"]) for r in records if r["video_id"] is None} == {1, 2, 3, 4}
    for rec in records:
        for obj in rec["objects"]:
            assert obj["phrase"] in rec["caption"]
            x0, y0, x1, y1 = obj["box"]
            assert 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1
    videos = {}
    for rec in records:
        if rec["video_id"]:
            videos.setdefault(rec["video_id"], []).append(rec)
    assert len(videos) == 3
    for frames in videos.values():
        first, second = sorted(frames, key=lambda r: r["frame_idx"])
        assert sorted(o["phrase"] for o in first["objects"]) == sorted(o["phrase"] for o in second["objects"])
        assert [o["box"] for o in first["objects"]] != [o["box"] for o in second["objects"]]


def test_ensure_regenerates_only_when_config_changes(tmp_path):
    cfg = SampleDataConfig(num_images=2, num_videos=1, image_size=32)
    path = ensure_sample_dataset(cfg, tmp_path)
    stamp = path.stat().st_mtime_ns
    assert ensure_sample_dataset(cfg, tmp_path).stat().st_mtime_ns == stamp
    bigger = SampleDataConfig(num_images=3, num_videos=1, image_size=32)
    assert len(_read(ensure_sample_dataset(bigger, tmp_path))) == 5


def test_caption_styles_and_held_out_identities(tmp_path):
    from mpalign.sample_data import is_held_out

    kind = _read(generate_sample_dataset(tmp_path / "kind", SampleDataConfig(
        num_images=40, num_videos=2, image_size=32, caption_style="kind", exclude_held_out=True)))
    for rec in kind:
        for obj in rec["objects"]:
            assert obj["phrase"] == obj["shape"]  # "a ball": colour and texture only in the pixels
            assert f"{obj['color']} {obj['shape']}" not in rec["caption"]
            assert not is_held_out(obj["shape"], obj["color"], obj["texture"])
    mixed = _read(generate_sample_dataset(tmp_path / "mixed", SampleDataConfig(
        num_images=40, num_videos=0, image_size=32, caption_style="mixed")))
    named = [o["phrase"] != o["shape"] for r in mixed for o in r["objects"]]
    assert 0.2 < sum(named) / len(named) < 0.8
    full = _read(generate_sample_dataset(tmp_path / "full", SampleDataConfig(num_images=200, num_videos=0, image_size=16)))
    assert any(is_held_out(o["shape"], o["color"], o["texture"]) for r in full for o in r["objects"])
