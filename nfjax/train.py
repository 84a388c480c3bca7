"""Training: ``python -m nfjax.train --config configs/X.py[:key=value,...] --workdir DIR [--config.a.b=value]``.

Data-parallel ``jax.jit`` over a ``data`` mesh (batch sharded, state replicated), state created through
``jax.eval_shape`` then a jitted init with output shardings, donated state, ``fold_in(seed, step)`` RNG, orbax
checkpoints with automatic resume, evaluation of raw and EMA weights, JSON-lines + TensorBoard metrics.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any

from nfjax.host_devices import configure_host_devices

configure_host_devices()  # before JAX starts: one XLA device per CPU core (no effect on GPU/TPU)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from nfjax import data as data_lib  # noqa: E402
from nfjax import optim, parallel  # noqa: E402
from nfjax.checkpoint import Checkpointer, abstract_like, check_compatible  # noqa: E402
from nfjax.losses import make_loss_fn  # noqa: E402
from nfjax.metrics import MetricWriter, Progress  # noqa: E402
from nfjax.models import create_model, model_metadata  # noqa: E402
from nfjax.steps import leaf_paths, make_eval_step, make_train_step  # noqa: E402


class TrainingError(RuntimeError):
    """A run stopped for a reason the user must act on (non-finite loss, ...)."""


def compute_dtype(name: str):
    """'auto': bfloat16 on GPU/TPU, float32 on CPU (bf16 is slower than f32 on CPU). None means float32."""
    if name == "auto":
        return jnp.bfloat16 if jax.default_backend() in ("gpu", "tpu") else None
    if name not in ("float32", "bfloat16"):
        raise ValueError(f"train.compute_dtype must be 'auto', 'float32' or 'bfloat16', got {name!r}")
    return jnp.bfloat16 if name == "bfloat16" else None


def model_spec(cfg, info) -> dict[str, Any]:
    """What identifies the model of a run (stored in every checkpoint and compared on resume)."""
    kwargs = json.loads(json.dumps(cfg.model.kwargs.to_dict()))
    return dict(
        model=cfg.model.name, model_kwargs=kwargs, num_classes=info.num_classes, in_channels=info.image_shape[-1]
    )


def make_model_fn(cfg, info):
    model_metadata(cfg.model.name)  # unknown model names fail here, listing the valid ones
    dtype = compute_dtype(cfg.train.compute_dtype)
    kwargs = cfg.model.kwargs.to_dict() | ({"dtype": dtype} if dtype is not None else {})
    return lambda rngs: create_model(cfg.model.name, info.num_classes, info.image_shape[-1], rngs=rngs, **kwargs)


def train_state_spec(make_model, tx, mesh, use_ema: bool):
    """Returns (graphdef, init, abstract_state, shardings) without computing anything.

    ``init(key)`` builds the state (step, params, opt_state, batch_stats if any, ema if ``use_ema``);
    ``abstract_state`` holds its ShapeDtypeStructs, the restore target together with ``shardings``.
    """
    graphdef = nnx.split(nnx.eval_shape(lambda: make_model(nnx.Rngs(0))))[0]

    def init(key):
        model = make_model(nnx.Rngs(params=key))
        _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
        params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
        state = dict(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
        if stats:
            state["batch_stats"] = stats
        if use_ema:
            state["ema"] = optim.init_ema(params)
        return state

    abstract = jax.eval_shape(init, jax.random.key(0))
    return graphdef, init, abstract, parallel.param_sharding(mesh, abstract)


def create_train_state(make_model, tx, mesh, seed: int, use_ema: bool):
    """Returns (graphdef, state, shardings); the state is built by a jitted init straight into its shardings."""
    graphdef, init, _, shardings = train_state_spec(make_model, tx, mesh, use_ema)
    state = jax.jit(init, out_shardings=shardings)(jax.random.key(seed))
    return graphdef, state, shardings


def build_optimizer_for(cfg, info):
    """(tx, schedule, steps_per_epoch, total_steps, eval_every) of a run, as training builds them."""
    spe, total_steps, eval_every = _schedule_lengths(cfg, info)
    tx, schedule = optim.build_optimizer(
        cfg.optim, steps_per_epoch=spe, total_steps=total_steps, global_batch=cfg.train.global_batch
    )
    return tx, schedule, spe, total_steps, eval_every


def _schedule_lengths(cfg, info) -> tuple[int, int, int]:
    steps_per_epoch = info.num_train_examples // cfg.train.global_batch
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.global_batch={cfg.train.global_batch} exceeds the {info.num_train_examples} "
            "training examples; use a smaller batch"
        )
    total = cfg.train.total_steps or max(1, round(cfg.train.epochs * steps_per_epoch))
    every = cfg.train.eval_every_steps or max(1, round(cfg.train.eval_every_epochs * steps_per_epoch))
    return steps_per_epoch, total, every


def evaluate(eval_step, params, batch_stats, cfg, mesh, expected: int, split: str | None = None) -> dict:
    """Top-1/top-5/loss over the whole eval split; every example counted exactly once (pad + mask)."""
    batch = cfg.train.eval_batch or cfg.train.global_batch
    sums: dict[str, float] = {}
    for b in data_lib.build_eval_iterator(cfg.data, global_batch=batch, split=split, mesh=mesh):
        for k, v in jax.device_get(eval_step(params, batch_stats, b)).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    count = int(round(sums.get("count", 0)))
    if count != expected:
        raise TrainingError(f"evaluation counted {count} examples, expected {expected}")
    return dict(top1=sums["top1"] / count, top5=sums["top5"] / count, loss=sums["loss"] / count, examples=count)


def _warn_if_no_agc(cfg, progress: Progress) -> None:
    family = model_metadata(cfg.model.name).get("family", "")
    if (
        family.startswith("nf")
        and cfg.optim.clipping != "agc"
        and cfg.train.global_batch >= cfg.train.warn_no_agc_batch
    ):
        progress.write(
            f"warning: {cfg.model.name} is normalizer-free and trains at batch {cfg.train.global_batch} "
            "without AGC; NF models are known to diverge at large batch without it (optim.clipping=agc)"
        )


class _Preemption:
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


def prepare_data(cfg) -> None:
    """Fashion-MNIST is prepared once from the Debian package files into the TFDS data_dir (offline)."""
    if cfg.data.dataset == "fashion_mnist":
        data_lib.prepare_fashion_mnist(os.path.expanduser(cfg.data.data_dir))


def train_and_evaluate(cfg: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains (resuming from the newest checkpoint in ``workdir``) and returns the final eval metrics."""
    parallel.initialize_distributed(**cfg.distributed.to_dict())
    prepare_data(cfg)
    info = data_lib.dataset_info(cfg.data)
    make_model = make_model_fn(cfg, info)
    mesh = parallel.make_mesh(cfg.train.num_devices or None)
    data_lib.check_global_batch(cfg.train.global_batch, jax.process_count(), mesh.devices.size)
    tx, schedule, spe, total_steps, eval_every = build_optimizer_for(cfg, info)
    spec = model_spec(cfg, info) | dict(dataset=cfg.data.dataset, global_batch=cfg.train.global_batch)
    ckpt = Checkpointer(workdir, cfg.train.keep_checkpoints, cfg.train.async_checkpoints)
    check_compatible(ckpt.read_meta(), spec, workdir)  # before anything is built or written
    use_ema = cfg.optim.ema_decay > 0
    if ckpt.latest_step() is not None:  # resume: restore straight into the shardings, no init needed
        graphdef, _, abstract, shardings = train_state_spec(make_model, tx, mesh, use_ema)
        state, _ = ckpt.restore(abstract_like(abstract, shardings))
    else:
        graphdef, state, _ = create_train_state(make_model, tx, mesh, cfg.train.seed, use_ema)
    _save_config(cfg, workdir)
    loss_fn = make_loss_fn(cfg.train.loss, bce_threshold=None, focal_gamma=cfg.train.focal_gamma)
    step_fn = jax.jit(
        make_train_step(graphdef, tx, schedule, loss_fn, cfg.optim, seed=cfg.train.seed, mesh=mesh), donate_argnums=0
    )
    eval_fn = jax.jit(make_eval_step(graphdef, make_loss_fn("softmax_xent")))
    return _loop(cfg, workdir, state, step_fn, eval_fn, ckpt, spec, mesh, info, total_steps, eval_every, spe)


