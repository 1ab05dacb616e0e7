"""Qwen3.5's processing from its directory: special-token ids (248k vocabulary, not Qwen2.5's), its thinking chat
template as the Hub renders it, answer-only labels, and the image tokens the model scatters into."""
import dataclasses

import PIL.Image
import pytest

from vlm_sft import models as model_lib
from vlm_sft.data import encode as encode_lib
from vlm_sft.data import processor as processor_lib
from vlm_sft.data.collate import collate


@dataclasses.dataclass
class Example:  # the fields of vlm_sft.data.robo2vlm.Example
    source: str
    id: str
    question: str
    choices: list[str]
    answer_index: int
    images: list[PIL.Image.Image]


@pytest.fixture(scope="module")
def processor(tiny_qwen3_5_dir):
    return processor_lib.load_processor(tiny_qwen3_5_dir, min_pixels=64 * 64, max_pixels=64 * 64)


def test_special_tokens_come_from_the_directory(processor, tiny_qwen3_5_dir):
    tok = processor.tokenizer
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                                     "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"])
    assert ids == [248044, 248045, 248046, 248053, 248054, 248056, 248057, 248068, 248069]
    assert (tok.pad_token_id, tok.eos_token_id) == (248044, 248046)
    assert processor.image_token_id == 248056
    model_config = model_lib.load_model(str(tiny_qwen3_5_dir))[0].config
    assert (model_config.image_token_id, model_config.text_config.vocab_size) == (248056, 248320)
    # Plain text still encodes with Qwen's BPE (the fixture's stand-in for the 248k merges), specials atomically.
    assert tok.decode(tok("<|im_start|>user\nHi<think>", add_special_tokens=False)["input_ids"]) == \
        "<|im_start|>user\nHi<think>"


def test_chat_template_renders_thinking_as_the_hub_does(processor):
    user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?\nChoices:\nA. x\n"}]}]
    render = lambda messages, **kw: processor.apply_chat_template(messages, tokenize=False, **kw)  # noqa: E731
    head = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Q?\nChoices:\nA. x<|im_end|>\n"
    assert render(user, add_generation_prompt=True) == head + "<|im_start|>assistant\n<think>\n"
    assert render(user, add_generation_prompt=True, enable_thinking=False) == \
        head + "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    answer = [{"role": "assistant", "content": "A. x"}]
    assert render(user + answer) == head + "<|im_start|>assistant\n<think>\n\n</think>\n\nA. x<|im_end|>\n"
    thought = [{"role": "assistant", "content": "<think>\nIt is x.\n</think>\n\nA. x"}]
    assert render(user + thought) == head + "<|im_start|>assistant\n<think>\nIt is x.\n</think>\n\nA. x<|im_end|>\n"


def test_encoder_labels_only_the_answer_after_the_empty_think_block(processor, tiny_qwen3_5_dir):
    encoder = encode_lib.Encoder(processor, max_prompt_length=256)
    example = Example("train-00000-of-00001.parquet:3", "3", "What colour is the block?", ["red", "blue"], 1,
                      [PIL.Image.new("RGB", (64, 48), (40, 70, 200))])
    enc = encoder(example)
    tok = processor.tokenizer
    prompt = tok.decode(enc.input_ids[:enc.prompt_length].tolist())
    assert enc.image_grid_thw.tolist() == [[1, 4, 4]]  # 64x64 budget, patch 16 -> 4x4 patches -> 4 tokens
    assert prompt == ("<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
                      "What colour is the block?\nChoices:\nA. red\nB. blue<|im_end|>\n"
                      "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    labelled = enc.labels[enc.labels != encode_lib.IGNORE_INDEX]
    assert tok.decode(labelled.tolist()) == "B. blue<|im_end|>" and int(labelled[-1]) == 248046
    assert (enc.labels[:enc.prompt_length] == encode_lib.IGNORE_INDEX).all()
    # collate finds the image tokens by the directory's id (248056), where the vision features go.
    spec = model_lib.load_model(str(tiny_qwen3_5_dir))[0].vision_spec(tok.pad_token_id)
    batch = collate([(enc.input_ids, enc.labels)], [enc.pixel_values], [enc.image_grid_thw], spec)
    assert batch["input_ids"].view(-1)[batch["image_index"]].tolist() == [248056] * 4
