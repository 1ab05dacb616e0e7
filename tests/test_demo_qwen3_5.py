"""The `:demo,qwen3_5` config: a tiny random Qwen3.5 shaped as the Hub ships it, trained by the real entry point."""
import json
import os
import subprocess
import sys

import pytest
import safetensors

from configs_loader import CONFIG, load_config
from vlm_sft import demo
from vlm_sft.demo import qwen3_5

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_qwen3_5_builds_a_hub_shaped_qwen3_5(tmp_path):
    config = load_config("demo,qwen3_5")
    assert (config.actor.model.model_type, config.runner.logger.experiment_name) == ("qwen3_5", "demo_qwen3_5")
    config.data.demo_rows = 16
    demo.prepare_demo(config, str(tmp_path))
    model_dir = tmp_path / "demo_assets" / "model"
    assert config.actor.model.model_path == str(model_dir)
    hub_config = json.loads((model_dir / "config.json").read_text())
    assert hub_config == qwen3_5.hub_config()
    text = hub_config["text_config"]
    assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert (text["vocab_size"], hub_config["image_token_id"], hub_config["vision_config"]["model_type"]) == \
        (248320, 248056, "qwen3_5")
    names = {p.name for p in model_dir.iterdir()}
    assert {"chat_template.jinja", "preprocessor_config.json", "video_preprocessor_config.json", "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "model.safetensors.index.json"} <= names
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for shard in set(weight_map.values()):
        with safetensors.safe_open(str(model_dir / shard), "pt") as f:
            stored.update({k: f.get_slice(k).get_dtype() for k in f.keys()})
    assert stored.keys() == weight_map.keys() and set(stored.values()) == {"BF16"}
    assert "model.language_model.layers.0.linear_attn.conv1d.weight" in stored
    assert "lm_head.weight" not in stored  # tied
    with pytest.raises(ValueError, match="variants qwen3, qwen3_moe, qwen3_5 and qwen3_5_moe name different model families"):
        load_config("demo,qwen3,qwen3_5")


@pytest.mark.slow
def test_demo_qwen3_5_learns(tmp_path):
    """The README's Qwen3.5 demo command (its first 50 of 150 steps, the same schedule) reaches eval accuracy 1.0
    from 0.0 before training."""
    out = subprocess.run([sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo,qwen3_5",
                          f"--config.runner.logger.log_path={tmp_path}", "--config.runner.max_steps=50",
                          "--config.actor.optim.total_training_steps=150", "--config.runner.val_check_interval=50",
                          "--config.runner.save_interval=50"], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "demo_qwen3_5" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train = [l for l in lines if "train/loss" in l]
    evals = [l for l in lines if "eval/eval_accuracy" in l]
    assert train[-1]["train/loss"] < 0.1 * train[0]["train/loss"]
    assert evals[0]["eval/eval_accuracy"] == 0.0 and evals[-1]["eval/eval_accuracy"] == 1.0
    assert evals[-1]["eval/rows"] == 64
