"""The `:demo,qwen3_moe` config: a tiny random Qwen3-VL-MoE shaped as the Hub ships Qwen3-VL-30B-A3B, trained by
the real entry point."""
import json
import os
import subprocess
import sys

import pytest
import safetensors

from vlm_sft import demo
from configs_loader import CONFIG, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_qwen3_moe_builds_a_hub_shaped_qwen3_vl_moe(tmp_path):
    config = load_config("demo,qwen3_moe")
    assert (config.actor.model.model_type, config.runner.logger.experiment_name) == ("qwen3_vl_moe",
                                                                                     "demo_qwen3_moe")
    assert config.actor.model.router_aux_loss_coef is None  # the directory's (0: it sets no output_router_logits)
    config.data.demo_rows = 16
    demo.prepare_demo(config, str(tmp_path))
    model_dir = tmp_path / "demo_assets" / "model"
    hub_config = json.loads((model_dir / "config.json").read_text())
    assert hub_config == demo.tiny_qwen3_vl_moe_hub_config()
    text = hub_config["text_config"]
    assert (hub_config["model_type"], text["model_type"], hub_config["vision_config"]["model_type"]) == (
        "qwen3_vl_moe", "qwen3_vl_moe_text", "qwen3_vl_moe")
    assert (text["num_experts"], text["num_experts_per_tok"], text["mlp_only_layers"], text["norm_topk_prob"],
            text["output_router_logits"]) == (8, 2, [1], True, False)
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.language_model.layers.0.mlp.experts.down_proj"
    with safetensors.safe_open(str(model_dir / index[name]), "pt") as f:
        assert list(f.get_slice(name).get_shape()) == [8, 48, 64]  # [E, I, H]: 4.57's layout, not 5.x's [E, H, I]
        assert str(f.get_slice(name).get_dtype()) == "BF16"
    assert "model.language_model.layers.1.mlp.gate_proj.weight" in index  # the dense layer


@pytest.mark.slow
def test_demo_qwen3_moe_learns(tmp_path):
    """The demo command (its first 50 of 150 steps, the same schedule) trains the tiny MoE to eval accuracy 1.0,
    logging the router's aux loss and load."""
    out = subprocess.run([sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo,qwen3_moe",
                          f"--config.runner.logger.log_path={tmp_path}", "--config.runner.max_steps=50",
                          "--config.actor.optim.total_training_steps=150", "--config.runner.val_check_interval=50"],
                         cwd=REPO, capture_output=True, text=True, timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    with open(tmp_path / "demo_qwen3_moe" / "metrics.jsonl") as f:
        lines = [json.loads(line) for line in f]
    train = [l for l in lines if "train/loss" in l]
    evals = [l for l in lines if "eval/eval_accuracy" in l]
    assert train[-1]["train/loss"] < 0.05 * train[0]["train/loss"]
    assert all("train/aux_loss" in l and l["moe/max_expert_load"] >= 1.0 for l in train)
    assert evals[0]["eval/eval_accuracy"] < 1.0 and evals[-1]["eval/eval_accuracy"] == 1.0
