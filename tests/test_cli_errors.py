"""Every user mistake at every entry point ends in one ``error:`` line, a non-zero exit and no traceback, before any
model loads or Ray starts. Each entry point's ``main`` runs in-process (what ``python -m ...`` runs, minus the
interpreter start), so the cases cost milliseconds; one subprocess at the end checks the real command line."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from mpalign import convert_msdiffusion, evaluate, generate, train
from mpalign.cli import run_cli, user_error
from mpalign.config import ConfigError, load_config
from mpalign.data.schema import sample_schema
from mpalign.models.adapter import MSAdapter

REPO_ROOT = Path(__file__).resolve().parent.parent


def _script_main(path: str):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO_ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


BUILD, SWEEP = _script_main("pipelines/build_dataset.py"), _script_main("tune/sweep_alpha.py")
ENTRY_POINTS = {"build": BUILD, "train": train.main, "sweep": SWEEP, "evaluate": evaluate.main,
                "generate": generate.main, "convert": convert_msdiffusion.main}


@pytest.fixture
def place(tmp_path, monkeypatch):
    """Planted files, named by what is wrong with them; the environment restored after run_cli quietens it."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        monkeypatch.setenv(name, os.environ[name])
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a-folder").mkdir()
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "empty.jsonl").write_text("\n\n")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 this is not parquet")
    (tmp_path / "latin1.yaml").write_bytes("# caf\xe9\ntrain:\n  lr: 1.0e-3\n".encode("latin-1"))
    (tmp_path / "broken-base.yaml").write_text("base: nowhere.yaml\n")
    (tmp_path / "folder-base.yaml").write_text("base: a-folder\n")
    (tmp_path / "cycle.yaml").write_text("base: cycle.yaml\n")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    Image.new("RGB", (64, 64), "red").save(tmp_path / "subject.png")
    _dataset(tmp_path / "only-rejects", [])
    _dataset(tmp_path / "enough", ["train"] * 8, columns_only=True)
    (tmp_path / "empty-samples" / "samples").mkdir(parents=True)
    (tmp_path / "foreign" / "samples").mkdir(parents=True)
    (tmp_path / "foreign" / "samples" / "x.parquet").write_text("hello")
    _adapters(tmp_path)
    _checkpoints(tmp_path)
    _resumable_run(tmp_path)
    return tmp_path


def _dataset(root: Path, splits: list[str], columns_only: bool = False) -> None:
    (root / "samples").mkdir(parents=True)
    table = pa.table({"split": splits}) if columns_only else pa.Table.from_pylist(
        [], schema=sample_schema(load_config().data))
    pq.write_table(table, root / "samples" / "shard-00000.parquet")


