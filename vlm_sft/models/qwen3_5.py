"""Qwen3.5 (dense): exactly transformers' Qwen3_5ForConditionalGeneration, as a function of the params.

Vision: Qwen3-VL's tower without DeepStack (patch 16, learned position grid, 2D rotary, full attention within
frames, patch merger: models/qwen3_vl.image_features). Text: a hybrid decoder whose `layer_types` mix two block
kinds, each applied with one template layer (so each kind is one compiled region):
  linear_attention  Gated DeltaNet: in_proj_qkv -> causal depthwise conv (silu) -> q, k, v; the chunked gated
                    delta rule (decay g = -exp(A_log) * softplus(a + dt_bias), rate beta = sigmoid(b)); a gated
                    RMSNorm (weight * norm(o) * silu(z)); out_proj. Kernels or torch: models/linear_attention.py.
  full_attention    gated attention (q_proj gives queries and a sigmoid output gate), q/k norm, partial interleaved
                    M-RoPE (the module's rotary embedding, 1/4 of head_dim rotated), causal sdpa.
RMSNorms are zero-centred (x * (1 + w)). Untied lm_head (9B, 27B) or tied (the small sizes).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from vlm_sft import compile as compile_lib

from vlm_sft.data.vision import Qwen3VLVisionSpec
from vlm_sft.models import linear_attention, qwen3_vl
from vlm_sft.errors import ModelLoadError
from vlm_sft.models.attention import segment_attention
from vlm_sft.models.common import (TEXT, VISUAL, Batch, BlockCall, Family, FlopShape, Model, Params, _call,
                                   apply_module, decoder_block, embed_tokens, plain_block_call, scatter_rows,
                                   text_layout)

LAYER_KINDS = ("linear_attention", "full_attention")


def _sub(p: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


def gated_delta_net(attn: torch.nn.Module, p: Params, h: torch.Tensor, cu_seqlens: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """One Gated DeltaNet token mixer on h [B, L, D] (the module only gives sizes; weights come from p)."""
    b, length, _ = h.shape
    qkv = F.linear(h, p["in_proj_qkv.weight"])
    z = F.linear(h, p["in_proj_z.weight"]).reshape(b, length, -1, attn.head_v_dim)
    beta = F.linear(h, p["in_proj_b.weight"]).sigmoid()
    a = F.linear(h, p["in_proj_a.weight"])
    qkv = linear_attention.causal_conv1d(qkv, p["conv1d.weight"].squeeze(1), cu_seqlens)
    q, k, v = torch.split(qkv, [attn.key_dim, attn.key_dim, attn.value_dim], dim=-1)
    q = q.reshape(b, length, -1, attn.head_k_dim)
    k = k.reshape(b, length, -1, attn.head_k_dim)
    v = v.reshape(b, length, -1, attn.head_v_dim)
    g = -p["A_log"].float().exp() * F.softplus(a.float() + p["dt_bias"])
    out = linear_attention.gated_delta_rule(q, k, v, g, beta, cu_seqlens)
    # Gated RMSNorm over each head's values (fp32 normalisation, as transformers' Qwen3_5RMSNormGated).
    dtype = out.dtype
    o = out.float()
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + attn.norm.variance_epsilon)
    o = (p["norm.weight"] * o.to(dtype)) * F.silu(z.float())
    return F.linear(o.to(dtype).reshape(b, length, -1), p["out_proj.weight"])


def linear_decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """A linear-attention decoder layer (pre-norm Gated DeltaNet, pre-norm MLP); no rope (position_embeddings
    unused: the recurrence is ordered by itself)."""
    x = _call(layer.input_layernorm, _sub(p, "input_layernorm."), h)
    h = h + gated_delta_net(layer.linear_attn, _sub(p, "linear_attn."), x)
    x = _call(layer.post_attention_layernorm, _sub(p, "post_attention_layernorm."), h)
    return h + _call(layer.mlp, _sub(p, "mlp."), x)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def packed_gated_attention(attn: torch.nn.Module, p: Params, x: torch.Tensor,
                           position_embeddings: tuple[torch.Tensor, torch.Tensor], layout: torch.Tensor, impl: str
                           ) -> torch.Tensor:
    """transformers' Qwen3_5Attention on a packed row x [1, T, D] attending causally within each sequence only:
    q_proj gives each head's query and output gate, q/k RMSNorm, rope on the first cos.shape[-1] dims of each head
    (partial rotary), attention, sigmoid(gate) * out, o_proj. `layout`, `impl` as common.text_layout gives them:
    the sequences' cu_seqlens and how attention.segment_attention runs over them."""
    b, t, _ = x.shape
    d = attn.head_dim
    q, gate = F.linear(x, p["q_proj.weight"], p.get("q_proj.bias")).view(b, t, -1, 2 * d).chunk(2, dim=-1)
    k = F.linear(x, p["k_proj.weight"], p.get("k_proj.bias")).view(b, t, -1, d)
    v = F.linear(x, p["v_proj.weight"], p.get("v_proj.bias")).view(b, t, -1, d).transpose(1, 2)
    q = _call(attn.q_norm, _sub(p, "q_norm."), q).transpose(1, 2)      # [1, heads, T, d]
    k = _call(attn.k_norm, _sub(p, "k_norm."), k).transpose(1, 2)
    cos, sin = (e.unsqueeze(1) for e in position_embeddings)           # [1, 1, T, rotary]
    r = cos.shape[-1]
    q = torch.cat([q[..., :r] * cos + _rotate_half(q[..., :r]) * sin, q[..., r:]], dim=-1)
    k = torch.cat([k[..., :r] * cos + _rotate_half(k[..., :r]) * sin, k[..., r:]], dim=-1)
    out = segment_attention(*(z[0].transpose(0, 1) for z in (q, k, v)), layout, t, causal=True, scale=attn.scaling,
                            impl=impl)
    out = out.reshape(b, t, -1) * torch.sigmoid(gate.reshape(b, t, -1))
    return F.linear(out, p["o_proj.weight"], p.get("o_proj.bias"))


