"""MOSAIC (model.method=mosaic): the reference-only LoRA, position ids, SCAL and MDL, correspondence data, and the
tiny model learning."""

from __future__ import annotations

import io
import math
import shutil

import numpy as np
import pytest
import torch
from model_batches import one_thread
from PIL import Image

from mpalign import zoo
from mpalign.config import ConfigError, ModelConfig, load_config
from mpalign.data.correspondence import (
    Matches,
    enforce_disjoint,
    match_subjects,
    mutual_nearest_neighbours,
    target_region_tokens,
)
from mpalign.methods import adapter_method, check_adapter, check_dataset_columns, check_method
from mpalign.models.mosaic import (
    LORA_TARGETS,
    MOSAIC_ADAPTER,
    MosaicAdapter,
    MosaicContext,
    _on_references,
    correspondence_queries,
    loss_blocks,
    mdl_loss,
    position_ids,
    run_transformer,
    scal_loss,
)
from mpalign.zoo import IncompatibleModelError, ModelLoadError


@pytest.fixture(autouse=True)
def single_thread():
    with one_thread():
        yield


@pytest.fixture
def flux():
    """A fresh tiny FLUX per test (a tenth of a second): attaching an adapter injects peft layers into it."""
    return zoo.load_flux(ModelConfig(preset="tiny", device="cpu"))


