"""sharding.py in one process, on a mesh of one (the multi-rank behaviour is in test_distributed.py): mesh layouts
and their errors, the placement of every train-state leaf, exact per-block gathers with and without activation
checkpointing in fp32 and bf16, and metric reduction."""
import functools
import re
import subprocess
import sys

import pytest
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard

from vlm_sft import config as config_lib
from vlm_sft import models as model_lib
from vlm_sft import sharding
from vlm_sft import step as step_lib
from vlm_sft.data import robo2vlm
from vlm_sft.data.collate import collate_encoded
from vlm_sft.data.encode import Encoder
from vlm_sft.data.processor import load_processor
from vlm_sft.data.vision import VisionSpec
from vlm_sft.state import init_train_state
from configs_loader import load_config


def make_sharding(strategy="full_shard", param_dtype="fp32", reduce_dtype="fp32"):
    c = load_config("demo")
    c.actor.fsdp_config.sharding_strategy = strategy
    c.actor.fsdp_config.mixed_precision.param_dtype = param_dtype
    c.actor.fsdp_config.mixed_precision.reduce_dtype = reduce_dtype
    return sharding.make_sharding(c, torch.device("cpu"))


@pytest.fixture(scope="module")
def batch(tiny_model_dir, robo2vlm_dir):
    processor = load_processor(tiny_model_dir, min_pixels=56 * 56, max_pixels=56 * 56)
    encoder = Encoder(processor, max_prompt_length=256)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files([str(robo2vlm_dir)], "train"))
    model, _ = model_lib.load_model(tiny_model_dir)
    spec = VisionSpec.from_config(model.config, pad_token_id=processor.tokenizer.pad_token_id)
    return collate_encoded([encoder(source[i]) for i in range(3)], spec=spec)


# --------------------------------------------------------------------------------------------------------------
# Layout and config checks (pure: no process group).

def test_mesh_layout_per_strategy():
    assert sharding.mesh_layout("no_shard", 8) == ((8,), ("dp",))
    assert sharding.mesh_layout("full_shard", 8, num_nodes=2) == ((8,), ("dp",))
    assert sharding.mesh_layout("hybrid_shard", 16, num_nodes=2) == ((2, 8), ("replicate", "shard"))
    assert sharding.mesh_layout("hybrid_shard", 16, num_nodes=2, hybrid_shard_size=4) == ((4, 4),
                                                                                           ("replicate", "shard"))
    assert sharding.mesh_layout("hybrid_shard", 1) == ((1, 1), ("replicate", "shard"))
    assert sharding.param_placements("hybrid_shard") == (Replicate(), Shard(0))


@pytest.mark.parametrize("strategy, world, nodes, size, message", [
    ("hybrid_shard", 6, 4, 0, "world size 6 is not divisible by cluster.num_nodes=4"),
    ("hybrid_shard", 4, 1, 3, "hybrid_shard_size=3: does not divide the world size 4"),
    ("hybrid_shard", 4, 1, -1, "hybrid_shard_size=-1"),
    ("full_shard", 4, 0, 0, "cluster.num_nodes=0"),
    ("zero3", 4, 1, 0, "sharding_strategy='zero3'"),
])
def test_bad_mesh_is_a_config_error_naming_the_field(strategy, world, nodes, size, message):
    with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
        sharding.mesh_layout(strategy, world, num_nodes=nodes, hybrid_shard_size=size)


def test_check_config_rejects_a_reduce_dtype_narrower_than_the_compute_dtype():
    c = load_config("demo")
    c.actor.fsdp_config.mixed_precision.param_dtype = "fp32"
    c.actor.fsdp_config.mixed_precision.reduce_dtype = "bf16"
    with pytest.raises(config_lib.ConfigError, match="reduce_dtype='bf16' with param_dtype='fp32'"):
        sharding.check_config(c, 1)
    c.actor.fsdp_config.mixed_precision.param_dtype = "bf16"
    sharding.check_config(c, 1)  # bf16 compute, bf16 reduction: allowed
    c.actor.fsdp_config.mixed_precision.reduce_dtype = "fp32"
    sharding.check_config(c, 1)


