"""The `loraplex` command line: configuration precedence (flag > env > file > default),
and the client commands run as subprocesses against a real server."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import pytest

from conftest_api import assets, server  # noqa: F401
from loraplex.cli import ConfigError, build_config, build_parser, main
from loraplex.config import EngineConfig, ServerConfig
from loraplex_client import Client
from loraplex_client.errors import LoraplexError


def parse(argv: list[str], env: dict[str, str] | None = None):
    args = build_parser().parse_args(["serve", *argv])
    return build_config(args, env or {})


# ---------------------------------------------------------------- configuration

def test_precedence_flag_over_env_over_file_over_default(tmp_path):
    cfg_file = tmp_path / "loraplex.toml"
    cfg_file.write_text('model = "/models/from-file"\nmax_queue = 11\nmax_num_seqs = 12\n'
                        'port = 7000\nkv_cache_memory = "1GiB"\nprefix_caching = false\n'
                        'preload = ["a=a", "b=sub/b"]\n')
    env = {"LORAPLEX_MAX_QUEUE": "22", "LORAPLEX_MAX_NUM_SEQS": "24", "LORAPLEX_PORT": "",
           "LORAPLEX_ADMIN_TOKEN": "from-env"}
    config, level = parse(["--config", str(cfg_file), "--max-queue", "33",
                           "--quantize", "nf4", "--kv-cache-dtype", "bfloat16"], env)
    assert config.engine.max_queue == 33  # flag beats env and file
    assert config.engine.max_num_seqs == 24  # env beats file
    assert config.server.port == 7000  # file (an empty env var counts as unset)
    assert config.engine.kv_cache_memory == 2**30
    assert config.engine.kv_cache_dtype == "bfloat16" and config.engine.lora_dtype == "auto"
    assert config.engine.prefix_caching is False  # a TOML boolean
    assert parse(["--model", "m"])[0].engine.prefix_caching is True
    assert parse(["--model", "m"], {"LORAPLEX_PREFIX_CACHING": "off"})[0].engine.prefix_caching is False
    assert parse(["--model", "m"])[0].server.tool_call_parser == ""  # (auto refused)
    assert parse(["--model", "m"], {"LORAPLEX_TOOL_CALL_PARSER": "hermes"})[0] \
        .server.tool_call_parser == "hermes"
    assert config.model.path == "/models/from-file" and config.model.quantize == "nf4"
    assert config.server.preload == (("a", "a"), ("b", "sub/b"))
    assert config.server.admin_token == "from-env"
    assert config.engine.max_batch_tokens == EngineConfig().max_batch_tokens  # default
    assert config.server.grace_period == ServerConfig().grace_period
    assert level == "info"


def test_json_config_file_from_env_and_preload_forms(tmp_path):
    cfg_file = tmp_path / "c.json"
    cfg_file.write_text(json.dumps({"model": "/m", "preload": {"sql": "sql/v2"},
                                    "max-gpu-adapters": 4, "log_level": "debug"}))
    config, level = parse([], {"LORAPLEX_CONFIG": str(cfg_file)})
    assert config.server.preload == (("sql", "sql/v2"),)
    assert config.engine.max_gpu_adapters == 4 and level == "debug"
    config, _ = parse(["--preload", "x=y", "--preload", "z=w"],
                      {"LORAPLEX_CONFIG": str(cfg_file), "LORAPLEX_PRELOAD": "e=f"})
    assert config.server.preload == (("x", "y"), ("z", "w"))  # the flags replace the rest
    config, _ = parse([], {"LORAPLEX_MODEL": "/m", "LORAPLEX_PRELOAD": "e=f, g=h/i"})
    assert config.server.preload == (("e", "f"), ("g", "h/i"))


@pytest.mark.parametrize("argv, env, file_text, words", [
    ([], {}, None, "--model DIR"),
    (["--model", "m"], {"LORAPLEX_MAX_QUEUE": "many"}, None, "LORAPLEX_MAX_QUEUE"),
    (["--model", "m"], {}, "max_queeue = 3", "unknown option 'max_queeue'"),
    (["--model", "m"], {}, "max_queue = [1]", "max_queue"),
    (["--model", "m"], {}, "port = \n", "not valid TOML"),
    (["--model", "m", "--kv-cache-memory", "lots"], {}, None, "--kv-cache-memory"),
    (["--model", "m", "--preload", "nameonly"], {}, None, "NAME=PATH"),
    (["--model", "m", "--tls-cert", "c.pem"], {}, None, "tls_key"),
    (["--model", "m"], {"LORAPLEX_QUANTIZE": "nf8"}, None, "LORAPLEX_QUANTIZE"),
    (["--model", "m", "--max-num-seqs", "4096"], {}, None, "max_num_seqs"),
    (["--model", "m"], {}, "lora_dtype = 'int4'", "lora_dtype: must be one of"),
    (["--model", "m"], {"LORAPLEX_KV_CACHE_DTYPE": "fp8"}, None, "LORAPLEX_KV_CACHE_DTYPE"),
    (["--model", "m", "--prefix-caching", "maybe"], {}, None, "expected on or off"),
    (["--model", "m", "--step-timeout", "0.5"], {}, None, "step_timeout must be 0"),
    (["--model", "m", "--step-timeout", "nan"], {}, None, "step_timeout must be 0"),
    (["--model", "m"], {}, "tool_call_parser = 'xml'", "tool_call_parser: must be one of"),
])
def test_bad_configuration_names_its_source(tmp_path, argv, env, file_text, words):
    if file_text is not None:
        (tmp_path / "c.toml").write_text(file_text)
        argv = argv + ["--config", str(tmp_path / "c.toml")]
    with pytest.raises(ConfigError, match=re.escape(words)):
        parse(argv, env)


def test_serve_help_shows_every_default(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for needle in ("--max-queue MAX_QUEUE", "(default: 1024; env LORAPLEX_MAX_QUEUE)",
                   "(default: 256MiB; env LORAPLEX_KV_CACHE_MEMORY)",
                   "(default: none; env LORAPLEX_QUANTIZE)", "{nf4,fp4,int8,none}",
                   "(default: 30.0; env LORAPLEX_GRACE_PERIOD)", "--preload NAME=PATH",
                   "(required; env LORAPLEX_MODEL)", "(default: 50051; env LORAPLEX_PORT)",
                   "--config FILE"):
        assert needle in text, needle


# ---------------------------------------------------------------- client commands

def loraplex(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "loraplex.cli", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "LORAPLEX_TOKEN": ""})
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_cli_generate_json_and_stream_match_the_client(server, tmp_path):
    with Client(server.target) as c:
        expected = c.generate("Hello", adapter="alpha", max_new_tokens=6, ignore_eos=True)
    out = loraplex("generate", "--target", server.target, "--json", "--adapter", "alpha",
                   "--max-new-tokens", "6", "--ignore-eos", "Hello")
    got = json.loads(out.stdout)
    assert tuple(got["token_ids"]) == expected.token_ids
    assert got["adapter"] == expected.adapter and got["finish_reason"] == "length"
    assert got["completion_tokens"] == 6 and got["prompt_tokens"] == 5
    streamed = loraplex("generate", "--target", server.target, "--adapter", "alpha",
                        "--max-new-tokens", "6", "--ignore-eos", "Hello")
    assert streamed.stdout == expected.text + "\n"
    # the newer sampling flags reach the server (a bad value comes back INVALID_ARGUMENT)
    with Client(server.target) as c:
        expected = c.generate("Hello", max_new_tokens=6, ignore_eos=True, frequency_penalty=1.5,
                              presence_penalty=0.5, min_tokens=6, temperature=0.7, min_p=0.1,
                              seed=3)
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "6",
                   "--ignore-eos", "--frequency-penalty", "1.5", "--presence-penalty", "0.5",
                   "--min-tokens", "6", "--temperature", "0.7", "--min-p", "0.1", "--seed", "3",
                   "Hello")
    assert tuple(json.loads(out.stdout)["token_ids"]) == expected.token_ids
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "2",
                   "--prompt-logprobs", "1", "Hello")
    scores = json.loads(out.stdout)["prompt_logprobs"]
    assert len(scores) == 4 and all(len(s["top"]) == 1 for s in scores)
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "3",
                   "--ignore-eos", "--logit-bias", "50=100", "--logit-bias", "51=-5", "Hello")
    assert json.loads(out.stdout)["token_ids"] == [50, 50, 50]
    with Client(server.target) as c:
        word = c.detokenize([50])  # (the byte tokenizer: one token, one character)
        assert word.strip() == word and list(c.tokenize(word).token_ids) == [50]
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "3",
                   "--ignore-eos", "--logit-bias", "50=100", "--bad-word", word, "--bad-word",
                   "yz", "Hello")
    assert 50 not in json.loads(out.stdout)["token_ids"]
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "3",
                   "--ignore-eos", "--allowed-token-ids", "60,61", "Hello")
    assert set(json.loads(out.stdout)["token_ids"]) <= {60, 61}
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "9",
                   "--choice", "yes", "--choice", "no way", "Hello")
    assert json.loads(out.stdout)["text"] in ("yes", "no way")
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "9",
                   "--regex", "[0-9]{4}", "Hello")
    assert re.fullmatch("[0-9]{4}", json.loads(out.stdout)["text"])
    schema = tmp_path / "schema.json"
    schema.write_text('{"type": "array", "items": {"type": "boolean"}, "minItems": 2, '
                      '"maxItems": 3}')
    out = loraplex("generate", "--target", server.target, "--json", "--max-new-tokens", "40",
                   "--json-schema", f"@{schema}", "Hello")
    doc = json.loads(json.loads(out.stdout)["text"])
    assert len(doc) in (2, 3) and all(isinstance(x, bool) for x in doc)
    with Client(server.target) as c:
        expected = c.generate("Hello", max_new_tokens=5, ignore_eos=True, temperature=1.0,
                              seed=9, n=2)
    out = loraplex("generate", "--target", server.target, "--max-new-tokens", "5",
                   "--ignore-eos", "--temperature", "1", "--seed", "9", "-n", "2", "Hello")
    assert out.stdout == "".join(f"[{c.index}] {c.text}\n" for c in expected.completions)
    assert len(expected.completions) == 2
    proc = loraplex("generate", "--target", server.target, "--json-schema", "@/nonexistent",
                    "Hello", check=False)
    assert proc.returncode != 0 and "cannot read /nonexistent" in proc.stderr
    proc = loraplex("generate", "--target", server.target, "--logit-bias", "x=1", "Hello",
                    check=False)
    assert proc.returncode != 0 and "ID=BIAS" in proc.stderr
    proc = loraplex("generate", "--target", server.target, "--min-p", "2", "Hello", check=False)
    assert proc.returncode != 0 and "min_p" in proc.stderr


def test_cli_adapters_list_json_and_table(server):
    out = loraplex("adapters", "list", "--target", server.target, "--json")
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["alpha"]["current"] and rows["alpha"]["rank"] == 8
    assert rows["beta"]["target_modules"] == ["down_proj", "gate_proj", "up_proj"]
    table = loraplex("adapters", "list", "beta", "--target", server.target).stdout.splitlines()
    assert table[0].split()[:4] == ["NAME", "VERSION", "CUR", "TIER"]
    assert table[1].split()[0] == "beta" and len(table) == 2


def test_cli_reports_server_errors_with_exit_status_1(server):
    proc = loraplex("generate", "--target", server.target, "--json", "--adapter", "nope", "hi",
                    check=False)
    assert proc.returncode == 1
    assert json.loads(proc.stdout)["error"]["code"] == "NOT_FOUND"
    proc = loraplex("adapters", "load", "evil", "../outside", "--target", server.target,
                    check=False)
    assert proc.returncode == 1 and proc.stderr.startswith("error: PERMISSION_DENIED:")


def _port_once_serving(proc: subprocess.Popen) -> int:
    """The gRPC port a `loraplex serve` process logs, read from its stderr until it serves."""
    port = None
    for line in proc.stderr:  # the log says where it listens, then when it serves
        if m := re.search(r"gRPC listening on 127\.0\.0\.1:(\d+)", line):
            port = int(m.group(1))
        if "serving" in line:
            break
    assert port, "no listening line in the log"
    return port


def test_serve_subprocess_serves_and_stops_on_sigterm(assets, tmp_path):
    """`loraplex serve` for real: config from env + file + flags, SERVING, SIGTERM -> exit 0."""
    (tmp_path / "c.toml").write_text(f'adapter_root = "{assets.adapter_root}"\n'
                                     'preload = ["beta=beta"]\nmax_queue = 5\n')
    env = {**os.environ, "LORAPLEX_MODEL": str(assets.model), "LORAPLEX_DEVICE": "cpu",
           "LORAPLEX_CONFIG": str(tmp_path / "c.toml")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "loraplex.cli", "serve", "--port", "0", "--metrics-port", "0",
         "--kv-cache-memory", "32MiB", "--grace-period", "5"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = _port_once_serving(proc)
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            assert c.health() == "SERVING"
            assert c.generate("hi", adapter="beta", max_new_tokens=3).completion_tokens == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_a_model_it_cannot_serve_exits_2_saying_why(tmp_path):
    """A model the engine refuses (Falcon-RW: ALiBi position biases) ends
    `loraplex serve` with status 2 and the engine's reason, not a traceback."""
    from models import build_base

    base = build_base("falcon_alibi", tmp_path / "falcon")
    (tmp_path / "adapters").mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "serve", "--model", str(base), "--device", "cpu",
         "--adapter-root", str(tmp_path / "adapters"), "--port", "0", "--metrics-port", "0"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"cannot serve {base}: falcon: ALiBi position biases are not" in proc.stderr
    assert "Traceback" not in proc.stderr


