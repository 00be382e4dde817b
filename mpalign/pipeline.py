"""Generation: diffusers' ``StableDiffusionXLPipeline`` (its sampler, schedulers and image post-processing), or its
``StableDiffusionXLControlNetPipeline`` when a ControlNet is given, with the MS adapter's processors installed in the
UNet and the subject tokens appended to the prompt embeddings.

The classifier-free-guidance branch gets zero image tokens and no real subjects, so the image branch adds nothing
there, as in the official release. Auto layout guidance (:class:`~mpalign.models.attention.AutoLayout`) rides on the
UNet's ``cross_attention_kwargs`` and the pipeline's ``callback_on_step_end``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from diffusers import StableDiffusionXLControlNetPipeline, StableDiffusionXLPipeline
from PIL import Image, ImageDraw

from mpalign import encoders, zoo
from mpalign.config import Config
from mpalign.models.adapter import MSAdapter, place
from mpalign.models.attention import AutoLayout
from mpalign.models.training_module import ADAPTER_SEED_OFFSET, load_adapter_parts, seeded_init

logger = logging.getLogger(__name__)


WHOLE_IMAGE = (0.0, 0.0, 1.0, 1.0)


def layout_or_whole_image(boxes: Sequence[Sequence[float]] | None, count: int) -> list[list[float]]:
    """The boxes, or for no layout (``None``) the whole image for every subject: the release with boxes [0, 0, 1, 1]
    (every cell sees every subject; the dummy tokens are seen from nowhere)."""
    return [list(WHOLE_IMAGE) for _ in range(count)] if boxes is None else [list(map(float, b)) for b in boxes]


def check_subjects(subject_images: Sequence, boxes: Sequence[Sequence[float]] | None, phrases: Sequence[str],
                   max_subjects: int, subject_scales: Sequence[float] | None = None) -> None:
    """Raise ValueError with a one-line message for inputs the model cannot take (``boxes=None``: no layout)."""
    num_boxes = len(subject_images) if boxes is None else len(boxes)
    if not (len(subject_images) == num_boxes == len(phrases)):
        raise ValueError(f"got {len(subject_images)} subject images, {num_boxes} boxes and {len(phrases)} phrases: "
                         "give one box and one phrase per subject")
    if not subject_images:
        raise ValueError("give at least one subject (image, box and phrase)")
    if len(subject_images) > max_subjects:
        raise ValueError(f"{len(subject_images)} subjects given, the model supports at most {max_subjects}")
    if subject_scales is not None and len(subject_scales) != len(subject_images):
        raise ValueError(f"got {len(subject_scales)} subject scales for {len(subject_images)} subjects")
    for i, box in enumerate(boxes or []):
        if len(box) != 4:
            raise ValueError(f"box {i + 1} has {len(box)} numbers, expected 4: x0,y0,x1,y1")
        x0, y0, x1, y1 = box
        if not all(0.0 <= v <= 1.0 for v in box):
            raise ValueError(f"box {i + 1} ({x0},{y0},{x1},{y1}) is outside [0, 1]: coordinates are fractions of the image")
        if x1 <= x0 or y1 <= y0:
            raise ValueError(f"box {i + 1} ({x0},{y0},{x1},{y1}) is empty: need x1 > x0 and y1 > y0 (no box at all "
                             "means no layout)")


def phrase_token_mask(tokenizer, prompt: str, phrases: Sequence[str], num_slots: int) -> torch.Tensor:
    """(num_slots, T) bool: the prompt tokens (of SDXL's first tokenizer, T = its max length) that spell each phrase;
    a phrase given twice takes its second occurrence the second time (as the release). Raises ValueError when a
    phrase is not in the prompt: auto layout reads the phrase's text attention."""
    length = tokenizer.model_max_length
    prompt_ids = tokenizer(prompt, padding="max_length", max_length=length, truncation=True).input_ids
    mask = torch.zeros(num_slots, length, dtype=torch.bool)
    seen: dict[str, int] = {}
    for j, phrase in enumerate(phrases):
        ids = tokenizer(phrase, add_special_tokens=False).input_ids
        starts = [i for i in range(len(prompt_ids) - len(ids) + 1) if ids and prompt_ids[i:i + len(ids)] == ids]
        occurrence = seen.get(phrase, 0)
        if occurrence >= len(starts):
            where = "in the prompt" if occurrence == 0 else f"{occurrence + 1} times in the prompt"
            raise ValueError(f"auto layout: the phrase '{phrase}' does not occur {where} (within its first {length} "
                             "tokens); each subject's phrase must be words of the prompt")
        seen[phrase] = occurrence + 1
        mask[j, starts[occurrence]:starts[occurrence] + len(ids)] = True
    return mask


def draw_boxes(image: Image.Image, boxes: Sequence[Sequence[float]], phrases: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with each subject's box and phrase drawn on it."""
    preview = image.convert("RGB").copy()
    draw = ImageDraw.Draw(preview)
    w, h = preview.size
    colors = ("#ff3b30", "#34c759", "#007aff", "#ffcc00", "#af52de", "#ff9500")
    for i, (box, phrase) in enumerate(zip(boxes, phrases)):
        if not any(box):
            continue  # all-zero: no layout (and a degenerate rectangle PIL refuses)
        x0, y0, x1, y1 = box
        color = colors[i % len(colors)]
        draw.rectangle([x0 * w, y0 * h, x1 * w - 1, y1 * h - 1], outline=color, width=max(1, w // 128))
        draw.text((x0 * w + 2, y0 * h + 1), phrase, fill=color)
    return preview


def contact_sheet(references: Sequence[Image.Image], boxes: Sequence[Sequence[float]], phrases: Sequence[str],
                  generated: Image.Image, tile: int = 256) -> Image.Image:
    """References, the layout (boxes with their phrases on white) and the generated image side by side, each
    ``tile`` pixels high: what a person checks first (are the references' subjects in their boxes?)."""
    layout = draw_boxes(Image.new("RGB", (tile, tile), "white"), boxes, phrases)
    panels = [*(r.convert("RGB").resize((tile, tile), Image.NEAREST) for r in references), layout,
              draw_boxes(generated.convert("RGB").resize((tile, tile), Image.NEAREST), boxes, phrases)]
    sheet = Image.new("RGB", (len(panels) * (tile + 8) - 8, tile), "white")
    for i, panel in enumerate(panels):
        sheet.paste(panel, (i * (tile + 8), 0))
    return sheet


class MPAlignPipeline:
    """SDXL + CLIP image encoder + MS adapter [+ ControlNet]. ``pipe`` is the underlying
    ``StableDiffusionXLPipeline`` (``StableDiffusionXLControlNetPipeline`` with a ControlNet)."""

    takes_negative_prompt = True  # eval.negative_prompt (MOSAIC's pipeline has none)

    def __init__(self, sdxl: zoo.SDXLComponents, image_encoder: zoo.EncoderWithProcessor, adapter: MSAdapter,
                 scale: float = 0.6, controlnet=None, attached: bool = False):
        """``attached``: the adapter is already attached to ``sdxl.unet`` (the training module's, shared by the
        validation grid) and is used as it is: not cast, frozen or re-attached."""
        self.sdxl = sdxl
        self.image_encoder = image_encoder
        unet = sdxl.unet
        adapter.check_compatible(unet, image_encoder.model.config.hidden_size, sdxl.text_encoder.config.hidden_size)
        if attached:
            self.adapter = adapter
        else:
            self.adapter = place(adapter, unet.device, unet.dtype).eval().requires_grad_(False)
            unet.requires_grad_(False)
            adapter.attach(unet, scale)
        self.scale = scale
        self.controlnet = controlnet
        if controlnet is None:
            self.pipe = StableDiffusionXLPipeline(**sdxl.as_pipeline_kwargs())
        else:
            # The ControlNet gets the UNet's encoder hidden states, image tokens included: it must read the text only.
            adapter.attach_text_only(controlnet)
            self.pipe = StableDiffusionXLControlNetPipeline(**sdxl.as_pipeline_kwargs(), controlnet=controlnet)
        self.pipe.set_progress_bar_config(disable=True)

    @classmethod
    def from_config(cls, cfg: Config, adapter_dir: str | Path | None = None, device: str | torch.device | None = None,
                    controlnet: str | Path | None = None) -> MPAlignPipeline:
        """The models of ``cfg.model`` and the adapter in ``adapter_dir`` (``save_adapter`` output or a converted
        official checkpoint); without one, a freshly initialised adapter of the preset (logged: smoke runs only).
        ``controlnet``: an SDXL ControlNet's hub id or folder, composed with the adapter."""
        device = zoo.resolve_device(str(device or cfg.model.device))
        sdxl = zoo.load_sdxl(cfg.model, device=device)
        image_encoder = zoo.load_image_encoder(cfg.model, device=device)
        if adapter_dir:
            adapter, _ = load_adapter_parts(adapter_dir)
        else:
            logger.warning("no adapter given: using a freshly initialised adapter (random resampler) of the '%s' preset; "
                           "images show what the untrained model does", cfg.model.preset)
            adapter = seeded_init(cfg.model.seed + ADAPTER_SEED_OFFSET, lambda: MSAdapter.for_unet(
                sdxl.unet, cfg.model, image_encoder.model.config.hidden_size, sdxl.text_encoder.config.hidden_size))
        control = zoo.load_controlnet(cfg.model, str(controlnet), device=device) if controlnet else None
        return cls(sdxl, image_encoder, adapter, scale=cfg.model.scale, controlnet=control)

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Load the weights of a ``save_adapter`` folder into this pipeline's adapter (validation grids reuse one
        pipeline while the adapter trains)."""
        self.adapter.load_state_dict(load_adapter_parts(adapter_dir)[0].state_dict())

    @property
    def max_subjects(self) -> int:
        return self.adapter.config.max_subjects

    @torch.no_grad()
    def subject_tokens(self, subject_images: Sequence[Image.Image], boxes: Sequence[Sequence[float]],
                       phrases: Sequence[str], drop_grounding: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(1, D + S*K, C) image tokens, (1, S, 4) padded boxes and (1, S) subject mask for one layout."""
        num, slots = len(subject_images), self.max_subjects
        device = self.sdxl.unet.device
        clip = encoders.clip_hidden_states(self.image_encoder, subject_images)
        phrase_embeds = encoders.encode_phrases(self.sdxl, list(phrases))
        padded_clip = clip.new_zeros(1, slots, *clip.shape[1:])
        padded_clip[0, :num] = clip
        padded_phrases = phrase_embeds.new_zeros(1, slots, phrase_embeds.shape[-1])
        padded_phrases[0, :num] = phrase_embeds
        padded_boxes = torch.zeros(1, slots, 4, device=device)
        padded_boxes[0, :num] = torch.tensor(boxes, device=device)
        subject_mask = torch.zeros(1, slots, dtype=torch.bool, device=device)
        subject_mask[0, :num] = True
        tokens = self.adapter.image_tokens(padded_clip, padded_phrases, padded_boxes, subject_mask,
                                           drop_grounding=subject_mask.clone() if drop_grounding else None)
        return tokens, padded_boxes, subject_mask

    def check_inputs(self, prompt: str, subject_images: Sequence, boxes: Sequence[Sequence[float]] | None,
                     phrases: Sequence[str], subject_scales: Sequence[float] | None = None,
                     auto_layout: AutoLayout | None = None, control_image: Image.Image | None = None) -> None:
        """Raise ValueError (one line) for anything :meth:`generate` cannot do with these inputs."""
        check_subjects(subject_images, boxes, phrases, self.max_subjects, subject_scales)
        if auto_layout is not None:
            phrase_token_mask(self.sdxl.tokenizer, prompt, phrases, self.max_subjects)
        if control_image is not None and self.controlnet is None:
            raise ValueError("a control image needs a ControlNet (--controlnet / from_config(controlnet=...))")
        if self.controlnet is not None and control_image is None:
            raise ValueError("this pipeline has a ControlNet: give a control image (--control-image)")

    @torch.no_grad()
    def generate(self, prompt: str, subject_images: list[Image.Image], boxes: list[list[float]] | None,
                 phrases: list[str], negative_prompt: str = "", scale: float | None = None,
                 subject_scales: list[float] | None = None, drop_grounding: bool = False, guidance_scale: float = 7.5,
                 num_inference_steps: int = 30, seed: int = 0, height: int | None = None, width: int | None = None,
                 num_images: int = 1, auto_layout: AutoLayout | None = None, control_image: Image.Image | None = None,
                 controlnet_conditioning_scale: float = 1.0) -> list[Image.Image]:
        """``num_images`` images of ``prompt`` with each subject image placed in its box (x0, y0, x1, y1 fractions;
        ``boxes=None``: no layout, every subject's box is the whole image). ``scale`` weighs the image branch
        (default ``model.scale``), ``subject_scales`` each subject, ``drop_grounding`` uses the learnable queries
        instead of the phrase+box grounding tokens. ``auto_layout`` switches each subject's region to where its
        phrase's text attention is high from its start step on (it is reset here; afterwards it tells which regions
        were used). ``control_image`` conditions the ControlNet the pipeline was built with."""
        self.check_inputs(prompt, subject_images, boxes, phrases, subject_scales, auto_layout, control_image)
        boxes = layout_or_whole_image(boxes, len(subject_images))
        pipe, unet = self.pipe, self.sdxl.unet
        height = height or unet.config.sample_size * pipe.vae_scale_factor
        width = width or unet.config.sample_size * pipe.vae_scale_factor
        tokens, padded_boxes, subject_mask = self.subject_tokens(subject_images, boxes, phrases, drop_grounding)
        guided = guidance_scale > 1 and unet.config.time_cond_proj_dim is None  # the pipeline's own CFG rule
        prompt_embeds, negative_embeds, pooled, negative_pooled = pipe.encode_prompt(
            prompt, device=unet.device, num_images_per_prompt=num_images, do_classifier_free_guidance=guided,
            negative_prompt=negative_prompt or None)
        tokens = tokens.to(prompt_embeds.dtype).expand(num_images, -1, -1)
        prompt_embeds = torch.cat((prompt_embeds, tokens), dim=1)
        boxes_t, mask_t = padded_boxes.expand(num_images, -1, -1), subject_mask.expand(num_images, -1)
        if guided:
            negative_embeds = torch.cat((negative_embeds, torch.zeros_like(tokens)), dim=1)
            boxes_t = torch.cat((torch.zeros_like(boxes_t), boxes_t))  # pipeline order: [negative; positive]
            mask_t = torch.cat((torch.zeros_like(mask_t), mask_t))
        attention_kwargs = {"ms_boxes": boxes_t, "ms_subject_mask": mask_t,
                            "ms_latent_hw": (height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)}
        if subject_scales is not None:
            scales = torch.ones(self.max_subjects)
            scales[: len(subject_scales)] = torch.tensor(subject_scales, dtype=torch.float32)
            attention_kwargs["ms_subject_scales"] = scales
        extra = {}
        if auto_layout is not None:
            # One (1, S, T) mask for every element: the guidance branch has no real subjects, so no region there.
            auto_layout.reset(phrase_token_mask(self.sdxl.tokenizer, prompt, phrases, self.max_subjects)[None])
            attention_kwargs["ms_auto_layout"] = auto_layout
            extra["callback_on_step_end"] = auto_layout.on_step_end
        if control_image is not None:
            extra.update(image=control_image.convert("RGB"), controlnet_conditioning_scale=controlnet_conditioning_scale)
        self.adapter.set_scale(self.scale if scale is None else scale)
        generator = torch.Generator("cpu").manual_seed(seed)
        return pipe(prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_embeds if guided else None,
                    pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled if guided else None,
                    guidance_scale=guidance_scale, num_inference_steps=num_inference_steps, generator=generator,
                    height=height, width=width, cross_attention_kwargs=attention_kwargs, output_type="pil",
                    **extra).images
