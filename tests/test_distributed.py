"""Several processes on CPU (gloo), launched the way users launch them: torchrun on the real entry point, and the
launch scripts. A run on N ranks must take the same steps as one process on the same global batches: per-step
losses and final params equal to 1e-5 (fp32), eval rows counted once, and a full_shard rank holds half the state."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from vlm_sft import checkpoint as checkpoint_lib
from vlm_sft import demo
from vlm_sft.demo.families import TINY_MODEL_BUILDERS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "robo2vlm.py")
CPU_ONLY = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"}
TOL = 1e-5
STEPS = 10


def torchrun(nproc: int, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(cmd, cwd=REPO, env=CPU_ONLY, capture_output=True, text=True, timeout=timeout)


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_params(run_dir: str) -> dict[str, torch.Tensor]:
    """The params of the run's last checkpoint, read in this process (no process group)."""
    path = checkpoint_lib.latest(checkpoint_lib.checkpoint_root(run_dir))
    template = {name: torch.empty(entry.size, dtype=entry.properties.dtype)
                for name, (_, entry) in checkpoint_lib.saved_params(path).items()}
    return checkpoint_lib.restore_params(path, template, no_dist=True)


def train(root, nproc: int, *overrides: str, model_dir, data_dir) -> str:
    """10 steps of the demo config on the given model and data (global batch 16, packed by default: each rank packs
    its 16 / nproc rows into micro-batches; with data.packing=False micro-batches of 4, so 1 rank accumulates 4
    micro-batches, 2 ranks 2 each, 4 ranks 1), then eval on 16 test rows in batches of 3.

    lr 1e-3 rather than the demo's 3e-3: the k_proj biases have a true gradient of exactly zero (softmax ignores
    a per-query constant), so theirs is rounding noise whose sign depends on the reduction order, and Adam scales
    it to lr-sized steps. At 3e-3 that one tensor ends 1.2e-5 apart after 10 steps (every other tensor <= 6.3e-7);
    at 1e-3 it stays within the 1e-5 the check asks of every tensor.
    """
    log_path = str(root / f"{nproc}x{'_'.join(o.rsplit('.', 1)[-1] for o in overrides) or 'default'}")
    proc = torchrun(
        nproc, "-m", "vlm_sft.main", f"--config={CONFIG}:demo",
        f"--config.actor.model.model_path={model_dir}", f"--config.data.train_data_paths={data_dir}",
        f"--config.data.eval_data_paths={data_dir}", f"--config.runner.logger.log_path={log_path}",
        f"--config.runner.max_steps={STEPS}", "--config.runner.log_interval=1", "--config.runner.val_check_interval=0",
        "--config.runner.val_before_train=False", "--config.runner.save_interval=0",
        "--config.actor.global_batch_size=16", "--config.actor.micro_batch_size=4",
        "--config.actor.eval_batch_size=3", "--config.eval.max_new_tokens=4", "--config.actor.optim.lr=1e-3",
        *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return os.path.join(log_path, "demo")


def cached_runs(root, model_dir, data_dir, *common: str):
    """runs(nproc, *overrides) -> the run directory, each configuration trained once."""
    cache = {}

    def get(nproc: int, *overrides: str) -> str:
        key = (nproc, *overrides)
        if key not in cache:
            cache[key] = train(root, nproc, *common, *overrides, model_dir=model_dir, data_dir=data_dir)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir, robo2vlm_dir):
    """Run directories, each trained once per module: runs(nproc, *overrides)."""
    return cached_runs(tmp_path_factory.mktemp("dist_runs"), tiny_model_dir, robo2vlm_dir)


