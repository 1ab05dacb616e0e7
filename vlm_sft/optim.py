"""Optax-style optimizer: pure `(init, update)` pairs over pytrees of tensors, composed with `chain`.

Why not `torch.optim`: a torch optimizer owns its parameters and mutates them behind the caller's back; the
trainer here is a pure `train_step(state, batch) -> state` over a params dict, so the optimizer must take the
params and its state as arguments and return new ones. Every transform is written with whole-tensor ops and
`torch._foreach_*` (no `.item()`, no Python branching on tensor values), so the same code runs on plain tensors
and on sharded DTensors, and traces under `torch.compile(fullgraph=True)`.

The math is `torch.optim.AdamW` + `torch.nn.utils.clip_grad_norm_` (tested against both to 1e-6 in fp32):
    g <- g * min(1, max_norm / (||g|| + 1e-6))
    m <- b1 m + (1 - b1) g;  v <- b2 v + (1 - b2) g^2;  t <- t + 1
    p <- p - lr(t-1) * (m / (1 - b1^t) / (sqrt(v) / sqrt(1 - b2^t) + eps) + wd * p)
The roundings differ in one place: torch decays by p * fp32(1 - lr*wd), whose factor carries the same rounding
error every step (e.g. 1 - 1e-7 rounds to 1 - 1.19e-7); lr * wd * p here has no such bias (tested against an
fp64 AdamW).

Memory: transforms are pure, so while `update` runs the old and the new Adam moments both exist, and eagerly
every intermediate is a full-size tensor list (at Qwen2.5-VL-3B on one H200 the pure eager update ran out of
139 GiB). `adamw(...).update_` is the same update with donated buffers, as JAX's donate_argnums: moments, params
and grads are written in place, chunk by chunk, so its temporaries are one chunk's; the trainer's eager step
uses it (step.make_apply_update), and tests hold it equal to `update` + `apply_updates`.
"""
from typing import Any, Callable, NamedTuple

import torch
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor, Partial, Replicate

Params = dict[str, torch.Tensor]
Updates = dict[str, torch.Tensor]
OptState = Any  # a pytree of tensors, NamedTuples, tuples and dicts
Schedule = Callable[[torch.Tensor], torch.Tensor]


class GradientTransformation(NamedTuple):
    """A pure optimizer piece: `init(params) -> state`, `update(updates, state, params) -> (updates, state)`.

    `update_` (optional): the same update with its buffers donated, `update_(updates, state, params) -> state`:
    params, updates and the state's tensors are written in place, so the step holds no second copy of the
    moments (see `adamw`). Same values as `update` followed by `apply_updates`.
    `update_fused` (optional): `update_`'s signature and donation, as one fused multi-tensor kernel per group of
    leaves where torch has one; equal to `update_` within fp32 rounding, and never syncs with the host.
    """

    init: Callable[[Params], OptState]
    update: Callable[[Updates, OptState, Params | None], tuple[Updates, OptState]]
    update_: Callable[..., OptState] | None = None
    update_fused: Callable[..., OptState] | None = None


class EmptyState(NamedTuple):
    """State of a stateless transform (a pytree with no leaves)."""


class ScaleByAdamState(NamedTuple):
    count: torch.Tensor  # int64 0-dim: updates applied so far (the bias-correction step)
    mu: Updates  # fp32 first moment
    nu: Updates  # fp32 second moment


class ScaleByScheduleState(NamedTuple):
    count: torch.Tensor  # int64 0-dim: the schedule's step for the next update


class ApplyIfFiniteState(NamedTuple):
    inner_state: OptState
    last_finite: torch.Tensor  # bool 0-dim: whether the last update was applied
    total_notfinite: torch.Tensor  # int64 0-dim: updates skipped so far


def _flatten(tree: Any) -> tuple[list[torch.Tensor], pytree.TreeSpec]:
    return pytree.tree_flatten(tree)


def _leaves_like(spec: pytree.TreeSpec, tree: Any, what: str) -> list[Any]:
    """Leaves of `tree` in the order of `spec` (dict keys are matched by name, not by insertion order)."""
    try:
        return spec.flatten_up_to(tree)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"optim: {what} does not have the structure of the updates: {e}") from None


