"""TrainState: everything a train step reads and returns, as one pytree of tensors.

A NamedTuple is a pytree node in torch.utils._pytree natively, so `tree_map` / `tree_flatten_with_path` walk
step, params and the (nested NamedTuple/tuple/dict) optimizer state without any registration, and checkpointing
can name every leaf by its key path.
"""
from typing import Any, Collection, NamedTuple

import torch
import torch.utils._pytree as pytree

from vlm_sft.optim import GradientTransformation, OptState, Params


class TrainState(NamedTuple):
    step: torch.Tensor  # int64 0-dim: optimizer updates applied so far
    params: Params  # fp32 master weights (plain tensors or DTensors)
    opt_state: OptState


def init_train_state(params: Params, tx: GradientTransformation, trainable: Collection[str] | None = None
                     ) -> TrainState:
    """Step 0 on the params' device, with tx's freshly initialised state for the `trainable` leaves (default all:
    frozen leaves get no optimizer state)."""
    leaves = pytree.tree_leaves(params)
    device = leaves[0].device if leaves else torch.device("cpu")
    trained = params if trainable is None else {k: v for k, v in params.items() if k in trainable}
    return TrainState(torch.zeros((), dtype=torch.int64, device=device), params, tx.init(trained))


def leaf_names(tree: Any) -> list[str]:
    """Key paths of a pytree's leaves, e.g. "step", "params['w']", "opt_state[0].inner_state[1].mu['w']"."""
    paths, _ = pytree.tree_flatten_with_path(tree)
    return [pytree.keystr(path).lstrip(".") for path, _ in paths]
