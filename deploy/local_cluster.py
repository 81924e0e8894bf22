"""Run N real `loraplex serve` replicas and a real nginx in front of them, on
127.0.0.1, as subprocesses. Used by tests/test_proxy.py and deploy/bench_affinity.py;
also handy by hand:

    python deploy/local_cluster.py --model demo/assets/model \\
        --adapter-root demo/assets/adapters --replicas 2 -- --max-gpu-adapters 2

Everything started here is stopped by `LocalCluster.stop()` (or the context manager).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "nginx"))
import render  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_nginx() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if Path(p).exists()), None)


def _wait_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout:.0f} s")


@dataclass
class Replica:
    index: int
    port: int
    metrics_port: int
    log: Path
    proc: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """{(sample name, sorted labels): value} from /metrics, like Prometheus."""
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def requests_by_adapter(self) -> dict[tuple[str, str], float]:
        """{(adapter name without version, status): count} of finished calls."""
        out: dict[tuple[str, str], float] = {}
        for (name, labels), v in self.scrape().items():
            if name == "loraplex_requests_total":
                d = dict(labels)
                key = (d["adapter"].split("@", 1)[0], d["status"])
                out[key] = out.get(key, 0) + v
        return out

    def sample(self, name: str, **labels) -> float:
        return sum(v for (n, ls), v in self.scrape().items()
                   if n == name and labels.items() <= dict(ls).items())


@dataclass
class LocalCluster:
    model: Path
    adapter_root: Path
    workdir: Path
    replicas: int = 2
    serve_args: tuple[str, ...] = ()
    threads_per_replica: int = 1
    balance: str = "hash"
    replica_list: list[Replica] = field(default_factory=list)
    nginx_proc: subprocess.Popen | None = None
    proxy_port: int = 0
    health_port: int = 0

    # ---- replicas ------------------------------------------------------------------

    def start_replicas(self, timeout: float = 180) -> None:
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads_per_replica),
                   MKL_NUM_THREADS=str(self.threads_per_replica), TOKENIZERS_PARALLELISM="false",
                   HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        # A flag always wins over LORAPLEX_* env vars, so a stray one cannot leak in.
        for i in range(self.replicas):
            r = Replica(i, free_port(), free_port(), self.workdir / f"replica{i}.log")
            cmd = [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(self.model),
                   "--adapter-root", str(self.adapter_root), "--host", "127.0.0.1",
                   "--port", str(r.port), "--metrics-port", str(r.metrics_port),
                   "--device", "cpu", "--dtype", "float32", *self.serve_args]
            with open(r.log, "wb") as log:
                r.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True)
            self.replica_list.append(r)
        for r in self.replica_list:
            self.wait_serving(r, timeout)

    def wait_serving(self, r: Replica, timeout: float) -> None:
        from loraplex_client import Client

        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if not r.running:
                raise RuntimeError(f"replica {r.index} exited:\n{r.log.read_text()[-3000:]}")
            try:
                with Client(r.target, timeout=1) as c:
                    if c.health() == "SERVING":
                        return
            except Exception:  # noqa: BLE001  (not up yet)
                pass
            time.sleep(0.3)
        raise TimeoutError(f"replica {r.index} not SERVING after {timeout} s:\n"
                           f"{r.log.read_text()[-3000:]}")

    def stop_replica(self, r: Replica, sig: int = signal.SIGTERM, wait: float = 60) -> int:
        if r.proc is None:
            return 0
        if r.proc.poll() is None:
            r.proc.send_signal(sig)
            try:
                r.proc.wait(wait)
            except subprocess.TimeoutExpired:
                r.proc.kill()
                r.proc.wait(10)
        return r.proc.returncode

    # ---- nginx -----------------------------------------------------------------------

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.proxy_port}"

    @property
    def conf_path(self) -> Path:
        return self.workdir / "nginx" / "nginx.conf"

    def server_names(self, replicas: list[Replica] | None = None) -> list[str]:
        return [r.target for r in (self.replica_list if replicas is None else replicas)]

    def write_nginx_conf(self, replicas: list[Replica] | None = None) -> str:
        d = self.workdir / "nginx"
        d.mkdir(parents=True, exist_ok=True)
        if not self.proxy_port:
            self.proxy_port, self.health_port = free_port(), free_port()
        text = render.render(render.Options(
            servers=tuple(self.server_names(replicas)), balance=self.balance,
            grpc_listen=f"127.0.0.1:{self.proxy_port}",
            health_listen=f"127.0.0.1:{self.health_port}", worker_processes="1",
            pid_file=str(d / "nginx.pid"), error_log=str(d / "error.log"),
            access_log=str(d / "access.log"), temp_dir=str(d)))
        self.conf_path.write_text(text)
        return text

    def start_nginx(self, timeout: float = 15) -> None:
        nginx = find_nginx()
        if not nginx:
            raise FileNotFoundError("nginx not installed")
        self.write_nginx_conf()
        d = self.conf_path.parent
        check = subprocess.run([nginx, "-t", "-p", str(d), "-e", str(d / "error.log"),
                                "-c", str(self.conf_path)], capture_output=True, text=True)
        if check.returncode:
            raise RuntimeError(check.stderr)
        self.nginx_proc = subprocess.Popen(
            [nginx, "-p", str(d), "-e", str(d / "error.log"), "-c", str(self.conf_path),
             "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        _wait_port(self.proxy_port, timeout, self.nginx_proc)
        _wait_port(self.health_port, timeout, self.nginx_proc)

    def reload_nginx(self, replicas: list[Replica]) -> None:
        """Rewrite the upstream list and reload nginx (SIGHUP): new workers get the
        new ring; old workers finish their streams."""
        self.write_nginx_conf(replicas)
        old_workers = set(self._nginx_workers())
        self.nginx_proc.send_signal(signal.SIGHUP)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            workers = set(self._nginx_workers())
            if workers and not workers & old_workers:
                return
            time.sleep(0.1)
        raise TimeoutError("nginx did not reload")

    def _nginx_workers(self) -> list[int]:
        pid = self.nginx_proc.pid
        try:
            out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True,
                                 text=True).stdout
        except FileNotFoundError:  # no ps: fall back on /proc
            out = "\n".join(p.name for p in Path("/proc").iterdir() if p.name.isdigit()
                            and (p / "stat").exists()
                            and (p / "stat").read_text().split()[3] == str(pid))
        return [int(x) for x in out.split()]

    def access_log(self) -> str:
        p = self.conf_path.parent / "access.log"
        return p.read_text() if p.exists() else ""

    def ring(self, replicas: list[Replica] | None = None) -> render.Ring:
        return render.Ring(self.server_names(replicas))

    def owner(self, adapter: str, replicas: list[Replica] | None = None) -> Replica:
        """The replica nginx's ring sends `adapter` to (healthy case)."""
        live = self.replica_list if replicas is None else replicas
        name = self.ring(live).server_for(render.affinity_key(adapter))
        return next(r for r in live if r.target == name)

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> "LocalCluster":
        try:
            self.start_replicas()
            self.start_nginx()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.nginx_proc is not None and self.nginx_proc.poll() is None:
            self.nginx_proc.terminate()
            try:
                self.nginx_proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.nginx_proc.pid, signal.SIGKILL)
                self.nginx_proc.wait(5)
        for r in self.replica_list:
            self.stop_replica(r, wait=20)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="N loraplex replicas + nginx on 127.0.0.1")
    p.add_argument("--model", required=True)
    p.add_argument("--adapter-root", required=True)
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/loraplex-local-cluster")
    p.add_argument("--round-robin", action="store_true")
    p.add_argument("serve_args", nargs="*", help="extra `loraplex serve` flags (after --)")
    a = p.parse_args(argv)
    work = Path(a.workdir)
    work.mkdir(parents=True, exist_ok=True)
    cluster = LocalCluster(Path(a.model), Path(a.adapter_root), work, a.replicas,
                           tuple(a.serve_args), balance="round_robin" if a.round_robin else "hash")
    with cluster:
        print(f"proxy: {cluster.target}  (Ctrl-C stops everything)")
        for r in cluster.replica_list:
            print(f"replica {r.index}: {r.target}  metrics :{r.metrics_port}  log {r.log}")
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
