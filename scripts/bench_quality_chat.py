"""bench_quality.py --suite chat: chat SFT of a causal LM on nodes with topic-skewed chat data.

Four topics of short question/answer chats, generated from fixed tables with a seed (offline, no
download): capitals, arithmetic, opposites, animal sounds. Node i holds mostly topic i mod 4
(--skew of its rows) and some of the others; its held-out rows are drawn the same way, and the
pooled held-out set is every node's together. The rows go through fednode.learning.local_data
(format "chat": the tokenizer's chat template, loss on the assistant turns), as a node's own files
would. Arms and step budget as in bench_quality.py; scores are held-out perplexities.

The protocol, one rule for every arm so that the comparison is fair:
- the same examples seen: every arm runs nodes * rounds * local_steps steps of `batch` rows in all
  (centralized in one run over the pooled training rows; local-only as each node's rounds *
  local_steps steps on its own rows; fedavg / exact as rounds of local_steps steps on every node).
  A federated run has nodes x fewer *sequential* steps (its nodes step in parallel): that is what
  federation is, and the gap the goal measures;
- AdamW (fresh per train call, as a stateless federated node has it) and ONE linear decay over the
  arm's whole run -- the centralized arm over its one call, local-only over each node's one call,
  and the federated arms over their rounds (round n runs steps n*local_steps.. of the same decay,
  fednode.learning.schedule's window) rather than a restart to the peak every round;
- the peak learning rate of EVERY arm chosen by the same procedure: each rate of --lr-grid
  (default 1.5e-3, 3e-3) is trained in full, and the run with the lowest perplexity on a
  pooled *validation* set (--chat-val-rows per node, drawn like the others from its own seed) is
  kept; local-only picks per node (by the same pooled validation score: the strongest baseline).
  Only the kept runs are scored on the held-out sets, which never choose anything. --lr /
  --central-lr fix a rate instead (no selection);
- the same held-out sets for every arm.
Defaults: 8 rounds x 2 local steps (FedAvg on non-IID data needs several rounds of few local steps:
client drift grows with the local steps), 64 steps per arm.

The pooled held-out set is the nodes' held-out sets together, so its perplexity is computed from
the per-node evaluations (token-weighted, exactly the pooled mean) instead of a second pass; the
same for the validation set.

Exact vs fedavg: exact's B'A' is the best rank-r approximation of the mean of the clients'
products, fedavg's is mean(B) mean(A); from clients that start a round at the same factors the two
differ only in the second-order term (every client's own dB_i dA_i, kept by exact, damped by
fedavg). With large AdamW steps that term is an overshoot, so exact can trail fedavg without any
error in its re-factorisation: scripts/bench_quality_lora_toy.py measures both orders (small steps:
mean of products < exact < fedavg; large: the reverse). The JSON records exact's discarded energy.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fednode.config import DataSection
from fednode.learning import LocalTrainer, get_task
from fednode.learning.local_data import LocalData, load_local_data
from fednode.learning.local_formats import IGNORE_INDEX
from fednode.learning.model import load_tokenizer, resolve_model_dir
from fednode.learning.schedule import LrSchedule

AggregateFn = Callable[[str, Sequence[bytes], Sequence[float], int, float], tuple[bytes, float | None]]
CHAT_PPL_TOLERANCE = 0.05

CAPITALS = (("France", "Paris"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"), ("Peru", "Lima"),
            ("Norway", "Oslo"), ("Greece", "Athens"), ("Canada", "Ottawa"), ("Chile", "Santiago"),
            ("Poland", "Warsaw"), ("Ireland", "Dublin"), ("Portugal", "Lisbon"), ("Austria", "Vienna"))
OPPOSITES = (("hot", "cold"), ("big", "small"), ("fast", "slow"), ("up", "down"), ("light", "dark"),
             ("early", "late"), ("happy", "sad"), ("open", "closed"), ("full", "empty"), ("old", "young"),
             ("hard", "soft"), ("wet", "dry"), ("loud", "quiet"), ("rich", "poor"), ("near", "far"))
SOUNDS = (("cow", "moo"), ("dog", "woof"), ("cat", "meow"), ("duck", "quack"), ("sheep", "baa"),
          ("owl", "hoot"), ("horse", "neigh"), ("pig", "oink"), ("lion", "roar"), ("frog", "croak"),
          ("bee", "buzz"), ("snake", "hiss"), ("mouse", "squeak"), ("crow", "caw"), ("wolf", "howl"))


def _capital(rng: random.Random) -> tuple[str, str]:
    country, city = rng.choice(CAPITALS)
    return f"What is the capital of {country}?", f"The capital of {country} is {city}."


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(1, 20), rng.randint(1, 20)
    return f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."


def _opposite(rng: random.Random) -> tuple[str, str]:
    word, other = rng.choice(OPPOSITES)
    return f"What is the opposite of {word}?", f"The opposite of {word} is {other}."


def _sound(rng: random.Random) -> tuple[str, str]:
    animal, sound = rng.choice(SOUNDS)
    return f"What sound does a {animal} make?", f"A {animal} says {sound}."


TOPICS: tuple[Callable[[random.Random], tuple[str, str]], ...] = (_capital, _arithmetic, _opposite, _sound)


def chat_rows(node: int, count: int, skew: float, seed: int) -> list[dict[str, Any]]:
    """`count` chats for `node`: topic node mod 4 with probability `skew`, else one of the others."""
    rng = random.Random(f"{seed}/{node}/{count}")
    own = node % len(TOPICS)
    rows = []
    for _ in range(count):
        topic = own if rng.random() < skew else rng.choice([t for t in range(len(TOPICS)) if t != own])
        question, answer = TOPICS[topic](rng)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": answer}]})
    return rows


@dataclass(frozen=True)
class Pooled:
    train: tuple[Any, ...]
    eval: tuple[Any, ...]


SPLITS = (("train", 0), ("eval", 1), ("validation", 2))
"""Each node's files and the seed salt of each: the held-out ("eval") and validation sets are drawn
like the training rows from their own seeds, so the three never share a draw."""


def _node_data(root: Path, node: int, args: argparse.Namespace, tokenizer: Any) -> tuple[LocalData, LocalData]:
    """(train + held-out, train + validation) of one node, through local_data as a node's own files."""
    counts = {"train": args.chat_train_rows, "eval": args.chat_eval_rows, "validation": args.chat_val_rows}
    paths = {split: root / f"node{node}-{split}.jsonl" for split, _ in SPLITS}
    for split, salt in SPLITS:
        rows = chat_rows(node, counts[split], args.skew, args.seed * 3 + salt)
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = []
    for held in ("eval", "validation"):
        section = DataSection(path=str(paths["train"]), format="chat", eval_path=str(paths[held]))
        out.append(load_local_data(section, tokenizer, max_length=args.max_len))
    return out[0], out[1]


