"""Past one machine: a Ray cluster of several nodes on this machine (``ray.cluster_utils.Cluster``: one raylet, object
store and set of workers per node, each with its own resources), the way Ray's own tests simulate one. The output
folders are on a local disk every node sees, which is what shared storage means here.

Placement onto different nodes is forced by the nodes' resources, not hoped for: the head has 1 CPU (for Ray Data
tasks and the drivers' helpers) and every worker node 2, while a training worker / trial asks for 1.5 and a dataset
chain actor for 2, so no node holds two of them and none runs on the head. Ray's placement-group table says where the
workers actually went; the tests assert it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import start_local_ray
from test_data_build import assert_same_rows
from train_support import DATASET_OVERRIDES, tensorboard_scalars, train_config

from mpalign.config import load_config

pytestmark = pytest.mark.slow

WORKER_NODE_CPUS = 2
ONE_PER_NODE_CPUS = 1.5  # more than half a worker node, more than the head: one per worker node
OBJECT_STORE = 100 * 2**20


class Nodes:
    """The test's cluster: a head node (1 CPU) plus worker nodes added and removed by the tests."""

    def __init__(self, cluster):
        self.cluster, self.workers = cluster, []

    def add(self, count: int = 1) -> list:
        added = [self.cluster.add_node(num_cpus=WORKER_NODE_CPUS, object_store_memory=OBJECT_STORE)
                 for _ in range(count)]
        self.cluster.wait_for_nodes()
        self.workers += added
        return added

    def remove(self, node_id: str) -> None:
        node = next(n for n in self.workers if n.node_id == node_id)
        self.workers.remove(node)
        self.cluster.remove_node(node, allow_graceful=False)  # the node's processes are killed: a lost machine

    def remove_all(self) -> None:
        for node in list(self.workers):
            self.remove(node.node_id)


@pytest.fixture(scope="module")
def nodes():
    """A multi-node cluster for this module; the session's single-node Ray is stopped meanwhile and restarted after
    (both cannot be the driver's Ray at once)."""
    import ray
    from ray.cluster_utils import Cluster

    from mpalign.cli import ray_runtime_env

    had_local = ray.is_initialized()
    ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE,
                                                             "include_dashboard": False})
    ray.init(address=cluster.address, log_to_driver=False, runtime_env=ray_runtime_env())
    try:
        yield Nodes(cluster)
    finally:
        ray.shutdown()
        cluster.shutdown()
        if had_local:
            start_local_ray()


@pytest.fixture
def fresh_nodes(nodes):
    yield nodes
    nodes.remove_all()


def worker_placements(min_cpus: float) -> dict[str, list[str]]:
    """Live placement groups whose bundles each ask for at least ``min_cpus`` CPUs (training workers, not Tune's
    tiny trial actors): id -> the node of each bundle."""
    import ray

    return {pg_id: [info["bundles_to_node_id"][i] for i in sorted(info["bundles_to_node_id"])]
            for pg_id, info in ray.util.placement_group_table().items()
            if info["state"] == "CREATED" and info["bundles"]
            and all(b.get("CPU", 0) >= min_cpus for b in info["bundles"].values())}


class Watcher:
    """Runs the code under test in a thread while the main thread (Ray starts nodes only from there) polls: it
    records the training workers' nodes and, once ``when()`` holds, runs ``then()`` once (a node lost mid-run)."""

    def __init__(self, when: Callable[[], bool] = lambda: False, then: Callable[[], None] = lambda: None):
        self.when, self.then = when, then
        self.placements: list[tuple[str, list[str]]] = []  # (placement group, its bundles' nodes), each seen once
        self.fired = False

    def run(self, target: Callable[[], object]) -> object:
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                outcome["result"] = target()
            except BaseException as error:  # noqa: BLE001 - raised again in the main thread below
                outcome["error"] = error

        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        while thread.is_alive():
            for seen in worker_placements(ONE_PER_NODE_CPUS).items():
                if seen not in self.placements:  # a group re-placed after a loss counts again
                    self.placements.append(seen)
            if not self.fired and self.when():
                self.fired = True
                self.then()
            thread.join(timeout=0.3)
        if "error" in outcome:
            raise outcome["error"]
        return outcome["result"]


