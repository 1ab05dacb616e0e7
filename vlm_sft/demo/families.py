"""actor.model.model_type -> the builder of its tiny random Hub-layout directory, one module per family (as
vlm_sft/models/ registers its families): a new family adds its module here and one entry below."""
import os
from typing import Callable

from vlm_sft.demo import qwen2_5_vl, qwen3_5, qwen3_5_moe, qwen3_vl, qwen3_vl_moe

TINY_MODEL_BUILDERS: dict[str, Callable[..., str | os.PathLike]] = {
    m.MODEL_TYPE: m.BUILD for m in (qwen2_5_vl, qwen3_vl, qwen3_vl_moe, qwen3_5, qwen3_5_moe)
}


def make_tiny_model_dir_for(model_type: str, path: str | os.PathLike, *, seed: int = 0) -> str:
    """A tiny random directory of the family `model_type` names, laid out as the Hub ships that family."""
    if model_type not in TINY_MODEL_BUILDERS:
        raise ValueError(f"actor.model.model_type={model_type!r}: no tiny model builder (expected one of "
                         f"{', '.join(TINY_MODEL_BUILDERS)})")
    return str(TINY_MODEL_BUILDERS[model_type](path, seed=seed))
