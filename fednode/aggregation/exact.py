"""Exact LoRA aggregation (see DESIGN.md, "Aggregation math").

For each adapted module the target is dW = sum_i w_i s_i B_i A_i, with s_i = alpha_i / r_i the
client's LoRA scale (so clients of different ranks mix correctly). `exact` returns the best rank-r
approximation (Eckart–Young) as factors (B', A') with s_out B' A' ~= dW, s_out = alpha / r, without
forming dW: stack Bc = [c_1 B_1 .. c_K B_K] (d x R, c_i = w_i s_i / s_out) and Ac = [A_1; ..; A_K]
(R x k), R = sum r_i; QR both (Bc = Q1 R1, Ac^T = Q2 R2), take the top r singular triplets of the
small core C = R1 R2^T and map back. When R >= d (or R >= k) the identity is already an orthonormal
basis of that side, so its QR is skipped; the core is never larger than min(d, R) x min(k, R).
The core's top-r triplets come from a float64 eigendecomposition of its smaller Gram matrix.
Modules of equal shapes and ranks (e.g. q_proj in every layer) are processed as one batch.

`stacked` concatenates the factors instead: rank R, exact to floating-point rounding.
Tensors that are not LoRA factors (e.g. a classifier head) are averaged linearly, which is exact.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fednode.aggregation.delta import TensorDict
from fednode.aggregation.fedavg import fedavg, normalized_weights
from fednode.errors import InconsistentUpdates

LORA_A_SUFFIX = ".lora_A.weight"
LORA_B_SUFFIX = ".lora_B.weight"


@dataclass(frozen=True)
class LoraKeys:
    modules: tuple[str, ...]
    """Module prefixes that have both `<prefix>.lora_A.weight` and `<prefix>.lora_B.weight`."""
    plain: tuple[str, ...]
    """Every other key."""


def split_lora_keys(keys: Sequence[str]) -> LoraKeys:
    a = {k[: -len(LORA_A_SUFFIX)] for k in keys if k.endswith(LORA_A_SUFFIX)}
    b = {k[: -len(LORA_B_SUFFIX)] for k in keys if k.endswith(LORA_B_SUFFIX)}
    if a != b:
        odd = sorted(a ^ b)[0]
        raise InconsistentUpdates(f"{odd}: LoRA factor without its partner (need lora_A and lora_B)")
    plain = tuple(sorted(k for k in keys if not (k.endswith(LORA_A_SUFFIX) or k.endswith(LORA_B_SUFFIX))))
    return LoraKeys(tuple(sorted(a)), plain)


@dataclass(frozen=True)
class LoraAggregate:
    tensors: TensorDict
    rank: int
    alpha: float
    """lora_alpha to write into adapter_config.json so that PEFT's scale alpha/rank is right."""
    discarded_energy: float
    """Fraction of sum over modules of ||dW||_F^2 that the rank truncation dropped (0 for stacked)."""
    module_discarded_energy: dict[str, float]


def _plan(
    clients: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    alpha: float | None,
    rank: int | None,
    client_alphas: Sequence[float] | None,
) -> tuple[LoraKeys, dict[str, list[float]], dict[str, tuple[int, int, tuple[int, ...]]], int]:
    """Check factor shapes across clients; return per-module factor multipliers c_i and (d, k, ranks)."""
    if not clients:
        raise InconsistentUpdates("no updates to aggregate")
    if len(weights) != len(clients) or (client_alphas is not None and len(client_alphas) != len(clients)):
        raise InconsistentUpdates("weights / client_alphas must have one entry per client")
    keys = split_lora_keys(list(clients[0]))
    for i, c in enumerate(clients[1:], start=1):
        if set(c) != set(clients[0]):
            raise InconsistentUpdates(f"client {i}: key set differs from client 0")
    shapes: dict[str, tuple[int, int, tuple[int, ...]]] = {}
    for m in keys.modules:
        d, k = clients[0][m + LORA_B_SUFFIX].shape[0], clients[0][m + LORA_A_SUFFIX].shape[1]
        ranks = []
        for i, c in enumerate(clients):
            a, b = c[m + LORA_A_SUFFIX], c[m + LORA_B_SUFFIX]
            if a.dim() != 2 or b.dim() != 2 or b.shape[0] != d or a.shape[1] != k or a.shape[0] != b.shape[1]:
                raise InconsistentUpdates(
                    f"client {i}: {m} has lora_A {tuple(a.shape)}, lora_B {tuple(b.shape)};"
                    f" expected (r x {k}), ({d} x r)"
                )
            ranks.append(a.shape[0])
        shapes[m] = (d, k, tuple(ranks))
    out_rank = rank if rank is not None else max((max(s[2]) for s in shapes.values()), default=1)
    if out_rank < 1:
        raise InconsistentUpdates(f"output rank {out_rank} must be at least 1")
    s_out = alpha / out_rank if alpha is not None else 1.0
    factors: dict[str, list[float]] = {}
    for m in keys.modules:
        ranks = list(shapes[m][2])
        scales = [
            (client_alphas[i] if client_alphas is not None else (alpha if alpha is not None else r)) / r
            for i, r in enumerate(ranks)
        ]
        factors[m] = [w * s / s_out for w, s in zip(weights, scales, strict=True)]
    return keys, factors, shapes, out_rank


