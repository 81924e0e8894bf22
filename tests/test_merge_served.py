"""MergeAdapters and export end to end: a real server over gRPC, the CLI as subprocesses.

The tensor-level equality with PEFT's add_weighted_adapter for all 11 types is in
test_merge.py; here a few types go through the whole path (gRPC -> AdapterManager.merge
-> merge_service -> PEFT folder under the root -> served at once) and the *served*
greedy tokens are compared with PEFT's greedy tokens from PEFT's own merge.
"""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
import threading
from pathlib import Path

import grpc
import pytest
import torch

from conftest_api import Assets, RunningServer, make_config
from loraplex.errors import Cancelled
from loraplex.lora import merge_service
from loraplex_client import Client
from loraplex_client.errors import LoraplexError
from models import ADAPTER_SPECS, build_adapters, build_base
from peft_reference import peft_greedy, quantization_config

SPECS = {s.name: s for s in ADAPTER_SPECS}
# name under the root -> spec of tests/models.py. a and b share rank 8; c has rank 4.
SOURCES = {"a": "r8_attn", "b": "r8_qv", "c": "r4_mlp"}
PROMPTS = [[12, 40, 7, 99, 3], [65, 66, 67, 68, 69, 70, 71, 72, 5]]
NEW = 10  # greedy tokens per prompt
SEED = 1234
# Weights and densities exactly representable in float32 (the proto's type), so the
# PEFT side merges with the very numbers the server receives.
CASES = {
    "linear": (["a", "b"], [0.75, -0.5], {}),
    "cat": (["a", "b", "c"], [0.75, -0.5, 1.25], {}),
    "svd": (["a", "b", "c"], [0.75, -0.5, 1.25], {"svd_rank": 6}),
    "ties": (["a", "b"], [0.75, 0.5], {"density": 0.5}),
    "dare_linear": (["a", "b"], [0.75, -0.5], {"density": 0.5, "seed": SEED}),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import dataclasses

    d = tmp_path_factory.mktemp("merge_served")
    model = build_base("llama", d / "model", seed=3)
    specs = [dataclasses.replace(SPECS[spec], name=name) for name, spec in SOURCES.items()]
    build_adapters(model, d / "adapters", specs)
    (d / "outside").mkdir()
    os.symlink(d / "outside", d / "adapters" / "escape")
    (d / "adapters" / "taken").mkdir()  # a folder that is no adapter (yet)
    (d / "adapters" / "taken" / "notes.txt").write_text("keep")
    return Assets(model, model, d / "adapters")


@pytest.fixture(scope="module")
def server(env):
    cfg = make_config(env, preload=tuple((n, n) for n in SOURCES), max_lora_rank=32)
    s = RunningServer(cfg).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    with Client(server.target, timeout=60) as c:
        yield c


def served(client, adapter, prompt=PROMPTS[0], new=NEW):
    r = client.generate(input_ids=prompt, adapter=adapter, max_new_tokens=new, ignore_eos=True,
                        logprobs=True)
    return list(r.token_ids), [lp.logprob for lp in r.logprobs]


# ---- PEFT's own merge ----------------------------------------------------------


@pytest.fixture(scope="module")
def peft_sources(env):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(env.model, dtype=torch.float32).eval()
    model = None
    for name in SOURCES:
        if model is None:
            model = PeftModel.from_pretrained(base, env.adapter_root / name, adapter_name=name)
        else:
            model.load_adapter(env.adapter_root / name, adapter_name=name)
    return model.eval()


def peft_merged_folder(model, out: Path, sources, weights, name, ctype, seed=None, **kw) -> Path:
    """PEFT's add_weighted_adapter, saved as a folder. For DARE the global RNG is seeded
    where PEFT's merge loop starts (after it creates the new adapter's layers), which is
    what the server's seeded private generator reproduces (see merge.py)."""
    inject = model.base_model.inject_adapter

    def seeded(*a, **k):
        result = inject(*a, **k)
        if seed is not None:
            torch.manual_seed(seed)
        return result

    model.base_model.inject_adapter = seeded
    try:
        model.add_weighted_adapter(sources, weights, name, combination_type=ctype, **kw)
    finally:
        del model.base_model.inject_adapter
    model.save_pretrained(out, selected_adapters=[name], safe_serialization=True)
    folder = next(p.parent for p in out.rglob("adapter_config.json"))
    model.delete_adapter(name)
    return folder


# ---- merges that match PEFT ------------------------------------------------------


@pytest.mark.parametrize("ctype", list(CASES))
def test_served_merge_matches_peft(ctype, env, client, peft_sources, tmp_path):
    sources, weights, kw = CASES[ctype]
    name = f"merged/{ctype}"  # nested under the root
    info = client.merge_adapters(name, sources, weights=weights, combination_type=ctype,
                                 density=kw.get("density", 0.0), svd_rank=kw.get("svd_rank", 0),
                                 seed=kw.get("seed"))
    assert info.name == name and info.current
    ours = env.adapter_root / name
    assert (ours / "adapter_model.safetensors").is_file()
    assert not [p for p in ours.parent.iterdir() if p.name.startswith(".")]  # no temp left

    peft_kw = {k: v for k, v in kw.items() if k != "seed"}
    theirs = peft_merged_folder(peft_sources, tmp_path / "peft", sources, weights, f"peft_{ctype}",
                                ctype, seed=kw.get("seed"), **peft_kw)
    for prompt in PROMPTS:
        tokens, logprobs = served(client, name, prompt)
        peft_tokens, peft_logprobs = peft_greedy(env.model, theirs, prompt, NEW)
        assert tokens == peft_tokens, ctype
        assert max(abs(x - y) for x, y in zip(logprobs, peft_logprobs)) < 1e-4
        # our folder loads in PEFT itself and gives the same tokens
        assert peft_greedy(env.model, ours, prompt, NEW)[0] == tokens
    # and the merge changed something: not one of the sources' outputs
    assert served(client, name) != served(client, sources[0])


def test_cli_adapters_merge(server, env, client):
    out = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "adapters", "merge", "cli_ties", "a", "b",
         "--weights", "0.5,0.75", "--combination-type", "dare_ties", "--density", "0.7",
         "--majority-sign-method", "frequency", "--seed", "7", "--target", server.target, "--json"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "LORAPLEX_TOKEN": ""})
    assert out.returncode == 0, out.stderr
    assert '"cli_ties"' in out.stdout
    assert [i.name for i in client.list_adapters("cli_ties")] == ["cli_ties"]
    assert len(served(client, "cli_ties")[0]) == NEW
    bad = subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "adapters", "merge", "cli_bad", "a", "c",
         "--target", server.target], capture_output=True, text=True, timeout=60,
        env={**os.environ, "LORAPLEX_TOKEN": ""})
    assert bad.returncode == 1 and "FAILED_PRECONDITION" in bad.stderr and "same rank" in bad.stderr


