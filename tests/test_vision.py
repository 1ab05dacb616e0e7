"""Host-side precompute (data/vision.py) against transformers' own implementations, on grids that span several
attention windows (the model-level tests use small images that fit in one window)."""
import pytest
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

from vlm_sft.data.vision import (VisionSpec, attention_layout, mrope_position_ids, vision_rotary_ids,
                                 window_partition)

vision_utils = pytest.importorskip("transformers.vision_utils")

GRIDS = torch.tensor([[1, 8, 12], [1, 4, 4], [1, 34, 46], [2, 6, 10]])
SPEC = VisionSpec(image_token_id=151655, spatial_merge_size=2, patch_size=14, window_size=112, pad_token_id=151643)


def test_window_partition_matches_transformers():
    index, lengths = window_partition(GRIDS, SPEC)
    ref_index, ref_cu = vision_utils.get_vision_window_index(GRIDS, spatial_merge_size=2, window_size=112,
                                                             patch_size=14)
    assert torch.equal(index, ref_index)
    ref_lengths = (ref_cu[1:] - ref_cu[:-1]).tolist()
    assert lengths == ref_lengths
    assert len(lengths) > len(GRIDS)  # several windows per image: the windowing is really exercised
    layout = attention_layout(lengths, "window")
    assert torch.equal(layout["window_cu_seqlens"], ref_cu)


def test_rotary_ids_match_transformers():
    assert torch.equal(vision_rotary_ids(GRIDS, SPEC), vision_utils.get_vision_position_ids(GRIDS, 2))


def test_mrope_positions_match_get_rope_index():
    config = Qwen2_5_VLConfig(text_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                               num_key_value_heads=1, intermediate_size=64, vocab_size=151936),
                              vision_config=dict(depth=1, hidden_size=16, num_heads=1, out_hidden_size=32))
    model = Qwen2_5_VLModel(config)
    grids = GRIDS[:2]
    ids = [151644, 10, 11, 151652] + [151655] * 24 + [151653, 12, 151652] + [151655] * 4 + [151653, 13, 14, 15]
    input_ids = torch.tensor([ids])
    ref, _ = model.get_rope_index(input_ids, (input_ids == 151655).int(), image_grid_thw=grids)
    assert torch.equal(mrope_position_ids(input_ids[0], grids, SPEC), ref[:, 0])


def test_mismatched_image_tokens_are_an_error():
    with pytest.raises(ValueError, match="expected 24 <\\|image_pad\\|> tokens"):
        mrope_position_ids(torch.tensor([1] + [151655] * 20 + [2]), GRIDS[:1], SPEC)
    with pytest.raises(ValueError, match="2 images but 1"):
        mrope_position_ids(torch.tensor([1] + [151655] * 24 + [2]), GRIDS[:2], SPEC)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_patch_embed_equals_transformers_conv3d(family):
    """models/common.patch_embed (one matmul) against transformers' patch-embedding module (a Conv3d whose kernel is
    its stride), float64: outputs and the weight's (and bias') gradients; a Conv3d that overlaps is refused."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionPatchEmbed
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLVisionConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionPatchEmbed

    from vlm_sft.models.common import patch_embed

    torch.manual_seed(0)
    if family == "qwen2_5_vl":
        module = Qwen2_5_VisionPatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3, embed_dim=24)
    else:
        module = Qwen3VLVisionPatchEmbed(Qwen3VLVisionConfig(patch_size=16, temporal_patch_size=2, in_channels=3,
                                                             hidden_size=24))
    module = module.double()
    pixels = torch.randn(10, 3 * 2 * module.patch_size ** 2, dtype=torch.float64)
    grad = torch.randn(10, 24, dtype=torch.float64)
    params = {k: v.detach().requires_grad_() for k, v in module.named_parameters()}
    want = torch.func.functional_call(module, params, (pixels,))
    want_grads = torch.autograd.grad(want, list(params.values()), grad)
    got = patch_embed(module, params, pixels)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, list(params.values()), grad), want_grads):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)
    module.proj.stride = (1, module.patch_size, module.patch_size)
    with pytest.raises(NotImplementedError, match="stride == kernel_size"):
        patch_embed(module, params, pixels)
