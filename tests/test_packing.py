"""Packed micro-batches: several rows in one sequence, attention kept within each row, positions restarting per
row, against the same rows unpacked and against transformers' own forward of each row alone."""
import pytest
import torch
import torch._dynamo.testing
import torch.nn.functional as F

from vlm_sft import models as model_lib
from vlm_sft import step as step_lib
from vlm_sft.data import packing, robo2vlm
from vlm_sft.data.collate import collate, collate_encoded, collate_encoded_packed, collate_packed
from vlm_sft.data.encode import Encoder
from vlm_sft.data.loader import TrainLoader, epoch_order
from vlm_sft.data.processor import load_processor
from vlm_sft.data.robo2vlm import RowError
from vlm_sft.state import init_train_state
from configs_loader import load_config
from vlm_sft.data.vision import mrope_position_ids
from vlm_sft.models import attention, common

IM_START, IM_END = 151644, 151645  # any ids in every family's vocabulary (the vision ones come from the config)
FAMILIES = ["tiny_model_dir", "tiny_qwen3_vl_dir", "tiny_qwen3_5_dir", "tiny_qwen3_5_moe_dir"]
# Rows of very different lengths: several images (non-square grids), one image, text only, a long text row.
ROWS = [([(1, 4, 6), (1, 6, 4)], 5), ([(1, 2, 8)], 3), ([], 40), ([(1, 8, 2), (1, 4, 4), (1, 2, 6)], 7), ([], 4)]


def make_rows(model: model_lib.Model, seed: int = 0, rows=ROWS):
    """(sequences, pixels, grids) of synthetic rows: image blocks, random text, a labelled answer."""
    v = model.config.vision_config
    channels = getattr(v, "in_channels", None) or v.in_chans
    patch_dim = channels * v.temporal_patch_size * v.patch_size ** 2
    c = model.config  # the family's vision token ids (Qwen3.5's are not Qwen2.5's)
    vision_start, image_pad, vision_end = c.vision_start_token_id, c.image_token_id, c.vision_end_token_id
    g = torch.Generator().manual_seed(seed)
    sequences, pixels, grids = [], [], []
    for images, text in rows:
        ids, row_pixels = [IM_START], []
        for t, h, w in images:
            ids += [vision_start] + [image_pad] * (t * h * w // 4) + [vision_end]
            row_pixels.append(torch.randn(t * h * w, patch_dim, generator=g))
        ids += torch.randint(100, 900, (text,), generator=g).tolist()
        target = torch.randint(100, 900, (3,), generator=g).tolist() + [IM_END]
        sequences.append((torch.tensor(ids + target), torch.tensor([-100] * len(ids) + target)))
        pixels.append(torch.cat(row_pixels) if row_pixels else torch.zeros(0, patch_dim))
        grids.append(torch.tensor(images, dtype=torch.long).reshape(-1, 3))
    return sequences, pixels, grids


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model, params = model_lib.load_model(str(request.getfixturevalue(request.param)))
    spec = model.vision_spec(pad_token_id=151643)
    return model, {k: v.float() for k, v in params.items()}, spec


def nll_and_grads(model, params, batch, weight=None):
    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    nll = model_lib.token_nll(model, leaves, batch)
    w = batch.get("label_weight", torch.ones_like(nll))
    grads = torch.autograd.grad((nll * w).sum(), list(leaves.values()), materialize_grads=True)
    return nll[w > 0].detach(), dict(zip(leaves, grads))


def test_packed_equals_unpacked_loss_and_every_gradient(family):
    """The rows packed into one sequence whose length is exactly their total (no padding: a batch at its budget)
    and padded further, against the same rows as a padded batch: every token's NLL and every gradient."""
    model, params, spec = family
    sequences, pixels, grids = make_rows(model)
    total = sum(len(ids) for ids, _ in sequences)
    ref_nll, ref_grads = nll_and_grads(model, params, collate(sequences, pixels, grids, spec))
    for length in (total, total + 37):
        packed = collate_packed(sequences, pixels, grids, spec, length=length)
        assert packed["input_ids"].shape == (1, length)
        nll, grads = nll_and_grads(model, params, packed)
        torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
        for name, g in ref_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-5, msg=name)


