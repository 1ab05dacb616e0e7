"""Regional compilation: every function the model applies through its `block_call` hook is compiled on its own.

Why regions, not the whole step: one graph of the unrolled model grows with depth (a 36-layer text model and a
32-block vision tower took over 20 minutes to compile on CPU), and it is compiled again for every new shape.
Compiled per region, the 36 decoder layers share ONE graph: the params are inputs (a dict of tensors), so nothing
about a particular layer is baked in, and the model applies every block of a kind with one TEMPLATE module
(`layers[0]`): dynamo guards on the module object, so a different module per layer would compile per layer.
A region is (the function, its template module). The call is `fn(module, prepare(p), *args)` where `prepare`
is the sharding layer's per-block gather of DTensor params: it runs OUTSIDE the compiled function (eager DTensor
collectives, as FSDP2's hooks run outside torchtitan's compiled blocks), so compiled code sees plain tensors only.
That is what makes restarts warm: with DTensors inside, every region missed inductor's and AOTAutograd's on-disk
caches in a new process (the DeviceMesh enters the cache key; measured, torch 2.13: 14 misses of 14 graphs),
with plain tensors all 14 hit.

Activation checkpointing wraps gather + compiled region (non-reentrant `torch.utils.checkpoint`): forward keeps
only the block's inputs, backward gathers again and runs the compiled region again.

Shapes: text regions are static (dynamic=False: a length bucket is one graph per region); regions over the packed
image patches (`dynamic=True` in the call: patch, window and image counts vary with every batch) have every dim of
their tensor inputs marked dynamic (maybe_mark_dynamic: a dim the graph needs as a constant, such as the width,
is specialised instead), and no duck sizing (two counts that happen to be equal in one batch get no guard tying
them), so images of any size and number share one graph.
"""
from __future__ import annotations

import functools

import contextlib
import dataclasses
import os
import time
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.fx.experimental._config as fx_config
from absl import logging
from torch._dynamo.utils import counters
from torch.utils.checkpoint import checkpoint

Params = dict[str, torch.Tensor]
BlockCall = Callable[..., Any]
Region = Callable[..., torch.Tensor]

RECOMPILE_LIMIT = 64  # graphs per region: (length bucket x label bucket) combinations, with room to spare


def settings() -> contextlib.AbstractContextManager:
    """Dynamo settings for compiled calls, scoped to the train step (no global state is changed)."""
    stack = contextlib.ExitStack()
    stack.enter_context(torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT))
    stack.enter_context(fx_config.patch(use_duck_shape=False))
    return stack


def _mark_dynamic(args: tuple) -> None:
    for a in args:
        if isinstance(a, torch.Tensor):
            for dim in range(a.dim()):
                torch._dynamo.maybe_mark_dynamic(a, dim)


