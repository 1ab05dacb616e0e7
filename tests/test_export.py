"""Export: a trained checkpoint -> a Hugging Face directory that transformers loads offline, cleanly, with the
trainer's own logits; processor files included; bad output dirs and checkpoints refused."""
import json
import os
import re
import subprocess
import sys

import pytest
import safetensors
import torch
import transformers
from transformers import Qwen2_5_VLForConditionalGeneration

import fixtures
from vlm_sft import checkpoint, demo, export, optim
from vlm_sft import models as model_lib
from vlm_sft.data import robo2vlm
from vlm_sft.data.collate import collate_encoded
from vlm_sft.data.encode import Encoder
from vlm_sft.data.processor import load_processor
from vlm_sft.data.vision import VisionSpec
from vlm_sft.state import TrainState, init_train_state

PIXELS = 56 * 56
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save_trained_checkpoint(model_dir, root) -> str:
    """A checkpoint whose params differ from the base model's (so the export cannot pass by copying the base)."""
    model, params = model_lib.load_model(str(model_dir))
    g = torch.Generator().manual_seed(0)
    params = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in params.items()}
    state = init_train_state(params, optim.adamw(1e-3))
    state = TrainState(state.step + 5, state.params, state.opt_state)
    config = {"actor": {"model": {"model_path": str(model_dir)}}, "data": {"min_pixels": PIXELS,
                                                                           "max_pixels": 2 * PIXELS}}
    return checkpoint.Checkpointer(str(root)).save(state, data_position={"epoch": 0, "offset": 0},
                                                   config_json=json.dumps(config))


@pytest.fixture(scope="module")
def tied_ckpt(tiny_model_dir, tmp_path_factory):
    return save_trained_checkpoint(tiny_model_dir, tmp_path_factory.mktemp("ckpt_tied"))


@pytest.fixture(scope="module")
def untied_ckpt(tiny_model_dir_untied, tmp_path_factory):
    return save_trained_checkpoint(tiny_model_dir_untied, tmp_path_factory.mktemp("ckpt_untied"))


