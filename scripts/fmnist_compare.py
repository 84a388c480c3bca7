"""NF vs BN on Fashion-MNIST: train both twins with the same recipe, then tabulate accuracy, time and curves.

    python scripts/fmnist_compare.py --recipe quick --out runs/compare_quick
    python scripts/fmnist_compare.py --recipe long --out runs/compare_long   # about 65-75 min per twin on 2 cores
    python scripts/fmnist_compare.py --recipe long --out runs/compare_long --report-only

Writes OUT/report.md (a summary table plus, for each twin, test accuracy and loss and the mean training loss at
every evaluation) and OUT/report.json from each run's metrics.jsonl. Each twin's wall time (the whole trainer
process: start-up, compilation, training and evaluation) is kept in OUT/TWIN/wall_time.json. Existing runs are
resumed, so the script can be interrupted and restarted; --report-only rebuilds the report without training.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

try:
    from nfjax.metrics import read_metrics
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nfjax.metrics import read_metrics

TWINS = {"nf": "configs/fmnist_nf.py", "bn": "configs/fmnist_bn.py"}


def run_twin(name: str, recipe: str, out: str, extra: list[str]) -> None:
    workdir = os.path.join(out, name)
    cmd = [sys.executable, "-m", "nfjax.train", "--config", f"{TWINS[name]}:recipe={recipe}", "--workdir", workdir]
    print("$", " ".join(cmd + extra), flush=True)
    start = time.time()
    subprocess.run(cmd + extra, check=True)
    seconds = time.time() - start
    with open(os.path.join(workdir, "wall_time.json"), "w") as f:
        json.dump({"command": " ".join(cmd + extra), "wall_seconds": round(seconds, 1)}, f)


def recorded_wall_time(out: str, name: str) -> float | None:
    path = os.path.join(out, name, "wall_time.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["wall_seconds"]


def curve(records: list[dict]) -> list[dict]:
    """One row per evaluation: step, epoch, test metrics, mean train loss since the previous evaluation, minutes."""
    t0 = records[0]["time"] if records else 0.0
    rows, window, epochs_per_step = [], [], 0.0
    for r in records:
        if r["split"] == "train":
            window.append(r["loss"])
            if r.get("epoch") and r["step"]:
                epochs_per_step = r["epoch"] / r["step"]
        elif r["split"] == "eval":
            rows.append(
                {
                    "step": r["step"],
                    "epoch": round(r["step"] * epochs_per_step, 2),
                    "top1": r["top1"],
                    "loss": r["loss"],
                    "train_loss": sum(window) / len(window) if window else float("nan"),
                    "minutes": round((r["time"] - t0) / 60, 1),
                }
            )
            window = []
    return rows


def summarize(out: str, name: str) -> dict:
    records = read_metrics(os.path.join(out, name))
    seconds = recorded_wall_time(out, name)
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
        "wall_seconds": seconds,
        "img_per_sec": round(sum(r["img_per_sec"] for r in train) / max(len(train), 1), 1),
        "step_time_median": sorted(r["step_time"] for r in train)[len(train) // 2] if train else None,
        "curve": curve(records),
    }


def report(rows: list[dict], recipe: str) -> str:
    lines = [
        f"## Fashion-MNIST, recipe `{recipe}`",
        "",
        "| twin | test top-1 | top-5 | loss | examples | steps | wall time | train img/s | step time (median) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "top1" in r:
            wall = "not recorded" if r["wall_seconds"] is None else f"{r['wall_seconds'] / 60:.1f} min"
            lines.append(
                f"| {r['twin']} | {r['top1']:.4f} | {r['top5']:.4f} | {r['loss']:.4f} | {r['examples']} | "
                f"{r['steps']} | {wall} | {r['img_per_sec']} | {r['step_time_median']:.3f} s |"
            )
        else:
            lines.append(f"| {r['twin']} | {r['status']} | | | | | | | |")
    for r in rows:
        if "curve" not in r:
            continue
        lines += [
            "",
            f"### {r['twin']}: at every evaluation",
            "",
            "| step | epoch | test top-1 | test loss | train loss (mean since last eval) | minutes since first log |",
            "|---|---|---|---|---|---|",
        ]
        for c in r["curve"]:
            lines.append(
                f"| {c['step']} | {c['epoch']} | {c['top1']:.4f} | {c['loss']:.4f} | {c['train_loss']:.4f} | "
                f"{c['minutes']} |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="quick", choices=["quick", "long"])
    parser.add_argument("--out", default="runs/compare")
    parser.add_argument("--twins", default="nf,bn", help="comma-separated subset of: nf, bn")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from existing runs")
    args, extra = parser.parse_known_args()
    names = [n.strip() for n in args.twins.split(",") if n.strip()]
    unknown = [n for n in names if n not in TWINS]
    if unknown or not names:
        parser.error(f"--twins takes a comma-separated subset of {', '.join(TWINS)}; got {args.twins!r}")
    rows = []
    for name in names:
        if not args.report_only:
            run_twin(name, args.recipe, args.out, extra)
        elif not os.path.exists(os.path.join(args.out, name, "metrics.jsonl")):
            parser.error(f"no run of the {name} twin in {args.out}; train it first (drop --report-only)")
        rows.append(summarize(args.out, name))
    text = report(rows, args.recipe)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump(rows, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()
