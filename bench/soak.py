"""A randomized soak of a real server (not a test): valid and invalid requests, streams cut
short, short deadlines, n > 1, guided decoding, and adapter / route churn at once.

    python -m bench.soak --seconds 120

Starts `loraplex serve` on the demo model (small KV cache and adapter tiers, so that
requests queue and adapters are evicted and read again) over a copy of its adapters, then
12 gRPC clients, 4 clients of the OpenAI-compatible HTTP API (streams dropped part way)
and one admin hammer it. Prints every status code seen; an INTERNAL or UNKNOWN one, an
HTTP 500, or an exception that is not the client's own refusal of a bad value, is a bug.
At the end the server must still answer, with nothing running or waiting, no KV block in
use and no failed step; exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from loraplex_client import Client
from loraplex_client.errors import LoraplexError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "demo" / "assets"
ALPHABET = "abcdefghijklmnopqrstuvwxyz    .,!?'-"
REGEXES = ["[a-z]+ [a-z]", "(yes|no)", "[a-z]{3,9}", "a*b", "[^\n]{0,30}",
           "(", "[z-a]", "x{5,2}", "(?=a)"]  # (the last four do not compile)
ADAPTERS = ["", "reverse", "sort", "caesar", "reverse-v2", "alias", "nosuch", "../etc"]
GAUGES = ("loraplex_running_requests", "loraplex_waiting_requests",
          "loraplex_kv_cache_usage_ratio", "loraplex_engine_step_failures_total")


def random_request(rng: random.Random) -> tuple[str, str, dict]:
    """A request, valid about two times in three; the rest carry a value the server must
    refuse (INVALID_ARGUMENT, NOT_FOUND, ...)."""
    bad = rng.random() < 0.3
    prompt = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, 40))) + "="
    if bad and rng.random() < 0.1:
        prompt = "x" * rng.randint(60, 200) + "="  # past the demo's context
    options = [  # (chance, name, valid values, invalid values)
        (1.0, "max_new_tokens", [1, 5, 20, 40], [0, 100_000]),
        (0.5, "temperature", [0, 0.5, 1.0, 2.0], [-1.0, float("nan")]),
        (0.3, "top_p", [0.1, 0.9, 1.0], [0.0, 1.5]), (0.3, "top_k", [1, 5, 0], [10**6]),
        (0.3, "seed", [rng.randint(0, 2**40)], []), (0.2, "n", [1, 2, 4], [33]),
        (0.2, "stop", [["a"], ["ed"], [" "]], [[""]]),
        (0.15, "guided_regex", REGEXES[:5], REGEXES[5:]),
        (0.05, "guided_choice", [["abc", "abd"], ["x"]], [[]]),
        (0.05, "guided_json", ['{"type": "string"}', '{"enum": ["a b", "c"]}'], ['{"type":']),
        (0.1, "top_logprobs", [0, 3], [50]), (0.05, "repetition_penalty", [1.2], [0.0, -1.0]),
        (0.05, "prompt_logprobs", [0, 2], []), (0.05, "stop_token_ids", [[3]], [[10**9]]),
        (0.05, "logit_bias", [{3: 5.0}], [{10**9: 1.0}, {3: 1e30}]),
        (0.05, "priority", [-5, 0, 5], [])]
    kw: dict = {}
    for chance, name, valid, invalid in options:
        if rng.random() < chance:
            kw[name] = rng.choice(invalid if bad and invalid and rng.random() < 0.3 else valid)
    if "top_logprobs" in kw:
        kw["logprobs"] = True
    if "guided_regex" in kw or "guided_choice" in kw:
        kw.pop("guided_json", None)  # (two guides are refused: rarely is enough)
    if "guided_regex" in kw and not bad:
        kw.pop("guided_choice", None)
    adapters = ADAPTERS if bad else ADAPTERS[:6]
    return prompt, rng.choice(adapters), kw


class Tally:
    def __init__(self):
        self.codes: collections.Counter = collections.Counter()
        self.bugs: collections.Counter = collections.Counter()
        self._lock = threading.Lock()

    def add(self, kind: str, bug: str = "") -> None:
        with self._lock:
            self.codes[kind] += 1
            if bug:
                self.bugs[bug[:300]] += 1

    def error(self, prefix: str, exc: Exception) -> None:
        if isinstance(exc, LoraplexError):
            name = exc.code.name
            self.add(prefix + name, repr(exc) if name in ("INTERNAL", "UNKNOWN") else "")
        else:
            self.add(prefix + "exception", repr(exc))


def client_loop(target: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with Client(target, timeout=30) as c:
        while time.time() < until:
            prompt, adapter, kw = random_request(rng)
            timeout = rng.choice([None, None, None, 0.05, 0.5])
            try:
                if rng.random() < 0.5:
                    cut = rng.choice([None, None, 0, 1, 3])
                    stream = c.stream(prompt, adapter=adapter, timeout=timeout, **kw)
                    for i, _ in enumerate(stream):
                        if cut is not None and i >= cut:
                            stream.cancel()
                            break
                else:
                    c.generate(prompt, adapter=adapter, timeout=timeout, **kw)
                tally.add("OK")
            except Exception as exc:  # noqa: BLE001  (every outcome is counted)
                tally.error("", exc)


_HTTP_NAMES = {"max_new_tokens": "max_tokens", "top_logprobs": "logprobs"}
_HTTP_DROPPED = ("logprobs", "prompt_logprobs", "include_stop_str_in_output")


_TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"q": {"type": "string", "maxLength": 8}}}}},
    {"type": "function", "function": {"name": "now"}}]


def http_body(rng: random.Random) -> tuple[str, dict]:
    """random_request as an OpenAI-style body: (path, body)."""
    if rng.random() < 0.05:  # vLLM's runtime LoRA endpoints (adapter churn over HTTP)
        name = rng.choice(["reverse", "sort", "extra", "http-extra"])
        if rng.random() < 0.5:
            return "/v1/unload_lora_adapter", {"lora_name": name}
        return "/v1/load_lora_adapter", {"lora_name": name, "load_inplace": rng.random() < 0.5,
                                         "lora_path": rng.choice(["reverse", "sort", "../x"])}
    prompt, adapter, kw = random_request(rng)
    body = {"model": adapter}
    for name, value in kw.items():
        if name in _HTTP_DROPPED:
            continue
        if name == "logit_bias":
            value = {str(t): b for t, b in value.items()}
        body[_HTTP_NAMES.get(name, name)] = value
    if rng.random() < 0.3:
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
        if "logprobs" in body:
            body["top_logprobs"], body["logprobs"] = body["logprobs"], True
        if rng.random() < 0.3:  # tools, every tool_choice (auto: --tool-call-parser hermes)
            body["tools"] = _TOOLS
            body["tool_choice"] = rng.choice(["auto", "none", "required", {
                "type": "function", "function": {"name": "lookup"}}])
        elif rng.random() < 0.2:
            body["response_format"] = {"type": "json_object"}
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    if rng.random() < 0.2:
        body["skip_special_tokens"] = rng.random() < 0.5
    body["stream"] = rng.random() < 0.5
    return path, body


def http_loop(port: int, seed: int, until: float, tally: Tally) -> None:
    """OpenAI-style requests over the HTTP API, streams read in part or whole; a 500 (or a
    body that is not OpenAI's error) is a bug."""
    rng = random.Random(seed)
    while time.time() < until:
        path, body = http_body(rng)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
            resp = conn.getresponse()
            if resp.status != 200:
                err = json.loads(resp.read())["error"]
                tally.add(f"http {resp.status}",
                          f"http {resp.status}: {err['message']}" if resp.status >= 500
                          and resp.status != 503 else "")
                continue
            cut = rng.choice([None, None, 0, 2])
            for i, line in enumerate(resp):
                if b'"error"' in line:
                    tally.add("http stream error", line.decode()[:200]
                              if b"server_error" in line else "")
                if cut is not None and i >= cut:
                    break  # (the connection closes below: the request must leave the batch)
            tally.add("http 200")
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            tally.add("http exception", repr(exc))
        finally:
            conn.close()


def admin_loop(target: str, seed: int, until: float, tally: Tally) -> None:
    rng = random.Random(seed)
    with Client(target, timeout=30) as c:
        while time.time() < until:
            op = rng.choice(["load", "unload", "swap", "route", "list", "delroute", "merge"])
            name = rng.choice(["reverse", "sort", "caesar", "extra"])
            try:
                if op == "load":
                    c.load_adapter(name, rng.choice([name, f"{name}-v2", "reverse", "../x", "no"]))
                elif op == "unload":
                    c.unload_adapter(name, drain=rng.random() < 0.5, timeout=5)
                elif op == "swap":
                    c.swap_adapter(name, rng.choice([f"{name}-v2", "sort", name]))
                elif op == "route":
                    c.set_route("alias", {rng.choice(["reverse", "sort"]): 50, "caesar": 50})
                elif op == "delroute":
                    c.delete_route("alias")
                elif op == "merge":
                    c.merge_adapters("merged", ["reverse", "sort"])
                else:
                    c.list_adapters()
                tally.add("admin OK")
            except Exception as exc:  # noqa: BLE001
                tally.error("admin ", exc)
            time.sleep(rng.random() * 0.5)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--port", type=int, default=50161)
    parser.add_argument("--metrics-port", type=int, default=9461)
    parser.add_argument("--http-port", type=int, default=8161)
    parser.add_argument("--http-clients", type=int, default=4)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "adapters"
        shutil.copytree(DEMO / "adapters", root)
        for name in ("reverse", "sort", "caesar"):
            shutil.copytree(root / name, root / f"{name}-v2")
        log = open(Path(tmp) / "server.log", "w")
        server = subprocess.Popen(
            [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(DEMO / "model"),
             "--adapter-root", str(root), "--port", str(args.port),
             "--metrics-port", str(args.metrics_port), "--http-port", str(args.http_port),
             "--max-num-seqs", "16", "--tool-call-parser", "hermes",
             "--kv-cache-memory", "4MiB", "--max-queue", "64", "--max-gpu-adapters", "2",
             "--max-cpu-adapters", "3"], stdout=log, stderr=subprocess.STDOUT)
        target = f"127.0.0.1:{args.port}"
        try:
            with Client(target, timeout=5) as c:
                for _ in range(240):
                    try:
                        if c.health() == "SERVING":
                            break
                    except LoraplexError:
                        pass
                    time.sleep(0.5)
            tally, until = Tally(), time.time() + args.seconds
            threads = [threading.Thread(target=client_loop, args=(target, i, until, tally))
                       for i in range(args.clients)]
            threads += [threading.Thread(target=http_loop,
                                         args=(args.http_port, 1000 + i, until, tally))
                        for i in range(args.http_clients)]
            threads.append(threading.Thread(target=admin_loop, args=(target, 99, until, tally)))
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            with Client(target, timeout=30) as c:
                final = c.generate("hello world=", adapter="caesar").text
                in_use = {a.name: a.in_use for a in c.list_adapters() if a.in_use}
            time.sleep(0.5)
            scrape = urllib.request.urlopen(
                f"http://127.0.0.1:{args.metrics_port}/metrics").read().decode()
            gauges = {line.split()[0]: float(line.split()[1]) for line in scrape.splitlines()
                      if line.split(" ")[0] in GAUGES}
        finally:
            server.terminate()
            server.wait(60)
        print("status codes:", dict(sorted(tally.codes.items(), key=lambda kv: -kv[1])))
        print(f"bugs: {sum(tally.bugs.values())}")
        for bug, count in tally.bugs.most_common(20):
            print(f"  {count} x {bug}")
        print("gauges at the end:", gauges)
        print(f"adapters held at the end (route holds included): {in_use}")
        print(f"a last request: {final!r}; server exit status {server.returncode}")
        clean = (not tally.bugs and all(v == 0 for v in gauges.values())
                 and server.returncode == 0 and len(gauges) == len(GAUGES))
        print("clean" if clean else "NOT CLEAN")
        return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
