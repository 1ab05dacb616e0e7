"""Qwen3-VL's host-side vision precompute and processing, checked against transformers' own Qwen3-VL code."""
import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys
import tempfile
import types

import jinja2.sandbox
import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from transformers import vision_utils
from transformers.utils import is_torchvision_available

from vlm_sft import demo
from vlm_sft.data import encode as encode_lib
from vlm_sft.data import processor as processor_lib
from vlm_sft.data import qwen3_vl_vision
from vlm_sft.data import vision as vision_lib
from vlm_sft.data.robo2vlm import Example

IMAGE_PAD = 151655
# Several images of different, non-square sizes (t, h, w in patches; h, w multiples of the merge size 2).
GRIDS = torch.tensor([[1, 14, 20], [1, 24, 12], [1, 2, 2], [1, 4, 96], [2, 6, 8]])


@pytest.fixture(scope="module")
def hf_model(tiny_qwen3_vl_dir):
    model = transformers.Qwen3VLForConditionalGeneration.from_pretrained(tiny_qwen3_vl_dir, dtype=torch.float32)
    return model.eval()


@pytest.mark.parametrize("side", [8, 48])  # the tiny 8 x 8 grid and the real 48 x 48 (num_position_embeddings 2304)
def test_interpolation_taps_equal_transformers(side):
    index, weight = qwen3_vl_vision.position_embedding_interpolation(GRIDS, side, 2)
    hf_index, hf_weight = vision_utils.get_vision_interpolation_indices_and_weights(
        GRIDS, side, mode="bilinear", align_corners=True, spatial_merge_size=2)
    assert index.shape == (4, int((GRIDS[:, 0] * GRIDS[:, 1] * GRIDS[:, 2]).sum()))
    assert index.dtype == torch.long and weight.dtype == torch.float32
    assert torch.equal(index, hf_index.t())
    torch.testing.assert_close(weight, hf_weight.t(), rtol=0, atol=1e-6)
    torch.testing.assert_close(weight.sum(0), torch.ones(index.shape[1]))


def test_rotary_ids_equal_transformers():
    ids = qwen3_vl_vision.vision_rotary_ids(GRIDS, 2)
    assert torch.equal(ids, vision_utils.get_vision_position_ids(GRIDS, 2))
    spec = types.SimpleNamespace(spatial_merge_size=2)  # the Qwen2.5-VL precompute uses the same patch order
    assert torch.equal(ids, vision_lib.vision_rotary_ids(GRIDS, spec))


def _vision_inputs_of_the_tower(model, grids):
    """What the stock vision tower adds to its patch embeddings, and the rotary cos it hands block 0."""
    captured = {}
    visual = model.model.visual
    hooks = [
        visual.patch_embed.register_forward_hook(lambda m, a, out: captured.__setitem__("patches", out)),
        visual.blocks[0].register_forward_pre_hook(
            lambda m, a, kw: captured.update(hidden=a[0], cos=kw["position_embeddings"][0]), with_kwargs=True),
    ]
    n_patches = int((grids[:, 0] * grids[:, 1] * grids[:, 2]).sum())
    pixels = torch.randn(n_patches, 3 * 2 * 16 * 16, generator=torch.Generator().manual_seed(0))
    try:
        with torch.no_grad():
            visual(pixels, grid_thw=grids)
    finally:
        for hook in hooks:
            hook.remove()
    return captured["hidden"] - captured["patches"], captured["cos"]


