"""Model families behind one small interface (common.Family), registered by model type.

  qwen2_5_vl.py   Qwen2.5-VL (actor.model.model_type "qwen2.5_vl", config.json "qwen2_5_vl")
  qwen3_vl.py     Qwen3-VL dense ("qwen3_vl")
  qwen3_5.py      Qwen3.5 dense ("qwen3_5"): hybrid Gated DeltaNet / gated attention decoder (linear_attention.py)
  qwen3_vl_moe.py Qwen3-VL-MoE ("qwen3_vl_moe"; experts: moe.py)
  qwen3_5_moe.py  Qwen3.5-MoE ("qwen3_5_moe"): Qwen3.5's hybrid decoder with sparse MLPs and a gated shared expert

A family gives: the HF class to load a Hub directory into a skeleton + fp32 params, the functional forward to final
hidden states through the block_call hook, the param groups, the host-side vision precompute collate calls, the
Hub tensor names for export and the FLOP model's shape. Evaluation generates with the HF module's own `generate`
(the family's rope and cache) under the trained params. Nothing outside models/ (and the family precompute in
data/vision.py) branches on the family: a third family is one more module registered here.
"""
from __future__ import annotations

import json
import os
from typing import Any

import torch

from vlm_sft.errors import ModelLoadError
from vlm_sft.models import qwen2_5_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe
from vlm_sft.models.common import (Batch, BlockCall, Family, FlopShape, Model, Params, forward_hidden,
                                   forward_hidden_aux, label_logits, model_from_module, plain_block_call, token_nll,
                                   token_nll_aux)

FAMILIES: tuple[Family, ...] = (qwen2_5_vl.FAMILY, qwen3_vl.FAMILY, qwen3_vl_moe.FAMILY, qwen3_5.FAMILY,
                                qwen3_5_moe.FAMILY)

__all__ = ["Batch", "BlockCall", "FAMILIES", "Family", "FlopShape", "Model", "ModelLoadError", "Params",
           "check_model_dir", "check_model_type", "family_for_config", "family_for_model_type", "family_named",
           "forward_hidden", "forward_hidden_aux",
           "label_logits", "load_model", "model_from_module", "plain_block_call", "token_nll", "token_nll_aux"]


def _supported() -> str:
    return ", ".join(f"{f.name!r} (config.json model_type {f.model_type!r})" for f in FAMILIES)


def family_named(name: str) -> Family:
    """The family of an actor.model.model_type value."""
    for f in FAMILIES:
        if f.name == name:
            return f
    raise ModelLoadError(f"actor.model.model_type={name!r}: unsupported; vlm-sft supports {_supported()}")


def family_for_model_type(model_type: str | None, where: str) -> Family:
    """The family of a config.json model_type; `where` names the file for the error."""
    for f in FAMILIES:
        if f.model_type == model_type:
            return f
    raise ModelLoadError(f"{where}: model_type is {model_type!r}; vlm-sft supports {_supported()}")


def family_for_config(config: Any) -> Family:
    """The family of a loaded transformers config."""
    return family_for_model_type(config.model_type, "the model config")


def check_model_type(name: str) -> Family:
    """actor.model.model_type names a supported family (a config check: no file is read)."""
    return family_named(name)


def check_model_dir(path: str, model_type: str | None = None) -> Family:
    """Cheap checks before any heavy work: the directory exists and holds the config and weights of a supported
    family, the one `model_type` (actor.model.model_type) names when given. Returns the family."""
    field = "actor.model.model_path"
    if not path:
        raise ModelLoadError(f"{field} is empty: set it to a local Hugging Face model directory")
    if not os.path.isdir(path):
        raise ModelLoadError(f"{field}={path!r}: no such directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ModelLoadError(f"{field}={path!r}: directory is not readable")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelLoadError(f"{field}={path!r}: no config.json (not a Hugging Face model directory)")
    if not any(f.endswith(".safetensors") or f.endswith(".bin") for f in os.listdir(path)):
        raise ModelLoadError(f"{field}={path!r}: no *.safetensors weights")
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    found = raw.get("model_type")
    family = family_for_model_type(found, f"{field}={path!r}")
    if model_type is not None and family_named(model_type) is not family:
        raise ModelLoadError(f"actor.model.model_type={model_type!r} but {path}/config.json has model_type "
                             f"{found!r} (actor.model.model_type={family.name!r}); vlm-sft supports {_supported()}")
    family.check_config(raw, path)
    return family


def load_model(path: str, *, attn_implementation: str = "sdpa", model_type: str | None = None
               ) -> tuple[Model, Params]:
    """Load a local Hub directory of a supported family; returns the model skeleton and fp32 master params."""
    family = check_model_dir(path, model_type)
    module, info = family.hf_class().from_pretrained(
        path, dtype=torch.float32, attn_implementation=attn_implementation, local_files_only=True,
        output_loading_info=True)
    missing = [k for k in info.get("missing_keys", []) if "lm_head" not in k]
    if missing:
        raise ModelLoadError(f"actor.model.model_path={path!r}: weights missing for {len(missing)} tensors, "
                             f"first {missing[0]!r}")
    return model_from_module(module, family)
