"""The wire layer is pure: importing it pulls in no trio, libp2p or torch (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

FORBIDDEN = ("trio", "libp2p", "torch", "transformers", "peft")


def test_import_fednode_wire_is_pure() -> None:
    code = (
        "import sys, fednode.wire, fednode.wire.validate, fednode.identity\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(','.join(bad))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "", f"importing fednode.wire imported {proc.stdout.strip()}"
