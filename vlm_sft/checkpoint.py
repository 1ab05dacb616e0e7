"""Checkpoints: the whole TrainState in torch.distributed.checkpoint (DCP) format, plus what an exact resume needs.

Why DCP: every rank writes only its own shards (no gather onto one rank), and loading reshards, so a checkpoint
saved on 8 ranks resumes on 4 or loads into one process (export, eval). Leaves are keyed by their pytree path
(`state.leaf_names`), e.g. "params['model.language_model.norm.weight']", "opt_state[0].inner_state[1].mu[...]";
plain tensors and DTensors are saved and restored alike.

A checkpoint is the directory `<run>/checkpoints/step_<N>/`:
    .metadata, __<rank>_<i>.distcp   DCP index and shards of every TrainState leaf
    rng_rank<r>.pt                   rank r's torch RNG states (CPU, and CUDA where present)
    config.json                      the run's config at save time (export reads the base model path from it)
    meta.json                        step, data position, world size, every file's size and crc32; written LAST

Atomic: all ranks write into `step_<N>.tmp-<token>`; once DCP's save has returned (its final all-reduce means
every rank's shards are on disk) rank 0 writes meta.json and renames the directory to `step_<N>`. So a directory
named `step_<N>` is complete by construction; a crash mid-save leaves only a `.tmp-` directory, which resume
ignores and the next good save removes, and the previous checkpoint is never touched.

Damage after the fact (a truncated shard, a disk error) is caught on resume: each rank sums the files it wrote
(integrity.file_record) into files_rank<r>.json, which rank 0 merges into meta.json at commit; `verify` compares
them again, each rank checking its share of the files. Nothing non-finite is ever saved: `save` refuses a state
with a NaN or Inf anywhere (one all-reduced flag; the pass over the state costs far less than writing it).
"""
from __future__ import annotations

import ast
import contextlib
import datetime
import json
import os
import re
import shutil
import time
import uuid
import warnings
from concurrent.futures import Future
from typing import Any, Collection

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.utils._pytree as pytree
from absl import logging
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata

from vlm_sft import integrity
from vlm_sft.errors import CheckpointError
from vlm_sft.state import TrainState, leaf_names

CHECKPOINTS = "checkpoints"
META = "meta.json"
CONFIG = "config.json"
FORMAT = 1
_STEP_DIR = re.compile(r"^step_(\d+)$")


def checkpoint_root(run_dir: str) -> str:
    return os.path.join(run_dir, CHECKPOINTS)


def flatten(tree: Any) -> dict[str, torch.Tensor]:
    """{pytree key path: leaf}: the flat state dict DCP saves and loads."""
    return dict(zip(leaf_names(tree), pytree.tree_leaves(tree)))


def param_leaf_names(names: list[str]) -> dict[str, str]:
    """{DCP key of params[name] in a saved TrainState: name}, for reading params alone (export, eval)."""
    probe = TrainState("step", {n: n for n in names}, ())
    return {key: leaf for key, leaf in zip(leaf_names(probe), pytree.tree_leaves(probe)) if leaf != "step"}


def saved_params(path: str) -> dict[str, tuple[str, TensorStorageMetadata]]:
    """{param name: (its DCP key, its saved shape and dtype)} of a checkpoint, in saved (model) order."""
    out = {}
    for key, entry in read_index(path).state_dict_metadata.items():
        m = re.fullmatch(r"params\[(.+)\]", key)
        if m is None:
            continue
        name = ast.literal_eval(m.group(1))
        if param_leaf_names([name]) != {key: name} or not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path}: unexpected entry {key!r} in the checkpoint")
        out[name] = (key, entry)
    return out


@contextlib.contextmanager
def _quiet_single_process():
    # DCP warns on every call without a process group, even when asked for single-process mode explicitly.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _rng_file(rank: int) -> str:
    return f"rng_rank{rank}.pt"


def _records_file(rank: int) -> str:
    return f"files_rank{rank}.json"


def read_meta(path: str) -> dict:
    """meta.json of a checkpoint directory (no completeness check beyond it)."""
    file = os.path.join(path, META)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path}: not a complete checkpoint: no {META} (written last by a save: the save "
                              "did not finish, or this is not a step_<N> checkpoint directory)")
    try:
        with open(file) as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    missing = [k for k in ("format", "step", "world_size", "data_position") if k not in meta]
    if missing:
        raise CheckpointError(f"{file}: missing field(s) {missing}")
    if meta["format"] != FORMAT:
        raise CheckpointError(f"{file}: format {meta['format']!r}, this vlm-sft reads format {FORMAT}")
    return meta


