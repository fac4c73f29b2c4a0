"""Our own signed peer record is built once per host, not for every gossip RPC (issue 12: 6 % of an
idle daemon's CPU at 8 daemons was py-libp2p listing the listen addresses and re-serialising the
record for each RPC it sent)."""

from __future__ import annotations

from typing import Any

import libp2p.peer.peerstore as peerstore
import libp2p.pubsub.gossipsub as gossipsub
import libp2p.pubsub.pubsub as pubsub
import pytest

from fednode.identity import Identity
from fednode.transport import libp2p_records
from fednode.transport.libp2p_host import make_host


def counted_host(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, list[int]]:
    host = make_host(Identity.generate())  # installs the memo
    calls = [0]
    get_addrs = host.get_addrs

    def counting_get_addrs() -> Any:
        calls[0] += 1
        return get_addrs()

    monkeypatch.setattr(host, "get_addrs", counting_get_addrs)
    return host, calls


def test_the_record_sent_with_rpcs_is_built_once_and_is_what_py_libp2p_would_send(
        monkeypatch: pytest.MonkeyPatch) -> None:
    host, calls = counted_host(monkeypatch)
    assert gossipsub.env_to_send_in_RPC is pubsub.env_to_send_in_RPC is not peerstore.env_to_send_in_RPC
    first, _ = pubsub.env_to_send_in_RPC(host)
    for _ in range(100):
        again, created = gossipsub.env_to_send_in_RPC(host)
        assert again == first and not created
    assert calls[0] == 1
    assert peerstore.env_to_send_in_RPC(host)[0] == first  # py-libp2p's own answer: the same bytes


def test_the_record_is_rebuilt_after_the_refresh_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    host, calls = counted_host(monkeypatch)
    now = [1000.0]
    monkeypatch.setattr(libp2p_records.time, "monotonic", lambda: now[0])
    pubsub.env_to_send_in_RPC(host)
    now[0] += libp2p_records.SENDER_RECORD_REFRESH_SECONDS - 0.1
    pubsub.env_to_send_in_RPC(host)
    assert calls[0] == 1
    now[0] += 0.2
    pubsub.env_to_send_in_RPC(host)
    assert calls[0] == 2


def test_control_py_libp2p_lists_the_addresses_for_every_rpc(monkeypatch: pytest.MonkeyPatch) -> None:
    host, calls = counted_host(monkeypatch)
    for _ in range(5):
        peerstore.env_to_send_in_RPC(host)
    assert calls[0] == 5