def packed_full_decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                              position_embeddings: tuple[torch.Tensor, torch.Tensor], layout: torch.Tensor,
                              impl: str) -> torch.Tensor:
    """A full-attention decoder layer on a packed row (the layer's own norms and MLP, packed_gated_attention)."""
    x = _call(layer.input_layernorm, _sub(p, "input_layernorm."), h)
    h = h + packed_gated_attention(layer.self_attn, _sub(p, "self_attn."), x, position_embeddings, layout, impl)
    x = _call(layer.post_attention_layernorm, _sub(p, "post_attention_layernorm."), h)
    return h + _call(layer.mlp, _sub(p, "mlp."), x)


def packed_linear_decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                                position_embeddings: tuple[torch.Tensor, torch.Tensor], cu_seqlens: torch.Tensor
                                ) -> torch.Tensor:
    """A linear-attention decoder layer on a packed row: conv window and recurrent state restart per sequence."""
    x = _call(layer.input_layernorm, _sub(p, "input_layernorm."), h)
    h = h + gated_delta_net(layer.linear_attn, _sub(p, "linear_attn."), x, cu_seqlens)
    x = _call(layer.post_attention_layernorm, _sub(p, "post_attention_layernorm."), h)
    return h + _call(layer.mlp, _sub(p, "mlp."), x)


BLOCK_FNS = {"linear_attention": linear_decoder_block, "full_attention": decoder_block}
PACKED_BLOCK_FNS = {"linear_attention": packed_linear_decoder_block, "full_attention": packed_full_decoder_block}
# With the CUDA kernels the linear-attention blocks run eagerly even in a compiled step (compile.eager_region): fla's ops are triton
# autograd Functions behind Python-level guards (inspect.signature, device contexts) that dynamo's fullgraph
# tracing is not known to take (untested without a GPU); eager, they still run the kernels and cuBLAS matmuls, and
# the full-attention blocks and the vision tower stay compiled. compile.eager_region keeps the region's call
# sites as they are (compile.py's block_call runs it uncompiled).
KERNEL_BLOCK_FNS = {"linear_attention": compile_lib.eager_region(linear_decoder_block),
                    "full_attention": decoder_block}
KERNEL_PACKED_BLOCK_FNS = {"linear_attention": compile_lib.eager_region(packed_linear_decoder_block),
                           "full_attention": packed_full_decoder_block}


def block_fns(device: torch.device, packed: bool) -> dict[str, Any]:
    """The function each layer kind is applied with on `device` (module docstring; KERNEL_BLOCK_FNS)."""
    kernels = any(linear_attention.kernel_path(device).values())
    if packed:  # the torch reference restarts the recurrence per row from host-side row bounds, which a
        # compiled region cannot trace: packed linear-attention blocks run eagerly on every device
        return KERNEL_PACKED_BLOCK_FNS
    return KERNEL_BLOCK_FNS if kernels else BLOCK_FNS


