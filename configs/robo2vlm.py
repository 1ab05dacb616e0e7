"""Full-parameter SFT of Qwen2.5-VL or Qwen3-VL on Robo2VLM multiple-choice VQA.

The seed's YAML (RLinf examples/sft/config/custom_sft_vlm.yaml) as an ml_collections ConfigDict: same field
names and nesting, so an RLinf config ports by reading it. Fields RLinf lacks are marked "new".

Variants after the colon (comma separated):
  demo   tiny random Qwen2.5-VL + generated Robo2VLM-format parquet, built once under the run dir; ~2 min on a
         laptop CPU, loss falls and accuracy rises.
  eval   eval-only: no training data (set data.eval_data_paths and actor.model.model_path).
  qwen3  Qwen3-VL (actor.model.model_type=qwen3_vl); with demo, the tiny random model is a Qwen3-VL shaped as the
         Hub ships Qwen3-VL-2B-Instruct.
  qwen3_moe  Qwen3-VL-MoE (actor.model.model_type=qwen3_vl_moe, e.g. Qwen3-VL-30B-A3B-Instruct); with demo, a tiny
         random MoE shaped as the Hub ships the 30B-A3B.
  lora   LoRA adapters (actor.model.is_lora) instead of full-parameter training; `:demo,lora` on the demo.
  video  video rows (data.video_keys=("video",), no images); with demo, generated MP4 clips of a light that
         changes colour once (the answer, its last colour, needs the frames in order); needs PyAV (the video extra).
  qwen3_5  Qwen3.5 dense (actor.model.model_type=qwen3_5: hybrid linear-attention decoder); with demo, a tiny
         random Qwen3.5 shaped as the Hub ships Qwen3.5-9B.
  qwen3_5_moe  Qwen3.5-MoE (actor.model.model_type=qwen3_5_moe, e.g. Qwen3.5-35B-A3B: the hybrid decoder with
         routed experts and a gated shared expert); with demo, a tiny random one shaped as the 35B-A3B.

  python -m vlm_sft.main --config configs/robo2vlm.py:demo
  python -m vlm_sft.main --config configs/robo2vlm.py:demo,qwen3
  python -m vlm_sft.main --config configs/robo2vlm.py:demo,qwen3_5
  python -m vlm_sft.main --config configs/robo2vlm.py:demo,qwen3_moe
  python -m vlm_sft.main --config configs/robo2vlm.py:demo,qwen3_5_moe
  python -m vlm_sft.main --config configs/robo2vlm.py \
      --config.actor.model.model_path=/models/Qwen2.5-VL-3B-Instruct \
      --config.data.train_data_paths=/data/Robo2VLM-1/data --config.data.eval_data_paths=/data/Robo2VLM-1/data
  python -m vlm_sft.main --config configs/robo2vlm.py:qwen3 \
      --config.actor.model.model_path=/models/Qwen3-VL-4B-Instruct \
      --config.data.train_data_paths=/data/Robo2VLM-1/data --config.data.eval_data_paths=/data/Robo2VLM-1/data
"""
import ml_collections

