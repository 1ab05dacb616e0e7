"""Qwen3-VL's functional forward against transformers' Qwen3VLForConditionalGeneration, on a tiny model trained
first (a random model's loss is ~ln(vocab) whatever the positions or image order: it cannot catch those bugs)."""
import json

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import Qwen3VLForConditionalGeneration

import fixtures
from vlm_sft import compile as compile_lib
from vlm_sft import models as model_lib
from vlm_sft import optim
from vlm_sft import sharding
from vlm_sft import step as step_lib
from vlm_sft.state import init_train_state
from configs_loader import load_config
from vlm_sft.data.collate import collate

IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, PAD = 151644, 151645, 151652, 151653, 151655, 151643
PATCH_DIM = 3 * 2 * 16 * 16
COLOUR_TOKENS = (1000, 2000, 3000, 4000)
COLOUR_PATTERNS = torch.randn(len(COLOUR_TOKENS), PATCH_DIM, generator=torch.Generator().manual_seed(123))
# Several images per row, of different, non-square patch grids (t, h, w); two rows share no grid.
ROWS = [[(1, 4, 6), (1, 6, 4)], [(1, 2, 8)], [(1, 8, 2), (1, 4, 4), (1, 2, 6)], [(1, 6, 8)]]


def make_batch(g: torch.Generator, spec, rows: list[list[tuple[int, int, int]]], **collate_kwargs
               ) -> dict[str, torch.Tensor]:
    """Each image is one colour (plus noise); the answer names the colours of the row's images in order, so a
    trained model's loss depends on every image and on their order."""
    sequences, pixels, grids = [], [], []
    for row in rows:
        ids, answer, row_pixels = [IM_START], [], []
        for t, h, w in row:
            colour = int(torch.randint(len(COLOUR_TOKENS), (), generator=g))
            ids += [VISION_START] + [IMAGE_PAD] * (t * h * w // 4) + [VISION_END]
            row_pixels.append(COLOUR_PATTERNS[colour] + 0.3 * torch.randn(t * h * w, PATCH_DIM, generator=g))
            answer.append(COLOUR_TOKENS[colour])
        ids += torch.randint(100, 900, (int(torch.randint(3, 8, (), generator=g)),), generator=g).tolist()
        target = answer + [IM_END]
        sequences.append((torch.tensor(ids + target), torch.tensor([-100] * len(ids) + target)))
        pixels.append(torch.cat(row_pixels))
        grids.append(torch.tensor(row))
    return collate(sequences, pixels, grids, spec, **collate_kwargs)


def hf_inputs(batch: dict) -> dict:
    labels = torch.full_like(batch["input_ids"], -100)
    labels.view(-1)[batch["label_index"] + 1] = batch["label_ids"]
    images = {k: batch[k] for k in ("pixel_values", "image_grid_thw") if k in batch}
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **images,
                mm_token_type_ids=(batch["input_ids"] == IMAGE_PAD).int(), labels=labels)


def assert_equals_hf(model: model_lib.Model, params: dict, hf: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Our loss and gradients == HF's forward with labels on the same params (both in float64:
    fixtures.in_float64); returns the loss in fp32."""
    leaves, hf, batch = fixtures.in_float64(params, hf, batch)
    nll = model_lib.token_nll(model, leaves, batch)
    assert nll.shape == batch["label_ids"].shape
    ours = nll.mean()
    grads = torch.autograd.grad(ours, list(leaves.values()), materialize_grads=True)  # text only: no vision
    hf.zero_grad()
    loss = hf(**hf_inputs(batch)).loss
    loss.backward()
    torch.testing.assert_close(ours, loss, rtol=1e-5, atol=1e-5)
    hf_params = dict(hf.named_parameters())
    for name, g in zip(leaves, grads):
        theirs = hf_params[name].grad
        torch.testing.assert_close(g, torch.zeros_like(g) if theirs is None else theirs, rtol=1e-5, atol=1e-5,
                                   msg=lambda m: f"{name}: {m}")
    return loss.detach().float()


@pytest.fixture(scope="module")
def trained(tiny_qwen3_vl_dir):
    """The tiny Qwen3-VL after 30 AdamW steps on colour-naming batches, loaded into HF's module. The mergers'
    output projections start 10x larger, so the few steps already make the text read the images. (Our step, not
    HF's loop: the lm_head only at the labels is several times faster than full-vocabulary logits.)"""
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir))
    params = {k: v * 10 if "merger" in k and "linear_fc2" in k else v.clone() for k, v in params.items()}
    spec = model.vision_spec(PAD)
    tx = optim.adamw(1e-2, max_grad_norm=1.0)
    state = init_train_state(params, tx)
    train_step = step_lib.make_train_step(model, tx, lambda step: torch.tensor(1e-2))
    g = torch.Generator().manual_seed(0)
    losses = []
    for step in range(30):
        state, metrics = train_step(state, [make_batch(g, spec, [ROWS[(step + i) % len(ROWS)] for i in range(4)])])
        losses.append(float(metrics["train/loss"]))
    hf = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_qwen3_vl_dir), dtype=torch.float32)
    hf.load_state_dict(state.params, strict=False)  # tied: lm_head.weight is the embedding
    hf.train()
    return hf, spec, losses


