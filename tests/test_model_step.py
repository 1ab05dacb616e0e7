"""The functional model and train_step against Hugging Face's own model and a plain eager HF training loop."""

import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vlm_sft import models as model_lib
from vlm_sft import step as step_lib
from vlm_sft.data import robo2vlm
from vlm_sft.data.collate import collate, collate_encoded
from vlm_sft.data.encode import Encoder
from vlm_sft.data.processor import load_processor
from vlm_sft.data.vision import VisionSpec
from vlm_sft.state import init_train_state
from configs_loader import load_config

PIXELS = 56 * 56 * 2


@pytest.fixture(scope="module")
def encoded(robo2vlm_dir, tiny_model_dir):
    processor = load_processor(str(tiny_model_dir), min_pixels=PIXELS // 2, max_pixels=PIXELS)
    encoder = Encoder(processor, max_prompt_length=512)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files(str(robo2vlm_dir), "train"))
    return [encoder(source[i]) for i in range(8)], processor


def hf_inputs(batch: dict) -> dict:
    """The same batch as HF's forward takes it (HF derives mrope positions and vision indexing itself)."""
    labels = torch.full_like(batch["input_ids"], -100)
    flat = labels.view(-1)
    flat[batch["label_index"] + 1] = batch["label_ids"]
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                mm_token_type_ids=(batch["input_ids"] == 151655).int(), labels=labels)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_model_dir_untied"])
def test_loss_and_grads_equal_hf_forward(fixture, request, encoded):
    path = str(request.getfixturevalue(fixture))
    model, params = model_lib.load_model(path)
    assert model.tied == (fixture == "tiny_model_dir")
    examples, processor = encoded
    spec = VisionSpec.from_config(model.config, processor.tokenizer.pad_token_id)
    batch = collate_encoded(examples[:3], spec)
    assert len(batch["image_grid_thw"]) == 3 and batch["label_ids"].numel() > 3

    leaves = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    nll = model_lib.token_nll(model, leaves, batch)
    assert nll.shape == batch["label_ids"].shape  # lm_head only at labelled positions
    ours = nll.mean()
    grads = torch.autograd.grad(ours, list(leaves.values()))

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    hf.train()
    loss = hf(**hf_inputs(batch)).loss
    loss.backward()
    torch.testing.assert_close(ours, loss, rtol=1e-5, atol=1e-5)
    hf_grads = dict(hf.named_parameters())
    for (name, g) in zip(leaves, grads):
        torch.testing.assert_close(g, hf_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)


def test_train_step_equals_eager_hf_loop(tiny_model_dir, encoded):
    """Two steps of 2 micro-batches: AdamW + clipping + schedule vs HF forward with labels, torch.optim.AdamW."""
    examples, processor = encoded
    model, params = model_lib.load_model(str(tiny_model_dir))
    spec = VisionSpec.from_config(model.config, processor.tokenizer.pad_token_id)
    micro = [[collate_encoded(examples[0:2], spec), collate_encoded(examples[2:4], spec)],
             [collate_encoded(examples[4:6], spec), collate_encoded(examples[6:8], spec)]]

    config = load_config("demo")
    config.actor.optim.lr = 1e-2
    config.actor.optim.lr_warmup_steps = 1
    config.actor.optim.weight_decay = 0.01
    config.actor.optim.clip_grad = 0.5
    tx, schedule = step_lib.make_optimizer(config, total_steps=4)
    train_step = step_lib.make_train_step(model, tx, schedule)
    state = init_train_state({k: v.clone() for k, v in params.items()}, tx)

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    hf.train()
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: schedule(s) / 1e-2)
    for batches in micro:
        state, metrics = train_step(state, batches)
        opt.zero_grad()
        losses = []
        for b in batches:
            loss = hf(**hf_inputs(b)).loss
            (loss / len(batches)).backward()
            losses.append(loss.item())
        norm = torch.nn.utils.clip_grad_norm_(hf.parameters(), 0.5)
        lr = opt.param_groups[0]["lr"]
        opt.step()
        sched.step()
        assert float(metrics["train/loss"]) == pytest.approx(sum(losses) / len(losses), abs=1e-5)
        assert float(metrics["train/grad_norm"]) == pytest.approx(float(norm), rel=1e-4)
        assert float(metrics["train/learning_rate"]) == pytest.approx(lr, rel=1e-6)
    assert int(state.step) == 2
    for name, p in hf.named_parameters():
        torch.testing.assert_close(state.params[name], p.detach(), rtol=1e-4, atol=2e-5, msg=name)


def test_nonfinite_gradient_skips_the_update(tiny_model_dir, encoded):
    examples, processor = encoded
    model, params = model_lib.load_model(str(tiny_model_dir))
    spec = VisionSpec.from_config(model.config, processor.tokenizer.pad_token_id)
    tx, schedule = step_lib.make_optimizer(load_config("demo"), total_steps=4)
    before = {k: v.clone() for k, v in params.items()}
    poisoned = dict(params)
    poisoned["model.language_model.norm.weight"] = torch.full_like(params["model.language_model.norm.weight"],
                                                                   float("inf"))
    state = init_train_state(poisoned, tx)
    state, metrics = step_lib.make_train_step(model, tx, schedule)(state, [collate_encoded(examples[:2], spec)])
    assert float(metrics["train/skipped_update"]) == 1.0
    for k in before:
        if k != "model.language_model.norm.weight":
            assert torch.equal(state.params[k], before[k]), k


def test_missing_model_dir_is_a_clear_error(tmp_path):
    with pytest.raises(model_lib.ModelLoadError, match="actor.model.model_path.*no such directory"):
        model_lib.check_model_dir(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(model_lib.ModelLoadError, match="no config.json"):
        model_lib.check_model_dir(str(tmp_path / "empty"))


def test_micro_batch_without_images_trains_with_zero_vision_grads(tiny_model_dir, encoded):
    """Text-only rows (a JSONL set without image keys, say) reach no vision param: their gradients are zeros, not
    an autograd error, and a step mixing such a micro-batch with one holding images trains."""
    examples, processor = encoded
    model, params = model_lib.load_model(str(tiny_model_dir))
    spec = VisionSpec.from_config(model.config, processor.tokenizer.pad_token_id)
    ids = torch.tensor(processor.tokenizer("Which colour is the sky? Answer: blue")["input_ids"])
    labels = torch.full_like(ids, -100)
    labels[-2:] = ids[-2:]
    text_only = collate([(ids, labels)], [torch.empty(0, 1176)], [torch.empty(0, 3, dtype=torch.long)], spec)
    assert "pixel_values" not in text_only
    loss, grads = step_lib.make_loss_and_grad(model)(params, text_only, torch.ones(()))
    assert torch.isfinite(loss)
    vision = [k for k in grads if k.startswith("model.visual.")]
    assert vision and all(not grads[k].any() for k in vision)
    assert any(grads[k].any() for k in grads if k.startswith("model.language_model."))
    tx, schedule = step_lib.make_optimizer(load_config("demo"), total_steps=4)
    state = init_train_state(dict(params), tx)
    state, metrics = step_lib.make_train_step(model, tx, schedule)(
        state, [text_only, collate_encoded(examples[:2], spec)])
    assert float(metrics["train/skipped_update"]) == 0.0 and int(state.step) == 1
