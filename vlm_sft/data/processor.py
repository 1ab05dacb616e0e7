"""Load the image + text processor of a Qwen2.5-VL directory as the Hub ships it, with or without torchvision.

The directory names the stock `Qwen2_5_VLProcessor`, whose video processor needs torchvision. Where torchvision is
missing or broken (CPU machines), `AutoProcessor` raises or, worse, silently returns a bare tokenizer. We then build
an image-only processor from the same files: the directory's tokenizer, its PIL image processor and chat template.
Either way the result is checked to really process images before training starts.
"""
import json
import logging
import os
import pathlib

import PIL.Image
import transformers
from transformers.utils import is_torchvision_available

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")
_IMAGE_PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


class ImageOnlyQwen2_5_VLProcessor(transformers.Qwen2_5_VLProcessor):
    """The stock Qwen2.5-VL processor without its video processor (which needs torchvision); images only.

    Saves in the Hub's layout naming the stock class, so a machine with torchvision loads the stock processor.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = "<|image_pad|>"
        self.video_token = "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        transformers.ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> list[str]:
        """Writes tokenizer files, preprocessor_config.json and chat_template.json like a Hub model directory."""
        save_directory = pathlib.Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        files = [str(f) for f in self.tokenizer.save_pretrained(str(save_directory))]
        config = self.image_processor.to_dict()
        size = config.get("size") or {}
        config.update(
            min_pixels=size.get("shortest_edge"),
            max_pixels=size.get("longest_edge"),
            image_processor_type="Qwen2VLImageProcessor",
            processor_class="Qwen2_5_VLProcessor",
        )
        config = json.loads(json.dumps(config, default=int))  # PIL resampling enums -> ints
        (save_directory / "preprocessor_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        files.append(str(save_directory / "preprocessor_config.json"))
        if self.chat_template is not None:
            (save_directory / "chat_template.json").write_text(
                json.dumps({"chat_template": self.chat_template}, indent=2))
            files.append(str(save_directory / "chat_template.json"))
        return files


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


def _image_only_processor(path: pathlib.Path) -> ImageOnlyQwen2_5_VLProcessor:
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    if not hasattr(image_processor, "merge_size"):
        raise ValueError(f"{path}: image processor {type(image_processor).__name__} is not a Qwen2-VL image "
                         "processor (expected image_processor_type 'Qwen2VLImageProcessor')")
    return ImageOnlyQwen2_5_VLProcessor(image_processor, tokenizer, chat_template=_read_chat_template(path, tokenizer))


def _with_pixel_budget(image_processor, min_pixels: int | None, max_pixels: int | None):
    """A copy of the image processor whose resize keeps images within [min_pixels, max_pixels]."""
    config = image_processor.to_dict()
    size = dict(config.get("size") or {})
    if min_pixels is not None:
        size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        size["longest_edge"] = max_pixels
    if size["shortest_edge"] > size["longest_edge"]:
        raise ValueError(f"min_pixels {size['shortest_edge']} > max_pixels {size['longest_edge']}")
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
            raise ValueError(f"{path}: tokenizer has no {token} token (not a Qwen2.5-VL tokenizer)")


def load_processor(model_path: str | os.PathLike, *, min_pixels: int | None = None,
                   max_pixels: int | None = None) -> transformers.ProcessorMixin:
    """Processor (tokenizer + image processor + chat template) for a Qwen2.5-VL directory as the Hub ships it.

    min_pixels / max_pixels override the image processor's pixel budget (`data.min_pixels` / `data.max_pixels`).
    The result is picklable (DataLoader workers) and `save_pretrained` writes a directory this loads again.
    """
    path = _check_model_dir(model_path)
    # Qwen2_5_VLProcessor's video processor cannot exist without torchvision; don't pay for a doomed attempt.
    processor = _stock_processor(path) if is_torchvision_available() else None
    if processor is None:
        processor = _image_only_processor(path)
    if min_pixels is not None or max_pixels is not None:
        processor.image_processor = _with_pixel_budget(processor.image_processor, min_pixels, max_pixels)
    _check_processes_images(processor, path)
    return processor
