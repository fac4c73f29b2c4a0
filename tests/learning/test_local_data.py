"""A node's own data ([data], fednode.learning.local_data): every format from every container, every
kind of bad data refused with the file, row and column before any round, and label agreement."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import datasets
import pandas as pd
import pytest

from fednode.cli import main
from fednode.config import DataSection, parse_config
from fednode.errors import ConfigError
from fednode.learning.local_data import (
    IGNORE_INDEX,
    DataError,
    LocalData,
    ensure_pad_token,
    load_local_data,
    task_identity,
)
from fednode.learning.model import load_tokenizer, resolve_tokenizer_dir
from fednode.learning.task import get_task

MAX_LENGTH = 128


@pytest.fixture(scope="module")
def tok() -> Any:
    """SmolLM2's tokenizer (it has a chat template); extracted from the GGUF once per machine."""
    return load_tokenizer(resolve_tokenizer_dir(get_task("smollm2-lm")))


CHAT_ROWS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Four."},
                  {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "Six."}]},
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello there!"}]},
    {"messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]},
]
INSTRUCTION_ROWS = [
    {"prompt": "Q: capital of France?\nA:", "completion": " Paris"},
    {"prompt": "Q: capital of Italy?\nA:", "completion": " Rome"},
    {"prompt": "Q: capital of Spain?\nA:", "completion": " Madrid"},
]
TEXT_ROWS = [{"text": "The quick brown fox jumps over the lazy dog."}, {"text": "A second, shorter line."},
             {"text": "Federated learning keeps the data at home."}]
LABELS = ["business", "sport", "tech"]
CLASSIFICATION_ROWS = [{"text": "Shares fell sharply today.", "label": "business"},
                       {"text": "The striker scored twice.", "label": "sport"},
                       {"text": "A new chip doubles the speed.", "label": "tech"},
                       {"text": "The goalkeeper saved a penalty.", "label": "sport"}]
ROWS = {"chat": CHAT_ROWS, "instruction": INSTRUCTION_ROWS, "text": TEXT_ROWS,
        "classification": CLASSIFICATION_ROWS}


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".jsonl")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".csv")
    cells = [{k: json.dumps(v) if isinstance(v, list) else v for k, v in r.items()} for r in rows]
    pd.DataFrame(cells).to_csv(path, index=False)
    return path


def write_parquet(path: Path, rows: list[dict[str, Any]]) -> Path:
    path = path.with_suffix(".parquet")
    pd.DataFrame(rows).to_parquet(path, index=False)
    return path


def write_saved(path: Path, rows: list[dict[str, Any]]) -> Path:
    datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


