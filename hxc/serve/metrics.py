"""Prometheus metrics of `hxc serve` (prometheus_client, a registry of its own).

Events are counted as they happen (requests by model, device and status; latency
histograms split into queue and compute time; batch sizes; SLO misses; shed load);
state is read at scrape time from the routers (queue depth, device health,
utilisation, failures, restarts, re-routed requests), so it is never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, models: Callable[[], Iterable]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("hxc_inference_requests", "Inference requests by model, device and outcome (ok, or the HTTP status)",
                                ["model", "device", "status"], registry=r)  # fmt: skip
        self.latency = Histogram("hxc_inference_request_seconds", "Time in the server per successful request, end to end",
                                 ["model"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.queue = Histogram("hxc_inference_queue_seconds", "Time a request waited before its device call started",
                               ["model", "device"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.compute = Histogram("hxc_inference_compute_seconds", "Worker time of the (batched) device call a request ran in",
                                 ["model", "device"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.batch = Histogram("hxc_inference_batch_size", "Rows per device call (dynamic batching merges requests)",
                               ["model", "device"], buckets=BATCH_BUCKETS, registry=r)  # fmt: skip
        self.slo_misses = Counter("hxc_inference_slo_misses", "Requests that missed their slo_ms (predicted at routing, or observed)",
                                  ["model", "device"], registry=r)  # fmt: skip
        self.shed = Counter("hxc_inference_shed", "Requests refused because the model's queue was full (503 with Retry-After)",
                            ["model"], registry=r)  # fmt: skip
        self.refused = Counter("hxc_http_refused", "Requests turned away before any route saw them, by reason (unauthorized, "
                               "body_too_large, body_timeout, receiving_full, client_gone)", ["reason"], registry=r)  # fmt: skip
        self.receiving = Gauge("hxc_http_receiving_bytes", "Bytes held by request bodies still arriving (--max-receiving-mb bounds it)",
                               registry=r)  # fmt: skip
        r.register(_StateCollector(models))

    def batch_done(self, model: str, device: str, rows: int, requests: int) -> None:
        self.batch.labels(model, device).observe(rows)


class _StateCollector(Collector):
    def __init__(self, models: Callable[[], Iterable]) -> None:
        self.models = models

    def collect(self):
        depth = GaugeMetricFamily("hxc_queue_depth", "Requests waiting for or running on a device", labels=["model", "device"])
        limit = GaugeMetricFamily("hxc_queue_limit", "Requests a model takes (queued or running) before it sheds load", labels=["model"])
        outstanding = GaugeMetricFamily("hxc_queue_outstanding", "Requests a model holds now (queued or running)", labels=["model"])
        healthy = GaugeMetricFamily("hxc_device_healthy", "1 while the device's worker is ready, 0 while it is out of rotation",
                                    labels=["model", "device", "state"])  # fmt: skip
        util = GaugeMetricFamily("hxc_device_utilisation", "Worker busy time / wall time since the model was loaded", labels=["model", "device"])
        failures = CounterMetricFamily("hxc_device_failures", "Times the device's worker crashed, was killed or missed a deadline",
                                       labels=["model", "device"])  # fmt: skip
        restarts = CounterMetricFamily("hxc_device_restarts", "Times the device's worker was restarted", labels=["model", "device"])
        rerouted = CounterMetricFamily("hxc_inference_rerouted", "Requests that failed on this device and were routed to another",
                                       labels=["model", "device"])  # fmt: skip
        ready = GaugeMetricFamily("hxc_model_ready", "1 when the model can take requests", labels=["model"])
        now = time.monotonic()
        for m in self.models():
            router = m.router
            ready.add_metric([m.name], 1.0 if m.ready() else 0.0)
            if router is None:
                continue
            limit.add_metric([m.name], router.max_queue)
            outstanding.add_metric([m.name], router.outstanding)
            for s in router.states():
                depth.add_metric([m.name, s.name], s.queued + s.in_worker)
                healthy.add_metric([m.name, s.name, s.health], 1.0 if s.health == "ready" else 0.0)
                util.add_metric([m.name, s.name], s.busy_s / max(1e-9, now - s.since))
                failures.add_metric([m.name, s.name], s.failures)
                restarts.add_metric([m.name, s.name], s.restarts)
                rerouted.add_metric([m.name, s.name], s.rerouted)
        yield from (depth, limit, outstanding, healthy, util, failures, restarts, rerouted, ready)
