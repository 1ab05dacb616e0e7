"""Lazy JSONL reading: rows/s of a shuffled order through the line-offset index vs eager (lines in memory) and vs
a reader without an index (a scan from the top of the file to each row, what streaming needs for a random order).

  python bench/jsonl_index.py                    # 20,000 rows of ~1 KB, 500 shuffled reads
  python bench/jsonl_index.py --rows 200000 --reads 2000

Only the JSON lines are read (record(i): seek + readline + json.loads); images are files named by the rows and
are not opened, so the numbers isolate what the index changes. Also prints the index's build time and size.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(BENCH)]
from vlm_sft.data import jsonl  # noqa: E402

KEYS = dict(prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"])


def write_rows(path: str, rows: int) -> None:
    question = "In the image from the wrist camera, what is the colour of the object in front of the gripper? " * 10
    with open(path, "w") as f:
        for i in range(rows):
            f.write(json.dumps({"id": str(i), "question": question, "choices": ["red", "green", "blue"],
                                "correct_answer": i % 3, "image": f"images/{i:07d}.jpg"}) + "\n")


def scan_to(path: str, row: int) -> dict:
    """The no-index baseline: read lines from the top until the row's line."""
    with open(path, "rb") as f:
        for i, line in enumerate(f):
            if i == row:
                return json.loads(line)
    raise IndexError(row)


def rate(fn, order) -> float:
    t0 = time.perf_counter()
    for i in order:
        fn(int(i))
    return len(order) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--reads", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "train.jsonl")
        write_rows(path, args.rows)
        size = os.path.getsize(path)
        t0 = time.perf_counter()
        lazy = jsonl.JsonlSource([path], **KEYS, lazy=True)
        build = time.perf_counter() - t0
        eager = jsonl.JsonlSource([path], **KEYS, lazy=False)
        order = np.random.default_rng(0).permutation(args.rows)[:args.reads]
        baseline = rate(lambda i: scan_to(path, i), order[:max(args.reads // 10, 10)])
        lazy_rate, eager_rate = rate(lazy.record, order), rate(eager.record, order)
    print(f"{args.rows:,} rows, {size / 2 ** 20:.1f} MiB; index built in {build:.2f} s "
          f"({build / args.rows * 1e6:.1f} us/row), {16 * args.rows / 2 ** 20:.1f} MiB of offsets and line numbers")
    print(f"shuffled record() reads/s: no index (scan from the top) {baseline:,.0f} | lazy (index) {lazy_rate:,.0f} "
          f"| eager (lines in memory) {eager_rate:,.0f}")
    print(f"ratio lazy / no index: {lazy_rate / baseline:.0f}x; lazy / eager: {lazy_rate / eager_rate:.2f}")


if __name__ == "__main__":
    main()
