"""The real entry point: training, eval-only, run directory contents, and bad input."""
import json
import os
import subprocess
import sys

import pytest

from vlm_sft import main as main_lib
from vlm_sft import demo
from vlm_sft.config import ConfigError
from vlm_sft.data.robo2vlm import RowError
from vlm_sft.models import ModelLoadError
from configs_loader import CONFIG, override, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_config(tmp_path, model_dir, data_dir, **overrides):
    return run_config("demo", tmp_path, "run", model_dir, data_dir, data_dir, **{
        "runner.max_steps": 4, "runner.val_check_interval": 2, "actor.global_batch_size": 8,
        "actor.micro_batch_size": 4, "eval.max_new_tokens": 4, **overrides})


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_writes_a_complete_run_dir(tmp_path, tiny_model_dir, robo2vlm_dir):
    c = small_config(tmp_path, tiny_model_dir, robo2vlm_dir)
    main_lib.run(c, "train")
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "config.json").read_text())["actor"]["global_batch_size"] == 8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(run_dir / "tensorboard"))
    lines = read_metrics(run_dir)
    train = [l for l in lines if "train/loss" in l]
    assert [l["step"] for l in train] == [1, 2, 3, 4]
    for key in ("train/learning_rate", "train/grad_norm", "time/step", "perf/tokens_per_sec"):
        assert all(key in l for l in train), key
    evals = [l for l in lines if "eval/choice_accuracy" in l]
    assert [l["step"] for l in evals] == [0, 2, 4]  # demo: val_before_train
    assert all(l["eval/rows"] == 16 and 0 <= l["eval/eval_accuracy"] <= 1 for l in evals)  # every test row


def test_eval_only_counts_every_row(tmp_path, tiny_model_dir):
    data = demo.make_robo2vlm_dir(tmp_path / "data", n_train=4, n_test=23, test_files=3, rows_per_group=5)
    c = small_config(tmp_path, tiny_model_dir, data, **{"data.train_data_paths": "", "actor.eval_batch_size": 4})
    metrics = main_lib.run(c, "train")  # no training data -> eval only, as RLinf
    assert metrics["eval/rows"] == 23
    assert not any("train/loss" in l for l in read_metrics(tmp_path / "run"))
    metrics = main_lib.run(small_config(tmp_path, tiny_model_dir, data), "eval")
    assert metrics["eval/rows"] == 23


@pytest.mark.parametrize("override, error, match", [
    ({"actor.model.model_path": "/no/such/model"}, ModelLoadError, "actor.model.model_path='/no/such/model'"),
    ({"data.train_data_paths": "/no/such/data"}, ConfigError, "data.train_data_paths: .*/no/such/data"),
    ({"data.prompt_key": "prompt"}, ConfigError, "missing column.*prompt"),
    ({"actor.global_batch_size": 6, "data.packing": False}, ConfigError, "global_batch_size=6 is not divisible"),
    ({"actor.loss_normalization": "sequence"}, ConfigError, "loss_normalization='sequence'"),
    ({"actor.max_tokens_per_micro_batch": 0}, ConfigError, "max_tokens_per_micro_batch=0"),
    ({"actor.fsdp_config.sharding_strategy": "zero3"}, ConfigError, "sharding_strategy='zero3'"),
    ({"actor.optim.lr_scheduler": "warmup_cosine"}, ConfigError, "lr_scheduler='warmup_cosine'"),
    ({"actor.model.model_type": "llava"}, ModelLoadError,
     "actor.model.model_type='llava': unsupported; vlm-sft supports 'qwen2.5_vl' .*'qwen3_vl'"),
    ({"actor.model.model_type": "qwen3_vl"}, ModelLoadError,
     "actor.model.model_type='qwen3_vl' but .*config.json has model_type 'qwen2_5_vl'"),
])
def test_bad_config_fails_before_the_model_loads(tmp_path, tiny_model_dir, robo2vlm_dir, monkeypatch,
                                                  override, error, match):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(main_lib.model_lib, "load_model", no_model)
    with pytest.raises(error, match=match):
        main_lib.run(small_config(tmp_path, tiny_model_dir, robo2vlm_dir, **override), "train")


