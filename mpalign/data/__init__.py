"""The dataset builder (``pipelines/build_dataset.py``) and the reader side used by training.

``build_dataset`` turns captioned images and video frames into Parquet shards of training samples; ``rows_to_batch``
/ ``RowsCollateFn`` turn those rows into the batch of ``mpalign/batch.py``. ``docs/dataset.md`` has the format.

The names below are imported on first use: every builder actor imports ``mpalign.data.stages``, and importing the
builder and the reader (Ray Data) with it would add a second to each actor's start.
"""

from importlib import import_module
from typing import Any

_HOMES = {"build_dataset": "mpalign.data.build", "RowsCollateFn": "mpalign.data.collate",
          "load_dataset_split": "mpalign.data.collate", "rows_to_batch": "mpalign.data.collate"}

__all__ = ["RowsCollateFn", "build_dataset", "load_dataset_split", "rows_to_batch"]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'mpalign.data' has no attribute '{name}'")
    return getattr(import_module(_HOMES[name]), name)