def _adapters(root: Path) -> None:
    adapter = MSAdapter([8, 8], 8, 8, 8, max_subjects=2, num_tokens=2, num_dummy_tokens=1, resampler_dim=8,
                        resampler_depth=1, resampler_heads=1, resampler_dim_head=8, resampler_ff_mult=1, fourier_freqs=2)
    adapter.save_pretrained(root / "adapter-ok")
    (root / "adapter-config-only").mkdir()
    (root / "adapter-config-only" / "config.json").write_bytes((root / "adapter-ok" / "config.json").read_bytes())
    for name, damage in (("adapter-truncated", "weights"), ("adapter-bad-json", "config")):
        folder = root / name
        folder.mkdir()
        for file in (root / "adapter-ok").iterdir():
            data = file.read_bytes()
            if damage == "weights" and file.suffix == ".safetensors":
                data = data[: len(data) // 2]
            if damage == "config" and file.name == "config.json":
                data = data[:-10]
            (folder / file.name).write_bytes(data)


def _checkpoints(root: Path) -> None:
    (root / "empty.bin").write_bytes(b"")
    (root / "text.bin").write_text("hello")
    torch.save(torch.zeros(3), root / "tensor.bin")
    torch.save({"image_proj": [1], "ms_adapter": {}, "dummy_image_tokens": torch.zeros(1, 1, 8)}, root / "wrong.bin")
    torch.save({"image_proj": {"proj_in.weight": torch.zeros(8, 8)}, "ms_adapter": {},
                "dummy_image_tokens": torch.zeros(1, 1, 8)}, root / "official-ish.bin")


def _resumable_run(root: Path) -> None:
    """A run whose checkpoints were trained with model.num_tokens=4 (tiny.yaml's value)."""
    out = root / "run-out"
    (out / train.RUN_NAME / "checkpoint_000001").mkdir(parents=True)
    load_config(overrides=["data.path=enough"]).save(out / "config.yaml")


SUBJECT = ["--prompt", "a ball", "--subject", "subject.png", "--box", "0.1,0.1,0.5,0.5", "--phrase", "ball"]
CASES = {  # id: (entry point, argv, a fragment the error line must hold)
    "build-max-shards-negative": ("build", ["--max-shards", "-1", "--output", "out"], "--max-shards"),
    "build-output-is-a-file": ("build", ["--output", "a-file"], "is a file"),
    "build-output-under-a-file": ("build", ["--output", "a-file/out"], "cannot be created"),
    "build-input-empty": ("build", ["--input", "empty.jsonl", "--output", "out"], "holds no records"),
    "build-input-broken-parquet": ("build", ["--input", "broken.parquet", "--output", "out"], "Parquet"),
    "config-is-a-folder": ("build", ["--config", "a-folder"], "is not a file"),
    "config-missing": ("build", ["--config", "nowhere.yaml"], "does not exist"),
    "config-not-utf8": ("build", ["--config", "latin1.yaml"], "not UTF-8"),
    "config-broken-base": ("build", ["--config", "broken-base.yaml"], "nowhere.yaml"),
    "config-base-is-a-folder": ("build", ["--config", "folder-base.yaml"], "is not a file"),
    "config-base-cycle": ("build", ["--config", "cycle.yaml"], "cycle"),
    "config-not-a-mapping": ("build", ["--config", "list.yaml"], "mapping"),
    "image-size-negative": ("build", ["--set", "data.image_size=-3"], "data.image_size"),
    "val-fraction-above-one": ("build", ["--set", "data.val_fraction=5"], "data.val_fraction"),
    "caption-language-unknown": ("build", ["--set", "data.caption_language=de"], "data.caption_language"),
    "align-blocks-number": ("train", ["--set", "model.align_blocks=5"], "model.align_blocks"),
    "method-unknown": ("train", ["--set", "model.method=ip_adapter"], "model.method"),
    "mosaic-loss-block-unknown": ("train", ["--set", "model.mosaic_loss_blocks=[down]"], "model.mosaic_loss_blocks"),
    "mosaic-beta-negative": ("sweep", ["--set", "tune.betas=[-1]"], "tune.betas"),
    "lr-nan": ("train", ["--set", "train.lr=nan"], "train.lr"),
    "lr-inf": ("train", ["--set", "train.lr=.inf"], "train.lr"),
    "batch-size-zero": ("train", ["--set", "train.batch_size=0"], "train.batch_size"),
    "eval-batch-size-zero": ("evaluate", ["--set", "eval.batch_size=0"], "eval.batch_size"),
    "stage-batch-size-zero": ("build", ["--set", "data.stages.decode.batch_size=0"], "batch_size"),
    "train-only-rejects": ("train", ["--set", "data.path=only-rejects"], "0 train samples"),
    "train-empty-samples": ("train", ["--set", "data.path=empty-samples"], "no Parquet shards"),
    "train-foreign-samples": ("train", ["--set", "data.path=foreign"], "not a shard"),
    "train-output-is-a-file": ("train", ["--set", "data.path=enough", "--set", "train.output_dir=a-file"], "a file"),
    "train-resume-other-sizes": ("train", ["--resume", "--set", "data.path=enough", "--set", "train.output_dir=run-out",
                                           "--set", "model.num_tokens=8"], "model.num_tokens: 4 -> 8"),
    "sweep-unknown-metric": ("sweep", ["--set", "tune.metric=accuracy"], "tune.metric"),
    "sweep-output-is-a-file": ("sweep", ["--set", "tune.output_dir=a-file"], "a file"),
    "generate-out-without-extension": ("generate", [*SUBJECT, "--out", "picture"], "image file extension"),
    "generate-out-text-extension": ("generate", [*SUBJECT, "--out", "picture.txt"], "image file extension"),
    "generate-out-under-a-file": ("generate", [*SUBJECT, "--out", "a-file/x.png"], "cannot be created"),
    "generate-out-is-a-folder": ("generate", [*SUBJECT, "--out", "folder.png"], "is a folder"),
    "generate-out-on-s3": ("generate", [*SUBJECT, "--out", "s3://bucket/x.png"], "must be a local or shared file"),
    "generate-adapter-config-only": ("generate", [*SUBJECT, "--out", "x.png", "--adapter", "adapter-config-only"],
                                     "no weights"),
    "generate-mosaic-controlnet": ("generate", [*SUBJECT, "--out", "x.png", "--set", "model.method=mosaic",
                                               "--controlnet", "cn", "--control-image", "subject.png"],
                                   "--controlnet are MS-Diffusion adapter (SDXL) options"),
    "generate-mosaic-auto-layout": ("generate", [*SUBJECT, "--out", "x.png", "--set", "model.method=mosaic",
                                                "--auto-layout-threshold", "0.5"], "model.method=mosaic"),
    "generate-mosaic-toy-without-flux": ("generate", [*SUBJECT, "--out", "x.png", "--set", "model.method=mosaic",
                                                     "--set", "model.preset=toy", "--set", "model.toy_weights=a-folder"],
                                         "toy preset's 'flux' weights are not at"),
    "evaluate-out-is-a-file": ("evaluate", ["--out", "a-file"], "is a file"),
    "evaluate-out-on-s3": ("evaluate", ["--out", "s3://bucket/eval"], "--out 's3://bucket/eval' must be a local"),
    "evaluate-adapter-config-only": ("evaluate", ["--adapter", "adapter-config-only", "--out", "ev"], "no weights"),
    "evaluate-adapter-truncated": ("evaluate", ["--adapter", "adapter-truncated", "--out", "ev"], "cannot load"),
    "evaluate-adapter-bad-json": ("evaluate", ["--adapter", "adapter-bad-json", "--out", "ev"], "cannot load"),
    "convert-empty": ("convert", ["empty.bin", "conv"], "is empty"),
    "convert-text": ("convert", ["text.bin", "conv"], "not a readable torch checkpoint"),
    "convert-folder": ("convert", ["a-folder", "conv"], "is a folder"),
    "convert-tensor": ("convert", ["tensor.bin", "conv"], "holds a Tensor"),
    "convert-wrong-entry-type": ("convert", ["wrong.bin", "conv"], "image_proj"),
    "convert-dim-head-zero": ("convert", ["official-ish.bin", "conv", "--dim-head", "0"], "--dim-head"),
    "convert-out-is-a-file": ("convert", ["official-ish.bin", "a-file"], "is a file"),
    "convert-out-on-s3": ("convert", ["official-ish.bin", "s3://bucket/conv"], "must be a local or shared folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_user_mistake_is_one_error_line(case, place, capsys, monkeypatch):
    entry, argv, fragment = CASES[case]
    monkeypatch.setattr("ray.init", lambda *a, **k: pytest.fail("Ray started before the mistake was found"))
    main = ENTRY_POINTS[entry]
    code = main(argv) if entry in ("generate", "convert") else run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    errors = [line for line in err if line.startswith("error:")]
    assert len(errors) == 1 and not any("Traceback" in line for line in err), err
    assert fragment in errors[0], errors[0]
    assert not (place / "s3:").exists()  # a URI where only local paths work must not become a folder named "s3:"


def test_a_resume_refused_leaves_the_runs_config_as_it_was(place, capsys):
    before = (place / "run-out" / "config.yaml").read_text()
    assert run_cli(train.main, ["--resume", "--set", "data.path=enough", "--set", "train.output_dir=run-out",
                                "--set", "model.resampler_depth=3"]) == 2
    assert (place / "run-out" / "config.yaml").read_text() == before


def test_a_decompression_bomb_subject_is_one_error_line(place, capsys, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the 64x64 subject is then > 2x the limit: a bomb
    assert generate.main([*SUBJECT, "--out", "x.png"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: cannot read subject image")


def test_user_mistakes_raised_inside_ray_are_unwrapped(capsys):
    """Ray hands the driver an error raised in an actor or a training worker wrapped, with a remote traceback as
    its text; the one line is the mistake's own message."""
    from ray.exceptions import RayTaskError
    from ray.train import ControllerError, WorkerGroupError

    inner = ConfigError("model.sdxl 'x' does not fit")
    wrapped = RayTaskError("Actor.method", "Traceback (most recent call last):\n  ...", inner).as_instanceof_cause()
    assert user_error(wrapped) is inner
    train_failure = WorkerGroupError("workers failed", {0: wrapped})
    assert user_error(train_failure) is inner
    assert user_error(ControllerError(train_failure)) is inner
    assert user_error(RayTaskError("f", "tb", ZeroDivisionError("bug"))) is None
    as_text = RayTaskError("MapBatches(Score)", "Traceback ...\nmpalign.zoo.IncompatibleModelError: the adapter does "
                           "not fit these models: phrase width 8 vs 32", RuntimeError("UDF failed"))
    assert str(user_error(as_text)) == "the adapter does not fit these models: phrase width 8 vs 32"

    def main(_argv):
        raise train_failure

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.strip() == "error: model.sdxl 'x' does not fit"


def test_a_bug_still_shows_its_traceback():
    def main(_argv):
        raise ZeroDivisionError("a bug, not a user mistake")

    with pytest.raises(ZeroDivisionError):
        run_cli(main, [])


def test_the_command_line_prints_one_error_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mpalign.train", "--set", "train.lr=nan"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: config key 'train.lr' must be a finite number, got 'nan'"], proc.stderr


def test_configs_resolve_from_the_package_and_outputs_from_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/sdxl.yaml").model.preset == "pretrained"  # shipped configs found from anywhere
    assert load_config("tiny.yaml").model.preset == "tiny"
    from mpalign.sample_data import default_sample_dir

    assert default_sample_dir() == tmp_path / "outputs" / "sample-input"
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "tiny.yaml").write_text(json.dumps({"train": {"lr": 0.5}}))
    assert load_config("configs/tiny.yaml").train.lr == 0.5, "a user's own file wins over the shipped one"


def test_the_console_keeps_ray_datas_detail_in_its_log_file_unless_verbose(monkeypatch):
    import logging

    from ray.data._internal.logging import configure_logging

    from mpalign.cli import VERBOSE_ENV, quiet_console, verbose_console

    for name in ("RAY_DATA_LOGGING_CONFIG", "PYTHONWARNINGS", "RAY_AIR_NEW_OUTPUT", VERBOSE_ENV):
        monkeypatch.delenv(name, raising=False)
    quiet_console(verbose=True)
    assert "RAY_DATA_LOGGING_CONFIG" not in os.environ and "PYTHONWARNINGS" not in os.environ
    assert verbose_console(), "Ray's INFO lines, Ray Train's and Tune's tables come back with --verbose"
    quiet_console(verbose=False)
    assert not verbose_console() and os.environ["RAY_AIR_NEW_OUTPUT"] == "0"  # Tune's silent console engine
    try:
        configure_logging()  # what Ray Data runs when it is imported, in the driver and in every worker
        handlers = {type(h).__name__: h for h in logging.getLogger("ray.data").handlers}
        assert handlers["PlainRayHandler"].level == logging.WARNING, "execution plans and progress stay off the console"
        assert "SessionFileHandler" in handlers and logging.getLogger("ray.data").level == logging.DEBUG
        assert os.environ["PYTHONWARNINGS"] == "ignore"  # inherited by Ray's workers: no deprecation warnings
    finally:
        monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG")
        configure_logging()


@pytest.mark.parametrize("verbose", [False, True])
def test_commands_whose_driver_reports_everything_keep_worker_output_in_rays_logs(monkeypatch, verbose):
    """The build, the sweep and the evaluation start Ray with worker_logs=False: an actor's library warnings and a
    stopped trial's traceback stay in Ray's logs unless --verbose; training keeps them (its progress is a worker's)."""
    import ray

    from mpalign.cli import FOOTER_READERS_ENV, VERBOSE_ENV, start_ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv(VERBOSE_ENV, "1") if verbose else monkeypatch.delenv(VERBOSE_ENV, raising=False)
    start_ray(worker_logs=False)
    start_ray()
    assert [c["log_to_driver"] for c in calls] == [verbose, True]
    assert all(FOOTER_READERS_ENV in c["runtime_env"]["env_vars"] for c in calls)
