"""A tiny random Qwen3-VL (dense) directory laid out exactly as the Hub ships Qwen3-VL-2B-Instruct (nested
config.json, bfloat16 shards, Qwen3's tokenizer, Qwen3-VL's own chat template, image and video processor configs)."""
import copy
import json
import os
import pathlib

import torch
import transformers

from vlm_sft.demo import hub
from vlm_sft.demo.tokenizer import QWEN3_ADDED_TOKENS, write_qwen_tokenizer_files

MODEL_TYPE = "qwen3_vl"  # actor.model.model_type


# Qwen3-VL-2B/4B/8B-Instruct's chat template (chat_template.json on the Hub). Unlike Qwen2.5-VL's it adds NO default
# system turn: a conversation without a system message starts straight at "<|im_start|>user\n".
QWEN3_VL_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Qwen3-VL-*-Instruct's preprocessor_config.json: patch 16, mean/std 0.5, the pixel budget as size {shortest_edge,
# longest_edge} (no min_pixels/max_pixels keys), and the torchvision-backed "Fast" image processor named.
QWEN3_VL_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}

# Qwen3-VL-*-Instruct's video_preprocessor_config.json (read only where torchvision works; the trainer uses images).
QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG = {
    "size": {"longest_edge": 25165824, "shortest_edge": 4096},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "video_processor_type": "Qwen3VLVideoProcessor",
}

# Qwen3-VL-*-Instruct's generation_config.json (sampling defaults; the evaluator asks for greedy itself).
QWEN3_VL_GENERATION_CONFIG = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "top_k": 20,
    "top_p": 0.8,
    "repetition_penalty": 1.0,
    "temperature": 0.7,
    "transformers_version": "4.56.0",
}


def _interleaved_mrope_section(head_dim: int) -> list[int]:
    """Qwen3-VL's [24, 20, 20] split of head_dim/2 = 64 rotary pairs (t, h, w), scaled to head_dim.

    With mrope_interleaved, h takes pairs 1, 4, 7, ... and w pairs 2, 5, 8, ... (3 * section each), t the rest.
    """
    half = head_dim // 2
    hw = 5 * half // 16
    return [half - 2 * hw, hw, hw]


