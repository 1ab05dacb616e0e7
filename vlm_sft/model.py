"""Qwen2.5-VL as a pure function of a params pytree.

`load_model` reads a Hugging Face directory (as the Hub ships it) into fp32 master params: a flat dict keyed by the
module's parameter names. The HF module is kept only as a library of submodules and buffers; `forward_hidden`
applies them block by block with `torch.func.functional_call`, so the params that flow through the step are the
ones passed in (never the module's own), and a per-block hook (`block_call`) is where sharding gathers and
activation checkpointing attach. The data-dependent vision indexing comes precomputed in the batch
(data/vision.py), so nothing here syncs with the host.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

Params = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]
BlockCall = Callable[..., Any]

VISUAL = "model.visual."
TEXT = "model.language_model."


@dataclasses.dataclass(eq=False)
class Model:
    """The HF module (structure and buffers only) and what the functional forward needs to know about it."""

    module: torch.nn.Module
    config: Any
    tied: bool
    groups: dict[str, list[str]]  # module prefix -> the param names under it, for per-block application

    @property
    def lm_head_name(self) -> str:
        return TEXT + "embed_tokens.weight" if self.tied else "lm_head.weight"

    def block_params(self, params: Params, prefix: str) -> Params:
        """The params of one block, keyed relative to it (what functional_call on the block expects)."""
        return {name[len(prefix):]: params[name] for name in self.groups[prefix]}


class ModelLoadError(ValueError):
    pass


def check_model_dir(path: str) -> None:
    """Cheap checks before any heavy work: the directory exists and holds a Qwen2.5-VL config and weights."""
    field = "actor.model.model_path"
    if not path:
        raise ModelLoadError(f"{field} is empty: set it to a local Hugging Face model directory")
    if not os.path.isdir(path):
        raise ModelLoadError(f"{field}={path!r}: no such directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelLoadError(f"{field}={path!r}: directory is not readable")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{field}={path!r}: no config.json (not a Hugging Face model directory)")
    if not any(f.endswith(".safetensors") or f.endswith(".bin") for f in os.listdir(path)):
        raise ModelLoadError(f"{field}={path!r}: no *.safetensors weights")
    import json
    with open(os.path.join(path, "config.json")) as f:
        model_type = json.load(f).get("model_type")
    if model_type != "qwen2_5_vl":
        raise ModelLoadError(f"{field}={path!r}: model_type is {model_type!r}; vlm-sft supports 'qwen2_5_vl'")


def _groups(names: list[str]) -> dict[str, list[str]]:
    block = re.compile(r"^(model\.visual\.blocks\.\d+\.|model\.language_model\.layers\.\d+\.)")
    groups: dict[str, list[str]] = {}
    for name in names:
        m = block.match(name)
        if m:
            prefix = m.group(1)
        else:
            prefix = name.rsplit(".", 1)[0] + "."
            for top in ("model.visual.patch_embed.", "model.visual.merger.", TEXT + "embed_tokens.",
                        TEXT + "norm.", "lm_head."):
                if name.startswith(top):
                    prefix = top
        groups.setdefault(prefix, []).append(name)
    return groups


def load_model(path: str, *, attn_implementation: str = "sdpa") -> tuple[Model, Params]:
    """Load a local Qwen2.5-VL directory; returns the model skeleton and fp32 master params.

    The params share storage with the module's parameters (no second copy of the weights in memory); the module's
    values are never read by the functional forward, so updating the params in place is harmless.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    check_model_dir(path)
    module, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True,
        output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
    if missing:
        raise ModelLoadError(f"actor.model.model_path={path!r}: weights missing for {len(missing)} tensors, "
                             f"first {missing[0]!r}")
    module.train()
    module.requires_grad_(False)
    names = [n for n, _ in module.named_parameters()]
    params = {n: p.detach() for n, p in module.named_parameters()}
    tied = "lm_head.weight" not in params
    return Model(module=module, config=module.config, tied=tied, groups=_groups(names)), params


def _call(module: torch.nn.Module, params: Params, *args: Any, **kwargs: Any) -> Any:
    return functional_call(module, params, args, kwargs, tie_weights=False, strict=True)


def _vision_rotary(visual: torch.nn.Module, rotary_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, head_dim] of the vision tower's 2D rope for (row, col) patch coordinates."""
    inv_freq = visual.rotary_pos_emb.inv_freq
    freqs = rotary_ids[..., None].float() * inv_freq.float()      # [P, 2, head_dim / 4]
    freqs = freqs.flatten(1)                                     # [P, head_dim / 2]: rows then cols
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def vision_attention(block: torch.nn.Module, p: Params, x: torch.Tensor, gather: torch.Tensor,
                     mask: torch.Tensor, scatter: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor) -> torch.Tensor:
    """Attention within each segment (window or frame) of the packed patches x [P, D], no loop over images.

    The segments' layout comes precomputed (data/vision.py attention_layout): one batched sdpa over the segments
    gathered into padded rows [segments, max_len], pad keys masked. It costs segments * max_len^2 (~sum(len^2):
    windows differ only at image borders), not the P^2 of a block-diagonal mask. `cu_seqlens` is the same layout
    for a varlen flash attention kernel (not used yet: untested without a GPU).
    """
    attn = block.attn
    n = x.shape[0]
    qkv = F.linear(x, p["attn.qkv.weight"], p["attn.qkv.bias"]).view(n, 3, attn.num_heads, -1)
    q, k, v = qkv.unbind(1)                                        # [P, heads, head_dim]
    c, s = cos[:, None, :], sin[:, None, :]
    q = (q.float() * c + _rotate_half(q.float()) * s).to(v.dtype)
    k = (k.float() * c + _rotate_half(k.float()) * s).to(v.dtype)
    rows, width = gather.shape
    q, k, v = (t[gather].transpose(1, 2) for t in (q, k, v))   # [segments, heads, max_len, head_dim]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
    out = out.transpose(1, 2).reshape(rows * width, -1)[scatter]
    return F.linear(out.reshape(n, -1), p["attn.proj.weight"], p["attn.proj.bias"])


