"""The `:demo,qwen3` config: a tiny random Qwen3-VL shaped as the Hub ships it, trained by the real entry point."""
import json
import os
import subprocess
import sys

import pytest

from vlm_sft import demo
from configs_loader import CONFIG, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_qwen3_builds_a_hub_shaped_qwen3_vl(tmp_path):
    config = load_config("demo,qwen3")
    assert (config.actor.model.model_type, config.runner.logger.experiment_name) == ("qwen3_vl", "demo_qwen3")
    assert (config.data.min_pixels, config.data.max_pixels) == (64 * 64, 64 * 64)
    config.data.demo_rows = 16
    demo.prepare_demo(config, str(tmp_path))
    model_dir = tmp_path / "demo_assets" / "model"
    assert config.actor.model.model_path == str(model_dir)
    assert config.data.train_data_paths == config.data.eval_data_paths == str(tmp_path / "demo_assets" / "data")
    hub_config = json.loads((model_dir / "config.json").read_text())
    assert hub_config == demo.tiny_qwen3_vl_hub_config()  # Qwen3-VL-2B-Instruct's layout, scaled down
    assert (model_dir / "video_preprocessor_config.json").is_file() and (model_dir / "chat_template.json").is_file()
    with pytest.raises(ValueError, match="model_type='llava': no tiny model builder .*qwen3_vl"):
        demo.make_tiny_model_dir_for("llava", tmp_path / "llava")


def test_unknown_variant_is_named():
    with pytest.raises(ValueError, match=r"unknown variant\(s\) \['qwen4'\]; known: demo, eval, qwen3"):
        load_config("demo,qwen4")


@pytest.mark.slow
def test_demo_qwen3_learns(tmp_path):
    """The README's Qwen3-VL demo command (its first 50 of 150 steps, the same schedule: ~25 s instead of ~60)
    trains to eval accuracy 1.0, as the Qwen2.5-VL demo does."""
    out = subprocess.run([sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo,qwen3",
                          f"--config.runner.logger.log_path={tmp_path}", "--config.runner.max_steps=50",
                          "--config.actor.optim.total_training_steps=150", "--config.runner.val_check_interval=50"],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "ImageOnlyQwen3VLProcessor" in out.stderr  # the log names the processing path
    with open(tmp_path / "demo_qwen3" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train = [l for l in lines if "train/loss" in l]
    evals = [l for l in lines if "eval/eval_accuracy" in l]
    assert train[-1]["train/loss"] < 0.05 * train[0]["train/loss"]
    assert evals[0]["eval/eval_accuracy"] == 0.0 and evals[-1]["eval/eval_accuracy"] == 1.0
    assert evals[-1]["eval/rows"] == 64
