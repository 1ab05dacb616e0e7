"""Qwen3-VL-MoE's functional forward (grouped-GEMM experts, router aux loss) against transformers'
Qwen3VLMoeForConditionalGeneration, on a tiny MoE trained first by a plain loop over HF's own forward (a random
router routes almost uniformly: a wrong expert or a wrong routing weight would hardly move its loss)."""
import os

import pytest
import torch
from transformers import Qwen3VLMoeForConditionalGeneration

import fixtures
from vlm_sft import models as model_lib
from vlm_sft import step as step_lib
from vlm_sft import demo
from vlm_sft.models import moe
from test_qwen3_vl_model import PAD, ROWS, hf_inputs, make_batch

MOE = "model.language_model.layers.0.mlp."


@pytest.fixture(scope="module")
def tiny_moe_dir(tiny_qwen3_vl_moe_dir):
    return str(tiny_qwen3_vl_moe_dir)


@pytest.fixture(scope="module")
def trained(tiny_moe_dir):
    """HF's module after 30 AdamW steps of its own forward (torch.optim, HF's loss) on colour-naming batches."""
    hf = Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_moe_dir, dtype=torch.float32)
    hf.train()
    model, _ = model_lib.model_from_module(hf, model_lib.family_named("qwen3_vl_moe"))
    spec = model.vision_spec(PAD)
    hf.requires_grad_(True)
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    losses = []
    with torch.random.fork_rng(devices=[]):
        for step in range(30):
            batch = make_batch(g, spec, [ROWS[(step + i) % len(ROWS)] for i in range(4)])
            loss = hf(**hf_inputs(batch)).loss
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
    hf.zero_grad(set_to_none=True)
    return hf, spec, losses


def functional(hf):
    model, params = model_lib.model_from_module(hf, model_lib.family_named("qwen3_vl_moe"))
    hf.requires_grad_(True)  # model_from_module froze the module; HF's grads are the reference here
    return model, params


