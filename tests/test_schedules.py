"""Learning-rate schedules: hand-computed values, python/tensor agreement, and compiled use."""
import math

import pytest
import torch

from vlm_sft import schedules


def reference_cosine(step: int, peak: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The docstring's formula, written independently in plain Python."""
    if step >= total:
        return min_lr
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return min_lr + (peak - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def test_warmup_cosine_hand_computed_values():
    lr = schedules.warmup_cosine(1e-3, warmup_steps=4, total_steps=12)
    assert lr(0) == pytest.approx(0.25e-3)  # the first update already has a non-zero lr
    assert lr(1) == pytest.approx(0.5e-3)
    assert lr(3) == pytest.approx(1e-3)
    assert lr(4) == pytest.approx(1e-3)  # cosine phase starts at the peak
    assert lr(8) == pytest.approx(0.5e-3)  # halfway through the 8 decay steps
    assert lr(11) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 7 / 8)))
    assert lr(12) == 0.0 and lr(1000) == 0.0
    assert isinstance(lr(5), float)


def test_warmup_cosine_min_lr_and_no_warmup():
    lr = schedules.warmup_cosine(2.0, warmup_steps=0, total_steps=10, min_lr=0.5)
    assert lr(0) == pytest.approx(2.0)
    assert lr(5) == pytest.approx(1.25)
    assert lr(10) == pytest.approx(0.5) and lr(50) == pytest.approx(0.5)
    assert all(lr(s) >= 0.5 for s in range(20))


def test_warmup_longer_than_the_run_stays_in_warmup():
    lr = schedules.warmup_cosine(1.0, warmup_steps=200, total_steps=50)
    assert lr(49) == pytest.approx(50 / 200)
    assert lr(50) == 0.0


def test_linear_and_constant_hand_computed_values():
    lin = schedules.linear(1.0, warmup_steps=2, total_steps=6, min_lr=0.2)
    assert [lin(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 0.8, 0.6, 0.4, 0.2])
    const = schedules.constant(0.3, warmup_steps=3)
    assert [const(s) for s in range(5)] == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])
    assert schedules.constant(0.3)(0) == pytest.approx(0.3)


@pytest.mark.parametrize("warmup,total,min_lr", [(0, 30, 0.0), (5, 30, 0.0), (7, 40, 1e-6), (10, 10, 0.0)])
def test_cosine_matches_python_reference(warmup, total, min_lr):
    lr = schedules.warmup_cosine(1e-5, warmup, total, min_lr)
    for step in range(total + 5):
        want = reference_cosine(step, 1e-5, warmup, total, min_lr)
        assert lr(step) == pytest.approx(want, rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("name", schedules.SCHEDULES)
def test_tensor_steps_give_fp32_tensors_equal_to_python(name):
    lr = schedules.make_schedule(name, peak_lr=3e-4, warmup_steps=5, total_steps=25, min_lr=1e-5)
    for step in range(30):
        out = lr(torch.tensor(step, dtype=torch.int64))
        assert isinstance(out, torch.Tensor) and out.dtype == torch.float32 and out.dim() == 0
        assert float(out) == pytest.approx(lr(step), rel=1e-6)


def test_schedule_compiles_fullgraph_without_recompiling_per_step():
    lr = schedules.warmup_cosine(1e-3, warmup_steps=3, total_steps=10)
    compiled = torch.compile(lr, fullgraph=True, backend="aot_eager")
    torch._dynamo.reset()
    values = []
    for step in range(12):
        with torch._dynamo.config.patch(error_on_recompile=step > 0):
            values.append(float(compiled(torch.tensor(step))))
    assert values == pytest.approx([lr(s) for s in range(12)], rel=1e-6, abs=1e-12)


def test_make_schedule_rejects_unknown_names_and_bad_values():
    with pytest.raises(ValueError, match=r"actor\.optim\.lr_scheduler.*'wsd'.*constant, cosine, linear"):
        schedules.make_schedule("wsd", peak_lr=1e-3, warmup_steps=0, total_steps=10, min_lr=0.0)
    with pytest.raises(ValueError, match="lr_warmup_steps"):
        schedules.warmup_cosine(1e-3, warmup_steps=-1, total_steps=10)
    with pytest.raises(ValueError, match="total_training_steps"):
        schedules.linear(1e-3, warmup_steps=0, total_steps=0)
    with pytest.raises(ValueError, match="min_lr"):
        schedules.warmup_cosine(1e-3, warmup_steps=0, total_steps=10, min_lr=1e-2)
