from __future__ import annotations

import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fednode.aggregation import AdapterLayout, dump_delta, load_delta, validate_update
from fednode.errors import DecodeError, InvalidUpdate, LimitExceeded


def _update() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "m.q.lora_A.weight": torch.randn(4, 6, generator=g),
        "m.q.lora_B.weight": torch.randn(5, 4, generator=g),
        "head.weight": torch.randn(3, 5, generator=g),
    }


def test_roundtrip_is_exact_and_deterministic() -> None:
    u = _update()
    blob = dump_delta(u)
    again = dump_delta({k: v.t().contiguous().t() for k, v in reversed(list(u.items()))})  # other layout/order
    assert blob == again
    back = load_delta(blob)
    assert set(back) == set(u)
    for k in u:
        assert back[k].dtype == torch.float32 and back[k].is_contiguous()
        assert torch.equal(back[k], u[k])
    back["head.weight"].add_(1.0)  # owned copies: writable, and the blob is untouched
    assert torch.equal(load_delta(blob)["head.weight"], u["head.weight"])


def test_dump_converts_to_fp32() -> None:
    blob = dump_delta({"x": torch.ones(2, 2, dtype=torch.float64)})
    assert load_delta(blob)["x"].dtype == torch.float32


def test_size_limit_and_non_float_dtype() -> None:
    blob = dump_delta(_update())
    with pytest.raises(LimitExceeded):
        load_delta(blob, max_bytes=len(blob) - 1)
    ints = bytes(safetensors.torch.save({"x": torch.arange(4)}))
    with pytest.raises(InvalidUpdate, match="x: dtype I64"):
        load_delta(ints)


def _raw(header: bytes, data: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header + data


@pytest.mark.parametrize(
    ("blob", "reason"),
    [
        (b"", "shorter"),
        (_raw(b"{", b""), "not JSON"),
        (_raw(b"[1]", b""), "not a JSON object"),
        (struct.pack("<Q", 1 << 40) + b"{}", "header"),
        (_raw(b'{"x":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\0" * 4), "does not match"),
        (_raw(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"\0" * 8), "cover"),
        (_raw(b'{"x":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8), "gap"),
        (_raw(b'{"x":{"dtype":"Q9","shape":[1],"data_offsets":[0,4]}}', b"\0" * 4), "unknown dtype"),
        (_raw(b'{"x":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\0" * 4), "shape"),
        (_raw(b"[" * 100_000 + b"]" * 100_000, b""), "JSON"),
    ],
)
def test_malformed_bytes_are_decode_errors(blob: bytes, reason: str) -> None:
    with pytest.raises((DecodeError, LimitExceeded), match=reason):
        load_delta(blob)


VALID = dump_delta(_update())


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.lists(st.tuples(st.integers(0, len(VALID) - 1), st.integers(0, 255)), min_size=1, max_size=8).map(
            lambda edits: bytes(
                dict(edits).get(i, b) for i, b in enumerate(VALID)
            )
        ),
        st.integers(0, len(VALID)).map(lambda n: VALID[:n]),
    )
)
def test_load_delta_only_raises_typed_errors(blob: bytes) -> None:
    try:
        tensors = load_delta(blob)
    except (DecodeError, InvalidUpdate, LimitExceeded):
        return
    assert all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors.values())


def test_layout_json_roundtrip() -> None:
    layout = AdapterLayout.from_tensors(_update())
    assert AdapterLayout.from_json_dict(layout.to_json_dict()) == layout
    assert layout.num_parameters == 4 * 6 + 5 * 4 + 3 * 5
    with pytest.raises(DecodeError):
        AdapterLayout.from_json_dict({"x": ([2], "Q9")})


def _bad(key: str, value: torch.Tensor | None) -> dict[str, torch.Tensor]:
    u = _update()
    if value is None:
        del u[key]
    else:
        u[key] = value
    return u


@pytest.mark.parametrize(
    ("update", "reason"),
    [
        (_bad("head.weight", None), r"head\.weight: missing key"),
        (_bad("extra.weight", torch.zeros(1)), r"extra\.weight: unexpected key"),
        (_bad("head.weight", torch.zeros(5, 3)), r"head\.weight: shape \(5, 3\), expected \(3, 5\)"),
        (_bad("head.weight", torch.zeros(3, 5, dtype=torch.float16)), r"head\.weight: dtype torch\.float16"),
        (_bad("m.q.lora_A.weight", torch.full((4, 6), float("nan"))), r"m\.q\.lora_A\.weight: .*non-finite"),
        (_bad("m.q.lora_B.weight", torch.full((5, 4), float("inf"))), r"m\.q\.lora_B\.weight: .*non-finite"),
        (_bad("head.weight", torch.full((3, 5), 1e4)), r"norm .* over the bound max_norm=100"),
    ],
)
def test_validate_update_rejects_with_reason(update: dict[str, torch.Tensor], reason: str) -> None:
    layout = AdapterLayout.from_tensors(_update())
    with pytest.raises(InvalidUpdate, match=reason):
        validate_update(update, layout, max_norm=100.0)


def test_validate_update_accepts_and_returns_norm() -> None:
    u = _update()
    norm = validate_update(u, AdapterLayout.from_tensors(u), max_norm=100.0)
    expected = sum(float((t.double() ** 2).sum()) for t in u.values()) ** 0.5
    assert norm == pytest.approx(expected, rel=1e-12)
