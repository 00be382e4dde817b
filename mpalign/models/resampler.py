"""MS-Diffusion's grounding resampler: a perceiver resampler over CLIP image features whose queries come from the
subject's phrase embedding and a Fourier embedding of its box.

The module and parameter names follow the official release's ``image_proj`` state dict exactly (``proj_in``,
``layers.{i}.0`` attention, ``layers.{i}.1`` feed-forward ``Sequential``, ``attention_norm``, ``proj_out``,
``norm_out``, ``grounding_latents``, ``latent_proj``, ``latent_norm``), so its checkpoint loads with
``load_state_dict(strict=True)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

FOURIER_TEMPERATURE = 100.0


def fourier_box_embedding(boxes: torch.Tensor, num_freqs: int, temperature: float = FOURIER_TEMPERATURE) -> torch.Tensor:
    """(N, 4) boxes in [0, 1] -> (N, 8 * num_freqs) features, frequency k = temperature ** (k / num_freqs).

    Feature order is frequency-major, then sin before cos, then the 4 coordinates (index 8k + 4s + c): the order the
    official checkpoint's first ``latent_proj`` layer was trained on."""
    freqs = temperature ** (torch.arange(num_freqs, device=boxes.device, dtype=torch.float32) / num_freqs)
    angles = boxes.float()[:, None, :] * freqs[None, :, None]  # (N, F, 4)
    return torch.stack((angles.sin(), angles.cos()), dim=2).reshape(boxes.shape[0], -1).to(boxes.dtype)


class PerceiverAttention(nn.Module):
    """Latents attend to [image features; latents] (keys/values from both), no biases."""

    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, features: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        features = self.norm1(features)
        latents = self.norm2(latents)
        batch, num_latents, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat((features, latents), dim=1)).chunk(2, dim=-1)
        q, k, v = (t.view(batch, t.shape[1], self.heads, -1).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(out.transpose(1, 2).reshape(batch, num_latents, -1))


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim * mult, bias=False), nn.GELU(),
                         nn.Linear(dim * mult, dim, bias=False))


class GroundingResampler(nn.Module):
    """Per subject: CLIP penultimate hidden states (T, embedding_dim) + phrase embedding + box -> ``num_queries``
    tokens of ``output_dim``. Subjects are independent rows of the batch; nothing mixes them."""

    def __init__(self, dim: int, depth: int, dim_head: int, heads: int, num_queries: int, embedding_dim: int,
                 output_dim: int, ff_mult: int, phrase_dim: int, fourier_freqs: int):
        super().__init__()
        self.dim = dim
        self.num_queries = num_queries
        self.fourier_freqs = fourier_freqs
        grounding_dim = phrase_dim + 8 * fourier_freqs
        # Learnable queries that stand in for the grounding tokens when those are dropped (training) or not wanted.
        self.grounding_latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.latent_proj = nn.Sequential(nn.Linear(grounding_dim, grounding_dim * 2), nn.GELU(),
                                         nn.Linear(grounding_dim * 2, dim * num_queries))
        self.latent_norm = nn.LayerNorm(dim)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, dim_head, heads), feed_forward(dim, ff_mult)]) for _ in range(depth)
        )
        self.attention_norm = nn.LayerNorm(dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)

    def grounding_queries(self, phrase_embeds: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """(N, phrase_dim), (N, 4) -> (N, num_queries, dim)."""
        grounding = torch.cat((phrase_embeds, fourier_box_embedding(boxes, self.fourier_freqs)), dim=-1)
        return self.latent_norm(self.latent_proj(grounding).view(-1, self.num_queries, self.dim))

    def forward(self, image_embeds: torch.Tensor, phrase_embeds: torch.Tensor, boxes: torch.Tensor,
                drop_grounding: torch.Tensor | None = None) -> torch.Tensor:
        """image_embeds (N, T, embedding_dim), phrase_embeds (N, phrase_dim), boxes (N, 4), drop_grounding (N,) bool
        -> (N, num_queries, output_dim)."""
        latents = self.grounding_queries(phrase_embeds.to(image_embeds.dtype), boxes.to(image_embeds.dtype))
        if drop_grounding is not None:
            learnable = self.grounding_latents.to(latents.dtype).expand_as(latents)
            latents = torch.where(drop_grounding.view(-1, 1, 1), learnable, latents)
        features = self.proj_in(image_embeds)
        for attention, ff in self.layers:
            latents = attention(features, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(self.attention_norm(latents)))