def read_index(path: str) -> Metadata:
    """DCP's index of a checkpoint: every saved tensor's global shape and dtype, and where its chunks are."""
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise CheckpointError(f"{path}: not a complete checkpoint: no .metadata (the DCP index of the shards)")
    try:
        return dcp.FileSystemReader(path).read_metadata()
    except Exception as e:  # a truncated or foreign pickle raises anything
        raise CheckpointError(f"{path}: unreadable .metadata ({type(e).__name__}: {e})") from None


def check_complete(path: str) -> dict:
    """Raises CheckpointError naming the first missing piece; returns meta.json's contents."""
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    meta = read_meta(path)
    metadata = read_index(path)
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointError(f"{path}: not a complete checkpoint: shard file {name} is missing")
        if os.path.getsize(file) < size:
            raise CheckpointError(f"{path}: not a complete checkpoint: shard file {name} is truncated "
                                  f"({os.path.getsize(file)} of >= {size} bytes)")
    for name in [CONFIG] + [_rng_file(r) for r in range(int(meta["world_size"]))]:
        if not os.path.isfile(os.path.join(path, name)):
            raise CheckpointError(f"{path}: not a complete checkpoint: {name} is missing")
    return meta


def verify(path: str, meta: dict | None = None, *, collective: bool = True) -> None:
    """Every file recorded in meta.json still has its size and crc32. Collective when distributed (unless
    collective=False: this process reads every file): each rank reads its share of the files, and the first damage
    found anywhere is raised on every rank. Checkpoints written before checksums were recorded get the size checks
    of check_complete only."""
    meta = read_meta(path) if meta is None else meta
    records = meta.get("files") or {}
    collective = collective and _distributed()
    rank, world = _rank_and_world() if collective else (0, 1)
    damage = None
    for name in sorted(records)[rank::world]:
        try:
            integrity.verify_file(os.path.join(path, name), records[name])
        except integrity.DamagedFileError as e:
            damage = str(e)
            break
    if collective:
        found = [None] * world
        dist.all_gather_object(found, damage)
        damage = next((d for d in found if d), None)
    if damage:
        raise CheckpointError(f"{path}: damaged checkpoint: {damage}")


def list_checkpoints(root: str) -> list[tuple[int, str]]:
    """(step, path) of every `step_<N>` directory under root, newest first (completeness not checked)."""
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), os.path.join(root, name))
             for name in os.listdir(root) if (m := _STEP_DIR.match(name))]
    return sorted(found, reverse=True)


def latest(root: str) -> str | None:
    """The newest complete, undamaged checkpoint under root, or None. Others are skipped with a warning naming the
    file (every rank walks the same list, so the collective checksum checks line up)."""
    for _, path in list_checkpoints(root):
        try:
            verify(path, check_complete(path))
        except CheckpointError as e:
            logging.warning("SKIPPING CHECKPOINT %s; trying the previous one", e)  # e starts with the path
            continue
        return path
    return None


def resolve_resume(resume: str, root: str) -> str | None:
    """runner.resume -> the checkpoint to load: "auto" = newest complete one under root (None if none),
    "" = none (fresh start), anything else = that checkpoint directory, which must be complete."""
    if not resume:
        return None
    if resume == "auto":
        return latest(root)
    try:
        verify(resume, check_complete(resume))
    except CheckpointError as e:
        raise CheckpointError(f"runner.resume: {e}") from None
    return resume


def _check_fits(path: str, flat: dict[str, torch.Tensor], metadata: Metadata, *, partial: bool) -> None:
    """Every leaf of the template exists in the checkpoint with the same shape and dtype (and, unless partial,
    the checkpoint holds nothing else): names the first tensor that does not fit."""
    saved = metadata.state_dict_metadata
    for name, tensor in flat.items():
        entry = saved.get(name)
        if entry is None:
            raise CheckpointError(f"{path}: the checkpoint has no tensor {name!r} (saved from a different model "
                                  "or optimizer?)")
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path}: {name!r} is not a tensor in the checkpoint")
        if tuple(entry.size) != tuple(tensor.shape):
            raise CheckpointError(f"{path}: tensor {name!r} has shape {list(entry.size)} in the checkpoint but "
                                  f"{list(tensor.shape)} in the model (a checkpoint of a different model?)")
        if entry.properties.dtype != tensor.dtype:
            raise CheckpointError(f"{path}: tensor {name!r} is {entry.properties.dtype} in the checkpoint but "
                                  f"{tensor.dtype} here (actor.model.precision differs?)")
    if not partial:
        extra = [name for name in saved if name not in flat]
        if extra:
            raise CheckpointError(f"{path}: the checkpoint has tensor {extra[0]!r} that the model/optimizer "
                                  f"lacks ({len(extra)} such tensors; a checkpoint of a different model?)")


