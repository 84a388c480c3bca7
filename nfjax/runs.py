"""A training run read back from its workdir: the config it started with (``config.json``, written by
:func:`save_config`) and its newest readable weights on a mesh of this machine (:func:`load_run`), for
evaluation, prediction, export and fine-tuning. No optimizer is built or restored."""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import ml_collections

from nfjax import data as data_lib
from nfjax.experiment import Experiment, build_experiment


def save_config(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Writes the run's config to ``workdir/config.json`` (process 0)."""
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with (unlocked: callers may edit it)."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the --workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


class SavedRun(NamedTuple):
    """A training run brought back from its workdir for evaluation or prediction."""

    experiment: Experiment
    weights: dict  # params, batch_stats (BN models), ema (when the run keeps one), on experiment.mesh
    step: int


def load_run(
    workdir: str,
    *,
    num_devices: int | None = None,
    eval_split: str | None = None,
    eval_batch: int | None = None,
    info: data_lib.DatasetInfo | None = None,
    data_dir: str | None = None,
) -> SavedRun:
    """The newest checkpoint of the run in ``workdir`` on a mesh of ``num_devices`` (default: every visible
    device), with the run's config (``eval_split`` / ``eval_batch`` replace its data.eval_split /
    train.eval_batch, ``data_dir`` its data.data_dir; ``info`` replaces the dataset's, for prediction without
    it). Reads params, batch statistics and EMA only: no optimizer is built or restored. A cross-validation
    run (data.num_folds) evaluates its held-out fold by default; an explicit ``eval_split`` is read whole, folds
    off."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
    cfg = load_config(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"{workdir} holds no checkpoints folder: the run saved no checkpoint yet (checkpoints are written "
            "every train.checkpoint_every_steps steps and at the end of a run)"
        )
    if eval_split and cfg.data.get("num_folds", 0):
        cfg.data.num_folds, cfg.data.fold = 0, 0  # the split named, not the run's held-out fold
    cfg.data.eval_split = eval_split or cfg.data.eval_split
    cfg.train.eval_batch = eval_batch or cfg.train.eval_batch
    cfg.data.data_dir = data_dir or cfg.data.data_dir
    exp = build_experiment(cfg, num_devices=num_devices, info=info, training=False)
    ckpt = exp.checkpointer(workdir, create=False)
    try:
        read = lambda step: ckpt.restore_weights(exp.abstract_weights(ckpt.read_meta(step)["weights"]), step)
        found = ckpt.newest_readable(read)  # a damaged newest step: one warning line, then the one before
    finally:
        ckpt.close()
    if found is None:
        raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}; train longer or check the path")
    return SavedRun(exp, found[1], int(found[0]))
