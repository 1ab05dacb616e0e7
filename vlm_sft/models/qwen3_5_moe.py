"""Qwen3.5-MoE (Qwen3.5-35B-A3B, 122B-A10B, 397B-A17B): transformers' Qwen3_5MoeForConditionalGeneration, as a
function of the params.

The vision tower (Qwen3-VL's without DeepStack), the hybrid decoder's two token mixers (Gated DeltaNet linear
attention and gated full attention, `layer_types`) and the zero-centred norms are Qwen3.5's (models/qwen3_5.py).
Every decoder layer's MLP is sparse: top-k routed experts (router `mlp.gate` [E, H], stacked experts
`mlp.experts.gate_up_proj` [E, 2I, H] and `mlp.experts.down_proj` [E, H, I], on models/moe.py's grouped GEMMs as
models/qwen3_vl_moe.py runs them) plus a shared expert that every token runs, scaled by its own sigmoid gate:
  mlp(x) = experts(x) + sigmoid(x @ shared_expert_gate^T) * shared_expert(x)
Each (mixer kind) is applied with one template layer, so each compiles as one region. The blocks return their
router statistics; forward_aux gives the load-balancing loss over the real tokens (transformers'
load_balancing_loss_func) and the busiest expert's load, as Qwen3-VL-MoE's.

Hub layout: the Hub ships Qwen3.5-MoE (35B-A3B, 397B-A17B) under the in-memory (transformers 5) names, experts
stacked [E, 2I, H] / [E, H, I]; the export writes that. transformers 5.24's save_pretrained writes them one tensor
per expert instead (its conversion_mapping "qwen3_5_moe_text" = "qwen2_moe": `mlp.experts.{e}.gate_proj.weight`
[I, H], `up_proj` [I, H], `down_proj` [H, I], reversed on save), so a directory fine-tuned with HF's own tools comes
that way: `expert_parts` names those tensors and loading.py stacks them as it reads (each rank only its experts).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
import torch.nn.functional as F

from vlm_sft import compile as compile_lib

from vlm_sft.data.vision import Qwen3VLVisionSpec
from vlm_sft.models import linear_attention, moe, qwen3_5, qwen3_vl, qwen3_vl_moe
from vlm_sft.models.common import (TEXT, Batch, BlockCall, Family, FlopShape, Model, Params, _call, _sub,
                                   apply_module, embed_tokens, plain_block_call, scatter_rows, text_layout)

EXPERTS = qwen3_vl_moe.EXPERTS


def moe_mlp(mlp: torch.nn.Module, p: Params, x: torch.Tensor, mask: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3_5MoeSparseMoeBlock on x [B, L, H] (p: the block's params, names under `mlp.`): (routed experts +
    sigmoid-gated shared expert, router stats [2, E])."""
    y, stats = moe.sparse_moe(x, p["gate.weight"], p["experts.gate_up_proj"], p["experts.down_proj"],
                              mlp.gate.top_k, mlp.experts.act_fn, mask)
    shared = _call(mlp.shared_expert, _sub(p, "shared_expert."), x)
    return y + torch.sigmoid(F.linear(x, p["shared_expert_gate.weight"])) * shared, stats


def _layer(layer: torch.nn.Module, p: Params, h: torch.Tensor, mixer: Callable[[torch.Tensor], torch.Tensor],
           mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-norm token mixer (given) and the sparse MLP, with residuals: (hidden, router stats [2, E])."""
    h = h + mixer(_call(layer.input_layernorm, _sub(p, "input_layernorm."), h))
    x = _call(layer.post_attention_layernorm, _sub(p, "post_attention_layernorm."), h)
    y, stats = moe_mlp(layer.mlp, _sub(p, "mlp."), x, mask)
    return h + y, stats


def linear_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                 position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """A Gated DeltaNet layer (no rope: position_embeddings unused)."""
    return _layer(layer, p, h, lambda x: qwen3_5.gated_delta_net(layer.linear_attn, _sub(p, "linear_attn."), x),
                  mask)


def full_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
               position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """A gated full-attention layer: the module's own attention, causal sdpa without a mask (right padding)."""
    def attention(x: torch.Tensor) -> torch.Tensor:
        return _call(layer.self_attn, _sub(p, "self_attn."), x, position_embeddings=position_embeddings,
                     attention_mask=None)[0]

    return _layer(layer, p, h, attention, mask)


def packed_linear_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                        position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                        cu_seqlens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """linear_block on a packed row: the conv window and recurrent state restart at each sequence."""
    return _layer(layer, p, h, lambda x: qwen3_5.gated_delta_net(layer.linear_attn, _sub(p, "linear_attn."), x,
                                                                   cu_seqlens), mask)


def packed_full_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                      position_embeddings: tuple[torch.Tensor, torch.Tensor], mask: torch.Tensor,
                      layout: torch.Tensor, impl: str) -> tuple[torch.Tensor, torch.Tensor]:
    """full_block on a packed row: attention within each sequence (qwen3_5.packed_gated_attention)."""
    return _layer(layer, p, h, lambda x: qwen3_5.packed_gated_attention(
        layer.self_attn, _sub(p, "self_attn."), x, position_embeddings, layout, impl), mask)


