"""Message fields are declared once, as data (fednode.wire.fields.wire): the constructors check
them from the declarations and protocols/round-v1.md's field tables are generated from them. Every
table in the spec equals the generated one; the declarations are what is enforced."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from fednode.errors import InvalidMessage
from fednode.wire import MESSAGE_TYPES, codec, spec_tables
from fednode.wire import fields as f

ROOT = Path(__file__).resolve().parents[2]


def test_every_spec_field_table_equals_the_generated_one() -> None:
    text = spec_tables.SPEC.read_text(encoding="utf-8")
    found = {m["name"]: m["body"] for m in spec_tables.MARKER.finditer(text)}
    assert set(found) == set(spec_tables.TABLES), "one generated table per message type and for contributions"
    for name, body in found.items():
        assert body == spec_tables.table(spec_tables.TABLES[name]), f"round-v1.md table {name!r} differs"
    assert spec_tables.main([]) == 0


def test_a_changed_declaration_shows_up_as_a_difference(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison can fail: widen Heartbeat.term's range and the generated table no longer matches."""
    cls = MESSAGE_TYPES["heartbeat"]
    declared = f.declared

    def widened(c: object) -> list[tuple[str, f.WireField]]:
        return [(n, dataclasses.replace(s, hi=2**40) if n == "term" else s) for n, s in declared(c)]

    original = spec_tables.table(cls)
    monkeypatch.setattr(f, "declared", widened)
    assert spec_tables.table(cls) != original and "[0, 2^40]" in spec_tables.table(cls)
    assert spec_tables.main([]) == 1


def test_every_field_of_every_message_is_declared() -> None:
    for cls in [*MESSAGE_TYPES.values(), spec_tables.Contribution]:
        undeclared = [fld.name for fld in dataclasses.fields(cls) if "wire" not in fld.metadata]
        assert not undeclared, f"{cls.__name__}: {undeclared}"


def valid_messages() -> list[object]:
    doc = json.loads((ROOT / "protocols/vectors/valid.json").read_text(encoding="utf-8"))
    return [codec.decode(bytes.fromhex(v["hex"])) for v in doc["vectors"]]


def out_of_range(spec: f.WireField) -> object | None:
    if spec.kind == "uint" and spec.hi is not None:
        return int(spec.hi) + 1
    if spec.kind == "float" and spec.hi is not None:
        return float(spec.hi) * 2 + 1
    if spec.kind == "text":
        return "x" * (int(spec.hi or f.MAX_TEXT_CHARS) + 1)
    if spec.kind in ("id", "peer_id", "sha256"):
        return ""
    if spec.kind == "choice":
        return "no-such-choice"
    return None


def test_the_declarations_are_what_the_constructors_enforce() -> None:
    """For every declared field with a bound: a value just outside it is refused, naming the field."""
    checked = 0
    for message in valid_messages():
        for name, spec in f.declared(message):
            bad = out_of_range(spec)
            if bad is None:
                continue
            with pytest.raises(InvalidMessage) as info:
                dataclasses.replace(message, **{name: bad})  # type: ignore[type-var]
            assert re.match(rf"{name}\b", str(info.value)), (type(message).__name__, name, str(info.value))
            checked += 1
    assert checked >= 40
