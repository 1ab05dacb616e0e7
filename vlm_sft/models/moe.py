"""Sparse mixture-of-experts MLP as a function of stacked expert tensors: top-k routing, tokens sorted by expert,
one grouped GEMM per projection, and the router statistics the load-balancing loss needs.

Experts are stacked as transformers 5 holds them: `gate_up` [E, 2I, H] (gate rows first, then up) and `down`
[E, H, I]. The token -> expert assignment is data-dependent, so nothing here asks the host for it: the top-k
expert ids are sorted on the device (a stable argsort), the per-expert counts are a scatter-add into E bins and
their cumulative sum is the group boundaries `offs` that `torch._grouped_mm` takes. No `.item()`, no `nonzero`, no
Python loop over experts: the shapes of every tensor are fixed by (tokens, top_k), so a block compiles once.

Grouped GEMM (`grouped_mm`): bf16 inputs go to `torch._grouped_mm` itself (the CUDA grouped kernel on GPUs that
have it; inductor traces it). Its meta function accepts bf16 only, so any other dtype (the fp32 CPU tests and
demo) goes through a custom op whose kernel is the same `torch._grouped_mm` called eagerly (its fallback computes
each group with a plain matmul: exact), opaque to the compiler, with the grouped products of its backward.

Expert parallelism (`expert_parallel`): when the expert tensors arrive as DTensors sharded on dim 0 over a mesh dim
(actor.fsdp_config.expert_parallel_size > 1; sharding.py places them so), this rank holds its E/e experts whole and
the tokens travel instead of the weights: the assignments, already sorted by expert and so by owning rank, go to
their expert's rank by one all-to-all, are regrouped there by local expert for the grouped GEMMs, and come back by
the reverse all-to-all. Both all-to-alls are differentiable (the backward is the all-to-all with the splits
swapped). The per-rank counts are exchanged on the device (one all-to-all of E counts); the split sizes
all_to_all_single takes are host ints, so they cost one host sync per MoE layer (as torchtitan's EP). With
actor.compile the exchange runs eagerly inside the compiled block (a graph break on each side of it), the
attention, router and grouped GEMMs stay compiled.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

__all__ = ["grouped_mm", "route", "experts", "sparse_moe", "load_balancing_loss", "max_expert_load",
           "EXPERT_SUFFIXES", "is_expert"]

# The stacked expert tensors of every MoE family here (transformers 5's names): what expert parallelism places
# whole per rank (sharding.py) and what the planner counts apart.
EXPERT_SUFFIXES = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def is_expert(name: str) -> bool:
    """A stacked expert tensor [E, ...] or its per-expert LoRA adapter ([E, r, in] / [E, out, r], lora.py): both
    are split over the expert dim alike, so a rank's adapters are those of the experts it keeps."""
    return name.endswith(EXPERT_SUFFIXES) or name.endswith(tuple(s + a for s in EXPERT_SUFFIXES
                                                                 for a in (".lora_A", ".lora_B")))