WRITERS: dict[str, Callable[[Path, list[dict[str, Any]]], Path]] = {
    "jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet, "save_to_disk": write_saved}


def section(path: Path, fmt: str, **kw: Any) -> DataSection:
    kw.setdefault("eval_fraction", 0.0)
    if fmt == "classification":
        kw.setdefault("labels", LABELS)
    return DataSection(path=str(path), format=fmt, **kw)


def loss_text(tok: Any, ex: Any) -> str:
    return str(tok.decode([t for t, label in zip(ex.input_ids, ex.labels, strict=True) if label != IGNORE_INDEX]))


@pytest.mark.parametrize("fmt", list(ROWS))
def test_every_format_loads_the_same_from_jsonl_csv_parquet_and_save_to_disk(tok: Any, tmp_path: Path,
                                                                           fmt: str) -> None:
    loaded: dict[str, LocalData] = {}
    for container, write in WRITERS.items():
        path = write(tmp_path / f"{fmt}-{container}", ROWS[fmt])
        loaded[container] = load_local_data(section(path, fmt), tok, max_length=MAX_LENGTH)
    data = loaded["jsonl"]
    for container, other in loaded.items():
        assert other.train == data.train, container
        assert other.report.rows == other.report.kept == len(ROWS[fmt]), container
    assert len(data.train) == len(ROWS[fmt]) and data.eval == ()
    rows = ROWS[fmt]
    if fmt == "chat":
        assert data.kind == "causal_lm"
        for ex, row in zip(data.train, rows, strict=True):
            answers = [m["content"] for m in row["messages"] if m["role"] == "assistant"]
            assert loss_text(tok, ex) == "".join(f"{a}<|im_end|>\n" for a in answers)  # assistant turns only
            assert "user" in tok.decode(ex.input_ids)  # the prompt is there, without loss
    elif fmt == "instruction":
        for ex, row in zip(data.train, rows, strict=True):
            assert loss_text(tok, ex) == row["completion"] + tok.eos_token
            assert tok.decode(ex.input_ids) == row["prompt"] + row["completion"] + tok.eos_token
    elif fmt == "text":
        for ex, row in zip(data.train, rows, strict=True):
            assert ex.labels == ex.input_ids and tok.decode(ex.input_ids) == row["text"] + tok.eos_token
    else:
        assert data.kind == "seq_cls" and data.labels == tuple(LABELS)
        assert [ex.label for ex in data.train] == [LABELS.index(r["label"]) for r in rows]
        assert all(ex.labels == () for ex in data.train)
        assert dict(data.report.label_counts) == {"business": 1, "sport": 2, "tech": 1}


def test_a_folder_of_files_is_read_in_name_order(tok: Any, tmp_path: Path) -> None:
    folder = tmp_path / "texts"
    folder.mkdir()
    write_csv(folder / "b", TEXT_ROWS[1:])
    write_jsonl(folder / "a", TEXT_ROWS[:1])
    (folder / "notes.md").write_text("not data")
    data = load_local_data(section(folder, "text"), tok, max_length=MAX_LENGTH)
    assert [tok.decode(ex.input_ids) for ex in data.train] == [r["text"] + tok.eos_token for r in TEXT_ROWS]
    assert [Path(f.path).name for f in data.report.files] == ["a.jsonl", "b.csv"]
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(TEXT_ROWS),
                                   "test": datasets.Dataset.from_list(TEXT_ROWS[:1])})
    splits.save_to_disk(str(tmp_path / "dict"))
    assert load_local_data(section(tmp_path / "dict", "text"), tok, max_length=MAX_LENGTH).train == data.train
    del splits["train"]
    splits.save_to_disk(str(tmp_path / "no-train"))
    with pytest.raises(DataError, match="without a 'train' split"):
        load_local_data(section(tmp_path / "no-train", "text"), tok, max_length=MAX_LENGTH)


def test_alpaca_columns_use_the_alpaca_prompt_and_train_on_the_output(tok: Any, tmp_path: Path) -> None:
    rows = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
            {"instruction": "Say hello.", "input": "", "output": "Hello!"}]
    data = load_local_data(section(write_jsonl(tmp_path / "alpaca", rows), "instruction"), tok, max_length=MAX_LENGTH)
    with_input, without = (tok.decode(ex.input_ids) for ex in data.train)
    assert "### Input:\ncat\n\n### Response:\nchat" in with_input
    assert "### Input:" not in without and without.endswith("### Response:\nHello!" + tok.eos_token)
    assert [loss_text(tok, ex) for ex in data.train] == ["chat" + tok.eos_token, "Hello!" + tok.eos_token]


def test_eval_path_or_a_seeded_eval_fraction_holds_rows_out(tok: Any, tmp_path: Path) -> None:
    rows = [{"text": f"line number {i}"} for i in range(20)]
    path = write_jsonl(tmp_path / "t", rows)
    a = load_local_data(section(path, "text", eval_fraction=0.25, seed=7), tok, max_length=MAX_LENGTH)
    b = load_local_data(section(path, "text", eval_fraction=0.25, seed=7), tok, max_length=MAX_LENGTH)
    c = load_local_data(section(path, "text", eval_fraction=0.25, seed=8), tok, max_length=MAX_LENGTH)
    assert (len(a.train), len(a.eval)) == (15, 5) and a == b and a.eval != c.eval
    assert set(a.train).isdisjoint(a.eval) and len(set(a.train) | set(a.eval)) == 20
    held = load_local_data(section(path, "text", eval_path=str(write_csv(tmp_path / "e", rows[:3])),
                                   eval_fraction=0.25), tok, max_length=MAX_LENGTH)
    assert (len(held.train), len(held.eval)) == (20, 3) and held.report.eval_from == "eval_path"
    assert [f.split for f in held.report.files] == ["train", "eval"]


