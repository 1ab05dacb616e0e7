"""Checkpoints of a real TrainState (params + AdamW state): bitwise round trips, atomic saves, auto resume,
pruning, async saves, clear errors for bad checkpoints, and resharding between 2 ranks and 1."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.multiprocessing as mp
import torch.utils._pytree as pytree

from vlm_sft import checkpoint, optim, schedules, sharding
from vlm_sft.state import TrainState, init_train_state

SHAPES = {
    "model.language_model.embed_tokens.weight": (10, 4),
    "model.language_model.layers.0.mlp.up_proj.weight": (5, 4),  # 5 rows: uneven over 2 ranks
    "model.visual.merger.mlp.0.bias": (6,),
    "model.language_model.norm.weight": (4,),
}
CONFIG_JSON = json.dumps({"actor": {"seed": 1}})


def make_tx():
    return optim.adamw(schedules.warmup_cosine(1e-2, 2, 10), weight_decay=0.01, max_grad_norm=1.0)


def make_state(seed: int = 0, steps: int = 2, shapes: dict = SHAPES) -> TrainState:
    """A TrainState after `steps` AdamW updates with random gradients (so every moment is non-zero)."""
    g = torch.Generator().manual_seed(seed)
    params = {k: torch.randn(shape, generator=g) for k, shape in shapes.items()}
    tx = make_tx()
    state = init_train_state(params, tx)
    for _ in range(steps):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        state = TrainState(state.step + 1, optim.apply_updates(state.params, updates, donate=False), opt_state)
    return state


def assert_bitwise_equal(a: TrainState, b: TrainState) -> None:
    names = checkpoint.flatten(a)
    other = checkpoint.flatten(b)
    assert list(names) == list(other)
    for name, x in names.items():
        y = other[name]
        assert x.dtype == y.dtype and x.shape == y.shape, name
        assert torch.equal(x, y), name


def save(root, state, position=None, **kwargs):
    saver = checkpoint.Checkpointer(str(root), **kwargs)
    return saver.save(state, data_position=position or {"epoch": 0, "offset": 32}, config_json=CONFIG_JSON)


def test_round_trip_is_bitwise_and_keeps_data_position_and_rng(tmp_path):
    state = make_state()
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    path = save(tmp_path, state, {"epoch": 1, "offset": 48})

    assert path == str(tmp_path / "step_2")
    assert sorted(os.listdir(tmp_path)) == ["step_2"]
    files = set(os.listdir(path))
    assert {".metadata", "meta.json", "config.json", "rng_rank0.pt"} <= files
    meta = checkpoint.check_complete(path)
    assert meta["step"] == 2 and meta["world_size"] == 1
    assert meta["data_position"] == {"epoch": 1, "offset": 48}
    assert open(os.path.join(path, "config.json")).read() == CONFIG_JSON

    torch.rand(7)  # move the RNG on; restore_rng must bring it back
    restored = checkpoint.restore(path, make_state(seed=9, steps=0))
    checkpoint.restore_rng(path)
    assert_bitwise_equal(restored, state)
    assert int(restored.step) == 2 and int(restored.opt_state[1].count) == 2
    assert torch.equal(torch.rand(3), expected_draw)


def test_restore_params_reads_params_alone(tmp_path):
    state = make_state()
    path = save(tmp_path, state)
    params = {k: torch.zeros(shape) for k, shape in SHAPES.items()}
    loaded = checkpoint.restore_params(path, params)
    assert list(loaded) == list(SHAPES)
    for k in SHAPES:
        assert torch.equal(loaded[k], state.params[k])


def test_auto_picks_newest_complete_checkpoint(tmp_path):
    saver = checkpoint.Checkpointer(str(tmp_path), keep_last_n=0)
    for steps in (1, 2):
        saver.save(make_state(steps=steps), data_position={"epoch": 0, "offset": 0}, config_json=CONFIG_JSON)
    # Leftovers of crashed saves: a temporary directory, and a step_<N> without meta.json.
    os.makedirs(tmp_path / "step_3.tmp-abc")
    os.makedirs(tmp_path / "step_4")
    (tmp_path / "step_4" / ".metadata").write_bytes(b"")
    assert checkpoint.latest(str(tmp_path)) == str(tmp_path / "step_2")
    assert checkpoint.resolve_resume("auto", str(tmp_path)) == str(tmp_path / "step_2")
    assert checkpoint.resolve_resume("", str(tmp_path)) is None
    assert checkpoint.resolve_resume("auto", str(tmp_path / "nothing_here")) is None


def test_keep_last_n_removes_older_checkpoints_and_crash_leftovers(tmp_path):
    saver = checkpoint.Checkpointer(str(tmp_path), keep_last_n=2)
    os.makedirs(tmp_path / "step_2.tmp-deadbeef")  # a crashed save
    for steps in range(1, 5):
        saver.save(make_state(steps=steps), data_position={"epoch": 0, "offset": 0}, config_json=CONFIG_JSON)
    assert sorted(os.listdir(tmp_path)) == ["step_3", "step_4"]
    with pytest.raises(ValueError, match="runner.keep_last_n"):
        checkpoint.Checkpointer(str(tmp_path), keep_last_n=-1)


def test_saving_a_step_again_replaces_it(tmp_path):
    save(tmp_path, make_state(seed=0))
    new = make_state(seed=1)
    path = save(tmp_path, new)
    assert sorted(os.listdir(tmp_path)) == ["step_2"]
    assert_bitwise_equal(checkpoint.restore(path, make_state(seed=5, steps=0)), new)


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # raised in DCP's writer thread
def test_async_save_snapshots_the_state_before_returning(tmp_path):
    state = make_state()
    expected = pytree.tree_map(torch.clone, state)
    saver = checkpoint.Checkpointer(str(tmp_path), async_save=True)
    path = saver.save(state, data_position={"epoch": 0, "offset": 16}, config_json=CONFIG_JSON)
    for leaf in pytree.tree_leaves(state):  # the next step donates (overwrites) the state's buffers
        leaf.zero_()
    assert not os.path.exists(path)  # committed by poll()/wait() in the training thread, not behind its back
    saver.wait()
    assert checkpoint.latest(str(tmp_path)) == path
    assert_bitwise_equal(checkpoint.restore(path, make_state(seed=3, steps=0)), expected)


def test_incomplete_checkpoint_names_what_is_missing(tmp_path):
    path = save(tmp_path, make_state())
    template = make_state(steps=0)
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint directory"):
        checkpoint.restore(str(tmp_path / "step_9"), template)

    os.remove(os.path.join(path, "rng_rank0.pt"))
    with pytest.raises(checkpoint.CheckpointError, match="rng_rank0.pt is missing"):
        checkpoint.resolve_resume(path, str(tmp_path))

    shard = next(f for f in os.listdir(path) if f.endswith(".distcp"))
    with open(os.path.join(path, shard), "r+b") as f:
        f.truncate(10)
    with pytest.raises(checkpoint.CheckpointError, match=f"shard file {shard} is truncated"):
        checkpoint.check_complete(path)
    os.remove(os.path.join(path, shard))
    with pytest.raises(checkpoint.CheckpointError, match=f"shard file {shard} is missing"):
        checkpoint.check_complete(path)

    os.remove(os.path.join(path, ".metadata"))
    with pytest.raises(checkpoint.CheckpointError, match="no .metadata"):
        checkpoint.check_complete(path)
    os.remove(os.path.join(path, "meta.json"))
    with pytest.raises(checkpoint.CheckpointError, match=r"runner.resume: .*step_2: not a complete checkpoint: "
                                                         r"no meta.json"):
        checkpoint.resolve_resume(path, str(tmp_path))
    assert checkpoint.latest(str(tmp_path)) is None


def test_checkpoint_of_a_different_model_names_the_first_mismatching_tensor(tmp_path):
    path = save(tmp_path, make_state())
    wider = dict(SHAPES, **{"model.language_model.layers.0.mlp.up_proj.weight": (5, 8)})
    with pytest.raises(checkpoint.CheckpointError,
                       match=r"tensor \"params\['model.language_model.layers.0.mlp.up_proj.weight'\]\" has shape "
                             r"\[5, 4\] in the checkpoint but \[5, 8\] in the model"):
        checkpoint.restore(path, make_state(steps=0, shapes=wider))
    fewer = {k: v for k, v in SHAPES.items() if k != "model.language_model.norm.weight"}
    with pytest.raises(checkpoint.CheckpointError, match=r"checkpoint has tensor \"params\['model.language_model"
                                                         r".norm.weight'\]\" that the model/optimizer lacks"):
        checkpoint.restore(path, make_state(steps=0, shapes=fewer))
    more = dict(SHAPES, **{"lm_head.weight": (10, 4)})
    with pytest.raises(checkpoint.CheckpointError, match=r"no tensor \"params\['lm_head.weight'\]\""):
        checkpoint.restore(path, make_state(steps=0, shapes=more))
    bf16 = pytree.tree_map(lambda t: t.bfloat16() if t.is_floating_point() else t, make_state(steps=0))
    with pytest.raises(checkpoint.CheckpointError, match="torch.float32 in the checkpoint but torch.bfloat16"):
        checkpoint.restore(path, bf16)


_CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch.distributed.checkpoint as dcp
    sys.path.insert(0, {tests!r})
    from test_checkpoint import CONFIG_JSON, make_state
    from vlm_sft import checkpoint

    saver = checkpoint.Checkpointer({root!r})
    saver.save(make_state(steps=1), data_position={{"epoch": 0, "offset": 16}}, config_json=CONFIG_JSON)
    write_data = dcp.FileSystemWriter.write_data

    def write_then_die(self, plan, planner):
        result = write_data(self, plan, planner)
        result.wait()  # the shard is on disk; the index (.metadata) and meta.json are not
        os.kill(os.getpid(), signal.SIGKILL)

    dcp.FileSystemWriter.write_data = write_then_die
    saver.save(make_state(steps=2), data_position={{"epoch": 0, "offset": 32}}, config_json=CONFIG_JSON)
""")


