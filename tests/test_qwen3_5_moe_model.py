"""Qwen3.5-MoE's functional forward (models/qwen3_5_moe.py: Qwen3.5's hybrid mixers, grouped-GEMM experts, the
gated shared expert, router aux loss) against transformers' Qwen3_5MoeForConditionalGeneration, on a tiny model
trained first by a plain loop over HF's own forward (a random router routes almost uniformly, and a random
model's loss is ~ln(vocab) whatever the routing)."""
import copy
import json

import pytest
import torch
from transformers import Qwen3_5MoeForConditionalGeneration

import fixtures
from vlm_sft import models as model_lib
from vlm_sft import step as step_lib
from vlm_sft.demo import qwen3_5_moe as hub
from test_qwen3_5_model import PAD, ROWS, hf_inputs, make_batch

LAYER = "model.language_model.layers."


@pytest.fixture(scope="module")
def trained(tiny_qwen3_5_moe_dir):
    """HF's module after 20 AdamW steps of its own forward (torch.optim, HF's loss) on colour-naming batches."""
    hf = Qwen3_5MoeForConditionalGeneration.from_pretrained(str(tiny_qwen3_5_moe_dir), dtype=torch.float32)
    hf.train()
    hf.requires_grad_(True)
    model, _ = model_lib.model_from_module(hf, model_lib.family_named("qwen3_5_moe"))
    spec = model.vision_spec(PAD)
    hf.requires_grad_(True)
    # The 248k-row input embedding is not trained (its AdamW update would be most of the loop's time); the rest
    # learns the task on top of it. Every gradient, the embedding's included, is compared below.
    big = ("model.language_model.embed_tokens.weight",)
    opt = torch.optim.AdamW([p for n, p in hf.named_parameters() if n not in big], lr=1e-2, weight_decay=0.0)
    for n in big:
        hf.get_parameter(n).requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(20):
        batch = make_batch(g, spec, [ROWS[(step + i) % len(ROWS)] for i in range(4)])
        loss = hf(**hf_inputs(batch)).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        losses.append(float(loss.detach()))
    hf.zero_grad(set_to_none=True)
    hf.requires_grad_(True)
    return hf, spec, losses


def functional(hf):
    model, params = model_lib.model_from_module(hf, model_lib.family_named("qwen3_5_moe"))
    hf.requires_grad_(True)  # model_from_module froze the module; HF's grads are the reference here
    return model, params