def test_global_batch_must_divide_by_micro_batch_times_world_size():
    c = load_config("demo")
    c.data.packing = False  # RLinf's padded micro-batches: micro_batch_size rows each
    c.actor.global_batch_size, c.actor.micro_batch_size = 16, 8
    config_lib.validate(c, mode="train", world_size=2)
    with pytest.raises(config_lib.ConfigError, match="global_batch_size=16 is not divisible by .* world size 4"):
        config_lib.validate(c, mode="train", world_size=4)
    c.data.packing = True  # packed: only the rows per rank must divide
    config_lib.validate(c, mode="train", world_size=4)
    with pytest.raises(config_lib.ConfigError, match="global_batch_size=16 is not divisible by the world size 3"):
        config_lib.validate(c, mode="train", world_size=3)


def test_process_info_reads_torchrun_env():
    assert sharding.ProcessInfo.from_env({}) == sharding.ProcessInfo(1, 0, 0, 1)
    env = {"WORLD_SIZE": "8", "RANK": "5", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4"}
    assert sharding.ProcessInfo.from_env(env) == sharding.ProcessInfo(8, 5, 1, 4)
    env.pop("LOCAL_WORLD_SIZE")  # not from torchrun: assume one machine
    assert sharding.ProcessInfo.from_env(env) == sharding.ProcessInfo(8, 5, 1, 8)
    with pytest.raises(ValueError, match="LOCAL_RANK=4, LOCAL_WORLD_SIZE=4"):
        sharding.ProcessInfo.from_env({"WORLD_SIZE": "8", "RANK": "4", "LOCAL_RANK": "4", "LOCAL_WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="RANK=8"):
        sharding.ProcessInfo.from_env({"WORLD_SIZE": "8", "RANK": "8"})
    with pytest.raises(ValueError, match="must be integers"):
        sharding.ProcessInfo.from_env({"WORLD_SIZE": "two"})


# --------------------------------------------------------------------------------------------------------------
# The sharded train state.

@pytest.mark.parametrize("strategy", ["no_shard", "full_shard", "hybrid_shard"])
def test_every_leaf_of_params_and_optimizer_state_is_placed(device, tiny_model_dir, strategy):
    spec = make_sharding(strategy)
    model, params = model_lib.load_model(tiny_model_dir)
    full = {k: v.clone() for k, v in params.items()}
    sharded = sharding.shard_model(model, params, spec)
    tx, _ = step_lib.make_optimizer(load_config("demo"), total_steps=10)
    state = init_train_state(sharded, tx)
    placements = sharding.leaf_placements(state)
    tensors = {k: v for k, v in placements.items() if v is not None}
    # params, Adam's mu and nu: one placed leaf each, all with the strategy's placement; counters are plain.
    assert len(tensors) == 3 * len(full)
    assert set(tensors.values()) == {sharding.param_placements(strategy)}
    plain = [k for k, v in placements.items() if v is None]
    assert "step" in plain and any(k.endswith(".count") for k in plain)
    leaves = dict(zip(placements, torch.utils._pytree.tree_leaves(state)))
    assert all(leaves[k].dim() == 0 for k in plain)  # only scalar counters stay plain (replicated by construction)
    assert all(torch.equal(sharded[k].full_tensor(), full[k]) for k in full)
    # The module skeleton no longer holds a full copy of the weights; tied weights stay tied.
    module = model.module
    assert all(p.is_meta for p in module.parameters())
    assert module.lm_head.weight is module.model.language_model.embed_tokens.weight
    assert sharding.local_bytes(state.params) == sum(v.numel() * 4 for v in full.values())


def test_gather_casts_for_compute_and_returns_mean_gradients_in_the_params_placement(device):
    spec = make_sharding("full_shard", param_dtype="bf16", reduce_dtype="fp32")
    w = torch.randn(6, 4)
    p = {"w": sharding.shard_params({"w": w}, spec)["w"].requires_grad_()}
    x = torch.randn(3, 4)
    seen = []

    def fn(module, q, x):
        seen.append(q["w"].dtype)
        return (x.to(q["w"].dtype) @ q["w"].t()).float().square().sum()

    for checkpointing in (False, True):
        block_call = sharding.make_block_call(spec, checkpointing=checkpointing)
        (g,) = torch.autograd.grad(block_call(fn, None, p, x, remat=True), [p["w"]])
        assert isinstance(g, DTensor) and g.placements == (Shard(0),) and g.dtype == torch.float32
        w_bf16 = w.to(torch.bfloat16).requires_grad_()
        (ref,) = torch.autograd.grad((x.to(torch.bfloat16) @ w_bf16.t()).float().square().sum(), [w_bf16])
        torch.testing.assert_close(g.full_tensor(), ref.float())
    assert seen == [torch.bfloat16] * 3  # no checkpointing: 1 call; checkpointing: forward + recompute


def _counting(block_call, counts):
    """Wraps a block_call so each call of a remat block's function is counted (recomputation included)."""
    def counted(fn):
        @functools.wraps(fn)
        def run(*args):
            counts[fn.__name__] = counts.get(fn.__name__, 0) + 1
            return fn(*args)
        return run

    return lambda fn, module, p, *args, **kwargs: block_call(counted(fn), module, p, *args, **kwargs)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_checkpointing_recomputes_blocks_and_gives_identical_gradients(device, tiny_model_dir, batch, dtype):
    model, params = model_lib.load_model(tiny_model_dir)
    reference = step_lib.make_loss_and_grad(model)(  # unsharded, fp32, no hook: the plain functional model
        {k: v.clone() for k, v in params.items()}, batch, torch.ones(()))
    spec = make_sharding("full_shard", param_dtype=dtype)
    sharded = sharding.shard_model(model, params, spec)
    results, counts = {}, {}
    for checkpointing in (False, True):
        counts[checkpointing] = {}
        block_call = _counting(sharding.make_block_call(spec, checkpointing=checkpointing), counts[checkpointing])
        results[checkpointing] = step_lib.make_loss_and_grad(model, block_call)(sharded, batch, torch.ones(()))
    (loss0, g0), (loss1, g1) = results[False], results[True]
    assert torch.equal(loss0, loss1)
    assert all(torch.equal(g0[k].to_local(), g1[k].to_local()) for k in g0)
    blocks = model.config.vision_config.depth + model.config.text_config.num_hidden_layers
    assert sum(counts[True].values()) == sum(counts[False].values()) + blocks  # every block ran again
    assert all(g.dtype == torch.float32 and g.placements == (Shard(0),) for g in g1.values())  # fp32 master grads
    ref_loss, ref_grads = reference
    if dtype == "fp32":
        torch.testing.assert_close(loss1, ref_loss, rtol=0, atol=1e-6)
        for k in ref_grads:
            torch.testing.assert_close(g1[k].full_tensor(), ref_grads[k], rtol=1e-5, atol=1e-6)
    else:  # bf16 compute: the same loss to bf16 precision, gradients pointing the same way
        assert abs(float(loss1) - float(ref_loss)) < 0.05
        flat = lambda g: torch.cat([v.full_tensor().flatten() if isinstance(v, DTensor) else v.flatten()  # noqa
                                    for v in g.values()])
        assert float(torch.nn.functional.cosine_similarity(flat(g1), flat(ref_grads), dim=0)) > 0.99


def test_reduce_metrics_and_all_reduce_sum_on_one_rank(device):
    out = sharding.reduce_metrics({"train/loss": torch.tensor(2.5), "train/tokens": 7}, sum_keys=("train/tokens",))
    assert out == {"train/loss": 2.5, "train/tokens": 7.0}
    t = torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.equal(sharding.all_reduce_sum(t), t)


_EXIT_SCRIPT = """
import sys, torch, torch.distributed as dist
from vlm_sft import sharding
device, created = sharding.init_process_group(sharding.ProcessInfo())
t = torch.ones(3)
dist.all_reduce(t)  # gloo's worker threads exist and have run work
print("stdout before exit", end="")  # piped, so block-buffered: only a flush gets it out
sharding.destroy_process_group()
sharding.exit_process(sys.argv[1] if sys.argv[1] != "0" else 0)
"""


@pytest.mark.parametrize("code, rc", [("0", 0), ("error: bad row", 1)])
def test_exit_process_flushes_streams_and_keeps_systemexit_codes(code, rc):
    """A finished rank leaves without interpreter finalization (where gloo's threads can abort it): its buffered
    stdout and a SystemExit-style message still come out, with SystemExit's exit code."""
    proc = subprocess.run([sys.executable, "-c", _EXIT_SCRIPT, code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == rc, proc.stderr[-2000:]
    assert proc.stdout == "stdout before exit"
    assert (proc.stderr.strip().splitlines() or [""])[-1] == ("" if rc == 0 else code)


@pytest.mark.parametrize("param_dtype, reduce_dtype", [("fp32", "fp32"), ("bf16", "fp32"), ("bf16", "bf16")])
def test_plain_params_on_one_rank_give_the_dtensor_path_s_loss_and_gradients_exactly(
        device, tiny_model_dir, batch, param_dtype, reduce_dtype):
    """make_sharding(plain_single_rank=True) on a world of one (main.py's choice): plain tensors, no DTensor in the
    state or the step, and the same loss and gradients bit for bit as DTensors on the mesh of one, per precision."""
    c = load_config("demo")
    c.actor.fsdp_config.mixed_precision.param_dtype = param_dtype
    c.actor.fsdp_config.mixed_precision.reduce_dtype = reduce_dtype
    plain_spec = sharding.make_sharding(c, torch.device("cpu"), plain_single_rank=True)
    dtensor_spec = sharding.make_sharding(c, torch.device("cpu"))
    assert plain_spec.plain and not dtensor_spec.plain
    for trainable in (None, "vision"):  # every leaf; a frozen text model (cast, never differentiated)
        out = {}
        for name, spec in (("plain", plain_spec), ("dtensor", dtensor_spec)):
            model, params = model_lib.load_model(tiny_model_dir)
            sharded = sharding.shard_model(model, params, spec)
            assert all(isinstance(v, DTensor) != spec.plain for v in sharded.values())
            names = None if trainable is None else {k for k in sharded if k.startswith("model.visual")}
            out[name] = step_lib.make_loss_and_grad(model, sharding.make_block_call(spec), names)(
                sharded, batch, torch.ones(()))
        (loss_p, g_p), (loss_d, g_d) = out["plain"], out["dtensor"]
        assert torch.equal(loss_p, loss_d)
        assert set(g_p) == set(g_d)
        assert all(not isinstance(g, DTensor) and g.dtype == torch.float32 for g in g_p.values())
        assert all(torch.equal(g_p[k], g_d[k].to_local()) for k in g_p)
    if param_dtype == "bf16":  # one cat per block: views of one buffer, each aligned for compiled kernels
        block = {k: v.requires_grad_() for k, v in sharding.shard_params(
            {k: v for k, v in params.items() if ".layers.0." in k}, plain_spec).items()}
        full = sharding.gather(block, plain_spec)
        assert len({v.untyped_storage().data_ptr() for v in full.values()}) == 1
        assert all(v.dtype == torch.bfloat16 and v.storage_offset() % sharding.ALIGN == 0 for v in full.values())
    two_ranks = type("TwoRankMesh", (), {"size": lambda self: 2, "shape": (2,)})()  # no second process needed
    with pytest.raises(ValueError, match="mesh of one"):
        sharding.Sharding(two_ranks, (Replicate(),), plain=True)



def test_flat_cast_of_odd_sizes_is_exact_aligned_and_zero_padded():
    """One rank's flat cast (the CPU path fills the views by one _foreach_copy_): every view equals its tensor
    cast, starts at a multiple of ALIGN, the buffer's padding is zeros, and a second call with the same shapes
    reuses the cached layout with fresh values."""
    g = torch.Generator().manual_seed(0)
    for _ in range(2):
        tensors = [torch.randn(shape, generator=g) for shape in [(3, 5), (7,), (), (16, 2), (1, 1, 9)]]
        views = sharding._cat_views(tensors, torch.bfloat16)
        flat = views[0]._base if views[0]._base is not None else views[0]
        assert all(torch.equal(v, t.to(torch.bfloat16)) for v, t in zip(views, tensors))
        assert all(v.storage_offset() % sharding.ALIGN == 0 and v.is_contiguous() for v in views)
        used = torch.zeros(flat.numel(), dtype=torch.bool)
        for v in views:
            used[v.storage_offset():v.storage_offset() + v.numel()] = True
        assert flat.numel() == 96 and torch.all(flat[~used] == 0)
    back = sharding._cat_views(views, torch.float32, align=False)
    assert [b.shape for b in back] == [t.shape for t in tensors] and all(b.dtype == torch.float32 for b in back)
    assert all(torch.equal(b, t.to(torch.bfloat16).float()) for b, t in zip(back, tensors))


def _flat_gather_worker(rank: int, world: int, store: str, model_dir: str, batches: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        batch = torch.load(batches)[rank]
        mesh = init_device_mesh("cpu", (world,))
        failures = []
        flat_calls = []
        gather_flat = sharding.gather_flat
        sharding.gather_flat = lambda *a: flat_calls.append(1) or gather_flat(*a)
        for strategy in ("full_shard", "no_shard"):
            for param_dtype, reduce_dtype in ((torch.float32,) * 2, (torch.bfloat16, torch.float32),
                                              (torch.bfloat16,) * 2):
                spec = sharding.Sharding(mesh, sharding.param_placements(strategy), param_dtype=param_dtype,
                                         reduce_dtype=reduce_dtype)
                for trainable in (None, "vision"):  # all leaves; a frozen text model (gathered, never reduced)
                    results = {}
                    for flat in (True, False):
                        sharding.FLAT_GATHER = flat
                        flat_calls.clear()
                        stats = sharding.GatherStats()
                        model, params = model_lib.load_model(model_dir)
                        sharded = sharding.shard_model(model, params, spec)
                        names = None if trainable is None else {k for k in sharded if k.startswith("model.visual")}
                        results[flat] = step_lib.make_loss_and_grad(
                            model, sharding.make_block_call(spec, checkpointing=flat, stats=stats), names)(
                            sharded, batch, torch.ones(()))
                        results[flat] += (stats.gathered_bytes,)
                        if bool(flat_calls) != flat:
                            failures.append(f"{strategy}: flat={flat} but {len(flat_calls)} flat gathers")
                    (loss_f, g_f, bytes_f), (loss_p, g_p, bytes_p) = results[True], results[False]
                    where = f"{strategy} {param_dtype} {reduce_dtype} trainable={trainable}"
                    if not torch.equal(loss_f, loss_p) or set(g_f) != set(g_p):
                        failures.append(f"{where}: loss {float(loss_f)} vs {float(loss_p)}")
                    for k in g_p:
                        a, b = g_f[k], g_p[k]
                        if not (a.placements == b.placements and a.dtype == b.dtype == torch.float32
                                and torch.equal(a.to_local(), b.to_local())):
                            failures.append(f"{where}: grad {k}")
                    if strategy == "full_shard" and not bytes_f > 0:
                        failures.append(f"{where}: the flat gather was not tracked")
        if rank == 0:
            with open(out, "w") as f:
                f.write("\n".join(failures) or "ok")
        dist.barrier()
    finally:
        dist.destroy_process_group()
    sharding.exit_process(0)


def test_flat_gather_gives_the_per_param_gather_s_loss_and_gradients_on_two_ranks(tmp_path, tiny_model_dir,
                                                                                   robo2vlm_dir):
    """2 gloo ranks, each with its own rows: the per-block flat all-gather / reduce-scatter (gather_flat) gives the
    per-param redistribute's loss and gradients bit for bit, full_shard and no_shard, fp32 / bf16+fp32 / bf16
    reduction, with every leaf trained and with frozen leaves (gathered without a reduction), checkpointed."""
    import torch.multiprocessing as mp

    processor = load_processor(tiny_model_dir, min_pixels=56 * 56, max_pixels=56 * 56)
    encoder = Encoder(processor, max_prompt_length=256)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files([str(robo2vlm_dir)], "train"))
    model, _ = model_lib.load_model(tiny_model_dir)
    spec = VisionSpec.from_config(model.config, pad_token_id=processor.tokenizer.pad_token_id)
    batches = [collate_encoded([encoder(source[i]) for i in rows], spec=spec) for rows in ((0, 1), (2, 3))]
    torch.save(batches, tmp_path / "batches.pt")
    out = tmp_path / "result.txt"
    mp.spawn(_flat_gather_worker, args=(2, str(tmp_path / "store"), str(tiny_model_dir),
                                        str(tmp_path / "batches.pt"), str(out)), nprocs=2)
    assert out.read_text() == "ok"