def _device_of(tree: Any) -> torch.device:
    leaves = pytree.tree_leaves(tree)
    return leaves[0].device if leaves else torch.device("cpu")


def _counter(params: Params) -> torch.Tensor:
    return torch.zeros((), dtype=torch.int64, device=_device_of(params))


def _to_fp32(leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [x if x.dtype == torch.float32 else x.float() for x in leaves]


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Applies transforms in order; the state is the tuple of their states."""

    def init(params: Params) -> OptState:
        return tuple(t.init(params) for t in transforms)

    def update(updates: Updates, state: OptState, params: Params | None = None) -> tuple[Updates, OptState]:
        if len(state) != len(transforms):
            raise ValueError(f"optim.chain: state has {len(state)} entries for {len(transforms)} transforms")
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params)
            new_state.append(s)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def global_norm(tree: Any) -> torch.Tensor:
    """L2 norm of all leaves viewed as one vector, as an fp32 0-dim tensor (clip_grad_norm_'s reduction order).

    On DTensors the per-shard norms are combined across ranks and a plain (replicated) tensor is returned.
    """
    leaves = pytree.tree_leaves(tree)
    if not leaves:
        return torch.zeros((), dtype=torch.float32)
    first = leaves[0]
    if isinstance(first, DTensor) and all(isinstance(x, DTensor) for x in leaves):
        groups: dict[tuple, list] = {}
        for x in leaves:
            groups.setdefault((x.device_mesh, tuple(x.placements)), []).append(x)
        if len(groups) > 1:  # leaves on several meshes (expert parallelism): each group's norm, then theirs
            return torch.linalg.vector_norm(torch.stack([global_norm(g) for g in groups.values()]), 2)
    if isinstance(first, DTensor) and all(isinstance(x, DTensor) and x.device_mesh == first.device_mesh
                                          and x.placements == first.placements for x in leaves):
        # Sharded alike (as the trainer's grads): the shards' norms, without DTensor dispatch per leaf, reduced
        # over the sharded mesh dims by one 0-dim DTensor.
        norms = torch._foreach_norm([x._local_tensor for x in leaves], 2, dtype=torch.float32)
        local = torch.linalg.vector_norm(torch.stack(norms), 2)
        if not any(p.is_shard() for p in first.placements):
            return local
        partial = [Partial("sum") if p.is_shard() else Replicate() for p in first.placements]
        return DTensor.from_local(local.square(), first.device_mesh, partial, run_check=False).full_tensor().sqrt()
    norms = torch._foreach_norm(leaves, 2, dtype=torch.float32)
    total = torch.linalg.vector_norm(torch.stack(norms), 2)
    if isinstance(total, DTensor):  # sharded leaves: reduce the per-shard norms over the mesh
        total = total.full_tensor()
    return total


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scales updates by min(1, max_norm / (norm + 1e-6)) as clip_grad_norm_ does; a no-op when max_norm <= 0."""

    def init(params: Params) -> OptState:
        return EmptyState()

    def update(updates: Updates, state: OptState, params: Params | None = None) -> tuple[Updates, OptState]:
        if max_norm <= 0:
            return updates, state
        leaves, spec = _flatten(updates)
        if not leaves:
            return updates, state
        coef = torch.clamp(max_norm / (global_norm(updates) + 1e-6), max=1.0)
        return pytree.tree_unflatten(torch._foreach_mul(leaves, coef), spec), state

    return GradientTransformation(init, update)


def _bias_corrections(count: torch.Tensor, b1: float, b2: float) -> tuple[torch.Tensor, torch.Tensor]:
    """1 / (1 - b1^t) and sqrt(1 - b2^t) at t = count, in float64 (torch.optim computes them as Python floats):
    in fp32, 1 - 0.999^t loses ~1e-5 of its value to cancellation at small t."""
    t = count.to(torch.float64)
    return (1.0 / (1.0 - torch.pow(b1, t))).to(torch.float32), torch.sqrt(1.0 - torch.pow(b2, t)).to(torch.float32)


def _scheduled_lr(learning_rate: float | Schedule, count: torch.Tensor) -> torch.Tensor | float:
    """The lr at schedule step `count`: a tensor for a schedule (a changing lr never recompiles), else a float."""
    if callable(learning_rate):
        return torch.as_tensor(learning_rate(count), dtype=torch.float32, device=count.device)
    return float(learning_rate)


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction m_hat / (sqrt(v_hat) + eps), with moments and bias correction as torch.optim.Adam."""
    if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
        raise ValueError(f"optim: adam betas must be in [0, 1), got ({b1}, {b2}) (actor.optim.adam_beta1/2)")
    if eps < 0:
        raise ValueError(f"optim: adam eps must be >= 0, got {eps} (actor.optim.adam_eps)")

    def init(params: Params) -> OptState:
        zeros = lambda p: torch.zeros_like(p, dtype=torch.float32)  # noqa: E731
        return ScaleByAdamState(_counter(params), pytree.tree_map(zeros, params), pytree.tree_map(zeros, params))

    def update(updates: Updates, state: OptState, params: Params | None = None) -> tuple[Updates, OptState]:
        g, spec = _flatten(updates)
        g = _to_fp32(g)
        # b1 * mu + (1 - b1) * g as mul + add_: DTensor registers no out-of-place _foreach_lerp before torch 2.13,
        # and every op here must have a sharding rule on the oldest torch we run on (tests/test_optim.py checks).
        mu = torch._foreach_mul(_leaves_like(spec, state.mu, "adam mu"), b1)
        torch._foreach_add_(mu, g, alpha=1.0 - b1)
        nu = torch._foreach_mul(_leaves_like(spec, state.nu, "adam nu"), b2)
        torch._foreach_addcmul_(nu, g, g, value=1.0 - b2)
        count = state.count + 1
        inv_bc1, bc2_sqrt = _bias_corrections(count, b1, b2)
        denom = torch._foreach_sqrt(nu)
        torch._foreach_div_(denom, bc2_sqrt)
        torch._foreach_add_(denom, eps)
        direction = torch._foreach_div(mu, denom)
        torch._foreach_mul_(direction, inv_bc1)
        return (
            pytree.tree_unflatten(direction, spec),
            ScaleByAdamState(count, pytree.tree_unflatten(mu, spec), pytree.tree_unflatten(nu, spec)),
        )

    return GradientTransformation(init, update)


def add_decayed_weights(
    weight_decay: float, mask: Callable[[Params], Any] | Any | None = None
) -> GradientTransformation:
    """Adds weight_decay * param to each update (decoupled decay once scaled by -lr, as AdamW).

    `mask(params)` (or a ready tree) gives one Python bool per param: True decays it. Masks are static, so each
    mask is a different compiled graph, never a branch on tensor values.
    """

    def init(params: Params) -> OptState:
        return EmptyState()

    def update(updates: Updates, state: OptState, params: Params | None = None) -> tuple[Updates, OptState]:
        if weight_decay == 0:
            return updates, state
        if params is None:
            raise ValueError("optim.add_decayed_weights: update() needs params (weight decay is wd * param)")
        leaves, spec = _flatten(updates)
        p = _leaves_like(spec, params, "params")
        if mask is None:
            keep = [True] * len(leaves)
        else:
            keep = _leaves_like(spec, mask(params) if callable(mask) else mask, "the weight decay mask")
            bad = [k for k in keep if not isinstance(k, bool)]
            if bad:
                raise ValueError(f"optim.add_decayed_weights: mask values must be Python bools, got {bad[0]!r}")
        idx = [i for i, k in enumerate(keep) if k]
        out = list(leaves)
        if idx:
            decayed = torch._foreach_add([leaves[i] for i in idx], [p[i] for i in idx], alpha=weight_decay)
            for i, d in zip(idx, decayed):
                out[i] = d
        return pytree.tree_unflatten(out, spec), state

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: float | Schedule, multipliers: Any | None = None
                           ) -> GradientTransformation:
    """Multiplies updates by -lr, lr = learning_rate(count) for a schedule (count = updates applied so far).

    The lr is a tensor computed from the state's count, so a changing lr never recompiles a compiled step.
    `multipliers`: a tree of Python floats like the updates (per-module learning rates: each leaf's lr is
    lr * its factor); leaves sharing a factor are scaled by one foreach call. Static, like weight-decay masks.
    """

    def init(params: Params) -> OptState:
        return ScaleByScheduleState(_counter(params))

    def update(updates: Updates, state: OptState, params: Params | None = None) -> tuple[Updates, OptState]:
        leaves, spec = _flatten(updates)
        lr = _scheduled_lr(learning_rate, state.count)
        if multipliers is None:
            scaled = torch._foreach_mul(leaves, -lr)
        else:
            factors = _leaves_like(spec, multipliers, "the lr multipliers")
            scaled = list(leaves)
            for factor in sorted(set(factors)):
                idx = [i for i, f in enumerate(factors) if f == factor]
                for i, out in zip(idx, torch._foreach_mul([leaves[i] for i in idx], -lr * factor)):
                    scaled[i] = out
        return pytree.tree_unflatten(scaled, spec), ScaleByScheduleState(state.count + 1)

    return GradientTransformation(init, update)


def where_finite(ok: torch.Tensor, new_tree: Any, old_tree: Any) -> Any:
    """Leafwise `ok ? new : old` without a branch (ok: bool 0-dim tensor), for skipping a non-finite update."""
    return pytree.tree_map(lambda new, old: torch.where(ok, new, old), new_tree, old_tree)


def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Runs `inner`, but when the updates' global norm is inf/nan returns zero updates and inner's old state.

    A norm that overflows fp32 counts as non-finite too (RLinf tests clip_grad_norm_'s total norm the same way).
    The state keeps `last_finite` and `total_notfinite` (for logging skipped updates).
    """

    def init(params: Params) -> OptState:
        return ApplyIfFiniteState(
            inner.init(params), torch.ones((), dtype=torch.bool, device=_device_of(params)), _counter(params)
        )

    def update(updates: Updates, state: OptState, params: Params | None = None) -> tuple[Updates, OptState]:
        ok = torch.isfinite(global_norm(updates))
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        return (
            pytree.tree_map(lambda u: torch.where(ok, u, 0.0), new_updates),
            ApplyIfFiniteState(
                where_finite(ok, new_inner, state.inner_state),
                ok,
                state.total_notfinite + (~ok).to(torch.int64),
            ),
        )

    return GradientTransformation(init, update)


def adamw(
    learning_rate: float | Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: Callable[[Params], Any] | Any | None = None,
    max_grad_norm: float = 0.0,
    skip_nonfinite: bool = True,
    lr_multipliers: Any | None = None,
) -> GradientTransformation:
    """clip_grad_norm_(max_grad_norm) + torch.optim.AdamW, one pure transform.

    Parameter groups (optax's multi_transform, reduced to what differs between groups here): `mask` decides weight
    decay per leaf and `lr_multipliers` (a tree of floats) the lr factor per leaf; the Adam moments are the same
    transform for every group, so the state is one tree. Frozen leaves are simply not in the trees.

    skip_nonfinite: an update whose gradient norm is inf/nan leaves params and Adam moments untouched (RLinf
    skips such steps; torch.optim would write NaNs). The lr schedule still advances, so the lr stays a
    function of the train step.
    """
    inner = chain(
        clip_by_global_norm(max_grad_norm), scale_by_adam(b1, b2, eps), add_decayed_weights(weight_decay, mask)
    )
    if skip_nonfinite:
        inner = apply_if_finite(inner)
    tx = chain(inner, scale_by_learning_rate(learning_rate, lr_multipliers))
    donated = _adamw_donated(learning_rate, b1, b2, eps, weight_decay, mask, max_grad_norm, skip_nonfinite,
                             lr_multipliers)
    fused = _adamw_fused(learning_rate, b1, b2, eps, weight_decay, mask, max_grad_norm, skip_nonfinite,
                         lr_multipliers, donated)
    return GradientTransformation(tx.init, tx.update, donated, fused)


# Leaves are updated in groups of at most this many elements, so the donated update's temporaries (the fp32
# gradient of a bf16 grad, sqrt(v) + eps, the direction) are one group's, not the whole model's.
DONATED_CHUNK_NUMEL = 1 << 27


def _local_numel(x: torch.Tensor) -> int:
    return x.to_local().numel() if isinstance(x, DTensor) else x.numel()


def _chunks(leaves: list[torch.Tensor], max_numel: int) -> list[list[int]]:
    groups, current, size = [], [], 0
    for i, x in enumerate(leaves):
        n = _local_numel(x)
        if current and size + n > max_numel:
            groups.append(current)
            current, size = [], 0
        current.append(i)
        size += n
    return groups + ([current] if current else [])


def _local_shards(*leaf_lists: list[torch.Tensor]) -> tuple[list[torch.Tensor], ...]:
    """The local shards of DTensor leaves when, leaf by leaf, every list holds them with the same mesh and
    placements (params, grads and moments as the trainer shards them); else the lists unchanged.

    The donated update is elementwise per leaf, so on matching shards it is the same computation without DTensor's
    dispatch: its first foreach call over the 3B's 824 leaves spent ~10 s propagating shardings (py-spy, CPU).
    Writing into a local shard writes the DTensor (to_local under no_grad is the shard itself).
    """
    for leaves in zip(*leaf_lists):
        first = leaves[0]
        if not isinstance(first, DTensor):
            if any(isinstance(x, DTensor) for x in leaves):
                return leaf_lists
            continue
        if not all(isinstance(x, DTensor) and x.device_mesh == first.device_mesh
                   and x.placements == first.placements for x in leaves):
            return leaf_lists
    return tuple([x.to_local() if isinstance(x, DTensor) else x for x in leaves] for leaves in leaf_lists)


def _adamw_donated(learning_rate, b1, b2, eps, weight_decay, mask, max_grad_norm, skip_nonfinite, lr_multipliers):
    """`adamw`'s update with donated buffers: the same ops as the chain, in the same order, written in place.

    The skip of a non-finite update is decided on the host (one sync), which is why it is the eager step's path
    and the pure `update` stays the one to trace. The state has exactly the chain's structure, so checkpoints do
    not care which path wrote them.
    """

    @torch.no_grad()
    def update_(updates: Updates, state: OptState, params: Params, grad_norm: torch.Tensor | None = None
                ) -> OptState:
        g, spec = _flatten(updates)
        p = _leaves_like(spec, params, "params")
        outer_state, sched_state = state
        finite_state = outer_state if skip_nonfinite else None
        inner_state = outer_state.inner_state if skip_nonfinite else outer_state
        if len(inner_state) != 3:
            raise ValueError(f"optim.adamw: state has {len(inner_state)} inner entries for 3 transforms")
        _, adam_state, _ = inner_state
        lr = _scheduled_lr(learning_rate, sched_state.count)
        new_sched = ScaleByScheduleState(sched_state.count + 1)
        norm = global_norm(updates) if grad_norm is None else grad_norm
        ok = torch.isfinite(norm)
        if skip_nonfinite and not bool(ok):  # params and moments untouched; the schedule still advances
            return (ApplyIfFiniteState(inner_state, ok, finite_state.total_notfinite + 1), new_sched)

        mu = _leaves_like(spec, adam_state.mu, "adam mu")
        nu = _leaves_like(spec, adam_state.nu, "adam nu")
        count = adam_state.count + 1
        inv_bc1, bc2_sqrt = _bias_corrections(count, b1, b2)
        coef = torch.clamp(max_grad_norm / (norm + 1e-6), max=1.0) if max_grad_norm > 0 else None
        if weight_decay == 0:
            decay = [False] * len(g)
        elif mask is None:
            decay = [True] * len(g)
        else:
            decay = _leaves_like(spec, mask(params) if callable(mask) else mask, "the weight decay mask")
        factors = None if lr_multipliers is None else _leaves_like(spec, lr_multipliers, "the lr multipliers")

        g, p, mu, nu = _local_shards(g, p, mu, nu)
        for idx in _chunks(g, DONATED_CHUNK_NUMEL):
            gc = [g[i] for i in idx]
            if coef is not None and all(x.dtype == torch.float32 for x in gc):
                torch._foreach_mul_(gc, coef)  # the donated grads
            elif coef is not None:  # as the pure clip: a bf16 0-dim grad times the fp32 coef promotes to fp32
                gc = torch._foreach_mul(gc, coef)
            gc = _to_fp32(gc)
            m, v = [mu[i] for i in idx], [nu[i] for i in idx]
            torch._foreach_mul_(m, b1)
            torch._foreach_add_(m, gc, alpha=1.0 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, gc, gc, value=1.0 - b2)
            del gc
            denom = torch._foreach_sqrt(v)
            torch._foreach_div_(denom, bc2_sqrt)
            torch._foreach_add_(denom, eps)
            direction = torch._foreach_div(m, denom)
            del denom
            torch._foreach_mul_(direction, inv_bc1)
            decayed = [j for j, i in enumerate(idx) if decay[i]]
            if decayed:
                torch._foreach_add_([direction[j] for j in decayed], [p[idx[j]] for j in decayed], alpha=weight_decay)
            if factors is None:
                torch._foreach_mul_(direction, -lr)
            else:
                for factor in sorted({factors[i] for i in idx}):
                    torch._foreach_mul_([d for d, i in zip(direction, idx) if factors[i] == factor], -lr * factor)
            torch._foreach_add_([p[i] for i in idx], direction)

        new_adam = ScaleByAdamState(count, adam_state.mu, adam_state.nu)
        new_inner = (inner_state[0], new_adam, inner_state[2])
        if skip_nonfinite:
            return (ApplyIfFiniteState(new_inner, ok, finite_state.total_notfinite), new_sched)
        return (new_inner, new_sched)

    return update_


def _fusable(p: list[torch.Tensor], mu: list[torch.Tensor], nu: list[torch.Tensor]) -> bool:
    """Whether torch's fused AdamW kernel takes these local leaves: fp32 params and moments on one CPU/CUDA
    device (grads are cast to fp32 first when they are not)."""
    if not hasattr(torch, "_fused_adamw_") or not p:
        return False
    device = p[0].device
    return device.type in ("cpu", "cuda") and all(
        x.dtype == torch.float32 and x.device == device and not isinstance(x, DTensor) and x.is_contiguous()
        for x in (*p, *mu, *nu))


def _adamw_fused(learning_rate, b1, b2, eps, weight_decay, mask, max_grad_norm, skip_nonfinite, lr_multipliers,
                 donated):
    """`adamw`'s donated update as `torch._fused_adamw_` (torch.optim.AdamW(fused=True)'s kernel): one kernel over
    each group of leaves sharing a weight-decay flag and lr factor, on the local shards, instead of ~12 foreach
    passes over every leaf (the 3B's update: 140 -> 45 ms on CPU; on a GPU ~4x fewer bytes through memory).

    Clipping is the kernel's grad_scale (g / max(1, (norm + 1e-6) / max_norm), the clip coefficient's inverse)
    and the non-finite skip its found_inf: decided on the device, so the step never waits for the gradient norm.
    The Adam count advances only when the update is applied (count + finite), as the chain's. Roundings differ from
    `update_` in the last bits (the kernel's fp32 bias corrections, decay as p - lr*wd*p inside the kernel);
    tests hold the two equal over several steps. Leaves the kernel does not take (bf16 master params, DTensors
    sharded unlike their moments, other devices) go through `donated` (`update_`), which syncs for the skip.
    """

    @torch.no_grad()
    def update_fused(updates: Updates, state: OptState, params: Params, grad_norm: torch.Tensor | None = None
                     ) -> OptState:
        g, spec = _flatten(updates)
        p = _leaves_like(spec, params, "params")
        outer_state, sched_state = state
        inner_state = outer_state.inner_state if skip_nonfinite else outer_state
        if len(inner_state) != 3:
            raise ValueError(f"optim.adamw: state has {len(inner_state)} inner entries for 3 transforms")
        _, adam_state, _ = inner_state
        mu = _leaves_like(spec, adam_state.mu, "adam mu")
        nu = _leaves_like(spec, adam_state.nu, "adam nu")
        lg, lp, lmu, lnu = _local_shards(g, p, mu, nu)
        if not _fusable(lp, lmu, lnu) or any(isinstance(x, DTensor) for x in lg):
            return donated(updates, state, params, grad_norm=grad_norm)

        norm = global_norm(updates) if grad_norm is None else grad_norm
        device = lp[0].device
        ok = torch.isfinite(norm).to(device)
        found_inf = (~ok).to(torch.float32) if skip_nonfinite else None
        grad_scale = None
        if max_grad_norm > 0:
            grad_scale = torch.clamp((norm.to(device, torch.float32) + 1e-6) / max_grad_norm, min=1.0)
        lr = _scheduled_lr(learning_rate, sched_state.count)
        lr = lr.to(device) if isinstance(lr, torch.Tensor) else torch.tensor(lr, dtype=torch.float32, device=device)
        step = (adam_state.count + 1).to(device, torch.float32)  # the kernel reads t, computes 1 - b^t itself
        # The kernel pairs the elements of a param and its grad by memory order: a grad laid out otherwise (a
        # reduce-scattered shard's view, a transposed expert gradient) must be made contiguous first.
        lg = [(x if x.dtype == torch.float32 else x.float()).contiguous() for x in lg]

        if weight_decay == 0:
            decay = [False] * len(g)
        elif mask is None:
            decay = [True] * len(g)
        else:
            decay = _leaves_like(spec, mask(params) if callable(mask) else mask, "the weight decay mask")
        factors = [1.0] * len(g) if lr_multipliers is None else _leaves_like(spec, lr_multipliers,
                                                                             "the lr multipliers")
        groups: dict[tuple[bool, float], list[int]] = {}
        for i, key in enumerate(zip(decay, factors)):
            groups.setdefault(key, []).append(i)
        for (decayed, factor), idx in groups.items():
            torch._fused_adamw_(
                [lp[i] for i in idx], [lg[i] for i in idx], [lmu[i] for i in idx], [lnu[i] for i in idx], [],
                [step] * len(idx), lr=lr if factor == 1.0 else lr * factor, beta1=b1, beta2=b2,
                weight_decay=weight_decay if decayed else 0.0, eps=eps, amsgrad=False, maximize=False,
                grad_scale=grad_scale, found_inf=found_inf)

        applied = ok if skip_nonfinite else torch.ones_like(ok)
        new_adam = ScaleByAdamState(adam_state.count + applied.to(adam_state.count.device, torch.int64),
                                    adam_state.mu, adam_state.nu)
        new_inner = (inner_state[0], new_adam, inner_state[2])
        new_sched = ScaleByScheduleState(sched_state.count + 1)
        if skip_nonfinite:
            finite = ok.to(outer_state.last_finite.device)
            return (ApplyIfFiniteState(new_inner, finite,
                                       outer_state.total_notfinite + (~finite).to(torch.int64)), new_sched)
        return (new_inner, new_sched)

    return update_fused


def apply_updates(params: Params, updates: Updates, *, donate: bool = True) -> Params:
    """params + updates, cast back to each param's dtype.

    donate=True (default) writes into the params' storage, like jax.jit's donate_argnums: no second copy of the
    weights, but the caller's old params dict now holds the new values (do not keep it as the "previous" state).
    It runs under no_grad, so params may be autograd leaves. donate=False returns new tensors.
    """
    p, spec = _flatten(params)
    u = _leaves_like(spec, updates, "updates")
    if not p:
        return params
    with torch.no_grad():
        if donate:
            torch._foreach_add_(p, u)
            return pytree.tree_unflatten(p, spec)
        new = [(pi + ui).to(pi.dtype) for pi, ui in zip(p, u)]
    return pytree.tree_unflatten([n.requires_grad_(pi.requires_grad) for n, pi in zip(new, p)], spec)
