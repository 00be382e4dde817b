"""The ``toy`` benchmark (``python -m mpalign.evaluate --benchmark toy``) and its exact identity scores.

Each sample is a prompt that names only the kind of each object ("a ball and a ring on sand"), preset boxes, and one
reference crop per subject whose shape x colour x texture combination is one the toy models never saw in training
(``mpalign.sample_data.is_held_out``): colour and texture can only come from the reference. A subject is named by its
attributes ("dotted-blue-ring"), so the score needs nothing but the sample: the attribute classifier reads the crop
of the subject's box in the generated image, and

- ``identity``: shape, colour and texture all as in the reference; ``identity_color`` / ``_shape`` / ``_texture``
  each alone (chance: 1/8, 1/6, 1/4);
- ``placement``: the classifier finds an object (not bare background) inside the box.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from mpalign.config import ModelConfig
from mpalign.eval.benchmarks import BenchmarkSample
from mpalign.sample_data import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    TEXTURES,
    SampleObject,
    _place_boxes,
    caption_for,
    is_held_out,
    render,
)
from mpalign.toy import classifier as attribute_classifier
from mpalign.toy.world import ATTRIBUTES, subject_crop

BENCHMARK_SEED = 1234
IMAGE_SIZE = 64
IDENTITY_METRICS = ("identity", "identity_color", "identity_shape", "identity_texture", "placement")


def subject_name(obj: SampleObject) -> str:
    return f"{obj.texture}-{obj.color}-{obj.shape}"


def subject_labels(name: str) -> list[int]:
    """[shape, colour, texture] indices of a subject named by :func:`subject_name`."""
    texture, color, shape = name.split("-")
    return [ATTRIBUTES["shape"].index(shape), ATTRIBUTES["color"].index(color), ATTRIBUTES["texture"].index(texture)]


def _reference(obj: SampleObject, rng: random.Random, np_rng: np.random.Generator) -> np.ndarray:
    """The object alone in a scene of its own (another place, size and background), cut out as a reference crop."""
    box = _place_boxes(rng, 1)[0]
    placed = SampleObject(obj.shape, obj.color, obj.texture, box)
    image = np.asarray(render([placed], rng.choice(list(BACKGROUNDS)), IMAGE_SIZE, np_rng))
    return subject_crop(image, box, IMAGE_SIZE)


def toy_samples(folder: Path, count: int = 64, seed: int = BENCHMARK_SEED) -> list[BenchmarkSample]:
    """``count`` samples (1-4 subjects in turn), their reference crops written to ``folder`` (same seed, same files)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    held_out = {shape: [(c, t) for c in COLORS for t in TEXTURES if is_held_out(shape, c, t)] for shape in SHAPES}
    samples = []
    for i in range(count):
        n = 1 + i % 4
        objects = [SampleObject(shape, *rng.choice(held_out[shape]), box, named_attributes=False)
                   for shape, box in zip(rng.sample(SHAPES, n), _place_boxes(rng, n))]
        references = []
        for k, obj in enumerate(objects):
            path = folder / f"toy-{i:03d}-{k}-{subject_name(obj)}.png"
            if not path.exists():
                Image.fromarray(_reference(obj, rng, np_rng)).save(path)
            else:
                _reference(obj, rng, np_rng)  # keep the random streams where a fresh run would have them
            references.append([str(path.resolve())])
        samples.append(BenchmarkSample(
            sample_id=f"toy-{i:03d}", benchmark="toy", group=f"{n}-subject",
            prompt=caption_for(objects, rng.choice(list(BACKGROUNDS))), subjects=[subject_name(o) for o in objects],
            phrases=[o.shape for o in objects], boxes=[list(o.box) for o in objects], references=references))
    return samples


_CLASSIFIERS: dict[str, object] = {}
_SCORED: dict[tuple, dict[str, float]] = {}


def _classifier(weights: str | None = None):
    """The attribute classifier of the toy weights (the shipped ones by default), loaded once per process."""
    from mpalign.zoo import toy_weights

    path = toy_weights(ModelConfig(preset="toy", toy_weights=weights or ""), "classifier")
    if path not in _CLASSIFIERS:
        _CLASSIFIERS[path] = attribute_classifier.load_classifier(path)
    return _CLASSIFIERS[path]


def identity_scores(image: Image.Image, box: Sequence[float], subject: str,
                    weights: str | None = None) -> dict[str, float]:
    """The ``IDENTITY_METRICS`` (each 0 or 1) of one subject of a generated image: the classifier reads the crop of
    its box and compares with the attributes in the subject's name."""
    pixels = image.convert("RGB")
    key = (hash(pixels.tobytes()), tuple(box), subject, weights)
    if key not in _SCORED:  # the five metrics of a subject share one classification
        if len(_SCORED) > 256:
            _SCORED.clear()
        crop = subject_crop(np.asarray(pixels), box, IMAGE_SIZE)
        predicted = attribute_classifier.predict(_classifier(weights), crop[None])[0]
        hits = predicted[:3] == np.asarray(subject_labels(subject))
        _SCORED[key] = dict(zip(IDENTITY_METRICS, map(float, (hits.all(), hits[1], hits[0], hits[2],
                                                               predicted[3] == 1))))
    return _SCORED[key]


def _register() -> None:
    """Per-subject metrics for ``eval.subject_metrics`` / ``tune.metric`` (``mpalign.eval.metrics``)."""
    from mpalign.eval.metrics import register_subject_metric

    for name in IDENTITY_METRICS:
        register_subject_metric(name, lambda image, box, row, s, name=name: identity_scores(image, box,
                                                                                              row["subjects"][s])[name])


_register()


def write_references(folder: Path, seed: int = BENCHMARK_SEED) -> list[Path]:
    """One reference crop per shape, each a held-out identity, as ``<folder>/<shape>.png`` (for the demo and for
    trying ``python -m mpalign.generate`` by hand)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, np_rng = random.Random(seed), np.random.default_rng(seed)
    paths, names = [], []
    for shape in SHAPES:
        color, texture = rng.choice([(c, t) for c in COLORS for t in TEXTURES if is_held_out(shape, c, t)])
        path = folder / f"{shape}.png"
        Image.fromarray(_reference(SampleObject(shape, color, texture, (0, 0, 1, 1)), rng, np_rng)).save(path)
        paths.append(path)
        names.append(f"{shape} ({texture} {color})")
    print(f"{len(paths)} held-out references in {folder}: {', '.join(names)}")
    return paths


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mpalign.toy.benchmark",
                                     description="Write one held-out toy reference per shape (<out>/<shape>.png).")
    parser.add_argument("out", help="output folder")
    write_references(Path(parser.parse_args().out))
