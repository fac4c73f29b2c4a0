"""The one entry point: `aggregate(updates, weights, method, ...)`.

`RULES` is the registry: one implementation per wire name. The names themselves are declared once,
in `fednode.wire.messages.AGGREGATION_METHODS` (what a manifest may name); tests/aggregation
checks that every name has exactly one rule here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fednode.aggregation.delta import DEFAULT_MAX_DELTA_BYTES, TensorDict
from fednode.aggregation.exact import DEFAULT_MAX_BATCH_BYTES, exact, stacked
from fednode.aggregation.fedavg import Update, check_weight, fedavg, materialize
from fednode.aggregation.robust import DEFAULT_TRIM_BETA, clipped_fedavg, coordinate_median, trimmed_mean
from fednode.errors import InconsistentUpdates, LocalProtocolError
from fednode.wire.messages import AGGREGATION_METHODS


@dataclass(frozen=True)
class AggregationOptions:
    trim_beta: float = DEFAULT_TRIM_BETA
    """trimmed_mean: fraction dropped from each end, per coordinate."""
    clip_norm: float | None = None
    """clipped_fedavg: per-client L2 bound; None = median of the client norms (not allowed with DP)."""
    dp_noise_multiplier: float = 0.0
    """clipped_fedavg: Gaussian noise std = multiplier * clip_norm * max normalized weight; 0 = off."""
    dp_seed: int | None = None
    """Seed of the DP noise generator; None = OS-random (the private choice)."""
    client_alphas: tuple[float, ...] | None = None
    """exact/stacked: each client's lora_alpha (scale alpha_i / r_i); None = the `alpha` argument."""
    max_delta_bytes: int = DEFAULT_MAX_DELTA_BYTES
    exact_max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES
    """exact: float64 working set of one batch of equal-shape modules (bounds its extra memory)."""


@dataclass(frozen=True)
class AggregateResult:
    tensors: TensorDict
    method: str
    discarded_energy: float | None
    """exact: fraction of the target's squared Frobenius norm dropped by rank truncation; else None."""
    stats: dict[str, Any] = field(default_factory=dict)


def aggregate(
    updates: Iterable[Update],
    weights: Iterable[float],
    method: str,
    *,
    rank: int | None = None,
    alpha: float | None = None,
    options: AggregationOptions | None = None,
) -> AggregateResult:
    """Aggregate client updates (safetensors bytes or tensor dicts) weighted by `weights`
    (num_samples). `fedavg` streams: pass generators and memory stays flat in the client count."""
    opts = options if options is not None else AggregationOptions()
    rule = RULES.get(method)
    if rule is None:
        raise LocalProtocolError(f"unknown aggregation method {method!r}; known: {', '.join(AGGREGATION_METHODS)}")
    return rule(updates, weights, method, rank, alpha, opts)


Rule = Callable[[Iterable[Update], Iterable[float], str, "int | None", "float | None", AggregationOptions],
                AggregateResult]


def _streaming_fedavg(updates: Iterable[Update], weights: Iterable[float], method: str, rank: int | None,
                      alpha: float | None, opts: AggregationOptions) -> AggregateResult:
    counter = [0]

    def pairs() -> Iterator[tuple[Update, float]]:
        # Not zip/enumerate: their reused result tuple would keep the previous client alive.
        weight_iter = iter(weights)
        for update in updates:
            weight = next(weight_iter, None)
            if weight is None:
                raise InconsistentUpdates(f"more updates than weights ({counter[0]} weights)")
            counter[0] += 1
            yield update, weight
            del update
        if next(weight_iter, None) is not None:
            raise InconsistentUpdates(f"more weights than updates ({counter[0]} updates)")

    tensors = fedavg(pairs(), max_bytes=opts.max_delta_bytes)
    return AggregateResult(tensors, method, None, {"clients": counter[0]})


def _materialized(updates: Iterable[Update], weights: Iterable[float], opts: AggregationOptions, *,
                  shapes: bool) -> tuple[list[Mapping[str, torch.Tensor]], Sequence[float], dict[str, Any]]:
    clients = materialize(updates, max_bytes=opts.max_delta_bytes, shapes=shapes)
    ws: Sequence[float] = [check_weight(i, w) for i, w in enumerate(weights)]
    if len(ws) != len(clients):
        raise InconsistentUpdates(f"{len(clients)} updates but {len(ws)} weights")
    return clients, ws, {"clients": len(clients)}


def _lora(updates: Iterable[Update], weights: Iterable[float], method: str, rank: int | None,
          alpha: float | None, opts: AggregationOptions) -> AggregateResult:
    # exact and stacked check factor shapes themselves: ranks may differ between clients
    clients, ws, stats = _materialized(updates, weights, opts, shapes=False)
    if method == "exact":
        merged = exact(clients, ws, rank=rank, alpha=alpha, client_alphas=opts.client_alphas,
                       max_batch_bytes=opts.exact_max_batch_bytes)
    else:
        merged = stacked(clients, ws, rank=rank, alpha=alpha, client_alphas=opts.client_alphas)
    stats.update(rank=merged.rank, alpha=merged.alpha, module_discarded_energy=merged.module_discarded_energy)
    discarded = merged.discarded_energy if method == "exact" else None
    return AggregateResult(merged.tensors, method, discarded, stats)


def _median(updates: Iterable[Update], weights: Iterable[float], method: str, rank: int | None,
            alpha: float | None, opts: AggregationOptions) -> AggregateResult:
    clients, _, stats = _materialized(updates, weights, opts, shapes=True)
    return AggregateResult(coordinate_median(clients), method, None, stats)


def _trimmed_mean(updates: Iterable[Update], weights: Iterable[float], method: str, rank: int | None,
                  alpha: float | None, opts: AggregationOptions) -> AggregateResult:
    clients, _, stats = _materialized(updates, weights, opts, shapes=True)
    stats["trim_beta"] = opts.trim_beta
    return AggregateResult(trimmed_mean(clients, opts.trim_beta), method, None, stats)


def _clipped_fedavg(updates: Iterable[Update], weights: Iterable[float], method: str, rank: int | None,
                    alpha: float | None, opts: AggregationOptions) -> AggregateResult:
    clients, ws, stats = _materialized(updates, weights, opts, shapes=True)
    gen = None if opts.dp_seed is None else torch.Generator().manual_seed(opts.dp_seed)
    clipped = clipped_fedavg(clients, ws, clip_norm=opts.clip_norm, noise_multiplier=opts.dp_noise_multiplier,
                             generator=gen)
    stats.update(clip_norm=clipped.clip_norm, client_norms=list(clipped.client_norms), clipped=clipped.clipped,
                 noise_std=clipped.noise_std)
    return AggregateResult(clipped.tensors, method, None, stats)


# The registry: wire name -> rule. Keys must be exactly AGGREGATION_METHODS (tests/aggregation).
RULES: dict[str, Rule] = {
    "fedavg": _streaming_fedavg,
    "exact": _lora,
    "stacked": _lora,
    "median": _median,
    "trimmed_mean": _trimmed_mean,
    "clipped_fedavg": _clipped_fedavg,
}
