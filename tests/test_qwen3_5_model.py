"""Qwen3.5's functional forward (models/qwen3_5.py) against transformers' Qwen3_5ForConditionalGeneration, on a
tiny hybrid model (3 Gated DeltaNet layers + 1 gated attention layer) trained first: a random model's loss is
~ln(vocab) whatever the positions or image order, so it could not catch those bugs."""
import json

import pytest
import torch
from transformers import Qwen3_5ForConditionalGeneration

import fixtures
from configs_loader import load_config
from vlm_sft import compile as compile_lib
from vlm_sft import models as model_lib
from vlm_sft import optim, sharding
from vlm_sft import step as step_lib
from vlm_sft.data.collate import collate
from vlm_sft.demo import qwen3_5 as hub
from vlm_sft.models import qwen3_5
from vlm_sft.state import init_train_state

IM_START, IM_END, PAD = hub.SPECIAL_BASE + 1, hub.SPECIAL_BASE + 2, hub.SPECIAL_BASE
VISION_START, VISION_END, IMAGE_PAD = hub.VISION_START_ID, hub.VISION_END_ID, hub.IMAGE_TOKEN_ID
PATCH_DIM = 3 * 2 * 16 * 16
COLOUR_TOKENS = (1000, 2000, 3000, 4000)
COLOUR_PATTERNS = torch.randn(len(COLOUR_TOKENS), PATCH_DIM, generator=torch.Generator().manual_seed(123))
ROWS = [[(1, 4, 6), (1, 6, 4)], [(1, 2, 8)], [(1, 8, 2), (1, 4, 4), (1, 2, 6)], [(1, 6, 8)]]


def make_batch(g: torch.Generator, spec, rows, **collate_kwargs) -> dict[str, torch.Tensor]:
    """Each image is one colour (plus noise); the answer names the row's colours in order."""
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


def assert_equals_hf(model, params, hf, batch) -> torch.Tensor:
    """Our loss and every gradient == HF's forward with labels on the same params (both in float64:
    fixtures.in_float64); returns the loss in fp32."""
    leaves, hf, batch = fixtures.in_float64(params, hf, batch)
    ours = model_lib.token_nll(model, leaves, batch).mean()
    grads = torch.autograd.grad(ours, list(leaves.values()), materialize_grads=True)
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
def trained(tiny_qwen3_5_dir):
    """The tiny Qwen3.5 after 30 AdamW steps on colour-naming batches (a plain loop over our step), loaded into
    HF's module. ~40 s on 2 cores (the 248k-row embedding's update dominates)."""
    model, params = model_lib.load_model(str(tiny_qwen3_5_dir))
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
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(str(tiny_qwen3_5_dir), dtype=torch.float32)
    hf.load_state_dict(state.params, strict=False)  # tied: lm_head.weight is the embedding
    hf.train()
    return hf, spec, losses


@pytest.mark.slow
def test_loss_and_grads_equal_hf_on_a_trained_model(trained):
    hf, spec, losses = trained
    model, params = model_lib.model_from_module(hf, model_lib.family_named("qwen3_5"))
    assert set(hf.config.text_config.layer_types) == {"linear_attention", "full_attention"}
    hf.requires_grad_(True)
    batch = make_batch(torch.Generator().manual_seed(1), spec, ROWS)
    loss = assert_equals_hf(model, params, hf, batch)
    assert float(loss) < 0.5 * losses[0], losses

    # The check has teeth: reversing the image order, or shifting one row's positions after its images (a shift
    # of a whole row leaves relative rope unchanged), moves the trained loss >10x the tolerance (measured: 0.16
    # and 2e-3).
    swapped = dict(batch, image_index=batch["image_index"].flip(0))
    shifted_positions = batch["position_ids"].clone()
    after_images = int((batch["input_ids"][0] == VISION_END).nonzero().max())
    shifted_positions[:, 0, after_images:] += 7
    shifted = dict(batch, position_ids=shifted_positions)
    with torch.no_grad():
        for wrong in (swapped, shifted):
            moved = abs(float(model_lib.token_nll(model, params, wrong).mean()) - float(loss))
            assert moved > 1e-4, moved


