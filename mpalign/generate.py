"""Generate images of subjects placed in boxes.

    python -m mpalign.generate --prompt "a dog and a cat on a sofa" \\
        --subject dog.jpg --box 0.05,0.3,0.5,0.95 --phrase dog \\
        --subject cat.jpg --box 0.5,0.3,0.95,0.95 --phrase cat \\
        [--adapter DIR] [--config configs/sdxl.yaml] [--set key=value ...] --out out.png

Writes ``out.png`` (``out-1.png``, ... for more images), ``out.preview.png`` (the boxes drawn on the image) and
``out.config.yaml`` (the resolved config). Without ``--adapter`` a freshly initialised adapter is used (smoke runs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mpalign.config import ConfigError, add_config_args, config_from_args
from mpalign.zoo import ModelLoadError


class UsageError(ValueError):
    """A bad command line: printed as one ``error:`` line."""


def parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--box '{text}' must be four numbers x0,y0,x1,y1 (fractions of the image)") from None
    if len(box) != 4:
        raise UsageError(f"--box '{text}' must be four numbers x0,y0,x1,y1 (fractions of the image)")
    return box


def read_image(path: str) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise UsageError(f"cannot read subject image '{path}': {exc.__class__.__name__}: {exc}") from None


def output_paths(out: Path, count: int) -> list[Path]:
    return [out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpalign.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--subject", action="append", default=[], metavar="IMG", help="subject image, one per subject")
    parser.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1",
                        help="the subject's box as fractions of the image, one per subject; 0,0,0,0 for every "
                             "subject = no layout")
    parser.add_argument("--phrase", action="append", default=[], help="what the subject is (e.g. dog), one per subject")
    parser.add_argument("--subject-scale", action="append", type=float, default=None,
                        help="per-subject image weight, one per subject when given")
    parser.add_argument("--adapter", default=None, help="adapter folder (save_adapter output or a converted checkpoint)")
    parser.add_argument("--scale", type=float, default=None, help="image-branch weight (default: model.scale)")
    parser.add_argument("--drop-grounding", action="store_true", help="use learnable queries instead of phrase+box")
    parser.add_argument("--guidance-scale", type=float, default=7.5)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None, help="default: the UNet's native size")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--device", default=None, help="default: model.device")
    parser.add_argument("--out", required=True, help="output PNG path")
    return add_config_args(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        boxes = [parse_box(b) for b in args.box]
        from mpalign.pipeline import check_subjects, draw_boxes

        # Argument mistakes surface before minutes of model loading.
        check_subjects(args.subject, boxes, args.phrase, cfg.model.max_subjects, args.subject_scale)
        images = [read_image(p) for p in args.subject]
        if args.adapter and not Path(args.adapter).is_dir():
            raise UsageError(f"--adapter '{args.adapter}' is not a folder")
        if args.num_images < 1 or args.steps < 1:
            raise UsageError("--num-images and --steps must be at least 1")
        from mpalign import methods

        started = time.perf_counter()
        pipe = methods.pipeline(cfg, adapter_dir=args.adapter, device=args.device)
        pipe.pipe.set_progress_bar_config(disable=False)
        generated = pipe.generate(
            args.prompt, images, boxes, args.phrase, negative_prompt=args.negative_prompt, scale=args.scale,
            subject_scales=args.subject_scale, drop_grounding=args.drop_grounding, guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps, seed=args.seed, height=args.height, width=args.width,
            num_images=args.num_images)
    except (ConfigError, ModelLoadError, ValueError, FileNotFoundError) as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(output_paths(out, len(generated)), generated):
        image.save(path)
        draw_boxes(image, boxes, args.phrase).save(path.with_suffix(".preview.png"))
        print(f"wrote {path} and {path.with_suffix('.preview.png')}")
    cfg.save(out.with_suffix(".config.yaml"))
    print(f"{len(generated)} image(s) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
