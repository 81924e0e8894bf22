"""`loraplex` command line.

    loraplex serve --model DIR [options]      run the server (see `loraplex serve --help`)
    loraplex generate|adapters|health ...     client commands (loraplex_client.cli)

Every `serve` option can come from, in order of precedence:
  1. the flag                       --max-queue 8
  2. an environment variable        LORAPLEX_MAX_QUEUE=8
  3. a config file (TOML or JSON)   max_queue = 8   (--config FILE or LORAPLEX_CONFIG)
  4. the default shown by --help
They are read once, here, into a `loraplex.config.Config`; no other option comes
from the environment (OMP_NUM_THREADS, XDG_CACHE_HOME and CC are read when used).
Config-file keys are the flag names with '_' or '-'; `preload` is a
list of "name=path" strings or a table {name = "path"}; the environment form of a
repeatable flag is a comma-separated list (LORAPLEX_PRELOAD="sql=sql,chat=chat/v2").
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loraplex.config import (ATTENTION_BACKENDS, DTYPE_CHOICES, LORA_BACKENDS,
                             QUANTIZE_CHOICES, REASONING_PARSERS, TOOL_CALL_PARSERS, Config,
                             EngineConfig, ModelConfig, ServerConfig, parse_size, parse_switch)

ENV_PREFIX = "LORAPLEX_"


def _preload_item(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    name, path = name.strip(), path.strip()
    if not name or not sep or not path:
        raise ValueError(f"preload must be NAME=PATH, got {text!r}")
    return name, path


@dataclass(frozen=True)
class Option:
    """One `serve` option: flag --NAME, env LORAPLEX_NAME, file key NAME."""

    name: str  # flag name, e.g. "max-queue"
    section: str  # "model" | "engine" | "server": which Config part
    field: str  # field of that dataclass
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    repeatable: bool = False  # parse() applies per item; the field is a tuple

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.dest.upper()

    def default(self):
        cls = {"model": ModelConfig, "engine": EngineConfig, "server": ServerConfig}[self.section]
        f = {f.name: f for f in dataclasses.fields(cls)}[self.field]
        return None if f.default is dataclasses.MISSING else f.default


def _o(name, section, field, parse, help, **kw) -> Option:
    return Option(name, section, field, parse, help, **kw)


OPTIONS: tuple[Option, ...] = (
    _o("model", "model", "path", str, "base model folder (Hugging Face format)", metavar="DIR"),
    _o("quantize", "model", "quantize", str, "quantize the base model with bitsandbytes",
       choices=QUANTIZE_CHOICES),
    _o("dtype", "model", "dtype", str, "compute dtype (auto: bfloat16 on CUDA, float32 on CPU)",
       choices=DTYPE_CHOICES),
    _o("device", "model", "device", str, "cpu, cuda, cuda:1 ... (auto: cuda if available)"),
    _o("max-model-len", "model", "max_model_len", int,
       "longest prompt + completion in tokens (0: the model's max_position_embeddings)"),
    _o("max-batch-tokens", "engine", "max_batch_tokens", int, "tokens in one forward pass"),
    _o("max-num-seqs", "engine", "max_num_seqs", int, "sequences in one forward pass"),
    _o("prefill-chunk", "engine", "prefill_chunk", int,
       "longest slice of one prompt prefilled in one step"),
    _o("kv-cache-memory", "engine", "kv_cache_memory", parse_size,
       "memory of the paged KV cache, e.g. 512MiB, 2GiB", metavar="SIZE"),
    _o("kv-cache-dtype", "engine", "kv_cache_dtype", str,
       "dtype of the cached keys and values (auto: the model's; bfloat16 under an fp32 "
       "model holds twice the tokens in the same memory, at bf16 rounding of K and V)",
       choices=DTYPE_CHOICES),
    _o("block-size", "engine", "block_size", int, "tokens per KV-cache block"),
    _o("prefix-caching", "engine", "prefix_caching", parse_switch,
       "share the KV-cache blocks of prompts that start alike (same adapter version), "
       "computing only what follows", metavar="on|off"),
    _o("max-gpu-adapters", "engine", "max_gpu_adapters", int,
       "adapter slots next to the base model"),
    _o("max-cpu-adapters", "engine", "max_cpu_adapters", int,
       "adapters kept in host memory (LRU)"),
    _o("max-lora-rank", "engine", "max_lora_rank", int, "largest LoRA rank accepted"),
    _o("lora-dtype", "engine", "lora_dtype", str,
       "dtype of adapter weights in their slots (auto: the model's; bfloat16 on an fp32 CPU "
       "model halves the bytes each step reads, at bf16 rounding of the weights)",
       choices=DTYPE_CHOICES),
    _o("max-queue", "engine", "max_queue", int,
       "waiting requests before new ones get RESOURCE_EXHAUSTED"),
    _o("lora-backend", "engine", "lora_backend", str, "LoRA delta kernels",
       choices=LORA_BACKENDS),
    _o("attention-backend", "engine", "attention_backend", str,
       "decode attention (auto: loraplex's C kernel for fp32 and bf16 on CPU, else SDPA)",
       choices=ATTENTION_BACKENDS),
    _o("threads", "engine", "threads", int,
       "torch threads of the step loop on CPU (0: OMP_NUM_THREADS if set, else one per CPU "
       "the process may use, cgroup quota included); other threads use one"),
    _o("max-step-failures", "engine", "max_step_failures", int,
       "consecutive failed engine steps after which the server stops serving and exits "
       "(status 1) for its supervisor to restart it"),
    _o("step-timeout", "engine", "step_timeout", float,
       "seconds one engine step may run (a hung GPU) before the server stops serving and "
       "exits (status 1); 0: no limit"),
    _o("num-speculative-tokens", "engine", "num_speculative_tokens", int,
       "speculative decoding by prompt lookup: draft tokens a decode step may add, taken "
       "from what followed an earlier occurrence of its last tokens (0: off)"),
    _o("prompt-lookup-max", "engine", "prompt_lookup_max", int,
       "longest n-gram of a sequence's last tokens that prompt lookup matches"),
    _o("prompt-lookup-min", "engine", "prompt_lookup_min", int,
       "shortest n-gram that prompt lookup matches"),
    _o("host", "server", "host", str, "address to listen on"),
    _o("port", "server", "port", int, "gRPC port (0: any free port)"),
    _o("metrics-port", "server", "metrics_port", int,
       "Prometheus /metrics HTTP port (0: no metrics endpoint)"),
    _o("adapter-root", "server", "adapter_root", str,
       "folder that every adapter path is relative to (paths may not leave it)", metavar="DIR"),
    _o("preload", "server", "preload", _preload_item,
       "load an adapter at start (repeatable)", metavar="NAME=PATH", repeatable=True),
    _o("admin-token", "server", "admin_token", str,
       "bearer token required by the Adapters and Routes services (empty: open)", metavar="TOKEN"),
    _o("generate-token", "server", "generate_token", str,
       "bearer token required by the Generation service (empty: open)", metavar="TOKEN"),
    _o("tls-cert", "server", "tls_cert", str, "PEM certificate chain (with --tls-key: TLS)",
       metavar="FILE"),
    _o("tls-key", "server", "tls_key", str, "PEM private key", metavar="FILE"),
    _o("grace-period", "server", "grace_period", float,
       "seconds calls in flight get to finish after SIGTERM", metavar="SECONDS"),
    _o("http-port", "server", "http_port", int,
       "port of the OpenAI-compatible HTTP API: /v1/completions, /v1/chat/completions, "
       "/v1/models (0: off)"),
    _o("served-model-name", "server", "served_model_name", str,
       "the base model's name in the HTTP API's `model` field and /v1/models (empty: the "
       "--model value)", metavar="NAME"),
    _o("tool-call-parser", "server", "tool_call_parser", str,
       "how the HTTP API reads tool calls out of the model's text, for tool_choice auto "
       "(hermes: <tool_call>{...}</tool_call>, as Qwen2.5/3 and Hermes write them; "
       "llama3_json: {\"name\", \"parameters\"} objects, as Llama 3.1+; mistral: "
       "[TOOL_CALLS][{...}] or [TOOL_CALLS]f[ARGS]{...}; pythonic: [f(a=1)], as Llama "
       "3.2/4; qwen3_coder: <tool_call><function=f><parameter=a>..., as Qwen3-Coder and "
       "Qwen3.5; empty: auto refused)",
       choices=TOOL_CALL_PARSERS),
    _o("reasoning-parser", "server", "reasoning_parser", str,
       "how the HTTP chat API splits the model's thinking, <think>...</think>, off into "
       "reasoning_content (deepseek_r1: R1 and its distills; qwen3: Qwen3, QwQ; the same "
       "tags; empty: none, the thinking stays in the content)",
       choices=REASONING_PARSERS),
    _o("response-store-mb", "server", "response_store_mb", float,
       "memory the HTTP Responses API keeps its responses in, for previous_response_id and "
       "GET /v1/responses/ID (the least recently used dropped past it; 0: none kept)",
       metavar="MB"),
    _o("data-dir", "server", "data_dir", str,
       "folder keeping routes and loaded adapters across restarts (empty: not kept)",
       metavar="DIR"),
)
_BY_KEY = {o.dest: o for o in OPTIONS}
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A value from a flag, the environment or the config file is wrong."""