def test_untied_model_with_images_and_long_text_equals_hf(tmp_path):
    """Untied lm_head (the 9B's), images, and a text row spanning two delta-rule chunks beside a short one
    right-padded to it: loss and every gradient equal HF's."""
    d = hub.make_tiny_qwen3_5_dir(tmp_path / "untied", seed=1, tie_word_embeddings=False)
    model, params = model_lib.load_model(d)
    assert not model.tied and model.lm_head_name == "lm_head.weight"
    hf = Qwen3_5ForConditionalGeneration.from_pretrained(d, dtype=torch.float32)
    hf.train()
    spec = model.vision_spec(PAD)
    batch = make_batch(torch.Generator().manual_seed(2), spec, ROWS[:2])
    assert_equals_hf(model, params, hf, batch)
    g = torch.Generator().manual_seed(6)
    sequences = []
    for n in (9, 70):
        ids = torch.randint(100, 900, (n,), generator=g)
        sequences.append((ids, torch.cat([torch.full((n - 3,), -100), ids[-3:]])))
    batch = collate(sequences, [torch.zeros(0, PATCH_DIM)] * 2, [torch.zeros(0, 3, dtype=torch.long)] * 2, spec)
    assert "pixel_values" not in batch
    assert_equals_hf(model, params, hf, batch)


def test_param_groups_and_block_kinds(tiny_qwen3_5_dir):
    model, params = model_lib.load_model(str(tiny_qwen3_5_dir))
    assert sorted(n for names in model.groups.values() for n in names) == sorted(params)
    assert {"model.visual.pos_embed.", "model.visual.merger.", "model.language_model.layers.0.",
            "model.language_model.layers.3."} <= set(model.groups)
    assert not any("deepstack" in n for n in params)
    assert "model.language_model.layers.0.linear_attn.in_proj_qkv.weight" in params
    assert "model.language_model.layers.3.self_attn.q_proj.weight" in params
    shape = model.family.flop_shape(model.config)
    assert shape.text_layers == 1 and shape.merger_prefixes == ("model.visual.merger.",)  # only full layers attend


def test_unknown_layer_kind_is_refused_before_loading(tmp_path, tiny_qwen3_5_dir):
    config = json.loads((tiny_qwen3_5_dir / "config.json").read_text())
    config["text_config"]["layer_types"][0] = "sliding_attention"
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(model_lib.ModelLoadError, match="layer_types holds \\['sliding_attention'\\]"):
        model_lib.check_model_dir(str(tmp_path), "qwen3_5")
    with pytest.raises(model_lib.ModelLoadError, match="actor.model.model_type='qwen3_vl' but .* 'qwen3_5'"):
        model_lib.check_model_dir(str(tiny_qwen3_5_dir), "qwen3_vl")


@pytest.mark.parametrize("strategy", ["no_shard", "full_shard"])
def test_sharded_and_checkpointed_loss_and_grads_equal_the_plain_model(device, tiny_qwen3_5_dir, strategy):
    model, params = model_lib.load_model(str(tiny_qwen3_5_dir))
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
            torch.testing.assert_close(g.full_tensor(), ref_grads[k], rtol=1e-5, atol=1e-6, msg=k)


@pytest.mark.slow
def test_compiled_step_uses_one_region_per_block_kind_and_equals_eager(tiny_qwen3_5_dir):
    model, params = model_lib.load_model(str(tiny_qwen3_5_dir))
    spec = model.vision_spec(PAD)
    g = torch.Generator().manual_seed(5)
    steps = []  # text only (the vision regions are Qwen3-VL's, compiled in its tests): two batches, one bucket
    for i in range(2):
        sequences = [(ids, torch.cat([torch.full((n - 3,), -100), ids[-3:]]))
                     for n in (20 + i, 50) for ids in [torch.randint(100, 900, (n,), generator=g)]]
        steps.append([collate(sequences, [torch.zeros(0, PATCH_DIM)] * 2, [torch.zeros(0, 3, dtype=torch.long)] * 2,
                              spec, length_buckets=(64,), pad_labels=True)])

    def run(compile: bool):
        tx = optim.adamw(1e-3, max_grad_norm=1.0)
        state = init_train_state({k: v.clone() for k, v in params.items()}, tx)
        block_call = compile_lib.make_block_call(compile=compile)
        train_step = step_lib.make_train_step(model, tx, lambda step: torch.tensor(1e-3), compile=compile,
                                              block_call=block_call)
        losses = [float(train_step(state, b)[1]["train/loss"]) for b in steps]
        return losses, block_call

    eager, _ = run(False)
    torch._dynamo.reset()
    compiled, block_call = run(True)
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), atol=1e-5, rtol=0)
    text = model.module.model.language_model
    decoder_regions = {(fn, module) for fn, module in block_call.regions if module in set(text.layers)}
    assert decoder_regions == {(qwen3_5.linear_decoder_block, text.layers[0]),
                               (model_lib.common.decoder_block, text.layers[3])}