# --------------------------------------------------------------------------------------------------------------------
# a. the dataset build over 3 nodes, one lost mid-build
# --------------------------------------------------------------------------------------------------------------------


def test_a_build_over_three_nodes_survives_losing_one_and_matches_a_local_build(fresh_nodes, tmp_path):
    import ray.data

    from mpalign.data.build import build_dataset

    fresh_nodes.add(3)
    cfg = load_config(overrides=["data.sample.num_images=4", "data.sample.num_videos=1", "data.rows_per_shard=1",
                                 "data.stage_layout=chain", f"data.chain.num_cpus={WORKER_NODE_CPUS}"])
    local = build_dataset(cfg, output=str(tmp_path / "local"), executor="local", log=lambda _: None)
    out = tmp_path / "cluster"
    shards_total = local["shards"]["total"]
    lost: dict[str, str | int] = {}
    started = time.perf_counter()

    def lose_a_node() -> None:
        lost["shards_done"] = len(list((out / "samples").glob("shard-*.parquet")))
        lost["node"] = fresh_nodes.workers[0].node_id
        fresh_nodes.remove(lost["node"])
        fresh_nodes.add(1)  # the cluster brings up a replacement; Ray Data restarts the lost actor there

    watcher = Watcher(when=lambda: any((out / "samples").glob("shard-*.parquet")), then=lose_a_node)
    context = ray.data.DataContext.get_current()
    wait_before = context.wait_for_min_actors_s
    context.wait_for_min_actors_s = 600  # every actor up before the first shard is handed out: each gets work
    try:
        stats = watcher.run(lambda: build_dataset(cfg, output=str(out), log=lambda _: None))
    finally:
        context.wait_for_min_actors_s = wait_before

    print(f"local build {local['this_run']['wall_s']} s, cluster build {time.perf_counter() - started:.1f} s")
    assert 1 <= lost["shards_done"] < shards_total, lost  # the node went while shards were still being built
    assert stats["shards"]["finished"] == shards_total == stats["shards"]["built_now"]
    (pool,) = stats["this_run"]["actor_pools"].values()
    assert pool["concurrency"] == 3 and pool["num_cpus"] == WORKER_NODE_CPUS  # one actor per node: 3 nodes
    writers = stats["this_run"]["shards_by_writer_node"]
    assert sum(writers.values()) == shards_total, writers
    # spread over worker nodes, none next to the driver; how many of the 3 (+ the replacement) get a shard before the
    # queue is empty depends on the machine's load (2 or 3 of them seen on 2 cores)
    assert len(writers) >= 2 and fresh_nodes.cluster.head_node.node_id not in writers
    cluster_rows = pq.read_table(out / "samples").sort_by("id")
    ids = cluster_rows["id"].to_pylist()
    assert len(ids) == len(set(ids)) == local["samples"]  # nothing lost, nothing twice
    assert_same_rows(cluster_rows, pq.read_table(tmp_path / "local" / "samples").sort_by("id"))
    rejects = pq.read_table(out / "rejects")["id"].to_pylist()
    assert len(rejects) == len(set(rejects)) == local["rejects"] and not set(rejects) & set(ids)
    assert not list((out / "samples").glob(".*"))  # no half-written file of the lost actor left behind


# --------------------------------------------------------------------------------------------------------------------
# b. DDP over 2 nodes, one lost after a checkpoint
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dataset(nodes, tmp_path_factory) -> Path:
    """The training tests' tiny dataset, built in this process: the driver has the models loaded already, and building
    on the cluster is test a's job."""
    from mpalign.data.build import build_dataset

    out = tmp_path_factory.mktemp("cluster-dataset")
    build_dataset(load_config(overrides=DATASET_OVERRIDES), output=str(out), executor="local", log=lambda _: None)
    return out


