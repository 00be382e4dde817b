import numpy as np
import pytest
import torch
from PIL import Image

from mpalign import encoders, zoo
from mpalign.config import ModelConfig, load_config


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (128, 128, 3), dtype=np.uint8))


def test_tiny_unet_keeps_sdxl_structure():
    unet = zoo.load_sdxl(ModelConfig()).unet
    cfg = unet.config
    assert cfg.addition_embed_type == "text_time"
    assert cfg.down_block_types[0] == "DownBlock2D" and all("CrossAttn" in b for b in cfg.down_block_types[1:])
    assert cfg.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert cfg.up_block_types[-1] == "UpBlock2D" and all("CrossAttn" in b for b in cfg.up_block_types[:-1])
    names = list(unet.attn_processors)
    assert any(n.startswith("down_blocks") for n in names) and any(n.startswith("mid_block") for n in names)
    assert any(n.startswith("up_blocks") for n in names)
    assert sum(n.endswith("attn2.processor") for n in names) == len(names) // 2


def test_every_role_builds_tiny_and_runs_a_forward():
    from mpalign.zoo_summary import summarize_zoo

    rows = {role: (params, shapes) for role, params, shapes, _ in summarize_zoo(load_config())}
    assert set(rows) == {"sdxl", "image_encoder", "dinov2", "grounding_dino", "sam", "spacy"}
    assert "unet (1, 4, 16, 16)" in rows["sdxl"][1]
    assert rows["dinov2"][1] == "cls (1, 32), patches (1, 16, 32)"
    assert "a red ball" in rows["spacy"][1]
    assert all(params > 0 for role, (params, _) in rows.items() if role != "spacy")


def test_tiny_preset_is_deterministic(image):
    a = encoders.dinov2_features(zoo.load_dinov2(ModelConfig()), [image])[0]
    b = encoders.dinov2_features(zoo.load_dinov2(ModelConfig()), [image])[0]
    c = encoders.dinov2_features(zoo.load_dinov2(ModelConfig(seed=1)), [image])[0]
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_tiny_zoo_round_trips_through_from_pretrained(tmp_path, image):
    overrides = zoo.save_tiny_zoo(tmp_path / "zoo")
    tiny = ModelConfig()
    loaded = load_config(overrides=[f"{k}={v}" for k, v in overrides.items()]).model
    assert loaded.preset == "pretrained"

    a, b = zoo.load_sdxl(tiny), zoo.load_sdxl(loaded)
    ea, pa = encoders.encode_prompts(a, ["a dotted red ball"])
    eb, pb = encoders.encode_prompts(b, ["a dotted red ball"])
    # same weights bit for bit; outputs equal up to the attention kernel from_pretrained picks (sdpa vs eager)
    for part in ("unet", "vae", "text_encoder", "text_encoder_2"):
        sa, sb = getattr(a, part).state_dict(), getattr(b, part).state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.allclose(ea, eb, atol=1e-5) and torch.allclose(pa, pb, atol=1e-5)
    latents = encoders.vae_latents(a, encoders.images_to_tensor([image], 128))
    assert torch.equal(latents, encoders.vae_latents(b, encoders.images_to_tensor([image], 128)))
    time_ids = torch.tensor([[128.0, 128, 0, 0, 128, 128]])
    kwargs = {"encoder_hidden_states": ea, "added_cond_kwargs": {"text_embeds": pa, "time_ids": time_ids}}
    with torch.no_grad():
        assert torch.allclose(a.unet(latents, 10, **kwargs).sample, b.unet(latents, 10, **kwargs).sample, atol=1e-5)
    assert type(a.scheduler) is type(b.scheduler) and a.scheduler.config.beta_schedule == b.scheduler.config.beta_schedule

    assert torch.allclose(encoders.clip_hidden_states(zoo.load_image_encoder(tiny), [image]),
                          encoders.clip_hidden_states(zoo.load_image_encoder(loaded), [image]), atol=1e-5)
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(encoders.dinov2_features(zoo.load_dinov2(tiny), [image]),
                                                              encoders.dinov2_features(zoo.load_dinov2(loaded), [image])))
    for loader, kwargs in ((zoo.load_grounding_dino, {"text": ["a red ball ."]}),
                           (zoo.load_sam, {"input_boxes": [[[4, 4, 60, 60]]]})):
        x, y = loader(tiny), loader(loaded)
        inputs_x = x.processor(images=[image], return_tensors="pt", **kwargs)
        inputs_y = y.processor(images=[image], return_tensors="pt", **kwargs)
        assert all(torch.equal(inputs_x[k], inputs_y[k]) for k in inputs_x)
        with torch.no_grad():
            out_x, out_y = x.model(**inputs_x), y.model(**inputs_y)
        first = "logits" if "text" in kwargs else "pred_masks"
        assert torch.allclose(getattr(out_x, first), getattr(out_y, first), atol=1e-5)


def test_missing_real_model_names_the_id_and_the_tiny_preset(tmp_path):
    cfg = ModelConfig(preset="pretrained", dinov2=str(tmp_path / "no-such-dinov2"))
    with pytest.raises(zoo.ModelLoadError) as err:
        zoo.load_dinov2(cfg)
    message = str(err.value)
    assert "no-such-dinov2" in message and "model.preset=tiny" in message and "huggingface-cli download" in message


def test_hub_id_offline_is_a_clear_error():
    with pytest.raises(zoo.ModelLoadError, match="facebook/sam-vit-huge"):
        zoo.load_sam(ModelConfig(preset="pretrained"))


def test_unknown_preset_rejected():
    with pytest.raises(ValueError, match="model.preset"):
        zoo.load_dinov2(ModelConfig(preset="huge"))
