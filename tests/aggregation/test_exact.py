from __future__ import annotations

import pytest
import torch

from fednode.aggregation import AggregationOptions, aggregate, dump_delta, split_lora_keys
from fednode.aggregation.exact import _exact_dense, _exact_gram
from fednode.errors import InconsistentUpdates

MODULES = {"layers.0.q": (48, 40), "layers.1.q": (48, 40), "layers.0.v": (24, 40)}  # name: (d, k)


def _client(seed: int, r: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = {}
    for m, (d, k) in MODULES.items():
        t[f"{m}.lora_A.weight"] = torch.randn(r, k, generator=g) / k**0.5
        t[f"{m}.lora_B.weight"] = torch.randn(d, r, generator=g)
    t["score.weight"] = torch.randn(5, 40, generator=g)
    return t


def _target(clients: list[dict[str, torch.Tensor]], ws: list[float], scales: list[float], m: str) -> torch.Tensor:
    total = sum(ws)
    return torch.stack([
        (w / total) * s * c[f"{m}.lora_B.weight"].double() @ c[f"{m}.lora_A.weight"].double()
        for c, w, s in zip(clients, ws, scales, strict=True)
    ]).sum(dim=0)


def _product(tensors: dict[str, torch.Tensor], m: str, scale: float) -> torch.Tensor:
    return scale * tensors[f"{m}.lora_B.weight"].double() @ tensors[f"{m}.lora_A.weight"].double()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize(
    ("ranks", "alphas", "out_rank"),
    [
        ([8, 8, 8, 8], None, 8),  # same rank, K r = 32 < d: QR on both sides
        ([4, 8, 16, 2], [8.0, 16.0, 32.0, 4.0], 8),  # mixed ranks, scale alpha_i / r_i = 2 for each
        ([16, 16, 16, 16], [16.0, 8.0, 32.0, 16.0], 12),  # K r = 64 > d, k: QR skipped, mixed scales
    ],
)
def test_exact_equals_dense_truncated_svd(ranks: list[int], alphas: list[float] | None, out_rank: int) -> None:
    clients = [_client(i, r) for i, r in enumerate(ranks)]
    ws = [10.0, 20.0, 30.0, 40.0]
    out_alpha = 2.0 * out_rank
    opts = AggregationOptions(client_alphas=tuple(alphas) if alphas else None)
    res = aggregate([dump_delta(c) for c in clients], ws, "exact", rank=out_rank, alpha=out_alpha, options=opts)
    assert res.stats["rank"] == out_rank and res.stats["alpha"] == out_alpha
    scales = [a / r for a, r in zip(alphas, ranks, strict=True)] if alphas else [out_alpha / r for r in ranks]
    dropped = kept_total = 0.0
    for m in MODULES:
        target = _target(clients, ws, scales, m)
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :out_rank] * s[:out_rank]) @ vh[:out_rank]
        assert res.tensors[f"{m}.lora_A.weight"].shape == (out_rank, MODULES[m][1])
        assert _rel(_product(res.tensors, m, out_alpha / out_rank), best) < 1e-5
        energy = float((s**2).sum())
        assert res.stats["module_discarded_energy"][m] == pytest.approx(1 - float((s[:out_rank] ** 2).sum()) / energy,
                                                                         abs=1e-6)
        dropped += float((s[out_rank:] ** 2).sum())
        kept_total += energy
    assert res.discarded_energy is not None
    assert res.discarded_energy == pytest.approx(dropped / kept_total, abs=1e-6)
    assert 0 < res.discarded_energy < 1
    head = sum(w * c["score.weight"].double() for c, w in zip(clients, ws, strict=True)) / sum(ws)
    torch.testing.assert_close(res.tensors["score.weight"].double(), head, rtol=1e-6, atol=1e-6)


def test_exact_is_lossless_when_rank_suffices_and_beats_naive_fedavg() -> None:
    clients = [_client(i, 4) for i in range(3)]
    ws = [1.0, 1.0, 2.0]
    res = aggregate(clients, ws, "exact", rank=12, alpha=12.0)
    naive = aggregate(clients, ws, "fedavg")
    assert res.discarded_energy == pytest.approx(0.0, abs=1e-6)
    for m in MODULES:
        target = _target(clients, ws, [3.0] * 3, m)
        assert _rel(_product(res.tensors, m, 1.0), target) < 1e-5
        assert _rel(_product(naive.tensors, m, 3.0), target) > 0.1  # mean(B) mean(A) != mean(B A)


def test_stacked_reproduces_the_sum_exactly() -> None:
    ranks = [4, 8, 2]
    alphas = [8.0, 8.0, 8.0]
    clients = [_client(10 + i, r) for i, r in enumerate(ranks)]
    ws = [3.0, 1.0, 1.0]
    res = aggregate(clients, ws, "stacked", rank=8, alpha=8.0, options=AggregationOptions(client_alphas=tuple(alphas)))
    assert res.stats["rank"] == sum(ranks) and res.discarded_energy is None
    scale = res.stats["alpha"] / res.stats["rank"]
    assert scale == pytest.approx(8.0 / 8)
    for m in MODULES:
        target = _target(clients, ws, [a / r for a, r in zip(alphas, ranks, strict=True)], m)
        assert _rel(_product(res.tensors, m, scale), target) < 1e-6


