"""MultiPersona-Align's dual DINOv2 alignment (paper section 3.3) and the two attention-map extras of the loss zoo.

- ``L_cross``: mean over tapped cross-attention layers and real subjects of 1 - cos(Pi_cross(the layer's output pooled
  over the subject's box, or the image branch alone as an ablation), DINOv2 CLS of the subject's reference crop).
- ``L_self``: mean over tapped self-attention layers of 1 - cos(Pi_self(self-attention output pooled over all
  cells), pooled DINOv2 patch tokens of the target image, or of the reference crops).
- ``L_attn`` (MS-Diffusion appendix G, eq. 7): (1 - attention mass inside the subject's box / total mass)^2.
- ``L_disentangle`` (MOSAIC eqs. 11-14 without point correspondences): minus the mean symmetric KL divergence between
  the subjects' attention maps normalised over the latent grid.

The paper prints eqs. 5-6 as 1 - |a||b| / <a, b>; we implement the cosine they describe, 1 - <a, b> / (|a||b|).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from mpalign.config import ConfigError, ModelConfig, TrainConfig
from mpalign.models.adapter import adapter_free_self_layers, unet_attention_layers
from mpalign.models.attention import BLOCK_KINDS, CROSS_FEATURES, block_kind, block_of

KL_EPS = 1e-8
# model.align_self_target -> the batch key of L_self's target (see MPAlignTrainingModule.self_target)
SELF_TARGETS = {"reference_image": "dino_ref_image_patch_pooled", "target": "dino_patch_pooled",
                "reference": "dino_ref_patch_pooled"}


def check_alignment_config(model_cfg: ModelConfig) -> None:
    """User mistakes in the alignment keys of the ``model`` section, found before any worker starts."""
    unknown = set(model_cfg.align_blocks) - set(BLOCK_KINDS)
    if unknown:
        raise ConfigError(f"model.align_blocks has unknown blocks {sorted(unknown)}; choose from {list(BLOCK_KINDS)}")
    if model_cfg.align_cross_feature not in CROSS_FEATURES:
        raise ConfigError(f"model.align_cross_feature must be one of {list(CROSS_FEATURES)}, "
                          f"got '{model_cfg.align_cross_feature}'")
    if model_cfg.align_self_target not in SELF_TARGETS:
        raise ConfigError(f"model.align_self_target must be one of {list(SELF_TARGETS)}, "
                          f"got '{model_cfg.align_self_target}'")


def alpha_at(step: int, train_cfg: TrainConfig) -> float:
    """The alignment weight at ``step``: 0 during the warm-up (diffusion loss only), then ``train_cfg.alpha``."""
    return 0.0 if step < train_cfg.warmup_steps else float(train_cfg.alpha)


def projector(in_dim: int, hidden_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Paper eq. 7: Linear -> LayerNorm -> Dropout -> GELU -> Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.LayerNorm(hidden_dim), nn.Dropout(dropout), nn.GELU(),
                         nn.Linear(hidden_dim, out_dim))


def _key(block: str) -> str:
    return block.replace(".", "_")  # ModuleDict keys cannot hold dots


class AlignmentProjectors(ModelMixin, ConfigMixin):
    """One cross and one self projector per tapped UNet block (``down_blocks.1``, ``mid_block``, ...): layers of a
    block share width and abstraction level, and one projector per layer would multiply the parameters by the
    ~10 transformer layers per SDXL block for no stated gain. ``cross_feature`` records which cross feature
    (``CROSS_FEATURES``) the cross projectors were trained on; folders written before it existed used the image
    branch, hence that default."""

    @register_to_config
    def __init__(self, cross_widths: dict[str, int], self_widths: dict[str, int], out_dim: int, hidden_dim: int = 2048,
                 dropout: float = 0.0, cross_feature: str = "image_branch"):
        super().__init__()
        self.cross = nn.ModuleDict({_key(b): projector(w, hidden_dim, out_dim, dropout) for b, w in cross_widths.items()})
        self.self_attn = nn.ModuleDict({_key(b): projector(w, hidden_dim, out_dim, dropout)
                                        for b, w in self_widths.items()})

    @classmethod
    def for_unet(cls, unet, blocks: list[str], out_dim: int, hidden_dim: int, dropout: float,
                 cross_feature: str = "hidden_state") -> AlignmentProjectors:
        unknown = set(blocks) - set(BLOCK_KINDS)
        if unknown:
            raise ValueError(f"model.align_blocks has unknown blocks {sorted(unknown)}; choose from {list(BLOCK_KINDS)}")
        if cross_feature not in CROSS_FEATURES:
            raise ValueError(f"model.align_cross_feature must be one of {list(CROSS_FEATURES)}, got '{cross_feature}'")
        cross, self_ = {}, {}
        untapped = adapter_free_self_layers(unet)
        for name, layer in unet_attention_layers(unet):
            block = block_of(name)
            if block_kind(block) not in blocks:
                continue
            if layer.is_cross_attention:
                # the block's hidden state and the layer's output (after to_out) have the layer's width; the
                # image branch the inner attention width
                cross[block] = (layer.to_k.out_features if cross_feature == "image_branch"
                                else layer.to_out[0].out_features)
            elif name not in untapped:
                self_[block] = layer.to_out[0].out_features
        return cls(cross_widths=cross, self_widths=self_, out_dim=out_dim, hidden_dim=hidden_dim, dropout=dropout,
                   cross_feature=cross_feature)

    def project_cross(self, block: str, features: torch.Tensor) -> torch.Tensor:
        module = self.cross[_key(block)]
        return module(features.to(module[0].weight.dtype))

    def project_self(self, block: str, features: torch.Tensor) -> torch.Tensor:
        module = self.self_attn[_key(block)]
        return module(features.to(module[0].weight.dtype))


def cosine_alignment(projected: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean of 1 - cos and of cos over the leading dims: projected/target (..., D), weight (...).
    Returns (loss, mean cosine); both 0 when nothing has weight."""
    cos = F.cosine_similarity(projected.float(), target.float().to(projected.device), dim=-1)
    weight = weight.to(cos)
    total = weight.sum().clamp(min=1.0)
    mean_cos = (cos * weight).sum() / total
    loss = ((1.0 - cos) * weight).sum() / total
    return loss, mean_cos


