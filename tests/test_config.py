import subprocess
import sys

import pytest
import yaml

from mpalign.config import CONFIG_DIR, Config, ConfigError, load_config


def test_default_is_tiny_and_every_shipped_config_loads():
    assert load_config().model.preset == "tiny"
    for path in CONFIG_DIR.glob("*.yaml"):
        cfg = load_config(path)
        assert isinstance(cfg, Config)
    one_gpu = load_config(CONFIG_DIR / "sdxl-1gpu-48gb.yaml")
    assert one_gpu.train.num_workers == 1 and one_gpu.model.num_tokens == 16  # inherited from sdxl.yaml


def test_overrides_are_typed():
    cfg = load_config(overrides=["train.lr=3e-4", "train.max_steps=7", "model.align_blocks=[down]",
                                 "data.cache_vae=false", "tune.alphas=0.1,0.2", "data.stages.detect.batch_size=3"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.train.max_steps == 7 and isinstance(cfg.train.max_steps, int)
    assert cfg.model.align_blocks == ["down"]
    assert cfg.data.cache_vae is False
    assert cfg.tune.alphas == [0.1, 0.2]
    assert cfg.data.stages["detect"].batch_size == 3


def test_round_trip_through_yaml(tmp_path):
    cfg = load_config(overrides=["train.output_dir=somewhere", "tune.num_samples=3", "data.path=ds"])
    saved = cfg.save(tmp_path / "resolved.yaml")
    again = load_config(saved)
    assert again == cfg
    assert yaml.safe_load(saved.read_text())["tune"]["num_samples"] == 3


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'. Did you mean 'lr'?"),
        ("trian.lr=1", "unknown config key 'trian'"),
        ("train.max_steps=abc", "'train.max_steps' must be an integer"),
        ("train.max_steps=1.5", "'train.max_steps' must be an integer"),
        ("data.cache_vae=maybe", "'data.cache_vae' must be true or false"),
        ("train.lr", "must look like key=value"),
        ("data.stages.detect.batchsize=2", "unknown config key 'data.stages.detect.batchsize'"),
    ],
)
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    assert fragment in str(err.value)


def test_unknown_key_in_file_lists_valid_keys(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_stepz: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(bad)
    assert "train.max_stepz" in str(err.value) and "train.max_steps" in str(err.value)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_cli_reports_config_errors_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "mpalign.zoo_summary", "--set", "model.presett=tiny"], check=False,
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: unknown config key 'model.presett'")
    assert "Traceback" not in proc.stderr
