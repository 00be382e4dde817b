"""The embedded sample dataset: procedural images of 1-4 distinct objects with captions, plus video-like frame pairs.

It is the default input of every entry point, so the whole pipeline runs on a fresh machine with nothing downloaded.
Output (one folder):

- ``images/*.png``
- ``records.jsonl``: one input record a line, the format every entry point reads::

      {"id": "img-0003", "image": "images/img-0003.png", "caption": "a red ball and a striped cube on grass",
       "video_id": null, "frame_idx": null, "objects": [{"phrase": "red ball", "box": [x0, y0, x1, y1]}, ...]}

  ``image`` is a path relative to the JSONL file (absolute paths work too); ``video_id``/``frame_idx`` mark frames
  of one clip (two frames per clip here: the same objects moved and rescaled). ``objects`` is ground truth the
  generator knows (boxes normalised to [0, 1], each object's shape, colour and texture); the dataset builder reads
  its boxes only when ``data.boxes: annotations`` (the toy world), tests compare against it.

``caption_style`` says how captions name objects: ``full`` ("a dotted blue ring"), ``kind`` ("a ring": colour and
texture can only come from a reference image, what the toy world trains adapters on) or ``mixed`` (each object either
way, what the toy text-to-image UNet is pretrained on).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mpalign.config import SampleDataConfig

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "orange": (245, 140, 30), "purple": (140, 60, 180), "pink": (245, 130, 190), "white": (245, 245, 245),
}
SHAPES = ("ball", "cube", "triangle", "ring", "diamond", "star")
TEXTURES = ("plain", "striped", "dotted", "checkered")
BACKGROUNDS = {
    "on a wooden floor": ((150, 100, 60), "planks"),
    "on grass": ((70, 140, 60), "noise"),
    "in front of a blue sky": ((120, 170, 230), "gradient"),
    "on sand": ((220, 200, 150), "noise"),
    "in front of a grey wall": ((140, 140, 140), "bricks"),
    "on snow": ((235, 240, 245), "noise"),
}


CAPTION_STYLES = ("full", "kind", "mixed")


def is_held_out(shape: str, color: str, texture: str) -> bool:
    """About a fifth of the shape x colour x texture combinations, never drawn when a sample excludes them: the toy
    benchmark's references use only these, so an adapter must transfer an identity it has never seen. Every single
    shape, colour and texture still occurs in training."""
    return (SHAPES.index(shape) + 3 * list(COLORS).index(color) + 2 * TEXTURES.index(texture)) % 5 == 0


@dataclass
class SampleObject:
    shape: str
    color: str
    texture: str
    box: tuple[float, float, float, float]  # normalised x0, y0, x1, y1
    named_attributes: bool = True  # False: the caption names only the shape ("a ball")

    @property
    def phrase(self) -> str:
        if not self.named_attributes:
            return self.shape
        texture = "" if self.texture == "plain" else f"{self.texture} "
        return f"{texture}{self.color} {self.shape}"

    def annotation(self) -> dict:
        return {"phrase": self.phrase, "box": list(self.box), "shape": self.shape, "color": self.color,
                "texture": self.texture}


def _background(rng: np.random.Generator, size: int, base: tuple[int, int, int], kind: str) -> Image.Image:
    arr = np.ones((size, size, 3), dtype=np.float32) * np.array(base, dtype=np.float32)
    if kind == "noise":
        arr += rng.normal(0, 18, arr.shape)
    elif kind == "gradient":
        arr *= np.linspace(0.75, 1.15, size)[:, None, None]
    elif kind == "planks":
        plank = max(size // 8, 2)
        arr *= (1.0 - 0.15 * ((np.arange(size) // plank) % 2))[:, None, None]
        arr[np.arange(size) % plank == 0] *= 0.6
    elif kind == "bricks":
        row = max(size // 10, 2)
        arr[np.arange(size) % row == 0] = 90
        for r in range(0, size, row):
            offset = (r // row % 2) * row
            arr[r:r + row, offset::2 * row] = 90
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def _texture_fill(size: tuple[int, int], color: tuple[int, int, int], texture: str) -> Image.Image:
    w, h = size
    tile = Image.new("RGB", (w, h), color)
    draw = ImageDraw.Draw(tile)
    dark = tuple(int(c * 0.35) for c in color)
    step = max(min(w, h) // 5, 3)
    if texture == "striped":
        for x in range(0, w, step):
            draw.rectangle([x, 0, x + step // 2 - 1, h], fill=dark)
    elif texture == "dotted":
        r = max(step // 4, 1)
        for y in range(step // 2, h, step):
            for x in range(step // 2, w, step):
                draw.ellipse([x - r, y - r, x + r, y + r], fill=dark)
    elif texture == "checkered":
        for y in range(0, h, step):
            for x in range(0, w, step):
                if (x // step + y // step) % 2:
                    draw.rectangle([x, y, x + step - 1, y + step - 1], fill=dark)
    return tile


def _shape_mask(shape: str, w: int, h: int) -> Image.Image:
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    if shape == "ball":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif shape == "cube":
        draw.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif shape == "triangle":
        draw.polygon([(w / 2, 0), (w - 1, h - 1), (0, h - 1)], fill=255)
    elif shape == "ring":
        draw.ellipse([0, 0, w - 1, h - 1], fill=255)
        draw.ellipse([w * 0.3, h * 0.3, w * 0.7, h * 0.7], fill=0)
    elif shape == "diamond":
        draw.polygon([(w / 2, 0), (w - 1, h / 2), (w / 2, h - 1), (0, h / 2)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.22
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((w / 2 + r * w * math.cos(a), h / 2 + r * h * math.sin(a)))
        draw.polygon(pts, fill=255)
    return mask


def render(objects: list[SampleObject], background: str, size: int, rng: np.random.Generator) -> Image.Image:
    base, kind = BACKGROUNDS[background]
    img = _background(rng, size, base, kind)
    for obj in objects:
        x0, y0, x1, y1 = (round(v * size) for v in obj.box)
        w, h = max(x1 - x0, 2), max(y1 - y0, 2)
        img.paste(_texture_fill((w, h), COLORS[obj.color], obj.texture), (x0, y0), _shape_mask(obj.shape, w, h))
    return img


def caption_for(objects: list[SampleObject], background: str) -> str:
    names = [f"a {o.phrase}" for o in objects]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return f"{listed} {background}"


def _place_boxes(rng: random.Random, n: int) -> list[tuple[float, float, float, float]]:
    """Non-overlapping boxes: the canvas is split into a grid and each object gets its own cell."""
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    cells = [(c, r) for r in range(rows) for c in range(cols)]
    rng.shuffle(cells)
    boxes = []
    for c, r in cells[:n]:
        cw, ch = 1.0 / cols, 1.0 / rows
        side = rng.uniform(0.55, 0.9) * min(cw, ch)
        x0 = c * cw + rng.uniform(0, cw - side)
        y0 = r * ch + rng.uniform(0, ch - side)
        boxes.append((round(x0, 4), round(y0, 4), round(x0 + side, 4), round(y0 + side, 4)))
    return boxes


def random_identity(rng: random.Random, shape: str, exclude_held_out: bool) -> tuple[str, str]:
    """A colour and texture for ``shape``; with ``exclude_held_out``, never one of the benchmark's combinations."""
    while True:
        color, texture = rng.choice(list(COLORS)), rng.choice(TEXTURES)
        if not (exclude_held_out and is_held_out(shape, color, texture)):
            return color, texture


