"""A tiny random Qwen2.5-VL directory laid out exactly as the Hub ships Qwen2.5-VL-3B-Instruct (flat config.json,
bfloat16 shards under the Hub's tensor names, Qwen2.5's tokenizer, chat template, image processor config)."""
import copy
import json
import os
import pathlib

import torch
import transformers

from vlm_sft.demo import hub
from vlm_sft.demo.tokenizer import write_qwen_tokenizer_files

MODEL_TYPE = "qwen2.5_vl"  # actor.model.model_type

# Qwen2-VL / Qwen2.5-VL chat template as shipped in the Hub's chat_template.json (no {% generation %} markers).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2.5-VL-3B-Instruct's preprocessor_config.json.
QWEN2_5_VL_PREPROCESSOR_CONFIG = {
    "min_pixels": 3136,
    "max_pixels": 12845056,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}

# Qwen2.5-VL-3B-Instruct's generation_config.json (sampling defaults: an evaluator must ask for greedy itself).
QWEN2_5_VL_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.1,
    "top_p": 0.001,
    "top_k": 1,
    "transformers_version": "4.49.0",
}

def _mrope_section(head_dim: int) -> list[int]:
    """Qwen2.5-VL's [16, 24, 24] split of head_dim/2 = 64 rotary pairs (t, h, w), scaled to head_dim."""
    half = head_dim // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def tiny_hub_config(
    *,
    tie_word_embeddings: bool = True,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
) -> dict:
    """config.json of Qwen2.5-VL-3B-Instruct (the Hub's flat format) with the sizes scaled down."""
    if text_hidden % text_heads or (text_hidden // text_heads) % 8:
        raise ValueError(f"text_hidden {text_hidden} / text_heads {text_heads}: head dim must be a multiple of 8")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise ValueError(f"vision_hidden {vision_hidden} / vision_heads {vision_heads}: head dim must be a "
                         "multiple of 4")
    return {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "vision_start_token_id": 151652,
        "vision_end_token_id": 151653,
        "vision_token_id": 151654,
        "image_token_id": 151655,
        "video_token_id": 151656,
        "hidden_act": "silu",
        "hidden_size": text_hidden,
        "initializer_range": 0.02,
        "intermediate_size": text_intermediate,
        "max_position_embeddings": 128000,
        "max_window_layers": 70,
        "model_type": "qwen2_5_vl",
        "num_attention_heads": text_heads,
        "num_hidden_layers": text_layers,
        "num_key_value_heads": text_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0,
        "sliding_window": 32768,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.41.2",
        "use_cache": True,
        "use_sliding_window": False,
        "vision_config": {
            "depth": vision_depth,
            "hidden_act": "silu",
            "hidden_size": vision_hidden,
            "intermediate_size": vision_intermediate,
            "num_heads": vision_heads,
            "in_chans": 3,
            "out_hidden_size": text_hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "spatial_patch_size": 14,
            "window_size": 112,
            # Full attention every 8th block and in the last one, like the 3B's [7, 15, 23, 31].
            "fullatt_block_indexes": [i for i in range(vision_depth) if (i + 1) % 8 == 0 or i == vision_depth - 1],
            "tokens_per_second": 2,
            "temporal_patch_size": 2,
        },
        "rope_scaling": {"type": "mrope", "mrope_section": _mrope_section(text_hidden // text_heads)},
        "vocab_size": 151936,
    }


def _hub_tensor_name(name: str) -> str:
    """In-memory transformers 5 name -> the name in the Hub's safetensors (Qwen2.5-VL-3B-Instruct)."""
    if name.startswith("model.visual."):
        return name[len("model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name == "lm_head.weight":
        return name
    raise ValueError(f"unexpected Qwen2.5-VL parameter name {name!r}")



def make_tiny_model_dir(
    path: str | os.PathLike,
    *,
    tie_word_embeddings: bool = True,
    seed: int = 0,
    text_hidden: int = 64,
    text_layers: int = 2,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_intermediate: int = 128,
    vision_hidden: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    tokenizer: str = "qwen",
) -> pathlib.Path:
    """Writes a tiny random Qwen2.5-VL directory laid out exactly like the Hub's Qwen2.5-VL-3B-Instruct.

    Weights are bfloat16 with Hub tensor names in two shards plus model.safetensors.index.json; `lm_head.weight` is
    stored only when untied. Deterministic in `seed`; the global torch RNG is left untouched.
    """
    if tokenizer != "qwen":
        raise ValueError(f"tokenizer={tokenizer!r}: only 'qwen' (Qwen2.5's 152k vocabulary) is supported")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hub_config = tiny_hub_config(
        tie_word_embeddings=tie_word_embeddings, text_hidden=text_hidden, text_layers=text_layers,
        text_heads=text_heads, text_kv_heads=text_kv_heads, text_intermediate=text_intermediate,
        vision_hidden=vision_hidden, vision_depth=vision_depth, vision_heads=vision_heads,
        vision_intermediate=vision_intermediate,
    )

    # from_dict edits nested dicts in place (rope_scaling); keep ours as the Hub writes it.
    config = transformers.Qwen2_5_VLConfig.from_dict(copy.deepcopy(hub_config))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen2_5_VLForConditionalGeneration(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        state[_hub_tensor_name(name)] = tensor.detach().to(torch.bfloat16).contiguous()

    # Two shards like the Hub: the text model first, the vision tower (and an untied lm_head) second.
    hub.write_hub_shards(path, state, first_shard_prefix="model.")

    (path / "config.json").write_text(json.dumps(hub_config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(QWEN2_5_VL_GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN2_5_VL_PREPROCESSOR_CONFIG, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, indent=2))
    write_qwen_tokenizer_files(path, chat_template=QWEN2_5_VL_CHAT_TEMPLATE)
    return path


BUILD = make_tiny_model_dir


