"""``python -m mpalign.toy.pretrain``: train the toy world's models and write them as the shipped ``toy`` preset.

Every role of the real pipeline gets a small model of the same class, trained here on the procedural world
(``mpalign.toy.world``) at 64 px:

- ``sdxl/``: a diffusers SDXL folder. The VAE (``AutoencoderKL``, 4x downsampling) learns to reconstruct scenes;
  the UNet (``UNet2DConditionModel`` with SDXL's text_time conditioning and cross-attention down / mid / up blocks)
  learns text-to-image on the VAE's latents, with captions that name each object either fully ("a dotted blue
  ring") or by its kind only ("a ring"). It reads two frozen text encoders, like SDXL: the first is the tiny preset's
  random ``CLIPTextModel``, the second (``CLIPTextModelWithProjection``) is the text tower of the toy CLIP below, so
  the CLIP is trained first (a UNet learns to read trained text features far faster than random ones).
- ``flux/``: a diffusers FLUX folder, the MOSAIC method's base model. A ``FluxTransformer2DModel`` (dual- then
  single-stream blocks) learns text-to-image by flow matching on the toy VAE's latents (4 channels, packed 2x2 into
  16-channel tokens, one token per 8x8 pixels); its CLIP role (pooled) is the toy CLIP's text tower, its T5 role a
  small ``T5EncoderModel`` trained with the transformer (frozen afterwards, like the real one). No guidance
  embedding: the toy model is not guidance-distilled, so it is FLUX.1-schnell-like in that respect.
- ``clip/``: a ``CLIPModel`` trained contrastively on subject crops and scenes with their captions, plus an
  attribute head on crops: the evaluation's CLIP-I / CLIP-T space; ``image_encoder/`` is its vision tower with the
  projection (``CLIPVisionModelWithProjection``), the adapter's image encoder.
- ``dinov2/``: a ``Dinov2Model`` trained on crops with attribute heads on its CLS and mean patch token (supervised,
  not DINO's self-distillation), so its features separate identities: the alignment targets.
- ``classifier/``: the attribute classifier (``mpalign.toy.classifier``), the identity metric.

The image encoders, the UNet and FLUX never see the attribute combinations the toy benchmark holds out
(``mpalign.sample_data.is_held_out``); the classifier sees all of them. ``metrics.json`` and the model card
``README.md`` record the command, the seed and what each model reached on held-out data.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mpalign.cli import UserInputError, run_cli
from mpalign.toy import WEIGHTS_DIR
from mpalign.toy import classifier as attribute_classifier
from mpalign.toy.world import ATTRIBUTES, crop_set, scene_set

IMAGE_SIZE = 64
CROP_SIZE = 64
# in training order: the UNet and FLUX read the VAE's latents and the CLIP's text tower
PARTS = ("vae", "clip", "unet", "flux", "dinov2", "classifier")
# what must be retrained with a part: models trained on its outputs
DEPENDENTS = {"vae": ("unet", "flux"), "clip": ("unet", "flux")}
# Optimiser steps of each part at --scale 1 (about 90 min on 2 CPU cores in all, the UNet half of it). The UNet's
# 10 000 steps: at 4 000 it drew blobs (text to image, shape 0.19, chance 0.17), at 10 000 shapes (0.39).
STEPS = {"vae": 1500, "unet": 10000, "flux": 5000, "clip": 1200, "dinov2": 1000, "classifier": 1200}


def log(message: str) -> None:
    print(message, flush=True)


def _seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def _optimizer(params, lr: float, steps: int):
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warm = max(steps // 20, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 0.5 * (1 + math.cos(math.pi * min(s / steps, 1.0)))))
    return opt, sched


def _loop(name: str, steps: int, step_fn, every: int | None = None) -> dict[str, float]:
    """Run ``step_fn(i) -> loss`` ``steps`` times, printing a running mean ~10 times; returns the mean loss of the
    first and of the last reporting window."""
    every = every or max(steps // 10, 1)
    running, start, means = [], time.perf_counter(), []
    for i in range(steps):
        running.append(step_fn(i))
        if (i + 1) % every == 0 or i + 1 == steps:
            means.append(float(np.mean(running)))
            log(f"  {name} step {i + 1}/{steps}: loss {means[-1]:.4f} ({time.perf_counter() - start:.0f} s)")
            running = []
    return {"first_loss": round(means[0], 4), "final_loss": round(means[-1], 4)}


def _to_unit(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def _batches(n: int, batch: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, n, (batch,), generator=gen)


# --------------------------------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------------------------------


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 64),
                         down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                         layers_per_block=1, norm_num_groups=8, sample_size=IMAGE_SIZE)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1]."""
    mse = ((a.clamp(-1, 1) - b) / 2).pow(2).mean(dim=(1, 2, 3))
    return float((10 * torch.log10(1 / mse.clamp_min(1e-10))).mean())