def test_eager_loading_that_would_not_fit_in_memory_is_refused_before_the_model_loads(
        tmp_path, tiny_model_dir, robo2vlm_dir, monkeypatch):
    """RLinf's default (lazy_loading=False) holds every row in each process: on the full Robo2VLM train split
    (~130 GB) x 8 ranks that is an OOM kill after the model has loaded. Here it is one line, up front."""
    files = main_lib.find_files(small_config(tmp_path, tiny_model_dir, robo2vlm_dir), "train_data_paths", "train")
    files += main_lib.find_files(small_config(tmp_path, tiny_model_dir, robo2vlm_dir), "eval_data_paths", "test")
    need = main_lib.robo2vlm.in_memory_bytes(files, prompt_key="question", choice_key="choices",
                                             answer_key="correct_answer", image_keys=["image"])
    monkeypatch.setattr(main_lib, "available_memory_bytes", lambda: int(need / 0.8) - 1)  # one does not fit

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(main_lib.model_lib, "load_model", no_model)
    with pytest.raises(ConfigError, match=rf"data.lazy_loading=False reads {len(files)} parquet file.* on each of "
                                          r"the 1 process.*Set data.lazy_loading=True"):
        main_lib.run(small_config(tmp_path, tiny_model_dir, robo2vlm_dir), "train")

    # Every process on the machine counts (torchrun's LOCAL_WORLD_SIZE); streaming holds a row group at a time.
    c = small_config(tmp_path, tiny_model_dir, robo2vlm_dir)
    room_for_7 = int(need * 7.5 / 0.8)
    main_lib.check_eager_loading_fits(c, files, local_processes=7, available=room_for_7)
    with pytest.raises(ConfigError, match="on each of the 8 process"):
        main_lib.check_eager_loading_fits(c, files, local_processes=8, available=room_for_7)
    main_lib.check_eager_loading_fits(override(c, {"data.lazy_loading": True}), files, local_processes=8,
                                      available=room_for_7)


def test_bad_row_error_names_file_and_row(tmp_path, tiny_model_dir):
    data = demo.make_robo2vlm_dir(tmp_path / "data", n_train=16, n_test=4, train_files=1, bad_rows={5: "answer"})
    c = small_config(tmp_path, tiny_model_dir, data, **{"data.shuffle": False, "data.eval_data_paths": ""})
    with pytest.raises(RowError, match=r"train-00000-of-00001.parquet:5: answer .*out of range"):
        main_lib.run(c, "train")


def test_bad_rows_skipped_and_counted(tmp_path, tiny_model_dir):
    data = demo.make_robo2vlm_dir(tmp_path / "data", n_train=16, n_test=4, train_files=1,
                                     bad_rows={1: "image", 6: "choices"})
    c = small_config(tmp_path, tiny_model_dir, data, **{"data.bad_rows": "skip", "data.eval_data_paths": "",
                                                        "runner.max_steps": 2})
    metrics = main_lib.run(c, "train")
    assert metrics["data/skipped_rows"] == 2


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "vlm_sft.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_errors_are_one_clear_line(tmp_path):
    out = run_cli(f"--config={CONFIG}:demo", "--config.actor.micro_batchsize=3", cwd=tmp_path)
    assert out.returncode != 0
    assert 'Did you mean "micro_batch_size"' in out.stderr.strip().splitlines()[-1]
    out = run_cli(f"--config={CONFIG}", "--config.actor.model.model_path=/nope",
                  "--config.data.train_data_paths=/no/data", cwd=tmp_path)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines()[-1] == (
        "error: data.train_data_paths: /no/data: no such file or folder (split 'train')")
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_demo_learns(tmp_path):
    """The README's demo command: loss falls and accuracy rises above chance, within the laptop budget."""
    out = run_cli(f"--config={CONFIG}:demo", f"--config.runner.logger.log_path={tmp_path}", cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = read_metrics(tmp_path / "demo")
    train = [l for l in lines if "train/loss" in l]
    evals = [l for l in lines if "eval/choice_accuracy" in l]
    assert train[-1]["train/loss"] < 0.25 * train[0]["train/loss"]
    assert evals[-1]["eval/choice_accuracy"] >= 0.8  # 2-4 choices: chance is ~0.36
    assert evals[-1]["eval/eval_accuracy"] > evals[0]["eval/eval_accuracy"]
    assert evals[-1]["eval/rows"] == 64


@pytest.mark.slow
def test_qwen3_vl_trains_evaluates_and_its_export_evaluates_the_same(tmp_path, tiny_qwen3_vl_dir, robo2vlm_dir):
    """actor.model.model_type=qwen3_vl through the entry point: train, both eval metrics, checkpoint, export; the
    exported directory, evaluated on its own, scores exactly what the trainer scored at the end."""
    c = small_config(tmp_path / "train", tiny_qwen3_vl_dir, robo2vlm_dir,
                     **{"actor.model.model_type": "qwen3_vl", "runner.export_hf": True, "runner.val_check_interval": 0,
                        "runner.val_before_train": False})
    trained = main_lib.run(c, "train")
    assert trained["eval/rows"] == 16 and "train/loss" in trained
    export = tmp_path / "train" / "run" / "hf_export"
    c = small_config(tmp_path / "eval", export, robo2vlm_dir, **{"actor.model.model_type": "qwen3_vl"})
    evaluated = main_lib.run(c, "eval")
    for key in ("eval/rows", "eval/eval_accuracy", "eval/choice_accuracy"):
        assert evaluated[key] == trained[key], key
