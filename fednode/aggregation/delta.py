"""Adapter deltas as bytes: a strict safetensors reader and a deterministic writer, the adapter
layout a round expects, and the checks an update must pass before it is aggregated.

The reader parses the safetensors header itself (size limits, dtype whitelist, offsets that tile
the data exactly) so that hostile bytes surface as `DecodeError` / `InvalidUpdate` / `LimitExceeded`
and never as a crash or an oversized allocation. Pickle is never involved.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fednode.errors import DecodeError, InvalidUpdate, LimitExceeded

DEFAULT_MAX_DELTA_BYTES = 256 * 1024 * 1024
"""Largest delta blob accepted (SmolLM2-135M q/k/v/o at r=16 is 7.4 MB)."""
DEFAULT_MAX_HEADER_BYTES = 4 * 1024 * 1024
"""Largest safetensors JSON header accepted."""
DEFAULT_MAX_TENSORS = 8192
"""Most tensors one delta may hold."""
DEFAULT_MAX_UPDATE_NORM = 1.0e3
"""Default bound on the global L2 norm of one client's update (all tensors together)."""

_FLOAT_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_OTHER_DTYPES = frozenset({"BOOL", "U8", "I8", "I16", "U16", "I32", "U32", "I64", "U64", "F8_E4M3", "F8_E5M2"})
_DTYPE_NAMES = {v: k for k, v in _FLOAT_DTYPES.items()}

TensorDict = dict[str, torch.Tensor]