def test_loss_and_grads_equal_hf_on_a_trained_model(trained):
    hf, spec, losses = trained
    model, params = model_lib.model_from_module(hf, model_lib.family_named("qwen3_vl"))
    hf.requires_grad_(True)
    batch = make_batch(torch.Generator().manual_seed(1), spec, ROWS)
    assert len(batch["image_grid_thw"]) == 7 and "window_index" not in batch
    loss = assert_equals_hf(model, params, hf, batch)
    assert float(loss) < 0.5 * losses[0], losses  # trained: the answer depends on the images

    # The 1e-5 check has teeth: an image-order or a position bug moves the trained model's loss 10x more (a
    # random model's loss, ~ln(vocab), would hardly move).
    swapped = dict(batch, image_index=batch["image_index"].flip(0))
    transposed = dict(batch, position_ids=batch["position_ids"][[0, 2, 1]])  # h and w of the images swapped
    with torch.no_grad():
        for wrong in (swapped, transposed):
            moved = abs(float(model_lib.token_nll(model, params, wrong).mean()) - float(loss))
            assert moved > 1e-4, moved


def test_untied_lm_head_equals_hf(tiny_qwen3_vl_dir_untied):
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir_untied))
    assert not model.tied and model.lm_head_name == "lm_head.weight"
    assert model.family.name == "qwen3_vl"
    hf = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_qwen3_vl_dir_untied), dtype=torch.float32)
    hf.train()
    assert_equals_hf(model, params, hf, make_batch(torch.Generator().manual_seed(2), model.vision_spec(PAD),
                                                   ROWS[:2]))


def test_text_only_batch_equals_hf(tiny_qwen3_vl_dir_untied):
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir_untied))
    hf = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_qwen3_vl_dir_untied), dtype=torch.float32)
    hf.train()
    g = torch.Generator().manual_seed(6)
    sequences = []
    for n in (9, 14):
        ids = torch.randint(100, 900, (n,), generator=g)
        sequences.append((ids, torch.cat([torch.full((n - 3,), -100), ids[-3:]])))
    batch = collate(sequences, [torch.zeros(0, PATCH_DIM)] * 2, [torch.zeros(0, 3, dtype=torch.long)] * 2,
                    model.vision_spec(PAD))
    assert "pixel_values" not in batch
    assert_equals_hf(model, params, hf, batch)


def test_param_groups_cover_every_param(tiny_qwen3_vl_dir):
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir))
    assert sorted(n for names in model.groups.values() for n in names) == sorted(params)
    vision = model.config.vision_config
    assert {f"model.visual.deepstack_merger_list.{j}." for j in range(len(vision.deepstack_visual_indexes))} <= \
        set(model.groups)
    assert {"model.visual.pos_embed.", "model.visual.patch_embed.", "model.visual.merger.",
            "model.language_model.layers.0.", "model.visual.blocks.0."} <= set(model.groups)