def test_overlong_rows_are_truncated_or_dropped_and_counted_or_refused(tok: Any, tmp_path: Path) -> None:
    long = " ".join(f"word{i}" for i in range(200))
    rows = [{"text": "short"}, {"text": long}, {"text": "also short"}]
    path = write_jsonl(tmp_path / "t", rows)
    cut = load_local_data(section(path, "text"), tok, max_length=32)
    assert (cut.report.kept, cut.report.truncated, cut.report.dropped) == (3, 1, 0)
    assert max(len(ex.input_ids) for ex in cut.train) == 32
    dropped = load_local_data(section(path, "text", overlength="drop"), tok, max_length=32)
    assert (dropped.report.kept, dropped.report.truncated, dropped.report.dropped) == (2, 0, 1)
    assert "1 dropped" in str(dropped.report)
    with pytest.raises(DataError) as err:
        load_local_data(section(path, "text", overlength="error"), tok, max_length=32)
    assert (err.value.file, err.value.row) == (str(path), 2) and "max_length (32)" in str(err.value)
    # An instruction whose completion lies wholly past max_length has nothing left to learn: dropped.
    inst = write_jsonl(tmp_path / "i", [{"prompt": long, "completion": "x"}, *INSTRUCTION_ROWS])
    data = load_local_data(section(inst, "instruction"), tok, max_length=32)
    assert (data.report.kept, data.report.dropped) == (3, 1)
    labels = load_local_data(section(write_jsonl(tmp_path / "c", [{"text": long, "label": "tech"},
                                                                  *CLASSIFICATION_ROWS]), "classification"),
                             tok, max_length=16)
    assert labels.report.truncated == 1 and len(labels.train[0].input_ids) == 16


BAD_CASES: list[tuple[str, str, list[dict[str, Any]], dict[str, Any], int | None, str | None, str]] = [
    # id, format, rows, section overrides, row, column, words in the message
    ("missing-column", "text", [{"body": "x"}], {}, None, "text", "no such column (columns: body"),
    ("wrong-type", "text", [{"text": "fine"}, {"text": 42}], {}, 2, "text", "expected a string, got int 42"),
    ("null", "instruction", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": None}], {}, 2,
     "completion", "null"),
    ("empty-text", "text", [{"text": "ok"}, {"text": "ok"}, {"text": "  "}], {}, 3, "text", "is empty"),
    ("label-not-in-labels", "classification", [*CLASSIFICATION_ROWS, {"text": "Rain.", "label": "weather"}], {},
     5, "label", "label 'weather' is not in data.labels"),
    ("label-wrong-type", "classification", [{"text": "a", "label": "tech"}, {"text": "b", "label": 1.5}], {},
     2, "label", "expected a label"),
    ("chat-without-assistant", "chat", [CHAT_ROWS[0], {"messages": [{"role": "user", "content": "hello?"}]}],
     {}, 2, "messages", "no assistant turn"),
    ("chat-bad-role", "chat", [{"messages": [{"role": "robot", "content": "x"},
                                             {"role": "assistant", "content": "y"}]}], {}, 1, "messages",
     "turn 1: role must be one of"),
    ("chat-not-a-list", "chat", [CHAT_ROWS[0], {"messages": "hello"}], {}, 2, "messages", "JSON array"),
    ("overlength-error", "text", [{"text": "one " * 300}], {"overlength": "error"}, 1, None,
     "over learning.max_length"),
]


@pytest.mark.parametrize(("fmt", "rows", "overrides", "row", "column", "words"),
                         [case[1:] for case in BAD_CASES], ids=[case[0] for case in BAD_CASES])
def test_bad_data_is_refused_naming_file_row_and_column(tok: Any, tmp_path: Path, fmt: str,
                                                        rows: list[dict[str, Any]], overrides: dict[str, Any],
                                                        row: int | None, column: str | None, words: str) -> None:
    path = write_jsonl(tmp_path / "bad", rows)
    with pytest.raises(DataError) as err:
        load_local_data(section(path, fmt, **overrides), tok, max_length=MAX_LENGTH)
    assert (err.value.file, err.value.row, err.value.column) == (str(path), row, column)
    message = str(err.value)
    assert message.startswith(str(path)) and words in message
    if row is not None:
        assert f"row {row}" in message
    if column is not None:
        assert f"column {column!r}" in message