def test_loss_aux_loss_and_every_grad_equal_hf_on_a_trained_model(trained):
    hf, spec, losses = trained
    assert losses[-1] < 0.5 * losses[0], losses
    model, params = functional(hf)
    batch = make_batch(torch.Generator().manual_seed(1), spec, ROWS)
    coef = 0.05  # larger than the directory's 0.001, so the aux term's gradient is well above the tolerance
    hf.config.text_config.router_aux_loss_coef = coef
    leaves, hf64, batch = fixtures.in_float64(params, hf, batch)  # HF's module copied, in float64
    hf64.set_experts_implementation("eager")  # its loop over experts: torch._grouped_mm takes no fp64
    nll, aux = model_lib.token_nll_aux(model, leaves, batch)
    ours = nll.mean() + coef * aux["aux_loss"]
    grads = torch.autograd.grad(ours, list(leaves.values()), materialize_grads=True)
    out = hf64(**hf_inputs(batch), output_router_logits=True)
    out.loss.backward()
    torch.testing.assert_close(aux["aux_loss"], out.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)
    hf_params = dict(hf64.named_parameters())
    for name, g in zip(leaves, grads):
        theirs = hf_params[name].grad
        torch.testing.assert_close(g, torch.zeros_like(g) if theirs is None else theirs, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    # Trained routing is uneven: the busiest expert gets more than its even share in some layer.
    assert float(aux["max_expert_load"]) > 1.2, aux


def test_swapping_experts_changes_the_loss(trained):
    """Expert e's weights serve the tokens routed to e: two much-used experts of each MoE layer (those the token
    embeddings route to most) swapped, the router unchanged, move the trained loss far beyond the tolerance."""
    hf, spec, _ = trained
    model, params = functional(hf)
    batch = make_batch(torch.Generator().manual_seed(2), spec, ROWS)
    with torch.no_grad():
        base = float(model_lib.token_nll(model, params, batch).mean())
        swapped = dict(params)
        for layer in (0, 2):
            prefix = f"model.language_model.layers.{layer}.mlp."
            x = params["model.language_model.embed_tokens.weight"][batch["input_ids"]].reshape(-1, 64)
            _, _, ids = moe.route(x, params[prefix + "gate.weight"], 2)
            busiest = torch.bincount(ids.reshape(-1), minlength=8).topk(2).indices
            for name in ("experts.gate_up_proj", "experts.down_proj"):
                w = params[prefix + name].clone()
                w[busiest] = w[busiest.flip(0)]
                swapped[prefix + name] = w
        moved = abs(float(model_lib.token_nll(model, swapped, batch).mean()) - base)
    assert moved > 1e-2, moved


def test_rows_routed_together_equal_each_row_alone(trained):
    """The experts see the micro-batch's tokens pooled (sorted by expert across rows): each row's token losses
    must be the ones it gets alone (padding included in the pool)."""
    hf, spec, _ = trained
    model, params = functional(hf)
    together = make_batch(torch.Generator().manual_seed(3), spec, ROWS)
    g = torch.Generator().manual_seed(3)
    alone = [make_batch(g, spec, [row]) for row in ROWS]
    with torch.no_grad():
        nll = model_lib.token_nll(model, params, together)
        each = torch.cat([model_lib.token_nll(model, params, b) for b in alone])
    torch.testing.assert_close(nll, each, rtol=1e-5, atol=1e-5)


def test_packed_rows_equal_the_padded_batch_token_by_token_with_the_same_aux_loss(trained):
    """The same rows packed into one sequence (attention within each row, data.packing): every token's NLL, every
    gradient and the aux loss (over the real tokens only) as the padded batch gives them."""
    from vlm_sft.data.collate import collate_packed
    from test_packing import make_rows, ROWS as PACK_ROWS

    hf, spec, _ = trained
    model, params = functional(hf)
    sequences, pixels, grids = make_rows(model, rows=PACK_ROWS)
    total = sum(len(ids) for ids, _ in sequences)
    from vlm_sft.data.collate import collate

    def run(batch):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        nll, aux = model_lib.token_nll_aux(model, leaves, batch)
        w = batch.get("label_weight", torch.ones_like(nll))
        grads = torch.autograd.grad((nll * w).sum() + aux["aux_loss"], list(leaves.values()), materialize_grads=True)
        return nll[w > 0].detach(), aux["aux_loss"].detach(), grads

    ref_nll, ref_aux, ref_grads = run(collate(sequences, pixels, grids, spec))
    nll, aux, grads = run(collate_packed(sequences, pixels, grids, spec, length=total + 21))
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-6)
    for name, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5, msg=name)
    hf.requires_grad_(True)


def test_grouped_mm_paths_equal_a_loop_over_experts():
    """Both dispatch paths (bf16: torch._grouped_mm; other dtypes: the custom op), forward and backward, equal
    one matmul per expert's rows; an expert with no rows gets a zero gradient."""
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([3, 0, 5, 4])
    offs = counts.cumsum(0).to(torch.int32)
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 1e-2)):
        a = torch.randn(12, 16, generator=g).to(dtype).requires_grad_()
        b = torch.randn(4, 32, 16, generator=g).to(dtype).requires_grad_()
        out = moe.grouped_mm(a, b.transpose(1, 2), offs)
        ref = torch.cat([a[s:e] @ b[i].T for i, (s, e) in
                         enumerate(zip([0] + offs[:-1].tolist(), offs.tolist()))])
        grad = torch.randn(out.shape, generator=g).to(dtype)
        ga, gb = torch.autograd.grad(out, [a, b], grad)
        ra, rb = torch.autograd.grad(ref, [a, b], grad)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        torch.testing.assert_close(ga, ra, rtol=tol, atol=tol)
        torch.testing.assert_close(gb, rb, rtol=tol, atol=tol)
        assert not gb[1].any()


