"""Qwen3-VL-MoE (Qwen3-VL-30B-A3B, 235B-A22B): transformers' Qwen3VLMoeForConditionalGeneration, as a function of
the params.

The vision tower, DeepStack and interleaved M-RoPE are Qwen3-VL's (models/qwen3_vl.py: text_inputs). The text
decoder has two block kinds: Qwen3 attention + a sparse MoE MLP (router `mlp.gate` [E, H], stacked experts
`mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I]; models/moe.py), and Qwen3 attention
+ a dense MLP in the layers `mlp_only_layers` names or `decoder_sparse_step` skips. Each kind is applied with one
template layer, so each compiles as one region. The MoE blocks also return their router statistics; the forward
returns the load-balancing loss (transformers' load_balancing_loss_func over the real tokens) and the busiest
expert's load as aux outputs (common.forward_hidden_aux).

Hub layout: the Hub's Qwen3-VL-30B-A3B-Instruct holds the experts as transformers 4.57 wrote them, transposed,
`gate_up_proj` [E, H, 2I] and `down_proj` [E, I, H], under the in-memory names otherwise; the export writes that.
transformers 5 transposes a stored tensor only when its shape is not the in-memory one (conversion_mapping.py
"qwen3_vl_moe": Transpose(check_dims=True)), and its save_pretrained writes the in-memory [E, 2I, H] / [E, H, I]
(the reversed Transpose keeps the matching shape); loading.py reads both by the same shape rule. It ships no
per-expert tensors, and transformers has no per-expert mapping for this model type.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch

from vlm_sft.data.vision import Qwen3VLVisionSpec
from vlm_sft.models import moe, qwen3_vl
from vlm_sft.errors import ModelLoadError
from vlm_sft.models.common import (TEXT, VISUAL, Batch, BlockCall, Family, FlopShape, Model, Params, _call, _sub,
                                   apply_module, decoder_block, packed_decoder_block, packed_self_attention,
                                   plain_block_call, text_layout)

EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def is_sparse(layer: torch.nn.Module) -> bool:
    return hasattr(layer.mlp, "experts")


def _sparse_layer(layer: torch.nn.Module, p: Params, h: torch.Tensor, attention: Callable[[torch.Tensor], torch.Tensor],
                  mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm attention (given) and MoE MLP with residuals: (hidden, router stats [2, E])."""
    h = h + attention(_call(layer.input_layernorm, _sub(p, "input_layernorm."), h))
    x = _call(layer.post_attention_layernorm, _sub(p, "post_attention_layernorm."), h)
    y, stats = moe.sparse_moe(x, p["mlp.gate.weight"], p["mlp.experts.gate_up_proj"], p["mlp.experts.down_proj"],
                              layer.mlp.gate.top_k, layer.mlp.experts.act_fn, mask)
    return h + y, stats


def moe_decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """One sparse decoder layer: (hidden, router stats [2, E]). Attention as the dense layers (causal sdpa, no
    mask: right-padded rows), then the MoE MLP on models/moe.py's grouped GEMMs instead of HF's loop."""
    def attention(x: torch.Tensor) -> torch.Tensor:
        return _call(layer.self_attn, _sub(p, "self_attn."), x, position_embeddings, None)[0]

    return _sparse_layer(layer, p, h, attention, mask)


def packed_moe_decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                             position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                             layout: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """moe_decoder_block on a packed sequence: attention within each row (common.packed_self_attention); the
    experts need nothing more (each token is routed on its own)."""
    def attention(x: torch.Tensor) -> torch.Tensor:
        return packed_self_attention(layer.self_attn, _sub(p, "self_attn."), x, position_embeddings, layout, impl)

    return _sparse_layer(layer, p, h, attention, mask)


