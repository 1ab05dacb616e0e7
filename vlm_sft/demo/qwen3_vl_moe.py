"""A tiny random Qwen3-VL-MoE directory laid out as the Hub ships Qwen3-VL-30B-A3B-Instruct: Qwen3-VL's nested
config.json with the MoE fields, bfloat16 shards whose stacked experts are transposed as transformers 4.57 wrote
them, and Qwen3-VL's tokenizer, chat template and processor configs (demo/qwen3_vl.py)."""
import copy
import json
import os
import pathlib

import torch
import transformers

from vlm_sft.demo import hub
from vlm_sft.demo.qwen3_vl import (QWEN3_VL_CHAT_TEMPLATE, QWEN3_VL_GENERATION_CONFIG, QWEN3_VL_PREPROCESSOR_CONFIG,
                                   QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG, tiny_qwen3_vl_hub_config)
from vlm_sft.demo.tokenizer import QWEN3_ADDED_TOKENS, write_qwen_tokenizer_files

MODEL_TYPE = "qwen3_vl_moe"  # actor.model.model_type


def tiny_qwen3_vl_moe_hub_config(*, tie_word_embeddings: bool = False, num_experts: int = 8,
                                 num_experts_per_tok: int = 2, moe_intermediate: int = 48,
                                 mlp_only_layers: tuple[int, ...] = (1,), decoder_sparse_step: int = 1,
                                 output_router_logits: bool = False, router_aux_loss_coef: float = 0.001,
                                 **shape) -> dict:
    """config.json of Qwen3-VL-30B-A3B-Instruct as transformers 4.57 wrote it (Qwen3-VL's nesting; model types
    qwen3_vl_moe / qwen3_vl_moe_text; num_experts, num_experts_per_tok, moe_intermediate_size, norm_topk_prob,
    decoder_sparse_step, mlp_only_layers, router_aux_loss_coef, output_router_logits in text_config; untied
    lm_head), scaled down. Unlike the 30B (every layer sparse) one layer is dense by default (mlp_only_layers), so
    both decoder block kinds are present. moe_intermediate * 2 and moe_intermediate differ from the hidden size,
    as in the 30B: transformers decides whether to transpose the Hub's experts by comparing shapes."""
    config = tiny_qwen3_vl_hub_config(tie_word_embeddings=tie_word_embeddings, **shape)
    hidden = config["text_config"]["hidden_size"]
    if hidden in (moe_intermediate, 2 * moe_intermediate):
        raise ValueError(f"moe_intermediate {moe_intermediate}: it and twice it must differ from the hidden size "
                         f"{hidden} (as in the 30B), else the Hub's transposed experts load untransposed")
    config["architectures"] = ["Qwen3VLMoeForConditionalGeneration"]
    config["model_type"] = "qwen3_vl_moe"
    config["vision_config"]["model_type"] = "qwen3_vl_moe"
    config["text_config"].update({
        "model_type": "qwen3_vl_moe_text", "decoder_sparse_step": decoder_sparse_step,
        "mlp_only_layers": list(mlp_only_layers), "moe_intermediate_size": moe_intermediate,
        "norm_topk_prob": True, "num_experts": num_experts, "num_experts_per_tok": num_experts_per_tok,
        "output_router_logits": output_router_logits, "router_aux_loss_coef": router_aux_loss_coef})
    config["text_config"] = dict(sorted(config["text_config"].items()))
    return config


def make_tiny_qwen3_vl_moe_dir(path: str | os.PathLike, *, seed: int = 0, **shape) -> str:
    """Writes a tiny random Qwen3-VL-MoE directory laid out like the Hub's Qwen3-VL-30B-A3B-Instruct: bf16 shards
    + index under the in-memory names, except the stacked experts, which 4.57 wrote transposed
    (`mlp.experts.gate_up_proj` [E, H, 2I], `mlp.experts.down_proj` [E, I, H]); Qwen3-VL's tokenizer, processor
    and chat template. `shape`: tiny_qwen3_vl_moe_hub_config's keywords. The router starts 10x larger than the
    init so that routing depends on the token from the first step. Deterministic in `seed`."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hub_config = tiny_qwen3_vl_moe_hub_config(**shape)
    config = transformers.Qwen3VLMoeConfig.from_dict(copy.deepcopy(hub_config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3VLMoeForConditionalGeneration(config)
    tied = hub_config["tie_word_embeddings"]
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        if not name.startswith(("model.visual.", "model.language_model.", "lm_head.")):
            raise ValueError(f"unexpected Qwen3-VL-MoE parameter name {name!r}")
        if name.endswith("mlp.gate.weight"):
            tensor = tensor * 10
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            tensor = tensor.transpose(-2, -1)
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    hub.write_hub_shards(path, state, first_shard_prefix="model.language_model.")
    (path / "config.json").write_text(json.dumps(hub_config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(QWEN3_VL_GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR_CONFIG, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=2))
    write_qwen_tokenizer_files(path, chat_template=QWEN3_VL_CHAT_TEMPLATE, added_tokens=QWEN3_ADDED_TOKENS,
                               model_max_length=262144)
    return str(path)


BUILD = make_tiny_qwen3_vl_moe_dir
