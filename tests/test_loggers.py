"""Logger backends and the run report through the real entry point.

One run (module fixture) through the CLI with `--config.runner.logger.logger_backends='("tensorboard","wandb",
"swanlab")'` offline: 3 steps, then the same command with max_steps=5 resumes it. Its offline wandb and swanlab
runs, read back with each library's own record schema, hold exactly metrics.jsonl's scalars, under one run id
across the resume; the report written at its end, and by `python -m vlm_sft.report` on a copy cut mid-line as a
killed run leaves it, opens with PIL at the expected size with metrics.jsonl's figures.
"""
import contextlib
import json
import logging
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import pytest
from PIL import Image

from vlm_sft import config as config_lib
from vlm_sft import main as main_lib
from vlm_sft import report
from vlm_sft.metrics import ELAPSED, MetricsWriter
from backend_readers import read_swanlab_runs, read_wandb_runs
from configs_loader import CONFIG, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BACKENDS = '("tensorboard","wandb","swanlab")'


def offline_env(tmp) -> dict:
    """Offline modes, and the libraries' own settings and caches kept out of $HOME."""
    return {**os.environ, "WANDB_MODE": "offline", "SWANLAB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp),
            "WANDB_CACHE_DIR": str(tmp), "WANDB_DATA_DIR": str(tmp), "SWANLAB_ROOT": str(tmp)}


def read_rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def scalars(rows) -> dict[tuple[int, str], float]:
    """{(step, key): value} of metrics.jsonl as a backend keeps it: a step logged twice keeps its last value; the
    file's own time/elapsed stays in the file."""
    return {(r["step"], k): v for r in rows for k, v in r.items() if k not in ("step", ELAPSED)}


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory, tiny_model_dir, robo2vlm_dir):
    tmp = tmp_path_factory.mktemp("loggers")
    args = [sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo",
            f"--config.runner.logger.log_path={tmp}", "--config.runner.logger.experiment_name=run",
            "--config.runner.logger.project_name=vlm_sft_tests", f"--config.runner.logger.logger_backends={BACKENDS}",
            '--config.data.image_keys=("image",)', f"--config.actor.model.model_path={tiny_model_dir}",
            f"--config.data.train_data_paths={robo2vlm_dir}", f"--config.data.eval_data_paths={robo2vlm_dir}",
            "--config.runner.log_interval=1", "--config.runner.val_check_interval=0",
            "--config.runner.val_before_train=False", "--config.actor.global_batch_size=8",
            "--config.actor.micro_batch_size=4", "--config.eval.max_new_tokens=4"]
    outs = []
    for steps in (3, 5):  # the second run resumes the first from its step-3 checkpoint
        out = subprocess.run([*args, f"--config.runner.max_steps={steps}"], cwd=tmp, env=offline_env(tmp),
                             capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        outs.append(out)
    assert "resumed from" in outs[1].stderr
    return tmp / "run"


def test_wandb_offline_run_holds_metrics_jsonl_and_the_resume_continues_it(logged_run):
    rows = read_rows(logged_run)
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4, 5]
    runs = read_wandb_runs(logged_run)
    assert len(runs) == 2  # one offline run file per process, both the same wandb run
    run_id = json.loads((logged_run / "logger_ids.json").read_text())["wandb"]
    assert [r.run_id for r in runs] == [run_id, run_id] and [r.ended for r in runs] == [0, 0]
    assert {(r.project, r.name) for r in runs} == {("vlm_sft_tests", "run")}
    assert {s for s, _ in runs[0].history} == {1, 2, 3} and {s for s, _ in runs[1].history} == {4, 5}
    history = {**runs[0].history, **runs[1].history}
    assert history == scalars(rows)  # every scalar, at its step, exactly
    # The resolved config is the run's: the model path the CLI gave, the overridden tuples (JSON lists).
    resolved = json.loads((logged_run / "config.json").read_text())  # the second command's
    assert {k: v for k, v in runs[1].config.items() if k != "_wandb"} == resolved
    config = runs[0].config
    assert config["runner"]["max_steps"] == 3 and config["actor"]["model"]["model_path"] == resolved["actor"][
        "model"]["model_path"]
    assert config["runner"]["logger"]["logger_backends"] == ["tensorboard", "wandb", "swanlab"]
    assert config["data"]["image_keys"] == ["image"] and config["actor"]["global_batch_size"] == 8


def test_swanlab_offline_run_holds_metrics_jsonl_and_the_resume_continues_it(logged_run):
    runs = read_swanlab_runs(logged_run)
    run_id = json.loads((logged_run / "logger_ids.json").read_text())["swanlab"]
    assert [r.run_id for r in runs] == [run_id, run_id] and [r.ended for r in runs] == ["RUN_STATE_FINISHED"] * 2
    assert {(r.project, r.name) for r in runs} == {("vlm_sft_tests", "run")}
    assert {s for s, _ in runs[1].history} == {4, 5}
    assert {**runs[0].history, **runs[1].history} == scalars(read_rows(logged_run))


