"""Load the image + text processor of a Qwen-VL directory (Qwen2.5-VL, Qwen3-VL) as the Hub ships it, with or
without torchvision.

The directory names the stock `Qwen2_5_VLProcessor` / `Qwen3VLProcessor`, whose video processor needs torchvision.
Where torchvision is missing or broken (CPU machines), `AutoProcessor` raises or, worse, silently returns a bare
tokenizer. We then build an image-only processor from the same files: the directory's tokenizer, its PIL image
processor configured from preprocessor_config.json (patch size, merge size, mean/std, pixel budget), and its own
chat template (Qwen3-VL's adds no default system turn; prompts come out exactly as that template renders them).
Either way the result is checked to really process images before training starts, and the log says which path
was taken: pixel values of the two paths differ slightly where images are resampled (PIL vs torchvision bicubic).
"""
import json
import logging
import os
import pathlib

import PIL.Image
import transformers
from transformers.utils import is_torchvision_available

from vlm_sft.data import video as video_lib

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_VIDEO_PROCESSOR_FILE = "video_preprocessor_config.json"


class _ImageOnly:
    """The stock processor's text + image path without its video processor (which needs torchvision).

    Keeps the directory's preprocessor (and video preprocessor) config as read, so that save_pretrained writes the
    Hub's files naming the stock classes: a machine with torchvision then loads the stock processor from an export.
    """

    hub_processor_class: str  # the stock class the Hub's files name

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, hub_files=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.vision_start_token = "<|vision_start|>"
        self.vision_end_token = "<|vision_end|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        self.vision_start_token_id = tokenizer.convert_tokens_to_ids(self.vision_start_token)
        self.vision_end_token_id = tokenizer.convert_tokens_to_ids(self.vision_end_token)
        # {file name: JSON dict} of the source directory's preprocessor configs, written back by save_pretrained.
        self.hub_files = dict(hub_files or {})
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def _preprocessor_config(self) -> dict:
        """The source preprocessor_config.json (the Hub's keys, classes and format) with the current pixel budget."""
        current = json.loads(json.dumps(self.image_processor.to_dict(), default=int))  # PIL enums -> ints
        config = dict(self.hub_files.get("preprocessor_config.json") or current)
        size = current["size"]
        config["size"] = {"shortest_edge": size["shortest_edge"], "longest_edge": size["longest_edge"]}
        if "min_pixels" in config or "max_pixels" in config:  # Qwen2.5-VL's files state the budget twice
            config.update(min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
        config.setdefault("image_processor_type", "Qwen2VLImageProcessor")
        config["processor_class"] = self.hub_processor_class
        return config

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Writes tokenizer files, preprocessor_config.json (+ video_preprocessor_config.json where the source had
        one) and chat_template.json like a Hub model directory."""
        save_directory = pathlib.Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        files = [str(f) for f in self.tokenizer.save_pretrained(str(save_directory))]
        configs = {"preprocessor_config.json": self._preprocessor_config()}
        if _VIDEO_PROCESSOR_FILE in self.hub_files:
            configs[_VIDEO_PROCESSOR_FILE] = self.hub_files[_VIDEO_PROCESSOR_FILE]
        for name, config in configs.items():
            (save_directory / name).write_text(json.dumps(config, indent=2, sort_keys=True))
            files.append(str(save_directory / name))
        if self.chat_template is not None:
            (save_directory / "chat_template.json").write_text(
                json.dumps({"chat_template": self.chat_template}, indent=2))
            files.append(str(save_directory / "chat_template.json"))
        return files


class ImageOnlyQwen2_5_VLProcessor(_ImageOnly, transformers.Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor, images only (no torchvision needed)."""

    hub_processor_class = "Qwen2_5_VLProcessor"


class ImageOnlyQwen3VLProcessor(_ImageOnly, transformers.Qwen3VLProcessor):
    """Qwen3VLProcessor, images only (no torchvision needed)."""

    hub_processor_class = "Qwen3VLProcessor"


# processor_class named by a directory -> the image-only stand-in; a directory naming none is taken as Qwen2.5-VL
# (older exports), and its image processor is still checked to be a Qwen2-VL one.
_IMAGE_ONLY_PROCESSORS = {
    "Qwen2_5_VLProcessor": ImageOnlyQwen2_5_VLProcessor,
    "Qwen3VLProcessor": ImageOnlyQwen3VLProcessor,
}


def _check_model_dir(model_path: str | os.PathLike) -> pathlib.Path:
    path = pathlib.Path(model_path)
    if not path.is_dir():
        raise ValueError(f"model_path {str(path)!r}: not a directory (expected a Hugging Face model directory)")
    if not any((path / f).is_file() for f in _TOKENIZER_FILES):
        raise ValueError(f"model_path {str(path)!r}: no tokenizer (expected one of {', '.join(_TOKENIZER_FILES)})")
    if not any((path / f).is_file() for f in _IMAGE_PROCESSOR_FILES):
        raise ValueError(f"model_path {str(path)!r}: no preprocessor_config.json (the image processor's config)")
    return path


def _stock_processor(path: pathlib.Path):
    """The processor transformers itself would build, or None when it fails or is not a full image processor."""
    try:
        processor = transformers.AutoProcessor.from_pretrained(str(path))
    except Exception as e:  # The stock class may fail in many ways (missing/broken torchvision); fall back.
        logging.info("Stock processor for %s failed (%s: %s); building an image-only one", path, type(e).__name__, e)
        return None
    if not isinstance(processor, transformers.ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        logging.info("AutoProcessor gave a %s for %s; building an image-only one", type(processor).__name__, path)
        return None
    return processor


def _read_chat_template(path: pathlib.Path, tokenizer) -> str | None:
    """The chat template from chat_template.json (Hub), chat_template.jinja (transformers 5) or the tokenizer."""
    if (path / "chat_template.json").is_file():
        template = json.loads((path / "chat_template.json").read_text()).get("chat_template")
        if not isinstance(template, str):
            raise ValueError(f"{path / 'chat_template.json'}: expected {{\"chat_template\": \"<jinja string>\"}}")
        return template
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    return getattr(tokenizer, "chat_template", None)


def _read_json(path: pathlib.Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _hub_files(path: pathlib.Path) -> dict[str, dict]:
    return {name: _read_json(path / name) for name in ("preprocessor_config.json", _VIDEO_PROCESSOR_FILE)
            if (path / name).is_file()}


def _processor_class(path: pathlib.Path, hub_files: dict[str, dict]) -> type[_ImageOnly]:
    """The image-only stand-in for the stock processor class the directory names."""
    name = hub_files.get("preprocessor_config.json", {}).get("processor_class")
    if name is None and (path / "processor_config.json").is_file():
        name = _read_json(path / "processor_config.json").get("processor_class")
    if name is None:
        return ImageOnlyQwen2_5_VLProcessor
    if name not in _IMAGE_ONLY_PROCESSORS:
        raise ValueError(f"{path}: processor_class {name!r} is not supported (expected one of "
                         f"{', '.join(sorted(_IMAGE_ONLY_PROCESSORS))})")
    return _IMAGE_ONLY_PROCESSORS[name]


def _image_only_processor(path: pathlib.Path) -> _ImageOnly:
    hub_files = _hub_files(path)
    processor_class = _processor_class(path, hub_files)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    if not hasattr(image_processor, "merge_size"):
        raise ValueError(f"{path}: image processor {type(image_processor).__name__} is not a Qwen2-VL image "
                         "processor (expected image_processor_type 'Qwen2VLImageProcessor')")
    return processor_class(image_processor, tokenizer, chat_template=_read_chat_template(path, tokenizer),
                           hub_files=hub_files)


def _with_pixel_budget(image_processor, min_pixels: int | None, max_pixels: int | None):
    """A copy of the image processor whose resize keeps images within [min_pixels, max_pixels]."""
    config = image_processor.to_dict()
    size = dict(config.get("size") or {})
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']} (data.min_pixels / "
                         "data.max_pixels; where one is unset, the directory's own size.shortest_edge / longest_edge)")
    config.update(size=size, min_pixels=size["shortest_edge"], max_pixels=size["longest_edge"])
    return type(image_processor).from_dict(config)


def _check_processes_images(processor, path: pathlib.Path) -> None:
    """Fails now, not mid-training, if the processor cannot turn an image into patches and image tokens."""
    tokenizer = getattr(processor, "tokenizer", None)
    image_processor = getattr(processor, "image_processor", None)
    if tokenizer is None or image_processor is None:
        raise ValueError(f"{path}: processor {type(processor).__name__} lacks a tokenizer or an image processor")
    out = image_processor(images=[PIL.Image.new("RGB", (56, 56), (128, 64, 32))], return_tensors="pt")
    grid = out.get("image_grid_thw")
    if grid is None or out.get("pixel_values") is None or tuple(grid.shape) != (1, 3):
        raise ValueError(f"{path}: image processor {type(image_processor).__name__} gave no pixel_values/"
                         "image_grid_thw for a test image")
    for token in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"):
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"{path}: tokenizer has no {token} token (not a Qwen-VL tokenizer)")


def load_processor(model_path: str | os.PathLike, *, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> transformers.ProcessorMixin:
    """Processor (tokenizer + image processor + chat template) for a Qwen2.5-VL or Qwen3-VL directory as the Hub
    ships it.

    min_pixels / max_pixels override the image processor's pixel budget (`data.min_pixels` / `data.max_pixels`);
    None keeps the directory's own (Qwen2.5-VL: 3136..12845056, Qwen3-VL: 65536..16777216 pixels).
    The result is picklable (DataLoader workers) and `save_pretrained` writes a directory this loads again.
    """
    path = _check_model_dir(model_path)
    # The stock processors' video processors cannot exist without torchvision; don't pay for a doomed attempt.
    processor = _stock_processor(path) if is_torchvision_available() else None
    if processor is not None:
        logging.info("Processor for %s: the stock %s (torchvision image path)", path, type(processor).__name__)
    else:
        processor = _image_only_processor(path)
        logging.info("Processor for %s: %s (PIL image path; the stock one needs torchvision)", path,
                     type(processor).__name__)
    if min_pixels is not None or max_pixels is not None:
        processor.image_processor = _with_pixel_budget(processor.image_processor, min_pixels, max_pixels)
    _check_processes_images(processor, path)
    return processor


# The stock video processors' defaults where a directory's config leaves a value out.
_VIDEO_DEFAULTS = {
    video_lib.QWEN2_VL: dict(patch_size=14, temporal_patch_size=2, merge_size=2, shortest_edge=128 * 28 * 28,
                             longest_edge=28 * 28 * 768, image_mean=(0.48145466, 0.4578275, 0.40821073),
                             image_std=(0.26862954, 0.26130258, 0.27577711)),
    video_lib.QWEN3_VL: dict(patch_size=16, temporal_patch_size=2, merge_size=2, shortest_edge=128 * 32 * 32,
                             longest_edge=32 * 32 * 768, image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5)),
}


def load_video_config(model_path: str | os.PathLike, *, fps: float = 2.0, min_frames: int = 4,
                      max_frames: int = 768, max_pixels: int | None = None,
                      total_pixels: int | None = None) -> video_lib.VideoConfig:
    """How the directory's stock video processor samples and sizes videos (video_preprocessor_config.json, or
    preprocessor_config.json where a Qwen2.5-VL directory has no video config, as transformers reads them), with
    the data.video_* fields applied. Needs no torchvision."""
    path = _check_model_dir(model_path)
    hub_files = _hub_files(path)
    rule = (video_lib.QWEN3_VL if _processor_class(path, hub_files) is ImageOnlyQwen3VLProcessor
            else video_lib.QWEN2_VL)
    raw = hub_files.get(_VIDEO_PROCESSOR_FILE) or hub_files.get("preprocessor_config.json") or {}
    defaults = _VIDEO_DEFAULTS[rule]
    size = dict(raw.get("size") or {})
    shortest = raw.get("min_pixels") or size.get("shortest_edge") or defaults["shortest_edge"]
    longest = raw.get("max_pixels") or size.get("longest_edge") or defaults["longest_edge"]
    return video_lib.VideoConfig(
        rule=rule, fps=float(fps), min_frames=int(min_frames), max_frames=int(max_frames),
        patch_size=int(raw.get("patch_size") or defaults["patch_size"]),
        temporal_patch_size=int(raw.get("temporal_patch_size") or defaults["temporal_patch_size"]),
        merge_size=int(raw.get("merge_size") or defaults["merge_size"]),
        min_pixels=int(shortest), longest_edge=int(longest), max_pixels=max_pixels, total_pixels=total_pixels,
        image_mean=tuple(float(v) for v in raw.get("image_mean") or defaults["image_mean"]),
        image_std=tuple(float(v) for v in raw.get("image_std") or defaults["image_std"]))
