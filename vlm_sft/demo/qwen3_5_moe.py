"""A tiny random Qwen3.5-MoE directory laid out as Qwen3.5-35B-A3B's, scaled down: Qwen3.5's nested config.json
(demo/qwen3_5.py: `layer_types` with both mixer kinds, Qwen3.5's token ids) with the MoE fields in text_config
(model types qwen3_5_moe / qwen3_5_moe_text; num_experts, num_experts_per_tok, moe_intermediate_size,
shared_expert_intermediate_size, router_aux_loss_coef, output_router_logits; no dense intermediate_size), bf16
shards + index with the experts stacked under transformers 5's names, and Qwen3.5's tokenizer, chat template and
processor files (the same fixture tokenizer as demo/qwen3_5.py)."""
from __future__ import annotations

import copy
import json
import os
import pathlib

import torch
import transformers

from vlm_sft.demo import hub, qwen3_5

MODEL_TYPE = "qwen3_5_moe"  # actor.model.model_type


def hub_config(*, tie_word_embeddings: bool = False, num_experts: int = 8, num_experts_per_tok: int = 2,
               moe_intermediate: int = 48, shared_expert_intermediate: int = 80, output_router_logits: bool = False,
               router_aux_loss_coef: float = 0.001, **shape) -> dict:
    """config.json of Qwen3.5-35B-A3B with the sizes scaled down (`shape`: qwen3_5.hub_config's size keywords;
    untied lm_head as the 35B)."""
    config = qwen3_5.hub_config(tie_word_embeddings=tie_word_embeddings, **shape)
    config["architectures"] = ["Qwen3_5MoeForConditionalGeneration"]
    config["model_type"] = "qwen3_5_moe"
    config["vision_config"]["model_type"] = "qwen3_5_moe"
    text = config["text_config"]
    del text["intermediate_size"]
    text.update({"model_type": "qwen3_5_moe_text", "moe_intermediate_size": moe_intermediate,
                 "shared_expert_intermediate_size": shared_expert_intermediate, "num_experts": num_experts,
                 "num_experts_per_tok": num_experts_per_tok, "output_router_logits": output_router_logits,
                 "router_aux_loss_coef": router_aux_loss_coef})
    config["text_config"] = dict(sorted(text.items()))
    return config


def make_tiny_qwen3_5_moe_dir(path: str | os.PathLike, *, seed: int = 0, **shape) -> str:
    """Writes a tiny random Qwen3.5-MoE directory (module docstring); `shape`: hub_config's keywords. The
    zero-initialised (1 + w) norms are randomised as in demo/qwen3_5.py, and the router starts 10x larger than the
    init so that routing depends on the token from the first step. Deterministic in `seed`."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = hub_config(**shape)
    config = transformers.Qwen3_5MoeConfig.from_dict(copy.deepcopy(raw))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3_5MoeForConditionalGeneration(config)
        for name, p in model.named_parameters():
            if name.endswith(qwen3_5.ZERO_CENTRED_NORMS):
                p.data.normal_(0.0, 0.1)
    tied = raw["tie_word_embeddings"]
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        if not name.startswith(("model.visual.", "model.language_model.", "lm_head.")):
            raise ValueError(f"unexpected Qwen3.5-MoE parameter name {name!r}")
        if name.endswith("mlp.gate.weight"):
            tensor = tensor * 10
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    hub.write_hub_shards(path, state, first_shard_prefix="model.language_model.")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    (path / "generation_config.json").write_text(json.dumps(qwen3_5.GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(qwen3_5.PREPROCESSOR_CONFIG, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(qwen3_5.VIDEO_PREPROCESSOR_CONFIG, indent=2))
    (path / "chat_template.jinja").write_text(qwen3_5.CHAT_TEMPLATE)
    for name, data in qwen3_5._tokenizer_files().items():
        (path / name).write_bytes(data)
    return str(path)


BUILD = make_tiny_qwen3_5_moe_dir