@torch.library.custom_op("vlm_sft::grouped_mm", mutates_args=())
def _grouped_mm_any_dtype(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if a.dtype == torch.float64:  # _grouped_mm takes no fp64: a loop over the groups (numerical checks only)
        return _grouped_mm_loop(a, b, offs)
    return torch._grouped_mm(a, b, offs=offs)


def _grouped_mm_loop(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """_grouped_mm's two forms one group at a time (reads the group ends on the host)."""
    ends = offs.tolist()
    starts = [0] + ends[:-1]
    if b.dim() == 3:  # [N, K] x [E, K, M] -> [N, M]
        out = a.new_zeros(a.shape[0], b.shape[-1])
        for e, (start, end) in enumerate(zip(starts, ends)):
            out[start:end] = a[start:end] @ b[e]
        return out
    return torch.stack([a[:, start:end] @ b[start:end] for start, end in zip(starts, ends)])  # -> [E, K, M]


@_grouped_mm_any_dtype.register_fake
def _(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    if b.dim() == 3:                                  # [N, K] x [E, K, M] -> [N, M]
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(offs.shape[0], a.shape[0], b.shape[-1])   # [K, N] x [N, M] -> [E, K, M]


def _setup(ctx, inputs, output) -> None:
    a, b, offs = inputs
    ctx.save_for_backward(a, b, offs)


def _backward(ctx, grad: torch.Tensor):
    a, b, offs = ctx.saved_tensors
    grad = grad.contiguous()  # an expanded gradient (of a sum) has zero strides, which the kernel refuses
    if b.dim() == 3:  # out[n] = a[n] @ b[e(n)]
        grad_a = _grouped_mm_any_dtype(grad, b.transpose(-2, -1), offs)
        grad_b = _grouped_mm_any_dtype(a.transpose(0, 1), grad, offs)
        return grad_a, grad_b, None
    raise NotImplementedError("grouped_mm: backward of the [K, N] x [N, M] form is not needed")


_grouped_mm_any_dtype.register_autograd(_backward, setup_context=_setup)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """a [N, K] rows grouped by expert (group e = rows offs[e-1]:offs[e]) times b [E, K, M] -> [N, M]."""
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:
        return torch._grouped_mm(a, b, offs=offs)
    return _grouped_mm_any_dtype(a, b, offs)


def route(x: torch.Tensor, gate_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E], normalised top-k weights [T, k] (in the logits' dtype) and expert ids [T, k]: softmax
    in fp32, top-k, renormalised to sum 1 (Qwen3-MoE's routing)."""
    logits = F.linear(x, gate_weight)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return logits, weights.to(logits.dtype), ids


def expert_counts(ids: torch.Tensor, num_experts: int, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Assignments per expert [E] (weighted per assignment when `weight` [T*k] is given), on the device."""
    flat = ids.reshape(-1)
    w = torch.ones_like(flat) if weight is None else weight
    return torch.zeros(num_experts, dtype=w.dtype, device=flat.device).scatter_add(0, flat, w)


def experts(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
            act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """sum_j weights[t, j] * expert_{ids[t, j]}(x[t]) for every token x [T, H]: the T * k assignments sorted by
    expert, two grouped GEMMs, and the weighted results added back to their tokens. Expert tensors given as
    DTensors sharded on dim 0 run expert-parallel (module docstring).

    No sum whose order the threads decide, forward or backward: the rows are x repeated k times then permuted
    (backward: the permutation undone, each element written once, then each token's k gradients summed by a
    reduction), and the results come back by the inverse permutation, each token summing its k in a fixed order.
    Gathering x[order // k] and adding back with index_add summed each token's k terms (and, in backward, its k
    gradients) by atomic adds in a compiled region (index_add on CUDA too), in an order that follows the threads:
    with k >= 3 the same step differed in the last bit from run to run."""
    top_k = ids.shape[-1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)                         # assignments grouped by expert
    counts = expert_counts(flat, gate_up.shape[0])
    rows = x[:, None, :].expand(-1, top_k, -1).reshape(-1, x.shape[-1])[order]
    if isinstance(gate_up, DTensor):
        y = expert_parallel(rows, counts, gate_up, down, act)
    else:
        y = _local_experts(rows, torch.cumsum(counts, 0).to(torch.int32), gate_up, down, act)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    y = y[inverse].view(-1, top_k, y.shape[-1])                      # [T, k, H]: each token's results
    return (y * weights[..., None].to(y.dtype)).sum(1).to(x.dtype)


def _local_experts(rows: torch.Tensor, offs: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                   act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The experts' MLP on rows grouped by expert (group boundaries `offs`): two grouped GEMMs."""
    h = grouped_mm(rows, gate_up.transpose(1, 2), offs)               # [N, 2I]
    gate, up = h.chunk(2, dim=-1)
    return grouped_mm(act(gate) * up, down.transpose(1, 2), offs)      # [N, H]


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits; its backward is the same exchange with the splits swapped."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group: dist.ProcessGroup
                ) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out = grad.new_empty(sum(ctx.in_splits), *grad.shape[1:])
        dist.all_to_all_single(out, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return out, None, None, None


def _sharded_dim(t: DTensor) -> int:
    dims = [i for i, p in enumerate(t.placements) if p.is_shard()]
    if len(dims) != 1 or t.placements[dims[0]].dim != 0:
        raise ValueError(f"expert parallelism needs the expert tensors sharded on dim 0 over one mesh dim, got "
                         f"placements {t.placements}")
    return dims[0]


def expert_parallel(rows: torch.Tensor, counts: torch.Tensor, gate_up: DTensor, down: DTensor,
                    act: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The experts' MLP on `rows` [N, H] (sorted by expert; `counts` [E] per expert, on the device) when this
    rank holds only experts [r * E/e, (r + 1) * E/e) of an EP group of e ranks: rows go to their owner and back.

    Returned in `rows`' order. The experts' gradients are this rank's experts' over every rank of the group's
    tokens (the all-to-all's backward brings them here); sharding.py reduces them over the EP groups.
    In a compiled region the exchange (`_dispatch`, `_combine`) runs eagerly: its split sizes are host ints. The
    region breaks its graph around the two (so it is compiled without fullgraph: sharding.make_block_call), and
    the grouped GEMMs between them are one graph over a dynamic row count.
    """
    received, offs, regroup, splits, gate_up_local, down_local = _dispatch(rows, counts, gate_up, down)
    if received.shape[0] == 0:  # no token chose this rank's experts: an empty result still on the graph of the
        # received rows and the experts, so that every rank runs the same collectives in backward (the all-to-all's,
        # and sharding's reduction of the (zero) expert gradients over the EP groups)
        y = received * 0 + 0 * (gate_up_local.sum() + down_local.sum()).to(received.dtype)
    else:
        y = _local_experts(received, offs, gate_up_local, down_local, act)
    return _combine(y, regroup, splits, gate_up)


@torch.compiler.disable
def _dispatch(rows: torch.Tensor, counts: torch.Tensor, gate_up: DTensor, down: DTensor
              ) -> tuple[torch.Tensor, ...]:
    """Rows to their expert's rank, regrouped there by local expert: (received rows [M, H] grouped by local
    expert, their group ends `offs`, the regrouping permutation, the split sizes [2, e] as a CPU tensor (send,
    receive: a tensor, so a compiled region passing it on does not specialise on its values), the local experts).
    Eager (torch.compiler.disable): the split sizes cost one host sync."""
    mesh_dim = _sharded_dim(gate_up)
    group, ep = gate_up.device_mesh.get_group(mesh_dim), gate_up.device_mesh.size(mesh_dim)
    local = counts.shape[0] // ep
    # recv[s, j]: rows rank s sends for this rank's local expert j (the counts travel on the device).
    recv = torch.empty_like(counts)
    dist.all_to_all_single(recv, counts.contiguous(), group=group)
    splits = torch.stack([counts.view(ep, local).sum(1), recv.view(ep, local).sum(1)]).to(torch.long).cpu()
    send_splits, recv_splits = splits.tolist()                        # the one host sync
    received = _AllToAll.apply(rows, recv_splits, send_splits, group)  # by source rank, then local expert
    # Regroup by local expert (a stable sort keeps each source's rows in order) for the grouped GEMMs.
    expert_of = torch.repeat_interleave(torch.arange(local, device=rows.device).repeat(ep), recv.to(torch.long),
                                        output_size=sum(recv_splits))
    regroup = torch.argsort(expert_of, stable=True)
    offs = torch.cumsum(recv.view(ep, local).sum(0), 0).to(torch.int32)
    received = received[regroup]
    for t in (received, regroup):  # the row count changes with every batch: one graph for all of them
        torch._dynamo.maybe_mark_dynamic(t, 0)
    return received, offs, regroup, splits, gate_up.to_local(), down.to_local()


@torch.compiler.disable
def _combine(y: torch.Tensor, regroup: torch.Tensor, splits: torch.Tensor, gate_up: DTensor) -> torch.Tensor:
    """The experts' outputs back to the received order and by the reverse all-to-all to their rows' rank."""
    group = gate_up.device_mesh.get_group(_sharded_dim(gate_up))
    send_splits, recv_splits = splits.tolist()                        # a CPU tensor: no sync
    y = torch.empty_like(y).index_copy(0, regroup, y)
    return _AllToAll.apply(y, send_splits, recv_splits, group)


def sparse_moe(x: torch.Tensor, gate_weight: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, top_k: int,
               act: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE MLP on x [..., H] -> (output like x, router stats [2, E]).

    Stats (for the load-balancing loss, summed over layers by the caller): row 0 the top-k assignments per expert
    and row 1 the router probabilities summed per expert, both over the real tokens (`mask`, x's leading shape,
    1 for real tokens, 0 for padding), as transformers' load_balancing_loss_func counts them with an attention mask.
    """
    shape = x.shape
    flat_x = x.reshape(-1, shape[-1])
    logits, weights, ids = route(flat_x, gate_weight, top_k)
    out = experts(flat_x, ids, weights, gate_up, down, act).view(shape)
    m = mask.reshape(-1).to(torch.float32)
    counts = expert_counts(ids, gate_weight.shape[0], m.repeat_interleave(top_k))
    probs = (torch.softmax(logits, dim=-1).float() * m[:, None]).sum(0)
    return out, torch.stack([counts, probs])


def load_balancing_loss(stats: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load-balancing loss as transformers defines it: E * sum_e f_e * P_e, where f_e is the
    share of top-k assignments and P_e the mean router probability of expert e, both over every MoE layer's real
    tokens. `stats` [2, E]: sparse_moe's stats summed over the layers; `rows`: real tokens x MoE layers."""
    num_experts = stats.shape[-1]
    return num_experts * torch.sum((stats[0] / rows) * (stats[1] / rows))


def max_expert_load(counts: torch.Tensor) -> torch.Tensor:
    """The busiest expert's share over the mean share, per layer (counts [..., E]): 1 is perfectly even, E means
    every assignment went to one expert."""
    return counts.amax(-1) / counts.mean(-1).clamp_min(1e-9)
