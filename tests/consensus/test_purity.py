"""The pure layers import no trio, libp2p or torch (checked in a fresh interpreter)."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import fednode.wire, fednode.consensus
import fednode.consensus.round_state, fednode.consensus.election, fednode.consensus.round_events
import fednode.consensus.round_book
import fednode
fednode.RoundManifest, fednode.RoundID  # lazy exports that must not drag the coordinator in
heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('trio', 'libp2p', 'torch'))
print(','.join(heavy))
"""


def test_wire_and_consensus_import_no_trio_libp2p_or_torch() -> None:
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "", f"heavy modules imported: {out.stdout.strip()}"


def test_the_check_would_notice_a_heavy_import() -> None:
    out = subprocess.run([sys.executable, "-c", "import trio\n" + CHECK], capture_output=True, text=True,
                         timeout=60, check=True)
    assert "trio" in out.stdout
