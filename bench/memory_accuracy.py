"""Compare the planner's memory estimate with peaks measured on a GPU.

    python bench/memory_accuracy.py docs/benchmarks/throughput-h100.json [MORE.json ...] --out docs/benchmarks/memory

For every launcher run in the throughput results, build the same recipe the benchmark ran
(same shape, load type, LoRA, batch and sequence length), estimate it, and set the estimate
(without the CUDA context, which torch's peak does not count) beside the measured peak.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import settings

from entrypoint import memory
from recipes.schema import Recipe


def bench_recipe(size: str, load: str) -> Recipe:
    """`load` is 16bit / 4bit (LoRA) or full (full fine-tuning, 16-bit), as bench/throughput.py."""
    full = load == "full"
    lora = {"r": settings.LORA_R, "alpha": settings.LORA_ALPHA, "target_modules": settings.TARGET_MODULES}
    return Recipe.model_validate(
        {
            "model": {
                "name": f"bench-{size}",
                "random_init": settings.SHAPES[size].model_dump(),
                "max_seq_length": settings.SEQ_LEN,
                "load_in": "16bit" if full else load,
                "full_finetuning": full,
            },
            "lora": None if full else lora,
            "data": {"source": "synthetic/rows", "format": "text"},
            "training": {"per_device_batch_size": settings.BATCH, "optimizer": settings.OPTIMIZER},
        }
    )


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("results", nargs="+")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    files = [json.loads(Path(name).read_text()) for name in args.results]
    data = {"machine": files[0]["machine"], "runs": {k: v for f in files for k, v in f["runs"].items()}}
    rows = []
    for key, run in sorted(data["runs"].items()):
        if run["stack"] != "launcher" or "error" in run:
            continue
        est = memory.estimate(bench_recipe(run["size"], run["load"]))
        estimated = round(est.total_gib - memory.CUDA_OVERHEAD_GIB, 2)
        measured = max(run["peak_memory_gib"].values())
        rows.append(
            {
                "run": key,
                "estimated_gib": estimated,
                "measured_gib": measured,
                "ratio": round(estimated / measured, 3),
                "estimate": est.as_dict(),
            }
        )
    result = {
        "machine": data["machine"]["gpu"],
        "command": " ".join(["python", "bench/memory_accuracy.py", *sys.argv[1:]]),
        "rows": rows,
        "within_20_percent": all(abs(r["ratio"] - 1) <= 0.2 for r in rows),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# Memory estimate against measured peaks ({result['machine']})",
        "",
        f"Command: `{result['command']}`",
        "",
        "| run | estimated GiB | measured peak GiB | estimate / measured |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {r['run']} | {r['estimated_gib']} | {r['measured_gib']} | {r['ratio']} |" for r in rows]
    lines += ["", f"All within 20%: {result['within_20_percent']}.", ""]
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
