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

REPO = Path(__file__).resolve().parent.parent


def test_bench_runs_every_variant_and_writes_json(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.bench", "--shape", "small", "--targets", "qv",
         "--num-requests", "4", "--adapters", "0", "1", "--repeat", "1",
         "--workdir", str(tmp_path / "work"), "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["meta"]["targets"] == "qv" and data["meta"]["shape"] == "small"
    rows = {(r["system"], r["adapters"], r["outputs"]): r for r in data["results"]}
    for outputs in ("equal", "varied"):
        assert set(k for k in rows if k[2] == outputs) == {
            ("loraplex", 0, outputs), ("loraplex", 1, outputs), ("hf", 0, outputs),
            ("peft", 1, outputs)}
        n1 = rows[("loraplex", 1, outputs)]
        assert n1["tok_per_s"] > 0 and n1["vs_loraplex_n0"] > 0 and n1["vs_peft"] > 0
        assert rows[("loraplex", 0, outputs)]["vs_loraplex_n0"] == 1.0
    # every request made exactly its max_new_tokens (4 x 32 in the equal workload)
    assert rows[("loraplex", 1, "equal")]["tokens"] == 4 * 32
    adapter_config = json.loads(
        (tmp_path / "work" / "adapters-small-qv-r16" / "bench000" / "adapter_config.json").read_text())
    assert adapter_config["target_modules"] == ["q_proj", "v_proj"]
    assert "vs loraplex N=0" in proc.stdout  # the printed table