def vision_block(block: torch.nn.Module, p: Params, x: torch.Tensor, gather: torch.Tensor, mask: torch.Tensor,
                 scatter: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> torch.Tensor:
    sub = lambda prefix: {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    h = _call(block.norm1, sub("norm1."), x)
    x = x + vision_attention(block, p, h, gather, mask, scatter, cu_seqlens, cos, sin)
    return x + _call(block.mlp, sub("mlp."), _call(block.norm2, sub("norm2."), x))


def decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # attention_mask=None -> causal sdpa: exact for right-padded batches (see data/collate.py).
    out = _call(layer, p, h, attention_mask=None, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def layer_templates(layers: torch.nn.ModuleList) -> list[torch.nn.Module]:
    """The module each decoder layer is applied with: the first layer of the same attention type (a layer's own
    state beyond its params is only its index, used by the KV cache, which training does not use). Applying
    every layer with one template lets a compiled region serve them all (vlm_sft/compile.py)."""
    first: dict[Any, torch.nn.Module] = {}
    return [first.setdefault(getattr(layer.self_attn, "layer_type", None), layer) for layer in layers]


def plain_block_call(fn: Callable[..., torch.Tensor], module: torch.nn.Module | None, p: Params, *args: Any,
                     remat: bool = False, dynamic: bool = False) -> torch.Tensor:
    """Default hook through which every param group is applied: `fn(module, p, *args)` with p as given.

    The sharding layer replaces it with one that gathers `p` first (and frees it after), and re-runs the block in
    backward when `remat` (activation checkpointing; True for decoder and vision blocks). `dynamic` marks the
    calls over the packed image patches, whose sizes change with every batch (compile.py: dynamic shapes there).
    """
    return fn(module, p, *args)


def _apply_module(module: torch.nn.Module, p: Params, *args: Any) -> torch.Tensor:
    return _call(module, p, *args)


def _embed(module: None, p: Params, input_ids: torch.Tensor) -> torch.Tensor:
    return F.embedding(input_ids, p["weight"])


def _lm_head(module: None, p: Params, hidden: torch.Tensor) -> torch.Tensor:
    return F.linear(hidden, p["weight"])


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
    x = block_call(_apply_module, visual.patch_embed, model.block_params(params, prefix), batch["pixel_values"],
                   dynamic=True)
    window = batch["window_index"]
    x = _window_order(x, window, unit)
    cos, sin = _vision_rotary(visual, batch["vision_rotary_ids"])
    cos, sin = _window_order(cos, window, unit), _window_order(sin, window, unit)
    full = set(visual.fullatt_block_indexes)
    template = visual.blocks[0]  # every block: one compiled region (the params come from p)
    for i in range(len(visual.blocks)):
        kind = "full" if i in full else "window"
        layout = [batch[f"{kind}_{key}"] for key in ("gather", "mask", "scatter", "cu_seqlens")]
        x = block_call(vision_block, template, model.block_params(params, f"{VISUAL}blocks.{i}."), x, *layout, cos,
                       sin, remat=True, dynamic=True)
    merged = block_call(_apply_module, visual.merger, model.block_params(params, VISUAL + "merger."), x,
                        dynamic=True)
    return merged[batch["window_reverse"]]


def forward_hidden(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    """Final-norm hidden states [B, L, H] of the text model for the batch (images scattered into their tokens)."""
    text = model.module.model.language_model
    h = block_call(_embed, None, {"weight": params[TEXT + "embed_tokens.weight"]}, batch["input_ids"])
    if "pixel_values" in batch:
        feats = image_features(model, params, batch, block_call).to(h.dtype)
        b, l, d = h.shape
        h = h.reshape(b * l, d).index_put((batch["image_index"],), feats).view(b, l, d)
    position_embeddings = text.rotary_emb(h, batch["position_ids"])
    templates = layer_templates(text.layers)
    for i, layer in enumerate(templates):
        h = block_call(decoder_block, layer, model.block_params(params, f"{TEXT}layers.{i}."), h,
                       position_embeddings, remat=True)
    return block_call(_apply_module, text.norm, model.block_params(params, TEXT + "norm."), h)


def label_logits(model: Model, params: Params, hidden: torch.Tensor, index: torch.Tensor,
                 block_call: BlockCall = plain_block_call) -> torch.Tensor:
    """lm_head applied only at the flat positions `index` of `hidden` [B, L, H] -> [N, vocab]."""
    selected = hidden.reshape(-1, hidden.shape[-1])[index]
    return block_call(_lm_head, None, {"weight": params[model.lm_head_name]}, selected)


def token_nll(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
              ) -> torch.Tensor:
    """Negative log-likelihood [N] (fp32) of every label token of the batch."""
    hidden = forward_hidden(model, params, batch, block_call)
    logits = label_logits(model, params, hidden, batch["label_index"], block_call)
    return F.cross_entropy(logits.float(), batch["label_ids"], reduction="none")