def train_vae(images: np.ndarray, held_out: np.ndarray, steps: int, seed: int) -> tuple[object, dict]:
    gen = _seed(seed)
    vae = build_vae()
    opt, sched = _optimizer(vae.parameters(), 1e-3, steps)
    pixels = _to_unit(images)

    def step(_):
        x = pixels[_batches(len(pixels), 16, gen)]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(gen)).sample
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    losses = _loop("vae", steps, step)
    vae.eval()
    with torch.no_grad():
        test = _to_unit(held_out)
        latents = vae.encode(_to_unit(images[:512])).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1.0 / latents.std()))  # unit-variance latents, as SDXL's 0.13025
        recon = torch.cat([vae.decode(vae.encode(test[i:i + 64]).latent_dist.mean).sample
                           for i in range(0, len(test), 64)])
    return vae, {**losses, "psnr_db_held_out": round(psnr(recon, test), 2),
                 "scaling_factor": vae.config.scaling_factor}


# --------------------------------------------------------------------------------------------------------------------
# UNet (text to image)
# --------------------------------------------------------------------------------------------------------------------


def toy_unet_config(text_encoder, text_encoder_2) -> dict:
    """The tiny preset's UNet layout at 64 px, its cross-attention as wide as the two text encoders' hidden states
    together and its pooled text input as wide as the second one's projection (as in SDXL)."""
    from mpalign.zoo import TINY_TIME_EMBED, tiny_unet_config

    return {**tiny_unet_config(), "sample_size": IMAGE_SIZE // 4,
            "cross_attention_dim": text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
            "projection_class_embeddings_input_dim": text_encoder_2.config.projection_dim + 6 * TINY_TIME_EMBED}


@torch.no_grad()
def _encode_captions(sdxl, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    from mpalign.encoders import encode_prompts

    out = [encode_prompts(sdxl, captions[i:i + 256]) for i in range(0, len(captions), 256)]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


def train_unet(sdxl, images: np.ndarray, captions: list[str], steps: int, seed: int):
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from mpalign.encoders import add_time_ids

    gen = _seed(seed)
    with torch.no_grad():
        pixels = _to_unit(images)
        latents = torch.cat([sdxl.vae.encode(pixels[i:i + 128]).latent_dist.mean for i in range(0, len(pixels), 128)])
        latents = latents * sdxl.vae.config.scaling_factor
    prompt_embeds, pooled = _encode_captions(sdxl, captions)
    unet = UNet2DConditionModel(**toy_unet_config(sdxl.text_encoder, sdxl.text_encoder_2))
    scheduler = DDPMScheduler.from_config(sdxl.scheduler.config)
    time_ids = torch.tensor(add_time_ids((IMAGE_SIZE, IMAGE_SIZE), (0, 0), (IMAGE_SIZE, IMAGE_SIZE)))
    opt, sched = _optimizer(unet.parameters(), 5e-4, steps)
    batch = 32

    def step(_):
        idx = _batches(len(latents), batch, gen)
        x0, cond, pool = latents[idx], prompt_embeds[idx].clone(), pooled[idx].clone()
        # Unconditional samples for classifier-free guidance, zeroed as SDXL's were: its pipeline's guidance branch
        # for an empty negative prompt is zeros (force_zeros_for_empty_prompt), which the UNet must have seen.
        drop = torch.rand(batch, generator=gen) < 0.1
        cond[drop], pool[drop] = 0.0, 0.0
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,), generator=gen)
        pred = unet(scheduler.add_noise(x0, noise, t), t, cond,
                    added_cond_kwargs={"text_embeds": pool, "time_ids": time_ids.expand(batch, -1)}).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        return loss.item()

    return unet.eval(), _loop("unet", steps, step)


# --------------------------------------------------------------------------------------------------------------------
# FLUX (text to image; the MOSAIC method's base model)
# --------------------------------------------------------------------------------------------------------------------

