"""How long new guided schemas stall the streams already running (not a test).

    make serve &                                  # the demo server on 127.0.0.1:50051
    python -m bench.stream_gaps                   # or --target HOST:PORT, --props 60 200

Four clients stream 40-token completions (base model and the demo's three adapters)
without pause; after 0.5 s, 3 requests guided by new JSON schemas (N optional string
properties each, names never used before, so each compiles) arrive at once. Prints,
per N, how long the 3 took and the gaps between the running streams' tokens: the median
and the longest. N = 0 is the floor: schemas that compile in no time. The demo's
vocabulary cannot spell JSON, so the guided requests end INVALID_ARGUMENT after their
compile: only the compile is measured.
"""

from __future__ import annotations

import argparse
import threading
import time

from loraplex_client import Client

ADAPTERS = ("", "reverse", "sort", "caesar")


def schema(props: int, salt: str) -> dict:
    properties = {f"p{i}": {"type": "string"} for i in range(props)}
    properties[f"x{salt}"] = {"type": "integer"}  # (a new key: compiled, not cached)
    return {"type": "object", "properties": properties}


def measure(client: Client, props: int) -> str:
    gaps: list[float] = []
    stop = threading.Event()

    def stream(adapter: str) -> None:
        while not stop.is_set():
            last = None
            for _ in client.stream("hello world abc=", adapter=adapter, max_new_tokens=40,
                                   ignore_eos=True):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now

    def guided(salt: str) -> None:
        try:
            client.generate("ab=", guided_json=schema(props, salt), max_new_tokens=4)
        except Exception:  # noqa: BLE001  (expected: the demo vocabulary cannot spell JSON)
            pass

    streams = [threading.Thread(target=stream, args=(a,)) for a in ADAPTERS]
    for t in streams:
        t.start()
    time.sleep(0.5)
    began = time.perf_counter()
    arrivals = [threading.Thread(target=guided, args=(f"{time.time_ns()}_{k}",))
                for k in range(3)]
    for t in arrivals:
        t.start()
    for t in arrivals:
        t.join()
    took = time.perf_counter() - began
    time.sleep(0.5)
    stop.set()
    for t in streams:
        t.join()
    gaps.sort()
    return (f"{props:>5} properties: 3 schemas in {1e3 * took:4.0f} ms; gaps between tokens "
            f"(n={len(gaps)}): median {1e3 * gaps[len(gaps) // 2]:.1f} ms, longest "
            f"{1e3 * gaps[-1]:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--props", type=int, nargs="+", default=[0, 30, 60, 200])
    args = parser.parse_args()
    with Client(args.target, timeout=120) as client:
        for props in args.props:
            print(measure(client, props), flush=True)


if __name__ == "__main__":
    main()
