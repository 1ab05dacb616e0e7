"""What every model family shares: the Model skeleton, the block_call hook, block application, packed vision
attention, lm_head at labelled positions and the token NLL.

A model is a pure function of a params pytree: a flat dict keyed by the HF module's parameter names. The HF module
is kept only as a library of submodules and buffers; each family's `forward_hidden` applies them block by block
with `torch.func.functional_call`, so the params that flow through the step are the ones passed in (never the
module's own), and a per-block hook (`block_call`) is where sharding gathers and activation checkpointing attach.
Every block of one kind is applied with the same function and the same template module (the first block: params
come from `p`, the module is only structure), so identical blocks can share one compiled graph. The
data-dependent vision indexing comes precomputed in the batch (data/vision.py), so nothing here syncs with the host
except packed text attention off the flash path (models/attention.py), which reads the rows' bounds: free on CPU.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch.func import functional_call

from vlm_sft import compile as compile_lib
from vlm_sft.models.attention import attention_impl, compute_dtype, gathered_attention, segment_attention

Params = dict[str, torch.Tensor]
Batch = dict[str, torch.Tensor]
BlockCall = Callable[..., Any]

VISUAL = "model.visual."
TEXT = "model.language_model."


@dataclasses.dataclass(frozen=True)
class FlopShape:
    """What the FLOP model (perf.py) needs to know of a family's architecture beyond its params' shapes."""

    text_layers: int
    text_heads: int
    text_head_dim: int
    vision_heads: int
    vision_head_dim: int
    window_blocks: int        # vision blocks attending within windows
    full_blocks: int          # vision blocks attending within whole frames
    merge_unit: int           # patches per merged token (spatial_merge_size^2)
    merger_prefixes: tuple[str, ...]  # param prefixes applied once per merged token (merger, DeepStack mergers)
    pos_embed_taps: int = 0   # learned position-embedding rows mixed into each patch (0: none)
    vision_hidden: int = 0    # width of those rows
    expert_suffixes: tuple[str, ...] = ()  # stacked expert tensors (param name suffixes): each token runs a part
    expert_fraction: float = 1.0           # ... top_k / num_experts of them


@dataclasses.dataclass(frozen=True, eq=False)
class Family:
    """One model family behind the small interface the trainer uses (one module each under models/)."""

    name: str                 # actor.model.model_type (RLinf's spelling)
    model_type: str           # config.json's model_type
    hf_class: Callable[[], type]  # -> the transformers class (imported lazily)
    block_pattern: str        # regex of the per-block param prefixes (decoder layers, vision blocks, ...)
    top_prefixes: tuple[str, ...]  # single param groups (embedding, patch embedding, mergers, norms, lm_head)
    forward_hidden: Callable[..., torch.Tensor]   # (model, params, batch, block_call) -> [B, L, H]
    vision_spec: Callable[[Any, int], Any]        # (hf config, pad id) -> picklable host precompute for collate
    flop_shape: Callable[[Any], FlopShape]
    hub_name: Callable[[str], str]                # in-memory param name -> its name in the Hub's safetensors
    check_config: Callable[[dict, str], None] = lambda raw, path: None  # config.json features it does not support
    # (model, params, batch, block_call) -> (hidden [B, L, H], aux): families with terms beyond the token NLL
    # (a router's load-balancing loss: "aux_loss", routing metrics); None: forward_hidden and no aux.
    forward_aux: Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]] | None = None
    # (in-memory name, tensor) -> the tensor as the Hub's files hold it, and back (a layout that differs, such as
    # transposed stacked experts); identity by default.
    to_hub: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t
    from_hub: Callable[[str, torch.Tensor], torch.Tensor] = lambda name, t: t
    # stacked expert param name -> the per-expert tensor names (with "{e}" for the expert) whose rows it
    # concatenates, for directories written one tensor per expert (loading.py reads both layouts); () when none.
    expert_parts: Callable[[str], tuple[str, ...]] = lambda name: ()
    # hf config -> the weight of forward_aux's "aux_loss" when actor.model.router_aux_loss_coef is None
    default_aux_loss_coef: Callable[[Any], float] = lambda config: 0.0


@dataclasses.dataclass(eq=False)
class Model:
    """The HF module (structure and buffers only) and what the functional forward needs to know about it."""

    module: torch.nn.Module
    config: Any
    tied: bool
    groups: dict[str, list[str]]  # module prefix -> the param names under it, for per-block application
    family: Family

    @property
    def lm_head_name(self) -> str:
        return TEXT + "embed_tokens.weight" if self.tied else "lm_head.weight"

    def block_params(self, params: Params, prefix: str) -> Params:
        """The params of one block, keyed relative to it (what functional_call on the block expects)."""
        return {name[len(prefix):]: params[name] for name in self.groups[prefix]}

    def vision_spec(self, pad_token_id: int) -> Any:
        """The family's host-side vision precompute (collate calls its `image_inputs`)."""
        return self.family.vision_spec(self.config, pad_token_id)