def text_stack(model: Model, params: Params, h: torch.Tensor, position_ids: torch.Tensor, block_call: BlockCall,
               packing: tuple[torch.Tensor, tuple[torch.Tensor, str]] | None = None) -> torch.Tensor:
    """The hybrid decoder layers and final norm on input embeddings h [B, L, D]. Layers of one kind share their
    function and template module (the first layer of that kind): one compiled region per kind.

    `packing` (cu_seqlens [n + 1], common.text_layout's (layout, impl)): h is one packed row of n sequences; the
    linear layers restart their conv and state at each boundary, the full-attention layers attend within each
    sequence."""
    text = model.module.model.language_model
    kinds = text.config.layer_types
    templates = {kind: text.layers[kinds.index(kind)] for kind in set(kinds)}
    position_embeddings = text.rotary_emb(h, position_ids)
    extra: dict[str, tuple] = {kind: () for kind in kinds}
    fns = block_fns(h.device, packed=packing is not None)
    if packing is not None:
        cu_seqlens, layout = packing
        extra = {"linear_attention": (cu_seqlens,), "full_attention": layout}
    for i, kind in enumerate(kinds):
        h = block_call(fns[kind], templates[kind], model.block_params(params, f"{TEXT}layers.{i}."), h,
                       position_embeddings, *extra[kind], remat=True)
    return block_call(apply_module, text.norm, model.block_params(params, TEXT + "norm."), h)


def forward_hidden(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    """Final-norm hidden states [B, L, H] of the text model for the batch (images scattered into their tokens).
    A packed batch (one row of several sequences, with `cu_seqlens` and `row_ids` as the packing collate gives
    them, positions restarting per sequence) keeps every sequence to itself."""
    h = embed_tokens(model, params, batch["input_ids"], block_call)
    if "pixel_values" in batch:
        merged, _ = qwen3_vl.image_features(model, params, batch, block_call)  # no DeepStack features
        h = scatter_rows(h, batch["image_index"], merged)
    layout = text_layout(batch, h)
    packing = None if layout is None else (batch["cu_seqlens"], layout)
    return text_stack(model, params, h, batch["position_ids"], block_call, packing)


def hub_name(name: str) -> str:
    """Qwen3.5 ships under the in-memory names (model.language_model.*, model.visual.*; its mtp.* multi-token
    prediction head is not loaded by transformers, so it is neither trained nor exported)."""
    if name.startswith((TEXT, VISUAL)) or name == "lm_head.weight":
        return name
    raise ValueError(f"param {name!r}: not a Qwen3.5 parameter name (expected model.language_model.*, "
                     "model.visual.* or lm_head.weight)")


def flop_shape(config: Any) -> FlopShape:
    """Only the full-attention layers attend quadratically; the linear layers' weights count per token like any
    matmul, and their delta-rule state work (~6 dk dv per head and token: ~0.4% of a 9B's FLOPs) is left out as
    the norms are."""
    text, vision = config.text_config, config.vision_config
    return FlopShape(
        text_layers=sum(kind == "full_attention" for kind in text.layer_types),
        text_heads=text.num_attention_heads,
        text_head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        vision_heads=vision.num_heads, vision_head_dim=vision.hidden_size // vision.num_heads,
        window_blocks=0, full_blocks=vision.depth, merge_unit=vision.spatial_merge_size ** 2,
        merger_prefixes=(VISUAL + "merger.",), pos_embed_taps=4, vision_hidden=vision.hidden_size)


def check_config(raw: dict, path: str) -> None:
    """config.json (as a dict): every layer is one of the two kinds this forward implements."""
    text = raw.get("text_config") or {}
    unknown = sorted(set(text.get("layer_types") or ()) - set(LAYER_KINDS))
    if unknown:
        raise ModelLoadError(f"actor.model.model_path={path!r}: config.json text_config.layer_types holds "
                             f"{unknown}; vlm-sft supports {list(LAYER_KINDS)}")


def _hf_class() -> type:
    from transformers import Qwen3_5ForConditionalGeneration
    return Qwen3_5ForConditionalGeneration


FAMILY = Family(
    name="qwen3_5", model_type="qwen3_5", hf_class=_hf_class,
    block_pattern=r"^(model\.visual\.blocks\.\d+\.|model\.language_model\.layers\.\d+\.)",
    top_prefixes=(VISUAL + "patch_embed.", VISUAL + "pos_embed.", VISUAL + "merger.", TEXT + "embed_tokens.",
                  TEXT + "norm.", "lm_head."),
    forward_hidden=forward_hidden, vision_spec=Qwen3VLVisionSpec.from_config, flop_shape=flop_shape,
    hub_name=hub_name, check_config=check_config)
