"""Checkpoints with orbax's CheckpointManager: async saves, keep-N, atomic (orbax writes to a temporary
directory and renames on commit), restore into an abstract target carrying the *current* shardings.

A checkpoint holds ``state`` (a pytree of arrays: step, params, batch statistics, optimizer state, EMA) and
``meta`` (JSON: the model name and constructor arguments, dataset, global batch), so a workdir that holds a
different model is refused before anything is restored or overwritten.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint that does not belong to this run."""


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, enable_async_checkpointing=async_save, create=create
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts an (async) save; every process must call it. ``wait`` makes it durable."""
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self._manager.save(step, args=args, force=True)

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict[str, Any]]:
        """Restores into ``abstract_state`` (ShapeDtypeStructs with shardings): any device count works."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()),
            )
        except ValueError as e:  # orbax: the stored tree differs from the target (several lines of diff)
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} does not fit this run's train state "
                f"({str(e).splitlines()[0].rstrip(':')}): optimizer or EMA settings (optim.name, optim.clipping, "
                "optim.ema_decay, ...) differ from the run that wrote it. Nothing was changed. Resume with the "
                "settings the checkpoint was written with, or use a new --workdir."
            ) from None
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        """Blocks until pending saves are committed; raises if an async save failed (never silent)."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self.wait()
        self._manager.close()


def check_compatible(meta: dict[str, Any] | None, expected: dict[str, Any], workdir: str) -> None:
    """Refuses a checkpoint whose model (name, arguments, classes) differs from the run's."""
    if meta is None:
        return
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
