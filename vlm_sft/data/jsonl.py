"""Your own data as JSONL or JSON: one object per question, images as files beside it (or base64 inline).

The keys are the parquet ones (data.prompt_key / choice_key / answer_key / image_keys), and rows decode to the
same validated Example (robo2vlm.decode_row). An image value is a path (relative to the file that names it, or
absolute), a {"bytes": <base64>, "path": ...} object, or a list of either; every image of a row is kept, in
image_keys order.

JSONL is indexed once per process: the byte offset of every non-blank line (one pass over the file, nothing
parsed). Eager loading keeps the lines' raw bytes; lazy loading keeps only the offsets and seeks to a line when
it is read, so a shuffled, resumable order costs one read per row, never a pass over the file. Lines are parsed
when read, so a line that is not JSON is a bad row like any other (named by file and line number, skippable).
A .json file (a list of objects) has no line offsets to seek: it is parsed whole and held in memory, lazy or
not; hold large sets as .jsonl.
"""
from __future__ import annotations

import array
import base64
import binascii
import bisect
import dataclasses
import functools
import json
import os
from typing import Any, Sequence

import PIL.Image

from vlm_sft.data.robo2vlm import Example, decode_row, image_from_bytes
from vlm_sft.errors import RowError

SUFFIXES = (".jsonl", ".json")
_FIRST_ROWS_CHECKED = 100  # key check: the first object found within this many lines of each JSONL file


def read_json_list(path: str) -> list[dict]:
    """A .json data file: a list of objects, one per row. Anything else is a ValueError naming the file."""
    try:
        with open(path, "rb") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno}); a .json data "
                         "file holds one list of objects (for one object per line, name the file .jsonl)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: holds a JSON {type(data).__name__}, expected a list of objects (one per row)")
    for i, item in enumerate(data):
        if not isinstance(item, dict):
            raise ValueError(f"{path}: item [{i}] is a JSON {type(item).__name__}, expected a list of objects "
                             "(one per row)")
    return data


def index_lines(path: str, *, keep_lines: bool) -> tuple[Sequence[int], Sequence[int], list[bytes] | None]:
    """(byte offset, 1-based line number) of every non-blank line of a JSONL file, and the lines themselves when
    `keep_lines`. One buffered pass; nothing is parsed. Offsets are 8 bytes a row (5 MB for 678k rows)."""
    offsets, numbers, lines = array.array("q"), array.array("q"), [] if keep_lines else None
    position = 0
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                offsets.append(position)
                numbers.append(number)
                if lines is not None:
                    lines.append(line)
            position += len(line)
    return offsets, numbers, lines


def parse_line(line: bytes, source: str) -> dict:
    """One JSONL line -> its object; a RowError naming `source` (file:line) when it is not a JSON object."""
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        detail = (f"{e.msg.removesuffix(' at')} at column {e.colno}" if isinstance(e, json.JSONDecodeError)
                  else str(e))
        raise RowError(f"{source}: not valid JSON ({detail}): {line[:80]!r}", "json") from None
    if not isinstance(record, dict):
        raise RowError(f"{source}: a JSON {type(record).__name__}, expected an object with the data keys", "json")
    return record


def load_image(base_dir: str, value: Any, source: str, key: str) -> PIL.Image.Image:
    """One image value of a JSON row -> RGB image: a path (relative to `base_dir`, the folder of the file that
    names it, or absolute) or {"bytes": base64 or None, "path": ...}."""
    if isinstance(value, dict):
        data = value.get("bytes")
        if data is not None:
            if not isinstance(data, str):
                raise RowError(f"{source}: image bytes in key {key!r} are a JSON {type(data).__name__}, expected a "
                               "base64 string", "image")
            try:
                raw = base64.b64decode(data, validate=True)
            except (binascii.Error, ValueError) as e:
                raise RowError(f"{source}: image bytes in key {key!r} are not valid base64 ({e})", "image") from None
            return image_from_bytes(raw, source, f"in key {key!r} (base64)")
        value = value.get("path")
        if value is None:
            raise RowError(f"{source}: image in key {key!r} has neither bytes nor path", "image")
    if not isinstance(value, str) or not value:
        raise RowError(f"{source}: image in key {key!r} is {value!r:.100}, expected a file path, "
                       "{\"bytes\": <base64>, \"path\": ...} or a list of them", "image")
    path = value if os.path.isabs(value) else os.path.join(base_dir, value)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise RowError(f"{source}: image {value!r} in key {key!r} not found (looked for {path})", "image") from None
    except OSError as e:
        raise RowError(f"{source}: image {value!r} in key {key!r} cannot be read: {e}", "image") from None
    return image_from_bytes(raw, source, f"{value!r} in key {key!r}")


