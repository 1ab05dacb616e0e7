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