MAX_STEPS, CHECKPOINT_EVERY = 8, 2


def test_b_ddp_over_two_nodes_restarts_from_the_last_checkpoint_when_a_node_is_lost(fresh_nodes, dataset, tmp_path):
    from mpalign.train import run_training

    fresh_nodes.add(2)
    out = tmp_path / "train"
    cfg = train_config(dataset, out, "train.num_workers=2", f"train.cpus_per_worker={ONE_PER_NODE_CPUS}",
                       f"train.max_steps={MAX_STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
                       "train.keep_checkpoints=4", "train.max_failures=2", "train.log_every=1",
                       "train.materialize_max_gb=0")  # stream: no dataset blocks live on the node that is lost
    lost: dict[str, object] = {}

    def checkpointed() -> bool:
        # registered by Ray Train's controller (it writes this file then), not only written by the workers: a node lost
        # between the two leaves the restarted group nothing to resume from
        return (out / "run" / "checkpoint_manager_snapshot.json").is_file()

    def lose_a_worker_node() -> None:
        (_, workers), = watcher.placements
        lost["placement"] = workers
        lost["steps_done"] = max(tensorboard_scalars(out / "tensorboard", "train/loss"), default=0)
        fresh_nodes.remove(workers[1])
        time.sleep(3)  # the group fails and waits for room ...
        fresh_nodes.add(1)  # ... until the cluster has a node again

    watcher = Watcher(when=checkpointed, then=lose_a_worker_node)
    outcome = watcher.run(lambda: run_training(cfg))

    first = lost["placement"]
    assert len(set(first)) == 2 and fresh_nodes.cluster.head_node.node_id not in first  # 2 workers, 2 worker nodes
    assert len(watcher.placements) == 2, watcher.placements  # the group was placed a second time, after the loss
    _, second = watcher.placements[1]
    assert len(set(second)) == 2 and first[1] not in second
    assert outcome.metrics["step"] == MAX_STEPS
    resumed = outcome.metrics["resumed_from_step"]
    assert resumed >= CHECKPOINT_EVERY and resumed % CHECKPOINT_EVERY == 0
    assert resumed >= lost["steps_done"] - CHECKPOINT_EVERY, (resumed, lost)  # at most one interval redone
    losses = tensorboard_scalars(out / "tensorboard", "train/loss")  # rank 0's step log, both attempts
    assert sorted(losses) == list(range(1, MAX_STEPS + 1))  # every step, none missing
    assert (Path(outcome.adapter_dir) / "config.json").is_file()


# --------------------------------------------------------------------------------------------------------------------
# c. a sweep whose trials run on different nodes
# --------------------------------------------------------------------------------------------------------------------


def test_c_sweep_trials_on_different_nodes_fill_results_csv(fresh_nodes, dataset, tmp_path):
    import csv

    from mpalign.sweep import run_sweep

    fresh_nodes.add(2)
    alphas = [0.0, 0.01]
    cfg = train_config(dataset, tmp_path / "unused", "train.max_steps=2", "train.val_every=1", "train.val_batches=1",
                       "train.materialize_max_gb=0", f"tune.output_dir={tmp_path / 'tune'}", f"tune.alphas={alphas}",
                       "tune.layer_sets=[down+mid]", "tune.scheduler=fifo", "tune.max_concurrent_trials=2",
                       f"tune.cpus_per_trial={ONE_PER_NODE_CPUS}", "tune.eval_samples=1", "tune.eval_steps=2")
    watcher = Watcher()
    outcome = watcher.run(lambda: run_sweep(cfg))

    trial_nodes = {nodes[0] for _, nodes in watcher.placements}
    assert len(watcher.placements) == len(alphas) and len(trial_nodes) == len(alphas), watcher.placements
    with Path(outcome.results_csv).open() as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(float(r["alpha"]) for r in rows) == alphas
    assert all(r["status"] == "finished" and int(r["step"]) == 2 and float(r["objective"]) > 0 for r in rows), rows
