"""The training step: `train_step(state, micro_batches) -> (state, metrics)`, pure from the caller's side.

Loss (actor.loss_normalization): "tokens" (the config's default) is the mean cross-entropy over every answer
token of the global batch, across micro-batches and ranks, so packing, micro-batch size and world size leave the
gradient unchanged; "micro_batch" (RLinf's definition, this module's default) is each micro-batch's token mean,
averaged over micro-batches (and ranks), so a micro-batch with few answer tokens weighs as much as a long one.
The update is skipped (params and optimizer state unchanged, counted in metrics) when the gradient norm is not
finite. State buffers may
be updated in place (donation): callers must not keep using the state they passed in.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Collection, Sequence

import torch
from torch.distributed.tensor import DTensor

from vlm_sft import compile as compile_lib
from vlm_sft import models as model_lib
from vlm_sft import optim
from vlm_sft.state import TrainState
from vlm_sft.trainable import TrainPlan

Batch = dict[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]
# forward_aux outputs -> their metric names
AUX_METRICS = {"aux_loss": "train/aux_loss", "max_expert_load": "moe/max_expert_load"}
LOSS_NORMALIZATIONS = ("tokens", "micro_batch")


def make_loss_and_grad(model: model_lib.Model, block_call: model_lib.BlockCall = model_lib.plain_block_call,
                       trainable: Collection[str] | None = None, aux_loss_coef: float = 0.0,
                       aux: dict | None = None,
                       ) -> Callable[[dict, Batch, torch.Tensor], tuple[torch.Tensor, dict]]:
    """(params, micro_batch, scale) -> (token-mean loss, grads of (loss + aux_loss_coef * aux_loss) * scale).

    A family with a router (forward_aux's "aux_loss": the load-balancing loss) adds it with `aux_loss_coef` to the
    objective; the returned loss stays the answer cross-entropy. `aux`, when given, receives the micro-batch's
    detached aux outputs (aux loss, routing metrics) for logging.

    `trainable` (default: every leaf) names the leaves to differentiate; the grads dict holds only those. The
    others never get requires_grad, so autograd records nothing for a part whose leaves are all frozen (a frozen
    vision tower's backward is never run) and their gathers are never reduced.
    """

    # name -> (param, its detached leaf requiring grad). The update writes params in place (update_fused,
    # update_), so a step's params are the previous step's tensors: their leaves are reused (a leaf shares its
    # param's storage and version counter, so it holds the updated values) instead of one detach per param per
    # micro-batch. A param replaced by a new tensor gets a new leaf; the old entry is dropped at the next call.
    leaf_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def leaf(k: str, v: torch.Tensor) -> torch.Tensor:
        hit = leaf_cache.get(k)
        if hit is not None and hit[0] is v:
            return hit[1]
        out = v.detach().requires_grad_()
        leaf_cache[k] = (v, out)
        return out

    def loss_and_grad(params: dict, batch: Batch, scale: torch.Tensor) -> tuple[torch.Tensor, dict]:
        names = list(params) if trainable is None else [k for k in params if k in trainable]
        leaves = dict(params)
        leaves.update({k: leaf(k, params[k]) for k in names})
        nll, extra = model_lib.token_nll_aux(model, leaves, batch, block_call)
        loss = token_mean(nll, batch)
        objective = loss + aux_loss_coef * extra["aux_loss"] if aux_loss_coef and "aux_loss" in extra else loss
        if aux is not None:
            aux.clear()
            aux.update({k: v.detach() for k, v in extra.items()})
        # A leaf the batch does not reach (the vision tower, for a micro-batch without images) gets zeros.
        grads = torch.autograd.grad(objective * scale, [leaves[k] for k in names], allow_unused=True,
                                    materialize_grads=True)
        return loss.detach(), dict(zip(names, grads))

    return loss_and_grad


def token_mean(nll: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean NLL over the real label tokens: sum(w * nll) / sum(w) when the labels are padded to a static count
    (collate's label_weight; pads weigh 0), else the plain mean. Same value either way."""
    if "label_weight" not in batch:
        return nll.mean()
    w = batch["label_weight"]
    return (nll * w).sum() / w.sum().clamp(min=1)  # a padding-only micro-batch (packing.balance): 0


def label_tokens(batch: Batch) -> torch.Tensor:
    if "label_weight" in batch:
        return batch["label_weight"].sum()
    return torch.tensor(float(len(batch["label_ids"])))


def accumulate(grads: dict, g: dict) -> dict:
    """grads += g, leaf by leaf, in place: one foreach op over plain tensors (a step's second and later
    micro-batches), per leaf over DTensors (whose placements may differ between leaves)."""
    keys = list(grads)
    if any(isinstance(grads[k], DTensor) for k in keys):
        for k in keys:
            grads[k].add_(g[k])
    else:
        torch._foreach_add_([grads[k] for k in keys], [g[k] for k in keys])
    return grads


def make_apply_update(tx: optim.GradientTransformation, schedule: Callable[[torch.Tensor], torch.Tensor]
                      ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """(state, grads) -> (new state, update metrics). `tx` leaves params and moments untouched when the gradient
    norm is not finite (optim.adamw's skip_nonfinite); the skip is reported here."""

    def apply_update(state: TrainState, grads: dict) -> tuple[TrainState, Metrics]:
        grad_norm = optim.global_norm(grads)
        trained = {k: state.params[k] for k in grads}  # frozen leaves: not in grads, untouched
        if tx.update_fused is not None:  # one fused kernel per group, in place; the skip decided on the device
            opt_state = tx.update_fused(grads, state.opt_state, trained, grad_norm=grad_norm)
        elif tx.update_ is not None:  # donated: params, grads and moments written in place (no second copy)
            opt_state = tx.update_(grads, state.opt_state, trained, grad_norm=grad_norm)
        else:
            updates, opt_state = tx.update(grads, state.opt_state, trained)
            trained = optim.apply_updates(trained, updates)
        params = {k: trained.get(k, v) for k, v in state.params.items()}
        metrics = {"train/grad_norm": grad_norm, "train/learning_rate": schedule(state.step),
                   "train/skipped_update": (~torch.isfinite(grad_norm)).to(torch.float32)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return apply_update


def make_train_step(model: model_lib.Model, tx: optim.GradientTransformation,
                    schedule: Callable[[torch.Tensor], torch.Tensor], *, compile: bool = False,
                    block_call: model_lib.BlockCall = model_lib.plain_block_call,
                    trainable: Collection[str] | None = None, loss_normalization: str = "micro_batch",
                    world_size: int = 1, aux_loss_coef: float = 0.0,
                    ) -> Callable[..., tuple[TrainState, Metrics]]:
    """Build train_step(state, micro_batches, global_label_tokens=None) -> (state, metrics). `trainable`: the
    leaves that train (trainable.TrainPlan; default all); `tx` and the state's optimizer state cover exactly those.

    loss_normalization "tokens": each micro-batch's summed NLL is divided by `global_label_tokens`, the answer
    tokens of the whole global batch (packing.balance counts them across ranks; default: these micro-batches' own, right
    for one rank), times `world_size` because the sharded gathers average the gradients over ranks. "micro_batch":
    each micro-batch's mean over the micro-batches that hold labels.

    `aux_loss_coef`: weight of the router's load-balancing loss (MoE families), added to each micro-batch's loss
    before its scale above (so the step's aux term is the same weighted mean of the micro-batches' aux losses).
    Logged as train/aux_loss, with moe/max_expert_load, averaged over the micro-batches that hold tokens;
    train/loss stays the answer cross-entropy.

    compile=False runs eagerly. compile=True compiles by region (vlm_sft/compile.py): the model's regions through
    `block_call`, which must then be a compiling one (compile_lib.make_block_call or sharding.make_block_call with
    compile=True). Between the regions the step runs eagerly: the loop over blocks, torch.autograd.grad, the sum
    of the micro-batches' gradients, and the update (clipping + AdamW in place: tx.update_fused, torch's fused AdamW
    kernel on the local shards).
    Compile time therefore does not grow with depth or with the accumulation count. The update stays eager because
    compiled it is one graph over every param (824 tensors at the 3B's depth: inductor took over 10 CPU-minutes on
    it, measured on CPU with torch 2.13) and, over DTensors, it misses the on-disk caches in a restarted process.
    Text shapes are static per region, so batches should come padded to length buckets with a static label count
    (collate's length_buckets, pad_labels); the image regions take any image sizes. Every call that compiles
    something logs it (compile_lib.watch).
    """
    if loss_normalization not in LOSS_NORMALIZATIONS:
        raise ValueError(f"actor.loss_normalization={loss_normalization!r}: expected one of "
                         f"{list(LOSS_NORMALIZATIONS)}")
    if compile and getattr(block_call, "regions", None) is None:
        raise ValueError("make_train_step(compile=True) needs a compiling block_call "
                         "(sharding.make_block_call(..., compile=True) or compile.make_block_call(compile=True))")
    aux: dict = {}
    loss_and_grad = make_loss_and_grad(model, block_call, trainable, aux_loss_coef, aux)
    apply_update = make_apply_update(tx, schedule)
    calls = [0]

    def scope() -> contextlib.AbstractContextManager:
        calls[0] += 1
        if not compile:
            return contextlib.nullcontext()
        stack = contextlib.ExitStack()
        stack.enter_context(compile_lib.settings())
        regions = lambda: {fn for fn, _ in block_call.regions}  # noqa: E731  (regions appear as they are used)
        stack.enter_context(compile_lib.watch(f"train_step call {calls[0]}", regions))
        return stack

    def train_step(state: TrainState, micro_batches: Sequence[Batch | None],
                   global_label_tokens: float | None = None) -> tuple[TrainState, Metrics]:
        present = [b for b in micro_batches if b is not None]  # None: every row of a micro-batch was skipped
        if not present:
            raise ValueError("train_step got no micro-batch with rows (every row of the global batch was skipped)")
        counts = [label_tokens(b) for b in present]  # 0-dim tensors where the batch is: no host sync
        if loss_normalization == "tokens":
            total = sum(counts) if global_label_tokens is None else torch.tensor(float(global_label_tokens))
            # loss_and_grad differentiates the token mean: times its own count, over the global count.
            scales = [n * (world_size / total.clamp(min=1)) for n in counts]
        else:
            labelled = sum((n > 0).to(torch.float32) for n in counts)
            scales = [1.0 / labelled.clamp(min=1)] * len(present)
        grads, loss_sum, aux_sums = None, torch.zeros(()), {}
        with scope():
            for batch, scale in zip(present, scales):
                loss, g = loss_and_grad(state.params, batch, scale)
                grads = g if grads is None else accumulate(grads, g)
                loss_sum = loss_sum + loss * scale
                has_tokens = (batch["attention_mask"].sum() > 0).to(torch.float32)
                for k, v in aux.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + has_tokens * v
            state, metrics = apply_update(state, grads)
        with_tokens = sum((b["attention_mask"].sum() > 0).to(torch.float32) for b in present).clamp(min=1)
        metrics.update({AUX_METRICS.get(k, k): v / with_tokens for k, v in aux_sums.items()})
        tokens = sum(b["attention_mask"].sum() for b in present)
        metrics.update({
            "train/loss": loss_sum,
            "train/tokens": tokens.to(torch.float32),
            "train/label_tokens": sum(label_tokens(b) for b in present),
        })
        return state, metrics

    return train_step


def make_optimizer(config: Any, total_steps: int, plan: TrainPlan | None = None
                   ) -> tuple[optim.GradientTransformation, Callable]:
    """AdamW + global-norm clipping with the configured schedule over the plan's trained leaves (RLinf's single
    param group when there is no plan): per-leaf lr multipliers and weight-decay flags from the plan."""
    from vlm_sft import schedules

    o = config.actor.optim
    total = o.total_training_steps if o.total_training_steps > 0 else total_steps
    schedule = schedules.make_schedule(o.lr_scheduler, peak_lr=o.lr, warmup_steps=o.lr_warmup_steps,
                                       total_steps=total, min_lr=o.min_lr)
    mask = multipliers = None
    if plan is not None:
        if not all(plan.decay.values()):
            mask = dict(plan.decay)
        if any(m != 1.0 for m in plan.lr_multipliers.values()):
            multipliers = dict(plan.lr_multipliers)
    tx = optim.adamw(schedule, b1=o.adam_beta1, b2=o.adam_beta2, eps=o.adam_eps, weight_decay=o.weight_decay,
                     max_grad_norm=o.clip_grad, mask=mask, lr_multipliers=multipliers)
    return tx, schedule
