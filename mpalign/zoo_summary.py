"""Build every role of the model zoo, run one forward of each, print a summary.

``python -m mpalign.zoo_summary [--config ...] [--set ...]`` — the first step of ``make demo``; with real weights it
is a quick check that every model the pipeline needs is present and loads.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mpalign import encoders, zoo
from mpalign.cli import run_cli
from mpalign.config import Config, add_config_args, config_from_args


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def summarize_zoo(cfg: Config) -> list[tuple[str, int, str, float]]:
    """(role, parameters, output shapes, seconds) for every role, each loaded and run once on a random image."""
    m = cfg.model
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (cfg.data.image_size, cfg.data.image_size, 3), dtype=np.uint8))
    rows = []

    def timed(role: str, fn):
        start = time.perf_counter()
        params, shapes = fn()
        rows.append((role, params, shapes, time.perf_counter() - start))

    def sdxl():
        parts = zoo.load_sdxl(m)
        embeds, pooled = encoders.encode_prompts(parts, ["a red ball and a striped cube on a wooden floor"])
        pixels = encoders.images_to_tensor([image], cfg.data.image_size)
        latents = encoders.vae_latents(parts, pixels)
        time_ids = torch.tensor([encoders.add_time_ids(image.size[::-1], (0, 0), image.size[::-1])], device=latents.device)
        with torch.no_grad():
            noise_pred = parts.unet(latents, torch.tensor([500], device=latents.device), encoder_hidden_states=embeds,
                                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        n = sum(_params(x) for x in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2))
        return n, f"text {tuple(embeds.shape)}, latents {tuple(latents.shape)}, unet {tuple(noise_pred.shape)}"

    def image_encoder():
        enc = zoo.load_image_encoder(m)
        return _params(enc.model), f"hidden[-2] {tuple(encoders.clip_hidden_states(enc, [image]).shape)}"

    def dinov2():
        enc = zoo.load_dinov2(m)
        cls, patches = encoders.dinov2_features(enc, [image])
        return _params(enc.model), f"cls {tuple(cls.shape)}, patches {tuple(patches.shape)}"

    def grounding_dino():
        enc = zoo.load_grounding_dino(m)
        inputs = enc.processor(images=[image], text=["a red ball . a cube ."], return_tensors="pt").to(enc.model.device)
        with torch.no_grad():
            out = enc.model(**inputs)
        return _params(enc.model), f"logits {tuple(out.logits.shape)}, boxes {tuple(out.pred_boxes.shape)}"

    def sam():
        enc = zoo.load_sam(m)
        side = cfg.data.image_size
        inputs = enc.processor(images=[image], input_boxes=[[[0, 0, side // 2, side // 2]]], return_tensors="pt")
        with torch.no_grad():
            out = enc.model(**inputs.to(enc.model.device), multimask_output=False)
        return _params(enc.model), f"masks {tuple(out.pred_masks.shape)}"

    def spacy_pipeline():
        nlp = zoo.load_spacy(m)
        chunks = [c.text for c in nlp("a red ball and a striped cube on a wooden floor").noun_chunks]
        return 0, f"noun chunks {chunks}"

    for role, fn in (("sdxl", sdxl), ("image_encoder", image_encoder), ("dinov2", dinov2),
                     ("grounding_dino", grounding_dino), ("sam", sam), ("spacy", spacy_pipeline)):
        timed(role, fn)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    cfg = config_from_args(parser.parse_args(argv))
    print(f"model zoo, preset '{cfg.model.preset}', device {zoo.resolve_device(cfg.model.device)}")
    for role, params, shapes, seconds in summarize_zoo(cfg):
        print(f"  {role:<15} {params / 1e6:8.3f} M params  {seconds:6.2f} s  {shapes}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
