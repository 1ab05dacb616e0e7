"""Helpers only the tests use (the builders the demo shares live in vlm_sft/demo/)."""
import copy
import json
import pathlib
import tempfile

import torch
import transformers

from vlm_sft import demo
from vlm_sft import models as model_lib
from vlm_sft.demo import qwen2_5_vl, tokenizer
from vlm_sft.demo.hub import write_hub_shards


def build_qwen_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """Qwen2.5-VL's tokenizer (152k BPE, special tokens at their real ids), built offline from qwen.tiktoken.

    Loaded by AutoTokenizer from Hub-format files, so it is the object a real model directory yields (a
    Qwen2Tokenizer). The files are built once per process (~3 s); each call returns a fresh tokenizer (~1 s).
    """
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.write_qwen_tokenizer_files(tmp, chat_template=qwen2_5_vl.QWEN2_5_VL_CHAT_TEMPLATE)
        return transformers.AutoTokenizer.from_pretrained(tmp)


def write_wide_qwen2_5_vl_dir(path: pathlib.Path, *, text_hidden: int = 256, text_layers: int = 40,
                              text_intermediate: int = 8192, vision_hidden: int = 512) -> int:
    """A Qwen2.5-VL of a few hundred million params (config.json, the demo's processor files, bf16 shards) for
    memory tests, with Qwen's 152k vocabulary (the demo tokenizer's, so it can be trained and evaluated) in a tied
    embedding no larger than a few of its decoder layers; returns the param count. Default: hidden 256, 40 layers
    of an 8192-wide MLP, ~330M params."""
    demo.make_tiny_model_dir(path)  # the processor and generation files; config and weights replaced below
    hub = demo.tiny_hub_config(tie_word_embeddings=True, text_hidden=text_hidden, text_layers=text_layers,
                               text_heads=4, text_kv_heads=2, text_intermediate=text_intermediate,
                               vision_hidden=vision_hidden, vision_depth=8, vision_heads=8,
                               vision_intermediate=4 * vision_hidden)
    (path / "config.json").write_text(json.dumps(hub))
    with torch.device("meta"):
        module = transformers.Qwen2_5_VLForConditionalGeneration(transformers.Qwen2_5_VLConfig.from_dict(hub))
    g = torch.Generator().manual_seed(0)
    state = {model_lib.qwen2_5_vl.hub_name(n): (torch.randn(p.shape, generator=g) * 0.02).to(torch.bfloat16)
             for n, p in module.named_parameters()}
    write_hub_shards(path, state, first_shard_prefix="visual.")
    return sum(p.numel() for p in module.parameters())


def in_float64(params: dict, hf: torch.nn.Module, batch: dict) -> tuple[dict, torch.nn.Module, dict]:
    """float64 copies for holding our loss and gradients to transformers': (leaves that require grad, a copy of
    the HF module, the batch). In fp32 a trained model's gradients differ from HF's by up to ~1e-4 on some elements
    with the reduction order alone (2 threads instead of 1, or another CPU's kernels, was enough in CI), so an fp32
    tolerance either flakes or hides real errors; in fp64 the two agree to ~1e-13 and 1e-5 is an order-proof
    margin."""
    leaves = {k: v.detach().double().requires_grad_() for k, v in params.items()}
    return leaves, copy.deepcopy(hf).double(), float64_batch(batch)


def float64_batch(batch: dict) -> dict:
    """The batch with its floating-point tensors (pixels, label weights) in float64; indices unchanged."""
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}
