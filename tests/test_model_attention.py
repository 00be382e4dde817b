"""The multi-subject cross-attention and the grounding resampler on one real diffusers ``Attention`` layer: locality,
padding, peer parity with diffusers' IP-Adapter processor, SDPA vs explicit path, fp32 vs bf16."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0

from mpalign.models.adapter import MSAdapter
from mpalign.models.attention import AlignmentRecorder, AutoLayout, box_cell_masks, latent_grid, pool_regions

WIDTH, TOKEN_DIM, HEADS, SIDE, TEXT = 32, 64, 2, 8, 7
SUBJECTS, TOKENS, DUMMY = 3, 4, 2
BOXES = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.25, 0.0, 0.75, 0.3]]])


def cells(box) -> torch.Tensor:
    return box_cell_masks(torch.tensor(box), SIDE, SIDE)


def make_adapter(num_dummy: int = DUMMY, max_subjects: int = SUBJECTS) -> MSAdapter:
    torch.manual_seed(0)
    return MSAdapter(ip_layer_widths=[WIDTH], cross_attention_dim=TOKEN_DIM, image_embed_dim=48, phrase_dim=32,
                     max_subjects=max_subjects, num_tokens=TOKENS, num_dummy_tokens=num_dummy, resampler_dim=32,
                     resampler_depth=1, resampler_heads=2, resampler_dim_head=16, resampler_ff_mult=2)


@pytest.fixture(scope="module")
def setup():
    adapter = make_adapter()
    torch.manual_seed(1)
    attn = Attention(query_dim=WIDTH, cross_attention_dim=TOKEN_DIM, heads=HEADS, dim_head=WIDTH // HEADS)
    processor = adapter.ip_layers[0]
    attn.set_processor(processor)
    gen = torch.Generator().manual_seed(2)
    inputs = {
        "hidden": torch.randn(2, SIDE * SIDE, WIDTH, generator=gen),
        "text": torch.randn(2, TEXT, TOKEN_DIM, generator=gen),
        "clip": torch.randn(2, SUBJECTS, 5, 48, generator=gen),
        "phrases": torch.randn(2, SUBJECTS, 32, generator=gen),
        "boxes": BOXES.expand(2, -1, -1).clone(),
        "mask": torch.ones(2, SUBJECTS, dtype=torch.bool),
    }
    return adapter, attn, inputs


def run(adapter: MSAdapter, attn: Attention, inputs: dict, **kwargs) -> torch.Tensor:
    tokens = adapter.image_tokens(inputs["clip"], inputs["phrases"], inputs["boxes"], inputs["mask"])
    ehs = torch.cat((inputs["text"], tokens), dim=1)
    return attn(inputs["hidden"], ehs, ms_boxes=inputs["boxes"], ms_subject_mask=inputs["mask"], **kwargs)


def test_box_cells_follow_the_official_rule():
    # cols floor(0.1*8)=0 .. ceil(0.55*8)=5 (exclusive), rows floor(0.2*8)=1 .. ceil(0.5*8)=4 (exclusive)
    grid = cells([0.1, 0.2, 0.55, 0.5]).view(SIDE, SIDE)
    expected = torch.zeros(SIDE, SIDE, dtype=torch.bool)
    expected[1:4, 0:5] = True
    assert torch.equal(grid, expected)
    assert box_cell_masks(torch.tensor([0.0, 0.0, 1.0, 1.0]), 4, 6).all()
    assert latent_grid(12 * 16, (24, 32)) == (12, 16) and latent_grid(64, None) == (8, 8)
    with pytest.raises(ValueError, match="not a square grid"):
        latent_grid(48, None)


@torch.no_grad()
def test_perturbing_one_reference_changes_only_its_box(setup):
    adapter, attn, inputs = setup
    base = run(adapter, attn, inputs)
    for j in range(SUBJECTS):
        perturbed = dict(inputs, clip=inputs["clip"].clone())
        perturbed["clip"][:, j] += torch.randn_like(perturbed["clip"][:, j])
        changed = (run(adapter, attn, perturbed) != base).any(-1)  # (B, N) exact comparison
        box = cells(BOXES[0, j].tolist())
        assert changed[:, box].all(), f"subject {j}'s reference does not reach its box"
        assert not changed[:, ~box].any(), f"subject {j}'s reference leaks outside its box"


@torch.no_grad()
def test_image_branch_adds_exactly_zero_outside_every_box(setup):
    adapter, attn, inputs = setup
    with_image = run(adapter, attn, inputs)
    adapter.set_scale(0.0)
    text_only = run(adapter, attn, inputs)
    adapter.set_scale(1.0)
    covered = cells(BOXES[0].tolist()).any(0)
    assert (~covered).sum() > 0
    assert torch.equal(with_image[:, ~covered], text_only[:, ~covered])
    assert (with_image[:, covered] != text_only[:, covered]).any(-1).all()


@torch.no_grad()
def test_absent_subject_has_no_effect(setup):
    adapter, attn, inputs = setup
    absent = dict(inputs, mask=torch.tensor([[True, True, False], [True, True, True]]))
    base = run(adapter, attn, absent)
    other = dict(absent, clip=absent["clip"].clone(), phrases=absent["phrases"].clone(), boxes=absent["boxes"].clone())
    other["clip"][:, 2] += 5.0
    other["phrases"][:, 2] -= 3.0
    other["boxes"][:, 2] = torch.tensor([0.0, 0.0, 1.0, 1.0])  # even a box over everything
    changed = run(adapter, attn, other)
    assert torch.equal(changed[0], base[0])
    # ... while the same change to a real subject (element 1) does reach the image
    assert not torch.equal(changed[1], base[1])
    # and an absent subject's cells outside the real boxes get no image contribution
    adapter.set_scale(0.0)
    text_only = run(adapter, attn, absent)
    adapter.set_scale(1.0)
    only_absent = cells(BOXES[0, 2].tolist()) & ~cells(BOXES[0, :2].tolist()).any(0)
    assert torch.equal(base[0, only_absent], text_only[0, only_absent])


@torch.no_grad()
def test_matches_diffusers_ip_adapter_with_one_full_image_subject():
    adapter = make_adapter(num_dummy=0, max_subjects=1)
    torch.manual_seed(1)
    attn = Attention(query_dim=WIDTH, cross_attention_dim=TOKEN_DIM, heads=HEADS, dim_head=WIDTH // HEADS)
    ours = adapter.ip_layers[0]
    ours.scale = 0.7
    peer = IPAdapterAttnProcessor2_0(WIDTH, TOKEN_DIM, num_tokens=(TOKENS,), scale=0.7)
    peer.to_k_ip[0].weight.copy_(ours.to_k_ip.weight)
    peer.to_v_ip[0].weight.copy_(ours.to_v_ip.weight)
    gen = torch.Generator().manual_seed(3)
    hidden, text = torch.randn(2, SIDE * SIDE, WIDTH, generator=gen), torch.randn(2, TEXT, TOKEN_DIM, generator=gen)
    tokens = adapter.image_tokens(torch.randn(2, 1, 5, 48, generator=gen), torch.randn(2, 1, 32, generator=gen),
                                  torch.tensor([[[0.0, 0.0, 1.0, 1.0]]] * 2), torch.ones(2, 1, dtype=torch.bool))
    attn.set_processor(ours)
    got = attn(hidden, torch.cat((text, tokens), 1), ms_boxes=torch.tensor([[[0.0, 0.0, 1.0, 1.0]]]),
               ms_subject_mask=torch.ones(1, 1, dtype=torch.bool))
    attn.set_processor(peer)
    expected = attn(hidden, (text, [tokens]))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", ["layout", "padded", "subject_scales", "no_layout", "overlap"])
@torch.no_grad()
def test_sdpa_path_equals_explicit_path(setup, case):
    adapter, attn, inputs = setup
    kwargs = {}
    if case == "padded":
        inputs = dict(inputs, mask=torch.tensor([[True, False, False], [True, True, False]]))
    elif case == "subject_scales":
        kwargs["ms_subject_scales"] = torch.tensor([[0.5, 1.5, 0.0], [1.0, 0.2, 2.0]])
    elif case == "no_layout":
        inputs = dict(inputs, boxes=torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, SUBJECTS, 4).clone())
    elif case == "overlap":
        overlapping = torch.tensor([[0.0, 0.0, 0.7, 0.7], [0.3, 0.3, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
        inputs = dict(inputs, boxes=overlapping.expand(2, -1, -1))
    sdpa = run(adapter, attn, inputs, **kwargs)
    adapter.set_explicit_attention(True)
    explicit = run(adapter, attn, inputs, **kwargs)
    adapter.set_explicit_attention(False)
    torch.testing.assert_close(sdpa, explicit, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_no_layout_is_every_box_the_whole_image_and_never_uses_the_dummy_tokens(setup):
    adapter, attn, inputs = setup
    whole = dict(inputs, boxes=torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, SUBJECTS, 4).clone())
    out = run(adapter, attn, whole)
    tokens = adapter.image_tokens(whole["clip"], whole["phrases"], whole["boxes"], whole["mask"])
    no_layout = attn(inputs["hidden"], torch.cat((inputs["text"], tokens), 1), ms_boxes=None)
    assert torch.equal(out, no_layout)  # ms_boxes=None is the release with boxes [0, 0, 1, 1]
    adapter.set_scale(0.0)
    text_only = run(adapter, attn, whole)
    adapter.set_scale(1.0)
    assert (out != text_only).any(-1).all()  # every cell is conditioned
    saved = adapter.dummy_tokens.detach().clone()
    adapter.dummy_tokens.add_(torch.randn_like(saved) * 3.0)
    try:
        # the dummy tokens are seen from no cell (they only ever serve cells outside every box, which are zeroed)
        assert torch.equal(run(adapter, attn, whole), out)
    finally:
        adapter.dummy_tokens.copy_(saved)


@torch.no_grad()
def test_all_zero_boxes_get_no_image_conditioning_as_the_release(setup):
    adapter, attn, inputs = setup
    zero = dict(inputs, boxes=torch.zeros_like(inputs["boxes"]))
    out = run(adapter, attn, zero)
    adapter.set_scale(0.0)
    text_only = run(adapter, attn, zero)
    adapter.set_scale(1.0)
    assert torch.equal(out, text_only)


@torch.no_grad()
def test_auto_layout_regions_follow_the_phrase_text_attention_from_the_start_step(setup):
    adapter, attn, inputs = setup
    processor = adapter.ip_layers[0]
    phrase_tokens = torch.zeros(1, SUBJECTS, TEXT, dtype=torch.bool)
    for j in range(SUBJECTS):
        phrase_tokens[0, j, 1 + 2 * j:3 + 2 * j] = True  # subject j's phrase: text tokens 2j+1 and 2j+2
    auto = AutoLayout(threshold=0.5, start_step=1)
    auto.reset(phrase_tokens)
    boxes = cells(BOXES[0].tolist()).expand(2, -1, -1)
    before = run(adapter, attn, inputs, ms_auto_layout=auto)
    torch.testing.assert_close(before, run(adapter, attn, inputs), rtol=1e-5, atol=1e-6)
    assert torch.equal(auto.latest[processor], boxes) and auto.sources == [(0, "boxes")]
    auto.on_step_end(None, 0, None, {})  # the pipeline's callback after step 0
    base = run(adapter, attn, inputs, ms_auto_layout=auto)
    regions = auto.latest[processor]
    # the phrase maps computed here from the layer's own text attention: mean over phrase tokens and heads
    heads = attn.heads
    q = attn.to_q(inputs["hidden"]).unflatten(-1, (heads, -1)).transpose(1, 2)
    k = attn.to_k(inputs["text"]).unflatten(-1, (heads, -1)).transpose(1, 2)
    probs = torch.softmax(q @ k.transpose(-1, -2) * attn.scale, dim=-1)
    maps = torch.stack([probs[..., 1 + 2 * j:3 + 2 * j].mean(-1).mean(1) for j in range(SUBJECTS)], dim=1)
    low, high = maps.amin(-1, keepdim=True), maps.amax(-1, keepdim=True)
    assert torch.equal(regions, (maps - low) / (high - low + 1e-5) > 0.5)
    assert not torch.equal(regions, boxes) and auto.sources[-1] == (1, "attention")
    for j in range(SUBJECTS):  # the image branch now follows the attention regions, not the boxes
        perturbed = dict(inputs, clip=inputs["clip"].clone())
        perturbed["clip"][:, j] += torch.randn_like(perturbed["clip"][:, j])
        changed = (run(adapter, attn, perturbed, ms_auto_layout=auto) != base).any(-1)
        assert torch.equal(changed, regions[:, j])


@torch.no_grad()
def test_subject_scale_zero_silences_only_that_subject(setup):
    adapter, attn, inputs = setup
    base = run(adapter, attn, inputs)
    scaled = run(adapter, attn, inputs, ms_subject_scales=torch.tensor([1.0, 0.0, 1.0]))
    changed = (scaled != base).any(-1)
    box = cells(BOXES[0, 1].tolist())
    assert changed[:, box].all() and not changed[:, ~box].any()


def test_float32_and_bfloat16_agree(setup):
    adapter, attn, inputs = setup
    with torch.no_grad():
        reference = run(adapter, attn, inputs)
        adapter_bf16 = make_adapter().to(torch.bfloat16)
        adapter_bf16.load_state_dict(adapter.state_dict())
        attn_bf16 = Attention(query_dim=WIDTH, cross_attention_dim=TOKEN_DIM, heads=HEADS, dim_head=WIDTH // HEADS)
        attn_bf16.load_state_dict({k: v for k, v in attn.state_dict().items() if "processor" not in k})
        attn_bf16.to(torch.bfloat16).set_processor(adapter_bf16.ip_layers[0])
        low = run(adapter_bf16, attn_bf16, {k: v.to(torch.bfloat16) if v.is_floating_point() else v
                                            for k, v in inputs.items()})
    assert low.dtype == torch.bfloat16
    error = (low.float() - reference).norm() / reference.norm()
    assert error < 2e-2, f"relative error {error:.4f}"


@torch.no_grad()
def test_recorder_pools_the_chosen_cross_feature_over_each_box(setup):
    adapter, attn, inputs = setup
    processor = adapter.ip_layers[0]
    processor.block = "down_blocks.1"
    recorder = AlignmentRecorder(blocks=("down",), features=True, attention_maps=True, cross_feature="attn2_output")
    out = run(adapter, attn, inputs, ms_recorder=recorder)
    recorder.close()
    run(adapter, attn, inputs, ms_recorder=recorder)  # a re-run after closing (checkpointing) records nothing
    assert len(recorder.cross) == 1 and len(recorder.maps) == 1
    block, pooled = recorder.cross[0]
    assert block == "down_blocks.1" and pooled.shape == (2, SUBJECTS, WIDTH)
    maps, regions = recorder.maps[0]
    assert maps.shape == regions.shape == (2, SUBJECTS, SIDE * SIDE)
    assert torch.equal(regions[0, 1], cells(BOXES[0, 1].tolist()))
    assert (maps >= 0).all() and (maps.sum(1) <= 1 + 1e-5).all()
    # attn2_output: the layer's whole output (text + image branch, after to_out) averaged over each box
    torch.testing.assert_close(pooled, pool_regions(out, regions))
    # image_branch (the ablation, the first implementation): the masked image branch before to_out, i.e. what the
    # branch adds to the output, read back through to_out's linear map
    ablation = AlignmentRecorder(blocks=("down",), cross_feature="image_branch")
    with_branch = run(adapter, attn, inputs, ms_recorder=ablation)
    processor.scale = 0.0
    try:
        without_branch = run(adapter, attn, inputs)
    finally:
        processor.scale = 1.0
    image_pooled = ablation.cross[0][1]
    assert image_pooled.shape == (2, SUBJECTS, attn.to_k.out_features)
    torch.testing.assert_close(image_pooled @ attn.to_out[0].weight.T, pool_regions(with_branch - without_branch, regions),
                               rtol=1e-4, atol=1e-5)
    untapped = AlignmentRecorder(blocks=("up",))
    run(adapter, attn, inputs, ms_recorder=untapped)
    assert not untapped.cross and not untapped.maps
    # the hidden-state tap reads the transformer block's residual stream: a bare layer has none to give
    with pytest.raises(ValueError, match="hidden_state"):
        run(adapter, attn, inputs, ms_recorder=AlignmentRecorder(blocks=("down",)))


@torch.no_grad()
def test_resampler_treats_subjects_independently_and_can_drop_grounding(setup):
    adapter, _, inputs = setup
    resampler = adapter.resampler
    clip, phrases, boxes = inputs["clip"][0], inputs["phrases"][0], inputs["boxes"][0]
    base = resampler(clip, phrases, boxes)
    clip2 = clip.clone()
    clip2[1] += 1.0
    moved = resampler(clip2, phrases, boxes)
    assert torch.equal(moved[[0, 2]], base[[0, 2]]) and not torch.equal(moved[1], base[1])
    # grounding tokens carry phrase and box; the learnable queries that replace them ignore both
    dropped = resampler(clip, phrases, boxes, drop_grounding=torch.tensor([True, False, False]))
    dropped_other_box = resampler(clip, phrases + 1.0, boxes.flip(-1), drop_grounding=torch.tensor([True, False, False]))
    assert torch.equal(dropped[0], dropped_other_box[0]) and not torch.equal(dropped[1], dropped_other_box[1])
    assert not torch.equal(dropped[0], base[0])
