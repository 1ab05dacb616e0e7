"""Checkpoint -> a Hugging Face model directory that transformers, vLLM and SGLang load as they load the Hub's.

  python -m vlm_sft.export --checkpoint <run>/checkpoints/step_N --output_dir <dir> [--dtype bf16|fp32]
                           [--overwrite] [--model_path <base model dir>] [--adapter_only] [--max_shard_size 5GB]

The directory holds the params under their Hub names (the family's: Qwen2.5-VL ships `model.language_model.X` as
`model.X` and `model.visual.X` as `visual.X`, Qwen3-VL under the in-memory names; `lm_head.weight` only when
untied) in safetensors shards (+ model.safetensors.index.json when there is more than one), the base model's
config.json and generation_config.json, and the processor files (tokenizer, image processor with the run's pixel
budget, chat template).

Why read the DCP checkpoint instead of gathering live params: it needs no GPU and no process group, works for a
checkpoint saved on any number of ranks, and holds at most one output shard in host memory at a time (DCP reads
just the tensors of that shard, resharding them to full tensors), so a 72B model exports on a small machine.
The directory is written under a temporary name and renamed when complete.

A checkpoint of a run with frozen parts or LoRA holds only the trained leaves (checkpoint.trained_state): the
frozen weights are read from the base model directory (checked to be the run's: checkpoint.check_base_model), and
LoRA adapters are merged, W + alpha/r * B @ A in fp32. `--adapter_only` writes PEFT's format instead
(adapter_config.json + adapter_model.safetensors), which `peft.PeftModel.from_pretrained(base, dir)` loads onto
the untouched base model.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from typing import Any

import safetensors.torch
import torch
from absl import app, flags, logging

from vlm_sft import checkpoint, hostmem, loading
from vlm_sft import lora as lora_lib
from vlm_sft import models
from vlm_sft.errors import ExportError

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024 ** 3  # the Hub's usual shard size
_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16"}


_UNITS = {"B": 1, "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12,
          "KIB": 2 ** 10, "MIB": 2 ** 20, "GIB": 2 ** 30, "TIB": 2 ** 40}


def parse_shard_size(value: str | int) -> int:
    """transformers' max_shard_size: bytes as an int, or "5GB" (10^9), "500MB", "2GiB" (2^30), ..."""
    if isinstance(value, int):
        size = value
    else:
        text = str(value).strip().upper().replace(" ", "")
        unit = next((u for u in sorted(_UNITS, key=len, reverse=True) if text.endswith(u)), "")
        try:
            size = int(float(text[:len(text) - len(unit)]) * _UNITS.get(unit, 1))
        except ValueError:
            raise ExportError(f"--max_shard_size={value!r}: expected a size like 5GB, 500MB or 2GiB") from None
    if size <= 0:
        raise ExportError(f"--max_shard_size={value!r}: expected a positive size")
    return size


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


def _load_base_config(base: str, saved: dict, *, partial: bool = False
                      ) -> tuple[Any, models.Family, dict[str, tuple]]:
    """The base directory's config, family and param shapes, checked against the checkpoint: the same param names
    and shapes (a wrong --model_path would otherwise give a directory that does not load). Names the first tensor
    that differs. `partial`: the checkpoint holds only trained leaves (the rest come from the base weights)."""
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
        if lora_lib.is_adapter(name):
            continue
        if name not in expected:
            raise ExportError(f"checkpoint tensor {name!r} does not exist in the model of {base}/config.json "
                              f"(tie_word_embeddings={config.tie_word_embeddings}): wrong base model directory?")
        if tuple(entry.size) != expected[name]:
            raise ExportError(f"checkpoint tensor {name!r} has shape {list(entry.size)} but {base}/config.json "
                              f"makes it {list(expected[name])}: wrong base model directory?")
    missing = [name for name in expected if name not in saved]
    if missing and not partial:
        raise ExportError(f"the checkpoint lacks {missing[0]!r}, which the model of {base}/config.json has "
                          f"(tie_word_embeddings={config.tie_word_embeddings}): wrong base model directory?")
    return config, family, expected


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


