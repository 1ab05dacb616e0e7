"""Load configs/robo2vlm.py the way --config does (a file path, variants after the colon)."""
import importlib.util
import pathlib

import ml_collections

CONFIG = pathlib.Path(__file__).resolve().parents[1] / "configs" / "robo2vlm.py"


def load_config(arg: str = "") -> ml_collections.ConfigDict:
    spec = importlib.util.spec_from_file_location("robo2vlm_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def override(config: ml_collections.ConfigDict, overrides: dict) -> ml_collections.ConfigDict:
    """Set dotted fields, as --config.a.b=v does: {"runner.max_steps": 4}."""
    for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config
