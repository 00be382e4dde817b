"""GPU memory of one training worker, estimated from the config before anything is loaded.

    estimate = frozen weights + trainable weights, gradients and optimizer states + activations (+ validation grid)

Parameter counts come from the models' configs: each model is built on PyTorch's ``meta`` device (no storage, no
download of weights), from its config file when the hub cache or a local folder has it, else from the published
config of the default checkpoint (SDXL base 1.0, IP-Adapter's ViT-bigG/14, DINOv2-base) written out below.

Activations are calibrated on one measurement: the frozen SDXL UNet, forward + backward (gradients w.r.t. its input,
``benchmarks/bench_train_step.py`` case a), bf16, 1024 px, batch 8, peaks at 43.7 GiB on an H200. Minus the UNet's
bf16 weights (4.8 GiB) that is 4.86 GiB of activations per 1024-px sample. Assumptions, each a factor below:

- activations grow linearly with the micro-batch (``train.batch_size``) and with the latent pixels
  ((``data.image_size`` / 1024)^2: SDPA's memory-efficient kernels keep attention linear in tokens), and in proportion
  to the UNet's parameter count for UNets other than SDXL's (crude; exact for SDXL);
- the adapter's image branch, box masks and the alignment taps add ``ADAPTER_ACTIVATION_FACTOR`` (15 %: one more
  key/value projection and attention output per cross-attention layer, of the ~30 hidden-size tensors a transformer
  block keeps for backward; not yet measured on a GPU);
- gradient checkpointing keeps ``CHECKPOINTING_ACTIVATION_FACTOR`` (25 %: the stored block inputs, ~0.2 GB per
  sample, plus the recompute of the largest block, the 10-layer 32x32 transformer, ~0.8 GB per sample);
- mixed precision other than bf16/fp16 (``train.mixed_precision: no``) doubles activations;
- trainable weights, their gradients and AdamW's two moments are float32 (16 bytes per parameter), EMA adds 4, DDP's
  gradient buckets 4 more with several workers; DeepSpeed ZeRO-2 shards gradients and moments over the workers;
- frozen weights in ``model.dtype``: the UNet, plus the VAE, text encoders and CLIP image encoder only when the
  dataset does not cache their outputs (DINOv2's are always cached, so it is never loaded);
- the validation grid (``train.val_every`` and ``train.val_num_images`` > 0) generates with the training module's own
  models, so it adds no second pipeline, only the VAE, text encoders and CLIP image encoder it needs loaded;
- usable memory is the device's total minus ``CUDA_RESERVE_GIB`` (CUDA context, cuBLAS workspace, allocator slack),
  times ``train.gpus_per_worker`` when a worker gets a fraction of a GPU (the others on it use the rest).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
from dataclasses import dataclass
from typing import Any

import torch

from mpalign.config import Config, ConfigError
from mpalign.zoo import resolve_dtype

GIB = 2**30
REFERENCE_PEAK_GIB = 43.7  # frozen SDXL UNet fwd+bwd, bf16, 1024 px, batch 8, H200 (bench_train_step.py case a)
REFERENCE_BATCH, REFERENCE_SIDE = 8, 1024
ADAPTER_ACTIVATION_FACTOR = 1.15
CHECKPOINTING_ACTIVATION_FACTOR = 0.25
CUDA_RESERVE_GIB = 1.0

# SDXL base 1.0's UNet (stabilityai/stable-diffusion-xl-base-1.0, unet/config.json)
SDXL_UNET = {
    "sample_size": 128, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280), "layers_per_block": 2, "transformer_layers_per_block": (1, 2, 10),
    "attention_head_dim": (5, 10, 20), "cross_attention_dim": 2048, "norm_num_groups": 32, "act_fn": "silu",
    "use_linear_projection": True, "upcast_attention": False, "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256, "projection_class_embeddings_input_dim": 2816,
}
SDXL_VAE = {"in_channels": 3, "out_channels": 3, "latent_channels": 4, "block_out_channels": (128, 256, 512, 512),
            "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
            "layers_per_block": 2, "sample_size": 1024}
SDXL_TEXT_ENCODERS = (
    {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
     "num_attention_heads": 12, "max_position_embeddings": 77, "projection_dim": 768},
    {"vocab_size": 49408, "hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
     "num_attention_heads": 20, "max_position_embeddings": 77, "projection_dim": 1280},
)
CLIP_VISION = {  # h94/IP-Adapter: ViT-bigG/14 (sdxl_models/image_encoder) and ViT-H/14 (models/image_encoder)
    "sdxl_models/image_encoder": {"hidden_size": 1664, "intermediate_size": 8192, "num_hidden_layers": 48,
                                  "num_attention_heads": 16, "image_size": 224, "patch_size": 14,
                                  "projection_dim": 1280},
    "models/image_encoder": {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32,
                             "num_attention_heads": 16, "image_size": 224, "patch_size": 14, "projection_dim": 1024},
}
DINOV2_BASE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "image_size": 518,
               "patch_size": 14}


@dataclass
class ModelSizes:
    """Parameter counts of what a training worker holds."""

    unet: int
    frozen_encoders: int  # VAE, both text encoders, CLIP image encoder, DINOv2
    pipeline_encoders: int  # of those, what the validation pipeline loads again (all but DINOv2)
    trainable: int  # adapter + alignment projectors


@dataclass
class MemoryEstimate:
    frozen_weights_gib: float
    trainable_states_gib: float  # weights, gradients, optimizer moments, EMA, DDP buckets
    activations_gib: float
    validation_gib: float

    @property
    def total_gib(self) -> float:
        return self.frozen_weights_gib + self.trainable_states_gib + self.activations_gib + self.validation_gib

    def describe(self) -> str:
        return (f"{self.total_gib:.1f} GiB per worker = frozen weights {self.frozen_weights_gib:.1f} + trainable "
                f"weights/grads/optimizer {self.trainable_states_gib:.1f} + activations {self.activations_gib:.1f} + "
                f"validation grid {self.validation_gib:.1f}")


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _config(load, default: dict[str, Any] | None, what: str) -> Any:
    """The model's own config when the hub cache / a local folder has it, else the default checkpoint's."""
    try:
        return load()
    except (OSError, ValueError):
        if default is None:
            raise ConfigError(f"cannot read the config of the {what} to estimate GPU memory (no local copy, "
                              f"HF_HUB_OFFLINE or no network): download it, or set train.check_gpu_memory=false"
                              ) from None
        return default


_SIZES: dict[str, ModelSizes] = {}  # by model section: building full-size SDXL on the meta device takes seconds


def model_sizes(cfg: Config) -> ModelSizes:
    """Parameter counts from the configs of ``cfg.model``, with every model built on the meta device."""
    key = json.dumps(dataclasses.asdict(cfg.model), sort_keys=True)
    if key not in _SIZES:
        _SIZES[key] = _model_sizes(cfg)
    return _SIZES[key]


def _model_sizes(cfg: Config) -> ModelSizes:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        Dinov2Config,
        Dinov2Model,
    )

    from mpalign.models.adapter import MSAdapter
    from mpalign.models.alignment import AlignmentProjectors

    model = cfg.model
    if model.preset == "tiny":  # small real models: nothing to download, nothing worth estimating on meta
        from mpalign import zoo

        sdxl = zoo.load_sdxl(model, device="cpu")
        clip, dinov2 = zoo.load_image_encoder(model, device="cpu"), zoo.load_dinov2(model, device="cpu")
        unet, vae, text, text_2 = sdxl.unet, sdxl.vae, sdxl.text_encoder, sdxl.text_encoder_2
        clip_model, dinov2_model = clip.model, dinov2.model
        build = contextlib.nullcontext()
    else:
        local = {"local_files_only": _offline()}
        unet_cfg = _config(lambda: UNet2DConditionModel.load_config(model.sdxl, subfolder="unet", **local),
                           SDXL_UNET, "SDXL UNet")
        vae_cfg = _config(lambda: AutoencoderKL.load_config(model.vae, **local) if model.vae
                          else AutoencoderKL.load_config(model.sdxl, subfolder="vae", **local), SDXL_VAE, "VAE")
        text_cfgs = [_config(lambda sub=sub: CLIPTextConfig.from_pretrained(model.sdxl, subfolder=sub, **local),
                             CLIPTextConfig(**default), f"SDXL {sub}")
                     for sub, default in zip(("text_encoder", "text_encoder_2"), SDXL_TEXT_ENCODERS)]
        sub = {"subfolder": model.image_encoder_subfolder} if model.image_encoder_subfolder else {}
        default_clip = CLIP_VISION.get(model.image_encoder_subfolder)
        clip_cfg = _config(lambda: CLIPVisionConfig.from_pretrained(model.image_encoder, **sub, **local),
                           CLIPVisionConfig(**default_clip) if default_clip else None, "CLIP image encoder")
        dinov2_cfg = _config(lambda: Dinov2Config.from_pretrained(model.dinov2, **local), Dinov2Config(**DINOV2_BASE),
                             "DINOv2 model")
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_cfg)
            vae = AutoencoderKL.from_config(vae_cfg)
            text, text_2 = CLIPTextModel(text_cfgs[0]), CLIPTextModelWithProjection(text_cfgs[1])
            clip_model, dinov2_model = CLIPVisionModelWithProjection(clip_cfg), Dinov2Model(dinov2_cfg)
        build = torch.device("meta")
    with build:
        adapter = MSAdapter.for_unet(unet, model, clip_model.config.hidden_size, text.config.hidden_size)
        projectors = AlignmentProjectors.for_unet(unet, model.align_blocks, dinov2_model.config.hidden_size,
                                                  model.projector_hidden_dim, model.projector_dropout)
    pipeline_encoders = _count(vae) + _count(text) + _count(text_2) + _count(clip_model)
    return ModelSizes(unet=_count(unet), frozen_encoders=pipeline_encoders + _count(dinov2_model),
                      pipeline_encoders=pipeline_encoders,
                      trainable=sum(p.numel() for p in (*adapter.parameters(), *projectors.parameters())
                                    if p.requires_grad))


@functools.cache
def sdxl_unet_parameters() -> int:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return _count(UNet2DConditionModel.from_config(SDXL_UNET))


def activation_gib_per_sample(sdxl_unet_params: int) -> float:
    """Activations of the frozen SDXL UNet's forward + backward per 1024-px sample in bf16 (the calibration)."""
    return (REFERENCE_PEAK_GIB - sdxl_unet_params * 2 / GIB) / REFERENCE_BATCH