def test_changing_one_row_leaves_the_other_rows_unchanged(family):
    model, params, spec = family
    sequences, pixels, grids = make_rows(model)
    length = sum(len(ids) for ids, _ in sequences) + 8
    before = collate_packed(sequences, pixels, grids, spec, length=length)
    changed = list(sequences)
    ids, labels = changed[1]
    ids = ids.clone()
    ids[-6] = (ids[-6] + 17) % 900 + 100  # a text token of row 1
    changed[1] = (ids, labels)
    after = collate_packed(changed, pixels, grids, spec, length=length)
    with torch.no_grad():
        a = model_lib.token_nll(model, params, before)
        b = model_lib.token_nll(model, params, after)
    rows = before["label_row"][before["label_weight"] > 0]
    a, b = a[before["label_weight"] > 0], b[before["label_weight"] > 0]
    assert not torch.allclose(a[rows == 1], b[rows == 1])  # the change reaches its own row
    torch.testing.assert_close(a[rows != 1], b[rows != 1], rtol=0, atol=0)


def test_packed_positions_restart_per_row(family):
    model, _, spec = family
    sequences, pixels, grids = make_rows(model)
    packed = collate_packed(sequences, pixels, grids, spec, length=400)
    start = 0
    for (ids, _), grid in zip(sequences, grids):
        n = len(ids)
        assert torch.equal(packed["position_ids"][:, 0, start:start + n], mrope_position_ids(ids, grid, spec))
        assert (packed["row_ids"][0, start:start + n] == packed["row_ids"][0, start]).all()
        start += n
    ends = torch.cumsum(torch.tensor([len(i) for i, _ in sequences]), 0).tolist()
    assert packed["cu_seqlens"].tolist() == [0, *ends, 400] + [400] * (len(packed["cu_seqlens"]) - len(ends) - 2)


@pytest.mark.parametrize("fixture", FAMILIES)
def test_packed_rows_equal_transformers_forward_of_each_row_alone(fixture, request):
    """The CPU reference attention and per-row M-RoPE positions against transformers' sdpa forward of each row
    on its own (its own get_rope_index, its own causal mask)."""
    path = str(request.getfixturevalue(fixture))
    model, params = model_lib.load_model(path)
    params = {k: v.float() for k, v in params.items()}
    spec = model.vision_spec(pad_token_id=151643)
    sequences, pixels, grids = make_rows(model, seed=3)
    packed = collate_packed(sequences, pixels, grids, spec, length=512)
    with torch.no_grad():
        ours = model_lib.token_nll(model, params, packed)[packed["label_weight"] > 0]
    hf = model.family.hf_class().from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa")
    hf.eval()
    theirs = []
    for (ids, labels), pix, grid in zip(sequences, pixels, grids):
        images = {"pixel_values": pix, "image_grid_thw": grid} if len(grid) else {}
        with torch.no_grad():
            logits = hf(input_ids=ids[None], attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                        mm_token_type_ids=(ids[None] == model.config.image_token_id).int(), **images).logits[0]
        keep = labels[1:] != -100
        theirs.append(F.cross_entropy(logits[:-1][keep].float(), labels[1:][keep], reduction="none"))
    torch.testing.assert_close(ours, torch.cat(theirs), rtol=1e-5, atol=1e-5)


def test_cuda_half_precision_takes_the_varlen_kernel():
    assert attention.attention_impl(torch.device("cuda", 0), torch.bfloat16) == "varlen"
    assert attention.attention_impl(torch.device("cuda", 0), torch.float16) == "varlen"
    assert attention.attention_impl(torch.device("cuda", 0), torch.float32) == "reference"  # flash has no fp32
    assert attention.attention_impl(torch.device("cpu"), torch.bfloat16) == "reference"


def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False):
    """torch's varlen_attn contract, on any device: attention within each [cu[i], cu[i+1]) segment."""
    assert cu_q.dtype == torch.int32 and torch.equal(cu_q, cu_k) and window_size in ((-1, -1), (-1, 0))
    bounds = cu_q.tolist()
    assert max_q >= max(b - a for a, b in zip(bounds, bounds[1:]))
    out = torch.zeros_like(q)
    for a, b in zip(bounds, bounds[1:]):
        if b > a:
            seg = [t[a:b].transpose(0, 1) for t in (q, k, v)]
            out[a:b] = F.scaled_dot_product_attention(*seg, is_causal=window_size == (-1, 0), scale=scale,
                                                      enable_gqa=enable_gqa).transpose(0, 1)
    return out


