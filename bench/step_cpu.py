"""CPU benchmark: this trainer's compiled train step vs the eager Hugging Face loop, same batches, same process.

  python bench/step_cpu.py                  # ~5 min on 2 cores, most of it compilation
  python bench/step_cpu.py --steps 4 --rounds 5 --image-size 320x240

Model: vlm_sft.demo's tiny random Qwen2.5-VL (Qwen's real 152k vocabulary, tied embeddings), fp32. Data:
generated Robo2VLM-format rows (JPEG images) through the trainer's own processor, encoder and collate (length
buckets from configs/robo2vlm.py, padded label count), micro-batch 4, one micro-batch per step, AdamW (lr 1e-5,
weight decay 0.01) with global-norm clipping at 1.0. Contestants:
  HF eager            model(**inputs, labels=labels).loss.backward(); clip_grad_norm_; torch.optim.AdamW.step()
                      (the RLinf/TRL loop; batches padded only to their longest row, as a HF collator pads)
  vlm-sft eager       make_train_step(compile=False), params as main.py holds them (plain tensors on one rank,
                      gathered per block: vlm_sft/sharding.py)
  vlm-sft compiled    the same with compile=True: compiled by region (vlm_sft/compile.py)
Targets: vlm-sft compiled >= 1.8x the HF loop's steps/s (issue 5), >= 8x (issue 20: the small-model speed back).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]  # common.py; the repo root for configs/
import common  # noqa: E402

from configs.robo2vlm import get_config  # noqa: E402
from vlm_sft import models as model_lib  # noqa: E402
from vlm_sft import demo, perf  # noqa: E402
from vlm_sft import sharding as sharding_lib  # noqa: E402
from vlm_sft.data import robo2vlm  # noqa: E402
from vlm_sft.data.collate import collate_encoded  # noqa: E402
from vlm_sft.data.encode import Encoder  # noqa: E402
from vlm_sft.data.processor import load_processor  # noqa: E402
from vlm_sft.data.vision import VisionSpec  # noqa: E402

LR, WEIGHT_DECAY, MAX_GRAD_NORM = 1e-5, 0.01, 1.0


def robo2vlm_batches(workdir: str, model_dir: str, *, steps: int, micro_batch: int, image_size: tuple[int, int],
                     buckets: tuple[int, ...]) -> list[list[dict]]:
    """`steps` single-micro-batch steps of generated Robo2VLM rows, encoded and collated as the trainer does."""
    data = os.path.join(workdir, f"data_{steps * micro_batch}_{image_size[0]}x{image_size[1]}")
    if not os.path.isdir(data):
        demo.make_robo2vlm_dir(data, n_train=steps * micro_batch, n_test=1, image_format="JPEG",
                                  image_size=image_size)
    processor = load_processor(model_dir)
    encoder = Encoder(processor, max_prompt_length=1024)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files([data], "train"))
    spec = VisionSpec.from_config(model_lib.load_model(model_dir)[0].config,
                                  pad_token_id=processor.tokenizer.pad_token_id)
    encoded = [encoder(source[i]) for i in range(steps * micro_batch)]
    return [[collate_encoded(encoded[i:i + micro_batch], spec, length_buckets=buckets, pad_labels=True)]
            for i in range(0, len(encoded), micro_batch)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="distinct batches, each one step, per round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per contestant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--image-size", default="320x240", help="WIDTHxHEIGHT of the generated JPEGs")
    parser.add_argument("--workdir", default="", help="model and data are built here (default: a temp dir)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_size.split("x"))
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_step_cpu_")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(workdir, ".inductor_cache"))
    torch.manual_seed(0)

    model_dir = os.path.join(workdir, "model")
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        demo.make_tiny_model_dir(model_dir)
    buckets = tuple(get_config().data.length_buckets)
    steps = robo2vlm_batches(workdir, model_dir, steps=args.steps, micro_batch=args.micro_batch,
                             image_size=(width, height), buckets=buckets)

    device, created = sharding_lib.init_process_group(sharding_lib.ProcessInfo())  # a mesh of one, as main.py
    sharding = sharding_lib.make_sharding(get_config("demo"), device, plain_single_rank=True)  # fp32, as main.py
    model, params = model_lib.load_model(model_dir)
    n_params = sum(p.numel() for p in params.values())
    flop_model = perf.FlopModel.from_model(model.config, {k: v.shape for k, v in params.items()},
                                           model.lm_head_name)
    settings = dict(lr=LR, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM)
    contestants = {  # each with its own copy of the same weights
        "HF eager": common.hf_step_fn(model_lib.load_model(model_dir)[0].module, **settings),
        "vlm-sft eager": common.trainer_step_fn(*model_lib.load_model(model_dir), sharding, compile=False,
                                                **settings),
        "vlm-sft compiled": common.trainer_step_fn(model, params, sharding, compile=True, **settings),
    }
    results = common.run_rounds(contestants, steps, warmup=args.warmup, rounds=args.rounds, device=device,
                                flops=flop_model.step_flops)

    print(f"# bench/step_cpu.py: {common.machine()}")
    print(f"tiny Qwen2.5-VL ({n_params / 1e6:.1f}M params, 152k vocabulary), fp32; "
          f"micro-batch {args.micro_batch}, {args.steps} batches x {args.rounds} rounds; images {args.image_size}; "
          f"padding {perf.padding_fraction([b for s in steps for b in s]):.0%} of the trainer's positions "
          f"(buckets {buckets}); compiled by region (vlm_sft/compile.py)")
    print(f"TFLOP/s counts required FLOPs only: {perf.FORMULA}\n")
    ratio = common.print_table(results, "HF eager", "vlm-sft compiled", peak_flops=None)
    print(f"targets: >= 1.8x {'met' if ratio >= 1.8 else 'NOT met'}; >= 8x {'met' if ratio >= 8 else 'NOT met'}")
    if created:
        sharding_lib.destroy_process_group()


if __name__ == "__main__":
    main()
    sharding_lib.exit_process(0)  # not interpreter finalization: gloo's threads can abort it