def _loop(cfg, workdir, state, step_fn, eval_fn, ckpt, spec, mesh, info, total_steps, eval_every, spe) -> dict:
    start = int(jax.device_get(state["step"]))
    end = total_steps if not cfg.train.max_steps else min(total_steps, start + cfg.train.max_steps)
    writer, progress, preempt = MetricWriter(workdir), Progress(total_steps, start), _Preemption()
    _warn_if_no_agc(cfg, progress)
    if start:
        progress.write(f"resuming from the checkpoint at step {start} in {workdir}")
    batches = data_lib.build_train_iterator(
        cfg.data, global_batch=cfg.train.global_batch, mesh=mesh, start_step=start, seed=cfg.train.seed
    )
    paths, interval, t0, final = leaf_paths(state["params"]), [], time.time(), {}
    try:
        for step in range(start, end):
            state, metrics = step_fn(state, next(batches))
            metrics = jax.device_get(metrics)
            if not metrics["finite"]:
                advice = "lower optim.agc_lambda" if cfg.optim.clipping == "agc" else "enable AGC (optim.clipping=agc)"
                raise TrainingError(  # steps are numbered as in the logs: step k is the k-th update
                    f"non-finite loss ({metrics['loss']}) at step {step + 1}; the parameter with the largest "
                    f"gradient norm is {paths[int(metrics['largest_grad_param'])]}. The update was not applied and "
                    f"no checkpoint was written after step {ckpt.latest_step()}; lower the learning rate "
                    f"(optim.base_lr) or {advice}, and rerun."
                )
            interval.append(metrics)
            done = step + 1
            progress.update(1, loss=float(metrics["loss"]), lr=float(metrics["lr"]))
            if done % cfg.train.log_every_steps == 0 or done == end:
                _log_train(writer, done, interval, time.time() - t0, cfg.train.global_batch, spe)
                interval, t0 = [], time.time()
            if done % eval_every == 0 or done == total_steps:
                final = _evaluate_all(cfg, eval_fn, state, mesh, info, writer, done, progress)
            stop = preempt.agreed()
            if done % cfg.train.checkpoint_every_steps == 0 or done == end or stop:
                ckpt.save(done, state, spec)
            if stop:
                progress.write(f"SIGTERM: saved a checkpoint at step {done}; rerun the same command to resume")
                break
        ckpt.wait()
    finally:
        preempt.close()
        progress.close()
        writer.close()
        ckpt.close()
    if final and jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
    return final


