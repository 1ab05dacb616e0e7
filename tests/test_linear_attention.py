"""Gated DeltaNet's sequence ops (models/linear_attention.py) against transformers' own torch fallback, and packed
rows (cu_seqlens) against their sequences one at a time."""
import pytest
import torch
import torch.nn.functional as F
from transformers.models.qwen3_5 import modeling_qwen3_5 as hf

from vlm_sft.models import linear_attention


def _inputs(g: torch.Generator, b: int, length: int, hk: int = 2, hv: int = 4, dk: int = 16, dv: int = 8):
    q = torch.randn(b, length, hk, dk, generator=g)
    k = torch.randn(b, length, hk, dk, generator=g)
    v = torch.randn(b, length, hv, dv, generator=g)
    g_ = -F.softplus(torch.randn(b, length, hv, generator=g)) * 0.5
    beta = torch.rand(b, length, hv, generator=g)
    return q, k, v, g_, beta


@pytest.mark.parametrize("length", [5, 64, 150])  # within one chunk, exactly one, across three
def test_delta_rule_equals_transformers_fallback_values_and_grads(length):
    inputs = [t.requires_grad_() for t in _inputs(torch.Generator().manual_seed(length), 2, length)]
    ours = linear_attention.gated_delta_rule(*inputs)
    theirs, _ = hf.torch_chunk_gated_delta_rule(*inputs[:3], g=inputs[3], beta=inputs[4],
                                                use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    cotangent = torch.randn_like(ours)
    for a, b in zip(torch.autograd.grad(ours, inputs, cotangent), torch.autograd.grad(theirs, inputs, cotangent)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_delta_rule_equals_the_token_by_token_recurrence():
    """The chunked form is the recurrence S = exp(g) S + k (beta (v - S^T k))^T, o = S^T q (transformers' own
    recurrent fallback), so the chunk algebra itself is checked, not only copied."""
    inputs = _inputs(torch.Generator().manual_seed(7), 1, 70)
    theirs, _ = hf.torch_recurrent_gated_delta_rule(*inputs[:3], g=inputs[3], beta=inputs[4],
                                                    use_qk_l2norm_in_kernel=True)
    torch.testing.assert_close(linear_attention.gated_delta_rule(*inputs), theirs, rtol=1e-4, atol=1e-5)


def test_conv_equals_transformers_fallback():
    g = torch.Generator().manual_seed(1)
    x, w = torch.randn(2, 11, 6, generator=g), torch.randn(6, 4, generator=g)
    theirs = hf.causal_conv1d_fn(x.transpose(1, 2), w, None, activation="silu").transpose(1, 2)
    torch.testing.assert_close(linear_attention.causal_conv1d(x, w), theirs, rtol=1e-6, atol=1e-6)


def test_packed_row_equals_its_sequences_one_at_a_time():
    """cu_seqlens restarts the conv window and the recurrent state at each boundary (a sequence shorter than the
    conv window included); without it, the earlier sequences would leak into the later ones."""
    lengths = [70, 2, 9, 40]
    cu = torch.tensor([0] + torch.cumsum(torch.tensor(lengths), 0).tolist(), dtype=torch.int32)
    rows = list(zip(cu.tolist()[:-1], cu.tolist()[1:]))
    cu = torch.cat([cu, cu[-1:].repeat(3)])  # trailing repeats, as the packing collate pads it: empty sequences
    g = torch.Generator().manual_seed(3)
    q, k, v, g_, beta = _inputs(g, 1, sum(lengths))
    x, w = torch.randn(1, sum(lengths), 6, generator=g), torch.randn(6, 4, generator=g)
    conv_rows = torch.cat([linear_attention.causal_conv1d(x[:, s:e], w) for s, e in rows], dim=1)
    torch.testing.assert_close(linear_attention.causal_conv1d(x, w, cu), conv_rows, rtol=1e-6, atol=1e-6)
    rule_rows = torch.cat([linear_attention.gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], g_[:, s:e],
                                                             beta[:, s:e]) for s, e in rows], dim=1)
    torch.testing.assert_close(linear_attention.gated_delta_rule(q, k, v, g_, beta, cu), rule_rows)
    assert not torch.allclose(linear_attention.gated_delta_rule(q, k, v, g_, beta), rule_rows, atol=1e-3)
    assert not torch.allclose(linear_attention.causal_conv1d(x, w), conv_rows, atol=1e-3)


def test_kernels_only_on_cuda(monkeypatch):
    assert linear_attention.kernel_path(torch.device("cpu")) == {"conv": False, "delta_rule": False}
    monkeypatch.setattr(linear_attention, "_fla_chunk_gated_delta_rule", lambda: (lambda *a, **k: None))
    monkeypatch.setattr(linear_attention, "_causal_conv1d_fn", lambda: None)
    assert linear_attention.kernel_path(torch.device("cuda")) == {"conv": False, "delta_rule": True}
    assert linear_attention.kernel_path(torch.device("cpu")) == {"conv": False, "delta_rule": False}
    # A CPU tensor never reaches a kernel, installed or not.
    q, k, v, g_, beta = _inputs(torch.Generator().manual_seed(4), 1, 8)
    assert linear_attention.gated_delta_rule(q, k, v, g_, beta).shape == v.shape
