"""Prometheus metrics, served by prometheus-client's WSGI app on a bounded server thread.

The supervisor's state belongs to its loop alone, so the exporter never reads it: on each
maintenance tick the loop publishes an immutable Snapshot (swapping one reference is
atomic), and the collector renders whichever snapshot is current. No locks.
"""

from __future__ import annotations

import socket
import threading
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIRequestHandler, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.multiprocess import MultiProcessCollector
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
    """Renders the current snapshots: one per model, every series labelled with its model."""

    def __init__(self) -> None:
        self.snapshot: dict[str, Snapshot] = {}  # model name -> its figures; replaced whole, never changed

    def collect(self):
        snaps = self.snapshot
        requests = CounterMetricFamily("isopool_requests", "Requests answered, by outcome.", labels=["model", "outcome"])
        queue = GaugeMetricFamily("isopool_queue_depth", "Requests waiting for a worker.", labels=["model"])
        in_flight = GaugeMetricFamily("isopool_in_flight", "Requests held by workers.", labels=["model"])
        workers = GaugeMetricFamily("isopool_workers", "Worker slots by state.", labels=["model", "state"])
        restarts = CounterMetricFamily("isopool_worker_restarts", "Worker replacements, by reason.",
                                       labels=["model", "reason"])
        rss = GaugeMetricFamily("isopool_worker_rss_bytes", "Resident memory of each worker.",
                                labels=["model", "worker"])
        dropped = CounterMetricFamily("isopool_worker_output_dropped_bytes",
                                      "Bytes of a worker slot's output not logged: over --log-rate.",
                                      labels=["model", "worker"])
        histogram = HistogramMetricFamily("isopool_request_duration_seconds",
                                          "Time from accepting a request to its answer.", labels=["model"])
        for model, s in snaps.items():
            for outcome, n in sorted(s.outcomes.items()):
                requests.add_metric([model, outcome], n)
            cumulative, buckets = 0, []
            for le, n in zip((*map(str, BUCKETS), "+Inf"), s.latency_buckets or (0,) * (len(BUCKETS) + 1)):
                cumulative += n
                buckets.append((le, cumulative))
            histogram.add_metric([model], buckets, s.latency_sum)
            queue.add_metric([model], s.queue_depth)
            in_flight.add_metric([model], s.in_flight)
            for state in WORKER_STATES:
                workers.add_metric([model, state], s.workers.get(state, 0))
            for reason, n in sorted(s.restarts.items()):
                restarts.add_metric([model, reason], n)
            for worker, n in sorted(s.rss.items()):
                rss.add_metric([model, str(worker)], n)
            for worker, n in sorted(s.output_dropped.items()):
                dropped.add_metric([model, str(worker)], n)
        yield from (requests, histogram, queue, in_flight, workers, restarts, rss, dropped)
        first = next(iter(snaps.values()), Snapshot())  # the daemon's own figures: the same in each
        yield GaugeMetricFamily("isopool_connections", "Client connections open on the frontend.", value=first.connections)
        yield CounterMetricFamily("isopool_connections_shed", "Client connections shut down to keep file "
                                  "descriptors free for restarts.", value=first.connections_shed)


SCRAPE_TIMEOUT_S = 5.0  # a connection whose scraper is silent (or does not read) this long is dropped
MAX_SCRAPES = 8  # connections served at once; more are closed as they come


class _QuietHandler(WSGIRequestHandler):
    timeout = SCRAPE_TIMEOUT_S  # the socket's: a half-sent request held a thread and an fd for good

    def log_message(self, format: str, *args) -> None:  # a scrape is no event of the pool's
        pass


class _BoundedServer(ThreadingWSGIServer):
    """prometheus-client's server (a thread per connection), with each connection's time and
    the number served at once bounded: the supervisor's threads and file descriptors are the
    pool's, and 1,000 idle connections to /metrics took all of them (its doors to clients and
    workers closed, and no worker could be restarted)."""

    def __init__(self, *args, **kw) -> None:
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        super().__init__(*args, **kw)

    def process_request(self, request: socket.socket, client_address) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # its fd goes back at once
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: socket.socket, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def serve_metrics(host: str, port: int, http_dir: str | None = None) -> tuple[PoolCollector, int]:
    """Start the exporter on a thread of its own; returns the collector to publish to and the
    bound port. With `http_dir`, it also sums the HTTP gateways' figures written there
    (gateway/metrics.py)."""
    collector = PoolCollector()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    if http_dir is not None:
        MultiProcessCollector(registry, path=http_dir)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_class = type("MetricsServer", (_BoundedServer,), {"address_family": family})
    server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
    threading.Thread(target=server.serve_forever, name="isopool-metrics", daemon=True).start()
    return collector, server.server_address[1]
