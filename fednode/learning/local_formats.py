"""The four formats of a node's own data: a row's columns -> a tokenized Example.

Each format is an encoder with the columns it needs (a missing one is a DataError naming it) and
`encode(row)`, which checks the row's values (DataError naming the file, row and column), renders
and tokenizes it, places the loss (labels; IGNORE_INDEX where there is none) and applies the
overlength rule. fednode.learning.local_data describes the formats for users and drives this.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fednode.config import DataSection
from fednode.errors import ConfigError
from fednode.learning.local_files import DataError, Table

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # labels value of a token without loss (torch cross_entropy's ignore_index)
CHAT_ROLES = ("system", "user", "assistant")
ALPACA_PROMPT = ("Below is an instruction that describes a task. Write a response that appropriately "
                 "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")
ALPACA_PROMPT_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                            "further context. Write a response that appropriately completes the request.\n\n"
                            "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")


@dataclass(frozen=True)
class Example:
    """One tokenized row. Causal LM: `labels` parallels `input_ids`, IGNORE_INDEX where there is no
    loss. Classification: `labels` is empty and `label` indexes LocalData.labels."""

    input_ids: tuple[int, ...]
    labels: tuple[int, ...]
    label: int = -1


@dataclass(frozen=True)
class Row:
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


class Encoder:
    """One format's columns and row -> Example, with the overlength rule."""

    def __init__(self, section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        self.section = section
        self.tok = tokenizer
        self.max_length = max_length

    def columns(self, table: Table) -> tuple[str, ...]:
        raise NotImplementedError

    def encode(self, row: Row) -> tuple[Example | None, bool]:
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

    def _fit(self, row: Row, ids: list[int], labels: list[int]) -> tuple[Example | None, bool]:
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

    def _overlength(self, row: Row, n_tokens: int) -> str:
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


class _TextEncoder(Encoder):
    def columns(self, table: Table) -> tuple[str, ...]:
        return self._require(table, self.section.text_column)

    def encode(self, row: Row) -> tuple[Example | None, bool]:
        text = row.string(self.section.text_column)
        ids, labels = self._tokenize_spans(text, [(0, len(text))], add_special_tokens=True)
        return self._fit(row, *self._with_eos(ids, labels))


class _InstructionEncoder(Encoder):
    def columns(self, table: Table) -> tuple[str, ...]:
        s = self.section
        if s.prompt_column in table.columns or s.instruction_column not in table.columns:
            return self._require(table, s.prompt_column, s.completion_column)
        alpaca = self._require(table, s.instruction_column, s.output_column)
        return alpaca + ((s.input_column,) if s.input_column in table.columns else ())

    def encode(self, row: Row) -> tuple[Example | None, bool]:
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


class _ChatEncoder(Encoder):
    def __init__(self, section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        super().__init__(section, tokenizer, max_length)
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"data.format = \"chat\" needs a tokenizer with a chat template; "
                              f"{tokenizer.name_or_path!r} has none (use format \"instruction\" or \"text\")")

    def columns(self, table: Table) -> tuple[str, ...]:
        return self._require(table, self.section.messages_column)

    def encode(self, row: Row) -> tuple[Example | None, bool]:
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

    def _messages(self, row: Row) -> list[dict[str, str]]:
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

    def _render(self, row: Row, messages: list[dict[str, str]], *, generation_prompt: bool) -> str:
        try:
            text = self.tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
        except Exception as exc:  # jinja raises on conversations a template forbids (e.g. role order)
            raise row.error(self.section.messages_column, f"the chat template refuses this conversation: {exc}") \
                from None
        assert isinstance(text, str)
        return text


class _ClassificationEncoder(Encoder):
    def __init__(self, section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> None:
        super().__init__(section, tokenizer, max_length)
        if len(section.labels) < 2 or len(set(section.labels)) != len(section.labels):
            raise ConfigError(f"data.labels: classification needs at least 2 distinct labels, got {section.labels!r}")
        self.index = {label: i for i, label in enumerate(section.labels)}

    def columns(self, table: Table) -> tuple[str, ...]:
        return self._require(table, self.section.text_column, self.section.label_column)

    def encode(self, row: Row) -> tuple[Example | None, bool]:
        text = row.string(self.section.text_column)
        label = self._label(row)
        ids = self.tok(text, add_special_tokens=True)["input_ids"]
        if len(ids) <= self.max_length:
            return Example(tuple(ids), (), label), False
        if self._overlength(row, len(ids)) == "drop":
            return None, False
        ids = self.tok(text, add_special_tokens=True, truncation=True, max_length=self.max_length)["input_ids"]
        return Example(tuple(ids), (), label), True

    def _label(self, row: Row) -> int:
        column = self.section.label_column
        value = row.values[column]
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise row.error(column, f"expected a label (a string or an integer), got {_describe(value)}")
        name = str(value)
        if name not in self.index:
            raise row.error(column, f"label {name!r} is not in data.labels ({', '.join(map(repr, self.index))})")
        return self.index[name]


_ENCODERS: dict[str, type[Encoder]] = {
    "chat": _ChatEncoder,
    "instruction": _InstructionEncoder,
    "text": _TextEncoder,
    "classification": _ClassificationEncoder,
}


def make_encoder(section: DataSection, tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoder:
    try:
        cls = _ENCODERS[section.format]
    except KeyError:
        raise ConfigError(f"data.format: unknown {section.format!r}; known: {', '.join(_ENCODERS)}") from None
    return cls(section, tokenizer, max_length)