@pytest.mark.slow
# Eager full_shard with checkpointing is hybrid_shard_2x2's path on each replica group (sharded gathers redone in
# backward) and, compiled, the last case's: no case of its own (CI time).
@pytest.mark.parametrize("nproc, overrides", [
    (2, ("--config.actor.fsdp_config.sharding_strategy=no_shard",)),
    (2, ("--config.actor.fsdp_config.sharding_strategy=full_shard", "--config.data.packing=False")),
    (4, ("--config.actor.fsdp_config.sharding_strategy=hybrid_shard", "--config.cluster.num_nodes=2",
         "--config.actor.fsdp_config.gradient_checkpointing=True")),
    (2, ("--config.actor.fsdp_config.sharding_strategy=full_shard",
         "--config.actor.fsdp_config.gradient_checkpointing=True", "--config.actor.compile=True")),
], ids=["no_shard_2", "full_shard_2_unpacked", "hybrid_shard_2x2",
       "full_shard_2_compiled_checkpointing"])
def test_n_ranks_take_the_same_steps_as_one_process(runs, nproc, overrides):
    assert_same_steps(runs(1), runs(nproc, *overrides))


@pytest.fixture(scope="module")
def qwen3_runs(tmp_path_factory, tiny_qwen3_vl_dir, robo2vlm_dir):
    """As `runs`, for the tiny Qwen3-VL (actor.model.model_type=qwen3_vl)."""
    return cached_runs(tmp_path_factory.mktemp("dist_runs_qwen3"), tiny_qwen3_vl_dir, robo2vlm_dir,
                       "--config.actor.model.model_type=qwen3_vl")


@pytest.mark.slow
def test_qwen3_vl_full_shard_on_2_ranks_takes_the_same_steps_as_one_process(qwen3_runs):
    assert_same_steps(qwen3_runs(1), qwen3_runs(2, "--config.actor.fsdp_config.sharding_strategy=full_shard"))


@pytest.fixture(scope="module")
def qwen3_5_runs(tmp_path_factory, tiny_qwen3_5_dir, robo2vlm_dir):
    """As `runs`, for the tiny Qwen3.5 (actor.model.model_type=qwen3_5: Gated DeltaNet + gated attention)."""
    return cached_runs(tmp_path_factory.mktemp("dist_runs_qwen3_5"), tiny_qwen3_5_dir, robo2vlm_dir,
                       "--config.actor.model.model_type=qwen3_5")


@pytest.mark.slow
def test_qwen3_5_full_shard_on_2_ranks_takes_the_same_steps_as_one_process(qwen3_5_runs):
    """Losses to 1e-5; params to 1e-5 plus 1e-5 relative: the Gated DeltaNet's A_log (log decay rates up to
    log 16) ends 1.05e-5 apart after 10 steps (reduction-order rounding that Adam scales up, as for the k_proj
    biases in `train`), 4e-6 relative."""
    assert_same_steps(qwen3_5_runs(1), qwen3_5_runs(2, "--config.actor.fsdp_config.sharding_strategy=full_shard",
                                                    "--config.actor.fsdp_config.gradient_checkpointing=True"),
                      param_rtol=1e-5)


@pytest.mark.slow
def test_qwen3_vl_moe_full_shard_on_2_ranks_takes_the_same_steps_as_one_process(tmp_path, tiny_qwen3_vl_moe_dir,
                                                                              robo2vlm_dir):
    """Stacked experts sharded like every leaf (Shard(0): each rank holds E/2 experts' rows of each tensor,
    gathered per block), with the load-balancing loss in the objective: the same steps as one process. Padded
    micro-batches of the same rows on 1 and 2 ranks (packing would group the rows differently, and the 10x router's
    fp32 rounding then moves the ~12.0 loss by ~1e-5; packed == padded is held per token in
    test_qwen3_vl_moe_model.py), so the comparison isolates the sharding."""
    runs = cached_runs(tmp_path, tiny_qwen3_vl_moe_dir, robo2vlm_dir, "--config.actor.model.model_type=qwen3_vl_moe",
                       "--config.actor.model.router_aux_loss_coef=0.01", "--config.data.packing=False")
    one, two = runs(1), runs(2, "--config.actor.fsdp_config.sharding_strategy=full_shard")
    assert_same_steps(one, two)
    aux = [(a["train/aux_loss"], b["train/aux_loss"]) for a, b in zip(read_metrics(one), read_metrics(two))
           if "train/aux_loss" in a]
    assert len(aux) == STEPS and all(abs(a - b) <= TOL for a, b in aux), aux


