"""Sharding as a property of the train state's leaves: the device mesh, DTensor placements, and per-block gathers.

Why not FSDP2's `fully_shard`: its hooks gather the module's OWN parameters, so `functional_call` with the params
we pass in is silently ignored and `autograd.grad` w.r.t. them returns None (reference/torch_findings.md). We use
the layer FSDP2 is built on instead: every param is a DTensor placed per `actor.fsdp_config.sharding_strategy`,

    no_shard      mesh (dp,)               Replicate           gradients all-reduced
    full_shard    mesh (dp,)               Shard(0)            gradients reduce-scattered
    hybrid_shard  mesh (replicate, shard)  Replicate, Shard(0) reduce-scatter within a node, all-reduce across

and each param group is gathered inside the call that uses it (`make_block_call`, plugged into the models'
`block_call` hook) with `redistribute(Replicate).to_local(grad_placements=[Partial("avg")])`. The Partial grad
placement is what makes backward reduce the per-rank gradients back into the params' placement; without it the
gradients are silently wrong. "avg" makes them the MEAN over ranks (as RLinf's FSDP), so a run on N ranks takes the
same steps as one process on the same global batch. Adam moments are created from the sharded params, so they
follow their param's placement; 0-dim counters stay plain tensors that every rank computes identically.

Mixed precision: master params and optimizer state keep their dtype (fp32); a block's params are gathered in
`reduce_dtype` and cast to `param_dtype` for compute, so gradients come back (and are reduced) in `reduce_dtype`:
the backward collective runs in the dtype of the forward one. With param_dtype == reduce_dtype the cast happens
before the gather (bf16 traffic). With bf16 compute and fp32 reduction the gather moves fp32: twice FSDP2's
all-gather bytes, and a group's fp32 copy lives until its bf16 cast. A custom autograd.Function (gather bf16,
reduce-scatter fp32) avoids both, but compiled it ran 1.3 s/step against 0.3 here (tiny model, CPU): it splits
the graph. So this stays until measured on a GPU.

Single process is the same code on a mesh of one (an in-process gloo/nccl group, no torchrun needed).
"""
from __future__ import annotations

import dataclasses
import datetime
import logging as std_logging
import os
import sys
from typing import Any, Mapping, NoReturn

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.multiprocessing.reductions import StorageWeakRef

from vlm_sft import compile as compile_lib
from vlm_sft import lora as lora_lib
from vlm_sft import models as model_lib
from vlm_sft.config import parse_dtype
from vlm_sft.errors import ConfigError

Params = dict[str, torch.Tensor]

STRATEGIES = ("no_shard", "full_shard", "hybrid_shard")
_FIELD = "actor.fsdp_config"


# ----------------------------------------------------------------------------------------------------------------
# Processes and mesh layout (pure: checked before any process group exists, identically on every rank).

@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """This process's place in the job, as torchrun describes it (WORLD_SIZE, RANK, LOCAL_RANK,
    LOCAL_WORLD_SIZE: the processes on this machine)."""

    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "ProcessInfo":
        env = os.environ if env is None else env
        names = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE")
        try:
            world_size = int(env.get("WORLD_SIZE", 1))
            info = cls(world_size, int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)),
                       int(env.get("LOCAL_WORLD_SIZE", world_size)))  # not from torchrun: one machine
        except ValueError:
            raise ValueError(f"{', '.join(names)} must be integers (as torchrun sets them), got "
                             f"{[env.get(k) for k in names]}") from None
        if (info.world_size < 1 or not 0 <= info.rank < info.world_size
                or not 0 <= info.local_rank < info.local_world_size <= info.world_size):
            raise ValueError(f"RANK={info.rank}, LOCAL_RANK={info.local_rank}, LOCAL_WORLD_SIZE="
                             f"{info.local_world_size} do not fit WORLD_SIZE={info.world_size}")
        return info


