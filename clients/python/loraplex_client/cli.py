"""Command line of the loraplex client (also reached through `loraplex generate|adapters|health`).

    loraplex generate --adapter sql "SELECT"          # streams to the terminal
    loraplex generate --json --max-new-tokens 8 "hi"  # one JSON object
    loraplex adapters list [NAME] [--json]
    loraplex adapters load NAME [PATH]
    loraplex adapters unload NAME [--drain]
    loraplex adapters swap NAME PATH
    loraplex adapters merge NEW SRC [SRC...] [--weights 0.5,0.5] [--combination-type ties ...]
    loraplex routes set ALIAS name@v1=95 name@v2=5 [--shadow name@v3=0.1]
                    [--max-error-rate R] [--max-latency-ratio R] [--max-disagreement R] [--window N]
    loraplex routes get|delete|rollback ALIAS     loraplex routes list
    loraplex routes promote ALIAS [name@version]
    loraplex health [SERVICE]

Common options: --target host:port (env LORAPLEX_TARGET, default localhost:50051),
--token (env LORAPLEX_TOKEN), --json, --timeout SECONDS, --tls, --tls-ca FILE.
Exit status: 0 on success, 1 when the server answered an error (its status code
and message go to stderr, or to stdout as {"error": ...} with --json), 2 for
usage errors.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from loraplex_client.client import Client
from loraplex_client.errors import LoraplexError
from loraplex_client.types import SAMPLING_FIELDS

DEFAULT_TARGET = "localhost:50051"


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("connection")
    g.add_argument("--target", default=os.environ.get("LORAPLEX_TARGET", DEFAULT_TARGET),
                   help="server host:port (env LORAPLEX_TARGET; default %(default)s)")
    g.add_argument("--token", default=os.environ.get("LORAPLEX_TOKEN") or None,
                   help="bearer token (env LORAPLEX_TOKEN)")
    g.add_argument("--json", action="store_true", help="machine-readable JSON output")
    g.add_argument("--timeout", type=float, default=None, help="deadline of the call, seconds")
    g.add_argument("--tls", action="store_true", help="TLS with the system's root certificates")
    g.add_argument("--tls-ca", metavar="FILE", default=None,
                   help="TLS with this PEM root certificate (self-signed servers)")
    return p


def _csv(cast):
    def parse(text: str):
        return [cast(x) for x in text.split(",") if x.strip()]
    return parse


def add_commands(subparsers) -> None:
    """Register generate, adapters and health on an argparse subparsers object."""
    common = _common()
    g = subparsers.add_parser("generate", parents=[common], help="generate text (streams)",
                              description="Generate a completion; streams it to the terminal.")
    g.add_argument("prompt", help='prompt text ("-" reads stdin)')
    g.add_argument("--adapter", default="", help='"name", "name@version"; "" = base model')
    g.add_argument("--routing-key", default="",
                   help="sticky key (user or session id) when --adapter names a route")
    g.add_argument("--priority", type=int, default=0,
                   help="lower is served first (default 0)")
    g.add_argument("--chat", action="store_true",
                   help="send the prompt as one user message through the chat template")
    g.add_argument("--system", default=None, help="system message (with --chat)")
    _chat_options(g)
    g.add_argument("--truncate-prompt-tokens", type=_whole, default=None, metavar="N",
                   help="keep only the input's last N tokens")
    _special_option(g)
    g.add_argument("--max-new-tokens", type=_whole, default=None)
    g.add_argument("--temperature", type=float, default=None, help="0 = greedy (default)")
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--top-k", type=_whole, default=None)
    g.add_argument("--seed", type=_whole, default=None)
    g.add_argument("--min-p", type=float, default=None)
    g.add_argument("--repetition-penalty", type=float, default=None)
    g.add_argument("--presence-penalty", type=float, default=None)
    g.add_argument("--frequency-penalty", type=float, default=None)
    g.add_argument("--min-tokens", type=_whole, default=None,
                   help="no EOS, stop token or stop string before this many tokens")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--include-stop", dest="include_stop_str_in_output", action="store_true",
                   default=None, help="end the text with the stop string that ended it")
    g.add_argument("--stop-token-ids", type=_csv(_whole), default=None, metavar="ID,ID")
    g.add_argument("--bad-word", dest="bad_words", action="append", default=None,
                   metavar="WORD", help="a word the output must not contain (repeatable)")
    g.add_argument("--keep-special-tokens", action="store_true", default=None,
                   help="write the special tokens the model writes into the text")
    g.add_argument("--logit-bias", type=_bias, action="append", default=None, metavar="ID=BIAS",
                   help="add BIAS (-100..100) to token ID's logit (repeatable)")
    g.add_argument("--allowed-token-ids", type=_csv(_whole), default=None, metavar="ID,ID",
                   help="produce only these token ids")
    g.add_argument("--regex", dest="guided_regex", default=None, metavar="PATTERN",
                   help="guided decoding: the output fully matches PATTERN (Python syntax)")
    g.add_argument("--choice", dest="guided_choice", action="append", default=None,
                   metavar="TEXT", help="guided decoding: the output is one of these "
                   "(repeatable)")
    g.add_argument("--json-schema", dest="guided_json", type=_text_or_file, default=None,
                   metavar="SCHEMA",
                   help="guided decoding: the output is JSON this JSON schema allows "
                        "(the schema's text, or @FILE)")
    g.add_argument("--ignore-eos", action="store_true", default=None)
    g.add_argument("--logprobs", action="store_true", default=None)
    g.add_argument("--top-logprobs", type=_whole, default=None)
    g.add_argument("--prompt-logprobs", type=_whole, default=None, metavar="N",
                   help="score the prompt: each prompt token's logprob and N alternatives "
                        "(printed with --json)")
    g.add_argument("-n", "--n", type=_whole, default=None, metavar="N",
                   help="N completions of the prompt (one unary call, each printed after "
                        "its [index])")
    g.add_argument("--no-stream", action="store_true", help="one unary call instead of a stream")
    g.set_defaults(func=_generate)

    a = subparsers.add_parser("adapters", help="list, load, unload, swap, merge adapters")
    asub = a.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = asub.add_parser("list", parents=[common], help="adapters and their versions")
    p.add_argument("name", nargs="?", default="", help="only this adapter")
    p.set_defaults(func=_list)
    p = asub.add_parser("load", parents=[common], help="load a PEFT folder under a name")
    p.add_argument("name")
    p.add_argument("path", nargs="?", default="", help="relative to the adapter root (default: NAME)")
    p.set_defaults(func=_load)
    p = asub.add_parser("unload", parents=[common], help="unload name or name@version")
    p.add_argument("name")
    p.add_argument("--drain", action="store_true", help="wait for requests using it")
    p.set_defaults(func=_unload)
    p = asub.add_parser("swap", parents=[common], help="make a new version current")
    p.add_argument("name")
    p.add_argument("path")
    p.set_defaults(func=_swap)
    p = asub.add_parser("merge", parents=[common], help="combine adapters into a new one")
    p.add_argument("name", help="name of the new adapter")
    p.add_argument("sources", nargs="+")
    p.add_argument("--weights", type=_csv(float), default=None, metavar="W,W",
                   help="one per source (default 1 each)")
    p.add_argument("--combination-type", default="linear")
    p.add_argument("--density", type=float, default=0.0)
    p.add_argument("--majority-sign-method", default="")
    p.add_argument("--svd-rank", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.set_defaults(func=_merge)

    r = subparsers.add_parser("routes", help="canary routes: aliases over adapter versions")
    rsub = r.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = rsub.add_parser("set", parents=[common], help="create or replace a route")
    p.add_argument("alias")
    p.add_argument("targets", nargs="+", type=_weighted, metavar="ADAPTER=WEIGHT",
                   help='"name@version=95" ("name" = its current version)')
    p.add_argument("--shadow", type=_weighted, default=None, metavar="ADAPTER=FRACTION",
                   help="mirror this fraction of requests to a candidate")
    p.add_argument("--max-error-rate", type=float, default=None)
    p.add_argument("--max-latency-ratio", type=float, default=None)
    p.add_argument("--max-disagreement", type=float, default=None)
    p.add_argument("--window", type=int, default=None, help="guard window (default 50)")
    p.set_defaults(func=_route_set)
    for action, helptext in (("get", "one route, with shadow comparisons and guard trips"),
                             ("delete", "forget a route"),
                             ("rollback", "back to the weights before the last set/promote")):
        p = rsub.add_parser(action, parents=[common], help=helptext)
        p.add_argument("alias")
        p.set_defaults(func=_route_action)
    p = rsub.add_parser("list", parents=[common], help="every route")
    p.set_defaults(func=_route_list)
    p = rsub.add_parser("promote", parents=[common], help="give a candidate all traffic")
    p.add_argument("alias")
    p.add_argument("adapter", nargs="?", default="", help="the candidate (default: the only one)")
    p.set_defaults(func=_route_action)

    t = subparsers.add_parser("tokenize", parents=[common], help="token ids of a prompt",
                              description="Print the token ids Generate sees for a prompt.")
    t.add_argument("prompt", help='prompt text ("-" reads stdin)')
    t.add_argument("--chat", action="store_true",
                   help="the prompt as one user message through the chat template")
    t.add_argument("--system", default=None, help="system message (with --chat)")
    _chat_options(t)
    _special_option(t)
    t.set_defaults(func=_tokenize)

    h = subparsers.add_parser("health", parents=[common], help="health status")
    h.add_argument("service", nargs="?", default="", help='e.g. loraplex.v1.Generation')
    h.set_defaults(func=_health)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex-client", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def _client(args) -> Client:
    tls = args.tls_ca or bool(args.tls)
    return Client(args.target, token=args.token, tls=tls, timeout=args.timeout)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=None, sort_keys=True, default=_text_of_bytes))


def _text_of_bytes(value):
    """A token's bytes (TokenLogprob.token) as JSON text: a partial character as U+FFFD."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _asdict(x) -> dict:
    return dataclasses.asdict(x)


