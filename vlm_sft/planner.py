"""--mode=plan: per-device memory of a configured run, from config.json and the data only (no weights read).

Users fine-tuning 32B/72B models want to know before launching whether a configuration fits, and what to change if
it does not; the first answer should not be an OOM after minutes of loading. The estimate follows what this
trainer holds, phase by phase (vlm_sft/sharding.py, step.py, optim.py):

  params      trained leaves in actor.model.precision (master weights, LoRA adapters included), frozen leaves in
              the compute dtype (param_dtype); divided by the shard group size (full_shard: the world size,
              hybrid_shard: the shard group, no_shard: 1)
              expert parallelism (actor.fsdp_config.expert_parallel_size = e > 1): the stacked expert leaves
              divided by e instead (each rank keeps E/e experts whole), never gathered (only cast to param_dtype
              where the dtypes differ), plus the all-to-all's received and regrouped token rows per MoE layer
  optimizer   two Adam moments per trained leaf, in the master precision, sharded like the params
  grads       one gradient per trained leaf, in the master precision, sharded like the params; a second set
              exists for a moment when micro-batch gradients are summed (accumulation > 1)
  gathered    the compute copies of gathered params that autograd keeps for backward: without checkpointing every
              block's (the full model in param_dtype, whatever the sharding, when a gather or cast makes a copy;
              LoRA-merged weights always), with checkpointing only the block being recomputed; plus two blocks'
              gather transients (the reduce_dtype copy before its cast, the full gradient before reduce-scatter)
  activations values autograd keeps per token of each decoder layer and per patch of each vision block (every
              block's internals, or with checkpointing only each block's input plus one block's internals), and
              the fp32 logits at label positions only (the lm_head runs there alone)

  peak = params + optimizer + max(forward end: grads held + gathered + activations,
                                  after the text stack's backward: held + the tower's saved values + text grads,
                                  backward end: grads held + new grads + the embedding's last gradient) + runtime
  with grads held = one set when accumulating over micro-batches, else none. On a CPU device the resident set
  keeps what backward frees (glibc's heap), so there forward end and backward end add up.

The data side comes from up to PLAN_ROWS rows of the training split (the eval split when there is none) through
the configured reader and encoder (preflight.check_row): the longest sequence and the most image tokens of a row,
times the micro-batch (padded as the collate pads); with packing (data.packing and
actor.max_tokens_per_micro_batch, where present) the packing budget. Host memory while loading (loading.py: a
rank's own shard plus one tensor's slice) is a phase too, the peak on a CPU device when it is the largest.
The runtime term is the process's own footprint: on CPU this planning process's resident set (interpreter, torch,
tokenizer), on CUDA the context and communication buffers (RUNTIME_CUDA_GIB), which max_memory_allocated omits.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from typing import Any, Callable

import torch

from vlm_sft import config as config_lib
from vlm_sft import hostmem
from vlm_sft import lora as lora_lib

GIB = 2 ** 30
PLAN_ROWS = 64               # rows encoded for the data statistics (the first ones of the split)
RUNTIME_CUDA_GIB = 1.0       # CUDA context + NCCL buffers per device, outside max_memory_allocated
DEFAULT_DEVICE_GIB = 80.0    # runner.device_memory_gib when unset and no GPU is visible
RANK_CHOICES = (2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)  # "more ranks" advice: GPU counts


@dataclasses.dataclass(frozen=True)
class DataShape:
    """One micro-batch as the step sees it (worst case over the sampled rows)."""

    rows: int                # rows per micro-batch
    tokens: int              # padded text positions in the micro-batch (rows x padded length, or the budget)
    label_tokens: int        # label positions (the lm_head runs there)
    patches: int             # vision patches in the micro-batch (before the merger)
    micro_batches: int = 0   # per rank per step when packing decides it (0: the config's accumulation)
    sampled_rows: int = 0    # rows the statistics come from (0: given, not sampled)
    max_sequence_tokens: int = 0
    max_image_tokens: int = 0


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The architecture numbers the estimate needs, from a meta-device skeleton and its config."""

    names: dict[str, int]             # param name -> numel
    blocks: dict[str, int]            # block prefix -> numel of its params (the per-block gather unit)
    text_layers: int
    text_hidden: int
    text_q: int                       # query width (heads x head_dim)
    text_kv: int                      # key/value width (kv heads x head_dim)
    text_intermediate: int
    vision_depth: int
    vision_hidden: int
    vision_intermediate: int
    vision_gated: bool                # gate/up/down MLP (Qwen2.5-VL) vs fc1/fc2 (Qwen3-VL)
    merge_unit: int                   # patches per image token (spatial_merge_size^2)
    vocab: int
    mlp_copies: int = 1               # MLP inputs per token: 1 dense; top-k routed copies in a sparse MoE layer
    router_logits: int = 0            # fp32 router logits per token (a MoE layer's expert count)