def assert_same_steps(one: str, many: str, param_rtol: float = 0.0) -> None:
    """Per-step losses and final params to TOL (params: + param_rtol * |param|), token counts and eval counts
    equal, between two run dirs."""
    base, dist = read_metrics(one), read_metrics(many)
    base_train = [m for m in base if "train/loss" in m]
    dist_train = [m for m in dist if "train/loss" in m]
    assert [m["step"] for m in dist_train] == list(range(1, STEPS + 1))
    for b, d in zip(base_train, dist_train):
        assert abs(b["train/loss"] - d["train/loss"]) <= TOL, (b["step"], b["train/loss"], d["train/loss"])
        assert d["train/tokens"] == b["train/tokens"]  # every rank's share counted once
    assert base_train[-1]["train/loss"] < base_train[0]["train/loss"] - 0.2  # it trained
    p1, pn = final_params(one), final_params(many)
    assert p1.keys() == pn.keys()
    worst = max((float(((p1[k] - pn[k]).abs() - param_rtol * p1[k].abs()).max()), k) for k in p1)
    assert worst[0] <= TOL, worst
    # Eval split over the ranks: every one of the 16 test rows counted once, the same accuracies.
    (b_eval,), (d_eval,) = [m for m in base if "eval/rows" in m], [m for m in dist if "eval/rows" in m]
    assert b_eval["eval/rows"] == d_eval["eval/rows"] == 16
    for key in ("eval/choice_accuracy", "eval/eval_accuracy"):
        assert d_eval[key] == b_eval[key], key


@pytest.mark.slow
def test_full_shard_halves_the_state_per_rank_and_frees_gathered_blocks(tmp_path):
    """Measured on each of 2 ranks (tests/dist_worker.py) against the same code on a mesh of one, with a model whose
    decoder/vision blocks are large enough to see: local shards of params + Adam state, and the gathered params
    alive at once with and without activation checkpointing."""
    model_dir = demo.make_tiny_model_dir(tmp_path / "model", text_layers=4, text_intermediate=1024,
                                            vision_depth=4, vision_hidden=64, vision_heads=4,
                                            vision_intermediate=512)
    data_dir = demo.make_robo2vlm_dir(tmp_path / "data")
    out = tmp_path / "out"
    proc = torchrun(2, "tests/dist_worker.py", str(model_dir), str(data_dir), str(out / "2"), "full_shard",
                    "fp32,bf16")
    assert proc.returncode == 0, proc.stderr[-5000:]
    proc = torchrun(1, "tests/dist_worker.py", str(model_dir), str(data_dir), str(out / "1"))
    assert proc.returncode == 0, proc.stderr[-5000:]
    (one,) = [json.loads((out / "1" / "fp32_rank0.json").read_text())]
    two = [json.loads((out / "2" / f"fp32_rank{r}.json").read_text()) for r in range(2)]
    two_bf16 = [json.loads((out / "2" / f"bf16_rank{r}.json").read_text()) for r in range(2)]
    state_one = one["local_param_bytes"] + one["local_opt_bytes"]
    assert one["local_param_bytes"] == one["full_param_bytes"]
    for r in two:
        assert r["local_param_bytes"] + r["local_opt_bytes"] <= 0.55 * state_one, r
        assert r["grad_max_abs_diff_ckpt_vs_no_ckpt"] == 0.0 and r["ckpt_loss"] == r["no_ckpt_loss"]
        assert r["ckpt_grads_ok"] and r["no_ckpt_grads_ok"]  # fp32, in the params' placement
        blocks = r["full_param_bytes"] - r["other_groups_bytes"]  # all decoder + vision blocks
        assert blocks > 4 * r["largest_remat_group_bytes"]
        # Without checkpointing every gathered block stays alive for backward; with it, at most ~one block does
        # (plus the groups applied outside blocks: embedding/lm_head, norm, patch embed, merger).
        assert r["no_ckpt_peak_live_gathered_bytes"] >= r["other_groups_bytes"] + 0.9 * blocks
        assert r["ckpt_peak_live_gathered_bytes"] <= r["other_groups_bytes"] + 2 * r["largest_remat_group_bytes"]
        assert r["ckpt_gathered_bytes"] > r["no_ckpt_gathered_bytes"]  # blocks gathered again in backward
    for r, r32 in zip(two_bf16, two):  # bf16 compute: exact checkpointing, fp32 master gradients, ~the same loss
        assert r["grad_max_abs_diff_ckpt_vs_no_ckpt"] == 0.0 and r["ckpt_grads_ok"] and r["no_ckpt_grads_ok"]
        assert abs(r["ckpt_loss"] - r32["ckpt_loss"]) < 0.05
        # Group bytes are in bf16; each gather moves fp32 (the reduce dtype) then casts: 2x + 1x at the moment of
        # the cast.
        assert r["ckpt_peak_live_gathered_bytes"] <= 3 * (r["other_groups_bytes"] + 2 * r["largest_remat_group_bytes"])
        assert r["ckpt_peak_live_gathered_bytes"] < r["no_ckpt_peak_live_gathered_bytes"]
    # A mesh of one gathers nothing: the local params are already whole.
    assert one["ckpt_peak_live_gathered_bytes"] == one["no_ckpt_peak_live_gathered_bytes"] == 0