def estimate_memory(cfg: Config, sizes: ModelSizes | None = None, sdxl_unet_params: int | None = None,
                    ) -> MemoryEstimate:
    """Peak GPU memory of one training worker (rank 0: the one that also validates) under ``cfg``."""
    sizes = sizes or model_sizes(cfg)
    sdxl_unet_params = sdxl_unet_params or sdxl_unet_parameters()
    train = cfg.train
    weight_bytes = resolve_dtype(cfg.model.dtype).itemsize
    data = cfg.data
    encoders_loaded = not (data.cache_vae and data.cache_text and data.cache_clip)
    frozen = (sizes.unet + (sizes.pipeline_encoders if encoders_loaded else 0)) * weight_bytes

    per_param = 4 + 4 + 8  # float32 weights, gradients, AdamW's two moments
    sharded = 12 if train.strategy == "deepspeed" else 0  # ZeRO-2 shards gradients and moments
    per_param -= sharded - sharded / train.num_workers
    per_param += 4 if train.ema_decay > 0 else 0
    per_param += 4 if train.strategy == "ddp" and train.num_workers > 1 else 0  # DDP's gradient buckets
    trainable = sizes.trainable * per_param

    per_sample = activation_gib_per_sample(sdxl_unet_params) * GIB * sizes.unet / sdxl_unet_params
    activations = per_sample * train.batch_size * (cfg.data.image_size / REFERENCE_SIDE) ** 2
    activations *= ADAPTER_ACTIVATION_FACTOR
    if train.gradient_checkpointing:
        activations *= CHECKPOINTING_ACTIVATION_FACTOR
    if train.mixed_precision == "no":
        activations *= 2

    validation = 0.0
    if train.val_every > 0 and train.val_num_images > 0 and not encoders_loaded:
        validation = sizes.pipeline_encoders * weight_bytes
    return MemoryEstimate(frozen / GIB, trainable / GIB, activations / GIB, validation / GIB)


