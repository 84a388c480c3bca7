"""Mean and standard deviation of the final evaluation over the fold runs of a cross-validation.

    for k in 0 1 2 3 4; do python -m nfjax.train --config configs/fmnist_nf.py --config.data.num_folds=5 \
        --config.data.fold=$k --workdir runs/cv/$k; done
    python scripts/cv_summary.py runs/cv/*

Reads each WORKDIR/final_metrics.json (written at the end of a run: the last evaluation, on the run's held-out
fold) and prints one JSON object: {"runs": [...], "steps": [...], "eval": {"top1": {"mean", "std", "values"},
...}, "eval_ema": {...}}, for every scalar metric that all runs report. ``std`` is the sample standard deviation
(n - 1 in the denominator), 0 for a single run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys


def summarize(finals: list[dict]) -> dict:
    """Per set of weights ('eval', 'eval_ema') and metric present in every run: mean, sample std, the values."""
    out = {}
    for weights in ("eval", "eval_ema"):
        if not all(weights in final for final in finals):
            continue
        shared = set.intersection(*(set(final[weights]) for final in finals))
        metrics = {}
        for key in sorted(shared):
            values = [final[weights][key] for final in finals]
            if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                continue
            mean = sum(values) / len(values)
            spread = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
            metrics[key] = {"mean": mean, "std": math.sqrt(spread), "values": values}
        out[weights] = metrics
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="the --workdir of each fold's run")
    args = parser.parse_args(argv)
    finals = []
    for workdir in args.workdirs:
        path = os.path.join(workdir, "final_metrics.json")
        if not os.path.exists(path):
            print(f"error: {path} not found: has the run in {workdir} finished?", file=sys.stderr)
            return 2
        with open(path) as f:
            final = json.load(f)
        if not final.get("finished", True):  # files of older versions lack the key
            print(
                f"error: the run in {workdir} stopped at step {final.get('step')}, before the end of its schedule; "
                "rerun its training command to finish it",
                file=sys.stderr,
            )
            return 2
        finals.append(final)
    result = {"runs": args.workdirs, "steps": [final.get("step") for final in finals], **summarize(finals)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
