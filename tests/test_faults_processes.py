"""Faults with real processes: SIGTERM during a step (one process, and every process of a 2-rank torchrun job, as
Slurm signals a job) saves that step and exits 75, and resume="auto" then ends bitwise equal to an uninterrupted
run; a 2-rank job whose rank 1 is killed, raises, or stalls is gone within runner.collective_timeout_s plus a
margin, nothing left behind. Every test is bounded by timeouts, so a hang fails instead of hanging CI."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from vlm_sft import checkpoint, demo, faults
from test_resume import REPO, cli_args, losses, read_checkpoint

CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
TIMEOUT_S = 15  # runner.collective_timeout_s in these tests
# torchrun gives the surviving worker 30 s after SIGTERM (its shutdown timeout), then SIGKILLs it; plus slack for
# a loaded CI machine.
MARGIN_S = 30 + 45


def wait_for(predicate, proc, log, what: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"ended before {what}: " + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout} s: " + log.read_text()[-3000:]
        time.sleep(0.05)


def start(cmd, log, **env):
    """A new session, so the job's processes form one group: signalled together, and checked for leftovers."""
    with open(log, "w") as f:  # a file, not an unread pipe that could fill and block
        return subprocess.Popen(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT, env={**CPU_ONLY, **env},
                                start_new_session=True)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def assert_same_final_state(run_a, run_b, steps: int) -> None:
    final_a = read_checkpoint(str(run_a / "checkpoints" / f"step_{steps}"))
    final_b = read_checkpoint(str(run_b / "checkpoints" / f"step_{steps}"))
    assert list(final_a) == list(final_b) and any("mu[" in k for k in final_a)
    for name, tensor in final_a.items():
        assert torch.equal(tensor, final_b[name]), name


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2], ids=["one_process", "two_ranks"])
def test_sigterm_saves_that_step_and_auto_resume_is_bitwise_exact(tmp_path, tiny_model_dir, robo2vlm_dir, nproc):
    """Run A: 10 steps straight. Run B: every process SIGTERMed while a step runs, restarted with the same
    command. B's checkpoint is of the last step it logged; the resumed run ends bitwise equal to A."""
    steps = 10

    def args(name):
        cmd = cli_args(tmp_path, tiny_model_dir, robo2vlm_dir, f"--config.runner.max_steps={steps}",
                       "--config.runner.save_interval=0", f"--config.runner.logger.experiment_name={name}",
                       "--config.actor.fsdp_config.sharding_strategy=full_shard")
        return cmd if nproc == 1 else TORCHRUN + cmd[1:]

    a = subprocess.run(args("a"), cwd=REPO, env=CPU_ONLY, capture_output=True, text=True, timeout=900)
    assert a.returncode == 0, a.stderr[-3000:]

    run_b, log = tmp_path / "b", tmp_path / "b_first.log"
    proc = start(args("b"), log)
    wait_for(lambda: 3 in losses(run_b), proc, log, "step 3")  # step 4 is running
    job = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)  # the job's process group; torchrun passes it on to its workers
    proc.wait(timeout=120)
    output = log.read_text()
    stopped = max(losses(run_b))
    assert 3 <= stopped < steps
    assert os.listdir(run_b / "checkpoints") == [f"step_{stopped}"], output[-3000:]
    assert f"stopped after step {stopped} on SIGTERM" in output, output[-3000:]
    if nproc == 1:
        assert proc.returncode == faults.EXIT_PREEMPTED
    else:  # each worker exits 75 after the save; torchrun, signalled too, waits for them and fails with exit 1
        assert proc.returncode != 0
        assert checkpoint.read_meta(str(run_b / "checkpoints" / f"step_{stopped}"))["world_size"] == 2
    assert not group_alive(proc.pid) and not alive(job)

    b = subprocess.run(args("b"), cwd=REPO, env=CPU_ONLY, capture_output=True, text=True, timeout=900)
    assert b.returncode == 0, b.stderr[-3000:]
    assert f"step_{stopped} at step {stopped}" in b.stderr
    assert_same_final_state(tmp_path / "a", run_b, steps)
    loss_a, loss_b = losses(tmp_path / "a"), losses(run_b)
    assert [loss_b[s] for s in range(1, steps + 1)] == [loss_a[s] for s in range(1, steps + 1)]


