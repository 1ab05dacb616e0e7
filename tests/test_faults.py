"""Faults in process: damaged checkpoints found on resume, nothing non-finite saved, a failing save leaves the
previous checkpoints intact, a diverging run stops, damaged model files named. (Signals and dying ranks, with real
processes: tests/test_faults_processes.py.)"""
import errno
import json
import logging
import os

import pytest
import torch

from vlm_sft import checkpoint, export, faults, integrity
from vlm_sft import main as main_lib
from vlm_sft.models import ModelLoadError
from configs_loader import run_config
from test_checkpoint import make_state, save


def small_config(tmp_path, model_dir, data_dir, name="run", **overrides):
    return run_config("demo", tmp_path, name, model_dir, data_dir, **{
        "actor.global_batch_size": 8, "actor.micro_batch_size": 8, **overrides})


def shard_of(path) -> str:
    return sorted(f for f in os.listdir(path) if f.endswith(".distcp"))[0]


def test_checksums_recorded_and_damage_found_on_resume(tmp_path, caplog):
    root = tmp_path / "checkpoints"
    older, newer = save(root, make_state(steps=1)), save(root, make_state(steps=2))
    files = checkpoint.read_meta(newer)["files"]
    assert {".metadata", "config.json", "rng_rank0.pt", shard_of(newer)} <= set(files)
    assert all(rec["size"] == os.path.getsize(os.path.join(newer, n)) for n, rec in files.items())
    assert not any(n.startswith("files_rank") for n in os.listdir(newer))  # merged into meta.json

    shard = os.path.join(newer, shard_of(newer))
    with open(shard, "r+b") as f:  # same size, one byte flipped: only the checksum sees it
        f.seek(100)
        byte = f.read(1)
        f.seek(100)
        f.write(bytes([byte[0] ^ 0xFF]))
    with caplog.at_level(logging.WARNING):
        assert checkpoint.resolve_resume("auto", str(root)) == older
    assert f"SKIPPING CHECKPOINT {newer}" in caplog.text and f"{shard}: checksum" in caplog.text
    with pytest.raises(checkpoint.CheckpointError, match=rf"runner.resume: .*damaged checkpoint: {shard}: checksum"):
        checkpoint.resolve_resume(newer, str(root))

    os.truncate(shard, os.path.getsize(shard) // 2)
    with pytest.raises(checkpoint.CheckpointError, match=rf"{shard_of(newer)} is truncated"):
        checkpoint.resolve_resume(newer, str(root))


def test_nonfinite_state_is_never_saved(tmp_path):
    state = make_state()
    name = "model.language_model.norm.weight"
    state.params[name][1] = float("nan")
    with pytest.raises(checkpoint.CheckpointError, match=rf"refusing to save checkpoint step_2: .*{name}.*non-finite"):
        save(tmp_path, state)
    assert os.listdir(tmp_path) == []


def test_a_failed_save_keeps_the_previous_checkpoints_and_says_so(tmp_path, monkeypatch):
    root = tmp_path / "checkpoints"
    good = save(root, make_state(steps=1))
    real_save = checkpoint.dcp.save

    def disk_full(flat, checkpoint_id, **kwargs):
        real_save(flat, checkpoint_id=checkpoint_id, **kwargs)  # shards written, then the disk fills
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint.dcp, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match=r"saving checkpoint step_2 under .* failed \(OSError: No "
                                                         rf"space left on device\); the previous checkpoints are "
                                                         rf"intact \(newest: {good}\)"):
        save(root, make_state(steps=2))
    assert os.listdir(root) == ["step_1"]  # the partial save removed, nothing renamed
    assert checkpoint.resolve_resume("auto", str(root)) == good


