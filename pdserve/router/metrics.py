"""Prometheus metrics of the router (one private registry per router instance).

Names (all prefixed `pdserve_router_`):
  requests_total{route}                 requests received, by route
  errors_total{kind}                    failed attempts and rejected requests, by kind
  retries_total                         attempts repeated on a new worker/pair
  request_duration_seconds{route}       histogram, until the last byte went to the client
  worker_healthy{url,role}              1 healthy, 0 not (health checks)
  worker_load{url,role}                 the worker's /get_load report (parsed)
  worker_in_flight{url,role}            requests this router has open on it
  worker_circuit_state{url,role}        0 closed, 1 open, 2 half-open
  worker_requests_total{url,role}       requests sent to it
  worker_failures_total{url,role}       failures recorded against it
Worker gauges are refreshed from the pool at scrape time.
"""

from __future__ import annotations

import enum
from typing import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from pdserve.router.workers import Worker

PREFIX = "pdserve_router_"
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)


class ErrorKind(str, enum.Enum):
    """The `kind` label of `errors_total`."""

    CONNECTION = "connection"  # could not connect / connection dropped
    TIMEOUT = "timeout"  # upstream did not answer in time
    UPSTREAM_5XX = "upstream_5xx"  # a worker answered a retryable status
    UPSTREAM_4XX = "upstream_4xx"  # a worker refused the request (passed to the client)
    NO_WORKER = "no_worker"  # no available worker / pair to try
    BAD_REQUEST = "bad_request"  # the client's body was not a JSON object
    UNAUTHORIZED = "unauthorized"  # missing or wrong API key
    RETRIES_EXHAUSTED = "retries_exhausted"  # every attempt failed


class RouterMetrics:
    """Counters and gauges; `render(workers)` gives the text exposition."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        p = PREFIX
        self.requests = Counter(p + "requests", "Requests received", ["route"], registry=r)
        self.errors = Counter(p + "errors", "Errors by kind", ["kind"], registry=r)
        self.retries = Counter(p + "retries", "Attempts repeated on a new worker or pair", registry=r)
        self.duration = Histogram(
            p + "request_duration_seconds",
            "Request duration until the last byte",
            ["route"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        labels = ["url", "role"]
        self.worker_healthy = Gauge(p + "worker_healthy", "1 if the worker passes health checks", labels, registry=r)
        self.worker_load = Gauge(p + "worker_load", "Load the worker reports on /get_load", labels, registry=r)
        self.worker_in_flight = Gauge(p + "worker_in_flight", "Requests open on the worker", labels, registry=r)
        self.worker_circuit = Gauge(p + "worker_circuit_state", "0 closed, 1 open, 2 half-open", labels, registry=r)
        self.worker_requests = Gauge(p + "worker_requests_total", "Requests sent to the worker", labels, registry=r)
        self.worker_failures = Gauge(
            p + "worker_failures_total", "Failures recorded against the worker", labels, registry=r
        )
        self._worker_gauges = (
            self.worker_healthy,
            self.worker_load,
            self.worker_in_flight,
            self.worker_circuit,
            self.worker_requests,
            self.worker_failures,
        )
        self._labelled: set[tuple[str, str]] = set()

    def error(self, kind: ErrorKind) -> None:
        self.errors.labels(kind=kind.value).inc()

    def refresh_workers(self, workers: Iterable[Worker]) -> None:
        seen: set[tuple[str, str]] = set()
        for w in workers:
            key = (w.url, w.role.value)
            seen.add(key)
            self.worker_healthy.labels(*key).set(1 if w.healthy else 0)
            self.worker_load.labels(*key).set(w.reported_load or 0)
            self.worker_in_flight.labels(*key).set(w.in_flight)
            self.worker_circuit.labels(*key).set(int(w.breaker.state))
            self.worker_requests.labels(*key).set(w.total_requests)
            self.worker_failures.labels(*key).set(w.total_failures)
        for key in self._labelled - seen:  # workers removed at runtime
            for g in self._worker_gauges:
                try:
                    g.remove(*key)
                except KeyError:
                    pass
        self._labelled = seen

    def render(self, workers: Iterable[Worker]) -> bytes:
        self.refresh_workers(workers)
        return generate_latest(self.registry)