def test_forward_has_no_graph_breaks(tiny_moe_dir):
    """One graph for the whole forward: no host sync (.item(), nonzero, tolist) in the routing or the experts."""
    model, params = model_lib.load_model(tiny_moe_dir)
    batch = make_batch(torch.Generator().manual_seed(4), model.vision_spec(PAD), ROWS[:2])
    explained = torch._dynamo.explain(model_lib.token_nll_aux)(model, params, batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_train_step_logs_aux_loss_and_adds_it_with_its_coefficient(tiny_moe_dir):
    model, params = model_lib.load_model(tiny_moe_dir)
    batch = make_batch(torch.Generator().manual_seed(5), model.vision_spec(PAD), ROWS[:2])
    plain = step_lib.make_loss_and_grad(model)
    aux: dict = {}
    weighted = step_lib.make_loss_and_grad(model, aux_loss_coef=0.5, aux=aux)
    loss0, g0 = plain(params, batch, torch.ones(()))
    loss1, g1 = weighted(params, batch, torch.ones(()))
    assert float(loss0) == float(loss1)  # the returned loss is the CE either way
    gate = MOE + "gate.weight"
    leaves = {gate: params[gate].clone().requires_grad_()}
    _, extra = model_lib.token_nll_aux(model, {**params, **leaves}, batch)
    (aux_grad,) = torch.autograd.grad(extra["aux_loss"], [leaves[gate]])
    torch.testing.assert_close(g1[gate] - g0[gate], 0.5 * aux_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(aux["aux_loss"], extra["aux_loss"].detach())
    assert float(aux["max_expert_load"]) >= 1.0


def _grouped_mm_flops(a, b, offs, *args, out_shape=None, **kwargs) -> int:
    """(shapes) [N, K] x [E, K, M] (N rows, each through one expert) or [K, N] x [N, M] per group: 2 * K * N * M."""
    return 2 * a[0] * a[1] * b[-1]


def test_flop_formula_counts_active_experts_only(tiny_moe_dir):
    """FlopCounterMode over forward + backward of an unpadded batch: the formula, counting of each stacked expert
    tensor only the top_k / E share a token runs, equals every matmul, grouped GEMM and attention run."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlm_sft import perf
    from vlm_sft.data.collate import collate
    from test_perf import CPU_ATTENTION_FLOPS, equal_rows

    model, params = model_lib.load_model(tiny_moe_dir)
    batch = collate(*equal_rows(rows=3, grid=(1, 8, 6), text=21, answer=5, pixel_dim=3 * 2 * 16 * 16),
                    model.vision_spec(PAD), pad_multiple=1)
    assert bool(batch["attention_mask"].all())
    mapping = {**CPU_ATTENTION_FLOPS, torch.ops.vlm_sft.grouped_mm: _grouped_mm_flops}
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        step_lib.make_loss_and_grad(model)(params, batch, torch.tensor(1.0))
    fm = perf.FlopModel.from_model(model.config, {k: v.shape for k, v in params.items()}, model.lm_head_name)
    pos_embed_flops = 4 * fm.pos_embed * batch["pixel_values"].shape[0]
    assert fm.batch_flops(batch) - pos_embed_flops == pytest.approx(counter.get_total_flops(), rel=1e-3)


def test_qwen3_vl_30b_a3b_active_params():
    """The 30B-A3B shape on the meta device (48 layers, 128 experts, 8 per token, moe_intermediate 768): ~31B
    params, of which ~3.3B active per token (Qwen's "A3B", embedding included), what MFU counts."""
    import transformers

    from vlm_sft import perf

    config = transformers.Qwen3VLMoeConfig.from_dict(demo.tiny_qwen3_vl_moe_hub_config(**A3B_SHAPE))
    with torch.device("meta"):
        module = transformers.Qwen3VLMoeForConditionalGeneration(config)
    shapes = {n: p.shape for n, p in module.named_parameters()}
    assert sum(s.numel() for s in shapes.values()) == pytest.approx(31.1e9, rel=0.01)
    fm = perf.FlopModel.from_model(config, shapes, "lm_head.weight")
    embed = shapes["model.language_model.embed_tokens.weight"].numel()
    assert fm.text_params + fm.head_params + embed == pytest.approx(3.3e9, rel=0.03)
    assert fm.text_attention == 48 * 32 * 2 * 128


# Qwen3-VL-30B-A3B-Instruct's config.json sizes (tiny_qwen3_vl_moe_hub_config keywords).
A3B_SHAPE = dict(text_hidden=2048, text_layers=48, text_heads=32, text_kv_heads=4, text_head_dim=128,
                 text_intermediate=6144, vision_hidden=1152, vision_depth=27, vision_heads=16,
                 vision_intermediate=4304, num_position_embeddings=2304, deepstack_visual_indexes=[8, 16, 24],
                 num_experts=128, num_experts_per_tok=8, moe_intermediate=768, mlp_only_layers=())


# --------------------------------------------------------------------------------------------------------------
# What trains, and the export.

def test_lora_targets_attention_and_dense_mlps_by_default_and_the_stacked_experts_when_named(tiny_moe_dir):
    from vlm_sft import trainable
    from configs_loader import load_config

    config = load_config("demo,qwen3_moe,lora")
    plan = trainable.make_plan(config, trainable.skeleton(tiny_moe_dir))
    layer = "model.language_model.layers."
    assert {m[len(layer):].split(".", 1)[1] for m in plan.lora_modules} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}  # the dense layer's MLP; no router, no experts
    assert {m.split(".")[3] for m in plan.lora_modules if ".mlp." in m} == {"1"}
    config.actor.model.lora_target_modules = r"mlp\.experts"  # the module's name: both of its expert tensors
    plan = trainable.make_plan(config, trainable.skeleton(tiny_moe_dir))
    assert plan.lora_modules == tuple(f"{layer}{i}.mlp.experts.{p}" for i in (0, 2)
                                      for p in ("gate_up_proj", "down_proj"))  # layer 1 is dense
    assert plan.shapes[MOE + "experts.gate_up_proj.lora_A"] == (8, 8, 64)   # [E, r, H]
    assert plan.shapes[MOE + "experts.gate_up_proj.lora_B"] == (8, 96, 8)   # [E, 2I, r]
    assert plan.weight_grads == list(plan.lora_modules)
    assert "on 0 linear modules and 4 stacked expert tensors" in plan.describe(1e-4, 0)[0]


def test_frozen_router_and_experts_get_no_gradient_and_the_router_still_routes(tiny_moe_dir):
    from vlm_sft import trainable
    from configs_loader import load_config

    config = load_config("demo,qwen3_moe")
    config.actor.model.freeze = (r"\.mlp\.gate\.weight$", r"\.mlp\.experts\.")
    plan = trainable.make_plan(config, trainable.skeleton(tiny_moe_dir))
    assert all(".mlp.gate." in n or ".mlp.experts." in n for n in plan.frozen) and len(plan.frozen) == 6
    model, params = model_lib.load_model(tiny_moe_dir)
    batch = make_batch(torch.Generator().manual_seed(6), model.vision_spec(PAD), ROWS[:2])
    aux: dict = {}
    loss, grads = step_lib.make_loss_and_grad(model, trainable=plan.trainable, aux_loss_coef=0.01, aux=aux)(
        params, batch, torch.ones(()))
    full_loss, _ = step_lib.make_loss_and_grad(model, aux_loss_coef=0.01)(params, batch, torch.ones(()))
    assert sorted(grads) == sorted(plan.trainable) and not set(grads) & set(plan.frozen)
    assert float(grads["model.language_model.layers.1.mlp.up_proj.weight"].abs().sum()) > 0
    assert float(loss) == float(full_loss) and float(aux["max_expert_load"]) > 1.0  # routed as before


def test_export_loads_in_hf_with_the_hubs_expert_layout_and_the_trainers_logits(tiny_moe_dir, tmp_path):
    import json
    import os

    import safetensors
    import transformers

    from vlm_sft import checkpoint, export
    from test_export import assert_same_label_logits, save_trained_checkpoint

    ckpt = save_trained_checkpoint(tiny_moe_dir, tmp_path / "ckpt")
    out = str(tmp_path / "hf")
    export.export_checkpoint(ckpt, out, max_shard_bytes=2 * 1024 ** 2)
    weight_map = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    base_map = json.load(open(os.path.join(tiny_moe_dir, "model.safetensors.index.json")))["weight_map"]
    assert sorted(weight_map) == sorted(base_map) and "lm_head.weight" in weight_map
    name = MOE + "experts.gate_up_proj"
    with safetensors.safe_open(os.path.join(out, weight_map[name]), "pt") as f:
        assert list(f.get_slice(name).get_shape()) == [8, 64, 96]  # [E, H, 2I], as the Hub (4.57) ships it
    transformers.utils.logging.set_verbosity_warning()
    try:
        hf, info = Qwen3VLMoeForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    finally:
        transformers.utils.logging.set_verbosity_error()
    assert {k: list(v) for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    model, params = model_lib.load_model(tiny_moe_dir)
    params = checkpoint.restore_params(ckpt, params)
    torch.testing.assert_close(hf.state_dict()[name], params[name].float())
    assert_same_label_logits(model, params, hf, make_batch(torch.Generator().manual_seed(0), model.vision_spec(PAD),
                                                           ROWS))


@pytest.mark.slow
def test_compiled_step_is_one_region_per_block_kind_and_equals_eager(tiny_moe_dir):
    """Compiled by region: both sparse layers share one graph of moe_decoder_block (and the dense layer its own),
    a second step compiles nothing, and the losses and aux losses equal eager."""
    from torch._dynamo.utils import counters

    from vlm_sft import compile as compile_lib
    from vlm_sft import optim
    from vlm_sft.models import qwen3_vl_moe
    from vlm_sft.state import init_train_state

    model, params = model_lib.load_model(tiny_moe_dir)
    g = torch.Generator().manual_seed(7)
    steps = [[make_batch(g, model.vision_spec(PAD), ROWS[i:i + 2], length_buckets=(64,), pad_labels=True)]
             for i in range(2)]

    def run(compile: bool) -> list[tuple[float, float]]:
        tx = optim.adamw(1e-3, max_grad_norm=1.0)
        state = init_train_state({k: v.clone() for k, v in params.items()}, tx)
        block_call = compile_lib.make_block_call(compile=compile)
        train_step = step_lib.make_train_step(model, tx, lambda step: torch.tensor(1e-3), compile=compile,
                                              block_call=block_call, aux_loss_coef=0.01)
        out = []
        for i, micro_batches in enumerate(steps):
            state, metrics = train_step(state, micro_batches)
            out.append((float(metrics["train/loss"]), float(metrics["train/aux_loss"])))
            if i == 0 and compile:
                graphs = counters["stats"]["unique_graphs"]
                per_fn = compile_lib.graphs_per_function([qwen3_vl_moe.moe_decoder_block])
                assert per_fn == {"moe_decoder_block": 1}, per_fn
        if compile:
            assert counters["stats"]["unique_graphs"] == graphs, "the second step recompiled"
            assert counters["graph_break"] == {}
        return out

    eager = run(False)
    counters.clear()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.tensor(run(True)), torch.tensor(eager), atol=1e-5, rtol=0)


def test_bench_memory_rows_for_30b_a3b():
    """bench/memory.py's on-paper rows (the planner on a meta-device 30B-A3B): full_shard on 8 GPUs holds 1/8 of
    the fp32 params; checkpointing keeps one sparse layer gathered (its 128 experts) instead of every layer."""
    import sys

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench import memory

    rows = {(r["setting"], r["gpus"]): r for r in memory.on_paper(gpus=(8, 16), models=("Qwen3-VL-30B-A3B",))}
    full8 = rows["full+ckpt", 8]
    assert full8["params_gib"] == pytest.approx(4 * 31.1e9 / 8 / 2 ** 30, rel=0.01)
    assert full8["optimizer_gib"] == pytest.approx(2 * full8["params_gib"], rel=0.01)
    assert rows["full+ckpt", 16]["params_gib"] == pytest.approx(full8["params_gib"] / 2, rel=0.01)
    assert full8["gathered_gib"] < 10 < 50 < rows["full", 8]["gathered_gib"]
    assert rows["lora+ckpt", 8]["peak_gib"] < 24 < full8["peak_gib"] < 80 < rows["full", 8]["peak_gib"]


def test_router_aux_loss_coef_defaults_to_the_directorys_and_is_refused_for_dense_families():
    import transformers

    from vlm_sft import main as main_lib
    from vlm_sft.errors import ConfigError
    from configs_loader import load_config

    config = load_config("demo,qwen3_moe")
    moe_family = model_lib.family_named("qwen3_vl_moe")
    asks = transformers.Qwen3VLMoeConfig.from_dict(demo.tiny_qwen3_vl_moe_hub_config(output_router_logits=True,
                                                                                     router_aux_loss_coef=0.02))
    silent = transformers.Qwen3VLMoeConfig.from_dict(demo.tiny_qwen3_vl_moe_hub_config())
    assert main_lib.router_aux_loss_coef(config, moe_family, asks) == 0.02  # as transformers adds it
    assert main_lib.router_aux_loss_coef(config, moe_family, silent) == 0.0
    config.actor.model.router_aux_loss_coef = 0.5
    assert main_lib.router_aux_loss_coef(config, moe_family, silent) == 0.5
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef=0.5: 'qwen3_vl' has no router"):
        main_lib.router_aux_loss_coef(config, model_lib.family_named("qwen3_vl"))
    config.actor.model.router_aux_loss_coef = -1.0
    with pytest.raises(ConfigError, match=r"router_aux_loss_coef=-1.0: expected a number >= 0"):
        from vlm_sft import config as config_lib
        config_lib.validate(config, mode="train")


def test_a_directory_saved_by_transformers_5_loads_as_the_hubs(tiny_moe_dir, tmp_path, device):
    """transformers 5's save_pretrained writes the experts in the in-memory layout [E, 2I, H] (its reversed
    Transpose keeps the matching shape), the Hub's 4.57 files hold them transposed: the sharded loader reads
    either by shape, as from_pretrained does, into the same params, bitwise."""
    import safetensors

    from configs.robo2vlm import get_config
    from vlm_sft import loading
    from vlm_sft import sharding as sharding_lib

    loaded = Qwen3VLMoeForConditionalGeneration.from_pretrained(tiny_moe_dir, dtype=torch.bfloat16)
    hf = Qwen3VLMoeForConditionalGeneration(loaded.config).to(torch.bfloat16)
    hf.load_state_dict(loaded.state_dict())
    hf.save_pretrained(str(tmp_path))
    with safetensors.safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert list(f.get_slice(MOE + "experts.gate_up_proj").get_shape()) == [8, 96, 64]  # [E, 2I, H]
    sharding = sharding_lib.make_sharding(get_config("demo"), device)
    _, hub = loading.load_sharded(tiny_moe_dir, sharding, {})
    _, saved = loading.load_sharded(str(tmp_path), sharding, {})
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    assert saved.keys() == hub.keys()
    for name, t in saved.items():
        assert torch.equal(local(t), local(hub[name])), name
    assert torch.equal(local(saved[MOE + "experts.gate_up_proj"]), loaded.state_dict()[MOE + "experts.gate_up_proj"])
