"""Load configs/robo2vlm.py the way --config does (a file path, variants after the colon)."""
import importlib.util
import pathlib

import ml_collections

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "robo2vlm.py"


def load_config(arg: str = "") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("robo2vlm_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(arg)
    # CPU tests compute in fp32, explicitly (the default computes in bf16 like RLinf: slow on a CPU, and bf16
    # tolerances would hide real differences). Tests of bf16 compute set it back themselves.
    config.actor.fsdp_config.mixed_precision.param_dtype = "fp32"
    config.actor.fsdp_config.mixed_precision.buffer_dtype = "fp32"
    return config


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Set dotted fields, as --config.a.b=v does: {"runner.max_steps": 4}."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def run_config(variant: str, tmp_path, name: str, model_dir, train_data, eval_data="",
               **overrides) -> ml_collections.ConfigDict:
    """A config of `variant` for a run named `name` under tmp_path on the given model and data (eval_data "" = no
    evaluation), logging every step; more fields as dotted `overrides` (keys with dots: pass a dict with **)."""
    c = load_config(variant)
    c.runner.logger.log_path = str(tmp_path)
    c.runner.logger.experiment_name = name
    c.actor.model.model_path = str(model_dir)
    c.data.train_data_paths = str(train_data)
    c.data.eval_data_paths = str(eval_data)
    c.runner.log_interval = 1
    return override(c, overrides)
