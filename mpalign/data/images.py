"""Decoding, validating and resizing input images: the first stage, and the one most bad input dies in."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from mpalign.config import DataConfig


class RejectRecord(Exception):
    """A record that cannot become a sample; ``reason`` is one of ``schema.REJECT_REASONS``."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _open(image_path: str, image_bytes: bytes | None) -> Image.Image:
    if image_bytes is None and not Path(image_path).is_file():
        raise RejectRecord("missing_image", f"no file at {image_path}")
    try:
        return Image.open(io.BytesIO(image_bytes) if image_bytes is not None else image_path)
    except Image.DecompressionBombError as exc:
        raise RejectRecord("image_too_large", str(exc)) from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise RejectRecord("unreadable_image", f"{type(exc).__name__}: {exc}") from None


def check_size(width: int, height: int, cfg: DataConfig) -> None:
    short, long = min(width, height), max(width, height)
    if short < cfg.min_image_side:
        raise RejectRecord("image_too_small", f"{width}x{height}, shorter side below {cfg.min_image_side}")
    if long > cfg.max_image_side:
        raise RejectRecord("image_too_large", f"{width}x{height}, longer side above {cfg.max_image_side}")
    if long / short > cfg.max_aspect_ratio:
        raise RejectRecord("bad_aspect_ratio", f"{width}x{height}, ratio {long / short:.2f} > {cfg.max_aspect_ratio}")


def square_resize(image: Image.Image, size: int) -> tuple[np.ndarray, tuple[int, int]]:
    """Shorter side to ``size``, then a centre crop to ``size``²; returns the pixels and the crop's (top, left) in
    the resized image: SDXL's crop micro-conditioning."""
    width, height = image.size
    scale = size / min(width, height)
    new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
    resized = image.resize((new_w, new_h), Image.BICUBIC)
    left, top = (new_w - size) // 2, (new_h - size) // 2
    return np.asarray(resized.crop((left, top, left + size, top + size))), (top, left)


WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB by two documented rules (docs/dataset.md): high-bit-depth grey (16-bit PNG/TIFF, 32-bit integer,
    float) is scaled to 0-255, not clipped (Pillow's ``convert`` clips 16-bit values, so every pixel above 255
    came out white); transparent pixels are composited on white, the background of product and subject photos
    (``convert`` would drop the alpha and show whatever colour the transparent pixels happen to hold)."""
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":  # float images are 0-1 unless their values say otherwise
            full = max(1.0, float(values.max(initial=0.0)))
        else:  # 16-bit range; 32-bit integer images beyond it to their own maximum
            full = max(65535.0, float(values.max(initial=0.0)))
        grey = np.clip(np.rint(values * (255.0 / full)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*WHITE, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(image_path: str, image_bytes: bytes | None, cfg: DataConfig
                 ) -> tuple[np.ndarray, tuple[int, int], tuple[int, int]]:
    """(pixels uint8 (S, S, 3), original (h, w), crop (top, left)); raises ``RejectRecord`` for unusable images.

    The size rules run on the header alone, so a huge image is refused before it is decoded."""
    image = _open(image_path, image_bytes)
    with image:
        check_size(*image.size, cfg)
        try:
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)  # forces the full decode: truncated files fail here
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
            raise RejectRecord("unreadable_image", f"{type(exc).__name__}: {exc}") from None
    width, height = rgb.size
    pixels, crop = square_resize(rgb, cfg.image_size)
    return pixels, (height, width), crop