def _inputs(flux, batch=2, refs=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = flux.transformer.config
    return {"target_tokens": torch.randn(batch, 16, cfg.in_channels, generator=g),
            "reference_tokens": torch.randn(batch, refs * 4, cfg.in_channels, generator=g),
            "target_grid": (4, 4), "reference_grid": (2, 2),
            "text": torch.randn(batch, 5, cfg.joint_attention_dim, generator=g),
            "pooled": torch.randn(batch, cfg.pooled_projection_dim, generator=g),
            "timestep": torch.full((batch,), 0.5), "guidance": torch.full((batch,), 1.0)}


def _stock_output(flux, inputs):
    """The frozen transformer's own processors on the same token stream (target + references, same ids)."""
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    transformer = flux.transformer
    transformer.set_attn_processor(FluxAttnProcessor())
    target, refs = inputs["target_tokens"], inputs["reference_tokens"]
    ids = position_ids(inputs["target_grid"], [inputs["reference_grid"]] * (refs.shape[1] // 4))
    out = transformer(hidden_states=torch.cat((target, refs), 1), encoder_hidden_states=inputs["text"],
                      pooled_projections=inputs["pooled"], timestep=inputs["timestep"], img_ids=ids,
                      txt_ids=torch.zeros(inputs["text"].shape[1], 3), guidance=inputs["guidance"],
                      return_dict=False)[0]
    return out[:, :target.shape[1]]


def _randomise(adapter):
    with torch.no_grad():
        for p in adapter.parameters():
            p.normal_(0, 0.5)


@torch.no_grad()
def test_zero_lora_leaves_the_model_as_it_was_and_lora_acts_on_reference_tokens_only(flux):
    inputs = _inputs(flux)
    stock = _stock_output(flux, inputs)
    no_refs = {**inputs, "reference_tokens": inputs["reference_tokens"][:, :0]}
    stock_no_refs = _stock_output(flux, no_refs)
    adapter = MosaicAdapter.fresh(rank=4, max_subjects=4)
    adapter.attach(flux.transformer)
    # a fresh (zero) LoRA: the target outputs are the frozen model's
    torch.testing.assert_close(run_transformer(flux.transformer, **inputs, ctx=MosaicContext(0, 0)), stock)
    _randomise(adapter)
    # a non-zero LoRA never touches text or target tokens: without references the model is the frozen one ...
    torch.testing.assert_close(run_transformer(flux.transformer, **no_refs, ctx=MosaicContext(0, 0)), stock_no_refs)
    # ... and with references it changes the target only through the references
    changed = run_transformer(flux.transformer, **inputs, ctx=MosaicContext(0, 0))
    assert (changed - stock).abs().max() > 1e-3


@torch.no_grad()
def test_padded_reference_slots_are_invisible(flux):
    adapter = MosaicAdapter.fresh(rank=4, max_subjects=4)
    adapter.attach(flux.transformer)
    _randomise(adapter)
    inputs = _inputs(flux, batch=1, refs=2)
    one_ref = {**inputs, "reference_tokens": inputs["reference_tokens"][:, :4]}
    expected = run_transformer(flux.transformer, **one_ref, ctx=MosaicContext(0, 0))
    # the second slot holds garbage but is masked out: the target sees only the first reference
    mask = torch.tensor([[True] * 4 + [False] * 4])
    masked = run_transformer(flux.transformer, **inputs, ctx=MosaicContext(0, 0, reference_mask=mask))
    torch.testing.assert_close(masked, expected)


def _lora_names(transformer):
    return sorted(name.split(".lora_")[0] for name, _ in transformer.named_parameters()
                  if f".lora_A.{MOSAIC_ADAPTER}." in name)


@torch.no_grad()
def test_reference_lora_is_peft_lora_on_the_projections_and_touches_reference_tokens_only(flux):
    """The LoRA is peft's, injected on q/k/v of every attention layer and to_out of dual-stream blocks; with non-zero
    weights each projection of the text and target tokens is the frozen base layer's, of the references peft's own
    LoRA forward (base + B A x)."""
    from peft.tuners.lora import LoraLayer

    adapter = MosaicAdapter.fresh(rank=4, max_subjects=4)
    adapter.attach(flux.transformer)
    _randomise(adapter)
    dual = [f"transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_k", "to_out.0", "to_q", "to_v")]
    single = [f"single_transformer_blocks.{i}.attn.{p}" for i in range(2) for p in ("to_k", "to_q", "to_v")]
    assert _lora_names(flux.transformer) == sorted(dual + single)
    assert {id(p) for p in adapter.parameters()} == {id(p) for p in flux.transformer.parameters() if p.requires_grad}
    x = torch.randn(2, 9, flux.transformer.inner_dim, generator=torch.Generator().manual_seed(1))
    for name in ("transformer_blocks.0.attn.to_q", "transformer_blocks.1.attn.to_out.0",
                 "single_transformer_blocks.1.attn.to_v"):
        layer = flux.transformer.get_submodule(name)
        assert isinstance(layer, LoraLayer)
        out = _on_references(layer, x, 3)
        torch.testing.assert_close(out[:, :6], layer.base_layer(x)[:, :6])  # text / target tokens: frozen
        torch.testing.assert_close(out[:, 6:], layer(x)[:, 6:])  # references: peft's LoRA forward
        assert (out[:, 6:] - layer.base_layer(x)[:, 6:]).abs().max() > 1e-3
        torch.testing.assert_close(_on_references(layer, x, 0), layer.base_layer(x))


@torch.no_grad()
def test_adapter_folder_is_a_peft_lora_and_round_trips(flux, tmp_path):
    """save_pretrained writes peft's adapter files (LoraConfig + LoRA weights under peft's key names); loading them
    into a fresh transformer gives the same outputs."""
    from peft import LoraConfig
    from safetensors.torch import load_file

    inputs = _inputs(flux)
    adapter = MosaicAdapter.fresh(rank=4, max_subjects=3)
    adapter.attach(flux.transformer)
    _randomise(adapter)
    expected = run_transformer(flux.transformer, **inputs, ctx=MosaicContext(0, 0))
    adapter.save_pretrained(tmp_path / "adapter")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"config.json", "adapter_config.json",
                                                                    "adapter_model.safetensors"}
    lora = LoraConfig.from_pretrained(str(tmp_path / "adapter"))
    assert (lora.r, lora.lora_alpha, lora.target_modules) == (4, 4, LORA_TARGETS)
    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert len(weights) == 2 * 14 and weights["transformer_blocks.0.attn.to_q.lora_A.weight"].shape == (4, 32)
    assert weights["transformer_blocks.0.attn.to_q.lora_B.weight"].shape == (32, 4)

    other = zoo.load_flux(ModelConfig(preset="tiny", device="cpu"))
    loaded = MosaicAdapter.from_pretrained(tmp_path / "adapter")
    assert loaded.config.max_subjects == 3 and loaded.rank == 4
    loaded.attach(other.transformer)
    torch.testing.assert_close(run_transformer(other.transformer, **inputs, ctx=MosaicContext(0, 0)), expected)
    assert check_adapter(tmp_path / "adapter") is None and adapter_method(tmp_path / "adapter") == "mosaic"


def test_damaged_or_unfitting_adapter_folders_are_one_line_errors(flux, tmp_path):
    adapter = MosaicAdapter.fresh(rank=4, max_subjects=4)
    adapter.attach(flux.transformer)
    adapter.save_pretrained(tmp_path / "ok")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MosaicAdapter.from_pretrained(tmp_path)
    for name, damage in (("no-weights", "adapter_model.safetensors"), ("no-lora-config", "adapter_config.json")):
        shutil.copytree(tmp_path / "ok", tmp_path / name)
        (tmp_path / name / damage).unlink()
        with pytest.raises(ModelLoadError, match=f"no {damage}"):
            check_adapter(tmp_path / name)
    shutil.copytree(tmp_path / "ok", tmp_path / "truncated")
    weights = tmp_path / "truncated" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelLoadError, match="cannot load the MOSAIC LoRA"):
        check_adapter(tmp_path / "truncated")
    shutil.copytree(tmp_path / "ok", tmp_path / "bad-json")
    (tmp_path / "bad-json" / "config.json").write_text("{")
    with pytest.raises(ModelLoadError, match="cannot load the adapter config"):
        check_adapter(tmp_path / "bad-json")
    # another rank: the weights do not fit this transformer's LoRA
    other = MosaicAdapter.fresh(rank=2, max_subjects=4)
    other.attach(zoo.load_flux(ModelConfig(preset="tiny", device="cpu")).transformer)
    other.save_pretrained(tmp_path / "rank-2")
    with pytest.raises(IncompatibleModelError, match="28 of other shapes"):
        adapter.load_state_dict(MosaicAdapter.from_pretrained(tmp_path / "rank-2").weights)


