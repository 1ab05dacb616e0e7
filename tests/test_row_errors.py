"""A row the processor cannot take (here a 3000x10 image: aspect ratio 300 > 200), found as a new user would, in a
JSONL row during training: under data.bad_rows="error" the run ends in one line naming the row and the reason
(whether the row was encoded in the main process or in a data worker), under "skip" it is skipped and counted."""
import json
import os
import subprocess
import sys

import PIL.Image
import pytest

from configs_loader import CONFIG


def _write_rows(path, n=16, bad_row=3):
    path.mkdir()
    for i in range(n):
        size = (3000, 10) if i == bad_row else (56, 56)
        PIL.Image.new("RGB", size, (200, 30, 30) if i % 2 else (30, 30, 200)).save(path / f"{i}.png")
    with open(path / "train.jsonl", "w") as f:
        for i in range(n):
            f.write(json.dumps({"question": "Which colour?", "choices": ["red", "blue"],
                                "correct_answer": "A" if i % 2 else "B", "image": f"{i}.png"}) + "\n")
    return path / "train.jsonl"


def _run(tmp_path, model_dir, data, *extra):
    args = [f"--config={CONFIG}:demo", f"--config.runner.logger.log_path={tmp_path / 'runs'}",
            f"--config.actor.model.model_path={model_dir}", f"--config.data.train_data_paths={data}",
            "--config.data.eval_data_paths=", "--config.data.shuffle=False", "--config.runner.max_steps=1",
            "--config.runner.val_before_train=False", "--config.runner.save_interval=0", *extra]
    return subprocess.run([sys.executable, "-m", "vlm_sft.main", *args], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


@pytest.mark.parametrize("workers", [pytest.param(2, id="in_worker"), pytest.param(0, id="in_main",
                                                                                    marks=pytest.mark.slow)])
def test_unprocessable_image_is_one_bad_row_line(tmp_path, tiny_model_dir, workers):
    data = _write_rows(tmp_path / "data")
    out = _run(tmp_path, tiny_model_dir, data, f"--config.data.num_workers={workers}")
    assert out.returncode not in (0, None), out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {data}:4: image(s) of 3000x10 pixels") and "aspect ratio" in last, last


@pytest.mark.slow
def test_unprocessable_image_is_skipped_and_counted(tmp_path, tiny_model_dir):
    data = _write_rows(tmp_path / "data")
    out = _run(tmp_path, tiny_model_dir, data, "--config.data.bad_rows=skip", "--config.data.num_workers=2")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{data}:4" in out.stderr, out.stderr[-3000:]
