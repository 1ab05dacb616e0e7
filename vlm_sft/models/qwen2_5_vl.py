"""Qwen2.5-VL: windowed vision tower (patch 14, window attention except in `fullatt_block_indexes`), merger, Qwen2
decoder with M-RoPE. Exactly transformers' Qwen2_5_VLForConditionalGeneration, as a function of the params."""
from __future__ import annotations

from typing import Any

import torch

from vlm_sft.data.vision import VisionSpec
from vlm_sft.errors import ModelLoadError
from vlm_sft.models.common import (TEXT, VISUAL, Batch, BlockCall, Family, FlopShape, Model, Params, apply_module,
                                   decoder_stack, embed_tokens, patch_embed, plain_block_call, scatter_rows,
                                   text_layout, vision_block, vision_rotary)


def _window_order(t: torch.Tensor, window: torch.Tensor, unit: int) -> torch.Tensor:
    """Rows of t [P, d] permuted in merge units of `unit` rows by window_index [P / unit]. Sizes come from the
    index's length: under a dynamic P that ties P to it (P = unit * len), so no size downstream (the merger's
    view(-1, unit * d) included) turns into an unsimplifiable expression."""
    units, d = window.shape[0], t.shape[-1]
    return t.view(units, unit, d)[window].view(units * unit, d)


def image_features(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    """Vision tower: patches -> merged features in <|image_pad|> order, [P / merge^2, text hidden]."""
    visual = model.module.model.visual
    unit = visual.spatial_merge_size ** 2
    prefix = VISUAL + "patch_embed."
    x = block_call(patch_embed, visual.patch_embed, model.block_params(params, prefix), batch["pixel_values"],
                   dynamic=True)
    window = batch["window_index"]
    x = _window_order(x, window, unit)
    cos, sin = vision_rotary(visual.rotary_pos_emb.inv_freq, batch["vision_rotary_ids"])
    cos, sin = _window_order(cos, window, unit), _window_order(sin, window, unit)
    full = set(visual.fullatt_block_indexes)
    template = visual.blocks[0]  # window and full blocks differ only in the layout they are given
    for i in range(len(visual.blocks)):
        kind = "full" if i in full else "window"
        layout = [batch[f"{kind}_{key}"] for key in ("gather", "mask", "scatter", "cu_seqlens")]
        x = block_call(vision_block, template, model.block_params(params, f"{VISUAL}blocks.{i}."), x, *layout,
                       cos, sin, remat=True, dynamic=True)
    merged = block_call(apply_module, visual.merger, model.block_params(params, VISUAL + "merger."), x,
                        dynamic=True)
    return merged[batch["window_reverse"]]


def forward_hidden(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    """Final-norm hidden states [B, L, H] of the text model for the batch (images scattered into their tokens)."""
    h = embed_tokens(model, params, batch["input_ids"], block_call)
    if "pixel_values" in batch:
        h = scatter_rows(h, batch["image_index"], image_features(model, params, batch, block_call))
    return decoder_stack(model, params, h, batch["position_ids"], block_call,
                         layout=text_layout(batch, h))


def hub_name(name: str) -> str:
    """In-memory (transformers 5) param name -> its name in the Hub's safetensors files (the 4.x layout)."""
    if name.startswith(TEXT):
        return "model." + name[len(TEXT):]
    if name.startswith(VISUAL):
        return name[len("model."):]
    if name == "lm_head.weight":
        return name
    raise ValueError(f"param {name!r}: not a Qwen2.5-VL parameter name (expected model.language_model.*, "
                     "model.visual.* or lm_head.weight)")


def flop_shape(config: Any) -> FlopShape:
    text, vision = config.text_config, config.vision_config
    full = len(vision.fullatt_block_indexes)
    return FlopShape(
        text_layers=text.num_hidden_layers, text_heads=text.num_attention_heads,
        text_head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        vision_heads=vision.num_heads, vision_head_dim=vision.hidden_size // vision.num_heads,
        window_blocks=vision.depth - full, full_blocks=full, merge_unit=vision.spatial_merge_size ** 2,
        merger_prefixes=(VISUAL + "merger.",))


def check_config(raw: dict, path: str) -> None:
    """config.json (as a dict): the functional forward builds no attention mask, so sliding-window layers would
    silently attend fully."""
    text = raw.get("text_config") or raw
    if text.get("use_sliding_window") or raw.get("use_sliding_window"):
        raise ModelLoadError(f"actor.model.model_path={path!r}: config.json sets use_sliding_window; vlm-sft "
                             "supports full-attention text layers only")


def _hf_class() -> type:
    from transformers import Qwen2_5_VLForConditionalGeneration
    return Qwen2_5_VLForConditionalGeneration


FAMILY = Family(
    name="qwen2.5_vl", model_type="qwen2_5_vl", hf_class=_hf_class,
    block_pattern=r"^(model\.visual\.blocks\.\d+\.|model\.language_model\.layers\.\d+\.)",
    top_prefixes=(VISUAL + "patch_embed.", VISUAL + "merger.", TEXT + "embed_tokens.", TEXT + "norm.", "lm_head."),
    forward_hidden=forward_hidden, vision_spec=VisionSpec.from_config, flop_shape=flop_shape, hub_name=hub_name,
    check_config=check_config)
