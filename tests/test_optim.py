"""The functional optimizer against torch.optim.AdamW + clip_grad_norm_ + LambdaLR, on a small MLP."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.utils._pytree as pytree
from torch import nn

from vlm_sft import optim, schedules, sharding
from vlm_sft.state import TrainState, init_train_state, leaf_names

STEPS = 50


class TinyMLP(nn.Module):
    """Several parameter shapes, including a 0-dim one."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(5, 16)
        self.norm = nn.LayerNorm(16)
        self.fc2 = nn.Linear(16, 3)
        self.gain = nn.Parameter(torch.tensor(1.5))

    def forward(self, x):
        return self.fc2(torch.tanh(self.norm(self.fc1(x)))) * self.gain


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A learnable target, so the gradient norm starts above the clip threshold and falls below it."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(5, 3, generator=g)
    xs = [torch.randn(16, 5, generator=g) for _ in range(n)]
    return [(x, 2.0 * torch.tanh(x @ w_true)) for x in xs]


def loss_of(model: nn.Module, params: dict | None, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    out = model(x) if params is None else torch.func.functional_call(model, params, (x,))
    return ((out - y) ** 2).mean()


def run_torch(model, data, *, lr, schedule, weight_decay, decay_mask=None, max_norm=1.0):
    """The reference: torch's own optimizer, clipping and scheduler; returns params and pre-clip grad norms."""
    named = dict(model.named_parameters())
    if decay_mask is None:
        groups = [{"params": list(named.values()), "weight_decay": weight_decay}]
    else:
        groups = [
            {"params": [p for k, p in named.items() if decay_mask[k]], "weight_decay": weight_decay},
            {"params": [p for k, p in named.items() if not decay_mask[k]], "weight_decay": 0.0},
        ]
    opt = torch.optim.AdamW(groups, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / lr)
    norms = []
    for x, y in data:
        opt.zero_grad()
        loss_of(model, None, x, y).backward()
        if max_norm > 0:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
        sched.step()
    return {k: v.detach().clone() for k, v in named.items()}, norms


def grads_of(model, params, x, y) -> dict[str, torch.Tensor]:
    live = {k: v.detach().requires_grad_() for k, v in params.items()}
    return dict(zip(live, torch.autograd.grad(loss_of(model, live, x, y), list(live.values()))))


def run_ours(model, params, data, tx):
    opt_state = tx.init(params)
    for x, y in data:
        updates, opt_state = tx.update(grads_of(model, params, x, y), opt_state, params)
        params = optim.apply_updates(params, updates)
    return params, opt_state


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_adamw_matches_torch_adamw_with_clipping_and_warmup_cosine(weight_decay):
    torch.manual_seed(0)
    model = TinyMLP()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = batches(STEPS)
    lr = schedules.warmup_cosine(3e-2, warmup_steps=5, total_steps=STEPS)

    want, norms = run_torch(model, data, lr=3e-2, schedule=lr, weight_decay=weight_decay)
    tx = optim.adamw(lr, weight_decay=weight_decay, max_grad_norm=1.0)
    got, opt_state = run_ours(model, params, data, tx)

    assert max(norms) > 1.0 > min(norms)  # clipping was active on some steps and not on others
    assert got.keys() == want.keys()
    # The two formulations round differently (torch decays by p * fp32(1 - lr*wd)); over 50 Adam steps that is
    # a few fp32 ulps, ~1e-6 on weights of size ~1.
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    moments = [leaf for leaf in pytree.tree_leaves(opt_state) if leaf.dim() > 0]
    assert all(leaf.dtype == torch.float32 for leaf in moments)


def test_adamw_weight_decay_mask_matches_torch_param_groups():
    torch.manual_seed(0)
    model = TinyMLP()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    decay_mask = {k: v.dim() >= 2 for k, v in params.items()}  # no decay on biases, norm and the scalar gain
    assert True in decay_mask.values() and False in decay_mask.values()
    data = batches(20)
    lr = schedules.constant(3e-2)

    want, _ = run_torch(model, data, lr=3e-2, schedule=lr, weight_decay=0.1, decay_mask=decay_mask)
    tx = optim.adamw(lr, weight_decay=0.1, mask=lambda p: {k: v.dim() >= 2 for k, v in p.items()}, max_grad_norm=1.0)
    got, _ = run_ours(model, params, data, tx)

    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=1e-6, msg=lambda m, k=k: f"{k}: {m}")


