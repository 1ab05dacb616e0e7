"""A tiny random Qwen3.5 (dense) directory laid out as the Hub ships Qwen3.5 (Qwen/Qwen3.5-9B's layout, scaled down).

What is kept from the real files: the nested config.json (text_config with `layer_types` mixing linear_attention
and full_attention every 4th layer, the Gated DeltaNet sizes with twice as many value heads as key heads, gated
attention with head_dim != hidden / heads, partial interleaved M-RoPE in rope_parameters; vision_config with the old
"qwen3_5" model_type the Hub files carry and no DeepStack), Qwen3.5's token ids (image 248056, video 248057, vision
start/end 248053/248054, <|endoftext|> 248044, <|im_end|> 248046, <think> 248068, vocab_size 248320), bf16 shards
under the in-memory names plus model.safetensors.index.json, chat_template.jinja (Qwen3.5's: thinking by default;
`enable_thinking=False` renders the empty think block), preprocessor / video preprocessor configs naming
Qwen3VLProcessor.

What is not: no package here ships Qwen3.5's 248k BPE, so the tokenizer is Qwen's 151,643 BPE ranks (qwen.tiktoken),
inert filler entries up to 248,043, then Qwen3.5's special tokens at their real ids, with Qwen3.5's pre-tokenizer
split. Text encodes to other ids than the real tokenizer's; every special token is where the real one is.
"""
from __future__ import annotations

import copy
import functools
import json
import os
import pathlib
import tempfile

import torch
import transformers

from vlm_sft.demo import hub, qwen3_vl
from vlm_sft.demo.tokenizer import (QWEN3_ADDED_TOKENS, _qwen_backend_tokenizer, _qwen_tokenizer_config,
                                     _qwen_vocab_and_merges, hub_tokenizer_files)

MODEL_TYPE = "qwen3_5"  # actor.model.model_type
SPECIAL_BASE = 248044  # <|endoftext|>: Qwen3.5's first special token (Qwen3's 151643, shifted)
VOCAB_SIZE = 248320
# Qwen3's added tokens in Qwen3's order at Qwen3.5's ids: (id, content, special).
ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = tuple(
    (SPECIAL_BASE + i, content, special) for i, (_, content, special) in enumerate(QWEN3_ADDED_TOKENS))
IMAGE_TOKEN_ID, VIDEO_TOKEN_ID, VISION_START_ID, VISION_END_ID = 248056, 248057, 248053, 248054

# Qwen3.5's pre-tokenizer split (transformers' Qwen3_5Tokenizer): letters take their combining marks (\p{M}).
PRETOKENIZE_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")