def mesh_layout(strategy: str, world_size: int, *, num_nodes: int = 1, hybrid_shard_size: int = 0
                ) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(mesh shape, mesh dim names) for a strategy. hybrid_shard shards within groups of `hybrid_shard_size`
    ranks (default: the ranks of one node, world_size / num_nodes) and replicates across the groups."""
    if strategy not in STRATEGIES:
        raise ConfigError(f"{_FIELD}.sharding_strategy={strategy!r}: expected one of {list(STRATEGIES)}")
    if not isinstance(num_nodes, int) or num_nodes < 1:
        raise ConfigError(f"cluster.num_nodes={num_nodes!r}: expected a positive integer")
    if strategy != "hybrid_shard":
        return (world_size,), ("dp",)
    if not isinstance(hybrid_shard_size, int) or hybrid_shard_size < 0:
        raise ConfigError(f"{_FIELD}.hybrid_shard_size={hybrid_shard_size!r}: expected 0 (ranks per node) or a "
                          "positive integer")
    if hybrid_shard_size == 0:
        if world_size % num_nodes:
            raise ConfigError(f"{_FIELD}.sharding_strategy='hybrid_shard': world size {world_size} is not divisible "
                              f"by cluster.num_nodes={num_nodes} (set {_FIELD}.hybrid_shard_size to choose the "
                              "shard group size)")
        hybrid_shard_size = world_size // num_nodes
    if world_size % hybrid_shard_size:
        raise ConfigError(f"{_FIELD}.hybrid_shard_size={hybrid_shard_size}: does not divide the world size "
                          f"{world_size}; the hybrid mesh is (world / size) replicas x size shards")
    return (world_size // hybrid_shard_size, hybrid_shard_size), ("replicate", "shard")


def param_placements(strategy: str) -> tuple[Placement, ...]:
    """Placement of every param (and its Adam moments) on the strategy's mesh (DESIGN.md's table)."""
    return {"no_shard": (Replicate(),), "full_shard": (Shard(0),),
            "hybrid_shard": (Replicate(), Shard(0))}[strategy]


def check_config(config: Any, world_size: int) -> None:
    """Every sharding/precision mistake, before any process group or heavy work (same result on every rank)."""
    f = config.actor.fsdp_config
    mesh_layout(f.sharding_strategy, world_size, num_nodes=config.cluster.num_nodes,
                hybrid_shard_size=f.hybrid_shard_size)
    mp = f.mixed_precision
    param = parse_dtype(mp.param_dtype, f"{_FIELD}.mixed_precision.param_dtype")
    reduce = parse_dtype(mp.reduce_dtype, f"{_FIELD}.mixed_precision.reduce_dtype")
    parse_dtype(mp.buffer_dtype, f"{_FIELD}.mixed_precision.buffer_dtype")
    if reduce not in (param, torch.float32):
        raise ConfigError(f"{_FIELD}.mixed_precision.reduce_dtype={mp.reduce_dtype!r} with param_dtype="
                          f"{mp.param_dtype!r}: expected the param_dtype or fp32 (params are gathered in the "
                          "reduce dtype, so a narrower one would round the compute weights)")


# ----------------------------------------------------------------------------------------------------------------
# Process group.

def init_process_group(info: ProcessInfo, timeout_s: float | None = None) -> tuple[torch.device, bool]:
    """Joins (or creates) the default process group; returns this rank's device and whether the group was created
    here (the creator destroys it: `destroy_process_group`).

    nccl when CUDA is available, else gloo. Under torchrun the ranks rendezvous through its env; one process (with
    or without torchrun) gets an in-process group of one, so the mesh code is the same everywhere.

    `timeout_s` (runner.collective_timeout_s) bounds every collective: a rank that died or stalls makes the others
    fail after it instead of waiting for the backend's default. gloo raises in the waiting rank; for nccl the
    watchdog aborts the communicator and ends the process (TORCH_NCCL_ASYNC_ERROR_HANDLING=1, set unless the user
    set it), so torchrun sees the failure and stops the job.
    """
    device = torch.device("cuda", info.local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.is_initialized():
        if dist.get_world_size() != info.world_size:
            raise ValueError(f"a process group of {dist.get_world_size()} ranks exists; WORLD_SIZE says "
                             f"{info.world_size}")
        return device, False
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    timeout = datetime.timedelta(seconds=timeout_s) if timeout_s else None
    if info.world_size == 1:  # nothing to rendezvous with: an in-process store
        dist.init_process_group(backend, store=dist.HashStore(), world_size=1, rank=0, timeout=timeout)
    elif "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        dist.init_process_group(backend, world_size=info.world_size, rank=info.rank, timeout=timeout,
                                device_id=device if device.type == "cuda" else None)
    else:
        raise ValueError(f"WORLD_SIZE={info.world_size} but MASTER_ADDR/MASTER_PORT are not set: launch with "
                         "torchrun (launch/run_vlm_sft.sh)")
    return device, True


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def exit_process(code: int | str | None) -> NoReturn:
    """Ends a finished rank's process with `code` (SystemExit's meaning), skipping interpreter finalization.

    gloo's worker threads drop finished collectives asynchronously, and the drop can release the last reference to
    a Python-owned tensor (one DCP or DTensor broadcast, say). If that happens while the interpreter finalizes, the
    thread cannot take the GIL and libstdc++ aborts the process ("terminate called without an active exception",
    SIGABRT), turning a run that succeeded into a failed rank. `destroy_process_group` cannot prevent it: it does
    not join those threads while DTensor's internals still hold the group. So a rank whose outputs are written
    flushes its logs and streams and leaves with `os._exit`.
    """
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)
        code = 1
    std_logging.shutdown()  # flushes absl's handlers
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


# ----------------------------------------------------------------------------------------------------------------
# The sharding of the train state.

@dataclasses.dataclass(frozen=True)
class Sharding:
    """The mesh, the params' placements and the mixed-precision dtypes: all a gather or a reduction needs."""

    mesh: DeviceMesh
    placements: tuple[Placement, ...]
    param_dtype: torch.dtype = torch.float32
    reduce_dtype: torch.dtype = torch.float32
    buffer_dtype: torch.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        if self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.mesh.device_type)


