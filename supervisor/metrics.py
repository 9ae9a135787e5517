"""Prometheus metrics, served by prometheus-client's HTTP server on its own thread.

The supervisor's state belongs to its loop alone, so the exporter never reads it: on each
maintenance tick the loop publishes an immutable Snapshot (swapping one reference is
atomic), and the collector renders whichever snapshot is current. No locks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from .stats import BUCKETS

# request latency buckets, seconds
WORKER_STATES = ("backoff", "starting", "idle", "busy", "draining", "stopping")


@dataclass(frozen=True)
class Snapshot:
    outcomes: dict = field(default_factory=dict)
    latency_buckets: tuple = ()  # per-bucket counts (not cumulative), len(BUCKETS) + 1
    latency_sum: float = 0.0
    queue_depth: int = 0
    in_flight: int = 0
    workers: dict = field(default_factory=dict)  # state -> count
    restarts: dict = field(default_factory=dict)  # reason -> count
    rss: dict = field(default_factory=dict)  # worker id -> bytes
    output_dropped: dict = field(default_factory=dict)  # worker id -> bytes of output over --log-rate
    connections: int = 0  # client connections open on the frontend
    connections_shed: int = 0  # shut down to keep descriptors free (connections.py)


class PoolCollector:
    def __init__(self) -> None:
        self.snapshot = Snapshot()

    def collect(self):
        s = self.snapshot
        requests = CounterMetricFamily("isopool_requests", "Requests answered, by outcome.", labels=["outcome"])
        for outcome, n in sorted(s.outcomes.items()):
            requests.add_metric([outcome], n)
        yield requests
        cumulative, buckets = 0, []
        for le, n in zip((*map(str, BUCKETS), "+Inf"), s.latency_buckets or (0,) * (len(BUCKETS) + 1)):
            cumulative += n
            buckets.append((le, cumulative))
        yield HistogramMetricFamily("isopool_request_duration_seconds",
                                    "Time from accepting a request to its answer.", buckets=buckets,
                                    sum_value=s.latency_sum)
        yield GaugeMetricFamily("isopool_queue_depth", "Requests waiting for a worker.", value=s.queue_depth)
        yield GaugeMetricFamily("isopool_in_flight", "Requests held by workers.", value=s.in_flight)
        workers = GaugeMetricFamily("isopool_workers", "Worker slots by state.", labels=["state"])
        for state in WORKER_STATES:
            workers.add_metric([state], s.workers.get(state, 0))
        yield workers
        restarts = CounterMetricFamily("isopool_worker_restarts", "Worker replacements, by reason.",
                                       labels=["reason"])
        for reason, n in sorted(s.restarts.items()):
            restarts.add_metric([reason], n)
        yield restarts
        rss = GaugeMetricFamily("isopool_worker_rss_bytes", "Resident memory of each worker.", labels=["worker"])
        for worker, n in sorted(s.rss.items()):
            rss.add_metric([str(worker)], n)
        yield rss
        dropped = CounterMetricFamily("isopool_worker_output_dropped_bytes",
                                      "Bytes of a worker slot's output not logged: over --log-rate.", labels=["worker"])
        for worker, n in sorted(s.output_dropped.items()):
            dropped.add_metric([str(worker)], n)
        yield dropped
        yield GaugeMetricFamily("isopool_connections", "Client connections open on the frontend.", value=s.connections)
        yield CounterMetricFamily("isopool_connections_shed", "Client connections shut down to keep file "
                                  "descriptors free for restarts.", value=s.connections_shed)


def serve_metrics(host: str, port: int) -> tuple[PoolCollector, int]:
    """Start the exporter; returns the collector to publish to and the bound port."""
    collector = PoolCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return collector, server.server_address[1]