class Scorer:
    """Per-node and pooled perplexities of an adapter on one split (held-out or validation). The
    pooled set is the nodes' sets together, so its perplexity is the token-weighted mean of the
    per-node losses (exactly the pooled mean) instead of a second pass."""

    def __init__(self, trainers: Sequence[LocalTrainer], datas: Sequence[LocalData]) -> None:
        self.trainers = trainers
        self.units = [_target_tokens(d.eval) for d in datas]

    def losses(self, adapter: bytes | None) -> list[float]:
        return [t.evaluate(adapter)["loss"] for t in self.trainers]

    def pooled(self, losses: Sequence[float]) -> float:
        return math.exp(sum(lo * u for lo, u in zip(losses, self.units, strict=True)) / sum(self.units))

    def scores(self, adapter: bytes | None) -> dict[str, Any]:
        losses = self.losses(adapter)
        own = [math.exp(lo) for lo in losses]
        return {"pooled": self.pooled(losses), "own": own, "own_mean": sum(own) / len(own)}


def lr_grid(args: argparse.Namespace, arm: str) -> list[float]:
    """The learning rates an arm is tuned over: --lr-grid for every arm (one procedure for all), or
    the one rate --lr / --central-lr fixes for it (no selection)."""
    fixed = args.central_lr if arm == "centralized" else args.lr
    return [fixed] if fixed is not None else list(args.lr_grid)


