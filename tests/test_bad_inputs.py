"""The bad-input catalogue: every bad input we know, through the real CLI (`python -m vlm_sft.main`). Each must end
with a non-zero exit, one last line naming the culprit, no traceback, and, wherever the input allows it, before
the model's weights are read (the trainer logs "loading model weights from" just before it reads them).

Each case is a separate process (~5-10 s of imports and checks), so most cases are marked slow; a few
representative ones (a config range, a damaged weights file, a damaged checkpoint, a bad row) run in the fast suite.
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from vlm_sft import demo
from configs_loader import CONFIG
from test_checkpoint import make_state, save

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOADING_WEIGHTS = "loading model weights from"


class Inputs:
    """Builds the damaged artefacts a case needs, under the case's own tmp_path, from the shared fixtures."""

    def __init__(self, tmp_path, model_dir, data_dir):
        self.tmp, self.model, self.data = tmp_path, model_dir, data_dir

    def model_copy(self):
        path = self.tmp / "model"
        shutil.copytree(self.model, path)
        return path

    def truncated_weights(self):
        path = self.model_copy()
        shard = path / "model-00002-of-00002.safetensors"
        os.truncate(shard, os.path.getsize(shard) // 2)
        return path

    def missing_shard(self):
        path = self.model_copy()
        os.remove(path / "model-00002-of-00002.safetensors")
        return path

    def with_file(self, name, text):
        path = self.model_copy()
        (path / name).write_text(text)
        return path

    def wrong_model_type(self):
        path = self.model_copy()
        config = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps({**config, "model_type": "llava"}))
        return path

    def bad_rows(self, kind):
        return demo.make_robo2vlm_dir(self.tmp / f"data_{kind}", n_train=16, n_test=4, train_files=1,
                                         bad_rows={2: kind})

    def garbage_parquet(self):
        path = self.tmp / "garbage"
        path.mkdir()
        (path / "train-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet")
        return path

    def checkpoint(self, damage):
        path = save(self.tmp / "checkpoints", make_state())
        shard = os.path.join(path, sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0])
        if damage == "truncated":
            os.truncate(shard, os.path.getsize(shard) - 10)
        elif damage == "flipped":
            with open(shard, "r+b") as f:
                f.seek(50)
                byte = f.read(1)
                f.seek(50)
                f.write(bytes([byte[0] ^ 1]))
        return path

    def regular_file(self):
        path = self.tmp / "not_a_dir"
        path.write_text("")
        return path


