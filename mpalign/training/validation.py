"""Periodic validation: loss terms on held-out batches, measured identically at every step and in every run, and a
small grid of generations.

The validation losses use the model's eval mode (no condition drops; alignment terms measured even while alpha is
0) with noise and timesteps from a generator seeded per batch (``train.seed`` + batch index), so two runs, or two
trials of a sweep, are scored on exactly the same noisy inputs. ``objective`` is the held-out diffusion loss: it is
the quantity the generator is trained for, and unlike the alignment cosines it does not depend on alpha, lambda_self,
the tapped blocks or the projectors' training — every sweep trial is scored the same way (docs/sweeps.md).
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from mpalign.config import Config

VAL_TERMS = ("loss", "diffusion", "cross", "self", "cos_cross", "cos_self", "attn", "disentangle", "scal", "mdl")


def validation_metrics(module: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], step: int,
                       seed: int, device: torch.device) -> dict[str, float]:
    """Mean of each loss term over ``batches`` (``val_`` prefixed) and ``objective`` = mean held-out diffusion loss."""
    sums: dict[str, float] = {}
    count = 0
    for index, batch in enumerate(batches):
        out = module.validation_losses({k: v.to(device) for k, v in batch.items()}, step, seed=seed + index)
        for key in VAL_TERMS:
            if key in out:
                sums[key] = sums.get(key, 0.0) + float(out[key])
        count += 1
    if count == 0:
        return {}
    metrics = {f"val_{key}": value / count for key, value in sums.items()}
    metrics["objective"] = metrics["val_diffusion"]
    return metrics


@dataclass
class ValidationExample:
    """One held-out sample to generate from: its caption, subject phrases, target boxes and reference crops."""

    caption: str
    phrases: list[str]
    boxes: list[list[float]]
    crops: list[bytes]  # PNG

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> ValidationExample:
        return cls(caption=str(row["caption"]), phrases=[str(p) for p in row["phrases"]],
                   boxes=[[float(v) for v in box] for box in row["boxes"]],
                   crops=[bytes(c) for c in row["reference_crops"]])

    def subject_images(self) -> list[Image.Image]:
        return [Image.open(io.BytesIO(crop)).convert("RGB") for crop in self.crops]


@contextmanager
def module_generation(module: torch.nn.Module) -> Iterator[Any]:
    """An ``MPAlignPipeline`` over the training module's own models and attached adapter, with its weights as they
    are now (swap EMA weights in around it): no second copy of SDXL on the device. The module must have been built
    with ``generation=True`` so the VAE and encoders are loaded. Training runs the image branch at scale 1 and
    generation at ``model.scale``: the training scale is restored on the way out."""
    from mpalign.pipeline import MPAlignPipeline

    if module.cfg.model.method == "mosaic":  # MOSAIC's pipeline holds its own FLUX parts: weights go by folder
        yield _mosaic_pipeline(module)
        return
    pipeline = MPAlignPipeline(module.sdxl, module.image_encoder, module.adapter, scale=module.cfg.model.scale,
                               attached=True)
    try:
        with torch.no_grad():
            yield pipeline
    finally:
        module.adapter.set_scale(1.0)


_MOSAIC_PIPELINES: dict[int, Any] = {}


def _mosaic_pipeline(module: torch.nn.Module) -> Any:
    """The MOSAIC pipeline of this worker's training module (built once), with the module's adapter weights now."""
    import tempfile

    from mpalign import methods

    with tempfile.TemporaryDirectory(prefix="mpalign-val-") as directory:
        module.save_adapter(directory)
        if id(module) not in _MOSAIC_PIPELINES:
            device = next(module.parameters()).device
            _MOSAIC_PIPELINES[id(module)] = methods.pipeline(module.cfg, adapter_dir=directory, device=device)
        else:
            _MOSAIC_PIPELINES[id(module)].load_adapter(directory)
    return _MOSAIC_PIPELINES[id(module)]


class ValidationGrid:
    """Generations for a few held-out examples: one row per example, its reference crops then the generation with
    the target boxes drawn."""

    def __init__(self, cfg: Config, examples: list[ValidationExample]):
        self.cfg = cfg
        self.examples = examples

    def render(self, pipeline: Any) -> Image.Image:
        """Generate with ``pipeline`` (see :func:`module_generation`)."""
        from mpalign.pipeline import draw_boxes

        size = self.cfg.data.image_size
        rows = []
        for index, example in enumerate(self.examples):
            image = pipeline.generate(example.caption, example.subject_images(), example.boxes, example.phrases,
                                      seed=self.cfg.train.seed + index,
                                      num_inference_steps=self.cfg.eval.num_inference_steps,
                                      guidance_scale=self.cfg.eval.guidance_scale, height=size, width=size)[0]
            crops = [crop.resize((size, size)) for crop in example.subject_images()]
            rows.append([*crops, draw_boxes(image, example.boxes, example.phrases)])
        columns = max(len(r) for r in rows)
        grid = Image.new("RGB", (columns * size, len(rows) * size), "white")
        for y, tiles in enumerate(rows):
            for x, tile in enumerate(tiles):
                grid.paste(tile, (x * size, y * size))
        return grid


def save_grid(grid: Image.Image, out_dir: str | Path, step: int) -> Path:
    path = Path(out_dir) / f"step_{step:07d}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path
