"""The MS-Diffusion adapter: grounding resampler + learnable dummy background tokens + one ``to_k_ip``/``to_v_ip`` pair
per UNet cross-attention layer. A diffusers ``ModelMixin``: JSON config + safetensors through
``save_pretrained``/``from_pretrained``; :meth:`MSAdapter.attach` installs its processors into a UNet.
"""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from mpalign.config import ModelConfig
from mpalign.models.attention import MultiSubjectAttnProcessor, SelfAttnTapProcessor, TextOnlyAttnProcessor, block_of
from mpalign.models.resampler import GroundingResampler
from mpalign.zoo import IncompatibleModelError


def place(module: nn.Module, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> nn.Module:
    """Move/cast with ``nn.Module.to``: diffusers' ``ModelMixin.to`` warns about float32 modules on every dtype cast
    (0.42, even for models that have none)."""
    return nn.Module.to(module, device=device, dtype=dtype)


def unet_attention_layers(unet) -> list[tuple[str, nn.Module]]:
    """(processor name, Attention module) for every attention layer, in ``unet.attn_processors`` order (the order
    the official checkpoint's ``ms_adapter`` list follows)."""
    return [(name, unet.get_submodule(name[: -len(".processor")])) for name in unet.attn_processors]


def cross_attention_layers(unet) -> list[tuple[str, nn.Module]]:
    return [(name, layer) for name, layer in unet_attention_layers(unet) if layer.is_cross_attention]


def adapter_free_self_layers(unet) -> set[str]:
    """Processor names of the self-attention layers that run before any cross-attention layer (the first attn1 of
    SDXL's first attention block): no adapter weight reaches their output, so an L_self tap there would train only
    its projector (measured: exactly zero gradient to the adapter), and they are not tapped. ``attn_processors``
    lists the down blocks first, in execution order, so these are the self layers listed before the first cross."""
    names = set()
    for name, layer in unet_attention_layers(unet):
        if layer.is_cross_attention:
            break
        names.add(name)
    return names


class MSAdapter(ModelMixin, ConfigMixin):
    """Everything MS-Diffusion trains. ``ip_layer_widths`` lists the key/value width of each cross-attention layer
    of the UNet it belongs to, in processor order; :meth:`attach` checks a UNet against it."""

    @register_to_config
    def __init__(self, ip_layer_widths: list[int], cross_attention_dim: int, image_embed_dim: int, phrase_dim: int,
                 max_subjects: int = 4, num_tokens: int = 16, num_dummy_tokens: int = 4, resampler_dim: int = 1280,
                 resampler_depth: int = 4, resampler_heads: int = 20, resampler_dim_head: int = 64,
                 resampler_ff_mult: int = 4, fourier_freqs: int = 8):
        super().__init__()
        self.resampler = GroundingResampler(
            dim=resampler_dim, depth=resampler_depth, dim_head=resampler_dim_head, heads=resampler_heads,
            num_queries=num_tokens, embedding_dim=image_embed_dim, output_dim=cross_attention_dim,
            ff_mult=resampler_ff_mult, phrase_dim=phrase_dim, fourier_freqs=fourier_freqs,
        )
        self.dummy_tokens = nn.Parameter(torch.randn(1, num_dummy_tokens, cross_attention_dim))
        self.ip_layers = nn.ModuleList(
            MultiSubjectAttnProcessor(width, cross_attention_dim, num_tokens, num_dummy_tokens, max_subjects)
            for width in ip_layer_widths
        )

    @classmethod
    def for_unet(cls, unet, model_cfg: ModelConfig, image_embed_dim: int, phrase_dim: int) -> MSAdapter:
        """A fresh adapter sized by ``model_cfg`` for ``unet``; each ``to_k_ip``/``to_v_ip`` starts as a copy of its
        layer's text ``to_k``/``to_v`` (so the image branch starts in the text branch's key/value space)."""
        layers = cross_attention_layers(unet)
        adapter = cls(
            ip_layer_widths=[layer.to_k.out_features for _, layer in layers],
            cross_attention_dim=unet.config.cross_attention_dim, image_embed_dim=image_embed_dim,
            phrase_dim=phrase_dim, max_subjects=model_cfg.max_subjects, num_tokens=model_cfg.num_tokens,
            num_dummy_tokens=model_cfg.num_dummy_tokens, resampler_dim=model_cfg.resampler_dim,
            resampler_depth=model_cfg.resampler_depth, resampler_heads=model_cfg.resampler_heads,
            resampler_dim_head=model_cfg.resampler_dim_head, resampler_ff_mult=model_cfg.resampler_ff_mult,
            fourier_freqs=model_cfg.fourier_freqs,
        )
        with torch.no_grad():
            for processor, (_, layer) in zip(adapter.ip_layers, layers):
                processor.to_k_ip.weight.copy_(layer.to_k.weight)
                processor.to_v_ip.weight.copy_(layer.to_v.weight)
        return adapter

    def architecture(self) -> dict:
        """The config's size fields (without diffusers' bookkeeping such as ``_name_or_path``)."""
        return {k: v for k, v in self.config.items() if not k.startswith("_")}

    @property
    def num_image_tokens(self) -> int:
        return self.config.num_dummy_tokens + self.config.max_subjects * self.config.num_tokens

    def check_compatible(self, unet, image_embed_dim: int | None = None, phrase_dim: int | None = None) -> None:
        """Raise ValueError (one line, naming the mismatch) when this adapter was not made for these models."""
        widths = [layer.to_k.out_features for _, layer in cross_attention_layers(unet)]
        problems = []
        if list(self.config.ip_layer_widths) != widths:
            problems.append(f"{len(self.config.ip_layer_widths)} cross-attention layers of widths "
                            f"{sorted(set(self.config.ip_layer_widths))} vs the UNet's {len(widths)} of {sorted(set(widths))}")
        if self.config.cross_attention_dim != unet.config.cross_attention_dim:
            problems.append(f"token width {self.config.cross_attention_dim} vs the UNet's cross_attention_dim "
                            f"{unet.config.cross_attention_dim}")
        if image_embed_dim is not None and self.config.image_embed_dim != image_embed_dim:
            problems.append(f"image feature width {self.config.image_embed_dim} vs the image encoder's {image_embed_dim}")
        if phrase_dim is not None and self.config.phrase_dim != phrase_dim:
            problems.append(f"phrase width {self.config.phrase_dim} vs the text encoder's {phrase_dim}")
        if problems:
            raise IncompatibleModelError("the adapter does not fit these models: " + "; ".join(problems))

    def attach(self, unet, scale: float = 1.0) -> None:
        """Install the multi-subject processors on ``unet``'s cross-attention layers and the tapping self-attention
        processors on the others. Freeze the UNet first: the processors become its submodules."""
        self.check_compatible(unet)
        processors = {}
        cross = iter(self.ip_layers)
        untapped = adapter_free_self_layers(unet)
        for name, layer in unet_attention_layers(unet):
            if layer.is_cross_attention:
                processor = next(cross)
                processor.block = block_of(name)
                processors[name] = processor
                self._hook_block_state(unet, name, processor)
            else:
                processors[name] = SelfAttnTapProcessor(block_of(name), tapped=name not in untapped)
        unet.set_attn_processor(processors)
        self.set_scale(scale)

    def attach_text_only(self, model) -> None:
        """Give the cross-attention layers of a model that runs beside the adapted UNet on the same encoder hidden
        states (a ControlNet) processors that attend to the text tokens only: the image tokens are for the UNet's
        masked image branch, and a plain processor would let every cell of the ControlNet attend to them."""
        current = model.attn_processors
        model.set_attn_processor({
            name: TextOnlyAttnProcessor(self.num_image_tokens) if layer.is_cross_attention else current[name]
            for name, layer in unet_attention_layers(model)
        })

    @staticmethod
    def _hook_block_state(unet, processor_name: str, processor: MultiSubjectAttnProcessor) -> None:
        """Feed the input of the transformer block's ``norm3`` (its hidden state right after attn2) to the
        processor's hidden-state tap; a block without ``norm3`` gets no hook (that tap then raises)."""
        if processor.state_hook is not None:
            processor.state_hook.remove()
            processor.state_hook = None
        suffix = ".attn2.processor"
        if not processor_name.endswith(suffix):
            return
        norm3 = getattr(unet.get_submodule(processor_name[: -len(suffix)]), "norm3", None)
        if norm3 is not None:
            processor.state_hook = norm3.register_forward_pre_hook(
                lambda _module, args: processor.record_block_state(args[0]))

    def set_scale(self, scale: float) -> None:
        for processor in self.ip_layers:
            processor.scale = scale

    def set_explicit_attention(self, explicit: bool) -> None:
        """Route every layer through the explicit (probability-materialising) path; for tests and inspection."""
        for processor in self.ip_layers:
            processor.explicit = explicit

    def image_tokens(self, clip_hidden: torch.Tensor, phrase_embeds: torch.Tensor, boxes: torch.Tensor,
                     subject_mask: torch.Tensor, drop_grounding: torch.Tensor | None = None) -> torch.Tensor:
        """The image part of the UNet's encoder hidden states: [dummy tokens; S x num_tokens subject tokens].

        clip_hidden (B, S, T, image_embed_dim), phrase_embeds (B, S, phrase_dim), boxes (B, S, 4), subject_mask
        (B, S) bool, drop_grounding (B, S) bool (learnable queries instead of grounding tokens) -> (B, D + S*K, C).
        Only real subjects go through the resampler; padded ones get zero tokens, which the masks never show."""
        batch, num_subjects = subject_mask.shape
        if num_subjects > self.config.max_subjects:
            raise ValueError(f"{num_subjects} subjects, the adapter supports at most {self.config.max_subjects}")
        device, dtype = self.dummy_tokens.device, self.dummy_tokens.dtype
        live = subject_mask.to(device, torch.bool)
        real = torch.zeros(batch, self.config.max_subjects, dtype=torch.bool, device=device)
        real[:, :num_subjects] = live
        shape = (batch, self.config.max_subjects, self.config.num_tokens, self.config.cross_attention_dim)
        if live.any():
            resampled = self.resampler(
                clip_hidden.to(device, dtype)[live], phrase_embeds.to(device, dtype)[live], boxes.to(device, dtype)[live],
                None if drop_grounding is None else drop_grounding.to(device)[live],
            )
            tokens = resampled.new_zeros(shape)  # the resampler's dtype: autocast may have lowered it
            tokens[real] = resampled
        else:
            tokens = torch.zeros(shape, dtype=dtype, device=device)
        return torch.cat((self.dummy_tokens.to(tokens.dtype).expand(batch, -1, -1), tokens.flatten(1, 2)), dim=1)
