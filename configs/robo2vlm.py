"""Full-parameter SFT of Qwen2.5-VL on Robo2VLM multiple-choice VQA.

The seed's YAML (RLinf examples/sft/config/custom_sft_vlm.yaml) as an ml_collections ConfigDict: same field
names and nesting, so an RLinf config ports by reading it. Fields RLinf lacks are marked "new".

Variants after the colon (comma separated):
  demo   tiny random Qwen2.5-VL + generated Robo2VLM-format parquet, built once under the run dir; ~2 min on a
         laptop CPU, loss falls and accuracy rises.
  eval   eval-only: no training data (set data.eval_data_paths and actor.model.model_path).

  python -m vlm_sft.main --config configs/robo2vlm.py:demo
  python -m vlm_sft.main --config configs/robo2vlm.py \
      --config.actor.model.model_path=/models/Qwen2.5-VL-3B-Instruct \
      --config.data.train_data_paths=/data/Robo2VLM-1/data --config.data.eval_data_paths=/data/Robo2VLM-1/data
"""
import ml_collections


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
    unknown = variants - {"demo", "eval"}
    if unknown:
        raise ValueError(f"configs/robo2vlm.py: unknown variant(s) {sorted(unknown)}; known: demo, eval")

    c = ml_collections.ConfigDict()

    c.cluster = ml_collections.ConfigDict()
    c.cluster.num_nodes = 1

    c.runner = ml_collections.ConfigDict()
    c.runner.task_type = "sft"
    c.runner.logger = ml_collections.ConfigDict()
    c.runner.logger.log_path = "../results"
    c.runner.logger.project_name = "vlm_sft"
    c.runner.logger.experiment_name = "qwen2_5_vl_sft_robo2vlm"
    c.runner.logger.logger_backends = ["tensorboard"]
    c.runner.max_epochs = 1          # full passes over the training data; used when max_steps <= 0
    c.runner.max_steps = 6000        # optimizer steps; wins when > 0 (RLinf's "max_epochs: 6000" meant steps)
    c.runner.val_check_interval = 1000
    c.runner.save_interval = 1000    # steps between checkpoints (<run dir>/checkpoints/step_N); also saved at the end
    c.runner.log_interval = 1        # new: steps between metric lines
    c.runner.val_before_train = False  # new: evaluate the starting model before the first step (as verl)
    # new: "auto" continues from the newest complete checkpoint in the run dir (fresh start if none), "" always
    # starts fresh, a path resumes from that checkpoint (with --mode=eval: evaluates its params).
    c.runner.resume = "auto"
    c.runner.keep_last_n = 3         # new: checkpoints kept (older ones removed after each good save); 0 keeps all
    c.runner.export_hf = False       # new: at the end, write a Hugging Face directory to <run dir>/hf_export
    c.runner.async_save = False      # new: write checkpoints in a background thread while training goes on

    c.data = ml_collections.ConfigDict()
    c.data.type = "vlm"
    c.data.dataset_name = "robo2vlmsft"
    # A file, a folder, or a comma-separated list. One folder holding both train-*.parquet and test-*.parquet
    # (the Robo2VLM download as is) works for both: train reads train-*, eval reads test-*.
    c.data.train_data_paths = ""     # empty -> eval-only
    c.data.eval_data_paths = ""      # empty -> no evaluation
    c.data.prompt_key = "question"
    c.data.choice_key = "choices"
    c.data.answer_key = "correct_answer"
    c.data.image_keys = ["image"]
    c.data.apply_chat_template = True
    c.data.use_chat_template = True
    c.data.max_prompt_length = 1024  # prompt tokens, image tokens included
    c.data.truncation = "text"       # new: over-long prompt -> "text" (cut the question text) or "error" (reject)
    c.data.bad_rows = "error"        # new: undecodable row -> "error" (stop, naming file and row) or "skip" (count)
    c.data.lazy_loading = False      # True: stream parquet row groups instead of reading all rows up front
    c.data.num_workers = 4
    c.data.min_pixels = 3136         # new: image processor pixel budget (Qwen2.5-VL defaults)
    c.data.max_pixels = 12845056
    # new: padded sequence lengths for a compiled step (each bucket in use is one compilation; longer sequences
    # pad to a multiple of the last). A 640x480 image is 391 tokens, so Robo2VLM rows land in 512 or 640.
    c.data.length_buckets = [128, 256, 384, 512, 640, 768, 1024, 1280, 1536, 2048]
    c.data.shuffle = True
    c.data.demo_rows = 512          # new: rows of the generated demo set (train; test gets 1/8 of it)
    c.data.eval_max_rows = 0         # new: evaluate only the first N rows (0 = every row)

    c.actor = ml_collections.ConfigDict()
    c.actor.training_backend = "fsdp"
    c.actor.micro_batch_size = 4
    c.actor.eval_batch_size = 4
    c.actor.global_batch_size = 256
    c.actor.seed = 42
    # new: torch.compile the train step by region (each kind of block once; vlm_sft/compile.py),
    # also with gradient_checkpointing. None (default): on when training on CUDA, off on CPU.
    # --config.actor.compile=True/False forces it.
    c.actor.compile = ml_collections.config_dict.placeholder(bool)
    # new: inductor's on-disk cache, so a restart generates no code (first step in seconds);
    # "" = <runner.logger.log_path>/.inductor_cache
    c.actor.compile_cache_dir = ""

    c.actor.model = ml_collections.ConfigDict()
    c.actor.model.model_type = "qwen2.5_vl"
    c.actor.model.precision = "fp32"   # master weights and optimizer state
    c.actor.model.model_path = ""
    c.actor.model.is_lora = False
    c.actor.model.attn_implementation = "sdpa"  # new

    c.actor.optim = ml_collections.ConfigDict()
    c.actor.optim.lr = 1e-5
    c.actor.optim.adam_beta1 = 0.9
    c.actor.optim.adam_beta2 = 0.999
    c.actor.optim.adam_eps = 1e-8
    c.actor.optim.weight_decay = 0.01
    c.actor.optim.clip_grad = 1.0
    c.actor.optim.lr_scheduler = "cosine"   # cosine | constant | linear
    c.actor.optim.total_training_steps = -1  # -1: the run's number of steps
    c.actor.optim.lr_warmup_steps = 200
    c.actor.optim.min_lr = 0.0               # new

    c.actor.fsdp_config = ml_collections.ConfigDict()
    c.actor.fsdp_config.strategy = "fsdp"
    c.actor.fsdp_config.sharding_strategy = "no_shard"  # no_shard | full_shard | hybrid_shard
    # new: hybrid_shard's shard group size (ranks sharing one copy of the model); 0 = ranks per node
    # (world size / cluster.num_nodes). The mesh is (world / size) replicas x size shards.
    c.actor.fsdp_config.hybrid_shard_size = 0
    c.actor.fsdp_config.use_orig_params = False
    c.actor.fsdp_config.gradient_checkpointing = False
    c.actor.fsdp_config.mixed_precision = ml_collections.ConfigDict()
    c.actor.fsdp_config.mixed_precision.param_dtype = "fp32"
    c.actor.fsdp_config.mixed_precision.reduce_dtype = "fp32"
    c.actor.fsdp_config.mixed_precision.buffer_dtype = "fp32"

    c.eval = ml_collections.ConfigDict()         # new
    c.eval.generate = True          # RLinf-compatible greedy generation + string match -> eval/eval_accuracy
    c.eval.max_new_tokens = 128
    c.eval.choice_scoring = True    # likelihood of each choice's target -> eval/choice_accuracy

    if "demo" in variants:
        c.runner.logger.log_path = "runs"
        c.runner.logger.experiment_name = "demo"
        c.runner.max_steps = 150
        c.runner.val_check_interval = 50
        c.runner.save_interval = 50
        c.runner.log_interval = 10
        c.runner.val_before_train = True
        c.data.train_data_paths = "demo"  # "demo": the generated parquet folder under the run dir
        c.data.eval_data_paths = "demo"
        c.data.num_workers = 0
        c.data.min_pixels = 56 * 56
        c.data.max_pixels = 56 * 56
        c.data.max_prompt_length = 256
        c.actor.model.model_path = "demo"  # "demo": the tiny random model directory under the run dir
        c.actor.micro_batch_size = 8
        c.actor.eval_batch_size = 16
        c.actor.global_batch_size = 16
        c.actor.optim.lr = 3e-3
        c.actor.optim.lr_warmup_steps = 10
        c.actor.optim.weight_decay = 0.0
        c.eval.max_new_tokens = 16

    if "eval" in variants:
        c.data.train_data_paths = ""

    return c