@pytest.mark.parametrize("model_type", ["qwen3_omni_moe", "llava"])
def test_unsupported_model_directory_is_one_line_listing_the_families(tmp_path, tiny_qwen3_vl_dir, model_type):
    config = json.loads((tiny_qwen3_vl_dir / "config.json").read_text())
    config["model_type"] = model_type
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(model_lib.ModelLoadError) as e:
        model_lib.check_model_dir(str(tmp_path), "qwen3_vl")
    assert f"model_type is {model_type!r}; vlm-sft supports 'qwen2.5_vl' (config.json model_type 'qwen2_5_vl'), " \
           "'qwen3_vl' (config.json model_type 'qwen3_vl'), 'qwen3_vl_moe' (config.json model_type " \
           "'qwen3_vl_moe'), 'qwen3_5' (config.json model_type 'qwen3_5'), 'qwen3_5_moe' (config.json model_type " \
           "'qwen3_5_moe')" in str(e.value)
    assert "\n" not in str(e.value)
    assert model_lib.check_model_dir(str(tiny_qwen3_vl_dir), "qwen3_vl").name == "qwen3_vl"
    with pytest.raises(model_lib.ModelLoadError, match="actor.model.model_type='qwen2.5_vl' but .* 'qwen3_vl'"):
        model_lib.check_model_dir(str(tiny_qwen3_vl_dir), "qwen2.5_vl")


# --------------------------------------------------------------------------------------------------------------
# Sharding (a mesh of one here; 2 gloo ranks in test_distributed.py) and compile.

@pytest.mark.parametrize("strategy", ["no_shard", "full_shard", "hybrid_shard"])
def test_sharded_and_checkpointed_loss_and_grads_equal_the_plain_model(device, tiny_qwen3_vl_dir, strategy):
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir))
    batch = make_batch(torch.Generator().manual_seed(3), model.vision_spec(PAD), ROWS[:2])
    ref_loss, ref_grads = step_lib.make_loss_and_grad(model)({k: v.clone() for k, v in params.items()}, batch,
                                                            torch.ones(()))
    c = load_config("demo")
    c.actor.fsdp_config.sharding_strategy = strategy
    spec = sharding.make_sharding(c, device)
    sharded = sharding.shard_model(model, params, spec)
    for checkpointing in (False, True):
        block_call = sharding.make_block_call(spec, checkpointing=checkpointing)
        loss, grads = step_lib.make_loss_and_grad(model, block_call)(sharded, batch, torch.ones(()))
        torch.testing.assert_close(loss, ref_loss, rtol=0, atol=1e-6)
        for k, g in grads.items():
            assert g.placements == sharding.param_placements(strategy), k
            torch.testing.assert_close(g.full_tensor(), ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)


def test_forward_has_no_graph_breaks(tiny_qwen3_vl_dir):
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir))
    batch = make_batch(torch.Generator().manual_seed(4), model.vision_spec(PAD), ROWS[:2])
    explained = torch._dynamo.explain(model_lib.token_nll)(model, params, batch)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.slow
def test_compiled_step_has_no_recompiles_across_image_sizes(tiny_qwen3_vl_dir):
    """After one warm-up step, batches of other image counts and sizes (one length bucket) compile nothing, and
    the losses equal eager."""
    model, params = model_lib.load_model(str(tiny_qwen3_vl_dir))
    spec = model.vision_spec(PAD)
    g = torch.Generator().manual_seed(5)
    steps = [[make_batch(g, spec, [ROWS[(i + j) % len(ROWS)] for j in range(2)], length_buckets=(64,),
                         pad_labels=True)] for i in range(4)]
    assert len({b["pixel_values"].shape[0] for step in steps for b in step}) == 4

    def run(compile: bool) -> list[float]:
        tx = optim.adamw(1e-3, max_grad_norm=1.0)
        state = init_train_state({k: v.clone() for k, v in params.items()}, tx)
        block_call = compile_lib.make_block_call(compile=compile)
        train_step = step_lib.make_train_step(model, tx, lambda step: torch.tensor(1e-3), compile=compile,
                                              block_call=block_call)
        losses = []
        for i, micro_batches in enumerate(steps):
            state, metrics = train_step(state, micro_batches)
            losses.append(float(metrics["train/loss"]))
            if i == 0 and compile:
                graphs = counters["stats"]["unique_graphs"]
        if compile:
            assert counters["stats"]["unique_graphs"] == graphs, "a warm pass recompiled"
            assert counters["graph_break"] == {}
        return losses

    eager = run(False)
    counters.clear()
    torch._dynamo.reset()
    torch.testing.assert_close(torch.tensor(run(True)), torch.tensor(eager), atol=1e-5, rtol=0)
