#!/usr/bin/env python
"""Aggregation benchmark: K in {4, 16, 64} synthetic LoRA adapters with SmolLM2-135M's q/k/v/o layout
(30 layers, hidden 576, kv dim 192, r=16: 240 tensors, 7.4 MB of fp32 safetensors each), timed from
the clients' safetensors bytes to the merged safetensors bytes.

Arms: fednode fedavg (streaming) vs Flower's `flwr.server.strategy.aggregate.aggregate` (numpy lists)
vs a naive torch loop; fednode exact (rank 16) vs peft `add_weighted_adapter(combination_type="svd")`
on a stand-in model holding only the 120 adapted Linear layers at their real shapes (30 layers x
q/k/v/o; no embeddings, MLP or norms, which the merge never touches).

Each (arm, K) runs in its own child process: the child builds its K input blobs, runs the arm once
to warm up, resets the kernel's peak-RSS counter (/proc/self/clear_refs), then reports the best-of-N
wall time and the peak RSS growth over the inputs (VmHWM - VmRSS before), so memory figures are the
arm's working memory on top of the K blobs it was given (glibc's mmap threshold is fixed so freed
buffers go back to the OS and RSS follows live memory).

Usage: .venv/bin/python scripts/bench_aggregate.py [--ks 4 16 64] [--repeats 3] [--peft-max-k 64]
Flower is needed only here: if `import flwr` fails this prints how to install it and exits 2.
Last line: a JSON object of all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LAYERS, HIDDEN, KV_DIM, RANK, ALPHA = 30, 576, 192, 16, 32
PROJ = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (KV_DIM, HIDDEN), "v_proj": (KV_DIM, HIDDEN), "o_proj": (HIDDEN, HIDDEN)}
PREFIX = "base_model.model.model.layers.{i}.self_attn.{p}"
ARMS = ("fednode_fedavg", "flower", "naive_torch", "fednode_exact", "peft_svd")


def make_blobs(k: int) -> tuple[list[bytes], list[float]]:
    import torch

    from fednode.aggregation import dump_delta

    blobs = []
    for c in range(k):
        g = torch.Generator().manual_seed(1000 + c)
        t = {}
        for i in range(LAYERS):
            for p, (out_f, in_f) in PROJ.items():
                t[PREFIX.format(i=i, p=p) + ".lora_A.weight"] = torch.randn(RANK, in_f, generator=g) / in_f**0.5
                t[PREFIX.format(i=i, p=p) + ".lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
        blobs.append(dump_delta(t))
    weights = [float(100 + 37 * c % 400) for c in range(k)]
    return blobs, weights


def arm_fednode(method: str) -> Callable[[list[bytes], list[float]], bytes]:
    from fednode.aggregation import aggregate, dump_delta

    def run(blobs: list[bytes], weights: list[float]) -> bytes:
        if method == "exact":
            return dump_delta(aggregate(blobs, weights, "exact", rank=RANK, alpha=ALPHA).tensors)
        return dump_delta(aggregate(blobs, weights, "fedavg").tensors)

    return run


def arm_flower(blobs: list[bytes], weights: list[float]) -> bytes:
    import safetensors.numpy
    from flwr.server.strategy.aggregate import aggregate

    keys: list[str] = []
    results = []
    for blob, w in zip(blobs, weights, strict=True):
        arrays = safetensors.numpy.load(blob)
        keys = sorted(arrays)
        results.append(([arrays[k] for k in keys], int(w)))
    merged = aggregate(results)
    return bytes(safetensors.numpy.save(dict(zip(keys, merged, strict=True))))


def arm_naive(blobs: list[bytes], weights: list[float]) -> bytes:
    import safetensors.torch
    import torch

    clients = [safetensors.torch.load(b) for b in blobs]
    total = sum(weights)
    out: dict[str, torch.Tensor] = {}
    for k in clients[0]:
        acc = torch.zeros_like(clients[0][k])
        for c, w in zip(clients, weights, strict=True):
            acc = acc + w * c[k]
        out[k] = acc / total
    return bytes(safetensors.torch.save(out))


def arm_peft_svd(blobs: list[bytes], weights: list[float]) -> bytes:
    import safetensors.torch
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    class Attn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            for p, (out_f, in_f) in PROJ.items():
                setattr(self, p, torch.nn.Linear(in_f, out_f, bias=False))

    class Layer(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attn()

    class Inner(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(Layer() for _ in range(LAYERS))

    class StandIn(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()

    cfg = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(PROJ), lora_dropout=0.0)
    model = get_peft_model(StandIn(), cfg, adapter_name="c0")
    names = [f"c{i}" for i in range(len(blobs))]
    for i, (name, blob) in enumerate(zip(names, blobs, strict=True)):
        if i:
            model.add_adapter(name, cfg)
        set_peft_model_state_dict(model, safetensors.torch.load(blob), adapter_name=name)
    total = sum(weights)
    model.add_weighted_adapter(names, [w / total for w in weights], "merged", combination_type="svd",
                               svd_rank=RANK)
    merged = get_peft_model_state_dict(model, adapter_name="merged")
    return bytes(safetensors.torch.save({k: v.contiguous() for k, v in merged.items()}))


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _reset_peak() -> bool:
    """Linux >= 4.0: writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def child(arm: str, k: int, repeats: int, threads: int) -> dict[str, Any]:
    import gc

    import torch

    torch.set_num_threads(threads)
    fn: Callable[[list[bytes], list[float]], bytes] = {
        "fednode_fedavg": arm_fednode("fedavg"),
        "fednode_exact": arm_fednode("exact"),
        "flower": arm_flower,
        "naive_torch": arm_naive,
        "peft_svd": arm_peft_svd,
    }[arm]
    if arm == "flower":
        import flwr.server.strategy.aggregate  # noqa: F401  (import cost is not aggregation time)
    if arm == "peft_svd":
        import peft  # noqa: F401
    blobs, weights = make_blobs(k)
    warm_blobs, warm_w = make_blobs(2)
    fn(warm_blobs, warm_w)  # first-call costs (lazy imports, kernels) are not per-round costs
    del warm_blobs
    gc.collect()
    exact_peak = _reset_peak()
    before = _rss_kib("VmRSS") if exact_peak else _rss_kib("VmHWM")
    times = []
    size = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(blobs, weights)
        times.append(time.perf_counter() - t0)
        size = len(out)
        del out
    after = _rss_kib("VmHWM")
    return {"arm": arm, "k": k, "seconds": min(times), "peak_mb": (after - before) / 1024, "out_bytes": size,
            "input_mb": sum(map(len, blobs)) / 2**20}


