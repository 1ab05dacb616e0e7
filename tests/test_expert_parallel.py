"""Expert parallelism (actor.fsdp_config.expert_parallel_size) through the real entry point on gloo ranks: each rank
keeps its experts whole and tokens travel by all-to-all, yet the run takes the same steps as one process without
EP (losses, aux losses and updated params to 1e-5); checkpoints reshard between EP and non-EP runs. The config
checks run in the default suite, in-process."""
import os

import ml_collections
import pytest
import torch

from test_distributed import CONFIG, TOL, final_params, read_metrics, torchrun
from vlm_sft import sharding
from vlm_sft.errors import ConfigError

STEPS = 2  # saved at step 1: a resumed run's "next step" is step 2
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ep_worker.py")


def settings(model_dir, data_dir) -> list[str]:
    """STEPS steps of the demo config on the tiny Qwen3-VL-MoE (8 experts, top-2, one dense layer), with the
    load-balancing loss on, padded micro-batches of 4 (packing would group the rows differently per world size:
    test_distributed.py's MoE test says why), checkpoints at step 1 and the last."""
    return [f"--config.actor.model.model_path={model_dir}", f"--config.data.train_data_paths={data_dir}",
            f"--config.data.eval_data_paths={data_dir}", "--config.runner.logger.experiment_name=run",
            f"--config.runner.max_steps={STEPS}", "--config.runner.log_interval=1",
            "--config.runner.val_check_interval=0", "--config.runner.val_before_train=False",
            "--config.runner.save_interval=1", "--config.data.eval_max_rows=2", "--config.eval.max_new_tokens=2",
            "--config.actor.global_batch_size=16", "--config.actor.micro_batch_size=4", "--config.data.packing=False",
            "--config.actor.optim.lr=1e-3", "--config.actor.model.router_aux_loss_coef=0.01",
            "--config.actor.fsdp_config.sharding_strategy=full_shard"]


def check(proc, log_path: str) -> None:
    os.makedirs(log_path, exist_ok=True)
    with open(os.path.join(log_path, "output.txt"), "w") as f:
        f.write(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_qwen3_vl_moe_dir, robo2vlm_dir) -> tuple[dict[str, str], str]:
    """tests/ep_worker.py's six 2-rank runs in one torchrun launch: name -> run dir, and the launch's output."""
    root = tmp_path_factory.mktemp("ep_2_ranks")
    proc = torchrun(2, WORKER, str(root), *settings(tiny_qwen3_vl_moe_dir, robo2vlm_dir))
    check(proc, str(root))
    names = ("no_ep", "ep", "no_ep_from_ep", "lora_no_ep", "lora_ep", "ep_compiled_from_no_ep")
    return {n: os.path.join(root, n, "run") for n in names}, proc.stdout + proc.stderr


def ep(size: int) -> str:
    return f"--config.actor.fsdp_config.expert_parallel_size={size}"


def train_metrics(run_dir: str) -> dict[int, dict]:
    return {m["step"]: m for m in read_metrics(run_dir) if "train/loss" in m}


def assert_same(base: str, other: str, steps) -> None:
    """train/loss and train/aux_loss at `steps`, and the final params, to TOL."""
    a, b = train_metrics(base), train_metrics(other)
    assert sorted(b) == list(steps), sorted(b)
    for s in steps:
        for key in ("train/loss", "train/aux_loss"):
            assert abs(a[s][key] - b[s][key]) <= TOL, (s, key, a[s][key], b[s][key])
    p1, p2 = final_params(base), final_params(other)
    assert p1.keys() == p2.keys()
    worst = max((float((p1[k] - p2[k]).abs().max()), k) for k in p1)
    assert worst[0] <= TOL, worst


@pytest.mark.slow
def test_expert_parallel_takes_the_same_steps_as_no_expert_parallel(two_ranks):
    """2 ranks: one EP group (4 experts each), against the same 2 ranks without EP (full_shard; which equals one
    process: test_distributed.py)."""
    dirs, output = two_ranks
    assert_same(dirs["no_ep"], dirs["ep"], range(1, STEPS + 1))
    assert train_metrics(dirs["no_ep"])[STEPS]["train/loss"] < train_metrics(dirs["no_ep"])[1]["train/loss"]
    assert "experts expert-parallel on mesh (1, 2)" in output


@pytest.mark.slow
def test_expert_lora_under_expert_parallel_takes_the_same_steps(two_ranks):
    """LoRA on the stacked experts (one adapter per expert) with EP: each rank's adapters are those of its own
    experts, merged into them per block; the same steps as the 2 ranks without EP (whose expert LoRA equals one
    process: test_lora.py), and the adapters did move."""
    dirs, output = two_ranks
    assert_same(dirs["lora_no_ep"], dirs["lora_ep"], range(1, STEPS + 1))
    params = final_params(dirs["lora_ep"])
    expert_b = [k for k in params if k.endswith("mlp.experts.down_proj.lora_B")]
    assert expert_b and all(float(params[k].abs().max()) > 0 for k in expert_b)  # B starts at zero