def test_hub_names_and_shard_plan():
    qwen2_5 = model_lib.family_named("qwen2.5_vl")
    assert export.hub_name("model.language_model.layers.0.mlp.up_proj.weight", qwen2_5) == \
        "model.layers.0.mlp.up_proj.weight"
    assert export.hub_name("model.language_model.embed_tokens.weight", qwen2_5) == "model.embed_tokens.weight"
    assert export.hub_name("model.visual.blocks.1.attn.qkv.bias", qwen2_5) == "visual.blocks.1.attn.qkv.bias"
    assert export.hub_name("lm_head.weight", qwen2_5) == "lm_head.weight"
    with pytest.raises(export.ExportError, match="'encoder.weight': not a Qwen2.5-VL parameter name"):
        export.hub_name("encoder.weight", qwen2_5)
    qwen3 = model_lib.family_named("qwen3_vl")  # Qwen3-VL ships its in-memory names
    for name in ("model.language_model.layers.0.self_attn.q_norm.weight",
                 "model.visual.deepstack_merger_list.0.norm.weight", "lm_head.weight"):
        assert export.hub_name(name, qwen3) == name
    with pytest.raises(export.ExportError, match="'visual.blocks.0.attn.qkv.bias': not a Qwen3-VL parameter name"):
        export.hub_name("visual.blocks.0.attn.qkv.bias", qwen3)
    assert export.plan_shards([("a", 4), ("b", 4), ("c", 9), ("d", 1)], 8) == [["a", "b"], ["c"], ["d"]]
    assert export.plan_shards([("a", 4), ("b", 4)], 100) == [["a", "b"]]


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_export_loads_cleanly_and_gives_the_trainers_logits(which, request, tmp_path, robo2vlm_dir):
    ckpt = request.getfixturevalue(f"{which}_ckpt")
    base = request.getfixturevalue("tiny_model_dir" if which == "tied" else "tiny_model_dir_untied")
    out = str(tmp_path / "hf")
    export.export_checkpoint(ckpt, out, max_shard_bytes=2 * 1024 ** 2)  # several shards

    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards == sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
    assert ("lm_head.weight" in index["weight_map"]) == (which == "untied")
    assert "model.embed_tokens.weight" in index["weight_map"] and "visual.merger.mlp.0.bias" in index["weight_map"]
    with safetensors.safe_open(os.path.join(out, shards[0]), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    hub_config = json.load(open(os.path.join(out, "config.json")))
    base_config = json.load(open(os.path.join(base, "config.json")))
    assert hub_config == dict(base_config, torch_dtype="float32")  # the Hub's flat format, dtype updated
    assert open(os.path.join(out, "generation_config.json")).read() == \
        open(os.path.join(base, "generation_config.json")).read()

    transformers.utils.logging.set_verbosity_warning()
    try:
        hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    finally:
        transformers.utils.logging.set_verbosity_error()
    assert {k: list(v) for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    lm_head, embed = hf.lm_head.weight, hf.model.language_model.embed_tokens.weight
    assert (lm_head.data_ptr() == embed.data_ptr()) == (which == "tied")  # tied embeddings stay tied

    # The trainer's forward with the checkpoint's params vs transformers' forward of the export.
    model, params = model_lib.load_model(str(base))
    params = checkpoint.restore_params(ckpt, params)
    assert_same_label_logits(model, params, hf, trainers_batch(model, out, robo2vlm_dir))


def trainers_batch(model, export_dir, data_dir) -> dict:
    """Three Robo2VLM rows as the trainer collates them, through the exported processor."""
    processor = load_processor(export_dir)
    encoder = Encoder(processor, max_prompt_length=512)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files(str(data_dir), "train"))
    spec = VisionSpec.from_config(model.config, processor.tokenizer.pad_token_id)
    return collate_encoded([encoder(source[i]) for i in range(3)], spec)


def assert_same_label_logits(model, params, hf, batch) -> None:
    """The trainer's logits at the label positions == the HF module's forward on the batch."""
    with torch.no_grad():
        ours = model_lib.label_logits(model, params, model_lib.forward_hidden(model, params, batch),
                                      batch["label_index"])
        hf.eval()
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(batch["input_ids"] == model.config.image_token_id).int()).logits
    theirs = logits.reshape(-1, logits.shape[-1])[batch["label_index"]]
    assert ours.shape == theirs.shape and ours.shape[0] > 3
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_processor_files_carry_the_runs_pixel_budget(tied_ckpt, tiny_model_dir, tmp_path):
    out = str(tmp_path / "hf")
    export.export_checkpoint(tied_ckpt, out)
    assert os.path.isfile(os.path.join(out, "model.safetensors"))  # one shard: no index
    assert not os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    processor = load_processor(out)
    base = load_processor(str(tiny_model_dir))
    assert processor.image_processor.size == {"shortest_edge": PIXELS, "longest_edge": 2 * PIXELS}
    assert processor.chat_template == base.chat_template
    text = "<|im_start|>user\nWhich colour?<|im_end|>"
    assert processor.tokenizer(text).input_ids == base.tokenizer(text).input_ids


def test_bf16_export(tied_ckpt, tmp_path):
    out = str(tmp_path / "hf")
    assert export.cli(["--checkpoint", tied_ckpt, "--output_dir", out, "--dtype", "bf16"]) == 0
    with safetensors.safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.load(open(os.path.join(out, "config.json")))["torch_dtype"] == "bfloat16"
    key, entry = checkpoint.saved_params(tied_ckpt)["model.language_model.norm.weight"]
    saved = {key: torch.empty(entry.size)}
    checkpoint.load_flat(tied_ckpt, saved, partial=True, no_dist=True)
    hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True)
    assert hf.dtype == torch.bfloat16
    assert torch.equal(hf.model.language_model.norm.weight, saved[key].to(torch.bfloat16))


