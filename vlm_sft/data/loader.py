"""Deterministic, resumable, rank-sharded batches of encoded examples.

The sample order is a pure function of (seed, epoch), so every rank computes the same global order without
communication and a run resumes from {"epoch", "offset"} alone. Each global batch is the next `global_batch_size`
rows of the order; rank r takes the r-th contiguous shard of it and splits that into micro-batches, so a run on
any number of ranks trains on the same samples per step. Like RLinf (drop_last), the rows after an epoch's last
full global batch are not trained on in that epoch; the next epoch reshuffles all rows.
"""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Callable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

from vlm_sft.data import packing
from vlm_sft.errors import RowError

_PREFETCH_FACTOR = 4  # micro-batches in flight per worker


def epoch_order(num_rows: int, *, seed: int, epoch: int, shuffle: bool,
                row_groups: Sequence[int] | None = None) -> list[int]:
    """The row order of one epoch, a function of (seed, epoch) only.

    With `row_groups` (sizes in row order), the groups are permuted and then the rows within each group, so a
    lazy reader that caches the current row group reads every group once per epoch.
    """
    if not shuffle:
        return list(range(num_rows))
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    rng = np.random.default_rng([seed, epoch])
    if row_groups is None:
        return rng.permutation(num_rows).tolist()
    if sum(row_groups) != num_rows:
        raise ValueError(f"row_groups sum to {sum(row_groups)} rows, expected {num_rows}")
    starts = np.cumsum([0, *row_groups[:-1]]) if row_groups else []
    order: list[int] = []
    for g in rng.permutation(len(row_groups)).tolist():
        order += (starts[g] + rng.permutation(row_groups[g])).tolist()
    return order


@dataclasses.dataclass
class TrainBatch:
    micro_batches: list[Any]     # collate_fn output per micro-batch; None where every row was skipped
    position: dict               # {"epoch", "offset"} AFTER this batch: pass as position= to resume with the next
    num_skipped: int             # rows of this rank's shard left out (bad_rows="skip")
    skipped_sources: list[str]   # "<file>:<row>" of each skipped row
    global_label_tokens: float | None = None  # answer tokens of the whole global batch (packing.balance sets it)


@dataclasses.dataclass
class EvalBatch:
    batch: Any                   # collate_fn output; None where every row was skipped
    indices: list[int]           # global row indices in `batch`, in order (skipped rows excluded)
    num_skipped: int
    skipped_sources: list[str]


class _MicroResult(NamedTuple):
    batch: Any
    indices: list[int]
    skipped_sources: list[str]
    error: bytes | None = None   # a worker's pickled exception (bad_rows="error"), raised again in the trainer
    error_message: str = ""


def _source_of(source, i: int) -> str:
    return source.source_of(i) if hasattr(source, "source_of") else f"row {i}"


class _MicroBatchDataset(torch.utils.data.Dataset):
    """Map-style dataset whose key is a tuple of row indices and whose item is one collated micro-batch."""

    def __init__(self, source, encode_fn: Callable, collate_fn: Callable, bad_rows: str, in_worker: bool,
                 max_tokens: int = 0):
        if bad_rows not in ("error", "skip"):
            raise ValueError(f"data.bad_rows must be 'error' or 'skip', got {bad_rows!r}")
        self.source, self.encode_fn, self.collate_fn = source, encode_fn, collate_fn
        self.bad_rows, self.in_worker = bad_rows, in_worker
        self.max_tokens = max_tokens  # > 0: the key is a whole shard, packed into micro-batches of this budget

    def _encode(self, i: int) -> Any:
        example = self.source[i]
        try:
            encoded = self.encode_fn(example)
        except ValueError as e:
            if example.source in str(e):
                raise
            raise RowError(f"{example.source}: {e}") from e
        if self.max_tokens and len(encoded.input_ids) > self.max_tokens:
            raise RowError(f"{example.source}: {len(encoded.input_ids)} tokens (image tokens included) exceed "
                           f"actor.max_tokens_per_micro_batch={self.max_tokens}; rows are never split: raise the "
                           "budget, lower data.max_prompt_length or set data.bad_rows=skip")
        return encoded

    def __getitem__(self, indices: Sequence[int]) -> _MicroResult:
        try:
            return self._build(indices)
        except ValueError as e:
            if not self.in_worker:
                raise
            # torch re-raises worker errors as "Caught X in DataLoader worker process 0. Original Traceback...";
            # send the exception itself so the trainer raises the original one-line message.
            try:
                payload = pickle.dumps(e)
            except Exception:
                payload = None
            return _MicroResult(None, [], [], payload, f"{type(e).__name__}: {e}")

    def _build(self, indices: Sequence[int]) -> _MicroResult:
        encoded, kept, skipped = [], [], []
        for i in indices:
            try:
                encoded.append(self._encode(i))
                kept.append(i)
            except ValueError:
                if self.bad_rows == "error":
                    raise
                skipped.append(_source_of(self.source, i))
        if self.max_tokens:  # a list of packed micro-batches (none when every row was skipped)
            groups = packing.pack_rows([len(e.input_ids) for e in encoded], self.max_tokens)
            return _MicroResult([self.collate_fn([encoded[j] for j in g]) for g in groups], kept, skipped)
        batch = self.collate_fn(encoded) if encoded else None
        return _MicroResult(batch, kept, skipped)