def test_crash_inside_the_writer_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    script = _CRASH_SCRIPT.format(tests=os.path.dirname(__file__), root=str(root))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr[-2000:]
    names = sorted(os.listdir(root))
    assert names[0] == "step_1" and len(names) == 2 and names[1].startswith("step_2.tmp-"), names
    assert any(f.endswith(".distcp") for f in os.listdir(root / names[1]))  # it died mid-save, not before

    path = checkpoint.resolve_resume("auto", str(root))
    assert path == str(root / "step_1")
    assert_bitwise_equal(checkpoint.restore(path, make_state(seed=4, steps=0)), make_state(steps=1))
    assert checkpoint.read_meta(path)["data_position"] == {"epoch": 0, "offset": 16}


# Two gloo ranks with Shard(0) DTensor params and moments <-> one process with plain tensors. -------------------

def _dtensor_state(mesh, state: TrainState) -> TrainState:
    from torch.distributed.tensor import Shard, distribute_tensor

    params = {k: distribute_tensor(v.clone(), mesh, [Shard(0)]) for k, v in state.params.items()}
    tx = make_tx()
    opt_state = tx.init(params)  # moments are DTensors like the params; counters plain
    sharded = TrainState(state.step.clone(), params, opt_state)
    flat_plain = checkpoint.flatten(state)
    flat = checkpoint.flatten(sharded)
    for name, leaf in flat.items():  # copy the plain state's values into the sharded structure
        src = flat_plain[name]
        with torch.no_grad():
            if hasattr(leaf, "to_local"):
                leaf.to_local().copy_(distribute_tensor(src, mesh, [Shard(0)]).to_local())
            else:
                leaf.copy_(src)
    return sharded