def _templates(layers: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """The first layer of each (attention type, MLP kind): the module each layer is applied with."""
    first: dict[Any, torch.nn.Module] = {}
    return [first.setdefault((getattr(layer.self_attn, "layer_type", None), is_sparse(layer)), layer)
            for layer in layers]


def forward_aux(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final-norm hidden states [B, L, H] and the aux outputs: "aux_loss" (load balancing, differentiable) and
    "max_expert_load" (the busiest expert's share of assignments over the mean, worst MoE layer)."""
    h, after_layer = qwen3_vl.text_inputs(model, params, batch, block_call)
    text = model.module.model.language_model
    position_embeddings = text.rotary_emb(h, batch["position_ids"])
    mask = batch["attention_mask"]
    layout = text_layout(batch, h)  # packed rows: attention within each row
    stats = []
    for i, (layer, template) in enumerate(zip(text.layers, _templates(text.layers))):
        p = model.block_params(params, f"{TEXT}layers.{i}.")
        if is_sparse(layer) and layout is None:
            h, s = block_call(moe_decoder_block, template, p, h, position_embeddings, mask, remat=True)
        elif is_sparse(layer):
            h, s = block_call(packed_moe_decoder_block, template, p, h, position_embeddings, mask, *layout,
                              remat=True)
        elif layout is None:
            h = block_call(decoder_block, template, p, h, position_embeddings, remat=True)
        else:
            h = block_call(packed_decoder_block, template, p, h, position_embeddings, *layout, remat=True)
        if is_sparse(layer):
            stats.append(s)
        if after_layer is not None:
            h = after_layer(i, h)
    h = block_call(apply_module, text.norm, model.block_params(params, TEXT + "norm."), h)
    if not stats:
        return h, {}
    stats = torch.stack(stats)                                       # [layers, 2, E]
    rows = (mask.sum().to(torch.float32) * len(stats)).clamp(min=1)  # a padding-only micro-batch: no rows
    return h, {"aux_loss": moe.load_balancing_loss(stats.sum(0), rows),
               "max_expert_load": moe.max_expert_load(stats[:, 0].detach()).amax()}


def forward_hidden(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    return forward_aux(model, params, batch, block_call)[0]


def hub_name(name: str) -> str:
    """Qwen3-VL-MoE ships under the in-memory names (only the experts' layout differs: to_hub)."""
    if name.startswith((TEXT, VISUAL)) or name == "lm_head.weight":
        return name
    raise ValueError(f"param {name!r}: not a Qwen3-VL-MoE parameter name (expected model.language_model.*, "
                     "model.visual.* or lm_head.weight)")


def _transpose_experts(name: str, t: torch.Tensor) -> torch.Tensor:
    """In-memory [E, 2I, H] / [E, H, I] <-> the Hub's [E, H, 2I] / [E, I, H] (its own inverse)."""
    return t.transpose(-2, -1) if name.endswith(EXPERTS) else t


def check_config(raw: dict, path: str) -> None:
    """transformers 5 always renormalises the top-k weights (it dropped norm_topk_prob); a directory asking for
    unnormalised weights would silently train another model."""
    text = raw.get("text_config") or {}
    if text.get("norm_topk_prob") is False:
        raise ModelLoadError(f"actor.model.model_path={path!r}: config.json sets text_config.norm_topk_prob=false; "
                             "vlm-sft (as transformers 5) supports renormalised top-k routing only")
    # transformers 5 writes the count as num_local_experts (its attribute_map alias of num_experts)
    experts = text.get("num_experts", text.get("num_local_experts", 1))
    if experts < 1 or text.get("num_experts_per_tok", 1) > experts:
        raise ModelLoadError(f"actor.model.model_path={path!r}: config.json text_config has num_experts="
                             f"{experts} and num_experts_per_tok={text.get('num_experts_per_tok')}; "
                             "expected 1 <= num_experts_per_tok <= num_experts")


def default_aux_loss_coef(config: Any) -> float:
    """The directory's router_aux_loss_coef when its config asks for router logits (as transformers adds the
    loss only then), else 0."""
    text = config.text_config
    return float(text.router_aux_loss_coef) if getattr(text, "output_router_logits", False) else 0.0


def flop_shape(config: Any) -> FlopShape:
    """Qwen3-VL's, with each stacked expert tensor counted at top_k / E of its size (a token runs k experts)."""
    text = config.text_config
    return dataclasses.replace(qwen3_vl.flop_shape(config), expert_suffixes=EXPERTS,
                               expert_fraction=text.num_experts_per_tok / text.num_experts)


def _hf_class() -> type:
    from transformers import Qwen3VLMoeForConditionalGeneration
    return Qwen3VLMoeForConditionalGeneration


FAMILY = Family(
    name="qwen3_vl_moe", model_type="qwen3_vl_moe", hf_class=_hf_class,
    block_pattern=qwen3_vl.FAMILY.block_pattern, top_prefixes=qwen3_vl.FAMILY.top_prefixes,
    forward_hidden=forward_hidden, vision_spec=Qwen3VLVisionSpec.from_config, flop_shape=flop_shape,
    hub_name=hub_name, check_config=check_config, forward_aux=forward_aux, to_hub=_transpose_experts,
    from_hub=_transpose_experts, default_aux_loss_coef=default_aux_loss_coef)