def check_png(path) -> None:
    with Image.open(path) as image:
        image.load()
        assert image.format == "PNG" and image.size == report.PNG_SIZE


def test_the_report_at_the_end_of_the_run_has_metrics_jsonl_figures(logged_run):
    check_png(logged_run / "curves.png")
    rows = read_rows(logged_run)
    text = (logged_run / "summary.md").read_text()
    evals = [r for r in rows if "eval/eval_accuracy" in r]
    assert [r["step"] for r in evals] == [3, 5]
    for key in ("eval/eval_accuracy", "eval/choice_accuracy"):
        assert f"| final {key} | {evals[-1][key]:.4f} at step 5 |" in text
        best = max(evals, key=lambda r: (r[key], -r["step"]))
        assert f"| best {key} | {best[key]:.4f} at step {best['step']} |" in text
    train = [r for r in rows if "train/loss" in r]
    assert "| steps | 5 of 5 |" in text
    assert f"| final train/loss | {train[-1]['train/loss']:.4f} |" in text
    assert f"{statistics.median(r['perf/tokens_per_sec'] for r in train):,.1f}" in text
    assert f"| peak memory | {max(r['perf/max_memory_gib'] for r in train):.2f} GiB |" in text
    first, second = rows[:4], rows[4:]  # process 1: steps 1-3 + eval; process 2: steps 4-5 + eval
    assert [r["step"] for r in second] == [4, 5, 5]
    assert min(r[ELAPSED] for r in second) > max(r[ELAPSED] for r in first)  # the resumed run continues its time
    assert f"({rows[-1][ELAPSED]:.1f} s, to the last logged line)" in text
    assert "| skipped updates (non-finite loss/grad) | 0 of 5 logged steps |" in text
    assert '| logger backends (`runner.logger.logger_backends`) | ["tensorboard", "wandb", "swanlab"] |' in text


