"""Checkpoint -> a Hugging Face model directory that transformers, vLLM and SGLang load as they load the Hub's.

  python -m vlm_sft.export --checkpoint <run>/checkpoints/step_N --output_dir <dir> [--dtype bf16|fp32]
                           [--overwrite] [--model_path <base model dir>]

The directory holds the params under their Hub names (the family's: Qwen2.5-VL ships `model.language_model.X` as
`model.X` and `model.visual.X` as `visual.X`, Qwen3-VL under the in-memory names; `lm_head.weight` only when
untied) in safetensors shards (+ model.safetensors.index.json when there is more than one), the base model's
config.json and generation_config.json, and the processor files (tokenizer, image processor with the run's pixel
budget, chat template).

Why read the DCP checkpoint instead of gathering live params: it needs no GPU and no process group, works for a
checkpoint saved on any number of ranks, and holds at most one output shard in host memory at a time (DCP reads
just the tensors of that shard, resharding them to full tensors), so a 72B model exports on a small machine.
The directory is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import uuid
from typing import Any

import safetensors.torch
import torch

from vlm_sft import checkpoint
from vlm_sft import models

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # the Hub's usual shard size
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


class ExportError(ValueError):
    """The export cannot be written as asked; the message names the flag or file."""


def hub_name(name: str, family: models.Family) -> str:
    """In-memory (transformers 5) param name -> its name in the Hub's safetensors files of that family."""
    try:
        return family.hub_name(name)
    except ValueError as e:
        raise ExportError(str(e)) from None


def plan_shards(sizes: list[tuple[str, int]], max_shard_bytes: int) -> list[list[str]]:
    """Consecutive groups of names whose byte sizes sum to at most max_shard_bytes (a bigger tensor goes alone)."""
    shards: list[list[str]] = [[]]
    total = 0
    for name, size in sizes:
        if shards[-1] and total + size > max_shard_bytes:
            shards.append([])
            total = 0
        shards[-1].append(name)
        total += size
    return [s for s in shards if s]


