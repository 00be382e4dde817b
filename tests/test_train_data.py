"""How training reads the built dataset (mpalign.train.load_datasets): streaming without an all-to-all barrier, only
the columns training uses, a new file order every epoch, and a resume skip that does not collate."""

from __future__ import annotations

import itertools

import pyarrow.parquet as pq
import pytest
from train_support import tiny_dataset, train_config

from mpalign.data.collate import training_columns
from mpalign.data.schema import SAMPLES_DIR

ROWS_PER_FILE = 2


@pytest.fixture(scope="module")
def many_files(tmp_path_factory, ray_local):
    """The tiny built dataset's real rows, rewritten as many small Parquet files (shards of consecutive records)."""
    table = pq.read_table(tiny_dataset(tmp_path_factory) / SAMPLES_DIR)
    out = tmp_path_factory.mktemp("many-files")
    (out / SAMPLES_DIR).mkdir()
    for start in range(0, table.num_rows, ROWS_PER_FILE):
        pq.write_table(table.slice(start, ROWS_PER_FILE), out / SAMPLES_DIR / f"shard-{start:05d}.parquet")
    return out, table


def _operators(dag) -> list:
    ops, todo = [], [dag]
    while todo:
        op = todo.pop()
        ops.append(op)
        todo.extend(op.input_dependencies)
    return ops


@pytest.mark.parametrize("materialize_max_gb", [0.0, 2.0])  # streamed, and read once into the object store
def test_the_train_read_plan_has_no_all_to_all_operator_and_projects_the_used_columns(many_files, tmp_path,
                                                                                      materialize_max_gb):
    from ray.data._internal.logical.operators.all_to_all_operator import AbstractAllToAll
    from ray.data._internal.logical.operators.read_operator import ReadFiles
    from ray.data._internal.logical.optimizers import LogicalOptimizer

    from mpalign.train import load_datasets

    out, table = many_files
    cfg = train_config(out, tmp_path / "train", f"train.materialize_max_gb={materialize_max_gb}")
    train = load_datasets(cfg)["train"]
    assert not [op.name for op in _operators(train._logical_plan.dag) if isinstance(op, AbstractAllToAll)]
    expected = {*training_columns(table.column_names), "split"}
    assert {"image", "masks", "reference_crops"}.isdisjoint(expected)  # caches exist: no PNGs read
    if materialize_max_gb == 0:  # the projection is pushed into the Parquet read: other columns are never fetched
        (read,) = [op for op in _operators(LogicalOptimizer().optimize(train._logical_plan).dag)
                   if isinstance(op, ReadFiles)]
        assert set(read.get_projection_map()) == expected
    assert set(train.schema().names) == expected


def test_epochs_read_the_files_in_a_new_order_each_time(many_files, tmp_path):
    from mpalign.train import load_datasets

    out, table = many_files
    train = load_datasets(train_config(out, tmp_path / "train", "train.materialize_max_gb=0"))["train"]
    orders = [[row["id"] for row in train.iter_rows()] for _ in range(3)]
    expected = sorted(i for i, s in zip(table["id"].to_pylist(), table["split"].to_pylist()) if s == "train")
    assert all(sorted(order) == expected for order in orders)
    assert len({tuple(order) for order in orders}) == 3
    # files stay whole: consecutive records of a shard still arrive together (the local shuffle buffer mixes them)
    position = {i: k for k, i in enumerate(table["id"].to_pylist())}
    first = orders[0]
    assert any(position[b] == position[a] + 1 for a, b in itertools.pairwise(first))


def test_a_resumed_epoch_skips_its_consumed_batches_without_collating_them():
    from mpalign.train import collate_after_skip

    collated = []

    def collate(batch):
        collated.append(batch)
        return f"collated {batch}"

    out = list(collate_after_skip(iter(range(6)), collate, skip=4))
    assert out == [(0, None), (1, None), (2, None), (3, None), (4, "collated 4"), (5, "collated 5")]
    assert collated == [4, 5]
    assert list(collate_after_skip(iter(range(3)), collate, skip=3)) == [(0, None), (1, None), (2, None)]


def test_ray_workers_start_few_parquet_footer_readers_on_a_small_machine(ray_local, monkeypatch):
    """Ray Data starts a pool of footer-reading actors for every Parquet read (32 by default): on 2 cores that cost the
    first batch of a 200-file dataset 44 s instead of 8 s. Our Ray processes get a count sized to the machine."""
    import os

    import ray

    from mpalign.cli import FOOTER_READERS_ENV, ray_runtime_env

    expected = ray_runtime_env()["env_vars"][FOOTER_READERS_ENV]
    assert 2 <= int(expected) <= max(2, (os.cpu_count() or 2) // 2)
    assert ray.get(ray.remote(lambda: os.environ.get(FOOTER_READERS_ENV)).remote()) == expected
    monkeypatch.setenv(FOOTER_READERS_ENV, "7")  # the user's own setting wins
    assert ray_runtime_env() == {"env_vars": {FOOTER_READERS_ENV: "7"}}
