"""LoRA as a reparametrisation of the params pytree (the lorax pattern), not module surgery.

Each targeted linear weight `<module>.weight` [out, in] gets two trainable leaves beside it in the params dict,
`<module>.lora_A` [r, in] and `<module>.lora_B` [out, r]; the base leaves stay in the pytree, frozen. Inside the
forward every block's params pass through `merge` right after they are gathered (the block_call hook: sharding's
make_block_call), which replaces the weight by

    W' = W + (lora_alpha / r) * B @ A

and drops the adapter entries, so the HF modules applied with functional_call see exactly their own param names.
Sharding, compile, activation checkpointing and DCP checkpoints see nothing but more leaves. A is initialised as
PEFT does (kaiming-uniform, a=sqrt(5)) and B to zero, so training starts from the base model exactly.

Why a weight merge and not the x-path `x @ W^T + s * x @ A^T @ B^T`: the HF modules are applied whole through
functional_call, and the x-path would need to hook into each of their linears (module surgery, which breaks
functional_call and compile). The price: backward forms the full weight gradient dW' of each targeted linear for
one block at a time (the same matmul FLOPs as full fine-tuning there) before reducing it to dA, dB; memory still
drops to the adapters' gradients and Adam state. lora_dropout > 0 is dropout on the adapter's input, which no
weight merge can express; it is refused (config.py) rather than silently ignored.

Stacked experts (a 3-D param `<...>.mlp.experts.gate_up_proj` [E, out, in], models/moe.py) are adapted when the
targets name them: one adapter per expert, `<param>.lora_A` [E, r, in] and `<param>.lora_B` [E, out, r], merged as
W'[e] = W[e] + scale * B[e] @ A[e] (a batched matmul; sharded on the expert dim like the experts). That is PEFT's
LoRA on an nn.Parameter (`target_parameters`, lora.ParamWrapper, peft >= 0.17), whose A [E * r, in] stacks the
experts' rows and whose B [out, r * E] interleaves them (column j * E + e is expert e's rank j): `peft_tensors`
writes that.

Export: `merge_params` folds the adapters into a plain params dict (eval, generation, the merged HF export), and
`peft_tensors` / `adapter_config` give PEFT's adapter format (checked against peft's own save_pretrained and load).
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Container, Iterable, Mapping

import torch

from vlm_sft.errors import ConfigError

Params = dict[str, torch.Tensor]

A_SUFFIX = ".lora_A"
B_SUFFIX = ".lora_B"
ALL_LINEAR = "all-linear"
# The language model's attention and MLP projections (the same module names in Qwen2.5-VL and Qwen3-VL), and in
# Qwen3.5's Gated DeltaNet layers their q/k/v, output-gate and output projections (the per-head decay and rate
# projections in_proj_a / in_proj_b, hidden -> heads, stay as they are).
DEFAULT_TARGETS = (r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
                   r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))$")
# Modules never adapted: PEFT's all-linear leaves the output layer out too (and tied, it is the embedding).
_EXCLUDED = ("lm_head",)


class LoraError(ConfigError):
    """A LoRA setting that cannot work; the message names the config field."""


def is_adapter(name: str) -> bool:
    return name.endswith(A_SUFFIX) or name.endswith(B_SUFFIX)


def adapter_names(target: str) -> tuple[str, str]:
    """(A, B) leaf names of the adapter of `target`: a linear module's name, or a stacked expert param's."""
    return target + A_SUFFIX, target + B_SUFFIX


def target_of(adapter: str) -> str:
    """`<target>.lora_A` / `<target>.lora_B` -> `<target>`."""
    return adapter.rsplit(".", 1)[0]


def base_weight(adapter: str, names: Container[str]) -> str:
    """The param an adapter adapts: `<module>.weight` of a linear module, or the stacked expert param `<target>`
    itself (`names`: the params there are; a module and a param never share a name)."""
    return target_weight(target_of(adapter), names)


def target_weight(target: str, names: Container[str]) -> str:
    """The param of a target (a linear module's weight, or the stacked param itself)."""
    return target + ".weight" if target + ".weight" in names else target


def adapter_shapes(weight: tuple[int, ...], rank: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(A, B) shapes for a weight [out, in] -> [r, in], [out, r]; stacked [E, out, in] -> [E, r, in], [E, out, r]."""
    *lead, fan_out, fan_in = weight
    return (*lead, rank, fan_in), (*lead, fan_out, rank)


def linear_modules(module: torch.nn.Module) -> list[str]:
    """Names of every nn.Linear of the model that LoRA may adapt (all but the output layer)."""
    return [name for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and name not in _EXCLUDED]


def stacked_params(module: torch.nn.Module) -> list[str]:
    """Names of the stacked expert params ([E, out, in]) LoRA may adapt when named: the 3-D params outside
    convolutions (Qwen3.5's depthwise conv1d weight [C, 1, K] is 3-D too, and no matmul)."""
    return [f"{name}.{pname}" for name, m in module.named_modules()
            if not isinstance(m, torch.nn.modules.conv._ConvNd)
            for pname, p in m.named_parameters(recurse=False) if p.dim() == 3]


def target_modules(module: torch.nn.Module, targets: str) -> list[str]:
    """What `targets` adapts: "all-linear" (every linear module, as PEFT's all-linear: no stacked experts), or a
    regex searched in each linear module's name and in each stacked expert param's name or its module's (so
    `mlp\\.experts` names both of a layer's expert tensors). Linear modules first, then stacked params, each in the
    model's order."""
    linears = linear_modules(module)
    if targets == ALL_LINEAR:
        return linears
    field = "actor.model.lora_target_modules"
    try:
        pattern = re.compile(targets)
    except re.error as e:
        raise LoraError(f"{field}={targets!r}: not a regular expression ({e})") from None
    stacked = [name for name in stacked_params(module)
               if pattern.search(name) or pattern.search(name.rpartition(".")[0])]
    found = [name for name in linears if pattern.search(name)] + stacked
    if not found:
        excluded = [name for name, _ in module.named_modules() if name and pattern.search(name)]
        what = (f"only non-linear or excluded modules (first {excluded[0]!r}; embeddings and lm_head are not LoRA "
                "targets)") if excluded else "no module"
        experts = stacked_params(module)
        also = f" or stacked expert params such as {experts[0]!r}" if experts else ""
        raise LoraError(f"{field}={targets!r} matches {what}; it must match linear module names such as "
                        f"{linears[0]!r}{also} (or be 'all-linear')")
    return found


def init_adapters(shapes: Mapping[str, torch.Size], modules: Iterable[str], rank: int, *, seed: int,
                  dtype: torch.dtype = torch.float32) -> Params:
    """A ~ kaiming-uniform(a=sqrt(5)) [r, in] (PEFT's default), B = 0 [out, r], for each target (stacked experts:
    one such pair per expert; `shapes`: param name -> shape). Deterministic in `seed`, whatever the number of
    ranks."""
    generator = torch.Generator().manual_seed(seed)
    out: Params = {}
    for name in modules:
        a_shape, b_shape = adapter_shapes(tuple(shapes[target_weight(name, shapes)]), rank)
        bound = 1.0 / math.sqrt(a_shape[-1])  # kaiming_uniform_(a=sqrt(5)): gain sqrt(2/6), bound gain*sqrt(3/fan_in)
        a_name, b_name = adapter_names(name)
        out[a_name] = ((torch.rand(a_shape, generator=generator) * 2 - 1) * bound).to(dtype)
        out[b_name] = torch.zeros(b_shape, dtype=dtype)
    return out


def merge(p: Params, scale: float | None) -> Params:
    """A block's params with each adapted weight replaced by W + scale * B @ A (per expert for stacked experts:
    [E, out, r] @ [E, r, in]) and the adapter entries dropped.

    Called on the gathered (full, compute-dtype) params of every block, so it needs no collective. Params
    without adapters come back as given (the same dict).
    """
    adapters = [k for k in p if k.endswith(A_SUFFIX)]
    if not adapters:
        return p
    if scale is None:
        raise LoraError("params hold LoRA adapters but no lora scale was given to the block call")
    out = {k: v for k, v in p.items() if not is_adapter(k)}
    for a_name in adapters:
        b_name = a_name[: -len(A_SUFFIX)] + B_SUFFIX
        w = base_weight(a_name, out)
        out[w] = out[w] + (scale * p[b_name]) @ p[a_name]
    return out


def merge_params(params: Params, scale: float | None) -> Params:
    """A plain params dict (no adapters) computing what the adapted one computes: for evaluation, generation and
    the merged export. Each adapted weight is merged in fp32 and returned in its own dtype."""
    adapted = {base_weight(k, params) for k in params if k.endswith(A_SUFFIX)}
    upcast = {k: v.float() if (k in adapted or is_adapter(k)) else v for k, v in params.items()}
    return {k: v.to(params[k].dtype) for k, v in merge(upcast, scale).items()}


def scale_of(alpha: float, rank: int) -> float:
    return float(alpha) / float(rank)


def peft_tensor_name(adapter: str) -> str:
    """Our leaf name of a linear module's adapter -> PEFT's tensor name in adapter_model.safetensors, e.g.
    `model.language_model.layers.0.self_attn.q_proj.lora_A` -> `base_model.model.model.language_model.layers.0.
    self_attn.q_proj.lora_A.weight` (peft saves the module path of the transformers model it wraps, which is
    ours)."""
    return f"base_model.model.{adapter}.weight"


def peft_tensors(adapters: Mapping[str, torch.Tensor], param_order: list[str]) -> Params:
    """Our adapter leaves -> adapter_model.safetensors as PEFT names and lays them out.

    Linear modules: peft_tensor_name, as they are. Stacked experts (PEFT's ParamWrapper): A [E, r, in] ->
    [E * r, in]; B [E, out, r] -> [out, r * E] with column j * E + e = expert e's rank j. PEFT wraps a module once
    per targeted param, in the order the module registers them (`param_order`: the model's param names in
    order), each wrapper around the last, so the first is reached through `.base_layer` once per later one:
    both expert tensors of a layer give `mlp.experts.base_layer.lora_A` (gate_up_proj) and `mlp.experts.lora_A`
    (down_proj)."""
    stacked = [n for n in param_order if n in {target_of(a) for a in adapters}]
    out: Params = {}
    for name, t in adapters.items():
        target, suffix = target_of(name), name.rsplit(".", 1)[1]
        if target not in stacked:
            out[peft_tensor_name(name)] = t
            continue
        module = target.rpartition(".")[0]
        later = [n for n in stacked if n.rpartition(".")[0] == module]
        depth = len(later) - 1 - later.index(target)
        t = t.reshape(-1, t.shape[-1]) if suffix == "lora_A" else t.permute(1, 2, 0).reshape(t.shape[1], -1)
        out[f"base_model.model.{module}{'.base_layer' * depth}.{suffix}.weight"] = t.contiguous()
    return out


def adapter_config(*, rank: int, alpha: float, dropout: float, modules: list[str], base_model: str,
                   base_model_class: str, parameters: list[str] = ()) -> dict:
    """PEFT's adapter_config.json for adapters on exactly `modules` (full linear module names) and `parameters`
    (full stacked expert param names: PEFT's target_parameters)."""
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "auto_mapping": {"base_model_class": base_model_class, "parent_library": "transformers"},
        "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": sorted(modules),
        "target_parameters": sorted(parameters) or None,
        "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "inference_mode": True, "rank_pattern": {},
        "alpha_pattern": {}, "layers_to_transform": None, "layers_pattern": None, "revision": None,
    }


def add_to_groups(groups: Mapping[str, list[str]], adapters: Iterable[str]) -> dict[str, list[str]]:
    """The model's param groups (block prefix -> names) with each adapter in the group of its base weight, so a
    block's params carry its adapters into the block call."""
    group_of = {name: prefix for prefix, names in groups.items() for name in names}
    out = {prefix: list(names) for prefix, names in groups.items()}
    for name in adapters:
        out[group_of[base_weight(name, group_of)]].append(name)
    return out


def plain_block_call(scale: float | None) -> Callable[..., Any]:
    """model.plain_block_call with each block's adapters merged first: the unsharded forward of adapted params
    (tests, tools); training goes through sharding.make_block_call(lora_scale=...), which merges the same way."""

    def block_call(fn: Callable[..., Any], module: torch.nn.Module | None, p: Params, *args: Any,
                   remat: bool = False, dynamic: bool = False) -> Any:
        return fn(module, merge(p, scale), *args)

    return block_call
