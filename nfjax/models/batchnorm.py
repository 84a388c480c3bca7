"""BatchNorm of the BN ResNet baseline: global-batch or ghost-group statistics in float32, torch's running-statistics
convention, and the backend's training-mode lowering (:func:`nfjax.models.lowering.batch_norm_train`)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.models import lowering


class BatchNorm(nnx.Module):
    """BatchNorm over N, H, W with optional "ghost" groups; statistics in float32.

    Under ``jax.jit`` with a batch sharded over devices, the mean over the batch axis is a global reduction:
    statistics are those of the global batch, with no axis names. ``ghost_batch_size`` > 0 splits the batch into
    consecutive groups of that size, each normalized with its own statistics (reproduces per-device BN of a
    baseline trained with that per-device batch, independently of the device count here).
    Running statistics: ``mean``/``var`` (nnx.BatchStat) with torch's momentum convention
    new = (1 - momentum) * old + momentum * batch, unbiased variance.
    """

    def __init__(
        self,
        features: int,
        momentum: float = 0.1,
        eps: float = 1e-5,
        ghost_batch_size: int = 0,
        scale_init: float = 1.0,
        dtype=None,
    ):
        self.scale = nnx.Param(jnp.full((features,), scale_init, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((features,), jnp.float32))
        self.momentum = momentum
        self.eps = eps
        self.ghost_batch_size = ghost_batch_size
        self.dtype = dtype

    def _batch_stats(self, x32: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, int]:
        """Returns (mean, var) shaped to broadcast against x, their group averages, and the sample count."""
        n = x32.shape[0]
        g = self.ghost_batch_size
        if g and g < n:
            if n % g:
                raise ValueError(f"batch {n} is not divisible by ghost_batch_size {g}")
            xg = x32.reshape((n // g, g) + x32.shape[1:])
            axes = tuple(range(1, xg.ndim - 1))
            mean = jnp.mean(xg, axis=axes, keepdims=True)
            var = jnp.mean(jnp.square(xg - mean), axis=axes, keepdims=True)
            count = math.prod(xg.shape[1:-1])
            flat = lambda a: a.reshape(a.shape[0], -1).mean(0)
            return mean, var, flat(mean), flat(var), count
        mean, var = lowering.batch_norm_stats(x32)
        return mean, var, mean, var, math.prod(x32.shape[:-1])

    def _update_running(self, mean: jax.Array, var: jax.Array, count: int) -> None:
        """Moves the running statistics towards the batch's (mean [C], biased var [C] over ``count`` samples)."""
        unbiased = var * count / max(count - 1, 1)
        m = self.momentum
        self.mean[...] = (1 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
        self.var[...] = (1 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        dtype = self.dtype or x.dtype
        x32 = x.astype(jnp.float32)
        ghost = 0 < self.ghost_batch_size < x32.shape[0]
        if train and not ghost and lowering.cpu_forms():
            # The same normalization with a closed-form backward (nfjax/models/lowering.py): faster on CPU.
            y, mean, var = lowering.batch_norm_train(x32, self.scale[...], self.bias[...], self.eps)
            self._update_running(mean, var, math.prod(x32.shape[:-1]))
            return y.astype(dtype)
        if train:
            mean, var, mean_avg, var_avg, count = self._batch_stats(x32)
            self._update_running(mean_avg, var_avg, count)
            if mean.ndim == x32.ndim + 1:  # ghost groups
                xg = x32.reshape(mean.shape[:1] + (-1,) + x32.shape[1:])
                y = ((xg - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x32.shape)
            else:
                y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        else:
            y = (x32 - self.mean[...]) * jax.lax.rsqrt(self.var[...] + self.eps)
        return (y * self.scale[...] + self.bias[...]).astype(dtype)
