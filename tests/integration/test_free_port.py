"""The harness's listen ports come from below the kernel's ephemeral range (bench_scale, 32 daemons:
a daemon started a minute after its port was chosen found it taken by another daemon's outbound
connection, because a port-0 port lies in the range outbound connections draw from)."""

from __future__ import annotations

import socket

from fednode.harness import cluster
from fednode.harness.cluster import LISTEN_PORT_LOW, LOOPBACK, ephemeral_port_low, free_port


def test_ports_are_below_the_ephemeral_range_distinct_and_bindable() -> None:
    high = ephemeral_port_low()
    ports = [free_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    if high - LISTEN_PORT_LOW >= cluster.MAX_PORT_TRIES:
        assert all(LISTEN_PORT_LOW <= p < high for p in ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind((LOOPBACK, port))


def test_an_outbound_connection_never_gets_a_port_we_hand_out() -> None:
    """The control: an outbound connection's local port is in the ephemeral range, which free_port avoids."""
    with socket.socket() as server:
        server.bind((LOOPBACK, free_port()))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            assert client.getsockname()[1] >= ephemeral_port_low()
