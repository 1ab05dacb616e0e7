"""Helpers only the tests use (the builders the demo shares live in vlm_sft/demo/)."""
import tempfile

import transformers

from vlm_sft.demo import qwen2_5_vl, tokenizer


def build_qwen_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """Qwen2.5-VL's tokenizer (152k BPE, special tokens at their real ids), built offline from qwen.tiktoken.

    Loaded by AutoTokenizer from Hub-format files, so it is the object a real model directory yields (a
    Qwen2Tokenizer). The files are built once per process (~3 s); each call returns a fresh tokenizer (~1 s).
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.write_qwen_tokenizer_files(tmp, chat_template=qwen2_5_vl.QWEN2_5_VL_CHAT_TEMPLATE)
        return transformers.AutoTokenizer.from_pretrained(tmp)
