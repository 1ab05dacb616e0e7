"""The `:demo,video` variant end to end: generated clips whose answer needs the frames in order reach eval
accuracy 1.0, and the blank-video control (same rows, grey clips) stays near chance (1 in 4)."""
import json
import os
import subprocess
import sys

import pytest

from configs_loader import CONFIG


def run_demo(tmp_path, *extra):
    args = [sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo,video",
            f"--config.runner.logger.log_path={tmp_path / 'runs'}", "--config.data.demo_rows=256",
            "--config.runner.val_before_train=False", "--config.runner.val_check_interval=0",
            "--config.runner.save_interval=0", *extra]
    out = subprocess.run(args, capture_output=True, text=True, timeout=900,
                         env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "runs" / "demo_video" / "metrics.jsonl") as f:
        evals = [line for line in map(json.loads, f) if "eval/eval_accuracy" in line]
    return evals[-1]


@pytest.mark.slow
def test_video_demo_reaches_full_accuracy(tmp_path):
    final = run_demo(tmp_path)
    assert final["eval/rows"] == 32 and final["eval/eval_accuracy"] == 1.0, final


@pytest.mark.slow
def test_blank_video_control_stays_near_chance(tmp_path):
    final = run_demo(tmp_path, "--config.data.demo_blank_video=True", "--config.runner.max_steps=60")
    assert final["eval/rows"] == 32 and final["eval/eval_accuracy"] <= 0.5, final
