"""load_processor on a model directory as the Hub ships it, without torchvision."""
import json
import pickle

import PIL.Image
import pytest
import torch
import transformers

from vlm_sft import demo
from vlm_sft.data import processor as processor_lib

IMAGE = PIL.Image.new("RGB", (100, 150), (40, 70, 200))  # width 100, height 150


def _grid(processor, image=IMAGE):
    return processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"].tolist()


def test_loads_a_full_image_and_text_processor(tiny_processor):
    assert isinstance(tiny_processor, transformers.Qwen2_5_VLProcessor)
    assert type(tiny_processor.tokenizer).__name__ == "Qwen2Tokenizer"
    assert tiny_processor.chat_template == demo.qwen2_5_vl.QWEN2_5_VL_CHAT_TEMPLATE
    assert _grid(tiny_processor) == [[1, 10, 8]]  # 150x100 -> 140x112 pixels -> 10x8 patches of 14
    prompt = "<|vision_start|><|image_pad|><|vision_end|>What colour?"
    out = tiny_processor(text=[prompt], images=[IMAGE], return_tensors="pt")
    assert (out["input_ids"] == 151655).sum() == 10 * 8 // 4  # the processor expands one pad per merged patch
    assert out["pixel_values"].shape == (80, 3 * 2 * 14 * 14)


def test_pixel_budget_overrides_the_image_processor(tiny_model_dir):
    small = processor_lib.load_processor(tiny_model_dir, min_pixels=56 * 56, max_pixels=56 * 56)
    assert _grid(small) == [[1, 4, 2]]
    large = processor_lib.load_processor(tiny_model_dir, min_pixels=300 * 300)
    (t, h, w), = _grid(large)
    assert h * w * 14 * 14 >= 300 * 300 and (h, w) != (10, 8)
    with pytest.raises(ValueError, match="min_pixels 5000 > max_pixels 4000"):
        processor_lib.load_processor(tiny_model_dir, min_pixels=5000, max_pixels=4000)


def test_falls_back_when_the_stock_processor_fails(tiny_model_dir, monkeypatch):
    # Pretend torchvision is importable: the stock Qwen2_5_VLProcessor is tried (and fails without it).
    monkeypatch.setattr(processor_lib, "is_torchvision_available", lambda: True)
    processor = processor_lib.load_processor(tiny_model_dir)
    assert isinstance(processor, transformers.Qwen2_5_VLProcessor)
    assert _grid(processor) == [[1, 10, 8]]


def test_falls_back_when_autoprocessor_returns_a_bare_tokenizer(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(processor_lib, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained",
                        lambda path, **kwargs: transformers.AutoTokenizer.from_pretrained(path))
    processor = processor_lib.load_processor(tiny_model_dir)
    assert isinstance(processor, processor_lib.ImageOnlyQwen2_5_VLProcessor)
    assert _grid(processor) == [[1, 10, 8]]


def test_picklable_for_dataloader_workers(tiny_processor):
    clone = pickle.loads(pickle.dumps(tiny_processor))
    assert type(clone) is type(tiny_processor)
    text = "<|im_start|>user\nWhat colour is the gripper?<|im_end|>"
    assert clone.tokenizer.encode(text) == tiny_processor.tokenizer.encode(text)
    a = clone.image_processor(images=[IMAGE], return_tensors="pt")
    b = tiny_processor.image_processor(images=[IMAGE], return_tensors="pt")
    assert torch.equal(a["pixel_values"], b["pixel_values"]) and torch.equal(a["image_grid_thw"], b["image_grid_thw"])
    assert clone.chat_template == tiny_processor.chat_template


def test_save_pretrained_round_trips(tiny_model_dir, tmp_path):
    processor = processor_lib.load_processor(tiny_model_dir, min_pixels=56 * 56, max_pixels=112 * 112)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    # Named as the Hub names it, so a machine with torchvision loads the stock class from an export.
    assert config["processor_class"] == "Qwen2_5_VLProcessor"
    assert config["image_processor_type"] == "Qwen2VLImageProcessor"
    assert (config["min_pixels"], config["max_pixels"]) == (56 * 56, 112 * 112)

    reloaded = processor_lib.load_processor(tmp_path)
    assert reloaded.chat_template == processor.chat_template
    assert _grid(reloaded) == _grid(processor) == [[1, 8, 6]]  # 150x100 -> 112x84 (<= 112*112)
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<|im_end|>\n"
    assert reloaded.tokenizer.encode(text) == processor.tokenizer.encode(text)
    assert reloaded.tokenizer.eos_token == "<|im_end|>" and reloaded.tokenizer.pad_token == "<|endoftext|>"


def test_clear_errors_for_broken_directories(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        processor_lib.load_processor(tmp_path / "missing")
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(demo.qwen2_5_vl.QWEN2_5_VL_PREPROCESSOR_CONFIG))
    with pytest.raises(ValueError, match="no tokenizer"):
        processor_lib.load_processor(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    demo.write_qwen_tokenizer_files(tmp_path, chat_template=demo.qwen2_5_vl.QWEN2_5_VL_CHAT_TEMPLATE)
    with pytest.raises(ValueError, match="no preprocessor_config.json"):
        processor_lib.load_processor(tmp_path)


def test_rejects_a_non_qwen_image_processor(tmp_path):
    demo.write_qwen_tokenizer_files(tmp_path, chat_template=demo.qwen2_5_vl.QWEN2_5_VL_CHAT_TEMPLATE)
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "CLIPImageProcessor", "size": {"shortest_edge": 224}, "crop_size": 224}))
    with pytest.raises(ValueError, match="not a Qwen2-VL image processor"):
        processor_lib.load_processor(tmp_path)
