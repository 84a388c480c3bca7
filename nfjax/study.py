"""Sets of training runs for the result drivers in scripts/: run each once, skip finished ones, resume the rest.

A study is a list of runs, each a trainer command line (a config and its overrides) with its own workdir. A run
whose ``final_metrics.json`` says it reached the end of its schedule is skipped; an interrupted one resumes from
its last checkpoint (the trainer's own resume), so a study stopped at any point is continued by running the same
driver command again. Runs go through :func:`nfjax.train.main` in the driver's process: a few seconds of start-up
saved per run, the same code path as ``python -m nfjax.train``.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunFailed(RuntimeError):
    """A training run returned a non-zero status; its message names the run and says how to continue."""


def finished(workdir: str) -> bool:
    """The run's last invocation reached the end of its schedule (its final_metrics.json says so)."""
    path = os.path.join(workdir, "final_metrics.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("finished", True)  # files of older versions lack the key


def config_path(name: str, **args) -> str:
    """``ROOT/configs/NAME.py:k=v,...``: the repository's config file with its arguments."""
    text = ",".join(f"{k}={v}" for k, v in args.items())
    return f"{ROOT}/configs/{name}.py" + (f":{text}" if text else "")


def run_training(workdir: str, config: str, overrides: Sequence[str] = (), log: Callable[[str], None] = print) -> bool:
    """Trains ``config`` with ``--config.*`` ``overrides`` in ``workdir`` unless it finished there before.

    Returns True when it trained (or resumed), False when skipped. The command and the wall time of this call are
    written to ``workdir/wall_time.json`` (a resumed run records the time of its last part). A failing run raises
    :class:`RunFailed`."""
    from nfjax.train import main as train_main

    workdir = os.path.abspath(workdir)
    if finished(workdir):
        log(f"{os.path.basename(workdir)}: finished earlier, skipped")
        return False
    argv = ["--config", config, "--workdir", workdir, *overrides]
    log("$ python -m nfjax.train " + " ".join(argv))
    start = time.time()
    code = train_main(argv)
    if code != 0:
        raise RunFailed(f"run {os.path.basename(workdir)} failed (exit status {code}); rerun the driver to resume it")
    with open(os.path.join(workdir, "wall_time.json"), "w") as f:
        json.dump(
            {"command": "python -m nfjax.train " + " ".join(argv), "wall_seconds": round(time.time() - start, 1)}, f
        )
    return True


def read_metrics(workdir: str, split: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` for one split (``train``, ``eval``, ...), in step order; a row written
    again after a resume replaces the earlier one of the same step."""
    rows: dict[int, dict] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                row = json.loads(line)
                if row.get("split") == split:
                    rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


def wall_seconds(workdir: str) -> float | None:
    path = os.path.join(workdir, "wall_time.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["wall_seconds"]


def run_result(workdir: str) -> dict | None:
    """A finished run's last evaluation (raw weights: top-1, loss) and its training loss: the last logged value,
    the first non-finite one (if any) and its step. None when the run has not finished."""
    if not finished(workdir):
        return None
    evals = read_metrics(workdir, "eval")
    train = read_metrics(workdir, "train")
    if not evals:
        return None
    bad = next((r for r in train if not math.isfinite(r["loss"]) or r.get("nonfinite_steps", 0) > 0), None)
    return dict(
        top1=evals[-1]["top1"],
        eval_loss=evals[-1]["loss"],
        train_loss=train[-1]["loss"] if train else None,
        steps=evals[-1]["step"],
        diverged_at=bad["step"] if bad else None,
        wall_seconds=wall_seconds(workdir),
    )


def mean_spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    v = np.asarray(values, dtype=np.float64)
    return dict(
        mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, min=float(v.min()), max=float(v.max())
    )


def run_all(jobs: Sequence[tuple[str, str, Sequence[str]]], start: float, log: Callable[[str], None] = print) -> None:
    """Runs every ``(workdir, config, overrides)`` in order with progress lines ``[i/n] NAME (M min so far)``."""
    for i, (workdir, config, overrides) in enumerate(jobs, 1):
        log(f"[{i}/{len(jobs)}] {os.path.basename(workdir)} ({(time.time() - start) / 60:.1f} min so far)")
        run_training(workdir, config, overrides, log)
