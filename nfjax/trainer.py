"""The training loop over an :class:`nfjax.experiment.Experiment`.

Data-parallel ``jax.jit`` over a ``data`` mesh (batch sharded, state replicated; with ``train.fsdp`` a
``(data, fsdp)`` mesh whose ``fsdp`` axis splits the large state leaves, see :mod:`nfjax.parallel`), state
created through ``jax.eval_shape`` then a jitted init with output shardings, donated state, ``fold_in(seed,
step)`` RNG, orbax checkpoints with automatic resume, evaluation of raw and EMA weights, JSON-lines +
TensorBoard metrics.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import jax
import ml_collections
import numpy as np

from nfjax import data as data_lib
from nfjax import parallel
from nfjax.checkpoint import Checkpointer, CheckpointSaveError, first_line
from nfjax.class_weights import write_class_weights
from nfjax.clipping import leaf_paths
from nfjax.eval_metrics import split_details
from nfjax.experiment import Experiment, RunError, build_experiment
from nfjax.metrics import MetricWriter, Progress
from nfjax.plateau import HIGHER_IS_BETTER
from nfjax.plateau import describe as describe_plateau
from nfjax.runs import save_config

TRAIN_MEANS = ("loss", "top1", "grad_norm", "param_norm", "update_norm", "agc_clip_fraction")
# Steps dispatched ahead of the newest finished one: the host prepares the next batches while the device computes,
# and the batches queued on the device stay bounded however far apart the log steps are.
MAX_STEPS_IN_FLIGHT = 2


class Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint at the next step boundary and exits cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. tests): no handler
            pass

    def _handle(self, signum, frame):
        self.requested = True

    def close(self) -> None:
        """Gives SIGTERM back to the handler that was there before (in-process callers keep theirs)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def agreed(self) -> bool:
        """True on every process once any process got SIGTERM, so that all of them save the same step
        (orbax saves are collective) and stop together; one process alone would leave the others hanging."""
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.int32(self.requested))))


WATCHDOG = r"""
import os, select, signal, sys
parent, timeout, index = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
state, pending = "before its first step", b""
while True:
    ready, _, _ = select.select([0], [], [], timeout)
    if not ready:
        sys.stderr.write(
            f"error: process {index} of this run made no progress for {timeout:g} s (train.stall_timeout_s), "
            f"{state}: another process of the run has probably died or hangs. Stopping it; rerun the same command "
            "on every process to resume from the last checkpoint.\n"
        )
        sys.stderr.flush()
        os.kill(parent, signal.SIGKILL)
        sys.exit(0)
    chunk = os.read(0, 4096)
    if not chunk:
        sys.exit(0)
    lines = (pending + chunk).split(b"\n")
    pending = lines[-1]
    if len(lines) > 1 and lines[-2]:
        state = lines[-2].decode()
"""


