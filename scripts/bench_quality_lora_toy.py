#!/usr/bin/env python3
"""Why `exact` can trail `fedavg` in the federated chat arms (bench_quality.py --suite chat): a toy
that runs in seconds and needs no model.

A frozen linear layer with a rank-r LoRA (A at PEFT's Kaiming-uniform init, B = 0, scale alpha/r),
four clients with different targets (a shared part plus a client part: non-IID), each training
`local` AdamW steps per round from the global factors. From the SAME client factors of every round
it scores (pooled mean-squared error) three aggregates:

  fedavg          mean(B) mean(A)
  exact           the best rank-r approximation of mean(B_i A_i)  (fednode's `exact`)
  mean_products   mean(B_i A_i) itself (fednode's `stacked`: rank K*r, no truncation)

while the run follows fedavg's trajectory. Measured: with small steps the order is the textbook
one (mean_products < exact < fedavg); with large steps it turns over (fedavg < exact <
mean_products). Clients that start a round from the same (B0, A0) end with
B_i A_i = B0 A0 + dB_i A0 + B0 dA_i + dB_i dA_i; both aggregates keep the first-order terms exactly,
and they differ only in the second-order one: mean(B_i A_i) keeps every client's own dB_i dA_i,
fedavg only mean(dB) mean(dA). AdamW moves every weight by about the rate at once, so a client's
dB_i dA_i is the product of two steps taken against the gradient at the old point -- an overshoot
that grows with the step -- and averaging the factors separately damps its client-specific part.
So exact trailing fedavg is a property of averaging the products with large local steps, not an
error of the re-factorisation (tests/aggregation/test_exact.py checks that exact is the best rank-r
approximation of the mean of the products). Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fednode.aggregation import aggregate

METHODS = ("fedavg", "exact", "stacked")
LABELS = {"fedavg": "fedavg", "exact": "exact", "stacked": "mean_products"}


def toy_round_losses(seed: int, lr: float, rounds: int = 8, local: int = 2, clients: int = 4, d: int = 64,
                     k: int = 48, rank: int = 4, upto: int | None = None) -> list[dict[str, float]]:
    """Per round: pooled MSE of each aggregate of the same client factors (run follows fedavg);
    the first `upto` rounds of a `rounds`-round run (its LR decay spans all `rounds`)."""
    g = torch.Generator().manual_seed(seed)
    common = torch.randn(d, 6, generator=g) @ torch.randn(6, k, generator=g) * 0.1
    targets = [common + torch.randn(d, 3, generator=g) @ torch.randn(3, k, generator=g) * 0.1
               for _ in range(clients)]
    xs = [torch.randn(256, k, generator=g) for _ in range(clients)]
    ys = [x @ t.T for x, t in zip(xs, targets, strict=True)]
    alpha = 2.0 * rank
    scale = alpha / rank
    state = {"m.lora_A.weight": (torch.rand(rank, k, generator=g) * 2 - 1) / math.sqrt(k),
             "m.lora_B.weight": torch.zeros(d, rank)}

    def loss(tensors: dict[str, torch.Tensor]) -> float:
        w = scale * tensors["m.lora_B.weight"].double() @ tensors["m.lora_A.weight"].double()
        return sum(((x.double() @ w.T - y.double()) ** 2).mean().item() for x, y in zip(xs, ys, strict=True)) / clients

    out = []
    total = rounds * local
    for rnd in range(rounds if upto is None else upto):
        updates = []
        for c in range(clients):
            a = state["m.lora_A.weight"].clone().requires_grad_()
            b = state["m.lora_B.weight"].clone().requires_grad_()
            opt = torch.optim.AdamW([a, b], lr=lr, weight_decay=0.0)
            batches = torch.Generator().manual_seed(seed * 100 + rnd * 10 + c)
            for step in range(local):
                idx = torch.randint(0, xs[c].shape[0], (16,), generator=batches)
                mse = ((xs[c][idx] @ (scale * b @ a).T - ys[c][idx]) ** 2).mean()
                opt.zero_grad()
                mse.backward()
                for group in opt.param_groups:  # one linear decay over the run, as the chat bench
                    group["lr"] = lr * (1 - 0.9 * (rnd * local + step) / max(total - 1, 1))
                opt.step()
            updates.append({"m.lora_A.weight": a.detach(), "m.lora_B.weight": b.detach()})
        weights = [1.0 / clients] * clients
        aggs = {m: aggregate(updates, weights, m, rank=rank, alpha=alpha) for m in METHODS}
        out.append({LABELS[m]: loss(dict(aggs[m].tensors)) for m in METHODS}
                   | {"discarded_energy": aggs["exact"].discarded_energy})
        state = {kk: v.float() for kk, v in aggs["fedavg"].tensors.items()}
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lrs", type=float, nargs="+", default=[0.1, 0.3], help="AdamW peak rates (small, large)")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--rounds", type=int, default=8)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    figures: dict[str, dict[str, list[float]]] = {}
    print(f"{'lr':>6}{'round':>6}" + "".join(f"{LABELS[m]:>15}" for m in METHODS) + f"{'discarded':>11}")
    for lr in args.lrs:
        runs = [toy_round_losses(s, lr, rounds=args.rounds) for s in range(args.seeds)]
        keys = [*(LABELS[m] for m in METHODS), "discarded_energy"]
        means = {key: [statistics.mean(r[i][key] for r in runs) for i in range(args.rounds)] for key in keys}
        figures[f"{lr:g}"] = means
        for i in range(args.rounds):
            print(f"{lr:>6g}{i + 1:>6}" + "".join(f"{means[key][i]:>15.4f}" for key in keys[:-1])
                  + f"{means['discarded_energy'][i]:>11.4f}")
    print(json.dumps({"suite": "lora_toy", "seeds": args.seeds, "mean_loss_after_aggregation": figures},
                     sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
