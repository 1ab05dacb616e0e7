"""LoRA through the real entry point: the merged export loads with transformers and the PEFT adapter with peft,
both giving the trainer's logits; LoRA checkpoints hold only adapters and their optimizer state, are tied to their
base model, and resume exactly; :demo,lora learns; 2 gloo ranks with full_shard equal one process."""
import json
import os
import subprocess
import sys

import pytest
import safetensors.torch
import torch
import transformers

from vlm_sft import checkpoint, export, lora, trainable
from vlm_sft import main as main_lib
from vlm_sft import models as model_lib
from vlm_sft.data import robo2vlm
from vlm_sft.data.collate import collate_encoded
from vlm_sft.data.encode import Encoder
from vlm_sft.data.processor import load_processor
from vlm_sft.data.vision import VisionSpec
from configs_loader import CONFIG, override, run_config
from test_resume import losses, read_checkpoint, read_metrics

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def lora_config(tmp_path, model_dir, data_dir, name, **overrides):
    return run_config("demo,lora", tmp_path, name, model_dir, data_dir, **{
        "runner.val_before_train": False, "actor.optim.lr_warmup_steps": 0, **overrides})


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_model_dir, robo2vlm_dir):
    """3 LoRA steps (all-linear: vision blocks adapted too) ending in a checkpoint and a merged export."""
    root = tmp_path_factory.mktemp("lora_run")
    c = lora_config(root, tiny_model_dir, robo2vlm_dir, "run", **{
        "runner.max_steps": 3, "runner.export_hf": True, "actor.model.lora_target_modules": "all-linear"})
    main_lib.run(c, "train")
    return root / "run", c


def trainer_logits(ckpt, base, config, batch):
    """The trainer's own forward: base params + the checkpoint's adapters through the block call."""
    model, params = model_lib.load_model(str(base))
    plan = trainable.make_plan(config, model.module)
    step_model, params = main_lib.apply_plan(model, params, plan, precision=torch.float32,
                                             compute_dtype=torch.float32, seed=0)
    params = checkpoint.restore_params(ckpt, params, names=plan.trainable)
    call = lora.plain_block_call(plan.lora_scale)
    with torch.no_grad():
        hidden = model_lib.forward_hidden(step_model, params, batch, call)
        return model_lib.label_logits(step_model, params, hidden, batch["label_index"], call)


def hf_logits(hf, batch, image_token_id):
    hf.eval()
    with torch.no_grad():
        logits = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                    pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                    mm_token_type_ids=(batch["input_ids"] == image_token_id).int()).logits
    return logits.reshape(-1, logits.shape[-1])[batch["label_index"]]


def test_lora_checkpoint_merged_export_and_peft_adapter(lora_run, tiny_model_dir, robo2vlm_dir, tmp_path):
    peft = pytest.importorskip("peft")
    run_dir, config = lora_run
    ckpt = str(run_dir / "checkpoints" / "step_3")
    saved = checkpoint.saved_params(ckpt)
    assert saved and all(lora.is_adapter(n) for n in saved)  # adapters only, no frozen base
    flat = read_checkpoint(ckpt)
    assert {k for k in flat if ".mu[" in k} == {k.replace("params[", "opt_state[0].inner_state[1].mu[")
                                                 for k in flat if k.startswith("params[")}
    b_leaves = [v for k, v in flat.items() if k.startswith("params[") and k.endswith(".lora_B']")]
    assert b_leaves and all(v.abs().max() > 0 for v in b_leaves)  # trained away from the zero init
    assert checkpoint.read_meta(ckpt)["extra"]["base_model"]["path"] == os.path.abspath(tiny_model_dir)

    processor = load_processor(str(tiny_model_dir))
    encoder = Encoder(processor, max_prompt_length=512)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files(str(robo2vlm_dir), "train"))
    model_config = transformers.AutoConfig.from_pretrained(str(tiny_model_dir))
    batch = collate_encoded([encoder(source[i]) for i in range(3)],
                            VisionSpec.from_config(model_config, processor.tokenizer.pad_token_id))
    ours = trainer_logits(ckpt, tiny_model_dir, config, batch)

    merged = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(run_dir / "hf_export"), dtype=torch.float32, local_files_only=True)
    torch.testing.assert_close(hf_logits(merged, batch, model_config.image_token_id), ours, rtol=1e-5, atol=1e-5)

    out = tmp_path / "adapter"
    assert export.cli(["--checkpoint", ckpt, "--output_dir", str(out), "--adapter_only"]) == 0
    adapter_config = json.load(open(out / "adapter_config.json"))
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16
    assert adapter_config["base_model_name_or_path"] == os.path.abspath(tiny_model_dir)
    assert any(m.startswith("model.visual.blocks.") for m in adapter_config["target_modules"])
    names = set(safetensors.torch.load_file(str(out / "adapter_model.safetensors")))
    assert "base_model.model.model.language_model.layers.0.self_attn.q_proj.lora_A.weight" in names
    base = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(tiny_model_dir), dtype=torch.float32, local_files_only=True)
    with_adapter = peft.PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(hf_logits(with_adapter, batch, model_config.image_token_id), ours,
                               rtol=1e-5, atol=1e-5)