@pytest.mark.parametrize("op", ["cpu", "recomputed"])
@pytest.mark.parametrize("causal", [True, False])
def test_reference_segment_attention_equals_attention_per_segment_compiled_or_not(causal, op):
    """The path off the flash kernel (segments gathered into padded rows, one sdpa) against sdpa over each segment
    alone, values and gradients, eager and inside a static-shaped compiled graph; new bounds of the same shape do
    not recompile (the op reads them when it runs). GQA heads, a one-token segment, trailing empty segments. "cpu":
    the op segment_attention takes on CPU (saved logsumexp, the CPU flash backward called directly); "recomputed":
    the one it takes elsewhere (forward recomputed under vjp), run here on CPU."""
    g = torch.Generator().manual_seed(0)
    t = 40
    q = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(t, 2, 8, generator=g, dtype=torch.float64) for _ in range(2))
    grad = torch.randn(t, 4, 8, generator=g, dtype=torch.float64)
    layouts = [torch.tensor(b, dtype=torch.int32) for b in ([0, 5, 22, 23, 40, 40, 40, 40],
                                                              [0, 12, 13, 30, 33, 38, 40, 40])]

    def attend(q, k, v, cu):
        if op == "cpu":
            return attention.segment_attention(q, k, v, cu, t, causal=causal, scale=0.3, impl="reference")
        return attention.recomputed_segment_attention(q, k, v, cu, causal, 0.3)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(attend, fullgraph=True, dynamic=False, backend=counter)
    for cu in layouts:
        leaves = [z.detach().requires_grad_() for z in (q, k, v)]
        want = fake_varlen(*leaves, cu, cu, t, t, scale=0.3, window_size=(-1, 0) if causal else (-1, -1),
                           enable_gqa=True)
        want_grads = torch.autograd.grad(want, leaves, grad)
        for fn in (attend, compiled):
            leaves = [z.detach().requires_grad_() for z in (q, k, v)]
            out = fn(*leaves, cu)
            if fn is attend:  # the op segment_attention dispatched to, by its backward's name
                assert f"{op}_segment_attention".replace("recomputed", "reference") in out.grad_fn.name()
            torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
            for got, expected in zip(torch.autograd.grad(out, leaves, grad), want_grads):
                torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
    with pytest.raises(ValueError, match="cu_seqlens must run from 0 to the 40 packed positions"):
        attend(q, k, v, torch.tensor([0, 5, 30], dtype=torch.int32))


def test_cpu_segment_attention_in_half_precision_computes_in_fp32():
    """bf16 q/k/v on CPU: the output is the fp32 computation rounded to bf16 (bitwise), the gradients come back
    in bf16 and match fp32 attention to bf16's precision (the CPU flash backward is ~9x slower in bf16)."""
    g = torch.Generator().manual_seed(1)
    t = 64
    cu = torch.tensor([0, 20, 21, 64, 64], dtype=torch.int32)
    q = torch.randn(t, 4, 16, generator=g).bfloat16()
    k, v = (torch.randn(t, 2, 16, generator=g).bfloat16() for _ in range(2))
    grad = torch.randn(t, 4, 16, generator=g).bfloat16()
    half = [z.detach().requires_grad_() for z in (q, k, v)]
    full = [z.detach().float().requires_grad_() for z in (q, k, v)]
    out = attention.segment_attention(*half, cu, t, causal=True, impl="reference")
    want = attention.segment_attention(*full, cu, t, causal=True, impl="reference")
    assert out.dtype == torch.bfloat16 and torch.equal(out, want.bfloat16())
    got = torch.autograd.grad(out, half, grad)
    for g_half, g_full in zip(got, torch.autograd.grad(want, full, grad.float())):
        assert g_half.dtype == torch.bfloat16 and torch.isfinite(g_half).all()
        torch.testing.assert_close(g_half.float(), g_full, rtol=2e-2, atol=2e-2)


