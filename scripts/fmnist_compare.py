"""NF vs BN on Fashion-MNIST: train both twins with the same recipe, then tabulate accuracy, time and curves.

    python scripts/fmnist_compare.py --recipe quick --out runs/compare_quick
    python scripts/fmnist_compare.py --recipe long --out runs/compare_long   # about 1-2 h per twin on 2 cores

Writes OUT/report.md (a Markdown table plus per-epoch test accuracy) from each run's metrics.jsonl.
Existing runs are resumed, so the script can be interrupted and restarted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from nfjax.metrics import read_metrics

TWINS = {"nf": "configs/fmnist_nf.py", "bn": "configs/fmnist_bn.py"}


def run_twin(name: str, recipe: str, out: str, extra: list[str]) -> float:
    workdir = os.path.join(out, name)
    cmd = [sys.executable, "-m", "nfjax.train", "--config", f"{TWINS[name]}:recipe={recipe}", "--workdir", workdir]
    print("$", " ".join(cmd + extra), flush=True)
    start = time.time()
    subprocess.run(cmd + extra, check=True)
    return time.time() - start


def summarize(out: str, name: str, seconds: float | None) -> dict:
    records = read_metrics(os.path.join(out, name))
    evals = [r for r in records if r["split"] == "eval"]
    train = [r for r in records if r["split"] == "train"]
    if not evals:
        return {"twin": name, "status": "no evaluation yet"}
    last = evals[-1]
    return {
        "twin": name,
        "top1": last["top1"],
        "top5": last["top5"],
        "loss": last["loss"],
        "examples": last["examples"],
        "steps": last["step"],
        "wall_seconds": None if seconds is None else round(seconds, 1),
        "img_per_sec": round(sum(r["img_per_sec"] for r in train) / max(len(train), 1), 1),
        "curve": [(r["step"], round(r["top1"], 4)) for r in evals],
    }


def report(rows: list[dict], recipe: str) -> str:
    lines = [
        f"## Fashion-MNIST, recipe `{recipe}`",
        "",
        "| twin | test top-1 | top-5 | loss | examples | steps | wall time (s) | train img/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "top1" in r:
            lines.append(
                f"| {r['twin']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['loss']:.4f} | {r['examples']} | "
                f"{r['steps']} | {r['wall_seconds']} | {r['img_per_sec']} |"
            )
    lines += ["", "Test top-1 by step:", ""]
    for r in rows:
        if "curve" in r:
            lines.append(f"- {r['twin']}: " + ", ".join(f"{s}: {a:.4f}" for s, a in r["curve"]))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quick", choices=["quick", "long"])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--twins", default="nf,bn", help="comma-separated subset of: nf, bn")
    args, extra = parser.parse_known_args()
    rows = []
    for name in args.twins.split(","):
        seconds = run_twin(name, args.recipe, args.out, extra)
        rows.append(summarize(args.out, name, seconds))
    text = report(rows, args.recipe)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
