"""The seed's mixed precision (bf16 compute, fp32 reduction and master weights) as the default: which buffers
bf16 may touch, and bf16 training on CPU giving fp32's losses within bf16 tolerance."""
import pytest
import torch

from vlm_sft import models as model_lib
from vlm_sft import sharding
from vlm_sft import main as main_lib
from configs_loader import CONFIG, load_config, override
from test_resume import losses


def test_default_config_computes_in_bf16_and_the_demo_in_fp32():
    import importlib.util
    spec = importlib.util.spec_from_file_location("robo2vlm_config", CONFIG)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    mp = module.get_config("").actor.fsdp_config.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == ("bf16", "fp32", "bf16")
    assert module.get_config("").actor.model.precision == "fp32"  # master weights and Adam state
    mp = module.get_config("demo").actor.fsdp_config.mixed_precision
    assert (mp.param_dtype, mp.reduce_dtype, mp.buffer_dtype) == ("fp32", "fp32", "fp32")


def test_bf16_buffers_leave_rotary_tables_in_fp32(tiny_model_dir):
    device, created = sharding.init_process_group(sharding.ProcessInfo())
    try:
        c = load_config("demo")
        c.actor.fsdp_config.mixed_precision.param_dtype = "bf16"
        c.actor.fsdp_config.mixed_precision.buffer_dtype = "bf16"
        spec = sharding.make_sharding(c, device)
        model, params = model_lib.load_model(str(tiny_model_dir))
        sharding.shard_model(model, params, spec)
        buffers = dict(model.module.named_buffers())
        assert buffers and all(b.dtype == torch.float32 for n, b in buffers.items() if "inv_freq" in n)
        assert sharding.buffer_dtype("scale", torch.ones(2), spec) == torch.bfloat16
        assert sharding.buffer_dtype("count", torch.ones(2, dtype=torch.int64), spec) is None
    finally:
        if created:
            sharding.destroy_process_group()


@pytest.mark.slow
def test_bf16_compute_matches_fp32_losses(tmp_path, tiny_model_dir, robo2vlm_dir):
    """The same 4 steps in fp32 and in the default bf16 compute (fp32 master weights, Adam and reduction)."""
    def run(name, dtype):
        c = load_config("demo")
        override(c, {"runner.logger.log_path": str(tmp_path), "runner.logger.experiment_name": name,
                     "actor.model.model_path": str(tiny_model_dir), "data.train_data_paths": str(robo2vlm_dir),
                     "data.eval_data_paths": "", "runner.max_steps": 4, "runner.log_interval": 1,
                     "actor.optim.lr": 1e-3, "actor.fsdp_config.mixed_precision.param_dtype": dtype,
                     "actor.fsdp_config.mixed_precision.buffer_dtype": dtype})
        main_lib.run(c, "train")
        return losses(tmp_path / name)

    fp32, bf16 = run("fp32", "fp32"), run("bf16", "bf16")
    assert sorted(fp32) == sorted(bf16) == [1, 2, 3, 4]
    assert fp32 != bf16  # bf16 really computed
    for step in fp32:  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, far less after averaging
        assert bf16[step] == pytest.approx(fp32[step], rel=1e-2), (step, fp32, bf16)


def test_cpu_vocabulary_head_of_a_bf16_step_computes_in_fp32():
    """On CPU the logits of a bf16 step are the fp32 matmul of its bf16 hidden states and weight (torch's CPU bf16
    matmul over a 152k vocabulary is ~10-30x slower: bench/lm_head_cpu.py); the gradients come back in bf16. An fp32
    step is unchanged."""
    from vlm_sft.models import common

    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(5, 16, generator=g).bfloat16().requires_grad_()
    weight = torch.randn(300, 16, generator=g).bfloat16().requires_grad_()
    logits = common._lm_head(None, {"weight": weight}, hidden)
    assert logits.dtype == torch.float32
    assert torch.equal(logits, torch.nn.functional.linear(hidden.float(), weight.float()))
    grads = torch.autograd.grad(logits.sum(), [hidden, weight])
    assert [z.dtype for z in grads] == [torch.bfloat16, torch.bfloat16]
    full = common._lm_head(None, {"weight": weight.detach().float()}, hidden.detach().float())
    assert full.dtype == torch.float32 and torch.equal(full, logits)
