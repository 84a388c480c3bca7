"""Checkpoints with orbax's CheckpointManager: async saves, keep-N, atomic (orbax writes to a temporary
directory and renames on commit), restore into an abstract target carrying the *current* shardings.

A checkpoint of a train state (a dict: step, params, opt_state, batch_stats for BN models, ema when on) holds
three items, so that evaluation and prediction read the weights without knowing the optimizer:

  ``weights``  params, batch_stats, ema (those the state has)
  ``train``    step, opt_state
  ``meta``     JSON: format version, model name and constructor arguments, classes, input channels, dataset,
               global batch, and which weight trees the checkpoint holds

A workdir that holds a different model (or an older checkpoint format) is refused before anything is restored
or overwritten.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

FORMAT = 2  # 1: one 'state' item (before weights and optimizer state were saved apart)
WEIGHT_KEYS = ("params", "batch_stats", "ema")
TRAIN_KEYS = ("step", "opt_state")


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint that does not belong to this run."""


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, train) items of a train state."""
    return {k: state[k] for k in WEIGHT_KEYS if k in state}, {k: state[k] for k in TRAIN_KEYS}


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=create
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Starts an (async) save of a train state; every process must call it. ``wait`` makes it durable."""
        weights, train = split_state(state)
        meta = dict(meta, format=FORMAT, weights=sorted(weights))
        args = ocp.args.Composite(
            weights=ocp.args.StandardSave(weights), train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave(meta)
        )
        self._manager.save(step, args=args, force=True)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train longer or check the path")
        return step

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _restore(self, step: int, **abstract_items: Any) -> dict[str, Any]:
        items = {name: ocp.args.StandardRestore(tree) for name, tree in abstract_items.items()}
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # orbax: the stored tree differs from the target (several lines of diff)
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} does not fit this run's train state "
                f"({str(e).splitlines()[0].rstrip(':')}): optimizer or EMA settings (optim.name, optim.clipping, "
                "optim.ema_decay, ...) differ from the run that wrote it. Nothing was changed. Resume with the "
                "settings the checkpoint was written with, or use a new --workdir."
            ) from None

    def restore(self, abstract_state: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """The whole train state, restored into ``abstract_state`` (ShapeDtypeStructs with shardings: any
        device count works). Default: the newest step."""
        weights, train = split_state(abstract_state)
        restored = self._restore(self._step(step), weights=weights, train=train)
        return {**restored["weights"], **restored["train"]}

    def restore_weights(self, abstract_weights: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Only the weights (params, batch_stats, ema: the keys of ``abstract_weights``); no optimizer state is
        read. Default: the newest step."""
        return dict(self._restore(self._step(step), weights=abstract_weights)["weights"])

    def wait(self) -> None:
        """Blocks until pending saves are committed; raises if an async save failed (never silent)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def check_compatible(meta: dict[str, Any] | None, expected: dict[str, Any], workdir: str) -> None:
    """Refuses a checkpoint of another format or whose model (name, arguments, classes) differs from the run's."""
    if meta is None:
        return
    if meta.get("format") != FORMAT:
        raise CheckpointMismatchError(
            f"the workdir {workdir} holds a checkpoint in format {meta.get('format', 1)}, written by an earlier "
            f"nfjax; this version reads format {FORMAT}. Nothing was changed. Use a new --workdir (or train it "
            "again with the nfjax version that wrote it)."
        )
    keys = ("model", "model_kwargs", "num_classes", "in_channels")
    diffs = [k for k in keys if k in expected and meta.get(k) != expected[k]]
    if diffs:
        found = ", ".join(f"{k}={meta.get(k)!r}" for k in diffs)
        wanted = ", ".join(f"{k}={expected[k]!r}" for k in diffs)
        raise CheckpointMismatchError(
            f"the workdir {workdir} holds a checkpoint of a different model ({found}); this run asks for "
            f"{wanted}. Nothing was changed. Use a new --workdir, or delete {workdir}/checkpoints to start over."
        )


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs of ``tree`` with the given shardings (the restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