FLUX_TEXT_TOKENS = 32  # the T5 role's sequence length (FLUX.1-dev: 512; toy captions are under 20 tokens)


def build_flux_text_encoder_2(width: int):
    """The T5 role: FLUX's ``T5EncoderModel`` class, small, over the toy CLIP vocabulary (no T5 sentencepiece model
    can be fetched offline)."""
    from transformers import T5Config, T5EncoderModel

    from mpalign.tokenizers import tiny_clip_tokenizer, tiny_clip_vocab_size

    eos = tiny_clip_tokenizer().convert_tokens_to_ids("<|endoftext|>")
    return T5EncoderModel(T5Config(vocab_size=tiny_clip_vocab_size(), d_model=width, d_kv=width // 4,
                                   d_ff=2 * width, num_layers=2, num_heads=4, pad_token_id=eos, eos_token_id=eos))


def toy_flux_transformer_config(vae, text_encoder, text_encoder_2) -> dict:
    """The tiny preset's FLUX layout over the toy VAE's latents (2x2-packed: 4 x latent channels in) and the two
    text encoders' widths; no guidance embedding (see the module docstring)."""
    from mpalign.zoo import tiny_flux_transformer_config

    return {**tiny_flux_transformer_config(), "in_channels": 4 * vae.config.latent_channels, "num_layers": 3,
            "num_single_layers": 3, "num_attention_heads": 4, "guidance_embeds": False,
            "joint_attention_dim": text_encoder_2.config.d_model,
            "pooled_projection_dim": text_encoder.config.hidden_size}


def flux_vae(vae):
    """The toy VAE as FLUX's role loads it: FLUX normalises latents by ``(z - shift_factor) * scaling_factor``, and
    the toy latents are centred already (shift 0)."""
    from diffusers import AutoencoderKL

    # without _use_default_values: from_config would drop every key it lists, shift_factor of a fresh VAE among them
    config = {k: v for k, v in vae.config.items() if k != "_use_default_values"}
    copy = AutoencoderKL.from_config({**config, "shift_factor": 0.0})
    copy.load_state_dict(vae.state_dict())
    return copy.to(next(vae.parameters()).dtype).eval().requires_grad_(False)


