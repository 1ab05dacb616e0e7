"""vlm-sft entry point: the whole algorithm, top to bottom.

  python -m vlm_sft.main --config configs/robo2vlm.py:demo
  python -m vlm_sft.main --config configs/robo2vlm.py --config.actor.model.model_path=... [--mode=eval]

config -> checks (before anything heavy) -> model and plan -> data -> optimizer -> resume -> step -> loop (step, log,
checkpoint, eval) -> final eval -> Hugging Face export (runner.export_hf). `_run` reads as that list, one named
phase a line; each phase is a function of what it needs, defined below it in the same order.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import sys
import threading
import time
from typing import Any, Callable

import torch
from absl import app, flags, logging
from ml_collections import config_flags

from vlm_sft import checkpoint as checkpoint_lib
from vlm_sft import compile as compile_lib
from vlm_sft import config as config_lib
from vlm_sft import demo as demo_lib
from vlm_sft import evaluate as evaluate_lib
from vlm_sft import export as export_lib
from vlm_sft import faults
from vlm_sft import integrity
from vlm_sft import loading
from vlm_sft import lora as lora_lib
from vlm_sft import models as model_lib
from vlm_sft import perf
from vlm_sft import loggers
from vlm_sft import planner
from vlm_sft import preflight
from vlm_sft import report as report_lib
from vlm_sft import sharding as sharding_lib
from vlm_sft import step as step_lib
from vlm_sft import trainable as trainable_lib
from vlm_sft.data import loader as loader_lib
from vlm_sft.data import packing as packing_lib
from vlm_sft.data import robo2vlm, sources
from vlm_sft.data.collate import check_length_buckets, collate_encoded
from vlm_sft.data.encode import IMAGE_TOKEN, Encoder, PromptTooLong
from vlm_sft.data.processor import load_processor, load_video_config
from vlm_sft.data.vision import Spec
from vlm_sft.metrics import MetricsWriter
from vlm_sft.state import init_train_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/robo2vlm.py:demo",
                                          lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", list(config_lib.MODES),
                          "train (then evaluate), evaluate only, check every data row, or plan the memory per "
                          "device (check and plan read no weights)")

RANK_EXIT_GRACE_S = 2.0  # how long ranks other than 0 wait before exiting on an error rank 0 reports


def column_keys(config: Any) -> dict[str, Any]:
    """The data.*_key fields, as the robo2vlm functions take them."""
    d = config.data
    return dict(prompt_key=d.prompt_key, choice_key=d.choice_key, answer_key=d.answer_key,
                image_keys=list(d.image_keys), video_keys=list(d.get("video_keys", ())),
                video_fps_key=d.get("video_fps_key") or None)


def make_source(files: list[str], config: Any, *, lazy: bool | None = None) -> sources.Source:
    lazy = config.data.lazy_loading if lazy is None else lazy
    return sources.make_source(files, **column_keys(config), lazy=lazy)


def find_files(config: Any, field: str, split: str) -> list[str]:
    """The split's .parquet / .jsonl / .json files under data.<field>, their keys checked (no rows read)."""
    paths = config_lib.split_paths(config.data[field])
    if not paths:
        return []
    try:
        files = sources.find_data_files(paths, split)
    except ValueError as e:
        raise config_lib.ConfigError(f"data.{field}: {e}") from None
    try:
        sources.check_files(files, **column_keys(config))
    except ValueError as e:
        raise config_lib.ConfigError(f"data.{field}: {e}") from None
    return files


def make_encoder(config: Any) -> Encoder:
    """The configured processor (tokenizer, image processor, chat template; no weights) and prompt encoder."""
    d = config.data
    try:
        processor = load_processor(config.actor.model.model_path, min_pixels=d.min_pixels,
                                   max_pixels=d.max_pixels)
        video_config = None
        if d.get("video_keys"):
            video_config = load_video_config(
                config.actor.model.model_path, fps=d.video_fps, min_frames=d.video_min_frames,
                max_frames=d.video_max_frames, max_pixels=d.video_max_pixels, total_pixels=d.video_total_pixels)
    except ValueError as e:
        raise model_lib.ModelLoadError(f"actor.model.model_path: {e}") from None
    if video_config is not None:
        try:
            import av  # noqa: F401  (decodes the videos, in the data workers)
        except ImportError:
            raise config_lib.ConfigError("data.video_keys is set but PyAV is not installed: pip install av "
                                         "(or the vlm-sft[video] extra)") from None
    return Encoder(processor, max_prompt_length=d.max_prompt_length, truncation=d.truncation,
                   apply_chat_template=d.apply_chat_template, video_config=video_config)


def check_data(config: Any) -> dict[str, Any]:
    """--mode=check: every train and eval row through the configured reader, processor and encoder, reported
    (vlm_sft/preflight.py) and written to <run dir>/preflight.json. Never reads the model's weights."""
    run_dir = config_lib.run_dir(config)
    os.makedirs(run_dir, exist_ok=True)
    demo_lib.prepare_demo(config, run_dir)
    splits = {}
    for field, split in (("train_data_paths", "train"), ("eval_data_paths", "test")):
        files = find_files(config, field, split)
        if files:  # streamed: the check reads each row once, in order
            splits[split] = (files, make_source(files, config, lazy=True))
    try:
        check_length_buckets(config.data.length_buckets)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    # The packing report is per rank of the run this machine would launch: cluster.num_nodes x its GPUs.
    world = config.cluster.num_nodes * max(torch.cuda.device_count(), 1)
    world = world if config.actor.global_batch_size % world == 0 else 1
    return preflight.check(config, splits, make_encoder(config), out_path=os.path.join(run_dir, "preflight.json"),
                           world_size=world)


