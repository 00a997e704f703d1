"""Prometheus metrics of one server (names prefixed `pdserve:` like SGLang's `sglang:`)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 10, 20, 40, 80)


class ServerMetrics:
    def __init__(self, model_name: str) -> None:
        self.registry = r = CollectorRegistry()
        lbl = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram(
            "pdserve:time_to_first_token_seconds", "Time to first token", lbl, buckets=_LAT_BUCKETS, registry=r
        )
        self.itl = Histogram(
            "pdserve:inter_token_latency_seconds", "Inter-token latency", lbl, buckets=_LAT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "pdserve:e2e_request_latency_seconds", "End-to-end request latency", lbl, buckets=_LAT_BUCKETS, registry=r
        )
        self.requests = Counter(
            "pdserve:num_requests", "Finished requests by finish reason", lbl + ["finish_reason"], registry=r
        )
        self.prompt_tokens = Gauge("pdserve:prompt_tokens_total", "Prompt tokens processed", lbl, registry=r)
        self.generation_tokens = Gauge("pdserve:generation_tokens_total", "Tokens generated", lbl, registry=r)
        self.running = Gauge("pdserve:num_running_reqs", "Running requests", lbl, registry=r)
        self.waiting = Gauge("pdserve:num_queue_reqs", "Waiting requests", lbl, registry=r)
        self.kv_usage = Gauge("pdserve:token_usage", "KV pool pages held by requests / all pages", lbl, registry=r)
        self.kv_cached = Gauge(
            "pdserve:cached_page_ratio", "KV pool pages held only by the prefix cache", lbl, registry=r
        )
        self.hit_rate = Gauge("pdserve:cache_hit_rate", "Prefix cache hit rate (tokens)", lbl, registry=r)
        self.retractions = Gauge("pdserve:num_retractions_total", "Requests retracted for KV space", lbl, registry=r)
        self.prefill_computed = Gauge(
            "pdserve:prefill_computed_tokens_total",
            "Prompt tokens run through the model (not from the prefix cache or the KV store)",
            lbl,
            registry=r,
        )
        # KV cache data service (--kv-store; absent without one)
        self.kv_store = {
            key: Gauge(f"pdserve:{name}", doc, lbl, registry=r)
            for key, name, doc in (
                ("kv_store_query_tokens", "kv_store_query_tokens_total", "Prompt tokens looked up in the KV store"),
                ("kv_store_hit_tokens", "kv_store_hit_tokens_total", "Prompt tokens loaded from the KV store"),
                ("kv_store_bytes_read", "kv_store_read_bytes_total", "Record bytes fetched from the KV store"),
                ("kv_store_bytes_written", "kv_store_written_bytes_total", "Record bytes written to the KV store"),
                ("kv_store_fetches", "kv_store_fetches_total", "KV store lookups finished"),
                ("kv_store_fetch_seconds", "kv_store_fetch_seconds_total", "Total latency of KV store lookups"),
                ("kv_store_writes", "kv_store_writes_total", "KV store write batches"),
                ("kv_store_write_seconds", "kv_store_write_seconds_total", "Total latency of KV store writes"),
                ("kv_store_pending_write_bytes", "kv_store_pending_write_bytes", "Page bytes waiting to be written"),
                ("kv_store_errors", "kv_store_errors_total", "KV store calls that failed (each a miss)"),
                ("kv_store_timeouts", "kv_store_timeouts_total", "Lookups past --kv-store-timeout (computed)"),
                ("kv_store_rejected_pages", "kv_store_rejected_pages_total", "Corrupt or mismatched records refused"),
                (
                    "kv_store_dropped_writes",
                    "kv_store_dropped_pages_total",
                    "Pages not written (store down or lagging)",
                ),
            )
        }

        # PD disaggregation (0 in mode null)
        self.pd = {
            key: Gauge(f"pdserve:{name}", doc, lbl, registry=r)
            for key, name, doc in (
                ("prealloc_queue_len", "num_prealloc_queue_reqs", "Decode: requests waiting for KV preallocation"),
                ("transfer_queue_len", "num_transfer_queue_reqs", "Decode: requests whose KV is in flight"),
                ("bootstrap_queue_len", "num_bootstrap_queue_reqs", "Prefill: requests waiting for decode"),
                ("inflight_queue_len", "num_inflight_queue_reqs", "Prefill: requests whose KV is being sent"),
                ("num_failed_transfers", "num_failed_transfers_total", "Decode: failed KV transfers"),
                ("kv_transfer_mean_latency_s", "kv_transfer_latency_seconds", "Mean KV transfer latency"),
                ("kv_transfer_gbps", "kv_transfer_speed_gb_s", "Mean KV transfer speed, GB/s"),
                ("kv_bytes_transferred", "kv_transfer_bytes_total", "KV bytes received"),
            )
        }

        self._semi_pd_made = False  # Semi-PD gauges: made on first use (only with --enable-semi-pd)

    def _make_semi_pd(self) -> None:
        r, lbl = self.registry, ["model_name"]
        self.semi_pd_share = Gauge(
            "pdserve:semi_pd_share_percent", "Semi-PD compute share of each role, %", lbl + ["role"], registry=r
        )
        self.semi_pd_latency = Gauge(
            "pdserve:semi_pd_latency_p95_seconds",
            "Semi-PD TTFT / TPOT p95 over the SLO window",
            lbl + ["slo"],
            registry=r,
        )
        self.semi_pd_attainment = Gauge(
            "pdserve:semi_pd_slo_attainment",
            "Share of the requests completed in the SLO window that met both targets",
            lbl,
            registry=r,
        )
        self.semi_pd_violations = Gauge(
            "pdserve:semi_pd_slo_violations_total",
            "SLO-aware controller evaluations that found the target missed",
            lbl + ["slo"],
            registry=r,
        )
        self.semi_pd_changes = Gauge(
            "pdserve:semi_pd_split_changes_total", "Changes of the Semi-PD split", lbl, registry=r
        )
        self.semi_pd_restarts = Gauge(
            "pdserve:semi_pd_worker_restarts_total", "Semi-PD workers restarted", lbl + ["role"], registry=r
        )
        self._semi_pd_made = True

    def set_semi_pd(self, status: dict) -> None:
        """From the resident's status (GET /semi_pd/status)."""
        if not self._semi_pd_made:
            self._make_semi_pd()
        m = self.model_name
        split = status["current_split"]
        self.semi_pd_share.labels(m, "prefill").set(split["prefill_percentage"])
        self.semi_pd_share.labels(m, "decode").set(split["decode_percentage"])
        met = status["metrics"]
        self.semi_pd_latency.labels(m, "ttft").set(met["ttft_p95_ms"] / 1000)
        self.semi_pd_latency.labels(m, "tpot").set(met["tpot_p95_ms"] / 1000)
        self.semi_pd_attainment.labels(m).set(status["slo"]["attainment"])
        ctl = status.get("slo_controller_status") or {"statistics": {"ttft_violations": 0, "tpot_violations": 0}}
        self.semi_pd_violations.labels(m, "ttft").set(ctl["statistics"]["ttft_violations"])
        self.semi_pd_violations.labels(m, "tpot").set(ctl["statistics"]["tpot_violations"])
        self.semi_pd_changes.labels(m).set(status["process_rotation_status"]["num_changes"])
        for role, w in status["workers"].items():
            self.semi_pd_restarts.labels(m, role).set(w["restarts"])

    def observe_ttft(self, s: float) -> None:
        self.ttft.labels(self.model_name).observe(s)

    def observe_itl(self, s: float) -> None:
        self.itl.labels(self.model_name).observe(s)

    def observe_e2e(self, s: float, finish_reason: str) -> None:
        self.e2e.labels(self.model_name).observe(s)
        self.requests.labels(self.model_name, finish_reason).inc()

    def set_load(self, load: dict) -> None:
        m = self.model_name
        self.running.labels(m).set(load["num_running_reqs"])
        self.waiting.labels(m).set(load["num_waiting_reqs"])
        total = max(1, load["num_total_pages"])
        self.kv_usage.labels(m).set(load["num_used_pages"] / total)
        self.kv_cached.labels(m).set(load["num_cached_pages"] / total)
        self.prompt_tokens.labels(m).set(load["prompt_tokens"])
        self.generation_tokens.labels(m).set(load["generation_tokens"])
        self.retractions.labels(m).set(load["num_retractions"])
        self.prefill_computed.labels(m).set(load.get("prefill_computed_tokens", 0))
        for key, gauge in self.kv_store.items():
            if key in load:
                gauge.labels(m).set(load[key])
        for key, gauge in self.pd.items():
            if key in load:
                gauge.labels(m).set(load[key])
        q = load["cache_query_tokens"]
        self.hit_rate.labels(m).set(load["cache_hit_tokens"] / q if q else 0.0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
