"""The "fake" task without torch: a fast, deterministic stand-in trainer and a numpy FedAvg for its
updates, so that a fake-task daemon (protocol tests, chaos/fault runs, scale benchmarks with dozens of
daemons on one machine) starts and runs without importing torch.

Measured (2 cores shared with other jobs, load ~8, fake task, one `fednode run` from start to its
"up" line, twice each): before, 4.0-4.7 s of CPU, 290 MB RSS, 6.6-7.9 s wall (torch imported by the
fake trainer); after, 1.75-1.95 s of CPU, 105 MB RSS, 2.5-3.6 s wall. Most of what is left is
importing py-libp2p (~2 s CPU: it pulls in aioquic, httpx, requests for transports we do not use).

The bytes are the same safetensors format `fednode.aggregation.delta.dump_delta`
writes (fp32 tensors in key order, header padded to 8 bytes), so real and fake code paths agree.

An update that does not have the fake layout byte-for-byte (a hostile or malformed blob) is handed to
the torch validator (`fednode.aggregation.delta.validate_update`) for its precise error: that path
imports torch, but only then. numpy too is imported where it is used, not with the module: a daemon
that never trains or aggregates (most of its life, idle) starts ~0.16 s of CPU sooner (issue 12).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from fednode.aggregation.api import AggregationOptions
    from fednode.node.trainers import ProgressCallback, TrainOutput

# The fake adapter: two adapted "modules" and a head, small enough for 100s of nodes.
FAKE_LAYOUT: dict[str, tuple[int, ...]] = {
    "base_model.model.layer.0.q.lora_A.weight": (4, 12),
    "base_model.model.layer.0.q.lora_B.weight": (10, 4),
    "base_model.model.layer.0.v.lora_A.weight": (4, 12),
    "base_model.model.layer.0.v.lora_B.weight": (10, 4),
    "base_model.model.head.weight": (3, 10),
}
FAKE_UPDATE_SCALE = 0.1
"""Std of the seeded noise one fake training run adds to the start adapter."""


def _prefix(layout: dict[str, tuple[int, ...]]) -> tuple[bytes, int]:
    """(length prefix + header, data bytes) exactly as dump_delta writes them for fp32 `layout`."""
    header: dict[str, Any] = {}
    offset = 0
    for key in sorted(layout):
        n = math.prod(layout[key]) * 4
        header[key] = {"dtype": "F32", "shape": list(layout[key]), "data_offsets": [offset, offset + n]}
        offset += n
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    return len(head).to_bytes(8, "little") + head, offset


FAKE_PREFIX, FAKE_DATA_BYTES = _prefix(FAKE_LAYOUT)
FAKE_SIZE = len(FAKE_PREFIX) + FAKE_DATA_BYTES
_KEYS = sorted(FAKE_LAYOUT)
_NUMEL = sum(math.prod(s) for s in FAKE_LAYOUT.values())


def is_fake_layout(data: bytes | bytearray | memoryview) -> bool:
    """True if `data` is an fp32 safetensors blob of exactly the fake layout (same header bytes)."""
    return len(data) == FAKE_SIZE and bytes(data[: len(FAKE_PREFIX)]) == FAKE_PREFIX


def fake_flat(data: bytes | bytearray | memoryview) -> np.ndarray:
    """The blob's tensors as one owned float32 vector (key order). Caller checked `is_fake_layout`."""
    import numpy as np
    return np.frombuffer(bytes(data), dtype="<f4", offset=len(FAKE_PREFIX), count=_NUMEL).astype(np.float32)


def fake_dump(flat: np.ndarray) -> bytes:
    """Safetensors bytes of a float32 vector in the fake layout's key order."""
    import numpy as np
    return FAKE_PREFIX + np.ascontiguousarray(flat, dtype="<f4").tobytes()


