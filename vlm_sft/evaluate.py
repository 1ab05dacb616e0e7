"""Multiple-choice evaluation over every row of the eval set.

Evaluation and generation run with the params as they are held (sharded on several ranks): every param group is
gathered just before the call that uses it and freed after (`gather`, sharding.make_eval_gather), as training
gathers per block, so no rank ever holds the whole model. Scoring goes through the models' block_call hook;
generation is HF's own `generate` (the family's rope and KV cache, each rank for its own rows) with a forward
pre-hook on each group's module that puts the gathered params in and a post-hook that takes them out. Gathers are
collectives, so on several ranks (`synced`) every rank runs the same calls: generation steps until every rank's
rows are done (HF's synced_gpus), and a rank out of rows runs its last batch again (results unused) while others
still have some.

Two accuracies:
  eval/eval_accuracy    RLinf's: greedy generation, then its answer parsing and whitespace/case-insensitive match
                        against "B. choice text" (vlm_sft/answers.py).
  eval/choice_accuracy  fast and deterministic: the choice whose target text ("B. choice text<|im_end|>") the model
                        finds most likely (summed log-probability) is the prediction.
"""
from __future__ import annotations

import contextlib
import inspect
import math
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
from absl import logging
from torch.func import functional_call

from vlm_sft import answers
from vlm_sft import models as model_lib
from vlm_sft.data.collate import collate_choices
from vlm_sft.data.vision import Spec


Gather = Callable[[model_lib.Params], model_lib.Params]  # one param group as held -> its full compute copy


def _whole(p: model_lib.Params) -> model_lib.Params:
    return p


def _block_call(gather: Gather) -> model_lib.BlockCall:
    """The models' block_call for evaluation: the group gathered for the call only (no autograd, no remat)."""

    def block_call(fn: Callable[..., Any], module: torch.nn.Module | None, p: model_lib.Params, *args: Any,
                   remat: bool = False, dynamic: bool = False) -> Any:
        return fn(module, gather(p), *args)

    return block_call


@torch.no_grad()
def score_choices(model: model_lib.Model, params: dict, examples: Sequence[Any], spec: Spec, *,
                  gather: Gather = _whole) -> list[int]:
    """Index of the most likely choice of each example."""
    batch, counts = collate_choices(examples, spec)
    device = _device_of(params)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    nll = model_lib.token_nll(model, params, batch, _block_call(gather))
    logprob = torch.zeros(sum(counts), dtype=nll.dtype, device=device).index_add_(0, batch["label_row"], -nll)
    logprob = logprob.cpu()
    preds, start = [], 0
    for n in counts:
        preds.append(int(torch.argmax(logprob[start:start + n])))
        start += n
    return preds


def _device_of(params: dict) -> torch.device:
    return next(iter(params.values())).device


def _group_params(model: model_lib.Model, params: dict) -> dict[str, model_lib.Params]:
    """Module prefix -> the params (as held, relative names) its forward reads: every param group, and for a
    tied lm_head (no leaf of its own) the embedding's weight."""
    groups = {prefix: model.block_params(params, prefix) for prefix in model.groups}
    if model.tied:
        groups["lm_head."] = {"weight": params[model.lm_head_name]}
    return groups


def _swap(module: torch.nn.Module, tensors: model_lib.Params) -> model_lib.Params:
    """Puts `tensors` (names relative to `module`) in place of its parameters; returns what they replaced."""
    old = {}
    for name, t in tensors.items():
        owner, _, leaf = name.rpartition(".")
        sub = module.get_submodule(owner) if owner else module
        old[name] = sub._parameters[leaf]
        sub._parameters[leaf] = t
    return old