def test_refuses_a_non_empty_output_dir_unless_overwrite(tied_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert export.cli(["--checkpoint", tied_ckpt, "--output_dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --output_dir") and "pass --overwrite" in err
    with pytest.raises(export.ExportError, match=r"exists and is not empty; pass --overwrite to replace it"):
        export.export_checkpoint(tied_ckpt, str(out))
    assert os.listdir(out) == ["notes.txt"]
    export.export_checkpoint(tied_ckpt, str(out), overwrite=True)
    assert "notes.txt" not in os.listdir(out) and "config.json" in os.listdir(out)
    assert not [f for f in os.listdir(tmp_path) if ".tmp-" in f]


def test_bad_checkpoint_and_base_model_are_clear_errors(tied_ckpt, tmp_path):
    with pytest.raises(export.ExportError, match=r"--checkpoint: .*step_9: no such checkpoint directory"):
        export.export_checkpoint(str(tmp_path / "step_9"), str(tmp_path / "a"))
    with pytest.raises(export.ExportError, match=r"--model_path='/nowhere': not a Hugging Face model directory"):
        export.export_checkpoint(tied_ckpt, str(tmp_path / "b"), model_path="/nowhere")
    assert not os.path.exists(tmp_path / "b")


def test_wrong_base_model_names_the_first_mismatching_tensor(tied_ckpt, tiny_model_dir_untied, tmp_path):
    with pytest.raises(export.ExportError, match=r"the checkpoint lacks 'lm_head.weight', which the model of "
                                                 r".*tie_word_embeddings=False"):
        export.export_checkpoint(tied_ckpt, str(tmp_path / "a"), model_path=str(tiny_model_dir_untied))
    wide = demo.make_tiny_model_dir(tmp_path / "wide", text_hidden=128, text_intermediate=256)
    # The vision tower comes first in the model's (and the checkpoint's) order; its merger projects to text width.
    with pytest.raises(export.ExportError, match=r"checkpoint tensor 'model.visual.merger.mlp.2.weight' has shape "
                                                 r"\[64, 128\] but .*wide/config.json makes it \[128, 128\]"):
        export.export_checkpoint(tied_ckpt, str(tmp_path / "b"), model_path=str(wide))
    assert not [f for f in os.listdir(tmp_path) if f in ("a", "b") or ".tmp-" in f]


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_qwen3_vl_export_loads_cleanly_and_gives_the_trainers_logits(which, request, tmp_path):
    from test_qwen3_vl_model import PAD, ROWS, make_batch

    base = request.getfixturevalue("tiny_qwen3_vl_dir" if which == "tied" else "tiny_qwen3_vl_dir_untied")
    ckpt = save_trained_checkpoint(base, tmp_path / "ckpt")
    out = str(tmp_path / "hf")
    export.export_checkpoint(ckpt, out, max_shard_bytes=2 * 1024 ** 2)
    weight_map = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    base_map = json.load(open(os.path.join(base, "model.safetensors.index.json")))["weight_map"]
    assert sorted(weight_map) == sorted(base_map)  # the Hub's names, tied or not
    for name in ("config.json", "generation_config.json", "chat_template.json"):
        assert os.path.isfile(os.path.join(out, name)), name
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "qwen3_vl"
    processor = load_processor(out)
    assert processor.image_processor.patch_size == 16
    assert processor.chat_template == load_processor(str(base)).chat_template

    transformers.utils.logging.set_verbosity_warning()
    try:
        hf, info = transformers.Qwen3VLForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    finally:
        transformers.utils.logging.set_verbosity_error()
    assert {k: list(v) for k, v in info.items() if v} == {}  # no missing, unexpected or mismatched keys
    lm_head, embed = hf.lm_head.weight, hf.model.language_model.embed_tokens.weight
    assert (lm_head.data_ptr() == embed.data_ptr()) == (which == "tied")

    model, params = model_lib.load_model(str(base))
    params = checkpoint.restore_params(ckpt, params)
    assert_same_label_logits(model, params, hf, make_batch(torch.Generator().manual_seed(0), model.vision_spec(PAD),
                                                           ROWS))


def test_max_shard_size_as_transformers_names_it(tied_ckpt, tmp_path):
    """--max_shard_size=200KB: several shards of at most that size (a bigger tensor alone), an index naming every
    tensor, and the directory loads with from_pretrained with no missing keys."""
    assert [export.parse_shard_size(v) for v in ("5GB", "500MB", "2GiB", "1.5kb", 1234)] == [
        5 * 10 ** 9, 500 * 10 ** 6, 2 * 2 ** 30, 1500, 1234]
    with pytest.raises(export.ExportError, match="--max_shard_size"):
        export.parse_shard_size("lots")
    out = str(tmp_path / "hf")
    assert export.cli(["--checkpoint", tied_ckpt, "--output_dir", out, "--max_shard_size", "200KB"]) == 0
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2
    for name in files:
        with safetensors.safe_open(os.path.join(out, name), "pt") as f:
            sizes = [f.get_slice(k).get_shape() for k in f.keys()]
        total = sum(4 * _numel(s) for s in sizes)
        assert total <= 200_000 or len(sizes) == 1, (name, total)
    _, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, local_files_only=True,
                                                                 output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def test_qwen3_5_export_loads_cleanly_and_gives_the_trainers_logits(tiny_qwen3_5_dir, tmp_path):
    """Qwen3.5 (Gated DeltaNet layers beside gated attention): the export loads in Qwen3_5ForConditionalGeneration
    with no missing or unexpected keys, under the Hub's names, and gives the trainer's logits."""
    from test_qwen3_5_model import PAD, ROWS, make_batch

    ckpt = save_trained_checkpoint(tiny_qwen3_5_dir, tmp_path / "ckpt")
    out = str(tmp_path / "hf")
    export.export_checkpoint(ckpt, out, max_shard_bytes=8 * 1024 ** 2)
    weight_map = json.load(open(os.path.join(out, "model.safetensors.index.json")))["weight_map"]
    base_map = json.load(open(os.path.join(tiny_qwen3_5_dir, "model.safetensors.index.json")))["weight_map"]
    assert sorted(weight_map) == sorted(base_map)
    assert "model.language_model.layers.0.linear_attn.A_log" in weight_map
    assert json.load(open(os.path.join(out, "config.json")))["model_type"] == "qwen3_5"
    processor = load_processor(out)
    assert processor.chat_template == load_processor(str(tiny_qwen3_5_dir)).chat_template
    assert processor.tokenizer.convert_tokens_to_ids("<|image_pad|>") == 248056

    transformers.utils.logging.set_verbosity_warning()
    try:
        hf, info = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(
            out, dtype=torch.float32, local_files_only=True, output_loading_info=True)
    finally:
        transformers.utils.logging.set_verbosity_error()
    assert {k: list(v) for k, v in info.items() if v} == {}

    model, params = model_lib.load_model(str(tiny_qwen3_5_dir))
    params = checkpoint.restore_params(ckpt, params)
    assert_same_label_logits(model, params, hf, make_batch(torch.Generator().manual_seed(0), model.vision_spec(PAD),
                                                           ROWS))


@pytest.mark.slow
def test_export_of_a_four_rank_checkpoint_holds_about_one_shard_in_memory(tmp_path, robo2vlm_dir):
    """The checkpoint the trainer writes on 4 gloo ranks (full_shard, one step) of a ~75M-param Qwen2.5-VL whose
    largest tensor (the 152k x 64 embedding, 39 MB) is an eighth of it: `python -m vlm_sft.export
    --max_shard_size=40MB` grows its resident set by about one output shard and one tensor being converted, far
    from the full fp32 copy (300 MB) that building the model would hold; the directory loads with from_pretrained
    with no missing keys and gives the trainer's logits."""
    model_dir, run = tmp_path / "model", tmp_path / "run"
    n = fixtures.write_wide_qwen2_5_vl_dir(model_dir, text_hidden=64, text_layers=40, text_intermediate=8192,
                                           vision_hidden=128)
    train = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m",
             "vlm_sft.main", "--config", "configs/robo2vlm.py:demo", f"--config.actor.model.model_path={model_dir}",
             f"--config.data.train_data_paths={robo2vlm_dir}", "--config.data.eval_data_paths=",
             "--config.runner.max_steps=1", "--config.actor.micro_batch_size=1", "--config.actor.global_batch_size=4",
             "--config.actor.fsdp_config.sharding_strategy=full_shard", "--config.actor.compile=False",
             "--config.runner.val_before_train=False", "--config.runner.resume=",
             f"--config.runner.logger.log_path={run}"]
    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    ckpt = str(run / "demo" / "checkpoints" / "step_1")
    out = str(tmp_path / "hf")
    done = subprocess.run([sys.executable, "-m", "vlm_sft.export", "--checkpoint", ckpt, "--output_dir", out,
                           "--max_shard_size", "40MB"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    before, peak = map(float, re.search(r"host memory ([0-9.]+) GiB before the weights, peak ([0-9.]+) GiB",
                                        done.stderr).groups())
    grown_mib, full_fp32_mib = (peak - before) * 1024, n * 4 / 2 ** 20
    index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
    assert len(set(index["weight_map"].values())) >= 7
    # One 40 MB shard and the embedding in its conversion copies (read, merged in fp32, in the Hub's layout).
    print(f"export grew {grown_mib:.0f} MiB; full fp32 copy {full_fp32_mib:.0f} MiB")
    assert grown_mib < 40e6 / 2 ** 20 + 3 * 39 + 48 < 0.75 * full_fp32_mib, (grown_mib, full_fp32_mib)

    hf, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(out, dtype=torch.float32, local_files_only=True,
                                                                 output_loading_info=True)
    assert {k: list(v) for k, v in info.items() if v} == {}
    model, params = model_lib.load_model(str(model_dir))
    params = checkpoint.restore_params(ckpt, params)
    assert not torch.equal(params["model.language_model.layers.0.mlp.up_proj.weight"],
                           model_lib.load_model(str(model_dir))[1]["model.language_model.layers.0.mlp.up_proj.weight"])
    assert_same_label_logits(model, params, hf, trainers_batch(model, out, robo2vlm_dir))
