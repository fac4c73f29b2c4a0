"""A node's own training data: files named in `[data]`, checked and tokenized before any round.

Where: `[data] path` is a JSONL/CSV/Parquet file, a folder of them, or a `datasets` save_to_disk
folder (see fednode.learning.local_files); `eval_path` the same, else a seeded `eval_fraction` of
the rows is held out. An empty path means the task's built-in data (today's behaviour); a node with
its own data needs none of learning.node_index / num_nodes.

Formats (`[data] format`), each with its configurable column names:
- chat: `messages_column` holds the turns, a list of {role, content} (role: system, user or
  assistant; in CSV a JSON array). Rendered with the tokenizer's chat template; the loss is on the
  assistant turns only (each turn's text as the template renders it, end-of-turn marker included).
  A conversation needs at least one assistant turn.
- instruction: `prompt_column` and `completion_column`: the completion follows the prompt directly
  (put any separator in the data) and then EOS; the loss is on the completion and EOS only. Without
  a prompt column, alpaca style: `instruction_column`, optional `input_column`, `output_column`,
  rendered with the Alpaca prompt (ALPACA_PROMPT / ALPACA_PROMPT_WITH_INPUT).
- text: `text_column`, plain causal-LM text followed by EOS; the loss is on every token.
- classification: `text_column` and `label_column`. The label set is `[data] labels`, in head
  order; it is part of the task's identity (`task_identity`), so every node agrees on the head
  (size, label -> id) even when its own data lacks some labels. A label is a string, or an
  integer that is matched as its decimal string.

Errors (DataError, a ConfigError, raised by `load_local_data`: when the node starts and by
`fednode config --check`, never in a round) name the file, the row (1-based data rows, see
DataError) and the column: a missing column, a value of the wrong type or empty, an empty or
unreadable file, a label not in `labels`, a chat with no assistant turn or a bad turn, and with
`overlength = "error"` a row over learning.max_length tokens. With "truncate" (the default) or
"drop", over-long rows are cut or skipped and counted in the DataReport; a row left with no loss
token after truncation is dropped (and counted). No usable row at all is an error too.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fednode.config import DataSection
from fednode.errors import ConfigError
from fednode.learning.local_files import DataError, Table, read_tables
from fednode.learning.local_formats import (
    ALPACA_PROMPT,
    ALPACA_PROMPT_WITH_INPUT,
    IGNORE_INDEX,
    Encoder,
    Example,
    Row,
    make_encoder,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fednode.config import Config

__all__ = ["ALPACA_PROMPT", "ALPACA_PROMPT_WITH_INPUT", "IGNORE_INDEX", "DataError", "DataReport", "Example",
           "FileReport", "LocalData", "check_config_data", "ensure_pad_token", "load_local_data", "task_identity"]

TASK_IDENTITY_DOMAIN = b"fednode/task-identity/1\0"
DataKind = Literal["causal_lm", "seq_cls"]


@dataclass(frozen=True)
class FileReport:
    path: str
    split: Literal["train", "eval"]
    rows: int = 0
    kept: int = 0
    truncated: int = 0  # kept, cut to max_length
    dropped: int = 0  # over max_length with overlength = "drop", or no loss token left after truncation


@dataclass(frozen=True)
class DataReport:
    """What was read from where; `str()` is the summary `fednode config --check` prints."""

    format: str
    max_length: int
    files: tuple[FileReport, ...]
    train_examples: int
    eval_examples: int
    eval_from: str  # "eval_path", "eval_fraction 0.1 (seed 0)" or "none"
    label_counts: tuple[tuple[str, int], ...] = ()  # classification: train examples per label, head order

    @property
    def rows(self) -> int:
        return sum(f.rows for f in self.files)

    @property
    def kept(self) -> int:
        return sum(f.kept for f in self.files)

    @property
    def truncated(self) -> int:
        return sum(f.truncated for f in self.files)

    @property
    def dropped(self) -> int:
        return sum(f.dropped for f in self.files)

    def __str__(self) -> str:
        lines = [f"data: format {self.format}, {self.rows} rows read, {self.kept} kept, {self.truncated} truncated "
                 f"and {self.dropped} dropped at max_length {self.max_length}"]
        lines += [f"  {f.split:5} {f.path}: {f.rows} rows, {f.kept} kept, {f.truncated} truncated, "
                  f"{f.dropped} dropped" for f in self.files]
        lines.append(f"  examples: {self.train_examples} train, {self.eval_examples} eval (held out: {self.eval_from})")
        if self.label_counts:
            lines.append("  train labels: " + ", ".join(f"{name} {n}" for name, n in self.label_counts))
        return "\n".join(lines)


@dataclass(frozen=True)
class LocalData:
    kind: DataKind
    train: tuple[Example, ...]
    eval: tuple[Example, ...]
    labels: tuple[str, ...]  # classification: the head's labels in order (from config); else ()
    report: DataReport = field(compare=False)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give a tokenizer without a pad token one from its own vocabulary (eos, else unk, else bos) and
    return it: padded positions are masked out of attention and loss, so which id pads does not
    matter, and no new token (that would resize the embeddings and change the model) is added. The
    one helper for data loading and fednode.learning.model.load_tokenizer."""
    if tokenizer.pad_token is not None:
        return tokenizer
    for candidate in (tokenizer.eos_token, tokenizer.unk_token, tokenizer.bos_token):
        if candidate is not None:
            tokenizer.pad_token = candidate
            return tokenizer
    raise ConfigError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no pad, eos, unk or bos token "
                      "to pad with")