def test_position_ids_keep_references_apart():
    ids = position_ids((8, 8), [(4, 4)] * 5)
    assert ids.shape == (64 + 5 * 16, 3)
    assert len({tuple(r) for r in ids.tolist()}) == len(ids)  # no two tokens share a position
    target = ids[:64]
    spans = [(target[:, 1].min(), target[:, 1].max(), target[:, 2].min(), target[:, 2].max())]
    for k in range(5):
        ref = ids[64 + 16 * k:64 + 16 * (k + 1)]
        assert (ref[:, 0] == k + 1).all()
        spans.append((ref[:, 1].min(), ref[:, 1].max(), ref[:, 2].min(), ref[:, 2].max()))
    for a in range(len(spans)):
        for b in range(a + 1, len(spans)):  # row ranges and column ranges both disjoint
            assert spans[a][1] < spans[b][0] and spans[a][3] < spans[b][2]


def test_loss_blocks_are_thirds_of_the_block_sequence(flux):
    assert loss_blocks(flux.transformer, ["early"]) == ["transformer_blocks.0", "transformer_blocks.1"]
    assert loss_blocks(flux.transformer, ["middle", "late"]) == ["single_transformer_blocks.0",
                                                                  "single_transformer_blocks.1"]
    with pytest.raises(ValueError, match="mosaic_loss_blocks"):
        loss_blocks(flux.transformer, ["first"])


def _points():
    """Two subjects of one sample: subject 0 with 2 points, subject 1 with 1 (eq. 10 averages per subject)."""
    ref_tokens = torch.tensor([[[0, 1], [2, 0]]])
    target_tokens = torch.tensor([[[3, 5], [7, 0]]])
    mask = torch.tensor([[[True, True], [True, False]]])
    index, subject, flat_mask = correspondence_queries(ref_tokens, mask, tokens_per_reference=4)
    return index, subject, flat_mask, target_tokens.reshape(1, -1)


def test_correspondence_queries_offset_by_the_earlier_references():
    index, subject, mask, _ = _points()
    assert index.tolist() == [[0, 1, 6, 4]]  # eq. 9: G(u) = 4 * k + u
    assert subject.tolist() == [[0, 0, 1, 1]]
    assert mask.tolist() == [[True, True, True, False]]


