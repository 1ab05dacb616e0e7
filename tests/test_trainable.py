"""What is trained: freeze presets and regexes, LoRA targets, lr multipliers and no_decay as a partition of the
params pytree (both model families' names), the optimizer's groups against torch.optim.AdamW's param groups, and
training with a frozen vision tower (frozen leaves bitwise unchanged, no optimizer state, no autograd inside)."""
import re

import pytest
import torch
import transformers

from vlm_sft import lora, optim, trainable
from vlm_sft.config import ConfigError
from vlm_sft import models as model_lib
from vlm_sft import step as step_lib
from vlm_sft.data.vision import VisionSpec
from vlm_sft.state import init_train_state
from configs_loader import load_config, override
from test_perf import equal_rows
from vlm_sft.data.collate import collate


def config_with(**fields):
    return override(load_config(""), fields)


@pytest.fixture(scope="module")
def skeleton(tiny_model_dir):
    return trainable.skeleton(str(tiny_model_dir))


@pytest.fixture(scope="module")
def qwen3_skeleton():
    """A tiny Qwen3-VL on the meta device: its names (deepstack mergers, linear_fc1/2) are what the presets and the
    default LoRA targets must cover."""
    config = transformers.Qwen3VLConfig(
        text_config=dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, intermediate_size=128, vocab_size=1000,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}),
        vision_config=dict(depth=3, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           deepstack_visual_indexes=[0, 1], num_position_embeddings=16))
    with torch.device("meta"):
        return transformers.Qwen3VLForConditionalGeneration(config)


def test_presets_partition_qwen2_5_vl(skeleton):
    names = [n for n, _ in skeleton.named_parameters()]
    plan = trainable.make_plan(config_with(**{"actor.model.freeze_vision_tower": True}), skeleton)
    assert set(plan.frozen) == {n for n in names if n.startswith("model.visual.") and ".merger." not in n}
    assert any(n.startswith("model.visual.merger.") for n in plan.trainable)
    assert set(plan.trainable) | set(plan.frozen) == set(names) and not set(plan.trainable) & set(plan.frozen)
    plan = trainable.make_plan(config_with(**{"actor.model.freeze_merger": True}), skeleton)
    assert set(plan.frozen) == {n for n in names if n.startswith("model.visual.merger.")}
    plan = trainable.make_plan(config_with(**{"actor.model.freeze_llm": True}), skeleton)
    assert set(plan.trainable) == {n for n in names if n.startswith("model.visual.")}


def test_presets_and_default_lora_targets_cover_qwen3_vl(qwen3_skeleton):
    names = [n for n, _ in qwen3_skeleton.named_parameters()]
    merger = {n for n in names if n.startswith(("model.visual.merger.", "model.visual.deepstack_merger_list."))}
    assert any("deepstack_merger_list" in n for n in merger)
    plan = trainable.make_plan(config_with(**{"actor.model.freeze_merger": True}), qwen3_skeleton)
    assert set(plan.frozen) == merger
    plan = trainable.make_plan(config_with(**{"actor.model.freeze_vision_tower": True}), qwen3_skeleton)
    assert set(plan.frozen) == {n for n in names if n.startswith("model.visual.")} - merger
    assert "model.visual.pos_embed.weight" in plan.frozen
    plan = trainable.make_plan(config_with(**{"actor.model.freeze_llm": True}), qwen3_skeleton)
    assert set(plan.trainable) == {n for n in names if n.startswith("model.visual.")}
    plan = trainable.make_plan(config_with(**{"actor.model.is_lora": True}), qwen3_skeleton)
    assert len(plan.lora_modules) == 2 * 7 and all(".language_model.layers." in m for m in plan.lora_modules)