# Qwen3.5's chat template (chat_template.jinja): no default system turn; thinking by default, so the generation
# prompt opens "<think>\n" unless enable_thinking=False (then an empty think block); an assistant turn after the
# last user query renders its (possibly empty) reasoning inside <think>...</think>; XML-style tool calls.
CHAT_TEMPLATE = """{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- macro render_content(content, do_vision_count, is_system_content=false) %}
    {%- if content is string %}
        {{- content }}
    {%- elif content is iterable and content is not mapping %}
        {%- for item in content %}
            {%- if 'image' in item or 'image_url' in item or item.type == 'image' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain images.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set image_count.value = image_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Picture ' ~ image_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|image_pad|><|vision_end|>' }}
            {%- elif 'video' in item or item.type == 'video' %}
                {%- if is_system_content %}
                    {{- raise_exception('System message cannot contain videos.') }}
                {%- endif %}
                {%- if do_vision_count %}
                    {%- set video_count.value = video_count.value + 1 %}
                {%- endif %}
                {%- if add_vision_id %}
                    {{- 'Video ' ~ video_count.value ~ ': ' }}
                {%- endif %}
                {{- '<|vision_start|><|video_pad|><|vision_end|>' }}
            {%- elif 'text' in item %}
                {{- item.text }}
            {%- else %}
                {{- raise_exception('Unexpected item type in content.') }}
            {%- endif %}
        {%- endfor %}
    {%- elif content is none or content is undefined %}
        {{- '' }}
    {%- else %}
        {{- raise_exception('Unexpected content type.') }}
    {%- endif %}
{%- endmacro %}
{%- if not messages %}
    {{- raise_exception('No messages provided.') }}
{%- endif %}
{%- if tools and tools is iterable and tools is not mapping %}
    {{- '<|im_start|>system\\n' }}
    {{- "# Tools\\n\\nYou have access to the following functions:\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>" }}
    {{- '\\n\\nIf you choose to call a function ONLY reply in the following format with NO suffix:\\n\\n<tool_call>\\n<function=example_function_name>\\n<parameter=example_parameter_1>\\nvalue_1\\n</parameter>\\n</function>\\n</tool_call>' }}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {%- if content %}
            {{- '\\n\\n' + content }}
        {%- endif %}
    {%- endif %}
    {{- '<|im_end|>\\n' }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {%- set content = render_content(messages[0].content, false, true)|trim %}
        {{- '<|im_start|>system\\n' + content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" %}
        {%- set content = render_content(message.content, false)|trim %}
        {%- if not(content.startswith('<tool_response>') and content.endswith('</tool_response>')) %}
            {%- set ns.multi_step_tool = false %}
            {%- set ns.last_query_index = index %}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if ns.multi_step_tool %}
    {{- raise_exception('No user query found in messages.') }}
{%- endif %}
{%- for message in messages %}
    {%- set content = render_content(message.content, true)|trim %}
    {%- if message.role == "system" %}
        {%- if not loop.first %}
            {{- raise_exception('System message must be at the beginning.') }}
        {%- endif %}
    {%- elif message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- set reasoning_content = reasoning_content|trim %}
        {%- if loop.index0 > ns.last_query_index %}
            {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content + '\\n</think>\\n\\n' + content }}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls and message.tool_calls is iterable and message.tool_calls is not mapping %}
            {%- for tool_call in message.tool_calls %}
                {%- if tool_call.function is defined %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {%- if loop.first %}
                    {%- if content|trim %}
                        {{- '\\n\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                    {%- else %}
                        {{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                    {%- endif %}
                {%- else %}
                    {{- '\\n<tool_call>\\n<function=' + tool_call.name + '>\\n' }}
                {%- endif %}
                {%- if tool_call.arguments is defined %}
                    {%- for args_name, args_value in tool_call.arguments|items %}
                        {{- '<parameter=' + args_name + '>\\n' }}
                        {%- set args_value = args_value | tojson | safe if args_value is mapping or (args_value is sequence and args_value is not string) else args_value | string %}
                        {{- args_value }}
                        {{- '\\n</parameter>\\n' }}
                    {%- endfor %}
                {%- endif %}
                {{- '</function>\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.previtem and loop.previtem.role != "tool" %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if not loop.last and loop.nextitem.role != "tool" %}
            {{- '<|im_end|>\\n' }}
        {%- elif loop.last %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- else %}
        {{- raise_exception('Unexpected message role.') }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- else %}
        {{- '<think>\\n' }}
    {%- endif %}
{%- endif %}"""

# Qwen3.5's preprocessor_config.json / video_preprocessor_config.json: Qwen3-VL's image processing (patch 16,
# mean/std 0.5, the pixel budget as size {shortest_edge, longest_edge}), processor_class Qwen3VLProcessor.
PREPROCESSOR_CONFIG = dict(qwen3_vl.QWEN3_VL_PREPROCESSOR_CONFIG)
VIDEO_PREPROCESSOR_CONFIG = dict(qwen3_vl.QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG)

GENERATION_CONFIG = {
    "bos_token_id": SPECIAL_BASE,
    "pad_token_id": SPECIAL_BASE,
    "do_sample": True,
    "eos_token_id": [SPECIAL_BASE + 2, SPECIAL_BASE],  # <|im_end|>, <|endoftext|>
    "temperature": 0.6,
    "top_k": 20,
    "top_p": 0.95,
    "transformers_version": "4.57.0.dev0",
}


# The text model's zero-centred (x * (1 + w)) RMSNorms (not the Gated DeltaNet's plain `weight * x` norm).
ZERO_CENTRED_NORMS = ("layernorm.weight", "q_norm.weight", "k_norm.weight", "language_model.norm.weight")


