"""One Robo2VLM example -> token ids, answer-only labels and image patches, in RLinf's prompt format.

Prompt (rlinf_facts.md): exactly what the model directory's own chat template renders for a user turn holding the
image(s) first and the text "{question}\nChoices:\nA. ...\nB. ...\n" (Qwen2.5-VL's template puts its default
system turn first, Qwen3-VL's adds none); the target is the assistant's "B. Yes". Labels cover exactly
the target and its closing <|im_end|> (RLinf also trains on a stray trailing "<|im_start|>assistant\n": we don't).
The real Hub chat template has no {% generation %} markers, so the label boundary is the length of the prompt
rendered with add_generation_prompt=True, checked to be a prefix of the rendered full conversation.
Thinking templates (Qwen3.5's) are rendered with enable_thinking=False (passed only to templates that use it): the
generation prompt then ends with the empty think block "<think>\n\n</think>\n\n" that the template also renders
before a direct answer, so the answer is labelled alone and evaluation prompts the model to answer directly.
"""
from __future__ import annotations

import dataclasses
import numbers

import torch

from vlm_sft.errors import PromptTooLong, RowError

IGNORE_INDEX = -100
IMAGE_TOKEN = "<|image_pad|>"
VIDEO_TOKEN = "<|video_pad|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
TURN_END = "<|im_end|>"
PLAIN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PLAIN_VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
TRUNCATIONS = ("text", "error")


@dataclasses.dataclass
class Encoded:
    input_ids: torch.Tensor  # [L] long: prompt (ending "<|im_start|>assistant\n") + target + <|im_end|>
    labels: torch.Tensor  # [L] long: -100 on the prompt, the token ids on target + <|im_end|>
    pixel_values: torch.Tensor  # [P, C*T*p*p] float32 patches of all images of the row
    image_grid_thw: torch.Tensor  # [n_images, 3] long
    prompt_length: int  # number of prompt tokens = index of the first target token
    answer_index: int
    choice_targets: list[torch.Tensor]  # per choice: ids of f"{letter}. {choice}" + <|im_end|> (for scoring)
    target_text: str  # e.g. "B. Yes"
    source: str  # example.source, for error messages downstream
    truncated: bool = False  # the question was cut to fit max_prompt_length (data.truncation="text")
    pixel_values_videos: torch.Tensor | None = None  # [Pv, C*T*p*p] float32 patches of all videos of the row
    video_grid_thw: torch.Tensor | None = None  # [n_videos, 3] long
    second_per_grid_ts: torch.Tensor | None = None  # [n_videos] float32: seconds per temporal grid step
    video_stats: list[dict] = dataclasses.field(default_factory=list)  # per video: duration, frames (preflight)

    def vision_inputs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(patches, grids, seconds per temporal step) of the row's images then videos, as its prompt holds
        them (images first); images step 0 seconds (their grids have t = 1)."""
        if self.video_grid_thw is None or not len(self.video_grid_thw):
            return self.pixel_values, self.image_grid_thw, torch.zeros(len(self.image_grid_thw))
        return (torch.cat([self.pixel_values, self.pixel_values_videos]),
                torch.cat([self.image_grid_thw, self.video_grid_thw]),
                torch.cat([torch.zeros(len(self.image_grid_thw)), self.second_per_grid_ts]))


def user_text(question: str, choices: list[str]) -> str:
    """RLinf's user text: the question, then one lettered line per choice."""
    return f"{question}\nChoices:\n" + "".join(f"{chr(65 + i)}. {c}\n" for i, c in enumerate(choices))


def choice_text(choices: list[str], index: int) -> str:
    """RLinf's assistant target for choice `index`, e.g. "B. Yes"."""
    return f"{chr(65 + index)}. {choices[index]}"


def _check_example(example) -> None:
    source = getattr(example, "source", "?")
    choices = example.choices
    if not isinstance(choices, (list, tuple)) or not 1 <= len(choices) <= 26 or not all(
            isinstance(c, str) for c in choices):
        raise ValueError(f"{source}: choices must be a list of 1 to 26 strings, got {choices!r}")
    if not isinstance(example.answer_index, numbers.Integral) or not 0 <= example.answer_index < len(choices):
        raise ValueError(f"{source}: answer_index {example.answer_index!r} out of range for {len(choices)} choices")
    if not isinstance(example.question, str):
        raise ValueError(f"{source}: question must be a string, got {type(example.question).__name__}")
    if not example.images and not getattr(example, "videos", None):
        raise ValueError(f"{source}: no images or videos (a row has at least one)")


