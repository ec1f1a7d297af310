"""Turn bench/throughput.py's JSON into a markdown table and a PNG chart beside it.

python bench/report.py docs/benchmarks/throughput-h100.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

LABELS = {"launcher": "launcher + recipe", "unsloth": "bare Unsloth", "hf": "transformers + PEFT + TRL"}


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.3f}x" if a and b else "-"


def table(data: dict) -> list[str]:
    runs = data["runs"]
    lines = [
        "| model | load | stack | tokens/s (steady) | step s | time to first step s | peak GiB | final loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    groups = sorted({(r["size"], r["load"]) for r in runs.values()})
    summary = []
    for size, load in groups:
        by_stack = {s: runs.get(f"{size}/{load}/{s}") for s in LABELS}
        for stack, run in by_stack.items():
            if run is None:
                continue
            if "error" in run:
                lines.append(f"| {size} | {load} | {LABELS[stack]} | failed (exit {run['exit_status']}) | | | | |")
                continue
            peak = max(run["peak_memory_gib"].values())
            lines.append(
                f"| {size} | {load} | {LABELS[stack]} | {run['steady_tokens_per_second']:,.0f} | "
                f"{run['step_time_s']} | {run['time_to_first_step_s']} | {peak:.2f} | {run['final_loss']:.4f} |"
            )
        ok = {s: r for s, r in by_stack.items() if r and "error" not in r}
        if {"launcher", "unsloth"} <= ok.keys():
            launcher, bare = ok["launcher"], ok["unsloth"]
            line = (
                f"- {size} {load}: launcher / bare Unsloth = "
                f"{ratio(launcher['steady_tokens_per_second'], bare['steady_tokens_per_second'])} tokens/s, "
                f"peak memory {ratio(max(launcher['peak_memory_gib'].values()), max(bare['peak_memory_gib'].values()))}"
            )
            if "hf" in ok:
                line += (
                    f"; launcher / transformers = "
                    f"{ratio(launcher['steady_tokens_per_second'], ok['hf']['steady_tokens_per_second'])} tokens/s"
                )
            summary.append(line)
    return [*lines, "", *summary]


def chart(data: dict, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in data["runs"].values() if "error" not in r]
    groups = sorted({(r["size"], r["load"]) for r in runs})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.27
    for i, stack in enumerate(LABELS):
        values = [
            data["runs"].get(f"{s}/{load}/{stack}", {}).get("steady_tokens_per_second") or 0 for s, load in groups
        ]
        positions = [g + (i - 1) * width for g in range(len(groups))]
        bars = ax.bar(positions, values, width, label=LABELS[stack])
        ax.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in values], fontsize=7)
    ax.set_xticks(range(len(groups)), [f"{s} {load}" for s, load in groups])
    ax.set_ylabel("training tokens / s (steady)")
    ax.set_title(f"LoRA r=16, batch 4 x 2048, {data['machine']['gpu'].split(',')[0]}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main(path: str) -> int:
    source = Path(path)
    data = json.loads(source.read_text())
    m = data["machine"]
    text = [
        f"# Throughput on {m['gpu']}",
        "",
        f"torch {m['torch']} (CUDA {m['cuda']}), transformers {m['transformers']}, TRL {m['trl']}, "
        f"Unsloth {m['unsloth']}, Python {m['python']}. Updated {data['updated']}.",
        "",
        "Random-init Llama-architecture models, synthetic text rows that fill every sequence, LoRA r=16 "
        "alpha=16 on all linear layers, batch 4 x 2048, adamw_8bit, bf16. Throughput counts the "
        f"steps after the first {data['settings']['warmup_steps_excluded_from_throughput']}; time to "
        "first step counts from the process start (the launcher's, for the launcher stack).",
        "",
        *table(data),
        "",
        "Commands:",
        "",
        *[f"    {c}" for c in data["commands"]],
        "",
        f"![chart]({source.with_suffix('.png').name})",
        "",
    ]
    source.with_suffix(".md").write_text("\n".join(text))
    chart(data, source.with_suffix(".png"))
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