@pytest.mark.slow
def test_expert_parallel_on_4_ranks_all_reduces_across_groups(two_ranks, tmp_path, tiny_qwen3_vl_moe_dir,
                                                              robo2vlm_dir):
    """4 ranks: mesh (edp 2, ep 2), so the expert gradients are also all-reduced across the two EP groups. Against
    the 2-rank run without EP (same global batch)."""
    log_path = str(tmp_path / "ep_4")
    proc = torchrun(4, "-m", "vlm_sft.main", f"--config={CONFIG}:demo,qwen3_moe",
                    f"--config.runner.logger.log_path={log_path}", ep(2),
                    *settings(tiny_qwen3_vl_moe_dir, robo2vlm_dir))
    check(proc, log_path)
    assert_same(two_ranks[0]["no_ep"], os.path.join(log_path, "run"), range(1, STEPS + 1))
    assert "experts expert-parallel on mesh (2, 2)" in proc.stdout + proc.stderr


@pytest.mark.slow
def test_checkpoints_reshard_between_expert_parallel_and_not(two_ranks):
    """step_1 of the EP run resumed without EP, and step_1 of the run without EP resumed with EP: both take the
    same step 2 as the straight runs. The resumed EP run is also the compiled one (actor.compile=True: its MoE
    blocks compiled, the token exchange eager inside them), so it holds the compiled EP step to the eager steps
    without a run of its own."""
    dirs, output = two_ranks
    assert_same(dirs["no_ep"], dirs["no_ep_from_ep"], [STEPS])
    assert_same(dirs["no_ep"], dirs["ep_compiled_from_no_ep"], [STEPS])
    assert "compile: " in output  # compile.watch's line: the compiled run compiled its regions


def config(world_ep: int, *, compile: bool = False) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.actor = ml_collections.ConfigDict({"compile": compile})
    c.actor.fsdp_config = ml_collections.ConfigDict({"expert_parallel_size": world_ep})
    return c


MOE_SHAPES = {"model.language_model.layers.0.mlp.gate.weight": (8, 16),
              "model.language_model.layers.0.mlp.experts.gate_up_proj": (8, 96, 16),
              "model.language_model.layers.0.mlp.experts.down_proj": (8, 16, 48)}
DENSE_SHAPES = {"model.language_model.layers.0.mlp.up_proj.weight": (48, 16)}


@pytest.mark.parametrize("size, world, shapes, compile, message", [
    (0, 2, MOE_SHAPES, False, r"expert_parallel_size=0: expected a positive integer"),
    (True, 2, MOE_SHAPES, False, r"expert_parallel_size=True: expected a positive integer"),
    (4, 6, MOE_SHAPES, False, r"expert_parallel_size=4: does not divide the world size 6"),
    (3, 6, MOE_SHAPES, False, r"expert_parallel_size=3: does not divide the model's 8 experts"),
    (2, 2, DENSE_SHAPES, False, r"expert_parallel_size=2: the model has no experts .*qwen3_vl_moe"),
], ids=["zero", "bool", "world", "experts", "dense_model"])
def test_bad_expert_parallel_size_is_refused_naming_the_field(size, world, shapes, compile, message):
    with pytest.raises(ConfigError, match=r"actor\.fsdp_config\." + message):
        sharding.check_expert_parallel(config(size, compile=compile), shapes, world)


def test_expert_parallel_size_that_fits_passes_and_one_is_off():
    sharding.check_expert_parallel(config(4), MOE_SHAPES, 8)
    sharding.check_expert_parallel(config(2, compile=True), MOE_SHAPES, 2)  # compiled: the exchange runs eager
    sharding.check_expert_parallel(config(1), DENSE_SHAPES, 3)
    assert sharding.expert_parallel_size(config(1), 3) == 1


def test_planner_holds_whole_experts_per_rank_and_gathers_none():
    """--mode=plan's EP term: with e = world the state per rank is full_shard's (E/world experts whole = 1/world of
    each), with e < world the experts' Adam moments are 1/e (world/e copies), and the experts are never gathered."""
    from test_planner import _config, _rows
    import transformers
    from vlm_sft import demo, planner
    from vlm_sft.models import moe

    hub = demo.tiny_qwen3_vl_moe_hub_config(num_experts=16, num_experts_per_tok=4, moe_intermediate=192,
                                            mlp_only_layers=(), text_hidden=512, text_layers=4)
    with torch.device("meta"):
        module = transformers.AutoModelForImageTextToText.from_config(transformers.AutoConfig.for_model(**hub))
    experts = sum(p.numel() for n, p in module.named_parameters() if moe.is_expert(n))

    def plan(ep_size):
        c = _config(actor__micro_batch_size=4, actor__global_batch_size=32, actor__fsdp_config__sharding_strategy=
                    "full_shard", actor__fsdp_config__expert_parallel_size=ep_size)
        return planner.plan(c, module, _rows(image=300), launched_world_size=8, device_type="cuda",
                            runtime_gib=1.0)["per_device"]

    none, whole, half = plan(1), plan(8), plan(4)
    assert whole["optimizer_gib"] == none["optimizer_gib"] and whole["params_gib"] == none["params_gib"]
    assert half["optimizer_gib"] - none["optimizer_gib"] == pytest.approx(
        2 * experts * 4 * (1 / 4 - 1 / 8) / 2 ** 30, abs=2e-3)
    # No EP gathers every expert in bf16 (no checkpointing: kept for backward); EP casts only its E/e.
    assert none["gathered_gib"] - whole["gathered_gib"] == pytest.approx(experts * 2 * (1 - 1 / 8) / 2 ** 30,
                                                                         abs=0.02)


