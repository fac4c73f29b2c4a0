"""What issue 10 asks of a federation that trained on each node's own data, checked on its node dirs
after the daemons stopped (shared by test_own_data.py and test_readme_walkthrough.py):

- `canary_leaks`: a canary planted in one node's data is in no file of any other node (the gossip
  messages they accepted are in their state.sqlite), nor in the canary node's own blobs, round
  records, adapters or state.sqlite: only tensors leave a node;
- `fresh_process_generate`: the merged adapter dir loads in a fresh process with plain PEFT +
  transformers (tests/learning/plain_peft.py, which imports no fednode) and generates text;
- `own_losses`: each node's held-out loss on its own data, base model vs merged adapter, scored by
  the node's own trainer (its config, its data).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from fednode.config import load_config

REPO = Path(__file__).resolve().parents[2]
PLAIN_PEFT = REPO / "tests" / "learning" / "plain_peft.py"


def _files(folder: Path) -> Iterator[Path]:
    return (p for p in folder.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "control.sock")


def canary_leaks(node_dirs: Iterable[Path], canary: str, *, owner: Path, owner_data: Path) -> tuple[list[Path], int]:
    """(files holding the canary that must not, files scanned). The owner's own data file and its own
    log are not scanned (they may speak of its own data); everything else of every node is.
    Raises if the canary is not in `owner_data` (the scan could not fail otherwise)."""
    needle = canary.encode()
    assert needle in owner_data.read_bytes(), f"the canary is not in {owner_data}: the scan would prove nothing"
    leaks, scanned = [], 0
    for folder in node_dirs:
        for path in _files(folder):
            if path.resolve() == owner_data.resolve() or (folder == owner and path.name == "log.txt"):
                continue
            scanned += 1
            if needle in path.read_bytes():
                leaks.append(path)
    return leaks, scanned


def fresh_process_generate(adapter: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(PLAIN_PEFT), str(adapter.resolve())], capture_output=True, text=True,
                          env=env, timeout=600, check=False, cwd="/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def own_losses(configs: Iterable[Path], round_number: int) -> dict[str, tuple[float, float]]:
    """{config path: (base model's held-out loss, merged adapter's)} on each node's own held-out rows."""
    from fednode.node.trainers import make_trainer

    out = {}
    for config_path in configs:
        config = load_config(config_path)
        trainer = make_trainer(config)
        merged = (config.data_dir / "adapters" / f"round-{round_number}" / "adapter_model.safetensors").read_bytes()
        out[str(config_path)] = (trainer.evaluate(None)["loss"], trainer.evaluate(merged)["loss"])
    return out