def test_scal_is_minimal_when_attention_sits_on_the_corresponding_tokens():
    _, subject, mask, target = _points()
    n = 8
    on_target = torch.nn.functional.one_hot(target, n).float()
    assert scal_loss(on_target, target, subject, mask, 2).item() == pytest.approx(0.0, abs=1e-6)
    uniform = torch.full((1, 4, n), 1.0 / n)
    assert scal_loss(uniform, target, subject, mask, 2).item() == pytest.approx(math.log(n), rel=1e-5)
    for seed in range(5):
        random_maps = torch.randn(1, 4, n, generator=torch.Generator().manual_seed(seed)).softmax(-1)
        assert scal_loss(random_maps, target, subject, mask, 2) > scal_loss(on_target, target, subject, mask, 2)


def test_scal_follows_eq10_per_subject_means():
    _, subject, mask, target = _points()
    maps = torch.full((1, 4, 8), 0.01)
    maps[0, 0, 3], maps[0, 1, 5], maps[0, 2, 7] = 0.5, 0.25, 0.125
    expected = -0.5 * ((math.log(0.5) + math.log(0.25)) / 2 + math.log(0.125))
    assert scal_loss(maps, target, subject, mask, 2).item() == pytest.approx(expected, rel=1e-5)


def test_mdl_is_zero_for_identical_maps_and_negative_symmetric_kl_otherwise():
    _, subject, mask, _ = _points()
    same = torch.rand(1, 1, 8).expand(1, 4, 8)
    assert mdl_loss(same, subject, mask, 2).item() == pytest.approx(0.0, abs=1e-6)
    maps = torch.zeros(1, 4, 2)
    maps[0, :2] = torch.tensor([0.75, 0.25])  # subject 0's aggregated map
    maps[0, 2] = torch.tensor([0.25, 0.75])  # subject 1's
    kl = 0.75 * math.log(3) + 0.25 * math.log(1 / 3)
    assert mdl_loss(maps, subject, mask, 2).item() == pytest.approx(-kl, rel=1e-5)


def test_mutual_nearest_neighbours_recover_a_permutation():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(9, 16))
    perm = rng.permutation(9)
    target = ref[perm] + 0.01 * rng.normal(size=(9, 16))
    m = mutual_nearest_neighbours(ref, target, np.ones(9, bool), np.ones(9, bool), 0.5)
    assert len(m) == 9
    assert all(perm[v] == u for u, v in zip(m.ref_tokens, m.target_tokens))
    region = np.zeros(9, bool)
    region[:3] = True
    inside = mutual_nearest_neighbours(ref, target, np.ones(9, bool), region, 0.5)
    assert set(inside.target_tokens.tolist()) <= {0, 1, 2}


def test_correspondences_are_disjoint_across_references():
    contested = [Matches(np.array([0, 1]), np.array([5, 6]), np.array([0.9, 0.4])),
                 Matches(np.array([3, 2]), np.array([6, 7]), np.array([0.8, 0.7]))]
    kept = enforce_disjoint(contested)
    assert kept[0].target_tokens.tolist() == [5] and kept[1].target_tokens.tolist() == [6, 7]
    rng = np.random.default_rng(1)
    target = rng.normal(size=(16, 8))
    refs = [target[[0, 1, 2, 3]] + 0.05 * rng.normal(size=(4, 8)), target[[2, 3, 4, 5]] + 0.05 * rng.normal(size=(4, 8))]
    matches = match_subjects(refs, [np.ones(4, bool)] * 2, target, [np.ones(16, bool)] * 2, 0.0, max_points=150)
    claimed = [set(m.target_tokens.tolist()) for m in matches]
    assert claimed[0] and claimed[1] and not claimed[0] & claimed[1]


def test_target_region_uses_the_mask_and_small_boxes_keep_a_token():
    mask = np.zeros((64, 64), bool)
    mask[:32, :16] = True
    region = target_region_tokens([0.0, 0.0, 0.5, 0.5], mask, 4).reshape(4, 4)
    assert region[:2, :1].all() and region.sum() == 2
    assert target_region_tokens([0.3, 0.3, 0.32, 0.32], None, 4).sum() == 1


