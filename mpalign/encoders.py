"""Frozen-encoder computations shared by the dataset builder (which caches them) and training (which runs them when a
dataset carries no cache). Pure functions over loaded models: no Ray, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mpalign.zoo import EncoderWithProcessor, SDXLComponents


def _device_dtype(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype


def _tokenize(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def tokenize_prompts(sdxl: SDXLComponents, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids for both SDXL text encoders, (B, 77) each."""
    return _tokenize(sdxl.tokenizer, prompts), _tokenize(sdxl.tokenizer_2, prompts)


@torch.no_grad()
def encode_prompt_ids(sdxl: SDXLComponents, input_ids: torch.Tensor, input_ids_2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SDXL's conditioning: penultimate hidden states of both text encoders side by side (B, 77, D1 + D2), and the
    second encoder's projected pooled output (B, P), exactly as ``StableDiffusionXLPipeline.encode_prompt`` builds them."""
    device, _ = _device_dtype(sdxl.text_encoder)
    out1 = sdxl.text_encoder(input_ids.to(device), output_hidden_states=True)
    out2 = sdxl.text_encoder_2(input_ids_2.to(device), output_hidden_states=True)
    prompt_embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
    return prompt_embeds, out2.text_embeds


def encode_prompts(sdxl: SDXLComponents, prompts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return encode_prompt_ids(sdxl, *tokenize_prompts(sdxl, prompts))


@torch.no_grad()
def encode_phrases(sdxl: SDXLComponents, phrases: Sequence[str]) -> torch.Tensor:
    """Phrase embeddings for the grounding tokens: pooled output of SDXL's first text encoder (N, D1)."""
    if len(phrases) == 0:
        return torch.zeros(0, sdxl.text_encoder.config.hidden_size)
    device, _ = _device_dtype(sdxl.text_encoder)
    return sdxl.text_encoder(_tokenize(sdxl.tokenizer, phrases).to(device)).pooler_output


def add_time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]) -> list[float]:
    """SDXL's micro-conditioning vector: original (h, w), crop (top, left), target (h, w)."""
    return [float(v) for v in (*original_size, *crop_top_left, *target_size)]


def _pixels(processor, images: Sequence[Image.Image], device, dtype) -> torch.Tensor:
    return processor(images=list(images), return_tensors="pt").pixel_values.to(device=device, dtype=dtype)


# The release resizes every subject image to this square (aspect not kept) before CLIP's processor, whose resize and
# centre crop then keep the whole image; going through the same 512 px square keeps our pixels equal to its pixels.
REFERENCE_SQUARE_SIDE = 512


def square_references(images: Sequence[Image.Image]) -> list[Image.Image]:
    """Subject images squashed to ``REFERENCE_SQUARE_SIDE``² (bicubic, PIL's default, as the release): nothing of a
    non-square reference is cropped away by the CLIP processor's centre crop."""
    side = REFERENCE_SQUARE_SIDE
    return [img.convert("RGB").resize((side, side), Image.BICUBIC) for img in images]


@torch.no_grad()
def clip_hidden_states(image_encoder: EncoderWithProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Penultimate hidden states of the CLIP image encoder, all tokens (N, T, D), of the subject images squared by
    :func:`square_references`: what the resampler reads (generation, evaluation, training, the dataset cache)."""
    device, dtype = _device_dtype(image_encoder.model)
    pixels = _pixels(image_encoder.processor, square_references(images), device, dtype)
    return image_encoder.model(pixels, output_hidden_states=True).hidden_states[-2]


@torch.no_grad()
def clip_image_embeds(image_encoder: EncoderWithProcessor, images: Sequence[Image.Image]) -> torch.Tensor:
    """Projected CLIP image embeddings (N, P), the CLIP-I metric's space; ``image_encoder.model`` is a vision tower
    with projection or a full ``CLIPModel`` (whose forward needs text too, hence ``get_image_features``)."""
    model = image_encoder.model
    device, dtype = _device_dtype(model)
    pixels = _pixels(image_encoder.processor, images, device, dtype)
    if hasattr(model, "get_image_features"):
        return model.get_image_features(pixel_values=pixels).pooler_output
    return model(pixels).image_embeds


@torch.no_grad()
def clip_text_embeds(clip: EncoderWithProcessor, texts: Sequence[str]) -> torch.Tensor:
    """Projected CLIP text embeddings (N, P) of a full ``CLIPModel``: the CLIP-T metric's text side."""
    device, _ = _device_dtype(clip.model)
    tokens = clip.processor.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt").to(device)
    return clip.model.get_text_features(**tokens).pooler_output


@torch.no_grad()
def dinov2_features(dinov2: EncoderWithProcessor, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """DINOv2 final-layer CLS tokens (N, D) and patch tokens (N, P, D), after the final LayerNorm."""
    device, dtype = _device_dtype(dinov2.model)
    hidden = dinov2.model(_pixels(dinov2.processor, images, device, dtype)).last_hidden_state
    num_registers = getattr(dinov2.model.config, "num_register_tokens", 0) or 0
    return hidden[:, 0], hidden[:, 1 + num_registers:]


@torch.no_grad()
def dinov2_patch_tokens(dinov2: EncoderWithProcessor, images: Sequence[Image.Image], grid: int) -> torch.Tensor:
    """DINOv2 patch tokens (N, grid * grid, D) on a grid x grid layout over the whole image: each image is resized
    to grid x patch size pixels square, without the processor's centre crop, so patch i covers cell i of the image."""
    device, dtype = _device_dtype(dinov2.model)
    side = grid * dinov2.model.config.patch_size
    pixels = dinov2.processor(images=list(images), size={"height": side, "width": side}, do_center_crop=False,
                              return_tensors="pt").pixel_values.to(device=device, dtype=dtype)
    num_registers = getattr(dinov2.model.config, "num_register_tokens", 0) or 0
    return dinov2.model(pixels).last_hidden_state[:, 1 + num_registers:]


def images_to_tensor(images: Sequence[Image.Image], size: int) -> torch.Tensor:
    """RGB images, resized to ``size``², as a (N, 3, size, size) tensor in [-1, 1] (the VAE's input range)."""
    arrays = [np.asarray(img.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32) for img in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0


@torch.no_grad()
def vae_posterior(sdxl: SDXLComponents, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled mean and standard deviation of the VAE posterior of (N, 3, H, W) pixels in [-1, 1]: a sample is
    ``mean + std * noise``, what ``latent_dist.sample()`` draws, scaled like the latents."""
    device, dtype = _device_dtype(sdxl.vae)
    dist = sdxl.vae.encode(pixels.to(device=device, dtype=dtype)).latent_dist
    scale = sdxl.vae.config.scaling_factor
    return dist.mean * scale, dist.std * scale


@torch.no_grad()
def vae_latents(sdxl: SDXLComponents, pixels: torch.Tensor, generator: torch.Generator | None = None,
                sample: bool = False) -> torch.Tensor:
    """Scaled VAE latents of (N, 3, H, W) pixels in [-1, 1]: the mean of the posterior unless ``sample``."""
    mean, std = vae_posterior(sdxl, pixels)
    if not sample:
        return mean
    return mean + std * torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