def test_adamw_weight_decay_is_unbiased_against_fp64_adamw():
    """torch rounds the decay factor (1 - lr*wd) to fp32, the same error every step (here 4.5e-6 after 50 steps
    on weights of size ~4); lr * wd * p has no such bias and stays within 2e-6 of AdamW in float64."""
    torch.manual_seed(0)
    model = TinyMLP()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4.0)  # large weights: decay rounding matters most here
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    data = batches(STEPS)
    lr = schedules.constant(1e-2)

    model64 = TinyMLP().double()
    model64.load_state_dict({k: v.double() for k, v in params.items()})
    data64 = [(x.double(), y.double()) for x, y in data]
    want, _ = run_torch(model64, data64, lr=1e-2, schedule=lr, weight_decay=0.01, max_norm=0.0)
    got, _ = run_ours(model, params, data, optim.adamw(lr, weight_decay=0.01))

    for k in want:
        torch.testing.assert_close(got[k].double(), want[k], atol=2e-6, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_clip_by_global_norm_matches_clip_grad_norm():
    g = torch.Generator().manual_seed(0)
    for scale in (10.0, 0.01):  # clipped, and left alone
        grads = {"a": scale * torch.randn(7, 3, generator=g), "b": scale * torch.randn(4, generator=g),
                 "c": scale * torch.randn((), generator=g)}
        ref = [nn.Parameter(torch.zeros_like(v)) for v in grads.values()]
        for p, v in zip(ref, grads.values()):
            p.grad = v.clone()
        norm = torch.nn.utils.clip_grad_norm_(ref, 1.0)

        clip = optim.clip_by_global_norm(1.0)
        out, _ = clip.update(grads, clip.init(grads))
        assert optim.global_norm(grads).dtype == torch.float32
        torch.testing.assert_close(optim.global_norm(grads), norm, atol=0, rtol=0)
        for p, v in zip(ref, out.values()):
            torch.testing.assert_close(v, p.grad, atol=0, rtol=0)
    noop = optim.clip_by_global_norm(0.0)
    out, _ = noop.update(grads, noop.init(grads))
    assert all(out[k] is grads[k] for k in grads)


def test_first_adam_step_is_the_gradient_sign():
    """At t=1 the bias-corrected moments are g and g^2, so the direction is g / (|g| + eps)."""
    grads = {"w": torch.tensor([[2.0, -0.5], [1e-3, -3.0]]), "s": torch.tensor(-4.0)}
    adam = optim.scale_by_adam(0.9, 0.999, 1e-8)
    direction, state = adam.update(grads, adam.init(grads))
    for k, g in grads.items():
        torch.testing.assert_close(direction[k], g / (g.abs() + 1e-8))
    assert state.count.dtype == torch.int64 and int(state.count) == 1
    torch.testing.assert_close(state.mu["w"], 0.1 * grads["w"])
    torch.testing.assert_close(state.nu["s"], torch.tensor(0.001 * 16.0))


def test_scale_by_learning_rate_uses_the_count_as_the_schedule_step():
    seen = []

    def schedule(count):
        seen.append(count.clone())
        return 0.5 * (count + 1).float()

    tx = optim.scale_by_learning_rate(schedule)
    updates = {"w": torch.ones(2)}
    state = tx.init(updates)
    for step in range(3):
        out, state = tx.update(updates, state)
        torch.testing.assert_close(out["w"], torch.full((2,), -0.5 * (step + 1)))
    assert [int(c) for c in seen] == [0, 1, 2]
    assert int(state.count) == 3


def test_opt_state_is_a_pytree_of_tensors():
    params = {"w": torch.randn(3, 2), "s": torch.tensor(0.5)}
    state = optim.adamw(schedules.warmup_cosine(1e-3, 2, 10), weight_decay=0.1, max_grad_norm=1.0).init(params)
    leaves = pytree.tree_leaves(state)
    assert leaves and all(isinstance(leaf, torch.Tensor) for leaf in leaves)
    doubled = pytree.tree_map(lambda t: t * 2, state)
    assert pytree.tree_structure(doubled) == pytree.tree_structure(state)


def test_train_state_is_a_pytree_over_params_and_adam_state():
    params = {"w": torch.randn(3, 2), "s": torch.tensor(0.5)}
    tx = optim.adamw(schedules.constant(1e-3), weight_decay=0.1, max_grad_norm=1.0)
    state = init_train_state(params, tx)
    assert state.step.dtype == torch.int64 and state.step.dim() == 0 and int(state.step) == 0

    moved = pytree.tree_map(lambda t: t + 1, state)
    assert isinstance(moved, TrainState) and int(moved.step) == 1
    assert isinstance(moved.opt_state[0].inner_state[1], optim.ScaleByAdamState)
    torch.testing.assert_close(moved.opt_state[0].inner_state[1].nu["w"], torch.ones(3, 2))

    names = leaf_names(state)
    assert len(names) == len(set(names)) == len(pytree.tree_leaves(state))
    assert names[:3] == ["step", "params['w']", "params['s']"]
    assert "opt_state[0].inner_state[1].mu['w']" in names


def test_update_compiles_fullgraph_matches_eager_and_never_recompiles():
    torch.manual_seed(0)
    model = TinyMLP()
    tx = optim.adamw(schedules.warmup_cosine(1e-2, 2, 6), weight_decay=0.01, max_grad_norm=1.0)

    def update(params, grads, opt_state):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optim.apply_updates(params, updates), opt_state

    compiled = torch.compile(update, fullgraph=True)
    eager_params = {k: v.detach().clone() for k, v in model.named_parameters()}
    comp_params = {k: v.clone() for k, v in eager_params.items()}
    eager_state, comp_state = tx.init(eager_params), tx.init(comp_params)
    torch._dynamo.reset()
    for i, (x, y) in enumerate(batches(4)):
        grads = grads_of(model, eager_params, x, y)
        eager_params, eager_state = update(eager_params, grads, eager_state)
        # The lr changes every step (a tensor computed from the count): no recompilation allowed after the first.
        with torch._dynamo.config.patch(error_on_recompile=i > 0):
            comp_params, comp_state = compiled(comp_params, grads, comp_state)
    for k in eager_params:
        torch.testing.assert_close(comp_params[k], eager_params[k], atol=1e-6, rtol=1e-6)
    for a, b in zip(pytree.tree_leaves(comp_state), pytree.tree_leaves(eager_state)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_non_finite_gradients_skip_the_update(bad):
    g = torch.Generator().manual_seed(0)
    params = {"w": torch.randn(4, 3, generator=g), "s": torch.randn((), generator=g)}
    good1 = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    good2 = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
    broken = {"w": good1["w"].clone(), "s": good1["s"].clone()}
    broken["w"][1, 2] = bad
    tx = optim.adamw(1e-2, weight_decay=0.01, max_grad_norm=1.0)

    def run(grad_seq):
        p, state = {k: v.clone() for k, v in params.items()}, tx.init(params)
        for grads in grad_seq:
            updates, state = tx.update(grads, state, p)
            p = optim.apply_updates(p, updates)
        return p, state

    skipped_p, skipped_state = run([good1, broken, good2])
    clean_p, clean_state = run([good1, good2])
    for k in params:
        assert torch.isfinite(skipped_p[k]).all()
        torch.testing.assert_close(skipped_p[k], clean_p[k], atol=0, rtol=0)
    inner, lr_state = skipped_state
    assert int(inner.total_notfinite) == 1 and bool(inner.last_finite)
    assert int(inner.inner_state[1].count) == 2  # Adam's bias-correction step did not advance
    assert int(lr_state.count) == 3  # the schedule follows the train step

    # Without skipping, torch's behaviour: NaNs reach the weights.
    raw = optim.adamw(1e-2, max_grad_norm=1.0, skip_nonfinite=False)
    updates, _ = raw.update(broken, raw.init(params), params)
    assert not torch.isfinite(optim.apply_updates(dict(params), updates, donate=False)["w"]).all()


def test_where_finite_selects_whole_trees_without_branching():
    new = (optim.ScaleByAdamState(torch.tensor(2), {"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)}),)
    old = (optim.ScaleByAdamState(torch.tensor(1), {"w": torch.zeros(2)}, {"w": torch.zeros(2)}),)
    kept = optim.where_finite(torch.tensor(False), new, old)
    taken = optim.where_finite(torch.tensor(True), new, old)
    assert isinstance(kept[0], optim.ScaleByAdamState)
    for a, b in zip(pytree.tree_leaves(kept), pytree.tree_leaves(old)):
        assert torch.equal(a, b)
    for a, b in zip(pytree.tree_leaves(taken), pytree.tree_leaves(new)):
        assert torch.equal(a, b)


def test_apply_updates_donates_or_copies():
    w = torch.ones(3, requires_grad=True)  # an autograd leaf, as the trainer's params are
    params = {"w": w, "h": torch.zeros(2, dtype=torch.bfloat16)}
    updates = {"h": torch.full((2,), 0.5), "w": torch.full((3,), 2.0)}  # other key order, fp32 for a bf16 param

    copied = optim.apply_updates(params, updates, donate=False)
    assert torch.equal(w.detach(), torch.ones(3)) and copied["w"].requires_grad
    assert copied["h"].dtype == torch.bfloat16 and torch.equal(copied["h"].float(), torch.full((2,), 0.5))

    donated = optim.apply_updates(params, updates)
    assert donated["w"] is w and torch.equal(w.detach(), torch.full((3,), 3.0))


def test_bad_configuration_is_rejected():
    with pytest.raises(ValueError, match="adam_beta"):
        optim.scale_by_adam(b1=1.0)
    params = {"w": torch.ones(2)}
    decay = optim.add_decayed_weights(0.1)
    with pytest.raises(ValueError, match="needs params"):
        decay.update(params, decay.init(params))
    masked = optim.add_decayed_weights(0.1, mask=lambda p: {"other": True})
    with pytest.raises(ValueError, match="mask"):
        masked.update(params, masked.init(params), params)
    adam = optim.scale_by_adam()
    with pytest.raises(ValueError, match="structure"):
        adam.update({"w": torch.ones(2), "extra": torch.ones(1)}, adam.init(params))


def _sharded_worker(rank: int, world: int, store_path: str, results: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        g = torch.Generator().manual_seed(0)
        full = {k: torch.randn(shape, generator=g) for k, shape in {"w": (6, 3), "b": (4,), "s": ()}.items()}
        grad_seq = [{k: 3 * torch.randn(v.shape, generator=g) for k, v in full.items()} for _ in range(4)]
        grad_seq[2]["w"][0, 0] = float("nan")

        def place(v):
            return distribute_tensor(v, mesh, [Replicate()] if v.dim() == 0 else [Shard(0)])

        tx = optim.adamw(schedules.warmup_cosine(1e-2, 2, 4), weight_decay=0.01, max_grad_norm=1.0)
        sharded = {k: place(v.clone()) for k, v in full.items()}
        donated = {k: place(v.clone()) for k, v in full.items()}  # tx.update_, in place
        fused = {k: place(v.clone()) for k, v in full.items()}  # the trainer's path: tx.update_fused
        plain = {k: v.clone() for k, v in full.items()}
        s_state, d_state, p_state = tx.init(sharded), tx.init(donated), tx.init(plain)
        f_state = tx.init(fused)
        for grads in grad_seq:
            f_state = tx.update_fused({k: place(v.clone()) for k, v in grads.items()}, f_state, fused)
            norm = optim.global_norm({k: place(v) for k, v in grads.items()})
            assert not isinstance(norm, DTensor)
            u, s_state = tx.update({k: place(v) for k, v in grads.items()}, s_state, sharded)
            sharded = optim.apply_updates(sharded, u)
            d_state = tx.update_({k: place(v.clone()) for k, v in grads.items()}, d_state, donated)  # donates
            u, p_state = tx.update(grads, p_state, plain)
            plain = optim.apply_updates(plain, u)
        # The donated update runs on the local shards when every leaf is sharded alike (no DTensor dispatch), and
        # keeps the DTensors when a leaf's shardings differ.
        local = optim._local_shards(list(donated.values()), [place(v) for v in full.values()])
        assert not any(isinstance(x, DTensor) for leaves in local for x in leaves)
        mixed = optim._local_shards([donated["w"]], [distribute_tensor(full["w"], mesh, [Replicate()])])
        assert all(isinstance(x, DTensor) for leaves in mixed for x in leaves)
        assert isinstance(sharded["w"], DTensor) and sharded["w"].placements == (Shard(0),)
        assert isinstance(donated["w"], DTensor) and donated["w"].placements == (Shard(0),)
        diff = max(float((sharded[k].full_tensor() - plain[k]).abs().max()) for k in full)
        diff = max([diff] + [float((donated[k].full_tensor() - plain[k]).abs().max()) for k in full])
        diff = max([diff] + [float((fused[k].full_tensor() - plain[k]).abs().max()) for k in full])
        assert isinstance(fused["w"], DTensor) and fused["w"].placements == (Shard(0),)
        skipped = int(s_state[0].total_notfinite) if int(d_state[0].total_notfinite) == int(
            s_state[0].total_notfinite) == int(f_state[0].total_notfinite) else -1
        if rank == 0:
            with open(results, "w") as f:
                f.write(f"{diff} {skipped}")
        dist.barrier()  # no rank tears gloo down while the other still talks to it (aborts otherwise)
    finally:
        dist.destroy_process_group()
    sharding.exit_process(0)  # not interpreter finalization: gloo's threads can abort it (see its docstring)


def test_adamw_on_sharded_dtensors_matches_plain_tensors(tmp_path):
    """Two gloo processes, Shard(0) params and grads: same result as one process, NaN step skipped on both, for the
    pure update, the donated one and the fused one."""
    results = str(tmp_path / "result.txt")
    mp.spawn(_sharded_worker, args=(2, str(tmp_path / "store"), results), nprocs=2)
    diff, skipped = open(results).read().split()
    assert float(diff) < 1e-6 and int(skipped) == 1


# The _foreach overloads that DTensor has sharding rules for in torch 2.11 (torch/distributed/tensor/_ops:
# _pointwise_ops.py's for_each_ops and for_each_linearity_ops, _math_ops.py's _foreach_norm), the oldest torch the
# trainer runs on (the lent GPU image of 2026-11 has 2.11). Torch 2.13 registers more (out-of-place
# _foreach_lerp among them), so a sharded run here passes with an op that fails there: "Operator
# aten._foreach_lerp.Scalar does not have a sharding strategy registered" on the first sharded GPU step.
DTENSOR_FOREACH_OPS_TORCH_2_11 = {
    "_foreach_abs.default", "_foreach_abs_.default", "_foreach_addcdiv_.Scalar", "_foreach_addcdiv_.ScalarList",
    "_foreach_addcdiv_.Tensor", "_foreach_addcmul.Scalar", "_foreach_addcmul_.Scalar",
    "_foreach_addcmul_.ScalarList", "_foreach_addcmul_.Tensor", "_foreach_clamp_max_.Scalar",
    "_foreach_clamp_min_.Scalar", "_foreach_div_.List", "_foreach_div_.Scalar", "_foreach_div_.ScalarList",
    "_foreach_div_.Tensor", "_foreach_div.List", "_foreach_div.Scalar", "_foreach_div.ScalarList",
    "_foreach_div.Tensor", "_foreach_lerp_.Scalar", "_foreach_maximum_.List", "_foreach_mul.Scalar",
    "_foreach_mul.ScalarList", "_foreach_mul.Tensor", "_foreach_mul.List", "_foreach_mul_.Scalar",
    "_foreach_mul_.ScalarList", "_foreach_mul_.Tensor", "_foreach_mul_.List", "_foreach_neg.default",
    "_foreach_neg_.default", "_foreach_reciprocal_.default", "_foreach_sub.Scalar", "_foreach_sub_.Scalar",
    "_foreach_sub.List", "_foreach_sub_.List", "_foreach_sub.ScalarList", "_foreach_sub_.ScalarList",
    "_foreach_sqrt.default", "_foreach_sqrt_.default", "_foreach_zero_.default", "_foreach_exp.default",
    "_foreach_exp_.default", "_foreach_add.Scalar", "_foreach_add_.Scalar", "_foreach_add_.ScalarList",
    "_foreach_add.List", "_foreach_add_.List", "_foreach_norm.Scalar",
}


def test_update_uses_only_foreach_ops_that_dtensor_shards_on_torch_2_11():
    """Every _foreach op of the full update (clip, Adam, decay mask, lr schedule and multipliers, skip-if-nonfinite,
    donated apply), pure and donated (update_), has a DTensor sharding rule on torch 2.11, so FSDP-sharded params update there too."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class RecordOps(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(f"{func._schema.name.split('::')[-1]}.{func._overloadname}")
            return func(*args, **(kwargs or {}))

    model = TinyMLP()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = optim.adamw(schedules.warmup_cosine(1e-2, 2, 10), weight_decay=0.01, max_grad_norm=1.0,
                     mask={k: v.ndim > 1 for k, v in params.items()},
                     lr_multipliers={k: (0.5 if k.startswith("fc1") else 1.0) for k in params})
    opt_state = tx.init(params)
    x, y = batches(1)[0]
    grads = grads_of(model, params, x, y)
    with RecordOps() as recorder:
        updates, opt_state = tx.update(grads, opt_state, params)
        optim.apply_updates(params, updates)
        tx.update_(grads, opt_state, params)
    foreach = {op for op in recorder.ops if op.startswith("_foreach")}
    assert {"_foreach_norm.Scalar", "_foreach_addcmul_.Scalar"} <= foreach  # the recorder saw the update
    assert foreach <= DTENSOR_FOREACH_OPS_TORCH_2_11, sorted(foreach - DTENSOR_FOREACH_OPS_TORCH_2_11)


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_donated_update_equals_the_pure_update_bit_for_bit(monkeypatch, grad_dtype):
    """tx.update_ (in place, chunked; what the trainer's eager step runs) == tx.update + apply_updates exactly:
    clipping on, a decay mask, per-module lr multipliers, a schedule, a NaN step skipped, chunks of a few leaves,
    a bf16 param, and bf16 grads."""
    monkeypatch.setattr(optim, "DONATED_CHUNK_NUMEL", 40)  # several chunks over these small leaves
    model = TinyMLP()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    params["fc2.bias"] = params["fc2.bias"].to(torch.bfloat16)
    tx = optim.adamw(schedules.warmup_cosine(1e-2, 2, 10), weight_decay=0.01, max_grad_norm=1.0,
                     mask={k: v.ndim > 1 for k, v in params.items()},
                     lr_multipliers={k: (0.5 if k.startswith("fc1") else 1.0) for k in params})
    g = torch.Generator().manual_seed(3)
    grad_seq = [{k: (3 * torch.randn(v.shape, generator=g)).to(grad_dtype) for k, v in params.items()}
                for _ in range(6)]
    grad_seq[3]["fc1.weight"][0, 0] = float("nan")

    pure, donated = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in params.items()}
    pure_state, donated_state = tx.init(pure), tx.init(donated)
    held = dict(donated)
    for grads in grad_seq:
        updates, pure_state = tx.update({k: v.clone() for k, v in grads.items()}, pure_state, pure)
        pure = optim.apply_updates(pure, updates)
        donated_state = tx.update_({k: v.clone() for k, v in grads.items()}, donated_state, donated)
    assert all(donated[k] is held[k] for k in params)  # written in place
    for k in params:
        assert torch.equal(donated[k], pure[k]), k
    assert pytree.tree_structure(donated_state) == pytree.tree_structure(pure_state)
    for a, b in zip(pytree.tree_leaves(donated_state), pytree.tree_leaves(pure_state)):
        assert torch.equal(a, b)
    assert int(donated_state[0].total_notfinite) == 1 and int(donated_state[0].inner_state[1].count) == 5


def test_the_train_step_updates_moments_in_place():
    """The eager step's update holds no second copy of the Adam moments: the state's moment tensors after a step
    are the ones it got (donated), and the values equal the pure update's."""
    from vlm_sft import step as step_lib

    model = TinyMLP()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = optim.adamw(1e-2, weight_decay=0.01, max_grad_norm=1.0)
    x, y = batches(1)[0]
    grads = grads_of(model, params, x, y)
    expected_updates, _ = tx.update({k: v.clone() for k, v in grads.items()}, tx.init(params), params)
    expected = optim.apply_updates({k: v.clone() for k, v in params.items()}, expected_updates, donate=False)
    # The foreach donated update (tx.update_) bit for bit; the fused one the step runs by default, to fp32 rounding.
    for fused in (False, True):
        state = TrainState(torch.zeros((), dtype=torch.int64), {k: v.clone() for k, v in params.items()},
                           tx.init(params))
        mu_before = dict(state.opt_state[0].inner_state[1].mu)
        apply_update = step_lib.make_apply_update(tx if fused else tx._replace(update_fused=None),
                                                  lambda step: torch.tensor(1e-2))
        new_state, metrics = apply_update(state, {k: v.clone() for k, v in grads.items()})
        mu_after = new_state.opt_state[0].inner_state[1].mu
        assert all(mu_after[k] is mu_before[k] for k in params)
        for k in params:
            if fused:
                torch.testing.assert_close(new_state.params[k], expected[k], rtol=1e-6, atol=1e-7)
            else:
                assert torch.equal(new_state.params[k], expected[k]), k
        assert float(metrics["train/skipped_update"]) == 0.0


def test_fused_update_equals_the_donated_update_within_fp32_rounding():
    """tx.update_fused (torch._fused_adamw_, what the trainer's step runs) == tx.update_ (foreach) to fp32
    rounding over several steps: clipping that binds and then does not, a decay mask, per-module lr multipliers,
    a warmup-cosine schedule, and a NaN step skipped on the device (count, skip counter and schedule as update_'s)."""
    model = TinyMLP()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = optim.adamw(schedules.warmup_cosine(1e-2, 2, 10), weight_decay=0.1, max_grad_norm=1.0,
                     mask={k: v.ndim > 1 for k, v in params.items()},
                     lr_multipliers={k: (0.5 if k.startswith("fc1") else 1.0) for k in params})
    g = torch.Generator().manual_seed(3)
    grad_seq = [{k: (s * torch.randn(v.shape, generator=g)) for k, v in params.items()}
                for s in (3.0, 3.0, 3.0, 3.0, 0.01, 0.01, 0.01)]
    grad_seq[3]["fc1.weight"][0, 0] = float("nan")
    fused, donated = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in params.items()}
    fused_state, donated_state = tx.init(fused), tx.init(donated)
    held = dict(fused)
    for grads in grad_seq:
        fused_state = tx.update_fused({k: v.clone() for k, v in grads.items()}, fused_state, fused)
        donated_state = tx.update_({k: v.clone() for k, v in grads.items()}, donated_state, donated)
    assert all(fused[k] is held[k] for k in params)  # written in place
    for k in params:
        torch.testing.assert_close(fused[k], donated[k], rtol=2e-6, atol=1e-7)
        assert not torch.equal(fused[k], params[k])
    assert pytree.tree_structure(fused_state) == pytree.tree_structure(donated_state)
    for a, b in zip(pytree.tree_leaves(fused_state), pytree.tree_leaves(donated_state)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-9)
    assert int(fused_state[0].total_notfinite) == 1 and int(fused_state[0].inner_state[1].count) == 6
    assert bool(fused_state[0].last_finite)
    assert int(fused_state[1].count) == 7


def test_fused_update_takes_gradients_laid_out_unlike_their_params():
    """A gradient that is a transposed view (as a stacked expert's can be) updates its param element by element
    like the foreach update_: the fused kernel pairs elements by memory order, so such a grad is made contiguous
    (without it Qwen3-VL-MoE on 2 ranks drifted from 1 rank by ~3e-3 in two steps)."""
    w = torch.randn(4, 6, 5, generator=torch.Generator().manual_seed(0))
    tx = optim.adamw(1e-2, weight_decay=0.1, max_grad_norm=1.0)
    fused, donated = {"w": w.clone()}, {"w": w.clone()}
    fused_state, donated_state = tx.init(fused), tx.init(donated)
    for seed in (1, 2):
        grad = torch.randn(4, 5, 6, generator=torch.Generator().manual_seed(seed)).transpose(1, 2)
        assert not grad.is_contiguous()
        fused_state = tx.update_fused({"w": grad.clone().transpose(1, 2).contiguous().transpose(1, 2)},
                                      fused_state, fused)
        donated_state = tx.update_({"w": grad.contiguous()}, donated_state, donated)
    torch.testing.assert_close(fused["w"], donated["w"], rtol=2e-6, atol=1e-7)


def test_fused_update_never_reads_the_gradient_norm_on_the_host_and_falls_back_for_bf16_params(monkeypatch):
    """The skip is the kernel's found_inf: no Tensor.item/__bool__ during update_fused. A bf16 master param is
    not the fused kernel's case: the update goes through update_ (same values bit for bit)."""
    model = TinyMLP()
    params = {k: v.detach().clone() for k, v in model.named_parameters()}
    tx = optim.adamw(1e-2, weight_decay=0.01, max_grad_norm=1.0)
    grads = {k: torch.randn(v.shape) for k, v in params.items()}
    state = tx.init(params)
    synced = []
    for name in ("item", "__bool__"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, **kw: synced.append(name) or _o(self))
    tx.update_fused({k: v.clone() for k, v in grads.items()}, state, params)
    monkeypatch.undo()
    assert synced == []
    params["fc2.bias"] = params["fc2.bias"].to(torch.bfloat16)
    a, b = {k: v.clone() for k, v in params.items()}, {k: v.clone() for k, v in params.items()}
    tx.update_fused({k: v.clone() for k, v in grads.items()}, tx.init(a), a)
    tx.update_({k: v.clone() for k, v in grads.items()}, tx.init(b), b)
    assert all(torch.equal(a[k], b[k]) for k in params)
