"""A sweep trial's fidelity evaluation without Ray: fixed held-out requests, fixed latents, the evaluation's own
generation and scoring; and the scorers it uses (DINO v1, not the alignment teacher)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from test_eval_metrics import BOXES, compose, subject_image

from mpalign.config import ModelConfig, load_config
from mpalign.eval.fidelity import REPORTED, FidelityEvaluation, benchmark_requests, example_requests
from mpalign.eval.scoring import Scorers, generate_rows
from mpalign.pipeline import MPAlignPipeline
from mpalign.training.validation import ValidationExample
from mpalign.zoo import load_dino_scorer


def png(image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two freshly initialised adapters (model seeds 1 and 2), saved as training saves them."""
    root = tmp_path_factory.mktemp("fidelity-adapters")
    folders = []
    for seed in (1, 2):
        pipe = MPAlignPipeline.from_config(load_config(overrides=[f"model.seed={seed}", "model.device=cpu"]))
        folders.append(str(root / f"seed{seed}"))
        pipe.adapter.save_pretrained(folders[-1])
    return folders


def test_fixed_seeds_give_the_same_score_twice(adapters, tmp_path):
    cfg = load_config(overrides=["model.device=cpu", "tune.eval_steps=2"])
    examples = [ValidationExample("a checked tile and a striped tile", ["checked tile", "striped tile"], BOXES,
                                  [png(subject_image(0)), png(subject_image(1))]),
                ValidationExample("a checked tile", ["checked tile"], [[0.2, 0.2, 0.8, 0.9]], [png(subject_image(2))])]
    requests = example_requests(examples, tmp_path / "references", seed=cfg.tune.eval_seed)
    assert [len(r["references"]) for r in requests] == [2, 1]
    evaluation = FidelityEvaluation(cfg, requests, tmp_path / "fidelity", torch.device("cpu"))
    pipelines = [MPAlignPipeline.from_config(cfg, adapter_dir=folder) for folder in adapters]
    first = evaluation(pipelines[0], step=1)
    other = evaluation(pipelines[1], step=2)
    again = evaluation(pipelines[0], step=3)  # the scorers have seen the other adapter's images in between
    scores = [f"eval_{name}" for name in REPORTED]
    assert {k: first[k] for k in scores} == {k: again[k] for k in scores}
    assert all(first[k] != other[k] for k in ("eval_dino", "eval_clip_i"))
    assert first["eval_seconds"] > 0
    assert len(list((tmp_path / "fidelity" / "step_0000001").glob("*.png"))) == len(requests)


def test_generation_uses_the_configured_negative_prompt(adapters, tmp_path):
    """The release's default negative prompt conditions the unguided branch, so it changes the image."""
    cfg = load_config(overrides=["model.device=cpu", "eval.num_inference_steps=2"])
    assert cfg.eval.negative_prompt == "monochrome, lowres, bad anatomy, worst quality, low quality"
    reference = tmp_path / "ref.png"
    subject_image(3).save(reference)
    requests = [{"sample_id": "s", "prompt": "a tile", "phrases": ["tile"], "boxes": [[0.1, 0.1, 0.9, 0.9]],
                 "references": [[str(reference)]], "seed": 0}]
    pipe = MPAlignPipeline.from_config(cfg, adapter_dir=adapters[0])
    default = generate_rows(pipe, requests, cfg, "a", tmp_path / "default")[0]["image_path"]
    cfg.eval.negative_prompt = ""
    empty = generate_rows(pipe, requests, cfg, "a", tmp_path / "empty")[0]["image_path"]
    with open(default, "rb") as a, open(empty, "rb") as b:
        assert a.read() != b.read()


def test_dino_scores_use_dino_v1_not_the_alignment_teacher(tmp_path):
    """The default scorer is DINO v1 ViT-S/16 (a ViTModel); DINOv2 checkpoints load too, each by its model type,
    through from_pretrained as real weights do."""
    from transformers import Dinov2Model, ViTModel

    from mpalign.zoo import load_dinov2

    cfg = load_config(overrides=["model.device=cpu"])
    assert cfg.eval.dino_model == "facebook/dino-vits16"
    scorers = Scorers.load(cfg)
    assert isinstance(scorers.dino.model, ViTModel)
    tiny = ModelConfig(preset="tiny", device="cpu")
    for encoder, cls in ((scorers.dino, ViTModel), (load_dinov2(tiny), Dinov2Model)):
        folder = tmp_path / cls.__name__
        encoder.model.save_pretrained(folder)
        encoder.processor.save_pretrained(folder)
        loaded = load_dino_scorer(ModelConfig(preset="pretrained", device="cpu"), str(folder))
        assert type(loaded.model) is cls
        image = compose([subject_image(4)], [[0, 0, 1, 1]])
        pixels = loaded.processor(images=[image], return_tensors="pt").pixel_values
        assert torch.allclose(loaded.model(pixels).last_hidden_state, encoder.model(pixels).last_hidden_state,
                              atol=1e-5)


def test_a_benchmark_as_the_held_out_set(shared_data):
    """tune.eval_benchmark: its first tune.eval_samples samples (round-robin over groups, as mpalign.evaluate takes
    them), all from the latents of tune.eval_seed."""
    cfg = load_config(overrides=[f"eval.data_root={shared_data}", "tune.eval_benchmark=msbench", "tune.eval_samples=3",
                                 "tune.eval_seed=5", "eval.limit=1"])
    requests = benchmark_requests(cfg)
    assert len(requests) == 3 and {r["seed"] for r in requests} == {5}
    assert len({r["group"] for r in requests}) == 3
    assert all(Path(p).is_file() for r in requests for refs in r["references"] for p in refs)