def _stack(
    clients: Sequence[Mapping[str, torch.Tensor]], modules: Sequence[str], factors: Mapping[str, list[float]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Bc (G x d x R) and Ac (G x R x k) for a group of modules of equal shape, in float32."""
    bc = torch.stack([
        torch.cat([c[m + LORA_B_SUFFIX].float() * f for c, f in zip(clients, factors[m], strict=True)], dim=1)
        for m in modules
    ])
    ac = torch.stack([torch.cat([c[m + LORA_A_SUFFIX].float() for c in clients], dim=0) for m in modules])
    return bc, ac


def _top_r(core: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For a batch of cores (G x m1 x m2): X (G x m1 x r), Y (G x r x m2) with X Y the best rank-r
    approximation, plus kept and total squared Frobenius norms (G,). Computed in float64."""
    c = core.double()
    rows_side = c.shape[1] <= c.shape[2]
    gram = c @ c.mT if rows_side else c.mT @ c
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    total = evals.clamp_min(0).sum(dim=1)
    keep = min(r, gram.shape[1])
    lam = evals[:, -keep:].flip(1).clamp_min(0)
    vec = evecs[:, :, -keep:].flip(2)
    sigma = lam.sqrt()
    root = sigma.sqrt()
    tiny = sigma > sigma[:, :1].clamp_min(1e-300) * 1e-12
    inv_root = torch.where(tiny, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    if rows_side:
        x = vec * root[:, None, :]
        y = (vec * inv_root[:, None, :]).mT @ c
    else:
        y = (vec * root[:, None, :]).mT
        x = c @ (vec * inv_root[:, None, :])
    if keep < r:  # pad to the requested rank with zero factors
        x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], r - keep)], dim=2)
        y = torch.cat([y, y.new_zeros(y.shape[0], r - keep, y.shape[2])], dim=1)
    return x, y, lam.sum(dim=1), total


def exact(
    clients: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    alpha: float | None = None,
    client_alphas: Sequence[float] | None = None,
) -> LoraAggregate:
    """Best rank-`rank` factors of sum_i w_i s_i B_i A_i per module (weights are normalized here).
    rank defaults to the largest client rank; alpha=None means every scale is 1."""
    weights = normalized_weights(weights)
    keys, factors, shapes, out_rank = _plan(clients, weights, alpha, rank, client_alphas)
    groups: dict[tuple[int, int, tuple[int, ...]], list[str]] = defaultdict(list)
    for m in keys.modules:
        groups[shapes[m]].append(m)
    out: TensorDict = {}
    kept_total = energy_total = 0.0
    per_module: dict[str, float] = {}
    for (d, k, ranks), modules in groups.items():
        bc, ac = _stack(clients, modules, factors)
        big_r = sum(ranks)
        q1, r1 = torch.linalg.qr(bc) if big_r < d else (None, bc)
        q2, r2 = torch.linalg.qr(ac.mT) if big_r < k else (None, ac.mT)
        x, y, kept, total = _top_r(r1 @ r2.mT, out_rank)
        new_b = (q1.double() @ x if q1 is not None else x).float()
        new_a = (y @ q2.double().mT if q2 is not None else y).float()
        for j, m in enumerate(modules):
            out[m + LORA_B_SUFFIX] = new_b[j].contiguous()
            out[m + LORA_A_SUFFIX] = new_a[j].contiguous()
            t, kp = float(total[j]), float(kept[j])
            per_module[m] = max(0.0, 1.0 - kp / t) if t > 0 else 0.0
            kept_total += kp
            energy_total += t
    out.update(_plain_mean(clients, weights, keys.plain))
    discarded = max(0.0, 1.0 - kept_total / energy_total) if energy_total > 0 else 0.0
    s_out = alpha / out_rank if alpha is not None else 1.0
    return LoraAggregate(out, out_rank, s_out * out_rank, discarded, per_module)


def stacked(
    clients: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    alpha: float | None = None,
    client_alphas: Sequence[float] | None = None,
) -> LoraAggregate:
    """Concatenate the factors: rank R = sum_i r_i per module, B' A' s_out = sum_i w_i s_i B_i A_i exactly.
    `rank`/`alpha` describe the clients' common config (scale alpha/rank); the returned alpha keeps
    that scale at the new rank."""
    weights = normalized_weights(weights)
    keys, factors, shapes, out_rank = _plan(clients, weights, alpha, rank, client_alphas)
    out: TensorDict = {}
    for m in keys.modules:
        bc, ac = _stack(clients, [m], factors)
        out[m + LORA_B_SUFFIX] = bc[0].contiguous()
        out[m + LORA_A_SUFFIX] = ac[0].contiguous()
    out.update(_plain_mean(clients, weights, keys.plain))
    ranks = {sum(s[2]) for s in shapes.values()}
    if len(ranks) > 1:
        raise InconsistentUpdates(f"stacked ranks differ across modules ({sorted(ranks)}); use exact")
    new_rank = ranks.pop() if ranks else 0
    s_out = alpha / out_rank if alpha is not None else 1.0
    return LoraAggregate(out, new_rank, s_out * new_rank, 0.0, dict.fromkeys(keys.modules, 0.0))


def _plain_mean(
    clients: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float], plain: Sequence[str]
) -> TensorDict:
    if not plain:
        return {}
    return fedavg(({k: c[k] for k in plain}, w) for c, w in zip(clients, weights, strict=True))

