"""Training batches (``mpalign.batch`` contract) built in memory from the procedural sample data and its ground-truth
objects, for the model tests: the real encoders on real (procedural) images, no dataset builder involved."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mpalign import encoders
from mpalign.config import SampleDataConfig
from mpalign.sample_data import generate_sample_dataset

CROP_SIZE = 64


@contextlib.contextmanager
def one_thread():
    """Two intra-op threads on two cores shared with other processes spin-wait for each other: a tiny training step
    then takes seconds instead of ~0.15 s. One thread keeps the model tests' runtime predictable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class Example:
    image: Image.Image
    caption: str
    phrases: list[str]
    boxes: list[list[float]]

    def crops(self) -> list[Image.Image]:
        w, h = self.image.size
        return [self.image.crop((round(x0 * w), round(y0 * h), round(x1 * w), round(y1 * h))).resize((CROP_SIZE,) * 2)
                for x0, y0, x1, y1 in self.boxes]


def sample_examples(out_dir: Path, num_images: int = 8, seed: int = 0) -> list[Example]:
    records = generate_sample_dataset(out_dir, SampleDataConfig(num_images=num_images, num_videos=0, seed=seed))
    examples = []
    for line in records.read_text().splitlines():
        rec = json.loads(line)
        image = Image.open(records.parent / rec["image"]).convert("RGB")
        examples.append(Example(image, rec["caption"], [o["phrase"] for o in rec["objects"]],
                                [o["box"] for o in rec["objects"]]))
    return examples


def _pad(rows: list[torch.Tensor], num_subjects: int) -> torch.Tensor:
    out = torch.zeros(num_subjects, *rows[0].shape[1:], dtype=rows[0].dtype)
    out[: rows[0].shape[0]] = rows[0]
    return out


def build_batch(module, examples: list[Example], cached: bool = True, image_size: int = 128) -> dict[str, torch.Tensor]:
    """A batch for ``MPAlignTrainingModule`` built with its own frozen models: cached keys (``cached``) or raw ones,
    plus the always-present keys (boxes, subject mask, DINOv2 targets, time ids)."""
    sdxl, num_subjects = module.sdxl, module.cfg.model.max_subjects
    images = [e.image for e in examples]
    pixel_values = encoders.images_to_tensor(images, image_size)
    batch: dict[str, torch.Tensor] = {
        "boxes": torch.stack([_pad([torch.tensor(e.boxes, dtype=torch.float32)], num_subjects) for e in examples]),
        "subject_mask": torch.stack([torch.arange(num_subjects) < len(e.boxes) for e in examples]),
        "time_ids": torch.tensor([encoders.add_time_ids((image_size,) * 2, (0, 0), (image_size,) * 2)] * len(examples)),
    }
    dino_cls, dino_ref = [], []
    for e in examples:
        cls_tokens, patches = encoders.dinov2_features(module.dinov2, e.crops())
        dino_cls.append(_pad([cls_tokens], num_subjects))
        dino_ref.append(_pad([patches.mean(1)], num_subjects))
    batch["dino_cls"], batch["dino_ref_patch_pooled"] = torch.stack(dino_cls), torch.stack(dino_ref)
    batch["dino_patch_pooled"] = encoders.dinov2_features(module.dinov2, images)[1].mean(1)
    batch["dino_ref_image_patch_pooled"] = batch["dino_patch_pooled"]  # still images: their own reference frames
    if cached:
        batch["latents"], batch["latents_std"] = encoders.vae_posterior(sdxl, pixel_values)
        batch["prompt_embeds"], batch["pooled_prompt_embeds"] = encoders.encode_prompts(sdxl, [e.caption for e in examples])
        batch["phrase_embeds"] = torch.stack([_pad([encoders.encode_phrases(sdxl, e.phrases)], num_subjects)
                                              for e in examples])
        batch["clip_hidden"] = torch.stack([_pad([encoders.clip_hidden_states(module.image_encoder, e.crops())],
                                                 num_subjects) for e in examples])
    else:
        batch["pixel_values"] = pixel_values
        batch["input_ids"], batch["input_ids_2"] = encoders.tokenize_prompts(sdxl, [e.caption for e in examples])
        tokenizer = sdxl.tokenizer
        batch["phrase_input_ids"] = torch.stack([
            tokenizer(e.phrases + [""] * (num_subjects - len(e.phrases)), padding="max_length",
                      max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
            for e in examples])
        batch["reference_pixels"] = torch.stack([
            _pad([torch.from_numpy(np.stack([np.asarray(c, dtype=np.float32) / 255.0 for c in e.crops()]))
                  .permute(0, 3, 1, 2)], num_subjects) for e in examples])
    return batch
