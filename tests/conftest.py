"""Test session settings: no hub access, quiet Ray, a small local Ray shared by the tests that need one."""

from __future__ import annotations

import os
from pathlib import Path

# Before anything imports transformers / diffusers / ray: no test may reach a hub, and Ray stays small and quiet.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path:
    return Path(os.environ.get("MPALIGN_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real benchmark images; CI makes sure they exist, so this skip only happens on a partial checkout."""
    path = shared_data_dir()
    if not (path / "dreambench").is_dir() or not (path / "msbench").is_dir():
        pytest.skip(f"real test images not found at {path} (set MPALIGN_SHARED_DATA to the shared/data folder)")
    return path


def start_local_ray():
    import ray

    from mpalign.cli import ray_runtime_env

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, object_store_memory=1 << 30, include_dashboard=False,
                 log_to_driver=False, runtime_env=ray_runtime_env())
    return ray


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray for the whole session: starting Ray costs seconds, and tests that need it are many. (The
    multi-node tests swap it for their cluster and start it again afterwards.)"""
    yield start_local_ray()
    import ray

    ray.shutdown()
