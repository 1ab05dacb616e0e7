"""Sharding as a property of the train state's leaves: the device mesh, DTensor placements, and per-block gathers.

Why not FSDP2's `fully_shard`: its hooks gather the module's OWN parameters, so `functional_call` with the params
we pass in is silently ignored and `autograd.grad` w.r.t. them returns None (reference/torch_findings.md). We use
the layer FSDP2 is built on instead: every param is a DTensor placed per `actor.fsdp_config.sharding_strategy`,

    no_shard      mesh (dp,)               Replicate           gradients all-reduced
    full_shard    mesh (dp,)               Shard(0)            gradients reduce-scattered
    hybrid_shard  mesh (replicate, shard)  Replicate, Shard(0) reduce-scatter within a node, all-reduce across

and each param group is gathered inside the call that uses it (`make_block_call`, plugged into the models'
`block_call` hook): by definition `redistribute(Replicate).to_local(grad_placements=[Partial("avg")])` per
param (what a mesh of one and `FLAT_GATHER = False` run), on several ranks one flat collective per block. The Partial grad
placement is what makes backward reduce the per-rank gradients back into the params' placement; without it the
gradients are silently wrong. "avg" makes them the MEAN over ranks (as RLinf's FSDP), so a run on N ranks takes the
same steps as one process on the same global batch. Adam moments are created from the sharded params, so they
follow their param's placement; 0-dim counters stay plain tensors that every rank computes identically.

Mixed precision: master params and optimizer state keep their dtype (fp32); a block's params are gathered in
`reduce_dtype` and cast to `param_dtype` for compute, so gradients come back (and are reduced) in `reduce_dtype`.

On more than one rank a block's params are gathered as ONE flat buffer (`gather_flat`, an autograd.Function, as
FSDP2's fully_shard does): one cat + one cast to param_dtype into a flat shard, one all-gather, one split-copy
into per-param views; backward one chunk-cat of the gradients, one cast to reduce_dtype, one reduce-scatter
(all-reduce when replicated, plus one all-reduce across replicas for hybrid_shard), one cast to the master dtype,
and views back as DTensors in the params' placement. Same numbers as the per-param redistribute (the cast is
elementwise, so casting before the gather equals casting after it, and moves param_dtype bytes; tested bit for
bit on 2 ranks). It runs eagerly, outside the compiled regions (a custom Function inside a compiled region
split its graph: 1.3 s/step against 0.3, tiny model, CPU).

Expert parallelism (`actor.fsdp_config.expert_parallel_size` = e > 1, MoE families): the stacked expert tensors
([E, ...], models/moe.py EXPERT_SUFFIXES) live on their own mesh (world / e, e) named ("edp", "ep"), placed
(Replicate, Shard(0)): each rank of an EP group holds its E/e experts whole, replicated across the world / e
groups; every other leaf is placed by the strategy as above. A block's expert leaves are not gathered: they reach
models/moe.py as DTensors of the local experts cast to param_dtype (`_ExpertLocal`), and moe.py moves the tokens
to them by all-to-all. Backward: each rank's expert gradients already sum the tokens of its whole EP group (the
all-to-all's backward), so they are all-reduced over "edp" and divided by the world size, the mean over ranks the
other leaves' gradients are. The placements are ordinary DTensor ones, so DCP reshards checkpoints between EP
and non-EP runs (and across world sizes). With actor.compile the regions are compiled without fullgraph: an MoE
block breaks its graph around the token exchange, which runs eagerly (its split sizes are host ints; moe.py).

Single process: an in-process gloo/nccl group of one (no torchrun needed). The trainer then holds its params as
plain tensors (`Sharding.plain`, make_sharding(plain_single_rank=True)): a mesh of one issues no collective, and
DTensor's per-op Python was most of a step's host time. The DTensor path on a mesh of one stays available (the
tests run the sharded code there) and gives the same losses and gradients bit for bit.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import logging as std_logging
import os
import sys
from typing import Any, Callable, Mapping, NoReturn

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.multiprocessing.reductions import StorageWeakRef

from vlm_sft import compile as compile_lib
from vlm_sft import lora as lora_lib
from vlm_sft import models as model_lib
from vlm_sft.models import moe as moe_lib
from vlm_sft.config import parse_dtype
from vlm_sft.errors import ConfigError

Params = dict[str, torch.Tensor]

STRATEGIES = ("no_shard", "full_shard", "hybrid_shard")
_FIELD = "actor.fsdp_config"
# Gather each block's DTensor params through one flat collective (gather_flat); False: one redistribute per param
# (the path before; bench/host.py's baseline).
FLAT_GATHER = True


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


EXPERT_MESH_DIMS = ("edp", "ep")
EXPERT_PLACEMENTS = (Replicate(), Shard(0))


def expert_parallel_size(config: Any, world_size: int) -> int:
    """actor.fsdp_config.expert_parallel_size (1: off), checked against the world size (pure)."""
    e = config.actor.fsdp_config.get("expert_parallel_size", 1)
    if isinstance(e, bool) or not isinstance(e, int) or e < 1:
        raise ConfigError(f"{_FIELD}.expert_parallel_size={e!r}: expected a positive integer (1: no expert "
                          "parallelism)")
    if world_size % e:
        raise ConfigError(f"{_FIELD}.expert_parallel_size={e}: does not divide the world size {world_size}; "
                          "experts are split over groups of that many data-parallel ranks")
    return e


def check_expert_parallel(config: Any, shapes: Mapping[str, Any], world_size: int) -> None:
    """expert_parallel_size against the model (param name -> shape, from the meta skeleton): an MoE family
    whose expert count it divides. Before any weights load."""
    e = expert_parallel_size(config, world_size)
    if e == 1:
        return
    experts = {k: tuple(v) for k, v in shapes.items() if moe_lib.is_expert(k)}
    if not experts:
        raise ConfigError(f"{_FIELD}.expert_parallel_size={e}: the model has no experts (expert parallelism is for "
                          "the MoE families qwen3_vl_moe and qwen3_5_moe); set it to 1")
    num = sorted({v[0] for v in experts.values()})
    if any(n % e for n in num):
        raise ConfigError(f"{_FIELD}.expert_parallel_size={e}: does not divide the model's {num[0]} experts per "
                          "layer; each rank of an EP group keeps num_experts / expert_parallel_size of them whole")


def check_config(config: Any, world_size: int) -> None:
    """Every sharding/precision mistake, before any process group or heavy work (same result on every rank)."""
    f = config.actor.fsdp_config
    mesh_layout(f.sharding_strategy, world_size, num_nodes=config.cluster.num_nodes,
                hybrid_shard_size=f.hybrid_shard_size)
    expert_parallel_size(config, world_size)
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
    # Params as plain tensors (a mesh of one only): one rank holds every param whole and issues no collective, so
    # DTensor would only add its Python per param and op (0.3 s of a 3B-depth step's host time, CPU). The step,
    # checkpoints (DCP reshards plain <-> DTensor) and the update take plain tensors as they take DTensors.
    plain: bool = False
    # Expert parallelism: the mesh (world / e, e) of the expert leaves (models.moe.is_expert), placed
    # EXPERT_PLACEMENTS; None: experts are placed like every leaf.
    expert_mesh: DeviceMesh | None = None

    def __post_init__(self) -> None:
        if self.plain and self.mesh.size() != 1:
            raise ValueError(f"Sharding(plain=True) needs a mesh of one rank, got {tuple(self.mesh.shape)}")
        if self.plain and self.expert_mesh is not None:
            raise ValueError("Sharding(plain=True) takes no expert mesh")

    def placement(self, name: str) -> tuple[DeviceMesh, tuple[Placement, ...]]:
        """The mesh and placements of the param `name` (and of its optimizer state)."""
        if self.expert_mesh is not None and moe_lib.is_expert(name):
            return self.expert_mesh, EXPERT_PLACEMENTS
        return self.mesh, self.placements

    @property
    def device(self) -> torch.device:
        if self.mesh.device_type == "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device(self.mesh.device_type)


def make_sharding(config: Any, device: torch.device, *, plain_single_rank: bool = False) -> Sharding:
    """The configured strategy's mesh over all ranks of the (initialised) default process group.
    `plain_single_rank` (the trainer's choice): on a world of one, params are plain tensors (Sharding.plain)."""
    f = config.actor.fsdp_config
    world_size = dist.get_world_size()
    shape, names = mesh_layout(f.sharding_strategy, world_size, num_nodes=config.cluster.num_nodes,
                               hybrid_shard_size=f.hybrid_shard_size)
    mp = f.mixed_precision
    ep = expert_parallel_size(config, world_size)
    return Sharding(
        mesh=init_device_mesh(device.type, shape, mesh_dim_names=names),
        placements=param_placements(f.sharding_strategy),
        param_dtype=parse_dtype(mp.param_dtype, f"{_FIELD}.mixed_precision.param_dtype"),
        reduce_dtype=parse_dtype(mp.reduce_dtype, f"{_FIELD}.mixed_precision.reduce_dtype"),
        buffer_dtype=parse_dtype(mp.buffer_dtype, f"{_FIELD}.mixed_precision.buffer_dtype"),
        plain=plain_single_rank and world_size == 1,
        expert_mesh=init_device_mesh(device.type, (world_size // ep, ep), mesh_dim_names=EXPERT_MESH_DIMS)
        if ep > 1 else None)


def shard_params(params: Params, sharding: Sharding) -> Params:
    """Full tensors (identical on every rank: all ranks load the same files) -> DTensors on this rank's device.

    Each rank keeps only its own slice (a copy: the full tensor can be freed); nothing is communicated. With
    `sharding.plain` (one rank) the copies are plain tensors.
    """
    if sharding.plain:
        return {k: v.detach().to(sharding.device, copy=True) for k, v in params.items()}
    return {k: distribute_tensor(v.detach(), *sharding.placement(k), src_data_rank=None) for k, v in params.items()}


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


@dataclasses.dataclass(frozen=True)
class _FlatLayout:
    """Where each param of a block lives in the block's flat gather buffer (computed once per block).

    Every param's rank shard is padded to `chunk` elements (ceil(dim0 / ranks) rows, as torch.chunk and DTensor's
    Shard(0) split it), so the ranks' flat shards have one size and the gathered buffer is [ranks, sum(chunk)].
    """

    shard_dim: int | None          # the mesh dim params are sharded on (None: replicated on every mesh dim)
    ranks: int                     # ranks along shard_dim (1 when replicated)
    world: int                     # ranks the gradient is averaged over (the whole mesh)
    shapes: tuple[torch.Size, ...]  # global shapes
    locals: tuple[torch.Size, ...]  # this rank's shard shapes
    chunks: tuple[int, ...]        # padded shard numel per param
    specs: tuple[Any, ...]          # the params' DTensorSpecs (their gradients take the same)

    @classmethod
    def of(cls, params: list[DTensor]) -> "_FlatLayout":
        first = params[0]
        shard_dims = [i for i, p in enumerate(first.placements) if p.is_shard()]
        shard_dim = shard_dims[0] if shard_dims else None
        ranks = first.device_mesh.size(shard_dim) if shard_dim is not None else 1
        chunks = []
        for p in params:
            rows = -(-p.shape[0] // ranks) if p.dim() else 1
            chunks.append(rows * (p[0].numel() if p.dim() else 1) if shard_dim is not None else p.numel())
        return cls(shard_dim, ranks, first.device_mesh.size(), tuple(p.shape for p in params),
                   tuple(p._local_tensor.shape for p in params), tuple(chunks), tuple(p._spec for p in params))


def _flat_gatherable(params: list[torch.Tensor]) -> bool:
    """DTensors on one mesh, placed alike as param_placements places them (Shard(0) on at most one mesh dim,
    Replicate elsewhere), with at least one dim where sharded."""
    first = params[0]
    if not all(isinstance(p, DTensor) for p in params):
        return False
    placements = first.placements
    shards = [p for p in placements if p.is_shard()]
    if len(shards) > 1 or any(not (p.is_replicate() or (p.is_shard() and p.dim == 0)) for p in placements):
        return False
    return all(p.device_mesh == first.device_mesh and p.placements == placements and p.dtype == first.dtype
               and (p.dim() > 0 or not shards) for p in params)


def _gather_flat(layout: _FlatLayout, locals_: list[torch.Tensor], dtype: torch.dtype, mesh: DeviceMesh
                 ) -> list[torch.Tensor]:
    """The full params of a block from this rank's shards: one cat (casting) into a flat shard, one all-gather,
    one split-copy into per-param buffers (views of one allocation)."""
    pads = [c - x.numel() for c, x in zip(layout.chunks, locals_)]
    pieces = []
    for x, pad in zip(locals_, pads):
        pieces.append(x.reshape(-1))
        if pad:
            pieces.append(x.new_zeros(pad))
    if layout.shard_dim is None and all(x.dtype == dtype for x in locals_):  # replicated: whole already
        return [x.view(shape) for x, shape in zip(locals_, layout.shapes)]
    flat = torch.empty(sum(layout.chunks), dtype=dtype, device=locals_[0].device)
    torch.cat(pieces, out=flat)  # the cast included
    if layout.shard_dim is None:
        outs = flat.split(layout.chunks)
        return [o.view(shape) for o, shape in zip(outs, layout.shapes)]
    gathered = flat.new_empty(layout.ranks * flat.numel())
    dist.all_gather_into_tensor(gathered, flat, group=mesh.get_group(layout.shard_dim))
    sizes = [_aligned(layout.ranks * c) for c in layout.chunks]  # each full param aligned (see ALIGN)
    buffer = flat.new_empty(sum(sizes))
    outs = [o[:layout.ranks * c].view(layout.ranks, c) for o, c in zip(buffer.split(sizes), layout.chunks)]
    torch.split_with_sizes_copy(gathered.view(layout.ranks, -1), list(layout.chunks), dim=1, out=outs)
    full = []
    for o, shape in zip(outs, layout.shapes):
        rows = o.view(-1, *shape[1:]) if len(shape) else o.view(-1)
        full.append(rows[:shape[0]] if len(shape) else rows[0])
    return full


class _FlatGather(torch.autograd.Function):
    """All-gather of a block's DTensor params as ONE flat buffer (FSDP2's all-gather inside fully_shard), and its
    backward as ONE reduce-scatter (or all-reduce, replicated) of the flattened gradients, averaged over ranks.

    Same numbers as `redistribute(Replicate).to_local(grad_placements=[Partial("avg")])` per param with the
    casts around it: the forward cast to param_dtype is elementwise, so cast-then-gather equals gather-then-cast
    (and moves param_dtype bytes); gradients are cast to reduce_dtype before the reduction and to the master
    dtype after it, as the per-param casts' backward did. It runs eagerly, outside the compiled regions.
    """

    @staticmethod
    def forward(ctx, layout: _FlatLayout, sharding: Sharding, *params: DTensor) -> tuple[torch.Tensor, ...]:
        ctx.layout, ctx.sharding = layout, sharding
        ctx.master = params[0]._local_tensor.dtype
        return tuple(_gather_flat(layout, [p._local_tensor for p in params], sharding.param_dtype,
                                  sharding.mesh))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[Any, ...]:
        layout, sharding = ctx.layout, ctx.sharding
        mesh = sharding.mesh
        if layout.shard_dim is None:
            flat = torch.cat([g.reshape(-1) for g in grads]).to(sharding.reduce_dtype)
            for dim in range(mesh.ndim):
                if mesh.size(dim) > 1:
                    dist.all_reduce(flat, group=mesh.get_group(dim))
            local = flat
        else:
            chunked = torch._chunk_cat([g.contiguous() for g in grads], dim=0, num_chunks=layout.ranks)
            chunked = chunked.to(sharding.reduce_dtype).view(-1)
            group = mesh.get_group(layout.shard_dim)
            local = chunked.new_empty(chunked.numel() // layout.ranks)
            if dist.get_backend(group) == "gloo":  # gloo has no reduce_scatter_tensor
                dist.all_reduce(chunked, group=group)
                local = chunked.view(layout.ranks, -1)[dist.get_rank(group)]
            else:
                dist.reduce_scatter_tensor(local, chunked, group=group)
            for dim in range(mesh.ndim):
                if dim != layout.shard_dim and mesh.size(dim) > 1:
                    dist.all_reduce(local, group=mesh.get_group(dim))
        local = local.div_(layout.world).to(ctx.master)
        out = []
        for piece, shape, spec in zip(local.split(list(layout.chunks)), layout.locals, layout.specs):
            out.append(DTensor(piece[:shape.numel()].view(shape), spec, requires_grad=False))
        return (None, None, *out)


class _FlatCast(torch.autograd.Function):
    """One rank's gather: the block's plain params cast to param_dtype by ONE cat into a flat buffer (views per
    param), and their gradients cast back to the master dtype by one cat (views per param): two ops per block
    where per-param casts were two per param (1,650 of a 3B step's ~2,800 kernel ops, bf16 compute). Same numbers:
    every cast is elementwise, and reduce_dtype (param_dtype or fp32, check_config) adds no rounding between."""

    @staticmethod
    def forward(ctx, dtype: torch.dtype, *params: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.shapes, ctx.master = [p.shape for p in params], params[0].dtype
        return tuple(_cat_views(params, dtype))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor) -> tuple[Any, ...]:
        return (None, *_cat_views(grads, ctx.master, align=False))  # views shaped as the grads (the params)


# Each param's view in a flat buffer starts at a multiple of this many elements (>= 16 bytes in any dtype), as
# compiled kernels assume aligned inputs (inductor copies a misaligned one first, on every call).
ALIGN = 16
_ZEROS: dict[tuple, torch.Tensor] = {}


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _zeros(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    key = (n, dtype, device)
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(n, dtype=dtype, device=device)
    return _ZEROS[key]


_VIEW_LAYOUTS: dict[tuple, tuple] = {}


def _view_layout(shapes: tuple[torch.Size, ...], align: bool) -> tuple[int, bool, tuple[tuple, ...]]:
    """(flat numel, whether there is padding, (shape, stride, offset) per tensor) of tensors of these shapes laid
    out one after the other, computed once per layout (a step asks for the same few dozen every time)."""
    key = (shapes, align)
    layout = _VIEW_LAYOUTS.get(key)
    if layout is None:
        placed, offset, padded = [], 0, False
        for shape in shapes:
            numel = shape.numel()
            size = _aligned(numel) if align else numel
            placed.append((shape, _contiguous_strides(shape), offset))
            padded |= size > numel
            offset += size
        layout = _VIEW_LAYOUTS[key] = (offset, padded, tuple(placed))
    return layout


def _cat_views(tensors: tuple[torch.Tensor, ...] | list[torch.Tensor], dtype: torch.dtype, *, align: bool = True
               ) -> list[torch.Tensor]:
    """The tensors copied (and cast) into one flat buffer of `dtype`, as views of it (each starting at a multiple
    of ALIGN elements when `align`; padding zeroed).

    On CUDA one `_chunk_cat` (or `cat`) kernel does it, as FSDP2's gathers do. On CPU both convert dtypes element
    by element (a 9.7M-element fp32 -> bf16 embedding: 19.6 ms against 1.5 ms for `copy_`), so there the views are
    filled by one `_foreach_copy_`."""
    total, padded, placed = _view_layout(tuple(t.shape for t in tensors), align)
    device = tensors[0].device
    flat = (torch.zeros if padded and device.type == "cpu" else torch.empty)(total, dtype=dtype, device=device)
    views = [flat.as_strided(shape, stride, offset) for shape, stride, offset in placed]
    if device.type == "cpu":
        torch._foreach_copy_(views, list(tensors))
    elif not padded and all(t.is_contiguous() for t in tensors):
        # No padding: one op flattens, casts and concatenates in C++ (no Python reshape per tensor).
        torch._chunk_cat(tensors, dim=0, num_chunks=1, out=flat.view(1, -1))
    else:
        pieces = []
        for t, (_, _, offset), end in zip(tensors, placed, [o for _, _, o in placed[1:]] + [total]):
            pieces.append(t.reshape(-1))
            if end - offset > t.numel():
                pieces.append(_zeros(end - offset - t.numel(), t.dtype, t.device))
        torch.cat(pieces, out=flat)
    return views


def _contiguous_strides(shape: torch.Size) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


def cast_flat(p: Params, sharding: Sharding) -> Params:
    """`gather`'s result for plain params (one rank): one flat cast per group of like leaves (trained / frozen)."""
    out: Params = {}
    for trained in (True, False):
        names = [k for k, v in p.items() if v.requires_grad == trained]
        if names:
            leaves = [p[k] for k in names]
            if trained:
                full = _FlatCast.apply(sharding.param_dtype, *leaves)
            else:
                with torch.no_grad():
                    full = _cat_views(leaves, sharding.param_dtype)
            out.update(zip(names, full))
    return {k: out[k] for k in p}


_LAYOUTS: dict[tuple, _FlatLayout] = {}


def gather_flat(p: Params, sharding: Sharding) -> Params:
    """`gather`'s result through one flat collective per group of like leaves (trained / frozen)."""
    out: Params = {}
    for trained in (True, False):
        names = [k for k, v in p.items() if v.requires_grad == trained]
        if not names:
            continue
        params = [p[k] for k in names]
        key = (tuple(names), tuple(v.shape for v in params), params[0].device_mesh, params[0].placements)
        layout = _LAYOUTS.get(key)
        if layout is None:
            layout = _LAYOUTS[key] = _FlatLayout.of(params)
        if trained:
            full = _FlatGather.apply(layout, sharding, *params)
        else:
            with torch.no_grad():
                full = _gather_flat(layout, [v._local_tensor for v in params], sharding.param_dtype, sharding.mesh)
        out.update(zip(names, full))
    return {k: out[k] for k in p}


def gather(p: Params, sharding: Sharding, stats: GatherStats | None = None) -> Params:
    """Full compute copies of a param group: gathered in reduce_dtype, cast to param_dtype. Differentiable: the
    gradient w.r.t. each DTensor comes back in its placement, averaged over ranks (reduced in reduce_dtype).
    Expert leaves under expert parallelism stay this rank's experts (`expert_local`)."""
    if sharding.expert_mesh is not None and any(moe_lib.is_expert(k) for k in p):
        rest = gather({k: v for k, v in p.items() if not moe_lib.is_expert(k)}, sharding, stats)
        return {k: expert_local(v, sharding) if moe_lib.is_expert(k) else rest[k] for k, v in p.items()}
    leaves = list(p.values())
    if (FLAT_GATHER and sharding.plain and leaves and leaves[0].dtype != sharding.param_dtype
            and all(not isinstance(v, DTensor) and v.dtype == leaves[0].dtype for v in leaves)):
        out = cast_flat(p, sharding)
        if stats is not None:
            for k, v in p.items():
                stats.track(out[k], v)
        return out
    if FLAT_GATHER and p and sharding.mesh.size() > 1 and _flat_gatherable(leaves):
        out = gather_flat(p, sharding)
        if stats is not None:
            for k, v in p.items():
                stats.track(out[k], v._local_tensor)
        return out
    replicate = [Replicate()] * sharding.mesh.ndim
    average = [Partial("avg")] * sharding.mesh.ndim
    out = {}
    for k, v in p.items():
        # A leaf without requires_grad (frozen: never reduced) is cast first and gathered in param_dtype.
        moved = v.to(sharding.reduce_dtype if v.requires_grad else sharding.param_dtype)
        if isinstance(moved, DTensor):
            full = moved.redistribute(sharding.mesh, replicate).to_local(grad_placements=average)
        else:  # a plain param (one rank): whole already, its gradient is this rank's (the mean over one)
            full = moved
        out[k] = full.to(sharding.param_dtype)
        if stats is not None:
            local = v.to_local() if isinstance(v, DTensor) else v
            stats.track(full, local)
            stats.track(out[k], local)
    return out


class _ExpertLocal(torch.autograd.Function):
    """This rank's experts (the local shard of an expert-parallel leaf) cast to param_dtype; backward: the local
    gradient (already summed over the EP group's tokens) cast to reduce_dtype, all-reduced over the mesh dims the
    leaf is replicated on, divided by the world size (the mean over ranks), back in the leaf's placement."""

    @staticmethod
    def forward(ctx, param: DTensor, sharding: Sharding) -> torch.Tensor:
        ctx.spec, ctx.sharding, ctx.master = param._spec, sharding, param._local_tensor.dtype
        return param._local_tensor.to(sharding.param_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[Any, ...]:
        mesh = ctx.spec.mesh
        grad = grad.to(ctx.sharding.reduce_dtype, copy=True)
        for dim, placement in enumerate(ctx.spec.placements):
            if placement.is_replicate() and mesh.size(dim) > 1:
                dist.all_reduce(grad, group=mesh.get_group(dim))
        grad = grad.div_(mesh.size()).to(ctx.master)
        return DTensor(grad.contiguous(), ctx.spec, requires_grad=False), None


def expert_local(param: DTensor, sharding: Sharding) -> DTensor:
    """An expert-parallel leaf as models/moe.py takes it: a DTensor over the expert mesh whose local tensor is
    this rank's experts in param_dtype (differentiable to the leaf when it trains; never gathered)."""
    if param.requires_grad:
        local = _ExpertLocal.apply(param, sharding)
    else:
        local = param._local_tensor.to(sharding.param_dtype)
    return DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                              stride=param.stride())


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
    (vlm_sft/compile.py); the gather and the merge run eagerly just before it. Under expert parallelism the
    MoE regions break their graph around the token exchange (models/moe.py), so they are not fullgraph.
    """
    return compile_lib.make_block_call(lambda p: lora_lib.merge(gather(p, sharding, stats), lora_scale),
                                       compile=compile, checkpointing=checkpointing,
                                       fullgraph=sharding.expert_mesh is None)


def make_eval_gather(sharding: Sharding, dtype: torch.dtype, lora_scale: float | None
                     ) -> Callable[[Params], Params]:
    """One param group's full copy for evaluation and generation (no autograd), through `gather` as the train
    step's block_call: gathered exactly (in the widest dtype of its leaves, then each leaf in its own dtype
    again: no rounding), LoRA adapters merged as lora.merge_params merges them, every leaf then in `dtype`.
    The same numbers the whole model gathered, merged and cast would give, one group at a time. Expert-parallel
    leaves are gathered whole too (the block's experts: HF generate runs the family's own MoE module)."""
    experts = (lambda k: moe_lib.is_expert(k)) if sharding.expert_mesh is not None else (lambda k: False)
    exact_of = lambda wide: dataclasses.replace(sharding, param_dtype=wide, reduce_dtype=wide, expert_mesh=None)

    def gather_group(p: Params) -> Params:
        if not p:
            return {}
        wide = functools.reduce(torch.promote_types, (v.dtype for v in p.values()))
        with torch.no_grad():
            full = gather({k: v for k, v in p.items() if not experts(k)}, exact_of(wide))
            full.update({k: v.full_tensor() for k, v in p.items() if experts(k)})
            full = {k: full[k].to(v.dtype) for k, v in p.items()}
            return {k: v.to(dtype) for k, v in lora_lib.merge_params(full, lora_scale).items()}

    return gather_group


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