def _worker_error(result: _MicroResult) -> BaseException:
    exc = None
    if result.error is not None:
        try:
            exc = pickle.loads(result.error)
        except Exception:
            exc = None
    return exc if isinstance(exc, BaseException) else RowError(result.error_message)


def _identity(x):
    return x


def _results(dataset: _MicroBatchDataset, keys: Iterator[tuple[int, ...]], num_workers: int,
             seed: int) -> Iterator[_MicroResult]:
    """Items for `keys`, in order; built in this process or in `num_workers` worker processes."""
    if num_workers == 0:
        return (dataset[k] for k in keys)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=keys, num_workers=num_workers, collate_fn=_identity,
        pin_memory=torch.cuda.is_available(), prefetch_factor=_PREFETCH_FACTOR, persistent_workers=False,
        # Its own generator: worker seeding must not draw from (and so change) the global torch RNG.
        generator=torch.Generator().manual_seed(seed))
    return _from_workers(loader)


def _from_workers(loader: torch.utils.data.DataLoader) -> Iterator[_MicroResult]:
    it = iter(loader)
    while True:
        try:
            result = next(it)
        except StopIteration:
            return
        if result.error is not None or result.error_message:
            # Drop the iterator before raising: its workers then shut down now, not seconds later when the
            # traceback's reference cycle is collected (or, worse, in a forked child of the next loader).
            del it
            raise _worker_error(result)
        yield result