def test_a_packed_row_equals_its_sequences_one_at_a_time(tiny_qwen3_5_dir):
    """Packed (one row of several sequences with cu_seqlens / row_ids and per-sequence positions): the Gated
    DeltaNet layers restart their conv and state and the gated attention stays within each sequence, so the
    hidden states equal each sequence's alone; read as one sequence, the earlier ones leak into the later."""
    model, params = model_lib.load_model(str(tiny_qwen3_5_dir))
    spec = model.vision_spec(PAD)
    g = torch.Generator().manual_seed(8)
    alone, parts = [], []
    for n in (9, 3, 70):  # the 3-token sequence is shorter than the conv window; the 70 spans two chunks
        ids = torch.randint(100, 900, (n,), generator=g)
        b = collate([(ids, ids)], [torch.zeros(0, PATCH_DIM)], [torch.zeros(0, 3, dtype=torch.long)], spec)
        parts.append(b)
        with torch.no_grad():
            alone.append(model_lib.forward_hidden(model, params, b)[0])
    lengths = [p["input_ids"].shape[1] for p in parts]
    packed = {
        "input_ids": torch.cat([p["input_ids"] for p in parts], dim=1),
        "attention_mask": torch.cat([p["attention_mask"] for p in parts], dim=1),
        "position_ids": torch.cat([p["position_ids"] for p in parts], dim=2),
        # as the packing collate writes it: a static entry count, trailing repeats are empty sequences
        "cu_seqlens": torch.tensor([0] + torch.cumsum(torch.tensor(lengths), 0).tolist() + [sum(lengths)] * 4,
                                   dtype=torch.int32),
        "row_ids": torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1),
    }
    with torch.no_grad():
        ours = model_lib.forward_hidden(model, params, packed)[0]
        torch.testing.assert_close(ours, torch.cat(alone), rtol=1e-5, atol=1e-5)
        unpacked = {k: v for k, v in packed.items() if k not in ("cu_seqlens", "row_ids")}
        leaked = model_lib.forward_hidden(model, params, unpacked)[0]
    assert (leaked[lengths[0]:] - torch.cat(alone)[lengths[0]:]).abs().max() > 1e-3


def test_with_cuda_kernels_the_linear_blocks_run_eagerly_under_compile(monkeypatch):
    """Where the fla / causal-conv1d kernels would run (CUDA), the linear-attention block is the compile-disabled
    one (dynamo skips it; compile.py's fullgraph regions cannot fail on it); on CPU the plain, compiled one."""
    from vlm_sft.models import linear_attention
    assert qwen3_5.block_fns(torch.device("cpu"), packed=False) is qwen3_5.BLOCK_FNS
    monkeypatch.setattr(linear_attention, "kernel_path", lambda device: {"conv": False, "delta_rule": True})
    for packed, plain in ((False, qwen3_5.BLOCK_FNS), (True, qwen3_5.PACKED_BLOCK_FNS)):
        fns = qwen3_5.block_fns(torch.device("cpu"), packed=packed)
        assert fns["full_attention"] is plain["full_attention"]
        assert fns["linear_attention"] is not plain["linear_attention"]
        assert fns["linear_attention"].__wrapped__ is plain["linear_attention"]  # the same block, not compiled
