"""bench_quality.py --suite chat: chat SFT of a causal LM on nodes with topic-skewed chat data.

Four topics of short question/answer chats, generated from fixed tables with a seed (offline, no
download): capitals, arithmetic, opposites, animal sounds. Node i holds mostly topic i mod 4
(--skew of its rows) and some of the others; its held-out rows are drawn the same way, and the
pooled held-out set is every node's together. The rows go through fednode.learning.local_data
(format "chat": the tokenizer's chat template, loss on the assistant turns), as a node's own files
would. Arms and step budget as in bench_quality.py; scores are held-out perplexities.

One rule for every arm, so the comparison is fair: the same examples seen (every arm runs
nodes * rounds * local_steps steps of `batch` rows in all), AdamW, and ONE linear decay over the
arm's whole run -- the centralized arm over its one call, local-only over each node's one call,
and the federated arms over their rounds (round n runs steps n*local_steps.. of the same decay,
fednode.learning.schedule's window) rather than a restart to the peak every round, which the
centralized arm never gets. Defaults: 8 rounds x 2 local steps (FedAvg on non-IID data needs
several rounds of few local steps: client drift grows with the local steps), 64 steps per arm.

The pooled held-out set is the nodes' held-out sets together, so its perplexity is computed from
the per-node evaluations (token-weighted, exactly the pooled mean) instead of a second pass.
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


def _node_data(root: Path, node: int, args: argparse.Namespace, tokenizer: Any) -> LocalData:
    train, held_out = root / f"node{node}-train.jsonl", root / f"node{node}-eval.jsonl"
    for path, count, salt in ((train, args.chat_train_rows, 0), (held_out, args.chat_eval_rows, 1)):
        rows = chat_rows(node, count, args.skew, args.seed * 2 + salt)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    section = DataSection(path=str(train), format="chat", eval_path=str(held_out))
    return load_local_data(section, tokenizer, max_length=args.max_len)


def run_chat(args: argparse.Namespace, aggregate_fn: AggregateFn) -> dict[str, Any]:
    overrides: dict[str, Any] = {"batch_size": args.batch, "max_len": args.max_len, "eval_batch_size": 16,
                                 "max_eval_samples": args.nodes * args.chat_eval_rows}
    if args.model:
        overrides["base_model_id"] = args.model
    task = get_task("smollm2-lm", **overrides).replace(dataset="local")
    schedule = LrSchedule(args.schedule, args.floor)
    log = print if args.verbose else (lambda *a, **k: None)
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(resolve_model_dir(task))
    with tempfile.TemporaryDirectory(prefix="bench-chat-") as tmp:
        datas = [_node_data(Path(tmp), i, args, tokenizer) for i in range(args.nodes)]
    nodes = [LocalTrainer(task, i, args.nodes, data=d, torch_threads=args.threads, lr_schedule=schedule)
             for i, d in enumerate(datas)]
    pooled = Pooled(tuple(ex for d in datas for ex in d.train), tuple(ex for d in datas for ex in d.eval))
    central = LocalTrainer(task, 0, 1, data=pooled, torch_threads=args.threads, lr_schedule=schedule)
    total_steps = args.nodes * args.rounds * args.local_steps
    log(f"setup {time.perf_counter() - t0:.1f}s; {len(pooled.train)} train / {len(pooled.eval)} held-out chats")

    units = [_target_tokens(d.eval) for d in datas]

    def per_node(adapter: bytes | None) -> list[float]:
        """Mean token loss of `adapter` on each node's held-out set."""
        return [n.evaluate(adapter)["loss"] for n in nodes]

    def pooled_ppl(losses: Sequence[float]) -> float:
        return math.exp(sum(lo * u for lo, u in zip(losses, units, strict=True)) / sum(units))

    def scores(adapter: bytes | None) -> dict[str, Any]:
        losses = per_node(adapter)
        own = [math.exp(lo) for lo in losses]
        return {"pooled": pooled_ppl(losses), "own": own, "own_mean": sum(own) / len(own)}

    figures: dict[str, Any] = {"suite": "chat", "config": {
        "model": args.model or task.base_model_id, "nodes": args.nodes, "rounds": args.rounds,
        "local_steps": args.local_steps, "lr": args.lr, "central_lr": args.central_lr, "schedule": args.schedule,
        "floor": args.floor, "batch": args.batch, "max_len": args.max_len, "seed": args.seed, "skew": args.skew,
        "threads": args.threads, "total_steps_per_arm": total_steps, "round_schedule": args.round_schedule,
        "train_rows_per_node": args.chat_train_rows,
        "eval_rows_per_node": args.chat_eval_rows, "target_modules": list(central.target_modules)}}
    if args.base:
        figures["base"] = scores(None)
    if "centralized" in args.arms:
        res = central.train(None, steps=total_steps, learning_rate=args.central_lr, seed=args.seed)
        figures["centralized"] = scores(res.delta_bytes)
        log(f"centralized {figures['centralized']}")
    if "local_only" in args.arms:
        local: list[dict[str, float]] = []
        for n in nodes:
            r = n.train(None, steps=args.rounds * args.local_steps, learning_rate=args.lr, seed=args.seed)
            losses = per_node(r.delta_bytes)
            local.append({"pooled": pooled_ppl(losses), "own": math.exp(losses[n.node_index])})
        figures["local_only"] = {"pooled": sum(p["pooled"] for p in local) / len(local),
                                 "own_mean": sum(p["own"] for p in local) / len(local), "per_node": local}
        log(f"local-only {figures['local_only']}")
    for method in ("fedavg", "exact"):
        if method not in args.arms:
            continue
        adapter: bytes | None = None
        curve: list[float] = []
        energies: list[float] = []
        for rnd in range(args.rounds):
            window = schedule.window(rnd * args.local_steps, args.rounds * args.local_steps)
            seed = args.seed + 1000 * (rnd + 1)
            results = [n.train(adapter, steps=args.local_steps, learning_rate=args.lr, seed=seed,
                               lr_schedule=window if args.round_schedule == "run" else schedule) for n in nodes]
            total = sum(r.num_samples for r in results)
            adapter, discarded = aggregate_fn(method, [r.delta_bytes for r in results],
                                              [r.num_samples / total for r in results], task.lora_r,
                                              float(task.lora_alpha))
            if discarded is not None:
                energies.append(discarded)
            if args.curve and rnd < args.rounds - 1:
                curve.append(pooled_ppl(per_node(adapter)))
                log(f"  {method} round {rnd + 1}: pooled ppl {curve[-1]:.4f}")
        assert adapter is not None
        figures[method] = scores(adapter)
        if args.curve:
            figures[method]["curve"] = [*curve, figures[method]["pooled"]]
        if energies:
            figures[method]["discarded_energy_max"] = max(energies)
        log(f"{method} {figures[method]}")
    figures["wall_seconds"] = time.perf_counter() - t0
    figures["goals"] = chat_goals(figures)
    return figures


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
    for goal, ok in fig["goals"].items():
        print(f"goal {goal}: {'MET' if ok else 'MISSED'}")
    print(f"wall {fig['wall_seconds']:.0f}s")