def _check_position(position: dict | None, num_rows: int) -> dict:
    if position is None:
        return {"epoch": 0, "offset": 0}
    try:
        epoch, offset = int(position["epoch"]), int(position["offset"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"data position must be {{'epoch': int, 'offset': int}}, got {position!r}") from None
    if epoch < 0 or not 0 <= offset <= num_rows:
        raise ValueError(f"data position {position!r} is out of range for {num_rows} rows")
    return {"epoch": epoch, "offset": offset}


class TrainLoader:
    """Endless training batches, epoch after epoch, resumable from `position`.

    Iterating yields one TrainBatch per global step holding this rank's `accum` micro-batches. `position` is
    {"epoch", "offset"}: offset counts rows of the epoch's order already consumed by ALL ranks, so a run may
    resume on a different number of ranks (or batch size) and continue with exactly the next rows.

    With `max_tokens` > 0 (packing), micro_batch_size is unused: the rank's whole shard is encoded together and
    packed (data/packing.py) into as many micro-batches of at most max_tokens tokens as it needs, each built by
    `collate_fn` (e.g. packing.make_packed_collate); a row over the budget is a bad row.
    """

    def __init__(self, source, encode_fn: Callable, collate_fn: Callable, *, global_batch_size: int,
                 micro_batch_size: int, world_size: int = 1, rank: int = 0, seed: int = 0, shuffle: bool = True,
                 num_workers: int = 0, bad_rows: str = "error", lazy: bool = False, position: dict | None = None,
                 max_tokens: int = 0):
        assert 0 <= rank < world_size, (rank, world_size)
        if max_tokens:
            micro_batch_size = global_batch_size // world_size
        assert global_batch_size % (micro_batch_size * world_size) == 0, (
            global_batch_size, micro_batch_size, world_size)
        self.max_tokens = max_tokens
        self.source = source
        self.global_batch_size = global_batch_size
        self.micro_batch_size = micro_batch_size
        self.world_size, self.rank = world_size, rank
        self.seed, self.shuffle, self.num_workers = seed, shuffle, num_workers
        self.accum = global_batch_size // (micro_batch_size * world_size)
        self.num_rows = len(source)
        if self.num_rows < global_batch_size:
            raise ValueError(f"{self.num_rows} training rows are fewer than global_batch_size={global_batch_size}")
        self.row_groups = source.row_groups() if lazy else None
        self.position = _check_position(position, self.num_rows)
        self._dataset = _MicroBatchDataset(source, encode_fn, collate_fn, bad_rows, in_worker=num_workers > 0,
                                           max_tokens=max_tokens)

    def empty_micro_batch(self) -> Any:
        """A padding-only micro-batch (packing), for a rank that packed fewer than another (packing.balance)."""
        return self._dataset.collate_fn([])

    @property
    def steps_per_epoch(self) -> int:
        return self.num_rows // self.global_batch_size

    def _steps(self, position: dict) -> Iterator[tuple[dict, list[tuple[int, ...]]]]:
        """(position after the step, this rank's micro-batch row indices) for each step from `position` on."""
        epoch, offset = position["epoch"], position["offset"]
        per_rank = self.global_batch_size // self.world_size
        m = self.micro_batch_size
        while True:
            if offset + self.global_batch_size <= self.num_rows:
                order = epoch_order(self.num_rows, seed=self.seed, epoch=epoch, shuffle=self.shuffle,
                                    row_groups=self.row_groups)
                while offset + self.global_batch_size <= self.num_rows:
                    shard = order[offset + self.rank * per_rank: offset + (self.rank + 1) * per_rank]
                    offset += self.global_batch_size
                    after = ({"epoch": epoch, "offset": offset}
                             if offset + self.global_batch_size <= self.num_rows else {"epoch": epoch + 1, "offset": 0})
                    yield after, [tuple(shard[j:j + m]) for j in range(0, per_rank, m)]
            epoch, offset = epoch + 1, 0

    def __iter__(self) -> Iterator[TrainBatch]:
        start = dict(self.position)
        keys = (key for _, micro in self._steps(start) for key in micro)
        results = _results(self._dataset, keys, self.num_workers, self.seed)
        for after, micro in self._steps(start):
            parts = [next(results) for _ in micro]
            skipped = [s for p in parts for s in p.skipped_sources]
            self.position = after
            batches = parts[0].batch if self.max_tokens else [p.batch for p in parts]
            yield TrainBatch(batches, dict(after), len(skipped), skipped)


def eval_shard(num_rows: int, *, world_size: int = 1, rank: int = 0) -> range:
    """Rank `rank`'s contiguous block of rows: together the ranks cover each row exactly once.

    Block sizes differ by at most one row, so ranks may get different numbers of batches.
    """
    assert 0 <= rank < world_size, (rank, world_size)
    return range(num_rows * rank // world_size, num_rows * (rank + 1) // world_size)


def eval_batches(source, encode_fn: Callable, collate_fn: Callable, *, batch_size: int, world_size: int = 1,
                 rank: int = 0, num_workers: int = 0, bad_rows: str = "error",
                 max_rows: int = 0) -> Iterator[EvalBatch]:
    """This rank's batches of evaluation rows, in row order: no shuffling, no dropped or repeated rows.

    `max_rows` > 0 evaluates only the first max_rows rows. The last batch of a rank may be smaller.
    """
    assert batch_size > 0, batch_size
    num_rows = min(len(source), max_rows) if max_rows > 0 else len(source)
    rows = eval_shard(num_rows, world_size=world_size, rank=rank)
    keys = [tuple(rows[j:j + batch_size]) for j in range(0, len(rows), batch_size)]
    dataset = _MicroBatchDataset(source, encode_fn, collate_fn, bad_rows, in_worker=num_workers > 0)
    for r in _results(dataset, iter(keys), num_workers, seed=0):
        yield EvalBatch(r.batch, r.indices, len(r.skipped_sources), r.skipped_sources)