@pytest.fixture(scope="module")
def rank1_bad_row_data(tmp_path_factory):
    """Unshuffled, global batch 16 over 2 ranks: rank 1 reads rows 56..63 at step 4; row 60 is broken."""
    return demo.make_robo2vlm_dir(tmp_path_factory.mktemp("bad_on_rank1"), n_train=64, n_test=4, train_files=1,
                                     bad_rows={60: "answer"})


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["killed", "raises", "stalls"])
def test_a_failing_rank_brings_the_job_down_in_bounded_time(tmp_path, tiny_model_dir, robo2vlm_dir,
                                                            rank1_bad_row_data, fault):
    data = rank1_bad_row_data if fault == "raises" else robo2vlm_dir
    cmd = TORCHRUN + cli_args(tmp_path, tiny_model_dir, data, "--config.runner.max_steps=200",
                              "--config.runner.save_interval=0", "--config.data.shuffle=False",
                              f"--config.runner.collective_timeout_s={TIMEOUT_S}",
                              "--config.actor.fsdp_config.sharding_strategy=full_shard")[1:]
    log = tmp_path / "job.log"
    env = {"VLM_SFT_TEST_STALL": "1:3:3600"} if fault == "stalls" else {}
    proc = start(cmd, log, **env)
    run_dir = tmp_path / "demo"
    wait_for(lambda: 2 in losses(run_dir), proc, log, "step 2")
    job = descendants(proc.pid)
    if fault == "killed":
        rank1 = [p for p in worker_pids(proc.pid) if environ(p).get("RANK") == "1"]
        assert len(rank1) == 1
        os.kill(rank1[0], signal.SIGKILL)
        marker = "the SIGKILL"
    else:
        marker = "error (rank 1)" if fault == "raises" else "VLM_SFT_TEST_STALL: rank 1 stalls"
        wait_for(lambda: marker in log.read_text(), proc, log, marker)
    t0 = time.monotonic()
    proc.wait(timeout=TIMEOUT_S + MARGIN_S + 60)
    elapsed = time.monotonic() - t0
    output = log.read_text()
    assert proc.returncode != 0, output[-3000:]
    assert elapsed < TIMEOUT_S + MARGIN_S, (elapsed, output[-3000:])
    assert not group_alive(proc.pid) and not alive(job), "processes left behind"
    assert "]: Traceback" not in output, output[-3000:]  # a worker's uncaught error prints "[rank<r>]: Traceback"
    if fault == "raises":  # the failing rank's error comes first
        first = next(l for l in output.splitlines() if l.startswith("error"))
        assert first.startswith("error (rank 1): ") and "train-00000-of-00001.parquet:60" in first, output[-3000:]
    if fault == "stalls":  # the rank that waited says why, naming the setting
        assert ("error (rank 0): a collective with the other ranks failed" in output
                and f"runner.collective_timeout_s={TIMEOUT_S}" in output), output[-3000:]


def descendants(pid: int) -> list[int]:
    children = worker_pids(pid)
    return children + [d for c in children for d in descendants(c)]


def alive(pids) -> list[int]:
    """Those of pids still running (torchrun gives each worker its own process group: check them one by one)."""
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rsplit(")", 1)[1].split()[0] != "Z":
                    out.append(pid)
        except OSError:
            pass
    return out


def worker_pids(parent: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if ppid == parent:
                pids.append(int(entry))
    return pids


def environ(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/environ", "rb") as f:
        items = [kv.split(b"=", 1) for kv in f.read().split(b"\0") if b"=" in kv]
    return {k.decode(): v.decode(errors="replace") for k, v in items}


@pytest.mark.slow
def test_sigusr1_to_the_launch_scripts_job_reaches_only_the_workers(tmp_path, tiny_model_dir, robo2vlm_dir):
    """As launch/slurm.sbatch passes Slurm's --signal on (`scancel --signal`, which signals every process of the
    job step: its cgroup): SIGUSR1 to every process of launch/run_vlm_sft.sh's 2-rank job. The shell, torchrun and
    tee ignore it (torchrun would die of it); both workers save the same step and exit 75. (torchrun puts each
    worker in its own process group, so signalling the script's group would not reach them.)"""
    logs = tmp_path / "logs"
    cmd = ["bash", "launch/run_vlm_sft.sh", cli_args(tmp_path, tiny_model_dir, robo2vlm_dir)[3].split("=", 1)[1],
           *cli_args(tmp_path, tiny_model_dir, robo2vlm_dir, "--config.runner.max_steps=200",
                     "--config.runner.save_interval=0")[5:]]
    log = tmp_path / "job.log"
    proc = start(cmd, log, NPROC_PER_NODE="2", LOG_DIR=str(logs))
    wait_for(lambda: 2 in losses(logs / "demo"), proc, log, "step 2")
    job = [proc.pid, *descendants(proc.pid)]
    for pid in job:
        os.kill(pid, signal.SIGUSR1)
    proc.wait(timeout=300)
    output = log.read_text()
    stopped = max(losses(logs / "demo"))
    assert proc.returncode != 0
    assert output.count("SIGUSR1 received") == 2 and output.count(f"exitcode  : {faults.EXIT_PREEMPTED}") == 2, \
        output[-3000:]
    assert os.listdir(logs / "demo" / "checkpoints") == [f"step_{stopped}"]
    meta = checkpoint.read_meta(str(logs / "demo" / "checkpoints" / f"step_{stopped}"))
    assert meta["world_size"] == 2  # and each rank's files were summed by it and recorded
    assert {"__0_0.distcp", "__1_0.distcp", "rng_rank0.pt", "rng_rank1.pt", ".metadata"} <= set(meta["files"])
    assert not group_alive(proc.pid) and not alive(job)
