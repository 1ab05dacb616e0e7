"""Offline wandb and swanlab runs read back through each library's own record schema (tests only).

A `.wandb` file is a LevelDB-format log of wandb's `Record` protobufs (wandb_internal.proto), which `wandb sync`
uploads; wandb 0.2x reads it in its Go core and ships no Python reader, so the block framing is read here (a
7-byte file header, then 32 KiB blocks of [crc32c u32][length u16][type u8] chunks) and every record is parsed
with wandb's own `Record`. A `.swanlab` file is read with swanlab's own `DataStoreReader` and `Record`.
"""
import dataclasses
import glob
import json
import os
import struct

BLOCK = 32768
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


@dataclasses.dataclass
class BackendRun:
    """One process's offline run: its id, project, name, config, {(step, key): value} history, and how it ended
    (wandb: the exit code; swanlab: the finish state's name; None: no end recorded)."""
    run_id: str
    project: str
    name: str
    config: dict
    history: dict[tuple[int, str], float]
    ended: int | str | None = None


def _leveldb_records(path: str):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path}: not a .wandb file"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is zero padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zeros: the rest of the block is padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


def read_wandb_runs(run_dir) -> list[BackendRun]:
    """Every offline run under `<run_dir>/wandb/`, oldest first (by the second each started)."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    for path in sorted(glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))):
        run, history = None, {}
        for raw in _leveldb_records(path):
            record = wandb_internal_pb2.Record.FromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                config = {item.key: json.loads(item.value_json) for item in record.run.config.update}
                run = BackendRun(record.run.run_id, record.run.project, record.run.display_name, config, history)
            elif kind == "history":
                items = {(item.key or "/".join(item.nested_key)): json.loads(item.value_json)
                         for item in record.history.item}
                step = items.pop("_step")
                for key, value in items.items():
                    if not key.startswith("_"):  # wandb's own _runtime, _timestamp
                        history[(step, key)] = value
            elif kind == "exit" and run is not None:
                run.ended = record.exit.exit_code
        assert run is not None, f"{path}: no run record"
        runs.append(run)
    return runs


def read_swanlab_runs(run_dir) -> list[BackendRun]:
    """Every run under `<run_dir>/swanlog/`, oldest first."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    runs = []
    for path in sorted(glob.glob(os.path.join(run_dir, "swanlog", "run-*", "run-*.swanlab"))):
        reader = DataStoreReader()
        reader.open(path)
        run, history = None, {}
        for raw in reader:
            record = Record.FromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "start":
                run = BackendRun(record.start.id, record.start.project, record.start.name, {}, history)
            elif kind == "scalar":
                if not record.scalar.key.startswith("__swanlab__"):  # its own system metrics
                    history[(record.scalar.step, record.scalar.key)] = record.scalar.value.number
            elif kind == "finish" and run is not None:
                from swanlab.proto.swanlab.run.v1.run_pb2 import RunState
                run.ended = RunState.Name(record.finish.state)
        reader.close()
        assert run is not None, f"{path}: no start record"
        runs.append(run)
    return runs
