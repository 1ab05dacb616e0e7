"""--mode=check: every row read as training would, bad rows named by reason, lengths and buckets, no weights."""
import json
import os
import shutil
import subprocess
import sys

import pytest

from vlm_sft import main as main_lib
from vlm_sft import demo, preflight
from vlm_sft.config import ConfigError
from configs_loader import CONFIG, override, run_config

BAD = {2: "image", 5: "answer", 7: "long", 9: "missing_image", 12: "json", 14: "no_image"}


@pytest.fixture(scope="module")
def model_without_weights(tiny_model_dir, tmp_path_factory):
    """The tiny model directory with its safetensors shards and index removed: only processor files remain."""
    path = tmp_path_factory.mktemp("no_weights") / "model"
    shutil.copytree(tiny_model_dir, path, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    return path


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """JSONL with image files: 20 train rows in 2 files (six planted bad rows), 5 test rows; 1 and 3 images."""
    return demo.make_json_dir(tmp_path_factory.mktemp("planted") / "data", n_train=20, n_test=5,
                                 images_per_row=(1, 3), bad_rows=BAD)


def check_config(tmp_path, model_dir, data_dir, **overrides):
    return run_config("", tmp_path, "check", model_dir, data_dir, data_dir, **{
        "data.min_pixels": 56 * 56, "data.max_pixels": 56 * 56, "data.max_prompt_length": 256,
        "data.num_workers": 0, "actor.global_batch_size": 4, "actor.micro_batch_size": 2, "runner.max_steps": 10,
        **overrides})


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("--mode=check loaded the model")
    monkeypatch.setattr(main_lib.model_lib, "load_model", refuse)


def test_planted_bad_rows_are_each_reported_and_stop_the_run(tmp_path, model_without_weights, planted,
                                                            no_model_load):
    c = check_config(tmp_path, model_without_weights, planted, **{"data.truncation": "error"})
    with pytest.raises(preflight.DataCheckFailed, match=r"^preflight: the run would stop: 6 bad train row\(s\) "
                                                        r"under data.bad_rows='error'.*first: .*:3: undecodable"):
        main_lib.run(c, "check")
    report = json.loads((tmp_path / "check" / "preflight.json").read_text())
    train, test = report["splits"]["train"], report["splits"]["test"]
    assert (train["files"], train["rows"], train["good_rows"], train["bad_rows"]) == (2, 20, 14, 6)
    reasons = {reason: entry["count"] for reason, entry in train["bad_rows_by_reason"].items()}
    assert reasons == {"image": 3, "answer": 1, "too_long": 1, "json": 1}
    named = [m for entry in train["bad_rows_by_reason"].values() for m in entry["first"]]
    first_file = os.path.join(str(planted), "train-00000-of-00002.jsonl")
    second_file = os.path.join(str(planted), "train-00001-of-00002.jsonl")
    # Rows 0-9 are lines 1-10 of the first file, rows 10-19 of the second.
    for line, what in [(3, "undecodable image 'images/train-00002-0.png'"), (6, "answer 2 in column"),
                       (8, "prompt is"), (10, "image 'images/missing-00009.png' in key 'image' not found")]:
        assert any(m.startswith(f"{first_file}:{line}: {what}") for m in named), (line, named)
    assert any(m.startswith(f"{second_file}:3: not valid JSON") for m in named)
    assert any(m.startswith(f"{second_file}:5: missing image in column 'image'") for m in named)
    assert (test["rows"], test["good_rows"], test["rows_evaluated"]) == (5, 5, 5)
    assert report["would_stop"] and len(report["stop_reasons"]) == 1
    # Good rows: 1 and 3 images of 56x56 budget -> 4 or 12 image tokens; buckets of prompt + answer.
    assert train["images_per_row"] == {"1": 7, "3": 7}
    assert (train["prompt_image_tokens"]["min"], train["prompt_image_tokens"]["max"]) == (4, 12)
    assert train["prompt_tokens"]["max"] <= 256 and train["truncated_rows"] == 0
    assert sum(train["rows_per_length_bucket"].values()) == 14 and list(train["rows_per_length_bucket"]) == ["128"]
    assert train["image_width"]["max"] == 64 and train["image_height"]["min"] == 48
    assert train["epoch"] == {"rows": 20, "global_batch_size": 4, "steps_per_epoch": 5, "rows_left_out_per_epoch": 0,
                              "configured_steps": 10, "epochs": 2.0}


def test_skip_policy_passes_and_text_truncation_cuts_instead(tmp_path, model_without_weights, planted,
                                                             no_model_load, capsys):
    c = check_config(tmp_path, model_without_weights, planted,
                     **{"data.bad_rows": "skip", "data.num_workers": 2, "data.length_buckets": [64, 96]})
    report = main_lib.run(c, "check")
    assert not report["would_stop"]
    train = report["splits"]["train"]
    assert (train["good_rows"], train["bad_rows"], train["truncated_rows"]) == (15, 5, 1)  # the long row is cut
    assert train["prompt_tokens"]["max"] == 256
    assert set(train["rows_per_length_bucket"]) <= {"64", "96", "192", "288"}  # past the last: its multiples
    out = capsys.readouterr().out
    assert "== train: 20 rows in 2 file(s); 15 good, 5 bad" in out
    assert "ok: the run as configured would not stop on this data (data.bad_rows='skip': 5 bad row(s) would be " \
           "skipped)" in out
    # The worker processes saw the same rows as one process does.
    serial = main_lib.run(override(c, {"data.num_workers": 0}), "check")
    for split in ("train", "test"):
        assert serial["splits"][split] == report["splits"][split]


def test_parquet_rows_are_checked_by_row_group(tmp_path, model_without_weights, no_model_load):
    data = demo.make_robo2vlm_dir(tmp_path / "data", n_train=24, n_test=3, rows_per_group=5,
                                     bad_rows={3: "image", 17: "choices"})
    c = check_config(tmp_path, model_without_weights, data, **{"data.bad_rows": "skip", "data.num_workers": 2})
    assert [len(chunk) for chunk in preflight._chunks(main_lib.make_source(
        main_lib.find_files(c, "train_data_paths", "train"), c, lazy=True))] == [5, 5, 2, 5, 5, 2]
    train = main_lib.run(c, "check")["splits"]["train"]
    assert (train["files"], train["rows"], train["bad_rows"]) == (2, 24, 2)
    assert train["bad_rows_by_reason"]["image"]["first"][0].startswith(
        f"{data}/train-00000-of-00002.parquet:3: undecodable image in column 'image'")
    assert train["bad_rows_by_reason"]["choices"]["first"][0].startswith(
        f"{data}/train-00001-of-00002.parquet:5: unparsable choices")


def test_too_few_rows_for_one_batch_would_stop(tmp_path, model_without_weights, planted, no_model_load):
    c = check_config(tmp_path, model_without_weights, planted, **{"data.bad_rows": "skip",
                                                                  "actor.global_batch_size": 32})
    with pytest.raises(preflight.DataCheckFailed, match="20 train rows are fewer than actor.global_batch_size=32"):
        main_lib.run(c, "check")


def test_check_refuses_bad_paths_and_torchrun_before_reading_rows(tmp_path, model_without_weights, planted,
                                                                  monkeypatch):
    c = check_config(tmp_path, model_without_weights, tmp_path / "nope")
    with pytest.raises(ConfigError, match="data.train_data_paths: .*nope: no such file or folder"):
        main_lib.run(c, "check")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ConfigError, match="--mode=check runs as one process"):
        main_lib.run(check_config(tmp_path, model_without_weights, planted), "check")


