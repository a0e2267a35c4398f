"""Prometheus metrics of `hxc serve` (prometheus_client, a registry of its own).

Events are counted as they happen (requests by model, device and status; latency
histograms split into queue and compute time; batch sizes; SLO misses; shed load);
state is read at scrape time from the routers (queue depth, device health,
utilisation, failures, restarts, re-routed requests), so it is never stale.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0)


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
        self.slo_misses = Counter("hxc_inference_slo_misses", "Requests that missed their slo_ms or, for a language model, a TTFT/TPOT target (predicted at routing, or observed)",
                                  ["model", "device"], registry=r)  # fmt: skip
        self.shed = Counter("hxc_inference_shed", "Requests refused because the model's queue was full (503 with Retry-After)",
                            ["model"], registry=r)  # fmt: skip
        self.refused = Counter("hxc_http_refused", "Requests turned away before any route saw them, by reason (unauthorized, "
                               "body_too_large, body_timeout, receiving_full, client_gone)", ["reason"], registry=r)  # fmt: skip
        self.receiving = Gauge("hxc_http_receiving_bytes", "Bytes held by request bodies still arriving (--max-receiving-mb bounds it)",
                               registry=r)  # fmt: skip
        # Language models: names close to what LLM servers export (vLLM's, TGI's).
        self.ttft = Histogram("hxc_time_to_first_token_seconds", "Time from a request's arrival to its first token",
                              ["model", "device"], buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.itl = Histogram("hxc_inter_token_latency_seconds", "Time between two tokens of one sequence, as the server saw them",
                             ["model", "device"], buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("hxc_e2e_request_latency_seconds", "Time from a request's arrival to its last token",
                             ["model", "device"], buckets=E2E_BUCKETS, registry=r)  # fmt: skip
        self.tpot = Histogram("hxc_time_per_output_token_seconds", "A request's time per output token after the first",
                              ["model", "device"], buckets=TOKEN_BUCKETS, registry=r)  # fmt: skip
        self.prompt_tokens = Counter("hxc_prompt_tokens", "Prompt tokens of finished requests", ["model"], registry=r)
        self.generation_tokens = Counter("hxc_generation_tokens", "Tokens generated for finished requests", ["model"], registry=r)
        self.lm_requests = Counter("hxc_lm_requests", "Language-model requests by endpoint and outcome (ok, client_gone, or the "
                                   "HTTP status)", ["model", "device", "endpoint", "status"], registry=r)  # fmt: skip
        self.deadline_misses = Counter("hxc_lm_deadline_misses", "Finished requests that missed a target of theirs: ttft, tpot "
                                       "or e2e (the request's own, else --ttft-ms, --tpot-ms)", ["model", "deadline"], registry=r)  # fmt: skip
        self.goodput = Counter("hxc_goodput_requests", "Finished requests that met all their targets (goodput is its rate)",
                               ["model"], registry=r)  # fmt: skip
        r.register(_StateCollector(models))

    def batch_done(self, model: str, device: str, rows: int, requests: int) -> None:
        self.batch.labels(model, device).observe(rows)

    def lm_observe(self, model: str, device: str, what: str, seconds: float) -> None:
        """One latency of a language-model request: ttft, itl or e2e."""
        {"ttft": self.ttft, "itl": self.itl, "e2e": self.e2e}[what].labels(model, device).observe(seconds)

    def lm_request(self, model: str, endpoint: str, status: str, generation: Any = None) -> None:
        """A language-model request answered (`generation`: its `lm.Generation`, if one started)."""
        result = generation.result if generation is not None else None
        device = (result.device or "") if result is not None else ""
        self.lm_requests.labels(model, device, endpoint, status).inc()
        if result is None or status != "ok":
            return
        self.prompt_tokens.labels(model).inc(result.prompt_tokens)
        self.generation_tokens.labels(model).inc(result.completion_tokens)
        tpot = generation.tpot_s
        if tpot is not None:
            self.tpot.labels(model, device).observe(tpot)
        missed = generation.missed()
        if missed or generation.seq.predicted_miss:
            self.slo_misses.labels(model, device).inc()
        for target in missed:
            self.deadline_misses.labels(model, target).inc()
        if not missed:
            self.goodput.labels(model).inc()


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
        running = GaugeMetricFamily("hxc_num_requests_running", "Sequences in a device's batch now", labels=["model", "device"])
        waiting = GaugeMetricFamily("hxc_num_requests_waiting", "Sequences waiting for a device (KV cache or a slot)",
                                    labels=["model"])  # fmt: skip
        kv = GaugeMetricFamily("hxc_kv_cache_usage_ratio", "Cached tokens of a device's running sequences / its KV budget",
                               labels=["model", "device"])  # fmt: skip
        kv_bytes = GaugeMetricFamily("hxc_kv_cache_used_bytes", "KV-cache bytes a device's running sequences hold",
                                     labels=["model", "device"])  # fmt: skip
        busy = CounterMetricFamily("hxc_lm_device_busy_seconds", "Time a device had at least one sequence running (what "
                                   "its cost is counted by)", labels=["model", "device"])  # fmt: skip
        cost = GaugeMetricFamily("hxc_lm_cost_per_1k_tokens", "What a device's output tokens cost so far, per 1,000: its busy "
                                 "time x its price per hour (the prices table) / the tokens it produced", labels=["model", "device"])  # fmt: skip
        preemptions = CounterMetricFamily("hxc_preemptions", "Sequences stopped to free KV cache and resumed later by "
                                          "recomputing their prefill", labels=["model", "device"])  # fmt: skip
        now = time.monotonic()
        for m in self.models():
            router = m.router
            ready.add_metric([m.name], 1.0 if m.ready() else 0.0)
            if router is None:
                continue
            if getattr(m, "language_model", None) is not None:
                waiting.add_metric([m.name], router.waiting_count)
                for s in router.states():
                    running.add_metric([m.name, s.name], s.running)
                    kv.add_metric([m.name, s.name], s.kv_tokens / max(1, s.kv_budget_tokens))
                    kv_bytes.add_metric([m.name, s.name], s.kv_tokens * s.kv_bytes_per_token)
                    preemptions.add_metric([m.name, s.name], s.preemptions)
                    util.add_metric([m.name, s.name], s.busy_s / max(1e-9, now - s.since))
                    busy.add_metric([m.name, s.name], s.busy_s)
                    if s.cost_per_1k_tokens is not None:
                        cost.add_metric([m.name, s.name], s.cost_per_1k_tokens)
                    healthy.add_metric([m.name, s.name, s.health], 1.0 if s.health == "ready" else 0.0)
                    failures.add_metric([m.name, s.name], s.failures)
                    restarts.add_metric([m.name, s.name], s.restarts)
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
        yield from (depth, limit, outstanding, healthy, util, failures, restarts, rerouted, ready, running, waiting, kv, kv_bytes,
                    preemptions, busy, cost)  # fmt: skip
