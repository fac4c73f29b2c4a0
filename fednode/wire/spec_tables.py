"""The field tables of protocols/round-v1.md, generated from the message declarations
(`fields.wire`). Each table sits between `<!-- fields:NAME -->` and `<!-- /fields -->` in the spec;
`python -m fednode.wire.spec_tables --write` rewrites them, `--check` exits 1 if one differs, and
tests/wire/test_spec_tables.py keeps the spec equal to the code."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from pathlib import Path
from typing import Any

from fednode.wire import fields as f
from fednode.wire.messages import MESSAGE_TYPES, Contribution

SPEC = Path(__file__).resolve().parents[2] / "protocols" / "round-v1.md"
MARKER = re.compile(r"(<!-- fields:(?P<name>[a-z_]+) -->\n)(?P<body>.*?)(<!-- /fields -->)", re.S)
TABLES: dict[str, Any] = {**{name: cls for name, cls in MESSAGE_TYPES.items()}, "contribution": Contribution}

_MSGPACK = {"uint": "int", "float": "float64", "timestamp": "float64", "bool": "bool", "sig": "bin",
            "choice": "str", "custom": "array"}


def _number(value: float) -> str:
    if float(value).is_integer() and abs(value) >= 2**16 and math.log2(abs(value)).is_integer():
        return f"2^{int(math.log2(abs(value)))}"
    if float(value).is_integer() and abs(value) < 1e6:
        return str(int(value))
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def constraint(spec: f.WireField) -> str:
    if spec.display:
        text = spec.display
    elif spec.kind == "uint":
        text = f"`uint` [{_number(spec.lo or 0)}, {_number(spec.hi if spec.hi is not None else f.MAX_INT)}]"
    elif spec.kind == "float":
        text = f"`float` {'(' if spec.lo_open else '['}{_number(spec.lo or 0)}, {_number(spec.hi or 0)}]"
    elif spec.kind == "text":
        text = f"`text({int(spec.lo or 0)}..{int(spec.hi or f.MAX_TEXT_CHARS)})`"
    elif spec.kind == "choice":
        text = "one of " + ", ".join(f"`{c}`" for c in spec.choices)
    else:
        text = f"`{spec.kind}`"
    if spec.signer:
        text += " (signer)"
    return f"{text}; {spec.note}" if spec.note else text


def default(field: dataclasses.Field[Any], spec: f.WireField) -> str:
    if spec.default_doc:
        return spec.default_doc
    if field.default is dataclasses.MISSING:
        return "-"
    value = field.default
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return "-"  # a signature: filled in by signing
    if value == "":
        return '`""`'
    if isinstance(value, str):
        return f"`{value}`"
    return repr(value)


def rows(cls: Any) -> list[list[str]]:
    out = []
    by_name = {fld.name: fld for fld in dataclasses.fields(cls)}
    for name, spec in f.declared(cls):
        msgpack_type = _MSGPACK.get(spec.kind, "str")
        row = [f"`{name}`", msgpack_type, default(by_name[name], spec), constraint(spec), spec.doc]
        if cls is Contribution:
            del row[2]  # every key is required: no default column
        out.append(row)
    return out


def table(cls: Any) -> str:
    head = ["Field", "msgpack", "Default", "Constraint", "Meaning"]
    if cls is Contribution:
        head.remove("Default")
    body = rows(cls)
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join([line(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)]) + "\n"


def render(text: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match["name"]
        if name not in TABLES:
            raise KeyError(f"{SPEC.name}: no message type {name!r} for a fields table")
        return match[1] + table(TABLES[name]) + match[4]

    return MARKER.sub(replace, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="generate round-v1.md's field tables from fednode.wire")
    parser.add_argument("--write", action="store_true", help="rewrite the tables in the spec")
    args = parser.parse_args(argv)
    text = SPEC.read_text(encoding="utf-8")
    new = render(text)
    if args.write:
        SPEC.write_text(new, encoding="utf-8")
        return 0
    if new != text:
        print(f"{SPEC}: field tables differ from fednode.wire; run python -m fednode.wire.spec_tables --write",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