# `python -c` of this: `loraplex serve` whose steps raise for requests of 7 new tokens
# (as a bug in the model code would), everything else real
_SERVE_WITH_BROKEN_STEPS = """
import sys
import loraplex.model.runner as runner
real = runner.ModelRunner.run
def run(self, batch):
    if any(s.seq.request.sampling.max_new_tokens == 7 for s in batch):
        raise RuntimeError("injected")
    return real(self, batch)
runner.ModelRunner.run = run
from loraplex.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_serve_subprocess_exits_1_when_its_engine_fails(assets):
    """A supervisor (Kubernetes, Compose, systemd) restarts what exits non-zero: after
    --max-step-failures failed steps in a row, `loraplex serve` answers the request, stops
    serving and exits 1 (not 0, as on SIGTERM)."""
    env = {**os.environ, "LORAPLEX_MODEL": str(assets.model), "LORAPLEX_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-c", _SERVE_WITH_BROKEN_STEPS, "serve", "--port", "0",
         "--metrics-port", "0", "--adapter-root", str(assets.adapter_root),
         "--kv-cache-memory", "32MiB", "--max-step-failures", "1", "--grace-period", "5"],
        stderr=subprocess.PIPE, text=True, env=env)
    try:
        port = _port_once_serving(proc)
        with Client(f"127.0.0.1:{port}", timeout=30) as c:
            assert c.generate("hi", max_new_tokens=3).completion_tokens == 3  # steps work
            with pytest.raises(LoraplexError) as failed:
                c.generate("hi", max_new_tokens=7)
        assert failed.value.code.name == "INTERNAL"  # its step raised (see test_api)
        assert proc.wait(60) == 1
        assert "injected" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()


def test_generate_flags_reach_the_request(monkeypatch):
    """--priority and a negative --logit-bias travel from the command line into the
    client call and the GenerateRequest, and the priority into the engine's request."""
    from loraplex.api.convert import generation_request_from_pb, sampling_from_pb
    from loraplex_client import cli as client_cli
    from loraplex_client.types import Result, build_generate_request

    seen = {}

    class Recorder:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def generate(self, *args, **kwargs):
            seen.update(kwargs)
            return Result("", (), "length", 1, 0, "")

    monkeypatch.setattr(client_cli, "Client", Recorder)
    assert client_cli.main(["generate", "--target", "x:1", "--no-stream", "--priority", "-3",
                            "--logit-bias", "5=-2.5", "--stop", "##", "--include-stop",
                            "--truncate-prompt-tokens", "7", "--keep-special-tokens",
                            "hi"]) == 0
    assert seen["truncate_prompt_tokens"] == 7
    assert seen["priority"] == -3 and seen["logit_bias"] == [(5, -2.5)]
    assert seen["include_stop_str_in_output"] is True and seen["stop"] == ["##"]
    keys = ("stop", "include_stop_str_in_output", "keep_special_tokens")
    sampling = sampling_from_pb(build_generate_request("hi", **{k: seen[k] for k in keys}))
    assert sampling.include_stop_str_in_output and sampling.keep_special_tokens
    req = build_generate_request(input_ids=[5, 6], priority=seen["priority"],
                                 logit_bias=seen["logit_bias"])
    assert generation_request_from_pb(req, None, None, 64).priority == -3
    assert sampling_from_pb(req).logit_bias == ((5, -2.5),)


