"""Which checksum for checkpoint files (vlm_sft/integrity.py): throughput of zlib.crc32 (the one used) against
zlib.adler32 and hashlib.blake2b, streamed in 8 MiB blocks from a file of --mb MiB, as a checkpoint is summed after
it is written (in the page cache) and read back on resume; plus the write of that file, to put the cost in scale.

  python bench/checksum.py [--mb 512] [--rounds 3] [--dir /tmp]
"""
from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
import zlib

from vlm_sft import integrity

BLOCK = 8 << 20


def stream(path: str, update) -> None:
    with open(path, "rb") as f:
        while block := f.read(BLOCK):
            update(block)


def crc32(path: str) -> None:
    integrity.file_record(path)  # what the trainer runs


def adler32(path: str) -> None:
    value = [1]
    stream(path, lambda b: value.__setitem__(0, zlib.adler32(b, value[0])))


def blake2b(path: str) -> None:
    h = hashlib.blake2b()
    stream(path, h.update)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--dir", default=tempfile.gettempdir())
    args = parser.parse_args()
    data = os.urandom(args.mb << 20)
    path = os.path.join(args.dir, f"checksum-bench-{os.getpid()}.bin")
    times: dict[str, list[float]] = {"write (fsync)": [], "crc32 (used)": [], "adler32": [], "blake2b": []}
    try:
        for _ in range(args.rounds):  # alternate contestants each round: drifts of a shared machine hit all alike
            t0 = time.perf_counter()
            with open(path, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            times["write (fsync)"].append(time.perf_counter() - t0)
            for name, fn in (("crc32 (used)", crc32), ("adler32", adler32), ("blake2b", blake2b)):
                t0 = time.perf_counter()
                fn(path)
                times[name].append(time.perf_counter() - t0)
    finally:
        if os.path.exists(path):
            os.remove(path)
    base = statistics.median(times["crc32 (used)"])
    print(f"{args.mb} MiB file, median of {args.rounds} rounds, 8 MiB blocks (page cache warm after the write)")
    print(f"{'':16} {'seconds':>8} {'MB/s':>8} {'time vs crc32':>14}")
    for name, ts in times.items():
        t = statistics.median(ts)
        print(f"{name:16} {t:8.3f} {args.mb / t:8.0f} {t / base:13.2f}x")


if __name__ == "__main__":
    main()
