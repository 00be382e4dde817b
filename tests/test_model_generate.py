"""Generation on the tiny preset: the pipeline (diffusers' SDXL sampler with the adapter), the CLI, and an imported
official-layout checkpoint driving it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_batches import one_thread
from PIL import Image
from test_model_conversion import tiny_official_checkpoint

from mpalign.config import load_config
from mpalign.convert_msdiffusion import main as convert_main
from mpalign.generate import main as generate_main
from mpalign.pipeline import MPAlignPipeline, draw_boxes

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture(scope="module")
def subject_image(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("subjects") / "dog.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 60, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pipe() -> MPAlignPipeline:
    return MPAlignPipeline.from_config(load_config())


def test_generate_is_seeded_and_follows_the_options(pipe):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    args = ("a red ball on grass", [image], [[0.1, 0.2, 0.6, 0.9]], ["red ball"])
    first = pipe.generate(*args, seed=3, **FAST)
    assert len(first) == 1 and first[0].size == (64, 64)
    assert np.array_equal(np.asarray(first[0]), np.asarray(pipe.generate(*args, seed=3, **FAST)[0]))
    assert not np.array_equal(np.asarray(first[0]), np.asarray(pipe.generate(*args, seed=4, **FAST)[0]))
    # the image branch matters: no image weight gives another image
    assert not np.array_equal(np.asarray(first[0]), np.asarray(pipe.generate(*args, seed=3, scale=0.0, **FAST)[0]))
    several = pipe.generate(*args, seed=3, num_images=2, num_inference_steps=2, height=64, width=96,
                            subject_scales=[0.5], drop_grounding=True, guidance_scale=1.0)
    assert [im.size for im in several] == [(96, 64), (96, 64)]


@pytest.mark.parametrize("boxes, phrases, count, message", [
    ([[0.1, 0.1, 1.2, 0.5]], ["dog"], 1, "outside [0, 1]"),
    ([[0.5, 0.1, 0.5, 0.5]], ["dog"], 1, "is empty"),
    ([[0.1, 0.1, 0.5, 0.5]], ["dog", "cat"], 1, "one box and one phrase per subject"),
    ([[0.1, 0.1, 0.5, 0.5]] * 5, ["dog"] * 5, 5, "at most 4"),
    ([[0, 0, 0, 0], [0.1, 0.1, 0.5, 0.5]], ["dog", "cat"], 2, "for every subject or for none"),
])
def test_generate_rejects_bad_subjects(pipe, boxes, phrases, count, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        pipe.generate("p", [Image.new("RGB", (8, 8))] * count, boxes, phrases, **FAST)


def test_cli_writes_image_preview_and_config(tmp_path, subject_image, capsys):
    out = tmp_path / "gen" / "out.png"
    rc = generate_main(["--prompt", "a dog on a sofa", "--subject", subject_image, "--box", "0.1,0.2,0.7,0.9",
                        "--phrase", "dog", "--steps", "2", "--height", "64", "--width", "64", "--out", str(out)])
    assert rc == 0
    image, preview = Image.open(out), Image.open(out.with_suffix(".preview.png"))
    assert image.size == preview.size == (64, 64)
    assert not np.array_equal(np.asarray(image), np.asarray(preview))  # the box is drawn
    assert np.array_equal(np.asarray(draw_boxes(image, [[0.1, 0.2, 0.7, 0.9]], ["dog"])), np.asarray(preview))
    assert load_config(out.with_suffix(".config.yaml")).model.preset == "tiny"


@pytest.mark.parametrize("extra, message", [
    (["--box", "0.1,0.1,1.5,0.5", "--phrase", "dog"], "outside [0, 1]"),
    (["--box", "0.6,0.1,0.5,0.5", "--phrase", "dog"], "is empty"),
    (["--box", "0.1,0.1,0.5", "--phrase", "dog"], "must be four numbers"),
    (["--box", "0.1,0.1,0.5,0.5"], "one box and one phrase per subject"),
    (["--box", "0.1,0.1,0.5,0.5", "--phrase", "dog", "--adapter", "/no/such/dir"], "is not a folder"),
    (["--box", "0.1,0.1,0.5,0.5", "--phrase", "dog", "--set", "model.no_such_key=1"], "unknown config key"),
])
def test_cli_bad_arguments_are_one_line_errors(tmp_path, subject_image, capsys, extra, message):
    rc = generate_main(["--prompt", "p", "--subject", subject_image, *extra, "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_cli_rejects_too_many_subjects_and_unreadable_images(tmp_path, subject_image, capsys):
    five = [a for _ in range(5) for a in ("--subject", subject_image, "--box", "0.1,0.1,0.5,0.5", "--phrase", "x")]
    assert generate_main(["--prompt", "p", *five, "--out", str(tmp_path / "x.png")]) == 2
    (tmp_path / "notes.txt").write_text("not an image")
    assert generate_main(["--prompt", "p", "--subject", str(tmp_path / "notes.txt"), "--box", "0.1,0.1,0.5,0.5",
                          "--phrase", "x", "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "at most 4" in err[0] and "cannot read subject image" in err[1] and len(err) == 2


def test_converted_official_checkpoint_generates(tmp_path, subject_image):
    torch.save(tiny_official_checkpoint(), tmp_path / "ms_adapter.bin")
    assert convert_main([str(tmp_path / "ms_adapter.bin"), str(tmp_path / "adapter"), "--dim-head", "16"]) == 0
    pipe = MPAlignPipeline.from_config(load_config(), adapter_dir=tmp_path / "adapter")
    ckpt = tiny_official_checkpoint()
    assert torch.equal(pipe.adapter.ip_layers[6].to_k_ip.weight, ckpt["ms_adapter"]["13.to_k_ip.weight"])
    assert pipe.sdxl.unet.attn_processors["mid_block.attentions.0.transformer_blocks.0.attn2.processor"] is \
        pipe.adapter.ip_layers[6]  # diffusers lists mid_block last
    out = tmp_path / "out.png"
    assert generate_main(["--prompt", "p", "--subject", subject_image, "--box", "0.2,0.2,0.8,0.8", "--phrase", "dog",
                          "--adapter", str(tmp_path / "adapter"), "--steps", "2", "--height", "64", "--width", "64",
                          "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
