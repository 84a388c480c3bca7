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
import shlex
import sys
import time
from collections.abc import Callable, Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RunFailed(RuntimeError):
    """A run failed, stopped before the end of its schedule, or was trained with other settings; the message names
    the run and says what to do."""


SETTINGS_FILE = "study_run.json"
NON_FINITE = ("nan", "inf", "-inf")


def log_line(text: str) -> None:
    print(text, flush=True)


def finished(workdir: str) -> bool:
    """The run's last invocation reached the end of its schedule (its final_metrics.json says so)."""
    path = os.path.join(workdir, "final_metrics.json")
    try:
        with open(path) as f:
            return json.load(f).get("finished", True)  # files of older versions lack the key
    except (OSError, ValueError):  # missing, or cut short by a crash while writing: not finished
        return False


def config_path(name: str, **args) -> str:
    """``ROOT/configs/NAME.py:k=v,...``: the repository's config file with its arguments."""
    for k, v in args.items():
        if "," in str(v) or ":" in str(v)[1:]:
            raise ValueError(f"config argument {k}={v!r} may not contain ',' or ':'; use a path without them")
    text = ",".join(f"{k}={v}" for k, v in args.items())
    return f"{ROOT}/configs/{name}.py" + (f":{text}" if text else "")


def settings_of(config: str, overrides: Sequence[str]) -> list[str]:
    """What identifies a run's settings: the config file's name with its arguments (not the checkout's path, so a
    moved checkout still matches) and the overrides."""
    return [config.replace(f"{ROOT}/configs/", "configs/"), *overrides]


def check_settings(workdir: str, config: str, overrides: Sequence[str]) -> None:
    """RunFailed when ``workdir`` holds a run started with other settings (its study_run.json); a run without that
    file (none yet, or older than it) passes."""
    path = os.path.join(workdir, SETTINGS_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        before = json.load(f)["settings"]
    if before != settings_of(config, overrides):
        changed = [a for a in settings_of(config, overrides) if a not in before]
        raise RunFailed(
            f"{workdir} holds a run with other settings ({' '.join(before)}); this study asks for "
            f"{' '.join(changed) or 'fewer overrides'}. Use another --runs folder, or the settings of that run"
        )


def run_training(
    workdir: str, config: str, overrides: Sequence[str] = (), log: Callable[[str], None] = log_line
) -> bool:
    """Trains ``config`` with ``--config.*`` ``overrides`` in ``workdir`` unless it finished there before.

    Returns True when it trained (or resumed), False when skipped. The settings go to ``workdir/study_run.json``
    (a later call with other settings is refused), and the wall time of every call that trained adds up in
    ``workdir/wall_time.json``. Raises :class:`RunFailed` when the run fails, or stops before the end of its
    schedule (SIGTERM, train.max_steps)."""
    from nfjax.train import main as train_main

    workdir = os.path.abspath(workdir)
    name = os.path.basename(workdir)
    check_settings(workdir, config, overrides)
    if finished(workdir):
        log(f"{name}: finished earlier, skipped")
        return False
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, SETTINGS_FILE), "w") as f:
        json.dump({"settings": settings_of(config, overrides)}, f, indent=1)
    argv = ["--config", config, "--workdir", workdir, *overrides]
    command = "python -m nfjax.train " + shlex.join(argv)
    log(f"$ {command}")
    start = time.time()
    code = train_main(argv)
    if code == 2:
        raise RunFailed(f"run {name} was refused (exit status 2; the message above says why): fix the settings")
    if code != 0:
        raise RunFailed(f"run {name} failed (exit status {code}); rerun the driver to resume it")
    seconds = time.time() - start + (wall_seconds(workdir) or 0.0)  # a resumed run adds its earlier parts
    with open(os.path.join(workdir, "wall_time.json"), "w") as f:
        json.dump({"command": command, "wall_seconds": round(seconds, 1)}, f)
    if not finished(workdir):
        raise RunFailed(f"run {name} stopped before the end of its schedule; rerun the driver to resume it")
    return True


def read_metrics(workdir: str, split: str) -> list[dict]:
    """The rows of ``workdir/metrics.jsonl`` for one split (``train``, ``eval``, ...), in step order, non-finite
    values as floats; a row written again after a resume replaces the earlier one of the same step."""
    from nfjax.metrics import read_metrics as read_all

    rows: dict[int, dict] = {}
    for row in read_all(workdir):
        if row.get("split") == split:  # the writer stores non-finite values as "nan", "inf", "-inf"
            rows[row["step"]] = {k: float(v) if v in NON_FINITE else v for k, v in row.items()}
    return [rows[s] for s in sorted(rows)]


