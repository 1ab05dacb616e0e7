"""Qwen3-VL's host-side vision precompute and processing, checked against transformers' own Qwen3-VL code."""
import types

import PIL.Image
import pytest
import torch
import transformers
from transformers import vision_utils

from vlm_sft.data import qwen3_vl_vision
from vlm_sft.data import vision as vision_lib

IMAGE_PAD = 151655
# Several images of different, non-square sizes (t, h, w in patches; h, w multiples of the merge size 2).
GRIDS = torch.tensor([[1, 14, 20], [1, 24, 12], [1, 2, 2], [1, 4, 96], [2, 6, 8]])


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3_vl_dir):
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("side", [8, 48])  # the tiny 8 x 8 grid and the real 48 x 48 (num_position_embeddings 2304)
def test_interpolation_taps_equal_transformers(side):
    index, weight = qwen3_vl_vision.position_embedding_interpolation(GRIDS, side, 2)
    hf_index, hf_weight = vision_utils.get_vision_interpolation_indices_and_weights(
        GRIDS, side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert index.shape == (4, int((GRIDS[:, 0] * GRIDS[:, 1] * GRIDS[:, 2]).sum()))
    assert index.dtype == torch.long and weight.dtype == torch.float32
    assert torch.equal(index, hf_index.t())
    torch.testing.assert_close(weight, hf_weight.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.sum(0), torch.ones(index.shape[1]))


def test_rotary_ids_equal_transformers():
    ids = qwen3_vl_vision.vision_rotary_ids(GRIDS, 2)
    assert torch.equal(ids, vision_utils.get_vision_position_ids(GRIDS, 2))
    spec = types.SimpleNamespace(spatial_merge_size=2)  # the Qwen2.5-VL precompute uses the same patch order
    assert torch.equal(ids, vision_lib.vision_rotary_ids(GRIDS, spec))


def _vision_inputs_of_the_tower(model, grids):
    """What the stock vision tower adds to its patch embeddings, and the rotary cos it hands block 0."""
    captured = {}
    visual = model.model.visual
    hooks = [
        visual.patch_embed.register_forward_hook(lambda m, a, out: captured.__setitem__("patches", out)),
        visual.blocks[0].register_forward_pre_hook(
            lambda m, a, kw: captured.update(hidden=a[0], cos=kw["position_embeddings"][0]), with_kwargs=True),
    ]
    n_patches = int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum())
    pixels = torch.randn(n_patches, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["hidden"] - captured["patches"], captured["cos"]


def test_precompute_gives_the_towers_position_embeddings_and_rotary(hf_model):
    visual = hf_model.model.visual
    side = int(hf_model.config.vision_config.num_position_embeddings ** 0.5)
    with torch.no_grad():  # a trained-looking table: random rows, so any wrong tap or weight shows
        visual.pos_embed.weight.normal_(generator=torch.Generator().manual_seed(1))
    stock_pos, stock_cos = _vision_inputs_of_the_tower(hf_model, GRIDS)

    index, weight = qwen3_vl_vision.position_embedding_interpolation(GRIDS, side, 2)
    ours = (visual.pos_embed.weight[index] * weight[:, :, None]).sum(0)
    torch.testing.assert_close(ours, stock_pos, rtol=1e-5, atol=1e-5)
    cos, _ = visual.rotary_pos_emb(ours, qwen3_vl_vision.vision_rotary_ids(GRIDS, 2))
    torch.testing.assert_close(cos, stock_cos)

    # Independently: Qwen3-VL's design is F.interpolate(bilinear, align_corners=True) of the square table, per
    # image, read out in the processor's merge-block patch order.
    table = visual.pos_embed.weight.detach().t().reshape(1, -1, side, side)
    start = 0
    for t, h, w in GRIDS.tolist():
        image = torch.nn.functional.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]
        image = image.reshape(-1, h // 2, 2, w // 2, 2).permute(1, 3, 2, 4, 0).reshape(h * w, -1).repeat(t, 1)
        torch.testing.assert_close(ours[start:start + t * h * w].detach(), image, rtol=1e-5, atol=1e-5)
        start += t * h * w


def _multi_image_sequence(grids, texts):
    """Token ids: text, then for each image <|vision_start|> + t*h*w/4 pads + <|vision_end|> + text."""
    ids = list(range(100, 100 + texts[0]))
    for (t, h, w), n_text in zip(grids.tolist(), texts[1:]):
        ids += [151652] + [IMAGE_PAD] * (t * h * w // 4) + [151653] + list(range(200, 200 + n_text))
    return torch.tensor(ids)


@pytest.mark.parametrize("texts", [(5, 7, 3, 1, 4), (0, 0, 2, 0, 9)])
def test_mrope_positions_equal_qwen3_vl_get_rope_index(hf_model, texts):
    # vision.mrope_position_ids (the Qwen2.5-VL rule) for Qwen3-VL: equal to Qwen3VLModel.get_rope_index for
    # sequences of several non-square images (no difference found for images; videos are not trained).
    grids = torch.tensor([[1, 14, 20], [1, 24, 12], [1, 2, 2], [1, 4, 30]])
    input_ids = _multi_image_sequence(grids, texts)
    spec = types.SimpleNamespace(image_token_id=IMAGE_PAD, spatial_merge_size=2)
    ours = vision_lib.mrope_position_ids(input_ids, grids, spec)
    stock, _ = hf_model.model.get_rope_index(input_ids[None], (input_ids == IMAGE_PAD).int()[None],
                                             image_grid_thw=grids)
    assert torch.equal(ours, stock[:, 0])


@pytest.mark.parametrize("grids, match", [
    (torch.tensor([[1, 3, 4]]), "multiples of the merge size 2"),
    (torch.tensor([1, 4, 4]), r"\[n, 3\]"),
])
def test_precompute_rejects_bad_grids(grids, match):
    with pytest.raises(ValueError, match=match):
        qwen3_vl_vision.position_embedding_interpolation(grids, 8, 2)