def eager_region(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """`fn` marked to run eagerly inside a compiled step (a block whose ops dynamo's fullgraph tracing cannot take:
    host-side row bounds, third-party kernels). torch.compiler.disable is not enough: compiling the function
    itself traces through it."""
    @functools.wraps(fn)
    def run(*args: Any, **kwargs: Any) -> torch.Tensor:
        return fn(*args, **kwargs)

    run.eager_region = True
    return run


def make_block_call(prepare: Callable[[Params], Params] = lambda p: p, *, compile: bool = False,
                    checkpointing: bool = False, fullgraph: bool = True) -> BlockCall:
    """A `block_call` hook (model.py): `fn(module, prepare(p), *args)` per call.

    compile: `fn` is compiled once per (fn, module) region and shared by every call with that pair; `fullgraph`
    False lets a region break its graph around functions it calls under torch.compiler.disable (expert
    parallelism's token exchange, models/moe.py), True makes any graph break an error;
    `prepare` (the sharded gather) runs outside it, so the compiled code sees plain tensors. checkpointing: calls
    marked `remat` (decoder and vision blocks) keep only their inputs for backward and run again there, prepare
    included (the sharded gather is redone: FSDP's reshard-after-forward).
    """
    compiled: dict[tuple[Callable, Any], Region] = {}

    def block_call(fn: Callable[..., torch.Tensor], module: Any, p: Params, *args: Any, remat: bool = False,
                   dynamic: bool = False) -> torch.Tensor:
        run = fn
        if compile and not getattr(fn, "eager_region", False):
            run = compiled.get((fn, module))
            if run is None:
                run = compiled[(fn, module)] = torch.compile(fn, fullgraph=fullgraph, dynamic=False)
            if dynamic:
                _mark_dynamic(args)

        def apply(p: Params, *args: Any) -> torch.Tensor:
            return run(module, prepare(p), *args)

        if checkpointing and remat:
            return checkpoint(apply, p, *args, use_reentrant=False)
        return apply(p, *args)

    block_call.regions = compiled  # (fn, module) -> compiled function: one entry per kind of region
    return block_call


# ----------------------------------------------------------------------------------------------------------------
# What was compiled, and how long it took.

CACHE_COUNTERS = (("inductor", "fxgraph_cache_hit"), ("inductor", "fxgraph_cache_miss"),
                  ("aot_autograd", "autograd_cache_hit"), ("aot_autograd", "autograd_cache_miss"))


@dataclasses.dataclass
class CompileStats:
    """Counts since the process started (torch._dynamo's counters; `reset` clears them)."""

    graphs: int = 0            # graphs dynamo produced (a region's forward and backward count once)
    fx_hits: int = 0           # inductor FX graph cache: compiled code loaded from the cache dir
    fx_misses: int = 0         # ... generated afresh (inductor codegen ran)
    aot_hits: int = 0          # AOTAutograd cache (forward + backward graphs of a region)
    aot_misses: int = 0

    @classmethod
    def now(cls) -> "CompileStats":
        c = [counters[group][name] for group, name in CACHE_COUNTERS]
        return cls(counters["stats"]["unique_graphs"], *c)

    def __sub__(self, other: "CompileStats") -> "CompileStats":
        return CompileStats(*(a - b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))

    @property
    def fresh_codegen(self) -> int:
        """Compilations that did not come from the cache dir: what a warm restart must not do."""
        return self.fx_misses + self.aot_misses


def graphs_per_function(functions: Iterable[Callable]) -> dict[str, int]:
    """Graphs dynamo holds for each function (its cache entries), by name."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return {fn.__name__: len(_debug_get_cache_entry_list(fn.__code__)) for fn in functions}


@contextlib.contextmanager
def watch(what: str, functions: Callable[[], Iterable[Callable]] = tuple) -> Iterator[list[CompileStats]]:
    """Logs one line when the block compiled anything: new graphs (and which of the compiled `functions()` they
    belong to), cache hits and misses, seconds taken. Yields a list that receives the block's CompileStats."""
    out: list[CompileStats] = []
    before, t0 = CompileStats.now(), time.perf_counter()
    graphs_before = graphs_per_function(functions())
    yield out
    delta = CompileStats.now() - before
    out.append(delta)
    if delta.graphs or delta.fx_hits or delta.fx_misses:
        grown = {k: v - graphs_before.get(k, 0) for k, v in graphs_per_function(functions()).items()
                 if v > graphs_before.get(k, 0)}
        where = f" ({', '.join(f'{k} +{v}' for k, v in grown.items())})" if grown else ""
        logging.info("compile: %s compiled %d new graph(s)%s in %.1f s (the whole call, compilation included); "
                     "inductor cache %d hit(s) / %d miss(es), AOTAutograd cache %d / %d",
                     what, delta.graphs, where, time.perf_counter() - t0, delta.fx_hits, delta.fx_misses,
                     delta.aot_hits, delta.aot_misses)


def set_cache_dir(path: str) -> None:
    """Point inductor's on-disk caches (FX graphs, AOTAutograd, kernels) at a persistent directory, so a restarted
    run loads its compiled regions instead of generating them. Must run before the first compilation."""
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(path)