def test_presets_and_default_lora_targets_cover_qwen3_5():
    """Qwen3.5: freezing presets partition its params (no DeepStack mergers), and the default LoRA targets reach
    the Gated DeltaNet layers' projections as PEFT names them (linear_attn.in_proj_qkv, ...), not only the one
    full-attention layer."""
    from vlm_sft.demo import qwen3_5
    config = transformers.Qwen3_5Config.from_dict(qwen3_5.hub_config())
    with torch.device("meta"):
        skeleton = transformers.Qwen3_5ForConditionalGeneration(config)
    names = [n for n, _ in skeleton.named_parameters()]
    plan = trainable.make_plan(config_with(**{"actor.model.freeze_vision_tower": True}), skeleton)
    assert set(plan.frozen) == {n for n in names if n.startswith("model.visual.") and ".merger." not in n}
    plan = trainable.make_plan(config_with(**{"actor.model.is_lora": True}), skeleton)
    layer0 = {m.split("layers.0.")[1] for m in plan.lora_modules if ".layers.0." in m}
    assert layer0 == {"linear_attn.in_proj_qkv", "linear_attn.in_proj_z", "linear_attn.out_proj", "mlp.gate_proj",
                      "mlp.up_proj", "mlp.down_proj"}
    layer3 = {m.split("layers.3.")[1] for m in plan.lora_modules if ".layers.3." in m}  # the full-attention layer
    assert layer3 == {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                      "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}
    assert load_config("").actor.model.lora_target_modules == lora.DEFAULT_TARGETS


def test_lora_trainable_count_is_analytic(skeleton):
    plan = trainable.make_plan(config_with(**{"actor.model.is_lora": True, "actor.model.lora_rank": 4}), skeleton)
    text = skeleton.config.text_config
    h, i = text.hidden_size, text.intermediate_size
    kv = text.num_key_value_heads * (h // text.num_attention_heads)
    per_layer = (h + h) + (h + kv) * 2 + (h + h) + 2 * (h + i) + (i + h)  # q, k, v, o, gate, up, down: in + out
    assert plan.numel(plan.trainable) == 4 * per_layer * text.num_hidden_layers
    assert set(plan.frozen) == {n for n, _ in skeleton.named_parameters()} and plan.lora_scale == 16 / 4
    everything = trainable.make_plan(config_with(**{"actor.model.is_lora": True,
                                                    "actor.model.lora_target_modules": "all-linear"}), skeleton)
    assert {m for m in everything.lora_modules if m.startswith("model.visual.blocks.")}
    assert "lm_head" not in everything.lora_modules


def test_lr_multipliers_first_match_wins_and_no_decay(skeleton):
    plan = trainable.make_plan(config_with(**{
        "actor.optim.lr_multipliers": ((r"^model\.visual\.merger\.", 0.5), (r"^model\.visual\.", 0.1)),
        "actor.optim.no_decay": True}), skeleton)
    for name in plan.trainable:
        want = 0.5 if ".merger." in name else 0.1 if name.startswith("model.visual.") else 1.0
        assert plan.lr_multipliers[name] == want, name
        assert plan.decay[name] == (len(plan.shapes[name]) > 1), name
    assert [g[:2] for g in plan.groups()] == [(1.0, True), (1.0, False), (0.5, True), (0.5, False), (0.1, True),
                                              (0.1, False)]


@pytest.mark.parametrize("fields, message", [
    ({"actor.model.freeze": (r"^model\.vision\.",)}, r"actor.model.freeze entry '\^model\\\\.vision\\\\.' matches no "
                                                     "parameter"),
    ({"actor.model.freeze_llm": True, "actor.model.freeze_vision_tower": True, "actor.model.freeze_merger": True},
     "freeze every parameter: nothing to train"),
    ({"actor.model.is_lora": True, "actor.model.lora_rank": 0}, "actor.model.lora_rank=0: expected a positive"),
    ({"actor.model.is_lora": True, "actor.model.lora_dropout": 0.1}, "actor.model.lora_dropout=0.1: only 0.0"),
    ({"actor.model.is_lora": True, "actor.model.freeze_vision_tower": True,
      "actor.model.lora_target_modules": "all-linear"}, "matches 'model.visual.blocks.0.attn.qkv', inside a frozen"),
    ({"actor.model.is_lora": True, "actor.model.lora_target_modules": "embed_tokens"},
     "matches only non-linear or excluded modules"),
    ({"actor.model.is_lora": True, "actor.model.lora_target_modules": "q_projj"}, "'q_projj' matches no module"),
    ({"actor.optim.lr_multipliers": (("^visual", 0.1),)}, "lr_multipliers key '\\^visual' matches no parameter"),
    ({"actor.optim.lr_multipliers": (("^model\\.visual\\.", 0.1),), "actor.model.freeze_vision_tower": True,
      "actor.model.freeze_merger": True}, "matches only frozen parameters"),
    ({"actor.optim.lr_multipliers": ("^model=0.1",)}, "is not a \\(regex, factor >= 0\\) pair"),
    ({"actor.model.freeze": ("(",)}, "not a regular expression"),
])
def test_bad_plans_name_the_field(skeleton, fields, message):
    with pytest.raises(ConfigError, match=message):  # PlanError / LoraError: main prints them as one line
        trainable.make_plan(config_with(**fields), skeleton)


def test_grouped_adamw_matches_torch_param_groups():
    """lr multipliers and the no-decay mask against torch.optim.AdamW with one param group per (factor, decay)."""
    g = torch.Generator().manual_seed(0)
    params = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(3, generator=g),
              "c": torch.randn(2, 2, generator=g)}
    mult, decay = {"a": 1.0, "b": 0.1, "c": 0.1}, {"a": True, "b": False, "c": True}
    tx = optim.adamw(1e-2, weight_decay=0.1, mask=decay, lr_multipliers=mult, max_grad_norm=0.0)
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    torch_opt = torch.optim.AdamW([
        {"params": [ref["a"]], "lr": 1e-2, "weight_decay": 0.1},
        {"params": [ref["b"]], "lr": 1e-3, "weight_decay": 0.0},
        {"params": [ref["c"]], "lr": 1e-3, "weight_decay": 0.1}])
    state = tx.init(params)
    for _ in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        updates, state = tx.update(grads, state, params)
        params = optim.apply_updates(params, updates, donate=False)
        for k in ref:
            ref[k].grad = grads[k].clone()
        torch_opt.step()
    for k in params:
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-6, atol=1e-6)


