"""Metric sinks: JSON lines + TensorBoard event files in the workdir, and a terminal progress bar.

Only process 0 writes; other processes get no-op writers, so callers never branch on the process index.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import jax
import numpy as np


def _scalar(v: Any) -> float | int | str:
    if isinstance(v, (str, int)):
        return v
    v = float(np.asarray(v))
    return v if math.isfinite(v) else str(v)


class MetricWriter:
    """Writes ``{"step": s, "split": "train", ...}`` lines to ``metrics.jsonl`` and TensorBoard scalars."""

    def __init__(
        self, workdir: str, enabled: bool | None = None, tensorboard: bool = True, resume_step: int | None = None
    ):
        """``resume_step``: the step a resumed run restarts from. Records of later steps, written by a run that
        died after its last checkpoint, are dropped from ``metrics.jsonl`` and purged in TensorBoard (a purge
        event at ``resume_step + 1``), so every step is logged once whatever the sequence of crashes."""
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._tb = None
        self._file = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            _truncate_after(path, resume_step)
        self._file = open(path, "a")  # noqa: SIM115 - closed in close()
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter

                purge = None if resume_step is None else resume_step + 1
                self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)
            except ImportError:  # optional dependency: JSON lines still work
                self._tb = None

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> dict[str, Any]:
        record = {"step": int(step), "split": split, "time": round(time.time(), 3)}
        record.update({k: _scalar(v) for k, v in metrics.items()})
        if self.enabled:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
            if self._tb is not None:
                for k, v in record.items():
                    if k not in ("step", "split", "time") and isinstance(v, (int, float)):
                        self._tb.add_scalar(f"{split}/{k}", v, step)
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._tb is not None:
            self._tb.close()


def _truncate_after(path: str, step: int) -> None:
    """Drops the records of ``path`` with a step above ``step`` (and a torn last line), replacing the file
    atomically so that a crash here loses nothing."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
        except (ValueError, KeyError, TypeError):  # a line torn by a kill mid-write
            continue
    if len(kept) != len(lines):
        with open(f"{path}.tmp", "w") as f:
            f.writelines(kept)
        os.replace(f"{path}.tmp", path)


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All records of ``metrics.jsonl`` (empty if none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class Progress:
    """A tqdm progress bar with ETA on process 0 (plain log lines when stderr is not a terminal)."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train", enabled: bool | None = None):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._bar = None
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0 if sys.stderr.isatty() else 30.0,
            )

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self._bar is not None:
            if postfix:
                self.set_postfix(**postfix)
            self._bar.update(n)

    def set_postfix(self, **postfix: Any) -> None:
        """Values shown after the bar (floats to 4 significant digits), drawn at the bar's next refresh."""
        if self._bar is not None:
            self._bar.set_postfix(
                {k: f"{v:.4g}" if isinstance(v, float) else v for k, v in postfix.items()}, refresh=False
            )

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        elif self.enabled:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
