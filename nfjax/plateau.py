"""Reduce-on-plateau: a learning-rate scale, cut when an evaluation metric stops improving, on top of any schedule.

The effective lr of step ``t`` is ``schedule(t) * scale``. ``scale`` starts at 1 and lives in the train state
(key ``plateau``, an ``optax.contrib.ReduceLROnPlateauState``), so it is checkpointed and a resumed run goes on
with the same scale, best value and counters. The train step multiplies the optimizer's final updates by it
(every optimizer here applies ``-lr(t)`` last, so that is the lr times the scale); the trainer feeds each
evaluation's metric to :meth:`Plateau.update`, which is optax's ``reduce_on_plateau`` logic with
``accumulation_size=1``. With ``v_n`` the value of evaluation ``n`` (lower is better):

    improved  <=>  v_n < (1 - threshold) * best                (best = min of the earlier values, +inf at first)
    bad       <-   0 if improved else bad + 1
    bad == patience (outside a cooldown): scale <- max(scale * factor, min_scale), bad <- 0, cooldown <- cooldown_n
    inside a cooldown (cooldown > 0): bad <- 0, cooldown <- cooldown - 1

Metrics where higher is better (``top1``, ``macro_f1``, both in [0, 1]) are fed as the error ``1 - metric``, so
the relative threshold stays meaningful (optax's relative test assumes positive values).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from optax.contrib import ReduceLROnPlateauState, reduce_on_plateau

HIGHER_IS_BETTER = ("top1", "macro_f1")


@dataclasses.dataclass(frozen=True)
class Plateau:
    """The ``optim.plateau_*`` fields (validated by :func:`nfjax.optim.validate_optim_config`)."""

    patience: int  # evaluations without improvement before the scale is cut (>= 1)
    factor: float  # scale <- scale * factor, in (0, 1)
    metric: str  # 'loss' | 'top1' | 'macro_f1'
    split: str  # 'eval' (raw weights) | 'eval_ema'
    threshold: float  # relative improvement needed, in (0, 1]
    cooldown: int  # evaluations after a cut during which nothing counts as bad
    min_scale: float  # the scale never goes below this

    @classmethod
    def from_config(cls, c: ml_collections.ConfigDict) -> Plateau | None:
        """None when ``plateau_patience == 0`` (off)."""
        if c.plateau_patience == 0:
            return None
        return cls(
            patience=int(c.plateau_patience),
            factor=float(c.plateau_factor),
            metric=c.plateau_metric,
            split=c.plateau_split,
            threshold=float(c.plateau_threshold),
            cooldown=int(c.plateau_cooldown),
            min_scale=float(c.plateau_min_scale),
        )

    @property
    def _transform(self) -> optax.GradientTransformationExtraArgs:
        return reduce_on_plateau(
            factor=self.factor,
            patience=self.patience,
            rtol=self.threshold,
            atol=0.0,
            cooldown=self.cooldown,
            accumulation_size=1,
            min_scale=self.min_scale,
        )

    def init(self) -> ReduceLROnPlateauState:
        """scale 1 (float32), best +inf, counters 0."""
        return self._transform.init(jnp.zeros((), jnp.float32))

    def value_of(self, results: dict[str, Any]) -> float:
        """The number fed to :meth:`update` from one evaluation's ``{split: {metric: value}}``: the metric, or
        ``1 - metric`` when higher is better."""
        value = float(results[self.split][self.metric])
        return 1.0 - value if self.metric in HIGHER_IS_BETTER else value

    def update(self, state: ReduceLROnPlateauState, value: float | np.floating | jax.Array) -> ReduceLROnPlateauState:
        """The state after one evaluation with value ``value`` (lower is better); pure, jit-able."""
        _, state = self._transform.update((), state, value=jnp.asarray(value, jnp.float32))
        return state


def describe(state: ReduceLROnPlateauState) -> dict[str, float]:
    """The state as logged: ``lr_scale``, ``best`` (as fed: the error for higher-is-better metrics),
    ``bad_evaluations``, ``cooldown_left``."""
    return dict(
        lr_scale=float(state.scale),
        best=float(state.best_value),
        bad_evaluations=int(state.plateau_count),
        cooldown_left=int(state.cooldown_count),
    )
