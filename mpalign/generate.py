"""Generate images of subjects placed in boxes.

    python -m mpalign.generate --prompt "a dog and a cat on a sofa" \\
        --subject dog.jpg --box 0.05,0.3,0.5,0.95 --phrase dog \\
        --subject cat.jpg --box 0.5,0.3,0.95,0.95 --phrase cat \\
        [--adapter DIR_OR_URI] [--config configs/sdxl.yaml] [--set key=value ...] --out out.png

Without any --box every subject's box is the whole image (no layout). --auto-layout-threshold T [--auto-layout-start
N] switches each subject's region to where its phrase's text attention exceeds T after N steps (phrases must be words
of the prompt); --controlnet ID_OR_PATH --control-image IMG adds an SDXL ControlNet.

Writes ``out.png`` (``out-1.png``, ... for more images), ``out.preview.png`` (the boxes drawn on the image),
``out.sheet.png`` (references, layout and image side by side) and ``out.config.yaml`` (the resolved config). Without
``--adapter`` a freshly initialised adapter is used (smoke runs).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from mpalign.cli import USER_ERRORS, UserInputError, check_writable, one_line, quiet_console
from mpalign.config import add_config_args, config_from_args
from mpalign.storage import is_remote, local_copy


class UsageError(UserInputError):
    """A bad command line: printed as one ``error:`` line."""


def parse_box(text: str) -> list[float]:
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        raise UsageError(f"--box '{text}' must be four numbers x0,y0,x1,y1 (fractions of the image)") from None
    if len(box) != 4:
        raise UsageError(f"--box '{text}' must be four numbers x0,y0,x1,y1 (fractions of the image)")
    return box


def read_image(path: str, role: str = "subject image") -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError) as exc:
        raise UsageError(f"cannot read {role} '{path}': {exc.__class__.__name__}: {exc}") from None


def check_output_image(out: str) -> None:
    """Before any model loads: ``--out`` names an image format Pillow writes, in a folder that can be written."""
    suffix = Path(out).suffix.lower()
    if suffix not in Image.registered_extensions() or suffix in (".pdf", ".eps", ".ps"):
        raise UsageError(f"--out '{out}' needs an image file extension (.png, .jpg, .webp, ...)")
    check_writable(out, "--out", folder=False)


def output_paths(out: Path, count: int) -> list[Path]:
    return [out if i == 0 else out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m mpalign.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default="")
    parser.add_argument("--subject", action="append", default=[], metavar="IMG", help="subject image, one per subject")
    parser.add_argument("--box", action="append", default=[], metavar="X0,Y0,X1,Y1",
                        help="the subject's box as fractions of the image, one per subject; no --box at all = no "
                             "layout (every box is the whole image)")
    parser.add_argument("--phrase", action="append", default=[], help="what the subject is (e.g. dog), one per subject")
    parser.add_argument("--subject-scale", action="append", type=float, default=None,
                        help="per-subject image weight, one per subject when given")
    parser.add_argument("--adapter", default=None, help="adapter folder (save_adapter output or a converted "
                        "checkpoint), local or on object storage (s3://...)")
    parser.add_argument("--scale", type=float, default=None, help="image-branch weight (default: model.scale)")
    parser.add_argument("--drop-grounding", action="store_true", help="use learnable queries instead of phrase+box")
    parser.add_argument("--auto-layout-threshold", type=float, default=None, metavar="T",
                        help="auto layout guidance: after --auto-layout-start steps each subject's region is where "
                             "its phrase's text attention (min-max normalised) exceeds T (the release uses 0.5)")
    parser.add_argument("--auto-layout-start", type=int, default=5, metavar="N",
                        help="denoising steps that use the boxes before auto layout takes over (default 5)")
    parser.add_argument("--controlnet", default=None, metavar="ID_OR_PATH", help="an SDXL ControlNet (hub id or folder)")
    parser.add_argument("--control-image", default=None, metavar="IMG", help="the ControlNet's condition image")
    parser.add_argument("--controlnet-scale", type=float, default=1.0,
                        help="controlnet_conditioning_scale (default 1.0; the release's example uses 0.7)")
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
    quiet_console(args.verbose)
    try:
        cfg = config_from_args(args)
        boxes = [parse_box(b) for b in args.box] or None
        from mpalign.models.attention import AutoLayout
        from mpalign.pipeline import check_subjects, contact_sheet, draw_boxes, layout_or_whole_image, phrase_token_mask
        from mpalign.zoo import load_sdxl_tokenizers

        # Argument mistakes surface before minutes of model loading.
        check_subjects(args.subject, boxes, args.phrase, cfg.model.max_subjects, args.subject_scale)
        images = [read_image(p) for p in args.subject]
        if args.adapter and not is_remote(args.adapter) and not Path(args.adapter).is_dir():
            raise UsageError(f"--adapter '{args.adapter}' is not a folder")
        if args.num_images < 1 or args.steps < 1:
            raise UsageError("--num-images and --steps must be at least 1")
        check_output_image(args.out)
        if bool(args.controlnet) != bool(args.control_image):
            raise UsageError("--controlnet and --control-image go together: give both or neither")
        from mpalign import methods

        method = methods.check_method(cfg)
        sdxl_only = [flag for flag, given in (("--controlnet", args.controlnet),
                                              ("--auto-layout-threshold", args.auto_layout_threshold is not None))
                     if given]
        if sdxl_only and method == "mosaic":
            raise UsageError(f"{' and '.join(sdxl_only)} are MS-Diffusion adapter (SDXL) options: model.method=mosaic "
                             f"does not take them")
        ms_adapter_options = {}
        if method == "ms_adapter":
            control_image = read_image(args.control_image, "control image") if args.control_image else None
            auto_layout = None
            if args.auto_layout_threshold is not None:
                auto_layout = AutoLayout(threshold=args.auto_layout_threshold, start_step=args.auto_layout_start)
                phrase_token_mask(load_sdxl_tokenizers(cfg.model)[0], args.prompt, args.phrase, cfg.model.max_subjects)
            ms_adapter_options = {"auto_layout": auto_layout, "control_image": control_image,
                                  "controlnet_conditioning_scale": args.controlnet_scale}

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="mpalign-adapter-") as scratch:  # the pipeline reads it when built
            adapter = args.adapter and local_copy(args.adapter, scratch, "--adapter")
            pipe = methods.pipeline(cfg, adapter_dir=adapter, device=args.device, controlnet=args.controlnet)
        pipe.pipe.set_progress_bar_config(disable=False)
        generated = pipe.generate(
            args.prompt, images, boxes, args.phrase, negative_prompt=args.negative_prompt, scale=args.scale,
            subject_scales=args.subject_scale, drop_grounding=args.drop_grounding, guidance_scale=args.guidance_scale,
            num_inference_steps=args.steps, seed=args.seed, height=args.height, width=args.width,
            num_images=args.num_images, **ms_adapter_options)
    except (*USER_ERRORS, ValueError) as exc:
        print(f"error: {one_line(exc)}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, image in zip(output_paths(out, len(generated)), generated):
        image.save(path)
        layout = layout_or_whole_image(boxes, len(images))
        draw_boxes(image, layout, args.phrase).save(path.with_suffix(".preview.png"))
        contact_sheet(images, layout, args.phrase, image).save(path.with_suffix(".sheet.png"))
        print(f"wrote {path}, {path.with_suffix('.preview.png')} and {path.with_suffix('.sheet.png')}")
    cfg.save(out.with_suffix(".config.yaml"))
    print(f"{len(generated)} image(s) in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