class Watchdog:
    """Multi-process runs: a process whose peer died waits forever in the next collective, possibly inside C++
    code that holds Python's interpreter lock. So the watch runs in a small separate process: it ends this one
    (one message, then SIGKILL) when no step, evaluation or save finished for ``timeout_s``."""

    def __init__(self, timeout_s: float):
        self._proc = None
        if timeout_s > 0 and jax.process_count() > 1:
            args = [sys.executable, "-c", WATCHDOG, str(os.getpid()), str(timeout_s), str(jax.process_index())]
            self._proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)

    def beat(self, where) -> None:
        """Progress was made; ``where()`` says where (shown if the watch fires later; only called when watching)."""
        if self._proc is not None:
            try:
                self._proc.stdin.write(f"{where()}\n".encode())
                self._proc.stdin.flush()
            except OSError:  # the watch is gone: nothing to tell
                self._proc = None

    def close(self) -> None:
        if self._proc is not None:
            self._proc.stdin.close()
            self._proc.wait(timeout=10)
            self._proc = None


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the newest checkpoint in ``workdir``) and returns the final eval metrics."""
    check_workdir(workdir)
    parallel.initialize_distributed(**cfg.distributed.to_dict())
    exp = build_experiment(cfg)
    exp.optimizer  # noqa: B018 - validates the optim section before anything is written
    exp.class_weights  # noqa: B018 - counts the training labels, checks train.class_weights against them
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        exp.init_source  # noqa: B018 - a model.init_from of another model is refused before anything is written
    ckpt = exp.checkpointer(workdir)  # refuses another model's workdir before anything is built or written
    try:
        state = exp.restore_state(ckpt)
        if state is None:
            state = exp.create_state()  # random init, or the weights of model.init_from
        elif exp.init_settings is not None and jax.process_index() == 0:
            print(f"model.init_from is ignored: resuming the run's own checkpoint in {workdir}", file=sys.stderr)
        save_config(cfg, workdir)
        report_bad_files(cfg.data, workdir)
        report_class_weights(exp, workdir)
        return TrainingLoop(exp, workdir, ckpt).run(state)
    except Exception as e:
        if jax.process_count() > 1:
            exit_multiprocess_run(e, ckpt)
        raise
    finally:
        ckpt.close()


def exit_multiprocess_run(error: Exception, ckpt: Checkpointer) -> None:
    """Ends a failed multi-process run at once: one message, exit status 2. Returning would run
    jax.distributed's shutdown, which waits for every peer (a dead one: until its heartbeat times out, 100 s)
    and then aborts with a C++ stack trace; pending checkpoint saves of a failed run are not worth that wait."""
    if isinstance(error, (RunError, CheckpointSaveError)):
        message = str(error)
    else:  # e.g. a collective inside a barrier or an all-gather whose peer is gone
        message = (
            f"{first_line(error)}. In a multi-process run this usually means that another process died or hangs; "
            f"rerun the same command on every process to resume from the checkpoint at step {ckpt.latest_step()}."
        )
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(2)


def check_workdir(workdir: str) -> None:
    """Fails with one paragraph when ``workdir`` cannot hold a run (a file is in the way, or it cannot be
    written). Creates nothing: a run refused later for another reason leaves no folder behind."""
    existing = workdir
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    problem = None
    if not os.path.isdir(existing):
        problem = f"{existing} is a file, not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable by this user"
    if problem:
        raise RunError(
            f"cannot use {workdir} as the workdir ({problem}): give a --workdir that is a folder this user can "
            "create and write (checkpoints, metrics and logs go there)"
        )


def report_bad_files(data_cfg: ml_collections.ConfigDict, workdir: str) -> None:
    """Lists the dataset's unusable files (left out of training and evaluation) in ``workdir/bad_files.txt``
    and says so in one line."""
    bad = data_lib.bad_files(data_cfg)
    if not bad or jax.process_index() != 0:
        return
    path = os.path.join(workdir, "bad_files.txt")
    with open(path, "w") as f:
        f.writelines(f"{file}\t{reason}\n" for file, reason in bad)
    named = ", ".join(f"{os.path.basename(file)} ({reason})" for file, reason in bad[:3])
    print(
        f"warning: {len(bad)} unusable image files left out ({named}{', ...' if len(bad) > 3 else ''}); "
        f"all listed in {path}",
        file=sys.stderr,
    )


def report_class_weights(exp: Experiment, workdir: str) -> None:
    """Prints the loss's class weights in one line and writes all of them, with the label counts, to
    ``workdir/class_weights.json`` (process 0; nothing without ``train.class_weights``)."""
    if exp.class_weights is None or jax.process_index() != 0:
        return
    path = write_class_weights(exp.class_weights, workdir)
    print(f"{exp.class_weights.summary()}; all in {path}", file=sys.stderr)


class TrainingLoop:
    """Steps, logs, evaluates and checkpoints one invocation of a run, from the state's step on."""

    def __init__(self, exp: Experiment, workdir: str, ckpt: Checkpointer):
        self.exp, self.workdir, self.ckpt = exp, workdir, ckpt
        self.train_cfg = exp.cfg.train
        self.step_fn = exp.train_step()
        self.plateau = exp.optimizer.plateau  # reduce-on-plateau, or None
        if self.plateau is not None:
            shardings = exp.state_spec.shardings["plateau"]  # stays where the train step expects it
            self.plateau_fn = jax.jit(self.plateau.update, out_shardings=shardings)

    def run(self, state: dict) -> dict:
        lengths, train = self.exp.lengths, self.train_cfg
        start = int(jax.device_get(state["step"]))
        end = lengths.total_steps if not train.max_steps else min(lengths.total_steps, start + train.max_steps)
        self.writer = MetricWriter(self.workdir, resume_step=start)
        self.progress = Progress(lengths.total_steps, start)
        preempt, final, done = Preemption(), {}, start
        watchdog = Watchdog(train.stall_timeout_s)
        where = lambda: f"last at step {done} (newest checkpoint: step {self.ckpt.latest_step()})"
        try:
            self._announce(start)
            batches = data_lib.build_train_iterator(
                self.exp.cfg.data,
                global_batch=train.global_batch,
                mesh=self.exp.mesh,
                start_step=start,
                seed=train.seed,
            )
            t0, self.consecutive_nonfinite, self.pending, self.interval = time.time(), 0, [], []
            for step in range(start, end):
                state, metrics = self._step(state, self._next_batch(batches, step + 1), step + 1)
                done = step + 1
                self._bound_in_flight(done, metrics)
                watchdog.beat(where)
                self.progress.update(1)
                if done % train.log_every_steps == 0 or done == end:
                    self._flush(state)
                    self._log_train(done, self.interval, time.time() - t0)
                    self.interval, t0 = [], time.time()
                if done % lengths.eval_every == 0 or done == lengths.total_steps:
                    self._flush(state)
                    final = self._evaluate(state, done)
                    state = self._update_plateau(state, final, done)
                    watchdog.beat(where)
                stop = preempt.agreed()
                if done % train.checkpoint_every_steps == 0 or done == end or stop:
                    self._flush(state)  # no checkpoint after an unchecked step (a non-finite one stops the run)
                    self.ckpt.save(done, state, self.exp.checkpoint_meta())
                    watchdog.beat(where)
                if stop:
                    self.progress.write(f"SIGTERM: saved a checkpoint at step {done}; rerun the same command to resume")
                    break
            self._flush(state)
            self.ckpt.wait()
        finally:
            watchdog.close()
            preempt.close()
            self.progress.close()
            self.writer.close()
        if final:  # "finished": the run reached the end of its schedule (not a SIGTERM or train.max_steps stop)
            final["finished"] = done == lengths.total_steps
        if final and jax.process_index() == 0:
            with open(os.path.join(self.workdir, "final_metrics.json"), "w") as f:
                json.dump(final, f, indent=2)
        return final

    def _step(self, state: dict, batch: dict, step: int) -> tuple[dict, dict]:
        """One jitted step, dispatched: its metrics stay on the device until :meth:`_flush`."""
        with self._peer_failure(f"step {step}"):
            return self.step_fn(state, batch)

    def _bound_in_flight(self, step: int, metrics: dict) -> None:
        """Queues the step's metrics and waits (no transfer) until step ``step - MAX_STEPS_IN_FLIGHT`` is done."""
        self.pending.append((step, metrics))
        if len(self.pending) > MAX_STEPS_IN_FLIGHT:
            waited, waited_metrics = self.pending[-1 - MAX_STEPS_IN_FLIGHT]
            with self._peer_failure(f"step {waited}"):
                jax.block_until_ready(waited_metrics["loss"])

    def _flush(self, state: dict) -> None:
        """Fetches the pending steps' metrics in one transfer; in step order, checks each for a non-finite loss
        and adds it to the log interval; shows the last step's loss and learning rate on the progress bar."""
        if not self.pending:
            return
        steps = [step for step, _ in self.pending]
        with self._peer_failure(f"step {steps[0]}" if len(steps) == 1 else f"one of steps {steps[0]}-{steps[-1]}"):
            fetched = jax.device_get([metrics for _, metrics in self.pending])
        self.pending = []
        for step, metrics in zip(steps, fetched, strict=True):
            self._check_finite(metrics, step, state)
            self.interval.append(metrics)
        self.progress.set_postfix(loss=float(fetched[-1]["loss"]), lr=float(fetched[-1]["lr"]))

    @contextlib.contextmanager
    def _peer_failure(self, what: str):
        """In a multi-process run a failed collective means a peer died: one paragraph saying so, not a runtime
        traceback. With asynchronous dispatch the failure surfaces at the step, at a wait or at a fetch."""
        try:
            yield
        except jax.errors.JaxRuntimeError as e:
            if jax.process_count() == 1:
                raise
            raise RunError(
                f"{what} failed in a collective ({first_line(e)}): another process of this run has probably "
                "died. Rerun the same command on every process to resume from the checkpoint at step "
                f"{self.ckpt.latest_step()}."
            ) from None

    def _next_batch(self, batches, step: int) -> dict:
        """The next training batch; an input-pipeline failure (a file damaged past what the pre-scan sees) is
        one paragraph naming the step and the last checkpoint, not a TensorFlow traceback."""
        try:
            return next(batches)
        except Exception as e:
            if not type(e).__module__.startswith("tensorflow"):
                raise
            reason = " ".join(str(e).split())[:300]
            raise RunError(
                f"reading the training data for step {step} failed ({type(e).__name__}: {reason}). A data file "
                f"is probably damaged: remove or replace it and rerun the same command, which resumes from the "
                f"checkpoint at step {self.ckpt.latest_step()}."
            ) from None

    def _announce(self, start: int) -> None:
        exp, train = self.exp, self.train_cfg
        if exp.model.normalizer_free and exp.optimizer.config.clipping != "agc":
            if train.global_batch >= train.warn_no_agc_batch:
                self.progress.write(
                    f"warning: {exp.model.name} is normalizer-free and trains at batch {train.global_batch} "
                    "without AGC; NF models are known to diverge at large batch without it (optim.clipping=agc)"
                )
        if start:
            self.progress.write(f"resuming from the checkpoint at step {start} in {self.workdir}")
        folds = data_lib.fold_note(exp.cfg.data, exp.info.num_train_examples, exp.info.num_eval_examples)
        if folds:
            self.progress.write(folds)

    def _check_finite(self, metrics: dict, step: int, state: dict) -> None:
        """A non-finite loss (the step left the weights untouched) stops the run, naming the step (numbered as
        in the logs: step k is the k-th update) and the parameter with the largest gradient norm; with
        ``train.nonfinite='skip'`` the update is skipped and counted, and only a run of
        ``train.max_consecutive_nonfinite`` such steps stops the run."""
        if metrics["finite"]:
            self.consecutive_nonfinite = 0
            return
        clipping = self.exp.optimizer.config.clipping
        advice = "lower optim.agc_lambda" if clipping == "agc" else "enable AGC (optim.clipping=agc)"
        largest = leaf_paths(state["params"])[int(metrics["largest_grad_param"])]
        what = f"non-finite loss ({metrics['loss']}) at step {step}; the parameter with the largest gradient norm is"
        if self.train_cfg.nonfinite == "skip":
            self.consecutive_nonfinite += 1
            limit = self.train_cfg.max_consecutive_nonfinite
            if self.consecutive_nonfinite < limit:
                self.progress.write(f"warning: {what} {largest}; the update was skipped (train.nonfinite=skip)")
                return
            what = f"{limit} non-finite steps in a row (train.max_consecutive_nonfinite), the last: {what}"
        raise RunError(
            f"{what} {largest}. The update was not applied and no checkpoint was written after step "
            f"{self.ckpt.latest_step()}; lower the learning rate (optim.base_lr) or {advice}, and rerun."
        )

    def _log_train(self, step: int, interval: list[dict], seconds: float) -> None:
        finite = [m for m in interval if m["finite"]]  # skipped steps (train.nonfinite=skip) are counted apart
        means = {k: float(np.mean([m[k] for m in finite])) if finite else float("nan") for k in TRAIN_MEANS}
        means["nonfinite_steps"] = len(interval) - len(finite)
        self.writer.write(
            step,
            "train",
            means
            | dict(
                lr=float(interval[-1]["lr"]),
                **({"lr_scale": float(interval[-1]["lr_scale"])} if "lr_scale" in interval[-1] else {}),
                epoch=step / self.exp.lengths.steps_per_epoch,
                img_per_sec=len(interval) * self.train_cfg.global_batch / seconds,
                step_time=seconds / len(interval),
            ),
        )

    def _evaluate(self, state: dict, step: int) -> dict:
        """Evaluates raw (and EMA) weights: scalars (top1/top5/loss, macro and weighted P/R/F1) to metrics.jsonl,
        the per-class report of this evaluation to ``eval_report.json``; returns the scalars."""
        results, details = {"step": step}, {"step": step, "split": data_lib.eval_split_name(self.exp.cfg.data)}
        for split, metrics in self.exp.evaluate(state).items():
            results[split], details[split] = split_details(metrics)[0], metrics
            self.writer.write(step, split, results[split])
        write_eval_report(self.workdir, details)
        line = "  ".join(
            f"{s} top1 {r['top1']:.4f} loss {r['loss']:.4f} macro_f1 {r['macro_f1']:.4f}"
            for s, r in results.items()
            if s != "step"
        )
        self.progress.write(f"step {step}: {line} ({results['eval']['examples']} examples)")
        return results

    def _update_plateau(self, state: dict, results: dict, step: int) -> dict:
        """Reduce-on-plateau: the evaluation's metric (the same on every process: eval sums are global) updates
        the state's ``plateau`` (checkpointed with it); logged as split 'plateau', and a cut in one line."""
        if self.plateau is None:
            return state
        p = self.plateau
        value = p.value_of(results)
        before = float(jax.device_get(state["plateau"].scale))
        state = dict(state, plateau=self.plateau_fn(state["plateau"], np.float32(value)))
        now = describe_plateau(jax.device_get(state["plateau"]))
        self.writer.write(step, "plateau", dict(value=value) | now)
        if now["lr_scale"] != before:
            fed = f"1 - {p.metric}" if p.metric in HIGHER_IS_BETTER else p.metric
            self.progress.write(
                f"step {step}: {p.split} {fed} = {value:.4g} did not improve on {now['best']:.4g} for "
                f"{p.patience} evaluations (optim.plateau_patience): lr scale {before:.4g} -> {now['lr_scale']:.4g}"
            )
        return state


def write_eval_report(workdir: str, report: dict) -> None:
    """``workdir/eval_report.json`` (process 0): the newest evaluation's per-class metrics and confusion matrix,
    replaced atomically."""
    if jax.process_index() != 0:
        return
    path = os.path.join(workdir, "eval_report.json")
    with open(f"{path}.tmp", "w") as f:
        json.dump(report, f)
    os.replace(f"{path}.tmp", path)
