"""A connection that arrives while the host stops is one INFO line, not a WARNING with a traceback
(py-libp2p's swarm logs "[ADDCONN_FAIL]" with the traceback in the message; seen once in
./scripts/test: tests/node/test_signals.py found "Traceback" in a daemon's log after SIGTERM)."""

from __future__ import annotations

import logging

import pytest
from libp2p.tools.anyio_service.exceptions import LifecycleError

from fednode.transport.libp2p_host import restore_log_propagation

SWARM = "libp2p.network.swarm"


def _log_addconn_fail(exc: BaseException) -> None:
    # the call py-libp2p 0.8.1 makes (libp2p/network/swarm.py, add_conn)
    logging.getLogger(SWARM).warning("[ADDCONN_FAIL] add_conn failed for peer %s: %r\n%s", "12D3KooWpeer", exc,
                                     "Traceback (most recent call last):\n  File ...\n" + repr(exc))


def test_a_connection_during_stop_is_one_info_line(caplog: pytest.LogCaptureFixture) -> None:
    restore_log_propagation()
    with caplog.at_level(logging.INFO, logger=SWARM):
        _log_addconn_fail(LifecycleError("Cannot schedule task after service has stopped"))
    records = [r for r in caplog.records if r.name == SWARM]  # (pytest may capture it through two handlers)
    assert records and "Traceback" not in caplog.text
    assert {(r.levelno, r.getMessage()) for r in records} == {
        (logging.INFO, "a connection from 12D3KooWpeer arrived while the host was stopping: dropped")}


def test_another_add_conn_failure_keeps_its_warning(caplog: pytest.LogCaptureFixture) -> None:
    restore_log_propagation()
    with caplog.at_level(logging.INFO, logger=SWARM):
        _log_addconn_fail(RuntimeError("something else"))
    records = [r for r in caplog.records if r.name == SWARM]
    assert records and all(r.levelno == logging.WARNING and "something else" in r.getMessage() for r in records)