def test_varlen_path_equals_the_reference(family, monkeypatch):
    """The CUDA branch (text layers and vision blocks) as it calls the kernel, run on CPU with a kernel that
    keeps varlen_attn's contract: equal to the reference path."""
    model, params, spec = family
    sequences, pixels, grids = make_rows(model, seed=5)
    packed = collate_packed(sequences, pixels, grids, spec, length=300)
    with torch.no_grad():
        reference = model_lib.token_nll(model, params, packed)
        monkeypatch.setattr(attention, "varlen_attn", fake_varlen)
        monkeypatch.setattr(common, "attention_impl", lambda device, dtype: "varlen")
        varlen = model_lib.token_nll(model, params, packed)
    torch.testing.assert_close(varlen, reference, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Packing rows into micro-batches (data/packing.py, the loader) and the loss normalization (step.py).

def test_pack_rows_fits_the_budget_and_keeps_every_row_once():
    lengths = [5, 10, 3, 10, 2, 7, 1, 9]
    groups = packing.pack_rows(lengths, 10)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in g) <= 10 for g in groups)
    assert [1] in groups and [3] in groups  # rows exactly at the budget are alone
    assert len(groups) == 5 == -(-sum(lengths) // 10)  # as few as the tokens allow here
    assert groups == packing.pack_rows(lengths, 10)
    with pytest.raises(ValueError, match="11 tokens exceeds the budget of 10"):
        packing.pack_rows([3, 11], 10)


def test_packed_length_takes_a_budget_bucket():
    buckets = packing.budget_buckets(1024, [128, 256, 512, 1024, 2048])
    assert buckets == tuple(range(64, 1025, 64))
    assert packing.budget_buckets(16384, [128, 256, 512, 1024, 2048]) == (128, 256, 512, *range(1024, 16385, 1024))
    assert [packing.padded_length(n, 1024, buckets) for n in (1, 64, 65, 824, 1024)] == [64, 64, 128, 832, 1024]
    assert packing.budget_buckets(1000, [128])[-2:] == (960, 1000)
    assert packing.padded_length(13, 1000, ()) == 16 and packing.padded_length(999, 1000, ()) == 1000


@pytest.fixture(scope="module")
def rows(robo2vlm_dir, tiny_model_dir):
    processor = load_processor(str(tiny_model_dir), min_pixels=56 * 56, max_pixels=56 * 56 * 4)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files(str(robo2vlm_dir), "train"))
    model, params = model_lib.load_model(str(tiny_model_dir))
    return source, Encoder(processor, max_prompt_length=512), model, params, model.vision_spec(
        processor.tokenizer.pad_token_id)


def packed_loader(rows, budget, **kwargs):
    source, encoder, _, _, spec = rows
    return TrainLoader(source, encoder, packing.make_packed_collate(spec, budget), global_batch_size=16,
                       micro_batch_size=1, max_tokens=budget, **kwargs)


def test_loader_packs_each_rank_share_and_resumes_exactly(rows):
    source, encoder, _, _, spec = rows
    lengths = [len(encoder(source[i]).input_ids) for i in range(len(source))]
    budget = max(lengths) + 40
    loader = packed_loader(rows, budget)
    it = iter(loader)
    first, second = next(it), next(it)
    assert len(first.micro_batches) < 16
    for b in first.micro_batches:
        assert b["input_ids"].shape[0] == 1 and b["input_ids"].shape[1] <= budget
    real = sum(int(b["attention_mask"].sum()) for b in first.micro_batches)
    order = epoch_order(len(source), seed=0, epoch=0, shuffle=True)
    assert real == sum(lengths[i] for i in order[:16])  # every row of the global batch, once
    resumed = next(iter(packed_loader(rows, budget, position=first.position)))
    assert len(resumed.micro_batches) == len(second.micro_batches)
    for a, b in zip(resumed.micro_batches, second.micro_batches):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # Two ranks: each packs its own half; together exactly the rows one rank packs.
    halves = [next(iter(packed_loader(rows, budget, world_size=2, rank=r))) for r in range(2)]
    assert sum(int(b["attention_mask"].sum()) for h in halves for b in h.micro_batches) == real


def test_a_row_over_the_budget_is_a_bad_row(rows):
    source, encoder, _, _, _ = rows
    lengths = [len(encoder(source[i]).input_ids) for i in range(len(source))]
    order = epoch_order(len(source), seed=0, epoch=0, shuffle=True)[:16]
    longest = max(order, key=lambda i: lengths[i])
    budget = lengths[longest] - 1
    with pytest.raises(RowError, match=rf"{source.source_of(longest)}: {lengths[longest]} tokens .* exceed "
                                       rf"actor.max_tokens_per_micro_batch={budget}"):
        next(iter(packed_loader(rows, budget)))
    batch = next(iter(packed_loader(rows, budget, bad_rows="skip")))
    over = [i for i in order if lengths[i] > budget]
    assert batch.num_skipped == len(over) and source.source_of(longest) in batch.skipped_sources