def _two_rank_worker(rank: int, store: str, root: str, mode: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        if mode == "save":
            torch.manual_seed(100 + rank)
            saver = checkpoint.Checkpointer(root)
            saver.save(_dtensor_state(mesh, make_state()), data_position={"epoch": 0, "offset": 32},
                       config_json=CONFIG_JSON)
        else:  # load a 1-rank checkpoint into Shard(0) DTensors
            template = _dtensor_state(mesh, make_state(seed=7, steps=0))
            path = checkpoint.latest(root)
            restored = checkpoint.restore(path, template)
            checkpoint.restore_rng(path)  # rank 1 has no saved RNG: keeps its own, with a warning
            expected = checkpoint.flatten(make_state())
            for name, leaf in checkpoint.flatten(restored).items():
                if isinstance(leaf, DTensor):
                    assert leaf.placements == (Shard(0),), name
                    leaf = leaf.full_tensor()
                assert torch.equal(leaf, expected[name]), name
        dist.barrier()  # neither rank tears gloo down while the other still talks to it
    finally:
        dist.destroy_process_group()
    sharding.exit_process(0)  # not interpreter finalization: gloo's threads can abort it (see its docstring)


def test_checkpoint_saved_on_two_ranks_resumes_on_one(tmp_path):
    root = str(tmp_path / "checkpoints")
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), root, "save"), nprocs=2)
    path = checkpoint.latest(root)
    assert path is not None and checkpoint.read_meta(path)["world_size"] == 2
    assert {"rng_rank0.pt", "rng_rank1.pt"} <= set(os.listdir(path))
    assert sum(f.endswith(".distcp") for f in os.listdir(path)) == 2  # each rank wrote its own shards
    assert_bitwise_equal(checkpoint.restore(path, make_state(seed=8, steps=0)), make_state())
    checkpoint.restore_rng(path)
    assert torch.equal(torch.get_rng_state(), torch.load(os.path.join(path, "rng_rank0.pt"))["cpu"])


def test_checkpoint_saved_on_one_rank_resumes_on_two(tmp_path):
    root = str(tmp_path / "checkpoints")
    save(root, make_state())
    mp.spawn(_two_rank_worker, args=(str(tmp_path / "store"), root, "load"), nprocs=2)
