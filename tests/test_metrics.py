"""MetricsWriter: jsonl lines, TensorBoard events read back, disabled ranks, console line and ETA."""
import json
import os
import struct

import pytest
import torch
from tensorboardX.proto import event_pb2

from vlm_sft.metrics import MetricsWriter, format_eta


def read_tensorboard_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """A minimal TFRecord reader: [len u64][crc u32][Event proto][crc u32] per record."""
    files = [f for f in os.listdir(logdir) if f.startswith("events.out.tfevents")]
    assert len(files) == 1, files
    scalars: dict[str, list[tuple[int, float]]] = {}
    with open(os.path.join(logdir, files[0]), "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos:pos + 8])
        event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
        pos += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_write_appends_flushed_json_lines_and_tensorboard_scalars(tmp_path):
    run_dir = str(tmp_path / "run")
    clock = FakeClock()
    writer = MetricsWriter(run_dir, enabled=True, total_steps=10, clock=clock)
    clock.now += 3.0
    writer.write(1, {"train/loss": torch.tensor(2.5), "train/learning_rate": 1e-5, "time/step": 0.25})
    # Flushed before close: a killed run keeps its lines.
    lines = open(os.path.join(run_dir, "metrics.jsonl")).read().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 1, "time/elapsed": 3.0, "train/loss": 2.5, "train/learning_rate": 1e-5, "time/step": 0.25}
    ]
    clock.now += 1.5
    writer.write(2, {"train/loss": 1.5, "eval/eval_accuracy": 0.75})
    writer.close()

    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records] == [1, 2]
    assert records[1] == {"step": 2, "time/elapsed": 4.5, "train/loss": 1.5, "eval/eval_accuracy": 0.75}
    assert all(type(v) in (int, float) for r in records for v in r.values())

    scalars = read_tensorboard_scalars(os.path.join(run_dir, "tensorboard"))
    assert scalars["train/loss"] == [(1, 2.5), (2, 1.5)]
    assert scalars["eval/eval_accuracy"] == [(2, 0.75)]
    assert scalars["train/learning_rate"] == [(1, pytest.approx(1e-5))]


def test_resumed_run_appends_to_the_same_jsonl(tmp_path):
    with MetricsWriter(str(tmp_path), enabled=True, total_steps=4, backends=()) as writer:
        writer.write(1, {"train/loss": 1.0})
    with MetricsWriter(str(tmp_path), enabled=True, total_steps=4, backends=()) as writer:
        writer.write(2, {"train/loss": 0.5})
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_disabled_writer_creates_no_files(tmp_path):
    run_dir = tmp_path / "rank1"
    writer = MetricsWriter(str(run_dir), enabled=False, total_steps=10)
    writer.write(1, {"train/loss": 1.0})
    assert writer.console(1, {"train/loss": 1.0}) is None
    writer.close()
    assert not run_dir.exists()


def test_bad_values_and_backends_are_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"logger_backends: unknown backend\(s\) \['mlflow'\]; known: tensorboard, "
                                         "wandb, swanlab"):
        MetricsWriter(str(tmp_path), enabled=False, total_steps=1, backends=("tensorboard", "mlflow"))
    writer = MetricsWriter(str(tmp_path), enabled=True, total_steps=1, backends=())
    with pytest.raises(ValueError, match="'train/loss'"):
        writer.write(1, {"train/loss": "low"})
    with pytest.raises(ValueError, match="'train/loss'"):
        writer.write(1, {"train/loss": torch.ones(2)})
    writer.close()


def test_console_line_shows_progress_and_eta_from_recent_steps(tmp_path):
    clock = FakeClock()
    writer = MetricsWriter(str(tmp_path), enabled=True, total_steps=1000, backends=(), window=3, clock=clock)
    first = writer.console(10, {"train/loss": 0.43125, "train/learning_rate": 1e-5, "perf/tokens_per_sec": 12345.6})
    assert first == "step 10/1000 (1.0%) | loss 0.4313 | lr 1.00e-05 | tok/s 12,346 | ETA --"

    clock.now += 100.0  # a slow (compiling) interval: 10 s/step
    writer.console(20, {})
    clock.now += 20.0  # then 2 s/step
    line = writer.console(30, {"perf/mfu": 0.412})
    assert writer.seconds_per_step() == pytest.approx(6.0)  # (120 s) / (20 steps) over the window
    assert line == "step 30/1000 (3.0%) | mfu 41.2% | 6.00 s/step | ETA 1h37m"

    clock.now += 20.0
    line = writer.console(40, {})
    assert writer.seconds_per_step() == pytest.approx(2.0)  # the compile interval left the 3-line window
    assert line.endswith("2.00 s/step | ETA 32m00s")

    clock.now += 30.0  # an eval line for the same step is not a step
    assert writer.console(40, {"eval/eval_accuracy": 0.5}).startswith("step 40/1000 (4.0%) | eval_acc 0.5000")
    assert writer.seconds_per_step() == pytest.approx(2.0)
    clock.now += 20.0
    writer.console(50, {})
    assert writer.seconds_per_step() == pytest.approx(3.5)  # the eval pause counts in the next interval

    clock.now += 1.0
    writer.console(5, {})  # restarted from an earlier checkpoint: the old window is dropped
    assert "ETA --" in writer.console(5, {})
    writer.close()


@pytest.mark.parametrize(
    "seconds,text",
    [(0, "0s"), (44.6, "45s"), (60, "1m00s"), (725, "12m05s"), (3600, "1h00m"), (10_920, "3h02m"),
     (187_200, "2d04h"), (float("nan"), "--"), (float("inf"), "--"), (-1, "--")],
)
def test_format_eta(seconds, text):
    assert format_eta(seconds) == text


def test_elapsed_continues_in_a_resumed_run_and_restarts_in_a_fresh_one(tmp_path):
    clock = FakeClock()
    with MetricsWriter(str(tmp_path), enabled=True, total_steps=9, backends=(), clock=clock) as writer:
        clock.now += 5.0
        writer.write(1, {"train/loss": 1.0})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "time/elap')  # a killed process's half line
    with MetricsWriter(str(tmp_path), enabled=True, total_steps=9, backends=(), clock=clock, resume=True) as writer:
        clock.now += 2.0
        writer.write(2, {"train/loss": 0.5})
    with MetricsWriter(str(tmp_path), enabled=True, total_steps=9, backends=(), clock=clock, resume=False) as writer:
        clock.now += 1.0
        writer.write(1, {"train/loss": 1.0})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert lines[1] == '{"step": 2, "time/elap'  # the cut line stays alone: the resumed run's lines parse
    assert [json.loads(lines[i])["time/elapsed"] for i in (0, 2, 3)] == [5.0, 7.0, 1.0]  # 5 s + 2 s; fresh: 1 s
