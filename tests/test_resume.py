"""Resume through the real entry point: SIGKILL mid-step then resume="auto" is bitwise exact; a 2-rank full_shard
checkpoint continues on 1 rank; --mode=eval on an export or a checkpoint reproduces the in-training eval."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch
import torch

from vlm_sft import checkpoint, export
from vlm_sft import main as main_lib
from vlm_sft.models import qwen2_5_vl
from configs_loader import CONFIG, run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read_metrics(run_dir) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.endswith("\n")]


def losses(run_dir) -> dict[int, float]:
    """step -> train/loss; a step logged twice (recomputed after a resume) keeps its last value."""
    return {l["step"]: l["train/loss"] for l in read_metrics(run_dir) if "train/loss" in l}


def read_checkpoint(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint (params, Adam moments, counters), whatever the mesh it was saved from."""
    index = checkpoint.read_index(path).state_dict_metadata
    flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in index.items()}
    checkpoint.load_flat(path, flat, partial=False, no_dist=True)
    return flat


def cli_args(log_path, model_dir, data_dir, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo",
            f"--config.runner.logger.log_path={log_path}", f"--config.actor.model.model_path={model_dir}",
            f"--config.data.train_data_paths={data_dir}", "--config.data.eval_data_paths=",
            "--config.data.num_workers=0", "--config.runner.log_interval=1", *overrides]


@pytest.mark.slow
@pytest.mark.parametrize("model_type, model_fixture", [("qwen2.5_vl", "tiny_model_dir"),
                                                       ("qwen3_vl", "tiny_qwen3_vl_dir"),
                                                       ("qwen3_vl_moe", "tiny_qwen3_vl_moe_dir"),

                                                       ("qwen3_5", "tiny_qwen3_5_dir")])