def _experts_worker(rank: int, store: str, out: str) -> None:
    """One of 2 gloo ranks: moe.experts with this rank's 2 of 4 experts (DTensors, Shard(0) over "ep") against the
    whole experts on this rank's tokens: outputs, and (after the sum over ranks) the experts' and tokens'
    gradients. Routing case "skewed": every token picks experts 0 and 1, so rank 1 receives no rows. Each case also
    through torch.compile (no fullgraph, as sharding compiles under EP): the exchange eager, the rest compiled;
    a third routing then compiles nothing new."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from vlm_sft.models import moe

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    torch.manual_seed(0)
    gate_up, down = torch.randn(4, 16, 8), torch.randn(4, 8, 8)  # 16-byte strides (grouped_mm)
    results = {}
    compiled = torch.compile(moe.experts, dynamic=False)
    for case in ("random", "skewed", "random_compiled", "skewed_compiled"):
        torch.manual_seed(1 + rank)
        x = torch.randn(7, 8, requires_grad=True)
        weights = torch.rand(7, 2)
        ids = torch.stack([torch.randperm(4)[:2] for _ in range(7)]) if case.startswith("random") else \
            torch.tensor([[0, 1]] * 7)
        run = compiled if case.endswith("compiled") else moe.experts
        whole = [gate_up.clone().requires_grad_(), down.clone().requires_grad_()]
        ref = moe.experts(x, ids, weights, *whole, torch.nn.functional.silu)
        ref_grads = torch.autograd.grad((ref * ref).sum(), [x, *whole])
        local = [t[2 * rank:2 * rank + 2].clone().requires_grad_() for t in (gate_up, down)]
        shards = [DTensor.from_local(t, mesh, [Shard(0)], run_check=False) for t in local]
        y = run(x, ids, weights, *shards, torch.nn.functional.silu)
        grads = torch.autograd.grad((y * y).sum(), [x, *local])
        summed = [g.clone() for g in ref_grads[1:]]  # the whole experts' gradient summed over both ranks' tokens
        for g in summed:
            dist.all_reduce(g)
        y = y.detach()
        rel = lambda a, b: float((a - b).abs().max() / b.abs().max().clamp_min(1))  # values O(10-100)
        results[case] = {"out": rel(y, ref.detach()), "x": rel(grads[0], ref_grads[0]),
                         "experts": max(rel(g, s[2 * rank:2 * rank + 2]) for g, s in zip(grads[1:], summed))}
    # Another routing (another received row count on each rank) runs through the graphs already compiled: the
    # grouped GEMMs' graph is dynamic in the row count.
    from torch._dynamo.utils import counters
    graphs = counters["stats"]["unique_graphs"]
    torch.manual_seed(11 + rank)
    x, weights = torch.randn(7, 8, requires_grad=True), torch.rand(7, 2)
    ids = torch.stack([torch.randperm(4)[:2] for _ in range(7)])
    local = [t[2 * rank:2 * rank + 2].clone().requires_grad_() for t in (gate_up, down)]
    shards = [DTensor.from_local(t, mesh, [Shard(0)], run_check=False) for t in local]
    torch.autograd.grad(compiled(x, ids, weights, *shards, torch.nn.functional.silu).sum(), [x, *local])
    results["no_recompile"] = {"new_graphs": counters["stats"]["unique_graphs"] - graphs}
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # ~30 s on 2 shared cores: two spawned processes importing torch and transformers
def test_expert_parallel_experts_equal_whole_experts_on_2_ranks(tmp_path):
    """models/moe.py's all-to-all path on its own (2 gloo ranks, seconds): outputs, token gradients and expert
    gradients equal the whole experts' to 1e-5 relative, also when a rank's experts receive no token."""
    import torch.multiprocessing as mp

    mp.spawn(_experts_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2)
    for rank in range(2):
        results = torch.load(tmp_path / f"rank{rank}.pt")
        for case, diffs in results.items():
            assert all(d <= TOL for d in diffs.values()), (rank, case, diffs)
