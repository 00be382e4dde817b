"""One training step's math: frozen SDXL + encoders, the trainable adapter and projectors, and the loss

    L = L_diffusion + alpha(step) * (L_cross + lambda_self * L_self) [+ w_attn * L_attn + w_dis * L_disentangle]

over a batch in the ``mpalign.batch`` contract (cached encoder outputs used when present, raw inputs encoded here
otherwise). No Ray, no optimizer: the trainer owns those.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from PIL import Image
from torch import nn

from mpalign import encoders, zoo
from mpalign.config import Config
from mpalign.models.adapter import MSAdapter, place
from mpalign.models.alignment import (
    SELF_TARGETS,
    AlignmentProjectors,
    alpha_at,
    attention_map_loss,
    check_alignment_config,
    cross_alignment_loss,
    disentanglement_loss,
    self_alignment_loss,
)
from mpalign.models.attention import AlignmentRecorder

logger = logging.getLogger(__name__)

PROJECTORS_SUBFOLDER = "projectors"
# Offsets from model.seed for the trainable parts' initial weights, apart from the zoo's offsets (0-40).
ADAPTER_SEED_OFFSET = 100
PROJECTOR_SEED_OFFSET = 101
GROUNDING_DROP_UNITS = ("sample", "subject")


def seeded_init(seed: int, build):
    """Build modules under a forked, seeded RNG: every worker and every rerun starts from the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def tensor_to_pil(images: torch.Tensor, low: float = 0.0) -> list[Image.Image]:
    """(N, 3, H, W) in [low, 1] -> RGB images (what the encoders' processors take)."""
    unit = ((images.float() - low) / (1.0 - low)).clamp(0, 1)
    arrays = (unit.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    return [Image.fromarray(a) for a in arrays]


def diffusion_target(scheduler: DDPMScheduler, latents: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet predicts, per the scheduler's ``prediction_type``: the noise, or the velocity."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type '{kind}' is not supported (epsilon or v_prediction)")


def load_adapter_parts(adapter_dir: str | Path) -> tuple[MSAdapter, AlignmentProjectors | None]:
    adapter_dir = Path(adapter_dir)
    if not (adapter_dir / "config.json").is_file():
        raise FileNotFoundError(f"'{adapter_dir}' holds no adapter (no config.json); write one with save_adapter or "
                                "python -m mpalign.convert_msdiffusion")
    projector_dir = adapter_dir / PROJECTORS_SUBFOLDER
    parts = [(MSAdapter, adapter_dir)] + [(AlignmentProjectors, projector_dir)] * (projector_dir / "config.json").is_file()
    loaded = []
    for cls, folder in parts:
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            raise zoo.ModelLoadError(f"'{folder}' holds a config.json but no weights "
                                     f"(diffusion_pytorch_model.safetensors): copy the whole folder save_adapter wrote")
        try:
            loaded.append(cls.from_pretrained(folder))
        except Exception as exc:  # any failure to read a user's folder (bad JSON, truncated file) is theirs to fix
            raise zoo.ModelLoadError(f"cannot load the {cls.__name__} in '{folder}' (damaged or incomplete?): "
                                     f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    return loaded[0], loaded[1] if len(loaded) > 1 else None


# The frozen encoders by the batch keys they produce: training loads one only when the dataset lacks some of its
# keys (then it encodes the raw inputs in the step) or when the validation grid generates images (VAE, text and CLIP).
ENCODER_OUTPUTS = {
    "vae": ("latents",),
    "text_encoders": ("prompt_embeds", "pooled_prompt_embeds", "phrase_embeds"),
    "image_encoder": ("clip_hidden",),
    "dinov2": ("dino_cls", "dino_ref_patch_pooled", "dino_patch_pooled"),
}
GENERATION_ENCODERS = ("vae", "text_encoders", "image_encoder")


def encoders_to_load(cached_keys: Collection[str] | None, generation: bool = False) -> set[str]:
    """The ``ENCODER_OUTPUTS`` roles training needs: all of them when the cached keys are unknown (None)."""
    if cached_keys is None:
        return set(ENCODER_OUTPUTS)
    needed = {role for role, keys in ENCODER_OUTPUTS.items() if not set(keys) <= set(cached_keys)}
    return needed | (set(GENERATION_ENCODERS) if generation else set())


def frozen_dtype(cfg: Config) -> torch.dtype:
    """The frozen models' dtype: ``model.dtype``, except that fp16 weights become bf16 when training under bf16
    autocast (fp16 weights would be re-cast to bf16 at every matmul, a copy per layer per step)."""
    dtype = zoo.resolve_dtype(cfg.model.dtype)
    if dtype == torch.float16 and cfg.train.mixed_precision == "bf16":
        return torch.bfloat16
    return dtype


@torch.no_grad()
def null_conditions(sdxl: zoo.SDXLComponents, image_encoder: zoo.EncoderWithProcessor) -> dict[str, torch.Tensor]:
    """What dropped conditions look like, as in MS-Diffusion: the empty prompt's embeddings, and the CLIP features
    of an all-zero (normalised) image for a dropped reference."""
    empty_embeds, empty_pooled = encoders.encode_prompts(sdxl, [""])
    model = image_encoder.model
    size = model.config.image_size
    pixels = torch.zeros(1, 3, size, size, device=model.device, dtype=model.dtype)
    return {"empty_prompt_embeds": empty_embeds, "empty_pooled_prompt_embeds": empty_pooled,
            "null_clip_hidden": model(pixels, output_hidden_states=True).hidden_states[-2]}


class MPAlignTrainingModule(nn.Module):
    """Holds the frozen models (UNet; VAE, text encoders, CLIP image encoder and DINOv2 when given: None where the
    dataset caches their outputs) and the trainable ones (``adapter``, ``projectors``); :meth:`forward` returns the
    loss terms of one step. ``null`` are the :func:`null_conditions` (computed here when the encoders are given)."""

    def __init__(self, cfg: Config, sdxl: zoo.SDXLComponents, image_encoder: zoo.EncoderWithProcessor | None,
                 dinov2: zoo.EncoderWithProcessor | None, adapter: MSAdapter, projectors: AlignmentProjectors,
                 null: dict[str, torch.Tensor] | None = None):
        super().__init__()
        if cfg.model.grounding_drop_per not in GROUNDING_DROP_UNITS:
            raise ValueError(f"model.grounding_drop_per must be one of {list(GROUNDING_DROP_UNITS)}, got "
                             f"'{cfg.model.grounding_drop_per}'")
        self.cfg = cfg
        self.sdxl = sdxl
        self.image_encoder = image_encoder
        self.dinov2 = dinov2
        models = (sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2,
                  image_encoder.model if image_encoder else None, dinov2.model if dinov2 else None)
        self.frozen = nn.ModuleList([m for m in models if m is not None])
        # Freeze before attaching: the processors become UNet submodules and must stay trainable.
        self.frozen.requires_grad_(False)
        adapter.check_compatible(sdxl.unet, image_encoder.model.config.hidden_size if image_encoder else None,
                                 sdxl.text_encoder.config.hidden_size if sdxl.text_encoder else None)
        adapter.attach(sdxl.unet, scale=1.0)
        self.adapter = adapter
        self.projectors = projectors
        self.noise_scheduler = DDPMScheduler.from_config(sdxl.scheduler.config)
        self.frozen.eval()
        for name, value in (null or null_conditions(sdxl, image_encoder)).items():
            self.register_buffer(name, value.to(adapter.dummy_tokens.device), persistent=False)

    @classmethod
    def from_config(cls, cfg: Config, device: str | torch.device | None = None, adapter_dir: str | Path | None = None,
                    cached_keys: Collection[str] | None = None, generation: bool = False) -> MPAlignTrainingModule:
        """Load the zoo parts of ``cfg.model`` and an adapter from ``adapter_dir`` (a ``save_adapter`` folder or a
        converted official checkpoint), or a freshly initialised one; projectors too when the folder has none.

        ``cached_keys``: the batch keys the dataset caches (None: unknown, load every encoder); an encoder whose
        outputs are all cached is not kept (:func:`encoders_to_load`), unless ``generation`` (the validation grid)
        needs it. The text encoders and the CLIP image encoder are then loaded only for the moment it takes to
        compute the :func:`null_conditions`, and DINOv2 not at all."""
        check_alignment_config(cfg.model)
        device = zoo.resolve_device(str(device or cfg.model.device))
        dtype = frozen_dtype(cfg)
        needed = encoders_to_load(cached_keys, generation)
        sdxl = zoo.load_sdxl(cfg.model, dtype=dtype, device=device, vae="vae" in needed,
                             text_encoders="text_encoders" in needed)
        image_encoder = zoo.load_image_encoder(cfg.model, dtype, device) if "image_encoder" in needed else None
        dinov2 = zoo.load_dinov2(cfg.model, dtype, device) if "dinov2" in needed else None
        null = None
        if sdxl.text_encoder is None or image_encoder is None:  # loaded for this moment only, then dropped
            text = sdxl if sdxl.text_encoder is not None else zoo.load_sdxl_encoders(cfg.model, dtype, device, vae=False)
            null = null_conditions(text, image_encoder or zoo.load_image_encoder(cfg.model, dtype, device))
        widths = zoo.encoder_widths(cfg.model)
        projectors = None
        if adapter_dir:
            adapter, projectors = load_adapter_parts(adapter_dir)
            if projectors is not None and projectors.config.cross_feature != cfg.model.align_cross_feature:
                logger.warning("the projectors in '%s' were trained on the %s feature, this run aligns the %s: "
                               "starting with fresh projectors", adapter_dir, projectors.config.cross_feature,
                               cfg.model.align_cross_feature)
                projectors = None
        else:
            adapter = seeded_init(cfg.model.seed + ADAPTER_SEED_OFFSET, lambda: MSAdapter.for_unet(
                sdxl.unet, cfg.model, widths.image_embed, widths.phrase))
        adapter.check_compatible(sdxl.unet, widths.image_embed, widths.phrase)
        if projectors is None:
            projectors = seeded_init(cfg.model.seed + PROJECTOR_SEED_OFFSET, lambda: AlignmentProjectors.for_unet(
                sdxl.unet, cfg.model.align_blocks, widths.dinov2, cfg.model.projector_hidden_dim,
                cfg.model.projector_dropout, cfg.model.align_cross_feature))
        # Trainable weights stay float32 whatever the frozen models' dtype (autocast does mixed precision).
        return cls(cfg, sdxl, image_encoder, dinov2, place(adapter, device, torch.float32),
                   place(projectors, device, torch.float32), null)

    # ---------------------------------------------------------------------------------------------------------------
    # Parameters, persistence
    # ---------------------------------------------------------------------------------------------------------------

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in (*self.adapter.parameters(), *self.projectors.parameters()) if p.requires_grad]

    def train(self, mode: bool = True) -> MPAlignTrainingModule:
        super().train(mode)
        self.frozen.eval()  # frozen models never switch to training behaviour
        return self

    def enable_gradient_checkpointing(self) -> None:
        self.unet.enable_gradient_checkpointing()

    def save_adapter(self, out_dir: str | Path) -> Path:
        """Adapter at ``out_dir`` (what generation loads), projectors in ``out_dir/projectors`` (training only)."""
        out_dir = Path(out_dir)
        self.adapter.save_pretrained(out_dir)
        self.projectors.save_pretrained(out_dir / PROJECTORS_SUBFOLDER)
        return out_dir

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Load weights saved by :meth:`save_adapter` (or a converted checkpoint: then the projectors stay)."""
        adapter, projectors = load_adapter_parts(adapter_dir)
        if adapter.architecture() != self.adapter.architecture():
            raise zoo.IncompatibleModelError(f"the adapter in '{adapter_dir}' has other sizes than this model's: "
                             f"{adapter.architecture()} vs {self.adapter.architecture()}")
        self.adapter.load_state_dict(adapter.state_dict())
        if projectors is not None:
            if projectors.config.cross_feature != self.projectors.config.cross_feature:
                raise ValueError(f"the projectors in '{adapter_dir}' align the {projectors.config.cross_feature} "
                                 f"feature, this model the {self.projectors.config.cross_feature} "
                                 "(model.align_cross_feature)")
            self.projectors.load_state_dict(projectors.state_dict())

    # ---------------------------------------------------------------------------------------------------------------
    # Conditions
    # ---------------------------------------------------------------------------------------------------------------

    @property
    def unet(self) -> nn.Module:
        return self.sdxl.unet  # registered once, in ``frozen``: a second registration would double the state dict

    @property
    def device(self) -> torch.device:
        return self.adapter.dummy_tokens.device

    def _per_subject(self, values: torch.Tensor, subject_mask: torch.Tensor, encode) -> torch.Tensor:
        """Run ``encode`` on the real subjects of (B, S, ...) ``values`` only; padded ones get zeros."""
        real = encode(values[subject_mask])
        out = torch.zeros(*subject_mask.shape, *real.shape[1:], dtype=real.dtype, device=real.device)
        out[subject_mask.to(real.device)] = real
        return out

    @torch.no_grad()
    def prepare_conditions(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Every model input of the batch on the model's device: cached keys as they are, raw keys encoded."""
        loaded = {"vae": self.sdxl.vae, "text_encoders": self.sdxl.text_encoder, "image_encoder": self.image_encoder,
                  "dinov2": self.dinov2}
        for role, keys in ENCODER_OUTPUTS.items():
            missing = [k for k in keys if k not in batch]
            if missing and loaded[role] is None:
                raise ValueError(f"the batch has no {', '.join(missing)} and this module was built without the {role} "
                                 "(from_config was told the dataset caches them)")
        device = self.device
        subject_mask = batch["subject_mask"].to(torch.bool)
        sdxl = self.sdxl
        cond: dict[str, torch.Tensor] = {"subject_mask": subject_mask, "boxes": batch["boxes"],
                                         "time_ids": batch["time_ids"]}
        if "latents" in batch:
            cond["latents"] = batch["latents"]
            if "latents_std" in batch:
                cond["latents_std"] = batch["latents_std"]
        else:
            cond["latents"], cond["latents_std"] = encoders.vae_posterior(sdxl, batch["pixel_values"])
        if "prompt_embeds" in batch:
            cond["prompt_embeds"], cond["pooled_prompt_embeds"] = batch["prompt_embeds"], batch["pooled_prompt_embeds"]
        else:
            cond["prompt_embeds"], cond["pooled_prompt_embeds"] = encoders.encode_prompt_ids(
                sdxl, batch["input_ids"], batch["input_ids_2"])
        if "phrase_embeds" in batch:
            cond["phrase_embeds"] = batch["phrase_embeds"]
        else:
            text_encoder = sdxl.text_encoder
            cond["phrase_embeds"] = self._per_subject(batch["phrase_input_ids"], subject_mask,
                                                      lambda ids: text_encoder(ids.to(text_encoder.device)).pooler_output)
        references = None
        if "clip_hidden" in batch:
            cond["clip_hidden"] = batch["clip_hidden"]
        else:
            references = batch["reference_pixels"]
            cond["clip_hidden"] = self._per_subject(references, subject_mask, lambda px: encoders.clip_hidden_states(
                self.image_encoder, tensor_to_pil(px)))
        for key in ("dino_cls", "dino_ref_patch_pooled"):
            if key in batch:
                cond[key] = batch[key]
        if "dino_cls" not in cond or "dino_ref_patch_pooled" not in cond:
            references = batch["reference_pixels"] if references is None else references

            def cls_and_pooled(px: torch.Tensor) -> torch.Tensor:
                """One DINOv2 pass gives both targets: CLS and mean patch token, side by side."""
                cls, patches = encoders.dinov2_features(self.dinov2, tensor_to_pil(px))
                return torch.cat((cls, patches.mean(1)), dim=-1)

            cls_tokens, ref_pooled = self._per_subject(references, subject_mask, cls_and_pooled).chunk(2, dim=-1)
            cond.setdefault("dino_cls", cls_tokens)
            cond.setdefault("dino_ref_patch_pooled", ref_pooled)
        if "dino_ref_image_patch_pooled" in batch:
            cond["dino_ref_image_patch_pooled"] = batch["dino_ref_image_patch_pooled"]
        if "dino_patch_pooled" in batch:
            cond["dino_patch_pooled"] = batch["dino_patch_pooled"]
        else:
            cond["dino_patch_pooled"] = encoders.dinov2_features(
                self.dinov2, tensor_to_pil(batch["pixel_values"], low=-1.0))[1].mean(1)
        return {k: v.to(device) for k, v in cond.items()}

    def _apply_drops(self, cond: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """Classifier-free-guidance drops (text / image / both, per element) and grounding-token drops, in place on
        ``cond``; returns (B,) bool: the elements whose reference images were dropped."""
        train = self.cfg.train
        batch, num_subjects = cond["subject_mask"].shape
        draw = torch.rand(batch, generator=generator).to(self.device)
        text_end = train.drop_text_prob
        image_end = text_end + train.drop_image_prob
        both_end = image_end + train.drop_both_prob
        drop_text = (draw < text_end) | ((draw >= image_end) & (draw < both_end))
        drop_image = (draw >= text_end) & (draw < both_end)
        embeds, pooled = cond["prompt_embeds"], cond["pooled_prompt_embeds"]
        cond["prompt_embeds"] = torch.where(drop_text[:, None, None], self.empty_prompt_embeds.to(embeds), embeds)
        cond["pooled_prompt_embeds"] = torch.where(drop_text[:, None], self.empty_pooled_prompt_embeds.to(pooled), pooled)
        clip = cond["clip_hidden"]
        cond["clip_hidden"] = torch.where(drop_image[:, None, None, None], self.null_clip_hidden.to(clip), clip)
        cond["drop_grounding"] = self._grounding_drops(batch, num_subjects, generator)
        return drop_image

    def _grounding_drops(self, batch: int, num_subjects: int, generator: torch.Generator | None) -> torch.Tensor:
        """(B, S) bool: the subjects whose grounding tokens become the learnable queries this step, one draw per
        element (``model.grounding_drop_per: sample``, the release) or per subject (``subject``)."""
        model = self.cfg.model
        per_sample = model.grounding_drop_per == "sample"
        draw = torch.rand(batch, 1 if per_sample else num_subjects, generator=generator).expand(-1, num_subjects)
        return draw.to(self.device) < model.grounding_drop_prob

    # ---------------------------------------------------------------------------------------------------------------
    # The step
    # ---------------------------------------------------------------------------------------------------------------

    def forward(self, batch: dict[str, torch.Tensor], step: int,
                generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss terms of one step. ``generator`` (a CPU generator) fixes noise, timesteps and drops."""
        cond = self.prepare_conditions(batch)
        train_cfg = self.cfg.train
        latents = cond["latents"]
        batch_size = latents.shape[0]
        image_dropped = torch.zeros(batch_size, dtype=torch.bool, device=self.device)
        if self.training:
            image_dropped = self._apply_drops(cond, generator)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(self.device)
        timesteps = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator).to(self.device)
        if self.training:  # drawn after noise and timesteps: both settings of train.vae_latents share those
            latents = self._training_latents(cond, generator)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)

        alpha = alpha_at(step, train_cfg)
        want_features = alpha > 0 or not self.training
        want_maps = train_cfg.attn_loss_weight > 0 or train_cfg.disentangle_weight > 0
        recorder = None
        if want_features or want_maps:
            recorder = AlignmentRecorder(blocks=tuple(self.cfg.model.align_blocks), features=want_features,
                                         attention_maps=want_maps, cross_feature=self.cfg.model.align_cross_feature)

        subject_mask = cond["subject_mask"]
        prediction = self.denoise(cond, noisy, timesteps, recorder)
        target = diffusion_target(self.noise_scheduler, latents, noise, timesteps)
        out = {"diffusion": F.mse_loss(prediction.float(), target.float())}

        zero = out["diffusion"].new_zeros(())
        out.update(cross=zero, self=zero, cos_cross=zero, cos_self=zero)
        if want_features:
            # A subject whose reference was dropped cannot be asked to look like it.
            subject_weight = subject_mask & ~image_dropped[:, None]
            out["cross"], out["cos_cross"] = cross_alignment_loss(recorder.cross, self.projectors, cond["dino_cls"],
                                                                  subject_weight)
            out["self"], out["cos_self"] = self_alignment_loss(recorder.self_attn, self.projectors,
                                                               self._self_target(cond))
        out["align"] = out["cross"] + train_cfg.lambda_self * out["self"]
        out["alpha"] = out["diffusion"].new_tensor(alpha)
        loss = out["diffusion"] + alpha * out["align"]
        if train_cfg.attn_loss_weight > 0:
            located = subject_mask & (cond["boxes"].abs().sum(-1) > 0)
            out["attn"] = attention_map_loss(recorder.maps, located)
            loss = loss + train_cfg.attn_loss_weight * out["attn"]
        if train_cfg.disentangle_weight > 0:
            out["disentangle"] = disentanglement_loss(recorder.maps, subject_mask)
            loss = loss + train_cfg.disentangle_weight * out["disentangle"]
        out["loss"] = loss
        out["cos_cross"], out["cos_self"] = out["cos_cross"].detach(), out["cos_self"].detach()
        return out

    def _training_latents(self, cond: dict[str, torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """``train.vae_latents``: a fresh draw from the VAE posterior (the release's ``latent_dist.sample()``), or
        its mean. Evaluation always takes the mean."""
        mean = cond["latents"]
        if self.cfg.train.vae_latents == "mean":
            return mean
        if "latents_std" not in cond:
            raise ValueError("train.vae_latents=sample needs the posterior's std ('latents_std'), which this dataset "
                             "does not cache: rebuild it with this version of the builder, or set train.vae_latents=mean")
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype).to(mean.device)
        return mean + cond["latents_std"] * noise

    def denoise(self, cond: dict[str, torch.Tensor], noisy: torch.Tensor, timesteps: torch.Tensor,
                recorder: AlignmentRecorder | None = None) -> torch.Tensor:
        """The UNet's prediction for ``noisy`` latents at ``timesteps`` under the conditions of
        :meth:`prepare_conditions` (after any drops); ``recorder`` collects the alignment taps and is closed after."""
        tokens = self.adapter.image_tokens(cond["clip_hidden"], cond["phrase_embeds"], cond["boxes"],
                                           cond["subject_mask"], cond.get("drop_grounding"))
        prompt_embeds = cond["prompt_embeds"]
        unet_dtype = self.unet.dtype
        prediction = self.unet(
            noisy.to(unet_dtype), timesteps,
            encoder_hidden_states=torch.cat((prompt_embeds, tokens.to(prompt_embeds.dtype)), dim=1).to(unet_dtype),
            added_cond_kwargs={"text_embeds": cond["pooled_prompt_embeds"].to(unet_dtype),
                               "time_ids": cond["time_ids"].to(unet_dtype)},
            cross_attention_kwargs={"ms_boxes": cond["boxes"], "ms_subject_mask": cond["subject_mask"],
                                    "ms_recorder": recorder},
        ).sample
        if recorder is not None:
            recorder.close()
        return prediction

    def _self_target(self, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """L_self's target per ``model.align_self_target`` (checked by ``check_alignment_config``)."""
        choice = self.cfg.model.align_self_target
        key = SELF_TARGETS[choice]
        if key not in cond:
            raise ValueError(f"model.align_self_target={choice} needs '{key}' in the batch: rebuild the dataset with "
                             "this version of the builder, or choose another target")
        if choice == "reference":
            # pooled over all reference crops' patches: the mean of the per-crop means (equal patch counts)
            weight = cond["subject_mask"].to(cond[key].dtype)[..., None]
            return (cond[key] * weight).sum(1) / weight.sum(1).clamp(min=1.0)
        return cond[key]

    @torch.no_grad()
    def validation_losses(self, batch: dict[str, torch.Tensor], step: int, seed: int | None = None) -> dict[str, torch.Tensor]:
        """Deterministic loss terms (eval mode: no drops; alignment terms always measured): noise and timesteps come
        from a generator seeded with ``seed`` (default ``train.seed``), so two calls on one batch agree."""
        was_training = self.training
        self.eval()
        try:
            generator = torch.Generator().manual_seed(self.cfg.train.seed if seed is None else seed)
            return {k: v.detach() for k, v in self.forward(batch, step, generator=generator).items()}
        finally:
            self.train(was_training)