class FakeTrainer:
    """Deterministic: the update is the start adapter plus noise seeded by (node, round, start)."""

    base_model_id = "fake-model"
    base_model_hash = hashlib.sha256(b"fednode fake base model v1").hexdigest()

    def __init__(self, node_index: int, *, num_samples: int | None = None, step_seconds: float = 0.0) -> None:
        self.node_index = node_index
        self.num_samples = num_samples if num_samples is not None else 10 + 7 * node_index
        self.step_seconds = step_seconds

    def warm_up(self) -> None:
        """Import what training and merging need, in a worker thread once the node is up. Else every
        daemon of a community imports numpy (0.16-0.35 s of CPU) the moment round 1 opens: at 32
        daemons on 2 cores that burst starved the coordinator's heartbeats for 5 s and a member
        claimed term 2 (issue 12, bench_scale)."""
        import numpy  # noqa: F401

    def train(self, start_adapter: bytes | None, *, round_number: int, steps: int, learning_rate: float,
              seed: int, progress: ProgressCallback | None = None, deadline: float | None = None) -> TrainOutput:
        import numpy as np

        from fednode.node.trainers import TrainOutput

        if start_adapter and is_fake_layout(start_adapter):
            start = fake_flat(start_adapter)
        elif start_adapter:  # not ours: the torch reader says why (or reads another fp32 order)
            start = _torch_flat(start_adapter)
        else:
            start = np.zeros(_NUMEL, dtype=np.float32)
        digest = hashlib.sha256(f"{self.node_index}/{round_number}/{seed}".encode() + (start_adapter or b""))
        gen = np.random.Generator(np.random.PCG64(int.from_bytes(digest.digest()[:8], "little")))
        out = (start + FAKE_UPDATE_SCALE * gen.standard_normal(_NUMEL, dtype=np.float32)).astype(np.float32)
        for step in range(1, steps + 1):
            if self.step_seconds:
                # Unequal machines: node i's steps take (1 + i mod 4) x step_seconds, so submissions
                # arrive spread out. Runs in the daemon's worker thread.
                time.sleep(self.step_seconds * (1 + self.node_index % 4))
            if progress is not None:
                progress(step, 1.0 / step)
        return TrainOutput(fake_dump(out), self.num_samples, {"loss": 1.0 / max(steps, 1)})

    def evaluate(self, adapter: bytes | None) -> dict[str, float]:
        import numpy as np
        if adapter is None:
            return {"accuracy": 0.0, "loss": 1.0, "n": 1}
        flat = fake_flat(adapter) if is_fake_layout(adapter) else _torch_flat(adapter)
        norm = float(np.linalg.norm(flat.astype(np.float64)))
        return {"accuracy": 1.0 / (1.0 + norm), "loss": norm, "n": 1}

    def check_update(self, delta_bytes: bytes, *, max_norm: float) -> None:
        import numpy as np
        if not is_fake_layout(delta_bytes):
            _torch_check(delta_bytes, max_norm)  # raises, naming the key and the problem
            return
        from fednode.errors import InvalidUpdate

        flat = fake_flat(delta_bytes)
        if not bool(np.isfinite(flat).all()):
            offset = 0
            for key in _KEYS:  # name the key, as validate_update does
                n = math.prod(FAKE_LAYOUT[key])
                if not bool(np.isfinite(flat[offset : offset + n]).all()):
                    raise InvalidUpdate(f"{key}: holds non-finite values (NaN or Inf)")
                offset += n
        norm = float(np.linalg.norm(flat.astype(np.float64)))
        if not norm <= max_norm:
            raise InvalidUpdate(f"update L2 norm {norm:.6g} is over the bound max_norm={max_norm:g}")

    def install(self, adapter: bytes, directory: Path, *, lora_rank: int, lora_alpha: float) -> None:
        import tempfile

        from fednode.fsutil import atomic_replace_dir

        directory.parent.mkdir(parents=True, exist_ok=True)
        build = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        (build / "adapter_model.safetensors").write_bytes(adapter)
        (build / "adapter_config.json").write_text(json.dumps({"fake": True, "r": lora_rank, "lora_alpha": lora_alpha}))
        atomic_replace_dir(build, directory)


def _torch_flat(data: bytes) -> np.ndarray:
    import numpy as np

    from fednode.aggregation.delta import load_delta

    tensors = load_delta(data)
    return np.concatenate([tensors[k].float().reshape(-1).numpy() for k in sorted(tensors)]).astype(np.float32)


def _torch_check(data: bytes, max_norm: float) -> None:
    import torch

    from fednode.aggregation.delta import AdapterLayout, load_delta, validate_update

    layout = AdapterLayout.from_tensors({k: torch.zeros(s) for k, s in FAKE_LAYOUT.items()})
    validate_update(load_delta(data), layout, max_norm=max_norm)


def fake_fedavg(datas: Sequence[bytes], weights: Sequence[float]) -> bytes | None:
    """FedAvg (sum_i w_i u_i / sum_i w_i, in float64, stored fp32) of fake-layout blobs, without
    torch; None when any blob is not of the fake layout or a weight is unusable (the caller then
    aggregates with `fednode.aggregation`, which raises the precise error)."""
    import numpy as np
    if not datas or len(datas) != len(weights) or not all(is_fake_layout(d) for d in datas):
        return None
    ws = [float(w) for w in weights]
    if not all(math.isfinite(w) and w >= 0.0 for w in ws) or math.fsum(ws) <= 0.0:
        return None
    total = np.zeros(_NUMEL, dtype=np.float64)
    for d, w in zip(datas, ws, strict=True):
        if w > 0.0:
            total += w * fake_flat(d).astype(np.float64)
    return fake_dump((total / math.fsum(ws)).astype(np.float32))


def merge_updates(datas: Sequence[bytes], weights: Sequence[float], method: str, *, rank: int, alpha: float,
                  options: Callable[[], AggregationOptions], fake: bool) -> tuple[bytes, float | None]:
    """The coordinator's merge: (merged safetensors bytes, discarded energy). A fake-task FedAvg of
    fake-layout blobs runs in numpy; everything else goes through `fednode.aggregation` (torch)."""
    if fake and method == "fedavg":
        merged = fake_fedavg(datas, weights)
        if merged is not None:
            return merged, None
    from fednode.aggregation import aggregate, dump_delta

    result = aggregate(datas, weights, method, rank=rank, alpha=alpha, options=options())
    return dump_delta(result.tensors), result.discarded_energy