def run_chat(args: argparse.Namespace, aggregate_fn: AggregateFn) -> dict[str, Any]:
    overrides: dict[str, Any] = {"batch_size": args.batch, "max_len": args.max_len, "eval_batch_size": 16,
                                 "max_eval_samples": args.nodes * max(args.chat_eval_rows, args.chat_val_rows)}
    if args.model:
        overrides["base_model_id"] = args.model
    task = get_task("smollm2-lm", **overrides).replace(dataset="local")
    schedule = LrSchedule(args.schedule, args.floor)
    log = print if args.verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(resolve_model_dir(task))
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        pairs = [_node_data(Path(tmp), i, args, tokenizer) for i in range(args.nodes)]
    datas, vdatas = [p[0] for p in pairs], [p[1] for p in pairs]

    def trainer(i: int, n: int, d: Any) -> LocalTrainer:
        return LocalTrainer(task, i, n, data=d, torch_threads=args.threads, lr_schedule=schedule)

    nodes = [trainer(i, args.nodes, d) for i, d in enumerate(datas)]
    held_out = Scorer(nodes, datas)
    validation = Scorer([trainer(i, args.nodes, d) for i, d in enumerate(vdatas)], vdatas)
    central = trainer(0, 1, Pooled(tuple(ex for d in datas for ex in d.train), ()))
    total_steps = args.nodes * args.rounds * args.local_steps
    log(f"setup {time.perf_counter() - t0:.1f}s; {sum(len(d.train) for d in datas)} train / "
        f"{sum(len(d.eval) for d in vdatas)} validation / {sum(len(d.eval) for d in datas)} held-out chats")

    figures: dict[str, Any] = {"suite": "chat", "config": {
        "model": args.model or task.base_model_id, "nodes": args.nodes, "rounds": args.rounds,
        "local_steps": args.local_steps, "lr_grid": list(args.lr_grid), "lr": args.lr,
        "central_lr": args.central_lr, "schedule": args.schedule, "floor": args.floor, "batch": args.batch,
        "max_len": args.max_len, "seed": args.seed, "skew": args.skew, "threads": args.threads,
        "total_steps_per_arm": total_steps, "round_schedule": args.round_schedule,
        "train_rows_per_node": args.chat_train_rows, "val_rows_per_node": args.chat_val_rows,
        "eval_rows_per_node": args.chat_eval_rows, "selection": SELECTION,
        "target_modules": list(central.target_modules)}}
    if args.base:
        figures["base"] = held_out.scores(None)

    def choose(arm: str, runs: Mapping[float, Any], val: Mapping[float, float]) -> tuple[float, Any]:
        lr = pick_lr(val)
        log(f"{arm}: validation pooled ppl {({f'{r:g}': round(v, 4) for r, v in val.items()})} -> lr {lr:g}")
        return lr, runs[lr]

    if "centralized" in args.arms:
        runs: dict[float, Any] = {}
        val: dict[float, float] = {}
        for lr in lr_grid(args, "centralized"):
            runs[lr] = central.train(None, steps=total_steps, learning_rate=lr, seed=args.seed).delta_bytes
            val[lr] = validation.pooled(validation.losses(runs[lr]))
        lr, adapter = choose("centralized", runs, val)
        figures["centralized"] = {**held_out.scores(adapter), "lr": lr, "validation": _keyed(val)}
        log(f"centralized {figures['centralized']}")
    if "local_only" in args.arms:
        local: list[dict[str, Any]] = []
        for n in nodes:  # each node's own run, its rate chosen by the same rule (the baseline's best)
            runs, val = {}, {}
            for lr in lr_grid(args, "local_only"):
                runs[lr] = n.train(None, steps=args.rounds * args.local_steps, learning_rate=lr,
                                   seed=args.seed).delta_bytes
                val[lr] = validation.pooled(validation.losses(runs[lr]))
            lr, adapter = choose(f"local-only node {n.node_index}", runs, val)
            losses = held_out.losses(adapter)
            local.append({"pooled": held_out.pooled(losses), "own": math.exp(losses[n.node_index]), "lr": lr,
                          "validation": _keyed(val)})
        figures["local_only"] = {"pooled": sum(p["pooled"] for p in local) / len(local),
                                 "own_mean": sum(p["own"] for p in local) / len(local), "per_node": local}
        log(f"local-only {figures['local_only']}")
    for method in ("fedavg", "exact"):
        if method not in args.arms:
            continue
        runs, val = {}, {}
        extra: dict[float, dict[str, Any]] = {}
        for lr in lr_grid(args, method):
            runs[lr], extra[lr] = _federate(args, method, lr, nodes, schedule, task, aggregate_fn, validation, log)
            val[lr] = validation.pooled(validation.losses(runs[lr]))
        lr, adapter = choose(method, runs, val)
        figures[method] = {**held_out.scores(adapter), **extra[lr], "lr": lr, "validation": _keyed(val)}
        log(f"{method} {figures[method]}")
    if "fedavg" in figures and "exact" in figures:
        figures["exact_vs_fedavg"] = EXACT_VS_FEDAVG
    figures["wall_seconds"] = time.perf_counter() - t0
    figures["goals"] = chat_goals(figures)
    return figures


EXACT_VS_FEDAVG = ("exact keeps every client's own second-order term dB_i dA_i of the mean of products, fedavg "
                   "damps it; with large local steps that term overshoots, so exact may trail fedavg "
                   "(scripts/bench_quality_lora_toy.py measures both orders)")


