"""Object storage as clusters use it, against a local S3-compatible server (moto's, on 127.0.0.1 only): the dataset
built onto s3:// (both layouts; resumed, refused, overwritten) and read from there, training's output folder on
s3:// (config, Ray Train's checkpoints, TensorBoard, validation grids, the final adapter) through a resume, the
adapter generating straight from s3://; and the failures a user meets first (unreachable endpoint, no credentials, no
dataset, no bucket) as one error line within seconds."""

from __future__ import annotations

import contextlib
import copy
import os
import time

import pytest
import yaml

from mpalign.config import ConfigError
from mpalign.storage import check_storage, filesystem

BUCKET = "mpalign-test"


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port and the AWS settings pointing at it (restored afterwards)."""
    moto_server = pytest.importorskip("moto.server", reason="moto[server] is in the dev extra")
    import pyarrow.fs as pafs

    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    settings = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    before = {k: os.environ.get(k) for k in settings}
    os.environ.update(settings)
    # generous timeouts here only: moto loads its S3 backend on the first request
    pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True,
                      connect_timeout=60, request_timeout=300).create_dir(BUCKET)
    try:
        yield f"s3://{BUCKET}"
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


@contextlib.contextmanager
def ray_with_the_s3_settings():
    """A local Ray whose workers start with the AWS settings of the fixture in their environment; the Ray that ran
    before (without them) comes back afterwards."""
    import ray
    from conftest import start_local_ray

    had_ray = ray.is_initialized()
    ray.shutdown()
    try:
        start_local_ray()
        yield
    finally:
        ray.shutdown()
        if had_ray:
            start_local_ray()


def test_a_reachable_store_answers_and_a_missing_path_is_named(s3):
    assert check_storage(f"{s3}", "bucket") is True
    assert check_storage(f"{s3}/nothing-here", "train.storage_path") is False
    with pytest.raises(ConfigError, match="dataset 's3://.*/nothing-here' does not exist"):
        check_storage(f"{s3}/nothing-here", "dataset", must_exist=True)


def test_an_unreachable_endpoint_fails_in_seconds_with_one_line(s3, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")  # nothing listens on port 1
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"cannot reach dataset 's3://.*' \(endpoint http://127.0.0.1:1\)") as info:
        check_storage(f"{s3}/data", "dataset")
    assert time.perf_counter() - start < 15 and "\n" not in str(info.value)


def test_missing_credentials_are_named_before_any_request(s3, monkeypatch):
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")  # no ~/.aws files
    with pytest.raises(ConfigError, match="no credentials are set"):
        check_storage(f"{s3}/data", "dataset")


def test_training_cli_on_an_unreachable_store_prints_one_error_line(s3, tmp_path, monkeypatch, capsys):
    from mpalign.cli import run_cli
    from mpalign.train import main

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    code = run_cli(main, ["--set", f"data.path={s3}/dataset", "--set", f"train.output_dir={tmp_path}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot reach the dataset's samples folder"), err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("command, setting", [("train", "train.output_dir"), ("sweep", "tune.output_dir")])
def test_outputs_on_an_unreachable_store_print_one_error_line(command, setting, tmp_path, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    from mpalign.cli import run_cli
    from mpalign.train import main as train_main

    main = train_main if command == "train" else runpy.run_path(
        str(Path(__file__).parent.parent / "tune" / "sweep_alpha.py"))["main"]
    for key, value in {"AWS_ENDPOINT_URL": "http://127.0.0.1:1", "AWS_ACCESS_KEY_ID": "test",
                       "AWS_SECRET_ACCESS_KEY": "test", "AWS_EC2_METADATA_DISABLED": "true"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(tmp_path)
    code = run_cli(main, ["--set", f"{setting}=s3://somewhere/out"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"error: cannot reach {setting} 's3://somewhere/out'"), err
    assert len(err.splitlines()) == 1 and not (tmp_path / "s3:").exists()


def test_staged_side_outputs_upload_only_what_changed(s3):
    """Rank 0's TensorBoard files and images are written locally and synced after each validation: a sync sends the
    new and the changed files, not every earlier image again; closing syncs once more and removes the local copy."""
    from mpalign.data.output import OutputFolder, StagedFolder

    staged = StagedFolder(f"{s3}/staged")
    sent: list[str] = []
    upload = staged.remote.upload
    staged.remote.upload = lambda local, name: (sent.append(name), upload(local, name))
    (staged.path / "validation").mkdir()
    (staged.path / "validation" / "step_1.png").write_bytes(b"one")
    (staged.path / "events").write_bytes(b"a")
    staged.sync()
    (staged.path / "validation" / "step_2.png").write_bytes(b"two")
    (staged.path / "events").write_bytes(b"ab")
    staged.close()
    assert sent == ["events", "validation/step_1.png", "events", "validation/step_2.png"]
    remote = OutputFolder(f"{s3}/staged")
    assert remote.file_names("validation") == {"step_1.png", "step_2.png"} and remote.read_text("events") == "ab"
    assert not staged.path.exists()


def test_the_builder_writes_to_s3_and_a_rerun_keeps_the_finished_shards(s3, tmp_path):
    """Shards, rejects, stats and manifest straight onto s3:// (the Ray-free loop: the same writer, no Ray start-up);
    a second run skips the finished shard, another input is refused, --overwrite deletes what was there."""
    import json

    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    from mpalign.config import SampleDataConfig, load_config
    from mpalign.data.build import build_dataset
    from mpalign.sample_data import generate_sample_dataset

    sample = generate_sample_dataset(tmp_path / "sample", SampleDataConfig(num_images=3, num_videos=0, image_size=64))
    cfg = load_config(overrides=["data.rows_per_shard=2"])
    out = f"{s3}/resumed-dataset"

    def build(**kwargs):
        return build_dataset(cfg, input=str(sample), output=out, executor="local", log=lambda _: None, **kwargs)

    first = build(max_shards=1)
    assert first["shards"] == {"total": 2, "built_now": 1, "skipped": 0, "finished": 1}
    again = build()
    assert again["shards"] == {"total": 2, "built_now": 1, "skipped": 1, "finished": 2}
    fs, root = filesystem(out)
    assert pq.read_table(f"{root}/samples", filesystem=fs).num_rows == again["samples"] == 3
    with fs.open_input_stream(f"{root}/stats.json") as stats:
        assert json.loads(stats.read()) == again
    files = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    assert not any(info.base_name.endswith(".tmp") for info in files)  # on S3 a put is atomic: no temporary names
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "x", "image": "x.png", "caption": "a dog"}) + "\n")
    with pytest.raises(ConfigError, match="--overwrite"):
        build_dataset(cfg, input=str(other), output=out, executor="local", log=lambda _: None)
    rebuilt = build_dataset(cfg, input=str(other), output=out, executor="local", log=lambda _: None, overwrite=True)
    assert rebuilt["shards"]["finished"] == 1 and rebuilt["samples"] + rebuilt["rejects"] == 1
    with pytest.raises(ConfigError, match="cannot write output 's3://no-such-bucket/ds'"):
        build_dataset(cfg, input=str(other), output="s3://no-such-bucket/ds", executor="local", log=lambda _: None)


def test_the_builder_on_an_unreachable_store_prints_one_error_line(s3, tmp_path, monkeypatch, capsys):
    import runpy
    from pathlib import Path

    from mpalign.cli import run_cli

    main = runpy.run_path(str(Path(__file__).parent.parent / "pipelines" / "build_dataset.py"))["main"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    start = time.perf_counter()
    code = run_cli(main, ["--input", str(tmp_path / "records.jsonl"), "--output", f"{s3}/dataset"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot reach output 's3://"), err
    assert len(err.splitlines()) == 1 and time.perf_counter() - start < 15


@pytest.mark.slow
def test_dataset_and_checkpoints_on_s3_train_resume_and_generate(s3, tmp_path):
    """Build straight onto s3:// (the chain layout's Ray actors write the shards) → train from it with
    train.output_dir on s3:// (config, checkpoints, TensorBoard, validation grids, adapter) → resume from it →
    generate with the adapter on s3://, and fetch it for an evaluation."""
    import pyarrow.fs as pafs
    from PIL import Image
    from train_support import DATASET_OVERRIDES, train_config

    from mpalign.cli import UserInputError
    from mpalign.config import load_config
    from mpalign.data.build import build_dataset
    from mpalign.data.output import OutputFolder
    from mpalign.data.stages import STAGE_NAMES
    from mpalign.evaluate import local_adapters
    from mpalign.generate import main as generate_main
    from mpalign.train import run_training

    fs, root = filesystem(s3)
    cfg = train_config(f"{s3}/dataset", f"{s3}/train", "train.max_steps=2", "train.checkpoint_every=1",
                       "train.materialize_max_gb=0", "train.val_every=2", "train.val_num_images=1")
    with ray_with_the_s3_settings():
        built = build_dataset(load_config(overrides=[*DATASET_OVERRIDES, f"data.path={s3}/dataset"]),
                              log=lambda _: None)
        assert built["samples"] > 0 and list(built["this_run"]["actor_pools"]) == ["+".join(STAGE_NAMES)]
        assert fs.get_file_info(f"{root}/dataset/stats.json").size > 0
        assert run_training(cfg).metrics["step"] == 2
        cfg.train.max_steps = 3
        other_sizes = copy.deepcopy(cfg)
        other_sizes.model.num_tokens = 8
        with pytest.raises(UserInputError, match="model.num_tokens"):  # the run's config.yaml is read from S3
            run_training(other_sizes, resume=True)
        outcome = run_training(cfg, resume=True)
    assert outcome.metrics["resumed_from_step"] == 2 and outcome.metrics["step"] == 3
    assert f"{BUCKET}/train/run/checkpoint_" in outcome.checkpoint_path  # Ray Train's checkpoint is on S3
    kept = [info.path for info in fs.get_file_info(pafs.FileSelector(f"{root}/train/run"))
            if info.base_name.startswith("checkpoint_")]
    assert kept and not any(p.name == "s3:" for p in tmp_path.rglob("*"))  # nothing of the run lands locally
    output = OutputFolder(f"{s3}/train")
    assert "max_steps: 3" in output.read_text("config.yaml")
    assert output.file_names("validation") == {"step_0000002.png", "step_0000003.png"}  # rank 0's, staged
    assert any(name.startswith("events.out.tfevents") for name in output.file_names("tensorboard"))
    assert outcome.adapter_dir == f"{s3}/train/adapter" and output.exists("adapter", "config.json")
    subject, out = tmp_path / "ball.png", tmp_path / "generated.png"
    Image.new("RGB", (64, 64), "red").save(subject)
    assert generate_main(["--adapter", outcome.adapter_dir, "--prompt", "a ball", "--subject", str(subject),
                          "--phrase", "ball", "--box", "0.1,0.1,0.6,0.6", "--steps", "2", "--out", str(out)]) == 0
    assert out.stat().st_size > 0
    [fetched] = local_adapters([outcome.adapter_dir], str(tmp_path / "eval"))
    assert (tmp_path / "eval" / "adapters" / BUCKET / "train" / "adapter" / "config.json").is_file()
    assert fetched == str(tmp_path / "eval" / "adapters" / BUCKET / "train" / "adapter")