def shapes_of(module: torch.nn.Module, block_pattern: str) -> Shapes:
    """Shapes of a skeleton (meta tensors are enough) for any family with text_config / vision_config."""
    config = module.config
    t = getattr(config, "text_config", config)
    v = getattr(config, "vision_config", None)
    names = {n: p.numel() for n, p in module.named_parameters()}
    block = re.compile(block_pattern)
    blocks: dict[str, int] = {}
    for n, k in names.items():
        m = block.match(n)
        prefix = m.group(1) if m else n.rsplit(".", 1)[0] + "."
        blocks[prefix] = blocks.get(prefix, 0) + k
    head_dim = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    vision_mlp = [n for n in names if re.search(r"visual\.blocks\.0\.mlp\.", n)]
    # A sparse MoE layer (Qwen3-VL-MoE: every layer when mlp_only_layers is empty) runs each token through its
    # top-k experts: k copies of the input and k expert MLPs of moe_intermediate_size, plus E router logits.
    experts = getattr(t, "num_experts", 0) or 0
    top_k = getattr(t, "num_experts_per_tok", 1) if experts else 1
    intermediate = top_k * t.moe_intermediate_size if experts else t.intermediate_size
    return Shapes(
        names=names, blocks=blocks, text_layers=t.num_hidden_layers, text_hidden=t.hidden_size,
        text_q=t.num_attention_heads * head_dim,
        text_kv=getattr(t, "num_key_value_heads", t.num_attention_heads) * head_dim,
        text_intermediate=intermediate,
        vision_depth=getattr(v, "depth", 0) if v is not None else 0,
        vision_hidden=getattr(v, "hidden_size", 0) if v is not None else 0,
        vision_intermediate=getattr(v, "intermediate_size", 0) if v is not None else 0,
        vision_gated=any("gate_proj" in n for n in vision_mlp),
        merge_unit=(getattr(v, "spatial_merge_size", 2) ** 2) if v is not None else 4,
        vocab=t.vocab_size, mlp_copies=top_k, router_logits=experts)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The run settings the estimate depends on (all read from the config; see `settings_of`)."""

    strategy: str
    world_size: int
    shard_size: int                   # ranks sharing one copy of the state (1 for no_shard)
    precision_bytes: int
    param_bytes: int                  # compute dtype (param_dtype)
    reduce_bytes: int
    checkpointing: bool
    accumulation: int                 # micro-batches per rank (0 with packing: the data decides, DataShape) per step
    compiled: bool
    expert_parallel: int = 1          # ranks splitting the experts (1: experts sharded like every leaf)


def _bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def shard_size(config: Any, world_size: int) -> int:
    f = config.actor.fsdp_config
    if f.sharding_strategy == "no_shard":
        return 1
    if f.sharding_strategy == "full_shard":
        return world_size
    from vlm_sft import sharding as sharding_lib
    shape, _ = sharding_lib.mesh_layout("hybrid_shard", world_size, num_nodes=config.cluster.num_nodes,
                                        hybrid_shard_size=f.hybrid_shard_size)
    return shape[1]


def settings_of(config: Any, world_size: int, *, device_type: str = "cuda") -> Settings:
    a, mp = config.actor, config.actor.fsdp_config.mixed_precision
    dtype = lambda key: _bytes(config_lib.parse_dtype(mp[key], f"actor.fsdp_config.mixed_precision.{key}"))
    return Settings(
        strategy=a.fsdp_config.sharding_strategy, world_size=world_size, shard_size=shard_size(config, world_size),
        precision_bytes=_bytes(config_lib.parse_dtype(a.model.precision, "actor.model.precision")),
        param_bytes=dtype("param_dtype"), reduce_bytes=dtype("reduce_dtype"),
        checkpointing=bool(a.fsdp_config.gradient_checkpointing),
        accumulation=0 if packing_budget(config) else config_lib.accumulation_steps(config, world_size),
        compiled=a.compile if a.compile is not None else device_type == "cuda",
        expert_parallel=a.fsdp_config.get("expert_parallel_size", 1))


def decoder_bytes_per_token(s: Shapes, b: int, compiled: bool = False) -> int:
    """Bytes one decoder layer keeps for backward per token. Eager: HF's RMSNorm upcasts to fp32 and keeps that
    and the normalized value, each linear keeps its input, sdpa keeps q, k, v and its output, the gated MLP keeps
    gate, act(gate), up and their product. Compiled (a region per block): inductor's partitioner recomputes the
    pointwise ops instead, keeping each norm's input and the MLP's gate and up only."""
    norms = 2 * (b if compiled else 4 + b) * s.text_hidden
    attention = b * (s.text_hidden + s.text_q + 2 * s.text_kv + 2 * s.text_q)
    mlp = b * (s.mlp_copies * s.text_hidden + (2 if compiled else 4) * s.text_intermediate) + 4 * s.router_logits
    return norms + attention + mlp


def vision_bytes_per_patch(s: Shapes, b: int, compiled: bool = False) -> int:
    """Bytes one vision block keeps per patch: as a decoder layer, with q, k, v of the full width and the
    family's MLP (gated: as the decoder's; fc1 -> act -> fc2: fc1's output and the activation's)."""
    h = s.vision_hidden
    norms = 2 * (b if compiled else 4 + b) * h
    attention = b * (h + 3 * h + 2 * h)
    if s.vision_gated:
        mlp = b * (h + (2 if compiled else 4) * s.vision_intermediate)
    else:
        mlp = b * (h + (1 if compiled else 2) * s.vision_intermediate)
    return norms + attention + mlp


VISION_TOWER = re.compile(r"^model\.visual\.(?!merger\.|deepstack_merger_list\.)")


def estimate(shapes: Shapes, plan: Any, data: DataShape, st: Settings, *, runtime_gib: float,
             device_type: str = "cuda") -> dict[str, Any]:
    """The per-device estimate (GiB) of one configuration: see the module docstring for the terms.

    Backward runs the stages in reverse (text stack, then the vision tower): while the text stack's gradients
    exist, the tower's saved values still do, so the peak is the largest of forward end, after the text stack's
    backward, and backward end."""
    S, p, b, r = st.shard_size, st.precision_bytes, st.param_bytes, st.reduce_bytes
    trained, frozen = plan.numel(plan.trainable), plan.numel(plan.frozen)
    ep = _expert_parallel_terms(shapes, plan, data, st)
    params = (trained * p + frozen * b) / S + ep["params"]
    optimizer = 2 * trained * p / S + 2 * ep["trained"]
    grads = trained * p / S + ep["trained"]
    held = grads if (data.micro_batches or st.accumulation) > 1 else 0.0

    trained_names = set(plan.trainable)
    adapted = set(plan.lora_weights)
    tower = lambda n: bool(VISION_TOWER.match(lora_lib.base_weight(n, plan.shapes) if lora_lib.is_adapter(n) else n))
    vision_graph = any(tower(n) for n in trained_names)  # else the tower's outputs carry no autograd graph

    def copies(name: str) -> bool:  # the compute tensor is a new one (gathered, cast, or merged)
        if name in ep["names"]:  # this rank's experts, never gathered: a copy only when cast
            return (p if name in trained_names else b) != b
        return S > 1 or (p if name in trained_names else b) != b or name in adapted

    base = {n: k for n, k in shapes.names.items() if not lora_lib.is_adapter(n)}
    copied = {"vision": 0, "text": 0}
    for n, k in base.items():
        if copies(n) and (vision_graph or not tower(n)):
            copied["vision" if tower(n) else "text"] += k * b / (st.expert_parallel if n in ep["names"] else 1)
    largest = max(ep["blocks"].values()) if ep["blocks"] else 0
    # Sharded: a block's reduce_dtype gather before its cast, and its full gradient before the reduce-scatter.
    transient = 2 * largest * r if S > 1 else 0
    per_token = decoder_bytes_per_token(shapes, b, st.compiled)
    per_patch = vision_bytes_per_patch(shapes, b, st.compiled) if vision_graph else 0
    if st.checkpointing:  # block inputs, plus one block's internals and gathered copy while it is recomputed
        recompute = max(per_token * data.tokens, per_patch * data.patches) + (largest * b if any(copied.values())
                                                                              else 0)
        saved = {"vision": shapes.vision_depth * shapes.vision_hidden * data.patches * b * vision_graph,
                 "text": shapes.text_layers * shapes.text_hidden * data.tokens * b + recompute}
        gathered = largest * b if any(copied.values()) else 0
    else:
        saved = {"vision": shapes.vision_depth * per_patch * data.patches + copied["vision"],
                 "text": shapes.text_layers * per_token * data.tokens + copied["text"]}
        gathered = sum(copied.values())
    saved["text"] += ep["tokens"]
    embeddings = data.tokens * shapes.text_hidden * b * 2    # the embedding output and the image-scattered copy
    logits = data.label_tokens * shapes.vocab * (b + 4 + 4)  # lm_head output, fp32 logits, their gradient
    saved["text"] += embeddings + logits
    activations = sum(saved.values()) - (0 if st.checkpointing else gathered)
    vision_grads = plan.numel([n for n in plan.trainable if tower(n)]) * p / S
    # The embedding's last gradient: a dense [vocab, hidden] one in the compute dtype, and with tied embeddings
    # the sum of it and the lm_head's (held since backward began) in the master precision.
    embed = [n for n in base if n.endswith("embed_tokens.weight")]
    tied = "lm_head.weight" not in base
    vh = base[embed[0]] if embed else 0
    last = (vh * b + (vh * p / S if tied else 0)) if embed and embed[0] in trained_names else 0
    forward_end = held + sum(saved.values())
    after_text = held + saved["vision"] + (grads - vision_grads)
    backward_end = held + grads + last
    if device_type == "cpu":
        # glibc keeps freed small blocks resident: what backward frees of the saved values stays in the resident
        # set while the gradients (the large ones mmapped apart) are allocated, so on CPU they add up.
        train_peak = params + optimizer + transient + forward_end + grads + last
    else:
        train_peak = params + optimizer + transient + max(forward_end, after_text, backward_end)
    # Sharded loading (vlm_sft/loading.py): about this rank's shard plus one more copy of the largest tensor's slice
    # (read from the file, then cast to the dtype it is held in).
    big = max(base, key=base.get) if base else None
    held_bytes = (p if big in trained_names else b) if big is not None else 0
    loading = params + (base[big] / S * max(held_bytes, 2) if big is not None else 0)
    peak = max(train_peak, loading) if device_type == "cpu" else train_peak
    g = lambda x: round(x / GIB, 3)
    return {
        "per_device": {"params_gib": g(params), "grads_gib": g(grads), "optimizer_gib": g(optimizer),
                       "gathered_gib": g(gathered + transient), "activations_gib": g(activations),
                       "logits_gib": g(logits), "runtime_gib": round(runtime_gib, 3),
                       "peak_gib": round(peak / GIB + runtime_gib, 3)},
        "phases_gib": {"forward_end": g(params + optimizer + transient + forward_end),
                       "after_text_backward": g(params + optimizer + transient + after_text),
                       "backward_end": g(params + optimizer + transient + backward_end), "loading_host": g(loading)},
        "trainable_params": trained, "frozen_params": frozen,
    }


def _expert_parallel_terms(shapes: Shapes, plan: Any, data: DataShape, st: Settings) -> dict[str, Any]:
    """Expert parallelism's terms (bytes, and the expert leaves; empty when e = 1): "params" and "trained" (one
    state set of the trained experts) held at 1/e in place of 1/shard_size, the per-block gather unit without
    the experts' (E - E/e)/E that stay remote ("blocks"), and "tokens": the all-to-all's received rows and their
    regrouped copy per MoE layer, top-k rows of the hidden width per token (all layers' without checkpointing;
    with it, the recomputed block's)."""
    from vlm_sft.models import moe

    e, S = st.expert_parallel, st.shard_size
    names = {n for n in shapes.names if moe.is_expert(n)} if e > 1 else set()
    if not names:
        return {"names": set(), "params": 0.0, "trained": 0.0, "blocks": shapes.blocks, "tokens": 0}
    trained = set(plan.trainable)
    numel = lambda ns: sum(shapes.names[n] for n in ns)
    t, f = numel(names & trained), numel(names - trained)
    p, b = st.precision_bytes, st.param_bytes
    blocks = dict(shapes.blocks)
    for n in names:
        prefix = max((k for k in blocks if n.startswith(k)), key=len, default=None)
        if prefix is not None:
            blocks[prefix] -= shapes.names[n] * (1 - 1 / e)
    moe_layers = len({n.rsplit(".mlp.", 1)[0] for n in names})
    rows = 2 * shapes.mlp_copies * shapes.text_hidden * data.tokens * b
    return {"names": names, "params": (t * p + f * b) * (1 / e - 1 / S), "trained": t * p * (1 / e - 1 / S),
            "blocks": blocks, "tokens": rows * (1 if st.checkpointing else moe_layers)}


# ----------------------------------------------------------------------------------------------------------------
# Data statistics.

def data_shape(config: Any, stats: list[Any], *, merge_unit: int, compiled: bool, world_size: int = 1
               ) -> DataShape:
    """The worst micro-batch over the sampled rows' RowStats. Padded batches: the longest row padded as the
    collate pads (to the length buckets when compiled, else a multiple of 8) times the micro-batch. Packed
    (data.packing): a rank's rows of one step (global batch / world) of the longest length, in one micro-batch
    padded as packing pads it, or when they exceed actor.max_tokens_per_micro_batch, full budgets of rows."""
    from vlm_sft.data.collate import bucket_length
    from vlm_sft.preflight import PAD_MULTIPLE

    good = [s for s in stats if s.reason is None]
    if not good:
        raise config_lib.ConfigError("--mode=plan: none of the sampled rows encodes (run --mode=check to see why)")
    longest = max(s.sequence_tokens for s in good)
    images = max(s.image_tokens for s in good)
    answer = max(s.sequence_tokens - s.prompt_tokens for s in good)
    budget = packing_budget(config)
    if budget:
        share = max(1, config.actor.global_batch_size // world_size)
        need = share * longest
        if need <= budget:
            buckets = tuple(b for b in config.data.length_buckets if b < budget) + (budget,) if compiled else ()
            tokens = min(budget, bucket_length(need, buckets, PAD_MULTIPLE))
            return DataShape(rows=share, tokens=tokens, label_tokens=share * answer,
                             patches=share * images * merge_unit, micro_batches=1, sampled_rows=len(good),
                             max_sequence_tokens=longest, max_image_tokens=images)
        rows = max(1, budget // min(s.sequence_tokens for s in good))
        image_share = max(s.image_tokens / max(1, s.sequence_tokens) for s in good)
        label_share = max((s.sequence_tokens - s.prompt_tokens) / max(1, s.sequence_tokens) for s in good)
        return DataShape(rows=rows, tokens=budget, label_tokens=math.ceil(budget * label_share),
                         patches=math.ceil(budget * image_share) * merge_unit, micro_batches=math.ceil(need / budget),
                         sampled_rows=len(good), max_sequence_tokens=longest, max_image_tokens=images)
    mb = config.actor.micro_batch_size
    length = bucket_length(longest, tuple(config.data.length_buckets) if compiled else (), PAD_MULTIPLE)
    return DataShape(rows=mb, tokens=mb * length, label_tokens=mb * answer, patches=mb * images * merge_unit,
                     sampled_rows=len(good), max_sequence_tokens=longest, max_image_tokens=images)


def packing_budget(config: Any) -> int:
    """actor.max_tokens_per_micro_batch when packing is on (data.packing), else 0: fields of the packing work,
    read only where they exist."""
    d, a = config.data, config.actor
    if "packing" in d and d.packing and "max_tokens_per_micro_batch" in a and a.max_tokens_per_micro_batch:
        return int(a.max_tokens_per_micro_batch)
    return 0


def sample_rows(source: Any, encoder: Any, image_token_id: int) -> list[Any]:
    """RowStats of the first PLAN_ROWS rows of `source`, read and encoded as training would."""
    from vlm_sft import preflight

    return [preflight.check_row(source, encoder, image_token_id, i) for i in range(min(PLAN_ROWS, len(source)))]


# ----------------------------------------------------------------------------------------------------------------
# Advice: the cheapest change that makes the plan fit.

def device_memory_gib(config: Any) -> float:
    value = config.runner.get("device_memory_gib") if "device_memory_gib" in config.runner else None
    if value:
        if not isinstance(value, (int, float)) or value <= 0:
            raise config_lib.ConfigError(f"runner.device_memory_gib={value!r}: expected a positive number of GiB")
        return float(value)
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GIB
    return DEFAULT_DEVICE_GIB


def plan_world_size(config: Any, launched: int) -> int:
    value = config.runner.get("plan_world_size", 0) if "plan_world_size" in config.runner else 0
    if value in (None, 0):
        return launched
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise config_lib.ConfigError(f"runner.plan_world_size={value!r}: expected a positive integer (0: the "
                                     "launch's world size)")
    return value


Evaluate = Callable[[dict[str, Any]], "dict[str, Any] | None"]


def candidate_changes(config: Any, world_size: int) -> list[tuple[str, dict[str, Any]]]:
    """(why, config overrides) in the order tried: cheapest first in lost speed or quality. Each is a set of
    dotted config keys -> values (`--config.<key>=<value>` on the command line)."""
    a, f = config.actor, config.actor.fsdp_config
    out: list[tuple[str, dict[str, Any]]] = []
    if f.sharding_strategy == "no_shard" and world_size > 1:
        out.append(("shard the state over the ranks already launched",
                    {"actor.fsdp_config.sharding_strategy": "full_shard"}))
    if not f.gradient_checkpointing:
        out.append(("recompute each block in backward (~1/3 more compute)",
                    {"actor.fsdp_config.gradient_checkpointing": True}))
    if f.sharding_strategy == "hybrid_shard":  # larger shard groups: less state per GPU, more traffic across nodes
        size = shard_size(config, world_size) * 2
        while size <= world_size:
            if world_size % size == 0:
                out.append((f"shard groups of {size} ranks", {"actor.fsdp_config.hybrid_shard_size": size}))
            size *= 2
    budget = packing_budget(config)
    if budget:
        half = budget // 2
        while half >= 256:
            out.append((f"a smaller packing budget ({half} tokens)", {"actor.max_tokens_per_micro_batch": half}))
            half //= 2
    else:
        mb = a.micro_batch_size // 2
        while mb >= 1:
            if a.global_batch_size % (mb * world_size) == 0:
                out.append((f"smaller micro-batches ({mb}; more accumulation, same global batch)",
                            {"actor.micro_batch_size": mb}))
            mb //= 2
    for more in RANK_CHOICES:
        if more > world_size and a.global_batch_size % ((1 if budget else a.micro_batch_size) * more) == 0:
            strategy = f.sharding_strategy if f.sharding_strategy != "no_shard" else "full_shard"
            out.append((f"{more} GPUs ({strategy})", {"runner.plan_world_size": more,
                                                       "actor.fsdp_config.sharding_strategy": strategy}))
    if not a.model.freeze_vision_tower and not a.model.is_lora:
        out.append(("freeze the vision tower", {"actor.model.freeze_vision_tower": True}))
    if not a.model.is_lora:
        out.append(("LoRA adapters instead of full fine-tuning", {"actor.model.is_lora": True}))
    return out


def advise(config: Any, world_size: int, evaluate: Evaluate, device_gib: float) -> dict[str, Any] | None:
    """The first single change that fits, else the first fitting pair with checkpointing; None if none does."""
    changes = candidate_changes(config, world_size)
    singles = [(why, c) for why, c in changes]
    ckpt = [c for c in changes if "actor.fsdp_config.gradient_checkpointing" in c[1]]
    pairs = [(f"{ckpt[0][0]}; and {why}", {**ckpt[0][1], **c}) for why, c in changes if ckpt and c is not ckpt[0][1]]
    for why, overrides in singles + pairs:
        result = evaluate(overrides)
        if result is not None and result["per_device"]["peak_gib"] <= device_gib:
            return {"change": why, "overrides": overrides,
                    "flags": " ".join(f"--config.{k}={v}" for k, v in overrides.items()),
                    "peak_gib": result["per_device"]["peak_gib"]}
    return None


def apply_overrides(config: Any, overrides: dict[str, Any]) -> Any:
    """A copy of the config with dotted keys set (as --config.<key>=<value> would; a key the config lacks, e.g.
    runner.plan_world_size in an older config file, is added)."""
    c = config.copy_and_resolve_references()
    with c.unlocked():
        for key, value in overrides.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            node[leaf] = value
    return c


def format_plan(report: dict[str, Any]) -> str:
    d = report["per_device"]
    s = report["settings"]
    lines = [f"plan: {report['model_type']} {report['trainable_params']:,} trained + {report['frozen_params']:,} "
             f"frozen params; {s['strategy']} on {s['world_size']} rank(s) (shard group {s['shard_size']}), "
             f"micro-batch {report['data']['rows']} rows x {report['data']['tokens']} tokens, "
             f"{report['data']['patches']} patches; checkpointing {'on' if s['checkpointing'] else 'off'}",
             "per device (GiB): " + ", ".join(f"{k[:-4]} {v:.2f}" for k, v in d.items()),
             f"fits runner.device_memory_gib={report['device_memory_gib']:g}: {'yes' if report['fits'] else 'NO'}"]
    if report.get("advice"):
        a = report["advice"]
        lines.append(f"to fit: {a['change']} ({a['peak_gib']:.2f} GiB): {a['flags']}")
    elif not report["fits"]:
        lines.append("to fit: no single change tried fits (more GPUs with LoRA and checkpointing?)")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# The whole planning pass (--mode=plan, and the estimate logged at the start of training).

def make_planner(config: Any, module: torch.nn.Module, stats: list[Any], *, launched_world_size: int,
                 device_type: str, runtime_gib: float) -> Callable[[dict[str, Any]], dict[str, Any]]:
    """overrides -> the estimate of the config with those overrides, on one skeleton and one data sample."""
    from vlm_sft import models as model_lib
    from vlm_sft import trainable as trainable_lib

    family = model_lib.family_for_config(module.config)
    shapes = shapes_of(module, family.block_pattern)

    def evaluate(overrides: dict[str, Any]) -> dict[str, Any]:
        c = apply_overrides(config, overrides) if overrides else config
        world = plan_world_size(c, launched_world_size)
        st = settings_of(c, world, device_type=device_type)
        plan = trainable_lib.make_plan(c, module)
        data = data_shape(c, stats, merge_unit=shapes.merge_unit, compiled=st.compiled, world_size=world)
        out = estimate(shapes, plan, data, st, runtime_gib=runtime_gib, device_type=device_type)
        out.update({"model_type": family.name, "data": dataclasses.asdict(data),
                    "settings": dataclasses.asdict(st)})
        return out

    return evaluate


def plan(config: Any, module: torch.nn.Module, stats: list[Any], *, launched_world_size: int = 1,
         device_type: str | None = None, runtime_gib: float | None = None) -> dict[str, Any]:
    """The report of --mode=plan: the estimate, whether it fits, and the cheapest change that makes it fit."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    if runtime_gib is None:
        runtime_gib = RUNTIME_CUDA_GIB if device_type == "cuda" else hostmem.resident_gib()
    evaluate = make_planner(config, module, stats, launched_world_size=launched_world_size,
                            device_type=device_type, runtime_gib=runtime_gib)
    report = evaluate({})
    limit = device_memory_gib(config)
    report["device_type"] = device_type
    report["device_memory_gib"] = limit
    report["fits"] = report["per_device"]["peak_gib"] <= limit
    if not report["fits"]:
        world = report["settings"]["world_size"]

        def safe(overrides: dict[str, Any]) -> dict[str, Any] | None:
            try:
                return evaluate(overrides)
            except config_lib.ConfigError:  # e.g. a plan that trains nothing, a batch that does not divide
                return None

        report["advice"] = advise(config, world, safe, limit)
    return report


def write_report(report: dict[str, Any], path: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f, indent=2)
    os.replace(tmp, path)