BLOCK_FNS = {"linear_attention": linear_block, "full_attention": full_block}
PACKED_BLOCK_FNS = {"linear_attention": packed_linear_block, "full_attention": packed_full_block}
# With the CUDA kernels the linear-attention blocks run eagerly in a compiled step, as Qwen3.5 dense's
# (models/qwen3_5.py KERNEL_BLOCK_FNS says why).
KERNEL_BLOCK_FNS = {"linear_attention": compile_lib.eager_region(linear_block), "full_attention": full_block}
KERNEL_PACKED_BLOCK_FNS = {"linear_attention": compile_lib.eager_region(packed_linear_block),
                           "full_attention": packed_full_block}


def block_fns(device: torch.device, packed: bool) -> dict[str, Any]:
    kernels = any(linear_attention.kernel_path(device).values())
    if packed:  # the torch reference restarts the recurrence per row from host-side row bounds, which a
        # compiled region cannot trace: packed linear-attention blocks run eagerly on every device
        return KERNEL_PACKED_BLOCK_FNS
    return KERNEL_BLOCK_FNS if kernels else BLOCK_FNS


def forward_aux(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Final-norm hidden states [B, L, H] and the aux outputs "aux_loss" (load balancing over every layer's real
    tokens, differentiable) and "max_expert_load" (the busiest expert's share over the mean, worst layer). A
    packed batch (one row of several sequences: cu_seqlens, positions restarting) keeps each sequence to itself."""
    h = embed_tokens(model, params, batch["input_ids"], block_call)
    if "pixel_values" in batch:
        merged, _ = qwen3_vl.image_features(model, params, batch, block_call)  # no DeepStack features
        h = scatter_rows(h, batch["image_index"], merged)
    text = model.module.model.language_model
    kinds = text.config.layer_types
    templates = {kind: text.layers[kinds.index(kind)] for kind in set(kinds)}
    position_embeddings = text.rotary_emb(h, batch["position_ids"])
    mask = batch["attention_mask"]
    layout = text_layout(batch, h)
    fns = block_fns(h.device, packed=layout is not None)
    extra: dict[str, tuple] = {kind: () for kind in kinds}
    if layout is not None:
        extra = {"linear_attention": (batch["cu_seqlens"],), "full_attention": layout}
    stats = []
    for i, kind in enumerate(kinds):
        h, s = block_call(fns[kind], templates[kind], model.block_params(params, f"{TEXT}layers.{i}."), h,
                          position_embeddings, mask, *extra[kind], remat=True)
        stats.append(s)
    h = block_call(apply_module, text.norm, model.block_params(params, TEXT + "norm."), h)
    stats = torch.stack(stats)                                       # [layers, 2, E]
    rows = (mask.sum().to(torch.float32) * len(stats)).clamp(min=1)  # a padding-only micro-batch: no rows
    return h, {"aux_loss": moe.load_balancing_loss(stats.sum(0), rows),
               "max_expert_load": moe.max_expert_load(stats[:, 0].detach()).amax()}


def forward_hidden(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    return forward_aux(model, params, batch, block_call)[0]


def hub_name(name: str) -> str:
    """Qwen3.5-MoE is written under the in-memory names (module docstring)."""
    try:
        return qwen3_5.hub_name(name)
    except ValueError:
        raise ValueError(f"param {name!r}: not a Qwen3.5-MoE parameter name (expected model.language_model.*, "
                         "model.visual.* or lm_head.weight)") from None


def expert_parts(name: str) -> tuple[str, ...]:
    """The per-expert tensors a stacked expert param concatenates (rows, in order; "{e}": the expert), as
    transformers' "qwen2_moe" conversion fuses them: gate_up_proj[e] = cat(gate_proj[e], up_proj[e]),
    down_proj[e] = down_proj[e]. () for any other param."""
    prefix, _, leaf = name.rpartition(".")
    if not prefix.endswith("mlp.experts"):
        return ()
    parts = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}.get(leaf, ())
    return tuple(f"{prefix}.{{e}}.{part}.weight" for part in parts)


def check_config(raw: dict, path: str) -> None:
    """Both mixer kinds only (Qwen3.5's check) and a consistent expert count (Qwen3-VL-MoE's)."""
    qwen3_5.check_config(raw, path)
    qwen3_vl_moe.check_config(raw, path)


def flop_shape(config: Any) -> FlopShape:
    """Qwen3.5's (quadratic attention in the full-attention layers only), each stacked expert tensor counted at
    top_k / E of its size; the shared expert and its gate run for every token, as any dense matmul."""
    text = config.text_config
    return dataclasses.replace(qwen3_5.flop_shape(config), expert_suffixes=EXPERTS,
                               expert_fraction=text.num_experts_per_tok / text.num_experts)


def _hf_class() -> type:
    from transformers import Qwen3_5MoeForConditionalGeneration
    return Qwen3_5MoeForConditionalGeneration


FAMILY = Family(
    name="qwen3_5_moe", model_type="qwen3_5_moe", hf_class=_hf_class,
    block_pattern=qwen3_5.FAMILY.block_pattern, top_prefixes=qwen3_5.FAMILY.top_prefixes,
    forward_hidden=forward_hidden, vision_spec=Qwen3VLVisionSpec.from_config, flop_shape=flop_shape,
    hub_name=hub_name, check_config=check_config, forward_aux=forward_aux, expert_parts=expert_parts,
    default_aux_loss_coef=qwen3_vl_moe.default_aux_loss_coef)