def make_sharding(config: Any, device: torch.device) -> Sharding:
    """The configured strategy's mesh over all ranks of the (initialised) default process group."""
    f = config.actor.fsdp_config
    world_size = dist.get_world_size()
    shape, names = mesh_layout(f.sharding_strategy, world_size, num_nodes=config.cluster.num_nodes,
                               hybrid_shard_size=f.hybrid_shard_size)
    mp = f.mixed_precision
    return Sharding(
        mesh=init_device_mesh(device.type, shape, mesh_dim_names=names),
        placements=param_placements(f.sharding_strategy),
        param_dtype=parse_dtype(mp.param_dtype, f"{_FIELD}.mixed_precision.param_dtype"),
        reduce_dtype=parse_dtype(mp.reduce_dtype, f"{_FIELD}.mixed_precision.reduce_dtype"),
        buffer_dtype=parse_dtype(mp.buffer_dtype, f"{_FIELD}.mixed_precision.buffer_dtype"))


def shard_params(params: Params, sharding: Sharding) -> Params:
    """Full tensors (identical on every rank: all ranks load the same files) -> DTensors on this rank's device.

    Each rank keeps only its own slice (a copy: the full tensor can be freed); nothing is communicated.
    """
    return {k: distribute_tensor(v.detach(), sharding.mesh, sharding.placements, src_data_rank=None)
            for k, v in params.items()}


