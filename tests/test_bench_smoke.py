"""`python -m bench.bench` end to end on the tiny model: every variant runs and reports.

The benchmark is not part of the suite (its figures need a quiet machine and minutes);
this only keeps the script working: the variants asked for, the paired ratios, the JSON.
No speed is asserted.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bitsandbytes
import peft
import torch
import transformers

REPO = Path(__file__).resolve().parent.parent


def test_bench_runs_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--shape", "small", "--targets", "qv", "all",
         "--rank", "4", "16", "--num-requests", "4", "--adapters", "0", "1", "2", "--repeat", "1",
         "--lora-dtype", "auto", "bfloat16", "--lora-backend", "auto", "segmented",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    meta = data["meta"]
    assert (meta["targets"], meta["rank"], meta["shape"]) == (["qv", "all"], [4, 16], "small")
    # each (backend, dtype) pair is an engine, named by what has several values
    assert meta["lora_dtype"] == {"loraplex": "torch.float32",
                                  "loraplex-auto-bfloat16": "torch.bfloat16",
                                  "loraplex-segmented-auto": "torch.float32",
                                  "loraplex-segmented-bfloat16": "torch.bfloat16"}
    assert meta["lora_kernel"]["loraplex"] == "lora_delta_bgmv"  # what auto chose on the CPU
    assert meta["lora_kernel"]["loraplex-segmented-auto"] == "lora_delta_segmented"
    # the CPU and the libraries whose kernels ran are recorded
    assert meta["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (meta["transformers"], meta["peft"], meta["bitsandbytes"]) == (
        transformers.__version__, peft.__version__, bitsandbytes.__version__)
    rows = {(r["system"], r["adapters"], r["outputs"]): r for r in data["results"]}
    for outputs in ("equal", "varied"):
        assert set(k for k in rows if k[2] == outputs) == {
            ("loraplex", 0, outputs), ("loraplex", 1, outputs), ("loraplex", 2, outputs),
            ("hf", 0, outputs), ("peft", 1, outputs),
            *[(system, n, outputs) for system in ("loraplex-auto-bfloat16", "loraplex-segmented-auto",
                                                   "loraplex-segmented-bfloat16") for n in (1, 2)]}
        n1 = rows[("loraplex", 1, outputs)]
        assert n1["tok_per_s"] > 0 and n1["vs_loraplex_n0"] > 0 and n1["vs_peft"] > 0
        bf16 = rows[("loraplex-auto-bfloat16", 1, outputs)]
        assert bf16["vs_loraplex_n0"] > 0 and bf16["vs_peft"] > 0
        assert rows[("loraplex", 0, outputs)]["vs_loraplex_n0"] == 1.0
        # fp32 everywhere: the served greedy tokens are PEFT's (HF generate's for N=0)
        for n in (0, 1):
            assert rows[("loraplex", n, outputs)]["vs_reference_tokens"] == {
                "same_requests": 1.0, "same_tokens": 1.0}
        assert 0 <= bf16["vs_reference_tokens"]["same_tokens"] <= 1
    # every request made exactly its max_new_tokens (4 x 32 in the equal workload)
    assert rows[("loraplex", 1, "equal")]["tokens"] == 4 * 32
    adapters = tmp_path / "work" / "adapters-small-float32-qv+all-r4+16"
    configs = [json.loads((adapters / name / "adapter_config.json").read_text())
               for name in ("bench000", "bench001")]  # adapter i: the i-th rank and targets
    assert [(c["r"], c["target_modules"]) for c in configs] == [
        (4, ["q_proj", "v_proj"]),
        (16, ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"])]
    assert "vs loraplex N=0" in proc.stdout  # the printed table
    table = subprocess.run([sys.executable, "-m", "bench.table", str(out)], cwd=REPO,
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert len(table.splitlines()) == 2 + len(data["results"])  # header, rule, one per row
    assert ("| equal | loraplex, `--lora-backend segmented`, `--lora-dtype bfloat16` | 2 | "
            in table)
    assert "| varied | loraplex | 1 | " in table and "| 100% (100%) |" in table


def test_option_ab_runs_each_value_for_each_n(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bench.option_ab", "--shape", "small", "--option",
         "prefix_caching", "off", "on", "--system-prompt", "40", "--new-tokens", "2",
         "--repeat", "1", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("N=")]
    assert [(r[0], r[1]) for r in rows] == [(f"N={n}", f"prefix_caching={v}")
                                            for n in (0, 1, 32) for v in ("off", "on")]
    assert all(r[-3] == "1.00x" for r in rows[::2])  # the first value against itself
    bad = subprocess.run([sys.executable, "-m", "bench.option_ab", "--option", "nope", "1", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "EngineConfig field" in bad.stderr


def test_guided_bench_runs_and_reports():
    """`python -m bench.guided` on the demo tokenizer and the small model: every pattern's
    mask row (its two walks agree, or it raises) and the serving ratio."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.guided", "--shape", "small",
         "--tokenizer", str(REPO / "demo" / "assets" / "model")],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    for name in ("json", "choice", "date", "free text"):
        assert any(line.startswith(name) for line in lines), proc.stdout
    assert any(line.startswith("serving, 4 adapters") and "ratio" in line for line in lines)


def test_completions_bench_runs_and_reports():
    """`python -m bench.completions` on the small model: a row per system, with ratios."""
    proc = subprocess.run(
        [sys.executable, "-m", "bench.completions", "--shape", "small", "--repeat", "1",
         "--prompts", "2", "--n", "3", "--prompt-len", "24", "--new-tokens", "4"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 prompts of 24 tokens x n = 3 completions of 4 tokens (24 tokens a round)" \
        in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ")][1:]
    assert [r.split(" | ")[0].lstrip("| ") for r in rows] == [
        "loraplex n", "loraplex n, no cache", "loraplex n x 1", "HF PEFT"]
    cells = [r.strip("| ").split(" | ") for r in rows]  # system, tok/s, vs PEFT, vs n
    assert cells[3][2] == "1.00x" and cells[0][3] == "1.00x"