def train_flux(sdxl, clip_text, images: np.ndarray, captions: list[str], steps: int, seed: int):
    """Flow matching (``x_t = (1 - t) x_0 + t eps``, predict ``eps - x_0``, t logit-normal, as FLUX and
    ``MosaicTrainingModule``) of a new transformer and T5 role on the VAE's packed latents; returns the parts of a
    FLUX folder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    from mpalign.tokenizers import tiny_clip_tokenizer
    from mpalign.zoo import FluxComponents, flux_scheduler_config

    gen = _seed(seed)
    vae = flux_vae(sdxl.vae)
    tokenizer, tokenizer_2 = tiny_clip_tokenizer(), tiny_clip_tokenizer(FLUX_TEXT_TOKENS)
    with torch.no_grad():
        pixels = _to_unit(images)
        latents = torch.cat([vae.encode(pixels[i:i + 128]).latent_dist.mean for i in range(0, len(pixels), 128)])
        latents = (latents - vae.config.shift_factor) * vae.config.scaling_factor
        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        clip_ids = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
        pooled = torch.cat([clip_text(clip_ids[i:i + 256]).pooler_output for i in range(0, len(clip_ids), 256)])
    t5_ids = tokenizer_2(captions, padding="max_length", truncation=True, return_tensors="pt").input_ids
    text_encoder_2 = build_flux_text_encoder_2(clip_text.config.hidden_size)
    transformer = FluxTransformer2DModel(**toy_flux_transformer_config(vae, clip_text, text_encoder_2))
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, "cpu", torch.float32)
    text_ids = torch.zeros(FLUX_TEXT_TOKENS, 3)
    trained = [*transformer.parameters(), *text_encoder_2.parameters()]
    opt, sched = _optimizer(trained, 1e-3, steps)
    batch = 32

    def step(_):
        idx = _batches(len(packed), batch, gen)
        x0 = packed[idx]
        t = torch.sigmoid(torch.randn(batch, generator=gen))
        noise = torch.randn(x0.shape, generator=gen)
        noisy = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
        text = text_encoder_2(t5_ids[idx])[0]
        pred = transformer(hidden_states=noisy, encoder_hidden_states=text, pooled_projections=pooled[idx],
                           timestep=t, img_ids=image_ids, txt_ids=text_ids, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        return loss.item()

    losses = _loop("flux", steps, step)
    flux = FluxComponents(transformer.eval().requires_grad_(False), vae, clip_text,
                          text_encoder_2.eval().requires_grad_(False), tokenizer, tokenizer_2,
                          FlowMatchEulerDiscreteScheduler(**flux_scheduler_config()))
    return flux, losses


# --------------------------------------------------------------------------------------------------------------------
# Text to image, judged by the classifier (the UNet and FLUX alike)
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def text_to_image_accuracy(pipe, classifier, count: int, seed: int, steps: int = 20, **options) -> dict:
    """Single-object captions naming every attribute ("a dotted blue ring on sand"), generated by ``pipe`` (a
    diffusers text-to-image pipeline; ``options`` go to its call) from the caption alone; the classifier judges the
    whole picture (one object fills 55-90 % of it)."""
    import random

    from mpalign.config import SampleDataConfig
    from mpalign.toy.world import attribute_labels, random_scene

    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    scenes = [random_scene(rng, np_rng, IMAGE_SIZE, 1, SampleDataConfig()) for _ in range(count)]
    pipe.set_progress_bar_config(disable=True)
    images = pipe([s.caption for s in scenes], height=IMAGE_SIZE, width=IMAGE_SIZE, num_inference_steps=steps,
                  output_type="np", generator=torch.Generator().manual_seed(seed), **options).images
    predicted = attribute_classifier.predict(classifier, (images * 255).round().astype(np.uint8))
    labels = np.asarray([[*attribute_labels(s.objects[0]), 1] for s in scenes])
    return {k: round(v, 3) for k, v in attribute_classifier.attribute_accuracy(predicted, labels).items()}


# --------------------------------------------------------------------------------------------------------------------
# Image encoders: CLIP and DINOv2
# --------------------------------------------------------------------------------------------------------------------


def _processed(processor, images: np.ndarray) -> torch.Tensor:
    """The encoder's own image processor, once over the whole set (what training and inference both feed it)."""
    return torch.cat([processor(images=list(images[i:i + 512]), return_tensors="pt").pixel_values
                      for i in range(0, len(images), 512)])


def _attribute_heads(width: int) -> torch.nn.ModuleDict:
    return torch.nn.ModuleDict({name: torch.nn.Linear(width, len(values)) for name, values in ATTRIBUTES.items()})


def _attribute_loss(heads: torch.nn.ModuleDict, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return sum(F.cross_entropy(heads[name](features), labels[:, i]) for i, name in enumerate(ATTRIBUTES))


def build_clip():
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from mpalign.tokenizers import tiny_clip_tokenizer, tiny_clip_vocab_size
    from mpalign.zoo import _tiny_clip_vision

    tokenizer = tiny_clip_tokenizer()
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    vision = _tiny_clip_vision(0).model.config
    text = {"vocab_size": tiny_clip_vocab_size(), "hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 2,
            "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": bos, "eos_token_id": eos,
            "pad_token_id": eos}
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=vision.projection_dim))
    size = vision.image_size
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer)
    return model, processor


def train_clip(crops: np.ndarray, labels: np.ndarray, phrases: list[str], scenes: np.ndarray, captions: list[str],
               steps: int, seed: int):
    gen = _seed(seed)
    model, processor = build_clip()
    images = _processed(processor.image_processor, np.concatenate([crops, scenes]))
    texts = phrases + captions
    tokens = processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    heads = _attribute_heads(model.config.projection_dim)
    opt, sched = _optimizer([*model.parameters(), *heads.parameters()], 2e-3, steps)
    n_crops = len(crops)
    attr = torch.from_numpy(labels[:, :3])

    def step(_):
        idx = _batches(len(images), 128, gen)
        out = model(input_ids=tokens.input_ids[idx], attention_mask=tokens.attention_mask[idx],
                    pixel_values=images[idx], return_loss=True)
        is_crop = idx < n_crops
        loss = out.loss + _attribute_loss(heads, out.image_embeds[is_crop], attr[idx[is_crop]])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    return model.eval(), processor, _loop("clip", steps, step)


