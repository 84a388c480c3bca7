"""Evaluation of a training run: ``python -m nfjax.evaluate --workdir DIR [--split SPLIT] [--batch N]``.

Reads the run's config from the workdir, restores the weights of the newest checkpoint (params, BN statistics,
EMA; no optimizer state) into the shardings of the current device mesh (any device count: the run may have
trained on another), evaluates the raw weights and, when the run keeps them, the EMA weights over the whole
split, and prints one JSON object:

    {"step": 6, "split": "test", "top1": ..., "top5": ..., "loss": ..., "examples": 10000,
     "ema": {"top1": ..., "top5": ..., "loss": ..., "examples": 10000}}   # "ema" only with EMA weights
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nfjax.host_devices import configure_host_devices

configure_host_devices()  # before JAX starts, as for training

from nfjax import parallel
from nfjax.cli import run_parsed
from nfjax.experiment import load_run


def evaluate_workdir(
    workdir: str, split: str | None = None, batch: int | None = None, data_dir: str | None = None
) -> dict[str, Any]:
    """Top-1/top-5/loss/example count of the raw (and EMA) weights of the newest checkpoint over ``split``
    (default: the run's eval split), every example counted exactly once. A folder of converted weights is
    evaluated on ImageNet's validation split with the preprocessing its weights expect (``data_dir``: where
    TFDS keeps ImageNet, default the folder's config)."""
    parallel.initialize_distributed()  # multi-process only when the environment describes a cluster
    run = load_run(workdir, eval_split=split, eval_batch=batch, data_dir=data_dir)
    results = run.experiment.evaluate(run.weights)
    out = dict(step=run.step, split=run.experiment.cfg.data.eval_split, **results["eval"])
    if "eval_ema" in results:
        out["ema"] = results["eval_ema"]
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nfjax.evaluate", description="Evaluates the newest checkpoint of a training run."
    )
    parser.add_argument(
        "--workdir", required=True, help="the --workdir of a training run, or a folder of converted weights"
    )
    parser.add_argument("--split", default=None, help="dataset split (default: the run's data.eval_split)")
    parser.add_argument("--batch", type=int, default=None, help="global eval batch (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="the dataset's folder (default: the run's data.data_dir)")
    return parser


def main(argv: list[str] | None = None) -> int:
    code, result = run_parsed(build_parser(), argv, lambda a: evaluate_workdir(a.workdir, a.split, a.batch, a.data_dir))
    if code == 0:
        print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
