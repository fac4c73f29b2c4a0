"""Reading a node's own data files into in-memory `datasets.Dataset` tables, offline.

`[data] path` (and `eval_path`) may name one file (.jsonl/.json, .csv, .parquet), a folder of such
files (read in name order, not recursively), or a folder written by `Dataset.save_to_disk` (a
`DatasetDict` folder gives its "train" split). What a table must contain is the format's business
(fednode.learning.local_data); here a file that cannot be read, is empty, or pushes the total over
`data.max_rows` is a DataError naming the file (and, for a JSON line that does not parse, the row).

CSV cells are read as strings (a CSV has no other types; an empty cell is ""), so a CSV label 3
matches labels = ["3"], and a chat's messages cell holds the turns as a JSON array.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before `datasets` is imported anywhere through us

import datasets

from fednode.errors import ConfigError

datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()

SUFFIX_KINDS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DEFAULT_MAX_DATA_FILES = 10_000  # files in one data folder; more is surely a wrong path
_SAVED_DATASET_MARKERS = ("state.json", "dataset_info.json")
_SAVED_DICT_MARKER = "dataset_dict.json"


class DataError(ConfigError):
    """A node's data file is unusable. Names the file, the row (1-based: a JSON Lines row is its line
    number; a CSV's header is not a row, so data row 1 is the file's second line; Parquet and
    save_to_disk rows count from 1) and the column, where they apply."""

    def __init__(self, file: str | os.PathLike[str], problem: str, *, row: int | None = None,
                 column: str | None = None) -> None:
        where = str(file)
        if row is not None:
            where += f": row {row}"
        if column is not None:
            where += f": column {column!r}"
        super().__init__(f"{where}: {problem}")
        self.file = str(file)
        self.row = row
        self.column = column
        self.problem = problem


@dataclass(frozen=True)
class Table:
    """One source (a file, or a save_to_disk folder) and its rows, in memory."""

    source: Path
    dataset: datasets.Dataset
    line_numbers: tuple[int, ...] | None = None  # JSON Lines: each row's line (the loader skips blank lines)

    @property
    def columns(self) -> tuple[str, ...]:
        return tuple(self.dataset.column_names)

    def __len__(self) -> int:
        return self.dataset.num_rows

    def rows(self, columns: tuple[str, ...]) -> Iterator[tuple[int, dict[str, Any]]]:
        """(row number, {column: value}) for the named columns only: 1-based, a JSON Lines row's
        number is its line."""
        for index, row in enumerate(self.dataset.select_columns(list(columns))):
            yield (self.line_numbers[index] if self.line_numbers else index + 1), row


def read_tables(path: Path, *, max_rows: int, rows_before: int = 0) -> list[Table]:
    """Every table under `path`; raises DataError for a missing, unreadable or empty source and
    when the rows (plus `rows_before`, already read from other paths) exceed `max_rows`."""
    if not path.exists():
        raise DataError(path, "does not exist")
    tables: list[Table] = []
    total = rows_before
    for source in _sources(path):
        table = Table(source, _read_source(source), _json_line_numbers(source))
        if len(table) == 0:
            raise DataError(source, "is empty (no rows)")
        total += len(table)
        if total > max_rows:
            raise DataError(source, f"the data has more than {max_rows} rows (the limit 'data.max_rows'; "
                                    f"raise it to read more)")
        tables.append(table)
    return tables


def _json_line_numbers(source: Path) -> tuple[int, ...] | None:
    if source.is_dir() or SUFFIX_KINDS.get(source.suffix.lower()) != "json":
        return None
    lines = source.read_text(encoding="utf-8").splitlines()
    if lines and lines[0].lstrip().startswith("["):
        return None  # a JSON array: rows are its elements
    return tuple(number for number, line in enumerate(lines, start=1) if line.strip())


def _sources(path: Path) -> list[Path]:
    if path.is_file() or _is_saved_dataset(path):
        return [path]
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SUFFIX_KINDS)
    if not files:
        raise DataError(path, f"no data files in this folder ({', '.join(SUFFIX_KINDS)}) and no dataset "
                              f"written by save_to_disk")
    if len(files) > DEFAULT_MAX_DATA_FILES:
        raise DataError(path, f"{len(files)} data files, more than {DEFAULT_MAX_DATA_FILES}")
    return files


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in (*_SAVED_DATASET_MARKERS, _SAVED_DICT_MARKER))


@contextlib.contextmanager
def _scratch_cache() -> Iterator[str]:
    # The loaders build Arrow files in a cache dir; we keep tables in memory and leave nothing behind.
    with tempfile.TemporaryDirectory(prefix="fednode-data-") as tmp:
        yield tmp


def _read_source(source: Path) -> datasets.Dataset:
    if source.is_dir():
        return _read_saved(source)
    kind = SUFFIX_KINDS.get(source.suffix.lower())
    if kind is None:
        raise DataError(source, f"unsupported file type {source.suffix!r}; use one of {', '.join(SUFFIX_KINDS)} "
                                f"or a save_to_disk folder")
    if source.stat().st_size == 0:
        raise DataError(source, "is empty (no rows)")
    try:
        with _scratch_cache() as cache:
            if kind == "json":
                return datasets.Dataset.from_json(str(source), cache_dir=cache, keep_in_memory=True)
            if kind == "csv":
                return _read_csv(source, cache)
            return _read_parquet(source, cache)
    except DataError:
        raise
    except Exception as exc:  # the loaders raise anything from StopIteration to ArrowInvalid
        raise _explain_unreadable(source, kind, exc) from None


def _read_csv(source: Path, cache: str) -> datasets.Dataset:
    with source.open(newline="", encoding="utf-8") as fh:
        header = next(csv.reader(fh), None)
    if not header:
        raise DataError(source, "is empty (no header row)")
    features = datasets.Features({name: datasets.Value("string") for name in header})
    return datasets.Dataset.from_csv(str(source), cache_dir=cache, keep_in_memory=True, features=features,
                                     keep_default_na=False)


def _read_parquet(source: Path, cache: str) -> datasets.Dataset:
    import pyarrow.parquet as pq

    if pq.ParquetFile(source).metadata.num_rows == 0:  # the loader fails on it with an obscure error
        raise DataError(source, "is empty (no rows)")
    return datasets.Dataset.from_parquet(str(source), cache_dir=cache, keep_in_memory=True)


def _read_saved(source: Path) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(source), keep_in_memory=True)
    except Exception as exc:
        if _saved_without_data(source):
            raise DataError(source, "is empty (no rows)") from None
        raise DataError(source, f"cannot be read as a save_to_disk dataset: {exc}") from None
    if isinstance(loaded, datasets.DatasetDict):
        if "train" not in loaded:
            raise DataError(source, f"a DatasetDict without a 'train' split (splits: {', '.join(loaded)}); "
                                    f"point data.path at one split's folder")
        loaded = loaded["train"]
    assert isinstance(loaded, datasets.Dataset)
    return loaded


def _saved_without_data(source: Path) -> bool:
    # An empty Dataset saves a state.json listing no Arrow files, which load_from_disk cannot load.
    try:
        state = json.loads((source / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("_data_files") == []


def _explain_unreadable(source: Path, kind: str, exc: BaseException) -> DataError:
    """The loaders' errors name no line; for JSON lines find the first bad one ourselves."""
    detail = str(exc).strip() or type(exc).__name__
    if kind == "parquet":
        return DataError(source, f"cannot be read as Parquet: {detail}")
    try:
        text = source.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return DataError(source, f"is not UTF-8 text (byte {err.start})")
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return DataError(source, "is empty (no rows)")
    if kind == "csv" and len(lines) == 1:
        return DataError(source, "is empty (a header, no rows)")
    if kind == "json" and not text.lstrip().startswith("["):
        first_blank: int | None = None
        blank_inside: int | None = None
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                first_blank = first_blank or number
                continue
            blank_inside = blank_inside or first_blank
            try:
                value = json.loads(line)
            except json.JSONDecodeError as err:
                return DataError(source, f"not valid JSON: {err.msg} (character {err.colno})", row=number)
            if not isinstance(value, dict):
                return DataError(source, f"expected a JSON object per line, got {type(value).__name__}", row=number)
        if blank_inside is not None:
            return DataError(source, "a blank line inside JSON Lines (the loader refuses it; remove it)",
                             row=blank_inside)
    return DataError(source, f"cannot be read as {kind.upper()}: {detail}")