class _BaseWeights:
    """Reads single params of the base model directory's safetensors files by in-memory name, in any layout the
    sharded loader reads (loading.read_params: the Hub's names and layout, the in-memory ones, one tensor per
    expert)."""

    def __init__(self, base: str, family: models.Family):
        self.files = loading.weight_files(base)
        self.base, self.family = base, family

    def read(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        shape = tuple(shape)
        try:
            return dict(loading.read_params(self.base, self.family, {name: (shape, 0, shape[0] if shape else 0,
                                                                          None)}, self.files))[name]
        except models.ModelLoadError as e:
            raise ExportError(f"{self.base}: {e} (a frozen leaf the checkpoint does not hold): wrong base model "
                              "directory?") from None


def _write_weights(ckpt: str, saved: dict, out: str, dtype: torch.dtype | None, max_shard_bytes: int, *,
                   expected: dict[str, tuple], base: str, family: models.Family, lora_scale: float | None
                   ) -> torch.dtype:
    """Safetensors shards of the model's params (`expected`: name -> shape, in model order), one shard in memory
    at a time: each from the checkpoint (`saved`: checkpoint.saved_params) or, when the checkpoint holds only
    trained leaves, from the base weights; LoRA adapters merged in. Returns the dtype written."""
    names = {name: hub_name(name, family) for name in expected}
    dtypes = {dtype or entry.properties.dtype for name, (_, entry) in saved.items() if not lora_lib.is_adapter(name)}
    if not dtypes:  # LoRA: only adapters saved; the merged weights take the adapters' (master) dtype
        dtypes = {dtype or entry.properties.dtype for _, entry in saved.values()}
    if len(dtypes) != 1:
        raise ExportError(f"--checkpoint {ckpt!r}: params are saved in several dtypes {sorted(map(str, dtypes))}; "
                          "pass --dtype")
    out_dtype = dtypes.pop()
    adapters_of: dict[str, list[str]] = {}  # base param -> its adapter leaves
    for n in saved:
        if lora_lib.is_adapter(n):
            adapters_of.setdefault(lora_lib.base_weight(n, expected), []).append(n)
    base_weights = _BaseWeights(base, family) if any(n not in saved for n in expected) else None
    sizes = [(name, _numel(shape) * out_dtype.itemsize) for name, shape in expected.items()]
    shards = plan_shards(sizes, max_shard_bytes)
    resident_before = hostmem.resident_gib()
    weight_map = {}
    for i, shard in enumerate(shards):
        file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        wanted = [n for n in shard if n in saved]
        wanted += [a for n in shard for a in adapters_of.get(n, ())]
        flat = {saved[n][0]: torch.empty(saved[n][1].size, dtype=saved[n][1].properties.dtype) for n in wanted}
        checkpoint.load_flat(ckpt, flat, partial=True, no_dist=True)  # reads only this shard's tensors
        params = {n: flat[saved[n][0]] if n in saved else base_weights.read(n, expected[n]) for n in shard}
        params.update({n: flat[saved[n][0]] for n in wanted if lora_lib.is_adapter(n)})
        params = lora_lib.merge_params({n: t.float() for n, t in params.items()}, lora_scale)  # merged in fp32
        tensors = {names[name]: family.to_hub(name, params[name].to(out_dtype)).contiguous() for name in shard}
        bad = checkpoint.nonfinite_leaf(tensors)  # e.g. fp32 weights beyond fp16's range
        if bad:
            raise ExportError(f"--checkpoint {ckpt!r}: {bad} holds non-finite values in {out_dtype}; nothing "
                              "exported")
        safetensors.torch.save_file(tensors, os.path.join(out, file), metadata={"format": "pt"})
        weight_map.update({hub: file for hub in tensors})
        del flat, tensors, params
    logging.info("export: %d shard(s), %.2f GiB of weights; host memory %.3f GiB before the weights, peak %.3f GiB",
                 len(shards), sum(size for _, size in sizes) / 2 ** 30, resident_before, hostmem.peak_resident_gib())
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(size for _, size in sizes)},
                 "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
            json.dump(index, f, indent=2)
    return out_dtype


