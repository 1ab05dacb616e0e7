"""The compiled train step: packed vision attention, static shapes, bounded recompiles, equality with eager.

Batches here are synthetic (token ids and random patches for images of chosen grids), so image sizes, sequence
lengths and label counts can be varied freely without the tokenizer or image processor.
"""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from vlm_sft import compile as compile_lib
from vlm_sft import models as model_lib
from vlm_sft.models import common as model_common
from vlm_sft import optim
from vlm_sft import schedules
from vlm_sft import step as step_lib
from vlm_sft import demo
from vlm_sft.data.collate import bucket_length, collate, collate_packed, label_bucket
from vlm_sft.data.vision import VisionSpec, attention_layout
from vlm_sft.state import init_train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD = 151644, 151645, 151652, 151653, 151655


def sequence(rng: torch.Generator, grids: list[tuple[int, int, int]], text: int, answer: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """<|im_start|>, images, `text` prompt tokens, then `answer` label tokens and <|im_end|>."""
    ids = [IM_START]
    for t, h, w in grids:
        ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
    ids += torch.randint(100, 5000, (text,), generator=rng).tolist()
    target = torch.randint(100, 5000, (answer,), generator=rng).tolist() + [IM_END]
    return torch.tensor(ids + target), torch.tensor([-100] * len(ids) + target)


def make_batch(rng: torch.Generator, spec: VisionSpec, rows: list[tuple[list, int, int]], **collate_kwargs
               ) -> dict[str, torch.Tensor]:
    """rows: (image grids, prompt tokens, answer tokens) per sequence."""
    sequences = [sequence(rng, grids, text, answer) for grids, text, answer in rows]
    pixels = [torch.randn(sum(t * h * w for t, h, w in grids), 3 * 2 * 14 * 14, generator=rng)
              for grids, _, _ in rows]
    grids = [torch.tensor(grids, dtype=torch.long).reshape(-1, 3) for grids, _, _ in rows]
    return collate(sequences, pixels, grids, spec, **collate_kwargs)


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model, params = model_lib.load_model(str(tiny_model_dir))
    spec = VisionSpec.from_config(model.config, pad_token_id=151643)
    return model, params, spec


def hf_loss(model: model_lib.Model, batch: dict[str, torch.Tensor], sequences_labels: list[torch.Tensor]
            ) -> torch.Tensor:
    labels = torch.full_like(batch["input_ids"], -100)
    for b, lab in enumerate(sequences_labels):
        labels[b, :len(lab)] = lab
    with torch.no_grad():
        out = model.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                           mm_token_type_ids=(batch["input_ids"] == IMAGE_PAD).int(), labels=labels)
    return out.loss


def test_attention_layout_gathers_each_segment_once():
    layout = attention_layout([3, 1, 4], "w")
    assert layout["w_gather"].tolist() == [[0, 1, 2, 0], [3, 0, 0, 0], [4, 5, 6, 7]]
    assert layout["w_mask"].sum(1).tolist() == [3, 1, 4]
    assert layout["w_scatter"].tolist() == [0, 1, 2, 4, 8, 9, 10, 11]
    assert layout["w_cu_seqlens"].tolist() == [0, 3, 4, 8]
    assert layout["w_cu_seqlens"].dtype == torch.int32
    with pytest.raises(ValueError, match="non-empty"):
        attention_layout([2, 0], "w")


