"""MOSAIC generation (``model.method: mosaic``): FLUX's flow-matching sampler with the reference crops in the
transformer's image stream and the MOSAIC adapter (its peft LoRA and processors) attached.

The prompt encoding, latent preparation, time-step schedule, unpacking and decoding are ``FluxPipeline``'s own
methods; only the transformer call differs (references appended, :func:`mpalign.models.mosaic.run_transformer`), so
the loop is written here. FLUX.1-dev is guidance-distilled: ``guidance_scale`` goes to its guidance embedding, with
no second (unconditional) pass. MOSAIC takes no layout: boxes are checked like the MS adapter's and drawn on the
preview, but the model does not see them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import FluxPipeline
from diffusers.pipelines.flux.pipeline_flux import calculate_shift, retrieve_timesteps
from PIL import Image

from mpalign import zoo
from mpalign.config import Config
from mpalign.encoders import images_to_tensor
from mpalign.models.mosaic import MosaicAdapter, MosaicContext, flux_latents, pack, run_transformer
from mpalign.models.mosaic_training import fresh_mosaic_adapter
from mpalign.pipeline import check_subjects

logger = logging.getLogger(__name__)


class MosaicPipeline:
    """FLUX + MOSAIC adapter. ``pipe`` is the underlying ``FluxPipeline`` (its helpers are what the loop uses)."""

    # FLUX.1-dev is guidance-distilled: no negative prompt (evaluation leaves eval.negative_prompt out for MOSAIC)
    takes_negative_prompt = False

    def __init__(self, flux: zoo.FluxComponents, adapter: MosaicAdapter, reference_size: int):
        self.flux = flux
        transformer = flux.transformer
        transformer.requires_grad_(False)
        adapter.attach(transformer)  # the LoRA in the transformer's dtype
        for parameter in adapter.parameters():
            parameter.requires_grad_(False)
        self.adapter = adapter
        self.pipe = FluxPipeline(**flux.as_pipeline_kwargs())
        self.token_pixels = zoo.token_pixels(flux.vae.config)
        self.reference_size = max(self.token_pixels, reference_size // self.token_pixels * self.token_pixels)
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_config(cls, cfg: Config, adapter_dir: str | Path | None = None,
                    device: str | torch.device | None = None) -> MosaicPipeline:
        """FLUX of ``cfg.model`` and the MOSAIC adapter in ``adapter_dir``; without one a fresh adapter (zero LoRA:
        plain FLUX seeing the references), logged. References are resized to ``data.crop_size``, as in training."""
        device = zoo.resolve_device(str(device or cfg.model.device))
        flux = zoo.load_flux(cfg.model, device=device)
        if adapter_dir:
            adapter = MosaicAdapter.from_pretrained(adapter_dir)
        else:
            logger.warning("no adapter given: using a freshly initialised MOSAIC adapter (zero LoRA) of the '%s' preset",
                           cfg.model.preset)
            adapter = fresh_mosaic_adapter(cfg)
        return cls(flux, adapter, cfg.data.crop_size)

    @property
    def max_subjects(self) -> int:
        return self.adapter.config.max_subjects

    def load_adapter(self, adapter_dir: str | Path) -> None:
        self.adapter.load_state_dict(MosaicAdapter.from_pretrained(adapter_dir).weights)

    @torch.no_grad()
    def reference_tokens(self, subject_images: Sequence[Image.Image]) -> tuple[torch.Tensor, tuple[int, int]]:
        """(1, K * n, C) packed reference latents of the subject images, and one reference's token grid."""
        pixels = images_to_tensor([img.convert("RGB") for img in subject_images], self.reference_size)
        latents = flux_latents(self.flux.vae, pixels)
        tokens = pack(latents)
        return tokens.reshape(1, -1, tokens.shape[-1]), (latents.shape[-2] // 2, latents.shape[-1] // 2)

    @torch.no_grad()
    def generate(self, prompt: str, subject_images: list[Image.Image], boxes: list[list[float]] | None,
                 phrases: list[str],
                 negative_prompt: str = "", scale: float | None = None, subject_scales: list[float] | None = None,
                 drop_grounding: bool = False, guidance_scale: float = 3.5, num_inference_steps: int = 28,
                 seed: int = 0, height: int | None = None, width: int | None = None,
                 num_images: int = 1) -> list[Image.Image]:
        """``num_images`` images of ``prompt`` showing the subjects (the same signature as ``MPAlignPipeline``)."""
        check_subjects(subject_images, boxes, phrases, self.max_subjects, subject_scales)
        unsupported = [name for name, value in (("negative_prompt", negative_prompt), ("scale", scale),
                                                ("subject_scales", subject_scales), ("drop_grounding", drop_grounding))
                       if value]
        if unsupported:
            raise ValueError(f"MOSAIC does not take {', '.join(unsupported)} (MS-Diffusion adapter options)")
        pipe, transformer = self.pipe, self.flux.transformer
        device, dtype = transformer.device, transformer.dtype
        height = height or self.flux.vae.config.sample_size
        width = width or self.flux.vae.config.sample_size
        if height % self.token_pixels or width % self.token_pixels:
            raise ValueError(f"height and width must be multiples of {self.token_pixels}, got {height}x{width}")
        prompt_embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=device,
                                                      num_images_per_prompt=num_images,
                                                      max_sequence_length=self.flux.tokenizer_2.model_max_length)
        generator = torch.Generator("cpu").manual_seed(seed)
        latents, _ = pipe.prepare_latents(num_images, transformer.config.in_channels // 4, height, width,
                                          prompt_embeds.dtype, device, generator)
        references, reference_grid = self.reference_tokens(subject_images)
        references = references.to(device, dtype).expand(num_images, -1, -1)
        target_grid = (height // self.token_pixels, width // self.token_pixels)
        scheduler = self.flux.scheduler
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        mu = calculate_shift(latents.shape[1], scheduler.config.get("base_image_seq_len", 256),
                             scheduler.config.get("max_image_seq_len", 4096), scheduler.config.get("base_shift", 0.5),
                             scheduler.config.get("max_shift", 1.15))
        timesteps, _ = retrieve_timesteps(scheduler, num_inference_steps, device, sigmas=sigmas, mu=mu)
        guidance = (torch.full((num_images,), guidance_scale, device=device, dtype=torch.float32)
                    if transformer.config.guidance_embeds else None)
        for t in timesteps:
            prediction = run_transformer(transformer, latents.to(dtype), references, target_grid, reference_grid,
                                         prompt_embeds.to(dtype), pooled.to(dtype),
                                         (t.expand(num_images) / 1000).to(dtype), guidance,
                                         MosaicContext(0, 0))
            latents = scheduler.step(prediction, t, latents, return_dict=False)[0]
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
        vae = self.flux.vae
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        images = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(images, output_type="pil")