def _random_objects(rng: random.Random, n: int, cfg: SampleDataConfig) -> list[SampleObject]:
    shapes = rng.sample(SHAPES, n)  # distinct shapes, so every phrase names one object
    objects = [SampleObject(s, *random_identity(rng, s, cfg.exclude_held_out), b)
               for s, b in zip(shapes, _place_boxes(rng, n))]
    if cfg.caption_style != "full":  # the default draws nothing more, so default samples stay byte-identical
        for obj in objects:
            obj.named_attributes = cfg.caption_style == "mixed" and rng.random() < 0.5
    return objects


def _moved(rng: random.Random, objects: list[SampleObject]) -> list[SampleObject]:
    """The next frame: every object moved and rescaled (boxes re-drawn, identities kept, order shuffled)."""
    boxes = _place_boxes(rng, len(objects))
    out = [SampleObject(o.shape, o.color, o.texture, b, o.named_attributes) for o, b in zip(objects, boxes)]
    rng.shuffle(out)
    return out


def generate_sample_dataset(out_dir: str | Path, cfg: SampleDataConfig | None = None) -> Path:
    """Write the sample dataset to ``out_dir``; same config, same bytes. Returns the path of ``records.jsonl``."""
    cfg = cfg or SampleDataConfig()
    if cfg.caption_style not in CAPTION_STYLES:
        raise ValueError(f"data.sample.caption_style must be one of {CAPTION_STYLES}, got '{cfg.caption_style}'")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    np_rng = np.random.default_rng(cfg.seed)
    records = []

    def emit(rid: str, objects: list[SampleObject], background: str, video_id=None, frame_idx=None) -> None:
        path = f"images/{rid}.png"
        render(objects, background, cfg.image_size, np_rng).save(out / path)
        records.append({"id": rid, "image": path, "caption": caption_for(objects, background), "video_id": video_id,
                        "frame_idx": frame_idx,
                        "objects": [o.annotation() for o in objects]})

    for i in range(cfg.num_images):
        emit(f"img-{i:04d}", _random_objects(rng, 1 + i % 4, cfg), rng.choice(list(BACKGROUNDS)))
    for v in range(cfg.num_videos):
        objects = _random_objects(rng, 1 + (v % 3), cfg)
        background = rng.choice(list(BACKGROUNDS))
        emit(f"vid-{v:03d}-f0", objects, background, video_id=f"vid-{v:03d}", frame_idx=0)
        emit(f"vid-{v:03d}-f1", _moved(rng, objects), background, video_id=f"vid-{v:03d}", frame_idx=8)
    path = out / "records.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def default_sample_dir() -> Path:
    """Under the working directory, like every default output (never inside an installed package)."""
    return Path("outputs", "sample-input").resolve()


