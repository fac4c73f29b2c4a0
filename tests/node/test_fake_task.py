"""The fake task runs without torch (issue 12: fake-task daemons start in ~2 s CPU, not ~4.5 s)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from fednode.aggregation import aggregate
from fednode.aggregation.delta import load_delta
from fednode.node.fake_task import FakeTrainer, fake_fedavg, merge_updates

ROOT = Path(__file__).resolve().parents[2]

_NO_TORCH = """
import sys
from fednode.node.runner import run_daemon  # the daemon's own import graph
from fednode.node.fake_task import FakeTrainer, merge_updates
numpy_at_start = "numpy" in sys.modules  # numpy is imported by the first training, not by starting up
t = [FakeTrainer(i) for i in range(3)]
outs = [x.train(None, round_number=1, steps=2, learning_rate=0.1, seed=0) for x in t]
for o in outs:
    t[0].check_update(o.delta_bytes, max_norm=1e3)
merged, _ = merge_updates([o.delta_bytes for o in outs], [o.num_samples for o in outs], "fedavg",
                          rank=4, alpha=8.0, options=lambda: None, fake=True)
t[1].evaluate(merged)
t[2].train(merged, round_number=2, steps=1, learning_rate=0.1, seed=0)
print(numpy_at_start, "torch" in sys.modules, "transformers" in sys.modules)
"""


def test_a_fake_task_round_imports_no_torch() -> None:
    out = subprocess.run([sys.executable, "-c", _NO_TORCH], capture_output=True, text=True, cwd=ROOT,
                         timeout=120, check=True)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr


def test_numpy_fedavg_matches_the_torch_aggregation() -> None:
    trainers = [FakeTrainer(i) for i in range(4)]
    outs = [t.train(None, round_number=3, steps=1, learning_rate=0.1, seed=7) for t in trainers]
    blobs, weights = [o.delta_bytes for o in outs], [float(o.num_samples) for o in outs]
    ours = fake_fedavg(blobs, weights)
    assert ours is not None
    reference = aggregate(blobs, weights, "fedavg").tensors
    for key, value in load_delta(ours).items():
        assert torch.allclose(value, reference[key], atol=1e-6), key
    # a foreign blob (not the fake layout) goes to the torch path, which names the problem
    assert fake_fedavg([*blobs[:2], b"not safetensors"], weights[:3]) is None
    merged, discarded = merge_updates(blobs, weights, "fedavg", rank=4, alpha=8.0, options=lambda: None, fake=True)
    assert merged == ours and discarded is None


def test_a_fake_task_daemon_imports_numpy_in_the_background_once_up(tmp_path: Path) -> None:
    """Issue 12 (32 daemons, 2 cores): when round 1 opened, every daemon imported numpy at once
    (0.16-0.35 s of CPU each), the coordinator sent no heartbeat for 5 s and a member claimed term 2.
    A fake-task daemon now imports it in a worker thread once it is up, before any round: here no
    round can start (it waits for a second member), yet numpy is loaded. Control: the daemon's own
    import graph does not load numpy (test_a_fake_task_round_imports_no_torch)."""
    import time

    from fednode.harness.cluster import LocalCluster

    cluster = LocalCluster.create(tmp_path / "run", federated=1, gate_off=0, template={},
                                  overrides={"round": {"wait_for_members": 2, "min_participants": 2},
                                             "learning": {"task": "fake"}})
    node = cluster.nodes[0]
    cluster.start()
    try:
        deadline = time.monotonic() + 90
        log = node.folder / "log.txt"
        while " up; community " not in log.read_text(errors="replace"):
            assert node.alive and time.monotonic() < deadline, log.read_text(errors="replace")[-2000:]
            time.sleep(0.2)
        assert node.process is not None
        maps = Path(f"/proc/{node.process.pid}/maps")
        while "_multiarray_umath" not in maps.read_text():
            assert time.monotonic() < deadline, "numpy was not imported after the daemon came up"
            time.sleep(0.2)
        assert "round r1" not in log.read_text(errors="replace")  # no round ran: the warm-up loaded it
    finally:
        cluster.stop()