def plan_memory(config: Any, launched_world_size: int) -> dict[str, Any]:
    """--mode=plan: the per-device memory estimate of the configured run (vlm_sft/planner.py), printed and written
    to <run dir>/plan.json. Reads config.json, the processor files and a sample of rows; never the weights."""
    run_dir = config_lib.run_dir(config)
    os.makedirs(run_dir, exist_ok=True)
    demo_lib.prepare_demo(config, run_dir)
    report = planner_estimate(config, launched_world_size)
    planner.write_report(report, os.path.join(run_dir, "plan.json"))
    print(planner.format_plan(report))
    return report


def planner_estimate(config: Any, launched_world_size: int, *, device_type: str | None = None,
                     runtime_gib: float | None = None) -> dict[str, Any]:
    """The planner's report for the config: skeleton and data sample (train split, else eval), no weights."""
    sharding_lib.check_config(config, planner.plan_world_size(config, launched_world_size))
    planner.device_memory_gib(config)  # a bad runner.device_memory_gib fails before any row is read
    path = config.actor.model.model_path
    if not os.path.isfile(os.path.join(path, "config.json")):  # weights not needed: plan before downloading them
        raise model_lib.ModelLoadError(f"actor.model.model_path={path!r}: no config.json (--mode=plan needs the "
                                       "model directory's config.json and processor files, not its weights)")
    files = find_files(config, "train_data_paths", "train") or find_files(config, "eval_data_paths", "test")
    encoder = make_encoder(config)
    image_token_id = encoder.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    stats = planner.sample_rows(make_source(files, config, lazy=True), encoder, image_token_id)
    module = trainable_lib.skeleton(config.actor.model.model_path)
    return planner.plan(config, module, stats, launched_world_size=launched_world_size, device_type=device_type,
                        runtime_gib=runtime_gib)


def sample_train_rows(config: Any, files: list[str]) -> list[preflight.RowStats]:
    """The train split's first planner.PLAN_ROWS rows read and encoded as training would (processor files only,
    no weights): the planner's data statistics and the packing budget's early check."""
    encoder = make_encoder(config)
    image_token_id = encoder.processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    return planner.sample_rows(make_source(files, config, lazy=True), encoder, image_token_id)


def check_rows_fit_budget(config: Any, sample: list[preflight.RowStats]) -> None:
    """Packed, rows are never split: a row longer than actor.max_tokens_per_micro_batch is a bad row. The sampled
    rows (already encoded before the weights load) are checked here, so a budget below them fails under
    data.bad_rows=error before the model loads, naming the longest such row and both numbers; under "skip" the
    loader skips them and data/skipped_rows counts them. Rows past the sample are checked as the loader reaches
    them (the same message); --mode=check reads every row."""
    d, budget = config.data, config.actor.max_tokens_per_micro_batch
    if not d.packing:
        return
    over = [s for s in sample if s.reason is None and s.sequence_tokens > budget]
    if not over:
        return
    longest = max(over, key=lambda s: s.sequence_tokens)
    what = (f"{len(over)} of the first {len(sample)} train rows exceed actor.max_tokens_per_micro_batch={budget}; "
            f"the longest, {longest.source}, has {longest.sequence_tokens} tokens (image tokens included)")
    if d.bad_rows == "error":
        raise preflight.DataCheckFailed(
            f"{what}: rows are never split: raise actor.max_tokens_per_micro_batch to at least "
            f"{longest.sequence_tokens}, lower data.max_prompt_length or set data.bad_rows=skip")
    logging.warning("%s: skipped as bad rows (data.bad_rows=skip)", what)


def log_planned_memory(config: Any, stats: list[preflight.RowStats], world_size: int,
                       device: torch.device) -> float:
    """The planner's peak (GiB per device) for this run, logged at its start; the loop logs it again beside the
    measured peak after the first step."""
    skeleton = trainable_lib.skeleton(config.actor.model.model_path)
    this_run = planner.apply_overrides(config, {"runner.plan_world_size": world_size})
    report = planner.plan(this_run, skeleton, stats, launched_world_size=world_size, device_type=device.type)
    logging.info("%s", planner.format_plan(report))
    return report["per_device"]["peak_gib"]


