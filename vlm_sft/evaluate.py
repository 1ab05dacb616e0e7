"""Multiple-choice evaluation over every row of the eval set.

Two accuracies:
  eval/eval_accuracy    RLinf's: greedy generation, then its answer parsing and whitespace/case-insensitive match
                        against "B. choice text" (vlm_sft/answers.py).
  eval/choice_accuracy  fast and deterministic: the choice whose target text ("B. choice text<|im_end|>") the model
                        finds most likely (summed log-probability) is the prediction.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Sequence

import torch
from absl import logging
from torch.func import functional_call

from vlm_sft import answers
from vlm_sft import models as model_lib
from vlm_sft.data.collate import collate_choices
from vlm_sft.data.vision import Spec


@torch.no_grad()
def score_choices(model: model_lib.Model, params: dict, examples: Sequence[Any], spec: Spec) -> list[int]:
    """Index of the most likely choice of each example."""
    batch, counts = collate_choices(examples, spec)
    device = _device_of(params)
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    nll = model_lib.token_nll(model, params, batch)
    logprob = torch.zeros(sum(counts), dtype=nll.dtype, device=device).index_add_(0, batch["label_row"], -nll)
    logprob = logprob.cpu()
    preds, start = [], 0
    for n in counts:
        preds.append(int(torch.argmax(logprob[start:start + n])))
        start += n
    return preds


def _device_of(params: dict) -> torch.device:
    return next(iter(params.values())).device


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
             max_new_tokens: int) -> list[str]:
    """Greedy generation of each example's answer, decoded without special tokens."""
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
    out = functional_call(generator, {"inner." + k: v for k, v in params.items()}, (), dict(
        **inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, pad_token_id=pad,
        eos_token_id=eos, temperature=None, top_p=None, top_k=None))
    new_tokens = out[:, inputs["input_ids"].shape[1]:].cpu()
    return tokenizer.batch_decode(new_tokens, skip_special_tokens=True)


def evaluate(model: model_lib.Model, params: dict, batches: Iterable[Any], *, spec: Spec, tokenizer: Any,
             use_generation: bool, use_choice_scoring: bool, max_new_tokens: int,
             all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
             on_batch: Callable[[int], None] | None = None) -> dict[str, float]:
    """Accuracy over every row the batches hold. `batches` yield objects with `.batch` (a list of Encoded) and
    `.num_skipped`; `all_reduce_sum` adds the counts of all ranks."""
    counts = torch.zeros(4, dtype=torch.float64)  # rows, generation correct, choice correct, skipped rows
    for item in batches:
        examples = item.batch or []
        counts[3] += item.num_skipped
        if not examples:
            continue
        counts[0] += len(examples)
        if use_generation:
            texts = generate(model, params, examples, tokenizer, max_new_tokens=max_new_tokens)
            if counts[0] == len(examples):  # first batch: show what the model says, next to the gold answer
                for text, e in list(zip(texts, examples))[:3]:
                    logging.info("eval sample %s: generated %r, gold %r", e.source, text, e.target_text)
            counts[1] += sum(answers.answers_match(answers.parse_generated_answer(t), e.target_text)
                             for t, e in zip(texts, examples))
        if use_choice_scoring:
            preds = score_choices(model, params, examples, spec)
            counts[2] += sum(p == e.answer_index for p, e in zip(preds, examples))
        if on_batch is not None:
            on_batch(len(examples))
    rows, gen_correct, choice_correct, skipped = all_reduce_sum(counts).tolist()
    metrics = {"eval/rows": rows, "eval/skipped_rows": skipped}
    if use_generation:
        metrics["eval/eval_accuracy"] = gen_correct / max(rows, 1)
    if use_choice_scoring:
        metrics["eval/choice_accuracy"] = choice_correct / max(rows, 1)
    return metrics