BAD = {
    "unknown source": (dict(sources=["a", "nope"]), grpc.StatusCode.NOT_FOUND),
    "unknown version": (dict(sources=["a@000000000000", "b"]), grpc.StatusCode.NOT_FOUND),
    "ranks differ (linear)": (dict(sources=["a", "c"]), grpc.StatusCode.FAILED_PRECONDITION),
    "weights count": (dict(sources=["a", "b"], weights=[1.0]), grpc.StatusCode.INVALID_ARGUMENT),
    "density > 1": (dict(combination_type="ties", density=1.5), grpc.StatusCode.INVALID_ARGUMENT),
    "density < 0": (dict(combination_type="ties", density=-0.5), grpc.StatusCode.INVALID_ARGUMENT),
    "no density": (dict(combination_type="ties"), grpc.StatusCode.INVALID_ARGUMENT),
    "unknown type": (dict(combination_type="average"), grpc.StatusCode.INVALID_ARGUMENT),
    "sign method": (dict(combination_type="ties", density=0.5, majority_sign_method="vote"),
                    grpc.StatusCode.INVALID_ARGUMENT),
    "rank above the server's": (dict(sources=["a", "b", "a", "b", "c"], weights=[1.0] * 5,
                                     combination_type="cat"), grpc.StatusCode.FAILED_PRECONDITION),
    "loaded name": (dict(name="a"), grpc.StatusCode.ALREADY_EXISTS),
    "folder exists": (dict(name="taken"), grpc.StatusCode.ALREADY_EXISTS),
    "dotdot": (dict(name="../evil"), grpc.StatusCode.PERMISSION_DENIED),
    "absolute": (dict(name="/tmp/evil"), grpc.StatusCode.PERMISSION_DENIED),
    "symlink out": (dict(name="escape/evil"), grpc.StatusCode.PERMISSION_DENIED),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input(case, client, env):
    kwargs, code = BAD[case]
    call = dict(name="bad_merge", sources=["a", "b"], weights=None, combination_type="linear")
    call.update(kwargs)
    before = sorted(os.listdir(env.adapter_root)), sorted(os.listdir(env.adapter_root.parent / "outside"))
    with pytest.raises(LoraplexError) as err:
        client.merge_adapters(call.pop("name"), call.pop("sources"), **call)
    assert err.value.code == code, err.value
    assert len(err.value.message) > 20
    after = sorted(os.listdir(env.adapter_root)), sorted(os.listdir(env.adapter_root.parent / "outside"))
    assert after == before  # nothing written, no temp folder left
    assert not client.list_adapters() or "bad_merge" not in {i.name for i in client.list_adapters()}


# ---- off the serving path: served meanwhile, cancellable, progress ----------------


def _paused_merge(monkeypatch):
    """Make merge_adapters stop after its first module until `go` is set."""
    entered, go = threading.Event(), threading.Event()
    real = merge_service.merge_adapters

    def slow(*args, progress=None, **kwargs):
        def hook(done, total):
            progress(done, total)
            if done == 1:
                entered.set()
                assert go.wait(30)
        return real(*args, progress=hook, **kwargs)

    monkeypatch.setattr(merge_service, "merge_adapters", slow)
    return entered, go


def test_requests_are_served_during_a_merge(server, client, monkeypatch):
    expected = {ref: served(client, ref) for ref in ("a", "b", "")}
    entered, go = _paused_merge(monkeypatch)
    steps = server.server.engine.steps
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.merge_adapters, "during", ["a", "b"], [0.5, 0.5], "svd")
        future.add_done_callback(lambda _: go.set())
        assert entered.wait(30)
        # the merge is stopped half way; requests for its sources and the base are served
        for ref, want in expected.items():
            assert served(client, ref) == want
        assert not future.done()
        service = merge_service.service_for(server.server.engine.cache)
        job = next(j for j in service.jobs() if j.name == "during")
        assert (job.state, job.modules_done) == ("merging", 1) and job.modules_total == 8  # a: q,k,v,o; b: q,v; 2 layers
        go.set()
        info = future.result(30)
    assert server.server.engine.steps > steps
    assert info.name == "during" and info.rank == 8
    done = [j for j in service.jobs() if j.name == "during"]
    assert done[-1].state == "done" and done[-1].modules_done == 8


