"""Offline stand-ins for what the Hugging Face Hub ships: tiny random model directories, Robo2VLM-format data.

Nothing can be downloaded here, yet the trainer must be tested against the files a user really has. So these
builders write a model directory in the Hub's own layout (its config.json, bfloat16 safetensors shards under the
Hub's tensor names, Qwen's real 152k tokenizer, the real chat template and processor configs), and data shaped
like the Robo2VLM-1 download, not like anything our own code writes. The `:demo` config uses them; so do the tests.

  tokenizer.py    Qwen's tokenizer files, built offline from qwen.tiktoken
  hub.py          what every family's directory shares (shards + index)
  qwen2_5_vl.py   one module per family: its Hub config.json, processor configs, chat template, builder
  qwen3_vl.py
  qwen3_5.py      (Qwen's BPE with Qwen3.5's 248k special-token ids: no package ships Qwen3.5's vocabulary)
  qwen3_vl_moe.py
  qwen3_5_moe.py  (Qwen3.5's fixture tokenizer and template; the MoE fields in text_config)
  families.py     actor.model.model_type -> builder (a new family: one module, one entry)
  data.py         Robo2VLM parquet and JSONL/JSON writers (real image bytes)
  assets.py       prepare_demo: the `:demo` placeholders -> assets under the run directory

Only main.py and the tests import this package.
"""
from vlm_sft.demo.assets import DEMO, prepare_demo
from vlm_sft.demo.data import COLOURS, make_json_dir, make_robo2vlm_dir
from vlm_sft.demo.families import TINY_MODEL_BUILDERS, make_tiny_model_dir_for
from vlm_sft.demo.qwen2_5_vl import make_tiny_model_dir, tiny_hub_config
from vlm_sft.demo.qwen3_vl import make_tiny_qwen3_vl_dir, tiny_qwen3_vl_hub_config
from vlm_sft.demo.qwen3_vl_moe import make_tiny_qwen3_vl_moe_dir, tiny_qwen3_vl_moe_hub_config
from vlm_sft.demo.tokenizer import write_qwen_tokenizer_files

__all__ = ["COLOURS", "DEMO", "TINY_MODEL_BUILDERS", "make_json_dir", "make_robo2vlm_dir", "make_tiny_model_dir",
           "make_tiny_model_dir_for", "make_tiny_qwen3_vl_dir", "make_tiny_qwen3_vl_moe_dir", "prepare_demo",
           "tiny_hub_config", "tiny_qwen3_vl_hub_config", "tiny_qwen3_vl_moe_hub_config",
           "write_qwen_tokenizer_files"]