def _png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_correspondence_stage_matches_disjointly_and_rejects_poor_matches():
    from mpalign.data.schema import encode_png
    from mpalign.data.stages import CorrespondenceStage

    cfg = load_config("configs/tiny-mosaic.yaml")
    image = np.full((128, 128, 3), 90, np.uint8)
    image[16:80, 16:64] = (220, 30, 30)
    image[64:128, 80:128] = (30, 30, 220)
    crops = [np.full((64, 64, 3), 255, np.uint8) for _ in range(2)]
    crops[0][8:56, 16:48], crops[1][8:56, 8:56] = (220, 30, 30), (30, 30, 220)
    masks = [np.zeros((128, 128), bool) for _ in range(2)]
    masks[0][16:80, 16:64], masks[1][64:128, 80:128] = True, True

    def row():
        return {"reject_reason": None, "image": _png(image), "crops": [_png(c) for c in crops],
                "masks": [encode_png(m) for m in masks], "boxes": [[0.125, 0.125, 0.5, 0.625], [0.625, 0.5, 1.0, 1.0]],
                "phrases": ["red box", "blue box"]}

    rows = CorrespondenceStage(cfg).run([row()])
    assert rows[0]["reject_reason"] is None
    refs, targets = rows[0]["correspondence_ref_tokens"], rows[0]["correspondence_target_tokens"]
    assert all(len(points) >= 1 for points in refs) and [len(u) for u in refs] == [len(v) for v in targets]
    assert not set(targets[0]) & set(targets[1])
    assert all(0 <= u < 16 for points in refs for u in points) and all(0 <= v < 64 for p in targets for v in p)
    cfg.data.correspondence_min_points = 1000
    rejected = CorrespondenceStage(cfg).run([row()])[0]
    assert rejected["reject_reason"] == "poor_correspondence" and "'red box'" in rejected["reject_detail"]
    cfg.data.correspondences = False  # off: rows pass through untouched
    assert CorrespondenceStage(cfg).run([row()])[0].get("correspondence_ref_tokens") is None


def test_method_switch_errors_are_config_errors():
    with pytest.raises(ConfigError, match="model.method"):
        check_method(load_config(overrides=["model.method=moasic"]))
    cfg = load_config("configs/tiny-mosaic.yaml")
    with pytest.raises(ConfigError, match="data.correspondences=true"):
        check_dataset_columns(cfg, ["id", "image"])
    check_dataset_columns(cfg, ["correspondence_ref_tokens", "correspondence_target_tokens"])