def test_loss_aux_loss_and_every_grad_equal_hf_on_a_trained_model(trained):
    hf, spec, losses = trained
    assert losses[-1] < 0.5 * losses[0], losses
    model, params = functional(hf)
    assert set(model.config.text_config.layer_types) == {"linear_attention", "full_attention"}
    batch = make_batch(torch.Generator().manual_seed(1), spec, ROWS)
    coef = 0.05  # larger than the directory's 0.001, so the aux term's gradient is well above the tolerance
    hf.config.text_config.router_aux_loss_coef = coef
    leaves, hf64, batch = fixtures.in_float64(params, hf, batch)  # HF's module copied, in float64
    hf64.set_experts_implementation("eager")  # its loop over experts: torch._grouped_mm takes no fp64
    nll, aux = model_lib.token_nll_aux(model, leaves, batch)
    ours = nll.mean() + coef * aux["aux_loss"]
    grads = dict(zip(leaves, torch.autograd.grad(ours, list(leaves.values()), materialize_grads=True)))
    out = hf64(**hf_inputs(batch), output_router_logits=True)
    out.loss.backward()
    torch.testing.assert_close(aux["aux_loss"], out.aux_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours, out.loss, rtol=1e-5, atol=1e-5)
    hf_params = dict(hf64.named_parameters())
    for name, g in grads.items():
        theirs = hf_params[name].grad
        torch.testing.assert_close(g, torch.zeros_like(g) if theirs is None else theirs, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    hf.config.text_config.router_aux_loss_coef = 0.001
    # Both mixer kinds: the shared expert, its gate and the routed experts all learn, above the 1e-5 tolerance.
    # (The trained fixture follows the machine's reduction order: layer 3's gate gradient peaks at 5.9e-4 trained
    # on 1 thread, 8.2e-5 on 2, so the bound is 4x the tolerance, not a magnitude of one machine's model.)
    for layer in (0, 3):
        for name in ("shared_expert_gate.weight", "shared_expert.down_proj.weight", "experts.gate_up_proj"):
            assert float(grads[f"{LAYER}{layer}.mlp.{name}"].abs().max()) > 4e-5, (layer, name)
    assert float(aux["max_expert_load"]) > 1.2, aux  # trained routing is uneven in some layer


def test_the_shared_expert_and_its_gate_count(trained):
    """The shared expert's output, scaled by its sigmoid gate, is part of every token's MLP: zeroing its gate
    weight (a gate of 1/2 for every token) or its down projection moves the trained loss far beyond the
    tolerance."""
    hf, spec, _ = trained
    model, params = functional(hf)
    batch = make_batch(torch.Generator().manual_seed(2), spec, ROWS)
    with torch.no_grad():
        base = float(model_lib.token_nll(model, params, batch).mean())
        for suffix in ("mlp.shared_expert_gate.weight", "mlp.shared_expert.down_proj.weight"):
            changed = {k: torch.zeros_like(v) if k.endswith(suffix) else v for k, v in params.items()}
            moved = abs(float(model_lib.token_nll(model, changed, batch).mean()) - base)
            assert moved > 1e-3, (suffix, moved)


def test_packed_rows_equal_the_padded_batch_token_by_token_with_the_same_aux_loss(trained):
    """The same rows packed into one sequence (conv and delta-rule state restarting, attention within each row):
    every token's NLL, every gradient and the aux loss (over the real tokens) as the padded batch gives them."""
    from vlm_sft.data.collate import collate, collate_packed
    from test_packing import make_rows, ROWS as PACK_ROWS

    hf, spec, _ = trained
    # In float64 (fixtures.in_float64's reason): packed, the trained embedding's gradient rows sum ~100 token
    # gradients each in another order, which in fp32 moved elements by more than 1e-5 of the tensor's scale on
    # one CI machine and not on another.
    model, params = functional(copy.deepcopy(hf).double())
    sequences, pixels, grids = make_rows(model, rows=PACK_ROWS)
    total = sum(len(ids) for ids, _ in sequences)

    def run(batch):
        batch = fixtures.float64_batch(batch)
        leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        nll, aux = model_lib.token_nll_aux(model, leaves, batch)
        w = batch.get("label_weight", torch.ones_like(nll))
        loss = (nll * w).sum() / w.sum() + aux["aux_loss"]  # the token mean, as the trainer normalises
        grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
        return nll[w > 0].detach(), aux["aux_loss"].detach(), grads

    ref_nll, ref_aux, ref_grads = run(collate(sequences, pixels, grids, spec))
    nll, aux, grads = run(collate_packed(sequences, pixels, grids, spec, length=total + 21))
    torch.testing.assert_close(nll, ref_nll, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(aux, ref_aux, rtol=1e-5, atol=1e-6)
    for name, g, r in zip(params, grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * max(1.0, float(r.abs().max())), msg=name)
    hf.requires_grad_(True)


def test_train_step_adds_the_aux_loss_with_its_coefficient(tiny_qwen3_5_moe_dir):
    model, params = model_lib.load_model(str(tiny_qwen3_5_moe_dir))
    batch = make_batch(torch.Generator().manual_seed(5), model.vision_spec(PAD), ROWS[:2])
    aux: dict = {}
    loss0, g0 = step_lib.make_loss_and_grad(model)(params, batch, torch.ones(()))
    loss1, g1 = step_lib.make_loss_and_grad(model, aux_loss_coef=0.5, aux=aux)(params, batch, torch.ones(()))
    assert float(loss0) == float(loss1)  # the returned loss is the CE either way
    gate = LAYER + "0.mlp.gate.weight"
    leaves = {gate: params[gate].clone().requires_grad_()}
    _, extra = model_lib.token_nll_aux(model, {**params, **leaves}, batch)
    (aux_grad,) = torch.autograd.grad(extra["aux_loss"], [leaves[gate]])
    torch.testing.assert_close(g1[gate] - g0[gate], 0.5 * aux_grad, rtol=1e-4, atol=1e-6)
    assert float(aux["max_expert_load"]) >= 1.0


def test_param_groups_flop_shape_and_config_checks(tmp_path, tiny_qwen3_5_moe_dir):
    import transformers

    model, params = model_lib.load_model(str(tiny_qwen3_5_moe_dir))
    assert model.family.name == "qwen3_5_moe" and not model.tied
    assert sorted(n for names in model.groups.values() for n in names) == sorted(params)
    assert {LAYER + "0.", LAYER + "3.", "model.visual.merger."} <= set(model.groups)
    shape = model.family.flop_shape(model.config)
    assert shape.text_layers == 1 and shape.expert_fraction == 2 / 8  # only the full layer attends; top-2 of 8
    assert model.family.default_aux_loss_coef(model.config) == 0.0  # the directory does not ask for router logits
    asks = transformers.Qwen3_5MoeConfig.from_dict(hub.hub_config(output_router_logits=True,
                                                                  router_aux_loss_coef=0.02))
    assert model.family.default_aux_loss_coef(asks) == 0.02
    config = json.loads((tiny_qwen3_5_moe_dir / "config.json").read_text())
    (tmp_path / "model.safetensors").write_bytes(b"")
    for key, value, match in (("num_experts_per_tok", 9, "num_experts_per_tok=9; expected 1 <= num_experts_per_tok"),
                              ("layer_types", ["sliding_attention"] * 4, r"layer_types holds \['sliding_attention'\]")):
        bad = json.loads(json.dumps(config))
        bad["text_config"][key] = value
        (tmp_path / "config.json").write_text(json.dumps(bad))
        with pytest.raises(model_lib.ModelLoadError, match=match):
            model_lib.check_model_dir(str(tmp_path), "qwen3_5_moe")
    with pytest.raises(model_lib.ModelLoadError, match="actor.model.model_type='qwen3_5' but .* 'qwen3_5_moe'"):
        model_lib.check_model_dir(str(tiny_qwen3_5_moe_dir), "qwen3_5")


def test_lora_defaults_target_the_mixers_projections_and_no_experts(tiny_qwen3_5_moe_dir):
    from vlm_sft import trainable
    from configs_loader import load_config

    config = load_config("demo,qwen3_5_moe,lora")
    assert config.actor.model.model_type == "qwen3_5_moe"
    plan = trainable.make_plan(config, trainable.skeleton(str(tiny_qwen3_5_moe_dir)))
    assert {m[len(LAYER):].split(".", 1)[1] for m in plan.lora_modules} == {
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj"}
    config.actor.model.lora_target_modules = r"layers\.0\.(linear_attn|mlp\.experts)"
    plan = trainable.make_plan(config, trainable.skeleton(str(tiny_qwen3_5_moe_dir)))
    assert plan.lora_modules[-2:] == (LAYER + "0.mlp.experts.gate_up_proj", LAYER + "0.mlp.experts.down_proj")
    assert not any("conv1d" in m for m in plan.lora_modules)  # the depthwise conv's 3-D weight is no expert stack


def test_export_loads_in_hf_with_no_missing_keys_and_the_trainers_logits(tiny_qwen3_5_moe_dir, tmp_path):
    import os

    import transformers

    from vlm_sft import checkpoint, export
    from test_export import assert_same_label_logits, save_trained_checkpoint

    ckpt = save_trained_checkpoint(tiny_qwen3_5_moe_dir, tmp_path / "ckpt")
    out = str(tmp_path / "hf")
    export.export_checkpoint(ckpt, out, max_shard_bytes=2 * 1024 ** 2)
    weight_map = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    base_map = json.load(open(os.path.join(tiny_qwen3_5_moe_dir, "model.safetensors.index.json")))["weight_map"]
    assert sorted(weight_map) == sorted(base_map) and "lm_head.weight" in weight_map
    transformers.utils.logging.set_verbosity_warning()
    try:
        hf, info = Qwen3_5MoeForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    finally:
        transformers.utils.logging.set_verbosity_error()
    assert {k: list(v) for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    model, params = model_lib.load_model(str(tiny_qwen3_5_moe_dir))
    params = checkpoint.restore_params(ckpt, params)
    name = LAYER + "0.mlp.experts.gate_up_proj"
    torch.testing.assert_close(hf.state_dict()[name], params[name].float())
    assert_same_label_logits(model, params, hf, make_batch(torch.Generator().manual_seed(0), model.vision_spec(PAD),
                                                           ROWS))


def test_the_sharded_loaders_module_stops_generating_at_the_directorys_eos_ids(tiny_qwen3_5_moe_dir):
    """The skeleton evaluation generates with reads generation_config.json as from_pretrained does: Qwen3.5's
    config.json names only <|endoftext|>, and without <|im_end|> a trained model's answer runs on."""
    from vlm_sft import loading
    from vlm_sft.demo import qwen3_5

    module = loading.skeleton(str(tiny_qwen3_5_moe_dir), model_lib.family_named("qwen3_5_moe"),
                              attn_implementation="sdpa")
    assert module.generation_config.eos_token_id == qwen3_5.GENERATION_CONFIG["eos_token_id"]
    assert module.config.text_config.eos_token_id == qwen3_5.SPECIAL_BASE


def test_a_per_expert_directory_loads_as_the_stacked_one_and_runs_as_transformers(
        tiny_qwen3_5_moe_dir, tiny_qwen3_5_moe_per_expert_dir, device):
    """The directory transformers' save_pretrained writes (one tensor per expert, conversion_mapping reversed):
    the sharded loader stacks it into the same params as the stacked (Hub) layout, bitwise; a rank's rows read
    only its experts' tensors; our forward on it equals transformers' from_pretrained of it."""
    from configs.robo2vlm import get_config
    from vlm_sft import loading
    from vlm_sft import sharding as sharding_lib
    from test_export import assert_same_label_logits

    per_expert = str(tiny_qwen3_5_moe_per_expert_dir)
    files = loading.weight_files(per_expert)
    assert LAYER + "0.mlp.experts.7.up_proj.weight" in files
    assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in files)
    assert len({files[k] for k in files if ".mlp.experts." in k}) > 1  # the experts span several shards
    sharding = sharding_lib.make_sharding(get_config("demo"), device)
    _, stacked = loading.load_sharded(str(tiny_qwen3_5_moe_dir), sharding, {})
    model, params = loading.load_sharded(per_expert, sharding, {})
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t
    assert params.keys() == stacked.keys()
    for name, t in params.items():
        assert torch.equal(local(t), local(stacked[name])), name

    family = model.family
    name = LAYER + "3.mlp.experts.gate_up_proj"
    shape = tuple(stacked[name].shape)
    pieces = loading._pieces(name, shape, 3, 6, family, files, per_expert)
    assert {p.key for p in pieces} == {f"{LAYER}3.mlp.experts.{e}.{part}.weight" for e in (3, 4, 5)
                                       for part in ("gate_proj", "up_proj")}
    rows = dict(loading.read_params(per_expert, family, {name: (shape, 3, 6, torch.float32)}, files))[name]
    assert torch.equal(rows, local(stacked[name])[3:6])

    hf = Qwen3_5MoeForConditionalGeneration.from_pretrained(per_expert, dtype=torch.float32, local_files_only=True)
    params = {k: local(v) for k, v in params.items()}
    assert_same_label_logits(model, params, hf, make_batch(torch.Generator().manual_seed(3), model.vision_spec(PAD),
                                                           ROWS))
    bad = tiny_qwen3_5_moe_per_expert_dir.parent / "missing_expert"
    bad.mkdir(exist_ok=True)
    (bad / "config.json").write_text((tiny_qwen3_5_moe_per_expert_dir / "config.json").read_text())
    index = json.load(open(tiny_qwen3_5_moe_per_expert_dir / "model.safetensors.index.json"))
    del index["weight_map"][LAYER + "2.mlp.experts.5.down_proj.weight"]
    (bad / "model.safetensors.index.json").write_text(json.dumps(index))
    for f in tiny_qwen3_5_moe_per_expert_dir.glob("model-*.safetensors"):
        (bad / f.name).symlink_to(f)
    with pytest.raises(model_lib.ModelLoadError, match=r"layers.2.mlp.experts.down_proj' is written one tensor per "
                                                       r"expert, but '.*experts.5.down_proj.weight' is missing"):
        loading.load_sharded(str(bad), sharding, {})
