"""Several images per row (in prompt order, counted by truncation and the vision precompute) and your own data
formats training exactly like parquet."""
import functools
import json
import subprocess
import sys

import PIL.Image
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from vlm_sft import models as model_lib
from vlm_sft import step as step_lib
from vlm_sft import demo
from vlm_sft.data import sources
from vlm_sft.data.collate import collate_encoded
from vlm_sft.data.encode import Encoder, PromptTooLong
from vlm_sft.data.loader import TrainLoader
from vlm_sft.data.processor import load_processor
from vlm_sft.data.robo2vlm import Example
from vlm_sft.data.vision import VisionSpec
from vlm_sft.state import init_train_state
from configs_loader import CONFIG, load_config

PIXELS = 56 * 56  # every image: a 4x4 patch grid, 4 image tokens
IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
KEYS = dict(prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=["image"])


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    return load_processor(str(tiny_model_dir), min_pixels=PIXELS, max_pixels=PIXELS)


def three_image_example(question):
    images = [PIL.Image.new("RGB", (56, 56), c) for c in ((200, 40, 40), (40, 170, 60), (40, 70, 200))]
    return Example("rows.jsonl:4", "r4", question, ["red", "green", "blue"], 0, images)


def image_blocks(ids):
    """The number of <|image_pad|> tokens between each <|vision_start|> and <|vision_end|>, in order."""
    ids = ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == VISION_START]
    ends = [i for i, t in enumerate(ids) if t == VISION_END]
    assert all(t == IMAGE_PAD for s, e in zip(starts, ends) for t in ids[s + 1:e])
    return [e - s - 1 for s, e in zip(starts, ends)]


def test_truncation_with_three_images_cuts_only_the_question(processor):
    question = "Looking at the three camera views in order, " * 30 + "which colour is in the first view?"
    full = Encoder(processor, max_prompt_length=10_000)(three_image_example(question))
    assert image_blocks(full.input_ids) == [4, 4, 4] and not full.truncated
    limit = full.prompt_length - 100
    cut = Encoder(processor, max_prompt_length=limit)(three_image_example(question))
    assert limit - 3 <= cut.prompt_length <= limit and cut.truncated
    assert image_blocks(cut.input_ids) == [4, 4, 4]  # every image whole, all three before the text
    assert cut.image_grid_thw.tolist() == [[1, 4, 4]] * 3 and torch.equal(cut.pixel_values, full.pixel_values)
    text = processor.tokenizer.decode(cut.input_ids[:cut.prompt_length].tolist())
    assert text.split("<|vision_end|>")[-1].startswith("Looking at the three")
    assert text.endswith("\nChoices:\nA. red\nB. green\nC. blue\n<|im_end|>\n<|im_start|>assistant\n")
    # The images and choices alone (12 image tokens of ~60): no cut can fit, and none is made inside an image.
    with pytest.raises(PromptTooLong, match=r"rows.jsonl:4: prompt is \d+ tokens \(12 image tokens\).*even without "
                                            r"the question"):
        Encoder(processor, max_prompt_length=40)(three_image_example(question))


@pytest.fixture(scope="module")
def multi_rows(tmp_path_factory, processor):
    """Encoded JSONL rows with 1 and 3 images (the answer is the first image's colour; the others differ)."""
    d = demo.make_json_dir(tmp_path_factory.mktemp("multi") / "data", n_train=8, n_test=2, train_files=1,
                              images_per_row=(1, 3), fixed_choices=True)
    source = sources.make_source(sources.find_data_files(str(d), "train"), lazy=True, **KEYS)
    encoder = Encoder(processor, max_prompt_length=256)
    return [encoder(source[i]) for i in range(len(source))]


def hf_forward(hf, batch):
    """transformers' own forward on the same batch (it derives positions and vision indexing itself)."""
    labels = torch.full_like(batch["input_ids"], -100)
    labels.view(-1)[batch["label_index"] + 1] = batch["label_ids"]
    return hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
              pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
              mm_token_type_ids=(batch["input_ids"] == IMAGE_PAD).int(), labels=labels)


def last_image_first(examples):
    """The examples with each row's images rotated (last first): what an image-order bug would feed the model."""
    out = []
    for e in examples:
        n = len(e.image_grid_thw)
        patches = e.pixel_values.view(n, -1, e.pixel_values.shape[-1])
        out.append(type(e)(**{**e.__dict__, "pixel_values": patches[[n - 1, *range(n - 1)]].reshape(
            e.pixel_values.shape)}))
    return out