def test_lora_key_pairing_and_shape_checks() -> None:
    keys = split_lora_keys(["a.lora_A.weight", "a.lora_B.weight", "head.weight"])
    assert keys.modules == ("a",) and keys.plain == ("head.weight",)
    with pytest.raises(InconsistentUpdates, match="a: LoRA factor without its partner"):
        split_lora_keys(["a.lora_A.weight"])
    bad = _client(1, 4)
    bad["layers.0.q.lora_B.weight"] = torch.zeros(48, 5)
    with pytest.raises(InconsistentUpdates, match=r"client 1: layers\.0\.q has lora_A \(4, 40\), lora_B \(48, 5\)"):
        aggregate([_client(0, 4), bad], [1, 1], "exact", rank=4)


@pytest.mark.parametrize("out_rank", [8, 16])
def test_exact_handles_rank_deficient_and_ill_conditioned_stacks(out_rank: int) -> None:
    # K r = 32 < min(d, k): the Gram route. A duplicate client, an untrained one (B = 0, as PEFT
    # initialises it) and one whose B is client 0's plus 1e-4 noise make Bc^T Bc singular / badly
    # conditioned; the result must still match the dense truncated SVD.
    base = _client(0, 8)
    g = torch.Generator().manual_seed(99)
    near = {k: (v + 1e-4 * torch.randn(v.shape, generator=g) if k.endswith("lora_B.weight") else v.flip(0))
            for k, v in base.items()}
    zero = {k: (torch.zeros_like(v) if k.endswith("lora_B.weight") else v) for k, v in _client(2, 8).items()}
    clients = [base, {k: v.clone() for k, v in base.items()}, zero, near]
    ws = [1.0, 2.0, 3.0, 4.0]
    res = aggregate(clients, ws, "exact", rank=out_rank, alpha=float(out_rank))
    for m in MODULES:
        target = _target(clients, ws, [float(out_rank) / 8] * 4, m)
        u, s, vh = torch.linalg.svd(target)
        best = (u[:, :out_rank] * s[:out_rank]) @ vh[:out_rank]
        assert _rel(_product(res.tensors, m, 1.0), best) < 1e-5
        assert res.stats["module_discarded_energy"][m] == pytest.approx(
            1 - float((s[:out_rank] ** 2).sum()) / float((s**2).sum()), abs=1e-6)
    if out_rank == 16:  # the target has rank 16 (clients 0, 1 coincide; client 2 is zero): lossless
        assert res.discarded_energy == pytest.approx(0.0, abs=1e-9)


def test_gram_and_dense_routes_agree() -> None:
    g = torch.Generator().manual_seed(5)
    b = torch.randn(3, 50, 24, generator=g, dtype=torch.float64)
    a = torch.randn(3, 24, 60, generator=g, dtype=torch.float64)
    for r in (4, 24, 30):  # 30 > R: zero-padded factors
        xg, yg, kg, tg = _exact_gram(b, a, r)
        xd, yd, kd, td = _exact_dense(b, a, r)
        torch.testing.assert_close(xg @ yg, xd @ yd, rtol=0, atol=1e-10 * float((b @ a).abs().max()))
        torch.testing.assert_close(kg, kd)
        torch.testing.assert_close(tg, td)
        torch.testing.assert_close(tg, (b @ a).square().sum(dim=(1, 2)))


def test_exact_in_small_batches_matches_one_batch() -> None:
    clients = [_client(20 + i, 4) for i in range(3)]
    whole = aggregate(clients, [1.0, 2.0, 3.0], "exact", rank=4, alpha=8.0)
    split = aggregate(clients, [1.0, 2.0, 3.0], "exact", rank=4, alpha=8.0,
                      options=AggregationOptions(exact_max_batch_bytes=1))  # one module per batch
    assert whole.tensors.keys() == split.tensors.keys()
    for key, t in whole.tensors.items():
        torch.testing.assert_close(split.tensors[key], t, rtol=1e-6, atol=1e-7)
    assert split.discarded_energy == pytest.approx(whole.discarded_energy, abs=1e-9)


def test_exact_keeps_lora_a_at_the_clients_scale() -> None:
    """Every row of the merged lora_A has the clients' weighted RMS lora_A row norm (B carries the
    rest), so the next round starts from PEFT's layout (A at init scale, B small) and not from the
    balanced sqrt(sigma) split, whose A after a round of small B is several times smaller (AdamW
    then moves B A about half as fast; the chat bench's exact arm trailed fedavg for it)."""
    g = torch.Generator().manual_seed(7)
    d, k, r = 48, 40, 4
    a0 = (torch.rand(r, k, generator=g) * 2 - 1) / k**0.5  # PEFT-like: A uniform, B zero, then a few steps
    clients = [{"m.lora_A.weight": a0 + 1e-3 * torch.randn(r, k, generator=g),
                "m.lora_B.weight": 1e-3 * torch.randn(d, r, generator=g)} for _ in range(3)]
    ws = [1.0, 2.0, 1.0]
    res = aggregate(clients, ws, "exact", rank=r, alpha=8.0)
    want = (sum(w * float(c["m.lora_A.weight"].square().sum()) / r for c, w in zip(clients, ws, strict=True))
            / sum(ws)) ** 0.5
    rows = res.tensors["m.lora_A.weight"].norm(dim=1)
    torch.testing.assert_close(rows, torch.full((r,), want), rtol=1e-5, atol=0.0)
    sigma = torch.linalg.svdvals(_target(clients, ws, [2.0] * 3, "m"))[:r]
    assert float(sigma.sqrt().max()) < want / 2  # the balanced split would have shrunk A at least 2x
    cols = res.tensors["m.lora_B.weight"].norm(dim=0)
    torch.testing.assert_close(cols * want, sigma.float() / 2.0, rtol=1e-4, atol=0.0)  # s_out B A = dW