def cross_alignment_loss(recorded: list[tuple[str, torch.Tensor]], projectors: AlignmentProjectors,
                         dino_cls: torch.Tensor, subject_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``recorded``: (block, (B, S, C)) pooled image-branch outputs per tapped layer; dino_cls (B, S, D);
    subject_weight (B, S), 1 for the subjects that count."""
    projected = torch.stack([projectors.project_cross(block, pooled) for block, pooled in recorded])  # (L, B, S, D)
    weight = subject_weight[None].expand(projected.shape[:-1])
    return cosine_alignment(projected, dino_cls[None].expand_as(projected), weight)


def self_alignment_loss(recorded: list[tuple[str, torch.Tensor]], projectors: AlignmentProjectors,
                        target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``recorded``: (block, (B, C)) pooled self-attention outputs per tapped layer; target (B, D)."""
    projected = torch.stack([projectors.project_self(block, pooled) for block, pooled in recorded])  # (L, B, D)
    return cosine_alignment(projected, target[None].expand_as(projected), torch.ones(projected.shape[:-1]))


def attention_map_loss(maps: list[tuple[torch.Tensor, torch.Tensor]], located: torch.Tensor) -> torch.Tensor:
    """MS-Diffusion's image attention loss, averaged over tapped layers and subjects with a box.
    ``maps``: ((B, S, N) attention mass per subject, (B, S, N) bool box cells) per layer; located (B, S) bool."""
    losses = []
    for mass, regions in maps:
        inside = (mass * regions).sum(-1) / mass.sum(-1).clamp(min=KL_EPS)
        losses.append((1.0 - inside) ** 2)
    weight = located[None].to(losses[0])
    return (torch.stack(losses) * weight).sum() / weight.expand(len(losses), -1, -1).sum().clamp(min=1.0)


def disentanglement_loss(maps: list[tuple[torch.Tensor, torch.Tensor]], subject_mask: torch.Tensor) -> torch.Tensor:
    """Minus the mean symmetric KL between every ordered pair of real subjects' attention maps, each normalised to a
    distribution over the latent grid (minimising it pushes subjects to attend to different cells)."""
    pair = subject_mask[:, :, None] & subject_mask[:, None, :]
    pair = pair & ~torch.eye(subject_mask.shape[1], dtype=torch.bool, device=subject_mask.device)
    dists = []
    for mass, _ in maps:
        p = mass / mass.sum(-1, keepdim=True).clamp(min=KL_EPS)
        log_p = p.clamp(min=KL_EPS).log()
        # kl[b, i, j] = KL(p_i || p_j)
        kl = (p * log_p).sum(-1)[:, :, None] - torch.einsum("bin,bjn->bij", p, log_p)
        dists.append(0.5 * (kl + kl.transpose(1, 2)))
    weight = pair[None].to(dists[0])
    return -(torch.stack(dists) * weight).sum() / weight.expand(len(dists), -1, -1, -1).sum().clamp(min=1.0)