def task_identity(section: DataSection) -> str:
    """sha256 hex of what every node of a community must agree on about its data: the format and,
    for classification, the ordered label list (the head). Not the data, which is each node's own.
    For the built-in task data (empty path) it is the digest of {"format": "builtin"}."""
    if not section.path:
        payload: dict[str, Any] = {"format": "builtin"}
    else:
        labels = list(section.labels) if section.format == "classification" else []
        payload = {"format": section.format, "labels": labels}
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return hashlib.sha256(TASK_IDENTITY_DOMAIN + canonical).hexdigest()


def load_local_data(section: DataSection, tokenizer: PreTrainedTokenizerBase, *, max_length: int,
                    base_dir: Path | None = None) -> LocalData:
    """Read, check and tokenize the node's data (all of it, now). Raises DataError naming the file,
    row and column of the first bad row. Relative paths resolve against `base_dir` (default: the
    working directory; fednode.config already made a config file's paths absolute)."""
    if not section.path:
        raise ConfigError("data.path is empty: this node trains on the task's built-in data")
    ensure_pad_token(tokenizer)
    encoder = make_encoder(section, tokenizer, max_length)
    root = base_dir or Path.cwd()
    train_tables = read_tables(root / Path(section.path).expanduser(), max_rows=section.max_rows)
    eval_tables: list[Table] = []
    if section.eval_path:
        eval_tables = read_tables(root / Path(section.eval_path).expanduser(), max_rows=section.max_rows,
                                  rows_before=sum(len(t) for t in train_tables))
    reports: list[FileReport] = []
    train = _encode_tables(encoder, train_tables, "train", reports)
    held_out = _encode_tables(encoder, eval_tables, "eval", reports)
    if not train:
        raise DataError(section.path, f"no usable training rows (all {sum(len(t) for t in train_tables)} were "
                                      f"dropped as over learning.max_length = {max_length})")
    if section.eval_path:
        eval_from = "eval_path"
    elif section.eval_fraction > 0 and len(train) >= 2:
        train, held_out = _seeded_split(train, section.eval_fraction, section.seed)
        eval_from = f"eval_fraction {section.eval_fraction} (seed {section.seed})"
    else:
        eval_from = "none"
    labels = tuple(section.labels) if section.format == "classification" else ()
    counts = tuple((name, sum(1 for ex in train if ex.label == i)) for i, name in enumerate(labels))
    report = DataReport(format=section.format, max_length=max_length, files=tuple(reports),
                        train_examples=len(train), eval_examples=len(held_out), eval_from=eval_from,
                        label_counts=counts)
    kind: DataKind = "seq_cls" if section.format == "classification" else "causal_lm"
    return LocalData(kind=kind, train=tuple(train), eval=tuple(held_out), labels=labels, report=report)


def check_config_data(config: Config) -> LocalData:
    """What `fednode config --check` runs: the configured model's tokenizer (no weights) and
    load_local_data on [data], with learning.max_length."""
    from fednode.learning.model import load_tokenizer, resolve_tokenizer_dir
    from fednode.learning.task import get_task

    lc = config.learning
    overrides: dict[str, Any] = {"model_cache_dir": lc.model_cache_dir}
    if lc.base_model_id:
        overrides["base_model_id"] = lc.base_model_id
    tokenizer = load_tokenizer(resolve_tokenizer_dir(get_task(lc.task, **overrides)))
    return load_local_data(config.data, tokenizer, max_length=lc.max_length)


def _seeded_split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = min(len(examples) - 1, max(1, round(len(examples) * fraction)))
    held = set(order[:n_eval])
    return ([ex for i, ex in enumerate(examples) if i not in held],
            [ex for i, ex in enumerate(examples) if i in held])


def _encode_tables(encoder: Encoder, tables: Sequence[Table], split: Literal["train", "eval"],
                   reports: list[FileReport]) -> list[Example]:
    out: list[Example] = []
    for table in tables:
        columns = encoder.columns(table)
        kept = truncated = dropped = 0
        for row_number, row in table.rows(columns):
            example, was_truncated = encoder.encode(Row(table.source, row_number, row))
            if example is None:
                dropped += 1
                continue
            kept += 1
            truncated += was_truncated
            out.append(example)
        reports.append(FileReport(str(table.source), split, len(table), kept, truncated, dropped))
    return out
