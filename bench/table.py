"""A results JSON of bench.bench as the Markdown table the README shows.

    python -m bench.table bench/results/cpu-2core.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

NAMES = {"hf": "transformers generate", "peft": "HF PEFT mixed batch"}


def system_name(system: str, meta: dict) -> str:
    """"loraplex-segmented-bfloat16" -> "loraplex, `--lora-backend segmented`, `--lora-dtype
    bfloat16`" (bench.engine_variants names only the options given several values)."""
    if system in NAMES:
        return NAMES[system]
    flags = [flag for flag, values in (("--lora-backend", meta["lora_backend"]),
                                       ("--lora-dtype", meta.get("lora_dtype_options", [])))
             if len(values) > 1]
    _, *options = system.split("-")
    if len(options) != len(flags):  # a file without lora_dtype_options: as it is named
        return system
    return ", ".join(["loraplex"] + [f"`{f} {o}`" for f, o in zip(flags, options)])


def markdown(results: list[dict], meta: dict) -> str:
    def ratio(value: float | None) -> str:
        return f"{value:.2f}x" if value is not None else ""

    def same(row: dict) -> str:
        agree = row.get("vs_reference_tokens")
        return f"{agree['same_requests']:.0%} ({agree['same_tokens']:.0%})" if agree else ""

    lines = ["| outputs | system | adapters (N) | tok/s (range) | vs loraplex N=0 | "
             "vs PEFT, same N | vs HF generate | same tokens as PEFT: requests (tokens) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(
            f"| {r['outputs']} | {system_name(r['system'], meta)} | {r['adapters']} | "
            f"{r['tok_per_s']:.0f} ({min(r['rounds']):.0f}-{max(r['rounds']):.0f}) | "
            f"{ratio(r['vs_loraplex_n0'])} | {ratio(r['vs_peft'])} | {ratio(r['vs_hf'])} | "
            f"{same(r)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="a JSON file written by bench.bench --out")
    data = json.loads(parser.parse_args(argv).results.read_text())
    print(markdown(data["results"], data["meta"]))


if __name__ == "__main__":
    main()
