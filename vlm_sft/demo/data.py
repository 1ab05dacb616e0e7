"""Data shaped like what users really have: Robo2VLM-1's parquet download and JSONL/JSON with image files.

The answer is the colour filling the whole image, so a tiny model learns it in minutes; images are real PNG/JPEG
bytes. Bad rows of each kind can be planted to test how the readers report them.
"""
import base64
import io
import json
import os
import pathlib
import random
from typing import Sequence

import numpy as np
import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq


COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 200),
    "yellow": (220, 200, 40),
}

QUESTION_TEMPLATES = (
    "What colour is the surface the robot gripper is touching?",
    "In the image from the wrist camera, what is the colour of the object in front of the gripper?",
    "The robot is about to grasp an object. Which colour best describes the scene?",
    "What colour is the workspace shown in this camera view?",
)

# The `huggingface` schema metadata that `datasets.push_to_hub` writes into each Robo2VLM-1 parquet file.
_HF_FEATURES = {
    "id": {"dtype": "string", "_type": "Value"},
    "question": {"dtype": "string", "_type": "Value"},
    "choices": {"dtype": "string", "_type": "Value"},
    "correct_answer": {"dtype": "int64", "_type": "Value"},
    "image": {"_type": "Image"},
}

BAD_ROW_KINDS = ("image", "answer", "choices")


def _colour_image(rng: random.Random, nprng: np.random.Generator, colour: str, size: tuple[int, int]
                  ) -> PIL.Image.Image:
    """The whole image is one colour with mild noise and a soft gradient, so the answer is visible everywhere."""
    width, height = size
    base = np.array(COLOURS[colour], dtype=np.float32)
    noise = nprng.normal(0.0, 12.0, size=(height, width, 3))
    shade = np.linspace(-15.0, 15.0, width, dtype=np.float32)[None, :, None] * rng.choice((-1.0, 1.0))
    pixels = np.clip(base + noise + shade, 0, 255).astype(np.uint8)
    return PIL.Image.fromarray(pixels, mode="RGB")


def _encode_image(image: PIL.Image.Image, image_format: str) -> bytes:
    buffer = io.BytesIO()
    if image_format == "JPEG":
        image.save(buffer, format="JPEG", quality=90)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


def _robo2vlm_rows(split: str, n: int, *, image_format: str, choices_as_string: bool,
                   image_size: tuple[int, int], rng: random.Random, nprng: np.random.Generator,
                   bad_rows: dict[int, str], fixed_choices: bool = False) -> list[dict]:
    rows = []
    for i in range(n):
        answer = rng.choice(sorted(COLOURS))
        if fixed_choices:  # every colour, always in the same order: the letter follows from the colour
            choices = sorted(COLOURS)
        else:
            distractors = rng.sample([c for c in sorted(COLOURS) if c != answer], rng.randint(1, len(COLOURS) - 1))
            choices = [answer] + distractors
            rng.shuffle(choices)
        fmt = image_format if image_format != "mixed" else ("PNG", "JPEG")[i % 2]
        image_bytes = _encode_image(_colour_image(rng, nprng, answer, image_size), fmt)
        row = {
            "id": f"{split}_{rng.getrandbits(48):012x}",
            "question": rng.choice(QUESTION_TEMPLATES),
            "choices": repr(choices) if choices_as_string else choices,
            "correct_answer": choices.index(answer),
            "image": {"bytes": image_bytes, "path": None},
        }
        bad = bad_rows.get(i) if split == "train" else None
        if bad == "image":
            row["image"] = {"bytes": b"\x89PNG\r\n\x1a\n this is not an image", "path": None}
        elif bad == "answer":
            row["correct_answer"] = len(choices)
        elif bad == "choices":
            row["choices"] = repr(choices)[:-1] if choices_as_string else []
        rows.append(row)
    return rows