def hub_config(*, tie_word_embeddings: bool = True, text_hidden: int = 64, text_layers: int = 4,
               full_attention_interval: int = 4, text_heads: int = 4, text_kv_heads: int = 2,
               text_head_dim: int = 64, text_intermediate: int = 128, linear_key_heads: int = 2,
               linear_value_heads: int = 4, linear_head_dim: int = 16, vision_hidden: int = 32,
               vision_depth: int = 2, vision_heads: int = 2, vision_intermediate: int = 64,
               num_position_embeddings: int = 64) -> dict:
    """config.json of Qwen3.5-9B with the sizes scaled down and the structure kept: `layer_types` linear except
    every `full_attention_interval`-th layer; value heads = 2x key heads in the linear layers; head_dim 64 with
    1/4 of it rotated, interleaved M-RoPE sections (t, h, w) over the rotated pairs."""
    if text_layers < full_attention_interval:
        raise ValueError(f"text_layers {text_layers} < full_attention_interval {full_attention_interval}: both "
                         "layer kinds must be present")
    pairs = int(text_head_dim * 0.25) // 2   # rotated pairs: 32 of the 9B's 256-dim heads, split [11, 11, 10]
    th = -(-pairs // 3)
    if pairs - 2 * th < 1:
        raise ValueError(f"text_head_dim {text_head_dim}: too few rotated pairs ({pairs}) for t, h and w sections")
    return {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "image_token_id": IMAGE_TOKEN_ID,
        "model_type": "qwen3_5",
        "text_config": {
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_output_gate": True,
            "dtype": "bfloat16",
            "eos_token_id": SPECIAL_BASE,
            "full_attention_interval": full_attention_interval,
            "head_dim": text_head_dim,
            "hidden_act": "silu",
            "hidden_size": text_hidden,
            "initializer_range": 0.02,
            "intermediate_size": text_intermediate,
            "layer_types": ["full_attention" if (i + 1) % full_attention_interval == 0 else "linear_attention"
                            for i in range(text_layers)],
            "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": linear_head_dim,
            "linear_num_key_heads": linear_key_heads,
            "linear_num_value_heads": linear_value_heads,
            "linear_value_head_dim": linear_head_dim,
            "max_position_embeddings": 262144,
            "model_type": "qwen3_5_text",
            "num_attention_heads": text_heads,
            "num_hidden_layers": text_layers,
            "num_key_value_heads": text_kv_heads,
            "rms_norm_eps": 1e-06,
            "rope_parameters": {
                "mrope_interleaved": True,
                "mrope_section": [th, th, pairs - 2 * th],
                "partial_rotary_factor": 0.25,
                "rope_theta": 10000000,
                "rope_type": "default",
            },
            "use_cache": True,
            "vocab_size": VOCAB_SIZE,
        },
        "tie_word_embeddings": tie_word_embeddings,
        "transformers_version": "4.57.0.dev0",
        "video_token_id": VIDEO_TOKEN_ID,
        "vision_config": {
            "depth": vision_depth,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_size": vision_hidden,
            "in_channels": 3,
            "initializer_range": 0.02,
            "intermediate_size": vision_intermediate,
            "model_type": "qwen3_5",
            "num_heads": vision_heads,
            "num_position_embeddings": num_position_embeddings,
            "out_hidden_size": text_hidden,
            "patch_size": 16,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        "vision_end_token_id": VISION_END_ID,
        "vision_start_token_id": VISION_START_ID,
    }


@functools.cache
def _tokenizer_files() -> dict[str, bytes]:
    """tokenizer.json, tokenizer_config.json, vocab.json, merges.txt (built once per process): Qwen's BPE ranks
    padded with inert fillers up to Qwen3.5's special-token base, its added tokens and pre-tokenizer split."""
    vocab, merges = _qwen_vocab_and_merges()
    vocab = dict(vocab)
    for i in range(len(vocab), SPECIAL_BASE):  # inert fillers: no merge ever produces them
        vocab[f"<|fixture_filler_{i}|>"] = i
    tok = _qwen_backend_tokenizer(ADDED_TOKENS, vocab=vocab, merges=merges, pretokenize_regex=PRETOKENIZE_REGEX)
    with tempfile.TemporaryDirectory() as tmp:
        tok.save(os.path.join(tmp, "tokenizer.json"))
        tokenizer_json = pathlib.Path(tmp, "tokenizer.json").read_bytes()
    return hub_tokenizer_files(tokenizer_json, _qwen_tokenizer_config(ADDED_TOKENS, None, 262144), vocab, merges)


def make_tiny_qwen3_5_dir(path: str | os.PathLike, *, seed: int = 0, tie_word_embeddings: bool = True,
                          **shape) -> str:
    """Writes a tiny random Qwen3.5 (dense) directory in the Hub's layout (module docstring); `shape`: the size
    keywords of hub_config. Deterministic in `seed`; the global torch RNG is left untouched."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    raw = hub_config(tie_word_embeddings=tie_word_embeddings, **shape)
    config = transformers.Qwen3_5Config.from_dict(copy.deepcopy(raw))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = transformers.Qwen3_5ForConditionalGeneration(config)
        # transformers zero-initialises the (1 + w) RMSNorms; random ones make a tiny model's norms matter.
        for name, p in model.named_parameters():
            if name.endswith(ZERO_CENTRED_NORMS):
                p.data.normal_(0.0, 0.1)
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tie_word_embeddings:
            continue
        if not name.startswith(("model.visual.", "model.language_model.", "lm_head.")):
            raise ValueError(f"unexpected Qwen3.5 parameter name {name!r}")
        state[name] = tensor.detach().to(torch.bfloat16).contiguous()
    hub.write_hub_shards(path, state, first_shard_prefix="model.language_model.")
    (path / "config.json").write_text(json.dumps(raw, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(PREPROCESSOR_CONFIG, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(VIDEO_PREPROCESSOR_CONFIG, indent=2))
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    for name, data in _tokenizer_files().items():
        (path / name).write_bytes(data)
    return str(path)


BUILD = make_tiny_qwen3_5_dir
