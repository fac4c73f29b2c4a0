"""Exact LoRA aggregation (see DESIGN.md, "Aggregation math").

For each adapted module the target is dW = sum_i w_i s_i B_i A_i, with s_i = alpha_i / r_i the client's
LoRA scale (so clients of different ranks mix correctly). `exact` returns the best rank-r approximation
(Eckart–Young) as factors (B', A') with s_out B' A' ~= dW, s_out = alpha / r, without forming dW when
that is cheaper: with Bc = [c_1 B_1 .. c_K B_K] (d x R, c_i = w_i s_i / s_out), Ac = [A_1; ..; A_K] (R x
k), R = sum r_i, and R < min(d, k), it works from the float64 Gram matrices Bc^T Bc = F F^T (Cholesky)
and Ac Ac^T (one GEMM each) and the eigendecomposition of the R x R core F^T (Ac Ac^T) F, whose
eigenpairs give M's singular triplets (see `_exact_gram`). When R is close to or above min(d, k) the
Gram route costs more than forming dW = Bc Ac (d x k, float64) and decomposing its shorter side's Gram
matrix, so that is done instead (a cost model picks the route per group). Either way the core is never
larger than min(d, k, R), and an eigendecomposition of it is the bulk of the time: cost ~ (d + k) R^2 +
R^3 per module, against (d + k) R for fedavg, so exact/fedavg grows linearly in K until R ~ min(d, k).
Modules of equal shapes and ranks (e.g. q_proj in every layer) are processed as one batch.
The split of each kept direction between B' and A' keeps A' at the clients' scale (`_client_gauge`;
protocols/round-v1.md, "exact factors"), since the next round trains from these factors.

Exact is exact for the mean of the products, which is not always the better next start: clients that
begin a round at the same factors differ from fedavg's mean(B) mean(A) only in the second-order term
(each client's own dB_i dA_i, which exact keeps and fedavg damps), and with large AdamW steps that
term overshoots, so exact can trail fedavg (scripts/bench_quality_lora_toy.py measures both orders).

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


DEFAULT_MAX_BATCH_BYTES = 96 * 2**20
"""Float64 working set (stacked factors) of one batch of equal-shape modules; a larger group of
modules is processed in several batches, so memory stays bounded whatever the module count."""
DEFAULT_EIGH_COST = 8.0
"""Cost of a float64 n x n symmetric eigendecomposition, in units of n^3 multiply-adds of a GEMM
(measured on x86 + MKL, single thread); used only to choose between the two exact methods."""
_TINY = 1e-12
"""Singular values below _TINY * sigma_1 are treated as zero when dividing by them."""


def _gather(
    clients: Sequence[Mapping[str, torch.Tensor]],
    modules: Sequence[str],
    suffix: str,
    ranks: Sequence[int],
    factors: Sequence[float] | None = None,
) -> torch.Tensor:
    """Stack one factor of a batch of modules over all clients, in float64: lora_B gives (G x d x R)
    (clients side by side, client i's columns times factors[i]: Bc), lora_A gives (G x R x k)
    (clients stacked). A few ops per client, none per module."""
    first = clients[0][modules[0] + suffix]
    is_b = suffix == LORA_B_SUFFIX
    big_r = sum(ranks)
    shape = (len(modules), first.shape[0], big_r) if is_b else (len(modules), big_r, first.shape[1])
    out = torch.empty(shape, dtype=torch.float64)
    offset = 0
    for i, (c, r) in enumerate(zip(clients, ranks, strict=True)):
        dst = out.narrow(2 if is_b else 1, offset, r)
        dst.copy_(torch.stack([c[m + suffix] for m in modules]))
        if factors is not None and factors[i] != 1.0:
            dst.mul_(factors[i])
        offset += r
    return out


def _gram_cost(d: int, k: int, big_r: int) -> float:
    return (d + k) * big_r**2 + 2.0 * big_r**3 + DEFAULT_EIGH_COST * big_r**3


def _dense_cost(d: int, k: int, big_r: int) -> float:
    n = min(d, k)
    return d * k * big_r + n * n * max(d, k) + DEFAULT_EIGH_COST * n**3


def _square_root(gram: torch.Tensor) -> torch.Tensor:
    """F with F F^T = gram for a batch of PSD matrices: Cholesky, or (where that fails, i.e. the
    stacked factors are rank deficient) the eigendecomposition with negative rounding clamped."""
    chol, info = torch.linalg.cholesky_ex(gram)
    bad = torch.nonzero(info).flatten()
    if bad.numel():
        evals, evecs = torch.linalg.eigh(gram[bad])
        chol[bad] = evecs * evals.clamp_min(0).sqrt()[:, None, :]
    return chol


def _top_from_core(
    core: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-r eigenpairs of a batch of PSD cores: vectors (G x n x keep), sigma (G x keep, descending),
    inverse-root weights zeroing tiny sigma, kept and total energies (G,)."""
    evals, evecs = torch.linalg.eigh(core)  # ascending
    keep = min(r, core.shape[1])
    lam = evals[:, -keep:].flip(1).clamp_min(0)
    vec = evecs[:, :, -keep:].flip(2)
    sigma = lam.sqrt()
    ok = sigma > sigma[:, :1].clamp_min(1e-300) * _TINY
    return vec, sigma, ok, lam.sum(dim=1), evals.clamp_min(0).sum(dim=1)


def _pad(x: torch.Tensor, y: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    keep = x.shape[2]
    if keep < r:  # fewer directions than the requested rank: pad with zero factors
        x = torch.cat([x, x.new_zeros(x.shape[0], x.shape[1], r - keep)], dim=2)
        y = torch.cat([y, y.new_zeros(y.shape[0], r - keep, y.shape[2])], dim=1)
    return x, y


def _exact_gram(
    b: torch.Tensor, a: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r X Y of M = Bc Ac from the (R x R) Gram matrices only (for R < d, k).

    G_B = Bc^T Bc = F F^T (Cholesky), G_A = Ac Ac^T, core S = F^T G_A F = T T^T with T = F^T Ac, so
    S has M's nonzero squared singular values, and for its eigenpairs (v, s^2) the right singular
    vectors of M are w = Ac^T F v / s. The best rank-r approximation M W W^T is then
    X = Bc G_A F V S^-3/2 (d x r), Y = S^-1/2 V^T F^T Ac (r x k): no inverse of F is needed, so
    rank-deficient stacks (duplicate or zero clients) are fine, and the rounding error a direction
    contributes to X Y is ~eps ||Bc|| ||Ac|| whatever its singular value."""
    gram_b = b.mT @ b
    gram_a = a @ a.mT
    f = _square_root(gram_b)
    vec, sigma, ok, kept, total = _top_from_core(f.mT @ gram_a @ f, r)
    fv = f @ vec  # (G x R x keep)
    inv_root = torch.where(ok, sigma.clamp_min(1e-300).rsqrt(), torch.zeros_like(sigma))
    x = b @ ((gram_a @ fv) * (inv_root**3)[:, None, :])
    y = (fv * inv_root[:, None, :]).mT @ a
    return x, y, kept, total


def _exact_dense(
    b: torch.Tensor, a: torch.Tensor, r: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r X Y of M = Bc Ac by forming M (d x k) in float64 (for R >= min(d, k), where it
    is cheaper than the Gram route) and decomposing the Gram matrix of its shorter side."""
    m = b @ a
    rows_side = m.shape[1] <= m.shape[2]
    vec, sigma, ok, kept, total = _top_from_core(m @ m.mT if rows_side else m.mT @ m, r)
    root = sigma.sqrt()
    inv_root = torch.where(ok, 1.0 / root.clamp_min(1e-300), torch.zeros_like(root))
    if rows_side:  # M ~ U U^T M with U = vec
        x = vec * root[:, None, :]
        y = (vec * inv_root[:, None, :]).mT @ m
    else:  # M ~ M V V^T
        y = (vec * root[:, None, :]).mT
        x = m @ (vec * inv_root[:, None, :])
    return x, y, kept, total


def _client_gauge(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, ranks: Sequence[int], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescale each rank-one pair (x_j, y_j) -> (x_j / c_j, c_j y_j) so that every row of the new A
    has the clients' weighted RMS lora_A row norm (sqrt(sum_i w_i ||A_i||_F^2 / r_i)). The product
    X Y, and so the aggregate, is unchanged; what changes is where the next round starts from. The
    balanced split (sqrt(sigma) on both sides) turns PEFT's layout (A at its init scale, B small)
    into one with A ~sqrt(sigma), several times smaller after a round, so AdamW's per-weight steps
    move B A about half as fast from it as from the clients' own factors (chat bench: exact trailed
    fedavg). Directions with a zero row (sigma ~ 0) stay zero."""
    offsets = [0]
    for r in ranks:
        offsets.append(offsets[-1] + r)
    mean_sq = sum(w * a[:, lo:hi].square().sum(dim=(1, 2)) / (hi - lo)
                  for w, lo, hi in zip(weights, offsets[:-1], offsets[1:], strict=True))
    target = torch.as_tensor(mean_sq, dtype=y.dtype).sqrt()  # (G,)
    norms = y.norm(dim=2)  # (G x keep)
    ok = (norms > 0) & (target[:, None] > 0)
    c = torch.where(ok, target[:, None] / norms.clamp_min(1e-300), torch.ones_like(norms))
    return x / c[:, None, :], y * c[:, :, None]


def _batches(modules: Sequence[str], d: int, k: int, big_r: int, max_bytes: int) -> list[Sequence[str]]:
    per_module = 8 * (big_r * (d + k) + 2 * min(d, k) * max(d, k, big_r))
    size = max(1, max_bytes // max(1, per_module))
    return [modules[i : i + size] for i in range(0, len(modules), size)]


def exact(
    clients: Sequence[Mapping[str, torch.Tensor]],
    weights: Sequence[float],
    *,
    rank: int | None = None,
    alpha: float | None = None,
    client_alphas: Sequence[float] | None = None,
    max_batch_bytes: int = DEFAULT_MAX_BATCH_BYTES,
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
    for (d, k, ranks), group in groups.items():
        big_r = sum(ranks)
        scale = factors[group[0]]  # equal ranks => equal factors across a group
        use_gram = big_r < min(d, k) and _gram_cost(d, k, big_r) < _dense_cost(d, k, big_r)
        for modules in _batches(group, d, k, big_r, max_batch_bytes):
            b = _gather(clients, modules, LORA_B_SUFFIX, ranks, scale)
            a = _gather(clients, modules, LORA_A_SUFFIX, ranks)
            x, y, kept, total = (_exact_gram if use_gram else _exact_dense)(b, a, out_rank)
            x, y = _client_gauge(x, y, a, ranks, weights)
            del b, a
            new_b, new_a = _pad(x.float(), y.float(), out_rank)
            kept_list, total_list = kept.tolist(), total.tolist()
            for j, m in enumerate(modules):
                out[m + LORA_B_SUFFIX] = new_b[j].contiguous()
                out[m + LORA_A_SUFFIX] = new_a[j].contiguous()
                t, kp = total_list[j], kept_list[j]
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