def test_cli_check_exits_nonzero_with_one_line(tmp_path, model_without_weights, planted):
    args = [sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}", "--mode=check",
            f"--config.actor.model.model_path={model_without_weights}", f"--config.data.train_data_paths={planted}",
            f"--config.data.eval_data_paths={planted}", f"--config.runner.logger.log_path={tmp_path}",
            "--config.data.max_pixels=3136", "--config.data.min_pixels=3136", "--config.data.num_workers=2",
            "--config.actor.global_batch_size=4", "--config.actor.micro_batch_size=2"]
    with open(tmp_path / "out", "w") as out, open(tmp_path / "err", "w") as err:
        code = subprocess.run(args, stdout=out, stderr=err, timeout=300).returncode
    stdout, stderr = (tmp_path / "out").read_text(), (tmp_path / "err").read_text()
    assert code == 1
    assert stderr.strip().splitlines()[-1].startswith("error: preflight: the run would stop: 5 bad train row(s)")
    assert "Traceback" not in stderr
    assert "check train: [" in stderr and "ETA" in stderr  # the progress bar
    assert "bad (image): 3" in stdout and "WOULD STOP" in stdout
    assert os.path.isfile(tmp_path / "qwen2_5_vl_sft_robo2vlm" / "preflight.json")


def test_check_reports_the_packing_and_a_budget_below_the_longest_row_would_stop(
        tmp_path, model_without_weights, planted, robo2vlm_dir, no_model_load, capsys):
    c = check_config(tmp_path, model_without_weights, planted, **{"data.bad_rows": "skip"})
    train = main_lib.run(c, "check")["splits"]["train"]
    packing = train["packing"]
    assert packing["enabled"] and packing["max_tokens_per_micro_batch"] == 16384 and packing["world_size"] == 1
    assert packing["micro_batches_per_step"]["max"] == 1  # 4 rows of < 128 tokens: one micro-batch
    assert packing["padding_fraction"] < packing["unpacked_padding_fraction"]
    assert "packing (on: data.packing): micro-batches of <= 16384 tokens" in capsys.readouterr().out

    c = check_config(tmp_path, model_without_weights, robo2vlm_dir, **{"data.bad_rows": "skip"})
    longest = main_lib.run(c, "check")["splits"]["train"]["sequence_tokens"]["max"]
    with pytest.raises(preflight.DataCheckFailed, match=rf"bad train row.*data.bad_rows='error'.*parquet:\d+: "
                                                        rf"{longest} tokens \(image tokens included\) exceed "
                                                        rf"actor.max_tokens_per_micro_batch={longest - 1}"):
        main_lib.run(override(c, {"data.bad_rows": "error", "actor.max_tokens_per_micro_batch": longest - 1}),
                     "check")