def usable_gpu_gib(cfg: Config) -> tuple[float, str] | None:
    """(GiB one worker may use, where the figure comes from), or None when no GPU is known: ``train.gpu_memory_gb``
    (decimal GB, as GPUs are sold: 48 for an L40S) when set, else the first CUDA device this process sees."""
    train = cfg.train
    if train.gpu_memory_gb > 0:
        total, source = train.gpu_memory_gb * 1e9 / GIB, f"train.gpu_memory_gb={train.gpu_memory_gb:g}"
    elif torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        total, source = props.total_memory / GIB, props.name
    else:
        return None
    share = min(train.gpus_per_worker, 1.0)
    usable = (total - CUDA_RESERVE_GIB) * share
    note = f" x {share:g} GPU per worker" if share < 1 else ""
    return usable, f"{source}: {total:.1f} GiB - {CUDA_RESERVE_GIB:g} GiB reserve{note}"


def check_gpu_memory(cfg: Config, log=print) -> MemoryEstimate | None:
    """Print the estimate; raise ``ConfigError`` when it exceeds the usable memory of the GPU this process sees (or
    ``train.gpu_memory_gb``). Nothing for CPU training unless ``train.gpu_memory_gb`` asks for a target GPU."""
    train = cfg.train
    if not train.check_gpu_memory or not (train.use_gpu or train.gpu_memory_gb > 0):
        return None
    estimate = estimate_memory(cfg)
    log(f"estimated GPU memory: {estimate.describe()}")
    usable = usable_gpu_gib(cfg)
    if usable is None:
        log("no GPU visible here to check it against: set train.gpu_memory_gb to check for the workers' GPUs")
        return estimate
    gib, source = usable
    if estimate.total_gib > gib:
        raise ConfigError(
            f"this config needs about {estimate.total_gib:.1f} GiB per worker ({estimate.describe()}) but "
            f"{gib:.1f} GiB is usable ({source}): turn on train.gradient_checkpointing, lower train.batch_size "
            f"(raising train.grad_accum_steps keeps the effective batch), set train.val_num_images=0, or give each "
            f"worker a whole GPU (set train.check_gpu_memory=false to train anyway)")
    log(f"fits: {gib:.1f} GiB usable ({source})")
    return estimate
