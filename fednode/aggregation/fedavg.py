"""Streaming FedAvg: the num_samples-weighted mean of every tensor, with one float64 running
accumulator, so memory does not grow with the number of clients. Also the shared helpers every
rule uses: decoding an update given as bytes or tensors, checking weights, and the consistency
gate (Flower style: keys, shapes and dtypes must agree across clients)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import torch

from fednode.aggregation.delta import DEFAULT_MAX_DELTA_BYTES, AdapterLayout, TensorDict, delta_views
from fednode.errors import InconsistentUpdates, InvalidUpdate

Update = bytes | bytearray | memoryview | Mapping[str, torch.Tensor]


def as_tensors(update: Update, *, max_bytes: int = DEFAULT_MAX_DELTA_BYTES) -> Mapping[str, torch.Tensor]:
    """Bytes are decoded into read-only views (no copy); a tensor mapping is used as given."""
    if isinstance(update, bytes | bytearray | memoryview):
        return delta_views(update, max_bytes=max_bytes)
    return update


def check_weight(index: int, weight: float) -> float:
    w = float(weight)
    if not math.isfinite(w) or w < 0.0:
        raise InvalidUpdate(f"client {index}: weight {weight!r} must be finite and non-negative")
    return w


def normalized_weights(weights: Sequence[float]) -> list[float]:
    ws = [check_weight(i, w) for i, w in enumerate(weights)]
    total = math.fsum(ws)
    if not ws or total <= 0.0:
        raise InconsistentUpdates(f"weights {list(weights)!r} sum to {total}; nothing to aggregate")
    return [w / total for w in ws]


def check_consistent(
    index: int, tensors: Mapping[str, torch.Tensor], layout: AdapterLayout, *, shapes: bool = True
) -> None:
    """Raise `InconsistentUpdates` naming client `index` and the key if it disagrees with `layout`
    (keys and dtypes; shapes too unless `shapes` is False, for mixed-rank LoRA clients)."""
    keys = layout.keys()
    if len(tensors) != len(keys) or set(tensors) != set(keys):
        diff = sorted(set(tensors) ^ set(keys))
        raise InconsistentUpdates(f"client {index}: key set differs from client 0 (first difference {diff[0]})")
    for entry in layout.entries:
        t = tensors[entry.key]
        if (shapes and tuple(t.shape) != entry.shape) or t.dtype != entry.dtype:
            raise InconsistentUpdates(
                f"client {index}: {entry.key} is {tuple(t.shape)} {t.dtype}, client 0 has {entry.shape} {entry.dtype}"
            )


def materialize(
    updates: Iterable[Update], *, max_bytes: int = DEFAULT_MAX_DELTA_BYTES, shapes: bool = True
) -> list[Mapping[str, torch.Tensor]]:
    """Decode every update and pass the consistency gate (for rules that need all clients at once)."""
    clients = [as_tensors(u, max_bytes=max_bytes) for u in updates]
    if not clients:
        raise InconsistentUpdates("no updates to aggregate")
    layout = AdapterLayout.from_tensors(clients[0])
    for i, c in enumerate(clients[1:], start=1):
        check_consistent(i, c, layout, shapes=shapes)
    return clients


def fedavg(
    weighted_updates: Iterable[tuple[Update, float]], *, max_bytes: int = DEFAULT_MAX_DELTA_BYTES
) -> TensorDict:
    """sum_i w_i u_i / sum_i w_i for every tensor, output fp32. Consumes the iterable once and holds
    only one client's update at a time plus the float64 accumulator."""
    acc: dict[str, torch.Tensor] = {}
    layout: AdapterLayout | None = None
    weights: list[float] = []
    index = -1
    for pair in weighted_updates:  # no enumerate: its reused tuple would pin the previous client
        index += 1
        update, w = pair[0], check_weight(index, pair[1])
        del pair
        tensors = as_tensors(update, max_bytes=max_bytes)
        if layout is None:
            layout = AdapterLayout.from_tensors(tensors)
            acc = {e.key: torch.zeros(e.shape, dtype=torch.float64) for e in layout.entries}
        else:
            check_consistent(index, tensors, layout)
        if w > 0.0:
            for key, t in tensors.items():
                acc[key].add_(t, alpha=w)
        weights.append(w)
        del tensors, update  # hold one client at a time
    if layout is None:
        raise InconsistentUpdates("no updates to aggregate")
    total = math.fsum(weights)
    if total <= 0.0:
        raise InconsistentUpdates(f"weights of {len(weights)} clients sum to {total}; nothing to aggregate")
    return {key: a.div_(total).to(torch.float32) for key, a in acc.items()}
