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
import itertools
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fednode.config import DataSection
from fednode.errors import ConfigError
from fednode.learning.local_files import DataError, Table, read_tables

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

    from fednode.config import Config

__all__ = ["DataError", "DataReport", "Example", "FileReport", "LocalData", "check_config_data",
           "ensure_pad_token", "load_local_data", "task_identity"]

IGNORE_INDEX = -100  # labels value of a token without loss (torch cross_entropy's ignore_index)
CHAT_ROLES = ("system", "user", "assistant")
TASK_IDENTITY_DOMAIN = b"fednode/task-identity/1\0"
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")

DataKind = Literal["causal_lm", "seq_cls"]


@dataclass(frozen=True)
class Example:
    """One tokenized row. Causal LM: `labels` parallels `input_ids`, IGNORE_INDEX where there is no
    loss. Classification: `labels` is empty and `label` indexes LocalData.labels."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    label: int = -1


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
    """Tokenizers of many causal LMs have no pad token: pad with EOS (padding never carries loss)."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ConfigError(f"tokenizer {tokenizer.name_or_path!r} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


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
    encoder = _encoder(section, tokenizer, max_length)
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


def _encode_tables(encoder: _Encoder, tables: Sequence[Table], split: Literal["train", "eval"],
                   reports: list[FileReport]) -> list[Example]:
    out: list[Example] = []
    for table in tables:
        columns = encoder.columns(table)
        kept = truncated = dropped = 0
        for row_number, row in table.rows(columns):
            example, was_truncated = encoder.encode(_Row(table.source, row_number, row))
            if example is None:
                dropped += 1
                continue
            kept += 1
            truncated += was_truncated
            out.append(example)
        reports.append(FileReport(str(table.source), split, len(table), kept, truncated, dropped))
    return out


@dataclass(frozen=True)
class _Row:
    source: Path
    number: int
    values: Mapping[str, Any]

    def error(self, column: str | None, problem: str) -> DataError:
        return DataError(self.source, problem, row=self.number, column=column)

    def string(self, column: str, *, allow_empty: bool = False) -> str:
        value = self.values[column]
        if not isinstance(value, str):
            raise self.error(column, f"expected a string, got {_describe(value)}")
        if not allow_empty and not value.strip():
            raise self.error(column, "is empty")
        return value


def _describe(value: Any) -> str:
    return "null (a missing value)" if value is None else f"{type(value).__name__} {value!r:.60}"


