"""Generation on the tiny preset: the pipeline (diffusers' SDXL sampler with the adapter), the CLI, and an imported
official-layout checkpoint driving it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from model_batches import one_thread
from PIL import Image
from test_model_conversion import tiny_official_checkpoint

from mpalign import encoders, zoo
from mpalign.config import load_config
from mpalign.convert_msdiffusion import main as convert_main
from mpalign.generate import main as generate_main
from mpalign.models.attention import AutoLayout, box_cell_masks
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
    ([[0, 0, 0, 0], [0.1, 0.1, 0.5, 0.5]], ["dog", "cat"], 2, "is empty"),
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


def test_no_layout_is_the_whole_image_box_for_every_subject(pipe):
    images = [Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (64, 64), (30, 30, 200))]
    args = ("a red ball and a blue cube", images)
    no_layout = pipe.generate(*args, None, ["red ball", "blue cube"], seed=1, **FAST)[0]
    whole = pipe.generate(*args, [[0, 0, 1, 1]] * 2, ["red ball", "blue cube"], seed=1, **FAST)[0]
    assert np.array_equal(np.asarray(no_layout), np.asarray(whole))


def test_references_are_squashed_to_a_square_not_centre_cropped(pipe):
    wide = np.full((40, 160, 3), 128, dtype=np.uint8)
    marked = wide.copy()
    marked[:, -12:] = (255, 0, 0)  # only at the far right edge: a centre crop of the 160 x 40 image cuts it off
    clip = [encoders.clip_hidden_states(pipe.image_encoder, [Image.fromarray(a)]) for a in (wide, marked)]
    assert not torch.allclose(clip[0], clip[1])
    squashed = Image.fromarray(marked).resize((512, 512), Image.BICUBIC)  # the release's preprocessing
    assert torch.equal(clip[1], encoders.clip_hidden_states(pipe.image_encoder, [squashed]))


def test_auto_layout_switches_the_masks_at_the_start_step(pipe):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    box = [0.1, 0.2, 0.6, 0.9]
    args = ("a red ball on grass", [image], [box], ["red ball"])
    auto = AutoLayout(threshold=0.5, start_step=2)
    switched = pipe.generate(*args, auto_layout=auto, seed=2, num_inference_steps=4, height=64, width=64)[0]
    layers = len(pipe.adapter.ip_layers)
    assert auto.sources == [(s, "boxes") for s in (0, 1) for _ in range(layers)] + \
        [(s, "attention") for s in (2, 3) for _ in range(layers)]
    moved = 0
    for regions in auto.latest.values():  # regions at the last step; element 1 is the prompt (0: the guidance branch)
        side = int(regions.shape[-1] ** 0.5)
        assert not regions[0].any() and not regions[1, 1:].any()  # no region for the guidance branch or padding
        moved += not torch.equal(regions[1, 0], box_cell_masks(torch.tensor(box), side, side))
    assert moved > 0, "the attention masks equal the box in every layer"
    never = AutoLayout(threshold=0.5, start_step=4)
    kept = pipe.generate(*args, auto_layout=never, seed=2, num_inference_steps=4, height=64, width=64)[0]
    assert {source for _, source in never.sources} == {"boxes"}
    assert not np.array_equal(np.asarray(switched), np.asarray(kept))
    with pytest.raises(ValueError, match="'blue cube' does not occur in the prompt"):
        pipe.generate("a red ball on grass", [image], [box], ["blue cube"], auto_layout=auto, **FAST)
    with pytest.raises(ValueError, match="threshold must be in"):
        AutoLayout(threshold=1.5)


@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory) -> str:
    """A small SDXL ControlNet built from the tiny UNet, its zero convolutions given random weights so that it acts,
    saved with save_pretrained (the layout of a real one)."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(zoo.load_sdxl(load_config().model).unet,
                                           conditioning_embedding_out_channels=(8, 16, 16, 16))
    with torch.no_grad():
        for conv in (*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out):
            conv.weight.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    controlnet.save_pretrained(path)
    return str(path)


def test_controlnet_composes_with_the_adapter(pipe, controlnet_dir):
    controlled = MPAlignPipeline.from_config(load_config(), controlnet=controlnet_dir)
    args = ("a red ball on grass", [Image.new("RGB", (64, 64), (200, 30, 30))], [[0.1, 0.2, 0.6, 0.9]], ["red ball"])
    black, white = Image.new("RGB", (64, 64)), Image.new("RGB", (64, 64), (255, 255, 255))
    plain = np.asarray(pipe.generate(*args, seed=5, **FAST)[0])
    off = controlled.generate(*args, seed=5, control_image=black, controlnet_conditioning_scale=0.0, **FAST)[0]
    assert np.array_equal(np.asarray(off), plain)  # no control: exactly the adapter's image
    on_black = np.asarray(controlled.generate(*args, seed=5, control_image=black, **FAST)[0])
    on_white = np.asarray(controlled.generate(*args, seed=5, control_image=white, **FAST)[0])
    assert not np.array_equal(on_black, plain) and not np.array_equal(on_black, on_white)
    # the ControlNet reads the text tokens only: other subject tokens leave its residuals as they are
    controlnet, unet = controlled.controlnet, controlled.sdxl.unet
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(1, 77, unet.config.cross_attention_dim, generator=gen)
    tokens = [torch.randn(1, controlled.adapter.num_image_tokens, unet.config.cross_attention_dim, generator=gen)
              for _ in range(2)]
    inputs = {"sample": torch.randn(1, 4, 8, 8, generator=gen), "timestep": 10, "controlnet_cond": torch.rand(1, 3, 64, 64),
              "added_cond_kwargs": {"text_embeds": torch.randn(1, 32), "time_ids": torch.tensor([[64., 64, 0, 0, 64, 64]])}}
    with torch.no_grad():
        residuals = [controlnet(encoder_hidden_states=torch.cat((text, t), 1), **inputs, return_dict=False)[0]
                     for t in tokens]
    assert all(torch.equal(a, b) for a, b in zip(*residuals))
    with pytest.raises(ValueError, match="give a control image"):
        controlled.generate(*args, **FAST)
    with pytest.raises(ValueError, match="needs a ControlNet"):
        pipe.generate(*args, control_image=black, **FAST)


def test_cli_auto_layout_controlnet_and_no_layout(tmp_path, subject_image, controlnet_dir, capsys):
    control = tmp_path / "depth.png"
    Image.new("RGB", (64, 64), (90, 90, 90)).save(control)
    common = ["--prompt", "a dog on a sofa", "--subject", subject_image, "--phrase", "dog", "--steps", "2",
              "--height", "64", "--width", "64"]
    out = tmp_path / "out.png"
    assert generate_main([*common, "--auto-layout-threshold", "0.5", "--auto-layout-start", "1",
                          "--controlnet", controlnet_dir, "--control-image", str(control), "--out", str(out)]) == 0
    assert Image.open(out).size == (64, 64)
    preview = np.asarray(Image.open(out.with_suffix(".preview.png")))  # no --box: the whole image is drawn
    assert np.array_equal(preview, np.asarray(draw_boxes(Image.open(out), [[0, 0, 1, 1]], ["dog"])))
    second = ["--subject", subject_image, "--phrase", "cat"]  # a second subject whose phrase the prompt lacks
    for extra, message in (([*second, "--auto-layout-threshold", "0.5"], "'cat' does not occur"),
                           (["--control-image", str(control)], "go together"),
                           (["--controlnet", controlnet_dir, "--control-image", str(tmp_path / "no.png")],
                            "cannot read control image")):
        capsys.readouterr()
        assert generate_main([*common, *extra, "--out", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1