def _check_output_dir(output_dir: str, overwrite: bool) -> None:
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ExportError(f"--output_dir {output_dir!r} exists and is not a directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise ExportError(f"--output_dir {output_dir!r} exists and is not empty; pass --overwrite to replace it")


def _base_model_dir(ckpt: str, model_path: str | None) -> tuple[str, dict]:
    """The base model directory (config.json, tokenizer) and the data config recorded with the checkpoint."""
    with open(os.path.join(ckpt, checkpoint.CONFIG)) as f:
        config = json.load(f)
    path = model_path or config.get("actor", {}).get("model", {}).get("model_path", "")
    flag = "--model_path" if model_path else f"actor.model.model_path recorded in {ckpt}/config.json"
    if not path or not os.path.isfile(os.path.join(path, "config.json")):
        raise ExportError(f"{flag}={path!r}: not a Hugging Face model directory (no config.json); the export "
                          "takes config, generation config and processor files from it: pass --model_path")
    return path, config.get("data", {})


def _load_base_config(base: str, saved: dict) -> tuple[Any, models.Family]:
    """The base directory's config and family, checked against the checkpoint: the same param names and shapes
    (a wrong --model_path would otherwise give a directory that does not load). Names the first tensor that
    differs."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(base, local_files_only=True)
    try:
        family = models.family_for_model_type(config.model_type, f"{base}/config.json")
    except models.ModelLoadError as e:
        raise ExportError(str(e)) from None
    with torch.device("meta"):  # shapes only, no memory
        module = family.hf_class()(config)
    expected = {name: tuple(p.shape) for name, p in module.named_parameters()}  # tied: no lm_head.weight
    for name, (_, entry) in saved.items():
        if name not in expected:
            raise ExportError(f"checkpoint tensor {name!r} does not exist in the model of {base}/config.json "
                              f"(tie_word_embeddings={config.tie_word_embeddings}): wrong base model directory?")
        if tuple(entry.size) != expected[name]:
            raise ExportError(f"checkpoint tensor {name!r} has shape {list(entry.size)} but {base}/config.json "
                              f"makes it {list(expected[name])}: wrong base model directory?")
    missing = [name for name in expected if name not in saved]
    if missing:
        raise ExportError(f"the checkpoint lacks {missing[0]!r}, which the model of {base}/config.json has "
                          f"(tie_word_embeddings={config.tie_word_embeddings}): wrong base model directory?")
    return config, family


def _write_config(base: str, config: Any, out: str, dtype: torch.dtype) -> None:
    """The base config.json as shipped (so every reader that loads the base loads this), with the new dtype."""
    import transformers

    with open(os.path.join(base, "config.json")) as f:
        raw = json.load(f)
    for d in (raw, raw.get("text_config")):
        if isinstance(d, dict):
            key = "torch_dtype" if "torch_dtype" in d else "dtype"
            d[key] = _DTYPE_NAMES[dtype]
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(raw, f, indent=2)
    generation = os.path.join(base, "generation_config.json")
    if os.path.isfile(generation):
        shutil.copyfile(generation, os.path.join(out, "generation_config.json"))
    else:
        transformers.GenerationConfig.from_model_config(config).save_pretrained(out)


def _write_weights(ckpt: str, saved: dict, out: str, dtype: torch.dtype | None, max_shard_bytes: int,
                   family: models.Family) -> torch.dtype:
    """Safetensors shards of the checkpoint's params (`saved`: checkpoint.saved_params), one shard in memory at a
    time. Returns the dtype written."""
    names = {name: hub_name(name, family) for name in saved}
    dtypes = {dtype or entry.properties.dtype for _, entry in saved.values()}
    if len(dtypes) != 1:
        raise ExportError(f"--checkpoint {ckpt!r}: params are saved in several dtypes {sorted(map(str, dtypes))}; "
                          "pass --dtype")
    out_dtype = dtypes.pop()
    sizes = [(name, entry.size.numel() * out_dtype.itemsize) for name, (_, entry) in saved.items()]
    shards = plan_shards(sizes, max_shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        flat = {saved[name][0]: torch.empty(saved[name][1].size, dtype=saved[name][1].properties.dtype)
                for name in shard}
        checkpoint.load_flat(ckpt, flat, partial=True, no_dist=True)  # reads only this shard's tensors
        tensors = {names[name]: flat[saved[name][0]].to(out_dtype).contiguous() for name in shard}
        safetensors.torch.save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update({hub: file for hub in tensors})
        del flat, tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return out_dtype


def export_checkpoint(ckpt: str, output_dir: str, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                      model_path: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> str:
    """Writes the params of checkpoint `ckpt` as a Hugging Face directory at output_dir; returns output_dir.

    dtype None keeps the saved (master) dtype, so the export is exactly what was trained. `model_path`
    overrides the base model directory recorded in the checkpoint's config (config and processor files)."""
    from vlm_sft.data.processor import load_processor

    try:
        checkpoint.check_complete(ckpt)
    except checkpoint.CheckpointError as e:
        raise ExportError(f"--checkpoint: {e}") from None
    _check_output_dir(output_dir, overwrite)
    base, data = _base_model_dir(ckpt, model_path)
    saved = checkpoint.saved_params(ckpt)
    if not saved:
        raise ExportError(f"--checkpoint {ckpt!r}: the checkpoint holds no params")
    config, family = _load_base_config(base, saved)
    tmp = f"{os.path.normpath(output_dir)}.tmp-{uuid.uuid4().hex[:12]}"
    os.makedirs(tmp)
    try:
        written = _write_weights(ckpt, saved, tmp, dtype, max_shard_bytes, family)
        _write_config(base, config, tmp, written)
        processor = load_processor(base, min_pixels=data.get("min_pixels"), max_pixels=data.get("max_pixels"))
        processor.save_pretrained(tmp)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vlm_sft.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint directory, <run>/checkpoints/step_N")
    parser.add_argument("--output_dir", required=True, help="where to write the Hugging Face directory")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="weights dtype (default: as saved, i.e. the fp32 master weights)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty output_dir")
    parser.add_argument("--model_path", default=None,
                        help="base model directory (default: actor.model.model_path of the checkpoint's config)")
    args = parser.parse_args(argv)
    import transformers
    transformers.utils.logging.set_verbosity_error()
    try:
        out = export_checkpoint(args.checkpoint, args.output_dir, dtype=DTYPES.get(args.dtype),
                                overwrite=args.overwrite, model_path=args.model_path)
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(cli())