def test_report_cli_on_a_killed_run(logged_run, tmp_path):
    """A run killed while writing step 4's line: every complete line counts, the cut one does not."""
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(logged_run / "config.json", killed)
    lines = (logged_run / "metrics.jsonl").read_text().splitlines(keepends=True)
    (killed / "metrics.jsonl").write_text("".join(lines[:4]) + lines[4][:len(lines[4]) // 2])
    out = subprocess.run([sys.executable, "-m", "vlm_sft.report", str(killed)], cwd=tmp_path, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(killed / "curves.png"), str(killed / "summary.md")]
    check_png(killed / "curves.png")
    text = (killed / "summary.md").read_text()
    rows = [json.loads(line) for line in lines[:4]]
    assert "(4 lines, 1 unreadable: a run killed mid-write)" in text
    assert "| steps | 3 of 5 |" in text  # config.json of the resumed command: max_steps=5
    assert f"| final eval/eval_accuracy | {rows[3]['eval/eval_accuracy']:.4f} at step 3 |" in text
    assert f"({max(r[ELAPSED] for r in rows):.1f} s, to the last logged line)" in text


def test_report_without_matplotlib(tmp_path, monkeypatch, capsys):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n')
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert report.main([str(tmp_path)]) == 1  # the CLI: the pip command, nothing written
    assert "pip install -e '.[report]'" in capsys.readouterr().err
    assert not (tmp_path / "summary.md").exists()
    # The end of a run: summary.md alone.
    assert report.write_report(str(tmp_path), require_png=False) == [str(tmp_path / "summary.md")]
    assert "| final train/loss | 2.0000 |" in (tmp_path / "summary.md").read_text()
    assert not (tmp_path / "curves.png").exists()
    assert report.main([str(tmp_path / "nope")]) == 1
    assert "metrics.jsonl: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("backend", ["wandb", "swanlab"])
def test_a_missing_extra_fails_with_the_install_command_before_the_model_loads(
        tmp_path, tiny_model_dir, robo2vlm_dir, monkeypatch, backend):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the missing extra was reported")
    monkeypatch.setattr(main_lib.model_lib, "load_model", no_model)
    monkeypatch.setitem(sys.modules, backend, None)  # as if not installed
    c = run_config("demo", tmp_path, "run", tiny_model_dir, robo2vlm_dir, **{
        "runner.logger.logger_backends": ("tensorboard", backend)})
    with pytest.raises(config_lib.ConfigError, match=rf"runner.logger.logger_backends: '{backend}' needs the "
                                                     rf"{backend} package.*: pip install -e '\.\[{backend}\]'"):
        main_lib.run(c, "train")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_failing_backend_warns_once_and_the_others_go_on(tmp_path, monkeypatch, caplog):
    for key, value in offline_env(tmp_path / "settings").items():
        monkeypatch.setenv(key, value)
    before = signal.getsignal(signal.SIGINT)
    writer = MetricsWriter(str(tmp_path / "run"), enabled=True, total_steps=3,
                           backends=("tensorboard", "wandb", "swanlab"), project="p", experiment="e")
    assert signal.getsignal(signal.SIGINT) is before  # swanlab took SIGINT; preemption handling needs it back
    writer.write(1, {"train/loss": 3.0})
    writer._backends[1]._run.finish()  # wandb's run ends under the writer: its next log raises
    with caplog.at_level(logging.WARNING):
        writer.write(2, {"train/loss": 2.0})
        writer.write(3, {"train/loss": 1.0})
    warnings = [r.getMessage() for r in caplog.records if "wandb failed" in r.getMessage()]
    assert len(warnings) == 1 and "metrics.jsonl, tensorboard, swanlab go on" in warnings[0]
    assert writer.backends == ("tensorboard", "swanlab")
    writer.close(failed=True)
    run_dir = tmp_path / "run"
    assert [r["step"] for r in read_rows(run_dir)] == [1, 2, 3]
    (swanlab_run,) = read_swanlab_runs(run_dir)
    assert swanlab_run.ended == "RUN_STATE_CRASHED"
    assert swanlab_run.history == {(1, "train/loss"): 3.0, (2, "train/loss"): 2.0, (3, "train/loss"): 1.0}
    (wandb_run,) = read_wandb_runs(run_dir)
    assert wandb_run.history == {(1, "train/loss"): 3.0}


def test_a_backend_that_cannot_start_fails_at_start_with_the_offline_hint(tmp_path):
    """wandb online without a login; a fresh process (wandb reads its environment once per process)."""
    env = {**offline_env(tmp_path / "settings"), "WANDB_MODE": "online", "NETRC": str(tmp_path / "no_netrc")}
    env.pop("WANDB_API_KEY", None)
    code = ("from vlm_sft.metrics import MetricsWriter\n"
            f"MetricsWriter({str(tmp_path / 'run')!r}, enabled=True, total_steps=1, backends=('tensorboard', 'wandb'))")
    out = subprocess.run([sys.executable, "-c", code], env=env, stdin=subprocess.DEVNULL, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert re.search(r"ConfigError: runner.logger.logger_backends: wandb did not start \(UsageError: .*API key.*\); "
                     r"without network or login set WANDB_MODE=offline$", out.stderr.strip().splitlines()[-1])


def test_a_fresh_start_in_an_old_run_dir_starts_new_backend_runs(tmp_path, monkeypatch):
    for key, value in offline_env(tmp_path / "settings").items():
        monkeypatch.setenv(key, value)
    run_dir = tmp_path / "run"
    ids = []
    for resume in (False, True, False):
        with contextlib.suppress(RuntimeError):
            with MetricsWriter(str(run_dir), enabled=True, total_steps=1, backends=("wandb",), resume=resume) as w:
                w.write(1, {"train/loss": 1.0})
                if len(ids) == 2:
                    raise RuntimeError("the training run fails")
        ids.append(json.loads((run_dir / "logger_ids.json").read_text())["wandb"])
        time.sleep(1.1)  # wandb names an offline run's directory by its id and start second
    assert ids[1] == ids[0] and ids[2] != ids[0]
    runs = {r.run_id: r for r in read_wandb_runs(run_dir) if r.run_id == ids[2]}
    assert sorted(r.run_id for r in read_wandb_runs(run_dir)) == sorted(ids)  # one file each
    assert runs[ids[2]].ended == 1  # the failed run is marked failed


def test_other_ranks_start_no_backend(tmp_path):
    writer = MetricsWriter(str(tmp_path / "rank1"), enabled=False, total_steps=1, backends=("wandb", "swanlab"))
    writer.write(1, {"train/loss": 1.0})
    writer.close()
    assert not (tmp_path / "rank1").exists()


@pytest.mark.slow
def test_report_cli_on_a_run_still_going_then_killed(tmp_path, tiny_model_dir, robo2vlm_dir):
    """A real run, stalled before step 3: the report reads it while it runs, and again after SIGKILL."""
    args = [sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo",
            f"--config.runner.logger.log_path={tmp_path}", "--config.runner.logger.experiment_name=live", f"--config.actor.model.model_path={tiny_model_dir}",
            f"--config.data.train_data_paths={robo2vlm_dir}", "--config.data.eval_data_paths=",
            "--config.runner.log_interval=1", "--config.runner.max_steps=4", "--config.actor.global_batch_size=8",
            "--config.actor.micro_batch_size=4"]
    run_dir = tmp_path / "live"
    with open(tmp_path / "live.log", "w") as log:  # a file, not an unread pipe that could fill and block
        proc = subprocess.Popen(args, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "VLM_SFT_TEST_STALL": "0:3:600"})
    try:
        deadline = time.monotonic() + 600
        while not (run_dir / "metrics.jsonl").exists() or len(read_rows(run_dir)) < 2:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "live.log").read_text()[-3000:]
            time.sleep(0.1)
        for killed in (False, True):
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            out = subprocess.run([sys.executable, "-m", "vlm_sft.report", str(run_dir)], cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
            assert out.returncode == 0, out.stderr
            check_png(run_dir / "curves.png")
            rows = read_rows(run_dir)
            text = (run_dir / "summary.md").read_text()
            assert "| steps | 2 of 4 |" in text and "| final eval/eval_accuracy | not evaluated |" in text
            assert f"| final train/loss | {rows[-1]['train/loss']:.4f} |" in text
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
