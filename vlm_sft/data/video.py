"""Video rows: decoding with PyAV, frame sampling and resizing exactly as the stock Qwen video processors do, and
patchifying into the vision tower's input, without torchvision.

A row's video is a file (path or encoded bytes) or a list of frame images at a known fps. PyAV (FFmpeg bundled in
its wheels, no system libraries; decord hangs in other trainers' data workers) decodes it in the data workers; only
the sampled frames are converted to RGB and decoding stops after the last one. Sampling follows the family's stock
processor (transformers' Qwen2VLVideoProcessor / Qwen3VLVideoProcessor `sample_frames`), as do the resize budgets
(`smart_resize`, with qwen-vl-utils' total-pixel cap when data.video_total_pixels / video_max_pixels are set) and
the temporal patch pairing (an odd frame count repeats the last frame). Frames are resized with PIL bicubic, as
the image path without torchvision: pixels differ from torchvision's resize within the resampling tolerance.

Every failure is a RowError naming the row, the video and the reason (reason "video"), never a traceback.
"""
from __future__ import annotations

import dataclasses
import fractions
import io
import math
import os
from typing import Sequence

import numpy as np
import PIL.Image
import torch

from vlm_sft.errors import RowError

QWEN2_VL, QWEN3_VL = "qwen2_vl", "qwen3_vl"  # the two stock video processors' sampling and budget rules
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")  # a list of these in a video key: one video's frames


@dataclasses.dataclass(frozen=True)
class VideoRef:
    """A video as a row names it (nothing decoded yet): a file path, encoded bytes, or frame image paths."""

    data: str | bytes | tuple[str, ...]
    name: str                     # for messages: the path as written, or "bytes in column 'video'"
    fps: float | None = None      # frame lists: their frame rate


@dataclasses.dataclass(frozen=True)
class VideoConfig:
    """How videos are sampled and sized: the model directory's video processor config with data.video_* applied.
    Picklable (DataLoader workers)."""

    rule: str                     # QWEN2_VL (Qwen2.5-VL) or QWEN3_VL
    fps: float                    # frames sampled per second of video (data.video_fps)
    min_frames: int
    max_frames: int
    patch_size: int
    temporal_patch_size: int
    merge_size: int
    min_pixels: int               # size.shortest_edge of the directory (Qwen2.5-VL per frame, Qwen3-VL per video)
    longest_edge: int             # size.longest_edge of the directory (Qwen2.5-VL per frame, Qwen3-VL per video)
    max_pixels: int | None        # data.video_max_pixels: per-frame cap
    total_pixels: int | None      # data.video_total_pixels: whole-video cap
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size


@dataclasses.dataclass
class Video:
    """One processed video: the tower's patches and what its tokens and positions need."""

    pixel_values: torch.Tensor    # [t*h*w, C*T*p*p] float32
    grid_thw: tuple[int, int, int]
    indices: list[int]            # sampled frame indices into the source
    fps: float                    # the source's frame rate
    total_frames: int
    size: tuple[int, int]         # (width, height) decoded
    temporal_patch_size: int

    @property
    def duration(self) -> float:
        return self.total_frames / self.fps

    @property
    def second_per_grid(self) -> float:
        """Qwen2.5-VL's second_per_grid_ts: temporal_patch_size / the sampled fps (as Qwen2_5_VLProcessor)."""
        return self.temporal_patch_size / (len(self.indices) / self.total_frames * self.fps)

    def timestamps(self) -> list[float]:
        """Qwen3-VL's time of each frame group: the mean time of its first and last frame (indices padded like
        the frames), as Qwen3VLProcessor._calculate_timestamps."""
        merge = self.temporal_patch_size
        indices = list(self.indices)
        if len(indices) % merge:
            indices += [indices[-1]] * (merge - len(indices) % merge)
        times = [i / self.fps for i in indices]
        return [(times[i] + times[i + merge - 1]) / 2 for i in range(0, len(times), merge)]


def sample_indices(total: int, fps: float, config: VideoConfig) -> list[int]:
    """Frame indices the stock processor samples from `total` frames at `fps` (its sample_frames)."""
    t = config.temporal_patch_size
    if config.rule == QWEN2_VL:
        max_frames = math.floor(min(config.max_frames, total) / t) * t
        n = total / fps * config.fps
        n = min(max(n, config.min_frames), max_frames, total)
        n = math.floor(n / t) * t
        if n <= 0:
            return []
        return torch.arange(0, total, total / n).int().tolist()
    n = int(total / fps * config.fps)
    n = min(max(n, config.min_frames), config.max_frames, total)
    return np.linspace(0, total - 1, n).round().astype(int).tolist()