def _fmt_default(opt: Option) -> str:
    d = opt.default()
    if d is None:
        return "none"
    if opt.name == "kv-cache-memory":
        return f"{d // 2**20}MiB"
    if opt.repeatable:
        return ",".join("=".join(x) for x in d) or "none"
    if isinstance(d, bool):
        return "on" if d else "off"
    return repr(d) if d == "" else str(d)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of `serve`. Defaults are None here (so we can tell a flag was given);
    the real default, shown in --help, applies in build_config."""
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"TOML or JSON file with any of these options (env {ENV_PREFIX}CONFIG)")
    for opt in OPTIONS:
        parser.add_argument(
            f"--{opt.name}", dest=opt.dest, default=None, choices=opt.choices,
            metavar=opt.metavar if opt.metavar or opt.choices is None else None,
            action="append" if opt.repeatable else "store",
            help=f"{opt.help} ({'required' if opt.name == 'model' else 'default: ' + _fmt_default(opt)}"
                 f"; env {opt.env})")
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS,
                        help=f"(default: info; env {ENV_PREFIX}LOG_LEVEL)")


def _parse_value(opt: Option, raw: Any, source: str) -> Any:
    """One value of `opt` from `source` (flag / env var / file) into its field type."""
    try:
        if opt.repeatable:
            if isinstance(raw, str):  # env: comma-separated
                raw = [x for x in raw.split(",") if x.strip()]
            elif isinstance(raw, Mapping):  # file: {name = "path"}
                raw = [f"{k}={v}" for k, v in raw.items()]
            elif not isinstance(raw, (list, tuple)):
                raise ValueError(f"expected a list of NAME=PATH, got {raw!r}")
            return tuple(opt.parse(str(x)) for x in raw)
        if isinstance(raw, bool) and opt.parse is parse_switch:  # a TOML or JSON boolean
            return raw
        if isinstance(raw, bool) or isinstance(raw, (list, dict)):
            raise ValueError(f"expected a single value, got {raw!r}")
        value = opt.parse(raw if isinstance(raw, str) else str(raw))
        if opt.choices and value not in opt.choices:
            raise ValueError(f"must be one of {', '.join(opt.choices)}, got {value!r}")
        return value
    except ValueError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def read_config_file(path: str) -> dict[str, Any]:
    """Flat mapping of option keys (with '_') from a TOML or JSON file."""
    p = Path(path)
    try:
        text = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text.decode())
    except (ValueError, UnicodeDecodeError) as exc:
        kind = "JSON" if p.suffix.lower() == ".json" else "TOML"
        raise ConfigError(f"config file {path} is not valid {kind}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a table / object of options")
    out = {}
    for key, value in data.items():
        k = key.replace("-", "_")
        if k not in _BY_KEY and k != "log_level":
            raise ConfigError(f"config file {path}: unknown option {key!r}")
        out[k] = value
    return out


def build_config(flags: argparse.Namespace | Mapping[str, Any],
                 env: Mapping[str, str] | None = None) -> tuple[Config, str]:
    """Config from flags > env > config file > defaults. Returns (config, log level)."""
    env = os.environ if env is None else env
    flags = vars(flags) if isinstance(flags, argparse.Namespace) else dict(flags)
    file_path = flags.get("config") or env.get(ENV_PREFIX + "CONFIG")
    file_values = read_config_file(file_path) if file_path else {}

    sections: dict[str, dict[str, Any]] = {"model": {}, "engine": {}, "server": {}}
    for opt in OPTIONS:
        if flags.get(opt.dest) is not None:
            value = _parse_value(opt, flags[opt.dest], f"--{opt.name}")
        elif env.get(opt.env):  # an empty variable counts as unset
            value = _parse_value(opt, env[opt.env], opt.env)
        elif opt.dest in file_values:
            value = _parse_value(opt, file_values[opt.dest], f"{file_path}: {opt.dest}")
        else:
            continue
        sections[opt.section][opt.field] = value
    if not sections["model"].get("path"):
        raise ConfigError(f"give the base model: --model DIR, {ENV_PREFIX}MODEL or "
                          "model = \"DIR\" in the config file")
    log_level = (flags.get("log_level") or env.get(ENV_PREFIX + "LOG_LEVEL")
                 or file_values.get("log_level") or "info").lower()
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log level must be one of {LOG_LEVELS}, got {log_level!r}")
    try:
        config = Config(model=ModelConfig(**sections["model"]),
                        engine=EngineConfig(**sections["engine"]),
                        server=ServerConfig(**sections["server"]))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return config, log_level


def build_parser() -> argparse.ArgumentParser:
    from loraplex_client.cli import add_commands

    parser = argparse.ArgumentParser(
        prog="loraplex", description="Multi-adapter LLM inference server.",
        epilog="Run `loraplex COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve", help="run the gRPC server",
        description="Run the gRPC server. Every option also comes from the environment "
                    f"({ENV_PREFIX}<OPTION>) or a config file; flag > env > file > default.")
    add_serve_arguments(serve)
    serve.set_defaults(func=None)
    add_export_command(sub)
    add_gateway_command(sub)
    add_commands(sub)
    return parser


EXPORT_NOT_QUANTIZED = (
    "The export merges the adapter into the UNQUANTIZED checkpoint read from --model; "
    "the result is NOT quantized, even when the server runs this base as NF4 or int8. "
    "Quantizing the exported model again is not the same as serving the quantized base "
    "plus the adapter (the adapter's delta gets rounded into the quantized weights): "
    "tests/test_merge_served.py measures the difference in logprobs.")


def add_export_command(sub) -> None:
    p = sub.add_parser(
        "export", help="write one adapter merged into the base model as a standalone HF model",
        description="Write MODEL with ADAPTER merged into its weights (W += scaling * B @ A, "
                    "as PEFT's merge_and_unload) as a standalone Hugging Face model folder, "
                    "loadable by AutoModelForCausalLM.from_pretrained(OUT). Runs offline, "
                    "no server needed. " + EXPORT_NOT_QUANTIZED)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="the unquantized base checkpoint (safetensors) the adapter was trained on")
    p.add_argument("--adapter-root", required=True, metavar="DIR", help="the server's adapter root")
    p.add_argument("--adapter", required=True, metavar="NAME",
                   help="adapter folder relative to the root (e.g. a merged adapter's name)")
    p.add_argument("--out", required=True, metavar="DIR", help="new folder (must not exist or be empty)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="cast the weights (default: keep the checkpoint's dtype)")
    p.set_defaults(func=None)


def _export(args: argparse.Namespace) -> int:
    from loraplex.errors import LoraplexError
    from loraplex.lora.merge import Checkpoint, export_merged_model
    from loraplex.lora.store import AdapterStore

    try:
        checkpoint = Checkpoint.read(args.model)
        store = AdapterStore(args.adapter_root, max_rank=2**31 - 1)  # exporting, not serving
        adapter, version = store.read_lora_tensors(args.adapter, args.adapter,
                                                   checkpoint.linear_shapes())
        export_merged_model(args.model, adapter, args.out, dtype=args.dtype,
                            checkpoint=checkpoint)
    except (LoraplexError, OSError, ValueError) as exc:
        print(f"loraplex export: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {args.out}: {args.model} with adapter {args.adapter}@{version} merged in "
          f"({len(adapter.modules)} modules, dtype {args.dtype or 'of the checkpoint'})")
    print("note: " + EXPORT_NOT_QUANTIZED)
    return 0


def add_gateway_command(sub) -> None:
    p = sub.add_parser(
        "http-gateway", help="serve the OpenAI-compatible HTTP API in front of gRPC servers",
        description="Serve the OpenAI-compatible HTTP API (as `serve --http-port` does) in a "
                    "process of its own, over the gRPC services at --target: one server, or "
                    "the adapter-aware proxy in front of several, so that HTTP requests get "
                    "the proxy's adapter affinity too. Needs no model, GPU or torch.")
    p.add_argument("--target", default="127.0.0.1:50051", metavar="HOST:PORT",
                   help="the gRPC server or proxy (default: %(default)s)")
    p.add_argument("--tls-ca", default=None, metavar="FILE",
                   help="PEM root certificate: reach --target over TLS")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    p.add_argument("--served-model-name", required=True, metavar="NAME",
                   help="the base model's `model` name (the servers' --served-model-name)")
    p.add_argument("--admin-token", default="", metavar="TOKEN",
                   help="the servers' admin token, with which /v1/models lists adapters and "
                        "routes for a caller whose token passes (default: the caller's own)")
    p.add_argument("--tls-cert", default=None, metavar="FILE", help="PEM certificate: HTTPS")
    p.add_argument("--tls-key", default=None, metavar="FILE", help="its PEM private key")
    p.add_argument("--grace-period", type=float, default=30.0, metavar="SECONDS",
                   help="seconds requests in flight get after SIGTERM (default: %(default)s)")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="Prometheus /metrics (loraplex_http_requests_total) on --host "
                        "(default: 0, off)")
    p.add_argument("--tool-call-parser", default="", choices=("", *TOOL_CALL_PARSERS),
                   help="how tool calls are read out of the model's text, for tool_choice "
                        "auto (the servers' --tool-call-parser; default or empty: none, auto "
                        "refused)")
    p.add_argument("--reasoning-parser", default="", choices=("", *REASONING_PARSERS),
                   help="how the model's thinking is split off into reasoning_content (the "
                        "servers' --reasoning-parser; default or empty: none)")
    p.add_argument("--response-store-mb", type=float, default=256.0, metavar="MB",
                   help="memory the Responses API keeps its responses in, for "
                        "previous_response_id and GET /v1/responses/ID (the least recently "
                        "used dropped past it; 0: none kept; default: %(default)s)")
    p.add_argument("--log-level", default="info", choices=LOG_LEVELS)
    p.set_defaults(func=None)


def _gateway(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("give both --tls-cert and --tls-key, or neither")
    for flag, port in (("--port", args.port), ("--metrics-port", args.metrics_port)):
        if not 0 <= port < 65536:
            parser.error(f"{flag} must be in 0..65535, got {port}")
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import asyncio

    from prometheus_client import CollectorRegistry, start_http_server

    from loraplex.metrics import http_requests_counter, response_store_gauges
    from loraplex.openai_api import HttpServer, run_gateway

    registry = CollectorRegistry()
    requests = http_requests_counter(registry)
    if args.metrics_port:
        start_http_server(args.metrics_port, addr=args.host, registry=registry)
    server = HttpServer(args.target, args.host, args.port, args.served_model_name,
                        list_token=args.admin_token,
                        tls=(args.tls_cert, args.tls_key) if args.tls_cert else None,
                        grpc_tls_ca=args.tls_ca, grace=args.grace_period, requests=requests,
                        tool_call_parser=args.tool_call_parser,
                        reasoning_parser=args.reasoning_parser,
                        response_store_mb=args.response_store_mb)
    if server.store is not None:
        response_store_gauges(registry, server.store)
    asyncio.run(run_gateway(server))
    return 0


def _serve(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    try:
        config, log_level = build_config(args)
    except ConfigError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from loraplex.server import serve

    return serve(config)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "serve":
        return _serve(parser, args)
    if args.command == "export":
        return _export(args)
    if args.command == "http-gateway":
        return _gateway(parser, args)
    from loraplex_client.cli import run

    return run(args)


if __name__ == "__main__":
    sys.exit(main())
