"""Prometheus text `/metrics` on 127.0.0.1, off by default (`[metrics] enabled`).

The numbers come from the daemon's status snapshot at scrape time through a custom collector,
so there is one source of truth and nothing to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from fednode.node.reports import NodeStatus

METRICS_BIND_ADDRESS = "127.0.0.1"


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], NodeStatus]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        p = s.progress
        yield GaugeMetricFamily("fednode_members", "members seen alive", value=len(s.members))
        yield GaugeMetricFamily("fednode_term", "current election term", value=s.term)
        yield GaugeMetricFamily("fednode_rounds_completed", "rounds with a merged adapter installed",
                                value=p.rounds_completed)
        yield CounterMetricFamily("fednode_outcome_conflicts", "two different signed outcomes met for one round",
                                  value=p.outcome_conflicts)
        for verdict in ("accepted", "rejected", "ignored"):
            fam = CounterMetricFamily(f"fednode_messages_{verdict}", f"control messages {verdict}",
                                      labels=["reason"])
            for reason, count in sorted(s.counters.get(verdict, {}).items()):  # a verdict not met yet: none
                fam.add_metric([reason], count)
            yield fam
        yield CounterMetricFamily("fednode_disk_full_pauses", "times the node paused participation for a full disk",
                                  value=s.disk_full_events)
        yield GaugeMetricFamily("fednode_paused", "1 while participation is paused (e.g. a full disk)",
                                value=1 if s.paused else 0)
        fam = CounterMetricFamily("fednode_bytes", "bytes moved", labels=["direction"])
        for direction, count in sorted(s.bytes.to_json().items()):
            fam.add_metric([direction], count)
        yield fam


class MetricsServer:
    """Runs prometheus_client's HTTP server thread; `close()` stops it (no leaked thread)."""

    def __init__(self, port: int, status: Callable[[], NodeStatus]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(StatusCollector(status))
        self._server, self._thread = start_http_server(port, addr=METRICS_BIND_ADDRESS, registry=self.registry)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
