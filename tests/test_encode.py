"""Encoder: RLinf's prompt and target, answer-only labels, image token expansion and prompt truncation."""
import ast
import copy
import dataclasses
import io
import pickle

import PIL.Image
import pyarrow.parquet as pq
import pytest
import torch

from vlm_sft.data import encode as encode_lib
from vlm_sft.data import processor as processor_lib

IMAGE_PAD = 151655


@dataclasses.dataclass
class Example:  # the fields of vlm_sft.data.robo2vlm.Example
    source: str
    id: str
    question: str
    choices: list[str]
    answer_index: int
    images: list[PIL.Image.Image]


def _example(question="Is the gripper open?", choices=("No", "Yes"), answer_index=1, images=None,
             source="train-00000-of-00002.parquet:7"):
    images = images if images is not None else [PIL.Image.new("RGB", (64, 48), (200, 40, 40))]
    return Example(source, "ex7", question, list(choices), answer_index, images)


@pytest.fixture(scope="module")
def encoder(tiny_processor):
    return encode_lib.Encoder(tiny_processor, max_prompt_length=1024)


def _decode(processor, ids):
    return processor.tokenizer.decode(ids.tolist())


def test_prompt_matches_rlinf_character_for_character(encoder, tiny_processor):
    enc = encoder(_example())
    # 64x48 rounds to 56x56 (multiples of 28) -> 4x4 patches of 14 -> 4 merged image tokens.
    assert enc.image_grid_thw.tolist() == [[1, 4, 4]]
    assert _decode(tiny_processor, enc.input_ids[:enc.prompt_length]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
        "Is the gripper open?\nChoices:\nA. No\nB. Yes\n<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert enc.target_text == "B. Yes" and enc.answer_index == 1
    assert enc.source == "train-00000-of-00002.parquet:7"


def test_labels_cover_exactly_the_answer_and_im_end(encoder, tiny_processor):
    enc = encoder(_example())
    assert enc.input_ids.dtype == enc.labels.dtype == torch.long
    assert enc.input_ids.shape == enc.labels.shape
    assert (enc.labels[:enc.prompt_length] == -100).all()
    assert torch.equal(enc.labels[enc.prompt_length:], enc.input_ids[enc.prompt_length:])
    assert _decode(tiny_processor, enc.labels[enc.labels != -100]) == "B. Yes<|im_end|>"
    assert [_decode(tiny_processor, t) for t in enc.choice_targets] == ["A. No<|im_end|>", "B. Yes<|im_end|>"]
    assert torch.equal(enc.choice_targets[1], enc.input_ids[enc.prompt_length:])


def test_tokens_match_the_processor_and_the_rendered_conversation(encoder, tiny_processor):
    example = _example(question="Which way is the gripper facing, left or right?", choices=("left", "right", "up"),
                       answer_index=2)
    enc = encoder(example)
    content = [{"type": "image"}, {"type": "text", "text": encode_lib.user_text(example.question, example.choices)}]
    conversation = [{"role": "user", "content": content}, {"role": "assistant", "content": "C. up"}]
    full_text = tiny_processor.apply_chat_template(conversation, tokenize=False)
    # The processor's own expansion of the full conversation (no add_generation_prompt, RLinf's bug avoided).
    full = tiny_processor(text=[full_text], images=example.images, return_tensors="pt")
    assert full["input_ids"][0, :len(enc.input_ids)].tolist() == enc.input_ids.tolist()
    assert _decode(tiny_processor, full["input_ids"][0, len(enc.input_ids):]) == "\n"
    assert torch.equal(full["pixel_values"], enc.pixel_values)
    assert torch.equal(full["image_grid_thw"], enc.image_grid_thw)


def test_image_pads_match_the_grid_for_multi_image_rows(encoder):
    images = [PIL.Image.new("RGB", (100, 150), (40, 70, 200)), PIL.Image.new("RGB", (64, 48), (40, 170, 60))]
    enc = encoder(_example(images=images))
    assert enc.image_grid_thw.tolist() == [[1, 10, 8], [1, 4, 4]]
    assert enc.pixel_values.shape == (10 * 8 + 4 * 4, 1176) and enc.pixel_values.dtype == torch.float32
    ids = enc.input_ids.tolist()
    starts = [i for i, t in enumerate(ids) if t == 151652]
    ends = [i for i, t in enumerate(ids) if t == 151653]
    assert [e - s - 1 for s, e in zip(starts, ends)] == [20, 4]  # t*h*w / merge**2 pads per image, in order
    assert all(t == IMAGE_PAD for s, e in zip(starts, ends) for t in ids[s + 1:e])
    assert ids.count(IMAGE_PAD) == 24


@pytest.mark.parametrize("question", [
    "Looking carefully at the wrist camera image, " * 20 + "is the gripper open?",
    "机器人手爪🤖🦾是否张开？" * 20,  # multi-token characters: the cut must not leave half a character
])
def test_truncation_cuts_the_question_and_keeps_images_and_choices(tiny_processor, question):
    full = encode_lib.Encoder(tiny_processor, max_prompt_length=10_000)(_example(question=question))
    limit = full.prompt_length - 50
    enc = encode_lib.Encoder(tiny_processor, max_prompt_length=limit)(_example(question=question))
    assert limit - 3 <= enc.prompt_length <= limit
    assert (enc.input_ids == IMAGE_PAD).sum() == 4
    text = _decode(tiny_processor, enc.input_ids[:enc.prompt_length])
    head = "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>"
    cut_question = text.split(head)[1].split("\nChoices:\n")[0]
    assert 0 < len(cut_question) < len(question) and question.startswith(cut_question)
    assert "\ufffd" not in text
    assert text.endswith("\nChoices:\nA. No\nB. Yes\n<|im_end|>\n<|im_start|>assistant\n")
    assert _decode(tiny_processor, enc.labels[enc.labels != -100]) == "B. Yes<|im_end|>"


def test_truncation_error_names_the_source_length_and_limit(tiny_processor):
    example = _example(question="What colour is the surface the robot gripper is touching? " * 10)
    encoder = encode_lib.Encoder(tiny_processor, max_prompt_length=60, truncation="error")
    with pytest.raises(encode_lib.PromptTooLong, match=r"train-00000-of-00002.parquet:7: prompt is \d+ tokens "
                                                         r"\(4 image tokens\), over max_prompt_length 60"):
        encoder(example)
    assert issubclass(encode_lib.PromptTooLong, ValueError)


def test_truncation_raises_when_images_and_choices_alone_do_not_fit(tiny_processor):
    encoder = encode_lib.Encoder(tiny_processor, max_prompt_length=30)
    with pytest.raises(encode_lib.PromptTooLong, match="even without the question"):
        encoder(_example())


def test_pixel_budget_changes_the_grid(tiny_model_dir):
    image = PIL.Image.new("RGB", (640, 480), (220, 200, 40))
    grids = []
    for max_pixels in (56 * 56, 224 * 224):
        processor = processor_lib.load_processor(tiny_model_dir, min_pixels=56 * 56, max_pixels=max_pixels)
        enc = encode_lib.Encoder(processor, max_prompt_length=1024)(_example(images=[image]))
        (t, h, w), = enc.image_grid_thw.tolist()
        assert h * w * 14 * 14 <= max_pixels and (enc.input_ids == IMAGE_PAD).sum() == t * h * w // 4
        grids.append((h, w))
    assert grids[0] == (2, 4) and grids[1][0] * grids[1][1] > 8


def test_plain_prompt_without_chat_template(tiny_processor):
    encoder = encode_lib.Encoder(tiny_processor, max_prompt_length=1024, apply_chat_template=False)
    enc = encoder(_example())
    assert _decode(tiny_processor, enc.input_ids) == (
        "<|vision_start|>" + "<|image_pad|>" * 4 + "<|vision_end|>Is the gripper open?\nChoices:\nA. No\nB. Yes\n"
        "B. Yes<|im_end|>")
    assert _decode(tiny_processor, enc.labels[enc.labels != -100]) == "B. Yes<|im_end|>"


def test_encodes_real_png_and_jpeg_rows(encoder, tiny_processor, robo2vlm_dir):
    formats = set()
    for row in pq.read_table(robo2vlm_dir / "test-00000-of-00001.parquet").to_pylist()[:4]:
        image = PIL.Image.open(io.BytesIO(row["image"]["bytes"]))
        formats.add(image.format)
        choices = ast.literal_eval(row["choices"])
        example = Example(f"test-00000-of-00001.parquet:{row['id']}", row["id"], row["question"], choices,
                          row["correct_answer"], [image.convert("RGB")])
        enc = encoder(example)
        assert enc.image_grid_thw.tolist() == [[1, 4, 4]]
        assert torch.isfinite(enc.pixel_values).all()
        answer = f"{chr(65 + row['correct_answer'])}. {choices[row['correct_answer']]}"
        assert _decode(tiny_processor, enc.labels[enc.labels != -100]) == answer + "<|im_end|>"
        assert len(enc.choice_targets) == len(choices)
    assert formats == {"PNG", "JPEG"}


def test_encoder_is_picklable_and_deterministic(encoder):
    clone = pickle.loads(pickle.dumps(encoder))
    a, b = encoder(_example()), clone(_example())
    for field in ("input_ids", "labels", "pixel_values", "image_grid_thw"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert a.prompt_length == b.prompt_length


@pytest.mark.parametrize("kwargs, match", [
    (dict(answer_index=2), "answer_index 2 out of range for 2 choices"),
    (dict(choices=()), "choices must be a list of 1 to 26 strings"),
    (dict(images=[]), "no images"),
    (dict(question="see <|image_pad|> here"), "prompt holds 2 <|image_pad|> tokens for 1 images"),
])
def test_bad_examples_raise_naming_the_source(encoder, kwargs, match):
    with pytest.raises(ValueError, match=match.replace("|", r"\|")) as info:
        encoder(_example(**kwargs))
    assert "train-00000-of-00002.parquet:7" in str(info.value)


def test_a_template_that_changes_the_assistant_turn_is_refused(tiny_processor):
    processor = copy.copy(tiny_processor)
    processor.chat_template = tiny_processor.chat_template.replace(
        "{{ message['content'] }}<|im_end|>", "<think>\n\n</think>\n\n{{ message['content'] }}<|im_end|>")
    with pytest.raises(ValueError, match="cannot place answer-only labels"):
        encode_lib.Encoder(processor, max_prompt_length=1024)(_example())


def test_bad_settings_raise(tiny_processor):
    with pytest.raises(ValueError, match="truncation"):
        encode_lib.Encoder(tiny_processor, max_prompt_length=100, truncation="left")
    with pytest.raises(ValueError, match="max_prompt_length"):
        encode_lib.Encoder(tiny_processor, max_prompt_length=0)