def ensure_sample_dataset(cfg: SampleDataConfig | None = None, out_dir: str | Path | None = None) -> Path:
    """The sample records, generated on first use (and again if the config asks for a different sample)."""
    cfg = cfg or SampleDataConfig()
    out = Path(out_dir) if out_dir else default_sample_dir()
    stamp = out / "sample-config.json"
    wanted = json.dumps(cfg.__dict__, sort_keys=True)
    if not (out / "records.jsonl").exists() or not stamp.exists() or stamp.read_text() != wanted:
        generate_sample_dataset(out, cfg)
        stamp.write_text(wanted)
    return out / "records.jsonl"


def write_sample_benchmark(out_path: str | Path, cfg: SampleDataConfig | None = None, limit: int = 8) -> Path:
    """An evaluation file (the ``mpalign.evaluate --benchmark FILE`` format) from the sample records: each caption is
    the prompt, its objects the subjects (the sample image as reference, the generator's boxes as layout). Lets the
    demo evaluate on a machine without the real benchmark images."""
    records_path = ensure_sample_dataset(cfg)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for rec in (json.loads(line) for line in records_path.read_text().splitlines()):
        if rec["video_id"] is None and len(rows) < limit:
            image = str((records_path.parent / rec["image"]).resolve())
            rows.append({"id": rec["id"], "prompt": rec["caption"], "subject_images": [image] * len(rec["objects"]),
                         "boxes": [o["box"] for o in rec["objects"]], "phrases": [o["phrase"] for o in rec["objects"]],
                         "group": f"{len(rec['objects'])}-subject"})
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write the embedded sample data, or an evaluation file made from it.")
    parser.add_argument("out", help="output folder (records) or .jsonl path (with --benchmark)")
    parser.add_argument("--benchmark", action="store_true", help="write an evaluation file instead of records")
    args = parser.parse_args()
    print(write_sample_benchmark(args.out) if args.benchmark else generate_sample_dataset(args.out))
