"""Data pipeline benchmark: samples/s of decode + image processor + encode + collate vs what the step consumes.

  python bench/data.py                            # 256 rows of 640x480 JPEGs, the config's default worker count
  python bench/data.py --workers 8 --rows 512

Rows are Robo2VLM-format parquet (vlm_sft.demo, JPEG images); the pipeline is the trainer's own TrainLoader
(parquet row -> PIL decode -> Qwen2.5-VL image processor and tokenizer -> answer-only labels -> collate with
length buckets and the host-side vision precompute), micro-batch 4. Measured twice in the same process: in the
main process (one core's rate) and with DataLoader workers. The step's consumption rate is the 3B model's
required FLOPs per sample (vlm_sft/perf.py, on these very rows) at the target MFU on the target card (default 45%
of an H100's 989 TFLOP/s), or 1 / --step-seconds per micro-batch when given. Target (issue 5): >= 5x.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import torch
import transformers

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [BENCH, os.path.dirname(BENCH)]
import common  # noqa: E402

from configs.robo2vlm import get_config  # noqa: E402
from step_gpu import QWEN2_5_VL_3B  # noqa: E402
from vlm_sft import demo, perf  # noqa: E402
from vlm_sft.data import loader as loader_lib  # noqa: E402
from vlm_sft.data import robo2vlm  # noqa: E402
from vlm_sft.data.collate import collate_encoded  # noqa: E402
from vlm_sft.data.encode import Encoder  # noqa: E402
from vlm_sft.data.processor import load_processor  # noqa: E402
from vlm_sft.data.vision import VisionSpec  # noqa: E402


def pipeline_rate(source, encoder, collate_fn, *, rows: int, micro_batch: int, workers: int) -> tuple[float, list]:
    """Samples/s of the TrainLoader over `rows` rows (after its first batch: worker start-up excluded)."""
    loader = loader_lib.TrainLoader(source, encoder, collate_fn, global_batch_size=micro_batch,
                                    micro_batch_size=micro_batch, shuffle=False, num_workers=workers)
    batches = iter(loader)
    first = next(batches).micro_batches
    t0 = time.perf_counter()
    n = 0
    for _ in range(rows // micro_batch - 1):
        next(batches)
        n += micro_batch
    elapsed = time.perf_counter() - t0
    del batches
    return n / elapsed, first


def main() -> None:
    config = get_config()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--workers", type=int, default=config.data.num_workers)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--image-size", default="640x480", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--mfu", type=float, default=0.45, help="the step's MFU for its consumption rate")
    parser.add_argument("--peak", type=float, default=989e12, help="the card's peak FLOP/s (H100 bf16)")
    parser.add_argument("--step-seconds", type=float, default=0.0,
                        help="measured seconds per micro-batch step (overrides the FLOP-based rate)")
    parser.add_argument("--workdir", default="", help="model and data are built here (default: a temp dir)")
    args = parser.parse_args()
    width, height = (int(v) for v in args.image_size.split("x"))
    workdir = args.workdir or tempfile.mkdtemp(prefix="bench_data_")

    model_dir = os.path.join(workdir, "model")  # only its processor files are used: Qwen's tokenizer, processor
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        demo.make_tiny_model_dir(model_dir)
    data = os.path.join(workdir, f"data_{args.rows}_{width}x{height}")
    if not os.path.isdir(data):
        demo.make_robo2vlm_dir(data, n_train=args.rows, n_test=1, image_format="JPEG", image_size=(width, height),
                                  rows_per_group=64)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files([data], "train"))
    processor = load_processor(model_dir, min_pixels=config.data.min_pixels, max_pixels=config.data.max_pixels)
    encoder = Encoder(processor, max_prompt_length=config.data.max_prompt_length)
    hf_config = transformers.Qwen2_5_VLConfig.from_dict(demo.tiny_hub_config(**QWEN2_5_VL_3B))
    spec = VisionSpec.from_config(hf_config, pad_token_id=processor.tokenizer.pad_token_id)
    collate_fn = functools.partial(collate_encoded, spec=spec, length_buckets=tuple(config.data.length_buckets),
                                   pad_labels=True)

    rates = {}
    for workers in sorted({0, args.workers}):
        rates[workers], first = pipeline_rate(source, encoder, collate_fn, rows=args.rows,
                                              micro_batch=args.micro_batch, workers=workers)

    if args.step_seconds > 0:
        consume = args.micro_batch / args.step_seconds
        how = f"measured step: {args.step_seconds} s per micro-batch of {args.micro_batch}"
    else:
        with torch.device("meta"):
            shapes = {n: p.shape for n, p in transformers.Qwen2_5_VLForConditionalGeneration(hf_config)
                      .named_parameters()}
        flop_model = perf.FlopModel.from_model(hf_config, shapes, "model.language_model.embed_tokens.weight")
        per_sample = flop_model.step_flops(first) / args.micro_batch
        consume = args.mfu * args.peak / per_sample
        how = (f"Qwen2.5-VL-3B at {args.mfu:.0%} MFU of {args.peak:.3g} FLOP/s: {per_sample:.3g} FLOPs per sample "
               f"({int(first[0]['attention_mask'].sum()) // args.micro_batch} tokens/row)")

    print(f"# bench/data.py: {common.machine()}")
    print(f"{args.rows} Robo2VLM-format rows, {width}x{height} JPEG, micro-batch {args.micro_batch}; "
          f"grid {tuple(first[0]['image_grid_thw'][0].tolist())} per image\n")
    print("| pipeline | workers | samples/s | ms/sample |")
    print("|---|---|---|---|")
    for workers, rate in rates.items():
        where = "main process" if workers == 0 else "DataLoader workers"
        print(f"| TrainLoader ({where}) | {workers} | {rate:.1f} | {1000 / rate:.1f} |")
    print(f"| step consumption ({how}) | - | {consume:.1f} | {1000 / consume:.1f} |")
    ratio = rates[args.workers] / consume
    print(f"\nratio: pipeline with {args.workers} workers / step consumption = {ratio:.2f}x "
          f"(target >= 5x: {'met' if ratio >= 5 else 'NOT met'}; {os.cpu_count()} CPU cores here)")


if __name__ == "__main__":
    main()