SELECTION = ("every arm: each rate of --lr-grid trained in full, the one with the lowest pooled validation "
             "perplexity kept (local-only: per node), scores on the separate held-out set")


def pick_lr(validation_ppl: Mapping[float, float]) -> float:
    """The rate whose run has the lowest validation perplexity (ties: the smaller rate)."""
    if not validation_ppl:
        raise ValueError("pick_lr: no runs to choose from (empty --lr-grid)")
    return min(validation_ppl, key=lambda r: (validation_ppl[r], r))


def _keyed(val: Mapping[float, float]) -> dict[str, float]:
    return {f"{lr:g}": v for lr, v in val.items()}


def _federate(args: argparse.Namespace, method: str, lr: float, nodes: Sequence[LocalTrainer], schedule: LrSchedule,
              task: Any, aggregate_fn: AggregateFn, validation: Scorer, log: Callable[..., None],
              ) -> tuple[bytes, dict[str, Any]]:
    """args.rounds rounds of every node's args.local_steps steps from the global adapter, then
    `method`: (final adapter, {discarded_energy_max, curve on validation when --curve})."""
    adapter: bytes | None = None
    curve: list[float] = []
    energies: list[float] = []
    for rnd in range(args.rounds):
        window = schedule.window(rnd * args.local_steps, args.rounds * args.local_steps)
        seed = args.seed + 1000 * (rnd + 1)
        results = [n.train(adapter, steps=args.local_steps, learning_rate=lr, seed=seed,
                           lr_schedule=window if args.round_schedule == "run" else schedule) for n in nodes]
        total = sum(r.num_samples for r in results)
        adapter, discarded = aggregate_fn(method, [r.delta_bytes for r in results],
                                          [r.num_samples / total for r in results], task.lora_r,
                                          float(task.lora_alpha))
        if discarded is not None:
            energies.append(discarded)
        if args.curve:
            curve.append(validation.pooled(validation.losses(adapter)))
            log(f"  {method} lr {lr:g} round {rnd + 1}: pooled validation ppl {curve[-1]:.4f}")
    assert adapter is not None
    extra: dict[str, Any] = {}
    if energies:
        extra["discarded_energy_max"] = max(energies)
    if args.curve:
        extra["validation_curve"] = curve
    return adapter, extra


def _target_tokens(examples: Sequence[Any]) -> int:
    """Tokens the loss counts in `examples` (as fednode.learning.batching.batch_loss counts them:
    each example's labels after the first position that are not IGNORE_INDEX)."""
    return sum(sum(1 for t in (ex.labels or ex.input_ids)[1:] if t != IGNORE_INDEX) for ex in examples)


def chat_goals(fig: Mapping[str, Any]) -> dict[str, bool]:
    """On the pooled held-out set: every federated arm within 5% of centralized perplexity, and below
    local-only's (mean over nodes)."""
    out: dict[str, bool] = {}
    fed = [fig[m]["pooled"] for m in ("fedavg", "exact") if m in fig]
    if fed and "centralized" in fig:
        out["federated_within_5pct_of_centralized_pooled_ppl"] = (
            max(fed) <= (1 + CHAT_PPL_TOLERANCE) * fig["centralized"]["pooled"])
    if fed and "local_only" in fig:
        out["federated_below_local_only_pooled_ppl"] = max(fed) < fig["local_only"]["pooled"]
    return out


def print_chat_table(fig: Mapping[str, Any]) -> None:
    print(f"{'arm':<22}{'pooled held-out ppl':>20}{'own held-out ppl (mean)':>26}")
    for key, label in (("base", "fresh adapter (base)"), ("centralized", "centralized LoRA"),
                       ("local_only", "local-only (mean)"), ("fedavg", "federated fedavg"),
                       ("exact", "federated exact")):
        if key in fig:
            print(f"{label:<22}{fig[key]['pooled']:>20.3f}{fig[key]['own_mean']:>26.3f}")
    for key in ("centralized", "fedavg", "exact"):
        if key in fig and "lr" in fig[key]:
            print(f"{key}: lr {fig[key]['lr']:g} chosen on validation {fig[key]['validation']}")
    if "local_only" in fig:
        print(f"local-only: lr per node {[p.get('lr') for p in fig['local_only']['per_node']]}")
    if "exact_vs_fedavg" in fig:
        print(f"note: {fig['exact_vs_fedavg']}")
    for goal, ok in fig["goals"].items():
        print(f"goal {goal}: {'MET' if ok else 'MISSED'}")
    print(f"wall {fig['wall_seconds']:.0f}s")
