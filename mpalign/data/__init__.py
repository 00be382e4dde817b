"""The dataset builder (``pipelines/build_dataset.py``) and the reader side used by training.

``build_dataset`` turns captioned images and video frames into Parquet shards of training samples; ``rows_to_batch``
/ ``RowsCollateFn`` turn those rows into the batch of ``mpalign/batch.py``. ``docs/dataset.md`` has the format.
"""

from mpalign.data.build import build_dataset
from mpalign.data.collate import RowsCollateFn, load_dataset_split, rows_to_batch

__all__ = ["RowsCollateFn", "build_dataset", "load_dataset_split", "rows_to_batch"]
