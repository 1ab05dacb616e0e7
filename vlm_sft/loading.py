"""Sharded loading: each rank reads from the safetensors files only the rows its placements keep.

`from_pretrained` on every rank holds the whole model in fp32 before sharding it: 72B is ~290 GB of host memory per
process, 8 processes per node. Here the HF module is built with its parameters on the meta device (buffers such as
the rotary tables are computed as usual), and every parameter is read as a safetensors slice (`get_slice`) of the
rows this rank's shard covers (Shard(0) over the mesh's shard dimension, chunked as DTensor chunks), cast to its
dtype in the plan (master precision when trained, the compute dtype when frozen), and wrapped as a DTensor with
the strategy's placements. A rank's peak host memory is then about its own shard plus one tensor's slice.

Names: each in-memory name maps to the files through the family's `hub_name` (transformers 4.x layout, as the Hub
ships most checkpoints), or the in-memory name itself where a file was written in the 5.x layout; stacked experts
also from one tensor per expert (family.expert_parts: what transformers 5's save_pretrained writes for Qwen3.5-MoE),
stacked while reading. Tied embeddings are one parameter (read once). The values are the same bits as from_pretrained's (bf16 -> fp32 is exact, and the
compute-dtype cast of a frozen leaf is the cast apply_plan makes); tests/test_loading.py holds them equal.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import time
from typing import Any, Iterator

import torch
from absl import logging
from safetensors import safe_open
from torch.distributed.tensor import DTensor, Shard

from vlm_sft import hostmem
from vlm_sft import models as model_lib
from vlm_sft.errors import ModelLoadError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


def has_safetensors(path: str) -> bool:
    return os.path.isfile(os.path.join(path, INDEX)) or os.path.isfile(os.path.join(path, SINGLE))


def weight_files(path: str) -> dict[str, str]:
    """Tensor name in the files -> the safetensors file holding it (the index, or the single file's header)."""
    index = os.path.join(path, INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            return {k: os.path.join(path, v) for k, v in json.load(f)["weight_map"].items()}
    single = os.path.join(path, SINGLE)
    if not os.path.isfile(single):
        raise ModelLoadError(f"actor.model.model_path={path!r}: neither {INDEX} nor {SINGLE} (sharded loading reads "
                             "safetensors only)")
    with safe_open(single, "pt") as f:
        return {k: single for k in f.keys()}


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Modules built inside get their parameters on the meta device; buffers are computed on CPU as usual."""
    register = torch.nn.Module.register_parameter

    def on_meta(module: torch.nn.Module, name: str, param: torch.nn.Parameter | None) -> None:
        if param is not None and param.device.type != "meta":
            param = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def skeleton(path: str, family: model_lib.Family, *, attn_implementation: str) -> torch.nn.Module:
    """The family's HF module of `path`/config.json: parameters on meta, buffers real."""
    cls = family.hf_class()
    config = cls.config_class.from_pretrained(path, local_files_only=True)
    config._attn_implementation = attn_implementation
    with params_on_meta():
        module = cls._from_config(config, dtype=torch.float32)
    if os.path.isfile(os.path.join(path, "generation_config.json")):
        # as from_pretrained reads it: evaluation's generate stops at its eos ids (Qwen3.5's config.json names
        # only <|endoftext|>; generation_config.json adds <|im_end|>, where an answer ends)
        from transformers import GenerationConfig
        module.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    return module


def placement(sharding: Any, name: str) -> tuple[Any, tuple]:
    """The mesh and placements of param `name` (expert leaves have their own under expert parallelism)."""
    return sharding.placement(name) if hasattr(sharding, "placement") else (sharding.mesh, sharding.placements)


def local_rows(rows: int, sharding: Any, name: str = "") -> tuple[int, int]:
    """[start, end) of dim 0 this rank keeps of param `name` under the sharding's placements (DTensor's Shard(0)
    chunking: ceil(rows / n) per rank, the last ones shorter or empty)."""
    start, end = 0, rows
    mesh, placements = placement(sharding, name)
    for dim, placement_ in enumerate(placements):
        if isinstance(placement_, Shard):
            n, k = mesh.size(dim), mesh.get_local_rank(dim)
            size = end - start
            chunk = -(-size // n)
            start, end = start + min(k * chunk, size), start + min((k + 1) * chunk, size)
    return start, end


@dataclasses.dataclass(frozen=True)
class _Piece:
    """One tensor of the files and where it goes: `expert` None: rows [start, end) of dim 0 of the whole param
    (in the family's Hub layout or the in-memory one); else one expert's part, rows [row, row + rows) of dim 1 of
    local expert `expert` of a stacked param (loading a per-expert directory)."""

    key: str
    name: str
    expert: int | None = None
    row: int = 0
    rows: int = 0


def _pieces(name: str, shape: tuple[int, ...], start: int, end: int, family: model_lib.Family,
            files: dict[str, str], path: str) -> list[_Piece]:
    """The tensors of the files that make rows [start, end) of param `name`: its Hub name, its in-memory name, or
    (stacked experts written one tensor per expert: family.expert_parts) the parts of experts start..end-1."""
    hub = family.hub_name(name)
    for key in (hub, name):
        if key in files:
            return [_Piece(key, name)]
    parts = family.expert_parts(name)
    if parts and parts[0].format(e=0) in files:
        rows = shape[1] // len(parts)
        pieces = [_Piece(part.format(e=e), name, e - start, j * rows, rows)
                  for e in range(start, end) for j, part in enumerate(parts)]
        every = [part.format(e=e) for e in range(shape[0]) for part in parts]
        missing = next((key for key in every if key not in files), None)
        if missing is not None:
            raise ModelLoadError(f"actor.model.model_path={path!r}: {name!r} is written one tensor per expert, but "
                                 f"{missing!r} is missing from its safetensors files (expected {shape[0]} experts)")
        return pieces
    also = f", nor per-expert {parts[0].format(e=0)!r}" if parts else ""
    raise ModelLoadError(f"actor.model.model_path={path!r}: weights missing for {name!r} (no {hub!r} in its "
                         f"safetensors files{also})")


def read_params(path: str, family: model_lib.Family, wanted: dict[str, tuple[tuple[int, ...], int, int, Any]],
                files: dict[str, str] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, rows [start, end) of dim 0 in the in-memory layout, in `dtype`) for each param of `wanted` (name ->
    (in-memory shape, start, end, dtype; None: as stored)), read from the directory's safetensors files one file
    open at a time, each param yielded as soon as its last piece is read.

    A tensor stored in the family's Hub layout (family.to_hub: e.g. Qwen3-VL-MoE's experts as transformers 4.57
    wrote them, transposed) is converted; one already in the in-memory shape is taken as is (transformers 5's
    rule: it compares shapes). Either way only trailing dims differ, so the rows of dim 0 are the same. Stacked
    experts written one tensor per expert (family.expert_parts) are stacked here, reading only experts
    start..end-1. Every missing tensor is reported before anything is read."""
    files = weight_files(path) if files is None else files
    pieces = {name: _pieces(name, shape, start, end, family, files, path)
              for name, (shape, start, end, _) in wanted.items()}
    left = {name: len(p) for name, p in pieces.items()}
    buffers: dict[str, torch.Tensor] = {}
    for name, (shape, start, end, dtype) in wanted.items():
        if not left[name]:  # no experts on this rank
            yield name, torch.empty((0, *shape[1:]), dtype=dtype or torch.float32)
    by_file: dict[str, list[_Piece]] = {}
    for piece in (p for ps in pieces.values() for p in ps):
        by_file.setdefault(files[piece.key], []).append(piece)
    for file in sorted(by_file):  # one file open at a time: its mapped pages go with it
        with safe_open(file, "pt") as handle:
            for piece in by_file[file]:
                shape, start, end, dtype = wanted[piece.name]
                stored = handle.get_slice(piece.key)
                got = tuple(stored.get_shape())
                if piece.expert is not None:
                    if got != (piece.rows, *shape[2:]):
                        raise ModelLoadError(f"actor.model.model_path={path!r}: {piece.key} has shape {list(got)} "
                                             f"in the files; {piece.name} {list(shape)} expects "
                                             f"{[piece.rows, *shape[2:]]}")
                    tensor = stored[...]
                    if piece.name not in buffers:
                        buffers[piece.name] = torch.empty((end - start, *shape[1:]), dtype=dtype or tensor.dtype)
                    buffers[piece.name][piece.expert, piece.row:piece.row + piece.rows] = tensor
                    left[piece.name] -= 1
                    if not left[piece.name]:
                        yield piece.name, buffers.pop(piece.name)
                    continue
                hub_shape = tuple(family.to_hub(piece.name, torch.empty(shape, device="meta")).shape)
                convert = got != shape and piece.key == family.hub_name(piece.name) and got == hub_shape
                if got != shape and not convert:
                    also = f" (or {list(hub_shape)} as the Hub lays it out)" if hub_shape != shape else ""
                    raise ModelLoadError(f"actor.model.model_path={path!r}: {piece.key} has shape {list(got)} in "
                                         f"the files, the model expects {list(shape)}{also}")
                local = stored[start:end] if shape else stored[...]
                local = local.to(dtype) if dtype is not None else local
                yield piece.name, family.from_hub(piece.name, local) if convert else local


def load_sharded(path: str, sharding: Any, dtypes: dict[str, torch.dtype], *, attn_implementation: str = "sdpa",
                 model_type: str | None = None) -> tuple[model_lib.Model, dict[str, DTensor]]:
    """The model skeleton (parameters on meta, buffers on the device in their dtype) and this rank's params as
    DTensors; `dtypes`: param name -> the dtype it is held in (the plan's: precision or compute dtype)."""
    from vlm_sft import sharding as sharding_lib

    t0 = time.perf_counter()
    family = model_lib.check_model_dir(path, model_type)
    module = skeleton(path, family, attn_implementation=attn_implementation)
    model, meta = model_lib.model_from_module(module, family)
    wanted = {}
    for name, p in meta.items():
        shape = tuple(p.shape)
        start, end = local_rows(shape[0], sharding, name) if shape else (0, 0)
        wanted[name] = (shape, start, end, dtypes.get(name, torch.float32))
    params: dict[str, DTensor] = {}
    read = 0
    for name, local in read_params(path, family, wanted):
        shape = tuple(meta[name].shape)
        read += local.numel() * local.element_size()
        local = local.to(sharding.device).contiguous()
        if getattr(sharding, "plain", False):  # one rank, plain tensors (sharding.Sharding.plain)
            params[name] = local
        else:
            params[name] = DTensor.from_local(local, *placement(sharding, name), run_check=False,
                                              shape=torch.Size(shape), stride=_contiguous_stride(shape))
    params = {name: params[name] for name in meta}  # the module's order
    for sub in module.modules():  # as shard_model leaves it: buffers on the device, in their dtype
        for bname, b in sub._buffers.items():
            if b is not None:
                sub._buffers[bname] = b.to(sharding.device, sharding_lib.buffer_dtype(bname, b, sharding))
    peak = hostmem.peak_resident_gib()
    logging.info(
        "sharded loading: %d tensors, %.2f GiB read on this rank in %.1f s; peak host memory %.2f GiB",
        len(params), read / 2 ** 30, time.perf_counter() - t0, peak)
    return model, params


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for d in reversed(shape):
        stride.append(acc)
        acc *= d
    return tuple(reversed(stride))


__all__ = ["load_sharded", "local_rows", "params_on_meta", "read_params", "skeleton", "weight_files"]