def test_cancel_a_running_merge(server, client, env, monkeypatch):
    entered, go = _paused_merge(monkeypatch)
    service = merge_service.service_for(server.server.engine.cache)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(client.merge_adapters, "to_cancel", ["a", "b"], [0.5, 0.5], "linear")
        assert entered.wait(30)
        assert service.cancel("to_cancel")
        go.set()
        with pytest.raises(LoraplexError) as err:
            future.result(30)
    assert err.value.code == grpc.StatusCode.CANCELLED
    assert not (env.adapter_root / "to_cancel").exists()
    assert not [p for p in os.listdir(env.adapter_root) if p.startswith(".")]
    assert service.jobs()[-1].state == "cancelled"
    # in-process callers can pass should_stop; progress reaches their callback
    seen = []
    with pytest.raises(Cancelled):
        server.server.engine.adapters.merge("to_cancel", ["a", "b"], should_stop=lambda: len(seen) >= 3,
                                            progress=lambda d, t: seen.append((d, t)))
    assert seen == [(1, 8), (2, 8), (3, 8)]
    assert not (env.adapter_root / "to_cancel").exists()


# ---- export ------------------------------------------------------------------------


def export(env, adapter, out, *extra):
    return subprocess.run(
        [sys.executable, "-m", "loraplex.cli", "export", "--model", str(env.model),
         "--adapter-root", str(env.adapter_root), "--adapter", adapter, "--out", str(out), *extra],
        capture_output=True, text=True, timeout=60)


def hf_greedy(model, prompt, new=NEW):
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                             eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    new_ids = out.sequences[0, ids.shape[1]:]
    logits = torch.stack(out.logits, dim=1)[0].float()
    return new_ids.tolist(), logits.log_softmax(-1).gather(-1, new_ids[:, None])[:, 0].tolist()


def teacher_forced_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float()
    return logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]


@pytest.fixture(scope="module")
def exported(env, client, tmp_path_factory):
    """The CLI export of the merged 'exp_src' adapter (a cat merge of a and c, made over gRPC)."""
    client.merge_adapters("exp_src", ["a", "c"], [0.75, 1.25], "cat")
    out = tmp_path_factory.mktemp("export") / "model"
    proc = export(env, "exp_src", out)
    assert proc.returncode == 0, proc.stderr
    assert "NOT quantized" in proc.stdout
    return out


