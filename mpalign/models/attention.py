"""MS-Diffusion's multi-subject cross-attention as diffusers attention processors, plus the taps that feed the
MultiPersona-Align losses.

Every ``attn2`` layer of the UNet gets a :class:`MultiSubjectAttnProcessor`; its ``encoder_hidden_states`` are
``[text (77); dummy tokens (D); subject 0 tokens (K); ...; subject S-1 tokens (K)]`` (the official layout), and the
layout arrives through the UNet's ``cross_attention_kwargs``:

- ``ms_boxes`` (B, S, 4) boxes x0, y0, x1, y1 in [0, 1]; batch 1 broadcasts. ``None``: no layout, i.e. every
  subject's box is the whole image (exactly the release with boxes [0, 0, 1, 1]).
- ``ms_subject_mask`` (B, S) bool, True for real subjects (default: all real).
- ``ms_subject_scales`` (B, S) or (S,) float, per-subject image-branch weights (default 1).
- ``ms_latent_hw`` (h, w) of the UNet's input latents, for non-square images (default: square grids).
- ``ms_recorder`` an :class:`AlignmentRecorder` that collects the alignment taps (default: nothing recorded).
- ``ms_auto_layout`` an :class:`AutoLayout`: from its start step on, each subject's region is where its phrase's text
  attention is high instead of its box (default: the boxes throughout).

Every ``attn1`` layer gets a :class:`SelfAttnTapProcessor` (diffusers' ``AttnProcessor2_0`` plus the tap).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from torch import nn

# The official release biases masked logits by -10000 rather than -inf: a row with every token masked (a cell outside
# all boxes when there are no dummy tokens) then stays finite, and is zeroed afterwards anyway.
MASK_BIAS = -10000.0
BLOCK_KINDS = ("down", "mid", "up")
# What L_cross pools over each subject's box in a tapped attn2 layer (``model.align_cross_feature``, docs/model.md):
# "hidden_state": the transformer block's hidden state right after attn2 (residual stream + the layer's output), the
# diffusion feature: it carries x_t and t; "attn2_output": the layer's output alone, to_out(text attention + scale *
# image branch), the paper's literal wording, but a convex mix of fixed value vectors that barely moves with x_t;
# "image_branch": the masked image branch before to_out (the first implementation, nearly a function of the reference
# crop alone). The last two are kept as ablations.
CROSS_FEATURES = ("hidden_state", "attn2_output", "image_branch")


def block_of(processor_name: str) -> str:
    """``down_blocks.1.attentions.0....attn2.processor`` -> ``down_blocks.1``; ``mid_block....`` -> ``mid_block``."""
    parts = processor_name.split(".")
    return parts[0] if parts[0] == "mid_block" else ".".join(parts[:2])


def block_kind(block: str) -> str:
    return block.split("_", 1)[0]


def latent_grid(num_cells: int, latent_hw: tuple[int, int] | None) -> tuple[int, int]:
    """(rows, cols) of a layer's query grid: the input latent grid halved k times (rounding up, like the UNet)."""
    if latent_hw is None:
        side = math.isqrt(num_cells)
        if side * side != num_cells:
            raise ValueError(f"{num_cells} query cells are not a square grid; pass ms_latent_hw for non-square latents")
        return side, side
    h, w = (int(v) for v in latent_hw)
    for _ in range(16):
        if h * w == num_cells:
            return h, w
        h, w = -(-h // 2), -(-w // 2)
    raise ValueError(f"{num_cells} query cells do not match latents of {tuple(latent_hw)} at any UNet resolution")


def box_cell_masks(boxes: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(..., 4) boxes -> (..., rows * cols) bool: the official rule floor(x0 * cols) <= col < ceil(x1 * cols), and the
    same for rows with y."""
    boxes = boxes.float()
    col = torch.arange(cols, device=boxes.device)
    row = torch.arange(rows, device=boxes.device)
    in_cols = (col >= torch.floor(boxes[..., 0:1] * cols)) & (col < torch.ceil(boxes[..., 2:3] * cols))
    in_rows = (row >= torch.floor(boxes[..., 1:2] * rows)) & (row < torch.ceil(boxes[..., 3:4] * rows))
    return (in_rows[..., :, None] & in_cols[..., None, :]).flatten(-2)


def box_regions(boxes: torch.Tensor | None, subject_mask: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(B, S, N) bool: the cells of each real subject's box; ``boxes=None`` gives every real subject the whole image.
    An all-zero box covers no cell (floor(0) = ceil(0)), as in the release."""
    if boxes is None:
        return subject_mask[..., None].expand(-1, -1, rows * cols)
    return box_cell_masks(boxes, rows, cols) & subject_mask[..., None]


@dataclass
class LayoutMasks:
    """Who may attend to what in one layer, for a batch of B elements, S subjects and N query cells: a real subject's
    tokens are seen only from its region's cells, the dummy tokens only from cells outside every region, and the image
    branch's output is zero outside every region; padded subjects are seen from nowhere (the release's rule)."""

    regions: torch.Tensor  # (B, S, N) bool: cells of each subject's region (its box, or its auto-layout mask)
    token_visible: torch.Tensor  # (B, N, D + S * K) bool
    keep: torch.Tensor  # (B, N) bool: cells where the image branch contributes


def layout_masks(regions: torch.Tensor, num_dummy: int, num_tokens: int) -> LayoutMasks:
    covered = regions.any(1)  # (B, N)
    dummy_visible = (~covered)[..., None].expand(-1, -1, num_dummy)
    subject_visible = regions.transpose(1, 2).repeat_interleave(num_tokens, dim=-1)  # (B, N, S * K)
    return LayoutMasks(regions, torch.cat((dummy_visible, subject_visible), dim=-1), covered)


def additive_bias(visible: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(B, N, T) bool -> (B, 1, N, T) additive logits bias, broadcast over heads."""
    return torch.where(visible, 0.0, MASK_BIAS).to(dtype)[:, None]


@dataclass
class AlignmentRecorder:
    """Collects, during one UNet forward, what the alignment losses need from the tapped blocks.

    Pass it as ``cross_attention_kwargs["ms_recorder"]``. ``blocks`` are kinds (``down``/``mid``/``up``);
    ``features`` records pooled outputs (cheap: no attention probabilities), the cross one per ``cross_feature`` (one
    of ``CROSS_FEATURES``); ``attention_maps`` makes the tapped layers take the explicit path and record per-subject
    attention maps (only the attention-map losses need it).
    Call :meth:`close` after the forward: gradient checkpointing re-runs the processors during backward and those
    re-runs must compute the same things but not record them again."""

    blocks: Sequence[str] = ("down", "mid")
    features: bool = True
    attention_maps: bool = False
    cross_feature: str = "hidden_state"
    cross: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (block, (B, S, C)) pooled over each box
    self_attn: list[tuple[str, torch.Tensor]] = field(default_factory=list)  # (block, (B, C)) pooled over all cells
    maps: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)  # ((B, S, N) maps, (B, S, N) regions)
    closed: bool = False

    def __post_init__(self) -> None:
        unknown = set(self.blocks) - set(BLOCK_KINDS)
        if unknown:
            raise ValueError(f"unknown alignment blocks {sorted(unknown)}; choose from {list(BLOCK_KINDS)}")
        if self.cross_feature not in CROSS_FEATURES:
            raise ValueError(f"unknown cross feature '{self.cross_feature}'; choose from {list(CROSS_FEATURES)}")

    def taps(self, block: str) -> bool:
        return block_kind(block) in self.blocks

    def record_cross(self, block: str, pooled: torch.Tensor) -> None:
        if not self.closed:
            self.cross.append((block, pooled))

    def record_self(self, block: str, pooled: torch.Tensor) -> None:
        if not self.closed:
            self.self_attn.append((block, pooled))

    def record_maps(self, maps: torch.Tensor, regions: torch.Tensor) -> None:
        if not self.closed:
            self.maps.append((maps, regions))

    def close(self) -> None:
        self.closed = True


def minmax_normalize(maps: torch.Tensor) -> torch.Tensor:
    """Scale each map (last dim: cells) to [0, 1] (the release's normalisation, with its 1e-5 guard)."""
    low, high = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)
    return (maps - low) / (high - low + 1e-5)


@dataclass
class AutoLayout:
    """Auto layout guidance (the release's pseudo layout, paper appendix "pseudo layout guidance"): every
    multi-subject layer records, at each denoising step, the text cross-attention map of each subject's phrase (mean
    over the phrase's tokens and the heads); from step ``start_step`` on (0-based: the first ``start_step`` steps use
    the boxes), a subject's region in that layer is where the mean of the layer's maps so far, min-max normalised,
    exceeds ``threshold``. Pass it as ``cross_attention_kwargs["ms_auto_layout"]``; the pipeline calls :meth:`reset`
    before a run and :meth:`on_step_end` (diffusers' ``callback_on_step_end``) after each step.

    ``sources`` lists (step, "boxes" | "attention") per layer call and ``latest`` the regions each layer's image
    branch got at its last call, so a caller can see what the masks were."""

    threshold: float = 0.5
    start_step: int = 5
    phrase_tokens: torch.Tensor | None = None  # (B, S, T) bool: which text tokens are each subject's phrase
    step: int = 0
    sums: dict[nn.Module, torch.Tensor] = field(default_factory=dict)  # per layer: (B, S, N) sum of the maps
    counts: dict[nn.Module, int] = field(default_factory=dict)
    sources: list[tuple[int, str]] = field(default_factory=list)
    latest: dict[nn.Module, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0.0 <= self.threshold < 1.0:
            raise ValueError(f"the auto-layout threshold must be in [0, 1) (maps are min-max normalised), got "
                             f"{self.threshold}")
        if self.start_step < 0:
            raise ValueError(f"the auto-layout start step must be at least 0, got {self.start_step}")

    def reset(self, phrase_tokens: torch.Tensor) -> None:
        self.phrase_tokens = phrase_tokens
        self.step = 0
        for record in (self.sums, self.counts, self.sources, self.latest):
            record.clear()

    def on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self.step = step + 1
        return {}

    def phrase_maps(self, probs: torch.Tensor, batch: int) -> torch.Tensor:
        """(B, H, N, T) text attention probabilities -> (B, S, N): each phrase's mean over its tokens and the heads."""
        if self.phrase_tokens is None:
            raise ValueError("the auto layout has no phrase tokens: call reset(phrase_tokens) first")
        tokens = _broadcast_batch(self.phrase_tokens.to(probs.device), batch, "auto-layout phrase tokens")
        if tokens.shape[-1] != probs.shape[-1]:
            raise ValueError(f"auto-layout phrase tokens cover {tokens.shape[-1]} text tokens, the layer has "
                             f"{probs.shape[-1]}")
        weights = tokens.float() / tokens.sum(-1, keepdim=True).clamp(min=1)
        return torch.einsum("bhnt,bst->bsn", probs.float(), weights) / probs.shape[1]

    def regions(self, layer: nn.Module, maps: torch.Tensor, boxes: torch.Tensor,
                subject_mask: torch.Tensor) -> torch.Tensor:
        """Record ``layer``'s maps of this step and return the regions (B, S, N) its image branch uses now."""
        self.sums[layer] = maps if layer not in self.sums else self.sums[layer] + maps
        self.counts[layer] = self.counts.get(layer, 0) + 1
        if self.step < self.start_step:
            regions, source = boxes, "boxes"
        else:
            mean = self.sums[layer] / self.counts[layer]
            regions, source = (minmax_normalize(mean) > self.threshold) & subject_mask[..., None], "attention"
        self.sources.append((self.step, source))
        self.latest[layer] = regions
        return regions


def _broadcast_batch(value: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"{name} has batch {value.shape[0]}, the UNet batch is {batch}")


def pool_regions(values: torch.Tensor, regions: torch.Tensor) -> torch.Tensor:
    """(B, N, C) features, (B, S, N) bool regions -> (B, S, C) mean over each region (0 for an empty region)."""
    weights = regions.to(values.dtype)
    return torch.einsum("bsn,bnc->bsc", weights, values) / weights.sum(-1, keepdim=True).clamp(min=1.0)


class MultiSubjectAttnProcessor(nn.Module):
    """Text attention + ``scale`` x box-masked image attention, then the layer's ``to_out``.

    ``to_k_ip``/``to_v_ip`` map the image tokens (dummy + subjects) to this layer's keys/values. The default path is
    one ``F.scaled_dot_product_attention`` with an additive mask; per-subject scales multiply the values, which
    equals multiplying the attention probabilities of that subject's tokens. The explicit path (``explicit=True``,
    or a recorder that asks for attention maps) materialises the probabilities and gives the same output.

    The ``hidden_state`` tap needs the block's residual stream, which the processor never sees: ``MSAdapter.attach``
    hooks :meth:`record_block_state` onto the input of the block's ``norm3`` (the hidden state right after attn2),
    and the processor leaves the recorder and the box cells for it in ``pending_state``."""

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_tokens: int, num_dummy_tokens: int,
                 max_subjects: int, scale: float = 1.0, block: str = ""):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.num_tokens = num_tokens
        self.num_dummy_tokens = num_dummy_tokens
        self.max_subjects = max_subjects
        self.scale = scale
        self.block = block
        self.explicit = False
        self.pending_state: tuple[AlignmentRecorder, torch.Tensor] | None = None
        self.state_hook = None  # the handle of the hook attach() installs on the block's norm3

    def record_block_state(self, hidden_states: torch.Tensor) -> None:
        """The hidden-state tap: pool the block's hidden state after attn2 over the boxes this layer just used."""
        if self.pending_state is not None:
            recorder, regions = self.pending_state
            self.pending_state = None
            recorder.record_cross(self.block, pool_regions(hidden_states, regions))

    @property
    def num_image_tokens(self) -> int:
        return self.num_dummy_tokens + self.max_subjects * self.num_tokens

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ms_boxes: torch.Tensor | None = None,
        ms_subject_mask: torch.Tensor | None = None,
        ms_subject_scales: torch.Tensor | Sequence[float] | None = None,
        ms_latent_hw: tuple[int, int] | None = None,
        ms_recorder: AlignmentRecorder | None = None,
        ms_auto_layout: AutoLayout | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_image_tokens:
            raise ValueError(f"the multi-subject processor of {self.block or 'this layer'} needs encoder_hidden_states "
                             f"= [text; {self.num_image_tokens} image tokens]")
        residual = hidden_states
        batch, num_cells, _ = hidden_states.shape
        num_text = encoder_hidden_states.shape[1] - self.num_image_tokens
        text_states, image_states = encoder_hidden_states[:, :num_text], encoder_hidden_states[:, num_text:]

        query = attn.to_q(hidden_states)
        if attn.norm_cross:
            text_states = attn.norm_encoder_hidden_states(text_states)
        heads = attn.heads

        def split_heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

        def merge_heads(t: torch.Tensor) -> torch.Tensor:
            return t.transpose(1, 2).reshape(batch, -1, t.shape[1] * t.shape[-1]).to(query.dtype)

        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, encoder_hidden_states.shape[1], batch)
            attention_mask = attention_mask.view(batch, heads, -1, attention_mask.shape[-1])[..., :num_text]
        q = split_heads(query)
        k_text, v_text = split_heads(attn.to_k(text_states)), split_heads(attn.to_v(text_states))
        phrase_maps = None
        if ms_auto_layout is None:
            text_out = F.scaled_dot_product_attention(q, k_text, v_text, attn_mask=attention_mask, scale=attn.scale)
        else:  # the phrase maps need the text attention probabilities
            text_logits = (q @ k_text.transpose(-1, -2)) * attn.scale
            if attention_mask is not None:
                text_logits = text_logits + attention_mask
            text_probs = torch.softmax(text_logits.float(), dim=-1).to(q.dtype)
            text_out = text_probs @ v_text
            phrase_maps = ms_auto_layout.phrase_maps(text_probs, batch)

        image_states = image_states.to(self.to_k_ip.weight.dtype)
        k_ip = split_heads(self.to_k_ip(image_states).to(query.dtype))
        v_ip = split_heads(self.to_v_ip(image_states).to(query.dtype))
        if ms_subject_mask is None:
            ms_subject_mask = torch.ones(batch, self.max_subjects, dtype=torch.bool, device=query.device)
        subject_mask = _broadcast_batch(ms_subject_mask.to(query.device, torch.bool), batch, "ms_subject_mask")
        boxes = None if ms_boxes is None else _broadcast_batch(ms_boxes.to(query.device), batch, "ms_boxes")
        rows, cols = latent_grid(num_cells, ms_latent_hw)
        regions = box_regions(boxes, subject_mask, rows, cols)
        if ms_auto_layout is not None:
            regions = ms_auto_layout.regions(self, phrase_maps, regions, subject_mask)
        masks = layout_masks(regions, self.num_dummy_tokens, self.num_tokens)
        if ms_subject_scales is not None:
            v_ip = v_ip * self._token_scales(ms_subject_scales, batch, v_ip)
        bias = additive_bias(masks.token_visible, q.dtype)

        recorder = ms_recorder
        tapped = recorder is not None and recorder.taps(self.block)
        if self.explicit or (tapped and recorder.attention_maps):
            logits = (q @ k_ip.transpose(-1, -2)) * attn.scale
            probs = torch.softmax((logits + bias).float(), dim=-1).to(q.dtype)
            image_out = probs @ v_ip
            if tapped and recorder.attention_maps:
                recorder.record_maps(self._layout_free_subject_maps(logits, subject_mask), masks.regions)
        else:
            image_out = F.scaled_dot_product_attention(q, k_ip, v_ip, attn_mask=bias, scale=attn.scale)
        image_out = merge_heads(image_out) * masks.keep[..., None].to(query.dtype)
        record = tapped and recorder.features
        if record and recorder.cross_feature == "image_branch":
            recorder.record_cross(self.block, pool_regions(image_out, masks.regions))

        hidden_states = merge_heads(text_out) + self.scale * image_out
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if record and recorder.cross_feature == "attn2_output":
            recorder.record_cross(self.block, pool_regions(hidden_states, masks.regions))
        if record and recorder.cross_feature == "hidden_state":
            # handed over after the recorder is closed too: checkpointing re-runs must save what the forward saved
            if self.state_hook is None:
                raise ValueError(f"the hidden_state tap of {self.block or 'this layer'} needs the hook MSAdapter.attach "
                                 "installs on its transformer block's norm3")
            self.pending_state = (recorder, masks.regions)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _token_scales(self, subject_scales: torch.Tensor | Sequence[float], batch: int, like: torch.Tensor) -> torch.Tensor:
        """(B, S) or (S,) per-subject scales -> (B, 1, T, 1) per-token factors (dummy tokens keep 1)."""
        scales = torch.as_tensor(subject_scales, dtype=like.dtype, device=like.device)
        scales = _broadcast_batch(scales.reshape(-1, self.max_subjects), batch, "ms_subject_scales")
        dummy = torch.ones(batch, self.num_dummy_tokens, dtype=like.dtype, device=like.device)
        tokens = torch.cat((dummy, scales.repeat_interleave(self.num_tokens, dim=-1)), dim=-1)
        return tokens[:, None, :, None]

    def _layout_free_subject_maps(self, logits: torch.Tensor, subject_mask: torch.Tensor) -> torch.Tensor:
        """Attention mass on each subject's tokens per cell, head-averaged, from a softmax that masks only padded
        subjects: (B, S, N). The box mask makes the masked maps zero outside each box by construction, so losses on
        where attention goes (the attention-map extras) need the layout-free ones."""
        dummy = torch.ones(subject_mask.shape[0], self.num_dummy_tokens, dtype=torch.bool, device=logits.device)
        visible = torch.cat((dummy, subject_mask.repeat_interleave(self.num_tokens, dim=-1)), dim=-1)
        probs = torch.softmax((logits + additive_bias(visible[:, None, :], logits.dtype)).float(), dim=-1)
        per_subject = probs[..., self.num_dummy_tokens:].unflatten(-1, (self.max_subjects, self.num_tokens)).sum(-1)
        return per_subject.mean(1).transpose(1, 2)  # (B, H, N, S) -> (B, S, N)


class SelfAttnTapProcessor(AttnProcessor2_0):
    """diffusers' SDPA self-attention, unchanged, plus the L_self tap: the layer's output (after ``to_out``) averaged
    over all query cells. Accepts (and ignores) the multi-subject keywords so the UNet can pass one kwargs dict to
    every layer without warnings. ``tapped=False`` for a layer no adapter weight reaches (it never records)."""

    def __init__(self, block: str = "", tapped: bool = True):
        super().__init__()
        self.block = block
        self.tapped = tapped

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        ms_boxes: torch.Tensor | None = None,
        ms_subject_mask: torch.Tensor | None = None,
        ms_subject_scales: torch.Tensor | Sequence[float] | None = None,
        ms_latent_hw: tuple[int, int] | None = None,
        ms_recorder: AlignmentRecorder | None = None,
        ms_auto_layout: AutoLayout | None = None,
    ) -> torch.Tensor:
        out = super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        if self.tapped and ms_recorder is not None and ms_recorder.features and ms_recorder.taps(self.block):
            ms_recorder.record_self(self.block, out.mean(dim=1))
        return out


class TextOnlyAttnProcessor(AttnProcessor2_0):
    """diffusers' SDPA attention on the text tokens only: for the cross-attention layers of a ControlNet that runs
    beside the adapted UNet. It gets the UNet's encoder hidden states ``[text; image tokens]`` and must ignore the
    ``num_image_tokens`` image tokens at the end (as the release's ``CNAttnProcessor2_0`` does)."""

    def __init__(self, num_image_tokens: int):
        super().__init__()
        self.num_image_tokens = num_image_tokens

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None) -> torch.Tensor:
        if encoder_hidden_states is not None:
            encoder_hidden_states = encoder_hidden_states[:, : encoder_hidden_states.shape[1] - self.num_image_tokens]
            if attention_mask is not None:
                attention_mask = attention_mask[..., : encoder_hidden_states.shape[1]]
        return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