def _log_train(writer, step, interval, seconds, global_batch, spe) -> None:
    means = {
        k: float(np.mean([m[k] for m in interval]))
        for k in ("loss", "top1", "grad_norm", "param_norm", "update_norm", "agc_clip_fraction")
    }
    writer.write(
        step,
        "train",
        means
        | dict(
            lr=float(interval[-1]["lr"]),
            epoch=step / spe,
            img_per_sec=len(interval) * global_batch / seconds,
            step_time=seconds / len(interval),
        ),
    )


def _evaluate_all(cfg, eval_fn, state, mesh, info, writer, step, progress) -> dict:
    stats = state.get("batch_stats", {})
    results = {"step": step, "eval": evaluate(eval_fn, state["params"], stats, cfg, mesh, info.num_eval_examples)}
    if "ema" in state:
        results["eval_ema"] = evaluate(eval_fn, state["ema"], stats, cfg, mesh, info.num_eval_examples)
    for split in ("eval", "eval_ema"):
        if split in results:
            writer.write(step, split, results[split])
    line = "  ".join(f"{s} top1 {r['top1']:.4f} loss {r['loss']:.4f}" for s, r in results.items() if s != "step")
    progress.write(f"step {step}: {line} ({results['eval']['examples']} examples)")
    return results


def _save_config(cfg, workdir: str) -> None:
    if jax.process_index() == 0:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(cfg.to_json_best_effort(indent=2))


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run in ``workdir`` was started with."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: is {workdir} the --workdir of a training run?")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def main(argv: list[str] | None = None) -> int:
    from nfjax.cli import run_cli

    return run_cli("nfjax.train", argv, lambda cfg, workdir: train_and_evaluate(cfg, workdir))


if __name__ == "__main__":
    sys.exit(main())
