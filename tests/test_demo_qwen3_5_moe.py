"""The `:demo,qwen3_5_moe` config: a tiny random Qwen3.5-MoE shaped as the Hub ships Qwen3.5-35B-A3B, trained by
the real entry point."""
import json
import os
import subprocess
import sys

import pytest
import safetensors

from configs_loader import CONFIG, load_config
from vlm_sft import demo
from vlm_sft.demo import qwen3_5_moe

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_qwen3_5_moe_builds_a_hub_shaped_qwen3_5_moe(tmp_path):
    config = load_config("demo,qwen3_5_moe")
    assert (config.actor.model.model_type, config.runner.logger.experiment_name) == \
        ("qwen3_5_moe", "demo_qwen3_5_moe")
    config.data.demo_rows = 16
    demo.prepare_demo(config, str(tmp_path))
    model_dir = tmp_path / "demo_assets" / "model"
    hub_config = json.loads((model_dir / "config.json").read_text())
    assert hub_config == qwen3_5_moe.hub_config()
    text = hub_config["text_config"]
    assert (hub_config["model_type"], text["model_type"]) == ("qwen3_5_moe", "qwen3_5_moe_text")
    assert text["layer_types"] == ["linear_attention"] * 3 + ["full_attention"]
    assert "intermediate_size" not in text and text["shared_expert_intermediate_size"] == 80
    names = {p.name for p in model_dir.iterdir()}
    assert {"chat_template.jinja", "preprocessor_config.json", "tokenizer.json", "generation_config.json",
            "model.safetensors.index.json"} <= names
    weight_map = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    stored = {}
    for shard in set(weight_map.values()):
        with safetensors.safe_open(str(model_dir / shard), "pt") as f:
            stored.update({k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()})
    assert stored.keys() == weight_map.keys() and {d for d, _ in stored.values()} == {"BF16"}
    layer = "model.language_model.layers.0.mlp."
    assert stored[layer + "experts.gate_up_proj"][1] == [8, 96, 64]  # [E, 2I, H]
    assert stored[layer + "shared_expert_gate.weight"][1] == [1, 64]
    assert "lm_head.weight" in stored  # untied, as the 35B-A3B
    with pytest.raises(ValueError, match="variants qwen3, qwen3_moe, qwen3_5 and qwen3_5_moe name different"):
        load_config("demo,qwen3_5,qwen3_5_moe")


@pytest.mark.slow
def test_demo_qwen3_5_moe_learns(tmp_path):
    """The README's Qwen3.5-MoE demo command (its first 50 of 150 steps, the same schedule) reaches eval accuracy
    1.0 from 0.0 before training, logging the router's aux loss and load."""
    out = subprocess.run([sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo,qwen3_5_moe",
                          f"--config.runner.logger.log_path={tmp_path}", "--config.runner.max_steps=50",
                          "--config.actor.optim.total_training_steps=150", "--config.runner.val_check_interval=50",
                          "--config.runner.save_interval=50"], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "demo_qwen3_5_moe" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train = [l for l in lines if "train/loss" in l]
    evals = [l for l in lines if "eval/eval_accuracy" in l]
    assert train[-1]["train/loss"] < 0.1 * train[0]["train/loss"]
    assert evals[0]["eval/eval_accuracy"] == 0.0 and evals[-1]["eval/eval_accuracy"] == 1.0
    assert evals[-1]["eval/rows"] == 64
    assert all("train/aux_loss" in l and l["moe/max_expert_load"] >= 1.0 for l in train)