def param_groups(names: list[str], family: Family) -> dict[str, list[str]]:
    """Param names grouped by the block (or top-level module) that applies them."""
    block = re.compile(family.block_pattern)
    groups: dict[str, list[str]] = {}
    for name in names:
        m = block.match(name)
        if m:
            prefix = m.group(1)
        else:
            prefix = name.rsplit(".", 1)[0] + "."
            for top in family.top_prefixes:
                if name.startswith(top):
                    prefix = top
        groups.setdefault(prefix, []).append(name)
    return groups


def model_from_module(module: torch.nn.Module, family: Family) -> tuple[Model, Params]:
    """Model skeleton and params of an HF module already in memory. The params share storage with the module's
    parameters (no second copy); the functional forward never reads the module's values, so updating the params
    in place is harmless."""
    module.train()
    module.requires_grad_(False)
    params = {n: p.detach() for n, p in module.named_parameters()}
    tied = "lm_head.weight" not in params
    return Model(module=module, config=module.config, tied=tied, groups=param_groups(list(params), family),
                 family=family), params


def _call(module: torch.nn.Module, params: Params, *args: Any, **kwargs: Any) -> Any:
    return functional_call(module, params, args, kwargs, tie_weights=False, strict=True)


def vision_rotary(inv_freq: torch.Tensor, rotary_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [P, head_dim] of a vision tower's 2D rope for (row, col) patch coordinates (both families)."""
    freqs = rotary_ids[..., None].float() * inv_freq.float()     # [P, 2, head_dim / 4]
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

    The segments' layout comes precomputed (data/vision.py attention_layout). On CUDA in half precision: the varlen
    flash kernel over `cu_seqlens` (the longest segment is gather's width). Elsewhere: one batched sdpa over the
    segments gathered into padded rows [segments, max_len], pad keys masked. It costs segments * max_len^2
    (~sum(len^2): windows differ only at image borders), not the P^2 of a block-diagonal mask.
    """
    attn = block.attn
    n = x.shape[0]
    qkv = F.linear(x, p["attn.qkv.weight"], p["attn.qkv.bias"]).view(n, 3, attn.num_heads, -1)
    q, k, v = qkv.unbind(1)                                        # [P, heads, head_dim]
    c, s = cos[:, None, :], sin[:, None, :]
    q = (q.float() * c + _rotate_half(q.float()) * s).to(v.dtype)
    k = (k.float() * c + _rotate_half(k.float()) * s).to(v.dtype)
    if attention_impl(x.device, v.dtype) == "varlen":
        out = segment_attention(q, k, v, cu_seqlens, gather.shape[1], causal=False)
    else:
        out = gathered_attention(q, k, v, gather, mask, scatter, causal=False)
    return F.linear(out.reshape(n, -1), p["attn.proj.weight"], p["attn.proj.bias"])


def vision_block(block: torch.nn.Module, p: Params, x: torch.Tensor, gather: torch.Tensor, mask: torch.Tensor,
                 scatter: torch.Tensor, cu_seqlens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
                 ) -> torch.Tensor:
    """A pre-norm vision transformer block (norm1, attn, norm2, mlp) of either family."""
    sub = lambda prefix: {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}
    h = _call(block.norm1, sub("norm1."), x)
    x = x + vision_attention(block, p, h, gather, mask, scatter, cu_seqlens, cos, sin)
    return x + _call(block.mlp, sub("mlp."), _call(block.norm2, sub("norm2."), x))


def decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                  position_embeddings: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    # attention_mask=None -> causal sdpa: exact for right-padded batches (see data/collate.py). The layer's own
    # layer_idx (KV cache only) and attention type (the mask we do not build) play no part here, so one template
    # layer serves every layer.
    out = _call(layer, p, h, attention_mask=None, position_embeddings=position_embeddings)
    return out[0] if isinstance(out, tuple) else out


def _sub(p: Params, prefix: str) -> Params:
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


def packed_self_attention(attn: torch.nn.Module, p: Params, x: torch.Tensor,
                          position_embeddings: tuple[torch.Tensor, torch.Tensor], layout: torch.Tensor, impl: str
                          ) -> torch.Tensor:
    """transformers' text self-attention of either family (q/k/v projections, Qwen3's per-head q/k RMSNorm, rope
    on the M-RoPE cos/sin, o_proj) on one packed sequence x [1, T, D], attending causally within each row only.

    `layout`: the rows' cu_seqlens (int32, padded with T), `impl` how segment_attention runs over them.
    """
    b, t, _ = x.shape
    d = attn.head_dim

    def project(name: str) -> torch.Tensor:
        return F.linear(x, p[f"{name}.weight"], p.get(f"{name}.bias")).view(b, t, -1, d)

    q, k, v = project("q_proj"), project("k_proj"), project("v_proj")
    if hasattr(attn, "q_norm"):  # Qwen3: RMSNorm over each head before rope
        q, k = _call(attn.q_norm, _sub(p, "q_norm."), q), _call(attn.k_norm, _sub(p, "k_norm."), k)
    cos, sin = (e.unsqueeze(2) for e in position_embeddings)      # [1, T, 1, d]
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin  # [1, T, heads, d]
    out = segment_attention(q[0], k[0], v[0], layout, t, causal=True, scale=attn.scaling, impl=impl)
    return F.linear(out.reshape(b, t, -1), p["o_proj.weight"], p.get("o_proj.bias"))


def packed_decoder_block(layer: torch.nn.Module, p: Params, h: torch.Tensor,
                         position_embeddings: tuple[torch.Tensor, torch.Tensor], layout: torch.Tensor, impl: str
                         ) -> torch.Tensor:
    """A text decoder layer (both families: pre-norm attention and MLP, residuals) on a packed sequence; the
    norms and the MLP are the layer's own modules, the attention is packed_self_attention."""
    x = _call(layer.input_layernorm, _sub(p, "input_layernorm."), h)
    h = h + packed_self_attention(layer.self_attn, _sub(p, "self_attn."), x, position_embeddings, layout, impl)
    x = _call(layer.post_attention_layernorm, _sub(p, "post_attention_layernorm."), h)
    return h + _call(layer.mlp, _sub(p, "mlp."), x)


def text_layout(batch: Batch, h: torch.Tensor) -> tuple[torch.Tensor, str] | None:
    """How a packed batch's text attention keeps to its rows (None: not packed, plain causal attention)."""
    if "cu_seqlens" not in batch:
        return None
    return batch["cu_seqlens"], attention_impl(h.device, h.dtype)


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


def apply_module(module: torch.nn.Module, p: Params, *args: Any) -> torch.Tensor:
    return _call(module, p, *args)


def patch_embed(module: torch.nn.Module, p: Params, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's patch embedding, every family's: transformers' Conv3d whose kernel is its stride, over each
    row of pixel_values viewed as [channels, temporal, height, width], is one matmul of the flattened patch with
    the flattened kernel. Run as that matmul: the same sums, where the convolution is ~7x slower on CPU in fp32 and
    ~100x in bf16 (bench/patch_embed.py), and cuDNN's kernels for this degenerate Conv3d are known to be slow on
    some GPUs and dtypes and are not deterministic in backward."""
    proj = module.proj
    if tuple(proj.kernel_size) != tuple(proj.stride) or any(proj.padding) or proj.groups != 1:
        raise NotImplementedError(f"patch embedding {proj}: only a Conv3d with stride == kernel_size is a matmul")
    w = p["proj.weight"]
    return F.linear(pixel_values.to(w.dtype), w.flatten(1), p.get("proj.bias"))


@compile_lib.eager_region
def embed(module: None, p: Params, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings. Eager even in a compiled step: inductor lowers the embedding's backward to a scatter of
    atomic adds whose order, for a token that occurs more than once, follows the threads' timing, so the same step
    gave gradients that differed in the last bit from call to call (fp32; tests/test_compile.py). The eager
    kernels (CPU: each thread owns a range of rows; CUDA: sorted by token, summed in fp32) are deterministic, and
    a compiled region of one gather saved nothing."""
    return F.embedding(input_ids, p["weight"])


def _lm_head(module: None, p: Params, hidden: torch.Tensor) -> torch.Tensor:
    """Logits at the labelled positions. A bf16/fp16 step on CPU computes them in fp32 (attention.compute_dtype):
    torch's CPU half-precision matmul over the 152k vocabulary is ~20x the fp32 one without bf16 instructions
    (bench/lm_head_cpu.py), and the loss takes fp32 logits anyway. Elsewhere in the step's dtype."""
    work = compute_dtype(hidden)
    return F.linear(hidden.to(work), p["weight"].to(work))


def scatter_rows(h: torch.Tensor, index: torch.Tensor, rows: torch.Tensor, *, add: bool = False) -> torch.Tensor:
    """h [B, L, D] with the flat positions `index` replaced by (or, with `add`, increased by) `rows` [N, D]."""
    b, l, d = h.shape
    return h.reshape(b * l, d).index_put((index,), rows.to(h.dtype), accumulate=add).view(b, l, d)


def decoder_stack(model: Model, params: Params, h: torch.Tensor, position_ids: torch.Tensor,
                  block_call: BlockCall, after_layer: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
                  layout: tuple[torch.Tensor, str] | None = None) -> torch.Tensor:
    """The text decoder layers and final norm on input embeddings h [B, L, D]; `after_layer(i, h)` may change
    the hidden states between layers (DeepStack). `layout` (text_layout): a packed batch's row boundaries."""
    text = model.module.model.language_model
    position_embeddings = text.rotary_emb(h, position_ids)
    for i, template in enumerate(layer_templates(text.layers)):
        p = model.block_params(params, f"{TEXT}layers.{i}.")
        if layout is None:
            h = block_call(decoder_block, template, p, h, position_embeddings, remat=True)
        else:
            h = block_call(packed_decoder_block, template, p, h, position_embeddings, *layout, remat=True)
        if after_layer is not None:
            h = after_layer(i, h)
    return block_call(apply_module, text.norm, model.block_params(params, TEXT + "norm."), h)


def embed_tokens(model: Model, params: Params, input_ids: torch.Tensor, block_call: BlockCall) -> torch.Tensor:
    return block_call(embed, None, {"weight": params[TEXT + "embed_tokens.weight"]}, input_ids)


def forward_hidden(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                   ) -> torch.Tensor:
    """Final-norm hidden states [B, L, H] of the text model for the batch (images in their tokens)."""
    return model.family.forward_hidden(model, params, batch, block_call)


def forward_hidden_aux(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """forward_hidden and the family's auxiliary outputs (empty for families without any)."""
    if model.family.forward_aux is None:
        return forward_hidden(model, params, batch, block_call), {}
    return model.family.forward_aux(model, params, batch, block_call)


def label_logits(model: Model, params: Params, hidden: torch.Tensor, index: torch.Tensor,
                 block_call: BlockCall = plain_block_call) -> torch.Tensor:
    """lm_head applied only at the flat positions `index` of `hidden` [B, L, H] -> [N, vocab]."""
    selected = hidden.reshape(-1, hidden.shape[-1])[index]
    return block_call(_lm_head, None, {"weight": params[model.lm_head_name]}, selected)


def token_nll(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
              ) -> torch.Tensor:
    """Negative log-likelihood [N] (fp32) of every label token of the batch."""
    return token_nll_aux(model, params, batch, block_call)[0]


def token_nll_aux(model: Model, params: Params, batch: Batch, block_call: BlockCall = plain_block_call
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """token_nll and the family's auxiliary outputs (forward_hidden_aux)."""
    hidden, aux = forward_hidden_aux(model, params, batch, block_call)
    logits = label_logits(model, params, hidden, batch["label_index"], block_call)
    return F.cross_entropy(logits.float(), batch["label_ids"], reduction="none"), aux