def test_mixed_one_and_three_image_batch_equals_transformers(tiny_model_dir, processor, multi_rows):
    """Logits at every answer position and the loss, against transformers' own forward.

    A random model's LOSS barely sees its images (it is ~ln(vocab) whatever they are), so the loss alone cannot
    catch an image-order bug; the logits can, and the params are moved off their tiny init (std 0.05 noise, the
    size of trained weights) to make them more so. The test first shows it would catch the bug: rotating the
    images of each row moves the logits by far more than the tolerance. (Training the tiny model a few dozen steps
    instead costs minutes on a shared 2-core CPU.)"""
    model, params = model_lib.load_model(str(tiny_model_dir))
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    spec = VisionSpec.from_config(model.config, processor.tokenizer.pad_token_id)
    rows = multi_rows[:8]
    assert [len(e.image_grid_thw) for e in rows] == [1, 3] * 4
    batch = collate_encoded(rows, spec)
    assert len(batch["image_grid_thw"]) == 16 and len(batch["image_index"]) == 16 * 4

    def logits(b):
        hidden = model_lib.forward_hidden(model, params, b)
        return model_lib.label_logits(model, params, hidden, b["label_index"])

    with torch.no_grad():
        ours = logits(batch)
        rotated = logits(collate_encoded(last_image_first(rows), spec))
    assert (rotated - ours).abs().max() > 1e-2  # > 1000x the tolerance below: an order bug cannot pass

    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(tiny_model_dir), dtype=torch.float32)
    result = hf.load_state_dict(params, strict=False)
    assert not result.unexpected_keys and set(result.missing_keys) <= {"lm_head.weight"}  # tied to the embedding
    hf.train()
    with torch.no_grad():
        out = hf_forward(hf, batch)
    theirs = out.logits.reshape(-1, out.logits.shape[-1])[batch["label_index"]]
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    nll = torch.nn.functional.cross_entropy(ours, batch["label_ids"])
    torch.testing.assert_close(nll, out.loss, rtol=1e-5, atol=1e-5)


def test_parquet_jsonl_base64_and_json_train_to_the_same_losses(tmp_path, tiny_model_dir, processor):
    kw = dict(n_train=8, n_test=2, seed=1)
    dirs = {"parquet": demo.make_robo2vlm_dir(tmp_path / "parquet", **kw),
            "jsonl": demo.make_json_dir(tmp_path / "jsonl", **kw),
            "base64": demo.make_json_dir(tmp_path / "base64", images="base64", **kw),
            "json": demo.make_json_dir(tmp_path / "json", file_format="json", **kw)}
    model, params = model_lib.load_model(str(tiny_model_dir))
    spec = VisionSpec.from_config(model.config, processor.tokenizer.pad_token_id)
    encoder = Encoder(processor, max_prompt_length=256)
    tx, schedule = step_lib.make_optimizer(load_config("demo"), total_steps=2)
    train_step = step_lib.make_train_step(model, tx, schedule)
    losses = {}
    for (name, path), lazy in zip(dirs.items(), (False, True, False, True)):
        source = sources.make_source(sources.find_data_files(str(path), "train"), lazy=lazy, **KEYS)
        loader = TrainLoader(source, encoder, functools.partial(collate_encoded, spec=spec), global_batch_size=2,
                             micro_batch_size=2, seed=3, lazy=lazy)
        state = init_train_state({k: v.clone() for k, v in params.items()}, tx)
        losses[name] = []
        for _, batch in zip(range(2), loader):
            state, metrics = train_step(state, batch.micro_batches)
            losses[name].append(float(metrics["train/loss"]))
    assert len(set(losses["parquet"])) == 2
    assert losses["jsonl"] == losses["parquet"] and losses["base64"] == losses["parquet"]
    assert losses["json"] == losses["parquet"]


def read_losses(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return [line["train/loss"] for line in map(json.loads, f) if "train/loss" in line]


@pytest.mark.slow
def test_cli_trains_jsonl_to_the_parquet_losses(tmp_path, tiny_model_dir):
    """The real entry point on your own data (JSONL, base64 images, lazy, worker processes) against parquet."""
    kw = dict(n_train=16, n_test=2, seed=2)
    data = {"parquet": demo.make_robo2vlm_dir(tmp_path / "parquet", **kw),
            "jsonl": demo.make_json_dir(tmp_path / "jsonl", images="base64", **kw)}
    for name, path in data.items():
        args = [sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo",
                f"--config.runner.logger.log_path={tmp_path / 'runs'}",
                f"--config.runner.logger.experiment_name={name}",
                f"--config.actor.model.model_path={tiny_model_dir}", f"--config.data.train_data_paths={path}",
                "--config.data.eval_data_paths=", "--config.runner.max_steps=3", "--config.actor.global_batch_size=4",
                "--config.actor.micro_batch_size=2", "--config.runner.val_before_train=False",
                "--config.runner.log_interval=1"]
        if name == "jsonl":  # streamed, in worker processes, and evaluated (choice scoring) at the end
            args += ["--config.data.lazy_loading=True", "--config.data.num_workers=2",
                     f"--config.data.eval_data_paths={path}", "--config.eval.generate=False"]
        with open(tmp_path / f"{name}.err", "w") as err:
            code = subprocess.run(args, stdout=subprocess.DEVNULL, stderr=err, timeout=600).returncode
        assert code == 0, (tmp_path / f"{name}.err").read_text()[-3000:]
    parquet, jsonl = read_losses(tmp_path / "runs" / "parquet"), read_losses(tmp_path / "runs" / "jsonl")
    assert len(parquet) == 3 and jsonl == parquet
    with open(tmp_path / "runs" / "jsonl" / "metrics.jsonl") as f:
        evals = [line for line in map(json.loads, f) if "eval/choice_accuracy" in line]
    assert [(e["step"], e["eval/rows"]) for e in evals] == [(3, 2)]
