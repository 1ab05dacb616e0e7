"""One rank of evaluation, under torchrun (tests/test_loading.py, tests/test_distributed.py):

    torchrun --nproc_per_node=N tests/eval_worker.py MODEL_DIR DATA_DIR OUT_DIR MODE MODEL_TYPE ROWS [lora] [ep] [wait]

MODE "sharded": the model loaded as the trainer loads it (each rank its rows, full_shard; `lora`: adapters with
nonzero B, so merging matters; `ep`: experts expert-parallel over 2 ranks) and evaluated as the trainer evaluates (evaluate.evaluate, every group gathered for
its call only). MODE "reference" (one process): what evaluation was before it ran sharded: the whole model from
from_pretrained, HF `generate` on the module's own params, choices scored with the whole params.

Evaluates the first ROWS test rows in batches of 2 and writes OUT_DIR/rank<r>.json: the accuracies, each row's
generated text and chosen index (by row source), its pid and resident set before loading. With `wait`, it first
writes OUT_DIR/rank<r>.loaded (pid, resident set before loading) after loading and waits for OUT_DIR/eval, and at
the end waits for OUT_DIR/done, so the test can read this process's peak resident set (VmHWM) from outside after
loading and after evaluation.
"""
import inspect
import json
import os
import sys
import time

import torch
from torch.func import functional_call

# torchrun runs this file as a script: the repository root (where configs/ lives) is not on sys.path by itself.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from configs.robo2vlm import get_config  # noqa: E402
from vlm_sft import answers  # noqa: E402
from vlm_sft import evaluate as evaluate_lib  # noqa: E402
from vlm_sft import lora as lora_lib  # noqa: E402
from vlm_sft import main as main_lib  # noqa: E402
from vlm_sft import models as model_lib  # noqa: E402
from vlm_sft import sharding as sharding_lib  # noqa: E402
from vlm_sft import trainable  # noqa: E402
from vlm_sft.config import parse_dtype  # noqa: E402
from vlm_sft.data import loader as loader_lib  # noqa: E402
from vlm_sft.data.collate import collate_choices  # noqa: E402

BATCH = 2
MAX_NEW_TOKENS = 4


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def wait_for(path: str) -> None:
    deadline = time.time() + 600
    while not os.path.exists(path) and time.time() < deadline:
        time.sleep(0.1)


def make_config(model_dir: str, data_dir: str, model_type: str, rows: int, lora: bool, ep: int = 1):
    config = get_config("demo")
    config.actor.model.model_path = model_dir
    config.actor.model.model_type = model_type
    config.actor.model.is_lora = lora
    config.actor.fsdp_config.expert_parallel_size = ep
    config.actor.fsdp_config.sharding_strategy = "full_shard"
    config.actor.fsdp_config.mixed_precision.param_dtype = "bf16"  # frozen (LoRA base) leaves in bf16
    config.data.eval_data_paths = data_dir
    config.data.eval_max_rows = rows
    config.actor.eval_batch_size = BATCH
    config.eval.max_new_tokens = MAX_NEW_TOKENS
    config.eval.generate = config.eval.choice_scoring = True
    return config


def sharded(config, out: str, rank: int, world: int, device: torch.device, wait: bool) -> dict:
    plan = trainable.make_plan(config, trainable.skeleton(config.actor.model.model_path))
    files = main_lib.find_files(config, "eval_data_paths", "test")
    before = rss_mib()
    loaded = main_lib.load_model_and_plan(config, plan, files, device)
    params = loaded.params
    nonzero_b(params, rank, world)
    if wait:
        with open(os.path.join(out, f"rank{rank}.loaded"), "w") as f:
            json.dump({"pid": os.getpid(), "rss_before_mib": before,
                       "local_bytes": sharding_lib.local_bytes(params)}, f)
        wait_for(os.path.join(out, "eval"))
    rows = {}

    def record(examples, texts, preds) -> None:
        for e, t, p in zip(examples, texts, preds):
            rows[e.source] = [t, p]

    d = config.data
    batches = loader_lib.eval_batches(loaded.eval_source, loaded.encoder, list, batch_size=BATCH, world_size=world,
                                      rank=rank, max_rows=d.eval_max_rows)
    gather = sharding_lib.make_eval_gather(loaded.sharding, loaded.precision, plan.lora_scale)
    metrics = evaluate_lib.evaluate(loaded.step_model, params, batches, spec=loaded.spec, tokenizer=loaded.tokenizer,
                                    use_generation=True, use_choice_scoring=True, max_new_tokens=MAX_NEW_TOKENS,
                                    all_reduce_sum=sharding_lib.all_reduce_sum, on_batch=record, gather=gather,
                                    dtype=loaded.precision, synced=world > 1)
    return {"pid": os.getpid(), "rss_before_mib": before, "metrics": metrics, "rows": rows}


