"""Write the loraplex Grafana dashboard (deploy/grafana/dashboards/loraplex.json).

    python deploy/grafana/build_dashboard.py            # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check    # exit 1 if the JSON is stale

The panels are listed here as (title, PromQL, unit) so they stay readable and
reviewable; tests/test_deploy.py checks every metric name in them, and every label
they select or group by, against server/loraplex/metrics.py. Metric labels:
`adapter` is the adapter's name and `version` its version ("" = base model; on
loraplex_requests_total / loraplex_request_latency_seconds, "" also for a call that
named a bare adapter, "_invalid" adapter for a malformed or unknown reference).
`route` is the alias of the route that chose the version ("" = the call named an
adapter). Shadow metrics label both sides: route, primary_adapter/primary_version,
candidate_adapter/candidate_version. `status` is the gRPC status name, `tier` is
gpu|cpu|disk, and Prometheus adds `instance` (one replica).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "loraplex.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
INST = 'instance=~"$instance"'
# Filters of the dashboard variables ("All" = ".*", which also matches "").
ADP = 'adapter=~"$adapter"'
VER = 'version=~"$version"'
AV = f"{ADP}, {VER}"
ROUTE = 'route=~"$route"'
# Shadow metrics: filtered by route and by the primary's adapter.
PAIR = "route, primary_adapter, primary_version, candidate_adapter, candidate_version"
SHADOW = f'{INST}, {ROUTE}, primary_adapter=~"$adapter"'
PAIR_LEGEND = ("{{route}}: {{primary_adapter}}@{{primary_version}} vs "
               "{{candidate_adapter}}@{{candidate_version}}")
AV_LEGEND = "{{adapter}}@{{version}}"
# Statuses that are the caller's doing, not the version's (as the route guard counts).
NOT_VERSION_FAULT = "OK|CANCELLED|DEADLINE_EXCEEDED|INVALID_ARGUMENT|RESOURCE_EXHAUSTED|UNAVAILABLE"
RI = "[$__rate_interval]"


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def quantiles(metric: str, by: str = "") -> list[dict]:
    """p50/p90/p99 of a histogram over the selected replicas, adapters and versions."""
    group = f"le{', ' + by if by else ''}"
    label = f" {{{{{by}}}}}" if by else ""
    return [q(f"histogram_quantile({p}, sum by ({group}) "
              f"(rate({metric}_bucket{{{INST}, {AV}}}{RI})))", f"p{int(p * 100)}{label}")
            for p in (0.5, 0.9, 0.99)]


def panel(title: str, targets: list[dict], unit: str = "short", kind: str = "timeseries",
          description: str = "", stack: bool = False) -> dict:
    p = {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [dict(t, refId=chr(ord("A") + i)) for i, t in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "table", "placement": "bottom",
                               "calcs": ["mean", "max"]},
                    "tooltip": {"mode": "multi", "sort": "desc"}},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "lineWidth": 1, "fillOpacity": 10,
            "stacking": {"mode": "normal" if stack else "none", "group": "A"}}
    if kind == "stat":
        p["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                        "colorMode": "value", "graphMode": "area"}
    return p


ROWS: list[tuple[str, list[dict]]] = [
    ("Overview", [
        panel("Requests / s", [q(f"sum(rate(loraplex_requests_total{{{INST}}}{RI}))", "all")],
              "reqps", "stat"),
        panel("Error ratio", [q(
            f'sum(rate(loraplex_requests_total{{{INST}, status!="OK"}}{RI})) / '
            f"sum(rate(loraplex_requests_total{{{INST}}}{RI}))", "errors")],
            "percentunit", "stat", "Share of calls that ended with a status other than OK."),
        panel("Generated tokens / s", [q(
            f"sum(rate(loraplex_generated_tokens_total{{{INST}}}{RI}))", "tokens/s")],
            "short", "stat"),
        panel("GPU adapter hit ratio", [q(
            f"sum(rate(loraplex_adapter_cache_hits_total{{{INST}}}{RI})) / "
            f"(sum(rate(loraplex_adapter_cache_hits_total{{{INST}}}{RI})) + "
            f"sum(rate(loraplex_adapter_cache_misses_total{{{INST}}}{RI})))", "hit ratio")],
            "percentunit", "stat",
            "Admissions whose adapter was already in a GPU slot. Low with many adapters "
            "per replica: check the proxy's adapter affinity and --max-gpu-adapters."),
    ]),
    ("Traffic", [
        panel("Requests / s by adapter and status", [q(
            f"sum by (adapter, status) (rate(loraplex_requests_total{{{INST}, {AV}, {ROUTE}}}{RI}))",
            "{{adapter}} {{status}}")], "reqps", stack=True),
        panel("Failed requests / s by status", [q(
            f'sum by (status) (rate(loraplex_requests_total{{{INST}, status!="OK"}}{RI}))',
            "{{status}}")], "reqps", stack=True),
        panel("Generated tokens / s by replica", [q(
            f"sum by (instance) (rate(loraplex_generated_tokens_total{{{INST}}}{RI}))",
            "{{instance}}")], "short", stack=True),
        panel("Generated tokens / s by adapter", [q(
            f"sum by (adapter) (rate(loraplex_generated_tokens_total{{{INST}, {AV}}}{RI}))",
            "{{adapter}}")], "short", stack=True),
        panel("Prompt tokens / s by replica", [q(
            f"sum by (instance) (rate(loraplex_prompt_tokens_total{{{INST}}}{RI}))",
            "{{instance}}")], "short", stack=True),
        panel("Requests / s by replica (adapter affinity)", [q(
            f"sum by (instance) (rate(loraplex_requests_total{{{INST}}}{RI}))",
            "{{instance}}")], "reqps", stack=True,
            description="With the nginx consistent hash each adapter's traffic goes to one "
                        "replica; an uneven split means a few hot adapters."),
    ]),
    ("Latency", [
        panel("Time to first token", quantiles("loraplex_time_to_first_token_seconds"), "s"),
        panel("Inter-token latency", quantiles("loraplex_inter_token_latency_seconds"), "s"),
        panel("End-to-end latency", quantiles("loraplex_e2e_latency_seconds"), "s"),
        panel("Queue time", quantiles("loraplex_queue_time_seconds"), "s"),
        panel("Time to first token p90 by replica",
              [q(f"histogram_quantile(0.9, sum by (le, instance) "
                 f"(rate(loraplex_time_to_first_token_seconds_bucket{{{INST}, {AV}}}{RI})))",
                 "{{instance}}")], "s"),
    ]),
    ("Batching and KV cache", [
        panel("Running and waiting requests", [
            q(f"sum by (instance) (loraplex_running_requests{{{INST}}})", "running {{instance}}"),
            q(f"sum by (instance) (loraplex_waiting_requests{{{INST}}})", "waiting {{instance}}"),
        ]),
        panel("Batch size (sequences per forward)", [
            q(f"sum by (instance) (rate(loraplex_batch_size_sum{{{INST}}}{RI})) / "
              f"sum by (instance) (rate(loraplex_batch_size_count{{{INST}}}{RI}))",
              "mean {{instance}}"),
            q(f"histogram_quantile(0.9, sum by (le, instance) "
              f"(rate(loraplex_batch_size_bucket{{{INST}}}{RI})))", "p90 {{instance}}"),
        ]),
        panel("Tokens per forward pass", [
            q(f"sum by (instance) (rate(loraplex_batch_tokens_sum{{{INST}}}{RI})) / "
              f"sum by (instance) (rate(loraplex_batch_tokens_count{{{INST}}}{RI}))",
              "mean {{instance}}")]),
        panel("Distinct adapters per forward pass", [
            q(f"sum by (instance) (rate(loraplex_batch_adapters_sum{{{INST}}}{RI})) / "
              f"sum by (instance) (rate(loraplex_batch_adapters_count{{{INST}}}{RI}))",
              "mean {{instance}}")]),
        panel("KV cache usage", [q(f"max by (instance) (loraplex_kv_cache_usage_ratio{{{INST}}})",
                                   "{{instance}}")], "percentunit"),
        panel("Preemptions / s", [q(
            f"sum by (instance) (rate(loraplex_preemptions_total{{{INST}}}{RI}))",
            "{{instance}}")], "short",
            description="Sequences preempted for KV space; sustained > 0 means the KV cache "
                        "(--kv-cache-memory) is too small for the load."),
        panel("Failed engine steps / s", [q(
            f"sum by (instance) (rate(loraplex_engine_step_failures_total{{{INST}}}{RI}))",
            "{{instance}}")], "short",
            description="Steps that raised (a server bug; their requests ended INTERNAL). "
                        "--max-step-failures in a row and the replica exits to be restarted."),
    ]),
    ("Adapters", [
        panel("Adapters resident by tier", [q(
            f"sum by (instance, tier) (loraplex_adapters_resident{{{INST}}})",
            "{{tier}} {{instance}}")]),
        panel("Adapter loads / s by tier", [q(
            f"sum by (tier) (rate(loraplex_adapter_loads_total{{{INST}}}{RI}))", "{{tier}}")],
            stack=True),
        panel("Adapter evictions / s by tier", [q(
            f"sum by (tier) (rate(loraplex_adapter_evictions_total{{{INST}}}{RI}))", "{{tier}}")],
            stack=True,
            description="GPU evictions under steady traffic mean more hot adapters than "
                        "--max-gpu-adapters on a replica."),
        panel("GPU slot misses / s by source tier", [q(
            f"sum by (tier) (rate(loraplex_adapter_cache_misses_total{{{INST}}}{RI}))",
            "from {{tier}}")], stack=True),
        panel("Adapter load time p90 by tier", [q(
            f"histogram_quantile(0.9, sum by (le, tier) "
            f"(rate(loraplex_adapter_load_seconds_bucket{{{INST}}}{RI})))", "{{tier}}")], "s"),
    ]),
    ("Adapter versions (engine)", [
        panel("Finished generations / s by version", [q(
            f"sum by (adapter, version) "
            f"(rate(loraplex_e2e_latency_seconds_count{{{INST}, {AV}}}{RI}))",
            AV_LEGEND)], "reqps", stack=True,
            description="Engine-side, by the version that served: a swap or a canary split "
                        "shows as traffic moving from one version to the other."),
        panel("Time to first token p90 by version", [q(
            f"histogram_quantile(0.9, sum by (le, adapter, version) "
            f"(rate(loraplex_time_to_first_token_seconds_bucket{{{INST}, {AV}}}{RI})))",
            AV_LEGEND)], "s"),
        panel("Inter-token latency p90 by version", [q(
            f"histogram_quantile(0.9, sum by (le, adapter, version) "
            f"(rate(loraplex_inter_token_latency_seconds_bucket{{{INST}, {AV}}}{RI})))",
            AV_LEGEND)], "s"),
        panel("End-to-end latency p90 by version", [q(
            f"histogram_quantile(0.9, sum by (le, adapter, version) "
            f"(rate(loraplex_e2e_latency_seconds_bucket{{{INST}, {AV}}}{RI})))",
            AV_LEGEND)], "s"),
        panel("Generated tokens / s by version", [q(
            f"sum by (adapter, version) "
            f"(rate(loraplex_generated_tokens_total{{{INST}, {AV}}}{RI}))",
            AV_LEGEND)], "short", stack=True),
    ]),
    ("Canary", [
        panel("Route weights by version", [q(
            f"max by (route, adapter, version) "
            f"(loraplex_route_weight{{{INST}, {ROUTE}, {AV}}})",
            "{{route}}: " + AV_LEGEND)], "short",
            description="Configured weight of each version of a route (the same on every "
                        "replica). A guard trip sets the candidate's weight to 0."),
        panel("Requests / s by version", [q(
            f"sum by (adapter, version) "
            f"(rate(loraplex_requests_total{{{INST}, {AV}, {ROUTE}}}{RI}))",
            AV_LEGEND)], "reqps",
            description="Calls by the version their route chose (API layer). version \"\" = "
                        "calls that named a bare adapter, not a route."),
        panel("Error ratio by version", [q(
            f'sum by (adapter, version) (rate(loraplex_requests_total'
            f'{{{INST}, {AV}, {ROUTE}, status!~"{NOT_VERSION_FAULT}"}}{RI}))'
            f" / sum by (adapter, version) "
            f"(rate(loraplex_requests_total{{{INST}, {AV}, {ROUTE}}}{RI}))",
            AV_LEGEND)], "percentunit",
            description="Share of a version's calls that failed through the server's fault "
                        "(statuses other than " + NOT_VERSION_FAULT.replace("|", ", ") +
                        "), as the route guard counts them."),
        panel("Latency p50 by version", [q(
            f"histogram_quantile(0.5, sum by (le, adapter, version) "
            f"(rate(loraplex_request_latency_seconds_bucket{{{INST}, {AV}, {ROUTE}}}{RI})))",
            "p50 " + AV_LEGEND)], "s",
            description="Duration of successful calls as the API layer sees them."),
        panel("Latency p99 by version", [q(
            f"histogram_quantile(0.99, sum by (le, adapter, version) "
            f"(rate(loraplex_request_latency_seconds_bucket{{{INST}, {AV}, {ROUTE}}}{RI})))",
            "p99 " + AV_LEGEND)], "s"),
        panel("Guard trips", [q(
            f"sum by (route, adapter, version, metric) "
            f"(increase(loraplex_route_guard_trips_total{{{INST}, {ROUTE}, {AV}}}{RI}))",
            "{{route}}: " + AV_LEGEND + " ({{metric}})")], "short",
            description="Times a route's guard set a candidate's weight to 0, by the metric "
                        "that tripped it."),
        panel("Shadow exact-match rate by pair", [q(
            f"sum by ({PAIR}) (rate(loraplex_shadow_exact_matches_total{{{SHADOW}}}{RI}))"
            f" / sum by ({PAIR}) (rate(loraplex_shadow_comparisons_total{{{SHADOW}}}{RI}))",
            PAIR_LEGEND)], "percentunit",
            description="Share of shadow answers identical to the primary's."),
        panel("Shadow token agreement by pair", [q(
            f"sum by ({PAIR}) (rate(loraplex_shadow_tokens_agreeing_total{{{SHADOW}}}{RI}))"
            f" / sum by ({PAIR}) (rate(loraplex_shadow_tokens_compared_total{{{SHADOW}}}{RI}))",
            PAIR_LEGEND)], "percentunit",
            description="Token positions where shadow and primary agree, over the positions "
                        "compared (the longer output)."),
        panel("Shadow latency ratio by pair", [
            q(f"histogram_quantile({p}, sum by (le, {PAIR}) "
              f"(rate(loraplex_shadow_latency_ratio_bucket{{{SHADOW}}}{RI})))",
              f"p{int(p * 100)} " + PAIR_LEGEND) for p in (0.5, 0.9)], "short",
            description="Shadow latency / primary latency of one request (1 = as fast)."),
        panel("Shadow requests / s by outcome", [q(
            f"sum by (route, candidate_adapter, candidate_version, outcome) "
            f"(rate(loraplex_shadow_requests_total{{{SHADOW}}}{RI}))",
            "{{route}}: {{candidate_adapter}}@{{candidate_version}} {{outcome}}")], "reqps",
            stack=True,
            description="skipped = too many shadows in flight (shadow traffic yields to real "
                        "work)."),
    ]),
]


def build() -> dict:
    panels, y, pid = [], 0, 1
    for row_title, row_panels in ROWS:
        panels.append({"type": "row", "title": row_title, "collapsed": False, "id": pid,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        pid, y = pid + 1, y + 1
        small = row_title == "Overview"
        w, h = (6, 4) if small else (8, 8)
        for i, p in enumerate(row_panels):
            p = dict(p, id=pid)
            p["gridPos"] = {"h": h, "w": w, "x": (i * w) % 24, "y": y + (i * w) // 24 * h}
            panels.append(p)
            pid += 1
        y += ((len(row_panels) * w + 23) // 24) * h
    variables = [
        {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source",
         "current": {}, "hide": 0},
        {"name": "instance", "type": "query", "label": "Replica", "datasource": DS,
         "query": {"query": "label_values(loraplex_running_requests, instance)",
                   "refId": "instance"},
         "definition": "label_values(loraplex_running_requests, instance)",
         "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}, "sort": 1},
        {"name": "adapter", "type": "query", "label": "Adapter", "datasource": DS,
         "query": {"query": "label_values(loraplex_requests_total, adapter)",
                   "refId": "adapter"},
         "definition": "label_values(loraplex_requests_total, adapter)",
         # names only; the base model ("") and "_invalid" are kept out
         "regex": "/^([^_].*)$/",
         "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}, "sort": 1},
        {"name": "version", "type": "query", "label": "Version", "datasource": DS,
         "query": {"query": 'label_values(loraplex_requests_total{adapter=~"$adapter"}, version)',
                   "refId": "version"},
         "definition": 'label_values(loraplex_requests_total{adapter=~"$adapter"}, version)',
         "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}, "sort": 1},
        {"name": "route", "type": "query", "label": "Route", "datasource": DS,
         "query": {"query": "label_values(loraplex_route_weight, route)", "refId": "route"},
         "definition": "label_values(loraplex_route_weight, route)",
         "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}, "sort": 1},
    ]
    return {
        "uid": "loraplex-overview",
        "title": "loraplex",
        "description": "Multi-adapter LLM serving: traffic, latency, batching, adapter tiers, "
                       "versions, canaries and shadows. Generated by "
                       "deploy/grafana/build_dashboard.py.",
        "tags": ["loraplex", "llm", "lora"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": variables},
        "annotations": {"list": []},
        "panels": panels,
    }


def main(argv: list[str]) -> int:
    text = json.dumps(build(), indent=2) + "\n"
    if "--check" in argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python deploy/grafana/build_dashboard.py", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
