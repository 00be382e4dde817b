"""The one place ``model.method`` picks a system: ``ms_adapter`` (MS-Diffusion adapter on SDXL with
MultiPersona-Align's losses) or ``mosaic`` (MOSAIC on FLUX, docs/mosaic.md). Training, sweeps, validation,
generation and evaluation ask this module for the method's training module, batch collation and pipeline, and share
everything else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mpalign.config import METHODS, Config, ConfigError

MOSAIC_COLUMNS = ("correspondence_ref_tokens", "correspondence_target_tokens")


def check_method(cfg: Config) -> str:
    if cfg.model.method not in METHODS:
        raise ConfigError(f"model.method must be one of {list(METHODS)}, got '{cfg.model.method}'")
    if cfg.model.method == "mosaic":
        from mpalign.models.mosaic import BLOCK_THIRDS

        blocks = cfg.model.mosaic_loss_blocks
        if not blocks or any(b not in BLOCK_THIRDS for b in blocks):
            raise ConfigError(f"model.mosaic_loss_blocks must name one or more of {list(BLOCK_THIRDS)}, got {blocks}")
        if cfg.model.mosaic_lora_rank < 1:
            raise ConfigError(f"model.mosaic_lora_rank must be >= 1, got {cfg.model.mosaic_lora_rank}")
    return cfg.model.method


def check_dataset_columns(cfg: Config, columns: list[str]) -> None:
    """What the method reads must be cached: MOSAIC's losses need the correspondence stage's columns, drawing from
    the VAE posterior its std. Fail before training, not at the first step inside Ray."""
    if cfg.train.vae_latents == "sample" and "latents" in columns and "latents_std" not in columns:
        raise ConfigError(f"the dataset at '{cfg.data.path}' caches no posterior std ('latents_std', builders before "
                          f"release parity), which train.vae_latents=sample draws with: rebuild it, or set "
                          f"train.vae_latents=mean")
    wants_losses = cfg.train.alpha > 0 or cfg.train.beta > 0
    if check_method(cfg) == "mosaic" and wants_losses and not set(MOSAIC_COLUMNS) <= set(columns):
        raise ConfigError(f"the dataset at '{cfg.data.path}' has no correspondences, which MOSAIC's SCAL and MDL "
                          f"need: build it with --set data.correspondences=true (or set train.alpha=0 train.beta=0)")


def training_module(cfg: Config, device: Any = None, adapter_dir: str | Path | None = None, **options: Any):
    """The method's training module (``forward(batch, step, generator)`` -> loss terms, ``save_adapter``, ...).
    ``options`` (``cached_keys``, ``generation``: which frozen encoders to keep) apply to the MS-Diffusion adapter."""
    if check_method(cfg) == "mosaic":
        from mpalign.models.mosaic_training import MosaicTrainingModule

        return MosaicTrainingModule.from_config(cfg, device=device, adapter_dir=adapter_dir)
    from mpalign.models.training_module import MPAlignTrainingModule

    return MPAlignTrainingModule.from_config(cfg, device=device, adapter_dir=adapter_dir, **options)


def training_columns(cfg: Config, available: list[str]) -> list[str] | None:
    """The dataset columns the method's batches read (training projects its reads on them); None = all."""
    if check_method(cfg) == "mosaic":
        return None
    from mpalign.data.collate import training_columns as adapter_columns

    return adapter_columns(available)


def collate_fn(cfg: Config):
    """Dataset rows -> the method's batch, for ``iter_torch_batches(collate_fn=...)``."""
    if check_method(cfg) == "mosaic":
        from mpalign.data.mosaic_batch import MosaicCollateFn

        return MosaicCollateFn(cfg)
    from mpalign.data.collate import RowsCollateFn

    return RowsCollateFn(cfg)


def pipeline(cfg: Config, adapter_dir: str | Path | None = None, device: Any = None,
             controlnet: str | Path | None = None):
    """The method's generation pipeline: ``generate(prompt, subject_images, boxes, phrases, ...)``, ``load_adapter``.
    ``controlnet`` (an SDXL ControlNet's hub id or folder) composes with the MS-Diffusion adapter only."""
    if check_method(cfg) == "mosaic":
        if controlnet:
            raise ConfigError("a ControlNet is an MS-Diffusion adapter (SDXL) option: model.method=mosaic does not "
                              "take one")
        from mpalign.mosaic_pipeline import MosaicPipeline

        return MosaicPipeline.from_config(cfg, adapter_dir=adapter_dir, device=device)
    from mpalign.pipeline import MPAlignPipeline

    return MPAlignPipeline.from_config(cfg, adapter_dir=adapter_dir, device=device, controlnet=controlnet)


def _adapter_config(adapter_dir: str | Path) -> dict[str, Any]:
    import json

    from mpalign.zoo import ModelLoadError

    path = Path(adapter_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot load the adapter config '{path}' (damaged?): {type(exc).__name__}: {exc}") from exc


def adapter_method(adapter_dir: str | Path) -> str:
    """Which method wrote the adapter in ``adapter_dir`` (from its saved config's class name)."""
    return "mosaic" if _adapter_config(adapter_dir).get("_class_name") == "MosaicAdapter" else "ms_adapter"


def adapter_max_subjects(adapter_dir: str | Path) -> int:
    return int(_adapter_config(adapter_dir)["max_subjects"])


def check_adapter(adapter_dir: str | Path) -> None:
    """Read the adapter in ``adapter_dir`` with the loader of the method that wrote it, so a damaged or incomplete
    folder is a one-line ModelLoadError before any model loads."""
    if adapter_method(adapter_dir) == "mosaic":
        from mpalign.models.mosaic import MosaicAdapter

        MosaicAdapter.from_pretrained(adapter_dir)
    else:
        from mpalign.models.training_module import load_adapter_parts

        load_adapter_parts(adapter_dir)