def test_cli_tokenize_prints_the_ids(server):
    with Client(server.target) as c:
        ids = c.tokenize("Hello").token_ids
    out = loraplex("tokenize", "--target", server.target, "Hello")
    assert out.stdout == " ".join(map(str, ids)) + "\n"


def test_cli_chat_prefill_and_template_kwargs(server, capsys):
    """--prefill continues the answer's start, --template-kwargs sets template variables;
    both need --chat."""
    from loraplex_client import cli as client_cli

    user = [{"role": "user", "content": "Hello"}]
    with Client(server.target) as c:
        prefill = c.tokenize(messages=[*user, {"role": "assistant", "content": "Sure"}],
                             continue_final_message=True).token_ids
        quiet = c.tokenize(messages=user, chat_template_kwargs={"enable_thinking": False})
    argv = ["tokenize", "--target", server.target, "--chat", "Hello"]
    assert client_cli.main([*argv, "--prefill", "Sure"]) == 0
    assert capsys.readouterr().out == " ".join(map(str, prefill)) + "\n"
    assert client_cli.main([*argv, "--template-kwargs", '{"enable_thinking": false}']) == 0
    assert capsys.readouterr().out == " ".join(map(str, quiet.token_ids)) + "\n"
    for bad, words in ((["--template-kwargs", "[1]"], "give a JSON object"),
                       (["--template-kwargs", "{x"], "not JSON")):
        with pytest.raises(SystemExit) as exit_:
            client_cli.main([*argv, *bad])
        assert exit_.value.code == 2 and words in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        client_cli.main(["tokenize", "--target", server.target, "--prefill", "x", "Hello"])
    assert exit_.value.code == 2 and "need --chat" in capsys.readouterr().err


def test_values_no_request_field_can_hold_are_refused_naming_the_field(capsys):
    """Negative counts and token ids stop in the client with the field's name (protobuf's
    own ValueError says only "Value out of range: -1"), and the CLI stops them at parsing."""
    from loraplex_client import cli as client_cli
    from loraplex_client.types import build_generate_request

    for kw, words in [({"max_new_tokens": -1}, "max_new_tokens=-1 cannot be sent: "
                                               "max_new_tokens takes whole numbers from 0 to"),
                      ({"stop_token_ids": [3, -1]}, "stop_token_ids=[3, -1] cannot be sent"),
                      ({"truncate_prompt_tokens": -2}, "truncate_prompt_tokens takes whole"),
                      ({"temperature": "hot"}, "temperature='hot' cannot be sent")]:
        with pytest.raises(ValueError, match=re.escape(words)):
            build_generate_request("hi", **kw)
    for argv in (["--max-new-tokens", "-1"], ["--stop-token-ids", "3,-1"], ["-n", "x"]):
        with pytest.raises(SystemExit) as exit_:
            client_cli.main(["generate", "--target", "x:1", *argv, "hi"])
        assert exit_.value.code == 2
        assert "expected a whole number >= 0" in capsys.readouterr().err
