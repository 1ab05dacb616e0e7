"""Session-scoped fixtures shared by all tests: Hub-layout tiny model directories and Robo2VLM-format parquet."""
import pathlib

import pytest

from vlm_sft import demo, sharding
from vlm_sft.data import processor as processor_lib


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """Tiny random Qwen2.5-VL as the Hub ships it: Qwen's 152k tokenizer, tied embeddings, bf16 shards."""
    return demo.make_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


@pytest.fixture(scope="session")
def tiny_model_dir_untied(tmp_path_factory):
    """Like tiny_model_dir but with a separate lm_head.weight (as larger Qwen2.5-VL models ship)."""
    return demo.make_tiny_model_dir(tmp_path_factory.mktemp("tiny_qwen2_5_vl_untied"), tie_word_embeddings=False,
                                       seed=1)


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir(tmp_path_factory):
    """Tiny random Qwen3-VL as the Hub ships Qwen3-VL-2B-Instruct: nested config, tied embeddings, bf16 shards."""
    return pathlib.Path(demo.make_tiny_qwen3_vl_dir(tmp_path_factory.mktemp("tiny_qwen3_vl")))


@pytest.fixture(scope="session")
def tiny_qwen3_vl_dir_untied(tmp_path_factory):
    """Like tiny_qwen3_vl_dir but with a separate lm_head.weight (as Qwen3-VL-8B ships)."""
    return pathlib.Path(demo.make_tiny_qwen3_vl_dir(tmp_path_factory.mktemp("tiny_qwen3_vl_untied"),
                                                       tie_word_embeddings=False, seed=1))


@pytest.fixture(scope="session")
def tiny_qwen3_5_dir(tmp_path_factory):
    """Tiny random Qwen3.5 (dense) as the Hub ships it: 3 Gated DeltaNet layers + 1 gated attention layer, Qwen3.5's
    token ids (248k vocabulary), tied embeddings, bf16 shards."""
    from vlm_sft.demo import qwen3_5
    return pathlib.Path(qwen3_5.make_tiny_qwen3_5_dir(tmp_path_factory.mktemp("tiny_qwen3_5")))


@pytest.fixture(scope="session")
def tiny_qwen3_5_moe_dir(tmp_path_factory):
    """Tiny random Qwen3.5-MoE shaped as Qwen3.5-35B-A3B: Qwen3.5's hybrid decoder (3 Gated DeltaNet layers + 1
    gated attention layer), every MLP sparse (8 experts, 2 per token) with a gated shared expert, untied."""
    from vlm_sft.demo import qwen3_5_moe
    return pathlib.Path(qwen3_5_moe.make_tiny_qwen3_5_moe_dir(tmp_path_factory.mktemp("tiny_qwen3_5_moe")))


@pytest.fixture(scope="session")
def tiny_qwen3_5_moe_per_expert_dir(tmp_path_factory, tiny_qwen3_5_moe_dir):
    """tiny_qwen3_5_moe_dir as transformers' own save_pretrained writes it (bf16): its conversion mapping reversed,
    so the stacked experts become one tensor per expert (`mlp.experts.{e}.gate_proj.weight`, ...), spread over
    several shards; the tokenizer and processor files copied beside them."""
    import shutil

    import torch
    import transformers

    out = tmp_path_factory.mktemp("tiny_qwen3_5_moe_per_expert")
    loaded = transformers.Qwen3_5MoeForConditionalGeneration.from_pretrained(
        str(tiny_qwen3_5_moe_dir), dtype=torch.bfloat16, local_files_only=True)
    # A model loaded from stacked files saves them stacked again (it keeps the conversions its loading applied);
    # one built from its config saves in the layout of transformers' default mapping: per expert.
    hf = transformers.Qwen3_5MoeForConditionalGeneration(loaded.config).to(torch.bfloat16)
    hf.load_state_dict(loaded.state_dict())
    hf.save_pretrained(str(out), max_shard_size="400KB")
    for f in tiny_qwen3_5_moe_dir.iterdir():
        if not (out / f.name).exists() and not f.name.startswith("model"):
            shutil.copyfile(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_qwen3_vl_moe_dir(tmp_path_factory):
    """Tiny random Qwen3-VL-MoE as the Hub ships Qwen3-VL-30B-A3B-Instruct (transposed stacked experts, untied),
    with one dense layer beside the sparse ones."""
    return pathlib.Path(demo.make_tiny_qwen3_vl_moe_dir(tmp_path_factory.mktemp("tiny_qwen3_vl_moe")))


@pytest.fixture(scope="session")
def robo2vlm_dir(tmp_path_factory):
    """Robo2VLM-1-shaped folder: 2 train files (64 rows), 1 test file (16 rows), PNG and JPEG images mixed."""
    return demo.make_robo2vlm_dir(tmp_path_factory.mktemp("robo2vlm"), image_format="mixed")


@pytest.fixture(scope="session")
def tiny_processor(tiny_model_dir):
    """load_processor(tiny_model_dir) with the Hub's default pixel budget. Shared: do not mutate it."""
    return processor_lib.load_processor(tiny_model_dir)


@pytest.fixture(scope="module")
def device():
    """The process group of this test process (a mesh of one; created once per module if none exists)."""
    device, created = sharding.init_process_group(sharding.ProcessInfo())
    yield device
    if created:
        sharding.destroy_process_group()
