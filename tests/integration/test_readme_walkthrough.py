"""README's "Fine-tune on your own data", walked literally on a fresh checkout: the section's bash
blocks run in order as one script in a copy of the tracked tree (nothing built, no runs/), with
`fednode` and `python` from the venv; only the ports are substituted (free ones for 4101-4103).

The same run is issue 10's own-data check with SmolLM2: three daemons, each on its own chat file of
another topic, 2 rounds; then (own_data_checks) bob's canary is in no file of alice's or carol's nor
in bob's own blobs, records, adapters or state.sqlite; the merged adapter loads in a fresh process
with plain PEFT + transformers and generates; every node's held-out loss on its own data after
round 2 is below the base model's."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fednode.harness.cluster import free_port
from tests.integration.own_data_checks import canary_leaks, fresh_process_generate, own_losses

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

REPO = Path(__file__).resolve().parents[2]
SECTION = "## Fine-tune on your own data"
README_PORTS = ("4101", "4102", "4103")
CANARY = "bob-canary-7f3a"  # the README plants it in bob's data
NODES = ("alice", "bob", "carol")
WALK_SECONDS = 2100


def section_bash_blocks(readme: str) -> list[str]:
    start = readme.index(SECTION)
    end = readme.find("\n## ", start + len(SECTION))
    text = readme[start:end if end != -1 else None]
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def fresh_checkout(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    return dest


def test_the_section_has_the_steps_a_user_needs() -> None:
    blocks = section_bash_blocks((REPO / "README.md").read_text())
    script = "\n".join(blocks)
    for needed in ("make_chat_data.py", "fednode keygen", "fednode run --config", "fednode status",
                   "fednode rounds", "fednode export", "AutoModelForCausalLM.from_pretrained", "kill",
                   f"--canary {CANARY} fed/bob/chat.jsonl", f"grep -rl {CANARY} fed/alice fed/carol"):
        assert needed in script, needed
    assert all(port in script for port in README_PORTS)


def test_readme_walkthrough_runs_literally(tmp_path: Path) -> None:
    checkout = fresh_checkout(tmp_path / "checkout")
    assert not (checkout / "fed").exists()
    script = "\n".join(section_bash_blocks((checkout / "README.md").read_text()))
    for port in README_PORTS:
        script = script.replace(port, str(free_port()))
    # The wrapper (not the README) stops background daemons if a step fails.
    wrapped = "set -euo pipefail\ntrap 'kill $(jobs -p) 2>/dev/null || true' EXIT\n" + script
    (tmp_path / "walk.sh").write_text(wrapped)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "PYTHONPATH": str(checkout),
           "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(["bash", str(tmp_path / "walk.sh")], cwd=checkout, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=WALK_SECONDS)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        logs = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in sorted((checkout / "fed").glob("*/log.txt")))
        pytest.fail(f"the walkthrough did not finish in {WALK_SECONDS} s\n{out[-4000:]}\n{logs}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-6000:]

    # What the README says the user will see.
    assert "completed   2 rounds" in out
    record = json.loads((checkout / "fed" / "alice" / "rounds" / "round-2.json").read_text())
    assert record["state"] == "published" and len(record["accepted"]) == 3
    shas = {json.loads((checkout / "fed" / n / "rounds" / "round-2.json").read_text())["merged_sha256"]
            for n in ("alice", "bob", "carol")}
    assert shas == {record["merged_sha256"]}
    assert (checkout / "fed" / "chat-model" / "config.json").is_file()
    generated = out.rstrip().splitlines()[-1]  # the python block prints the model's answer last
    assert generated.strip() and "Traceback" not in out, out[-3000:]
    for name in NODES:
        log = (checkout / "fed" / name / "log.txt").read_text()
        assert "Traceback" not in log and "stopped cleanly" in log, log[-2000:]

    # Issue 10's own-data checks on the same run.
    fed = checkout / "fed"
    assert "bob's canary is on no other node" in out, out[-3000:]
    leaks, scanned = canary_leaks([fed / n for n in NODES], CANARY, owner=fed / "bob",
                                  owner_data=fed / "bob" / "chat.jsonl")
    assert not leaks, f"the canary leaked into {leaks}"
    assert scanned > 30 and any((fed / "bob" / "blobs").rglob("*")), scanned
    fresh = fresh_process_generate(fed / "carol" / "adapters" / "round-2")
    assert not fresh["fednode_imported"]
    assert fresh["same"] < 1e-4 and fresh["new_tokens"] > 0 and fresh["text"].strip(), fresh
    for node, (base, merged) in own_losses([fed / n / "node.toml" for n in NODES], 2).items():
        assert merged < base, f"{node}: held-out loss {merged:.4f} after round 2, base {base:.4f}"