def test_precompute_gives_the_towers_position_embeddings_and_rotary(hf_model):
    visual = hf_model.model.visual
    side = int(hf_model.config.vision_config.num_position_embeddings ** 0.5)
    with torch.no_grad():  # a trained-looking table: random rows, so any wrong tap or weight shows
        visual.pos_embed.weight.normal_(generator=torch.Generator().manual_seed(1))
    stock_pos, stock_cos = _vision_inputs_of_the_tower(hf_model, GRIDS)

    index, weight = qwen3_vl_vision.position_embedding_interpolation(GRIDS, side, 2)
    ours = (visual.pos_embed.weight[index] * weight[:, :, None]).sum(0)
    torch.testing.assert_close(ours, stock_pos, rtol=1e-5, atol=1e-5)
    cos, _ = visual.rotary_pos_emb(ours, qwen3_vl_vision.vision_rotary_ids(GRIDS, 2))
    torch.testing.assert_close(cos, stock_cos)

    # Independently: Qwen3-VL's design is F.interpolate(bilinear, align_corners=True) of the square table, per
    # image, read out in the processor's merge-block patch order.
    table = visual.pos_embed.weight.detach().t().reshape(1, -1, side, side)
    start = 0
    for t, h, w in GRIDS.tolist():
        image = torch.nn.functional.interpolate(table, size=(h, w), mode="bilinear", align_corners=True)[0]
        image = image.reshape(-1, h // 2, 2, w // 2, 2).permute(1, 3, 2, 4, 0).reshape(h * w, -1).repeat(t, 1)
        torch.testing.assert_close(ours[start:start + t * h * w].detach(), image, rtol=1e-5, atol=1e-5)
        start += t * h * w


def _multi_image_sequence(grids, texts):
    """Token ids: text, then for each image <|vision_start|> + t*h*w/4 pads + <|vision_end|> + text."""
    ids = list(range(100, 100 + texts[0]))
    for (t, h, w), n_text in zip(grids.tolist(), texts[1:]):
        ids += [151652] + [IMAGE_PAD] * (t * h * w // 4) + [151653] + list(range(200, 200 + n_text))
    return torch.tensor(ids)


@pytest.mark.parametrize("texts", [(5, 7, 3, 1, 4), (0, 0, 2, 0, 9)])
def test_mrope_positions_equal_qwen3_vl_get_rope_index(hf_model, texts):
    # vision.mrope_position_ids (the Qwen2.5-VL rule) for Qwen3-VL: equal to Qwen3VLModel.get_rope_index for
    # sequences of several non-square images (no difference found for images; videos are not trained).
    grids = torch.tensor([[1, 14, 20], [1, 24, 12], [1, 2, 2], [1, 4, 30]])
    input_ids = _multi_image_sequence(grids, texts)
    spec = types.SimpleNamespace(image_token_id=IMAGE_PAD, spatial_merge_size=2)
    ours = vision_lib.mrope_position_ids(input_ids, grids, spec)
    stock, _ = hf_model.model.get_rope_index(input_ids[None], (input_ids == IMAGE_PAD).int()[None],
                                             image_grid_thw=grids)
    assert torch.equal(ours, stock[:, 0])


@pytest.mark.parametrize("grids, match", [
    (torch.tensor([[1, 3, 4]]), "multiples of the merge size 2"),
    (torch.tensor([1, 4, 4]), r"\[n, 3\]"),
])
def test_precompute_rejects_bad_grids(grids, match):
    with pytest.raises(ValueError, match=match):
        qwen3_vl_vision.position_embedding_interpolation(grids, 8, 2)


# Processing: load_processor on a Qwen3-VL directory, without torchvision -------------------------------------

def _example(sizes, source="train-00000.parquet:3"):
    images = [PIL.Image.new("RGB", size, (40, 70, 200)) for size in sizes]
    return Example(source, "id3", "Which colour is the block?", ["red", "blue", "green"], 1, images)


@pytest.fixture(scope="module")
def qwen3_processor(tiny_qwen3_vl_dir):
    return processor_lib.load_processor(tiny_qwen3_vl_dir)


def _grid(processor, size):
    image = PIL.Image.new("RGB", size, (40, 70, 200))
    return processor.image_processor(images=[image], return_tensors="pt")["image_grid_thw"].tolist()


def test_load_processor_builds_qwen3_vl_text_and_image_path(qwen3_processor):
    assert not is_torchvision_available()  # this test is about the CPU path; the stock one needs torchvision
    assert isinstance(qwen3_processor, transformers.Qwen3VLProcessor)
    assert isinstance(qwen3_processor, processor_lib.ImageOnlyQwen3VLProcessor)
    assert type(qwen3_processor.tokenizer).__name__ == "Qwen2Tokenizer" and len(qwen3_processor.tokenizer) == 151669
    assert qwen3_processor.chat_template == demo.qwen3_vl.QWEN3_VL_CHAT_TEMPLATE
    image_processor = qwen3_processor.image_processor
    assert (image_processor.patch_size, image_processor.merge_size, image_processor.temporal_patch_size) == (16, 2, 2)
    assert tuple(image_processor.image_mean) == tuple(image_processor.image_std) == (0.5, 0.5, 0.5)
    # The directory's budget: 100x150 is below 65,536 pixels, so it is scaled up to 224x320 (14 x 20 patches of 16).
    assert _grid(qwen3_processor, (100, 150)) == [[1, 20, 14]]
    out = image_processor(images=[PIL.Image.new("RGB", (100, 150))], return_tensors="pt")
    assert out["pixel_values"].shape == (20 * 14, 3 * 2 * 16 * 16)
    clone = pickle.loads(pickle.dumps(qwen3_processor))  # DataLoader workers
    assert type(clone) is type(qwen3_processor) and _grid(clone, (100, 150)) == [[1, 20, 14]]


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_pixel_budget_unset_takes_the_directorys_own_and_set_overrides(
        family, tiny_model_dir, tiny_qwen3_vl_dir, tiny_processor, qwen3_processor):
    path, own, default = ((tiny_model_dir, (3136, 12845056), tiny_processor) if family == "qwen2_5_vl" else
                          (tiny_qwen3_vl_dir, (65536, 16777216), qwen3_processor))
    # `default` is load_processor(path): min_pixels=None, max_pixels=None, as data.* leaves them unset.
    assert (default.image_processor.size.shortest_edge, default.image_processor.size.longest_edge) == own
    small = processor_lib.load_processor(path, min_pixels=64 * 64, max_pixels=64 * 64)
    assert (small.image_processor.size.shortest_edge, small.image_processor.size.longest_edge) == (4096, 4096)
    (t, h, w), = _grid(small, (300, 200))
    assert h * w * small.image_processor.patch_size ** 2 <= 4096


def _render(template: str, messages: list, **kwargs) -> str:
    """The chat template rendered by plain jinja2 the way chat templates are run (trim/lstrip blocks)."""
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, **kwargs)


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_prompts_are_exactly_what_the_directorys_template_renders(
        family, tiny_model_dir, tiny_qwen3_vl_dir, tiny_processor, qwen3_processor):
    path, processor = ((tiny_model_dir, tiny_processor) if family == "qwen2_5_vl" else
                       (tiny_qwen3_vl_dir, qwen3_processor))
    template = json.loads((path / "chat_template.json").read_text())["chat_template"]
    example = _example([(100, 150), (300, 120)])
    enc = encode_lib.Encoder(processor, max_prompt_length=1024)(example)

    content = [{"type": "image"}, {"type": "image"},
               {"type": "text", "text": encode_lib.user_text(example.question, example.choices)}]
    user = [{"role": "user", "content": content}]
    prompt = _render(template, user, add_generation_prompt=True)
    full = _render(template, user + [{"role": "assistant", "content": "B. blue"}])
    assert prompt.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
                             if family == "qwen2_5_vl" else "<|im_start|>user\n<|vision_start|>")
    assert full == prompt + "B. blue<|im_end|>\n"

    def ids(text):  # the rendering tokenized, each image's single pad expanded to its merged patches
        for t, h, w in enc.image_grid_thw.tolist():
            text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // 4), 1)
        return processor.tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]

    assert enc.input_ids[:enc.prompt_length].tolist() == ids(prompt)
    assert enc.input_ids.tolist() == ids(full)[:-1]  # all but the template's trailing "\n"
    assert (enc.labels != encode_lib.IGNORE_INDEX).sum() == len(enc.input_ids) - enc.prompt_length
    assert processor.tokenizer.decode(enc.labels[enc.prompt_length:]) == "B. blue<|im_end|>"