def test_bad_mesh_fails_on_every_rank_with_one_message_before_any_work(tmp_path):
    proc = torchrun(2, "-m", "vlm_sft.main", f"--config={CONFIG}:demo",
                    f"--config.runner.logger.log_path={tmp_path}",
                    "--config.actor.fsdp_config.sharding_strategy=hybrid_shard",
                    "--config.actor.fsdp_config.hybrid_shard_size=3", timeout=120)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    message = "error: actor.fsdp_config.hybrid_shard_size=3: does not divide the world size 2"
    assert output.count(message) == 1, output[-3000:]
    assert not os.path.exists(tmp_path / "demo" / "demo_assets")  # nothing built


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_launch_script_runs_the_demo_on_two_cpu_processes(tmp_path):
    env = {**CPU_ONLY, "NPROC_PER_NODE": "2", "LOG_DIR": str(tmp_path / "logs")}
    proc = subprocess.run(
        ["bash", "launch/run_vlm_sft.sh", "configs/robo2vlm.py:demo", "--config.runner.max_steps=4",
         "--config.data.demo_rows=32", "--config.runner.val_check_interval=2", "--config.runner.log_interval=1",
         "--config.eval.max_new_tokens=4", "--config.actor.fsdp_config.sharding_strategy=full_shard"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (tmp_path / "logs" / "run.log").read_text()
    assert "2 CPU process(es)" in log and "full_shard on mesh (2,)" in log
    lines = read_metrics(str(tmp_path / "logs" / "demo"))
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2, 3, 4]
    evals = [m for m in lines if "eval/rows" in m]
    assert evals and all(m["eval/rows"] == 4 for m in evals)  # demo: 32 train rows, 4 test rows


@pytest.mark.slow
def test_multinode_script_on_two_simulated_nodes(tmp_path):
    """Two `launch/multinode.sh` on this machine, one process each, meeting through the c10d rendezvous; with
    hybrid_shard and NNODES=2 the mesh is 2 replicas x 1 shard."""
    env = {**CPU_ONLY, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "NNODES": "2",
           "RUN_ID": "test", "LOG_DIR": str(tmp_path / "logs"), "NPROC_PER_NODE": "1"}
    cmd = ["bash", "launch/multinode.sh", "configs/robo2vlm.py:demo", "--config.runner.max_steps=2",
           "--config.data.demo_rows=16", "--config.runner.val_before_train=False", "--config.data.eval_max_rows=2",
           "--config.eval.max_new_tokens=2", "--config.actor.fsdp_config.sharding_strategy=hybrid_shard"]
    logs = [tmp_path / f"node{r}.out" for r in range(2)]  # files: an unread pipe could fill and block a node
    nodes = []
    for r, log in enumerate(logs):
        with open(log, "w") as f:
            nodes.append(subprocess.Popen(cmd, cwd=REPO, env={**env, "NODE_RANK": str(r)}, stdout=f,
                                          stderr=subprocess.STDOUT, text=True))
    for n in nodes:
        n.wait(timeout=600)
    outputs = [log.read_text() for log in logs]
    assert [n.returncode for n in nodes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "hybrid_shard on mesh (2, 1)" in "".join(outputs)
    assert (tmp_path / "logs" / "node0.log").exists() and (tmp_path / "logs" / "node1.log").exists()
    lines = read_metrics(str(tmp_path / "logs" / "demo"))
    assert [m["step"] for m in lines if "train/loss" in m] == [1, 2]


def _eval_worker(nproc: int, model_dir, data_dir, out, mode: str, model_type: str, *flags: str) -> list[dict]:
    """tests/eval_worker.py's per-rank results (one process, no torchrun, for the reference)."""
    out.mkdir(parents=True)
    args = ["tests/eval_worker.py", str(model_dir), str(data_dir), str(out), mode, model_type, str(EVAL_ROWS), *flags]
    if mode == "reference":
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=CPU_ONLY, capture_output=True, text=True,
                              timeout=600)
    else:
        proc = torchrun(nproc, *args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


EVAL_ROWS = 5  # in batches of 2: rank 0 has one batch, rank 1 two (it runs one alone: the ranks must stay in step)


@pytest.mark.slow
# Every family once; the LoRA case stands for plain Qwen2.5-VL too (its unadapted leaves take the same gathers) and
# the EP case for Qwen3-VL-MoE (Qwen3.5-MoE covers the MoE blocks under plain full_shard): CI time.
@pytest.mark.parametrize("family, flags", [("qwen2.5_vl", ("lora",)), ("qwen3_vl", ()), ("qwen3_vl_moe", ("ep",)),
                                           ("qwen3_5", ()), ("qwen3_5_moe", ())],
                         ids=["qwen2.5_vl_lora", "qwen3_vl", "qwen3_vl_moe_ep", "qwen3_5", "qwen3_5_moe"])
def test_sharded_evaluation_on_2_ranks_equals_the_whole_model_in_one_process(tmp_path, robo2vlm_dir, family, flags):
    """Choice scoring and greedy generation with the params as sharded (full_shard on 2 gloo ranks, every group
    gathered for its call only, generation's KV cache per rank for its rows) give each row the same generated
    text and chosen index, and the same accuracies, as the whole model from from_pretrained in one process (HF
    generate on the whole params, as evaluation ran before). Untied lm_heads: a tied random model only repeats the
    prompt's last token, which would not tell a wrong gather apart. LoRA: nonzero adapters on bf16 frozen bases,
    merged per block as the whole-model merge did. EP: expert-parallel experts gathered whole per block."""
    model_dir = TINY_MODEL_BUILDERS[family](tmp_path / "model", tie_word_embeddings=False)
    (ref,) = _eval_worker(1, model_dir, robo2vlm_dir, tmp_path / "ref", "reference", family, *flags)
    ranks = _eval_worker(2, model_dir, robo2vlm_dir, tmp_path / "two", "sharded", family, *flags)
    rows = {**ranks[0]["rows"], **ranks[1]["rows"]}
    assert len(ranks[0]["rows"]) == 2 and len(ranks[1]["rows"]) == 3
    assert rows == ref["rows"]
    assert len({text for text, _ in rows.values()}) > 1  # the model says different things: the check can fail
    for r in ranks:
        assert r["metrics"]["eval/rows"] == EVAL_ROWS
        for key in ("eval/eval_accuracy", "eval/choice_accuracy"):
            assert r["metrics"][key] == ref["metrics"][key], key