def make_robo2vlm_dir(
    path: str | os.PathLike,
    *,
    n_train: int = 64,
    n_test: int = 16,
    train_files: int = 2,
    test_files: int = 1,
    rows_per_group: int = 8,
    image_format: str = "PNG",
    choices_as_string: bool = True,
    image_size: tuple[int, int] = (64, 48),
    seed: int = 0,
    bad_rows: dict[int, str] | None = None,
    fixed_choices: bool = False,
) -> pathlib.Path:
    """Writes Robo2VLM-1-shaped parquet (train-*.parquet and test-*.parquet in ONE folder, like the download).

    The answer is the colour filling the whole image, so a tiny model can learn it in minutes. `bad_rows` maps a
    train row index (counted over all train files) to "image" (undecodable bytes), "answer" (correct_answer out of
    range) or "choices" (an unparsable choices string; an empty list when not `choices_as_string`).
    `image_size` is (width, height). `fixed_choices`: every row offers all colours in one fixed order (the demo
    uses it so that the generated letter, not only the colour, is learnable in a couple of minutes).
    """
    if image_format not in ("PNG", "JPEG", "mixed"):
        raise ValueError(f"image_format={image_format!r}: expected 'PNG', 'JPEG' or 'mixed'")
    bad_rows = dict(bad_rows or {})
    for row, kind in bad_rows.items():
        if kind not in BAD_ROW_KINDS or not 0 <= row < n_train:
            raise ValueError(f"bad_rows[{row}]={kind!r}: expected a train row in [0, {n_train}) mapped to one of "
                             f"{BAD_ROW_KINDS}")
    if train_files < 1 or test_files < 1 or n_train < train_files or n_test < test_files:
        raise ValueError(f"need at least one row per file: n_train={n_train}, train_files={train_files}, "
                         f"n_test={n_test}, test_files={test_files}")
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)

    choices_type = pa.string() if choices_as_string else pa.list_(pa.string())
    features = dict(_HF_FEATURES)
    if not choices_as_string:
        features["choices"] = {"feature": {"dtype": "string", "_type": "Value"}, "_type": "Sequence"}
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("question", pa.string()),
            ("choices", choices_type),
            ("correct_answer", pa.int64()),
            ("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
        ],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )
    for split, n, n_files in (("train", n_train, train_files), ("test", n_test, test_files)):
        rows = _robo2vlm_rows(split, n, image_format=image_format, choices_as_string=choices_as_string,
                              fixed_choices=fixed_choices,
                              image_size=image_size, rng=rng, nprng=nprng, bad_rows=bad_rows)
        bounds = np.linspace(0, n, n_files + 1).round().astype(int)
        for f in range(n_files):
            table = pa.Table.from_pylist(rows[bounds[f]:bounds[f + 1]], schema=schema)
            pq.write_table(table, path / f"{split}-{f:05d}-of-{n_files:05d}.parquet", row_group_size=rows_per_group)
    return path



# Your own data: JSONL / JSON with image files ---------------------------------------------------------------------

JSON_BAD_ROW_KINDS = ("image", "answer", "choices", "missing_image", "no_image", "json", "long")


