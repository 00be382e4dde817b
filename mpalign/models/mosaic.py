"""MOSAIC (paper section 4): reference latents in FLUX's joint attention, a LoRA on the reference branch only, and the
semantic-correspondence losses SCAL (eqs. 8-10) and MDL (eqs. 11-14).

The frozen ``FluxTransformer2DModel`` runs on an image stream of [target tokens; reference tokens]: every reference
crop is VAE-encoded and packed like FLUX latents (2x2 patches: 16 pixels per token with FLUX's 8x VAE, 8 with the
toy preset's 4x one, ``zoo.flux_token_pixels``), and all references are
concatenated after the target, so every dual- and single-stream block attends over [text; target; references]
(eq. 7 up to the order of the blocks, which attention does not see). Position ids keep references apart from the
target and from each other (:func:`position_ids`). The reference branch is a peft LoRA on ``to_q``/``to_k``/``to_v``
(and ``to_out`` in dual-stream blocks), injected into the transformer as diffusers injects a LoRA
(:class:`MosaicAdapter`); :class:`MosaicAttnProcessor` is FLUX's attention processor with that LoRA's delta added to
the reference tokens only (eq. 6): text and target projections are the frozen base layers', whatever the LoRA
weights. Selected blocks record the reference->target attention rows at the correspondence points, which the losses
read.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import ConfigMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from peft import LoraConfig, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import CONFIG_NAME as PEFT_CONFIG_NAME
from peft.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file
from torch import nn

from mpalign.config import MOSAIC_BLOCKS
from mpalign.models.alignment import KL_EPS, disentanglement_loss
from mpalign.zoo import IncompatibleModelError, ModelLoadError

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


# MOSAIC's LoRA is a peft adapter of this name in the transformer (diffusers' add_adapter), on the query, key and value
# projections of every attention layer and the output projection of dual-stream blocks (single-stream blocks have
# none: their attention output goes straight into proj_out with the MLP branch). FF and the text stream's projections
# stay frozen. lora_alpha = rank: the delta is B A x, unscaled.
MOSAIC_ADAPTER = "mosaic"
LORA_TARGETS = r"(single_)?transformer_blocks\.\d+\.attn\.(to_q|to_k|to_v)|transformer_blocks\.\d+\.attn\.to_out\.0"


def reference_lora_config(rank: int) -> LoraConfig:
    """The reference branch's LoRA: B starts at zero (peft's default init), so a fresh adapter is the plain model."""
    return LoraConfig(r=rank, lora_alpha=rank, target_modules=LORA_TARGETS, init_lora_weights=True)


def _on_references(layer: nn.Module, inputs: torch.Tensor, num_reference: int) -> torch.Tensor:
    """``layer(inputs)`` with MOSAIC's LoRA on the last ``num_reference`` tokens only (eq. 6): the other tokens get
    the peft layer's frozen ``base_layer``. Built from the peft layer's own modules (dropout, A, B, scaling), so it is
    that layer's forward restricted to the reference tokens."""
    if not isinstance(layer, LoraLayer) or MOSAIC_ADAPTER not in layer.lora_A:
        return layer(inputs)  # no reference branch on this layer
    projected = layer.base_layer(inputs)
    if num_reference == 0 or layer.disable_adapters or MOSAIC_ADAPTER not in layer.active_adapters:
        return projected
    lora_a, lora_b = layer.lora_A[MOSAIC_ADAPTER], layer.lora_B[MOSAIC_ADAPTER]
    refs = layer.lora_dropout[MOSAIC_ADAPTER](inputs[:, -num_reference:].to(lora_a.weight.dtype))
    delta = (lora_b(lora_a(refs)) * layer.scaling[MOSAIC_ADAPTER]).to(projected.dtype)
    return torch.cat((projected[:, :-num_reference], projected[:, -num_reference:] + delta), dim=1)


class MosaicAttnProcessor:
    """``FluxAttnProcessor`` with the reference branch's LoRA (eq. 6) and the reference->target attention tap. The
    LoRA weights live in the transformer (peft layers on the projections); ``block`` names the layer's block."""

    _attention_backend = None
    _parallel_config = None

    def __init__(self, block: str):
        self.block = block

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None,
                 mosaic: MosaicContext | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        n_ref = mosaic.num_reference if mosaic is not None else 0
        # References are the last tokens of the image stream (dual-stream) and of [text; image] (single-stream). The
        # projections are diffusers' _get_projections (unfused: a fused to_qkv would carry no LoRA) with the LoRA
        # restricted to them.
        query, key, value = (_on_references(layer, hidden_states, n_ref) for layer in (attn.to_q, attn.to_k, attn.to_v))
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            encoder_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            encoder_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            encoder_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
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
        projected = _on_references(attn.to_out[0], out, n_ref)
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


