"""One rank of tests/test_expert_parallel.py's 2-rank runs, under torchrun, all in ONE process group (one launch
and one import of torch and transformers instead of four):

    torchrun --nproc_per_node=2 tests/ep_worker.py ROOT [--config.field=value ...]

Trains with vlm_sft.main.run, in this order, each into ROOT/<name>/run: "no_ep" (full_shard, STEPS steps), "ep"
(expert_parallel_size=2, same steps), "no_ep_from_ep" (resumed without EP from ep's step_1 checkpoint) and
"lora_no_ep" and "lora_ep" (LoRA on attention and the stacked experts, without and with EP: the experts' per-expert
adapters are kept per rank like the experts), then "ep_compiled_from_no_ep" (EP with actor.compile=True, resumed
from no_ep's step_1 checkpoint). The compiled run goes last, so the eager runs never see a compiled region. The overrides (model, data, steps: the test's) apply to
every run.
"""
import ast
import os
import sys

# torchrun runs this file as a script: the repository root (where configs/ lives) is not on sys.path by itself.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import logging  # noqa: E402

from configs.robo2vlm import get_config  # noqa: E402
from vlm_sft import main, sharding  # noqa: E402

EP = "--config.actor.fsdp_config.expert_parallel_size=2"
EXPERT_LORA = ("--config.actor.model.is_lora=True", "--config.actor.model.lora_target_modules="
               r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.experts\.(gate_up|down)_proj)$")


def configured(overrides: list[str]):
    """The demo Qwen3-VL-MoE config with `--config.a.b=value` overrides (values as Python literals, else str)."""
    config = get_config("demo,qwen3_moe")
    for item in overrides:
        path, raw = item.removeprefix("--config.").split("=", 1)
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = raw
        *parents, leaf = path.split(".")
        node = config
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def train(root: str, name: str, common: list[str], *extra: str) -> str:
    log_path = os.path.join(root, name)
    main.run(configured([*common, f"--config.runner.logger.log_path={log_path}", *extra]), "train")
    return os.path.join(log_path, "run")


def worker(root: str, common: list[str]) -> None:
    no_ep = train(root, "no_ep", common)
    ep = train(root, "ep", common, EP)
    train(root, "no_ep_from_ep", common, f"--config.runner.resume={ep}/checkpoints/step_1")
    train(root, "lora_no_ep", common, *EXPERT_LORA)
    train(root, "lora_ep", common, *EXPERT_LORA, EP)
    train(root, "ep_compiled_from_no_ep", common, EP, "--config.actor.compile=True",
          f"--config.runner.resume={no_ep}/checkpoints/step_1")


if __name__ == "__main__":
    # As main.main: INFO on rank 0 (the test reads its lines), warnings only elsewhere.
    logging.set_verbosity(logging.INFO if sharding.ProcessInfo.from_env().rank == 0 else logging.WARNING)
    timeout_s = get_config("demo,qwen3_moe").runner.collective_timeout_s
    sharding.init_process_group(sharding.ProcessInfo.from_env(), timeout_s)  # here: main.run joins it, 4 times
    worker(sys.argv[1], sys.argv[2:])
    sharding.destroy_process_group()
