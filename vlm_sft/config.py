"""Config validation and derived values: every mistake a user can make in the config fails here, naming the
field, before any data is read or any model loaded."""
from __future__ import annotations

import os
from typing import Any

import torch

from vlm_sft import trainable
from vlm_sft.errors import ConfigError

SHARDING_STRATEGIES = ("no_shard", "full_shard", "hybrid_shard")
SCHEDULERS = ("cosine", "constant", "linear")
TRUNCATION = ("text", "error")
BAD_ROWS = ("error", "skip")
LOSS_NORMALIZATIONS = ("tokens", "micro_batch")
MODES = ("train", "eval", "check")
DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}


def parse_dtype(name: str, field: str) -> torch.dtype:
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ConfigError(f"{field}={name!r}: expected one of {sorted(DTYPES)}") from None


def _one_of(value: Any, choices: tuple[str, ...], field: str) -> None:
    if value not in choices:
        raise ConfigError(f"{field}={value!r}: expected one of {list(choices)}")


def _positive(value: Any, field: str) -> None:
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{field}={value!r}: expected a positive integer")


def split_paths(value: Any) -> list[str]:
    """A data path field: None, a string (comma-separated allowed) or a list -> list of non-empty paths."""
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else list(value)
    return [str(p).strip() for p in items if str(p).strip()]


def accumulation_steps(config: Any, world_size: int) -> int:
    """Micro-batches per rank per optimizer step: global / (micro * world), which must divide exactly."""
    g, m = config.actor.global_batch_size, config.actor.micro_batch_size
    if g % (m * world_size):
        raise ConfigError(
            f"actor.global_batch_size={g} is not divisible by actor.micro_batch_size={m} x world size "
            f"{world_size} = {m * world_size}")
    return g // (m * world_size)


def validate(config: Any, *, mode: str, world_size: int = 1) -> None:
    """Check every field whose value can be judged without touching data or model."""
    _one_of(mode, MODES, "--mode")
    a, d, r = config.actor, config.data, config.runner
    _positive(a.micro_batch_size, "actor.micro_batch_size")
    _positive(a.eval_batch_size, "actor.eval_batch_size")
    _positive(a.global_batch_size, "actor.global_batch_size")
    if not isinstance(d.packing, bool):
        raise ConfigError(f"data.packing={d.packing!r}: expected True or False")
    _one_of(a.loss_normalization, LOSS_NORMALIZATIONS, "actor.loss_normalization")
    if d.packing:
        _positive(a.max_tokens_per_micro_batch, "actor.max_tokens_per_micro_batch")
        if a.global_batch_size % world_size:
            raise ConfigError(f"actor.global_batch_size={a.global_batch_size} is not divisible by the world size "
                              f"{world_size}")
    else:
        accumulation_steps(config, world_size)
    _one_of(a.fsdp_config.sharding_strategy, SHARDING_STRATEGIES, "actor.fsdp_config.sharding_strategy")
    _one_of(a.optim.lr_scheduler, SCHEDULERS, "actor.optim.lr_scheduler")
    _one_of(d.truncation, TRUNCATION, "data.truncation")
    _one_of(d.bad_rows, BAD_ROWS, "data.bad_rows")
    parse_dtype(a.model.precision, "actor.model.precision")
    coef = a.model.get("router_aux_loss_coef")
    if coef is not None and not (isinstance(coef, (int, float)) and coef >= 0):
        raise ConfigError(f"actor.model.router_aux_loss_coef={coef!r}: expected a number >= 0, or unset for the "
                          "model directory's own (its router_aux_loss_coef when it sets output_router_logits)")
    for key in ("param_dtype", "reduce_dtype", "buffer_dtype"):
        parse_dtype(a.fsdp_config.mixed_precision[key], f"actor.fsdp_config.mixed_precision.{key}")
    trainable.check_config(config)  # freeze / LoRA / lr-multiplier fields (matched against the model later)
    _positive(d.max_prompt_length, "data.max_prompt_length")
    for key in ("min_pixels", "max_pixels"):  # None: the model directory's own budget
        if d[key] is not None and d[key] <= 0:
            raise ConfigError(f"data.{key}={d[key]}: expected a positive pixel count, or unset for the model "
                              "directory's own")
    if d.min_pixels is not None and d.max_pixels is not None and d.max_pixels < d.min_pixels:
        raise ConfigError(f"data.min_pixels={d.min_pixels}, data.max_pixels={d.max_pixels}: expected "
                          "0 < min_pixels <= max_pixels")
    if d.num_workers < 0:
        raise ConfigError(f"data.num_workers={d.num_workers}: expected >= 0")
    if not d.image_keys:
        raise ConfigError("data.image_keys is empty: name the image column(s), e.g. '(\"image\",)'")
    train = split_paths(d.train_data_paths)
    evals = split_paths(d.eval_data_paths)
    if mode == "train" and train and r.max_steps <= 0 and r.max_epochs <= 0:
        raise ConfigError("runner.max_steps and runner.max_epochs are both <= 0: nothing to train")
    if not train and not evals:
        raise ConfigError("data.train_data_paths and data.eval_data_paths are both empty: nothing to do")
    if mode == "eval" and not evals:
        raise ConfigError("--mode=eval needs data.eval_data_paths")
    if a.optim.lr < 0 or a.optim.lr_warmup_steps < 0:
        raise ConfigError("actor.optim.lr and actor.optim.lr_warmup_steps must be >= 0")
    if not config.eval.generate and not config.eval.choice_scoring and evals:
        raise ConfigError("eval.generate and eval.choice_scoring are both False but data.eval_data_paths is set")
    validate_runner(r)


def validate_runner(r: Any) -> None:
    """The loop's intervals, checkpointing and fault limits (runner.*)."""
    _positive(r.log_interval, "runner.log_interval")
    for key in ("save_interval", "val_check_interval", "keep_last_n", "max_consecutive_skipped_steps"):
        if not isinstance(r[key], int) or r[key] < 0:
            raise ConfigError(f"runner.{key}={r[key]!r}: expected an integer >= 0")
    t = r.collective_timeout_s
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t < float("inf"):
        raise ConfigError(f"runner.collective_timeout_s={t!r}: expected a positive number of seconds")


def run_dir(config: Any) -> str:
    """<runner.logger.log_path>/<runner.logger.experiment_name>."""
    return os.path.join(config.runner.logger.log_path, config.runner.logger.experiment_name)
