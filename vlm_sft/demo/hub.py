"""What every family's Hub-shaped directory shares: safetensors shards plus the index that maps tensors to them."""
import json
import pathlib

import safetensors.torch
import torch


def write_hub_shards(path: pathlib.Path, state: dict[str, torch.Tensor], *, first_shard_prefix: str) -> None:
    """Two safetensors shards (names starting with `first_shard_prefix` first, the rest second) and the
    model.safetensors.index.json that maps every tensor to its shard, as the Hub's multi-file checkpoints."""
    shards = [
        {k: v for k, v in sorted(state.items()) if k.startswith(first_shard_prefix)},
        {k: v for k, v in sorted(state.items()) if not k.startswith(first_shard_prefix)},
    ]
    weight_map = {}
    for i, shard in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.torch.save_file(shard, str(path / filename), metadata={"format": "pt"})
        weight_map.update({k: filename for k in shard})
    total_size = sum(v.numel() * v.element_size() for v in state.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