def shard_model(model: model_lib.Model, params: Params, sharding: Sharding) -> Params:
    """Shards the params and prepares the HF module skeleton for the sharded run.

    The module's own parameters share storage with the loaded full params; they are never read by the functional
    forward, so they become meta tensors (shape and dtype only), freeing the full copy. Its buffers (rotary
    frequencies) move to the device in `buffer_dtype`.
    """
    sharded = shard_params(params, sharding)
    meta: dict[int, torch.nn.Parameter] = {}  # one replacement per parameter object: tied weights stay tied
    for sub in model.module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                if id(p) not in meta:
                    meta[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
                sub._parameters[name] = meta[id(p)]
        for name, b in sub._buffers.items():
            if b is not None:
                sub._buffers[name] = b.to(sharding.device, buffer_dtype(name, b, sharding))
    return sharded


# Buffers that stay fp32 whatever buffer_dtype says: rotary frequency tables. In bf16 (8 bits of mantissa) the
# angle position * inv_freq is off by up to ~0.4% of the position, i.e. whole radians beyond a few hundred tokens,
# and the model then reads positions wrongly. RLinf's FSDP casts them; we do not. (Qwen2.5-VL and Qwen3-VL have no
# other floating buffers, so for them buffer_dtype changes nothing; it applies to other buffers of future models.)
FP32_BUFFERS = ("inv_freq",)


def buffer_dtype(name: str, buffer: torch.Tensor, sharding: Sharding) -> torch.dtype | None:
    """The dtype a module buffer is held in (None: keep it): buffer_dtype for floating buffers, except the
    rotary frequency tables (FP32_BUFFERS), kept in fp32."""
    if not buffer.is_floating_point():
        return None
    return torch.float32 if any(key in name for key in FP32_BUFFERS) else sharding.buffer_dtype


def gather_full(params: Params) -> Params:
    """Plain full tensors of every param (for generation, export and comparisons): the whole model on each rank."""
    return {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in params.items()}


def local_bytes(tree: Any) -> int:
    """Bytes of storage this rank holds for the tree's leaves (local shards of DTensors; shared storage once)."""
    storages: dict[int, int] = {}
    for leaf in pytree.tree_leaves(tree):
        if isinstance(leaf, torch.Tensor):
            local = leaf.to_local() if isinstance(leaf, DTensor) else leaf
            s = local.untyped_storage()
            storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


def leaf_placements(tree: Any) -> dict[str, tuple[Placement, ...] | None]:
    """Key path -> placements of every leaf (None: a plain tensor, replicated by construction), for checks/logs."""
    paths, _ = pytree.tree_flatten_with_path(tree)
    return {pytree.keystr(path).lstrip("."): (tuple(leaf.placements) if isinstance(leaf, DTensor) else None)
            for path, leaf in paths}


# ----------------------------------------------------------------------------------------------------------------
# Per-block gather (the block_call hook of models/).

class GatherStats:
    """Measures the gathered (full) param copies alive at once: the storages of every gathered tensor are tracked
    by weak reference, and the live total is sampled at each gather (the live set only grows there)."""

    def __init__(self) -> None:
        self.peak_live_bytes = 0
        self.gathered_bytes = 0  # total bytes produced by gathers (recomputation in backward included)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}

    def live_bytes(self) -> int:
        self._live = {k: v for k, v in self._live.items() if not v[0].expired()}
        return sum(n for _, n in self._live.values())

    def track(self, t: torch.Tensor, shard: torch.Tensor) -> None:
        """Counts `t` (a gathered tensor) unless it is the local `shard` itself (a mesh of one gathers nothing)."""
        live = self.live_bytes()  # prune first: a freed storage's address may be reused
        s = t.untyped_storage()
        if s.data_ptr() != shard.untyped_storage().data_ptr() and s.data_ptr() not in self._live:
            self._live[s.data_ptr()] = (StorageWeakRef(s), s.nbytes())
            self.gathered_bytes += s.nbytes()
            live += s.nbytes()
        self.peak_live_bytes = max(self.peak_live_bytes, live)


def gather(p: Params, sharding: Sharding, stats: GatherStats | None = None) -> Params:
    """Full compute copies of a param group: gathered in reduce_dtype, cast to param_dtype. Differentiable: the
    gradient w.r.t. each DTensor comes back in its placement, averaged over ranks (reduced in reduce_dtype)."""
    replicate = [Replicate()] * sharding.mesh.ndim
    average = [Partial("avg")] * sharding.mesh.ndim
    out = {}
    for k, v in p.items():
        # A leaf without requires_grad (frozen: never reduced) is cast first and gathered in param_dtype.
        moved = v.to(sharding.reduce_dtype if v.requires_grad else sharding.param_dtype)
        full = moved.redistribute(sharding.mesh, replicate).to_local(grad_placements=average)
        out[k] = full.to(sharding.param_dtype)
        if stats is not None:
            stats.track(full, v.to_local())
            stats.track(out[k], v.to_local())
    return out


def make_block_call(sharding: Sharding, *, checkpointing: bool = False, compile: bool = False,
                    stats: GatherStats | None = None, lora_scale: float | None = None) -> model_lib.BlockCall:
    """The models' block_call: gather the group's params inside the call, so the full copies live only while used.

    With `checkpointing`, calls marked `remat` (decoder and vision blocks) run under non-reentrant activation
    checkpointing with the gather INSIDE the checkpointed function: nothing of the block is kept for backward but
    its inputs, and the params are gathered again when backward recomputes it (FSDP's reshard-after-forward).
    The checkpointed function takes the params as explicit inputs, which keeps it exact (unlike transformers'
    built-in checkpointing with functional params: see reference/torch_findings.md).
    LoRA adapters in a group are merged into their weights right after the gather (lora.merge, `lora_scale`).
    With `compile`, each kind of block is one compiled region, applied to the gathered (and merged) params
    (vlm_sft/compile.py); the gather and the merge run eagerly just before it.
    """
    return compile_lib.make_block_call(lambda p: lora_lib.merge(gather(p, sharding, stats), lora_scale),
                                       compile=compile, checkpointing=checkpointing)


# ----------------------------------------------------------------------------------------------------------------
# Cross-rank reductions of host-side numbers.

def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over all ranks (a new tensor on t's device); identity for one process."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return t.clone()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.to(device, copy=True)
    dist.all_reduce(out)
    return out.to(t.device)


def reduce_metrics(metrics: Mapping[str, Any], sum_keys: tuple[str, ...] = ()) -> dict[str, float]:
    """Python floats averaged over ranks (`sum_keys`: summed), in one collective. Every rank must pass the same
    keys. Already-global values (grad norm, lr) are identical on every rank, so their mean is themselves."""
    keys = sorted(metrics)
    values = torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64)
    world = dist.get_world_size() if dist.is_initialized() else 1
    total = all_reduce_sum(values).tolist()
    return {k: v if k in sum_keys else v / world for k, v in zip(keys, total)}