def available_memory_bytes() -> int:
    """Memory the OS can still give this machine's processes (MemAvailable; physical memory where unknown)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_eager_loading_fits(config: Any, files: list[str], *, local_processes: int,
                             available: int | None = None) -> None:
    """With data.lazy_loading=False every process reads its files' rows into memory up front (RLinf's default;
    the full Robo2VLM train split is ~130 GB); a .json list is read whole even when lazy. Refuse before the model
    loads when the processes of this machine together would not fit in 80% of its available memory, instead of
    swapping or being OOM-killed later."""
    lazy = config.data.lazy_loading
    held = sources.held_in_memory(files, lazy=lazy)
    if not held:
        return
    need = sources.in_memory_bytes(held, **column_keys(config))
    available = available_memory_bytes() if available is None else available
    if need * local_processes > 0.8 * available:
        gib = 2 ** 30
        what, fix = (
            (f"{len(held)} .json file(s) are read whole even with data.lazy_loading=True",
             "Convert them to .jsonl (one object per line), which streams,") if lazy else
            (f"data.lazy_loading=False reads {len(held)} {sources.format_name(held)} file(s) into memory",
             "Set data.lazy_loading=True (streams rows; same samples per step)"))
        raise config_lib.ConfigError(
            f"{what}: {need / gib:.1f} GiB on each of the {local_processes} process(es) on this machine, "
            f"{need * local_processes / gib:.1f} GiB in all, but {available / gib:.1f} GiB is available. "
            f"{fix} or train on fewer files.")


def apply_plan(model: model_lib.Model, params: dict, plan: trainable_lib.TrainPlan, *, precision: torch.dtype,
               compute_dtype: torch.dtype, seed: int) -> tuple[model_lib.Model, dict]:
    """Params as the plan trains them: trained leaves in `precision` (master weights), frozen ones in the compute
    dtype (they are only ever read in it), LoRA adapters added beside their base weights (and into the model's
    block groups, so each block call carries its adapters)."""
    frozen = set(plan.frozen)
    params = {k: v.to(compute_dtype if k in frozen else precision) for k, v in params.items()}
    if plan.is_lora:
        adapters = lora_lib.init_adapters(plan.shapes, plan.lora_modules, plan.lora_rank, seed=seed,
                                          dtype=precision)
        params.update(adapters)
        model = dataclasses.replace(model, groups=lora_lib.add_to_groups(model.groups, adapters))
    return model, params


def _list(x: list) -> list:
    return x


def run_eval(model: model_lib.Model, params: dict, source: robo2vlm.Robo2VLMSource, encoder: Encoder,
             tokenizer: Any, spec: Spec, config: Any, *, gather: evaluate_lib.Gather, dtype: torch.dtype,
             world_size: int = 1, rank: int = 0) -> dict[str, float]:
    """Accuracy over every eval row: each rank evaluates its own block of rows with the params as held, each
    group gathered (`gather`: LoRA merged, in `dtype`) for the call that uses it, and the counts are summed over
    ranks."""
    d = config.data
    batches = loader_lib.eval_batches(source, encoder, _list, batch_size=config.actor.eval_batch_size,
                                      world_size=world_size, rank=rank, num_workers=d.num_workers,
                                      bad_rows=d.bad_rows, max_rows=d.eval_max_rows)
    t0 = time.perf_counter()
    metrics = evaluate_lib.evaluate(model, params, batches, spec=spec,
                                    tokenizer=tokenizer, use_generation=config.eval.generate,
                                    use_choice_scoring=config.eval.choice_scoring,
                                    max_new_tokens=config.eval.max_new_tokens,
                                    all_reduce_sum=sharding_lib.all_reduce_sum, gather=gather, dtype=dtype,
                                    synced=world_size > 1)
    metrics["time/eval"] = time.perf_counter() - t0
    return metrics


SIGNALLED = "stop/signalled"  # ranks that received a stop signal; summed, never logged
# Summed over ranks; the rest averaged.
SUM_METRICS = ("train/tokens", "train/label_tokens", "data/skipped_rows", "perf/flops", "perf/padded_tokens")


def _to_device(batch: dict | None, device: torch.device) -> dict | None:
    if batch is None or device.type == "cpu":
        return batch
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def total_steps(config: Any, steps_per_epoch: int) -> int:
    if config.runner.max_steps > 0:
        return config.runner.max_steps
    return config.runner.max_epochs * steps_per_epoch


def run(config: Any, mode: str) -> dict[str, Any]:
    """Train and/or evaluate as configured; returns the last metrics written (rank 0; other ranks: theirs).
    --mode=check: checks the data (check_data) and returns its report.

    One process per device under torchrun (WORLD_SIZE/RANK from its env), or a plain single process. Every rank
    checks the config before any heavy work (the checks are deterministic, so they fail on all ranks alike).
    """
    proc = sharding_lib.ProcessInfo.from_env()
    config_lib.validate(config, mode=mode, world_size=proc.world_size)
    router_aux_loss_coef(config, model_lib.check_model_type(config.actor.model.model_type))
    if mode == "check":
        if proc.world_size > 1:
            raise config_lib.ConfigError("--mode=check runs as one process (its workers are data.num_workers); "
                                         "run it without torchrun")
        return check_data(config)
    if mode == "plan":
        return plan_memory(config, proc.world_size)
    sharding_lib.check_config(config, proc.world_size)
    device, created = sharding_lib.init_process_group(proc, timeout_s=config.runner.collective_timeout_s)
    preemption = faults.Preemption()
    if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread
        preemption.install()
    try:
        result = _run(config, mode, proc, device, preemption)
        sharding_lib.barrier()  # no rank tears the group down while another still talks to it
        return result
    finally:
        preemption.restore()
        if created:
            sharding_lib.destroy_process_group()


def router_aux_loss_coef(config: Any, family: model_lib.Family, hf_config: Any = None) -> float:
    """actor.model.router_aux_loss_coef, or (None) the family's default from the directory's config (`hf_config`;
    without it only the check runs); refused (non-zero) for a family without a router."""
    coef = config.actor.model.get("router_aux_loss_coef")
    if coef and family.forward_aux is None:
        raise config_lib.ConfigError(f"actor.model.router_aux_loss_coef={coef}: {family.name!r} has no router "
                                     "(only MoE families, e.g. qwen3_vl_moe, have a load-balancing loss)")
    if coef is None:
        return family.default_aux_loss_coef(hf_config) if hf_config is not None else 0.0
    return float(coef)


def check_model_files(path: str, model_type: str | None = None) -> None:
    """Truncated or corrupted weights, unparsable JSON, a broken chat template: one line naming the file."""
    model_lib.check_model_dir(path, model_type)
    try:
        integrity.check_model_files(path)
    except integrity.DamagedFileError as e:
        raise model_lib.ModelLoadError(f"actor.model.model_path: {e}") from None


def check_writable(path: str, field: str) -> None:
    try:
        integrity.check_writable_dir(path, field)
    except integrity.DamagedFileError as e:
        raise config_lib.ConfigError(str(e)) from None


@dataclasses.dataclass
class Checked:
    """What the checks found before anything heavy: the files, the plan, where checkpoints go and resume from."""

    run_dir: str
    train_files: list[str]
    eval_files: list[str]
    plan: trainable_lib.TrainPlan
    resume_from: str | None
    saver: checkpoint_lib.Checkpointer
    train_sample: list[preflight.RowStats]  # the first train rows, encoded (rank 0, or every rank when packed)


@dataclasses.dataclass
class Loaded:
    """The model and its processing, params as the plan trains them, sharded on the device."""

    model: model_lib.Model
    step_model: model_lib.Model  # its blocks carry the LoRA adapters (the train step's); evaluation merges them
    params: dict
    encoder: Encoder
    tokenizer: Any
    spec: Spec
    precision: torch.dtype
    sharding: sharding_lib.Sharding
    eval_source: Any


@dataclasses.dataclass
class Log:
    """Where metrics go: the writer, the latest values (what run returns), the evaluation that writes to both."""

    writer: MetricsWriter
    last: dict[str, float]
    evaluate: Callable[[int, dict], None]
    planned_gib: float | None = None  # the planner's peak per device (rank 0), logged again after step 1


@dataclasses.dataclass
class StepSetup:
    """The train step (eager or compiled) and what measures it."""

    train_step: Callable
    flop_model: perf.FlopModel
    peak_flops: float | None


def _run(config: Any, mode: str, proc: sharding_lib.ProcessInfo, device: torch.device,
         preemption: faults.Preemption) -> dict[str, float]:
    """The algorithm, phase by phase: each phase is a function of what it needs, below in this order."""
    checked = run_checks(config, mode, proc)
    config_json = write_config(config, checked.run_dir, proc.rank)
    writer = open_writer(config, checked, config_json, proc.rank)
    with finishing(writer, checked.run_dir):
        torch.manual_seed(config.actor.seed)
        # The planner's estimate before the weights load (on CPU its runtime term is this process's resident set).
        planned = log_planned_memory(config, checked.train_sample, proc.world_size, device) if (
            checked.train_files and proc.rank == 0) else None
        loaded = load_model_and_plan(config, checked.plan, checked.eval_files, device)
        log = make_log(config, loaded, checked, proc, writer)
        log.planned_gib = planned
        if not checked.train_files:
            eval_only(loaded.params, checked, log)
            return log.last

        loader, compiled = make_train_loader(config, checked, loaded, device, proc)
        steps = total_steps(config, loader.steps_per_epoch)
        log.writer.total_steps = steps
        state, tx, schedule = init_state(config, loaded, checked.plan, steps)
        state, skipped_rows = resume(state, checked, proc.rank)
        setup = make_step(config, loaded, checked.plan, tx, schedule, compiled, state, device)
        log_training(config, steps, loader, loaded, proc)
        if config.runner.val_before_train and int(state.step) == 0:
            log.evaluate(0, state.params)
        state, last_ckpt = train_loop(config, state, loader, setup, steps, checked, log,
                                      skipped_rows=skipped_rows, config_json=config_json, device=device, proc=proc,
                                      preemption=preemption)
        final_eval_and_export(config, state, steps, last_ckpt, checked, log, proc.rank)
        return log.last


def run_checks(config: Any, mode: str, proc: sharding_lib.ProcessInfo) -> Checked:
    """Everything that can be checked without loading the model, first (the demo's assets built where asked)."""
    rank = proc.rank
    loggers.check_backends(config.runner.logger.logger_backends)  # known, installed (else the pip command)
    run_dir = config_lib.run_dir(config)
    check_writable(run_dir, "runner.logger.log_path")
    if rank == 0:  # builds the demo assets once; the other ranks wait, then only point the config at them
        demo_lib.prepare_demo(config, run_dir)
    sharding_lib.barrier()
    if rank != 0:
        demo_lib.prepare_demo(config, run_dir)

    train_files = find_files(config, "train_data_paths", "train") if mode == "train" else []
    eval_files = find_files(config, "eval_data_paths", "test")
    check_eager_loading_fits(config, train_files + eval_files, local_processes=proc.local_world_size)
    check_model_files(config.actor.model.model_path, config.actor.model.model_type)
    # What trains (freezing, LoRA, lr groups), matched against a meta-device skeleton: no weights read yet.
    plan = trainable_lib.make_plan(config, trainable_lib.skeleton(config.actor.model.model_path))
    sharding_lib.check_expert_parallel(config, plan.shapes, proc.world_size)  # experts the EP size divides
    try:
        check_length_buckets(config.data.length_buckets)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    r = config.runner
    # "auto" continues a training run; eval-only reads a checkpoint only when given its path.
    resume = "" if r.resume == "auto" and not train_files else r.resume
    ckpt_root = checkpoint_lib.checkpoint_root(run_dir)
    if train_files:
        check_writable(ckpt_root, "runner.logger.log_path (its checkpoints/ directory)")
    resume_from = checkpoint_lib.resolve_resume(resume, ckpt_root)  # an explicit path must be complete and intact
    if resume_from:
        checkpoint_lib.check_base_model(resume_from, config.actor.model.model_path)
    saver = checkpoint_lib.Checkpointer(ckpt_root, keep_last_n=r.keep_last_n, async_save=r.async_save,
                                        timeout_s=r.collective_timeout_s)
    # The first train rows encoded (no weights): the planner's statistics (rank 0) and, packed, the budget's check
    # on every rank (it fails alike on all of them).
    sample = sample_train_rows(config, train_files) if train_files and (rank == 0 or config.data.packing) else []
    check_rows_fit_budget(config, sample)
    return Checked(run_dir, train_files, eval_files, plan, resume_from, saver, sample)


def write_config(config: Any, run_dir: str, rank: int) -> str:
    """<run dir>/config.json (rank 0); returns the JSON, which every checkpoint carries too."""
    config_json = config.to_json_best_effort(indent=2)
    if rank == 0:
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            f.write(config_json)
    return config_json


def load_model_and_plan(config: Any, plan: trainable_lib.TrainPlan, eval_files: list[str],
                        device: torch.device) -> Loaded:
    """Processor, weights, the plan applied (precisions, LoRA adapters) and the params sharded onto `device`."""
    try:
        encoder = make_encoder(config)
    except model_lib.ModelLoadError:
        raise
    except Exception as e:  # the tokenizer libraries raise their own types for damaged files
        raise model_lib.ModelLoadError(f"actor.model.model_path={config.actor.model.model_path!r}: the tokenizer "
                                       f"or image processor does not load ({type(e).__name__}: {e})") from None
    processor = encoder.processor
    logging.info("loading model weights from %s", config.actor.model.model_path)
    precision = config_lib.parse_dtype(config.actor.model.precision, "actor.model.precision")
    sharding = sharding_lib.make_sharding(config, device, plain_single_rank=True)
    m = config.actor.model
    try:
        if loading.has_safetensors(m.model_path):  # each rank reads only its rows, in the plan's dtypes
            frozen = set(plan.frozen)
            dtypes = {k: sharding.param_dtype if k in frozen else precision for k in plan.shapes}
            model, params = loading.load_sharded(m.model_path, sharding, dtypes,
                                                 attn_implementation=m.attn_implementation, model_type=m.model_type)
        else:  # .bin weights: the whole model on every rank, then sharded
            model, params = model_lib.load_model(m.model_path, attn_implementation=m.attn_implementation,
                                                 model_type=m.model_type)
    except model_lib.ModelLoadError:
        raise
    except Exception as e:  # damage the header checks cannot see (e.g. a corrupted tensor record)
        raise model_lib.ModelLoadError(f"actor.model.model_path={config.actor.model.model_path!r}: the weights do "
                                       f"not load ({type(e).__name__}: {e})") from None
    # step_model: the model whose blocks carry LoRA adapters (the train step's); evaluation reads merged params.
    loaded = set(params)
    step_model, params = apply_plan(model, params, plan, precision=precision, compute_dtype=sharding.param_dtype,
                                    seed=config.actor.seed)
    if loading.has_safetensors(m.model_path):  # only the LoRA adapters (created whole, alike on every rank) left
        params = {**params, **sharding_lib.shard_params(
            {k: v for k, v in params.items() if k not in loaded}, sharding)}
    else:  # DTensors on `device` (plain tensors on one rank); the full copy is freed
        params = sharding_lib.shard_model(model, params, sharding)
    tokenizer = processor.tokenizer
    spec = model.vision_spec(pad_token_id=tokenizer.pad_token_id)
    eval_source = make_source(eval_files, config) if eval_files else None
    return Loaded(model, step_model, params, encoder, tokenizer, spec, precision, sharding, eval_source)


def open_writer(config: Any, checked: Checked, config_json: str, rank: int) -> MetricsWriter:
    """metrics.jsonl and the logger backends (rank 0), started before any weights load: a backend that cannot
    start (no login, no network) fails the run now. A training run resumed from a checkpoint continues its
    backend runs; the resolved config is the backends' run config."""
    lg = config.runner.logger
    return MetricsWriter(checked.run_dir, enabled=rank == 0, total_steps=0, backends=lg.logger_backends,
                         project=lg.project_name, experiment=lg.experiment_name, run_config=json.loads(config_json),
                         resume=bool(checked.resume_from and checked.train_files))


@contextlib.contextmanager
def finishing(writer: MetricsWriter, run_dir: str):
    """However the run ends: the backends' runs end (marked failed on an error; a preemption stop is no failure)
    and rank 0 writes the run report (vlm_sft/report.py) into the run dir. A report that cannot be made is a
    warning: the run's results are already saved."""
    failed = False
    try:
        yield
    except faults.Preempted:
        raise
    except BaseException:
        failed = True
        raise
    finally:
        writer.close(failed=failed)
        metrics = os.path.join(run_dir, report_lib.METRICS)
        if writer.enabled and os.path.isfile(metrics) and os.path.getsize(metrics) > 0:  # something to report
            try:
                logging.info("report: %s", ", ".join(report_lib.write_report(run_dir, require_png=False)))
            except Exception as e:  # noqa: BLE001
                logging.warning("report: not written (%s: %s)", type(e).__name__, e)


def make_log(config: Any, loaded: Loaded, checked: Checked, proc: sharding_lib.ProcessInfo,
             writer: MetricsWriter) -> Log:
    """The evaluation of a params dict at a step, logged to `writer` (rank 0 writes) and kept as the latest."""
    last: dict[str, float] = {}

    def evaluate(step: int, params: dict) -> None:
        if loaded.eval_source is None:
            return
        gather = sharding_lib.make_eval_gather(loaded.sharding, loaded.precision, checked.plan.lora_scale)
        metrics = run_eval(loaded.step_model, params, loaded.eval_source, loaded.encoder, loaded.tokenizer,
                           loaded.spec, config, gather=gather, dtype=loaded.precision, world_size=proc.world_size,
                           rank=proc.rank)
        writer.write(step, metrics)
        writer.console(step, metrics)
        last.update(metrics)

    return Log(writer, last, evaluate)


def eval_only(params: dict, checked: Checked, log: Log) -> None:
    """No train data: evaluate the loaded weights, or the params of the checkpoint runner.resume names."""
    resume_from, plan = checked.resume_from, checked.plan
    logging.info("eval-only: %d eval files", len(checked.eval_files))
    if resume_from:
        logging.info("evaluating the params of checkpoint %s", resume_from)
        saved = plan.trainable if plan.frozen else None  # a plan with frozen parts saves the trained leaves
        params = checkpoint_lib.restore_params(resume_from, params, names=saved)
    log.evaluate(checkpoint_lib.read_meta(resume_from)["step"] if resume_from else 0, params)


def make_train_loader(config: Any, checked: Checked, loaded: Loaded, device: torch.device,
                      proc: sharding_lib.ProcessInfo) -> tuple[loader_lib.TrainLoader, bool]:
    """The train data, from the resumed position; and whether the step is compiled (its shapes follow)."""
    a, d, resume_from = config.actor, config.data, checked.resume_from
    # Compiled by region (default on CUDA; vlm_sft/compile.py): static text shapes, i.e. length buckets and a padded
    # label count.
    compiled = a.compile if a.compile is not None else device.type == "cuda"
    buckets = tuple(d.length_buckets) if compiled else ()
    source = make_source(checked.train_files, config)
    budget = a.max_tokens_per_micro_batch if d.packing else 0
    if d.packing:  # each rank's share of a global batch packed into micro-batches of <= budget tokens
        collate_fn = packing_lib.make_packed_collate(loaded.spec, budget, buckets)
    else:
        collate_fn = functools.partial(collate_encoded, spec=loaded.spec, length_buckets=buckets, pad_labels=compiled)
    loader = loader_lib.TrainLoader(
        source, loaded.encoder, collate_fn, global_batch_size=a.global_batch_size,
        micro_batch_size=a.micro_batch_size, world_size=proc.world_size, rank=proc.rank, seed=a.seed,
        shuffle=d.shuffle, num_workers=d.num_workers, bad_rows=d.bad_rows, lazy=d.lazy_loading,
        position=checkpoint_lib.read_meta(resume_from)["data_position"] if resume_from else None, max_tokens=budget)
    return loader, compiled


def init_state(config: Any, loaded: Loaded, plan: trainable_lib.TrainPlan, steps: int) -> tuple[Any, Any, Any]:
    """The optimizer and schedule over `steps`, and the initial TrainState (the plan described in the log)."""
    tx, schedule = step_lib.make_optimizer(config, steps, plan)
    state = init_train_state(loaded.params, tx, frozenset(plan.trainable))
    for line in plan.describe(config.actor.optim.lr, sharding_lib.local_bytes(state.opt_state)):
        logging.info("%s", line)
    return state, tx, schedule


def saved_part_of(plan: trainable_lib.TrainPlan) -> Callable[[Any], Any]:
    """What a checkpoint holds of the TrainState: all of it, or only the trained leaves when parts are frozen."""
    return functools.partial(checkpoint_lib.trained_state,
                             trainable=frozenset(plan.trainable) if plan.frozen else None)


def resume(state: Any, checked: Checked, rank: int) -> tuple[Any, int]:
    """Params, optimizer, step (hence lr schedule) and RNG from checked.resume_from (the data position is the
    loader's); returns the state and the skipped-row count carried on."""
    resume_from, skipped_rows = checked.resume_from, 0
    if resume_from:
        restored = checkpoint_lib.restore(resume_from, saved_part_of(checked.plan)(state))
        state = restored._replace(params={k: restored.params.get(k, v) for k, v in state.params.items()})
        checkpoint_lib.restore_rng(resume_from)
        if rank == 0:  # a global count: rank 0 carries it, the metric sums over ranks
            skipped_rows = int(checkpoint_lib.read_meta(resume_from)["extra"].get("skipped_rows", 0))
        logging.info("resumed from %s at step %d", resume_from, int(state.step))
    return state, skipped_rows


def make_step(config: Any, loaded: Loaded, plan: trainable_lib.TrainPlan, tx: Any, schedule: Any, compiled: bool,
              state: Any, device: torch.device) -> StepSetup:
    """The train step (per-block gathers, checkpointing, compile) and the FLOP model with the device's peak."""
    a, model, sharding = config.actor, loaded.model, loaded.sharding
    block_call = sharding_lib.make_block_call(sharding, checkpointing=a.fsdp_config.gradient_checkpointing,
                                              compile=compiled, lora_scale=plan.lora_scale)
    if compiled:
        compile_lib.set_cache_dir(a.compile_cache_dir or os.path.join(config.runner.logger.log_path,
                                                                      ".inductor_cache"))
    aux_loss_coef = router_aux_loss_coef(config, model.family, model.config)
    if model.family.forward_aux is not None:
        logging.info("router load-balancing loss: coefficient %g (actor.model.router_aux_loss_coef%s)", aux_loss_coef,
                     "" if a.model.get("router_aux_loss_coef") is not None else " unset: the directory's")
    train_step = step_lib.make_train_step(loaded.step_model, tx, schedule, compile=compiled, block_call=block_call,
                                          trainable=frozenset(plan.trainable),
                                          loss_normalization=a.loss_normalization,
                                          world_size=sharding.mesh.size(), aux_loss_coef=aux_loss_coef)
    flop_model = perf.FlopModel.from_model(
        model.config, {k: v.shape for k, v in state.params.items() if not lora_lib.is_adapter(k)},
        model.lm_head_name, weight_grads=plan.weight_grads, lora_rank=plan.lora_rank)
    peak_flops = perf.device_peak_flops(device, sharding.param_dtype)
    logging.info("perf: %s; peak %s FLOP/s per device", perf.FORMULA,
                 f"{peak_flops:.3g}" if peak_flops else "unknown (no perf/mfu)")
    return StepSetup(train_step, flop_model, peak_flops)


def log_training(config: Any, steps: int, loader: loader_lib.TrainLoader, loaded: Loaded,
                 proc: sharding_lib.ProcessInfo) -> None:
    """One line saying what is about to train, and how it is split over ranks and micro-batches."""
    a, world_size = config.actor, proc.world_size
    per_rank = (f"packed into micro-batches of <= {loader.max_tokens} tokens" if loader.max_tokens else
                f"{config_lib.accumulation_steps(config, world_size)} micro-batches of {a.micro_batch_size}")
    logging.info("training %d steps: %d train rows (%d steps/epoch), global batch %d = %d ranks x %s; loss "
                 "normalized by %s; %s on mesh %s%s", steps, len(loader.source), loader.steps_per_epoch,
                 a.global_batch_size, world_size, per_rank, a.loss_normalization, a.fsdp_config.sharding_strategy,
                 tuple(loaded.sharding.mesh.shape),
                 f"; experts expert-parallel on mesh {tuple(loaded.sharding.expert_mesh.shape)} (edp, ep)"
                 if loaded.sharding.expert_mesh is not None else "")


def train_loop(config: Any, state: Any, loader: loader_lib.TrainLoader, setup: StepSetup, steps: int,
               checked: Checked, log: Log, *, skipped_rows: int, config_json: str, device: torch.device,
               proc: sharding_lib.ProcessInfo, preemption: faults.Preemption) -> tuple[Any, str | None]:
    """Steps to `steps`: log, checkpoint, evaluate at their intervals; stop cleanly on a signal, on divergence.
    Returns the final state and the last checkpoint written (or resumed from)."""
    r, rank, world_size, saver, plan = config.runner, proc.rank, proc.world_size, checked.saver, checked.plan
    train_step, flop_model, peak_flops = setup.train_step, setup.flop_model, setup.peak_flops
    writer, last, evaluate = log.writer, log.last, log.evaluate
    saved_part = saved_part_of(plan)
    base_id = checkpoint_lib.base_model_id(config.actor.model.model_path)
    last_ckpt = checked.resume_from
    divergence = faults.DivergenceGuard(r.max_consecutive_skipped_steps, good_checkpoint=checked.resume_from)
    batches = iter(loader)

    def fetch() -> tuple[loader_lib.TrainBatch, list, float]:
        """The next step's batch, already on its way to the device (pinned memory, non-blocking copies)."""
        t0 = time.perf_counter()
        fetched = next(batches)
        # Every rank runs as many micro-batches; the global batch's answer-token count (one small collective).
        fetched.micro_batches, fetched.global_label_tokens = packing_lib.balance(
            fetched.micro_batches, loader.empty_micro_batch if loader.max_tokens else None, world_size=world_size,
            rank=rank)
        return fetched, [_to_device(b, device) for b in fetched.micro_batches], time.perf_counter() - t0

    upcoming = fetch() if int(state.step) < steps else None
    t_last = time.perf_counter()
    for step in range(int(state.step) + 1, steps + 1):
        batch, micro_batches, _ = upcoming
        skipped_rows += batch.num_skipped
        for source_name in batch.skipped_sources:
            logging.warning("skipped bad row %s", source_name)
        faults.stall_for_tests(rank, step)
        state, metrics = train_step(state, micro_batches, batch.global_label_tokens)
        # Fetch the next batch while the device still runs this step (reading the metrics below waits for it).
        upcoming = fetch() if step < steps else None
        t_data = upcoming[2] if upcoming else 0.0
        host = [b for b in batch.micro_batches if b is not None]
        metrics.update({"perf/flops": flop_model.step_flops(host),
                        "perf/padded_tokens": sum(b["attention_mask"].numel() for b in host)})
        # Across ranks: losses averaged, counts summed (grad norm and lr are already global). The preemption flags
        # ride along, so every rank learns in this one collective whether any rank was signalled.
        scalars = sharding_lib.reduce_metrics(
            {**metrics, "data/skipped_rows": skipped_rows, SIGNALLED: float(preemption.requested)},
            sum_keys=SUM_METRICS + (SIGNALLED,))
        stop = faults.Preemption.agreed(scalars.pop(SIGNALLED))
        now = time.perf_counter()
        step_time, t_last = now - t_last, now
        scalars.update({"time/step": step_time, "perf/tokens_per_sec": scalars["train/tokens"] / step_time,
                        "perf/padding_fraction": 1.0 - scalars["train/tokens"] / scalars["perf/padded_tokens"],
                        "perf/max_memory_gib": perf.max_memory_gib(device),
                        "perf/data_wait_fraction": t_data / step_time, "data/epoch": float(batch.position["epoch"])})
        step_mfu = perf.mfu(scalars["perf/flops"], step_time, peak_flops, world_size)
        if step_mfu is not None:
            scalars["perf/mfu"] = step_mfu
        if step == 1 and log.planned_gib is not None:
            measured = "peak allocated" if device.type == "cuda" else "peak resident set"
            logging.info("memory: planned %.2f GiB per device, %s after step 1: %.2f GiB", log.planned_gib -
                         (planner.RUNTIME_CUDA_GIB if device.type == "cuda" else 0.0), measured,
                         scalars["perf/max_memory_gib"])
        if step % r.log_interval == 0 or step == steps or step == 1:
            writer.write(step, scalars)
            writer.console(step, scalars)
            last.update(scalars)
        divergence.update(step, scalars["train/skipped_update"] > 0)  # raises Diverged after too many in a row
        if stop or step == steps or (r.save_interval > 0 and step % r.save_interval == 0):
            last_ckpt = saver.save(saved_part(state), data_position=batch.position, config_json=config_json,
                                   extra={"skipped_rows": int(scalars["data/skipped_rows"]),
                                          **({"base_model": base_id} if plan.frozen else {})})
            divergence.saved(last_ckpt)
            t_last = time.perf_counter()
        if stop:
            saver.wait()
            signalled = preemption.signal_name or "a signal to another rank"
            raise faults.Preempted(f"stopped after step {step} on {signalled}: checkpoint {last_ckpt} saved; run the "
                                   "same command again to continue from it (runner.resume=auto)")
        saver.poll()
        if r.val_check_interval > 0 and step % r.val_check_interval == 0 and step != steps:
            evaluate(step, state.params)
            t_last = time.perf_counter()
    return state, last_ckpt


def final_eval_and_export(config: Any, state: Any, steps: int, last_ckpt: str | None, checked: Checked,
                          log: Log, rank: int) -> None:
    """The last checkpoint committed, the final evaluation, and the Hugging Face export (runner.export_hf)."""
    checked.saver.wait()
    log.evaluate(steps, state.params)
    if config.runner.export_hf and rank == 0 and last_ckpt:  # from the final checkpoint: no gather, one shard
        out = export_lib.export_checkpoint(last_ckpt, os.path.join(checked.run_dir, "hf_export"), overwrite=True)
        logging.info("exported %s to %s", last_ckpt, out)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    rank = sharding_lib.ProcessInfo.from_env().rank
    if rank != 0:  # one console: rank 0's (warnings and errors still show from every rank)
        logging.set_verbosity(logging.WARNING)
    try:
        run(_CONFIG.value, _MODE.value)
    except (config_lib.ConfigError, model_lib.ModelLoadError, checkpoint_lib.CheckpointError,
            export_lib.ExportError, preflight.DataCheckFailed) as e:
        # Config and model-directory errors are the same on every rank: rank 0 says it once, all exit. The others
        # wait a moment first: torchrun stops every worker as soon as one exits, which could cut rank 0 short.
        if rank != 0:
            time.sleep(RANK_EXIT_GRACE_S)
        raise SystemExit(f"error: {e}" if rank == 0 else 1) from None
    except (robo2vlm.RowError, PromptTooLong) as e:  # data errors may hit one rank only
        raise SystemExit(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}") from None
    except faults.Preempted as e:  # every rank stops after the same step
        if rank == 0:
            print(f"vlm-sft: {e}", file=sys.stderr)
        raise SystemExit(faults.EXIT_PREEMPTED) from None
    except faults.Diverged as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        raise SystemExit(faults.EXIT_DIVERGED) from None
    except (torch.distributed.DistError, RuntimeError) as e:
        if not faults.is_collective_failure(e):
            raise
        # A peer died or stalled: its own error (if it could print one) is the first one shown.
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SystemExit(f"error (rank {rank}): a collective with the other ranks failed ({type(e).__name__}: "
                         f"{first}); another rank failed or stopped answering (runner.collective_timeout_s="
                         f"{_CONFIG.value.runner.collective_timeout_s:g}): see its error above") from None


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parser, with config override mistakes (unknown key, wrong type) as one clear line."""
    try:
        return flags.FLAGS(argv)
    except (AttributeError, KeyError, TypeError, ValueError, flags.Error) as e:
        text = str(e).replace("\\n", "\n").replace("\\'", "'").replace('\\"', '"')
        if "Traceback" in text:  # an error raised inside get_config: its last line says what is wrong
            text = text.strip().splitlines()[-1]
        message = " ".join(text.split()).strip("'\"")
        raise SystemExit(f"error: bad --config: {message}") from None


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    try:
        app.run(main, flags_parser=parse_flags)
    except SystemExit as e:  # the normal way out, success or a one-line error (a traceback exits normally)
        sharding_lib.exit_process(e.code)
