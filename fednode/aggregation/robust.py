"""Robust aggregation rules and optional differential-privacy noise.

All rules act on the raw tensors of each update (for LoRA: each factor, coordinate by coordinate,
like FedAvg of factors), after the consistency gate:
- `coordinate_median`: unweighted per-coordinate median (the mean of the two middle values for even K).
- `trimmed_mean(beta)`: per coordinate, drop the floor(beta K) smallest and largest values, average the rest
  (unweighted).
- `clipped_fedavg`: scale each client's whole update (global L2 norm over all its tensors) down to
  `clip_norm` (default: the median of the client norms), then take the weighted mean.
  With `noise_multiplier` > 0 it is the Gaussian mechanism of DP-FedAvg: clip_norm must be a fixed,
  configured value (a data-dependent bound would leak), and N(0, std^2) noise is added to every
  coordinate with std = noise_multiplier * clip_norm * max_i w_i (w normalized to sum 1) — the L2
  sensitivity of the weighted mean to one client's clipped update. Noise comes from the given
  `torch.Generator` (seeded: reproducible, for tests) or else from an OS-random seed.
  Privacy accounting (epsilon over rounds) is the caller's business; this module applies the mechanism.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fednode.aggregation.delta import TensorDict
from fednode.aggregation.fedavg import fedavg, normalized_weights
from fednode.errors import InconsistentUpdates, LocalProtocolError

DEFAULT_TRIM_BETA = 0.2
"""Fraction trimmed from each end by trimmed_mean (0.2 of 5 clients = 1 from each end)."""


def _stacked(clients: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    return torch.stack([c[key].float() for c in clients])


def coordinate_median(clients: Sequence[Mapping[str, torch.Tensor]]) -> TensorDict:
    if not clients:
        raise InconsistentUpdates("no updates to aggregate")
    n = len(clients)
    out: TensorDict = {}
    for key in clients[0]:
        values = _stacked(clients, key).sort(dim=0).values
        mid = values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2
        out[key] = mid.contiguous()
    return out


def trimmed_mean(clients: Sequence[Mapping[str, torch.Tensor]], beta: float = DEFAULT_TRIM_BETA) -> TensorDict:
    if not clients:
        raise InconsistentUpdates("no updates to aggregate")
    if not 0.0 <= beta < 0.5:
        raise LocalProtocolError(f"trim beta {beta} must be in [0, 0.5)")
    n = len(clients)
    cut = math.floor(beta * n)
    if n - 2 * cut < 1:
        raise InconsistentUpdates(f"trimming {cut} from each end of {n} clients leaves nothing")
    out: TensorDict = {}
    for key in clients[0]:
        values = _stacked(clients, key).sort(dim=0).values
        out[key] = values[cut : n - cut].mean(dim=0).contiguous()
    return out


def update_norm(tensors: Mapping[str, torch.Tensor]) -> float:
    return math.sqrt(math.fsum(float(torch.linalg.vector_norm(t, dtype=torch.float64)) ** 2
                               for t in tensors.values()))


@dataclass(frozen=True)
class ClippedResult:
    tensors: TensorDict
    clip_norm: float
    client_norms: tuple[float, ...]
    clipped: int
    """How many clients were scaled down."""
    noise_std: float


def clipped_fedavg(
    clients: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    clip_norm: float | None = None,
    noise_multiplier: float = 0.0,
    generator: torch.Generator | None = None,
) -> ClippedResult:
    """Clip every client's update to `clip_norm` (default: median client norm), weighted mean,
    then optional Gaussian noise (see the module docstring)."""
    ws = normalized_weights(weights)
    if len(ws) != len(clients):
        raise InconsistentUpdates("weights must have one entry per client")
    if not math.isfinite(noise_multiplier) or noise_multiplier < 0:
        raise LocalProtocolError(f"noise_multiplier {noise_multiplier} must be finite and >= 0")
    if noise_multiplier > 0 and clip_norm is None:
        raise LocalProtocolError("DP noise needs a fixed clip_norm; a data-dependent bound is not private")
    norms = tuple(update_norm(c) for c in clients)
    bound = float(statistics.median(norms)) if clip_norm is None else float(clip_norm)
    if not math.isfinite(bound) or bound < 0:
        raise LocalProtocolError(f"clip_norm {bound} must be finite and >= 0")
    factors = [min(1.0, bound / n) if n > 0 else 1.0 for n in norms]
    mean = fedavg(
        ({k: t.float() * f for k, t in c.items()} if f < 1.0 else c, w)
        for c, w, f in zip(clients, ws, factors, strict=True)
    )
    std = noise_multiplier * bound * max(ws)
    if std > 0:
        gen = generator
        if gen is None:  # no seed given: an OS-random seed, as a published seed would undo the privacy
            gen = torch.Generator()
            gen.seed()
        for key in sorted(mean):
            t = mean[key]
            t.add_(torch.randn(t.shape, generator=gen, dtype=torch.float32) * std)
    return ClippedResult(mean, bound, norms, sum(f < 1.0 for f in factors), std)