def check_keys(files: Sequence[str], *, prompt_key: str, choice_key: str, answer_key: str,
               image_keys: Sequence[str]) -> None:
    """Fail before any model loads when a file's first row lacks a configured key or a .json file is not a list
    of objects. Reads a JSONL file's first lines only (a .json file is parsed whole)."""
    if not image_keys:
        raise ValueError("data.image_keys is empty: a row needs at least one image key")
    keys = {"data.prompt_key": prompt_key, "data.choice_key": choice_key, "data.answer_key": answer_key}
    keys.update({f"data.image_keys[{i}]": k for i, k in enumerate(image_keys)})
    for path in files:
        first, where = _first_object(path)
        if first is None:
            continue  # no row to check: an empty file, or only bad lines (reported as bad rows)
        missing = [f"{k!r} ({field})" for field, k in keys.items() if k not in first]
        if missing:
            raise ValueError(f"{where}: missing key(s) {', '.join(missing)}; keys present: {sorted(first)}")


def _first_object(path: str) -> tuple[dict | None, str]:
    if path.endswith(".json"):
        rows = read_json_list(path)
        return (rows[0], f"{path}[0]") if rows else (None, path)
    try:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if number > _FIRST_ROWS_CHECKED:
                    break
                if line.strip():
                    try:
                        record = parse_line(line, f"{path}:{number}")
                    except RowError:
                        continue
                    return record, f"{path}:{number}"
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e})") from None
    return None, path


def in_memory_bytes(files: Sequence[str]) -> int:
    """Bytes eager loading holds: the files' sizes (JSONL lines are kept as read; a .json file is held parsed,
    which takes about as much for image paths and base64 strings)."""
    return sum(os.path.getsize(f) for f in files)


@dataclasses.dataclass
class _FileRows:
    """What a source holds of one file: a .json file's objects, or a JSONL file's line index (and, eager, its
    lines)."""

    objects: list[dict] | None = None   # .json
    offsets: Sequence[int] | None = None  # .jsonl: byte offset of each row's line
    numbers: Sequence[int] | None = None  # .jsonl: its 1-based line number
    lines: list[bytes] | None = None    # .jsonl, eager: its raw bytes

    @classmethod
    def read(cls, path: str, *, lazy: bool) -> "_FileRows":
        if path.endswith(".json"):
            return cls(objects=read_json_list(path))
        offsets, numbers, lines = index_lines(path, keep_lines=not lazy)
        return cls(offsets=offsets, numbers=numbers, lines=lines)

    def __len__(self) -> int:
        return len(self.objects) if self.objects is not None else len(self.offsets)


class JsonlSource:
    """Random access to the rows of .jsonl / .json files, in file order (the Robo2VLMSource interface).

    Row names: "file.jsonl:<line number>" (1-based, as editors count) and "file.json[<index>]". Picklable for
    DataLoader workers: open files are not pickled; each process reopens them.
    """

    def __init__(self, files: Sequence[str], *, prompt_key: str = "question", choice_key: str = "choices",
                 answer_key: str = "correct_answer", image_keys: Sequence[str] = ("image",), lazy: bool = False):
        if not files:
            raise ValueError("JsonlSource needs at least one .jsonl or .json file")
        self.files = list(files)
        self.keys = dict(prompt_key=prompt_key, choice_key=choice_key, answer_key=answer_key,
                         image_keys=list(image_keys))
        self.lazy = lazy
        self._tables = [_FileRows.read(path, lazy=lazy) for path in self.files]
        sizes = [len(t) for t in self._tables]
        self._file_starts = [sum(sizes[:i]) for i in range(len(sizes))]
        self._num_rows = sum(sizes)
        self._decoders = [functools.partial(load_image, os.path.dirname(os.path.abspath(p))) for p in self.files]
        self._init_process_state()

    def _init_process_state(self) -> None:
        self._pid = os.getpid()
        self._handles: dict[int, Any] = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        del state["_pid"], state["_handles"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_process_state()

    def __len__(self) -> int:
        return self._num_rows

    def row_groups(self) -> None:
        """None: rows are read one by one (no blocks to keep together), so a lazy epoch is a full shuffle."""
        return None

    def _locate(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self._num_rows:
            raise IndexError(f"row {i} out of range for {self._num_rows} rows")
        f = bisect.bisect_right(self._file_starts, int(i)) - 1
        return f, int(i) - self._file_starts[f]

    def _name(self, f: int, row: int) -> str:
        if self._tables[f].objects is not None:
            return f"{self.files[f]}[{row}]"
        return f"{self.files[f]}:{self._tables[f].numbers[row]}"

    def source_of(self, i: int) -> str:
        """"<file>:<line>" (JSONL) or "<file>[<index>]" (JSON) of global row i."""
        return self._name(*self._locate(i))

    def _line(self, f: int, row: int) -> bytes:
        table = self._tables[f]
        if table.lines is not None:
            return table.lines[row]
        if os.getpid() != self._pid:  # forked: never share file handles with the parent
            self._init_process_state()
        handle = self._handles.get(f)
        if handle is None:
            handle = self._handles[f] = open(self.files[f], "rb")
        handle.seek(table.offsets[row])
        return handle.readline()

    def record(self, i: int) -> dict:
        """Global row i as its JSON object (images not read)."""
        f, row = self._locate(i)
        if self._tables[f].objects is not None:
            return self._tables[f].objects[row]
        return parse_line(self._line(f, row), self._name(f, row))

    def __getitem__(self, i: int) -> Example:
        f, row = self._locate(i)
        return decode_row(self.record(i), self._name(f, row), **self.keys, decode_image=self._decoders[f])
