"""Subject masks with SAM (transformers' ``SamModel``) prompted by the boxes, and the masked reference crops."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from mpalign.zoo import EncoderWithProcessor

BACKGROUND_FILL = 255  # the white_square style: subjects on white, as MS-Diffusion's examples show them
CROP_STYLES = ("release", "white_square")  # data.crop_style
# A SAM mask covering less than this share of its box is a failed segmentation; the box itself is the safer mask.
MIN_MASK_FILL = 0.05


def box_to_pixels(box: Sequence[float], height: int, width: int) -> tuple[int, int, int, int]:
    x0, y0, x1, y1 = box
    px0, py0 = int(np.floor(x0 * width)), int(np.floor(y0 * height))
    px1, py1 = max(px0 + 1, int(np.ceil(x1 * width))), max(py0 + 1, int(np.ceil(y1 * height)))
    return px0, py0, min(px1, width), min(py1, height)


def box_mask(box: Sequence[float], height: int, width: int) -> np.ndarray:
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = box_to_pixels(box, height, width)
    mask[y0:y1, x0:x1] = True
    return mask


def clean_mask(mask: np.ndarray, box: Sequence[float]) -> np.ndarray:
    """The mask inside its box; the box when SAM found (almost) nothing there."""
    inside = mask & box_mask(box, *mask.shape)
    box_area = box_mask(box, *mask.shape).sum()
    return inside if inside.sum() >= MIN_MASK_FILL * box_area else box_mask(box, *mask.shape)


def background_filled_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """The subject alone: pixels outside ``mask`` filled, the box grown to a square around its centre (so the
    subject keeps its proportions), resized to ``size``²."""
    height, width = mask.shape
    x0, y0, x1, y1 = box_to_pixels(box, height, width)
    side = max(x1 - x0, y1 - y0)
    cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
    left, top = cx - side // 2, cy - side // 2
    canvas = np.full((side, side, 3), BACKGROUND_FILL, dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(left, 0), max(top, 0), min(left + side, width), min(top + side, height)
    region = np.where(mask[sy0:sy1, sx0:sx1, None], image[sy0:sy1, sx0:sx1], BACKGROUND_FILL)
    canvas[sy0 - top:sy1 - top, sx0 - left:sx1 - left] = region
    return np.asarray(Image.fromarray(canvas).resize((size, size), Image.BICUBIC))


def masked_stretched_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """The release's data generator: pixels outside ``mask`` black (image x mask), the box cut out as it is and
    resized (bilinear) to ``size``², so a wide subject is squeezed."""
    height, width = mask.shape
    x0, y0, x1, y1 = box_to_pixels(box, height, width)
    region = image[y0:y1, x0:x1] * mask[y0:y1, x0:x1, None].astype(image.dtype)
    return np.asarray(Image.fromarray(region).resize((size, size), Image.BILINEAR))


def reference_crop(image: np.ndarray, mask: np.ndarray, box: Sequence[float], size: int, style: str) -> np.ndarray:
    """One subject's reference crop in ``data.crop_style``."""
    if style == "release":
        return masked_stretched_crop(image, mask, box, size)
    if style == "white_square":
        return background_filled_crop(image, mask, box, size)
    raise ValueError(f"data.crop_style must be one of {list(CROP_STYLES)}, got '{style}'")


@torch.no_grad()
def segment_boxes(sam: EncoderWithProcessor, images: Sequence[np.ndarray], boxes: Sequence[Sequence[Sequence[float]]]
                  ) -> list[np.ndarray]:
    """Masks (S_i, H, W) bool per image: the image encoder runs batched, the light prompt decoder per image."""
    model, processor = sam.model, sam.processor
    param = next(model.parameters())
    inputs = processor(images=list(images), return_tensors="pt")
    embeddings = model.get_image_embeddings(inputs["pixel_values"].to(param.device, param.dtype))
    out = []
    for i, image_boxes in enumerate(boxes):
        height, width = images[i].shape[:2]
        if len(image_boxes) == 0:
            out.append(np.zeros((0, height, width), dtype=bool))
            continue
        rh, rw = inputs["reshaped_input_sizes"][i].tolist()  # the frame SAM's prompt encoder expects boxes in
        scale = torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
        prompt = (torch.tensor(image_boxes, dtype=torch.float32) * scale)[None].to(param.device, param.dtype)
        pred = model(image_embeddings=embeddings[i:i + 1], input_boxes=prompt, multimask_output=False).pred_masks
        masks = processor.post_process_masks(pred.float().cpu(), inputs["original_sizes"][i:i + 1],
                                             inputs["reshaped_input_sizes"][i:i + 1])[0][:, 0]
        out.append(np.stack([clean_mask(m.numpy().astype(bool), b) for m, b in zip(masks, image_boxes)]))
    return out