def test_lora_checkpoint_refuses_another_base_and_adapter_only_needs_adapters(
        lora_run, tiny_model_dir_untied, tmp_path):
    run_dir, config = lora_run
    ckpt = str(run_dir / "checkpoints" / "step_3")
    with pytest.raises(checkpoint.CheckpointError, match=r"holds only the trained leaves of a run on base model "
                                                         r"'.*tiny_qwen2_5_vl.*'.*actor.model.model_path='.*untied"):
        checkpoint.check_base_model(ckpt, str(tiny_model_dir_untied))
    with pytest.raises(export.ExportError, match="--model_path: .*is a different model"):
        export.export_checkpoint(ckpt, str(tmp_path / "x"), model_path=str(tiny_model_dir_untied))
    c = override(config, {"runner.resume": ckpt, "actor.model.model_path": str(tiny_model_dir_untied),
                          "runner.logger.experiment_name": "other_base"})
    with pytest.raises(checkpoint.CheckpointError, match="is a different model"):
        main_lib.run(c, "train")


def test_adapter_only_on_a_full_parameter_checkpoint_is_refused(tiny_model_dir, tmp_path, capsys):
    from test_export import save_trained_checkpoint
    ckpt = save_trained_checkpoint(tiny_model_dir, tmp_path / "ckpt")
    assert export.cli(["--checkpoint", ckpt, "--output_dir", str(tmp_path / "out"), "--adapter_only"]) == 2
    assert "--adapter_only: checkpoint" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_resume_is_exact(tmp_path, tiny_model_dir, robo2vlm_dir):
    """4 steps straight == 2 steps, then a restart that resumes from step_2 ("auto"): losses and the final
    adapters and Adam moments bitwise equal."""
    common = {"runner.save_interval": 2, "actor.optim.total_training_steps": 4}  # one lr schedule for all runs
    main_lib.run(lora_config(tmp_path, tiny_model_dir, robo2vlm_dir, "straight", **common,
                             **{"runner.max_steps": 4}), "train")
    for max_steps in (2, 4):
        main_lib.run(lora_config(tmp_path, tiny_model_dir, robo2vlm_dir, "resumed", **common,
                                 **{"runner.max_steps": max_steps}), "train")
    assert losses(tmp_path / "resumed") == losses(tmp_path / "straight")
    straight = read_checkpoint(str(tmp_path / "straight" / "checkpoints" / "step_4"))
    resumed = read_checkpoint(str(tmp_path / "resumed" / "checkpoints" / "step_4"))
    assert list(straight) == list(resumed)
    for name, tensor in straight.items():
        assert torch.equal(tensor, resumed[name]), name