def test_save_pretrained_writes_the_hubs_qwen3_vl_files(tiny_qwen3_vl_dir, tmp_path):
    processor = processor_lib.load_processor(tiny_qwen3_vl_dir, min_pixels=64 * 64, max_pixels=128 * 128)
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    hub = demo.qwen3_vl.QWEN3_VL_PREPROCESSOR_CONFIG
    assert config == {**hub, "size": {"shortest_edge": 64 * 64, "longest_edge": 128 * 128}}  # the Hub's keys only
    assert json.loads((tmp_path / "video_preprocessor_config.json").read_text()) == (
        demo.qwen3_vl.QWEN3_VL_VIDEO_PREPROCESSOR_CONFIG)
    assert json.loads((tmp_path / "chat_template.json").read_text())["chat_template"] == demo.qwen3_vl.QWEN3_VL_CHAT_TEMPLATE
    reloaded = processor_lib.load_processor(tmp_path)
    assert type(reloaded) is processor_lib.ImageOnlyQwen3VLProcessor
    assert _grid(reloaded, (100, 150)) == _grid(processor, (100, 150)) == [[1, 10, 6]]  # 96x160 <= 128*128
    text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Colour?<think></think><|im_end|>\n"
    assert reloaded.tokenizer.encode(text) == processor.tokenizer.encode(text)


