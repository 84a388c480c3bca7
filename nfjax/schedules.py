"""Learning-rate schedules of the ``optim`` section: ``lr(t)`` at ``t`` = number of updates already applied.

Every schedule is a pure ``jnp`` function of the step (jit- and vmap-safe) built by :func:`build_schedule` from
the validated section; :mod:`nfjax.optim` validates the fields and re-exports everything here. Reduce-on-plateau
is not a schedule: it multiplies the schedule by a scale kept in the train state (:mod:`nfjax.plateau`).
See docs/optim.md#schedules for the formulas as a table.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import ml_collections
import optax

SCHEDULES = ("warmup_cosine", "timm_cosine", "step", "exponential", "cosine_restarts", "constant")
COSINE_SCHEDULES = ("warmup_cosine", "timm_cosine")  # those with a cooldown at the floor
LR_REFERENCE_BATCH = 256  # lr = base_lr * global_batch / 256 (Goyal et al.; DeepMind's lr_scale_by_bs)


def peak_learning_rate(c: ml_collections.ConfigDict, global_batch: int) -> float:
    """``base_lr * global_batch / 256`` when ``scale_lr_by_batch``, else ``base_lr``."""
    return c.base_lr * global_batch / LR_REFERENCE_BATCH if c.scale_lr_by_batch else c.base_lr


def _epoch_steps(epochs: float, steps_per_epoch: float) -> float:
    """``epochs`` in steps: rounded to a whole step when ``steps_per_epoch`` is an int, else exact (a float)."""
    steps = epochs * steps_per_epoch
    return round(steps) if isinstance(steps_per_epoch, numbers.Integral) else steps


def warmup_steps_of(c: ml_collections.ConfigDict, steps_per_epoch: float) -> float:
    """``warmup_steps`` if > 0, else ``warmup_epochs`` in steps (:func:`_epoch_steps`)."""
    return int(c.warmup_steps) if c.warmup_steps > 0 else _epoch_steps(c.warmup_epochs, steps_per_epoch)


def decay_end_of(c: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int) -> float:
    """The step where a cosine reaches its floor: ``total_steps`` less ``cooldown_epochs`` in steps."""
    return total_steps - _epoch_steps(c.cooldown_epochs, steps_per_epoch)


def boundary_steps_of(c: ml_collections.ConfigDict, steps_per_epoch: float) -> list[float]:
    """``schedule='step'``: the ``step_boundaries_epochs`` in steps (:func:`_epoch_steps`)."""
    return [_epoch_steps(e, steps_per_epoch) for e in c.step_boundaries_epochs]


def _epoch_start(step: jax.Array, steps_per_epoch: float) -> jax.Array:
    """The first step of ``step``'s epoch, ``floor(step / steps_per_epoch) * steps_per_epoch`` (fractional when
    ``steps_per_epoch`` is): the lr is then held for the whole epoch, as timm's per-epoch scheduler step."""
    if isinstance(steps_per_epoch, numbers.Integral):
        return (step // steps_per_epoch) * steps_per_epoch
    return jnp.floor(step.astype(jnp.float32) / steps_per_epoch) * steps_per_epoch


def restart_cycle(epochs: jax.Array, period: float, mult: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """SGDR's cycle of ``epochs`` (>= 0, float) epochs after the warmup: ``(i, start, length)`` in epochs.

    Cycle ``i`` lasts ``P m^i`` epochs (``P = period``, ``m = mult``) and starts at ``P i`` when ``m = 1``, else at
    ``P (m^i - 1) / (m - 1)``, so ``i = floor(log(1 + e (m - 1) / P) / log m)``. The float32 logarithm can land
    one cycle off right at a boundary (so can ``e / P``); one correction each way makes ``start <= e < next start``.
    """
    growth = jnp.float32(mult)
    if mult == 1:
        start_of = lambda i: period * i
        i = jnp.floor(epochs / period)
    else:
        start_of = lambda i: period * (jnp.power(growth, i) - 1) / (mult - 1)
        i = jnp.floor(jnp.log1p(epochs * (mult - 1) / period) / math.log(mult))
    i = jnp.where(start_of(i + 1) <= epochs, i + 1, i)
    i = jnp.maximum(jnp.where(start_of(i) > epochs, i - 1, i), 0)
    return i, start_of(i), period * jnp.power(growth, i)


def _after_warmup(c: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int, global_batch: int):
    """``lr(t)`` for ``t >= W`` (the warmup's end), per ``c.schedule``; see :func:`build_schedule`."""
    peak, warmup = peak_learning_rate(c, global_batch), warmup_steps_of(c, steps_per_epoch)
    end, floor = decay_end_of(c, steps_per_epoch, total_steps), c.end_lr_factor * peak
    bounds = boundary_steps_of(c, steps_per_epoch)

    def lr(t: jax.Array) -> jax.Array:
        if c.schedule in COSINE_SCHEDULES:
            first = warmup if c.schedule == "warmup_cosine" else 0.0
            progress = (jnp.minimum(t, end) - first) / (end - first)
            return 0.5 * (peak - floor) * (1 + jnp.cos(jnp.pi * progress)) + floor  # DeepMind's order of operations
        epochs = jnp.maximum(t - warmup, 0.0) / steps_per_epoch  # epochs since the warmup (0 inside it)
        if c.schedule == "step":
            passed = sum((t >= b).astype(jnp.float32) for b in bounds)
            return peak * jnp.power(jnp.float32(c.step_decay_factor), passed)
        if c.schedule == "exponential":
            return jnp.maximum(peak * jnp.power(jnp.float32(c.exp_decay_rate), epochs), floor)
        if c.schedule == "cosine_restarts":
            i, start, length = restart_cycle(epochs, c.restart_epochs, c.restart_mult)
            top = jnp.maximum(peak * jnp.power(jnp.float32(c.restart_decay), i), floor)
            return 0.5 * (top - floor) * (1 + jnp.cos(jnp.pi * (epochs - start) / length)) + floor
        return jnp.full_like(t, peak)

    return lr


def build_schedule(
    c: ml_collections.ConfigDict, *, steps_per_epoch: float, total_steps: int, global_batch: int
) -> optax.Schedule:
    """The lr schedule, evaluated at the number of updates already applied (``t = 0`` for the first).

    With ``W`` warmup steps, ``T = total_steps``, ``D = T - cooldown`` (the cosine's end), peak ``L``, warmup start
    ``S = warmup_start_lr``, floor ``F = end_lr_factor * L``, ``E = steps_per_epoch`` and ``e = (t - W) / E`` (epochs
    since the warmup): ``lr(t) = S + (L - S) t / W`` for ``t < W``, then

    - ``warmup_cosine``: ``F + (L - F) (1 + cos(pi (min(t, D) - W) / (D - W))) / 2``, the cosine after the warmup
      (DeepMind's WarmupCosineDecay; timm's cosine with ``warmup_prefix=True``);
    - ``timm_cosine``: ``F + (L - F) (1 + cos(pi min(t, D) / D)) / 2``, the cosine over the whole run, the warmup
      overlaid on its start (timm's CosineLRScheduler with its default ``warmup_prefix=False``);
    - ``step``: ``L * step_decay_factor ** (number of boundaries <= t)``, multi-step (torch's MultiStepLR);
    - ``exponential``: ``max(L * exp_decay_rate ** e, F)`` (torch's ExponentialLR, its gamma per epoch);
    - ``cosine_restarts``: SGDR, cycle ``i`` (:func:`restart_cycle`) starting ``s_i`` epochs after the warmup and
      lasting ``P_i = restart_epochs * restart_mult ** i`` epochs, from ``L_i = max(L * restart_decay ** i, F)``:
      ``F + (L_i - F) (1 + cos(pi (e - s_i) / P_i)) / 2`` (torch's CosineAnnealingWarmRestarts, eta_min ``F``);
    - ``constant``: ``L``.

    ``W``, ``D`` and the step boundaries are whole steps when ``steps_per_epoch`` is an int and fractional when it is
    a float (DeepMind's ``warmup_steps = 5 * images_per_epoch / batch``); ``e`` is a float either way, so restart
    cycles need not start on a whole step. ``schedule_unit='epoch'`` evaluates the schedule at the first step of
    ``t``'s epoch, so the lr of epoch ``k`` is ``lr(k * steps_per_epoch)`` (a staircase, as torch stepped per epoch).
    """
    peak, start = peak_learning_rate(c, global_batch), c.warmup_start_lr
    warmup = warmup_steps_of(c, steps_per_epoch)
    after_warmup = _after_warmup(c, steps_per_epoch, total_steps, global_batch)

    def schedule(step: jax.typing.ArrayLike) -> jax.Array:
        step = jnp.asarray(step)
        t = (_epoch_start(step, steps_per_epoch) if c.schedule_unit == "epoch" else step).astype(jnp.float32)
        if warmup == 0:
            return after_warmup(t)
        return jnp.where(t < warmup, (peak - start) * (t / warmup) + start, after_warmup(t))

    return schedule