def test_sigkill_mid_step_then_auto_resume_is_bitwise_exact(tmp_path, request, robo2vlm_dir, model_type,
                                                            model_fixture):
    """Run A: 12 steps straight. Run B: SIGKILLed during step 8 (after the step-6 checkpoint), restarted with the
    same command (resume="auto"). Final params and Adam state bitwise equal; losses of steps 7..12 equal."""
    model_dir = request.getfixturevalue(model_fixture)
    args = lambda name: cli_args(tmp_path, model_dir, robo2vlm_dir, "--config.runner.max_steps=12",  # noqa
                                 "--config.runner.save_interval=3", f"--config.runner.logger.experiment_name={name}",
                                 f"--config.actor.model.model_type={model_type}")
    a = subprocess.run(args("a"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert a.returncode == 0, a.stderr[-3000:]

    run_b = tmp_path / "b"
    with open(tmp_path / "b_first.log", "w") as log:  # a file, not an unread pipe that could fill and block
        proc = subprocess.Popen(args("b"), cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 600
    while 7 not in losses(run_b):  # step 7 logged: step 8 is running
        assert proc.poll() is None and time.monotonic() < deadline, \
            "run B ended before step 7: " + (tmp_path / "b_first.log").read_text()[-3000:]
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert 8 not in losses(run_b)  # killed partway through step 8
    assert sorted(os.listdir(run_b / "checkpoints")) == ["step_3", "step_6"]

    b = subprocess.run(args("b"), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert b.returncode == 0, b.stderr[-3000:]
    assert "resumed from" in b.stderr and "step_6 at step 6" in b.stderr

    final_a = read_checkpoint(str(tmp_path / "a" / "checkpoints" / "step_12"))
    final_b = read_checkpoint(str(run_b / "checkpoints" / "step_12"))
    assert list(final_a) == list(final_b) and any("mu[" in k for k in final_a)
    for name, tensor in final_a.items():
        assert torch.equal(tensor, final_b[name]), name
    loss_a, loss_b = losses(tmp_path / "a"), losses(run_b)
    assert [loss_b[s] for s in range(7, 13)] == [loss_a[s] for s in range(7, 13)]
    assert sorted(os.listdir(run_b / "checkpoints")) == ["step_12", "step_6", "step_9"]  # keep_last_n=3


@pytest.mark.slow
def test_two_rank_full_shard_checkpoint_continues_on_one_rank(tmp_path, tiny_model_dir, robo2vlm_dir):
    """2 gloo ranks, full_shard, 8 steps saving at 4; a 1-rank run resumed from step_4 takes the same steps 5..8."""
    common = ["--config.runner.max_steps=8", "--config.runner.save_interval=4",
              "--config.actor.fsdp_config.sharding_strategy=full_shard"]
    two = cli_args(tmp_path, tiny_model_dir, robo2vlm_dir, *common, "--config.runner.logger.experiment_name=two")
    two[1:3] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "vlm_sft.main"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run(two, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    saved = tmp_path / "two" / "checkpoints" / "step_4"
    assert checkpoint.read_meta(str(saved))["world_size"] == 2

    one = cli_args(tmp_path, tiny_model_dir, robo2vlm_dir, *common, "--config.runner.logger.experiment_name=one",
                   f"--config.runner.resume={saved}")
    out = subprocess.run(one, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    loss_two, loss_one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(loss_one) == [5, 6, 7, 8]
    for s in range(5, 9):
        assert loss_one[s] == pytest.approx(loss_two[s], abs=1e-5), s
    final_two = read_checkpoint(str(tmp_path / "two" / "checkpoints" / "step_8"))
    final_one = read_checkpoint(str(tmp_path / "one" / "checkpoints" / "step_8"))
    for name, tensor in final_two.items():
        torch.testing.assert_close(final_one[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def small_config(tmp_path, model_dir, data_dir, name: str, **overrides):
    return run_config("demo", tmp_path, name, model_dir, data_dir, data_dir,
                      **{"eval.max_new_tokens": 8, **overrides})


@pytest.mark.slow
def test_eval_of_export_and_of_checkpoint_match_the_in_training_eval(tmp_path, tiny_model_dir, robo2vlm_dir):
    c = small_config(tmp_path, tiny_model_dir, robo2vlm_dir, "train", **{
        "runner.max_steps": 6, "runner.save_interval": 3, "runner.val_check_interval": 3, "runner.export_hf": True,
        "actor.optim.lr_warmup_steps": 0})
    main_lib.run(c, "train")
    run_dir = tmp_path / "train"
    evals = {l["step"]: l for l in read_metrics(run_dir) if "eval/choice_accuracy" in l}
    assert {3, 6} <= set(evals)
    keys = ("eval/rows", "eval/eval_accuracy", "eval/choice_accuracy")
    # A few steps move accuracy little, so first the stronger fact: the export holds the final params exactly.
    final = read_checkpoint(str(run_dir / "checkpoints" / "step_6"))
    exported_tensors = safetensors.torch.load_file(str(run_dir / "hf_export" / "model.safetensors"))
    names = checkpoint.param_leaf_names(list(checkpoint.saved_params(str(run_dir / "checkpoints" / "step_6"))))
    assert len(exported_tensors) == len(names)
    for key, name in names.items():
        assert torch.equal(exported_tensors[export.hub_name(name, qwen2_5_vl.FAMILY)], final[key]), name

    exported = small_config(tmp_path, run_dir / "hf_export", robo2vlm_dir, "eval_export")
    metrics = main_lib.run(exported, "eval")
    assert {k: metrics[k] for k in keys} == {k: evals[6][k] for k in keys}

    at_3 = small_config(tmp_path, tiny_model_dir, robo2vlm_dir, "eval_step3",
                        **{"runner.resume": str(run_dir / "checkpoints" / "step_3")})
    metrics = main_lib.run(at_3, "eval")
    assert {k: metrics[k] for k in keys} == {k: evals[3][k] for k in keys}
    assert [l["step"] for l in read_metrics(tmp_path / "eval_step3")] == [3]


def test_bad_resume_path_fails_before_the_model_loads(tmp_path, tiny_model_dir, robo2vlm_dir, monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(main_lib.model_lib, "load_model", no_model)
    partial = tmp_path / "checkpoints" / "step_5"
    partial.mkdir(parents=True)
    c = small_config(tmp_path, tiny_model_dir, robo2vlm_dir, "bad", **{"runner.resume": str(partial)})
    with pytest.raises(checkpoint.CheckpointError, match=r"runner.resume: .*step_5: not a complete checkpoint: "
                                                         r"no meta.json"):
        main_lib.run(c, "train")
    c = small_config(tmp_path, tiny_model_dir, robo2vlm_dir, "bad", **{"runner.resume": str(tmp_path / "nope")})
    with pytest.raises(checkpoint.CheckpointError, match=r"runner.resume: .*nope: no such checkpoint directory"):
        main_lib.run(c, "eval")


@pytest.mark.slow
def test_async_saves_resume_like_a_straight_run(tmp_path, tiny_model_dir, robo2vlm_dir):
    """Checkpoints written in the background (the step overwrites the state meanwhile) resume exactly."""
    common = {"data.eval_data_paths": "", "runner.save_interval": 2}
    main_lib.run(small_config(tmp_path, tiny_model_dir, robo2vlm_dir, "straight", **common,
                              **{"runner.max_steps": 6}), "train")
    for max_steps in (4, 6):  # the second run resumes from step_4 ("auto")
        main_lib.run(small_config(tmp_path, tiny_model_dir, robo2vlm_dir, "async", **common, **{
            "runner.max_steps": max_steps, "runner.async_save": True}), "train")
    assert sorted(os.listdir(tmp_path / "async" / "checkpoints")) == ["step_2", "step_4", "step_6"]
    assert [l["step"] for l in read_metrics(tmp_path / "async") if "train/loss" in l] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "async") == losses(tmp_path / "straight")
    straight = read_checkpoint(str(tmp_path / "straight" / "checkpoints" / "step_6"))
    resumed = read_checkpoint(str(tmp_path / "async" / "checkpoints" / "step_6"))
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name