@pytest.mark.slow
def test_demo_lora_learns(tmp_path):
    """python -m vlm_sft.main --config configs/robo2vlm.py:demo,lora reaches the full demo's accuracy."""
    out = subprocess.run([sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:demo,lora",
                          f"--config.runner.logger.log_path={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "LoRA r=8" in out.stderr
    final = [l for l in read_metrics(tmp_path / "demo") if "eval/eval_accuracy" in l][-1]
    assert final["eval/eval_accuracy"] == 1.0


def _assert_same_training(one: str, two: str) -> dict:
    """Two 10-step runs (1 and 2 ranks): losses that fall and agree to 1e-5, the same final params to 1e-5; the
    1-rank run's final params."""
    from test_distributed import final_params, read_metrics

    l1 = [m["train/loss"] for m in read_metrics(one) if "train/loss" in m]
    l2 = [m["train/loss"] for m in read_metrics(two) if "train/loss" in m]
    assert len(l1) == len(l2) == 10 and l1[-1] < l1[0]
    for a, b in zip(l1, l2):
        assert abs(a - b) <= 1e-5, (l1, l2)
    p1, p2 = final_params(one), final_params(two)
    assert p1.keys() == p2.keys()
    worst = max((float((p1[k] - p2[k]).abs().max()), k) for k in p1)
    assert worst[0] <= 1e-5, worst
    return p1


@pytest.mark.slow
def test_lora_full_shard_on_two_ranks_equals_one_process(tmp_path, tiny_model_dir, robo2vlm_dir):
    """Adapters sharded like every other leaf (Shard(0)), merged after the gather inside the activation-
    checkpointed block (so again in backward); gradients reduce-scattered: the same losses and adapters."""
    from test_distributed import train
    lora_flags = ("--config.actor.model.is_lora=True", "--config.actor.optim.lr=1e-2")
    one = train(tmp_path, 1, *lora_flags, model_dir=tiny_model_dir, data_dir=robo2vlm_dir)
    two = train(tmp_path, 2, *lora_flags, "--config.actor.fsdp_config.sharding_strategy=full_shard",
                "--config.actor.fsdp_config.gradient_checkpointing=True", model_dir=tiny_model_dir,
                data_dir=robo2vlm_dir)
    p1 = _assert_same_training(one, two)
    assert all(lora.is_adapter(k) for k in p1)


@pytest.mark.slow
def test_lora_compiled_step_equals_eager(tmp_path, tiny_model_dir, robo2vlm_dir):
    """The compiled step (regional graphs; the merge runs in the eager gather before each region) gives eager's
    losses."""
    runs = {}
    for name, compiled in (("eager", False), ("compiled", True)):
        main_lib.run(lora_config(tmp_path, tiny_model_dir, robo2vlm_dir, name, **{
            "runner.max_steps": 3, "actor.compile": compiled,
            "actor.compile_cache_dir": str(tmp_path / "inductor")}), "train")
        runs[name] = losses(tmp_path / name)
    assert sorted(runs["compiled"]) == [1, 2, 3]
    for step, loss in runs["eager"].items():
        assert runs["compiled"][step] == pytest.approx(loss, abs=1e-5), (runs["eager"], runs["compiled"])


@pytest.mark.slow
@pytest.mark.parametrize("variant,model_fixture,hf_class", [
    ("qwen3", "tiny_qwen3_vl_dir", "Qwen3VLForConditionalGeneration"),
    ("qwen3_5", "tiny_qwen3_5_dir", "Qwen3_5ForConditionalGeneration")])
def test_qwen3_family_lora_adapter_loads_with_peft(tmp_path, request, robo2vlm_dir, variant, model_fixture,
                                                   hf_class):
    """Qwen3-VL and Qwen3.5: 3 LoRA steps through the entry point, `export --adapter_only`, and peft's PeftModel
    on transformers' own class gives the trainer's logits (Qwen3.5: adapters in its Gated DeltaNet layers too)."""
    peft = pytest.importorskip("peft")
    tiny_qwen3_vl_dir = request.getfixturevalue(model_fixture)
    config = run_config(f"demo,lora,{variant}", tmp_path, "run", tiny_qwen3_vl_dir, robo2vlm_dir, **{
        "runner.val_before_train": False, "actor.optim.lr_warmup_steps": 0, "runner.max_steps": 3,
        "actor.model.lora_target_modules": "all-linear"})
    main_lib.run(config, "train")
    ckpt = str(tmp_path / "run" / "checkpoints" / "step_3")
    assert all(lora.is_adapter(n) for n in checkpoint.saved_params(ckpt))

    processor = load_processor(str(tiny_qwen3_vl_dir))
    encoder = Encoder(processor, max_prompt_length=512)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files(str(robo2vlm_dir), "train"))
    model_config = transformers.AutoConfig.from_pretrained(str(tiny_qwen3_vl_dir))
    spec = model_lib.load_model(str(tiny_qwen3_vl_dir))[0].vision_spec(pad_token_id=processor.tokenizer.pad_token_id)
    batch = collate_encoded([encoder(source[i]) for i in range(3)], spec)
    ours = trainer_logits(ckpt, tiny_qwen3_vl_dir, config, batch)

    out = tmp_path / "adapter"
    assert export.cli(["--checkpoint", ckpt, "--output_dir", str(out), "--adapter_only"]) == 0
    adapter_config = json.load(open(out / "adapter_config.json"))
    assert any(m.startswith("model.visual.blocks.") for m in adapter_config["target_modules"])
    if variant == "qwen3_5":
        assert "model.language_model.layers.0.linear_attn.in_proj_qkv" in adapter_config["target_modules"]
    base = getattr(transformers, hf_class).from_pretrained(
        str(tiny_qwen3_vl_dir), dtype=torch.float32, local_files_only=True)
    with_adapter = peft.PeftModel.from_pretrained(base, str(out))
    image_token_id = model_config.image_token_id
    torch.testing.assert_close(hf_logits(with_adapter, batch, image_token_id), ours, rtol=1e-5, atol=1e-5)
    with with_adapter.disable_adapter():  # the adapter matters: the base alone is far from the trainer's logits
        assert (hf_logits(with_adapter, batch, image_token_id) - ours).abs().max() > 1e-4


EXPERT_TARGETS = r"self_attn\.q_proj$|mlp\.experts"  # a linear module and every stacked expert tensor


def moe_batch(model_dir, model, robo2vlm_dir):
    processor = load_processor(str(model_dir))
    encoder = Encoder(processor, max_prompt_length=512)
    source = robo2vlm.Robo2VLMSource(robo2vlm.find_parquet_files(str(robo2vlm_dir), "train"))
    return collate_encoded([encoder(source[i]) for i in range(3)],
                           model.vision_spec(pad_token_id=processor.tokenizer.pad_token_id))


@pytest.mark.parametrize("variant,model_fixture,hf_class", [
    ("qwen3_5_moe", "tiny_qwen3_5_moe_dir", "Qwen3_5MoeForConditionalGeneration"),
    ("qwen3_moe", "tiny_qwen3_vl_moe_dir", "Qwen3VLMoeForConditionalGeneration")])
def test_expert_adapters_in_peft_layout_give_peft_the_trainers_logits(tmp_path, request, robo2vlm_dir, variant,
                                                                      model_fixture, hf_class):
    """Adapters on stacked experts (random, B != 0) written by peft_tensors / adapter_config: the tensor names
    and shapes peft's own save_pretrained gives for the same targets, and PeftModel.from_pretrained on
    transformers' class computes the trainer's logits."""
    peft = pytest.importorskip("peft")
    from configs_loader import load_config

    model_dir = request.getfixturevalue(model_fixture)
    config = load_config(f"demo,lora,{variant}")
    config.actor.model.lora_target_modules = EXPERT_TARGETS
    plan = trainable.make_plan(config, trainable.skeleton(str(model_dir)))
    model, params = model_lib.load_model(str(model_dir))
    step_model, params = main_lib.apply_plan(model, params, plan, precision=torch.float32,
                                             compute_dtype=torch.float32, seed=0)
    g = torch.Generator().manual_seed(0)
    adapters = {n: torch.randn(params[n].shape, generator=g) * 0.05 for n in params if lora.is_adapter(n)}
    params.update(adapters)
    batch = moe_batch(model_dir, model, robo2vlm_dir)
    call = lora.plain_block_call(plan.lora_scale)
    with torch.no_grad():
        ours = model_lib.label_logits(step_model, params, model_lib.forward_hidden(step_model, params, batch, call),
                                      batch["label_index"], call)

    out = tmp_path / "adapter"
    out.mkdir()
    names = [n for n, _ in model.module.named_parameters()]
    tensors = lora.peft_tensors(adapters, names)
    safetensors.torch.save_file(tensors, str(out / "adapter_model.safetensors"))
    targets = sorted({lora.target_of(n) for n in adapters})
    parameters = [t for t in targets if t in names]
    assert parameters and len(parameters) < len(targets)
    config_json = lora.adapter_config(rank=8, alpha=16, dropout=0.0, modules=[t for t in targets if t not in names],
                                      parameters=parameters, base_model=str(model_dir), base_model_class=hf_class)
    (out / "adapter_config.json").write_text(json.dumps(config_json))

    hf_cls = getattr(transformers, hf_class)
    reference = peft.get_peft_model(hf_cls._from_config(model.config), peft.LoraConfig(
        r=8, lora_alpha=16, target_modules=config_json["target_modules"], target_parameters=parameters))
    theirs = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(reference).items()}
    assert theirs == {k: tuple(v.shape) for k, v in tensors.items()}

    base = hf_cls.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    with_adapter = peft.PeftModel.from_pretrained(base, str(out))
    image_token_id = model.config.image_token_id
    torch.testing.assert_close(hf_logits(with_adapter, batch, image_token_id), ours, rtol=1e-5, atol=1e-5)
    with with_adapter.disable_adapter():  # the adapters matter
        assert (hf_logits(with_adapter, batch, image_token_id) - ours).abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("variant,model_fixture,hf_class", [
    ("qwen3_5_moe", "tiny_qwen3_5_moe_per_expert_dir", "Qwen3_5MoeForConditionalGeneration"),
    ("qwen3_moe", "tiny_qwen3_vl_moe_dir", "Qwen3VLMoeForConditionalGeneration")])
