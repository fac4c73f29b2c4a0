"""The harness's report: a per-round table, a PNG of accuracy and loss per round (each node's local
adapter and the merged one), and a JSON of every figure."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from fednode.harness.run import HarnessResult

VERIFY_TIMEOUT_SECONDS = 600.0


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def summarize(result: HarnessResult) -> list[dict[str, Any]]:
    rows = []
    for r in result.rounds:
        merged = list(r["merged_metrics"].values())
        rows.append({
            "round": r["round_number"],
            "accuracy": _mean([m["accuracy"] for m in merged if "accuracy" in m]),
            "loss": _mean([m["loss"] for m in merged if "loss" in m]),
            "local_accuracy": {str(k): v.get("accuracy") for k, v in r["local_metrics"].items()},
            "local_loss": {str(k): v.get("loss") for k, v in r["local_metrics"].items()},
            "participants": len(r["participants"]),
            "bytes_moved": r["bytes_moved"],
            "wall_seconds": r["wall_seconds"],
            "merged_sha256": next(iter(r["merged_sha256_by_node"]), ""),
            "aggregation": r["aggregation"],
        })
    return rows


def print_table(rows: list[dict[str, Any]], console: Console) -> None:
    table = Table(title="per-round results (held-out split)", title_justify="left")
    for col in ("round", "merged accuracy", "merged loss", "mean local acc.", "participants", "bytes moved",
                "round wall time", "merged sha256"):
        table.add_column(col, justify="right" if col not in ("merged sha256",) else "left")
    for row in rows:
        local = [v for v in row["local_accuracy"].values() if v is not None]
        table.add_row(
            str(row["round"]), _fmt(row["accuracy"], "{:.3f}"), _fmt(row["loss"], "{:.3f}"),
            _fmt(_mean(local), "{:.3f}"), str(row["participants"]), f"{row['bytes_moved'] / 1e6:.2f} MB",
            f"{row['wall_seconds']:.1f} s" if row["wall_seconds"] is not None else "-", row["merged_sha256"][:16])
    console.print(table)


def _fmt(value: float | None, pattern: str) -> str:
    return pattern.format(value) if value is not None else "-"


def plot(rows: list[dict[str, Any]], path: Path, *, baseline: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    rounds = [r["round"] for r in rows]
    nodes = sorted({k for r in rows for k in r["local_accuracy"]}, key=int)
    for node in nodes:
        ax_acc.plot(rounds, [r["local_accuracy"].get(node) for r in rows], marker=".", alpha=0.55,
                    label=f"node-{node} local")
        ax_loss.plot(rounds, [r["local_loss"].get(node) for r in rows], marker=".", alpha=0.55,
                     label=f"node-{node} local")
    ax_acc.plot(rounds, [r["accuracy"] for r in rows], marker="o", linewidth=2.5, color="black", label="merged")
    ax_loss.plot(rounds, [r["loss"] for r in rows], marker="o", linewidth=2.5, color="black", label="merged")
    if baseline is not None:
        ax_acc.axhline(baseline, linestyle="--", color="grey", label="base + fresh adapter")
    ax_acc.set(title="held-out accuracy", xlabel="round", ylabel="accuracy")
    ax_loss.set(title="held-out loss", xlabel="round", ylabel="cross-entropy")
    for ax in (ax_acc, ax_loss):
        ax.set_xticks(rounds)
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.suptitle("fednode local federation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verify_adapters(task: str, adapters: list[Path | None]) -> list[dict[str, float]]:
    """Score adapter folders (None = the fresh adapter), each in its own plain-PEFT process, side by side."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    procs = []
    for adapter in adapters:
        cmd = [sys.executable, "-m", "fednode.learning.verify", "--task", task]
        cmd += ["--fresh"] if adapter is None else ["--adapter", str(adapter)]
        procs.append((cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)))
    results = []
    for cmd, proc in procs:
        try:
            out, err = proc.communicate(timeout=VERIFY_TIMEOUT_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise RuntimeError(f"{' '.join(cmd)} timed out") from None
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed:\n{err[-2000:]}")
        results.append(dict(json.loads(out.strip().splitlines()[-1])))
    return results


def final_adapter(result: HarnessResult) -> Path | None:
    for node_info in json.loads((result.run_dir / "harness.json").read_text())["nodes"]:
        latest = Path(node_info["folder"]) / "adapters" / "latest"
        if node_info["federated_learning"] and latest.exists():
            return latest.resolve()
    return None


def write_report(result: HarnessResult, *, task: str, verify: bool, console: Console) -> tuple[dict[str, Any], bool]:
    rows = summarize(result)
    adapter = final_adapter(result)
    report: dict[str, Any] = {"rounds": rows, "completed": result.completed, "problems": list(result.problems),
                              "killed": result.killed, "wall_seconds": round(result.wall_seconds, 2),
                              "final_adapter": str(adapter) if adapter else None, "task": task}
    ok = result.completed and adapter is not None
    final_acc = rows[-1]["accuracy"] if rows else None
    if verify and task != "fake" and adapter is not None:
        console.print("verifying: scoring the final adapter with plain PeftModel.from_pretrained, and the base "
                      "model with a fresh adapter (separate processes)…")
        base, plain = verify_adapters(task, [None, adapter])
        report["baseline"] = base
        report["final_adapter_plain_peft"] = plain
        if final_acc is None or not final_acc > base["accuracy"]:
            report["problems"].append(f"final accuracy {final_acc} does not beat the fresh-adapter base "
                                      f"{base['accuracy']:.3f}")
            ok = False
        if final_acc is not None and abs(plain["accuracy"] - final_acc) > 1e-6:
            report["problems"].append(f"plain-PEFT accuracy {plain['accuracy']:.4f} differs from the federation's "
                                      f"{final_acc:.4f}")
            ok = False
    report["ok"] = ok
    png = result.run_dir / "report.png"
    plot(rows, png, baseline=(report.get("baseline") or {}).get("accuracy"))
    path = result.run_dir / "report.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=True))
    print_table(rows, console)
    if "baseline" in report:
        console.print(f"base model + fresh adapter: accuracy {report['baseline']['accuracy']:.3f}; "
                      f"final merged adapter: {final_acc:.3f} (plain PEFT reload: "
                      f"{report['final_adapter_plain_peft']['accuracy']:.3f})")
    for problem in report["problems"]:
        console.print(f"[red]problem:[/red] {problem}")
    console.print(f"final adapter (PEFT dir): {adapter}")
    console.print(f"report: {path} and {png}")
    console.print(f"logs and data: {result.run_dir}/node-*/")
    return report, ok
