"""Training on Ray Train, end to end on the tiny preset: two gloo workers, checkpoints, --resume, a killed worker,
and the user's own command through `ray start` + `ray job submit`."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from train_support import tensorboard_scalars, tiny_dataset, train_config

from mpalign.cli import UserInputError
from mpalign.config import REPO_ROOT
from mpalign.training.checkpoint import ADAPTER_DIR, OPTIMIZER_FILE, STATE_FILE, checkpoint_step, worker_file

pytestmark = pytest.mark.slow

STEPS = 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, ray_local) -> Path:
    return tiny_dataset(tmp_path_factory)


@pytest.fixture(scope="module")
def two_worker_run(dataset, tmp_path_factory, ray_local):
    from mpalign.train import run_training

    cfg = train_config(dataset, tmp_path_factory.mktemp("two-workers"), "train.num_workers=2",
                       f"train.max_steps={STEPS}", "train.checkpoint_every=5", "train.keep_checkpoints=2",
                       "train.val_every=10", "train.val_num_images=1", "train.log_every=5")
    return cfg, run_training(cfg)


def checkpoints(output_dir: Path) -> list[Path]:
    return sorted(p for p in (output_dir / "run").glob("checkpoint_*") if p.is_dir())


def test_two_workers_train_with_falling_losses_and_checkpoints(two_worker_run):
    from mpalign.models.adapter import MSAdapter

    cfg, outcome = two_worker_run
    out = Path(cfg.train.output_dir)
    assert outcome.metrics["step"] == STEPS

    kept = checkpoints(out)
    assert [checkpoint_step(c) for c in kept] == [15, 20]  # every 5 steps, the last 2 kept
    for checkpoint in kept:
        names = {p.name for p in checkpoint.iterdir()}
        assert {ADAPTER_DIR, OPTIMIZER_FILE, STATE_FILE, worker_file(0), worker_file(1)} <= names

    tensorboard = out / "tensorboard"
    cross = tensorboard_scalars(tensorboard, "train/cross")
    assert sorted(cross) == list(range(1, STEPS + 1))
    first, last = [cross[s] for s in range(1, 6)], [cross[s] for s in range(STEPS - 4, STEPS + 1)]
    assert sum(last) / 5 < 0.7 * sum(first) / 5, (first, last)
    val_cross = tensorboard_scalars(tensorboard, "val/cross")
    assert val_cross[STEPS] < val_cross[10]
    assert set(tensorboard_scalars(tensorboard, "val/objective")) == {10, STEPS}

    assert (out / "validation" / f"step_{STEPS:07d}.png").is_file()
    adapter = MSAdapter.from_pretrained(outcome.adapter_dir)
    assert adapter.config.max_subjects == cfg.model.max_subjects


def test_resume_continues_from_the_exact_step(two_worker_run):
    """Optimizer/RNG exactness is tested without Ray in test_train_step; here: the run picks up at step 20."""
    from mpalign.train import run_training

    cfg, _ = two_worker_run
    with pytest.raises(UserInputError, match="--resume"):
        run_training(cfg)
    cfg.train.max_steps = STEPS + 4
    outcome = run_training(cfg, resume=True)
    assert outcome.metrics["resumed_from_step"] == STEPS
    assert outcome.metrics["step"] == STEPS + 4
    cross = tensorboard_scalars(Path(cfg.train.output_dir) / "tensorboard", "train/cross")
    assert sorted(cross)[-5:] == [STEPS, STEPS + 1, STEPS + 2, STEPS + 3, STEPS + 4]


def test_deepspeed_zero2_trains_checkpoints_and_resumes_on_cpu(dataset, tmp_path):
    pytest.importorskip("deepspeed", reason="DeepSpeed is an optional extra (pip install 'mpalign[deepspeed]') "
                                            "and is not installed: the ZeRO-2 strategy is not exercised")
    from mpalign.train import run_training
    from mpalign.training.checkpoint import DEEPSPEED_DIR

    cfg = train_config(dataset, tmp_path / "train", "train.strategy=deepspeed", "train.num_workers=2",
                       "train.max_steps=4", "train.checkpoint_every=2")
    assert run_training(cfg).metrics["step"] == 4
    newest = checkpoints(tmp_path / "train")[-1]
    assert (newest / DEEPSPEED_DIR).is_dir() and (newest / ADAPTER_DIR / "config.json").is_file()
    cfg.train.max_steps = 6
    outcome = run_training(cfg, resume=True)
    assert outcome.metrics["resumed_from_step"] == 4 and outcome.metrics["step"] == 6


# --------------------------------------------------------------------------------------------------------------------
# As a user would: ray start --head, ray job submit, stop that head
# --------------------------------------------------------------------------------------------------------------------


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _processes_of(temp_dir: str, group: int | None = None) -> list:
    """Processes of one Ray head: its process group, or a command line that names its temp dir."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if temp_dir in " ".join(proc.info["cmdline"] or []) or os.getpgid(proc.info["pid"]) == group:
                found.append(proc)
        except (psutil.Error, ProcessLookupError):
            continue
    return [p for p in found if p.pid != os.getpid()]


def _stop_head(head: subprocess.Popen, temp_dir: str) -> None:
    """`ray stop`, for this head only: `ray stop` signals every Ray process on the machine (other runs included),
    so send its signals — SIGTERM, then SIGKILL after a grace period — to the processes this head started: its
    process group and anything carrying its temp dir."""
    import psutil

    group = os.getpgid(head.pid)
    procs = _processes_of(temp_dir, group)
    for proc in procs:
        try:
            proc.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def test_ray_job_submit_trains_and_writes_a_loadable_adapter(dataset, tmp_path):
    from mpalign.models.adapter import MSAdapter

    temp_dir = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Ray's socket paths are length-limited
    gcs, dashboard, client, node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = _free_ports(9)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in the job = this venv's
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}",
         f"--dashboard-port={dashboard}", "--dashboard-host=127.0.0.1", f"--ray-client-server-port={client}",
         f"--node-manager-port={node_manager}", f"--object-manager-port={object_manager}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}", "--num-cpus=2",
         "--object-store-memory=800000000", "--disable-usage-stats"],
        env=env, cwd=REPO_ROOT, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(f"{address}/api/version", timeout=2)
                break
            except OSError:
                if time.time() > deadline or head.poll() is not None:
                    pytest.fail("the Ray head did not come up")
                time.sleep(1)
        out = tmp_path / "train"
        job = subprocess.run(
            [ray_bin, "job", "submit", "--address", address, "--", "python", "-m", "mpalign.train",
             "--config", "configs/tiny.yaml", "--set", f"data.path={dataset}", "--set", f"train.output_dir={out}",
             "--set", "train.batch_size=1", "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2",
             "--set", "train.val_num_images=0"],
            check=False, env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=420)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "trained to step 4" in job.stdout
        # a quiet console: Ray's and Ray Train's INFO lines stay in their log files (--verbose brings them back)
        for detail in ("Connecting to existing Ray cluster", "Requesting resources", "Attempting to start training",
                       "Reporting training result"):
            assert detail not in job.stdout + job.stderr, detail
        adapter = MSAdapter.from_pretrained(out / "adapter")
        assert sum(p.numel() for p in adapter.parameters()) > 0
    finally:
        _stop_head(head, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not _processes_of(temp_dir)  # nothing of that head is left