def test_expert_lora_trains_and_its_adapter_and_merged_export_load_in_peft_and_transformers(
        tmp_path, request, robo2vlm_dir, variant, model_fixture, hf_class):
    """3 steps through the entry point with LoRA on the stacked experts too (Qwen3.5-MoE from a directory written
    one tensor per expert, as transformers saves it), `export --adapter_only` loaded by peft on transformers'
    class, and the merged export (its frozen experts read per expert from the base) loaded by transformers with
    no missing or unexpected keys: both give the trainer's logits."""
    peft = pytest.importorskip("peft")
    model_dir = request.getfixturevalue(model_fixture)
    config = run_config(f"demo,lora,{variant}", tmp_path, "run", model_dir, robo2vlm_dir, **{
        "runner.val_before_train": False, "actor.optim.lr_warmup_steps": 0, "runner.max_steps": 3,
        "runner.export_hf": True, "actor.model.lora_target_modules": EXPERT_TARGETS})
    main_lib.run(config, "train")
    ckpt = str(tmp_path / "run" / "checkpoints" / "step_3")
    flat = read_checkpoint(ckpt)
    expert_b = [v for k, v in flat.items() if k.startswith("params[") and "experts.gate_up_proj.lora_B" in k]
    assert expert_b and all(v.abs().max() > 0 for v in expert_b)  # the expert adapters trained

    model, _ = model_lib.load_model(str(model_dir))
    batch = moe_batch(model_dir, model, robo2vlm_dir)
    ours = trainer_logits(ckpt, model_dir, config, batch)
    image_token_id = model.config.image_token_id
    hf_cls = getattr(transformers, hf_class)

    out = tmp_path / "adapter"
    assert export.cli(["--checkpoint", ckpt, "--output_dir", str(out), "--adapter_only"]) == 0
    adapter_config = json.load(open(out / "adapter_config.json"))
    assert "model.language_model.layers.0.mlp.experts.down_proj" in adapter_config["target_parameters"]
    base = hf_cls.from_pretrained(str(model_dir), dtype=torch.float32, local_files_only=True)
    with_adapter = peft.PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(hf_logits(with_adapter, batch, image_token_id), ours, rtol=1e-5, atol=1e-5)

    transformers.utils.logging.set_verbosity_warning()
    try:
        merged, info = hf_cls.from_pretrained(str(tmp_path / "run" / "hf_export"), dtype=torch.float32,
                                              local_files_only=True, output_loading_info=True)
    finally:
        transformers.utils.logging.set_verbosity_error()
    assert {k: list(v) for k, v in info.items() if v} == {}
    torch.testing.assert_close(hf_logits(merged, batch, image_token_id), ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_expert_lora_full_shard_on_two_ranks_equals_one_process(tmp_path, tiny_qwen3_5_moe_per_expert_dir,
                                                                robo2vlm_dir):
    """Expert adapters sharded on the expert dim like the experts (each rank: 4 of 8 experts' A and B, and only
    those experts' tensors read from the per-expert directory), merged after the per-block gather: the same
    losses and adapters as one process (padded micro-batches, as the MoE sharding test, to isolate the
    sharding)."""
    from test_distributed import train
    flags = ("--config.actor.model.model_type=qwen3_5_moe", "--config.data.min_pixels=4096",
             "--config.data.max_pixels=4096", "--config.data.packing=False", "--config.actor.model.is_lora=True",
             f"--config.actor.model.lora_target_modules={EXPERT_TARGETS}", "--config.actor.optim.lr=1e-2")
    one = train(tmp_path, 1, *flags, model_dir=tiny_qwen3_5_moe_per_expert_dir, data_dir=robo2vlm_dir)
    two = train(tmp_path, 2, *flags, "--config.actor.fsdp_config.sharding_strategy=full_shard",
                model_dir=tiny_qwen3_5_moe_per_expert_dir, data_dir=robo2vlm_dir)
    p1 = _assert_same_training(one, two)
    assert any(".mlp.experts.down_proj.lora_B" in k for k in p1)