def _special_option(p) -> None:
    p.add_argument("--no-special-tokens", dest="add_special_tokens", action="store_false",
                   default=None, help="add no BOS or other special tokens to the prompt")


def _chat_options(p) -> None:
    p.add_argument("--prefill", default=None, metavar="TEXT",
                   help="with --chat: the start of the answer, which the model continues "
                        "(continue_final_message)")
    p.add_argument("--template-kwargs", type=_json_object, default=None, metavar="JSON",
                   help='with --chat: chat template variables, e.g. \'{"enable_thinking": '
                        'false}\'')


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError('give a JSON object, e.g. {"enable_thinking": false}')
    return value


def _inputs(args) -> dict:
    """prompt=... or, with --chat, messages=[...] (and their chat options) from the
    command line."""
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if not args.chat:
        if args.prefill is not None or args.template_kwargs is not None:
            print("loraplex: error: --prefill and --template-kwargs need --chat",
                  file=sys.stderr)
            raise SystemExit(2)  # (a usage error, as argparse's)
        return dict(prompt=prompt)
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": prompt})
    chat = {}
    if args.prefill is not None:
        messages.append({"role": "assistant", "content": args.prefill})
        chat["continue_final_message"] = True
    if args.template_kwargs is not None:
        chat["chat_template_kwargs"] = args.template_kwargs
    return dict(messages=messages, **chat)


