"""Our video path against the stock AutoProcessor (torchvision venv, as tests/test_qwen3_vl_processing.py): token
ids, video_grid_thw, second_per_grid_ts (Qwen2.5-VL) / timestamps (Qwen3-VL, in the token ids) and the sampled frame
indices equal, for clips of several lengths, frame rates and sizes, with and without the pixel caps; pixels within
the PIL-vs-torchvision bicubic tolerance measured for images."""
import json
import subprocess

import numpy as np
import pytest
import torch

from vlm_sft.data import encode as encode_lib
from vlm_sft.data import video as video_lib
from vlm_sft.data.processor import load_processor, load_video_config
from vlm_sft.data.robo2vlm import Example
from test_qwen3_vl_processing import _photo_like, _torchvision_python

VIDEO_PAD = 151656

# The stock processor gets the very frames we decode (all of them) and their metadata, and samples itself.
_STOCK_SCRIPT = r'''
import json, sys
import numpy as np
import transformers
from transformers.video_utils import VideoMetadata

request = json.load(open(sys.argv[1]))
processor = transformers.AutoProcessor.from_pretrained(request["model_dir"])
vp = processor.video_processor
vp.min_frames, vp.max_frames = request["min_frames"], request["max_frames"]  # Qwen3-VL samples with its own
kwargs = dict(do_sample_frames=True, fps=request["fps"], min_frames=request["min_frames"],
              max_frames=request["max_frames"], cap_pixels_per_frame=request["cap"] is not None)
if request["cap"] is not None:
    vp.max_video_tokens = request["cap"]
out = {}
for k, case in enumerate(request["cases"]):
    frames = np.load(case["frames"])
    meta = VideoMetadata(total_num_frames=len(frames), fps=case["fps"], width=frames.shape[2],
                         height=frames.shape[1], duration=len(frames) / case["fps"])
    content = [{"type": "video"}, {"type": "text", "text": request["text"]}]
    prompt = processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                           add_generation_prompt=True)
    enc = processor(text=[prompt], videos=[frames], video_metadata=[meta], return_tensors="np",
                    videos_kwargs=kwargs)
    sampled = vp(videos=[frames], video_metadata=[VideoMetadata(**dict(meta))], return_metadata=True,
                 return_tensors="np", **kwargs)
    out[f"ids{k}"] = enc["input_ids"][0]
    out[f"grid{k}"] = enc["video_grid_thw"]
    out[f"pixels{k}"] = enc["pixel_values_videos"]
    out[f"indices{k}"] = np.array(sampled["video_metadata"][0].frames_indices)
    out[f"seconds{k}"] = np.array(enc.get("second_per_grid_ts", [-1.0]), dtype=np.float64)
np.savez(request["output"], **out)
'''

# (frames, source fps, (width, height)): several lengths, rates and sizes; 9 frames at 2 fps samples an odd count
# (Qwen3-VL pads the last frame group); 100x60 and 90x150 are resized, 64x64 upscaled for Qwen3-VL's minimum.
CLIPS = [(10, 5.0, (64, 48)), (25, 10.0, (100, 60)), (9, 2.0, (90, 150)), (40, 24.0, (64, 64))]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    out = []
    for k, (n, fps, (w, h)) in enumerate(CLIPS):
        frames = [_photo_like(w, h, seed=10 * k + i) for i in range(n)]
        video_lib.write_clip(d / f"clip{k}.mp4", frames, fps)
        import av
        with av.open(str(d / f"clip{k}.mp4")) as container:  # what we decode is what the stock processor gets
            decoded = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
        np.save(d / f"clip{k}.npy", decoded)
        out.append((str(d / f"clip{k}.mp4"), str(d / f"clip{k}.npy"), fps))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("family, fps, cap", [("qwen2_5_vl", 2.0, None), ("qwen3_vl", 2.0, None),
                                              ("qwen2_5_vl", 3.0, 10), ("qwen3_vl", 1.0, 4)])
def test_video_processing_equals_the_stock_processor(family, fps, cap, clips, tiny_model_dir, tiny_qwen3_vl_dir,
                                                     tmp_path):
    """cap: the stock processor's cap_pixels_per_frame with max_video_tokens = cap, which is our
    data.video_total_pixels (Qwen2.5-VL: int(cap * factor^2 * 0.9)) / data.video_max_pixels (Qwen3-VL: cap *
    factor^2)."""
    python = _torchvision_python()
    path = tiny_model_dir if family == "qwen2_5_vl" else tiny_qwen3_vl_dir
    processor = load_processor(str(path))
    config = load_video_config(str(path), fps=fps, min_frames=4, max_frames=768)
    factor = config.factor
    if cap is not None and family == "qwen2_5_vl":
        config = type(config)(**{**config.__dict__, "total_pixels": int(cap * factor * factor * 0.9)})
    elif cap is not None:
        config = type(config)(**{**config.__dict__, "max_pixels": cap * factor * factor})
    encoder = encode_lib.Encoder(processor, max_prompt_length=8192, video_config=config)
    question, choices = "What happens?", ["a", "b"]
    request = {"model_dir": str(path), "output": str(tmp_path / "stock.npz"), "fps": fps, "min_frames": 4,
               "max_frames": 768, "cap": cap, "text": encode_lib.user_text(question, choices),
               "cases": [{"frames": npy, "fps": clip_fps} for _, npy, clip_fps in clips]}
    (tmp_path / "request.json").write_text(json.dumps(request))
    (tmp_path / "stock.py").write_text(_STOCK_SCRIPT)
    run = subprocess.run([python, str(tmp_path / "stock.py"), str(tmp_path / "request.json")], capture_output=True,
                         text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    stock = np.load(tmp_path / "stock.npz")
    std = min(config.image_std)
    for k, (mp4, _, _) in enumerate(clips):
        example = Example(f"rows.jsonl:{k + 1}", str(k), question, choices, 0, [],
                          [video_lib.VideoRef(mp4, mp4)])
        enc = encoder(example)
        assert enc.video_stats[0]["indices"] == stock[f"indices{k}"].tolist(), k
        assert enc.video_grid_thw.tolist() == stock[f"grid{k}"].tolist(), k
        assert enc.input_ids[:enc.prompt_length].tolist() == stock[f"ids{k}"].tolist(), k  # Qwen3-VL: timestamps
        if family == "qwen2_5_vl":
            torch.testing.assert_close(enc.second_per_grid_ts.double(), torch.from_numpy(stock[f"seconds{k}"]))
        ours, theirs = enc.pixel_values_videos.numpy(), stock[f"pixels{k}"]
        assert ours.shape == theirs.shape
        np.testing.assert_allclose(ours, theirs, atol=2.5 / 255 / std, err_msg=str(k))  # PIL vs torchvision