FAMILY_VARIANTS = {"qwen3", "qwen3_moe", "qwen3_5", "qwen3_5_moe"}  # one model family each: at most one of them


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    variants = {v.strip() for v in (arg or "").split(",") if v.strip()}
    unknown = variants - {"demo", "eval", "qwen3", "qwen3_moe", "lora", "video", "qwen3_5", "qwen3_5_moe"}
    if unknown:
        raise ValueError(f"configs/robo2vlm.py: unknown variant(s) {sorted(unknown)}; known: demo, eval, qwen3, "
                         "qwen3_moe, lora, video, qwen3_5, qwen3_5_moe")
    if len(variants & FAMILY_VARIANTS) > 1:
        raise ValueError("configs/robo2vlm.py: variants qwen3, qwen3_moe, qwen3_5 and qwen3_5_moe name different "
                         "model families; pick one")

    c = ml_collections.ConfigDict()

    c.cluster = ml_collections.ConfigDict()
    c.cluster.num_nodes = 1

    c.runner = ml_collections.ConfigDict()
    c.runner.task_type = "sft"
    c.runner.logger = ml_collections.ConfigDict()
    c.runner.logger.log_path = "../results"
    c.runner.logger.project_name = "vlm_sft"
    c.runner.logger.experiment_name = "qwen2_5_vl_sft_robo2vlm"
    c.runner.logger.logger_backends = ("tensorboard",)  # any of tensorboard, wandb, swanlab (vlm_sft/loggers.py)
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
    # new: seconds any collective may wait for the other ranks before the job fails (a dead or stalled rank);
    # covers the slowest rank's checkpoint write, eval share and rank 0's export, so generous on GPUs.
    c.runner.collective_timeout_s = 1800.0
    # new: stop (exit 3) after this many updates in a row were skipped for a non-finite loss/gradient; 0 = never
    c.runner.max_consecutive_skipped_steps = 20
    # new: --mode=plan (vlm_sft/planner.py): the world size to plan for (0: the launch's, 1 without torchrun) and
    # the memory of one device in GiB (unset: the visible GPU's, else 80)
    c.runner.plan_world_size = 0
    c.runner.device_memory_gib = ml_collections.config_dict.placeholder(float)

    c.data = ml_collections.ConfigDict()
    c.data.type = "vlm"
    c.data.dataset_name = "robo2vlmsft"
    # A file, a folder, or a comma-separated list of .parquet, or of .jsonl / .json files (not both kinds). One
    # folder holding both train-* and test-* files (the Robo2VLM download as is) works for both: train reads
    # train-*, eval reads test-*. JSON rows name images by path (relative to the file) or {"bytes": base64}.
    c.data.train_data_paths = ""     # empty -> eval-only
    c.data.eval_data_paths = ""      # empty -> no evaluation
    c.data.prompt_key = "question"
    c.data.choice_key = "choices"
    c.data.answer_key = "correct_answer"
    c.data.image_keys = ("image",)   # several keys, or a list in one key: several images per row, in this order
    # new: video columns (like image_keys; a row may hold images, videos or both; images come first in the prompt).
    # A value is a video file (path relative to the data file, or absolute; or bytes / {"bytes": ...}), a list of
    # frame image paths (one video), or a list of videos. Decoded with PyAV (pip install 'vlm-sft[video]'), frames
    # sampled and sized as the model directory's stock video processor does (Qwen2.5-VL / Qwen3-VL rules).
    c.data.video_keys = ()
    c.data.video_fps_key = ""        # new: column with the frame rate of frame-list videos ("" = data.video_fps)
    c.data.video_fps = 2.0           # new: frames sampled per second of video
    c.data.video_min_frames = 4      # new: a video with fewer frames is a bad row; fewer sampled are padded up
    c.data.video_max_frames = 768    # new
    # new: per-frame and whole-video pixel caps (unset: the directory's video processor budget, as its stock
    # processor uses it: Qwen2.5-VL per frame, Qwen3-VL per video)
    c.data.video_max_pixels = ml_collections.config_dict.placeholder(int)
    c.data.video_total_pixels = ml_collections.config_dict.placeholder(int)
    c.data.apply_chat_template = True
    c.data.use_chat_template = True
    c.data.max_prompt_length = 1024  # prompt tokens, image tokens included
    c.data.truncation = "text"       # new: over-long prompt -> "text" (cut the question text) or "error" (reject)
    c.data.bad_rows = "error"        # new: undecodable row -> "error" (stop, naming file and row) or "skip" (count)
    c.data.lazy_loading = False      # True: stream parquet row groups / JSONL lines instead of reading all rows
    #                                  up front (a .json file is always read whole)
    c.data.num_workers = 4           # data worker processes (also the parallelism of --mode=check)
    # new: image processor pixel budget per image; unset (None) takes the model directory's own
    # (preprocessor_config.json: Qwen2.5-VL 3136..12845056, Qwen3-VL 65536..16777216); set, it overrides.
    c.data.min_pixels = ml_collections.config_dict.placeholder(int)
    c.data.max_pixels = ml_collections.config_dict.placeholder(int)
    # new: padded sequence lengths for a compiled step (each bucket in use is one compilation; longer sequences
    # pad to a multiple of the last). A 640x480 image is 391 tokens for Qwen2.5-VL (rows of ~503 land in 512) and
    # 300 for Qwen3-VL (rows of ~412: 448, where steps of 128 padded them to 512, 19% of the positions); steps of
    # 64 up to 1024 keep a row's padding under ~13% there.
    c.data.packing = True            # new: training rows packed into micro-batches of <= max_tokens_per_micro_batch
    c.data.length_buckets = (128, 192, 256, 320, 384, 448, 512, 576, 640, 704, 768, 896, 1024, 1280, 1536, 2048)
    c.data.shuffle = True
    c.data.demo_rows = 512          # new: rows of the generated demo set (train; test gets 1/8 of it)
    c.data.eval_max_rows = 0         # new: evaluate only the first N rows (0 = every row)

    c.actor = ml_collections.ConfigDict()
    c.actor.training_backend = "fsdp"
    c.actor.micro_batch_size = 4     # rows per micro-batch with data.packing=False (RLinf's padded batches)
    c.actor.max_tokens_per_micro_batch = 16384  # new: token budget of a packed micro-batch (image tokens included)
    c.actor.loss_normalization = "tokens"  # new: "tokens" (mean over the global batch's answer tokens) or
    # "micro_batch" (RLinf's: each micro-batch's token mean, averaged)
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
    c.actor.model.model_type = "qwen2.5_vl"  # qwen2.5_vl | qwen3_vl | qwen3_vl_moe | qwen3_5 | qwen3_5_moe; as config.json
    c.actor.model.precision = "fp32"   # master weights and optimizer state
    c.actor.model.model_path = ""
    c.actor.model.is_lora = False    # train LoRA adapters on a frozen base (vlm_sft/lora.py); RLinf's flag
    c.actor.model.lora_rank = 8      # RLinf's name: r of each adapter (A [r, in], B [out, r])
    c.actor.model.lora_alpha = 16    # new: adapters scaled by lora_alpha / lora_rank (PEFT's convention)
    c.actor.model.lora_dropout = 0.0  # new: only 0.0 (adapters are merged into the weight inside each block)
    # new: regex searched in linear module names, or "all-linear" (every linear but lm_head, vision tower included);
    # a regex matching a MoE's stacked expert tensor or its module (e.g. r"...|mlp\.experts") adapts it per expert.
    # Default: the language model's q/k/v/o and MLP projections (Qwen2.5-VL and Qwen3-VL name them alike) and
    # Qwen3.5's linear-attention q/k/v, gate and output projections (vlm_sft/lora.py DEFAULT_TARGETS).
    c.actor.model.lora_target_modules = (
        r"^model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj"
        r"|linear_attn\.(in_proj_qkv|in_proj_z|out_proj))$")
    # new: frozen parts (no gradient computed, no optimizer state; LLaMA-Factory / ms-swift names). vision tower =
    # model.visual.* but the merger(s); merger = model.visual.merger.* (+ Qwen3-VL's deepstack mergers); llm =
    # model.language_model.* and lm_head.
    c.actor.model.freeze_vision_tower = False
    c.actor.model.freeze_merger = False
    c.actor.model.freeze_llm = False
    # new: more frozen params: regexes searched in param names, e.g. "('^model\.visual\.blocks\.[0-3]\.',)"
    c.actor.model.freeze = ()
    c.actor.model.attn_implementation = "sdpa"  # new
    # new (MoE families): weight of the router's load-balancing loss in the objective (logged as train/aux_loss;
    # train/loss stays the answer cross-entropy). None: the directory's router_aux_loss_coef when its config sets
    # output_router_logits (as transformers adds it), else 0.
    c.actor.model.router_aux_loss_coef = ml_collections.config_dict.placeholder(float)

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
    # new: per-module learning rates, (regex, factor) pairs searched in param names; the first match wins, e.g.
    # "(('^model\.visual\.merger\.', 0.5), ('^model\.visual\.', 0.1))". Unmatched trained params: factor 1.
    c.actor.optim.lr_multipliers = ()
    c.actor.optim.no_decay = False           # new: True exempts 1-D params (biases, norm scales) from weight decay

    c.actor.fsdp_config = ml_collections.ConfigDict()
    c.actor.fsdp_config.strategy = "fsdp"
    c.actor.fsdp_config.sharding_strategy = "no_shard"  # no_shard | full_shard | hybrid_shard
    # new: hybrid_shard's shard group size (ranks sharing one copy of the model); 0 = ranks per node
    # (world size / cluster.num_nodes). The mesh is (world / size) replicas x size shards.
    c.actor.fsdp_config.hybrid_shard_size = 0
    # new: expert parallelism for MoE models (qwen3_vl_moe, qwen3_5_moe): groups of this many data-parallel ranks
    # split the experts, each rank keeping num_experts / size of them whole, tokens moved to them by all-to-all;
    # 1 = off (experts sharded like every other param). Must divide the world size and num_experts.
    c.actor.fsdp_config.expert_parallel_size = 1
    c.actor.fsdp_config.use_orig_params = False
    c.actor.fsdp_config.gradient_checkpointing = False
    # RLinf's FSDP mixed precision: compute (gathered weights) in bf16, gradients reduced in fp32; master weights
    # and Adam state stay in actor.model.precision (fp32). buffer_dtype casts floating module buffers, except the
    # rotary frequency tables, which stay fp32 (bf16 angles misplace positions; vlm_sft/sharding.py FP32_BUFFERS).
    c.actor.fsdp_config.mixed_precision = ml_collections.ConfigDict()
    c.actor.fsdp_config.mixed_precision.param_dtype = "bf16"
    c.actor.fsdp_config.mixed_precision.reduce_dtype = "fp32"
    c.actor.fsdp_config.mixed_precision.buffer_dtype = "bf16"

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
        # The CPU demo computes in fp32 (bf16 matmuls on CPU are emulated and slow; accuracy is the same).
        c.actor.fsdp_config.mixed_precision.param_dtype = "fp32"
        c.actor.fsdp_config.mixed_precision.buffer_dtype = "fp32"

    if "qwen3" in variants:
        c.actor.model.model_type = "qwen3_vl"
        c.runner.logger.experiment_name = "qwen3_vl_sft_robo2vlm"
        if "demo" in variants:
            c.runner.logger.experiment_name = "demo_qwen3"  # its own run dir: own demo assets and checkpoints
            c.data.min_pixels = 64 * 64  # patch 16, merge 2: a 64x48 demo image -> 4x4 patches -> 4 image tokens
            c.data.max_pixels = 64 * 64

    if "qwen3_moe" in variants:
        c.actor.model.model_type = "qwen3_vl_moe"
        c.runner.logger.experiment_name = "qwen3_vl_moe_sft_robo2vlm"
        if "demo" in variants:
            c.runner.logger.experiment_name = "demo_qwen3_moe"
            c.data.min_pixels = 64 * 64  # as the Qwen3-VL demo: patch 16, merge 2 -> 4 image tokens
            c.data.max_pixels = 64 * 64

    if "qwen3_5" in variants:
        c.actor.model.model_type = "qwen3_5"
        c.runner.logger.experiment_name = "qwen3_5_sft_robo2vlm"
        if "demo" in variants:
            c.runner.logger.experiment_name = "demo_qwen3_5"  # its own run dir: own demo assets and checkpoints
            c.data.min_pixels = 64 * 64  # patch 16, merge 2, as Qwen3-VL's
            c.data.max_pixels = 64 * 64

    if "qwen3_5_moe" in variants:
        c.actor.model.model_type = "qwen3_5_moe"
        c.runner.logger.experiment_name = "qwen3_5_moe_sft_robo2vlm"
        if "demo" in variants:
            c.runner.logger.experiment_name = "demo_qwen3_5_moe"  # its own run dir: own demo assets and checkpoints
            c.data.min_pixels = 64 * 64  # patch 16, merge 2, as Qwen3.5's
            c.data.max_pixels = 64 * 64

    if "video" in variants:
        c.data.video_keys = ("video",)
        c.data.image_keys = ()
        if "demo" in variants:
            c.runner.logger.experiment_name += "_video"  # its own run dir: own demo clips and checkpoints
            c.data.demo_blank_video = False  # new: the control: the same rows with grey clips (near chance)
            # 64x64 frames at 4 fps, 8 frames -> 4 sampled at 2 fps -> 2 frame groups of 2x2 merged tokens
            c.data.video_max_pixels = 64 * 64 if variants & FAMILY_VARIANTS else 56 * 56
            c.runner.max_steps = 120
            c.runner.val_check_interval = 40
            c.runner.save_interval = 40

    if "eval" in variants:
        c.data.train_data_paths = ""

    if "lora" in variants:  # LoRA adapters on the language model; with :demo at a LoRA-sized lr
        c.actor.model.is_lora = True
        if "demo" in variants:
            c.actor.optim.lr = 1e-2

    return c
