"""Robo2VLM parquet: file discovery, schema check, row decoding and a random-access table of rows.

The Hub download keeps train-*.parquet and test-*.parquet in ONE folder; RLinf loads the whole folder, so its users
split files by hand. Here one folder serves both splits by file name. Rows are validated when decoded: a bad answer
or image raises a RowError naming the file and row instead of being guessed (RLinf maps unknown letters to "A").
"""
from __future__ import annotations

import ast
import bisect
import collections
import dataclasses
import io
import os
import re
from typing import Any, Callable, Sequence

import PIL.Image
import pyarrow as pa
import pyarrow.parquet as pq

from vlm_sft.errors import RowError

# File or folder names that mark a split, Hub style ("train-00000-of-00262.parquet", "test/", "validation-0...").
# Every evaluation-like name belongs to the "test" split: this trainer has one held-out split.
_SPLIT_NAMES = {"train": "train", "test": "test", "validation": "test", "valid": "test", "val": "test",
                "eval": "test", "dev": "test"}
_SPLIT_RE = re.compile(r"^(train|test|validation|valid|val|eval|dev)(?:[-_.]|$)", re.IGNORECASE)
_ANSWER_LETTER_RE = re.compile(r"^\(?([A-Za-z])[.):]?$")


@dataclasses.dataclass
class Example:
    source: str            # "<file>:<row index within file>", for error messages
    id: str
    question: str
    choices: list[str]
    answer_index: int      # 0-based
    images: list[PIL.Image.Image]  # RGB, decoded


def _split_of(relpath: str) -> str | None:
    """The split a file's name (or failing that, its nearest folder name) marks, or None."""
    for part in reversed(relpath.replace(os.sep, "/").split("/")):
        m = _SPLIT_RE.match(part)
        if m:
            return _SPLIT_NAMES[m.group(1).lower()]
    return None


def _as_path_list(paths: str | Sequence[str]) -> list[str]:
    items = [paths] if isinstance(paths, str) else list(paths)
    return [p.strip() for item in items for p in str(item).split(",") if p.strip()]


def find_parquet_files(paths: str | Sequence[str], split: str) -> list[str]:
    """Parquet files of `split` ("train" or "test") under a file, a folder, or a comma-separated list of them.

    A folder is searched recursively in sorted order. When any of its files is split-named (train-*, test-*,
    validation-*, eval-*, ... or under such a folder), only the files of `split` are taken; a folder with no
    split-named file was split by hand and gives all its files to either split. A named file is always taken.
    """
    return find_files(paths, split, (".parquet",))


