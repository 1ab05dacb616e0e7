"""Which reader a data path list needs: parquet (Robo2VLM layout) or JSON (.jsonl / .json), chosen by extension.

The train/test split by file name works the same for every format (robo2vlm.find_files). One path list is one
format: parquet beside JSON files is refused, naming one file of each, rather than silently reading half of it.
"""
from __future__ import annotations

from typing import Any, Sequence

from vlm_sft.data import jsonl, robo2vlm

PARQUET = ".parquet"
SUFFIXES = (PARQUET, *jsonl.SUFFIXES)
Source = robo2vlm.Robo2VLMSource | jsonl.JsonlSource  # len(s), s[i] -> Example, s.source_of(i), s.row_groups()


def is_parquet(files: Sequence[str]) -> bool:
    return bool(files) and files[0].endswith(PARQUET)


def format_name(files: Sequence[str]) -> str:
    """"parquet" or "JSON" (for messages)."""
    return "parquet" if is_parquet(files) else "JSON"


def find_data_files(paths: str | Sequence[str], split: str) -> list[str]:
    """The .parquet, .jsonl or .json files of `split` under the given files / folders (see find_parquet_files)."""
    files = robo2vlm.find_files(paths, split, SUFFIXES)
    parquet = [f for f in files if f.endswith(PARQUET)]
    other = [f for f in files if not f.endswith(PARQUET)]
    if parquet and other:
        raise ValueError(f"{parquet[0]} and {other[0]}: parquet and JSON files in one path list; point the path "
                         "at one kind (move or name the files of the other)")
    return files


def check_files(files: Sequence[str], **keys: Any) -> None:
    """The configured keys exist in every file (parquet footers; a JSON file's first row), before any model loads."""
    if is_parquet(files):
        robo2vlm.check_schema(files, **keys)
    else:
        jsonl.check_keys(files, **keys)


def make_source(files: Sequence[str], *, lazy: bool, **keys: Any) -> Source:
    """Random access to the rows of `files` (len, [i] -> Example, source_of(i), row_groups())."""
    if is_parquet(files):
        return robo2vlm.Robo2VLMSource(files, **keys, lazy=lazy)
    return jsonl.JsonlSource(files, **keys, lazy=lazy)


def held_in_memory(files: Sequence[str], *, lazy: bool) -> list[str]:
    """The files whose rows a process holds in memory: all when eager; when lazy, the .json lists (no line
    offsets to seek; see jsonl.py)."""
    return [f for f in files if not lazy or f.endswith(".json")]


def in_memory_bytes(files: Sequence[str], **keys: Any) -> int:
    """Bytes that eager loading of `files` (train and eval may differ in format) holds in each process."""
    parquet = [f for f in files if f.endswith(PARQUET)]
    other = [f for f in files if not f.endswith(PARQUET)]
    return (robo2vlm.in_memory_bytes(parquet, **keys) if parquet else 0) + jsonl.in_memory_bytes(other)
