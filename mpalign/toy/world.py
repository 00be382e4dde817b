"""Scenes and subject crops of the procedural world, with the attributes of every object known exactly.

Crops are made the way the dataset builder makes reference crops in the toy world (``data.masks: box``): the
object's box grown to a square, pixels outside the box filled white, resized (``background_filled_crop``). The toy
image encoders, the attribute classifier and the benchmark's references all see crops of this one kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from mpalign.config import SampleDataConfig
from mpalign.data.segmentation import background_filled_crop, box_mask
from mpalign.sample_data import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    TEXTURES,
    SampleObject,
    _place_boxes,
    _random_objects,
    caption_for,
    render,
)

ATTRIBUTES = {"shape": list(SHAPES), "color": list(COLORS), "texture": list(TEXTURES)}


@dataclass
class Scene:
    image: np.ndarray  # (H, W, 3) uint8
    objects: list[SampleObject]
    background: str
    caption: str


def random_scene(rng: random.Random, np_rng: np.random.Generator, size: int, num_objects: int,
                 cfg: SampleDataConfig) -> Scene:
    objects = _random_objects(rng, num_objects, cfg)
    background = rng.choice(list(BACKGROUNDS))
    image = np.asarray(render(objects, background, size, np_rng))
    return Scene(image, objects, background, caption_for(objects, background))


def subject_crop(image: np.ndarray, box, size: int) -> np.ndarray:
    """A subject's reference crop, as the toy dataset builder makes it (box as mask, white outside)."""
    return background_filled_crop(image, box_mask(box, *image.shape[:2]), box, size)


def attribute_labels(obj: SampleObject) -> list[int]:
    return [ATTRIBUTES["shape"].index(obj.shape), ATTRIBUTES["color"].index(obj.color),
            ATTRIBUTES["texture"].index(obj.texture)]


def crop_set(count: int, seed: int, image_size: int, crop_size: int, exclude_held_out: bool,
             empty_share: float = 0.0) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """``count`` subject crops cut from random scenes: (N, S, S, 3) uint8, labels (N, 4) = shape, colour, texture,
    object present (crops of empty background have -1 attributes and 0 there), and each crop's full phrase."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    cfg = SampleDataConfig(exclude_held_out=exclude_held_out)
    crops, labels, phrases = [], [], []
    while len(crops) < count:
        if rng.random() < empty_share:
            background = rng.choice(list(BACKGROUNDS))
            image = np.asarray(render([], background, image_size, np_rng))
            box = _place_boxes(rng, rng.randint(1, 4))[0]
            crops.append(subject_crop(image, box, crop_size))
            labels.append([-1, -1, -1, 0])
            phrases.append(background)
            continue
        scene = random_scene(rng, np_rng, image_size, rng.randint(1, 4), cfg)
        for obj in scene.objects:
            crops.append(subject_crop(scene.image, obj.box, crop_size))
            labels.append([*attribute_labels(obj), 1])
            phrases.append(f"a {obj.phrase}")
    return np.stack(crops[:count]), np.asarray(labels[:count], dtype=np.int64), phrases[:count]


def scene_set(count: int, seed: int, image_size: int, caption_style: str,
              exclude_held_out: bool) -> tuple[np.ndarray, list[str]]:
    """``count`` scenes of 1-4 objects: images (N, H, W, 3) uint8 and their captions."""
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    cfg = SampleDataConfig(caption_style=caption_style, exclude_held_out=exclude_held_out)
    scenes = [random_scene(rng, np_rng, image_size, 1 + i % 4, cfg) for i in range(count)]
    return np.stack([s.image for s in scenes]), [s.caption for s in scenes]