def _header(data: bytes | bytearray | memoryview, max_bytes: int) -> tuple[dict[str, Any], int]:
    size = len(data)
    if size > max_bytes:
        raise LimitExceeded(f"delta is {size} bytes, over max_delta_bytes={max_bytes}")
    if size < 8:
        raise DecodeError(f"delta is {size} bytes, shorter than the 8-byte safetensors length prefix")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > DEFAULT_MAX_HEADER_BYTES:
        raise LimitExceeded(f"safetensors header is {n} bytes, over DEFAULT_MAX_HEADER_BYTES")
    if n > size - 8:
        raise DecodeError(f"safetensors header length {n} runs past the end of {size} bytes")
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except (ValueError, RecursionError) as exc:
        raise DecodeError(f"safetensors header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise DecodeError("safetensors header is not a JSON object")
    return header, 8 + n


def _entry(key: str, spec: object, data_len: int) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    if not isinstance(spec, dict) or set(spec) != {"dtype", "shape", "data_offsets"}:
        raise DecodeError(f"{key}: tensor entry must have exactly dtype, shape, data_offsets")
    name, shape, offsets = spec["dtype"], spec["shape"], spec["data_offsets"]
    if not isinstance(name, str) or (name not in _FLOAT_DTYPES and name not in _OTHER_DTYPES):
        raise DecodeError(f"{key}: unknown dtype {name!r}")
    if name not in _FLOAT_DTYPES:
        raise InvalidUpdate(f"{key}: dtype {name} is not a floating-point dtype")
    if not isinstance(shape, list) or not all(type(s) is int and s >= 0 for s in shape) or len(shape) > 8:
        raise DecodeError(f"{key}: shape must be a list of at most 8 non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] <= data_len
    ):
        raise DecodeError(f"{key}: data_offsets {offsets!r} outside the {data_len}-byte data section")
    dtype = _FLOAT_DTYPES[name]
    if math.prod(shape) * dtype.itemsize != offsets[1] - offsets[0]:
        raise DecodeError(f"{key}: shape {shape} x {name} does not match data_offsets {offsets}")
    return dtype, tuple(shape), offsets[0], offsets[1]


_Parsed = tuple[int, list[tuple[str, torch.dtype, tuple[int, ...], int, int]]]


def _parse(data: bytes | bytearray | memoryview, max_bytes: int) -> _Parsed:
    """Validate the whole header; return the data start and the entries in data-offset order."""
    header, start = _header(data, max_bytes)
    data_len = len(data) - start
    header.pop("__metadata__", None)
    if len(header) > DEFAULT_MAX_TENSORS:
        raise LimitExceeded(f"delta holds {len(header)} tensors, over DEFAULT_MAX_TENSORS")
    entries = sorted(((key, *_entry(key, spec, data_len)) for key, spec in header.items()),
                     key=lambda e: (e[3], e[4]))
    cursor = 0
    for key, _, _, begin, end in entries:
        if begin != cursor:
            raise DecodeError(f"{key}: data_offsets leave a gap or overlap at byte {cursor}")
        cursor = end
    if cursor != data_len:
        raise DecodeError(f"tensors cover {cursor} of {data_len} data bytes")
    return start, entries


def _frombuffer(data: bytes | bytearray | memoryview, dtype: torch.dtype, offset: int, nbytes: int) -> torch.Tensor:
    with warnings.catch_warnings():
        # frombuffer warns that `bytes` is not writable; our views are documented read-only.
        warnings.simplefilter("ignore", UserWarning)
        return torch.frombuffer(data, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)


def delta_views(
    data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_DELTA_BYTES
) -> TensorDict:
    """Decode without copying: READ-ONLY tensors that view `data` (which they keep alive).
    Callers must not write into them; `load_delta` returns owned copies."""
    start, entries = _parse(data, max_bytes)
    out: TensorDict = {}
    for key, dtype, shape, begin, end in entries:
        if begin == end:
            out[key] = torch.zeros(shape, dtype=dtype)
        else:
            out[key] = _frombuffer(data, dtype, start + begin, end - begin).view(shape)
    return out


@dataclass(frozen=True)
class FlatDelta:
    layout: tuple[LayoutEntry, ...]
    """Entries in storage order."""
    flat: torch.Tensor
    """One read-only fp32 view of the whole data section (the entries' concatenation)."""
    prefix: bytes
    """Length prefix + header, to recognise a blob with the same header without parsing it again."""
    size: int


def delta_flat(
    data: bytes | bytearray | memoryview,
    *,
    max_bytes: int = DEFAULT_MAX_DELTA_BYTES,
    template: FlatDelta | None = None,
) -> FlatDelta | None:
    """If every tensor is fp32: a `FlatDelta`, so FedAvg adds a client in one operation; else None.
    A blob of `template`'s size whose header bytes equal `template`'s is not parsed again."""
    if template is not None and len(data) == template.size and len(data) <= max_bytes:
        start = len(template.prefix)
        if bytes(data[:start]) == template.prefix:
            flat = _frombuffer(data, torch.float32, start, len(data) - start) if len(data) > start else torch.zeros(0)
            return FlatDelta(template.layout, flat, template.prefix, template.size)
    start, entries = _parse(data, max_bytes)
    if not entries or any(dtype != torch.float32 for _, dtype, _, _, _ in entries):
        return None
    layout = tuple(LayoutEntry(key, shape, dtype) for key, dtype, shape, _, _ in entries)
    nbytes = len(data) - start
    flat = _frombuffer(data, torch.float32, start, nbytes) if nbytes else torch.zeros(0)
    return FlatDelta(layout, flat, bytes(data[:start]), len(data))


def load_delta(data: bytes | bytearray | memoryview, *, max_bytes: int = DEFAULT_MAX_DELTA_BYTES) -> TensorDict:
    """Decode safetensors bytes into owned CPU tensors. Raises `DecodeError` (malformed bytes),
    `InvalidUpdate` (well-formed but a non-float dtype) or `LimitExceeded` (over a size limit)."""
    return {key: t.clone() for key, t in delta_views(data, max_bytes=max_bytes).items()}


def dump_delta(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """Encode as safetensors: contiguous fp32 CPU tensors in key order, no metadata, header padded
    with spaces to 8 bytes (as the reference writer does). Equal input gives equal bytes."""
    keys = sorted(tensors)
    plain = [tensors[k].detach().to("cpu", torch.float32) for k in keys]
    header: dict[str, Any] = {}
    offset = 0
    for key, t in zip(keys, plain, strict=True):
        n = t.numel() * 4
        header[key] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    # One allocation and one copy of the data: bytes.join reads each tensor's buffer in place
    # (a zeroed bytearray filled and then copied to bytes costs three passes and twice the pages).
    parts: list[Any] = [len(head).to_bytes(8, "little"), head]
    parts += [t.contiguous().numpy().reshape(-1).view(np.uint8) for t in plain if t.numel()]
    return b"".join(parts)


@dataclass(frozen=True)
class LayoutEntry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class AdapterLayout:
    """The keys, shapes and dtypes a round's updates must have (sorted by key)."""

    entries: tuple[LayoutEntry, ...]

    def __post_init__(self) -> None:
        keys = [e.key for e in self.entries]
        if keys != sorted(set(keys)):
            raise ValueError("AdapterLayout entries must be sorted by key and unique")

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> AdapterLayout:
        return cls(tuple(LayoutEntry(k, tuple(tensors[k].shape), tensors[k].dtype) for k in sorted(tensors)))

    @classmethod
    def from_json_dict(cls, spec: Mapping[str, tuple[list[int], str]]) -> AdapterLayout:
        """Inverse of `to_json_dict`: {key: [shape, dtype name such as "F32"]}."""
        try:
            return cls(tuple(LayoutEntry(k, tuple(int(s) for s in spec[k][0]), _FLOAT_DTYPES[spec[k][1]])
                             for k in sorted(spec)))
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise DecodeError(f"malformed adapter layout: {exc!r}") from None

    def to_json_dict(self) -> dict[str, tuple[list[int], str]]:
        return {e.key: (list(e.shape), _DTYPE_NAMES[e.dtype]) for e in self.entries}

    def keys(self) -> tuple[str, ...]:
        return tuple(e.key for e in self.entries)

    @property
    def num_parameters(self) -> int:
        return sum(math.prod(e.shape) for e in self.entries)


def validate_update(
    tensors: Mapping[str, torch.Tensor],
    layout: AdapterLayout,
    *,
    max_norm: float | None = DEFAULT_MAX_UPDATE_NORM,
) -> float:
    """Check one client's update against the round's layout; return its global L2 norm.
    Raises `InvalidUpdate` naming the key and the problem."""
    expected = {e.key: e for e in layout.entries}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise InvalidUpdate(f"{missing[0]}: missing key ({len(missing)} missing in all)")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise InvalidUpdate(f"{extra[0]}: unexpected key ({len(extra)} extra in all)")
    square_sum = 0.0
    for key, entry in expected.items():
        t = tensors[key]
        if tuple(t.shape) != entry.shape:
            raise InvalidUpdate(f"{key}: shape {tuple(t.shape)}, expected {entry.shape}")
        if t.dtype != entry.dtype:
            raise InvalidUpdate(f"{key}: dtype {t.dtype}, expected {entry.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise InvalidUpdate(f"{key}: holds non-finite values (NaN or Inf)")
        square_sum += float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
    norm = math.sqrt(square_sum)
    if max_norm is not None and not norm <= max_norm:
        raise InvalidUpdate(f"update L2 norm {norm:.6g} is over the bound max_norm={max_norm:g}")
    return norm


assert sys.byteorder == "little", "safetensors is little-endian; frombuffer views assume a little-endian host"
