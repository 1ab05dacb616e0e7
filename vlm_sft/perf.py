"""Honest speed accounting: the FLOPs a train step must do, MFU against the device's peak, padding waste.

MFU counts only the work the step needs (../shared/DESIGN.md "Measuring speed honestly"), never work that was
skipped and never padding or activation recompute:
  text    6 * P_text * T          P_text: matmul weights of the decoder layers; T: real (attention-mask) tokens
        + 6 * P_head * N          the lm_head runs only at the N label tokens
        + 6 * l * h * (d_qk + d_v) * sum_i s_i^2     attention (torchtitan's term, causal not halved); s_i: real
                                                     tokens of row i; l layers, h query heads
  vision  c * P_vis * patches     P_vis: matmul weights of the vision blocks; c = 6 when the vision tower
                                  trains, 2 when frozen (forward only)
        + c' * P_patch * patches  the patch embedding: c' = 4 (pixels need no gradient), 2 when frozen
        + c * P_merge * patches / m^2     P_merge: the merger's matmul weights (Qwen3-VL: + the DeepStack mergers')
        + c * h * (d_qk + d_v) * sum over blocks of sum(segment_len^2)   windows / frames, as attended
        + c' * taps * D * patches         Qwen3-VL's learned position embeddings: `taps` (4) table rows of width D
                                          mixed per patch (forward 2*taps*D; backward 2*taps*D into the table)
Mixture-of-experts layers: P_text counts the router and, of the stacked experts [E, ...], only the top_k / E share
a token runs (active params; the experts' work on padding tokens is not counted, like all padding).
Biases, norms, rotary and elementwise work are left out (a fraction of a percent at 3B). The family's
architecture numbers come from models/ (FlopShape); the param counts from the params' shapes.

With frozen parts or LoRA (`weight_grads`: the weights that get a weight gradient; trainable.py), each matmul
weight w counts f_w = 2 (forward) + 2 (its weight gradient, if w gets one) + 2 (its input's gradient, if any
leaf before it in forward order gets a gradient; never for the patch embedding) instead of 6, i.e. P above is
sum(f_w * n_w) / 6: a frozen vision tower under a trained LLM counts 2x, frozen layers above a trained part 4x.
LoRA merges W + s*B@A inside the block, so an adapted weight gets the full weight gradient (6x) and each block
call adds 6*r*(in*out) per adapted linear (B@A and its two gradients). Attention counts 6 in the text model, and
in the vision tower when any of its blocks' weights gets a gradient (else 2). `shapes` holds base weights only.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Collection, Mapping, Sequence

import torch

Batch = dict[str, torch.Tensor]

from vlm_sft import hostmem, models

TEXT_LAYERS = "model.language_model.layers."
VISION_BLOCKS = "model.visual.blocks."
PATCH_EMBED = "model.visual.patch_embed."

FORMULA = ("MFU = (6*P_text*tokens + 6*P_head*labels + 6*l*h*(dqk+dv)*sum(s^2) + c*P_vis*patches "
           "+ 4*P_patch*patches + c*P_merge*patches/m^2 + c*h_v*(dqk+dv)*sum(seg^2) + 4*taps*D_v*patches) "
           "/ (step_time * peak * devices); c=6 (frozen vision: c=2, patch 2); with frozen parts or LoRA each "
           "weight's P counts f_w/6, f_w = 2 forward + 2 weight grad + 2 input grad where needed (vlm_sft/perf.py)")

# Dense (no sparsity) peak FLOP/s per device from the vendors' data sheets, matched by device-name substring in
# order (more specific names first). Half precision = bf16/fp16 tensor cores; "tf32" where fp32 matmuls may use
# TF32 tensor cores; "fp32" plain CUDA cores.
_PEAKS: tuple[tuple[str, dict[str, float]], ...] = (
    ("H100 PCIe", {"half": 756e12, "tf32": 378e12, "fp32": 51e12}),
    ("H100 NVL", {"half": 835e12, "tf32": 418e12, "fp32": 60e12}),
    ("H100", {"half": 989e12, "tf32": 494e12, "fp32": 67e12}),    # SXM, e.g. "NVIDIA H100 80GB HBM3"
    ("H200", {"half": 989e12, "tf32": 494e12, "fp32": 67e12}),
    ("H20", {"half": 148e12, "tf32": 74e12, "fp32": 44e12}),
    ("A100", {"half": 312e12, "tf32": 156e12, "fp32": 19.5e12}),
    ("L40S", {"half": 362e12, "tf32": 183e12, "fp32": 91.6e12}),
    ("A10G", {"half": 70e12, "tf32": 35e12, "fp32": 31.2e12}),
)


def peak_flops_for(device_name: str, dtype: torch.dtype, *, allow_tf32: bool = False) -> float | None:
    """Peak dense FLOP/s of one device called `device_name` computing matmuls in `dtype`; None when unknown."""
    kind = "half" if dtype in (torch.bfloat16, torch.float16) else ("tf32" if allow_tf32 else "fp32")
    for key, peaks in _PEAKS:
        if key in device_name:
            return peaks[kind]
    return None


def device_peak_flops(device: torch.device, dtype: torch.dtype) -> float | None:
    """Peak FLOP/s of `device` for matmuls in `dtype`; None on CPU or an unknown card (then no MFU is logged:
    a made-up peak would make the number meaningless)."""
    if device.type != "cuda":
        return None
    return peak_flops_for(torch.cuda.get_device_name(device), dtype,
                          allow_tf32=torch.backends.cuda.matmul.allow_tf32)


@dataclasses.dataclass(frozen=True)
class FlopModel:
    """Per-unit FLOP coefficients of one model (see the module docstring)."""

    text_params: int         # matmul weights of the decoder layers
    head_params: int         # lm_head (= embedding when tied) weights
    text_attention: int      # l * h * (d_qk + d_v)
    vision_params: int       # matmul weights of the vision blocks, applied per patch
    patch_params: int        # the patch embedding's weights, applied per patch (no input gradient)
    merger_params: int       # matmul weights applied per merged token
    merge_unit: int          # patches per merged token (spatial_merge_size^2)
    vision_attention: int    # h * (d_qk + d_v) of one vision block
    window_blocks: int       # vision blocks attending within windows
    full_blocks: int         # vision blocks attending within whole frames
    pos_embed: int = 0       # taps * width of the learned position embeddings mixed per patch (0: none)
    vision_factor: int = 6   # 6 when the vision tower trains, 2 when frozen
    patch_factor: int = 4    # the patch embedding: 4 when it trains (weight gradient only), 2 when frozen
    adapter_flops: float = 0.0  # per micro-batch: 6*r*in*out per LoRA-adapted linear (merge and its gradients)

    @classmethod
    def from_model(cls, config, shapes: Mapping[str, torch.Size | Sequence[int]], lm_head_name: str, *,
                   vision_trainable: bool = True, weight_grads: Collection[str] | None = None,
                   lora_rank: int = 0) -> "FlopModel":
        """`config`: the HF config of a supported family; `shapes`: param name -> (global) shape, e.g. the params
        pytree.

        weight_grads: the base weights that get a weight gradient (trained, or LoRA-adapted); None = all (full
        fine-tuning). With it, each weight counts f_w / 6 of its size (module docstring)."""
        factors = _weight_factors(shapes, weight_grads)
        if weight_grads is not None:
            vision_trainable = any(factors[n] > 2 for n in shapes if n.startswith(VISION_BLOCKS))
        vision_factor, patch_factor = (6, 4) if vision_trainable else (2, 2)
        arch = models.family_for_config(config).flop_shape(config)

        def matmul(prefix: str, base: int) -> int:
            """Weights under prefix, each weighted by f_w / base (plain counts when every factor is the base);
            stacked experts by the share of them a token runs (top_k / E: active params only)."""
            total = 0.0
            for name, shape in shapes.items():
                shape = tuple(shape)
                if name.startswith(prefix) and len(shape) >= 2:
                    active = arch.expert_fraction if name.endswith(arch.expert_suffixes) else 1.0
                    total += _numel(shape) * factors.get(name, base) / base * active
            return round(total)

        adapted = [n for n in (weight_grads or ()) if lora_rank]  # with LoRA, weight_grads = the adapted weights
        return cls(
            text_params=matmul(TEXT_LAYERS, 6),
            head_params=round(_numel(tuple(shapes[lm_head_name])) * _head_factor(lm_head_name, weight_grads) / 6),
            text_attention=arch.text_layers * arch.text_heads * 2 * arch.text_head_dim,
            vision_params=matmul(VISION_BLOCKS, vision_factor),
            patch_params=matmul(PATCH_EMBED, patch_factor),
            merger_params=sum(matmul(prefix, vision_factor) for prefix in arch.merger_prefixes),
            merge_unit=arch.merge_unit,
            vision_attention=arch.vision_heads * 2 * arch.vision_head_dim,
            window_blocks=arch.window_blocks,
            full_blocks=arch.full_blocks,
            pos_embed=arch.pos_embed_taps * arch.vision_hidden,
            vision_factor=vision_factor,
            patch_factor=patch_factor,
            adapter_flops=6.0 * lora_rank * sum(_numel(tuple(shapes[n])) for n in adapted),
        )

    def batch_flops(self, batch: Batch) -> float:
        """FLOPs one micro-batch needs (forward + backward). Reads host-side index tensors only."""
        if "row_ids" in batch:  # packed: each row attends within itself (data/collate.py collate_packed)
            lengths = torch.bincount(batch["row_ids"][batch["attention_mask"] > 0]).to(torch.float64)
        else:
            lengths = batch["attention_mask"].sum(dim=1).to(torch.float64)
        if "label_weight" in batch:
            labels = float(batch["label_weight"].sum())
        else:
            labels = float(len(batch["label_ids"]))
        flops = 6.0 * (self.text_params * float(lengths.sum()) + self.head_params * labels
                       + self.text_attention * float((lengths ** 2).sum()))
        if "pixel_values" in batch:
            patches = float(batch["pixel_values"].shape[0])
            window = _sum_squares(batch["window_cu_seqlens"]) if self.window_blocks else 0.0
            full = _sum_squares(batch["full_cu_seqlens"])
            flops += self.vision_factor * (
                self.vision_params * patches + self.merger_params * patches / self.merge_unit
                + self.vision_attention * (self.window_blocks * window + self.full_blocks * full))
            flops += self.patch_factor * (self.patch_params + self.pos_embed) * patches
        return flops + self.adapter_flops

    def step_flops(self, micro_batches: Sequence[Batch | None]) -> float:
        return sum(self.batch_flops(b) for b in micro_batches if b is not None)


def _weight_factors(shapes: Mapping[str, Any], weight_grads: Collection[str] | None) -> dict[str, int]:
    """f_w for each matmul weight in params (forward) order: 2 + 2 [w gets a weight gradient] + 2 [some earlier
    leaf gets one, so w's input needs a gradient; never for the patch embedding, whose input is pixels]."""
    if weight_grads is None:
        return {}
    grads = set(weight_grads)
    factors, upstream = {}, False
    for name in shapes:
        factors[name] = 2 + 2 * (name in grads) + 2 * (upstream and not name.startswith(PATCH_EMBED))
        upstream = upstream or name in grads
    return factors


def _head_factor(lm_head_name: str, weight_grads: Collection[str] | None) -> int:
    """The lm_head runs last (tied, its weight is also the embedding's, used first): 2 + 2 if its weight gets a
    gradient + 2 if anything else does (then its input needs one)."""
    if weight_grads is None:
        return 6
    grads = set(weight_grads)
    return 2 + 2 * (lm_head_name in grads) + 2 * bool(grads - {lm_head_name})


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _sum_squares(cu_seqlens: torch.Tensor) -> float:
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    return float((lengths ** 2).sum())


def mfu(flops: float, seconds: float, peak_flops: float | None, devices: int = 1) -> float | None:
    """Model FLOPs utilisation: required FLOPs / (time * peak * devices); None without a known peak."""
    if peak_flops is None or seconds <= 0:
        return None
    return flops / (seconds * peak_flops * devices)


def padding_fraction(micro_batches: Sequence[Batch | None]) -> float:
    """Share of the text positions the step computes that are padding (length buckets trade this for fewer
    compilations)."""
    present = [b for b in micro_batches if b is not None]
    total = sum(b["attention_mask"].numel() for b in present)
    real = sum(int(b["attention_mask"].sum()) for b in present)
    return 1.0 - real / total if total else 0.0


def real_tokens(micro_batches: Sequence[Batch | None]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in micro_batches if b is not None)


def max_memory_gib(device: torch.device) -> float:
    """Peak memory so far: allocated CUDA memory on a GPU, the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return hostmem.peak_resident_gib()