def vision_tower(clip):
    """The CLIP model's vision tower with its projection, as the image encoder role loads it (its own folder, so
    loading it does not report the text tower's weights as unexpected)."""
    from transformers import CLIPVisionModelWithProjection

    return _tower(clip, CLIPVisionModelWithProjection(clip.config.vision_config),
                  {"vision_model": "vision_model", "visual_projection": "visual_projection"})


def text_tower(clip, projection: bool = True):
    """The CLIP model's text tower: with its projection, the toy SDXL's ``text_encoder_2``; without
    (``CLIPTextModel``, pooled output unprojected), the toy FLUX's ``text_encoder``."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if not projection:  # CLIPTextModel is the text transformer itself
        return _tower(clip, CLIPTextModel(clip.config.text_config), {"text_model": ""})
    # the text config's own projection_dim is a default; the projection's real width is the CLIP model's
    config = CLIPTextConfig(**{**clip.config.text_config.to_dict(), "projection_dim": clip.config.projection_dim})
    return _tower(clip, CLIPTextModelWithProjection(config),
                  {"text_model": "text_model", "text_projection": "text_projection"})


def _tower(clip, tower, submodules: dict[str, str]):
    """``tower`` with the CLIP model's submodules copied in (CLIP name -> the tower's; "" = the tower itself)."""
    tower.float()  # a config read from saved weights names their float16: built in it, the copy would be rounded
    for name, tower_name in submodules.items():
        tower.get_submodule(tower_name).load_state_dict(getattr(clip, name).state_dict())
    return tower.eval().requires_grad_(False)


def build_dinov2():
    from mpalign.zoo import _tiny_dinov2

    enc = _tiny_dinov2(0)
    return enc.model, enc.processor


def train_dinov2(crops: np.ndarray, labels: np.ndarray, steps: int, seed: int):
    gen = _seed(seed)
    model, processor = build_dinov2()
    images = _processed(processor, crops)
    width = model.config.hidden_size
    cls_heads, patch_heads = _attribute_heads(width), _attribute_heads(width)
    params = [*model.parameters(), *cls_heads.parameters(), *patch_heads.parameters()]
    opt, sched = _optimizer(params, 2e-3, steps)
    attr = torch.from_numpy(labels[:, :3])

    def step(_):
        idx = _batches(len(images), 128, gen)
        hidden = model(images[idx]).last_hidden_state
        loss = _attribute_loss(cls_heads, hidden[:, 0], attr[idx]) + _attribute_loss(patch_heads, hidden[:, 1:].mean(1),
                                                                                    attr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    return model.eval(), processor, _loop("dinov2", steps, step)


def nearest_neighbour_accuracy(gallery: torch.Tensor, gallery_labels: np.ndarray, queries: torch.Tensor,
                               query_labels: np.ndarray) -> dict[str, float]:
    """Each query takes the attributes of its most cosine-similar gallery feature."""
    sims = F.normalize(queries, dim=-1) @ F.normalize(gallery, dim=-1).T
    picked = gallery_labels[sims.argmax(-1).numpy()]
    hits = picked[:, :3] == query_labels[:, :3]
    return {**{n: round(float(hits[:, i].mean()), 3) for i, n in enumerate(ATTRIBUTES)},
            "all": round(float(hits.all(1).mean()), 3)}


# --------------------------------------------------------------------------------------------------------------------
# Attribute classifier
# --------------------------------------------------------------------------------------------------------------------


def _degraded(crops: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur by down- and up-sampling at a random scale plus noise: generated subjects are softer than renders."""
    size = crops.shape[-1]
    scale = int(torch.randint(size // 4, size + 1, (1,), generator=gen))
    out = F.interpolate(F.interpolate(crops, size=scale, mode="bilinear", antialias=True), size=size, mode="bilinear")
    return out + 0.05 * torch.randn(out.shape, generator=gen)


def train_classifier(crops: np.ndarray, labels: np.ndarray, steps: int, seed: int, vae=None):
    gen = _seed(seed)
    model = attribute_classifier.build_classifier()
    pixels = attribute_classifier.to_pixels(crops)
    if vae is not None:  # half the crops as the toy VAE reproduces them: the look of generated images
        with torch.no_grad():
            half = len(pixels) // 2
            pixels[:half] = torch.cat([vae.decode(vae.encode(pixels[i:i + 128]).latent_dist.mean).sample
                                       for i in range(0, half, 128)])[:half].clamp(-1, 1)
    target = torch.from_numpy(labels)
    opt, sched = _optimizer(model.parameters(), 2e-3, steps)

    def step(_):
        idx = _batches(len(pixels), 64, gen)
        x = pixels[idx]
        x = torch.where(torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5, _degraded(x, gen), x)
        loss = attribute_classifier.classifier_loss(model(x).logits, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        return loss.item()

    return model.eval(), _loop("classifier", steps, step)


# --------------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------------


def _save_pipeline(pipeline_class, parts, modules, path: Path) -> None:
    """A diffusers pipeline folder of ``parts`` (SDXL's or FLUX's), its ``modules`` stored in float16."""
    for module in modules:
        module.to(torch.float16)  # half the bytes in the repo; loaders cast to the configured dtype
    pipeline_class(**parts.as_pipeline_kwargs()).save_pretrained(path, safe_serialization=True)
    for config in path.glob("*/config.json"):  # a part loaded from disk names this machine's folder
        values = json.loads(config.read_text())
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")
    for module in modules:
        module.to(torch.float32)


def _save_sdxl(out: Path, sdxl) -> None:
    from diffusers import StableDiffusionXLPipeline

    _save_pipeline(StableDiffusionXLPipeline, sdxl, (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2),
                   out / "sdxl")


def _save_flux(out: Path, flux) -> None:
    from diffusers import FluxPipeline

    _save_pipeline(FluxPipeline, flux, (flux.transformer, flux.vae, flux.text_encoder, flux.text_encoder_2),
                   out / "flux")


def _load_flux(out: Path):
    from mpalign.config import ModelConfig
    from mpalign.zoo import load_flux

    return load_flux(ModelConfig(preset="toy", toy_weights=str(out), device="cpu"))


def _save(model, processor, path: Path) -> None:
    model.to(torch.float16).save_pretrained(path)
    model.to(torch.float32)
    if processor is not None:
        processor.save_pretrained(path)


def _load_sdxl(out: Path):
    from mpalign.config import ModelConfig
    from mpalign.zoo import load_sdxl

    return load_sdxl(ModelConfig(preset="toy", toy_weights=str(out), device="cpu"))


def _load_clip(out: Path):
    from mpalign.config import ModelConfig
    from mpalign.zoo import load_clip_model

    return load_clip_model(ModelConfig(preset="toy", toy_weights=str(out), device="cpu"), "").model


def pretrain(out: Path, parts: tuple[str, ...], scale: float, seed: int) -> dict:
    from mpalign.zoo import _tiny_sdxl

    torch.set_num_threads(max(torch.get_num_threads(), 1))
    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    steps = {part: max(int(n * scale), 2) for part, n in STEPS.items()}
    count = lambda n: max(int(n * min(scale * 4, 1.0)), 64)
    start = time.perf_counter()
    log(f"toy pretraining -> {out} (parts: {', '.join(parts)}; steps: {steps})")
    scenes, captions = scene_set(count(6000), seed, IMAGE_SIZE, "mixed", exclude_held_out=True)
    held_scenes, _ = scene_set(count(256), seed + 1, IMAGE_SIZE, "full", exclude_held_out=False)
    sdxl = _tiny_sdxl(0) if "vae" in parts else _load_sdxl(out)
    if "vae" in parts:
        t = time.perf_counter()
        sdxl.vae, metrics["vae"] = train_vae(scenes, held_scenes, steps["vae"], seed)
        metrics["vae"]["cpu_minutes"] = round((time.perf_counter() - t) / 60, 1)
        log(f"vae: held-out PSNR {metrics['vae']['psnr_db_held_out']} dB")
    crops, labels, phrases = crop_set(count(8000), seed + 2, IMAGE_SIZE, CROP_SIZE, exclude_held_out=True)
    gallery, gallery_labels, _ = crop_set(count(1500), seed + 3, IMAGE_SIZE, CROP_SIZE, exclude_held_out=False)
    queries, query_labels, _ = crop_set(count(1000), seed + 4, IMAGE_SIZE, CROP_SIZE, exclude_held_out=False)
    if "clip" in parts:
        t = time.perf_counter()
        clip, processor, metrics["clip"] = train_clip(crops, labels, phrases, scenes[:count(2000)],
                                                      captions[:count(2000)], steps["clip"], seed)
        with torch.no_grad():
            feats = lambda x: clip.get_image_features(pixel_values=_processed(processor.image_processor, x)).pooler_output
            metrics["clip"]["nn_attribute_accuracy"] = nearest_neighbour_accuracy(
                feats(gallery), gallery_labels, feats(queries), query_labels)
        metrics["clip"]["cpu_minutes"] = round((time.perf_counter() - t) / 60, 1)
        _save(clip, processor, out / "clip")
        _save(vision_tower(clip), processor.image_processor, out / "image_encoder")
        log(f"clip: nearest-neighbour attribute accuracy {metrics['clip']['nn_attribute_accuracy']}")
    if "unet" in parts:
        # the text tower as saved (float16, like every shipped weight), so a later --parts unet reads the same one
        sdxl.text_encoder_2 = text_tower(_load_clip(out))
        t = time.perf_counter()
        sdxl.unet, metrics["unet"] = train_unet(sdxl, scenes, captions, steps["unet"], seed)
        metrics["unet"]["cpu_minutes"] = round((time.perf_counter() - t) / 60, 1)
        _save_sdxl(out, sdxl)
    if "flux" in parts:
        t = time.perf_counter()
        flux, metrics["flux"] = train_flux(sdxl, text_tower(_load_clip(out), projection=False), scenes, captions,
                                           steps["flux"], seed)
        metrics["flux"]["cpu_minutes"] = round((time.perf_counter() - t) / 60, 1)
        _save_flux(out, flux)
    if "dinov2" in parts:
        t = time.perf_counter()
        dino, processor, metrics["dinov2"] = train_dinov2(crops, labels, steps["dinov2"], seed)
        with torch.no_grad():
            feats = lambda x: dino(_processed(processor, x)).last_hidden_state[:, 0]
            metrics["dinov2"]["nn_attribute_accuracy"] = nearest_neighbour_accuracy(
                feats(gallery), gallery_labels, feats(queries), query_labels)
        metrics["dinov2"]["cpu_minutes"] = round((time.perf_counter() - t) / 60, 1)
        _save(dino, processor, out / "dinov2")
        log(f"dinov2: nearest-neighbour attribute accuracy {metrics['dinov2']['nn_attribute_accuracy']}")
    if "classifier" in parts:
        t = time.perf_counter()
        all_crops, all_labels, _ = crop_set(count(8000), seed + 5, IMAGE_SIZE, CROP_SIZE, exclude_held_out=False,
                                            empty_share=0.1)
        model, metrics["classifier"] = train_classifier(all_crops, all_labels, steps["classifier"], seed,
                                                        vae=sdxl.vae)
        test, test_labels, _ = crop_set(count(1000), seed + 6, IMAGE_SIZE, CROP_SIZE, exclude_held_out=False,
                                        empty_share=0.1)
        metrics["classifier"]["held_out_accuracy"] = {
            k: round(v, 4) for k, v in attribute_classifier.attribute_accuracy(
                attribute_classifier.predict(model, test), test_labels).items()}
        metrics["classifier"]["cpu_minutes"] = round((time.perf_counter() - t) / 60, 1)
        _save(model, None, out / "classifier")
        log(f"classifier: held-out accuracy {metrics['classifier']['held_out_accuracy']}")
    judged = [part for part in ("unet", "flux") if part in parts or "classifier" in parts]
    if judged:
        from diffusers import FluxPipeline, StableDiffusionXLPipeline

        classifier = attribute_classifier.load_classifier(out / "classifier")
    if "unet" in judged:
        pipe = StableDiffusionXLPipeline(**_load_sdxl(out).as_pipeline_kwargs())
        metrics["unet_text_to_image"] = text_to_image_accuracy(pipe, classifier, count(128), seed + 7,
                                                               guidance_scale=4.0)
        log(f"unet: single-object text-to-image attribute accuracy {metrics['unet_text_to_image']}")
    if "flux" in judged and (out / "flux").is_dir():
        pipe = FluxPipeline(**_load_flux(out).as_pipeline_kwargs())
        metrics["flux_text_to_image"] = text_to_image_accuracy(pipe, classifier, count(128), seed + 7,
                                                               max_sequence_length=FLUX_TEXT_TOKENS)
        log(f"flux: single-object text-to-image attribute accuracy {metrics['flux_text_to_image']}")
    # the command that rebuilds every part; a run of some parts (--parts) keeps the others' earlier weights
    options = [*([f"--seed {seed}"] if seed else []), *([f"--scale {scale}"] if scale != 1.0 else [])]
    metrics["command"] = " ".join(["python -m mpalign.toy.pretrain", *options])
    metrics["last_run_parts"] = list(parts)
    metrics["seed"], metrics["scale"] = seed, scale
    metrics["machine"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    metrics_path.write_text(json.dumps(metrics, indent=2) + "\n")
    write_model_card(out, metrics)
    log(f"toy pretraining done in {(time.perf_counter() - start) / 60:.1f} min; metrics in {metrics_path}")
    return metrics


def write_model_card(out: Path, metrics: dict) -> None:
    card = [
        "# The toy preset's weights",
        "",
        "Small models of the real roles' classes, trained by `python -m mpalign.toy.pretrain` on the procedural world",
        "of `mpalign/sample_data.py` (64 px; shapes x colours x textures on six backgrounds, 1-4 objects). Loaded by",
        "`model.preset: toy` through `from_pretrained`, like real weights. Rebuild them with",
        "",
        "```bash",
        f"{metrics['command']}",
        "```",
        "",
        f"Seed {metrics['seed']}, step scale {metrics['scale']}, trained on {metrics['machine']}; the last run trained",
        f"{', '.join(metrics['last_run_parts'])} (each part's figures below are from the run that trained it; the UNet reads the",
        "CLIP's text tower, so a new CLIP or VAE means a new UNet and FLUX). The image encoders,",
        "the UNet and FLUX never saw the attribute combinations the toy benchmark holds out; the classifier (the judge) saw all.",
        "Folders: `sdxl/` (diffusers layout; `text_encoder_2` is the CLIP's text tower with projection, `text_encoder`",
        "the tiny preset's random one), `flux/` (diffusers FLUX layout, the MOSAIC method's base model: the same VAE,",
        "`text_encoder` the CLIP's text tower, `text_encoder_2` a small T5 trained with the transformer, no guidance",
        "embedding), `clip/` (`CLIPModel`), `image_encoder/` (its vision tower with projection),",
        "`dinov2/`, `classifier/` (`ResNetForImageClassification`, four heads: shape, colour, texture, object present).",
        "",
        "| model | what it reached (held-out data) | minutes (wall, 2 shared cores) |",
        "|---|---|---|",
    ]
    rows = {
        "vae": lambda m: f"PSNR {m['psnr_db_held_out']} dB, latent scaling factor {m['scaling_factor']:.4f}",
        "unet": lambda m: f"final noise-prediction loss {m['final_loss']}",
        "flux": lambda m: f"final flow-matching loss {m['final_loss']}",
        "clip": lambda m: f"nearest-neighbour attribute accuracy {m['nn_attribute_accuracy']}",
        "dinov2": lambda m: f"nearest-neighbour attribute accuracy (CLS) {m['nn_attribute_accuracy']}",
        "classifier": lambda m: f"accuracy {m['held_out_accuracy']}",
    }
    for part, describe in rows.items():
        if part in metrics:
            card.append(f"| {part} | {describe(metrics[part])} | {metrics[part].get('cpu_minutes', '')} |")
    if "unet_text_to_image" in metrics:
        card += ["", "Text to image from captions alone (single object, every attribute named, 20 steps), judged by the",
                 f"classifier: UNet (guidance 4) {metrics['unet_text_to_image']}"
                 + (f"; FLUX (no guidance) {metrics['flux_text_to_image']}." if "flux_text_to_image" in metrics
                    else ".")]
    (out / "README.md").write_text("\n".join(card) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the toy world's models (the `toy` preset's shipped weights).")
    parser.add_argument("--out", default=str(WEIGHTS_DIR), help="output folder (default: the shipped weights)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every part's steps (0.01 = a smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    parts = tuple(p for p in args.parts.split(",") if p)
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise UserInputError(f"unknown part(s) {unknown or '(none)'}; choose from {', '.join(PARTS)}")
    for changed, dependents in DEPENDENTS.items():
        missing = [d for d in dependents if changed in parts and d not in parts]
        if missing:
            reason = "their latents change" if changed == "vae" else "they read the CLIP's text tower"
            raise UserInputError(f"a new {changed.upper()} needs a new {' and '.join(missing)} ({reason}): add "
                                 f"{','.join(missing)} to --parts")
    if args.scale <= 0:
        raise UserInputError("--scale must be positive")
    pretrain(Path(args.out), parts, args.scale, args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))  # run_cli: the quiet console of every command (no weight-loading progress bars)
