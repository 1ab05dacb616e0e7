"""What is trained: a partition of the params pytree's leaves, decided once at start from the config.

Every leaf is either frozen or trained; every trained leaf has a learning-rate multiplier and a weight-decay flag
(optax's multi_transform labels, reduced to what differs between groups). The step asks for gradients of the
trained leaves only, so autograd never enters a part whose leaves are all frozen, frozen leaves get no optimizer
state and no gradient reduction, and they may be held in the compute dtype. LoRA (lora.py) is one such plan: every
base leaf frozen, the adapters trained.

Everything is decided from parameter names (regexes searched in them) and the model skeleton's nn.Linear modules,
so it holds for every model family and is checked on a meta-device skeleton before any weight is loaded.

Presets (LLaMA-Factory's and ms-swift's names), for Qwen2.5-VL and Qwen3-VL alike:
  freeze_vision_tower  model.visual.* except the merger(s): patch embedding, position embedding, blocks
  freeze_merger        model.visual.merger.* and Qwen3-VL's model.visual.deepstack_merger_list.*
  freeze_llm           model.language_model.* and lm_head
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

from vlm_sft import lora as lora_lib
from vlm_sft.errors import ConfigError

VISION_TOWER = r"^model\.visual\.(?!merger\.|deepstack_merger_list\.)"
MERGER = r"^model\.visual\.(merger|deepstack_merger_list)\."
LLM = r"^(model\.language_model\.|lm_head\.)"
PRESETS = {"freeze_vision_tower": VISION_TOWER, "freeze_merger": MERGER, "freeze_llm": LLM}


class PlanError(ConfigError):
    """A freeze / LoRA / lr-multiplier setting that cannot work; the message names the field."""


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """Which leaves train, at which lr factor, with or without weight decay (all names as in the params dict)."""

    trainable: tuple[str, ...]           # in params order (base params first, then adapters)
    frozen: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]   # every leaf, adapters included
    lr_multipliers: dict[str, float]     # trainable name -> factor of the scheduled lr
    decay: dict[str, bool]               # trainable name -> weight decay applies
    lora_modules: tuple[str, ...] = ()   # adapted linear modules, then stacked expert params; empty without LoRA
    lora_rank: int = 0
    lora_scale: float | None = None      # lora_alpha / lora_rank; None without LoRA

    @property
    def is_lora(self) -> bool:
        return bool(self.lora_modules)

    @property
    def lora_weights(self) -> list[str]:
        """The base params LoRA adapts (linear modules' weights, stacked expert params)."""
        return [lora_lib.target_weight(m, self.shapes) for m in self.lora_modules]

    @property
    def weight_grads(self) -> list[str] | None:
        """Base weights that get a weight gradient (perf's MFU): the trained ones, or with LoRA the adapted ones
        (merged inside the block, W' gets the full gradient). None when nothing is frozen (every weight)."""
        if not self.frozen:
            return None
        return self.lora_weights if self.is_lora else list(self.trainable)

    def _lora_targets(self) -> str:
        stacked = sum(len(self.shapes[w]) == 3 for w in self.lora_weights)
        linear = f"{len(self.lora_modules) - stacked} linear modules"
        return linear + (f" and {stacked} stacked expert tensors (one adapter per expert)" if stacked else "")

    def numel(self, names: tuple[str, ...] | list[str]) -> int:
        return sum(_numel(self.shapes[n]) for n in names)

    def groups(self) -> list[tuple[float, bool, int, int]]:
        """(lr multiplier, decay, tensors, elements) per group of trained leaves, largest lr factor first."""
        out: dict[tuple[float, bool], list[int]] = {}
        for name in self.trainable:
            key = (self.lr_multipliers[name], self.decay[name])
            counts = out.setdefault(key, [0, 0])
            counts[0] += 1
            counts[1] += _numel(self.shapes[name])
        return [(m, d, n, e) for (m, d), (n, e) in sorted(out.items(), key=lambda kv: (-kv[0][0], not kv[0][1]))]

    def describe(self, lr: float, optimizer_state_bytes: int) -> list[str]:
        """The run-start summary: counts, optimizer state, groups and their learning rates."""
        lines = [f"trainable: {self.numel(self.trainable):,} params in {len(self.trainable)} tensors; frozen: "
                 f"{self.numel(self.frozen):,} params in {len(self.frozen)} tensors"
                 + (f"; LoRA r={self.lora_rank} scale={self.lora_scale:g} on {self._lora_targets()}"
                    if self.is_lora else ""),
                 f"optimizer state: {optimizer_state_bytes / 2 ** 20:,.1f} MiB on this rank"]
        for mult, decay, tensors, elements in self.groups():
            lines.append(f"  group: lr {lr * mult:.3g} (x{mult:g}), weight decay {'on' if decay else 'off'}: "
                         f"{tensors} tensors, {elements:,} params")
        return lines


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _compile(pattern: Any, field: str) -> re.Pattern:
    if not isinstance(pattern, str) or not pattern:
        raise PlanError(f"{field}={pattern!r}: expected a non-empty regular expression string")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise PlanError(f"{field}={pattern!r}: not a regular expression ({e})") from None


def check_config(config: Any) -> None:
    """Every plan field that can be judged without the model (types, regex syntax, LoRA numbers)."""
    m, o = config.actor.model, config.actor.optim
    for key in PRESETS:
        if not isinstance(m[key], bool):
            raise PlanError(f"actor.model.{key}={m[key]!r}: expected True or False")
    if not isinstance(m.freeze, (tuple, list)):
        raise PlanError(f"actor.model.freeze={m.freeze!r}: expected a tuple of regexes, e.g. "
                        "\"('^model\\.visual\\.blocks\\.[0-9]\\.',)\"")
    for pattern in m.freeze:
        _compile(pattern, "actor.model.freeze")
    if not isinstance(o.no_decay, bool):
        raise PlanError(f"actor.optim.no_decay={o.no_decay!r}: expected True or False")
    for pair in _multiplier_pairs(o.lr_multipliers):
        _compile(pair[0], "actor.optim.lr_multipliers")
    if not m.is_lora:
        return
    if not isinstance(m.lora_rank, int) or isinstance(m.lora_rank, bool) or m.lora_rank <= 0:
        raise PlanError(f"actor.model.lora_rank={m.lora_rank!r}: expected a positive integer")
    if not isinstance(m.lora_alpha, (int, float)) or m.lora_alpha <= 0:
        raise PlanError(f"actor.model.lora_alpha={m.lora_alpha!r}: expected a positive number")
    if m.lora_dropout != 0:
        raise PlanError(f"actor.model.lora_dropout={m.lora_dropout!r}: only 0.0 is supported (adapters are merged "
                        "into each weight inside the block, W + alpha/r * B @ A, which cannot drop the adapter's "
                        "input; see vlm_sft/lora.py)")
    if m.lora_target_modules != lora_lib.ALL_LINEAR:
        _compile(m.lora_target_modules, "actor.model.lora_target_modules")


def _multiplier_pairs(value: Any) -> list[tuple[str, float]]:
    field = "actor.optim.lr_multipliers"
    example = "\"(('^model\\.visual\\.', 0.1),)\""
    if not isinstance(value, (tuple, list)):
        raise PlanError(f"{field}={value!r}: expected a tuple of (regex, factor) pairs, e.g. {example}")
    pairs = []
    for item in value:
        if (not isinstance(item, (tuple, list)) or len(item) != 2 or not isinstance(item[1], (int, float))
                or isinstance(item[1], bool) or item[1] < 0):
            raise PlanError(f"{field}: entry {item!r} is not a (regex, factor >= 0) pair, e.g. {example}")
        pairs.append((item[0], float(item[1])))
    return pairs


def make_plan(config: Any, module: torch.nn.Module) -> TrainPlan:
    """The plan for `module` (a skeleton is enough: meta tensors have names and shapes) under the config.

    Raises PlanError naming the field for a regex that matches nothing, a plan that trains nothing, and a LoRA
    target inside a part frozen by name (the presets or actor.model.freeze).
    """
    check_config(config)
    m, o = config.actor.model, config.actor.optim
    shapes = {name: tuple(p.shape) for name, p in module.named_parameters()}
    names = list(shapes)

    frozen: set[str] = set()
    rules = [(f"actor.model.{key}=True", PRESETS[key]) for key in PRESETS if m[key]]
    rules += [(f"actor.model.freeze entry {p!r}", p) for p in m.freeze]
    for field, pattern in rules:
        matched = {n for n in names if re.search(pattern, n)}
        if not matched:
            raise PlanError(f"{field} matches no parameter of the model (names look like {names[0]!r})")
        frozen |= matched

    lora_modules: tuple[str, ...] = ()
    if m.is_lora:
        lora_modules = tuple(lora_lib.target_modules(module, m.lora_target_modules))
        inside = [mod for mod in lora_modules if lora_lib.target_weight(mod, shapes) in frozen]
        if inside:
            raise PlanError(f"actor.model.lora_target_modules={m.lora_target_modules!r} matches {inside[0]!r}, "
                            f"inside a frozen part ({len(inside)} such modules): unfreeze it or narrow the targets")
        for mod in lora_modules:
            a, b = lora_lib.adapter_names(mod)
            shapes[a], shapes[b] = lora_lib.adapter_shapes(shapes[lora_lib.target_weight(mod, shapes)], m.lora_rank)
        trainable = [n for n in shapes if lora_lib.is_adapter(n)]
        frozen = set(names)
    else:
        trainable = [n for n in names if n not in frozen]
        if not trainable:
            raise PlanError("actor.model.freeze_* / actor.model.freeze freeze every parameter: nothing to train")

    multipliers = {n: 1.0 for n in trainable}
    assigned: set[str] = set()
    for pattern, factor in _multiplier_pairs(o.lr_multipliers):
        matched = [n for n in shapes if re.search(pattern, n)]
        if not matched:
            raise PlanError(f"actor.optim.lr_multipliers key {pattern!r} matches no parameter of the model "
                            f"(names look like {names[0]!r})")
        hits = [n for n in matched if n in multipliers]
        if not hits:
            raise PlanError(f"actor.optim.lr_multipliers key {pattern!r} matches only frozen parameters "
                            f"(first {matched[0]!r})")
        for n in hits:
            if n not in assigned:  # the first matching pair wins
                multipliers[n] = factor
                assigned.add(n)
    decay = {n: not (o.no_decay and len(shapes[n]) <= 1) for n in trainable}
    return TrainPlan(trainable=tuple(trainable), frozen=tuple(n for n in names if n in frozen), shapes=shapes,
                     lr_multipliers=multipliers, decay=decay, lora_modules=lora_modules,
                     lora_rank=m.lora_rank if m.is_lora else 0,
                     lora_scale=lora_lib.scale_of(m.lora_alpha, m.lora_rank) if m.is_lora else None)


def skeleton(model_path: str) -> torch.nn.Module:
    """The model of `model_path`/config.json on the meta device: names, shapes and module types, no memory."""
    import transformers

    config = transformers.AutoConfig.from_pretrained(model_path, local_files_only=True)
    with torch.device("meta"):
        return transformers.AutoModelForImageTextToText.from_config(config)
