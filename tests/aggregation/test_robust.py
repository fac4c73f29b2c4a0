"""One client of five sends its update scaled x1000. Stated bounds, with clean = fedavg of the five
unscaled updates u_1..u_5 and spread = the per-coordinate range max_j u_j - min_j u_j:
- median and trimmed_mean(0.2): every output coordinate lies between the honest clients' min and max,
  and so does the clean mean's, hence ||robust - clean|| <= ||spread||.
- clipped_fedavg (clip to c): ||clipped - clean|| <= sum_honest w_i max(0, ||u_i|| - c) + w_a (c + ||u_a||).
Plain fedavg lands w_a * 999 * ||u_a|| away: far outside every bound (asserted too)."""

from __future__ import annotations

import math

import pytest
import torch

from fednode.aggregation import AggregationOptions, aggregate
from fednode.errors import LocalProtocolError

K, ATTACKER = 5, 2
WEIGHTS = [100.0, 200.0, 100.0, 300.0, 300.0]


def _distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(((a[k].double() - b[k].double()) ** 2).sum()) for k in a))


def _norm(u: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((t.double() ** 2).sum()) for t in u.values()))


@pytest.fixture(scope="module")
def setting() -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    common = {"m.lora_A.weight": torch.randn(8, 32, generator=g), "head.weight": torch.randn(4, 16, generator=g)}
    honest = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in common.items()} for _ in range(K)]
    attacked = [dict(u) for u in honest]
    attacked[ATTACKER] = {k: v * 1000 for k, v in honest[ATTACKER].items()}
    clean = aggregate(honest, WEIGHTS, "fedavg").tensors
    return honest, attacked, clean


def _spread(honest: list[dict[str, torch.Tensor]]) -> float:
    return math.sqrt(sum(
        float(((torch.stack([u[k] for u in honest]).amax(0) - torch.stack([u[k] for u in honest]).amin(0)).double()
               ** 2).sum())
        for k in honest[0]
    ))


@pytest.mark.parametrize(("method", "options"), [("median", None), ("trimmed_mean", AggregationOptions(trim_beta=0.2))])
def test_coordinate_rules_stay_within_the_honest_spread(method: str, options: AggregationOptions | None,
                                                        setting: tuple) -> None:
    honest, attacked, clean = setting
    robust = aggregate(attacked, WEIGHTS, method, options=options).tensors
    bound = _spread(honest)
    assert _distance(robust, clean) <= bound
    fedavg = aggregate(attacked, WEIGHTS, "fedavg").tensors
    assert _distance(fedavg, clean) > 100 * bound


@pytest.mark.parametrize("clip_norm", [None, 5.0])  # None: the median client norm
def test_clipping_stays_within_the_stated_bound(clip_norm: float | None, setting: tuple) -> None:
    honest, attacked, clean = setting
    res = aggregate(attacked, WEIGHTS, "clipped_fedavg", options=AggregationOptions(clip_norm=clip_norm))
    c = res.stats["clip_norm"]
    norms = [_norm(u) for u in honest]
    if clip_norm is None:
        assert c == pytest.approx(sorted(_norm(u) for u in attacked)[K // 2])
    total = sum(WEIGHTS)
    honest_terms = (w / total * max(0.0, n - c) for w, n in zip(WEIGHTS, norms, strict=True))
    bound = sum(t for i, t in enumerate(honest_terms) if i != ATTACKER)
    bound += WEIGHTS[ATTACKER] / total * (c + norms[ATTACKER])
    assert res.stats["clipped"] >= 1
    assert _distance(res.tensors, clean) <= bound * (1 + 1e-6)
    fedavg = aggregate(attacked, WEIGHTS, "fedavg").tensors
    assert _distance(fedavg, clean) > 100 * bound


def test_dp_noise_is_seeded_and_has_the_documented_std(setting: tuple) -> None:
    honest, _, _ = setting
    opts = AggregationOptions(clip_norm=2.0, dp_noise_multiplier=1.5, dp_seed=11)
    noisy = aggregate(honest, WEIGHTS, "clipped_fedavg", options=opts)
    again = aggregate(honest, WEIGHTS, "clipped_fedavg", options=opts)
    plain = aggregate(honest, WEIGHTS, "clipped_fedavg", options=AggregationOptions(clip_norm=2.0))
    expected_std = 1.5 * 2.0 * max(WEIGHTS) / sum(WEIGHTS)
    assert noisy.stats["noise_std"] == pytest.approx(expected_std)
    noise = torch.cat([(noisy.tensors[k] - plain.tensors[k]).flatten() for k in plain.tensors])
    assert float(noise.std()) == pytest.approx(expected_std, rel=0.15)  # 320 samples
    for k in noisy.tensors:
        assert torch.equal(noisy.tensors[k], again.tensors[k])
    with pytest.raises(LocalProtocolError, match="fixed clip_norm"):
        aggregate(honest, WEIGHTS, "clipped_fedavg", options=AggregationOptions(dp_noise_multiplier=1.0))


def test_median_and_trimmed_mean_by_hand() -> None:
    values = [1.0, 7.0, 3.0, -5.0]
    clients = [{"x": torch.tensor([v])} for v in values]
    assert float(aggregate(clients, [1] * 4, "median").tensors["x"]) == 2.0  # (1 + 3) / 2
    trimmed = aggregate(clients, [1] * 4, "trimmed_mean", options=AggregationOptions(trim_beta=0.25))
    assert float(trimmed.tensors["x"]) == 2.0  # drop -5 and 7


def test_unknown_method_is_a_typed_error() -> None:
    with pytest.raises(LocalProtocolError, match="unknown aggregation method 'mean'"):
        aggregate([{"x": torch.zeros(1)}], [1], "mean")