def test_bad_data_in_csv_parquet_and_save_to_disk_names_the_same_row(tok: Any, tmp_path: Path) -> None:
    rows = [*CLASSIFICATION_ROWS, {"text": "Rain all week.", "label": "weather"}]
    for container, write in WRITERS.items():
        path = write(tmp_path / container, rows)
        with pytest.raises(DataError) as err:
            load_local_data(section(path, "classification"), tok, max_length=MAX_LENGTH)
        assert (err.value.file, err.value.row, err.value.column) == (str(path), 5, "label"), container
    for container in ("csv", "parquet", "save_to_disk"):
        path = WRITERS[container](tmp_path / f"nocol-{container}", [{"body": "x"}])
        with pytest.raises(DataError, match="column 'text': no such column"):
            load_local_data(section(path, "text"), tok, max_length=MAX_LENGTH)


def test_empty_and_unreadable_files_are_refused_naming_the_file(tok: Any, tmp_path: Path) -> None:
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("")
    blank_jsonl = tmp_path / "blank.jsonl"
    blank_jsonl.write_text("\n\n")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text\n")
    empty_parquet = write_parquet(tmp_path / "none", [])
    empty_saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": []}).save_to_disk(str(empty_saved))
    for path in (empty_jsonl, blank_jsonl, header_only, empty_parquet, empty_saved):
        with pytest.raises(DataError, match="is empty") as err:
            load_local_data(section(path, "text"), tok, max_length=MAX_LENGTH)
        assert err.value.file == str(path)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{"text": "b"\n{"text": "c"}\n')
    with pytest.raises(DataError, match="not valid JSON") as err:
        load_local_data(section(broken, "text"), tok, max_length=MAX_LENGTH)
    assert (err.value.file, err.value.row) == (str(broken), 2)
    gap = tmp_path / "gap.jsonl"  # blank lines are skipped, and a row's number stays its line
    gap.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": ""}\n')
    with pytest.raises(DataError, match="is empty") as err:
        load_local_data(section(gap, "text"), tok, max_length=MAX_LENGTH)
    assert (err.value.file, err.value.row) == (str(gap), 4)
    gap.write_text('{"text": "a"}\n\n{"text": 3}\n')  # mixed types and a blank line: the loader gives up
    with pytest.raises(DataError, match="blank line") as err:
        load_local_data(section(gap, "text"), tok, max_length=MAX_LENGTH)
    assert (err.value.file, err.value.row) == (str(gap), 2)
    for path, words in ((tmp_path / "nothing-here.jsonl", "does not exist"), (tmp_path / "x.txt", "unsupported")):
        if path.suffix == ".txt":
            path.write_text("text")
        with pytest.raises(DataError, match=words):
            load_local_data(section(path, "text"), tok, max_length=MAX_LENGTH)
    with pytest.raises(DataError, match=r"'data\.max_rows'"):
        load_local_data(section(write_jsonl(tmp_path / "many", TEXT_ROWS), "text", max_rows=2), tok,
                        max_length=MAX_LENGTH)


def test_nodes_with_skewed_labels_agree_on_the_label_set_head_and_identity(tok: Any, tmp_path: Path) -> None:
    only_sport = [r for r in CLASSIFICATION_ROWS if r["label"] == "sport"]
    no_sport = [r for r in CLASSIFICATION_ROWS if r["label"] != "sport"]
    a_section = section(write_jsonl(tmp_path / "a", only_sport), "classification", seed=1)
    b_section = section(write_csv(tmp_path / "b", no_sport), "classification", seed=2, text_column="text")
    a = load_local_data(a_section, tok, max_length=MAX_LENGTH)
    b = load_local_data(b_section, tok, max_length=MAX_LENGTH)
    assert a.labels == b.labels == tuple(LABELS)  # the head: same size, same label -> id
    assert {ex.label for ex in a.train} == {LABELS.index("sport")}
    assert {ex.label for ex in b.train} == {LABELS.index("business"), LABELS.index("tech")}
    assert dict(a.report.label_counts) == {"business": 0, "sport": 2, "tech": 0}
    assert task_identity(a_section) == task_identity(b_section)  # the data and the seed are each node's own
    reordered = dataclasses.replace(a_section, labels=["sport", "business", "tech"])
    assert task_identity(reordered) != task_identity(a_section)  # another head
    assert task_identity(dataclasses.replace(a_section, format="text", labels=[])) != task_identity(a_section)
    assert task_identity(DataSection()) != task_identity(dataclasses.replace(a_section, format="text", labels=[]))
    assert len(task_identity(a_section)) == 64 and int(task_identity(a_section), 16) >= 0


def test_labels_are_checked_with_the_config_before_any_file_is_read(tmp_path: Path) -> None:
    for text, words in (
        ('[data]\npath = "x.jsonl"\nformat = "classification"\nlabels = ["a"]\n', "at least 2"),
        ('[data]\npath = "x.jsonl"\nformat = "classification"\nlabels = ["a", "b", "a"]\n', "repeated: 'a'"),
        ('[data]\npath = "x.jsonl"\nformat = "text"\nlabels = ["a", "b"]\n', "only for format"),
        ('[data]\nlabels = ["a", "b"]\n', "'data.path' is empty"),
        ('[data]\npath = "x.jsonl"\noverlength = "cut"\n', "data.overlength"),
    ):
        with pytest.raises(ConfigError, match=words):
            parse_config(text, source="n.toml")
    config = parse_config('[data]\npath = "d/x.jsonl"\neval_path = "~/e.csv"\n', base_dir=tmp_path)
    assert config.data.path == str(tmp_path / "d" / "x.jsonl")
    assert config.data.eval_path == str(Path("~/e.csv").expanduser())
    assert parse_config("").data.path == ""  # built-in task data, as before
    with pytest.raises(ConfigError, match="built-in"):
        load_local_data(DataSection(), None, max_length=MAX_LENGTH)


def test_config_check_reads_the_data_and_prints_the_report(tok: Any, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    write_jsonl(tmp_path / "chat", CHAT_ROWS)
    write_jsonl(tmp_path / "worse", [CHAT_ROWS[0], {"messages": [{"role": "user", "content": "?"}]}])
    config = tmp_path / "node.toml"
    config.write_text('[learning]\ntask = "smollm2-lm"\nmax_length = 96\n[data]\npath = "chat.jsonl"\n'
                      'format = "chat"\neval_fraction = 0.34\n')
    assert main(["config", "--check", str(config)]) == 0
    out = capsys.readouterr().out
    assert "data: format chat, 3 rows read, 3 kept" in out and "2 train, 1 eval" in out and ": ok" in out
    config.write_text(config.read_text().replace("chat.jsonl", "worse.jsonl"))
    assert main(["config", "--check", str(config)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'worse.jsonl'}: row 2: column 'messages': no assistant turn" in err
    config.write_text(config.read_text().replace('"smollm2-lm"', '"fake"'))
    assert main(["config", "--check", str(config)]) == 0
    assert "data.path is not read" in capsys.readouterr().out


def test_ensure_pad_token_pads_with_eos(tok: Any) -> None:
    saved = tok.pad_token
    try:
        tok.pad_token = None
        assert tok.pad_token is None
        assert ensure_pad_token(tok).pad_token == tok.eos_token == "<|im_end|>"
    finally:
        tok.pad_token = saved


def test_classification_with_an_encoder_tokenizer_keeps_its_special_tokens_when_truncated(tmp_path: Path) -> None:
    bert = load_tokenizer(resolve_tokenizer_dir(get_task("minilm-bbc")))  # MiniLM: [CLS] ... [SEP], no EOS
    rows = [{"text": "word " * 100, "label": "tech"}, *CLASSIFICATION_ROWS]
    data = load_local_data(section(write_jsonl(tmp_path / "c", rows), "classification"), bert, max_length=16)
    first = data.train[0].input_ids
    assert len(first) == 16 and (first[0], first[-1]) == (bert.cls_token_id, bert.sep_token_id)
    assert data.report.truncated == 1 and bert.pad_token == "[PAD]"  # its own pad token is kept


class _NoOffsets:
    """A tokenizer seen as "slow" (no offset mapping): the loss is placed by tokenizing pieces."""

    is_fast = False

    def __init__(self, tok: Any) -> None:
        self._tok = tok

    def __call__(self, text: str, **kw: Any) -> Any:
        assert "return_offsets_mapping" not in kw
        return self._tok(text, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tok, name)


def test_a_tokenizer_without_offsets_still_puts_the_loss_on_the_completion(tok: Any, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "i", INSTRUCTION_ROWS)
    slow = load_local_data(section(path, "instruction"), _NoOffsets(tok), max_length=MAX_LENGTH)
    fast = load_local_data(section(path, "instruction"), tok, max_length=MAX_LENGTH)
    assert [loss_text(tok, ex) for ex in slow.train] == [r["completion"] + tok.eos_token for r in INSTRUCTION_ROWS]
    assert slow.train == fast.train  # these prompts end where a token ends