def test_a_diverging_run_stops_naming_the_steps_and_its_checkpoints_are_finite(tmp_path, tiny_model_dir,
                                                                              robo2vlm_dir):
    """lr 1e8: the first update blows the weights up, every later loss is non-finite and its update skipped."""
    c = small_config(tmp_path, tiny_model_dir, robo2vlm_dir, **{
        "actor.optim.lr": 1e8, "actor.optim.lr_warmup_steps": 0, "runner.max_steps": 50,
        "runner.save_interval": 1, "runner.keep_last_n": 0, "runner.max_consecutive_skipped_steps": 3})
    with pytest.raises(faults.Diverged, match=r"the updates of steps 2\.\.4 \(3 in a row, runner.max_consecutive_"
                                              r"skipped_steps=3\) were skipped .*the last good checkpoint is "
                                              r".*step_1\b"):
        main_lib.run(c, "train")
    lines = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
    assert [l["train/skipped_update"] for l in lines] == [0.0, 1.0, 1.0, 1.0]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(os.listdir(ckpts)) == ["step_1", "step_2", "step_3"]  # not step_4: the run stopped there
    for name in os.listdir(ckpts):
        index = checkpoint.read_index(str(ckpts / name)).state_dict_metadata
        flat = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in index.items()}
        checkpoint.load_flat(str(ckpts / name), flat, partial=False, no_dist=True)
        assert checkpoint.nonfinite_leaf(flat) is None, name

    # Nor into an export: weights blown up to ~1e7 overflow fp16. And a damaged checkpoint is not exported.
    with pytest.raises(export.ExportError, match=r"holds non-finite values in torch.float16; nothing exported"):
        export.export_checkpoint(str(ckpts / "step_1"), str(tmp_path / "fp16"), dtype=torch.float16)
    assert not (tmp_path / "fp16").exists()
    shard = ckpts / "step_2" / shard_of(ckpts / "step_2")
    os.truncate(shard, os.path.getsize(shard) - 1)
    with pytest.raises(export.ExportError, match=rf"--checkpoint: .*{shard.name} is truncated"):
        export.export_checkpoint(str(ckpts / "step_2"), str(tmp_path / "out"))


def test_damaged_model_files_are_named_before_the_weights_load(tmp_path, tiny_model_dir, robo2vlm_dir,
                                                               monkeypatch):
    import shutil

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the damaged file was reported")
    monkeypatch.setattr(main_lib.model_lib, "load_model", no_model)
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    weights = model / "model-00001-of-00002.safetensors"
    os.truncate(weights, os.path.getsize(weights) - 1000)
    c = small_config(tmp_path, model, robo2vlm_dir)
    with pytest.raises(ModelLoadError, match=rf"actor.model.model_path: {weights}: .* bytes, but its tensors need"):
        main_lib.run(c, "train")
    shutil.copy(tiny_model_dir / "model-00001-of-00002.safetensors", weights)
    (model / "tokenizer.json").write_text('{"version": "1.0", "trunc')
    with pytest.raises(ModelLoadError, match=rf"{model / 'tokenizer.json'}: not valid JSON"):
        main_lib.run(c, "train")
    shutil.copy(tiny_model_dir / "tokenizer.json", model / "tokenizer.json")
    (model / "chat_template.json").write_text(json.dumps({"chat_template": "{% for m in messages %}{{ m }}"}))
    with pytest.raises(ModelLoadError, match=rf"{model / 'chat_template.json'}: the chat template does not compile"):
        main_lib.run(c, "train")


def test_writable_directories_are_checked_before_anything_heavy(tmp_path, tiny_model_dir, robo2vlm_dir):
    (tmp_path / "a_file").write_text("")
    c = small_config(tmp_path / "a_file", tiny_model_dir, robo2vlm_dir)
    with pytest.raises(main_lib.config_lib.ConfigError, match=r"runner.logger.log_path: cannot write to .*a_file/run"):
        main_lib.run(c, "train")
    with pytest.raises(integrity.DamagedFileError, match="checkpoints/ directory"):
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "checkpoints").write_text("")
        integrity.check_writable_dir(str(tmp_path / "run" / "checkpoints"), "checkpoints/ directory")
