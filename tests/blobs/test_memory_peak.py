from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SIZE = 256 << 20
MAX_GROWTH_MIB = 64


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc accounting")
def test_receiving_256_mib_stays_within_64_mib_of_baseline() -> None:
    child = Path(__file__).with_name("memory_peak_child.py")
    out = subprocess.run([sys.executable, str(child), str(SIZE)], capture_output=True, text=True,
                         timeout=240, check=True)
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["fetched_ok"] and figures["bytes"] == SIZE
    assert 0 <= figures["growth_mib"] < MAX_GROWTH_MIB, figures
