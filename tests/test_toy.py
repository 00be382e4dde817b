"""The toy world: shipped weights that load like real ones, an exact identity metric, the benchmark, pretraining."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mpalign.config import ModelConfig
from mpalign.sample_data import COLORS, SHAPES, TEXTURES, SampleObject, is_held_out, render
from mpalign.toy import classifier as attribute_classifier
from mpalign.toy.benchmark import identity_scores, subject_labels, toy_samples
from mpalign.toy.world import crop_set
from mpalign.zoo import toy_weights

TOY = ModelConfig(preset="toy", device="cpu")
# The short training of the learning test, and the rise of colour accuracy (chance 1/8) over the untrained adapter
# it must show: measured with exactly this test (seeded, one thread) on the shipped 10 000-step UNet, 0.125 -> 0.350
# after 750 steps (121 s on 2 cores); the same run went on to 0.30 at 1 000 and 0.40 at 1 500 steps, twice the time for
# no clearer margin. The required gain, 0.12, is below every gain that run measured from 500 steps on (0.125 at 500,
# 0.175 at 1 000).
TRAIN_STEPS = 750
IDENTITY_GAIN = 0.12


def test_shipped_toy_weights_load_through_from_pretrained_with_the_real_classes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPVisionModelWithProjection, Dinov2Model

    from mpalign.zoo import load_clip_model, load_dinov2, load_image_encoder, load_sdxl

    sdxl = load_sdxl(TOY)
    assert isinstance(sdxl.unet, UNet2DConditionModel) and isinstance(sdxl.vae, AutoencoderKL)
    assert sdxl.unet.config.addition_embed_type == "text_time"  # SDXL's conditioning, not a different model
    assert "CrossAttnDownBlock2D" in sdxl.unet.config.down_block_types
    assert isinstance(load_image_encoder(TOY).model, CLIPVisionModelWithProjection)
    assert isinstance(load_dinov2(TOY).model, Dinov2Model)
    assert isinstance(load_clip_model(TOY, "openai/clip-vit-large-patch14").model, CLIPModel)


def test_shipped_toy_flux_loads_as_diffusers_flux_on_the_toy_vae():
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from mpalign.zoo import flux_token_pixels, load_flux, load_sdxl

    flux = load_flux(TOY)
    assert isinstance(flux.transformer, FluxTransformer2DModel)
    assert isinstance(flux.text_encoder, CLIPTextModel) and isinstance(flux.text_encoder_2, T5EncoderModel)
    vae = load_sdxl(TOY).vae
    assert flux.transformer.config.in_channels == 4 * vae.config.latent_channels  # 2x2 latent patches
    # a FLUX token covers 2x2 latents: 8 pixels on the toy VAE (2 downsamplings), 16 on the tiny preset's
    assert flux_token_pixels(TOY) == 8 and flux_token_pixels(ModelConfig(preset="tiny", device="cpu")) == 16
    from diffusers import FluxPipeline

    # the one formula agrees with diffusers' own pipeline on the loaded VAE
    assert flux_token_pixels(TOY) == 2 * FluxPipeline(**flux.as_pipeline_kwargs()).vae_scale_factor


def test_attribute_classifier_is_exact_on_held_out_crops():
    model = attribute_classifier.load_classifier(toy_weights(TOY, "classifier"))
    crops, labels, _ = crop_set(400, seed=4242, image_size=64, crop_size=64, exclude_held_out=False, empty_share=0.1)
    accuracy = attribute_classifier.attribute_accuracy(attribute_classifier.predict(model, crops), labels)
    for name in ("shape", "color", "texture", "present"):
        assert accuracy[name] >= 0.98, accuracy


def test_toy_benchmark_holds_out_identities_names_only_kinds_and_is_reproducible(tmp_path):
    first, again = toy_samples(tmp_path / "a", count=8), toy_samples(tmp_path / "b", count=8)
    assert [s.to_row() | {"references": None} for s in first] == [s.to_row() | {"references": None} for s in again]
    assert {len(s.subjects) for s in first} == {1, 2, 3, 4}
    for sample in first:
        for name, phrase, refs in zip(sample.subjects, sample.phrases, sample.references):
            texture, color, shape = name.split("-")
            assert is_held_out(shape, color, texture) and phrase == shape and phrase in sample.prompt
            # colour and texture can only come from the reference ("blue" may still name the sky)
            assert f"{color} {shape}" not in sample.prompt and texture not in sample.prompt.split()
            assert Image.open(refs[0]).size == (64, 64)
        ref_bytes = [Path(r[0]).read_bytes() for r in sample.references]
        assert ref_bytes == [Path(r[0].replace("/a/", "/b/")).read_bytes() for r in sample.references]


def _ground_truth_image(sample, rng: np.random.Generator) -> Image.Image:
    objects = [SampleObject(*reversed(name.split("-")), tuple(box)) for name, box in zip(sample.subjects, sample.boxes)]
    return render(objects, "on sand", 64, rng)


def _scores(images, samples) -> list[dict[str, float]]:
    """Per subject, through the evaluation's own per-subject metric path."""
    from mpalign.eval.metrics import subject_metrics

    metrics = subject_metrics(["identity", "identity_color", "identity_shape", "placement"])
    return [{name: metric(image, box, sample.to_row(), s) for name, metric in metrics.items()}
            for image, sample in zip(images, samples) for s, box in enumerate(sample.boxes)]