def smart_resize_frame(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's smart_resize: sides multiples of factor, pixels within [min_pixels, max_pixels], aspect kept."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def smart_resize_video(num_frames: int, height: int, width: int, temporal: int, factor: int, min_pixels: int,
                       max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's smart_resize: the budget counts frames x pixels."""
    if num_frames < temporal:
        raise ValueError(f"{num_frames} frames sampled, fewer than the temporal patch size {temporal}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise ValueError(f"absolute aspect ratio must be smaller than 200, got {max(height, width) / min(height, width)}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar, w_bar = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def target_size(num_frames: int, height: int, width: int, config: VideoConfig) -> tuple[int, int]:
    """(height, width) every sampled frame is resized to, under the per-frame and total budgets.

    Qwen2.5-VL: per frame at most data.video_max_pixels (default the directory's longest_edge); with
    data.video_total_pixels, also an even share of it per frame pair, floored at 1.05 x min_pixels (qwen-vl-utils;
    the stock processor's cap_pixels_per_frame). Qwen3-VL: frames x pixels at most data.video_total_pixels
    (default the directory's longest_edge); with data.video_max_pixels, each frame also at most that, floored at
    1.05 x min_pixels (the stock cap_pixels_per_frame with max_video_tokens = video_max_pixels / factor^2).
    """
    c = config
    if c.rule == QWEN2_VL:
        max_pixels = c.max_pixels or c.longest_edge
        if c.total_pixels:
            max_pixels = max(min(max_pixels, c.total_pixels * c.temporal_patch_size // num_frames),
                             int(c.min_pixels * 1.05))
        return smart_resize_frame(height, width, c.factor, c.min_pixels, max_pixels)
    total = c.total_pixels or c.longest_edge
    if c.max_pixels:
        total = max(min(c.max_pixels, total // num_frames), int(c.min_pixels * 1.05)) * num_frames
    return smart_resize_video(num_frames, height, width, c.temporal_patch_size, c.factor, c.min_pixels, total)


def patchify(frames: np.ndarray, config: VideoConfig) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """Normalized frames [n, H, W, 3] float -> patches [t*h*w, 3*T*p*p] in the processor's order, and the grid.
    An odd frame count repeats the last frame to fill the temporal patch (as the stock processors)."""
    c = config
    video = torch.from_numpy(frames).permute(0, 3, 1, 2)  # [n, C, H, W]
    if pad := -video.shape[0] % c.temporal_patch_size:
        video = torch.cat([video, video[-1:].expand(pad, -1, -1, -1)])
    n, channels, height, width = video.shape
    p, m, t = c.patch_size, c.merge_size, c.temporal_patch_size
    gt, gh, gw = n // t, height // p, width // p
    patches = video.reshape(gt, t, channels, gh // m, m, p, gw // m, m, p)
    patches = patches.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return patches.reshape(gt * gh * gw, channels * t * p * p).contiguous(), (gt, gh, gw)


def _open(ref: VideoRef):
    import av  # optional dependency (the `video` extra): only rows with videos need it

    source = ref.data if isinstance(ref.data, str) else io.BytesIO(ref.data)
    return av.open(source, mode="r", metadata_errors="ignore")


def _decode_file(ref: VideoRef, config: VideoConfig, where: str) -> tuple[list[np.ndarray], list[int], float, int]:
    """(sampled RGB frames, their indices, source fps, total frames) of a video file or its bytes."""
    import av

    try:
        container = _open(ref)
    except FileNotFoundError:
        raise RowError(f"{where}: video file not found (looked for {ref.data})", "video") from None
    except av.error.EOFError:
        raise RowError(f"{where}: zero frames (the file ends before its first frame: empty or truncated)",
                       "video") from None
    except av.error.FFmpegError as e:
        raise RowError(f"{where}: not a video container FFmpeg reads: truncated, or not a video "
                       f"({e.strerror or type(e).__name__})", "video") from None
    with container:
        if not container.streams.video:
            raise RowError(f"{where}: no video stream in the container", "video")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if fps <= 0:
            raise RowError(f"{where}: the container states no frame rate", "video")
        total = int(stream.frames or 0)
        if total <= 0:  # not in the header: count the packets (demux only, nothing decoded)
            total = sum(1 for packet in container.demux(stream) if packet.size)
            container.seek(0)
        if total == 0:
            raise RowError(f"{where}: zero frames", "video")
        indices = _check_count(total, fps, config, where)
        wanted, frames, decoded = set(indices), [], 0
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    frames.append(frame.to_ndarray(format="rgb24"))
                decoded += 1
                if decoded > indices[-1]:
                    break
        except av.error.FFmpegError as e:
            raise RowError(f"{where}: undecodable at frame {decoded} of {total} ({e.strerror or e})",
                           "video") from None
    if len(frames) < len(indices):
        raise RowError(f"{where}: truncated: {decoded} frames decoded of the {total} the container states",
                       "video")
    return frames, indices, fps, total


def _check_count(total: int, fps: float, config: VideoConfig, where: str) -> list[int]:
    if total < config.min_frames:
        raise RowError(f"{where}: {total} frame{'s' if total != 1 else ''}, under data.video_min_frames="
                       f"{config.min_frames}", "video")
    indices = sample_indices(total, fps, config)
    if len(indices) < config.temporal_patch_size:
        raise RowError(f"{where}: {len(indices)} frames sampled of {total}, fewer than the temporal patch "
                       f"size {config.temporal_patch_size}", "video")
    return indices


def _decode_frame_list(ref: VideoRef, config: VideoConfig, where: str
                       ) -> tuple[list[np.ndarray], list[int], float, int]:
    paths = list(ref.data)
    if not paths:
        raise RowError(f"{where}: zero frames (an empty frame list)", "video")
    fps = float(ref.fps or config.fps)
    indices = _check_count(len(paths), fps, config, where)
    frames = []
    for i in indices:
        try:
            with PIL.Image.open(paths[i]) as image:
                frames.append(np.asarray(image.convert("RGB")))
        except FileNotFoundError:
            raise RowError(f"{where}: frame {i} ({paths[i]}) not found", "video") from None
        except Exception as e:  # PIL raises many types for damaged files
            raise RowError(f"{where}: frame {i} ({paths[i]}) undecodable: {type(e).__name__}: {e}", "video") from None
    if any(f.shape != frames[0].shape for f in frames):
        raise RowError(f"{where}: frames differ in size ({', '.join(sorted({f'{f.shape[1]}x{f.shape[0]}' for f in frames}))})",
                       "video")
    return frames, indices, fps, len(paths)


def process(ref: VideoRef, config: VideoConfig, source: str) -> Video:
    """Decode, sample, resize, normalize and patchify one video of row `source`; a RowError if it cannot be."""
    where = f"{source}: video {ref.name}"
    if isinstance(ref.data, tuple):
        frames, indices, fps, total = _decode_frame_list(ref, config, where)
    else:
        frames, indices, fps, total = _decode_file(ref, config, where)
    height, width = frames[0].shape[:2]
    try:
        new_h, new_w = target_size(len(frames), height, width, config)
    except ValueError as e:
        raise RowError(f"{where}: frames of {width}x{height} pixels cannot be processed: {e}", "video") from None
    resized = np.stack([np.asarray(PIL.Image.fromarray(f).resize((new_w, new_h), PIL.Image.BICUBIC))
                        if (f.shape[0], f.shape[1]) != (new_h, new_w) else f for f in frames])
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    normalized = (resized.astype(np.float32) * np.float32(1 / 255) - mean) / std
    pixel_values, grid = patchify(normalized.astype(np.float32), config)
    return Video(pixel_values=pixel_values, grid_thw=grid, indices=indices, fps=fps, total_frames=total,
                 size=(width, height), temporal_patch_size=config.temporal_patch_size)


def resolve(value, base_dir: str | None, source: str, key: str, fps: float | None) -> VideoRef:
    """One video value of a row -> VideoRef: a path (relative to base_dir, or absolute), bytes, {"bytes", "path"},
    or a list of frame image paths (at `fps`: the row's data.video_fps_key value, else data.video_fps)."""
    import base64
    import binascii

    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            if isinstance(data, str):  # JSON: base64
                try:
                    data = base64.b64decode(data, validate=True)
                except (binascii.Error, ValueError) as e:
                    raise RowError(f"{source}: video bytes in key {key!r} are not valid base64 ({e})",
                                   "video") from None
            if not isinstance(data, (bytes, bytearray, memoryview)):
                raise RowError(f"{source}: video bytes in column {key!r} are {type(data).__name__}", "video")
            return VideoRef(bytes(data), f"bytes in {key!r} ({len(data)} bytes)", fps)
        value = value.get("path")
        if value is None:
            raise RowError(f"{source}: video in {key!r} has neither bytes nor path", "video")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return VideoRef(bytes(value), f"bytes in {key!r} ({len(value)} bytes)", fps)
    if isinstance(value, (list, tuple)):
        if not value or not all(isinstance(v, str) and v for v in value):
            raise RowError(f"{source}: video frames in {key!r} are {value!r:.100}, expected a non-empty list of "
                           "frame image paths", "video")
        if base_dir is None:
            raise RowError(f"{source}: video frames in column {key!r} are paths; parquet rows embed videos as "
                           "bytes", "video")
        frames = tuple(v if os.path.isabs(v) else os.path.join(base_dir, v) for v in value)
        return VideoRef(frames, f"of {len(frames)} frames in {key!r} ({value[0]!r}, ...)", fps)
    if isinstance(value, str) and value:
        if base_dir is None:
            raise RowError(f"{source}: video in column {key!r} is a path ({value!r}); parquet rows embed videos as "
                           "bytes", "video")
        return VideoRef(value if os.path.isabs(value) else os.path.join(base_dir, value), repr(value), fps)
    raise RowError(f"{source}: video in {key!r} is {value!r:.100}, expected a file path, bytes, "
                   "{\"bytes\": ..., \"path\": ...} or a list of frame image paths", "video")


def write_clip(path: str | os.PathLike, frames: Sequence[np.ndarray], fps: float) -> None:
    """Writes RGB frames [H, W, 3] uint8 as an H.264 MP4 (near lossless), for the demo and tests."""
    import av

    height, width = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv444p"
        stream.options = {"crf": "4", "preset": "ultrafast"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
