"""Video rows: readers (JSONL paths, frame lists, parquet bytes), decoding and sampling, prompts, and bad videos as
one line each naming the row, the video and the reason."""
import json
import math

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vlm_sft.data import sources
from vlm_sft.data import video as video_lib
from vlm_sft.data.encode import Encoder
from vlm_sft.data.processor import load_processor, load_video_config
from vlm_sft.data.robo2vlm import RowError

KEYS = dict(prompt_key="question", choice_key="choices", answer_key="correct_answer", image_keys=[],
            video_keys=["video"], video_fps_key="fps")
VIDEO_PAD, VISION_START, VISION_END = 151656, 151652, 151653


def frames(n, size=(48, 64)):
    return [np.full((*size, 3), (20 * k) % 250, dtype=np.uint8) for k in range(n)]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    video_lib.write_clip(d / "ten.mp4", frames(10), 5)
    video_lib.write_clip(d / "one.mp4", frames(1), 5)
    for k, image in enumerate(frames(6)):
        PIL.Image.fromarray(image).save(d / f"f{k}.png")
    data = (d / "ten.mp4").read_bytes()
    (d / "truncated.mp4").write_bytes(data[:len(data) // 2])
    (d / "notavideo.mp4").write_bytes(b"this is a text file, not a video\n" * 20)
    return d


@pytest.fixture(scope="module")
def encoders(tiny_model_dir, tiny_qwen3_vl_dir):
    out = {}
    for name, path in (("qwen2.5_vl", tiny_model_dir), ("qwen3_vl", tiny_qwen3_vl_dir)):
        out[name] = Encoder(load_processor(str(path)), max_prompt_length=4096,
                            video_config=load_video_config(str(path)))
    return out


def write_rows(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps({"question": "What happens?", "choices": ["a", "b"], "correct_answer": 0, **row})
                    + "\n")
    return str(path)


def test_sampling_follows_each_stock_rule():
    base = dict(min_frames=4, max_frames=768, patch_size=14, temporal_patch_size=2, merge_size=2, min_pixels=3136,
                longest_edge=12845056, max_pixels=None, total_pixels=None, image_mean=(0.5,) * 3,
                image_std=(0.5,) * 3, fps=2.0)
    qwen2 = video_lib.VideoConfig(rule=video_lib.QWEN2_VL, **base)
    qwen3 = video_lib.VideoConfig(rule=video_lib.QWEN3_VL, **base)
    # 10 frames at 5 fps = 2 s -> 4 frames at 2 fps; Qwen2-VL steps through, Qwen3-VL spans first to last
    assert video_lib.sample_indices(10, 5.0, qwen2) == [0, 2, 5, 7]
    assert video_lib.sample_indices(10, 5.0, qwen3) == [0, 3, 6, 9]
    # 9 frames at 2 fps: Qwen2-VL rounds down to pairs (8), Qwen3-VL keeps 9 (the last frame repeats in patches)
    assert len(video_lib.sample_indices(9, 2.0, qwen2)) == 8 and len(video_lib.sample_indices(9, 2.0, qwen3)) == 9
    # a short clip is sampled up to min_frames; a long one down to max_frames
    assert len(video_lib.sample_indices(5, 30.0, qwen3)) == 4
    assert len(video_lib.sample_indices(30_000, 30.0, qwen2)) == 768


def test_jsonl_video_paths_and_frame_lists_encode_with_their_tokens(tmp_path, clips, encoders):
    data = write_rows(tmp_path / "rows.jsonl", [
        {"video": str(clips / "ten.mp4")},
        {"video": [f"{clips}/f{k}.png" for k in range(6)], "fps": 3},
    ])
    source = sources.make_source([data], lazy=False, **KEYS)
    for name, encoder in encoders.items():
        clip, frame_list = encoder(source[0]), encoder(source[1])
        assert clip.video_stats[0]["frames"] == 4 and clip.video_stats[0]["duration"] == 2.0
        assert frame_list.video_stats[0]["duration"] == 2.0 and len(clip.image_grid_thw) == 0
        for e in (clip, frame_list):
            t, h, w = e.video_grid_thw[0].tolist()
            assert t == 2 and (e.input_ids == VIDEO_PAD).sum() == t * h * w // 4
            assert e.pixel_values_videos.shape[0] == t * h * w
            text = encoder.processor.tokenizer.decode(e.input_ids[:e.prompt_length])
            if name == "qwen3_vl":  # "<t seconds>" before each frame group, inside the template's vision tokens
                stamps = [f"<{s:.1f} seconds>" for s in e.video_stats[0]["timestamps"]]
                assert text.count("seconds>") == 2 and all(s in text for s in stamps)
                assert text.count("<|vision_start|>") == 3
            else:
                assert "seconds" not in text and text.count("<|vision_start|>") == 1
        assert torch.allclose(clip.second_per_grid_ts, torch.tensor([1.0]))


def test_parquet_rows_embed_video_bytes(tmp_path, clips, encoders):
    table = pa.table({"question": ["q?"], "choices": [["a", "b"]], "correct_answer": [1],
                      "video": [{"bytes": (clips / "ten.mp4").read_bytes(), "path": "ten.mp4"}]})
    pq.write_table(table, tmp_path / "train-0.parquet")
    source = sources.make_source([str(tmp_path / "train-0.parquet")], lazy=True, **KEYS)
    e = encoders["qwen2.5_vl"](source[0])
    assert e.video_grid_thw.tolist() == [[2, 4, 4]] and e.answer_index == 1


def test_mixed_image_and_video_row(tmp_path, clips, encoders):
    PIL.Image.new("RGB", (56, 56), (200, 0, 0)).save(tmp_path / "img.png")
    data = write_rows(tmp_path / "rows.jsonl", [{"image": "img.png", "video": str(clips / "ten.mp4")}])
    source = sources.make_source([data], lazy=False, **{**KEYS, "image_keys": ["image"]})
    e = encoders["qwen2.5_vl"](source[0])
    ids = e.input_ids.tolist()
    assert len(e.image_grid_thw) == 1 and len(e.video_grid_thw) == 1
    assert ids.index(151655) < ids.index(VIDEO_PAD)  # the image first, then the video


@pytest.mark.parametrize("case, reason", [
    ("truncated.mp4", "not a video container"),
    ("notavideo.mp4", "not a video container"),
    ("missing.mp4", "not found"),
    ("one.mp4", "1 frame, under data.video_min_frames=4"),
    ("frames_missing", "not found"),
    ("frames_empty", "expected a non-empty list"),
])
def test_bad_videos_are_one_line_naming_row_video_and_reason(tmp_path, clips, encoders, case, reason):
    video = {"frames_missing": ["nope0.png", "nope1.png", "nope2.png", "nope3.png"], "frames_empty": [[]]}.get(
        case, str(clips / case))
    data = write_rows(tmp_path / "rows.jsonl", [{"video": video}])
    source = sources.make_source([data], lazy=False, **KEYS)
    with pytest.raises(RowError) as e:
        encoders["qwen3_vl"](source[0])
    message = str(e.value)
    assert message.startswith(f"{data}:1: ") and reason in message and "\n" not in message, message
    assert e.value.reason == "video"


def test_zero_frames(tmp_path, encoders):
    import av
    with av.open(str(tmp_path / "empty.mkv"), mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=5)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()  # a header, then no frame
    data = write_rows(tmp_path / "rows.jsonl", [{"video": "empty.mkv"}])
    source = sources.make_source([data], lazy=False, **KEYS)
    with pytest.raises(RowError, match=r"rows\.jsonl:1: video .*empty\.mkv.*: zero frames"):
        encoders["qwen2.5_vl"](source[0])


def test_pixel_budgets_bound_every_frame_and_the_whole_video():
    base = dict(min_frames=4, max_frames=768, patch_size=16, temporal_patch_size=2, merge_size=2, min_pixels=4096,
                longest_edge=25165824, image_mean=(0.5,) * 3, image_std=(0.5,) * 3, fps=2.0)
    uncapped = video_lib.VideoConfig(rule=video_lib.QWEN3_VL, max_pixels=None, total_pixels=None, **base)
    assert video_lib.target_size(8, 480, 640, uncapped) == (480, 640)
    capped = video_lib.VideoConfig(rule=video_lib.QWEN3_VL, max_pixels=128 * 32 * 32, total_pixels=None, **base)
    h, w = video_lib.target_size(8, 480, 640, capped)
    assert h * w <= 128 * 32 * 32 and h % 32 == 0 and w % 32 == 0
    total = video_lib.VideoConfig(rule=video_lib.QWEN3_VL, max_pixels=None, total_pixels=8 * 64 * 32 * 32, **base)
    h, w = video_lib.target_size(8, 480, 640, total)
    assert 8 * h * w <= 8 * 64 * 32 * 32
    qwen2 = video_lib.VideoConfig(rule=video_lib.QWEN2_VL, max_pixels=None, total_pixels=4 * 28 * 28 * 16,
                                  **{**base, "patch_size": 14, "min_pixels": 3136})
    h, w = video_lib.target_size(8, 480, 640, qwen2)
    assert h * w <= 4 * 28 * 28 * 16 * 2 // 8 and math.gcd(h, 28) == 28


def test_config_fields_from_the_command_line_are_checked(tmp_path, tiny_model_dir):
    from vlm_sft import config as config_lib
    from configs_loader import load_config
    c = load_config("demo,video")
    assert tuple(c.data.video_keys) == ("video",) and not c.data.image_keys
    c.data.video_fps = 0.0
    with pytest.raises(config_lib.ConfigError, match=r"data\.video_fps=0\.0"):
        config_lib.validate(c, mode="train")
    c = load_config("demo")
    c.data.image_keys = ()
    with pytest.raises(config_lib.ConfigError, match="data.image_keys is empty and so is data.video_keys"):
        config_lib.validate(c, mode="train")


def test_check_mode_reports_video_stats_and_names_a_bad_video(tmp_path, tiny_qwen3_vl_dir):
    """--mode=check on video rows (keys given as tuple literals on the command line, as a user types them)."""
    import subprocess
    import sys
    from configs_loader import CONFIG
    from vlm_sft.demo import data as demo_data
    d = demo_data.make_video_dir(tmp_path / "data", n_train=8, n_test=2)
    (d / "videos" / "bad.mp4").write_bytes(b"not a video" * 10)
    lines = (d / "train.jsonl").read_text().splitlines()
    lines[2] = json.dumps({**json.loads(lines[2]), "video": "videos/bad.mp4"})
    (d / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "vlm_sft.main", f"--config={CONFIG}:qwen3", "--mode=check",
                          f"--config.runner.logger.log_path={tmp_path / 'runs'}",
                          f"--config.actor.model.model_path={tiny_qwen3_vl_dir}",
                          f"--config.data.train_data_paths={d}", "--config.data.eval_data_paths=",
                          "--config.data.video_keys=('video',)", "--config.data.image_keys=()",
                          "--config.data.num_workers=0"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr[-3000:]
    assert (f"{d}/train.jsonl:3: video 'videos/bad.mp4': not a video container" in out.stdout), out.stdout
    assert "videos per row: 1 video(s): 7; duration (s) 2 / 2 / 2 / 2; decoded frames 4 / 4 / 4 / 4; video " \
           "tokens per row 8 / 8 / 8 / 8" in out.stdout, out.stdout
    report = json.loads((tmp_path / "runs" / "qwen3_vl_sft_robo2vlm" / "preflight.json").read_text())
    assert report["splits"]["train"]["bad_rows_by_reason"]["video"]["count"] == 1
