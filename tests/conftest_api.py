"""Shared fixtures of the API tests: a tiny random Llama with PEFT adapters, and real
loraplex servers (gRPC on an ephemeral port, Prometheus endpoint) in a background
thread. Import the fixtures into a test module with
`from conftest_api import *  # noqa: F401,F403`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from loraplex.config import Config, EngineConfig, ModelConfig, ServerConfig
from loraplex.server import LoraplexServer
from models import ADAPTER_SPECS, build_adapters, build_base

# max_position_embeddings of the test model: long enough that a generation can be
# cancelled or run past its deadline before it ends.
MAX_LEN = 16384  # long enough that LONG requests in tests never end on their own
CHAT_TEMPLATE = ("{% if tools %}<tools>{{ tools | tojson }}\n{% endif %}"
                 "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
                 "{% for c in m.tool_calls or [] %}<tool_call>{{ c.function | tojson }}"
                 "</tool_call>{% endfor %}{{ '\\n' }}{% endfor %}"  # (trim_blocks)
                 "{% if enable_thinking is defined and not enable_thinking %}<nothink>"
                 "{% endif %}{% if add_generation_prompt %}<assistant>{% endif %}")
ADMIN_TOKEN, GENERATE_TOKEN = "admin-secret", "gen-secret"

_SPECS = {s.name: s for s in ADAPTER_SPECS}
# name in the tests -> (spec of tests/models.py, seed); alpha_v2 is a new version of alpha.
ADAPTERS = {
    "alpha": ("r8_attn", 4),
    "beta": ("r4_mlp", 8),
    "gamma": ("r8_qv", 15),
    "alpha_v2": ("r8_attn", 99),
}


@dataclasses.dataclass(frozen=True)
class Assets:
    model: Path  # with a chat template
    model_nochat: Path  # the same weights, no chat template
    adapter_root: Path


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Assets:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("api_assets")
    nochat = build_base("llama", root / "model_nochat", seed=3, max_position_embeddings=MAX_LEN)
    model = build_base("llama", root / "model", seed=3, max_position_embeddings=MAX_LEN)
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(model)
    specs = [dataclasses.replace(_SPECS[spec], name=name, seed=seed)
             for name, (spec, seed) in ADAPTERS.items()]
    build_adapters(model, root / "adapters", specs)
    (root / "outside").mkdir()
    return Assets(model, nochat, root / "adapters")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(assets: Assets, *, model: Path | None = None, **server_and_engine) -> Config:
    """A Config on 127.0.0.1, ephemeral gRPC port, a free metrics port."""
    engine_fields = {f.name for f in dataclasses.fields(EngineConfig)}
    engine = {k: v for k, v in server_and_engine.items() if k in engine_fields}
    server = {k: v for k, v in server_and_engine.items() if k not in engine_fields}
    server.setdefault("preload", (("alpha", "alpha"), ("beta", "beta")))
    return Config(
        model=ModelConfig(path=str(model or assets.model), device="cpu", dtype="float32"),
        engine=EngineConfig(**{"kv_cache_memory": 64 * 2**20, **engine}),
        server=ServerConfig(host="127.0.0.1", port=0, metrics_port=free_port(),
                            adapter_root=str(assets.adapter_root), grace_period=5.0, **server))


class RunningServer:
    """A LoraplexServer on its own event loop in a background thread."""

    def __init__(self, config: Config, routing_rng: random.Random | None = None):
        self.config = config
        self.server = LoraplexServer(config, routing_rng=routing_rng)
        self.loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="test-server", daemon=True)

    def _run(self):
        asyncio.set_event_loop(self.loop)

        async def main():
            try:
                await self.server.start()
            except BaseException as exc:  # noqa: BLE001  (reported by start())
                self._error = exc
                self._started.set()
                await self.server.shutdown(0)
                return
            self._started.set()
            await self.server.wait_stopped()

        self.loop.run_until_complete(main())

    def start(self, timeout: float = 120) -> "RunningServer":
        self._thread.start()
        if not self._started.wait(timeout):
            raise TimeoutError("server did not start")
        if self._error:
            raise self._error
        return self

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def run(self, coro, timeout: float = 60):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def begin_shutdown(self, grace: float | None = None):
        """Start shutdown on the server loop; returns a concurrent Future."""
        return asyncio.run_coroutine_threadsafe(self.server.shutdown(grace), self.loop)

    def stop(self):
        if self._thread.is_alive() and not self.server.shutting_down.is_set():
            self.begin_shutdown(0).result(60)
        self._thread.join(60)
        assert not self._thread.is_alive(), "server thread did not end"

    # ---- metrics, scraped over HTTP like Prometheus does --------------------------

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels): value} from the /metrics endpoint."""
        url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            text = resp.read().decode()
        out = {}
        for family in text_string_to_metric_families(text):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def metric(self, name: str, **labels) -> float:
        return self.scrape().get((name, tuple(sorted(labels.items()))), 0.0)

    def wait_metric(self, name: str, predicate, timeout: float = 10, **labels) -> float:
        """Poll the endpoint until predicate(value) holds (the gauge changes on the
        engine thread; there is no event to await from outside the process)."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.metric(name, **labels)
            if predicate(value) or time.monotonic() > deadline:
                return value
            time.sleep(0.02)


@pytest.fixture(scope="session")
def server(assets):
    """Open server: chat template, adapters alpha and beta preloaded."""
    s = RunningServer(make_config(assets)).start()
    yield s
    s.stop()


def make_tls_cert(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 / localhost (cert path, key path)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


@pytest.fixture(scope="session")
def guarded_server(assets, tmp_path_factory):
    """TLS + bearer tokens + one sequence at a time + a queue of one + no chat template."""
    cert, key = make_tls_cert(tmp_path_factory.mktemp("tls"))
    cfg = make_config(assets, model=assets.model_nochat, max_num_seqs=1, max_queue=1,
                      admin_token=ADMIN_TOKEN, generate_token=GENERATE_TOKEN,
                      tls_cert=str(cert), tls_key=str(key), preload=(("alpha", "alpha"),))
    s = RunningServer(cfg).start()
    s.cert = cert
    yield s
    s.stop()


class Gateway:
    """`loraplex http-gateway` as a subprocess, over the gRPC services at `target`; ready
    once its /health answers (200 or 503). Use as a context manager: SIGTERM at the end."""

    def __init__(self, target: str, model_name: str, *args: str):
        import subprocess
        import sys

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "loraplex.cli", "http-gateway", "--target", target,
             "--port", str(self.port), "--served-model-name", model_name, *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def __enter__(self) -> "Gateway":
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the gateway exited: {self.process.stdout.read()}")
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=5):
                    return self
            except urllib.error.HTTPError:
                return self  # (503: the gRPC side is not SERVING)
            except OSError:
                time.sleep(0.1)
        raise TimeoutError("the gateway did not start")

    def stop(self) -> int:
        import signal

        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        finally:
            self.process.stdout.close()

    def __exit__(self, *exc):
        if self.process.poll() is None:
            self.stop()
