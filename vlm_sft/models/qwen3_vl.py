"""Qwen3-VL (dense): exactly transformers' Qwen3VLForConditionalGeneration, as a function of the params.

Vision: patch 16 embedding; learned position embeddings bilinearly interpolated to each image's grid (4 table rows
and weights per patch, precomputed on the host: data/vision.py Qwen3VLVisionSpec); 2D rotary; full attention
within each frame, packed over all images of the batch; patch merger. DeepStack: the outputs of the vision blocks
in `deepstack_visual_indexes`, each through its own merger, are added to the hidden states at the image positions
after decoder layers 0, 1, ... (one per DeepStack feature). Text: Qwen3 decoder layers (q/k norm) with interleaved
M-RoPE (the module's own rotary embedding; position ids from the host). Tied (2B, 4B) or untied (8B) lm_head.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from vlm_sft import compile as compile_lib
from vlm_sft.data.vision import Qwen3VLVisionSpec
from vlm_sft.models.common import (TEXT, VISUAL, Batch, BlockCall, Family, FlopShape, Model, Params, apply_module,
                                   decoder_stack, embed_tokens, patch_embed, plain_block_call, scatter_rows,
                                   text_layout, vision_block, vision_rotary)

DEEPSTACK = VISUAL + "deepstack_merger_list."


@compile_lib.eager_region  # deterministic gradients: see common.embed
def _pos_embed(module: None, p: Params, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Each patch's position embedding: its 4 interpolation taps of the learned table, weighted and summed."""
    return (F.embedding(index, p["weight"]) * weight[:, :, None]).sum(1)


def image_features(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Vision tower: patches -> (merged features [P / merge^2, text hidden], the DeepStack features, same shape
    each), both in <|image_pad|> order (the processor emits patches in merge-unit order)."""
    visual = model.module.model.visual
    x = block_call(patch_embed, visual.patch_embed, model.block_params(params, VISUAL + "patch_embed."),
                   batch["pixel_values"], dynamic=True)
    pos = block_call(_pos_embed, None, model.block_params(params, VISUAL + "pos_embed."),
                     batch["pos_embed_index"], batch["pos_embed_weight"], dynamic=True)
    x = x + pos.to(x.dtype)
    cos, sin = vision_rotary(visual.rotary_pos_emb.inv_freq, batch["vision_rotary_ids"])
    layout = [batch[f"full_{key}"] for key in ("gather", "mask", "scatter", "cu_seqlens")]
    # Qwen3.5's tower is this one without DeepStack (no deepstack_visual_indexes): then no DeepStack features.
    deepstack_at = {layer: j for j, layer in enumerate(getattr(visual, "deepstack_visual_indexes", ()))}
    block = visual.blocks[0]  # templates: structure only (params come from `params`)
    deepstack_merger = visual.deepstack_merger_list[0] if deepstack_at else None
    deepstack = []
    for i in range(len(visual.blocks)):
        x = block_call(vision_block, block, model.block_params(params, f"{VISUAL}blocks.{i}."), x, *layout, cos,
                       sin, remat=True, dynamic=True)
        if i in deepstack_at:
            p = model.block_params(params, f"{DEEPSTACK}{deepstack_at[i]}.")
            deepstack.append(block_call(apply_module, deepstack_merger, p, x, dynamic=True))
    merged = block_call(apply_module, visual.merger, model.block_params(params, VISUAL + "merger."), x,
                        dynamic=True)
    return merged, deepstack


def text_inputs(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                ) -> tuple[torch.Tensor, Callable[[int, torch.Tensor], torch.Tensor] | None]:
    """The decoder's input embeddings [B, L, H] (images scattered into their tokens) and the hook that adds the
    DeepStack features after the first decoder layers (None without images). Shared with Qwen3-VL-MoE."""
    h = embed_tokens(model, params, batch["input_ids"], block_call)
    if "pixel_values" not in batch:
        return h, None
    merged, deepstack = image_features(model, params, batch, block_call)
    index = batch["image_index"]
    h = scatter_rows(h, index, merged)

    def add_deepstack(i: int, h: torch.Tensor) -> torch.Tensor:
        return scatter_rows(h, index, deepstack[i], add=True) if i < len(deepstack) else h

    return h, add_deepstack


def forward_hidden(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    """Final-norm hidden states [B, L, H] of the text model for the batch (images scattered into their tokens,
    DeepStack features added after the first decoder layers)."""
    h, after_layer = text_inputs(model, params, batch, block_call)
    return decoder_stack(model, params, h, batch["position_ids"], block_call, after_layer,
                         layout=text_layout(batch, h))


def hub_name(name: str) -> str:
    """Qwen3-VL ships under the in-memory names (transformers 4.57 already nested model.language_model.*)."""
    if name.startswith((TEXT, VISUAL)) or name == "lm_head.weight":
        return name
    raise ValueError(f"param {name!r}: not a Qwen3-VL parameter name (expected model.language_model.*, "
                     "model.visual.* or lm_head.weight)")


def flop_shape(config: Any) -> FlopShape:
    text, vision = config.text_config, config.vision_config
    return FlopShape(
        text_layers=text.num_hidden_layers, text_heads=text.num_attention_heads,
        text_head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        vision_heads=vision.num_heads, vision_head_dim=vision.hidden_size // vision.num_heads,
        window_blocks=0, full_blocks=vision.depth, merge_unit=vision.spatial_merge_size ** 2,
        merger_prefixes=(VISUAL + "merger.", DEEPSTACK), pos_embed_taps=4, vision_hidden=vision.hidden_size)


def _hf_class() -> type:
    from transformers import Qwen3VLForConditionalGeneration
    return Qwen3VLForConditionalGeneration


FAMILY = Family(
    name="qwen3_vl", model_type="qwen3_vl", hf_class=_hf_class,
    block_pattern=(r"^(model\.visual\.blocks\.\d+\.|model\.visual\.deepstack_merger_list\.\d+\.|"
                   r"model\.language_model\.layers\.\d+\.)"),
    top_prefixes=(VISUAL + "patch_embed.", VISUAL + "pos_embed.", VISUAL + "merger.", TEXT + "embed_tokens.",
                  TEXT + "norm.", "lm_head."),
    forward_hidden=forward_hidden, vision_spec=Qwen3VLVisionSpec.from_config, flop_shape=flop_shape,
    hub_name=hub_name)