def nonzero_b(params: dict, rank: int, world: int) -> None:
    """Every LoRA B (zero at init: merging would change nothing) set to the same values on every run: this rank's
    rows of them (Shard(0), ceil(rows / world) each)."""
    g = torch.Generator().manual_seed(1)
    for k in sorted(params):
        if k.endswith(lora_lib.B_SUFFIX):
            full = torch.randn(params[k].shape, generator=g, dtype=torch.float32) * 0.05
            local = params[k].to_local() if hasattr(params[k], "to_local") else params[k]
            if hasattr(params[k], "placements"):
                n = -(-full.shape[0] // world)
                full = full[rank * n:(rank + 1) * n]
            local.copy_(full.to(local.dtype))


def reference(config) -> dict:
    """One process, as evaluation ran before it was sharded: the whole model from from_pretrained, the plan
    applied, the whole params LoRA-merged and cast to the precision, HF generate under functional_call with them,
    choices scored with them through the plain block_call."""
    path = config.actor.model.model_path
    encoder = main_lib.make_encoder(config)
    tokenizer = encoder.processor.tokenizer
    plan = trainable.make_plan(config, trainable.skeleton(path))
    precision = parse_dtype(config.actor.model.precision, "precision")
    compute = parse_dtype(config.actor.fsdp_config.mixed_precision.param_dtype, "param_dtype")
    model, params = model_lib.load_model(path)
    _, params = main_lib.apply_plan(model, params, plan, precision=precision, compute_dtype=compute,
                                    seed=config.actor.seed)
    nonzero_b(params, 0, 1)
    full = {k: v.to(precision) for k, v in lora_lib.merge_params(params, plan.lora_scale).items()}
    spec = model.vision_spec(pad_token_id=tokenizer.pad_token_id)
    source = main_lib.make_source(main_lib.find_files(config, "eval_data_paths", "test"), config)
    module = model.module
    args = inspect.signature(module.forward).parameters
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = module.generation_config.eos_token_id or tokenizer.eos_token_id
    rows, gen_correct, choice_correct = {}, 0, 0
    for item in loader_lib.eval_batches(source, encoder, list, batch_size=BATCH, max_rows=config.data.eval_max_rows):
        examples = item.batch
        inputs = evaluate_lib.generation_inputs(examples, pad, model.config.image_token_id,
                                                "mm_token_type_ids" in args, getattr(model.config, "video_token_id", -1),
                                                "second_per_grid_ts" in args)
        with torch.no_grad():
            out = functional_call(evaluate_lib._Generator(module), {"inner." + k: v for k, v in full.items()}, (),
                                  dict(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1,
                                       pad_token_id=pad, eos_token_id=eos, temperature=None, top_p=None,
                                       top_k=None))
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
            batch, counts = collate_choices(examples, spec)
            nll = model_lib.token_nll(model, full, batch)
        logprob = torch.zeros(sum(counts), dtype=nll.dtype).index_add_(0, batch["label_row"], -nll)
        starts = [sum(counts[:i]) for i in range(len(counts))]
        preds = [int(torch.argmax(logprob[s:s + n])) for s, n in zip(starts, counts)]
        for e, t, p in zip(examples, texts, preds):
            rows[e.source] = [t, p]
            gen_correct += answers.answers_match(answers.parse_generated_answer(t), e.target_text)
            choice_correct += p == e.answer_index
    n = len(rows)
    return {"metrics": {"eval/rows": n, "eval/eval_accuracy": gen_correct / n,
                        "eval/choice_accuracy": choice_correct / n}, "rows": rows}


def main(model_dir: str, data_dir: str, out: str, mode: str, model_type: str, rows: str, *flags: str) -> None:
    config = make_config(model_dir, data_dir, model_type, int(rows), "lora" in flags, 2 if "ep" in flags else 1)
    if mode == "reference":
        result = reference(config)
        rank = 0
    else:
        info = sharding_lib.ProcessInfo.from_env()
        device, _ = sharding_lib.init_process_group(info)
        rank = info.rank
        result = sharded(config, out, rank, info.world_size, device, "wait" in flags)
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    if "wait" in flags:
        wait_for(os.path.join(out, "done"))
    if mode != "reference":
        sharding_lib.barrier()
        sharding_lib.exit_process(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