def test_identity_scores_read_rendered_subjects_back_and_find_nothing_in_empty_boxes(tmp_path):
    samples = toy_samples(tmp_path, count=12)
    rng = np.random.default_rng(0)
    truth = _scores([_ground_truth_image(s, rng) for s in samples], samples)
    assert np.mean([t["identity"] for t in truth]) >= 0.9, truth
    assert np.mean([t["placement"] for t in truth]) == 1.0
    empty = _scores([render([], "on grass", 64, rng) for _ in samples], samples)
    assert np.mean([e["placement"] for e in empty]) <= 0.1, empty
    # a wrong colour in the right box: shape right, colour wrong
    sample = samples[0]
    shape, color = SHAPES[subject_labels(sample.subjects[0])[0]], sample.subjects[0].split("-")[1]
    other = next(c for c in COLORS if c != color)
    image = render([SampleObject(shape, other, TEXTURES[0], tuple(sample.boxes[0]))], "on sand", 64, rng)
    wrong = identity_scores(image, sample.boxes[0], sample.subjects[0])
    assert wrong["identity_color"] == 0.0 and wrong["identity_shape"] == 1.0


def test_held_out_combinations_leave_every_attribute_in_training():
    held = [(s, c, t) for s in SHAPES for c in COLORS for t in TEXTURES if is_held_out(s, c, t)]
    assert 0.15 < len(held) / (len(SHAPES) * len(COLORS) * len(TEXTURES)) < 0.25
    for s in SHAPES:  # every shape keeps colours and textures it is trained on
        assert any(not is_held_out(s, c, t) for c in COLORS for t in TEXTURES)


@pytest.mark.parametrize("parts, missing", [("vae", "unet,flux"), ("clip", "unet,flux"),
                                             ("vae,clip,dinov2", "unet,flux"), ("clip,unet", "flux"),
                                             ("vae,flux", "unet")])
def test_pretraining_refuses_a_new_vae_or_clip_without_the_models_that_read_them(tmp_path, parts, missing):
    from mpalign.cli import UserInputError
    from mpalign.toy.pretrain import main

    with pytest.raises(UserInputError, match=f"add {missing} to --parts"):  # run_cli: one `error:` line, exit 2
        main(["--out", str(tmp_path), "--parts", parts])
    assert not any(tmp_path.iterdir())  # refused before training anything


@pytest.mark.slow
def test_pretraining_command_writes_loadable_weights_and_lowers_every_loss(tmp_path):
    from mpalign.toy.pretrain import PARTS, main
    from mpalign.zoo import load_clip_model, load_sdxl

    assert main(["--out", str(tmp_path), "--scale", "0.005"]) == 0
    import json

    metrics = json.loads((tmp_path / "metrics.json").read_text())
    for part in PARTS:
        assert metrics[part]["final_loss"] < metrics[part]["first_loss"], (part, metrics[part])
    cfg = ModelConfig(preset="toy", toy_weights=str(tmp_path), device="cpu")
    sdxl = load_sdxl(cfg)
    assert sdxl.vae.config.scaling_factor == pytest.approx(metrics["vae"]["scaling_factor"])
    clip = load_clip_model(cfg, "").model  # the UNet reads the trained CLIP's text tower as its second encoder
    for tower, trained in ((sdxl.text_encoder_2.text_model, clip.text_model),
                           (sdxl.text_encoder_2.text_projection, clip.text_projection)):
        for (name, value), expected in zip(tower.state_dict().items(), trained.state_dict().values()):
            assert torch.equal(value, expected), name
    assert sdxl.unet.config.cross_attention_dim == (sdxl.text_encoder.config.hidden_size
                                                    + clip.config.text_config.hidden_size)
    from mpalign.zoo import flux_token_pixels, load_flux

    flux = load_flux(cfg)  # MOSAIC's base: the same VAE latents and the same CLIP text tower, loaded as diffusers FLUX
    assert torch.equal(flux.vae.decoder.conv_out.weight, sdxl.vae.decoder.conv_out.weight)
    for (name, value), expected in zip(flux.text_encoder.state_dict().items(), clip.text_model.state_dict().values()):
        assert torch.equal(value, expected), name
    assert flux_token_pixels(cfg) == 2 * 2 ** (len(sdxl.vae.config.block_out_channels) - 1)
    assert "python -m mpalign.toy.pretrain" in (tmp_path / "README.md").read_text()


