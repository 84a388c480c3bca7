"""The training loop over an :class:`nfjax.experiment.Experiment`.

Data-parallel ``jax.jit`` over a ``data`` mesh (batch sharded, state replicated), state created through
``jax.eval_shape`` then a jitted init with output shardings, donated state, ``fold_in(seed, step)`` RNG, orbax
checkpoints with automatic resume, evaluation of raw and EMA weights, JSON-lines + TensorBoard metrics.
"""

from __future__ import annotations

import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np

from nfjax import data as data_lib
from nfjax import parallel
from nfjax.checkpoint import Checkpointer
from nfjax.clipping import leaf_paths
from nfjax.experiment import Experiment, RunError, build_experiment, save_config
from nfjax.metrics import MetricWriter, Progress

TRAIN_MEANS = ("loss", "top1", "grad_norm", "param_norm", "update_norm", "agc_clip_fraction")


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


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the newest checkpoint in ``workdir``) and returns the final eval metrics."""
    parallel.initialize_distributed(**cfg.distributed.to_dict())
    exp = build_experiment(cfg)
    exp.optimizer  # noqa: B018 - validates the optim section before anything is written
    ckpt = exp.checkpointer(workdir)  # refuses another model's workdir before anything is built or written
    try:
        state = exp.restore_state(ckpt) if ckpt.latest_step() is not None else exp.create_state()
        save_config(cfg, workdir)
        return TrainingLoop(exp, workdir, ckpt).run(state)
    finally:
        ckpt.close()


class TrainingLoop:
    """Steps, logs, evaluates and checkpoints one invocation of a run, from the state's step on."""

    def __init__(self, exp: Experiment, workdir: str, ckpt: Checkpointer):
        self.exp, self.workdir, self.ckpt = exp, workdir, ckpt
        self.train_cfg = exp.cfg.train
        self.step_fn = exp.train_step()

    def run(self, state: dict) -> dict:
        lengths, train = self.exp.lengths, self.train_cfg
        start = int(jax.device_get(state["step"]))
        end = lengths.total_steps if not train.max_steps else min(lengths.total_steps, start + train.max_steps)
        self.writer, self.progress = MetricWriter(self.workdir), Progress(lengths.total_steps, start)
        preempt, final = Preemption(), {}
        try:
            self._announce(start)
            batches = data_lib.build_train_iterator(
                self.exp.cfg.data,
                global_batch=train.global_batch,
                mesh=self.exp.mesh,
                start_step=start,
                seed=train.seed,
            )
            interval, t0 = [], time.time()
            for step in range(start, end):
                state, metrics = self.step_fn(state, next(batches))
                metrics = jax.device_get(metrics)
                self._check_finite(metrics, step + 1, state)
                interval.append(metrics)
                done = step + 1
                self.progress.update(1, loss=float(metrics["loss"]), lr=float(metrics["lr"]))
                if done % train.log_every_steps == 0 or done == end:
                    self._log_train(done, interval, time.time() - t0)
                    interval, t0 = [], time.time()
                if done % lengths.eval_every == 0 or done == lengths.total_steps:
                    final = self._evaluate(state, done)
                stop = preempt.agreed()
                if done % train.checkpoint_every_steps == 0 or done == end or stop:
                    self.ckpt.save(done, state, self.exp.checkpoint_meta())
                if stop:
                    self.progress.write(f"SIGTERM: saved a checkpoint at step {done}; rerun the same command to resume")
                    break
            self.ckpt.wait()
        finally:
            preempt.close()
            self.progress.close()
            self.writer.close()
        if final and jax.process_index() == 0:
            with open(os.path.join(self.workdir, "final_metrics.json"), "w") as f:
                json.dump(final, f, indent=2)
        return final

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

    def _check_finite(self, metrics: dict, step: int, state: dict) -> None:
        """Stops the run on a non-finite loss (the step left the state untouched), naming the step (numbered
        as in the logs: step k is the k-th update) and the parameter with the largest gradient norm."""
        if metrics["finite"]:
            return
        clipping = self.exp.optimizer.config.clipping
        advice = "lower optim.agc_lambda" if clipping == "agc" else "enable AGC (optim.clipping=agc)"
        largest = leaf_paths(state["params"])[int(metrics["largest_grad_param"])]
        raise RunError(
            f"non-finite loss ({metrics['loss']}) at step {step}; the parameter with the largest gradient norm is "
            f"{largest}. The update was not applied and no checkpoint was written after step "
            f"{self.ckpt.latest_step()}; lower the learning rate (optim.base_lr) or {advice}, and rerun."
        )

    def _log_train(self, step: int, interval: list[dict], seconds: float) -> None:
        means = {k: float(np.mean([m[k] for m in interval])) for k in TRAIN_MEANS}
        self.writer.write(
            step,
            "train",
            means
            | dict(
                lr=float(interval[-1]["lr"]),
                epoch=step / self.exp.lengths.steps_per_epoch,
                img_per_sec=len(interval) * self.train_cfg.global_batch / seconds,
                step_time=seconds / len(interval),
            ),
        )

    def _evaluate(self, state: dict, step: int) -> dict:
        results = {"step": step, **self.exp.evaluate(state)}
        for split in ("eval", "eval_ema"):
            if split in results:
                self.writer.write(step, split, results[split])
        line = "  ".join(f"{s} top1 {r['top1']:.4f} loss {r['loss']:.4f}" for s, r in results.items() if s != "step")
        self.progress.write(f"step {step}: {line} ({results['eval']['examples']} examples)")
        return results
