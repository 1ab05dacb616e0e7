"""Every config field is overridable from the command line: sequence fields are tuples (ml_collections' flags
cannot override a list), and the code takes the tuples they parse to."""
import itertools

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from vlm_sft import config as config_lib
from vlm_sft import trainable
from configs_loader import CONFIG, load_config

VARIANTS = ("demo", "eval", "qwen3", "lora")


def leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict):
            yield from leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


@pytest.mark.parametrize("variant", [",".join(c) for n in range(len(VARIANTS) + 1)
                                     for c in itertools.combinations(VARIANTS, n)])
def test_no_field_of_any_variant_is_a_list(variant):
    lists = [name for name, value in leaves(load_config(variant)) if isinstance(value, list)]
    assert not lists, f"list fields cannot be overridden with --config.<field>=...: {lists}; make them tuples"


def parse(*overrides: str) -> ml_collections.ConfigDict:
    """The config as `python -m vlm_sft.main --config=configs/robo2vlm.py:demo <overrides>` parses it."""
    argv = ["vlm_sft.main", f"--config={CONFIG}:demo", *overrides]
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", flag_values=fv, lock_config=True, sys_argv=argv)
    fv(argv)
    return fv.config


def test_sequence_fields_take_tuple_literals():
    c = parse("--config.data.image_keys=('image', 'wrist')",
              "--config.runner.logger.logger_backends=('tensorboard', 'wandb', 'swanlab')",
              "--config.data.length_buckets=(64, 128)",
              r"--config.actor.model.freeze=('^model\\.visual\\.blocks\\.[0-1]\\.',)",
              r"--config.actor.optim.lr_multipliers="
              r"(('^model\\.visual\\.merger\\.', 0.5), ('^model\\.visual\\.', 0.1))",
              "--config.data.train_data_paths=a.parquet,b.parquet")
    assert c.data.image_keys == ("image", "wrist")
    assert c.runner.logger.logger_backends == ("tensorboard", "wandb", "swanlab")
    assert c.data.length_buckets == (64, 128)
    assert c.actor.model.freeze == (r"^model\.visual\.blocks\.[0-1]\.",)
    assert c.actor.optim.lr_multipliers == ((r"^model\.visual\.merger\.", 0.5), (r"^model\.visual\.", 0.1))
    config_lib.validate(c, mode="train")  # the parsed tuples pass every check (backends: installed in CI)
    assert trainable._multiplier_pairs(c.actor.optim.lr_multipliers) == [
        (r"^model\.visual\.merger\.", 0.5), (r"^model\.visual\.", 0.1)]
    assert config_lib.split_paths(c.data.train_data_paths) == ["a.parquet", "b.parquet"]


def test_a_one_name_tuple_and_an_empty_tuple():
    c = parse('--config.data.image_keys=("image",)', "--config.runner.logger.logger_backends=()")
    assert c.data.image_keys == ("image",) and c.runner.logger.logger_backends == ()
    config_lib.validate(c, mode="train")
    with pytest.raises(config_lib.ConfigError, match="data.image_keys is empty"):
        config_lib.validate(parse("--config.data.image_keys=()"), mode="train")