def _toy_identity(cfg, adapter_dir, samples, image_dir) -> float:
    from mpalign.eval.benchmarks import expand_runs
    from mpalign.eval.scoring import generate_rows, load_rgb
    from mpalign.pipeline import MPAlignPipeline

    pipe = MPAlignPipeline.from_config(cfg, adapter_dir=adapter_dir)
    rows = generate_rows(pipe, expand_runs(samples, [0]), cfg, "adapter", image_dir)
    return float(np.mean([identity_scores(load_rgb(r["image_path"]), box, name)["identity_color"]
                          for r in rows for box, name in zip(r["boxes"], r["subjects"])]))


@pytest.mark.slow
def test_a_short_adapter_training_in_the_toy_world_carries_the_references_colour(tmp_path):
    """The toy dataset built by the real stages (Ray-free loop), the adapter trained by the training module's own
    step, generation and the identity score as the evaluation does them: colour accuracy (chance 1/8) must rise
    far above the untrained adapter's."""
    import pyarrow.parquet as pq
    import torch
    from model_batches import one_thread

    from mpalign.config import load_config
    from mpalign.data.build import build_dataset
    from mpalign.data.collate import rows_to_batch
    from mpalign.models.training_module import MPAlignTrainingModule

    cfg = load_config("configs/toy.yaml", [f"data.path={tmp_path / 'data'}", "data.sample.num_images=800",
                                           "data.sample.num_videos=0", "train.warmup_steps=0", "train.alpha=0.0",
                                           "eval.num_inference_steps=12"])
    build_dataset(cfg, executor="local", log=lambda _: None)
    table = pq.read_table(tmp_path / "data" / "samples").to_pydict()
    batches = [rows_to_batch({k: v[i:i + 8] for k, v in table.items()}, cfg) for i in range(0, len(table["id"]) - 7, 8)]
    samples = toy_samples(tmp_path / "bench", count=16)
    with one_thread():
        module = MPAlignTrainingModule.from_config(cfg)
        module.save_adapter(tmp_path / "untrained")
        before = _toy_identity(cfg, tmp_path / "untrained", samples, tmp_path / "images-before")
        optimizer = torch.optim.AdamW(module.trainable_parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
        generator = torch.Generator().manual_seed(0)
        module.train()
        for step in range(TRAIN_STEPS):
            optimizer.zero_grad()
            module(batches[step % len(batches)], step, generator=generator)["loss"].backward()
            torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), cfg.train.max_grad_norm)
            optimizer.step()
        module.save_adapter(tmp_path / "trained")
        after = _toy_identity(cfg, tmp_path / "trained", samples, tmp_path / "images-after")
    assert after >= before + IDENTITY_GAIN, (before, after)


@pytest.mark.parametrize("config, off, on", [("configs/toy.yaml", "trained, alpha=0", "trained, curriculum"),
                                             ("configs/toy-mosaic.yaml", "trained, flow only", "trained, SCAL+MDL")])
def test_experiment_trains_each_method_without_and_with_its_alignment_losses(tmp_path, config, off, on):
    from mpalign.config import load_config
    from mpalign.toy.experiment import conditions, training_config

    cfg = load_config(config)
    assert conditions(cfg)[-2:] == (off, on)
    without, with_losses = (training_config(cfg, c, 1, tmp_path).train for c in (off, on))
    assert without.alpha == 0.0 and without.beta == 0.0 and without.seed == 1
    assert (with_losses.alpha, with_losses.beta) == (cfg.train.alpha, cfg.train.beta)
    assert without.output_dir != with_losses.output_dir
    with pytest.raises(ValueError):
        training_config(cfg, "untrained", 1, tmp_path)


@pytest.mark.parametrize("seeds", [1, 2])
def test_experiment_table_shows_mean_and_std_over_seeds_and_the_mean_alone_for_one(seeds):
    import pandas as pd

    from mpalign.toy.experiment import SHOWN, markdown_table, summarize

    scores = pd.DataFrame([{"condition": c, "run_seed": s, **{m: 0.25 * (s + 1) for m in SHOWN}}
                           for c in ("untrained", "trained, alpha=0") for s in range(seeds) for _ in range(2)])
    _, summary = summarize(scores, {("trained, alpha=0", s): 30.0 for s in range(seeds)})
    table = markdown_table(summary, seeds)
    untrained_row = next(line for line in table.splitlines() if line.startswith("| untrained |"))
    assert "nan" not in table
    if seeds == 1:
        assert "±" not in untrained_row and "0.250 |" in untrained_row and "One seed" in table
    else:  # seeds 0, 1 score 0.25, 0.50: mean 0.375, sample std 0.177
        assert "0.375 ± 0.177" in untrained_row and "over 2 seeds" in table
    assert next(line for line in table.splitlines() if line.startswith("| trained, alpha=0 |")).endswith("| 30 |")