def test_token_normalization_makes_the_step_independent_of_the_packing(rows):
    """One step on the same 8 rows: packed whole, packed unevenly, unpacked in micro-batches of 1 and of 4 rows,
    loss_normalization=tokens: the same loss and gradient norm (the gradient is the global token mean). RLinf's
    micro_batch normalization depends on how rows are grouped."""
    source, encoder, model, params, spec = rows
    examples = [encoder(source[i]) for i in range(8)]

    def packed(group):
        return collate_encoded_packed(group, spec, length=sum(len(e.input_ids) for e in group))

    groupings = {
        "packed": [packed(examples)],
        "uneven": [packed(examples[:1]), packed(examples[1:3]), packed(examples[3:])],
        "rows_of_1": [collate_encoded(examples[i:i + 1], spec) for i in range(8)],
        "rows_of_4": [collate_encoded(examples[i:i + 4], spec, pad_labels=True) for i in range(0, 8, 4)],
    }
    config = load_config("demo")
    results = {}
    for norm, name in [("tokens", name) for name in groupings] + [("micro_batch", "uneven")]:
        tx, schedule = step_lib.make_optimizer(config, total_steps=4)
        step = step_lib.make_train_step(model, tx, schedule, loss_normalization=norm)
        state = init_train_state({k: v.float().clone() for k, v in params.items()}, tx)
        _, metrics = step(state, groupings[name])
        results[norm, name] = (float(metrics["train/loss"]), float(metrics["train/grad_norm"]))
    for name in groupings:
        assert results["tokens", name] == pytest.approx(results["tokens", "packed"], rel=1e-5)
    assert results["micro_batch", "uneven"][1] != pytest.approx(results["tokens", "uneven"][1], rel=1e-3)


@pytest.mark.slow
def test_compiled_packed_step_equals_eager(family):
    """Regional compile over packed micro-batches of one budget bucket: rows of other lengths, images and counts
    compile nothing after the first step, and the losses equal eager ones."""
    from torch._dynamo.utils import counters

    from vlm_sft import compile as compile_lib

    model, params, spec = family
    steps = []
    for i in range(3):
        rows = [([(1, 4, 4)] * (1 + (i + j) % 2), 3 + 7 * i + j, ) for j in range(2 + i)]
        sequences, pixels, grids = make_rows(model, seed=i, rows=rows)
        steps.append([collate_packed(sequences, pixels, grids, spec, length=256)])
    assert len({int(b["attention_mask"].sum()) for s in steps for b in s}) == 3

    def run(compile):
        config = load_config("demo")
        tx, schedule = step_lib.make_optimizer(config, total_steps=10)
        block_call = compile_lib.make_block_call(compile=True) if compile else model_lib.plain_block_call
        step = step_lib.make_train_step(model, tx, schedule, compile=compile, block_call=block_call,
                                        loss_normalization="tokens")
        state = init_train_state({k: v.clone() for k, v in params.items()}, tx)
        losses, graphs = [], []
        for micro in steps:
            state, metrics = step(state, micro)
            losses.append(float(metrics["train/loss"]))
            graphs.append(counters["stats"]["unique_graphs"])
        return losses, graphs

    eager, _ = run(False)
    counters.clear()
    torch._dynamo.reset()
    compiled, graphs = run(True)
    assert graphs[1] == graphs[2] == graphs[0]
    assert compiled == pytest.approx(eager, rel=1e-4)


def test_balance_gives_every_rank_as_many_micro_batches(monkeypatch, family):
    """A rank that packed fewer micro-batches than another repeats its last one without labels (same work, no
    gradient, no tokens counted); the global answer-token count is summed over ranks."""
    from vlm_sft import sharding

    model, params, spec = family
    sequences, pixels, grids = make_rows(model)
    mine = [collate_packed(sequences[:2], pixels[:2], grids[:2], spec, length=256)]
    other = 3.0, 50.0  # the other rank: 3 micro-batches, 50 answer tokens
    monkeypatch.setattr(sharding, "all_reduce_sum", lambda t: t + torch.tensor([0.0, other[0], other[1]],
                                                                                  dtype=t.dtype))
    out, tokens = packing.balance(mine, None, world_size=2, rank=0)
    assert len(out) == 3 and out[0] is mine[0] and tokens == 50.0 + packing.label_count(mine[0])
    assert packing.label_count(out[2]) == 0 and int(out[2]["attention_mask"].sum()) == 0
    assert torch.equal(out[2]["pixel_values"], mine[0]["pixel_values"])
    with torch.no_grad():
        assert float(step_lib.token_mean(model_lib.token_nll(model, params, out[2]), out[2])) == 0.0
    out, _ = packing.balance([], lambda: collate_packed([], [], [], spec, length=64), world_size=2, rank=0)
    assert len(out) == 3 and all(b["input_ids"].shape == (1, 64) for b in out)