@contextlib.contextmanager
def gathered_per_group(model: model_lib.Model, params: dict, gather: Gather) -> Iterator[None]:
    """While active, each param group's module holds its full params only during its own forward: a forward
    pre-hook gathers them in, a forward hook puts the previous tensors back (the gathered copy is then freed)."""
    handles, saved = [], {}
    try:
        for prefix, p in _group_params(model, params).items():
            sub = model.module.get_submodule(prefix[:-1])

            def put_in(module: torch.nn.Module, args: Any, p: model_lib.Params = p) -> None:
                saved.setdefault(id(module), []).append(_swap(module, gather(p)))

            def take_out(module: torch.nn.Module, args: Any, output: Any) -> None:
                _swap(module, saved[id(module)].pop())

            handles += [sub.register_forward_pre_hook(put_in), sub.register_forward_hook(take_out)]
        yield
    finally:
        for h in handles:
            h.remove()


class _Generator(torch.nn.Module):
    """Lets functional_call run HF `generate` with our params (generate is not the module's forward)."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, **kwargs: Any) -> torch.Tensor:
        return self.inner.generate(**kwargs)


def generation_inputs(examples: Sequence[Any], pad_token_id: int, image_token_id: int, with_token_types: bool,
                      video_token_id: int = -1, with_seconds: bool = False) -> dict[str, torch.Tensor]:
    """Left-padded prompts (everything before the target) and their images and videos, as HF generate expects
    (`with_seconds`: the family takes second_per_grid_ts)."""
    prompts = [e.input_ids[:e.prompt_length] for e in examples]
    length = max(len(p) for p in prompts)
    input_ids = torch.full((len(prompts), length), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, p in enumerate(prompts):
        input_ids[i, length - len(p):] = p
        attention_mask[i, length - len(p):] = 1
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    grids = [e.image_grid_thw for e in examples if len(e.image_grid_thw)]
    if grids:
        inputs["pixel_values"] = torch.cat([e.pixel_values for e in examples if len(e.image_grid_thw)]).float()
        inputs["image_grid_thw"] = torch.cat(grids).long()
    videos = [e for e in examples if getattr(e, "video_grid_thw", None) is not None and len(e.video_grid_thw)]
    if videos:
        inputs["pixel_values_videos"] = torch.cat([e.pixel_values_videos for e in videos]).float()
        inputs["video_grid_thw"] = torch.cat([e.video_grid_thw for e in videos]).long()
        if with_seconds:
            inputs["second_per_grid_ts"] = torch.cat([e.second_per_grid_ts for e in videos])
    if with_token_types:
        types = (input_ids == image_token_id).int()
        if videos:
            types += 2 * (input_ids == video_token_id).int()
        inputs["mm_token_type_ids"] = types
    return inputs


@torch.no_grad()
def generate(model: model_lib.Model, params: dict, examples: Sequence[Any], tokenizer: Any, *,
             max_new_tokens: int, gather: Gather = _whole, dtype: torch.dtype | None = None,
             synced: bool = False) -> list[str]:
    """Greedy generation of each example's answer, decoded without special tokens.

    The module holds placeholders while it runs (one NaN per param, expanded to its shape, in `dtype`, the
    gathered params' dtype: what HF reads of a module's dtype and device, and NaN wherever a param were read
    without its group's gather); each group's real params are gathered in for its forward only."""
    module = model.module
    forward_args = inspect.signature(module.forward).parameters
    with_types = "mm_token_type_ids" in forward_args
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    inputs = generation_inputs(examples, pad, model.config.image_token_id, with_types,
                               getattr(model.config, "video_token_id", -1), "second_per_grid_ts" in forward_args)
    device = _device_of(params)
    inputs = {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    generator = _Generator(module)
    eos = module.generation_config.eos_token_id or tokenizer.eos_token_id
    dtype = dtype or next(iter(params.values())).dtype
    nan = torch.full((), math.nan, dtype=dtype, device=device)
    placeholders = {"inner." + k: nan.expand(p.shape) for k, p in module.named_parameters()}
    with gathered_per_group(model, params, gather):
        out = functional_call(generator, placeholders, (), dict(
            **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
            eos_token_id=eos, temperature=None, top_p=None, top_k=None, synced_gpus=synced))
    new_tokens = out[:, inputs["input_ids"].shape[1]:].cpu()
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def _synced_batches(batches: Iterable[Any], all_reduce_sum: Callable[[torch.Tensor], torch.Tensor]
                    ) -> Iterator[tuple[list, bool, int]]:
    """(examples to run, whether they are this rank's own rows, skipped rows) while any rank has batches left, the
    same number of times on every rank; a rank without rows of its own in a round runs its last examples again
    (or, having none yet, the first row another rank has) so that every rank makes the same calls."""
    iterator, spare = iter(batches), None
    while True:
        item = next(iterator, None)
        examples = (item.batch or []) if item is not None else []
        spare = examples or spare
        ranks = all_reduce_sum(torch.tensor([item is not None, bool(examples), spare is None], dtype=torch.float64))
        with_items, with_rows, without_spare = ranks.tolist()
        if with_items == 0:
            return
        skipped = item.num_skipped if item is not None else 0
        if with_rows == 0:
            yield [], False, skipped
            continue
        if without_spare:  # a rank that never had a row: borrow one (rare: fewer rows than ranks, or all skipped)
            offered = [None] * dist.get_world_size()
            dist.all_gather_object(offered, examples[:1] or None)
            spare = spare or next(o for o in offered if o)
        yield (examples, True, skipped) if examples else (spare, False, skipped)


def evaluate(model: model_lib.Model, params: dict, batches: Iterable[Any], *, spec: Spec, tokenizer: Any,
             use_generation: bool, use_choice_scoring: bool, max_new_tokens: int,
             all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             on_batch: Callable[[Sequence[Any], list[str] | None, list[int] | None], None] | None = None,
             gather: Gather = _whole,
             dtype: torch.dtype | None = None, synced: bool = False) -> dict[str, float]:
    """Accuracy over every row the batches hold. `batches` yield objects with `.batch` (a list of Encoded) and
    `.num_skipped`; `all_reduce_sum` adds the counts of all ranks. `params` as held, `gather` one group's full
    copy in `dtype`; `synced`: other ranks run the same gathers (collectives), so every rank makes the same calls.
    `on_batch(examples, generated texts or None, chosen indices or None)` sees each batch of this rank's rows."""
    counts = torch.zeros(4, dtype=torch.float64)  # rows, generation correct, choice correct, skipped rows
    rounds = _synced_batches(batches, all_reduce_sum) if synced else (
        (item.batch or [], True, item.num_skipped) for item in batches)
    for examples, own, skipped in rounds:
        counts[3] += skipped
        if not examples:
            continue
        if own:
            counts[0] += len(examples)
        texts = preds = None
        if use_generation:
            texts = generate(model, params, examples, tokenizer, max_new_tokens=max_new_tokens, gather=gather,
                             dtype=dtype, synced=synced)
            if own and counts[0] == len(examples):  # first batch: what the model says, next to the gold answer
                for text, e in list(zip(texts, examples))[:3]:
                    logging.info("eval sample %s: generated %r, gold %r", e.source, text, e.target_text)
            if own:
                counts[1] += sum(answers.answers_match(answers.parse_generated_answer(t), e.target_text)
                                 for t, e in zip(texts, examples))
        if use_choice_scoring:
            preds = score_choices(model, params, examples, spec, gather=gather)
            if own:
                counts[2] += sum(p == e.answer_index for p, e in zip(preds, examples))
        if on_batch is not None and own:
            on_batch(examples, texts, preds)
    rows, gen_correct, choice_correct, skipped = all_reduce_sum(counts).tolist()
    metrics = {"eval/rows": rows, "eval/skipped_rows": skipped}
    if use_generation:
        metrics["eval/eval_accuracy"] = gen_correct / max(rows, 1)
    if use_choice_scoring:
        metrics["eval/choice_accuracy"] = choice_correct / max(rows, 1)
    return metrics