def json_safe(value):
    """``value`` with every non-finite float written as the metrics writer does ("nan", "inf", "-inf"), so that
    the tables' JSON stays standard JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value


def wall_seconds(workdir: str) -> float | None:
    path = os.path.join(workdir, "wall_time.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)["wall_seconds"]


def run_result(workdir: str, config: str | None = None, overrides: Sequence[str] = ()) -> dict | None:
    """A finished run's last evaluation (raw weights: top-1, loss), its last logged training loss and
    ``nonfinite_at``: the first logged step whose interval held a non-finite loss (a skipped update), None when
    there was none. None when the run has not finished; RunFailed when ``config`` is given and the run was trained
    with other settings."""
    if config is not None:
        check_settings(workdir, config, overrides)
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
        nonfinite_at=bad["step"] if bad else None,
        wall_seconds=wall_seconds(workdir),
    )


def mean_spread(values: Sequence[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min and max."""
    v = np.asarray(values, dtype=np.float64)
    return dict(
        mean=float(v.mean()), std=float(v.std(ddof=1)) if len(v) > 1 else 0.0, min=float(v.min()), max=float(v.max())
    )


def run_all(
    jobs: Sequence[tuple[str, str, Sequence[str]]], start: float, log: Callable[[str], None] = log_line
) -> None:
    """Runs every ``(workdir, config, overrides)`` in order with progress lines ``[i/n] NAME (M min so far)``."""
    for i, (workdir, config, overrides) in enumerate(jobs, 1):
        log(f"[{i}/{len(jobs)}] {os.path.basename(workdir)} ({(time.time() - start) / 60:.1f} min so far)")
        run_training(workdir, config, overrides, log)


def number_list(text: str, what: str, kind: type = int, minimum: float | None = None, unique: bool = True) -> list:
    """Comma-separated values of ``kind``, in the order given (repeats dropped when ``unique``); ValueError naming
    ``what`` when an item is not of that kind, is below ``minimum`` or the list is empty."""
    try:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        values = list(dict.fromkeys(values)) if unique else values
    except ValueError:
        raise ValueError(f"{what} takes comma-separated {kind.__name__} values; got {text!r}") from None
    if not values:
        raise ValueError(f"{what} is empty; give at least one value")
    if minimum is not None and min(values) < minimum:
        raise ValueError(f"{what} takes values of at least {minimum:g}; got {text!r}")
    return values


def config_overrides(extra: Sequence[str]) -> list[str]:
    """The driver's arguments after its own (and after ``--``): only ``--config.KEY=VALUE`` items, passed to every
    run; ValueError naming the others."""
    extra = [a for a in extra if a != "--"]
    unknown = [a for a in extra if not (a.startswith("--config.") and "=" in a)]
    if unknown:
        raise ValueError(
            f"unrecognized arguments {unknown}; only --config.KEY=VALUE overrides (with '=') are passed to the runs"
        )
    return extra


def train_then_collect(
    commands: Sequence[tuple[str, str, Sequence[str]]], collect: Callable[[], list[dict]], runs: str, report_only: bool
) -> list[dict] | None:
    """A driver's body: trains every ``(workdir, config, overrides)`` in order (unless ``report_only``), then
    returns ``collect()``, the finished runs' rows. On a failed, stopped or mismatched run, or when no run has
    finished, prints one ``error:`` line and returns None (the driver exits with status 1)."""
    try:
        if not report_only:
            run_all(commands, time.time())
        rows = collect()
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        return None
    if not rows:
        print(f"error: no finished runs in {runs}; run without --report-only first", file=sys.stderr)
        return None
    return rows


def study_record(settings: dict, rows: list[dict], planned: int, start: float) -> dict:
    """``settings`` with what every result table records besides its rows: finished and planned runs, the sum of
    the runs' wall times, this invocation's wall time and the software and machine (nfjax.plotting.environment)."""
    from nfjax.plotting import environment

    walls = [r["wall_seconds"] for r in rows if r.get("wall_seconds") is not None]
    return dict(
        settings,
        runs_finished=len(rows),
        runs_planned=planned,
        runs_wall_seconds_sum=round(sum(walls), 1),
        driver_wall_seconds=round(time.time() - start, 1),
        environment=environment(),
    )


def totals_line(record: dict) -> str:
    return (
        f"{record['runs_finished']} of {record['runs_planned']} runs finished; their training took "
        f"{record['runs_wall_seconds_sum'] / 60:.1f} min in all; this invocation "
        f"{record['driver_wall_seconds'] / 60:.1f} min"
    )


def add_twin_arguments(parser, runs: str, seeds: str) -> None:
    """The arguments the Fashion-MNIST twin studies share: where runs and results go, seeds, epochs, the twins'
    narrowing, the TFDS folder and --report-only."""
    parser.add_argument("--runs", default=runs, help="folder of the training runs")
    parser.add_argument("--out", default="docs/results", help="folder of the tables and plots")
    parser.add_argument("--seeds", default=seeds, help="comma-separated training seeds")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--widths", default="24,48,96", help="the twins' stage widths")
    parser.add_argument("--stem-width", type=int, default=16)
    parser.add_argument("--data-dir", default="~/tensorflow_datasets", help="TFDS folder with fashion_mnist")
    parser.add_argument(
        "--train-examples", type=int, default=60_000, help="training examples (sets log and checkpoint spacing)"
    )
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables and plots from existing runs")
