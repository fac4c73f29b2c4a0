"""Field checks shared by the message dataclasses. Each raises InvalidMessage naming the field."""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from fednode.errors import InvalidMessage

# Limits on individual fields (the whole-message limit lives in codec.py).
MAX_ID_CHARS = 64
MAX_TEXT_CHARS = 256
MAX_INT = 2**53  # exactly representable everywhere (JSON, JS numbers)
MAX_TIMESTAMP = 4_102_444_800.0  # 2100-01-01, seconds since the epoch
SHA256_HEX_CHARS = 64

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")
_PEER_ID_RE = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,60}")


def get(obj: Any, name: str) -> Any:
    return getattr(obj, name)


def set_(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


def check_int(obj: Any, name: str, lo: int = 0, hi: int = MAX_INT) -> None:
    value = get(obj, name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidMessage(name, f"expected an integer, got {type(value).__name__}")
    if not lo <= value <= hi:
        raise InvalidMessage(name, f"{value} is out of range [{lo}, {hi}]")


def check_float(obj: Any, name: str, lo: float, hi: float, *, lo_open: bool = False) -> None:
    value = get(obj, name)
    if isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # local convenience; the decoder sees the canonical float64 form
        set_(obj, name, value)
    if not isinstance(value, float):
        raise InvalidMessage(name, f"expected a number, got {type(value).__name__}")
    if not math.isfinite(value):
        raise InvalidMessage(name, f"must be finite, got {value}")
    if value == 0.0 and math.copysign(1.0, value) < 0:  # one encoding per value: 0.0, never -0.0
        raise InvalidMessage(name, "must not be negative zero")
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise InvalidMessage(name, f"{value} is out of range {left}{lo}, {hi}]")


def check_bool(obj: Any, name: str) -> None:
    if not isinstance(get(obj, name), bool):
        raise InvalidMessage(name, f"expected a boolean, got {type(get(obj, name)).__name__}")


def check_text(obj: Any, name: str, max_chars: int = MAX_TEXT_CHARS, *, allow_empty: bool = True) -> None:
    value = get(obj, name)
    if not isinstance(value, str):
        raise InvalidMessage(name, f"expected a string, got {type(value).__name__}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: not encodable as a msgpack str
            raise InvalidMessage(name, "must be valid Unicode (no lone surrogates)") from None
    if len(value) > max_chars:
        raise InvalidMessage(name, f"{len(value)} characters exceeds the limit of {max_chars}")
    if not value and not allow_empty:
        raise InvalidMessage(name, "must not be empty")


def check_id(obj: Any, name: str) -> None:
    """Community ids, round ids: 1..64 chars of [A-Za-z0-9._:-], starting alphanumeric."""
    check_text(obj, name, MAX_ID_CHARS, allow_empty=False)
    if not _ID_RE.fullmatch(get(obj, name)):
        raise InvalidMessage(name, "must match [A-Za-z0-9][A-Za-z0-9._:-]* (at most 64 characters)")


def check_peer_id(obj: Any, name: str, *, allow_empty: bool = False) -> None:
    value = get(obj, name)
    check_text(obj, name, MAX_ID_CHARS, allow_empty=allow_empty)
    if value and not _PEER_ID_RE.fullmatch(value):
        raise InvalidMessage(name, "must be a base58btc libp2p peer id")


def check_sha256(obj: Any, name: str, *, allow_empty: bool = False) -> None:
    value = get(obj, name)
    check_text(obj, name, SHA256_HEX_CHARS, allow_empty=allow_empty)
    if value and not _HEX64_RE.fullmatch(value):
        raise InvalidMessage(name, "must be 64 lowercase hex characters (a sha256 digest)")


def check_timestamp(obj: Any, name: str) -> None:
    check_float(obj, name, 0.0, MAX_TIMESTAMP)


def check_sig(obj: Any, name: str) -> None:
    value = get(obj, name)
    if not isinstance(value, bytes):
        raise InvalidMessage(name, f"expected bytes, got {type(value).__name__}")
    if len(value) not in (0, 64):
        raise InvalidMessage(name, f"an Ed25519 signature is 64 bytes (or empty before signing), got {len(value)}")


# ---- declarations ------------------------------------------------------------------------------
# Each message field is declared once, as data (kind, range, default, meaning), the way
# fednode/config.py declares config keys. Message constructors check every declared field from its
# declaration (`check_declared`), and protocols/round-v1.md's field tables are generated from the
# same declarations (fednode.wire.spec_tables; tests/wire/test_spec_tables.py keeps them equal).

KINDS = ("uint", "float", "timestamp", "bool", "id", "id?", "text", "peer_id", "peer_id?", "sha256", "sha256?",
         "sig", "choice", "custom")


@dataclass(frozen=True, slots=True)
class WireField:
    """How one message field is typed and checked. `lo`/`hi` bound a number, or the length in
    code points of a `text`; `display` replaces the generated constraint text, `note` is appended
    to it (cross-field rules, which the message class checks itself); `default_doc` says what a
    default that is computed means. `omit_default`: the key is left out of the encoded map while
    the field holds its default (envelope-v1.md, canonical encoding rule 1), so a field added to a
    message type later leaves the encoding of the messages that do not use it unchanged."""

    kind: str
    doc: str
    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    signer: bool = False
    choices: tuple[str, ...] = ()
    display: str = ""
    note: str = ""
    default_doc: str = ""
    omit_default: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown wire field kind {self.kind!r}")


def wire(kind: str, default: Any = dataclasses.MISSING, *, doc: str, default_factory: Any = dataclasses.MISSING,
         **spec: Any) -> Any:
    """A dataclass field with its wire declaration in `metadata["wire"]`."""
    meta = {"wire": WireField(kind, doc, **spec)}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def declared(cls_or_obj: Any) -> list[tuple[str, WireField]]:
    """(name, declaration) of every declared field, in declaration order."""
    return [(f.name, f.metadata["wire"]) for f in dataclasses.fields(cls_or_obj) if "wire" in f.metadata]


_OMITTED: dict[type, Mapping[str, Any]] = {}  # per message class, computed once (the codec asks per message)


def omitted_when_default(cls: type) -> Mapping[str, Any]:
    """name -> default of the fields of `cls` whose key is absent from the encoding while they hold it."""
    found = _OMITTED.get(cls)
    if found is None:
        found = _OMITTED[cls] = MappingProxyType({
            fld.name: fld.default for fld in dataclasses.fields(cls)
            if "wire" in fld.metadata and fld.metadata["wire"].omit_default})
    return found


def _int_bound(value: float | None, default: int) -> int:
    return default if value is None else int(value)


def check_field(obj: Any, name: str, spec: WireField) -> None:
    kind = spec.kind
    if kind == "uint":
        check_int(obj, name, _int_bound(spec.lo, 0), _int_bound(spec.hi, MAX_INT))
    elif kind == "float":
        check_float(obj, name, float(spec.lo or 0.0), float(spec.hi if spec.hi is not None else math.inf),
                    lo_open=spec.lo_open)
    elif kind == "timestamp":
        check_timestamp(obj, name)
    elif kind == "bool":
        check_bool(obj, name)
    elif kind == "id":
        check_id(obj, name)
    elif kind == "id?":
        check_text(obj, name, MAX_ID_CHARS)  # type first: a falsy 0 must not slip through
        if get(obj, name):
            check_id(obj, name)
    elif kind == "text":
        check_text(obj, name, _int_bound(spec.hi, MAX_TEXT_CHARS), allow_empty=not spec.lo)
    elif kind in ("peer_id", "peer_id?"):
        check_peer_id(obj, name, allow_empty=kind.endswith("?"))
    elif kind in ("sha256", "sha256?"):
        check_sha256(obj, name, allow_empty=kind.endswith("?"))
    elif kind == "sig":
        check_sig(obj, name)
    elif kind == "choice" and get(obj, name) not in spec.choices:
        raise InvalidMessage(name, f"{get(obj, name)!r} is not one of {spec.choices}")
    # "custom": the message class checks it


def check_declared(obj: Any) -> None:
    for name, spec in declared(obj):
        check_field(obj, name, spec)