def test_falls_back_to_the_image_only_qwen3_vl_processor_when_the_stock_one_fails(tiny_qwen3_vl_dir, monkeypatch):
    # Pretend torchvision is importable: the stock Qwen3VLProcessor is tried (its video processor fails without it).
    monkeypatch.setattr(processor_lib, "is_torchvision_available", lambda: True)
    processor = processor_lib.load_processor(tiny_qwen3_vl_dir)
    assert type(processor) is processor_lib.ImageOnlyQwen3VLProcessor


def test_bad_qwen3_vl_directories_are_named(tiny_qwen3_vl_dir, tmp_path):
    broken = tmp_path / "no_preprocessor"
    shutil.copytree(tiny_qwen3_vl_dir, broken)
    (broken / "preprocessor_config.json").unlink()
    with pytest.raises(ValueError, match=r"no_preprocessor'?: no preprocessor_config.json"):
        processor_lib.load_processor(broken)
    other = tmp_path / "other_processor"
    shutil.copytree(tiny_qwen3_vl_dir, other)
    config = {**demo.qwen3_vl.QWEN3_VL_PREPROCESSOR_CONFIG, "processor_class": "LlavaProcessor"}
    (other / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="processor_class 'LlavaProcessor' is not supported .*Qwen3VLProcessor"):
        processor_lib.load_processor(other)


def test_tiny_images_are_resized_up_and_impossible_ones_name_the_row(tiny_qwen3_vl_dir, qwen3_processor):
    encoder = encode_lib.Encoder(qwen3_processor, max_prompt_length=4096)
    # Smaller than one merged patch (32 x 32 pixels) or very thin: scaled up into the budget, as the processor does.
    enc = encoder(_example([(1, 1), (5, 300), (20, 20)]))
    assert enc.image_grid_thw.tolist() == [[1, 16, 16], [1, 124, 4], [1, 16, 16]]
    assert (enc.input_ids == IMAGE_PAD).sum() == (16 * 16 + 124 * 4 + 16 * 16) // 4
    small_budget = processor_lib.load_processor(tiny_qwen3_vl_dir, min_pixels=1, max_pixels=64 * 64)
    enc = encode_lib.Encoder(small_budget, max_prompt_length=4096)(_example([(1, 1), (3, 40)]))
    assert all(h >= 2 and w >= 2 and h % 2 == 0 and w % 2 == 0 for _, h, w in enc.image_grid_thw.tolist())
    with pytest.raises(ValueError, match=r"train-00000.parquet:3: image\(s\) of 2000x8 pixels .* aspect ratio"):
        encoder(_example([(2000, 8)]))


# Against the stock processors (they need torchvision: run in a separate venv) ---------------------------------

_STOCK_SCRIPT = r'''
import json, sys
import numpy as np
import PIL.Image
import transformers

request = json.load(open(sys.argv[1]))
processor = transformers.AutoProcessor.from_pretrained(request["model_dir"])
images = [PIL.Image.open(p) for p in request["images"]]
content = [{"type": "image"} for _ in images] + [{"type": "text", "text": request["text"]}]
prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                       add_generation_prompt=True)
out = processor(text=[prompt], images=images, return_tensors="np")
np.savez(request["output"], input_ids=out["input_ids"][0], image_grid_thw=out["image_grid_thw"],
         mm_token_type_ids=out["mm_token_type_ids"][0], pixel_values=out["pixel_values"],
         processor_class=np.array(type(processor).__name__), video_processor=np.array(
             type(processor.video_processor).__name__))
'''


