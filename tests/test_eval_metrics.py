"""Metric sanity on constructed cases, with the tiny CLIP and DINOv2 (random weights, real architectures)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mpalign.config import ModelConfig
from mpalign.eval.metrics import (
    METRICS,
    aggregate,
    box_pixels,
    cosine,
    crop_box,
    embed_images,
    m_dino,
    region_crop,
    score_images,
)
from mpalign.eval.scoring import Scorers, score_rows
from mpalign.zoo import load_clip_model, load_dinov2

BOXES = [[0.0, 0.25, 0.5, 0.75], [0.5, 0.25, 1.0, 0.75]]


@pytest.fixture(scope="module")
def scorers():
    cfg = ModelConfig(preset="tiny", device="cpu")
    return load_clip_model(cfg, "unused-by-tiny"), load_dinov2(cfg)


def subject_image(seed: int, size: int = 96) -> Image.Image:
    """A distinct textured 'subject': coloured checks of a seed-dependent period and hue, with noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size]
    period = 4 + 6 * seed
    checks = ((x // period + y // period) % 2)[..., None]
    color = rng.integers(0, 255, 3)
    pixels = checks * color + (1 - checks) * (255 - color) + rng.normal(0, 12, (size, size, 3))
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def compose(subjects: list[Image.Image | None], boxes: list[list[float]], size: int = 64) -> Image.Image:
    """Paste each subject into its box on a grey canvas; None leaves its box empty (the subject is neglected)."""
    canvas = Image.new("RGB", (size, size), (128, 128, 128))
    for image, box in zip(subjects, boxes):
        if image is not None:
            left, top, right, bottom = box_pixels(box, size, size)
            canvas.paste(image.resize((right - left, bottom - top)), (left, top))
    return canvas


def test_identical_images_score_one(scorers):
    clip, dino = scorers
    image = subject_image(0)
    refs = [embed_images(clip, dino, [image])]
    (scores,) = score_images(clip, dino, [image], ["a red dog"], [[[0.0, 0.0, 1.0, 1.0]]], [refs])
    assert scores["clip_i"] == pytest.approx(1.0, abs=1e-5)
    assert scores["dino"] == pytest.approx(1.0, abs=1e-5)
    assert scores["m_dino"] == pytest.approx(1.0, abs=1e-5)  # the full-image box crops nothing away
    other = subject_image(1)
    (different,) = score_images(clip, dino, [other], ["a red dog"], [[[0.0, 0.0, 1.0, 1.0]]], [refs])
    assert different["clip_i"] < 1.0 - 1e-4 and different["dino"] < 1.0 - 1e-4


def test_clip_t_is_cosine_with_the_prompt(scorers):
    from mpalign.encoders import clip_image_embeds, clip_text_embeds

    clip, dino = scorers
    image = subject_image(2)
    refs = [embed_images(clip, dino, [image])]
    prompts = ["a dog on the beach", "a teapot in the snow"]
    scores = score_images(clip, dino, [image, image], prompts, [[[0, 0, 1, 1]]] * 2, [refs, refs])
    expected = cosine(clip_image_embeds(clip, [image]), clip_text_embeds(clip, prompts))[0]
    assert [s["clip_t"] for s in scores] == pytest.approx(expected.tolist(), abs=1e-5)
    assert scores[0]["clip_t"] != pytest.approx(scores[1]["clip_t"], abs=1e-6)


def test_m_dino_is_the_product_of_region_scores(scorers):
    assert m_dino([0.5, 0.8]) == pytest.approx(0.4)
    assert m_dino([0.9, 0.8, 0.5]) == pytest.approx(0.36)
    assert m_dino([-0.5, -0.5]) == 0.0  # two dissimilar subjects must not multiply into a good score
    clip, dino = scorers
    subjects = [subject_image(3), subject_image(4)]
    refs = [embed_images(clip, dino, [s]) for s in subjects]
    generated = compose([subjects[1], subjects[0]], BOXES)  # swapped: region scores well below 1
    (scores,) = score_images(clip, dino, [generated], ["x"], [BOXES], [refs])
    region = scores["region_dino_per_subject"]
    assert len(region) == 2
    assert scores["m_dino"] == pytest.approx(math.prod(max(r, 0.0) for r in region), rel=1e-6)
    assert scores["m_dino"] < min(region)  # a product of factors < 1, not a mean


def test_absent_subject_lowers_m_dino(scorers):
    clip, dino = scorers
    subjects = [subject_image(5), subject_image(6)]
    refs = [embed_images(clip, dino, [s]) for s in subjects]
    both = compose(subjects, BOXES)
    neglected = compose([subjects[0], None], BOXES)
    full, missing = score_images(clip, dino, [both, neglected], ["x", "x"], [BOXES, BOXES], [refs, refs])
    assert full["region_dino_per_subject"][0] == pytest.approx(missing["region_dino_per_subject"][0], abs=1e-4)
    assert missing["region_dino_per_subject"][1] < full["region_dino_per_subject"][1]
    assert missing["m_dino"] < full["m_dino"]


def test_region_scores_follow_the_boxes(scorers):
    """Each subject is scored on its own box: the subject pasted in its box matches its reference better than the
    other subject's box does."""
    clip, dino = scorers
    subjects = [subject_image(7), subject_image(8)]
    refs = [embed_images(clip, dino, [s]) for s in subjects]
    generated = compose(subjects, BOXES)
    region_dino = embed_images(clip, dino, [region_crop(generated, b) for b in BOXES])[1]
    similarity = cosine(region_dino, torch.cat([r[1] for r in refs]))
    assert similarity[0, 0] > similarity[1, 0] and similarity[1, 1] > similarity[0, 1]


def test_region_crops_keep_the_box_aspect(scorers):
    """A tall box is padded to a square, not centre-cropped by the scorer's processor: the whole subject is scored."""
    image = subject_image(9, size=64)
    box = [0.25, 0.0, 0.5, 1.0]  # 16 x 64 pixels
    square = region_crop(image, box)
    assert square.size == (64, 64)
    pixels = np.asarray(square)
    assert (pixels[:, :24] == 0).all() and (pixels[:, 40:] == 0).all()  # black bands left and right
    assert (pixels[:, 24:40] == np.asarray(crop_box(image, box))).all()  # the crop itself, whole and centred
    clip, dino = scorers
    refs = [embed_images(clip, dino, [subject_image(10)])]
    (scores,) = score_images(clip, dino, [image], ["x"], [[box]], [refs])
    padded = cosine(embed_images(clip, dino, [square])[1], refs[0][1]).item()
    cropped = cosine(embed_images(clip, dino, [crop_box(image, box)])[1], refs[0][1]).item()
    assert scores["region_dino_per_subject"][0] == pytest.approx(padded, abs=1e-5)
    assert padded != pytest.approx(cropped, abs=1e-4)


def test_registered_subject_metrics_become_columns(scorers, tmp_path, monkeypatch):
    """A benchmark's own per-subject score (the toy world's identity plugs in this way): called per subject with the
    generated image, the subject's box and the request row; its mean over subjects is a column and is aggregated."""
    from mpalign.config import ConfigError
    from mpalign.eval import metrics

    calls = []

    def box_brightness(image, box, row, subject):
        calls.append((row["sample_id"], subject))
        return float(np.asarray(crop_box(image, box)).mean()) / 255

    monkeypatch.setitem(metrics.SUBJECT_METRICS, "box_brightness", box_brightness)
    clip, dino = scorers
    generated = tmp_path / "gen.png"
    compose([subject_image(0), None], BOXES).save(generated)
    reference = tmp_path / "ref.png"
    subject_image(0).save(reference)
    row = {"sample_id": "s", "prompt": "x", "boxes": BOXES, "references": [[str(reference)], [str(reference)]],
           "image_path": str(generated), "seed": 0}
    scorers = Scorers(clip, dino, metrics.subject_metrics(["box_brightness"]))
    (scored,) = score_rows([row], scorers)
    assert calls == [("s", 0), ("s", 1)]
    per_subject = scored["box_brightness_per_subject"]
    assert per_subject[1] == pytest.approx(128 / 255)  # the empty box is the grey canvas
    assert scored["box_brightness"] == pytest.approx(sum(per_subject) / 2)
    table = aggregate(pd.DataFrame([dict(scored, adapter="a")]), ["adapter"])
    assert table.loc[0, "box_brightness"] == pytest.approx(scored["box_brightness"])
    with pytest.raises(ConfigError, match="no per-subject metric 'sharpness'"):
        metrics.subject_metrics(["sharpness"])


def test_box_pixels_stay_inside_and_nonempty():
    assert box_pixels([0.25, 0.25, 0.75, 0.75], 64, 64) == (16, 16, 48, 48)
    assert box_pixels([0.0, 0.0, 1.0, 1.0], 64, 32) == (0, 0, 64, 32)
    left, top, right, bottom = box_pixels([0.999, 0.999, 1.0, 1.0], 10, 10)
    assert right - left >= 1 and bottom - top >= 1 and right <= 10 and bottom <= 10


def test_reference_cache_embeds_each_path_once(scorers, tmp_path):
    clip, dino = scorers
    paths = []
    for i in range(2):
        paths.append(str(tmp_path / f"ref{i}.png"))
        subject_image(i).save(paths[-1])
    generated = tmp_path / "gen.png"
    compose([subject_image(0), subject_image(1)], BOXES).save(generated)
    scorers = Scorers(clip, dino)
    row = {"sample_id": "s", "prompt": "x", "boxes": BOXES, "references": [[paths[0]], [paths[1], paths[0]]],
           "image_path": str(generated), "seed": 0}
    scored = score_rows([row, dict(row, seed=1)], scorers)
    assert sorted(scorers.references.embeds) == sorted(paths)
    assert "references" not in scored[0] and "boxes" not in scored[0] and scored[1]["seed"] == 1
    assert scored[0]["m_dino"] == pytest.approx(scored[1]["m_dino"])
    assert set(METRICS) <= set(scored[0])


def test_aggregate_means_per_group():
    scores = pd.DataFrame({"adapter": ["a", "a", "a", "b"], "group": ["x", "x", "y", "x"],
                           "clip_i": [0.2, 0.4, 0.9, 0.5], "clip_t": [0.1] * 4, "dino": [0.3] * 4, "m_dino": [0.0] * 4})
    table = aggregate(scores, ["adapter", "group"]).set_index(["adapter", "group"])
    assert table.loc[("a", "x"), "clip_i"] == pytest.approx(0.3)
    assert table.loc[("a", "x"), "images"] == 2
    assert table.loc[("b", "x"), "clip_i"] == pytest.approx(0.5)