def test_vision_attention_equals_block_diagonal_attention(tiny):
    """Padded per-segment attention == dense attention with a block-diagonal mask, values and gradients."""
    model, params, _ = tiny
    block = model.module.model.visual.blocks[0]
    p = model.block_params(params, "model.visual.blocks.0.")
    lengths = [64, 16, 40, 64, 8]
    n = sum(lengths)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, block.attn.qkv.in_features, generator=g, requires_grad=True)
    angles = torch.randn(n, block.attn.head_dim, generator=g)
    cos, sin = angles.cos(), angles.sin()
    layout = attention_layout(lengths, "w")
    ours = model_common.vision_attention(block, p, x, layout["w_gather"], layout["w_mask"], layout["w_scatter"],
                                         layout["w_cu_seqlens"], cos, sin)

    segments = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    heads = block.attn.num_heads
    qkv = F.linear(x, p["attn.qkv.weight"], p["attn.qkv.bias"]).view(n, 3, heads, -1)
    q, k, v = qkv.unbind(1)
    c, s = cos[:, None], sin[:, None]
    q, k = (t * c + model_common._rotate_half(t) * s for t in (q, k))
    dense = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                           attn_mask=segments[:, None] == segments[None, :])
    reference = F.linear(dense.transpose(0, 1).reshape(n, -1), p["attn.proj.weight"], p["attn.proj.bias"])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    (grad_ours,) = torch.autograd.grad(ours.square().sum(), x)
    (grad_reference,) = torch.autograd.grad(reference.square().sum(), x)
    torch.testing.assert_close(grad_ours, grad_reference, atol=1e-5, rtol=1e-5)


def test_forward_matches_hf_for_images_of_different_sizes(tiny):
    """Windows cut at image borders (partial windows), two images in one row: the HF loss, exactly."""
    model, params, spec = tiny
    g = torch.Generator().manual_seed(1)
    rows = [([(1, 8, 12)], 7, 4), ([(1, 4, 4), (1, 12, 10)], 3, 6), ([(1, 6, 6)], 12, 2)]
    sequences = [sequence(g, grids, text, answer) for grids, text, answer in rows]
    pixels = [torch.randn(sum(t * h * w for t, h, w in grids), 1176, generator=g) for grids, _, _ in rows]
    grids = [torch.tensor(grids) for grids, _, _ in rows]
    batch = collate(sequences, pixels, grids, spec)
    assert batch["window_mask"].sum() < batch["window_mask"].numel()  # some windows are partial
    ours = model_lib.token_nll(model, params, batch).mean()
    torch.testing.assert_close(ours, hf_loss(model, batch, [lab for _, lab in sequences]), atol=2e-5, rtol=2e-5)