@pytest.mark.slow
def test_a_sweep_with_its_output_on_s3_tabulates_and_restores_from_there(s3, tmp_path_factory, tmp_path, monkeypatch):
    """tune.output_dir on s3://: Tune's experiment state, the trial's training output (its adapter, trial_end.json),
    results.csv, the plot and best_config.yaml land there and nothing local; --resume restores the finished sweep
    from there without training again."""
    import csv
    import io

    from train_support import tiny_dataset, train_config

    from mpalign.config import config_from_dict
    from mpalign.data.output import OutputFolder
    from mpalign.sweep import BEST_YAML, PLOT_PNG, RESULTS_CSV, TRIAL_END, run_sweep

    dataset = tiny_dataset(tmp_path_factory)
    monkeypatch.chdir(tmp_path)
    cfg = train_config(dataset, tmp_path / "unused", "train.max_steps=2", "train.val_every=2", "train.val_batches=1",
                       f"tune.output_dir={s3}/sweep", "tune.alphas=[0.01]", "tune.layer_sets=[down+mid]",
                       "tune.scheduler=fifo", "tune.metric=diffusion", "tune.eval_samples=0")
    with ray_with_the_s3_settings():
        outcome = run_sweep(cfg)
        restored = run_sweep(cfg, resume=True)
    out = OutputFolder(f"{s3}/sweep")
    assert outcome.results_csv == out.uri(RESULTS_CSV) and out.exists(PLOT_PNG) and out.exists("sweep")
    [row] = list(csv.DictReader(io.StringIO(out.read_text(RESULTS_CSV))))
    assert row["status"] == "finished" and int(row["step"]) == 2 and row["output_dir"].startswith(f"{s3}/sweep/trials/")
    trial = OutputFolder(row["output_dir"])
    assert trial.exists("adapter", "config.json") and trial.exists(TRIAL_END)
    best = config_from_dict(yaml.safe_load(out.read_text(BEST_YAML)))
    assert best.train.output_dir == f"{s3}/sweep/best/train" and best.train.alpha == 0.01
    same = ("trial_id", "objective", "step")  # the same trial: restored from S3, not a new sweep trained again
    assert [[r[k] for k in same] for r in restored.rows] == [[r[k] for k in same] for r in outcome.rows]
    assert not any(p.name == "s3:" for p in tmp_path.rglob("*"))


@pytest.mark.slow
def test_the_per_stage_layout_writes_its_shards_onto_s3_from_writer_actors(s3, tmp_path):
    """The GPU layout onto s3://: every shard written by a writer actor (spread over the nodes: object storage is
    reached from all of them), none by the driver, and the rows all there."""
    import pyarrow.parquet as pq

    from mpalign.config import SampleDataConfig, load_config
    from mpalign.data.build import build_dataset
    from mpalign.sample_data import generate_sample_dataset

    sample = generate_sample_dataset(tmp_path / "sample", SampleDataConfig(num_images=6, num_videos=1, image_size=64))
    cfg = load_config(overrides=["data.rows_per_shard=3", "data.stage_layout=per_stage", "data.shard_writers=2"])
    with ray_with_the_s3_settings():
        stats = build_dataset(cfg, input=str(sample), output=f"{s3}/per-stage", log=lambda _: None)
    assert stats["shards"]["finished"] == stats["shards"]["total"] >= 3
    assert stats["this_run"]["shards_written_by_driver"] == 0
    fs, root = filesystem(f"{s3}/per-stage")
    assert pq.read_table(f"{root}/samples", filesystem=fs).num_rows == stats["samples"] > 0
