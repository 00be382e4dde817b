"""MOSAIC (paper section 4): reference latents in FLUX's joint attention, a LoRA on the reference branch only, and the
semantic-correspondence losses SCAL (eqs. 8-10) and MDL (eqs. 11-14).

The frozen ``FluxTransformer2DModel`` runs on an image stream of [target tokens; reference tokens]: every reference
crop is VAE-encoded and packed like FLUX latents (2x2 patches, 16 pixels per token), and all references are
concatenated after the target, so every dual- and single-stream block attends over [text; target; references]
(eq. 7 up to the order of the blocks, which attention does not see). Position ids keep references apart from the
target and from each other (:func:`position_ids`). :class:`MosaicAttnProcessor` is FLUX's attention processor plus
LoRA deltas on ``to_q``/``to_k``/``to_v`` (and ``to_out`` in dual-stream blocks) that are added to the reference
tokens only (eq. 6): text and target projections are the frozen model's, whatever the LoRA weights. Selected blocks
record the reference->target attention rows at the correspondence points, which the losses read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.models.transformers.transformer_flux import _get_qkv_projections
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from torch import nn

from mpalign.config import MOSAIC_BLOCKS
from mpalign.models.alignment import KL_EPS, disentanglement_loss

# FLUX's VAE down-samples 8x and the transformer packs 2x2 latents into one token: one token per 16x16 pixels. The
# correspondence data stage maps points to token indices with the same figure.
TOKEN_PIXELS = 16
BLOCK_THIRDS = MOSAIC_BLOCKS


# --------------------------------------------------------------------------------------------------------------------
# Latents and position ids
# --------------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def flux_latents(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) pixels in [-1, 1] -> FLUX's normalised latents (posterior mean, shifted and scaled)."""
    p = next(vae.parameters())
    mean = vae.encode(pixels.to(device=p.device, dtype=p.dtype)).latent_dist.mean
    return (mean - vae.config.shift_factor) * vae.config.scaling_factor


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, 4C) tokens, FLUX's packing (row-major over the 2x2 patches)."""
    b, c, h, w = latents.shape
    return FluxPipeline._pack_latents(latents, b, c, h, w)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack` for a latent grid of ``height`` x ``width``."""
    b, _, channels = tokens.shape
    tokens = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return tokens.reshape(b, channels // 4, height, width)


def grid_ids(rows: int, cols: int, index: float = 0.0, row_offset: int = 0, col_offset: int = 0) -> torch.Tensor:
    """(rows * cols, 3) FLUX position ids [index, row, col], row-major like the packed tokens."""
    ids = torch.zeros(rows, cols, 3)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(rows)[:, None] + row_offset
    ids[..., 2] = torch.arange(cols)[None, :] + col_offset
    return ids.reshape(rows * cols, 3)


def position_ids(target_grid: tuple[int, int], reference_grids: list[tuple[int, int]]) -> torch.Tensor:
    """Ids of [target; reference 1; ...; reference K] tokens. The target keeps FLUX's own ids (index 0, its grid);
    reference k gets index k and a diagonal offset past the target and every earlier reference (rows and columns
    both), so no reference token shares a RoPE position with the target or with another reference, in any axis
    pair (the paper's "RoPE offsets" of section 4.1; the offset scheme itself it leaves open)."""
    rows, cols = target_grid
    parts = [grid_ids(rows, cols)]
    for k, (h, w) in enumerate(reference_grids, start=1):
        parts.append(grid_ids(h, w, index=k, row_offset=rows, col_offset=cols))
        rows, cols = rows + h, cols + w
    return torch.cat(parts)


def block_names(transformer) -> list[str]:
    """Every block of the transformer in execution order: dual-stream, then single-stream."""
    return ([f"transformer_blocks.{i}" for i in range(len(transformer.transformer_blocks))]
            + [f"single_transformer_blocks.{i}" for i in range(len(transformer.single_transformer_blocks))])


def loss_blocks(transformer, thirds: list[str]) -> list[str]:
    """The blocks of the named thirds (early / middle / late) of the block sequence: where SCAL and MDL read the
    attention (paper table 10; which blocks make up each third it does not say)."""
    unknown = [t for t in thirds if t not in BLOCK_THIRDS]
    if unknown or not thirds:
        raise ValueError(f"model.mosaic_loss_blocks must name one or more of {list(BLOCK_THIRDS)}, got {thirds}")
    names = block_names(transformer)
    split = np.array_split(np.arange(len(names)), 3)
    return [names[i] for third, indices in zip(BLOCK_THIRDS, split) if third in thirds for i in indices]


# --------------------------------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class MosaicContext:
    """What the processors of one transformer call need (``joint_attention_kwargs={"mosaic": ctx}``): the token
    layout, the padded references to hide, and (training) which reference tokens' attention rows to record."""

    num_target: int
    num_reference: int
    reference_mask: torch.Tensor | None = None  # (B, num_reference) bool: False for padded reference slots
    query_index: torch.Tensor | None = None  # (B, P) long: reference token indices G(u) (eq. 9) to record
    record_blocks: frozenset[str] = frozenset()
    records: list[torch.Tensor] = field(default_factory=list)  # per recording block: (B, P, num_target)


class LoRA(nn.Module):
    """x -> up(down(x)), ``up`` starting at zero (so a fresh adapter leaves the model as it was), as peft does."""

    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype)))


def _on_references(projected: torch.Tensor, lora: LoRA, inputs: torch.Tensor, num_reference: int) -> torch.Tensor:
    """``projected`` with ``lora(inputs)`` added to its last ``num_reference`` tokens only."""
    if num_reference == 0:
        return projected
    delta = lora(inputs[:, -num_reference:]).to(projected.dtype)
    return torch.cat((projected[:, :-num_reference], projected[:, -num_reference:] + delta), dim=1)


class MosaicAttnProcessor(nn.Module):
    """``FluxAttnProcessor`` with the reference branch's LoRA (eq. 6) and the reference->target attention tap."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, query_dim: int, inner_dim: int, rank: int, has_out: bool):
        super().__init__()
        self.to_q_lora = LoRA(query_dim, inner_dim, rank)
        self.to_k_lora = LoRA(query_dim, inner_dim, rank)
        self.to_v_lora = LoRA(query_dim, inner_dim, rank)
        self.to_out_lora = LoRA(inner_dim, query_dim, rank) if has_out else None
        self.block = ""  # set by MosaicAdapter.attach

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 mosaic: MosaicContext | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n_ref = mosaic.num_reference if mosaic is not None else 0
        query, key, value, encoder_query, encoder_key, encoder_value = _get_qkv_projections(
            attn, hidden_states, encoder_hidden_states)
        # References are the last tokens of the image stream (dual-stream) and of [text; image] (single-stream).
        query = _on_references(query, self.to_q_lora, hidden_states, n_ref)
        key = _on_references(key, self.to_k_lora, hidden_states, n_ref)
        value = _on_references(value, self.to_v_lora, hidden_states, n_ref)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(encoder_query.unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(encoder_key.unflatten(-1, (-1, attn.head_dim)))
            encoder_value = encoder_value.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([encoder_query, query], dim=1)
            key = torch.cat([encoder_key, key], dim=1)
            value = torch.cat([encoder_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        if mosaic is not None and self.block in mosaic.record_blocks and mosaic.query_index is not None:
            mosaic.records.append(reference_to_target_attention(query, key, mosaic))
        if n_ref and mosaic.reference_mask is not None:
            # padded reference slots are no keys for anyone (their own rows are computed and thrown away)
            visible = torch.ones(query.shape[0], query.shape[1], dtype=torch.bool, device=query.device)
            visible[:, -n_ref:] = mosaic.reference_mask.to(query.device)
            attention_mask = visible[:, None, None, :]
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=self._attention_backend,
                                    parallel_config=self._parallel_config)
        out = out.flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        encoder_out, out = out.split_with_sizes([encoder_hidden_states.shape[1], hidden_states.shape[1]], dim=1)
        out = out.contiguous()
        projected = _on_references(attn.to_out[0](out), self.to_out_lora, out, n_ref)
        return attn.to_out[1](projected), attn.to_add_out(encoder_out.contiguous())


def reference_to_target_attention(query: torch.Tensor, key: torch.Tensor, ctx: MosaicContext) -> torch.Tensor:
    """Eq. 8 for one block, at the recorded reference tokens only: softmax over the *target* keys of
    Q_u K_v^T / sqrt(d), averaged over heads (the paper does not say how heads combine). query/key (B, L, H, d) after
    RoPE, references last and the target just before them -> (B, P, num_target) float32."""
    total = query.shape[1]
    ref_start = total - ctx.num_reference
    heads, dim = query.shape[2], query.shape[3]
    refs = query[:, ref_start:]
    index = ctx.query_index.to(query.device)[:, :, None, None].expand(-1, -1, heads, dim)
    picked = torch.gather(refs, 1, index).float()  # (B, P, H, d)
    target_keys = key[:, ref_start - ctx.num_target:ref_start].float()  # (B, N, H, d)
    logits = torch.einsum("bphd,bnhd->bhpn", picked, target_keys) / math.sqrt(dim)
    return logits.softmax(-1).mean(1)


class MosaicAdapter(ModelMixin, ConfigMixin):
    """Everything MOSAIC trains: one :class:`MosaicAttnProcessor` (its LoRA) per attention layer of the transformer.
    ``layers`` maps each processor name to (query width, inner width, has to_out)."""

    @register_to_config
    def __init__(self, layers: dict[str, list[int]], rank: int = 128, max_subjects: int = 4):
        super().__init__()
        self.processors = nn.ModuleDict({_key(name): MosaicAttnProcessor(q, inner, rank, bool(out))
                                         for name, (q, inner, out) in layers.items()})

    @classmethod
    def for_transformer(cls, transformer, rank: int, max_subjects: int) -> MosaicAdapter:
        layers = {}
        for name in transformer.attn_processors:
            attn = transformer.get_submodule(name[: -len(".processor")])
            layers[name] = [attn.query_dim, attn.inner_dim, int(not attn.pre_only)]
        return cls(layers=layers, rank=rank, max_subjects=max_subjects)

    def architecture(self) -> dict:
        return {k: v for k, v in self.config.items() if not k.startswith("_")}

    def check_compatible(self, transformer) -> None:
        mine = {name: list(v) for name, v in self.config.layers.items()}
        theirs = MosaicAdapter.for_transformer(transformer, 1, 1).config.layers
        if mine != {name: list(v) for name, v in theirs.items()}:
            raise ValueError(f"the MOSAIC adapter does not fit this transformer: {len(mine)} attention layers vs "
                             f"{len(theirs)}, or other widths")

    def attach(self, transformer) -> None:
        """Install the processors on every attention layer. Freeze the transformer first: the processors become its
        submodules and must stay trainable."""
        self.check_compatible(transformer)
        processors = {}
        for name in transformer.attn_processors:
            processor = self.processors[_key(name)]
            processor.block = name.split(".attn.")[0]
            processors[name] = processor
        transformer.set_attn_processor(processors)


def _key(name: str) -> str:
    return name.replace(".", "_")


def run_transformer(transformer, target_tokens: torch.Tensor, reference_tokens: torch.Tensor,
                    target_grid: tuple[int, int], reference_grid: tuple[int, int], text: torch.Tensor,
                    pooled: torch.Tensor, timestep: torch.Tensor, guidance: torch.Tensor | None,
                    ctx: MosaicContext) -> torch.Tensor:
    """The transformer's prediction for the target tokens, with ``reference_tokens`` (B, K * n, C) — K references of
    ``reference_grid`` tokens each — in its image stream. ``ctx`` is filled in with the layout."""
    num_refs = reference_tokens.shape[1] // max(1, reference_grid[0] * reference_grid[1])
    ids = position_ids(target_grid, [reference_grid] * num_refs).to(target_tokens.device, target_tokens.dtype)
    txt_ids = torch.zeros(text.shape[1], 3, device=target_tokens.device, dtype=target_tokens.dtype)
    ctx.num_target, ctx.num_reference = target_tokens.shape[1], reference_tokens.shape[1]
    stream = torch.cat((target_tokens, reference_tokens.to(target_tokens.dtype)), dim=1)
    out = transformer(hidden_states=stream, encoder_hidden_states=text, pooled_projections=pooled, timestep=timestep,
                      img_ids=ids, txt_ids=txt_ids, guidance=guidance, joint_attention_kwargs={"mosaic": ctx},
                      return_dict=False)[0]
    return out[:, :ctx.num_target]


# --------------------------------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------------------------------


def correspondence_queries(ref_tokens: torch.Tensor, point_mask: torch.Tensor,
                           tokens_per_reference: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flatten per-subject correspondences (B, S, P) into the (B, S*P) rows the processors record: the global
    reference token index G(u) = (offset of reference k) + u (eq. 9), the subject of each row, and the mask."""
    b, s, p = ref_tokens.shape
    offsets = torch.arange(s, device=ref_tokens.device)[None, :, None] * tokens_per_reference
    index = (ref_tokens.clamp(min=0) + offsets).reshape(b, s * p)
    subject = torch.arange(s, device=ref_tokens.device)[None, :, None].expand(b, s, p).reshape(b, s * p)
    return index, subject, point_mask.reshape(b, s * p)


def mean_over_blocks(records: list[torch.Tensor]) -> torch.Tensor:
    """A_ref->tgt of eq. 8: the per-block attention probabilities averaged over the selected blocks."""
    return torch.stack(records).mean(0)


def _per_subject_sum(values: torch.Tensor, subject: torch.Tensor, mask: torch.Tensor, num_subjects: int) -> torch.Tensor:
    """(B, P, ...) -> (B, S, ...): the masked sum of each subject's rows."""
    one_hot = torch.nn.functional.one_hot(subject, num_subjects).to(values.dtype) * mask[..., None].to(values.dtype)
    return torch.einsum("bps,bp...->bs...", one_hot, values)


def scal_loss(attention: torch.Tensor, target_tokens: torch.Tensor, subject: torch.Tensor, mask: torch.Tensor,
              num_subjects: int) -> torch.Tensor:
    """Eq. 10: -1/K sum_k 1/P_k sum_j log A[G(u_kj), v_kj], per sample over its K references with correspondences,
    then the mean over samples that have any. attention (B, P, N); target_tokens, subject (B, P) long; mask (B, P)."""
    picked = attention.gather(-1, target_tokens.clamp(min=0)[..., None]).squeeze(-1)
    log_prob = picked.clamp(min=KL_EPS).log()
    sums = _per_subject_sum(log_prob, subject, mask, num_subjects)
    counts = _per_subject_sum(torch.ones_like(log_prob), subject, mask, num_subjects)
    has = counts > 0
    per_subject = sums / counts.clamp(min=1)
    k = has.sum(1)
    per_sample = -(per_subject * has).sum(1) / k.clamp(min=1)
    live = (k > 0).to(per_sample.dtype)
    return (per_sample * live).sum() / live.sum().clamp(min=1)


def mdl_loss(attention: torch.Tensor, subject: torch.Tensor, mask: torch.Tensor, num_subjects: int) -> torch.Tensor:
    """Eqs. 11-14: each reference's attention rows at its correspondence points averaged (eq. 12) into a map over
    the target tokens, normalised; minus the mean symmetric KL (eq. 13) over ordered pairs of references (eq. 14).
    The pair averaging, normalisation and KL are :func:`mpalign.models.alignment.disentanglement_loss`'s."""
    sums = _per_subject_sum(attention, subject, mask, num_subjects)  # (B, S, N)
    counts = _per_subject_sum(torch.ones_like(attention[..., 0]), subject, mask, num_subjects)
    maps = sums / counts.clamp(min=1)[..., None]
    return disentanglement_loss([(maps, None)], counts > 0)
