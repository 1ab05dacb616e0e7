"""The `:demo` config's assets: a tiny random model of the configured family and Robo2VLM-format data, built once
under the run directory in place of the "demo" placeholders."""
import os
from typing import Any

from absl import logging

from vlm_sft.demo import data, families

DEMO = "demo"


def prepare_demo(config: Any, run_dir: str) -> None:
    """Replace the "demo" placeholders with a tiny random model and generated data, built once under the run dir."""
    root = os.path.join(run_dir, "demo_assets")
    if config.actor.model.model_path == DEMO:
        path = os.path.join(root, "model")
        if not os.path.isfile(os.path.join(path, "config.json")):
            model_type = config.actor.model.model_type
            logging.info("demo: building a tiny random %s model in %s", model_type, path)
            families.make_tiny_model_dir_for(model_type, path + ".tmp", seed=0)
            os.replace(path + ".tmp", path)
        config.actor.model.model_path = path
    if DEMO in (config.data.train_data_paths, config.data.eval_data_paths):
        path = os.path.join(root, "data")
        if not os.path.isdir(path):
            logging.info("demo: writing Robo2VLM-format parquet files to %s", path)
            rows = config.data.demo_rows
            data.make_robo2vlm_dir(path + ".tmp", n_train=rows, n_test=max(rows // 8, 1), seed=0,
                                   fixed_choices=True)
            os.replace(path + ".tmp", path)
        for key in ("train_data_paths", "eval_data_paths"):
            if config.data[key] == DEMO:
                config.data[key] = path
