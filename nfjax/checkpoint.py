"""Checkpoints with orbax's CheckpointManager: async saves, keep-N, atomic (orbax writes to a temporary
directory and renames on commit), restore into an abstract target carrying the *current* shardings.

A checkpoint of a train state (a dict: step, params, opt_state, batch_stats for BN models, ema when on) holds
three items, so that evaluation and prediction read the weights without knowing the optimizer:

  ``weights``  params, batch_stats, ema (those the state has)
  ``train``    step, opt_state, plateau (the reduce-on-plateau state, when optim.plateau_patience > 0)
  ``meta``     JSON: format version, model name and constructor arguments, classes, input channels, dataset,
               global batch, and which weight trees the checkpoint holds

A workdir that holds a different model (or an older checkpoint format) is refused before anything is restored
or overwritten. Restores verify what they read: ``meta`` records a checksum of every saved array (computed on
device, exact integer sums of the raw bits, so independent of the device count), and an unreadable or
mismatching checkpoint is reported in one line and passed over for the next older one.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

FORMAT = 2  # 1: one 'state' item (before weights and optimizer state were saved apart)
WEIGHT_KEYS = ("params", "batch_stats", "ema")
TRAIN_KEYS = ("step", "opt_state", "plateau")  # plateau: only with optim.plateau_patience > 0


class CheckpointMismatchError(ValueError):
    """The workdir holds a checkpoint that does not belong to this run."""


class CheckpointSaveError(RuntimeError):
    """A save failed (disk full, permission denied, ...); the previous checkpoint is untouched."""


class CorruptCheckpointError(RuntimeError):
    """A checkpoint's files cannot be read, or what they hold differs from the checksums saved with it."""


def _leaf_checksum(x: jax.Array) -> jax.Array:
    """uint32 [2]: (sum of the raw bits, sum of position * raw bits), both mod 2**32 (order-independent)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        bits = x.astype(jnp.uint32)
    else:
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32)
    bits = bits.ravel()
    position = jnp.arange(1, bits.size + 1, dtype=jnp.uint32)
    return jnp.stack([jnp.sum(bits, dtype=jnp.uint32), jnp.sum(bits * position, dtype=jnp.uint32)])


@jax.jit
def _checksums(tree: Any) -> list[jax.Array]:
    return [_leaf_checksum(x) for x in jax.tree.leaves(tree)]


def checksums(tree: Any) -> list[list[int]]:
    """Per leaf of ``tree`` (in ``jax.tree.leaves`` order), two 32-bit checksums of its raw bits."""
    return [[int(v) for v in c] for c in jax.device_get(_checksums(tree))]


def verify(tree: Any, expected: list[list[int]] | None, what: str) -> None:
    """Raises CorruptCheckpointError when ``tree`` does not match the ``expected`` checksums."""
    if expected is None:
        return
    got = checksums(tree)
    if got != expected:
        from nfjax.clipping import leaf_paths

        bad = [path for path, a, b in zip(leaf_paths(tree), got, expected, strict=False) if a != b]
        raise CorruptCheckpointError(
            f"the {what} read back differ from the checksums saved with them ({len(bad)} arrays, e.g. {bad[:1]})"
        )


def first_line(error: BaseException) -> str:
    """``'TypeName: first line of the message'`` (at most 200 characters of it), for one-line reports."""
    text = str(error).split(" See full TensorStore details")[0].strip().splitlines()
    return f"{type(error).__name__}: {text[0][:200] if text else ''}"


def _quiet_abandoned_reads() -> None:
    """After a failed restore, orbax leaves read coroutines behind; when Python collects them it prints each
    one's traceback ("Exception ignored in ...", "Event loop is closed"), burying the one-line warning. Those
    (and only those) are dropped; every other unraisable exception still reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_nfjax_quiet", False):
        return

    def hook(unraisable):
        source = getattr(getattr(unraisable.object, "cr_code", None), "co_filename", "") or ""
        message = str(unraisable.exc_value)
        if "orbax" in source or "Event loop is closed" in message or "while reading array index" in message:
            return
        previous(unraisable)

    hook._nfjax_quiet = True
    sys.unraisablehook = hook