def load_flat(path: str, flat: dict[str, torch.Tensor], *, partial: bool, no_dist: bool) -> None:
    """Reads the saved tensors named by `flat`'s keys into its tensors, in place, after checking they fit.
    no_dist=True reads in this process alone; otherwise every rank calls it (collective)."""
    _check_fits(path, flat, read_index(path), partial=partial)
    with _quiet_single_process():
        dcp.load(flat, checkpoint_id=path, no_dist=no_dist)


def restore(path: str, template: TrainState) -> TrainState:
    """The TrainState saved at `path`, loaded into `template`'s tensors (in place; DTensors keep their placements,
    so the checkpoint is resharded to the current mesh). Collective when distributed: every rank calls it."""
    check_complete(path)
    flat = flatten(template)
    load_flat(path, flat, partial=False, no_dist=not _distributed())
    _, spec = pytree.tree_flatten(template)
    return pytree.tree_unflatten(list(flat.values()), spec)


def restore_params(path: str, params: dict[str, torch.Tensor], *, no_dist: bool | None = None,
                   names: Collection[str] | None = None) -> dict[str, torch.Tensor]:
    """Only the params of the TrainState at `path`, loaded into `params` (in place); optimizer state is not read.
    no_dist=True reads in this process alone (the default when no process group exists). `names`: only these
    (a checkpoint without frozen leaves); the others keep their values."""
    check_complete(path)
    keys = param_leaf_names(list(params) if names is None else [n for n in params if n in set(names)])
    flat = {key: params[name] for key, name in keys.items()}
    load_flat(path, flat, partial=True, no_dist=not _distributed() if no_dist is None else no_dist)
    return {**params, **{name: flat[key] for key, name in keys.items()}}


