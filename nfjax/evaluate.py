"""Evaluation of a training run: ``python -m nfjax.evaluate --workdir DIR [--split SPLIT] [--batch N]``.

Reads the run's config from the workdir, restores the newest checkpoint into the shardings of the current
device mesh (any device count: the run may have trained on another), evaluates the raw weights and, when the
run keeps them, the EMA weights over the whole split, and prints one JSON object:

    {"step": 6, "split": "test", "top1": ..., "top5": ..., "loss": ..., "examples": 10000,
     "ema": {"top1": ..., "top5": ..., "loss": ..., "examples": 10000}}   # "ema" only with EMA weights
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, NamedTuple

import jax
import ml_collections

from nfjax import data as data_lib
from nfjax import parallel, train
from nfjax.checkpoint import Checkpointer, abstract_like, check_compatible
from nfjax.cli import run_parsed
from nfjax.losses import make_loss_fn
from nfjax.steps import make_eval_step


class RestoredRun(NamedTuple):
    """A training run brought back from its workdir: everything needed to run its model."""

    cfg: ml_collections.ConfigDict  # the run's config (an unlocked copy: callers may edit it)
    info: data_lib.DatasetInfo
    graphdef: Any
    state: dict  # the train state pytree (params, batch_stats, ema, ...) on ``mesh``
    mesh: jax.sharding.Mesh
    step: int


def restore_run(workdir: str, num_devices: int | None = None) -> RestoredRun:
    """Config + newest checkpoint of the run in ``workdir``, restored onto a mesh of ``num_devices``
    (default: every visible device). Fails with a one-paragraph message when either is missing."""
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if not os.path.isdir(workdir):
        raise FileNotFoundError(f"workdir {workdir} does not exist; pass the --workdir of a training run")
    cfg = train.load_config(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(
            f"{workdir} holds no checkpoints folder: the run saved no checkpoint yet (checkpoints are written "
            "every train.checkpoint_every_steps steps and at the end of a run)"
        )
    train.prepare_data(cfg)
    info = data_lib.dataset_info(cfg.data)
    make_model = train.make_model_fn(cfg, info)
    tx = train.build_optimizer_for(cfg, info)[0]  # the optimizer state is part of the checkpointed pytree
    mesh = parallel.make_mesh(num_devices)
    ckpt = Checkpointer(workdir, async_save=False, create=False)
    try:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}; train longer or check the path")
        check_compatible(ckpt.read_meta(step), train.model_spec(cfg, info), workdir)
        graphdef, _, abstract, shardings = train.train_state_spec(make_model, tx, mesh, cfg.optim.ema_decay > 0)
        state, _ = ckpt.restore(abstract_like(abstract, shardings), step)
    finally:
        ckpt.close()
    return RestoredRun(cfg, info, graphdef, state, mesh, int(step))


def evaluate_run(run: RestoredRun, split: str | None = None, batch: int | None = None) -> dict[str, Any]:
    """Top-1/top-5/loss/example count of the raw (and EMA) weights over ``split`` (default: the run's
    eval split), every example counted exactly once."""
    cfg = run.cfg
    if split:
        cfg.data.eval_split = split
    if batch:
        cfg.train.eval_batch = batch
    expected = data_lib.dataset_info(cfg.data).num_eval_examples
    eval_fn = jax.jit(make_eval_step(run.graphdef, make_loss_fn("softmax_xent")))
    stats = run.state.get("batch_stats", {})
    result = dict(step=run.step, split=cfg.data.eval_split)
    result |= train.evaluate(eval_fn, run.state["params"], stats, cfg, run.mesh, expected)
    if "ema" in run.state:
        result["ema"] = train.evaluate(eval_fn, run.state["ema"], stats, cfg, run.mesh, expected)
    return result


def evaluate_workdir(workdir: str, split: str | None = None, batch: int | None = None) -> dict[str, Any]:
    parallel.initialize_distributed()  # multi-process only when the environment describes a cluster
    return evaluate_run(restore_run(workdir), split, batch)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nfjax.evaluate", description="Evaluates the newest checkpoint of a training run."
    )
    parser.add_argument("--workdir", required=True, help="the --workdir of a training run")
    parser.add_argument("--split", default=None, help="dataset split (default: the run's data.eval_split)")
    parser.add_argument("--batch", type=int, default=None, help="global eval batch (default: the run's)")
    return parser


def main(argv: list[str] | None = None) -> int:
    code, result = run_parsed(build_parser(), argv, lambda a: evaluate_workdir(a.workdir, a.split, a.batch))
    if code == 0:
        print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