def _tokenize(args) -> int:
    with _client(args) as c:
        tokens = c.tokenize(**_inputs(args), add_special_tokens=args.add_special_tokens)
    if args.json:
        _print_json(_asdict(tokens))
    else:
        print(" ".join(map(str, tokens.token_ids)))
        if sys.stderr.isatty():
            print(f"[{len(tokens.token_ids)} tokens; context {tokens.max_model_len}]",
                  file=sys.stderr)
    return 0


def _generate(args) -> int:
    sampling = {k: getattr(args, k) for k in SAMPLING_FIELDS if getattr(args, k) is not None}
    sampling["routing_key"] = args.routing_key
    sampling["priority"] = args.priority
    sampling["truncate_prompt_tokens"] = args.truncate_prompt_tokens
    sampling["add_special_tokens"] = args.add_special_tokens
    inputs = _inputs(args)
    with _client(args) as client:
        if args.json or args.no_stream or (args.n or 1) > 1:
            result = client.generate(**inputs, adapter=args.adapter, **sampling)
            if args.json:
                _print_json(_asdict(result))
            elif len(result.completions) > 1:
                for c in result.completions:
                    print(f"[{c.index}] {c.text}")
            else:
                print(result.text)
            return 0
        start, last = time.monotonic(), None
        for chunk in client.stream(**inputs, adapter=args.adapter, **sampling):
            sys.stdout.write(chunk.text)
            sys.stdout.flush()
            last = chunk
        sys.stdout.write("\n")
        if last is not None and sys.stderr.isatty():
            took = time.monotonic() - start
            print(f"[{last.finish_reason}; {last.prompt_tokens} prompt + "
                  f"{last.completion_tokens} new tokens; adapter {last.adapter or 'base'}; "
                  f"{took:.2f} s]", file=sys.stderr)
        return 0


_HEADERS = ("NAME", "VERSION", "CUR", "TIER", "RANK", "ALPHA", "IN USE", "SERVED", "SIZE", "PATH")


