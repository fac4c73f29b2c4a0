#!/usr/bin/env python3
"""Learning-quality bench (in-process, no network): MiniLM-L6 + BBC News, 4 nodes with Dirichlet
label skew, EQUAL total training steps for every arm:

  centralized   one adapter, nodes*rounds*local_steps steps on the whole training split
  local-only    each node rounds*local_steps steps on its own share (mean held-out accuracy)
  fedavg        rounds x (each node local_steps from the global adapter) + fednode fedavg
  exact         same, aggregated with fednode's exact rank-r LoRA aggregation

Prints a table of held-out accuracy, then (last line) a JSON object of the figures.
Goals: exact within 2 points of centralized; federated >= 10 points above local-only; exact >= fedavg.

The defaults are the demo's federated setting (3 rounds x 10 local steps, 120 steps per arm) and
one rule for every arm: AdamW with the trainer's default schedule, a linear decay to 0.1x the peak
within each train call (fednode.learning.schedule). Only the peak rate differs between the
centralized arm and the node arms: a node's call is 10 steps long, the centralized call 120, and
AdamW moves each weight about `lr` per step, so one peak would move the centralized adapter 12x as
far as a node's round. The peaks come from the earlier constant-rate sweep at 160 steps per arm
(centralized: 95.5% at 3e-3, 91.4% at 5e-3, 77.7% at 1e-2; nodes best at 1e-2): the centralized
peak 5e-3 decays to a mean rate of 2.75e-3 (close to its best constant 3e-3); the node peak stays
1e-2. Measured (seed 0, 2 threads, shared box): centralized 96.17, local-only 53.43, fedavg 94.59,
exact 95.50 (curve 85.8, 93.9, 95.5); all three goals met. --arms runs a subset (for sweeps).

--suite chat: the same four arms as chat SFT of a causal LM (default the embedded
SmolLM2-135M-Instruct; --model DIR for any local HF causal LM with a chat template). Each node holds
its own chat data (JSONL through fednode.learning.local_data, loss on the assistant turns), skewed
to one topic (--skew of its rows; the rest from the other topics), and a held-out set drawn the
same way. Scores are perplexities on each node's own held-out set and on the pooled held-out set.
Goals: every federated arm within 5% of centralized perplexity on the pooled held-out set, and
better (lower) than local-only there.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ["HF_HUB_OFFLINE"] = "1"

from fednode.learning import LocalTrainer, get_task
from fednode.learning.schedule import LR_SCHEDULE_KINDS, LrSchedule

AggregateFn = Callable[[str, Sequence[bytes], Sequence[float], int, float], tuple[bytes, float | None]]

DEFAULT_NODES = 4
DEFAULT_ALPHA = 0.5
DEFAULT_ROUNDS = 3
DEFAULT_LOCAL_STEPS = 10
# Peak rates (linear decay to DEFAULT_FLOOR x peak within each call); see the module docstring.
DEFAULT_LR = 1e-2  # nodes: local-only, fedavg, exact
DEFAULT_CENTRAL_LR = 5e-3  # centralized
DEFAULT_SCHEDULE = "linear"
DEFAULT_FLOOR = 0.1
ARMS = ("centralized", "local_only", "fedavg", "exact")
DEFAULT_BATCH = 16
DEFAULT_MAX_LEN = 64
DEFAULT_THREADS = 2
SUITES = ("classification", "chat")
# --suite chat: per-suite defaults of the shared flags (a flag given on the command line wins).
# chat: 8 rounds x 2 local steps under one decay over the run (see bench_quality_chat's docstring).
# Learning rates: every arm is tuned over CHAT_LR_GRID by the same rule (lowest pooled validation
# perplexity; bench_quality_chat.run_chat) unless --lr / --central-lr fix one.
CHAT_DEFAULTS = {"rounds": 8, "local_steps": 2, "batch": 4, "max_len": 96, "round_schedule": "run"}
# 2026-12-02 (seed 0, 2 threads, quiet 2-core box, 765 s): centralized chose 1.5e-3, both federated arms 3e-3,
# local-only 1.5e-3 on three nodes and 3e-3 on one; an earlier grid topped at 1.5e-3 was chosen by every arm.
CHAT_LR_GRID = (1.5e-3, 3e-3)
CLASSIFICATION_DEFAULTS = {"rounds": DEFAULT_ROUNDS, "local_steps": DEFAULT_LOCAL_STEPS, "lr": DEFAULT_LR,
                           "central_lr": DEFAULT_CENTRAL_LR, "batch": DEFAULT_BATCH, "max_len": DEFAULT_MAX_LEN,
                           "round_schedule": "call"}
ROUND_SCHEDULES = ("call", "run")
DEFAULT_CHAT_TRAIN_ROWS = 48  # per node
DEFAULT_CHAT_EVAL_ROWS = 16  # per node; the pooled held-out set is all nodes' together
DEFAULT_CHAT_VAL_ROWS = 16  # per node: the validation set that picks each arm's learning rate
DEFAULT_CHAT_SKEW = 0.8  # fraction of a node's rows from its own topic
CHAT_PPL_TOLERANCE = 0.05  # federated perplexity within 5% of centralized


def fednode_aggregate(
    method: str, deltas: Sequence[bytes], weights: Sequence[float], rank: int, alpha: float
) -> tuple[bytes, float | None]:
    """Aggregate adapter bytes with fednode.aggregation: (merged bytes, discarded energy or None)."""
    from fednode.aggregation import aggregate, dump_delta

    result = aggregate(list(deltas), list(weights), method, rank=rank, alpha=alpha)
    return dump_delta(result.tensors), result.discarded_energy


def run(args: argparse.Namespace, aggregate_fn: AggregateFn) -> dict[str, Any]:
    task = get_task("minilm-bbc", batch_size=args.batch, max_len=args.max_len)
    schedule = LrSchedule(args.schedule, args.floor)
    t0 = time.perf_counter()
    nodes = [
        LocalTrainer(
            task,
            i,
            args.nodes,
            partition_scheme="dirichlet",
            dirichlet_alpha=args.alpha,
            partition_seed=args.seed,
            torch_threads=args.threads,
            lr_schedule=schedule,
        )
        for i in range(args.nodes)
    ]
    central = LocalTrainer(task, 0, 1, torch_threads=args.threads, lr_schedule=schedule)
    total_steps = args.nodes * args.rounds * args.local_steps
    log = print if args.verbose else (lambda *a, **k: None)
    sizes = [len(n.train_indices) for n in nodes]
    log(f"setup {time.perf_counter() - t0:.1f}s; node shares {sizes}; total steps per arm {total_steps}")

    figures: dict[str, Any] = {
        "config": {
            "nodes": args.nodes,
            "alpha": args.alpha,
            "rounds": args.rounds,
            "local_steps": args.local_steps,
            "lr": args.lr,
            "central_lr": args.central_lr,
            "schedule": args.schedule,
            "floor": args.floor,
            "round_schedule": args.round_schedule,
            "batch": args.batch,
            "max_len": args.max_len,
            "seed": args.seed,
            "threads": args.threads,
            "total_steps_per_arm": total_steps,
            "node_samples": sizes,
            "test_samples": len(central.test_indices),
        }
    }
    if args.base:
        figures["base_accuracy"] = central.evaluate(None)["accuracy"]
    step_times: list[float] = []

    if "centralized" in args.arms:
        t = time.perf_counter()
        res = central.train(None, steps=total_steps, learning_rate=args.central_lr, seed=args.seed)
        figures["centralized"] = central.evaluate(res.delta_bytes)["accuracy"]
        step_times.append(res.metrics["seconds_per_step"])
        log(f"centralized {figures['centralized']:.4f} ({time.perf_counter() - t:.0f}s)")

    if "local_only" in args.arms:
        t = time.perf_counter()
        local_accs = []
        for n in nodes:
            r = n.train(None, steps=args.rounds * args.local_steps, learning_rate=args.lr, seed=args.seed)
            local_accs.append(n.evaluate(r.delta_bytes)["accuracy"])
            step_times.append(r.metrics["seconds_per_step"])
        figures["local_only_per_node"] = local_accs
        figures["local_only"] = sum(local_accs) / len(local_accs)
        accs = [round(a, 4) for a in local_accs]
        log(f"local-only {figures['local_only']:.4f} {accs} ({time.perf_counter() - t:.0f}s)")

    for method in ("fedavg", "exact"):
        if method not in args.arms:
            continue
        t = time.perf_counter()
        global_adapter: bytes | None = None
        curve = []
        energies: list[float] = []
        for rnd in range(args.rounds):
            results = [
                n.train(
                    global_adapter,
                    steps=args.local_steps,
                    learning_rate=args.lr,
                    seed=args.seed + 1000 * (rnd + 1),
                    lr_schedule=schedule.window(rnd * args.local_steps, args.rounds * args.local_steps)
                    if args.round_schedule == "run"
                    else None,
                )
                for n in nodes
            ]
            step_times += [r.metrics["seconds_per_step"] for r in results]
            total = sum(r.num_samples for r in results)
            global_adapter, discarded = aggregate_fn(
                method,
                [r.delta_bytes for r in results],
                [r.num_samples / total for r in results],
                task.lora_r,
                float(task.lora_alpha),
            )
            if discarded is not None:
                energies.append(discarded)
            if args.curve or rnd == args.rounds - 1:
                curve.append(central.evaluate(global_adapter)["accuracy"])
                log(f"  {method} round {rnd + 1}: {curve[-1]:.4f}")
        figures[method] = curve[-1]
        if energies:
            figures[f"{method}_discarded_energy_max"] = max(energies)
        if args.curve:
            figures[f"{method}_curve"] = curve
        log(f"{method} {figures[method]:.4f} ({time.perf_counter() - t:.0f}s)")

    figures["seconds_per_step"] = sum(step_times) / max(len(step_times), 1)
    figures["wall_seconds"] = time.perf_counter() - t0
    figures["goals"] = goals(figures)
    return figures


def goals(fig: Mapping[str, Any]) -> dict[str, bool]:
    """The three goals, for the arms that ran."""
    out: dict[str, bool] = {}
    if "exact" in fig and "centralized" in fig:
        out["exact_within_2pt_of_centralized"] = fig["exact"] >= fig["centralized"] - 0.02
    fed = [fig[m] for m in ("fedavg", "exact") if m in fig]
    if fed and "local_only" in fig:  # every federated arm must clear the bar
        out["federated_10pt_above_local_only"] = min(fed) >= fig["local_only"] + 0.10
    if "exact" in fig and "fedavg" in fig:
        out["exact_ge_fedavg"] = fig["exact"] >= fig["fedavg"]
    return out


def print_table(fig: Mapping[str, Any]) -> None:
    print(f"{'arm':<22}{'held-out accuracy':>18}")
    for key, label in (
        ("base_accuracy", "fresh adapter (base)"),
        ("centralized", "centralized LoRA"),
        ("local_only", "local-only (mean)"),
        ("fedavg", "federated fedavg"),
        ("exact", "federated exact"),
    ):
        if key in fig:
            print(f"{label:<22}{100 * fig[key]:>17.2f}%")
    for goal, ok in fig["goals"].items():
        print(f"goal {goal}: {'MET' if ok else 'MISSED'}")
    cfg = fig["config"]
    print(
        f"{fig['seconds_per_step']:.2f} s/step (batch {cfg['batch']}, max_len {cfg['max_len']}, "
        f"{cfg['threads']} threads); wall {fig['wall_seconds']:.0f}s"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA)
    p.add_argument("--suite", choices=SUITES, default="classification",
                   help="classification (MiniLM + BBC, the default) or chat (SFT of a causal LM)")
    p.add_argument("--rounds", type=int, default=None, help=f"default {DEFAULT_ROUNDS}; chat {CHAT_DEFAULTS['rounds']}")
    p.add_argument("--local-steps", type=int, default=None,
                   help=f"default {DEFAULT_LOCAL_STEPS}; chat {CHAT_DEFAULTS['local_steps']}")
    p.add_argument("--lr", type=float, default=None, help="node peak LR (local-only, fedavg, exact); "
                   f"default {DEFAULT_LR}; chat: chosen from --lr-grid unless given")
    p.add_argument("--central-lr", type=float, default=None, help="centralized arm's peak LR; "
                   f"default {DEFAULT_CENTRAL_LR}; chat: chosen from --lr-grid unless given")
    p.add_argument("--lr-grid", type=float, nargs="+", default=list(CHAT_LR_GRID),
                   help="chat: the peak rates every arm is tuned over on the validation split")
    p.add_argument("--schedule", choices=LR_SCHEDULE_KINDS, default=DEFAULT_SCHEDULE, help="LR within each call")
    p.add_argument("--round-schedule", choices=ROUND_SCHEDULES, default=None,
                   help="federated arms: 'call' restarts the decay every round, 'run' runs one decay over all "
                   "rounds (as the centralized arm has over its run); default call, chat run")
    p.add_argument("--floor", type=float, default=DEFAULT_FLOOR, help="last step's LR as a fraction of the peak")
    p.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    p.add_argument("--no-base", dest="base", action="store_false", help="skip evaluating the fresh adapter")
    p.add_argument("--batch", type=int, default=None, help=f"default {DEFAULT_BATCH}; chat {CHAT_DEFAULTS['batch']}")
    p.add_argument("--max-len", type=int, default=None,
                   help=f"default {DEFAULT_MAX_LEN}; chat {CHAT_DEFAULTS['max_len']}")
    p.add_argument("--model", default="", help="chat: a local HF causal LM dir (default: embedded SmolLM2)")
    p.add_argument("--chat-train-rows", type=int, default=DEFAULT_CHAT_TRAIN_ROWS, help="chat: rows per node")
    p.add_argument("--chat-eval-rows", type=int, default=DEFAULT_CHAT_EVAL_ROWS, help="chat: held-out rows per node")
    p.add_argument("--chat-val-rows", type=int, default=DEFAULT_CHAT_VAL_ROWS,
                   help="chat: validation rows per node (they choose each arm's rate; never scored)")
    p.add_argument("--skew", type=float, default=DEFAULT_CHAT_SKEW, help="chat: share of a node's rows from its topic")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS)
    p.add_argument("--curve", action="store_true", help="evaluate the global adapter after every round")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    for key, value in (CHAT_DEFAULTS if args.suite == "chat" else CLASSIFICATION_DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.suite == "chat":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from bench_quality_chat import print_chat_table, run_chat

        figures = run_chat(args, fednode_aggregate)
        print_chat_table(figures)
        print(json.dumps(figures, sort_keys=True))
        return 0
    figures = run(args, fednode_aggregate)
    print_table(figures)
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
