"""The gateways' HTTP metrics, in prometheus-client's multiprocess mode.

    gateway i ──Counter/Histogram──► files in ISOPOOL_HTTP_METRICS (PROMETHEUS_MULTIPROC_DIR)
    supervisor /metrics ──MultiProcessCollector(that directory)──► one sum over every gateway

Each gateway writes its own figures to memory-mapped files named by its pid; the
supervisor's exporter (--metrics-port) adds them up at each scrape. A gateway that died
leaves its files, so counters never go back. Only with --metrics-port: without it there
is nowhere to scrape them, and a gateway records nothing.

    isopool_http_requests_total{route, method, status, model}
    isopool_http_request_duration_seconds{route, model}     (a histogram)

`route` is the route's template (/v2/models/{name}/infer), never the raw path, and
`model` is a served model's name or "", so no request can make a new series of its own.
"""

from __future__ import annotations

import os

ENV_DIR = "PROMETHEUS_MULTIPROC_DIR"
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class HttpMetrics:
    def __init__(self) -> None:
        assert os.environ.get(ENV_DIR), "multiprocess mode is chosen before prometheus_client is imported"
        from prometheus_client import Counter, Histogram

        self.requests = Counter("isopool_http_requests", "HTTP requests answered, by route, method and status.",
                                ["route", "method", "status", "model"], registry=None)
        self.duration = Histogram("isopool_http_request_duration_seconds",
                                  "Time from an HTTP request's arrival to the end of its answer.",
                                  ["route", "model"], registry=None, buckets=BUCKETS)

    def record(self, route: str, method: str, status: int, model: str, seconds: float) -> None:
        self.requests.labels(route, method, str(status), model).inc()
        self.duration.labels(route, model).observe(seconds)
