"""One MOSAIC training step's math (``model.method: mosaic``): frozen FLUX + the reference-branch LoRA, and

    L = L_flow + alpha(step) * L_SCA + beta * L_MD        (MOSAIC eq. 15)

over a batch from :mod:`mpalign.data.mosaic_batch`. Same interface as ``MPAlignTrainingModule`` (the trainer, the
checkpoint code and validation call both alike); no Ray, no optimizer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mpalign import zoo
from mpalign.config import Config
from mpalign.models.alignment import alpha_at
from mpalign.models.mosaic import (
    MosaicAdapter,
    MosaicContext,
    correspondence_queries,
    flux_latents,
    loss_blocks,
    mdl_loss,
    mean_over_blocks,
    pack,
    run_transformer,
    scal_loss,
)
from mpalign.models.training_module import ADAPTER_SEED_OFFSET, seeded_init


@torch.no_grad()
def encode_prompt_ids(flux: zoo.FluxComponents, clip_ids: torch.Tensor,
                      t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """FLUX's conditioning as ``FluxPipeline.encode_prompt`` builds it: T5's last hidden states (B, L, D_t5) and
    CLIP's pooled output (B, D_clip)."""
    device = next(flux.text_encoder.parameters()).device
    pooled = flux.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
    text = flux.text_encoder_2(t5_ids.to(device), output_hidden_states=False)[0]
    return text, pooled


def fresh_mosaic_adapter(cfg: Config) -> MosaicAdapter:
    return MosaicAdapter.fresh(cfg.model.mosaic_lora_rank, cfg.model.max_subjects)


