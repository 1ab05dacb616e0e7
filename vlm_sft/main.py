"""vlm-sft entry point: the whole algorithm, top to bottom.

  python -m vlm_sft.main --config configs/robo2vlm.py:demo
  python -m vlm_sft.main --config configs/robo2vlm.py --config.actor.model.model_path=... [--mode=eval]

config -> checks (before anything heavy) -> data -> model -> optimizer -> loop (step, log, eval) -> final eval.
"""
from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

import torch
from absl import app, flags, logging
from ml_collections import config_flags

from vlm_sft import config as config_lib
from vlm_sft import evaluate as evaluate_lib
from vlm_sft import model as model_lib
from vlm_sft import step as step_lib
from vlm_sft.data import loader as loader_lib
from vlm_sft.data import robo2vlm
from vlm_sft.data.collate import collate_encoded
from vlm_sft.data.encode import Encoder, PromptTooLong
from vlm_sft.data.processor import load_processor
from vlm_sft.data.vision import VisionSpec
from vlm_sft.metrics import MetricsWriter
from vlm_sft.state import init_train_state

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file, e.g. configs/robo2vlm.py:demo",
                                          lock_config=True)
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"], "train (then evaluate) or evaluate only")

DEMO = "demo"


def prepare_demo(config: Any, run_dir: str) -> None:
    """Replace the "demo" placeholders with a tiny random model and generated data, built once under the run dir."""
    from vlm_sft import testing

    root = os.path.join(run_dir, "demo_assets")
    if config.actor.model.model_path == DEMO:
        path = os.path.join(root, "model")
        if not os.path.isfile(os.path.join(path, "config.json")):
            logging.info("demo: building a tiny random Qwen2.5-VL in %s", path)
            testing.make_tiny_model_dir(path + ".tmp", seed=0)
            os.replace(path + ".tmp", path)
        config.actor.model.model_path = path
    if DEMO in (config.data.train_data_paths, config.data.eval_data_paths):
        path = os.path.join(root, "data")
        if not os.path.isdir(path):
            logging.info("demo: writing Robo2VLM-format parquet files to %s", path)
            rows = config.data.demo_rows
            testing.make_robo2vlm_dir(path + ".tmp", n_train=rows, n_test=max(rows // 8, 1), seed=0)
            os.replace(path + ".tmp", path)
        for key in ("train_data_paths", "eval_data_paths"):
            if config.data[key] == DEMO:
                config.data[key] = path


def make_source(files: list[str], config: Any) -> robo2vlm.Robo2VLMSource:
    d = config.data
    return robo2vlm.Robo2VLMSource(files, prompt_key=d.prompt_key, choice_key=d.choice_key,
                                   answer_key=d.answer_key, image_keys=list(d.image_keys), lazy=d.lazy_loading)


def find_files(config: Any, field: str, split: str) -> list[str]:
    paths = config_lib.split_paths(config.data[field])
    if not paths:
        return []
    try:
        files = robo2vlm.find_parquet_files(paths, split)
    except ValueError as e:
        raise config_lib.ConfigError(f"data.{field}: {e}") from None
    d = config.data
    try:
        robo2vlm.check_schema(files, prompt_key=d.prompt_key, choice_key=d.choice_key, answer_key=d.answer_key,
                              image_keys=list(d.image_keys))
    except ValueError as e:
        raise config_lib.ConfigError(f"data.{field}: {e}") from None
    return files


def _list(x: list) -> list:
    return x


def run_eval(model: model_lib.Model, params: dict, source: robo2vlm.Robo2VLMSource, encoder: Encoder,
             tokenizer: Any, spec: VisionSpec, config: Any) -> dict[str, float]:
    d = config.data
    batches = loader_lib.eval_batches(source, encoder, _list, batch_size=config.actor.eval_batch_size,
                                      num_workers=d.num_workers, bad_rows=d.bad_rows, max_rows=d.eval_max_rows)
    t0 = time.perf_counter()
    metrics = evaluate_lib.evaluate(model, params, batches, spec=spec, tokenizer=tokenizer,
                                    use_generation=config.eval.generate,
                                    use_choice_scoring=config.eval.choice_scoring,
                                    max_new_tokens=config.eval.max_new_tokens)
    metrics["time/eval"] = time.perf_counter() - t0
    return metrics


def total_steps(config: Any, steps_per_epoch: int) -> int:
    if config.runner.max_steps > 0:
        return config.runner.max_steps
    return config.runner.max_epochs * steps_per_epoch


def run(config: Any, mode: str) -> dict[str, float]:
    """Train and/or evaluate as configured; returns the last metrics written."""
    world_size = 1
    config_lib.validate(config, mode=mode, world_size=world_size)
    run_dir = config_lib.run_dir(config)
    os.makedirs(run_dir, exist_ok=True)
    prepare_demo(config, run_dir)

    # Everything that can be checked without loading the model, first.
    train_files = find_files(config, "train_data_paths", "train") if mode == "train" else []
    eval_files = find_files(config, "eval_data_paths", "test")
    model_lib.check_model_dir(config.actor.model.model_path)

    with open(os.path.join(run_dir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    torch.manual_seed(config.actor.seed)
    d = config.data
    try:
        processor = load_processor(config.actor.model.model_path, min_pixels=d.min_pixels,
                                   max_pixels=d.max_pixels)
    except ValueError as e:
        raise model_lib.ModelLoadError(f"actor.model.model_path: {e}") from None
    encoder = Encoder(processor, max_prompt_length=d.max_prompt_length, truncation=d.truncation,
                      apply_chat_template=d.apply_chat_template)
    model, params = model_lib.load_model(config.actor.model.model_path,
                                         attn_implementation=config.actor.model.attn_implementation)
    precision = config_lib.parse_dtype(config.actor.model.precision, "actor.model.precision")
    params = {k: v.to(precision) for k, v in params.items()}
    tokenizer = processor.tokenizer
    spec = VisionSpec.from_config(model.config, pad_token_id=tokenizer.pad_token_id)
    eval_source = make_source(eval_files, config) if eval_files else None
    writer = MetricsWriter(run_dir, enabled=True, total_steps=0)
    last: dict[str, float] = {}

    def evaluate(step: int, params: dict) -> None:
        if eval_source is None:
            return
        metrics = run_eval(model, params, eval_source, encoder, tokenizer, spec, config)
        writer.write(step, metrics)
        writer.console(step, metrics)
        last.update(metrics)

    if not train_files:
        logging.info("eval-only: %d eval files", len(eval_files))
        evaluate(0, params)
        writer.close()
        return last

    a = config.actor
    source = make_source(train_files, config)
    loader = loader_lib.TrainLoader(
        source, encoder, functools.partial(collate_encoded, spec=spec), global_batch_size=a.global_batch_size,
        micro_batch_size=a.micro_batch_size, world_size=world_size, rank=0, seed=a.seed, shuffle=d.shuffle,
        num_workers=d.num_workers, bad_rows=d.bad_rows, lazy=d.lazy_loading)
    steps = total_steps(config, loader.steps_per_epoch)
    writer.total_steps = steps
    tx, schedule = step_lib.make_optimizer(config, steps)
    state = init_train_state(params, tx)
    train_step = step_lib.make_train_step(model, tx, schedule, compile=a.compile)
    logging.info("training %d steps: %d train rows (%d steps/epoch), global batch %d = %d micro-batches of %d",
                 steps, len(source), loader.steps_per_epoch, a.global_batch_size,
                 config_lib.accumulation_steps(config, world_size), a.micro_batch_size)

    r = config.runner
    skipped_rows = 0
    batches = iter(loader)
    t_last = time.perf_counter()
    for step in range(int(state.step) + 1, steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        t_data = time.perf_counter() - t0
        skipped_rows += batch.num_skipped
        for source_name in batch.skipped_sources:
            logging.warning("skipped bad row %s", source_name)
        state, metrics = train_step(state, batch.micro_batches)
        scalars = {k: float(v) for k, v in metrics.items()}
        now = time.perf_counter()
        step_time, t_last = now - t_last, now
        scalars.update({"time/step": step_time, "perf/tokens_per_sec": scalars["train/tokens"] / step_time,
                        "perf/data_wait_fraction": t_data / step_time, "data/skipped_rows": float(skipped_rows),
                        "data/epoch": float(batch.position["epoch"])})
        if step % r.log_interval == 0 or step == steps or step == 1:
            writer.write(step, scalars)
            writer.console(step, scalars)
            last.update(scalars)
        if r.val_check_interval > 0 and step % r.val_check_interval == 0 and step != steps:
            evaluate(step, state.params)
            t_last = time.perf_counter()
    evaluate(steps, state.params)
    writer.close()
    return last


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    import transformers
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    try:
        run(_CONFIG.value, _MODE.value)
    except (config_lib.ConfigError, model_lib.ModelLoadError, robo2vlm.RowError, PromptTooLong) as e:
        raise SystemExit(f"error: {e}") from None


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
    app.run(main, flags_parser=parse_flags)