class Encoder:
    """Callable example -> Encoded. Picklable (DataLoader workers); keeps no state between calls."""

    def __init__(self, processor, *, max_prompt_length: int, truncation: str = "text",
                 apply_chat_template: bool = True, video_config=None):
        if truncation not in TRUNCATIONS:
            raise ValueError(f"data.truncation={truncation!r}: expected one of {TRUNCATIONS}")
        if max_prompt_length <= 0:
            raise ValueError(f"data.max_prompt_length={max_prompt_length}: must be positive")
        if apply_chat_template and not getattr(processor, "chat_template", None):
            raise ValueError("data.apply_chat_template=True but the processor has no chat template")
        self.processor = processor
        self.max_prompt_length = max_prompt_length
        self.truncation = truncation
        self.apply_chat_template = apply_chat_template
        # Qwen3.5's template thinks unless told not to; the others have no such variable (passing it anyway makes
        # transformers warn on every row and hand it to the processor).
        template = str(getattr(processor, "chat_template", "") or "")
        self._template_kwargs = {"enable_thinking": False} if "enable_thinking" in template else {}
        tokenizer = processor.tokenizer
        self._image_pad_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        # The chat template closes the assistant turn with <|im_end|>; plain prompts end with the tokenizer's eos.
        self._end_id = tokenizer.convert_tokens_to_ids(TURN_END) if apply_chat_template else tokenizer.eos_token_id
        if self._end_id is None or self._end_id == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {TURN_END if apply_chat_template else 'eos'} token")
        self._merge_length = processor.image_processor.merge_size ** 2
        self._video_pad_id = tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)
        self._vision_ids = (tokenizer.convert_tokens_to_ids(VISION_START), tokenizer.convert_tokens_to_ids(VISION_END))
        self.video_config = video_config  # data/video.py VideoConfig; None: rows with videos are refused

    def _tokens(self, text: str) -> list[int]:
        return self.processor.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _render_prompt(self, question: str, choices: list[str], n_images: int, n_videos: int = 0) -> str:
        """The prompt as text, one <|image_pad|> per image and one <|video_pad|> per video (the processor's
        convention before expansion), images first."""
        if not self.apply_chat_template:
            return PLAIN_IMAGE * n_images + PLAIN_VIDEO * n_videos + user_text(question, choices)
        content = ([{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
                   + [{"type": "text", "text": user_text(question, choices)}])
        return self.processor.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True,
            **self._template_kwargs)

    def _check_prefix(self, question: str, choices: list[str], n_images: int, target: str, source: str,
                      n_videos: int = 0) -> None:
        """The generation prompt + target + <|im_end|> must be exactly how the template renders the conversation."""
        prompt = self._render_prompt(question, choices, n_images, n_videos)
        content = ([{"type": "image"}] * n_images + [{"type": "video"}] * n_videos
                   + [{"type": "text", "text": user_text(question, choices)}])
        full = self.processor.apply_chat_template(
            [{"role": "user", "content": content}, {"role": "assistant", "content": target}], tokenize=False,
            **self._template_kwargs)
        if not full.startswith(prompt + target + TURN_END):
            raise ValueError(f"{source}: the chat template does not render the assistant turn as generation prompt "
                             f"+ answer + {TURN_END}; cannot place answer-only labels")

    def _prompt_ids(self, question: str, choices: list[str], vision: Vision, source: str) -> list[int]:
        """Prompt token ids with each image's <|image_pad|> repeated grid t*h*w / merge**2 times and each video's
        <|video_pad|> replaced by its expansion (vision.videos), as the stock processor replaces them."""
        prompt = self._render_prompt(question, choices, len(vision.images), len(vision.videos))
        ids = self._tokens(prompt)
        for token, token_id, expansions, what in ((IMAGE_TOKEN, self._image_pad_id, vision.images, "images"),
                                                  (VIDEO_TOKEN, self._video_pad_id, vision.videos, "videos")):
            found = sum(t == token_id for t in ids)
            if found != len(expansions):
                raise ValueError(f"{source}: prompt holds {found} {token} tokens for {len(expansions)} {what} "
                                 f"(does the question contain {token}?)")
        queues = {self._image_pad_id: iter(vision.images), self._video_pad_id: iter(vision.videos)}
        expanded = []
        for t in ids:
            expanded += next(queues[t]) if t in queues else [t]
        return expanded

    def _too_long(self, source: str, length: int, n_image_tokens: int, why: str) -> PromptTooLong:
        return PromptTooLong(
            f"{source}: prompt is {length} tokens ({n_image_tokens} image tokens), over max_prompt_length "
            f"{self.max_prompt_length}; {why}")

    def _fit(self, example, vision: Vision) -> tuple[list[int], str]:
        """The prompt ids and the (possibly cut) question, cutting question tokens from the end until it fits."""
        question, choices, source = example.question, list(example.choices), example.source
        ids = self._prompt_ids(question, choices, vision, source)
        if len(ids) <= self.max_prompt_length:
            return ids, question
        if self.truncation == "error":
            raise self._too_long(source, len(ids), vision.tokens, "data.truncation='error'")
        question_ids = self._tokens(question)
        keep = len(question_ids) - (len(ids) - self.max_prompt_length)
        while keep > 0:
            cut = self.processor.tokenizer.decode(question_ids[:keep]).rstrip("\ufffd")  # no half characters
            cut_ids = self._prompt_ids(cut, choices, vision, source)
            if len(cut_ids) <= self.max_prompt_length:
                return cut_ids, cut
            keep -= len(cut_ids) - self.max_prompt_length
        empty_ids = self._prompt_ids("", choices, vision, source)
        if len(empty_ids) <= self.max_prompt_length:
            return empty_ids, ""
        raise self._too_long(source, len(ids), vision.tokens,
                             f"even without the question it is {len(empty_ids)} tokens (images and choices); "
                             "raise data.max_prompt_length or lower data.max_pixels")

    def _process_images(self, example):
        """Patches and grids of the row's images. The processor resizes every image into its pixel budget (tiny
        images are scaled up to at least one merged patch); one it cannot take (an aspect ratio over 200) is
        named here with its size."""
        try:
            return self.processor.image_processor(images=list(example.images), return_tensors="pt")
        except ValueError as e:
            sizes = ", ".join(f"{getattr(image, 'width', '?')}x{getattr(image, 'height', '?')}"
                              for image in example.images)
            raise RowError(f"{example.source}: image(s) of {sizes} pixels (width x height) cannot be processed: "
                           f"{e}", "image") from None

    def _process_videos(self, example) -> list:
        """Each video of the row decoded, sampled and patchified (data/video.py); a RowError names a bad one."""
        videos = list(getattr(example, "videos", None) or [])
        if videos and self.video_config is None:
            raise RowError(f"{example.source}: the row holds videos but no video config was given", "video")
        from vlm_sft.data import video as video_lib  # PyAV only where rows hold videos
        return [video_lib.process(ref, self.video_config, example.source) for ref in videos]

    def _video_expansion(self, video) -> list[int]:
        """The tokens that replace one video's <|video_pad|>, as the family's stock processor writes them: all
        t*h*w / merge^2 pads (Qwen2.5-VL), or per frame group "<{t:.1f} seconds>" then the group's pads between
        <|vision_start|> and <|vision_end|> (Qwen3-VL; the template's own vision tokens stay around them)."""
        t, h, w = video.grid_thw
        if self.video_config.rule != "qwen3_vl":
            return [self._video_pad_id] * (t * h * w // self._merge_length)
        start, end = self._vision_ids
        group = [start] + [self._video_pad_id] * (h * w // self._merge_length) + [end]
        out = []
        for seconds in video.timestamps():
            out += self._tokens(f"<{seconds:.1f} seconds>") + group
        return out

    def __call__(self, example) -> Encoded:
        _check_example(example)
        choices = list(example.choices)
        if example.images:
            vision = self._process_images(example)
            image_grid_thw = torch.as_tensor(vision["image_grid_thw"], dtype=torch.long)
            pixel_values = torch.as_tensor(vision["pixel_values"], dtype=torch.float32)
        else:
            image_grid_thw = torch.zeros(0, 3, dtype=torch.long)
            pixel_values = torch.zeros(0, 0)
        videos = self._process_videos(example)
        n_pads = [int(t * h * w) // self._merge_length for t, h, w in image_grid_thw.tolist()]
        plan = Vision([[self._image_pad_id] * n for n in n_pads], [self._video_expansion(v) for v in videos])

        prompt_ids, question = self._fit(example, plan)
        answer_index = int(example.answer_index)
        target = choice_text(choices, answer_index)
        if self.apply_chat_template:
            self._check_prefix(question, choices, len(n_pads), target, example.source, len(videos))
        choice_targets = [
            torch.tensor(self._tokens(choice_text(choices, i)) + [self._end_id], dtype=torch.long)
            for i in range(len(choices))
        ]
        target_ids = choice_targets[answer_index]
        prompt = torch.tensor(prompt_ids, dtype=torch.long)
        if videos and not len(pixel_values):
            pixel_values = torch.zeros(0, videos[0].pixel_values.shape[1])
        return Encoded(
            input_ids=torch.cat([prompt, target_ids]),
            labels=torch.cat([torch.full_like(prompt, IGNORE_INDEX), target_ids]),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            prompt_length=len(prompt_ids),
            answer_index=answer_index,
            choice_targets=choice_targets,
            target_text=target,
            source=example.source,
            truncated=question != example.question,
            pixel_values_videos=torch.cat([v.pixel_values for v in videos]) if videos else None,
            video_grid_thw=torch.tensor([v.grid_thw for v in videos], dtype=torch.long).reshape(-1, 3),
            second_per_grid_ts=torch.tensor([v.second_per_grid for v in videos], dtype=torch.float32),
            video_stats=[{"duration": v.duration, "frames": len(v.indices), "size": v.size,
                          "indices": list(v.indices), "timestamps": v.timestamps()} for v in videos],
        )


@dataclasses.dataclass
class Vision:
    """The token expansion of each image's <|image_pad|> and each video's <|video_pad|>, in prompt order."""

    images: list[list[int]]
    videos: list[list[int]]

    @property
    def tokens(self) -> int:
        """Vision tokens in all (for messages)."""
        return sum(map(len, self.images)) + sum(map(len, self.videos))