# (id, args built from Inputs, culprit expected in the last line, fails before the weights are read)
CASES = [
    # config fields and ranges
    ("unknown_field", lambda i: ["--config.actor.micro_batchsize=3"], 'Did you mean "micro_batch_size"', True),
    ("wrong_type", lambda i: ["--config.actor.micro_batch_size=abc"], "actor.micro_batch_size=abc", True),
    ("unknown_variant", lambda i: [], "unknown variant(s) ['demoo']", True),
    ("bad_mode", lambda i: ["--mode=evaluate"], "--mode=evaluate", True),
    ("micro_batch_zero", lambda i: ["--config.actor.micro_batch_size=0"], "actor.micro_batch_size=0", True),
    ("negative_lr", lambda i: ["--config.actor.optim.lr=-1.0"], "actor.optim.lr", True),
    ("unknown_scheduler", lambda i: ["--config.actor.optim.lr_scheduler=warmup_cosine"],
     "actor.optim.lr_scheduler='warmup_cosine'", True),
    ("unknown_precision", lambda i: ["--config.actor.model.precision=fp8"], "actor.model.precision='fp8'", True),
    ("unknown_truncation", lambda i: ["--config.data.truncation=left"], "data.truncation='left'", True),
    ("pixel_budget", lambda i: ["--config.data.min_pixels=1000", "--config.data.max_pixels=500"],
     "data.min_pixels=1000", True),
    ("log_interval_zero", lambda i: ["--config.runner.log_interval=0"], "runner.log_interval=0", True),
    ("negative_keep_last_n", lambda i: ["--config.runner.keep_last_n=-2"], "runner.keep_last_n=-2", True),
    ("collective_timeout_zero", lambda i: ["--config.runner.collective_timeout_s=0"],
     "runner.collective_timeout_s=0", True),
    ("negative_skipped_steps", lambda i: ["--config.runner.max_consecutive_skipped_steps=-1"],
     "runner.max_consecutive_skipped_steps=-1", True),
    ("nothing_to_train", lambda i: ["--config.runner.max_steps=0", "--config.runner.max_epochs=0"],
     "runner.max_steps and runner.max_epochs are both <= 0", True),
    ("eval_without_data", lambda i: ["--mode=eval", "--config.data.eval_data_paths="],
     "--mode=eval needs data.eval_data_paths", True),
    # batch arithmetic
    ("indivisible_batch", lambda i: ["--config.actor.global_batch_size=12", "--config.data.packing=False"],
     "actor.global_batch_size=12 is not divisible by actor.micro_batch_size=8", True),
    # mesh and precision
    ("unknown_strategy", lambda i: ["--config.actor.fsdp_config.sharding_strategy=zero3"],
     "actor.fsdp_config.sharding_strategy='zero3'", True),
    ("hybrid_shard_size", lambda i: ["--config.actor.fsdp_config.sharding_strategy=hybrid_shard",
                                     "--config.actor.fsdp_config.hybrid_shard_size=3"],
     "actor.fsdp_config.hybrid_shard_size=3: does not divide the world size 1", True),
    ("narrow_reduce_dtype", lambda i: ["--config.actor.fsdp_config.mixed_precision.reduce_dtype=bf16"],
     "actor.fsdp_config.mixed_precision.reduce_dtype='bf16'", True),
    # paths
    ("no_train_data", lambda i: ["--config.data.train_data_paths=/no/such/data"],
     "data.train_data_paths: /no/such/data: no such file or folder", True),
    ("no_model", lambda i: ["--config.actor.model.model_path=/no/such/model"],
     "actor.model.model_path='/no/such/model': no such directory", True),
    ("unwritable_log_path", lambda i: [f"--config.runner.logger.log_path={i.regular_file()}"],
     "runner.logger.log_path: cannot write to", True),
    # schemas
    ("missing_column", lambda i: ["--config.data.prompt_key=prompt"], "missing column", True),
    ("not_parquet", lambda i: [f"--config.data.train_data_paths={i.garbage_parquet()}"],
     "train-00000-of-00001.parquet: not a readable parquet file", True),
    # rows and images (decoded as training reads them: after the model loads)
    ("bad_answer_row", lambda i: [f"--config.data.train_data_paths={i.bad_rows('answer')}"],
     "train-00000-of-00001.parquet:2: answer", False),
    ("undecodable_image", lambda i: [f"--config.data.train_data_paths={i.bad_rows('image')}"],
     "train-00000-of-00001.parquet:2", False),
    # weights and model files
    ("truncated_weights", lambda i: [f"--config.actor.model.model_path={i.truncated_weights()}"],
     "model-00002-of-00002.safetensors: ", True),
    ("missing_shard", lambda i: [f"--config.actor.model.model_path={i.missing_shard()}"],
     "model-00002-of-00002.safetensors: missing", True),
    ("corrupt_tokenizer", lambda i: [f"--config.actor.model.model_path={i.with_file('tokenizer.json', '{oops')}"],
     "tokenizer.json: not valid JSON", True),
    ("broken_chat_template", lambda i: [f"--config.actor.model.model_path="
                                        f"{i.with_file('chat_template.json', json.dumps({'chat_template': '{% if'}))}"],
     "chat_template.json: the chat template does not compile", True),
    ("wrong_model_type", lambda i: [f"--config.actor.model.model_path={i.wrong_model_type()}"],
     "model_type is 'llava'", True),
    # checkpoints
    ("resume_not_a_checkpoint", lambda i: [f"--config.runner.resume={i.tmp}"], "no meta.json", True),
    ("resume_truncated_shard", lambda i: [f"--config.runner.resume={i.checkpoint('truncated')}"],
     "__0_0.distcp is truncated", True),
    ("resume_corrupted_shard", lambda i: [f"--config.runner.resume={i.checkpoint('flipped')}"],
     "__0_0.distcp: checksum", True),
]
FAST = {"log_interval_zero", "truncated_weights", "resume_corrupted_shard"}


def run_cli(args, cwd, timeout=300):
    return subprocess.run([sys.executable, "-m", "vlm_sft.main", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})


def base_args(tmp_path, model_dir, data_dir, case_id):
    variant = "demoo" if case_id == "unknown_variant" else "demo"
    return [f"--config={CONFIG}:{variant}", f"--config.runner.logger.log_path={tmp_path / 'runs'}",
            f"--config.actor.model.model_path={model_dir}", f"--config.data.train_data_paths={data_dir}",
            "--config.data.eval_data_paths=", "--config.data.shuffle=False", "--config.runner.max_steps=2",
            "--config.runner.val_before_train=False"]


@pytest.mark.parametrize("case_id, make_args, culprit, before_weights", [
    pytest.param(*case, id=case[0], marks=() if case[0] in FAST else pytest.mark.slow) for case in CASES])