def _training_batch(model):
    spec = VisionSpec.from_config(model.config, pad_token_id=151643)
    return collate(*equal_rows(rows=2, grid=(1, 8, 8), text=10, answer=3), spec, pad_multiple=1)


def test_frozen_vision_tower_trains_nothing_inside_it(tiny_model_dir):
    model, params = model_lib.load_model(str(tiny_model_dir))
    config = config_with(**{"actor.model.freeze_vision_tower": True})
    plan = trainable.make_plan(config, model.module)
    before = {k: v.clone() for k, v in params.items()}
    tx, schedule = step_lib.make_optimizer(config, 10, plan)
    state = init_train_state(params, tx, plan.trainable)
    mu = state.opt_state[0].inner_state[1].mu
    assert set(mu) == set(plan.trainable) and not set(mu) & set(plan.frozen)

    graph = {}  # fn name -> whether its output is part of an autograd graph

    def recording(fn, module, p, *args, remat=False, dynamic=False):
        out = fn(module, p, *args)
        graph.setdefault(fn.__name__, set()).add(out.requires_grad)
        return out

    batch = _training_batch(model)
    train_step = step_lib.make_train_step(model, tx, schedule, block_call=recording, trainable=set(plan.trainable))
    for _ in range(2):
        state, metrics = train_step(state, [batch])
    assert graph["vision_block"] == {False}  # autograd recorded nothing in the tower: backward never enters it
    assert graph["decoder_block"] == {True}
    for name in plan.frozen:
        assert torch.equal(state.params[name], before[name]), name
    changed = [n for n in plan.trainable if not torch.equal(state.params[n], before[n])]
    assert len(changed) == len(plan.trainable)


