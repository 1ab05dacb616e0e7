"""The training step: `train_step(state, micro_batches) -> (state, metrics)`, pure from the caller's side.

Loss (RLinf's definition): token-mean cross-entropy over the answer tokens of each micro-batch, divided by the
number of micro-batches, so the step's gradient is the mean of the micro-batch gradients. The update is skipped
(params and optimizer state unchanged, counted in metrics) when the gradient norm is not finite. State buffers may
be updated in place (donation): callers must not keep using the state they passed in.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Collection, Sequence

import torch
import torch.utils._pytree as pytree
from absl import logging

from vlm_sft import models as model_lib
from vlm_sft import optim
from vlm_sft.state import TrainState
from vlm_sft.trainable import TrainPlan

Batch = dict[str, torch.Tensor]
Metrics = dict[str, torch.Tensor]


def make_loss_and_grad(model: model_lib.Model, block_call: model_lib.BlockCall = model_lib.plain_block_call,
                       trainable: Collection[str] | None = None,
                       ) -> Callable[[dict, Batch, torch.Tensor], tuple[torch.Tensor, dict]]:
    """(params, micro_batch, scale) -> (token-mean loss, grads of loss * scale).

    `trainable` (default: every leaf) names the leaves to differentiate; the grads dict holds only those. The
    others never get requires_grad, so autograd records nothing for a part whose leaves are all frozen (a frozen
    vision tower's backward is never run) and their gathers are never reduced.
    """

    def loss_and_grad(params: dict, batch: Batch, scale: torch.Tensor) -> tuple[torch.Tensor, dict]:
        names = list(params) if trainable is None else [k for k in params if k in trainable]
        leaves = dict(params)
        leaves.update({k: params[k].detach().requires_grad_() for k in names})
        loss = token_mean(model_lib.token_nll(model, leaves, batch, block_call), batch)
        grads = torch.autograd.grad(loss * scale, [leaves[k] for k in names])
        return loss.detach(), dict(zip(names, grads))

    return loss_and_grad


def token_mean(nll: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean NLL over the real label tokens: sum(w * nll) / sum(w) when the labels are padded to a static count
    (collate's label_weight; pads weigh 0), else the plain mean. Same value either way."""
    if "label_weight" not in batch:
        return nll.mean()
    w = batch["label_weight"]
    return (nll * w).sum() / w.sum()


def label_tokens(batch: Batch) -> torch.Tensor:
    if "label_weight" in batch:
        return batch["label_weight"].sum()
    return torch.tensor(float(len(batch["label_ids"])))


def make_apply_update(tx: optim.GradientTransformation, schedule: Callable[[torch.Tensor], torch.Tensor]
                      ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """(state, grads) -> (new state, update metrics). `tx` leaves params and moments untouched when the gradient
    norm is not finite (optim.adamw's skip_nonfinite); the skip is reported here."""

    def apply_update(state: TrainState, grads: dict) -> tuple[TrainState, Metrics]:
        grad_norm = optim.global_norm(grads)
        trained = {k: state.params[k] for k in grads}  # frozen leaves: not in grads, untouched
        updates, opt_state = tx.update(grads, state.opt_state, trained)
        trained = optim.apply_updates(trained, updates)
        params = {k: trained.get(k, v) for k, v in state.params.items()}
        metrics = {"train/grad_norm": grad_norm, "train/learning_rate": schedule(state.step),
                   "train/skipped_update": (~torch.isfinite(grad_norm)).to(torch.float32)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return apply_update


COMPILE_MODES = ("whole", "split")
RECOMPILE_LIMIT = 64  # compiled graphs per function: (length bucket x label bucket x image layout) combinations


def default_compile_mode() -> str:
    """"whole" where the installed torch's dynamo can trace torch.autograd.grad into the graph (it has
    torch._dynamo.config.trace_autograd_ops; 2.13 does), else "split": loss-and-grad compiled with a graph break at
    autograd.grad, and the update compiled apart."""
    return "whole" if hasattr(torch._dynamo.config, "trace_autograd_ops") else "split"


def _compile_config(mode: str) -> contextlib.AbstractContextManager:
    """Dynamo settings for calls of the compiled step, scoped to the call (no global state is changed)."""
    options = {"recompile_limit": RECOMPILE_LIMIT}
    if mode == "whole":
        options["trace_autograd_ops"] = True
    return torch._dynamo.config.patch(**options)


# Batch dims that follow the images (patch, window and frame counts): marked dynamic for the compiled step, so
# images of any size share one graph, while the text dims stay static (length buckets, padded label count).
VISION_DYNAMIC_DIMS = {
    "pixel_values": (0,), "image_grid_thw": (0,), "image_index": (0,), "vision_rotary_ids": (0,),
    "window_index": (0,), "window_reverse": (0,), "pos_embed_index": (0,), "pos_embed_weight": (0,),
    "full_gather": (0, 1), "full_mask": (0, 1), "full_scatter": (0,), "full_cu_seqlens": (0,),
    "window_gather": (0, 1), "window_mask": (0, 1), "window_scatter": (0,), "window_cu_seqlens": (0,),
}


def mark_vision_dynamic(batch: Batch) -> Batch:
    """Mark the image-dependent dims dynamic (in place, on the tensors the compiled step receives). A dim of size
    0 or 1, or one the graph needs as a constant, is specialised instead of raising."""
    for key, dims in VISION_DYNAMIC_DIMS.items():
        if key in batch:
            for dim in dims:
                torch._dynamo.maybe_mark_dynamic(batch[key], dim)
    return batch


def donate_opt_state(apply_update: Callable[[TrainState, dict], tuple[TrainState, Metrics]]
                     ) -> Callable[[TrainState, dict], tuple[TrainState, Metrics]]:
    """apply_update that writes the new optimizer state into the old state's buffers (jax's donate_argnums).

    Compiled, the copy becomes an in-place store fused into the update's kernels, so the old and the new Adam
    moments never coexist: for a 3B model in fp32 that is 30 GB less at peak. Params are already updated in
    place (optim.apply_updates). The caller's old state then holds the new values.
    """

    def update(state: TrainState, grads: dict) -> tuple[TrainState, Metrics]:
        new, metrics = apply_update(state, grads)
        old_leaves, spec = pytree.tree_flatten(state.opt_state)
        new_leaves = spec.flatten_up_to(new.opt_state)
        for old, value in zip(old_leaves, new_leaves):
            old.copy_(value)
        return TrainState(new.step, new.params, state.opt_state), metrics

    return update


def set_compile_cache_dir(path: str) -> None:
    """Point inductor's on-disk caches (FX graphs, AOT autograd, kernels) at a persistent directory, so a restarted
    run compiles from cache in seconds. Must run before the first compilation; inductor reads the variable."""
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(path)


def make_train_step(model: model_lib.Model, tx: optim.GradientTransformation,
                    schedule: Callable[[torch.Tensor], torch.Tensor], *, compile: bool = False,
                    block_call: model_lib.BlockCall = model_lib.plain_block_call, compile_mode: str = "",
                    trainable: Collection[str] | None = None,
                    ) -> Callable[[TrainState, Sequence[Batch | None]], tuple[TrainState, Metrics]]:
    """Build train_step(state, micro_batches) -> (state, metrics).

    compile=False runs eagerly. compile=True, compile_mode (default: default_compile_mode()):
      "whole": fullgraph graphs, 0 breaks. A step of one micro-batch is ONE graph (forward, backward, clip, AdamW);
               with accumulation, one graph per micro-batch (forward, backward, add into the gradient buffers)
               and one for the update, so the compile cost does not grow with the accumulation count.
      "split": loss-and-grad (graph break at torch.autograd.grad) and the update compiled separately.
    Text shapes are static (dynamic=False): every distinct (length, label count) is one compilation, so batches
    should come padded to length buckets with a static label count (collate's length_buckets, pad_labels). The
    image-dependent dims are dynamic (VISION_DYNAMIC_DIMS): images of any size share a graph. The compiled update
    donates the optimizer state (donate_opt_state). `trainable`: the leaves that train (trainable.TrainPlan; default
    all); `tx` and the state's optimizer state cover exactly those.
    """
    loss_and_grad = make_loss_and_grad(model, block_call, trainable)
    update = make_apply_update(tx, schedule)
    if compile:
        update = donate_opt_state(update)
    apply_update = update
    mode = (compile_mode or default_compile_mode()) if compile else "eager"
    if mode not in (*COMPILE_MODES, "eager"):
        raise ValueError(f"compile_mode={compile_mode!r}: expected one of {COMPILE_MODES}")
    if compile:
        logging.info("compile: mode %r (torch %s; trace_autograd_ops %s)", mode, torch.__version__,
                     "available" if mode == "whole" else "unavailable or not chosen")

    def single(state: TrainState, batch: Batch) -> tuple[TrainState, torch.Tensor, Metrics]:
        loss, grads = loss_and_grad(state.params, batch, torch.ones((), device=batch["input_ids"].device))
        state, metrics = update(state, grads)
        return state, loss, metrics

    def accumulate(params: dict, grads: dict, batch: Batch, scale: torch.Tensor) -> torch.Tensor:
        loss, g = loss_and_grad(params, batch, scale)
        for k in grads:
            grads[k].add_(g[k])
        return loss

    if mode == "whole":
        single = torch.compile(single, fullgraph=True, dynamic=False)
        accumulate = torch.compile(accumulate, fullgraph=True, dynamic=False)
        apply_update = torch.compile(apply_update, fullgraph=True, dynamic=False)
    elif mode == "split":
        loss_and_grad = torch.compile(loss_and_grad, dynamic=False)
        apply_update = torch.compile(apply_update, fullgraph=True, dynamic=False)
    scope = (lambda: _compile_config(mode)) if compile else contextlib.nullcontext

    def train_step(state: TrainState, micro_batches: Sequence[Batch | None]) -> tuple[TrainState, Metrics]:
        present = [b for b in micro_batches if b is not None]  # None: every row of a micro-batch was skipped
        if not present:
            raise ValueError("train_step got no micro-batch with rows (every row of the global batch was skipped)")
        if compile:
            present = [mark_vision_dynamic(b) for b in present]
        with scope():
            if mode == "whole" and len(micro_batches) == 1:
                state, loss_sum, metrics = single(state, present[0])
            else:
                state, loss_sum, metrics = _accumulate_and_update(state, present)
        tokens = sum(b["attention_mask"].sum() for b in present)
        metrics.update({
            "train/loss": loss_sum / len(present),
            "train/tokens": tokens.to(torch.float32),
            "train/label_tokens": sum(label_tokens(b) for b in present),
        })
        return state, metrics

    def _accumulate_and_update(state: TrainState, present: list[Batch]) -> tuple[TrainState, torch.Tensor, Metrics]:
        scale = torch.tensor(1.0 / len(present))
        grads, loss_sum = None, torch.zeros(())
        for batch in present:
            if mode == "whole":
                if grads is None:  # one graph for every micro-batch: accumulate into zeroed buffers
                    grads = {k: torch.zeros_like(v) for k, v in state.params.items()
                             if trainable is None or k in trainable}
                loss = accumulate(state.params, grads, batch, scale)
            else:
                loss, g = loss_and_grad(state.params, batch, scale)
                grads = g if grads is None else {k: grads[k].add_(g[k]) for k in grads}
            loss_sum = loss_sum + loss
        state, metrics = apply_update(state, grads)
        return state, loss_sum, metrics

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
