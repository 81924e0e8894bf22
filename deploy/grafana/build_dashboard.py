"""Write the loraplex Grafana dashboard (deploy/grafana/dashboards/loraplex.json).

    python deploy/grafana/build_dashboard.py            # rewrite the JSON
    python deploy/grafana/build_dashboard.py --check    # exit 1 if the JSON is stale

The panels are listed here as (title, PromQL, unit) so they stay readable and
reviewable; tests/test_deploy.py checks every metric name in them against
server/loraplex/metrics.py. Metric labels: `adapter` is "name@version" on the
engine's metrics (latencies, tokens) and the reference as requested ("name" or
"name@version") on loraplex_requests_total; "" = base model. `status` is the gRPC
status name, `tier` is gpu|cpu|disk, and Prometheus adds `instance` (one replica).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parent / "dashboards" / "loraplex.json"

DS = {"type": "prometheus", "uid": "${datasource}"}
INST = 'instance=~"$instance"'
# Adapter filter: the `adapter` label is name@version; the variable holds names.
ADP = 'adapter=~"($adapter)(@.*)?"'
RI = "[$__rate_interval]"


def q(expr: str, legend: str = "") -> dict:
    return {"expr": expr, "legendFormat": legend, "datasource": DS}


def quantiles(metric: str, by: str = "") -> list[dict]:
    """p50/p90/p99 of a histogram over the selected replicas and adapters."""
    group = f"le{', ' + by if by else ''}"
    label = f" {{{{{by}}}}}" if by else ""
    return [q(f"histogram_quantile({p}, sum by ({group}) "
              f"(rate({metric}_bucket{{{INST}, {ADP}}}{RI})))", f"p{int(p * 100)}{label}")
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
            f"sum by (adapter, status) (rate(loraplex_requests_total{{{INST}, {ADP}}}{RI}))",
            "{{adapter}} {{status}}")], "reqps", stack=True),
        panel("Failed requests / s by status", [q(
            f'sum by (status) (rate(loraplex_requests_total{{{INST}, status!="OK"}}{RI}))',
            "{{status}}")], "reqps", stack=True),
        panel("Generated tokens / s by replica", [q(
            f"sum by (instance) (rate(loraplex_generated_tokens_total{{{INST}}}{RI}))",
            "{{instance}}")], "short", stack=True),
        panel("Generated tokens / s by adapter", [q(
            f"sum by (adapter) (rate(loraplex_generated_tokens_total{{{INST}, {ADP}}}{RI}))",
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
                 f"(rate(loraplex_time_to_first_token_seconds_bucket{{{INST}, {ADP}}}{RI})))",
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
    ("Adapter versions (canary / swap)", [
        panel("Finished generations / s by version", [q(
            f"sum by (adapter) (rate(loraplex_e2e_latency_seconds_count{{{INST}, {ADP}}}{RI}))",
            "{{adapter}}")], "reqps", stack=True,
            description="Engine-side `adapter` is name@version: a swap or a canary split "
                        "shows as traffic moving from one version to the other."),
        panel("Error ratio by adapter reference (as requested)", [q(
            f'sum by (adapter) (rate(loraplex_requests_total{{{INST}, {ADP}, status!="OK"}}{RI}))'
            f" / sum by (adapter) (rate(loraplex_requests_total{{{INST}, {ADP}}}{RI}))",
            "{{adapter}}")], "percentunit"),
        panel("Time to first token p90 by version", [q(
            f"histogram_quantile(0.9, sum by (le, adapter) "
            f"(rate(loraplex_time_to_first_token_seconds_bucket{{{INST}, {ADP}}}{RI})))",
            "{{adapter}}")], "s"),
        panel("Inter-token latency p90 by version", [q(
            f"histogram_quantile(0.9, sum by (le, adapter) "
            f"(rate(loraplex_inter_token_latency_seconds_bucket{{{INST}, {ADP}}}{RI})))",
            "{{adapter}}")], "s"),
        panel("End-to-end latency p90 by version", [q(
            f"histogram_quantile(0.9, sum by (le, adapter) "
            f"(rate(loraplex_e2e_latency_seconds_bucket{{{INST}, {ADP}}}{RI})))",
            "{{adapter}}")], "s"),
        panel("Generated tokens / s by version", [q(
            f"sum by (adapter) (rate(loraplex_generated_tokens_total{{{INST}, {ADP}}}{RI}))",
            "{{adapter}}")], "short", stack=True),
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
        {"name": "adapter", "type": "query", "label": "Adapter (all versions)", "datasource": DS,
         "query": {"query": "label_values(loraplex_requests_total, adapter)",
                   "refId": "adapter"},
         "definition": "label_values(loraplex_requests_total, adapter)",
         # name@version -> name; the base model ("") and "_invalid" are kept out
         "regex": "/^([^@_][^@]*)@.*/",
         "refresh": 2, "includeAll": True, "multi": True, "allValue": ".*",
         "current": {"text": "All", "value": "$__all"}, "sort": 1},
    ]
    return {
        "uid": "loraplex-overview",
        "title": "loraplex",
        "description": "Multi-adapter LLM serving: traffic, latency, batching, adapter tiers "
                       "and versions. Generated by deploy/grafana/build_dashboard.py.",
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