def rng_state() -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(path: str) -> None:
    """Sets this rank's torch RNG states to those saved by the same rank. A rank the saving run did not have
    (resuming on more ranks) keeps its seeded state, with a warning."""
    rank, _ = _rank_and_world()
    file = os.path.join(path, _rng_file(rank))
    if not os.path.isfile(file):
        logging.warning("%s: no RNG state for rank %d (saved with fewer ranks); keeping this rank's seed", path, rank)
        return
    state = torch.load(file, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _remove_dir(path: str, token: str) -> None:
    """Rename first, so a crash mid-delete never leaves a half-deleted `step_<N>` that looks like a checkpoint."""
    trash = f"{path}.old-{token}"
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def nonfinite_leaf(flat: dict[str, torch.Tensor]) -> str | None:
    """The first floating leaf (this rank's shard of it) holding a NaN or Inf, or None. One host sync in all."""
    names = [k for k, v in flat.items() if torch.is_floating_point(v)]
    if not names:
        return None
    local = [flat[k].to_local() if hasattr(flat[k], "to_local") else flat[k] for k in names]
    finite = torch.stack([torch.isfinite(t).all() for t in local]).tolist()
    return next((name for name, ok in zip(names, finite) if not ok), None)


def _write_own_records(tmp: str, rank: int) -> None:
    """This rank's files (its DCP shards and RNG state) with size and crc32, as files_rank<r>.json (atomic)."""
    names = sorted(n for n in os.listdir(tmp) if n.startswith(f"__{rank}_") or n == _rng_file(rank))
    records = {n: integrity.file_record(os.path.join(tmp, n)) for n in names}
    target = os.path.join(tmp, _records_file(rank))
    with open(target + ".tmp", "w") as f:
        json.dump(records, f)
    os.replace(target + ".tmp", target)


def _save_failed(step: int, root: str, e: BaseException) -> CheckpointError:
    newest = next((p for _, p in list_checkpoints(root)), None)
    kept = f"the previous checkpoints are intact (newest: {newest})" if newest else "no earlier checkpoint exists"
    text = str(e).strip()
    reason = getattr(e, "strerror", None) or (text.splitlines()[0] if text else "no message")
    return CheckpointError(f"saving checkpoint step_{step} under {root} failed ({type(e).__name__}: {reason}); "
                           f"{kept}")


class Checkpointer:
    """Saves TrainStates under `root` (every rank calls `save` at the same steps), keeping the newest `keep_last_n`
    (0 keeps all). With `async_save` the shards are written by a background thread while training goes on: the
    state is copied to host memory before `save` returns (the step may then overwrite it in place), and the
    checkpoint is committed (renamed to step_<N>) by `poll`/`wait` once every rank's shards are on disk.

    A save that fails (disk full, permissions) raises CheckpointError saying so; the previous checkpoints are
    untouched (the failed one never got its final name). `timeout_s` bounds the async group's collectives and
    rank 0's wait for the other ranks' file records (runner.collective_timeout_s)."""

    def __init__(self, root: str, *, keep_last_n: int = 3, async_save: bool = False, timeout_s: float = 1800):
        if keep_last_n < 0:
            raise ValueError(f"runner.keep_last_n={keep_last_n}: expected >= 0 (0 keeps every checkpoint)")
        self.root, self.keep_last_n, self.async_save = root, keep_last_n, async_save
        self.timeout_s = timeout_s
        self._pending: tuple[Future, str, str, dict, str] | None = None
        # Async writes run collectives from a background thread: give them their own (gloo) group so they never
        # interleave with the training step's collectives on the default group.
        self._group = (dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
                       if async_save and _distributed() else None)

    def save(self, state: TrainState, *, data_position: dict, config_json: str, extra: dict | None = None) -> str:
        """Writes `state` as checkpoint step_<state.step>; returns its final path (committed already unless
        async). `data_position` is the loader position after the step's batch; `extra` goes into meta.json.
        Raises CheckpointError, writing nothing, if any rank's state holds a non-finite value."""
        self.wait()
        rank, world = _rank_and_world()
        step = int(state.step)
        flat = flatten(state)
        bad = nonfinite_leaf(flat)
        flags = torch.tensor([0.0 if bad is None else 1.0])
        if _distributed():
            if dist.get_backend() == "nccl":
                flags = flags.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(flags)
        if flags.item():
            raise CheckpointError(f"refusing to save checkpoint step_{step}: the train state holds non-finite values "
                                  f"({bad or 'on another rank'}); nothing non-finite is ever written")
        token = [uuid.uuid4().hex[:12]]
        if _distributed():
            dist.broadcast_object_list(token, src=0)
        final = os.path.join(self.root, f"step_{step}")
        tmp = f"{final}.tmp-{token[0]}"
        meta = {"format": FORMAT, "step": step, "world_size": world, "data_position": dict(data_position),
                "extra": dict(extra or {}), "time": time.time()}
        try:
            os.makedirs(tmp, exist_ok=True)
            torch.save(rng_state(), os.path.join(tmp, _rng_file(rank)))
            with _quiet_single_process():
                if self.async_save:
                    future = dcp.async_save(flat, checkpoint_id=tmp, process_group=self._group,
                                            no_dist=not _distributed())
                    # Each rank's records are written by its own background thread as soon as its shards are: rank
                    # 0's commit waits for them without any rank's main thread taking part.
                    future.add_done_callback(
                        lambda f: f.exception() is None and _write_own_records(tmp, rank))
                    self._pending = (future, tmp, final, meta, config_json)
                    return final
                dcp.save(flat, checkpoint_id=tmp, no_dist=not _distributed())
            _write_own_records(tmp, rank)
        except Exception as e:  # disk full, permissions, a failed rank: DCP raises on every rank
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # free the space; the final name was never taken
            raise _save_failed(step, self.root, e) from None
        if _distributed():
            dist.barrier()  # every rank's records are written
        self._commit(tmp, final, meta, config_json, token[0])
        if _distributed():
            dist.barrier()  # once save returns anywhere, step_<N> exists for everyone
        return final

    def poll(self) -> None:
        """Commits a finished asynchronous save (cheap; call once per step). Raises if the write failed."""
        if self._pending is not None and self._pending[0].done():
            self.wait()

    def wait(self) -> None:
        """Blocks until a pending asynchronous save is written and committed."""
        if self._pending is None:
            return
        future, tmp, final, meta, config_json = self._pending
        self._pending = None
        try:
            future.result()
        except Exception as e:
            raise _save_failed(meta["step"], self.root, e) from None
        self._commit(tmp, final, meta, config_json, uuid.uuid4().hex[:12])

    def _gather_records(self, tmp: str, world: int) -> dict[str, dict[str, int]]:
        """Rank 0: the per-rank file records merged (waiting up to timeout_s for ranks still summing, async)."""
        deadline = time.monotonic() + self.timeout_s
        files = [os.path.join(tmp, _records_file(r)) for r in range(world)]
        while not all(os.path.isfile(f) for f in files):
            if time.monotonic() > deadline:
                missing = [f for f in files if not os.path.isfile(f)]
                raise CheckpointError(f"{missing[0]}: not written within {self.timeout_s:.0f} s (a rank failed to "
                                      "finish its part of the save)")
            time.sleep(0.05)
        records: dict[str, dict[str, int]] = {}
        for f in files:
            with open(f) as fh:
                records.update(json.load(fh))
        return records

    def _commit(self, tmp: str, final: str, meta: dict, config_json: str, token: str) -> None:
        """Rank 0: config.json, the file records and meta.json into the finished directory, rename, prune."""
        if _rank_and_world()[0] != 0:
            return
        try:
            with open(os.path.join(tmp, CONFIG), "w") as f:
                f.write(config_json)
            records = self._gather_records(tmp, meta["world_size"])
            for name in (".metadata", CONFIG):
                records[name] = integrity.file_record(os.path.join(tmp, name))
            meta = {**meta, "files": dict(sorted(records.items()))}
            with open(os.path.join(tmp, META + ".tmp"), "w") as f:
                json.dump(meta, f, indent=2)
                f.flush()
                os.fsync(f.fileno())
            os.replace(os.path.join(tmp, META + ".tmp"), os.path.join(tmp, META))
            for r in range(meta["world_size"]):
                os.remove(os.path.join(tmp, _records_file(r)))
            if os.path.exists(final):  # re-saving a step (a run resumed from an older checkpoint)
                _remove_dir(final, token)
            os.replace(tmp, final)
        except OSError as e:
            raise _save_failed(meta["step"], self.root, e) from None
        self._prune(token)
        logging.info("saved checkpoint %s", final)

    def _prune(self, token: str) -> None:
        """Removes leftovers of crashed saves and all but the newest keep_last_n complete checkpoints."""
        for name in os.listdir(self.root):
            if ".tmp-" in name or ".old-" in name:
                shutil.rmtree(os.path.join(self.root, name), ignore_errors=True)
        if self.keep_last_n > 0:
            for _, path in list_checkpoints(self.root)[self.keep_last_n:]:
                _remove_dir(path, token)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints without frozen leaves (freezing, LoRA): the trained leaves and their optimizer state, plus what
# identifies the base model the frozen leaves are read from again on resume and export.

def trained_state(state: TrainState, trainable: set[str] | frozenset[str] | None) -> TrainState:
    """The part of `state` a checkpoint holds: frozen leaves left out (they equal the base model's weights)."""
    if trainable is None:
        return state
    return state._replace(params={k: v for k, v in state.params.items() if k in trainable})


def base_model_id(model_path: str) -> dict:
    """What identifies a base model directory: its path and a hash of its config.json and of the names and sizes
    of its weight files (cheap: no weight is read; a re-download of the same model hashes the same)."""
    import hashlib

    digest = hashlib.sha256()
    with open(os.path.join(model_path, "config.json"), "rb") as f:
        digest.update(f.read())
    for name in sorted(os.listdir(model_path)):
        if name.endswith(".safetensors") or name.endswith(".bin"):
            digest.update(f"{name}:{os.path.getsize(os.path.join(model_path, name))};".encode())
    return {"path": os.path.abspath(model_path), "sha256": digest.hexdigest()}


def check_base_model(path: str, model_path: str) -> None:
    """A checkpoint without its frozen leaves continues only on the base model it was trained from."""
    saved = read_meta(path).get("extra", {}).get("base_model")
    if not saved:
        return
    here = base_model_id(model_path)
    if here["sha256"] != saved["sha256"]:
        raise CheckpointError(f"{path} holds only the trained leaves of a run on base model {saved['path']!r} "
                              f"(config/weights hash {saved['sha256'][:12]}), but actor.model.model_path="
                              f"{model_path!r} is a different model (hash {here['sha256'][:12]}): point "
                              "actor.model.model_path at the run's base model")
