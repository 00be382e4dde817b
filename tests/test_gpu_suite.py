"""benchmarks/gpu_suite.py: its CPU check runs every part's code path, without Ray, and states every goal."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest

from mpalign.config import REPO_ROOT

SUITE = REPO_ROOT / "benchmarks" / "gpu_suite.py"


def _suite_module():
    spec = importlib.util.spec_from_file_location("gpu_suite", SUITE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_check_runs_every_part_without_ray(tmp_path):
    out = tmp_path / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SUITE), "--check-with-tiny-models", "--json", str(out)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["parts"]) == {"train_step", "build", "generation"}
    for name, part in result["parts"].items():
        assert "error" not in part, (name, part["error"])
        assert part["wall_s"] <= part["budget_s"]
    train = result["parts"]["train_step"]
    for mode in ("no_checkpointing", "gradient_checkpointing"):
        for step in ("b_adapter_step", "c_adapter_step_with_alignment"):
            assert train[mode][step]["img_per_s"] > 0
    assert set(result["parts"]["build"]["per_image_s_alone"]) >= {"decode", "detect", "segment", "encode"}
    assert result["parts"]["build"]["executor"] == "local"
    generation = result["parts"]["generation"]
    assert generation["with_adapter_s"] > 0 and generation["without_adapter_s"] > 0
    goals = result["goals"]
    assert set(goals) == set(_suite_module().GOALS)
    for key, goal in goals.items():
        assert goal["goal"] and goal["unit"], key
        assert goal["met"] is None, key  # no verdict from tiny CPU figures
    assert goals["training_step"]["measured"]["no_checkpointing"] > 0
    assert goals["alignment_overhead"]["measured"]["gradient_checkpointing"] is not None
    assert goals["generation_overhead"]["measured"] == pytest.approx(generation["adapter_overhead_pct"])
    assert 0 < goals["build_gpu_busy"]["measured"]["gpu_stage_share_pct"] < 100
    assert result["ray_imported"] is False
    for goal in goals.values():  # the table states each goal
        assert goal["goal"] in proc.stdout


def test_a_failing_or_slow_part_is_recorded_and_the_suite_goes_on():
    suite = _suite_module()
    import torch

    record = {}
    suite._attempt(record, "oom", torch.device("cpu"), lambda: (_ for _ in ()).throw(
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert record["oom"]["error"].startswith("OutOfMemoryError: CUDA out of memory")
    start = time.perf_counter()
    with pytest.raises(suite.PartTimeout), suite.wall_budget(0.2):
        suite._attempt(record, "slow", torch.device("cpu"), lambda: time.sleep(5))
    assert time.perf_counter() - start < 2
