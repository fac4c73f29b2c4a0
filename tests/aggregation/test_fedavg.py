from __future__ import annotations

import gc
import json
import struct
import tracemalloc
import weakref
from collections.abc import Iterator

import pytest
import torch

from fednode.aggregation import aggregate, dump_delta, fedavg
from fednode.errors import InconsistentUpdates, InvalidUpdate


def test_fedavg_matches_hand_computation() -> None:
    clients = [
        {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([[0.0]])},
        {"a": torch.tensor([3.0, -2.0]), "b": torch.tensor([[6.0]])},
        {"a": torch.tensor([0.0, 5.0]), "b": torch.tensor([[-3.0]])},
    ]
    samples = [10, 30, 60]
    # (10*1 + 30*3 + 60*0)/100 = 1.0 ; (10*2 - 30*2 + 60*5)/100 = 2.6 ; (0 + 180 - 180)/100 = 0
    expected = {"a": torch.tensor([1.0, 2.6]), "b": torch.tensor([[0.0]])}
    for updates in (clients, [dump_delta(c) for c in clients]):
        result = aggregate(updates, samples, "fedavg")
        assert result.method == "fedavg" and result.stats["clients"] == 3
        for k, v in expected.items():
            assert result.tensors[k].dtype == torch.float32
            torch.testing.assert_close(result.tensors[k], v, rtol=0, atol=1e-6)


def test_fedavg_float64_accumulation_is_accurate() -> None:
    g = torch.Generator().manual_seed(3)
    clients = [{"x": torch.randn(1000, generator=g) * 100 + 1e4} for _ in range(64)]
    weights = [float(i % 7 + 1) for i in range(64)]
    got = fedavg(zip(clients, weights, strict=True))["x"].double()
    ref = sum(w * c["x"].double() for c, w in zip(clients, weights, strict=True)) / sum(weights)
    assert float((got - ref).abs().max() / ref.abs().max()) < 1e-6


@pytest.mark.parametrize(
    ("second", "match"),
    [
        ({"a": torch.zeros(2), "c": torch.zeros(1)}, "client 1: key set"),
        ({"a": torch.zeros(3), "b": torch.zeros(1)}, r"client 1: a is \(3,\)"),
        ({"a": torch.zeros(2, dtype=torch.float16), "b": torch.zeros(1)}, "float16"),
    ],
)
def test_consistency_gate(second: dict[str, torch.Tensor], match: str) -> None:
    first = {"a": torch.zeros(2), "b": torch.zeros(1)}
    with pytest.raises(InconsistentUpdates, match=match):
        aggregate([first, second], [1, 1], "fedavg")


def test_bad_weights_and_empty_input() -> None:
    u = {"a": torch.zeros(2)}
    with pytest.raises(InvalidUpdate, match="client 1: weight"):
        aggregate([u, u], [1, float("nan")], "fedavg")
    with pytest.raises(InconsistentUpdates, match="sum to 0"):
        aggregate([u, u], [0, 0], "fedavg")
    with pytest.raises(InconsistentUpdates, match="no updates"):
        aggregate([], [], "fedavg")
    with pytest.raises(InconsistentUpdates, match="more updates than weights"):
        aggregate([u, u], [1], "fedavg")


SHAPES = {f"layer{i}.lora_A.weight": (8, 256) for i in range(8)}


def _client(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(i)
    return {k: torch.randn(s, generator=g) for k, s in SHAPES.items()}


def test_fedavg_keeps_at_most_one_client_alive() -> None:
    alive: set[int] = set()
    peak = [0]

    def gen(k: int) -> Iterator[dict[str, torch.Tensor]]:
        for i in range(k):  # refcounting frees tensors at once: no gc.collect needed
            peak[0] = max(peak[0], len(alive))
            c = _client(i)
            alive.add(i)
            for t in c.values():
                weakref.finalize(t, alive.discard, i)
            yield c
            del c

    aggregate(gen(64), [1.0] * 64, "fedavg")
    assert peak[0] <= 1  # when client i is built, every earlier client is already freed


TEMPLATES = [dump_delta(_client(i)) for i in range(4)]


def _peak_python_bytes(k: int) -> int:
    def gen() -> Iterator[bytes]:
        for i in range(k):
            yield bytes(bytearray(TEMPLATES[i % 4]))  # a fresh blob per client, as if just received

    gc.collect()
    tracemalloc.start()
    try:
        aggregate(gen(), (1.0 for _ in range(k)), "fedavg")
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_fedavg_peak_memory_flat_in_k() -> None:
    one_blob = len(TEMPLATES[0])
    _peak_python_bytes(4)  # warm-up: first-use caches
    small, large = _peak_python_bytes(4), _peak_python_bytes(64)
    assert large < small + one_blob // 2  # 16x the clients, not even half a blob more memory
    assert large < 4 * one_blob  # the generator briefly holds 2 copies (bytearray, bytes) + the current blob


def _blob(tensors: dict[str, torch.Tensor], order: list[str], dtype: str = "F32") -> bytes:
    """safetensors bytes with the tensors stored in `order` (our writer always sorts)."""
    header, data, offset = {}, b"", 0
    for key in order:
        raw = tensors[key].to(torch.float16 if dtype == "F16" else torch.float32).numpy().tobytes()
        header[key] = {"dtype": dtype, "shape": list(tensors[key].shape), "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    head = json.dumps(header).encode()
    return struct.pack("<Q", len(head)) + head + data


def test_fedavg_mixes_storage_orders_dtypes_and_dicts() -> None:
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.tensor([[4.0, 8.0]])}
    b = {"x": torch.tensor([3.0, 0.0]), "y": torch.tensor([[0.0, -8.0]])}
    updates = [_blob(a, ["x", "y"]), _blob(b, ["y", "x"]), a, b, dump_delta(a)]
    got = aggregate(updates, [1, 1, 1, 1, 1], "fedavg").tensors
    torch.testing.assert_close(got["x"], torch.tensor([9 / 5, 6 / 5]), rtol=0, atol=1e-6)
    torch.testing.assert_close(got["y"], torch.tensor([[12 / 5, 8 / 5]]), rtol=0, atol=1e-6)
    with pytest.raises(InconsistentUpdates, match=r"client 1: x is .*float16"):
        aggregate([dump_delta(a), _blob(a, ["x", "y"], "F16")], [1, 1], "fedavg")