def make_json_dir(
    path: str | os.PathLike,
    *,
    file_format: str = "jsonl",
    images: str = "paths",
    n_train: int = 64,
    n_test: int = 16,
    train_files: int = 2,
    test_files: int = 1,
    image_size: tuple[int, int] = (64, 48),
    seed: int = 0,
    bad_rows: dict[int, str] | None = None,
    fixed_choices: bool = False,
    images_per_row: Sequence[int] = (1,),
) -> pathlib.Path:
    """Writes a folder as users lay out their own data: train-*.jsonl / test-*.jsonl (or .json lists) with the
    Robo2VLM keys, images as PNG files under images/ named by relative paths (`images="paths"`) or inline as
    {"bytes": <base64>, "path": ...} (`images="base64"`).

    With the same seed and sizes the rows are exactly make_robo2vlm_dir's (PNG images): the same questions,
    choices (as JSON lists), answers and image bytes, so the formats can be held against each other.
    `images_per_row` cycles over rows: a row with k > 1 images holds a list under "image" whose first image is
    the answer's colour and the others other colours (so image order matters). `bad_rows` maps a train row to
    "image" (undecodable), "answer" (out of range), "choices" (unparsable), "missing_image" (a path that does not
    exist), "no_image" (an empty image list), "json" (a line that is not JSON; JSONL only) or "long" (a question
    of ~2,000 tokens).
    """
    if file_format not in ("jsonl", "json") or images not in ("paths", "base64"):
        raise ValueError(f"file_format={file_format!r}, images={images!r}: expected 'jsonl' or 'json', and "
                         "'paths' or 'base64'")
    bad_rows = dict(bad_rows or {})
    for row, kind in bad_rows.items():
        if kind not in JSON_BAD_ROW_KINDS or not 0 <= row < n_train or (kind == "json" and file_format == "json"):
            raise ValueError(f"bad_rows[{row}]={kind!r}: expected a train row in [0, {n_train}) mapped to one of "
                             f"{JSON_BAD_ROW_KINDS} ('json' only with file_format='jsonl')")
    if not images_per_row or min(images_per_row) < 1:
        raise ValueError(f"images_per_row={images_per_row!r}: expected positive counts")
    path = pathlib.Path(path)
    (path / "images").mkdir(parents=True, exist_ok=True)
    rng, nprng = random.Random(seed), np.random.default_rng(seed)
    extra_rng, extra_nprng = random.Random(seed + 1), np.random.default_rng(seed + 1)  # never shift the base rows
    base_bad = {i: k for i, k in bad_rows.items() if k in BAD_ROW_KINDS}
    for split, n, n_files in (("train", n_train, train_files), ("test", n_test, test_files)):
        rows = _robo2vlm_rows(split, n, image_format="PNG", choices_as_string=False, fixed_choices=fixed_choices,
                              image_size=image_size, rng=rng, nprng=nprng, bad_rows=base_bad)
        records = []
        for i, row in enumerate(rows):
            kind = bad_rows.get(i) if split == "train" else None
            image_bytes = [row["image"]["bytes"]]
            answer_colour = row["choices"][row["correct_answer"]] if kind not in ("answer", "choices") else None
            for _ in range(images_per_row[i % len(images_per_row)] - 1):
                colour = extra_rng.choice([c for c in sorted(COLOURS) if c != answer_colour])
                image_bytes.append(_encode_image(_colour_image(extra_rng, extra_nprng, colour, image_size), "PNG"))
            names = [f"images/{split}-{i:05d}-{k}.png" for k in range(len(image_bytes))]
            if images == "paths":
                for name, data in zip(names, image_bytes):
                    (path / name).write_bytes(data)
                values = list(names)
            else:
                values = [{"bytes": base64.b64encode(data).decode("ascii"), "path": name}
                          for name, data in zip(names, image_bytes)]
            if kind == "missing_image":
                values[0] = f"images/missing-{i:05d}.png" if images == "paths" else {
                    "bytes": None, "path": f"images/missing-{i:05d}.png"}
            record = {"id": row["id"], "question": row["question"], "choices": row["choices"],
                      "correct_answer": row["correct_answer"],
                      "image": values if len(values) > 1 or kind == "no_image" else values[0]}
            if kind == "no_image":
                record["image"] = []
            elif kind == "long":
                record["question"] = (row["question"] + " ") * 150
            records.append((record, kind))
        bounds = np.linspace(0, n, n_files + 1).round().astype(int)
        for f in range(n_files):
            part = records[bounds[f]:bounds[f + 1]]
            target = path / f"{split}-{f:05d}-of-{n_files:05d}.{file_format}"
            if file_format == "json":
                target.write_text(json.dumps([r for r, _ in part], indent=1))
            else:
                lines = [json.dumps(r)[:-7] if kind == "json" else json.dumps(r) for r, kind in part]
                target.write_text("\n".join(lines) + "\n")
    return path