def test_length_buckets_and_static_label_count(tiny):
    model, params, spec = tiny
    assert [bucket_length(n, (64, 128), 8) for n in (1, 64, 65, 128, 129, 300)] == [64, 64, 128, 128, 256, 384]
    assert bucket_length(61, (), 8) == 64
    assert [label_bucket(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    g = torch.Generator().manual_seed(2)
    rows = [([(1, 4, 4)], 20, 5), ([(1, 4, 4)], 9, 3)]
    plain = make_batch(g, spec, rows)
    padded = make_batch(torch.Generator().manual_seed(2), spec, rows, length_buckets=(48, 96), pad_labels=True)
    assert padded["input_ids"].shape == (2, 48) and padded["label_ids"].shape == (16,)
    assert padded["label_weight"].tolist() == [1.0] * 10 + [0.0] * 6
    assert padded["attention_mask"].sum() == plain["attention_mask"].sum()
    # sum(w * nll) / sum(w) over the padded labels is the plain token mean: the same loss, RLinf's definition.
    loss_plain = step_lib.token_mean(model_lib.token_nll(model, params, plain), plain)
    loss_padded = step_lib.token_mean(model_lib.token_nll(model, params, padded), padded)
    torch.testing.assert_close(loss_padded, loss_plain, atol=1e-6, rtol=1e-6)
    assert float(step_lib.label_tokens(padded)) == 10.0


def test_model_forward_has_no_graph_breaks(tiny):
    model, params, spec = tiny
    batch = make_batch(torch.Generator().manual_seed(3), spec, [([(1, 8, 8)], 10, 4), ([(1, 4, 6)], 5, 2)],
                       length_buckets=(64,), pad_labels=True)
    explained = torch._dynamo.explain(model_lib.token_nll)(model, params, batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def _optimizer():
    schedule = schedules.make_schedule("constant", peak_lr=1e-3, warmup_steps=0, total_steps=100)
    return optim.adamw(schedule, weight_decay=0.01, max_grad_norm=1.0), schedule


def _steps(model, params, batches, **kwargs):
    tx, schedule = _optimizer()
    state = init_train_state({k: v.clone() for k, v in params.items()}, tx)
    train_step = step_lib.make_train_step(model, tx, schedule, **kwargs)
    losses = []
    for micro_batches in batches:
        state, metrics = train_step(state, micro_batches)
        losses.append(float(metrics["train/loss"]))
    return losses, state


@pytest.mark.slow
def test_compiled_step_equals_eager_without_recompiles(tiny):
    """Regional compile, accumulation of 2 micro-batches: after one warm-up step, a pass over batches of varied
    text lengths (one length bucket), answer lengths, image sizes and image counts compiles nothing, and equals
    eager, with and without activation checkpointing."""
    model, params, spec = tiny
    g = torch.Generator().manual_seed(4)
    sizes = [(1, 4, 4), (1, 8, 12), (1, 6, 10), (1, 10, 8)]

    def micro(i: int, text: int) -> dict[str, torch.Tensor]:
        rows = [([sizes[(i + j) % len(sizes)]] * (1 + i % 2 * j), text + 3 * j, 2 + (i + j) % 5) for j in range(2)]
        return make_batch(g, spec, rows, length_buckets=(128,), pad_labels=True)

    steps = [[micro(i, 5 + 11 * i), micro(i + 1, 60 - 9 * i)] for i in range(5)]
    assert {b["input_ids"].shape[1] for step in steps for b in step} == {128}
    assert len({int(b["attention_mask"].sum()) for step in steps for b in step}) > 6
    assert len({b["pixel_values"].shape[0] for step in steps for b in step}) > 2
    assert len({b["image_grid_thw"].shape[0] for step in steps for b in step}) > 1
    assert len({int(b["label_weight"].sum()) for step in steps for b in step}) > 2

    eager_losses, eager_state = _steps(model, params, steps, compile=False)
    for checkpointing in (False, True):
        counters.clear()
        torch._dynamo.reset()
        tx, schedule = _optimizer()
        state = init_train_state({k: v.clone() for k, v in params.items()}, tx)
        block_call = compile_lib.make_block_call(compile=True, checkpointing=checkpointing)
        train_step = step_lib.make_train_step(model, tx, schedule, compile=True, block_call=block_call)
        state, metrics = train_step(state, steps[0])  # warm-up: compiles every region once
        losses = [float(metrics["train/loss"])]
        graphs = counters["stats"]["unique_graphs"]
        # patch embed, vision block, merger, decoder layer, final norm, lm_head (the embedding runs eagerly)
        assert len(block_call.regions) == 6 and graphs == 6 and counters["graph_break"] == {}
        for micro_batches in steps[1:]:
            state, metrics = train_step(state, micro_batches)
            losses.append(float(metrics["train/loss"]))
        assert counters["stats"]["unique_graphs"] == graphs, "a warm pass recompiled"
        assert counters["graph_break"] == {}
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(eager_losses), atol=1e-5, rtol=0)
        for k in params:  # Adam divides by sqrt(v): a 1e-7 gradient difference can move a param by ~1e-5
            torch.testing.assert_close(state.params[k], eager_state.params[k], atol=1e-4, rtol=1e-4)


def test_compiled_step_needs_a_compiling_block_call(tiny):
    model, _, _ = tiny
    tx, schedule = _optimizer()
    with pytest.raises(ValueError, match="needs a compiling block_call"):
        step_lib.make_train_step(model, tx, schedule, compile=True)


@pytest.mark.slow
def test_deep_model_compiles_each_region_once_and_a_restart_compiles_from_the_cache(tmp_path):
    """Qwen2.5-VL-3B's depth (36 text layers, 32 vision blocks; tiny widths), main.py's path (DTensor params
    gathered per block). Each region compiles once (36 decoder layers: one graph); a second length bucket compiles
    the text regions over the sequence once more and nothing else; images of other sizes and counts nothing. A
    second process with the same cache dir generates no code: every graph comes from the on-disk caches."""
    model_dir = demo.make_tiny_model_dir(tmp_path / "model", text_layers=36, vision_depth=32)
    runs = []
    for name in ("cold", "warm"):
        out = tmp_path / f"{name}.json"
        proc = subprocess.run([sys.executable, os.path.join(REPO, "tests", "compile_worker.py"), str(model_dir),
                               str(tmp_path / "cache"), str(out)], cwd=REPO, capture_output=True, text=True,
                              timeout=2400, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
        assert proc.returncode == 0, proc.stderr[-5000:]
        runs.append(json.loads(out.read_text()))
    cold, warm = runs
    first, second, third = cold
    assert first["graphs"] == {"decoder_block": 1, "vision_block": 1, "apply_module": 2, "patch_embed": 1,
                               "lm_head": 1}
    assert first["regions"] == 6 and first["stats"]["graphs"] == 6  # the embedding runs eagerly (common.embed)
    assert second["stats"]["graphs"] == 0  # other images, texts and answers in the same bucket
    # The new bucket: decoder layer and final norm (the lm_head sees the same label count).
    assert third["graphs"] == {"decoder_block": 2, "vision_block": 1, "apply_module": 3, "patch_embed": 1,
                               "lm_head": 1}
    assert third["stats"]["graphs"] == 2
    assert sum(s["stats"]["fx_misses"] for s in cold) > 0
    for c, w in zip(cold, warm):
        assert w["stats"]["graphs"] == c["stats"]["graphs"]  # dynamo traces again (it has no disk cache) ...
        assert w["stats"]["fx_misses"] == w["stats"]["aot_misses"] == 0  # ... but nothing is compiled afresh
        assert w["stats"]["aot_hits"] == c["stats"]["aot_misses"]
        assert w["loss"] == c["loss"]


@pytest.mark.parametrize("family", ["qwen2.5_vl", "qwen2.5_vl packed", "qwen3_vl_moe"])
def test_compiled_gradients_are_bitwise_repeatable(family, tiny_model_dir, tmp_path):
    """The same compiled loss_and_grad on the same params and batch gives the same gradients to the bit, call
    after call (fp32, every torch thread): what bitwise resume and cross-process equality rest on. Rows repeat a
    few token ids many times, so every embedding row sums many contributions, and the MoE routes each token to 4
    experts (the 30B routes to 8): sums whose order a parallel scatter of atomic adds (inductor's lowering of
    index_put / index_add with accumulation) leaves to the threads' timing. (Qwen3-VL's learned vision position
    table is covered by the MoE model's vision tower. Packed: the rows as one sequence, attention within each.)"""
    model_dir = tiny_model_dir if family.startswith("qwen2.5_vl") else demo.make_tiny_qwen3_vl_moe_dir(
        tmp_path / "moe", num_experts_per_tok=4)
    model, params = model_lib.load_model(str(model_dir))
    spec = model.vision_spec(pad_token_id=151643)
    g = torch.Generator().manual_seed(0)
    rows = []
    for j in range(4):
        ids = [IM_START, VISION_START] + [IMAGE_PAD] * 4 + [VISION_END]
        ids += torch.randint(100, 104, (90,), generator=g).tolist()
        answer = torch.randint(100, 104, (20,), generator=g).tolist() + [IM_END]
        rows.append((torch.tensor(ids + answer), torch.tensor([-100] * len(ids) + answer)))
    pixels = [torch.randn(16, 3 * 2 * spec.patch_size ** 2, generator=g) for _ in rows]
    grids = [torch.tensor([[1, 4, 4]]) for _ in rows]
    if family.endswith("packed"):
        batch = collate_packed(rows, pixels, grids, spec, length=512)
    else:
        batch = collate(rows, pixels, grids, spec, length_buckets=(128,), pad_labels=True)
    loss_and_grad = step_lib.make_loss_and_grad(model, compile_lib.make_block_call(compile=True))
    torch._dynamo.reset()
    with compile_lib.settings():
        runs = [loss_and_grad(params, batch, torch.tensor(1.0)) for _ in range(6)]
    first_loss, first = runs[0]
    for loss, grads in runs[1:]:
        assert torch.equal(loss, first_loss)
        differ = [k for k in first if not torch.equal(grads[k], first[k])]
        assert not differ, f"gradients that changed between identical calls: {differ}"