def tiny_qwen3_vl_hub_config(
    *,
    tie_word_embeddings: bool = True,
    text_hidden: int = 64,
    text_layers: int = 3,
    text_heads: int = 4,
    text_kv_heads: int = 2,
    text_head_dim: int = 32,
    text_intermediate: int = 128,
    vision_hidden: int = 32,
    vision_depth: int = 4,
    vision_heads: int = 2,
    vision_intermediate: int = 64,
    num_position_embeddings: int = 64,
    deepstack_visual_indexes: list[int] | None = None,
) -> dict:
    """config.json of Qwen3-VL-2B-Instruct as transformers 4.57 wrote it (nested text_config / vision_config,
    rope_theta and rope_scaling {mrope_interleaved, mrope_section} inside text_config, vision model_type
    "qwen3_vl"), with the sizes scaled down but the structure kept: an explicit head_dim with heads * head_dim !=
    hidden (as the 4B's 32 x 128 != 2560), interleaved M-RoPE sections summing to head_dim / 2, three DeepStack
    layers inside the vision depth (the 4B's [5, 11, 17] of 24 -> [0, 1, 2] of 4), a square learned position grid.
    """
    if text_head_dim % 8 or text_heads % text_kv_heads:
        raise ValueError(f"text_head_dim {text_head_dim} must be a multiple of 8 and text_heads {text_heads} a "
                         f"multiple of text_kv_heads {text_kv_heads}")
    if vision_hidden % vision_heads or (vision_hidden // vision_heads) % 4:
        raise ValueError(f"vision_hidden {vision_hidden} / vision_heads {vision_heads}: head dim must be a "
                         "multiple of 4")
    side = round(num_position_embeddings ** 0.5)
    if side * side != num_position_embeddings or side < 2:
        raise ValueError(f"num_position_embeddings {num_position_embeddings}: expected a square >= 4 (a side x side "
                         "grid, as the real 2304 = 48 x 48)")
    if deepstack_visual_indexes is None:
        deepstack_visual_indexes = [(k + 1) * vision_depth // 4 - 1 for k in range(3)]  # 24 -> [5, 11, 17]
    deepstack_visual_indexes = list(deepstack_visual_indexes)
    if (sorted(set(deepstack_visual_indexes)) != deepstack_visual_indexes
            or not all(0 <= i < vision_depth for i in deepstack_visual_indexes)):
        raise ValueError(f"deepstack_visual_indexes {deepstack_visual_indexes}: expected increasing vision layer "
                         f"indexes in [0, {vision_depth}) (vision_depth {vision_depth} >= 4 by default)")
    return {
        "architectures": ["Qwen3VLForConditionalGeneration"],
        "image_token_id": 151655,
        "model_type": "qwen3_vl",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "dtype": "bfloat16",
            "eos_token_id": 151645,
            "head_dim": text_head_dim,
            "hidden_act": "silu",
            "hidden_size": text_hidden,
            "initializer_range": 0.02,
            "intermediate_size": text_intermediate,
            "max_position_embeddings": 262144,
            "model_type": "qwen3_vl_text",
            "num_attention_heads": text_heads,
            "num_hidden_layers": text_layers,
            "num_key_value_heads": text_kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_scaling": {
                "mrope_interleaved": True,
                "mrope_section": _interleaved_mrope_section(text_head_dim),
                "rope_type": "default",
            },
            "rope_theta": 5000000,
            "tie_word_embeddings": tie_word_embeddings,
            "use_cache": True,
            "vocab_size": 151936,
        },
        "tie_word_embeddings": tie_word_embeddings,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": 151656,
        "vision_config": {
            "deepstack_visual_indexes": deepstack_visual_indexes,
            "depth": vision_depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": vision_hidden,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": vision_intermediate,
            "model_type": "qwen3_vl",
            "num_heads": vision_heads,
            "num_position_embeddings": num_position_embeddings,
            "out_hidden_size": text_hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": 151653,
        "vision_start_token_id": 151652,
    }


def make_tiny_qwen3_vl_dir(path: str | os.PathLike, *, seed: int = 0, tie_word_embeddings: bool = True,
                           **shape) -> str:
    """Writes a tiny random Qwen3-VL (dense) directory laid out exactly like the Hub's Qwen3-VL-2B-Instruct.

    `shape`: the size keywords of tiny_qwen3_vl_hub_config. Weights are bfloat16 under the Hub's names (for Qwen3-VL
    the in-memory transformers names: `model.visual.*`, `model.language_model.*`, `lm_head.weight` only when
    untied) in two shards plus model.safetensors.index.json; chat_template.json holds Qwen3-VL's own template (no
    default system prompt); the tokenizer is Qwen3's (Qwen2.5's 152k BPE plus <think> etc.). Deterministic in
    `seed`; the global torch RNG is left untouched.
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hub_config = tiny_qwen3_vl_hub_config(tie_word_embeddings=tie_word_embeddings, **shape)
    config = transformers.Qwen3VLConfig.from_dict(copy.deepcopy(hub_config))  # from_dict edits nested dicts
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3VLForConditionalGeneration(config)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        if not name.startswith(("model.visual.", "model.language_model.", "lm_head.")):
            raise ValueError(f"unexpected Qwen3-VL parameter name {name!r}")
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()

    # Two shards like the 4B: the language model first, the vision tower (and an untied lm_head) second.
    hub.write_hub_shards(path, state, first_shard_prefix="model.language_model.")

    (path / "config.json").write_text(json.dumps(hub_config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(QWEN3_VL_GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR_CONFIG, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=2))
    write_qwen_tokenizer_files(path, chat_template=QWEN3_VL_CHAT_TEMPLATE, added_tokens=QWEN3_ADDED_TOKENS,
                               model_max_length=262144)
    return str(path)


BUILD = make_tiny_qwen3_vl_dir


