"""Every Prometheus collector of loraplex, in one object injected where needed.

Each server owns its own CollectorRegistry, so several servers (tests, replicas
in one process) never collide.

Labels: `adapter` is an adapter's name and `version` its version ("" for the base
model, and in `loraplex_requests` for a request that named a bare adapter, which
the engine's own metrics then show resolved). `route` is the alias of the route
that chose the version ("" when the request named an adapter). Shadow metrics
label both sides of a comparison: primary_adapter/primary_version and
candidate_adapter/candidate_version.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
_LOAD_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
AV = ["adapter", "version"]
_PAIR = ["route", "primary_adapter", "primary_version", "candidate_adapter", "candidate_version"]


def http_requests_counter(registry: CollectorRegistry) -> Counter:
    """Calls of the OpenAI-compatible HTTP API (in a server's registry, or alone in a
    `loraplex http-gateway`'s)."""
    return Counter("loraplex_http_requests", "Calls of the OpenAI-compatible HTTP API by "
                   "endpoint and HTTP status (499: the client went away).",
                   ["endpoint", "status"], registry=registry)


def response_store_gauges(registry: CollectorRegistry, store) -> None:
    """How full the Responses API's store (openai_store.ResponseStore) is, read at each
    scrape."""
    Gauge("loraplex_http_stored_responses", "Responses kept for previous_response_id and "
          "GET /v1/responses.", registry=registry).set_function(lambda: len(store))
    Gauge("loraplex_http_stored_response_bytes", "Their size as JSON (against "
          "--response-store-mb).", registry=registry).set_function(lambda: store.bytes)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.http_requests = http_requests_counter(r)
        self.requests = Counter(
            "loraplex_requests", "Finished generation calls by adapter, version, route and "
            "gRPC status.", ["adapter", "version", "route", "status"], registry=r)
        self.request_latency = Histogram(
            "loraplex_request_latency_seconds", "Duration of successful generation calls, "
            "as the API layer sees them.", ["adapter", "version", "route"],
            buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_time = Histogram(
            "loraplex_queue_time_seconds", "Time from submission to first scheduling.",
            AV, buckets=_LATENCY_BUCKETS, registry=r)
        self.time_to_first_token = Histogram(
            "loraplex_time_to_first_token_seconds", "Time from submission to the first token.",
            AV, buckets=_LATENCY_BUCKETS, registry=r)
        self.inter_token_latency = Histogram(
            "loraplex_inter_token_latency_seconds", "Time between two tokens of one request.",
            AV, buckets=_ITL_BUCKETS, registry=r)
        self.e2e_latency = Histogram(
            "loraplex_e2e_latency_seconds", "Time from submission to the last token.",
            AV, buckets=_LATENCY_BUCKETS, registry=r)
        self.generated_tokens = Counter(
            "loraplex_generated_tokens", "Tokens produced, by adapter.", AV, registry=r)
        self.prompt_tokens = Counter(
            "loraplex_prompt_tokens",
            "Prompt tokens of admitted requests (cached ones too), by adapter.", AV,
            registry=r)
        self.running = Gauge("loraplex_running_requests", "Requests in the running batch.",
                             registry=r)
        self.waiting = Gauge("loraplex_waiting_requests", "Requests waiting for admission.",
                             registry=r)
        self.batch_size = Histogram(
            "loraplex_batch_size", "Sequences per forward pass.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_tokens = Histogram(
            "loraplex_batch_tokens", "Tokens per forward pass.",
            buckets=(1, 8, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192), registry=r)
        self.batch_adapters = Histogram(
            "loraplex_batch_adapters", "Distinct adapters per forward pass.",
            buckets=(0, 1, 2, 4, 8, 16, 32, 64, 128), registry=r)
        self.kv_cache_usage = Gauge("loraplex_kv_cache_usage_ratio",
                                    "Fraction of KV-cache blocks in use.", registry=r)
        self.prefix_cache_hit_tokens = Counter(
            "loraplex_prefix_cache_hit_tokens",
            "Prompt tokens whose keys and values were found in the prefix cache, not computed.",
            registry=r)
        self.guide_mask_time = Histogram(
            "loraplex_guide_mask_seconds",
            "Time a step spent on the token masks of its guided requests (a kept mask costs "
            "~0.1 ms; a new automaton state's is found over the whole vocabulary, ms).",
            buckets=(0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1), registry=r)
        self.preemptions = Counter("loraplex_preemptions",
                                   "Sequences preempted for KV space (recomputed later).",
                                   registry=r)
        self.draft_tokens = Counter(
            "loraplex_spec_decode_draft_tokens",
            "Draft tokens computed by speculative decoding (--num-speculative-tokens).",
            registry=r)
        self.accepted_draft_tokens = Counter(
            "loraplex_spec_decode_accepted_tokens",
            "Draft tokens kept: the request's own sampling drew them.", registry=r)
        self.step_failures = Counter(
            "loraplex_engine_step_failures",
            "Engine steps that raised (their requests ended with INTERNAL).", registry=r)
        self.adapter_cache_hits = Counter(
            "loraplex_adapter_cache_hits", "Admissions whose adapter was already in a GPU slot.",
            registry=r)
        self.adapter_cache_misses = Counter(
            "loraplex_adapter_cache_misses",
            "Adapters brought in for a request: read from disk, or copied into a slot.",
            ["tier"], registry=r)  # tier it came from: disk | cpu
        self.adapter_loads = Counter(
            "loraplex_adapter_loads", "Adapter loads into a tier.", ["tier"], registry=r)
        self.adapter_evictions = Counter(
            "loraplex_adapter_evictions", "Adapters evicted from a tier.", ["tier"], registry=r)
        self.adapter_load_time = Histogram(
            "loraplex_adapter_load_seconds", "Time to load an adapter into a tier.",
            ["tier"], buckets=_LOAD_BUCKETS, registry=r)
        self.adapters_resident = Gauge(
            "loraplex_adapters_resident", "Adapters held in each tier.", ["tier"], registry=r)
        # ---- routes: canary splits, shadow traffic, guards (loraplex.routing) ----
        self.route_weight = Gauge(
            "loraplex_route_weight", "Configured weight of each version of a route.",
            ["route", "adapter", "version"], registry=r)
        self.shadow_requests = Counter(
            "loraplex_shadow_requests", "Mirrored (shadow) requests by outcome: ok | error | "
            "skipped (too many shadows in flight).", _PAIR + ["outcome"], registry=r)
        self.shadow_comparisons = Counter(
            "loraplex_shadow_comparisons", "Shadow answers compared with the primary's.",
            _PAIR, registry=r)
        self.shadow_exact_matches = Counter(
            "loraplex_shadow_exact_matches", "Shadow answers identical to the primary's "
            "(exact-match rate = this / loraplex_shadow_comparisons).", _PAIR, registry=r)
        self.shadow_tokens_compared = Counter(
            "loraplex_shadow_tokens_compared", "Token positions compared (the longer output).",
            _PAIR, registry=r)
        self.shadow_tokens_agreeing = Counter(
            "loraplex_shadow_tokens_agreeing", "Token positions where shadow and primary agree "
            "(token agreement = this / loraplex_shadow_tokens_compared).", _PAIR, registry=r)
        self.shadow_latency_ratio = Histogram(
            "loraplex_shadow_latency_ratio", "Shadow latency / primary latency of one request.",
            _PAIR, buckets=(0.25, 0.5, 0.75, 0.9, 1, 1.1, 1.25, 1.5, 2, 3, 5, 10), registry=r)
        self.guard_trips = Counter(
            "loraplex_route_guard_trips", "Times a route's guard set a candidate's weight to 0.",
            ["route", "adapter", "version", "metric"], registry=r)