def test_export_matches_served_adapter_fp32(exported, client):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    assert not any("lora" in k for k, _ in model.named_parameters())
    for prompt in PROMPTS:
        tokens, logprobs = served(client, "exp_src", prompt)
        hf_tokens, hf_logprobs = hf_greedy(model, prompt)
        assert hf_tokens == tokens
        assert max(abs(x - y) for x, y in zip(logprobs, hf_logprobs)) < 1e-4


def test_export_cli_help_and_refusals(env, tmp_path, exported, capsys):
    """In-process (the subprocess run is the `exported` fixture): each start costs ~4 s."""
    from loraplex.cli import main

    def export_here(adapter, out, *extra):
        rc = main(["export", "--model", str(env.model), "--adapter-root", str(env.adapter_root),
                   "--adapter", adapter, "--out", str(out), *extra])
        return rc, capsys.readouterr()

    with pytest.raises(SystemExit):
        main(["export", "--help"])
    assert "NOT quantized" in capsys.readouterr().out.replace("\n", " ")
    rc, out = export_here("exp_src", exported)  # out exists and is not empty
    assert rc == 1 and "already exists" in out.err
    rc, out = export_here("nope", tmp_path / "x")
    assert rc == 1 and "does not exist" in out.err
    rc, out = export_here("../outside", tmp_path / "x")
    assert rc == 1 and "'..'" in out.err
    assert not (tmp_path / "x").exists()
    rc, out = export_here("a", tmp_path / "bf16", "--dtype", "bfloat16")
    assert rc == 0, out.err
    assert "NOT quantized" in out.out
    assert '"bfloat16"' in (tmp_path / "bf16" / "config.json").read_text()


def test_nf4_requantized_export_fidelity(env, exported, capsys):
    """Serving the export quantized again (NF4 of W + scaling*B@A) vs what the server does
    with an NF4 base (NF4(W) + the fp32 adapter delta). Measured and printed; on this tiny
    random model NF4 itself is very lossy, so the figures are put next to NF4's own cost."""
    from transformers import AutoModelForCausalLM

    from engine_helpers import build_engine, greedy, run_all
    from loraplex.engine.request import GenerationRequest
    from models import make_prompts

    prompts = make_prompts(8, min_len=4, max_len=16, seed=5)
    engine = build_engine(env.model, env.adapter_root, quantize="nf4")
    try:
        outs = run_all(engine, [GenerationRequest(prompt_ids=p, sampling=greedy(NEW, logprobs=True),
                                                  adapter="exp_src") for p in prompts])
    finally:
        engine.stop()
    requant = AutoModelForCausalLM.from_pretrained(
        exported, dtype=torch.float32, quantization_config=quantization_config("nf4")).eval()
    fp32 = AutoModelForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    vs_served, nf4_cost, vs_fp32, agree, total = [], [], [], 0, 0
    for prompt, out in zip(prompts, outs):
        tokens = list(out.token_ids)  # served: NF4 base + adapter
        served_lp = torch.tensor([lp.logprob for lp in out.logprobs])
        requant_lp = teacher_forced_logprobs(requant, prompt, tokens)
        fp32_lp = teacher_forced_logprobs(fp32, prompt, tokens)
        vs_served.append((requant_lp - served_lp).abs())
        nf4_cost.append((fp32_lp - served_lp).abs())
        vs_fp32.append((requant_lp - fp32_lp).abs())
        agree += sum(x == y for x, y in zip(hf_greedy(requant, prompt)[0], tokens))
        total += len(tokens)
    d, q, f = torch.cat(vs_served), torch.cat(nf4_cost), torch.cat(vs_fp32)
    report = (
        f"\nNF4 fidelity of the export, tiny random Llama, {total} tokens (the served NF4+adapter greedy "
        f"tokens, teacher-forced), |logprob diff| mean / max:\n"
        f"  re-quantized export (NF4(W+dW))  vs served NF4(W)+adapter: {d.mean():.3f} / {d.max():.3f}; "
        f"greedy tokens agree {agree}/{total}\n"
        f"  fp32 export (W+dW)               vs served NF4(W)+adapter: {q.mean():.3f} / {q.max():.3f} "
        f"(what NF4 serving itself costs)\n"
        f"  re-quantized export (NF4(W+dW))  vs fp32 export (W+dW):    {f.mean():.3f} / {f.max():.3f}")
    with capsys.disabled():
        print(report)
    assert torch.isfinite(d).all()
    # re-quantizing is an NF4 rounding of the same size as serving NF4 at all, not worse by far
    assert d.mean() < 3 * q.mean() + 0.1