class MosaicTrainingModule(nn.Module):
    """Holds frozen FLUX (transformer, VAE, both text encoders) and the ``adapter`` whose LoRA, injected into the
    transformer, is all that trains; :meth:`forward` returns the loss terms of one step."""

    def __init__(self, cfg: Config, flux: zoo.FluxComponents, adapter: MosaicAdapter):
        super().__init__()
        self.cfg = cfg
        self.flux = flux
        self.frozen = nn.ModuleList([flux.transformer, flux.vae, flux.text_encoder, flux.text_encoder_2])
        self.frozen.requires_grad_(False)  # before attaching: the LoRA layers become transformer submodules
        # seeded: every worker and every rerun starts from the same LoRA (A random, B zero); trainable weights stay
        # float32 whatever the transformer's dtype
        seeded_init(cfg.model.seed + ADAPTER_SEED_OFFSET, lambda: adapter.attach(flux.transformer, torch.float32))
        self.adapter = adapter
        self.loss_blocks = frozenset(loss_blocks(flux.transformer, cfg.model.mosaic_loss_blocks))
        self.frozen.eval()

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device | None = None,
                    adapter_dir: str | Path | None = None) -> MosaicTrainingModule:
        device = zoo.resolve_device(str(device or cfg.model.device))
        flux = zoo.load_flux(cfg.model, device=device)
        return cls(cfg, flux, MosaicAdapter.from_pretrained(adapter_dir) if adapter_dir else fresh_mosaic_adapter(cfg))

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.adapter.parameters() if p.requires_grad]

    def train(self, mode: bool = True) -> MosaicTrainingModule:
        super().train(mode)
        self.frozen.eval()
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.flux.transformer.enable_gradient_checkpointing()

    def save_adapter(self, out_dir: str | Path) -> Path:
        out_dir = Path(out_dir)
        self.adapter.save_pretrained(out_dir)
        return out_dir

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Weights saved by :meth:`save_adapter`, copied into this module's LoRA (an IncompatibleModelError if they
        do not fit it)."""
        self.adapter.load_state_dict(MosaicAdapter.from_pretrained(adapter_dir).weights)

    @property
    def device(self) -> torch.device:
        return next(self.adapter.parameters()).device

    @torch.no_grad()
    def prepare_conditions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Packed target latents, packed reference latents (zeros for padded slots), text conditioning."""
        vae = self.flux.vae
        latents = flux_latents(vae, batch["pixel_values"])
        subject_mask = batch["subject_mask"].to(torch.bool)
        refs = batch["reference_pixels"]  # (B, S, 3, R, R) in [0, 1]
        b, s = subject_mask.shape
        ref_latents = flux_latents(vae, refs[subject_mask] * 2.0 - 1.0)
        padded = ref_latents.new_zeros(b, s, *ref_latents.shape[1:])
        padded[subject_mask.to(padded.device)] = ref_latents
        ref_tokens = pack(padded.flatten(0, 1))  # (B*S, n, C)
        text, pooled = encode_prompt_ids(self.flux, batch["input_ids"], batch["t5_input_ids"])
        device = self.device
        return {"target": pack(latents).to(device), "target_grid": latents.shape[-2:],
                "references": ref_tokens.reshape(b, s * ref_tokens.shape[1], -1).to(device),
                "reference_grid": ref_latents.shape[-2:], "tokens_per_reference": ref_tokens.shape[1],
                "reference_mask": subject_mask.to(device).repeat_interleave(ref_tokens.shape[1], dim=1),
                "text": text.to(device), "pooled": pooled.to(device)}

    def forward(self, batch: dict[str, torch.Tensor], step: int,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one step. ``generator`` (a CPU generator) fixes the noise and the flow-matching times."""
        cond = self.prepare_conditions(batch)
        train_cfg = self.cfg.train
        target = cond["target"]
        b = target.shape[0]
        # Flow matching (Esser et al. 2024, which the paper names): x_t = (1 - t) x_0 + t eps, predict eps - x_0,
        # t logit-normal
        t = torch.sigmoid(torch.randn(b, generator=generator)).to(self.device)
        noise = torch.randn(target.shape, generator=generator).to(self.device, target.dtype)
        noisy = (1.0 - t[:, None, None]) * target + t[:, None, None] * noise

        alpha = alpha_at(step, train_cfg)
        want_maps = alpha > 0 or train_cfg.beta > 0 or not self.training
        ctx = MosaicContext(0, 0, reference_mask=cond["reference_mask"])
        subject = point_mask = target_tokens = None
        if want_maps:
            index, subject, point_mask = correspondence_queries(
                batch["ref_tokens"].to(self.device), batch["point_mask"].to(self.device), cond["tokens_per_reference"])
            target_tokens = batch["target_tokens"].to(self.device).reshape(b, -1)
            ctx.query_index, ctx.record_blocks = index, self.loss_blocks
        transformer = self.flux.transformer
        dtype = transformer.dtype
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.cfg.model.mosaic_train_guidance, device=self.device, dtype=dtype)
        prediction = run_transformer(
            transformer, noisy.to(dtype), cond["references"].to(dtype), tuple(s // 2 for s in cond["target_grid"]),
            tuple(s // 2 for s in cond["reference_grid"]), cond["text"].to(dtype), cond["pooled"].to(dtype),
            t.to(dtype), guidance, ctx)
        out = {"diffusion": F.mse_loss(prediction.float(), (noise - target).float())}
        zero = out["diffusion"].new_zeros(())
        out["scal"] = out["mdl"] = zero
        if want_maps and ctx.records:
            attention = mean_over_blocks(ctx.records)
            num_subjects = batch["subject_mask"].shape[1]
            out["scal"] = scal_loss(attention, target_tokens, subject, point_mask, num_subjects)
            out["mdl"] = mdl_loss(attention, subject, point_mask, num_subjects)
        out["alpha"] = out["diffusion"].new_tensor(alpha)
        out["loss"] = out["diffusion"] + alpha * out["scal"] + train_cfg.beta * out["mdl"]
        return out

    @torch.no_grad()
    def validation_losses(self, batch: dict[str, torch.Tensor], step: int,
                          seed: int | None = None) -> dict[str, torch.Tensor]:
        """Deterministic loss terms (eval mode: SCAL and MDL always measured) from a generator seeded with ``seed``."""
        was_training = self.training
        self.eval()
        try:
            generator = torch.Generator().manual_seed(self.cfg.train.seed if seed is None else seed)
            return {k: v.detach() for k, v in self.forward(batch, step, generator=generator).items()}
        finally:
            self.train(was_training)