def _numel(shape: tuple) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _write_adapter(ckpt: str, saved: dict, out: str, dtype: torch.dtype | None, *, base: str, run_config: dict,
                   expected: dict[str, tuple]) -> None:
    """PEFT's adapter directory: adapter_model.safetensors (peft's tensor names and layout) and
    adapter_config.json (linear modules as target_modules, stacked experts as target_parameters)."""
    adapters = [n for n in saved if lora_lib.is_adapter(n)]
    flat = {saved[n][0]: torch.empty(saved[n][1].size, dtype=saved[n][1].properties.dtype) for n in adapters}
    checkpoint.load_flat(ckpt, flat, partial=True, no_dist=True)
    ours = {n: flat[saved[n][0]].to(dtype or flat[saved[n][0]].dtype) for n in adapters}
    tensors = lora_lib.peft_tensors(ours, list(expected))
    safetensors.torch.save_file(tensors, os.path.join(out, "adapter_model.safetensors"), metadata={"format": "pt"})
    m = run_config.get("actor", {}).get("model", {})
    targets = sorted({lora_lib.target_of(n) for n in adapters})
    parameters = [t for t in targets if t in expected]  # stacked expert params; the rest are linear modules
    rank = int(saved[lora_lib.adapter_names(targets[0])[0]][1].size[-2])  # A: [r, in] or [E, r, in]
    with open(os.path.join(base, "config.json")) as f:
        architectures = json.load(f).get("architectures") or ["Qwen2_5_VLForConditionalGeneration"]
    config = lora_lib.adapter_config(rank=rank, alpha=m.get("lora_alpha", 16), dropout=m.get("lora_dropout", 0.0),
                                     modules=[t for t in targets if t not in expected], parameters=parameters,
                                     base_model=os.path.abspath(base), base_model_class=architectures[0])
    with open(os.path.join(out, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def export_checkpoint(ckpt: str, output_dir: str, *, dtype: torch.dtype | None = None, overwrite: bool = False,
                      model_path: str | None = None, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                      adapter_only: bool = False) -> str:
    """Writes the params of checkpoint `ckpt` as a Hugging Face directory at output_dir; returns output_dir.

    dtype None keeps the saved (master) dtype, so the export is exactly what was trained. `model_path`
    overrides the base model directory recorded in the checkpoint's config (config and processor files, and the
    frozen weights of a checkpoint that holds only trained leaves). `adapter_only`: the LoRA adapters alone, in
    PEFT's format."""
    from vlm_sft.data.processor import load_processor

    try:
        checkpoint.verify(ckpt, checkpoint.check_complete(ckpt), collective=False)  # rank 0 alone, in main
    except checkpoint.CheckpointError as e:
        raise ExportError(f"--checkpoint: {e}") from None
    _check_output_dir(output_dir, overwrite)
    base, data = _base_model_dir(ckpt, model_path)
    saved = checkpoint.saved_params(ckpt)
    if not saved:
        raise ExportError(f"--checkpoint {ckpt!r}: the checkpoint holds no params")
    with open(os.path.join(ckpt, checkpoint.CONFIG)) as f:
        run_config = json.load(f)
    partial = "base_model" in checkpoint.read_meta(ckpt).get("extra", {})
    if partial:  # the frozen leaves (and what the adapters adapt) are the base model's: it must be the run's
        try:
            checkpoint.check_base_model(ckpt, base)
        except checkpoint.CheckpointError as e:
            raise ExportError(f"--model_path: {e}".replace("actor.model.model_path", "--model_path")) from None
    has_adapters = any(lora_lib.is_adapter(n) for n in saved)
    if adapter_only and not has_adapters:
        raise ExportError(f"--adapter_only: checkpoint {ckpt!r} holds no LoRA adapters (a run without "
                          "actor.model.is_lora); export it as a merged model, without --adapter_only")
    config, family, expected = _load_base_config(base, saved, partial=partial)
    tmp = f"{os.path.normpath(output_dir)}.tmp-{uuid.uuid4().hex[:12]}"
    os.makedirs(tmp)
    try:
        if adapter_only:
            _write_adapter(ckpt, saved, tmp, dtype, base=base, run_config=run_config, expected=expected)
        else:
            alpha = run_config.get("actor", {}).get("model", {}).get("lora_alpha")
            rank = next((int(e.size[-2]) for n, (_, e) in saved.items() if n.endswith(lora_lib.A_SUFFIX)), 0)
            scale = lora_lib.scale_of(alpha, rank) if has_adapters else None
            written = _write_weights(ckpt, saved, tmp, dtype, max_shard_bytes, expected=expected, base=base,
                                     family=family, lora_scale=scale)
            _write_config(base, config, tmp, written)
        processor = load_processor(base, min_pixels=data.get("min_pixels"), max_pixels=data.get("max_pixels"))
        processor.save_pretrained(tmp)
        if os.path.isdir(output_dir):
            shutil.rmtree(output_dir)
        os.replace(tmp, output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return output_dir


def make_flags() -> flags.FlagValues:
    """The export CLI's flags, on their own FlagValues (main's --config/--mode and these never mix)."""
    fv = flags.FlagValues()
    flags.DEFINE_string("checkpoint", None, "a checkpoint directory, <run>/checkpoints/step_N", flag_values=fv)
    flags.DEFINE_string("output_dir", None, "where to write the Hugging Face (or PEFT adapter) directory",
                        flag_values=fv)
    flags.DEFINE_enum("dtype", None, sorted(DTYPES), "weights dtype (default: as saved, the fp32 master weights)",
                      flag_values=fv)
    flags.DEFINE_bool("overwrite", False, "replace a non-empty output_dir", flag_values=fv)
    flags.DEFINE_string("model_path", None, "base model directory (default: actor.model.model_path of the "
                        "checkpoint's config)", flag_values=fv)
    flags.DEFINE_bool("adapter_only", False, "write only the LoRA adapters, in PEFT's format (adapter_config.json, "
                      "adapter_model.safetensors), instead of the merged model", flag_values=fv)
    flags.DEFINE_string("max_shard_size", "5GB", "largest safetensors shard, as transformers names it (5GB, 500MB, "
                        "2GiB); the export holds about one shard in memory", flag_values=fv)
    flags.mark_flags_as_required(["checkpoint", "output_dir"], flag_values=fv)
    return fv


def run(fv: flags.FlagValues) -> int:
    """Exports as the parsed flags say; 0 on success, 2 with a one-line error."""
    import transformers
    transformers.utils.logging.set_verbosity_error()
    try:
        out = export_checkpoint(fv.checkpoint, fv.output_dir, dtype=DTYPES.get(fv.dtype), overwrite=fv.overwrite,
                                model_path=fv.model_path, adapter_only=fv.adapter_only,
                                max_shard_bytes=parse_shard_size(fv.max_shard_size))
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"exported {fv.checkpoint} -> {out}" + (" (PEFT adapter)" if fv.adapter_only else ""))
    return 0


def cli(argv: list[str]) -> int:
    """The CLI without the process around it (tests): argv without the program name."""
    fv = make_flags()
    try:
        fv(["vlm_sft.export", *argv])
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return run(fv)


def parse_flags(argv: list[str]) -> flags.FlagValues:
    """absl.app's flags parser: this CLI's flags on their own FlagValues, absl's own (--verbosity, ...) globally."""
    fv = make_flags()
    try:
        rest = fv(argv, known_only=True)
        flags.FLAGS(rest)
        fv.validate_all_flags()
    except flags.Error as e:
        raise SystemExit(f"error: {e}") from None
    return fv


if __name__ == "__main__":
    app.run(lambda fv: sys.exit(run(fv)), flags_parser=parse_flags)
