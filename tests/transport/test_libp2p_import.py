"""fednode imports py-libp2p without the features it never uses (fednode/transport/libp2p_import.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fednode.transport import libp2p_import

PROBE = """
import json, sys, time
t = time.process_time()
import fednode.transport.libp2p, fednode.transport.libp2p_host
from fednode.transport import libp2p_import
cpu = time.process_time() - t
error = ""
try:
    from libp2p.transport.quic.transport import QUICTransport
    QUICTransport(None)
except Exception as exc:
    error = f"{type(exc).__name__}: {exc}"
heavy = [m for m in ("aioquic", "httpx", "requests", "rich", "zeroconf", "OpenSSL") if m in sys.modules]
print(json.dumps({"cpu": cpu, "modules": len(sys.modules), "heavy": heavy,
                  "trimmed": libp2p_import.trimmed(), "error": error}))
"""


def _probe(**env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], env={**os.environ, **env}, capture_output=True,
                         text=True, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_a_fednode_process_leaves_the_unused_features_out_and_says_so_when_one_is_used() -> None:
    trimmed = _probe(**{libp2p_import.FULL_IMPORT_ENV: "0"})
    full = _probe(**{libp2p_import.FULL_IMPORT_ENV: "1"})
    assert trimmed["heavy"] == []
    assert {"aioquic", "httpx", "zeroconf"} <= set(full["heavy"])  # the control: what is left out
    assert "libp2p.transport.quic.transport" in trimmed["trimmed"] and full["trimmed"] == []
    assert trimmed["modules"] < full["modules"] - 200
    # a use of a left-out feature fails loudly, naming the feature and the switch
    assert trimmed["error"].startswith("FeatureNotLoaded: libp2p.transport.quic.transport.QUICTransport")
    assert "the QUIC transport" in trimmed["error"] and libp2p_import.FULL_IMPORT_ENV in trimmed["error"]
    assert full["error"].startswith(("TypeError", "AttributeError", "ValueError"))  # the real class ran


def test_this_test_process_runs_the_trimmed_import() -> None:
    """So every in-process libp2p test of the suite (real hosts, streams, gossip) runs on it."""
    import fednode.transport.libp2p_host  # noqa: F401

    if os.environ.get(libp2p_import.FULL_IMPORT_ENV, "") not in ("", "0"):
        pytest.fail(f"{libp2p_import.FULL_IMPORT_ENV} is set: the suite would not test the trimmed import")
    assert "libp2p.transport.quic" in libp2p_import.trimmed()
    assert "aioquic" not in sys.modules


def test_a_placeholder_fits_type_hints_isinstance_and_except_clauses() -> None:
    stand_in = libp2p_import._StandIn("libp2p.relay.x", "circuit relay v2")
    Thing = stand_in.Thing
    assert stand_in.Thing is Thing  # one class per name
    assert not isinstance(object(), Thing)
    assert (int | Thing) is not None
    try:
        raise ValueError("real")
    except Thing:  # pragma: no cover - nothing raises a placeholder
        pytest.fail("a placeholder caught a real exception")
    except ValueError:
        pass
    with pytest.raises(libp2p_import.FeatureNotLoaded, match="circuit relay v2"):
        Thing()
    with pytest.raises(AttributeError):
        stand_in.__wrapped__  # noqa: B018 - dunder lookups are not placeholders