class _Encoder:
    """One format's columns and row -> Example, with the overlength rule."""

    def __init__(self, section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.section = section
        self.tok = tokenizer
        self.max_length = max_length

    def columns(self, table: Table) -> tuple[str, ...]:
        raise NotImplementedError

    def encode(self, row: _Row) -> tuple[Example | None, bool]:
        raise NotImplementedError

    def _require(self, table: Table, *names: str) -> tuple[str, ...]:
        for name in names:
            if name not in table.columns:
                raise DataError(table.source, f"no such column (columns: {', '.join(table.columns)}; "
                                              f"set data.{self._key_of(name)} to the right name)", column=name)
        return names

    def _key_of(self, column: str) -> str:
        keys = ("messages_column", "prompt_column", "completion_column", "instruction_column", "input_column",
                "output_column", "text_column", "label_column")
        return next((k for k in keys if getattr(self.section, k) == column), "<format>_column")

    def _fit(self, row: _Row, ids: list[int], labels: list[int]) -> tuple[Example | None, bool]:
        """The overlength rule for a causal-LM row."""
        if len(ids) <= self.max_length:
            return Example(tuple(ids), tuple(labels)), False
        action = self._overlength(row, len(ids))
        if action == "drop":
            return None, False
        labels = labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels):
            return None, False  # nothing to learn from what is left
        return Example(tuple(ids[: self.max_length]), tuple(labels)), True

    def _overlength(self, row: _Row, n_tokens: int) -> str:
        if self.section.overlength == "error":
            raise row.error(None, f"{n_tokens} tokens, over learning.max_length ({self.max_length}); "
                                  f"data.overlength = \"error\" refuses it (\"truncate\" or \"drop\" would not)")
        return self.section.overlength

    def _tokenize_spans(self, text: str, loss_spans: Sequence[tuple[int, int]], *,
                        add_special_tokens: bool) -> tuple[list[int], list[int]]:
        """Token ids of `text`, and labels that keep the tokens overlapping `loss_spans` (character
        ranges) and IGNORE_INDEX elsewhere."""
        if self.tok.is_fast:
            enc = self.tok(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
            ids = list(enc["input_ids"])
            labels = [tid if end > start and any(start < b and end > a for a, b in loss_spans) else IGNORE_INDEX
                      for tid, (start, end) in zip(ids, enc["offset_mapping"], strict=True)]
            return ids, labels
        # A slow tokenizer has no offsets: tokenize the pieces between span edges one by one.
        edges = sorted({0, len(text), *(e for span in loss_spans for e in span)})
        ids, labels = [], []
        for a, b in itertools.pairwise(edges):
            piece = self.tok(text[a:b], add_special_tokens=False)["input_ids"]
            in_loss = any(a >= s and b <= e for s, e in loss_spans)
            ids += piece
            labels += piece if in_loss else [IGNORE_INDEX] * len(piece)
        return ids, labels

    def _with_eos(self, ids: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
        eos = self.tok.eos_token_id
        if eos is None or (ids and ids[-1] == eos):
            return ids, labels
        return [*ids, eos], [*labels, eos]


class _TextEncoder(_Encoder):
    def columns(self, table: Table) -> tuple[str, ...]:
        return self._require(table, self.section.text_column)

    def encode(self, row: _Row) -> tuple[Example | None, bool]:
        text = row.string(self.section.text_column)
        ids, labels = self._tokenize_spans(text, [(0, len(text))], add_special_tokens=True)
        return self._fit(row, *self._with_eos(ids, labels))


class _InstructionEncoder(_Encoder):
    def columns(self, table: Table) -> tuple[str, ...]:
        s = self.section
        if s.prompt_column in table.columns or s.instruction_column not in table.columns:
            return self._require(table, s.prompt_column, s.completion_column)
        alpaca = self._require(table, s.instruction_column, s.output_column)
        return alpaca + ((s.input_column,) if s.input_column in table.columns else ())

    def encode(self, row: _Row) -> tuple[Example | None, bool]:
        s = self.section
        if s.prompt_column in row.values:
            prompt = row.string(s.prompt_column, allow_empty=True)
            completion = row.string(s.completion_column)
        else:
            instruction = row.string(s.instruction_column)
            context = row.string(s.input_column, allow_empty=True) if s.input_column in row.values else ""
            template = ALPACA_PROMPT_WITH_INPUT if context.strip() else ALPACA_PROMPT
            prompt = template.format(instruction=instruction, input=context)
            completion = row.string(s.output_column)
        text = prompt + completion
        ids, labels = self._tokenize_spans(text, [(len(prompt), len(text))], add_special_tokens=True)
        return self._fit(row, *self._with_eos(ids, labels))


class _ChatEncoder(_Encoder):
    def __init__(self, section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        super().__init__(section, tokenizer, max_length)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.format = \"chat\" needs a tokenizer with a chat template; "
                              f"{tokenizer.name_or_path!r} has none (use format \"instruction\" or \"text\")")

    def columns(self, table: Table) -> tuple[str, ...]:
        return self._require(table, self.section.messages_column)

    def encode(self, row: _Row) -> tuple[Example | None, bool]:
        messages = self._messages(row)
        full = self._render(row, messages, generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self._render(row, messages[:i], generation_prompt=True) if i else ""
            after = self._render(row, messages[: i + 1], generation_prompt=False)
            if not (full.startswith(after) and after.startswith(before)):
                raise row.error(self.section.messages_column,
                                "the tokenizer's chat template does not render this conversation's turns as "
                                "prefixes of the whole, so its assistant turns cannot be located for the loss")
            spans.append((len(before), len(after)))
        ids, labels = self._tokenize_spans(full, spans, add_special_tokens=False)
        return self._fit(row, ids, labels)

    def _messages(self, row: _Row) -> list[dict[str, str]]:
        column = self.section.messages_column
        value = row.values[column]
        if isinstance(value, str):  # CSV cells, or a JSON string column
            try:
                value = json.loads(value)
            except json.JSONDecodeError as err:
                raise row.error(column, f"a string that is not a JSON array of turns: {err.msg}") from None
        if not isinstance(value, list) or not value:
            raise row.error(column, f"expected a non-empty list of {{role, content}} turns, got {_describe(value)}")
        messages = []
        for turn_number, turn in enumerate(value, start=1):
            where = f"turn {turn_number}"
            if not isinstance(turn, dict):
                raise row.error(column, f"{where}: expected {{role, content}}, got {_describe(turn)}")
            role, content = turn.get("role"), turn.get("content")
            if role not in CHAT_ROLES:
                raise row.error(column, f"{where}: role must be one of {', '.join(CHAT_ROLES)}, got {_describe(role)}")
            if not isinstance(content, str):
                raise row.error(column, f"{where}: content must be a string, got {_describe(content)}")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise row.error(column, "no assistant turn: a chat is trained on its assistant turns, so it needs one")
        return messages

    def _render(self, row: _Row, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises on conversations a template forbids (e.g. role order)
            raise row.error(self.section.messages_column, f"the chat template refuses this conversation: {exc}") \
                from None
        assert isinstance(text, str)
        return text


class _ClassificationEncoder(_Encoder):
    def __init__(self, section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        super().__init__(section, tokenizer, max_length)
        if len(section.labels) < 2 or len(set(section.labels)) != len(section.labels):
            raise ConfigError(f"data.labels: classification needs at least 2 distinct labels, got {section.labels!r}")
        self.index = {label: i for i, label in enumerate(section.labels)}

    def columns(self, table: Table) -> tuple[str, ...]:
        return self._require(table, self.section.text_column, self.section.label_column)

    def encode(self, row: _Row) -> tuple[Example | None, bool]:
        text = row.string(self.section.text_column)
        label = self._label(row)
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        if len(ids) <= self.max_length:
            return Example(tuple(ids), (), label), False
        if self._overlength(row, len(ids)) == "drop":
            return None, False
        ids = self.tok(text, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        return Example(tuple(ids), (), label), True

    def _label(self, row: _Row) -> int:
        column = self.section.label_column
        value = row.values[column]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise row.error(column, f"expected a label (a string or an integer), got {_describe(value)}")
        name = str(value)
        if name not in self.index:
            raise row.error(column, f"label {name!r} is not in data.labels ({', '.join(map(repr, self.index))})")
        return self.index[name]


_ENCODERS: dict[str, type[_Encoder]] = {
    "chat": _ChatEncoder,
    "instruction": _InstructionEncoder,
    "text": _TextEncoder,
    "classification": _ClassificationEncoder,
}


def _encoder(section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> _Encoder:
    try:
        cls = _ENCODERS[section.format]
    except KeyError:
        raise ConfigError(f"data.format: unknown {section.format!r}; known: {', '.join(_ENCODERS)}") from None
    return cls(section, tokenizer, max_length)
