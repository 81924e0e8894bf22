"""What the OpenAI-compatible HTTP API costs over gRPC, on one server (not a test).

    make serve &                                  # the demo: gRPC :50051, HTTP :8000
    python -m bench.http_api                      # or --target, --http, --clients, --rounds

The same requests (the demo's four tasks, greedy, 14 tokens at most, so they end at the
same token) through the gRPC client and through HTTP (aiohttp as the client), in
alternating rounds: one request at a time (latency: median and p90 of a whole answer, and
of a stream's first token), then `--clients` at once (tokens/s, unary and streamed).
Prints each figure and its HTTP / gRPC ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time

import aiohttp

from loraplex_client import AsyncClient

ADAPTERS = ("", "reverse", "sort", "caesar")
PROMPTS = ("hello world=", "abc def=", "loraplex=", "serve me=")


def jobs(n: int) -> list[tuple[str, str]]:
    return [(ADAPTERS[i % 4], PROMPTS[(i // 4) % 4]) for i in range(n)]


async def grpc_one(client: AsyncClient, adapter: str, prompt: str, stream: bool):
    """(seconds to the whole answer, seconds to the first token, tokens)."""
    start = time.perf_counter()
    if not stream:
        r = await client.generate(prompt, adapter=adapter, max_new_tokens=14)
        t = time.perf_counter() - start
        return t, t, r.completion_tokens
    first, tokens = None, 0
    async for chunk in client.stream(prompt, adapter=adapter, max_new_tokens=14):
        first = first or time.perf_counter() - start
        tokens = chunk.completion_tokens
    return time.perf_counter() - start, first, tokens


async def http_one(session: aiohttp.ClientSession, url: str, adapter: str, prompt: str,
                   stream: bool):
    body = {"model": adapter, "prompt": prompt, "max_tokens": 14, "temperature": 0,
            "stream": stream, "stream_options": {"include_usage": True}}
    if not stream:
        body.pop("stream_options")
    start = time.perf_counter()
    async with session.post(f"{url}/v1/completions", json=body) as resp:
        resp.raise_for_status()
        if not stream:
            out = await resp.json()
            t = time.perf_counter() - start
            return t, t, out["usage"]["completion_tokens"]
        first, tokens = None, 0
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            first = first or time.perf_counter() - start
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
    return time.perf_counter() - start, first, tokens


async def main(args) -> None:
    async with AsyncClient(args.target, timeout=120) as client, \
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        ways = {"grpc": lambda a, p, s: grpc_one(client, a, p, s),
                "http": lambda a, p, s: http_one(session, args.http, a, p, s)}
        for way in ways.values():  # warm-up: connections, first calls
            await asyncio.gather(*(way(a, p, s) for a, p in jobs(8) for s in (False, True)))
        alone = {(w, s): [] for w in ways for s in (False, True)}
        rates = {(w, s): [] for w in ways for s in (False, True)}
        for _ in range(args.rounds):
            for stream in (False, True):
                for name, way in ways.items():
                    for a, p in jobs(8):
                        alone[name, stream].append(await way(a, p, stream))
                    start = time.perf_counter()
                    done = await asyncio.gather(*(way(a, p, stream)
                                                  for a, p in jobs(args.clients)))
                    rates[name, stream].append(sum(t for _, _, t in done)
                                               / (time.perf_counter() - start))

    def ms(values, q):
        return 1000 * statistics.quantiles(values, n=10)[8] if q == 90 else \
            1000 * statistics.median(values)

    print(f"{args.rounds} rounds; alone: {8 * args.rounds} requests each way; "
          f"together: {args.clients} requests at once")
    print(f"{'':34} {'gRPC':>9} {'HTTP':>9} {'HTTP/gRPC':>10}")
    for stream in (False, True):
        kind = "stream" if stream else "unary"
        for label, pick in (("whole answer", 0), ("first token", 1)):
            if pick and not stream:
                continue
            for q in (50, 90):
                g = ms([x[pick] for x in alone["grpc", stream]], q)
                h = ms([x[pick] for x in alone["http", stream]], q)
                print(f"{kind + ', alone, ' + label + f' p{q} ms':34} {g:9.1f} {h:9.1f} "
                      f"{h / g:9.2f}x")
        g, h = (statistics.median(rates[w, stream]) for w in ("grpc", "http"))
        print(f"{kind + f', {args.clients} at once, tokens/s':34} {g:9.0f} {h:9.0f} "
              f"{h / g:9.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="127.0.0.1:50051")
    parser.add_argument("--http", default="http://127.0.0.1:8000")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    asyncio.run(main(parser.parse_args()))