def test_bad_input_is_one_line_naming_the_culprit(tmp_path, tiny_model_dir, robo2vlm_dir, case_id, make_args,
                                                  culprit, before_weights):
    args = base_args(tmp_path, tiny_model_dir, robo2vlm_dir, case_id) + make_args(
        Inputs(tmp_path, tiny_model_dir, robo2vlm_dir))
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode not in (0, None), out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and culprit in last, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    if before_weights:
        assert LOADING_WEIGHTS not in out.stderr, "the weights were read before the bad input was reported"


def test_catalogue_covers_every_kind_of_input():
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.slow
def test_second_ctrl_c_stops_at_once_without_a_traceback(tmp_path, tiny_model_dir, robo2vlm_dir):
    """The first SIGINT asks for a checkpoint at the next step boundary; a second one (over a second later) ends
    the process at once with exit 130 and one line. The test hook holds the run before step 1 meanwhile."""
    log = tmp_path / "log"
    args = base_args(tmp_path, tiny_model_dir, robo2vlm_dir, "sigint")
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "VLM_SFT_TEST_STALL": "0:1:120"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "vlm_sft.main", *args], cwd=tmp_path, stdout=f,
                                stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while "stalls 120 s before step 1" not in log.read_text():
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    time.sleep(1.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130
    output = log.read_text()
    assert "SIGINT received: finishing this step" in output and "second interrupt: stopping now" in output
    assert "Traceback" not in output
    assert os.listdir(tmp_path / "runs" / "demo" / "checkpoints") == []  # nothing saved


def demo_row_lengths(tmp_path, model_dir, data_dir):
    """{row source: tokens} of the train rows as the demo config encodes them (the trainer's encoder; no CLI)."""
    from configs_loader import load_config, override
    from vlm_sft import main as main_lib

    config = override(load_config("demo"), {"actor.model.model_path": str(model_dir),
                                            "data.train_data_paths": str(data_dir),
                                            "runner.logger.log_path": str(tmp_path / "runs")})
    files = main_lib.find_files(config, "train_data_paths", "train")
    source, encoder = main_lib.make_source(files, config), main_lib.make_encoder(config)
    return {source.source_of(i): len(encoder(source[i]).input_ids) for i in range(len(source))}


def test_a_budget_below_the_longest_row_fails_before_the_weights_load(tmp_path, tiny_model_dir, robo2vlm_dir):
    """Packed, rows are never split: under data.bad_rows=error a budget one token short of the longest row stops
    the CLI before the weights are read, naming that row, its length and the budget."""
    lengths = demo_row_lengths(tmp_path, tiny_model_dir, robo2vlm_dir)
    longest = max(lengths, key=lambda k: (lengths[k], k))
    budget = lengths[longest] - 1
    args = base_args(tmp_path, tiny_model_dir, robo2vlm_dir, "over_budget") + [
        f"--config.actor.max_tokens_per_micro_batch={budget}", "--config.data.bad_rows=error"]
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode not in (0, None), out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "Traceback" not in out.stderr, out.stderr[-3000:]
    named = [k for k, n in lengths.items() if n == lengths[longest] and f"{k}, has {n} tokens" in last]
    assert named and f"actor.max_tokens_per_micro_batch={budget}" in last, last
    assert LOADING_WEIGHTS not in out.stderr, "the weights were read before the over-budget row was reported"


@pytest.mark.slow
def test_a_budget_below_some_rows_skips_and_counts_them_under_skip(tmp_path, tiny_model_dir, robo2vlm_dir):
    """The same budget under data.bad_rows=skip trains; the rows over it are skipped and counted."""
    lengths = demo_row_lengths(tmp_path, tiny_model_dir, robo2vlm_dir)
    budget = sorted(lengths.values())[len(lengths) // 2]  # about half the rows are over it
    over = sum(n > budget for n in lengths.values())
    assert 0 < over < len(lengths)
    rows = len(lengths)
    args = base_args(tmp_path, tiny_model_dir, robo2vlm_dir, "over_budget") + [
        f"--config.actor.max_tokens_per_micro_batch={budget}", "--config.data.bad_rows=skip",
        f"--config.actor.global_batch_size={rows}", "--config.runner.max_steps=1", "--config.runner.export_hf=False"]
    out = run_cli(args, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    metrics = [json.loads(line) for line in (tmp_path / "runs").rglob("metrics.jsonl").__next__().open()]
    step = next(m for m in metrics if m.get("step") == 1 and "data/skipped_rows" in m)
    assert step["data/skipped_rows"] == over  # one step over every row: each over-budget row skipped once