def run_child(arm: str, k: int, repeats: int, timeout: float, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", arm, "--ks", str(k), "--repeats", str(repeats),
           "--threads", str(threads)]
    # A fixed mmap threshold makes glibc return big buffers to the OS, so RSS follows live memory.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False, env=env)
    except subprocess.TimeoutExpired:
        return {"arm": arm, "k": k, "error": f"timeout after {timeout:.0f} s"}
    if proc.returncode != 0:
        return {"arm": arm, "k": k, "error": proc.stderr.strip().splitlines()[-1:] or ["failed"]}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", nargs="+", default=["4,16,64"], help="client counts: 4 16 64 or 4,16,64")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peft-max-k", type=int, default=64, help="skip the (slow) peft svd arm above this K")
    ap.add_argument("--timeout", type=float, default=600.0, help="per child process, seconds")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per arm (1: stable figures on a shared 2-core box; numpy is 1 anyway)")
    ap.add_argument("--child", choices=ARMS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    ks = [int(x) for part in args.ks for x in part.split(",") if x]
    if args.child:
        print(json.dumps(child(args.child, ks[0], args.repeats, args.threads)))
        return 0
    try:
        import flwr  # noqa: F401
    except ImportError:
        print("flwr is not installed; it is needed only for this benchmark:\n"
              "    .venv/bin/pip install flwr\n(or, without touching shared pins: "
              ".venv/bin/pip install --no-deps flwr iterators)", file=sys.stderr)
        return 2
    results: dict[str, dict[str, Any]] = {}
    for k in ks:
        for arm in ARMS:
            if arm == "peft_svd" and k > args.peft_max_k:
                continue
            r = run_child(arm, k, 1 if arm == "peft_svd" else args.repeats, args.timeout, args.threads)
            results[f"{arm}@{k}"] = r
            if "error" in r:
                print(f"K={k:3d} {arm:15s} ERROR {r['error']}", flush=True)
            else:
                print(f"K={k:3d} {arm:15s} {r['seconds']:8.3f} s  peak +{r['peak_mb']:7.1f} MB  "
                      f"(inputs {r['input_mb']:.0f} MB)", flush=True)
    figures: dict[str, Any] = {"arms": results, "ratios": {}, "goals": {}, "threads": args.threads,
                               "peak_mb": "RSS high-water mark over the K input blobs, per arm"}
    print("\nK    fedavg/flower  fedavg/naive  exact/fedavg  exact/peft_svd")
    for k in ks:
        def sec(arm: str, k: int = k) -> float | None:
            r = results.get(f"{arm}@{k}", {})
            return r.get("seconds")

        def ratio(a: str, b: str) -> float | None:
            x, y = sec(a), sec(b)
            return None if x is None or y is None else x / y

        rk = {"fedavg_over_flower": ratio("fednode_fedavg", "flower"),
              "fedavg_over_naive": ratio("fednode_fedavg", "naive_torch"),
              "exact_over_fedavg": ratio("fednode_exact", "fednode_fedavg"),
              "exact_over_peft_svd": ratio("fednode_exact", "peft_svd")}
        figures["ratios"][str(k)] = rk
        print(f"{k:<4d} " + "  ".join(f"{v:12.3f}" if v is not None else f"{'n/a':>12s}" for v in rk.values()))
    fed_peaks = [results.get(f"fednode_fedavg@{k}", {}).get("peak_mb") for k in ks]
    figures["goals"] = {
        "fedavg_le_half_flower": all((figures["ratios"][str(k)]["fedavg_over_flower"] or 9) <= 0.5 for k in ks),
        "exact_le_3x_fedavg": all((figures["ratios"][str(k)]["exact_over_fedavg"] or 9) <= 3 for k in ks),
        "fedavg_peak_mb_by_k": dict(zip(map(str, ks), fed_peaks, strict=True)),
    }
    print(f"goals: {figures['goals']}")
    print(json.dumps(figures, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