def test_tiny_mosaic_learns(tmp_path):
    """A few steps on one fixed batch (fixed noise and times) lower the total loss, SCAL included; the LoRA is all that
    trains, and a checkpoint's adapter loads back in place."""
    from mpalign.data.mosaic_batch import tokenize_for_flux
    from mpalign.models.mosaic_training import MosaicTrainingModule

    cfg = load_config("configs/tiny-mosaic.yaml", ["train.warmup_steps=0"])
    module = MosaicTrainingModule.from_config(cfg, device="cpu")
    g = torch.Generator().manual_seed(0)
    ids, t5 = tokenize_for_flux(cfg.model, ["a red ball and a cat", "a dog"])
    mask = torch.tensor([[True, True, False, False], [True, False, False, False]])
    batch = {"pixel_values": torch.rand(2, 3, 64, 64, generator=g) * 2 - 1,
             "reference_pixels": torch.rand(2, 4, 3, 32, 32, generator=g), "subject_mask": mask,
             "boxes": torch.zeros(2, 4, 4), "input_ids": ids, "t5_input_ids": t5,
             "ref_tokens": torch.randint(0, 4, (2, 4, 3), generator=g),
             "target_tokens": torch.randint(0, 16, (2, 4, 3), generator=g),
             "point_mask": mask[..., None].expand(2, 4, 3).clone()}
    params = module.trainable_parameters()
    assert len(params) == 28 and {id(p) for p in params} == {id(p) for p in module.parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    module.train()
    losses = []
    for step in range(12):
        out = module(batch, step, generator=torch.Generator().manual_seed(0))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append((float(out["loss"]), float(out["scal"])))
    assert losses[-1][0] < 0.95 * losses[0][0]
    assert losses[-1][1] < losses[0][1]
    module.save_adapter(tmp_path / "adapter")
    trained = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.zero_()
    module.load_adapter(tmp_path / "adapter")
    assert all(torch.equal(p, q) for p, q in zip(module.trainable_parameters(), trained))
    assert all(a is b for a, b in zip(module.trainable_parameters(), params))  # in place: the optimizer's references


def test_mosaic_sweep_space_sets_scal_and_mdl_weights_and_loss_blocks(tmp_path):
    from mpalign.sweep import apply_params, best_row, check_tune_config, expected_trials, grid_points, trial_params

    cfg = load_config("configs/tiny-mosaic.yaml", ["tune.seeds=[0,1]"])
    check_tune_config(cfg)
    points = grid_points(cfg)
    assert all(set(p) == {"alpha", "beta", "layer_set", "seed"} for p in points)
    # alpha = 0 is no idle trial for MOSAIC (MDL still reads the blocks): every point of the product runs
    assert len(points) == len({tuple(sorted(p.items())) for p in points}) == expected_trials(cfg) == 2 * 2 * 2 * 2
    params = trial_params({"point": points[0]}, cfg)
    assert math.isnan(params["lambda_self"]) and params["loss_extras"] == "none"  # ms_adapter's knobs do not apply
    trial = apply_params(cfg, {"alpha": 0.2, "beta": 0.3, "layer_set": "early+late", "seed": 1})
    assert (trial.train.alpha, trial.train.beta, trial.model.mosaic_loss_blocks) == (0.2, 0.3, ["early", "late"])
    assert trial.train.seed == 1

    def row(beta, seed, value):  # results.csv rows: lambda_self is ms_adapter's (nan, a new object per row)
        return {"alpha": 0.4, "beta": beta, "layer_set": "early", "lambda_self": float("nan"), "loss_extras": "none",
                "seed": seed, "objective": value, "below_clip_t_floor": False, "status": "finished",
                "early_stopped": False}

    best = best_row([row(0.0, 0, 0.5), row(0.0, 1, 0.5), row(0.6, 0, 0.7), row(0.6, 1, 0.1)], "max")
    assert best["beta"] == 0.0 and best["seeds"] == 2  # seeds of one point average (mean 0.5 beats 0.4)
    with pytest.raises(ConfigError, match="tune.layer_sets entry 'down'"):
        check_tune_config(load_config("configs/tiny-mosaic.yaml", ["tune.layer_sets=[down]"]))


def test_evaluation_generates_with_mosaic_without_the_negative_prompt(tmp_path):
    """eval.negative_prompt (the MS adapter's release default) is left out for FLUX, which has none."""
    from mpalign import methods
    from mpalign.eval.scoring import generate_rows

    cfg = load_config("configs/tiny-mosaic.yaml", ["model.device=cpu", "eval.num_inference_steps=1",
                                                   "eval.height=32", "eval.width=32"])
    assert cfg.eval.negative_prompt
    Image.new("RGB", (32, 32), "red").save(tmp_path / "ref.png")
    request = {"sample_id": "s", "seed": 0, "prompt": "a ball", "phrases": ["ball"], "boxes": [[0.1, 0.1, 0.9, 0.9]],
               "references": [[str(tmp_path / "ref.png")]]}
    rows = generate_rows(methods.pipeline(cfg), [request], cfg, "fresh", tmp_path / "images")
    assert [Image.open(r["image_path"]).size for r in rows] == [(32, 32)]


@torch.no_grad()
def test_pretrained_flux_loading_reads_the_diffusers_layout(tmp_path):
    """The real-weights path (``model.preset: pretrained``) on the tiny preset saved as FluxPipeline does."""
    from diffusers import FluxPipeline

    flux = zoo.load_flux(ModelConfig(preset="tiny", device="cpu"))  # not the fixture: no processors attached
    FluxPipeline(**flux.as_pipeline_kwargs()).save_pretrained(tmp_path / "flux")
    loaded = zoo.load_flux(ModelConfig(preset="pretrained", flux=str(tmp_path / "flux"), device="cpu"))
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        ours, theirs = getattr(flux, name).state_dict(), getattr(loaded, name).state_dict()
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.tokenizer_2("a red ball").input_ids == flux.tokenizer_2("a red ball").input_ids
    assert loaded.scheduler.config.use_dynamic_shifting