class MosaicAdapter(ConfigMixin):
    """Everything MOSAIC trains, stored as peft and diffusers store a LoRA: ``lora`` (a peft ``LoraConfig``, see
    :func:`reference_lora_config`) injected into the transformer by :meth:`attach` (diffusers' ``add_adapter``), whose
    :class:`MosaicAttnProcessor` s apply it to the reference tokens only. The adapter folder holds ``config.json``
    (this class: ``max_subjects``), peft's ``adapter_config.json`` (the ``LoraConfig``) and
    ``adapter_model.safetensors`` (``get_peft_model_state_dict``'s LoRA weights, peft's key names).

    ``weights`` (a peft state dict, from :meth:`from_pretrained`) are loaded into the transformer at :meth:`attach`;
    without them the LoRA is peft's fresh init (B = 0: the plain model)."""

    config_name = "config.json"
    ignore_for_config = ("lora", "weights")

    @register_to_config
    def __init__(self, max_subjects: int = 4, lora: LoraConfig | None = None,
                 weights: dict[str, torch.Tensor] | None = None):
        self.lora = lora if lora is not None else reference_lora_config(128)
        self.weights = weights
        self.transformer = None  # set by attach
        self.layers: list[LoraLayer] = []  # the transformer's layers that carry the LoRA, found once by attach

    @classmethod
    def fresh(cls, rank: int, max_subjects: int) -> MosaicAdapter:
        return cls(max_subjects=max_subjects, lora=reference_lora_config(rank))

    @property
    def rank(self) -> int:
        return self.lora.r

    def attach(self, transformer, dtype: torch.dtype | None = None) -> None:
        """Inject the LoRA into ``transformer`` (replacing a MOSAIC LoRA it holds), its weights in ``dtype`` (default:
        the transformer's), load ``weights`` if any, and install the processors on every attention layer. Freeze the
        transformer first: the LoRA weights become its parameters and are the only trainable ones."""
        if MOSAIC_ADAPTER in (getattr(transformer, "peft_config", None) or {}):
            transformer.delete_adapters(MOSAIC_ADAPTER)
        transformer.add_adapter(copy.deepcopy(self.lora), adapter_name=MOSAIC_ADAPTER)
        self.transformer = transformer
        # found once: parameters() runs every training step (gradient clipping), a walk over FLUX's modules need not
        self.layers = [m for m in transformer.modules() if isinstance(m, LoraLayer) and MOSAIC_ADAPTER in m.lora_A]
        if dtype is not None:
            for layer in self._lora_layers():
                layer.lora_A[MOSAIC_ADAPTER].to(dtype)
                layer.lora_B[MOSAIC_ADAPTER].to(dtype)
        if self.weights is not None:
            self.load_state_dict(self.weights)
            self.weights = None  # the transformer holds them now
        transformer.set_attn_processor({name: MosaicAttnProcessor(name.split(".attn.")[0])
                                        for name in transformer.attn_processors})

    def _lora_layers(self) -> list[LoraLayer]:
        if self.transformer is None:
            raise RuntimeError("the MOSAIC adapter is not attached to a transformer (MosaicAdapter.attach)")
        return self.layers

    def parameters(self) -> Iterator[nn.Parameter]:
        """The LoRA weights in the attached transformer: all that MOSAIC trains."""
        for layer in self._lora_layers():
            yield from layer.lora_A[MOSAIC_ADAPTER].parameters()
            yield from layer.lora_B[MOSAIC_ADAPTER].parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA weights as peft saves them (keys without the adapter name)."""
        self._lora_layers()  # attached
        return get_peft_model_state_dict(self.transformer, adapter_name=MOSAIC_ADAPTER)

    def load_state_dict(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy peft-format LoRA weights into the attached transformer (in place: an optimizer's references stay)."""
        ours = {key: tuple(value.shape) for key, value in self.state_dict().items()}
        theirs = {key: tuple(value.shape) for key, value in weights.items()}
        if ours != theirs:
            missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
            resized = sorted(k for k in ours.keys() & theirs.keys() if ours[k] != theirs[k])
            first = (missing + unexpected + resized)[0]
            raise IncompatibleModelError(
                f"the MOSAIC adapter does not fit this transformer: {len(missing)} LoRA weights missing, "
                f"{len(unexpected)} unexpected, {len(resized)} of other shapes (first: {first}"
                + (f" {theirs[first]} vs {ours[first]}" if first in resized else "") + ")")
        set_peft_model_state_dict(self.transformer, weights, adapter_name=MOSAIC_ADAPTER)

    def save_pretrained(self, out_dir: str | Path) -> None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        weights = {key: value.detach().cpu().contiguous() for key, value in self.state_dict().items()}
        self.save_config(out_dir)
        self.lora.save_pretrained(out_dir)
        save_file(weights, out_dir / SAFETENSORS_WEIGHTS_NAME, metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls, adapter_dir: str | Path) -> MosaicAdapter:
        """The adapter :meth:`save_pretrained` wrote (weights on the CPU until :meth:`attach`). A folder that is not
        a whole MOSAIC adapter is a :class:`~mpalign.zoo.ModelLoadError` naming what is wrong."""
        adapter_dir = Path(adapter_dir)
        if not (adapter_dir / cls.config_name).is_file():
            raise FileNotFoundError(f"'{adapter_dir}' holds no adapter (no config.json); train one with "
                                    "python -m mpalign.train --set model.method=mosaic")
        missing = [name for name in (PEFT_CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME) if not (adapter_dir / name).is_file()]
        if missing:
            raise ModelLoadError(f"'{adapter_dir}' holds a config.json but no {' or '.join(missing)} (the LoRA): copy "
                                 f"the whole folder training wrote")
        try:
            config = cls.load_config(adapter_dir)
        except Exception as exc:  # a user's folder: bad JSON is theirs to fix
            raise ModelLoadError(f"cannot read '{adapter_dir / cls.config_name}': {_reason(exc)}") from exc
        if config.get("_class_name") != cls.__name__:
            raise IncompatibleModelError(f"'{adapter_dir}' holds a {config.get('_class_name')}, not a MOSAIC adapter: "
                                         f"set model.method to the adapter's method")
        try:
            lora = LoraConfig.from_pretrained(str(adapter_dir))
            weights = load_file(adapter_dir / SAFETENSORS_WEIGHTS_NAME)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the MOSAIC LoRA in '{adapter_dir}' (damaged or incomplete?): "
                                 f"{_reason(exc)}") from exc
        return cls(max_subjects=config["max_subjects"], lora=lora, weights=weights)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


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