def _human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _table(infos) -> str:
    rows = [_HEADERS]
    for i in infos:
        rows.append((i.name, i.version, "*" if i.current else "", i.tier, str(i.rank),
                     f"{i.alpha:g}", str(i.in_use), str(i.requests_served),
                     _human_size(i.size_bytes), i.path))
    widths = [max(len(r[c]) for r in rows) for c in range(len(_HEADERS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _show(args, infos) -> int:
    if args.json:
        _print_json([_asdict(i) for i in infos])
    elif infos:
        print(_table(infos))
    else:
        print("no adapters")
    return 0


def _list(args) -> int:
    with _client(args) as c:
        return _show(args, c.list_adapters(args.name))


def _load(args) -> int:
    with _client(args) as c:
        return _show(args, [c.load_adapter(args.name, args.path)])


def _unload(args) -> int:
    with _client(args) as c:
        return _show(args, c.unload_adapter(args.name, drain=args.drain))


def _swap(args) -> int:
    with _client(args) as c:
        return _show(args, [c.swap_adapter(args.name, args.path)])


def _merge(args) -> int:
    with _client(args) as c:
        return _show(args, [c.merge_adapters(
            args.name, args.sources, weights=args.weights,
            combination_type=args.combination_type, density=args.density,
            majority_sign_method=args.majority_sign_method, svd_rank=args.svd_rank,
            seed=args.seed)])


def _whole(text: str) -> int:
    """A count or token id: a whole number >= 0 (the request's unsigned fields)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def _text_or_file(text: str) -> str:
    """The text itself, or the contents of FILE for "@FILE"."""
    if not text.startswith("@"):
        return text
    try:
        with open(text[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text[1:]}: {exc.strerror}") from None


def _bias(text: str) -> tuple[int, float]:
    token, _, value = text.partition("=")
    try:
        return int(token), float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected ID=BIAS (e.g. 50256=-100), got {text!r}"
                                         ) from None


def _weighted(text: str) -> tuple[str, float]:
    ref, sep, value = text.rpartition("=")
    if not sep or not ref:
        raise argparse.ArgumentTypeError(f"expected ADAPTER=NUMBER, got {text!r}")
    try:
        return ref, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number in {text!r}") from None


def _show_routes(args, routes) -> int:
    if args.json:
        _print_json([dataclasses.asdict(r) for r in routes])
        return 0
    if not routes:
        print("no routes")
    for r in routes:
        weights = ", ".join(f"{ref}={w:g}" for ref, w in r.targets)
        print(f"{r.alias}: {weights} (primary {r.primary})")
        if r.shadow:
            print(f"  shadow: {r.shadow[0]} fraction {r.shadow[1]:g}")
        if r.guard:
            print("  guard: " + ", ".join(f"{k}={v}" for k, v in r.guard.items() if v is not None))
        for c in r.comparisons:
            print(f"  {c.candidate} vs {c.primary}: {c.compared} compared, exact match "
                  f"{c.exact_match_rate:.3f}, token agreement {c.token_agreement:.3f}, latency "
                  f"ratio {c.latency_ratio:.2f}, {c.candidate_errors} errors")
        for t in r.trips:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t.time))
            print(f"  guard tripped {when}: {t.adapter} {t.metric} {t.value:.3f} > {t.limit:g}")
    return 0


def _route_set(args) -> int:
    keys = ("max_error_rate", "max_latency_ratio", "max_disagreement", "window")
    guard = {k: getattr(args, k) for k in keys if getattr(args, k) is not None} or None
    with _client(args) as c:
        return _show_routes(args, [c.set_route(args.alias, args.targets, args.shadow, guard)])


def _route_action(args) -> int:
    with _client(args) as c:
        if args.action == "promote":
            route = c.promote_route(args.alias, args.adapter)
        else:
            route = getattr(c, f"{args.action}_route")(args.alias)
        return _show_routes(args, [route])


def _route_list(args) -> int:
    with _client(args) as c:
        return _show_routes(args, c.list_routes())


def _health(args) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    if args.json:
        _print_json({"service": args.service, "status": status})
    else:
        print(status)
    return 0 if status == "SERVING" else 1


def run(args) -> int:
    """Run a parsed command; errors from the server become exit status 1."""
    try:
        return args.func(args)
    except LoraplexError as err:
        if getattr(args, "json", False):
            _print_json({"error": {"code": err.code.name, "message": err.message}})
        else:
            print(f"error: {err.code.name}: {err.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
