"""Prometheus text `/metrics` on 127.0.0.1, off by default (`[metrics] enabled`).

The numbers come from the daemon's status snapshot at scrape time through a custom collector,
so there is one source of truth and nothing to keep in sync.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

METRICS_BIND_ADDRESS = "127.0.0.1"


class StatusCollector(Collector):
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status

    def collect(self) -> Iterator[Metric]:
        s = self._status()
        yield GaugeMetricFamily("fednode_members", "members seen alive", value=len(s.get("members", [])))
        yield GaugeMetricFamily("fednode_term", "current election term", value=s.get("term", 0))
        yield GaugeMetricFamily("fednode_rounds_completed", "rounds with a merged adapter installed",
                                value=s.get("rounds_completed", 0))
        yield CounterMetricFamily("fednode_outcome_conflicts", "two different signed outcomes met for one round",
                                  value=s.get("outcome_conflicts", 0))
        counters = s.get("counters", {})
        for verdict in ("accepted", "rejected", "ignored"):
            fam = CounterMetricFamily(f"fednode_messages_{verdict}", f"control messages {verdict}",
                                      labels=["reason"])
            by_reason = counters.get(verdict, {})
            for reason, count in sorted(by_reason.items()):
                fam.add_metric([reason], count)
            yield fam
        yield CounterMetricFamily("fednode_disk_full_pauses", "times the node paused participation for a full disk",
                                  value=s.get("disk_full_events", 0))
        yield GaugeMetricFamily("fednode_paused", "1 while participation is paused (e.g. a full disk)",
                                value=1 if s.get("paused") else 0)
        bytes_moved = s.get("bytes", {})
        fam = CounterMetricFamily("fednode_bytes", "bytes moved", labels=["direction"])
        for direction, count in sorted(bytes_moved.items()):
            fam.add_metric([direction], count)
        yield fam


class MetricsServer:
    """Runs prometheus_client's HTTP server thread; `close()` stops it (no leaked thread)."""

    def __init__(self, port: int, status: Callable[[], dict[str, Any]]) -> None:
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
