"""Where rank 0 writes metrics besides Ray Train: TensorBoard, MLflow, or nowhere (``train.logger``)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from PIL import Image

from mpalign.config import ConfigError

LOGGERS = ("tensorboard", "mlflow", "none")


class MetricsLogger(Protocol):
    def log_scalars(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, tag: str, image: Image.Image, step: int) -> None: ...

    def close(self) -> None: ...


def scalar_tag(key: str) -> str:
    """``val_diffusion`` -> ``val/diffusion``, ``objective`` -> ``val/objective``, ``loss`` -> ``train/loss``, and a
    sweep trial's fidelity evaluation: ``eval_dino`` -> ``fidelity/dino``."""
    if key.startswith("val_"):
        return "val/" + key[len("val_"):]
    if key.startswith("eval_"):
        return "fidelity/" + key[len("eval_"):]
    return "val/objective" if key == "objective" else f"train/{key}"


class NullLogger:
    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardLogger:
    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(log_dir))

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(scalar_tag(key), value, step)

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        import numpy as np

        self.writer.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


class MLflowLogger:
    """Logs to the tracking server in ``MLFLOW_TRACKING_URI`` (a local ``mlruns`` folder when unset)."""

    def __init__(self, run_name: str, params: dict[str, object]):
        import mlflow

        self.mlflow = mlflow
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in _flatten(params).items()})

    def log_scalars(self, metrics: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(metrics, step=step)

    def log_image(self, tag: str, image: Image.Image, step: int) -> None:
        self.mlflow.log_image(image, f"{tag}/step_{step:07d}.png")

    def close(self) -> None:
        self.mlflow.end_run()


def _flatten(tree: dict[str, object], prefix: str = "") -> dict[str, object]:
    """``{"train": {"lr": 1e-4}}`` -> ``{"train.lr": 1e-4}``: one MLflow parameter per config key."""
    flat: dict[str, object] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        flat.update(_flatten(value, f"{name}.") if isinstance(value, dict) else {name: value})
    return flat


def check_logger(kind: str) -> None:
    if kind not in LOGGERS:
        raise ConfigError(f"train.logger must be one of {list(LOGGERS)}, got '{kind}'")
    if kind == "mlflow":
        try:
            import mlflow  # noqa: F401
        except ImportError:
            raise ConfigError("train.logger=mlflow needs the mlflow package (pip install mlflow), "
                              "or use train.logger=tensorboard") from None


def make_logger(kind: str, output_dir: str | Path, run_name: str, params: dict[str, object]) -> MetricsLogger:
    check_logger(kind)
    if kind == "tensorboard":
        return TensorBoardLogger(Path(output_dir) / "tensorboard")
    if kind == "mlflow":
        return MLflowLogger(run_name, params)
    return NullLogger()