def _torchvision_python() -> str:
    """python of a venv where torchvision works (torch 2.14.1 + torchvision 0.29.1, the transformers we run):
    $VLM_SFT_TORCHVISION_VENV, built there (or under the temp dir) on first use; skips when it cannot be built."""
    venv = pathlib.Path(os.environ.get("VLM_SFT_TORCHVISION_VENV",
                                       pathlib.Path(tempfile.gettempdir()) / "vlm_sft_torchvision_venv"))
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import torchvision, transformers; print(transformers.__version__)"]
    if python.is_file() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == (
            transformers.__version__):
        return str(python)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", "torch==2.14.1", "torchvision==0.29.1",
                        f"transformers=={transformers.__version__}"], check=True, capture_output=True, timeout=1800,
                       env={**os.environ, "PIP_CONSTRAINT": ""})
        subprocess.run(check, check=True, capture_output=True)
    except (OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"no torchvision venv at {venv}: {e}")
    return str(python)


def _photo_like(width: int, height: int, *, seed: int) -> np.ndarray:
    """uint8 [h, w, 3]: smooth colour waves and a gradient with mild noise (the spectrum of a camera image)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    channels = [127 + 60 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * x + rng.uniform(0.5, 2) * y) + rng.uniform(0, 6))
                + 30 * x for _ in range(3)]
    return np.clip(np.stack(channels, -1) + rng.normal(0, 3, (height, width, 3)), 0, 255).astype(np.uint8)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl"])
def test_our_processing_equals_the_stock_processor(family, tiny_model_dir, tiny_qwen3_vl_dir, tiny_processor,
                                                   qwen3_processor, tmp_path):
    """Token ids, image grids and mm_token_type_ids equal AutoProcessor's (torchvision path); pixel values equal
    where no resampling is needed and within 2/255 (PIL vs torchvision bicubic) where a photo-like image is
    rescaled. (Pixel noise resampled to a nearby size differs by up to ~22/255 for Qwen2.5-VL: high frequencies
    are where the two bicubic implementations part; natural images have little there.)"""
    python = _torchvision_python()
    path, processor = ((tiny_model_dir, tiny_processor) if family == "qwen2_5_vl" else
                       (tiny_qwen3_vl_dir, qwen3_processor))
    factor = processor.image_processor.patch_size * processor.image_processor.merge_size
    sizes = [(100, 150), (16 * factor, 10 * factor)]  # rescaled (upscaled for Qwen3-VL), and already on the grid
    files = []
    for i, (w, h) in enumerate(sizes):
        files.append(str(tmp_path / f"image{i}.png"))
        PIL.Image.fromarray(_photo_like(w, h, seed=i)).save(files[-1])
    example = Example("t.parquet:0", "id0", "Which colour?", ["red", "blue"], 0,
                      [PIL.Image.open(f).convert("RGB") for f in files])
    request = {"model_dir": str(path), "images": files, "output": str(tmp_path / "stock.npz"),
               "text": encode_lib.user_text(example.question, example.choices)}
    (tmp_path / "request.json").write_text(json.dumps(request))
    (tmp_path / "stock.py").write_text(_STOCK_SCRIPT)
    run = subprocess.run([python, str(tmp_path / "stock.py"), str(tmp_path / "request.json")], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stock = np.load(tmp_path / "stock.npz")
    assert str(stock["processor_class"]) == processor_lib._processor_class(path, processor_lib._hub_files(path)
                                                                           ).hub_processor_class
    enc = encode_lib.Encoder(processor, max_prompt_length=4096)(example)
    assert enc.input_ids[:enc.prompt_length].tolist() == stock["input_ids"].tolist()
    assert enc.image_grid_thw.tolist() == stock["image_grid_thw"].tolist()
    assert (enc.input_ids[:enc.prompt_length] == IMAGE_PAD).long().tolist() == stock["mm_token_type_ids"].tolist()
    ours, theirs = enc.pixel_values.numpy(), stock["pixel_values"]
    assert ours.shape == theirs.shape
    (t0, h0, w0), _ = enc.image_grid_thw.tolist()
    first = t0 * h0 * w0
    std = min(processor.image_processor.image_std)
    np.testing.assert_allclose(ours[first:], theirs[first:], atol=1e-5)  # on the grid already: no resampling
    np.testing.assert_allclose(ours[:first], theirs[:first], atol=2.5 / 255 / std)  # PIL vs torchvision bicubic