def find_files(paths: str | Sequence[str], split: str, suffixes: Sequence[str]) -> list[str]:
    """Files ending in one of `suffixes` of `split`, found as find_parquet_files describes."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path_list = _as_path_list(paths)
    if not path_list:
        raise ValueError(f"no data path given for split {split!r}")
    suffixes = tuple(suffixes)
    kinds = ", ".join(s.lstrip(".") for s in suffixes)
    files: dict[str, None] = {}  # ordered set: a file named twice is read once
    for path in path_list:
        if os.path.isfile(path):
            if not path.endswith(suffixes):
                raise ValueError(f"{path}: only {' / '.join(suffixes)} files are supported")
            files[path] = None
        elif os.path.isdir(path):
            found = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                found += [os.path.join(root, n) for n in sorted(names) if n.endswith(suffixes)]
            splits = [_split_of(os.path.relpath(f, path)) for f in found]
            if any(s is not None for s in splits):
                found = [f for f, s in zip(found, splits) if s == split]
            files.update(dict.fromkeys(found))
        else:
            raise ValueError(f"{path}: no such file or folder (split {split!r})")
    if not files:
        example = f"{split}-*.{suffixes[0].lstrip('.')}"
        raise ValueError(f"no {split!r} {kinds} files found in {', '.join(path_list)} "
                         f"(a folder with split-named files gives {example} to split {split!r})")
    return list(files)


def _needed_columns(names: Sequence[str], prompt_key: str, choice_key: str, answer_key: str,
                    image_keys: Sequence[str]) -> list[str]:
    cols = (["id"] if "id" in names else []) + [prompt_key, choice_key, answer_key, *image_keys]
    return list(dict.fromkeys(cols))


def check_schema(files: Sequence[str], *, prompt_key: str, choice_key: str, answer_key: str,
                 image_keys: Sequence[str]) -> None:
    """Fail before any model loads when a file lacks a configured column (reads only parquet footers)."""
    if not image_keys:
        raise ValueError("data.image_keys is empty: a Robo2VLM row needs at least one image column")
    for f in files:
        try:
            names = pq.read_schema(f).names
        except (OSError, pa.ArrowException) as e:
            raise ValueError(f"{f}: not a readable parquet file ({e})") from e
        keys = {"data.prompt_key": prompt_key, "data.choice_key": choice_key, "data.answer_key": answer_key}
        keys.update({f"data.image_keys[{i}]": k for i, k in enumerate(image_keys)})
        missing = [f"{col!r} ({field})" for field, col in keys.items() if col not in names]
        if missing:
            raise ValueError(f"{f}: missing column(s) {', '.join(missing)}; columns present: {names}")


def in_memory_bytes(files: Sequence[str], *, prompt_key: str, choice_key: str, answer_key: str,
                    image_keys: Sequence[str]) -> int:
    """Bytes that eager loading holds for `files`: the uncompressed size of the columns it reads (images still
    encoded), summed from the parquet footers without reading any data."""
    total = 0
    for f in files:
        meta = pq.read_metadata(f)
        needed = set(_needed_columns(meta.schema.names, prompt_key, choice_key, answer_key, image_keys))
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                column = group.column(c)
                if column.path_in_schema.split(".")[0] in needed:  # "image.bytes" belongs to column "image"
                    total += column.total_uncompressed_size
    return total


def _parse_choices(value: Any, source: str, key: str) -> list[str]:
    choices = value
    if isinstance(value, str):
        try:
            choices = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            raise RowError(f"{source}: unparsable choices in column {key!r}: {value!r:.200} "
                           f"(expected a list of strings or its Python literal)", "choices") from None
    if isinstance(choices, tuple):
        choices = list(choices)
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
        raise RowError(f"{source}: unparsable choices in column {key!r}: {value!r:.200} "
                       f"(expected a non-empty list of strings)", "choices")
    return choices


def _parse_answer(value: Any, num_choices: int, source: str, key: str) -> int:
    """A 0-based index, or a letter "A"/"b"/"C." naming a choice; anything else is an error, never "A"."""
    index = None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        index = value
    elif isinstance(value, str):
        m = _ANSWER_LETTER_RE.match(value.strip())
        if m is None:
            raise RowError(f"{source}: unparsable answer {value!r} in column {key!r} "
                           f"(expected a 0-based index or a letter A-{chr(64 + min(num_choices, 26))})",
                           "answer")
        index = ord(m.group(1).upper()) - ord("A")
    if index is None:
        raise RowError(f"{source}: unparsable answer {value!r} in column {key!r} "
                       f"(expected a 0-based index or a letter)", "answer")
    if not 0 <= index < num_choices:
        raise RowError(f"{source}: answer {value!r} in column {key!r} is out of range for {num_choices} choices",
                       "answer")
    return index


def _decode_image(value: Any, source: str, key: str) -> PIL.Image.Image:
    data = value
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is None:
            raise RowError(f"{source}: image in column {key!r} has no bytes (path={value.get('path')!r}); "
                           f"images must be embedded in the parquet file", "image")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise RowError(f"{source}: image in column {key!r} is {type(data).__name__}, "
                       f"expected {{bytes, path}} or raw image bytes", "image")
    return image_from_bytes(data, source, f"in column {key!r}")


def image_from_bytes(data: bytes | bytearray | memoryview, source: str, where: str) -> PIL.Image.Image:
    """Encoded image bytes -> RGB image; a RowError naming the row and `where` ("in column 'image'") if not."""
    try:
        img = PIL.Image.open(io.BytesIO(data))
        img.load()
        return img.convert("RGB")
    except PIL.UnidentifiedImageError:
        raise RowError(f"{source}: undecodable image {where} ({len(data)} bytes): not an image format PIL reads",
                       "image") from None
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, DecompressionBombError, ...)
        raise RowError(f"{source}: undecodable image {where} ({len(data)} bytes): {type(e).__name__}: {e}",
                       "image") from None


def decode_row(record: dict, source: str, *, prompt_key: str = "question", choice_key: str = "choices",
               answer_key: str = "correct_answer", image_keys: Sequence[str] = ("image",),
               decode_image: Callable[[Any, str, str], PIL.Image.Image] = _decode_image) -> Example:
    """One row (as a dict) -> a validated Example with decoded RGB images, in image_keys order (a key may hold a
    list of images). `decode_image(value, source, key)` turns one image value into an image: parquet's
    {bytes, path} by default; the JSON sources pass one that also reads files and base64."""
    question = record.get(prompt_key)
    if not isinstance(question, str):
        raise RowError(f"{source}: question in column {prompt_key!r} is {question!r:.100}, expected a string",
                       "question")
    choices = _parse_choices(record.get(choice_key), source, choice_key)
    answer_index = _parse_answer(record.get(answer_key), len(choices), source, answer_key)
    images = []
    for key in image_keys:
        value = record.get(key)
        values = value if isinstance(value, list) else [value]
        if value is None or not values:
            raise RowError(f"{source}: missing image in column {key!r}", "image")
        for v in values:
            if v is None:
                raise RowError(f"{source}: missing image in column {key!r}", "image")
            images.append(decode_image(v, source, key))
    row_id = record.get("id")
    return Example(source=source, id=source if row_id is None else str(row_id), question=question,
                   choices=choices, answer_index=answer_index, images=images)


class Robo2VLMSource:
    """Random access to the rows of several parquet files, in file order.

    Eager: every file's needed columns are read up front (images stay encoded until accessed). Lazy: only footers
    are read up front, and a row's whole row group is read on access; the last `cache_size` row groups are kept,
    so reading in row-group blocks (see loader.epoch_order) reads each group once. Picklable for DataLoader
    workers: open files are not pickled; each process reopens them.
    """

    def __init__(self, files: Sequence[str], *, prompt_key: str = "question", choice_key: str = "choices",
                 answer_key: str = "correct_answer", image_keys: Sequence[str] = ("image",), lazy: bool = False,
                 cache_size: int = 2):
        if not files:
            raise ValueError("Robo2VLMSource needs at least one parquet file")
        self.files = list(files)
        self.keys = dict(prompt_key=prompt_key, choice_key=choice_key, answer_key=answer_key,
                         image_keys=list(image_keys))
        self.lazy = lazy
        self.cache_size = cache_size
        self._columns: list[list[str]] = []
        self._groups: list[tuple[int, int]] = []  # (file index, row group index) in global order
        group_sizes, file_rows = [], []
        for f in self.files:
            meta = pq.read_metadata(f)
            self._columns.append(_needed_columns(meta.schema.names, **self.keys))
            for g in range(meta.num_row_groups):
                self._groups.append((len(file_rows), g))
                group_sizes.append(meta.row_group(g).num_rows)
            file_rows.append(meta.num_rows)
        self._group_sizes = group_sizes
        self._group_starts = _starts(group_sizes)
        self._file_starts = _starts(file_rows)
        self._num_rows = sum(file_rows)
        self._tables = None
        if not lazy:
            self._tables = [pq.read_table(f, columns=cols) for f, cols in zip(self.files, self._columns)]
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[int, pq.ParquetFile] = {}
        self._cache: collections.OrderedDict[int, pa.Table] = collections.OrderedDict()

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for k in ("_pid", "_handles", "_cache"):
            del state[k]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def __len__(self) -> int:
        return self._num_rows

    def row_groups(self) -> list[int]:
        """Sizes of the row groups in global row order (for block shuffling)."""
        return list(self._group_sizes)

    def source_of(self, i: int) -> str:
        """"<file>:<row within file>" of global row i."""
        i = self._check_index(i)
        f = bisect.bisect_right(self._file_starts, i) - 1
        return f"{self.files[f]}:{i - self._file_starts[f]}"

    def _check_index(self, i: int) -> int:
        if not 0 <= i < self._num_rows:
            raise IndexError(f"row {i} out of range for {self._num_rows} rows")
        return int(i)

    def _group_table(self, g: int) -> pa.Table:
        if os.getpid() != self._pid:  # forked: never share file handles with the parent
            self._init_process_state()
        table = self._cache.get(g)
        if table is None:
            f, group = self._groups[g]
            handle = self._handles.get(f)
            if handle is None:
                handle = self._handles[f] = pq.ParquetFile(self.files[f])
            table = handle.read_row_group(group, columns=self._columns[f])
            self._cache[g] = table
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(g)
        return table

    def record(self, i: int) -> dict:
        """Global row i as a dict of its needed columns (nothing decoded)."""
        i = self._check_index(i)
        if self._tables is not None:
            f = bisect.bisect_right(self._file_starts, i) - 1
            table, row = self._tables[f], i - self._file_starts[f]
        else:
            g = bisect.bisect_right(self._group_starts, i) - 1
            table, row = self._group_table(g), i - self._group_starts[g]
        return table.slice(row, 1).to_pylist()[0]

    def __getitem__(self, i: int) -> Example:
        return decode_row(self.record(i), self.source_of(i), **self.keys)


def _starts(sizes: Sequence[int]) -> list[int]:
    starts, total = [], 0
    for s in sizes:
        starts.append(total)
        total += s
    return starts