def test_lora_merge_is_the_x_path(skeleton):
    """W + s * B @ A applied as one linear == x @ W^T + s * (x @ A^T) @ B^T, and zero-initialised B changes
    nothing (training starts from the base model exactly)."""
    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(3, 5, generator=g, dtype=torch.float64)
    adapters = lora.init_adapters({"lin.weight": (6, 5)}, ["lin"], 2, seed=0, dtype=torch.float64)
    assert torch.equal(lora.merge({"lin.weight": w, **adapters}, 2.0)["lin.weight"], w)
    b = torch.randn(6, 2, generator=g, dtype=torch.float64)
    merged = lora.merge({"lin.weight": w, "lin.lora_A": adapters["lin.lora_A"], "lin.lora_B": b}, 2.0)
    assert set(merged) == {"lin.weight"}
    torch.testing.assert_close(x @ merged["lin.weight"].T, x @ w.T + 2.0 * (x @ adapters["lin.lora_A"].T) @ b.T)
    assert re.search(lora.DEFAULT_TARGETS, "model.language_model.layers.11.mlp.down_proj")


@pytest.mark.parametrize("fields", [{"actor.model.freeze_vision_tower": True}, {"actor.model.is_lora": True}],
                         ids=["frozen_vision", "lora"])
def test_flop_formula_counts_only_the_work_done(tiny_model_dir, fields):
    """perf.FlopModel for a plan == the FLOPs torch's counter sees in the step's forward and backward."""
    from torch.utils.flop_counter import FlopCounterMode

    from test_perf import CPU_ATTENTION_FLOPS
    from vlm_sft import main as main_lib
    from vlm_sft import perf

    model, params = model_lib.load_model(str(tiny_model_dir))
    plan = trainable.make_plan(config_with(**fields), model.module)
    step_model, params = main_lib.apply_plan(model, params, plan, precision=torch.float32,
                                             compute_dtype=torch.float32, seed=0)
    spec = VisionSpec.from_config(model.config, pad_token_id=151643)
    batch = collate(*equal_rows(rows=3, grid=(1, 16, 8), text=21, answer=5), spec, pad_multiple=1)
    loss_and_grad = step_lib.make_loss_and_grad(step_model, lora.plain_block_call(plan.lora_scale),
                                                set(plan.trainable))
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        loss_and_grad(params, batch, torch.tensor(1.0))
    flop_model = perf.FlopModel.from_model(
        model.config, {k: v.shape for k, v in params.items() if not lora.is_adapter(k)}, model.lm_head_name,
        weight_grads=plan.weight_grads, lora_rank=plan.lora_rank)
    # Exact but for one approximation, in params order: the first adapted layer's k/v projections read the same
    # (gradient-free) input as q but count an input gradient (0.2% here, ~1e-5 of a 3B model's step).
    assert flop_model.batch_flops(batch) == pytest.approx(counter.get_total_flops(), rel=3e-3)


def test_bad_plan_fails_through_the_entry_point_before_the_model_loads(tmp_path, tiny_model_dir, robo2vlm_dir,
                                                                       monkeypatch):
    from vlm_sft import main as main_lib

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was reported")
    monkeypatch.setattr(main_lib.model_lib, "load_model", no_model)
    c = override(load_config("demo"), {
        "runner.logger.log_path": str(tmp_path), "actor.model.model_path": str(tiny_model_dir),
        "data.train_data_paths": str(robo2vlm_dir), "data.eval_data_paths": "",
        "actor.model.freeze": (r"^model\.visual\.blockz\.",)})
    with pytest.raises(ConfigError, match=r"actor.model.freeze entry .*blockz.* matches no parameter"):
        main_lib.run(c, "train")