def split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(weights, train) items of a train state."""
    return {k: state[k] for k in WEIGHT_KEYS if k in state}, {k: state[k] for k in TRAIN_KEYS if k in state}


class Checkpointer:
    def __init__(self, workdir: str, max_to_keep: int = 3, async_save: bool = True, create: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep,
            enable_async_checkpointing=async_save,
            create=create,
            cleanup_tmp_directories=create,  # a save killed mid-way leaves a temporary folder: removed on restart
        )
        self._manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step of a save that has not been waited for

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def steps(self) -> list[int]:
        """Every complete checkpoint's step, newest first."""
        return sorted(self._manager.all_steps(), reverse=True)

    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Starts an (async) save of a train state; every process must call it. ``wait`` makes it durable."""
        weights, train = split_state(state)
        sums = dict(weights=checksums(weights), train=checksums(train))
        meta = dict(meta, format=FORMAT, weights=sorted(weights), checksums=sums)
        args = ocp.args.Composite(
            weights=ocp.args.StandardSave(weights), train=ocp.args.StandardSave(train), meta=ocp.args.JsonSave(meta)
        )
        self.wait()  # an earlier async save that failed is reported with its own step
        try:
            self._pending = step
            self._manager.save(step, args=args, force=True)
        except Exception as e:
            self._save_failed(e)

    def _step(self, step: int | None) -> int:
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no complete checkpoint in {self.directory}; train longer or check the path")
        return step

    def newest_meta(self) -> dict[str, Any] | None:
        """The meta of the newest step whose meta can be read (None without one); the restore reports damage."""
        for step in self.steps():
            try:
                return self.read_meta(step)
            except Exception:  # a damaged step is reported when its restore is tried
                continue
        return None

    def read_meta(self, step: int | None = None) -> dict[str, Any] | None:
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def _restore(self, step: int, **abstract_items: Any) -> dict[str, Any]:
        """Restores the named items (``meta=None``: the JSON meta)."""
        items = {
            name: ocp.args.JsonRestore() if tree is None else ocp.args.StandardRestore(tree)
            for name, tree in abstract_items.items()
        }
        try:
            return self._manager.restore(step, args=ocp.args.Composite(**items))
        except ValueError as e:  # orbax: the stored tree differs from the target (several lines of diff)
            if "tree structures do not match" not in str(e):
                raise  # damaged files (JSON, array data): the caller may fall back to an older step
            raise CheckpointMismatchError(
                f"the checkpoint at step {step} in {self.directory} does not fit this run's train state "
                f"({str(e).splitlines()[0].rstrip(':')}): optimizer or EMA settings (optim.name, optim.clipping, "
                "optim.ema_decay, ...) differ from the run that wrote it. Nothing was changed. Resume with the "
                "settings the checkpoint was written with, or use a new --workdir."
            ) from None

    def restore(self, abstract_state: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """The whole train state, restored into ``abstract_state`` (ShapeDtypeStructs with shardings: any
        device count works) and verified against its checksums. Default: the newest step."""
        step = self._step(step)
        weights, train = split_state(abstract_state)
        restored = self._restore(step, weights=weights, train=train, meta=None)
        sums = restored["meta"].get("checksums", {})
        verify(restored["weights"], sums.get("weights"), f"weights of step {step}")
        verify(restored["train"], sums.get("train"), f"optimizer state of step {step}")
        return {**restored["weights"], **restored["train"]}

    def restore_weights(self, abstract_weights: dict[str, Any], step: int | None = None) -> dict[str, Any]:
        """Only the weights (params, batch_stats, ema: the keys of ``abstract_weights``), verified; no optimizer
        state is read. Default: the newest step."""
        step = self._step(step)
        restored = self._restore(step, weights=abstract_weights, meta=None)
        verify(restored["weights"], restored["meta"].get("checksums", {}).get("weights"), f"weights of step {step}")
        return dict(restored["weights"])

    def newest_readable(self, read: Any, *, set_aside: bool = False) -> tuple[int, Any] | None:
        """``(step, read(step))`` for the newest step whose ``read`` succeeds (None without checkpoints).

        A step that cannot be read (missing or damaged files, checksum mismatch) is reported in one line on
        stderr and passed over; with ``set_aside`` (a run that will write checkpoints again) its folder is moved
        to ``checkpoints_unreadable/`` next to ``checkpoints/`` so that no later save collides with it. Nothing is
        deleted. Raises CorruptCheckpointError when checkpoints exist but none is readable.
        """
        failures = []
        for step in self.steps():
            try:
                return step, read(step)
            except CheckpointMismatchError:
                raise
            except Exception as e:  # orbax, tensorstore and JSON errors all mean: this step cannot be used
                _quiet_abandoned_reads()
                failures.append(step)
                where = self._set_aside(step) if set_aside else "left in place"
                print(
                    f"warning: checkpoint step {step} in {self.directory} is unreadable ({first_line(e)}); "
                    f"{where}; trying the previous one",
                    file=sys.stderr,
                )
        if failures:
            raise CorruptCheckpointError(
                f"no readable checkpoint in {self.directory} (unreadable steps: {failures}); start a new run with "
                "another --workdir, or restore the files from a backup"
            )
        return None

    def _set_aside(self, step: int) -> str:
        target = os.path.join(os.path.dirname(self.directory), "checkpoints_unreadable", str(step))
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if os.path.exists(target):
                target = f"{target}.{len(os.listdir(os.path.dirname(target)))}"
            shutil.move(os.path.join(self.directory, str(step)), target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"nfjax_set_aside_{step}")
        self._manager.reload()
        return f"moved to {target}"

    def wait(self) -> None:
        """Blocks until pending saves are committed; a failed save raises CheckpointSaveError (never silent)."""
        try:
            self._manager.wait_until_finished()
        except Exception as e:
            self._save_failed(e)
        self._pending = None

    def _save_failed(self, error: Exception) -> None:
        step, self._pending = self._pending, None
        previous = [s for s in self.steps() if step is None or s < step]
        kept = f"the checkpoint of step {previous[0]} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointSaveError(
            f"saving the checkpoint of step {step} in {self.directory} failed ({first_line(error)}); {kept}. "
            "Remove the cause (a full disk, the folder's permissions, or in a multi-process run a process that "
            "died), then rerun the same command to resume."
        ) from None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def newest_meta_in(workdir: str) -> dict[str, Any] | None:
    """The meta of the newest readable checkpoint in ``workdir/checkpoints`` (None without one); no arrays read."""
    ckpt = Checkpointer(workdir, create=False, async_save=False)
    try:
        return ckpt.newest_meta()
    finally:
        ckpt.close()


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
