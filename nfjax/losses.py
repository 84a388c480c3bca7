"""Classification losses. Logits are cast to float32 first; every loss returns per-example values [N].

Targets are either integer labels [N] or soft targets [N, C]. Label smoothing, MixUp/CutMix and the BCE target
threshold are applied to the targets by the input pipeline (``label_probs``), so the losses take no such options.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

LOSSES = ("softmax_xent", "sigmoid_bce", "focal")


def _as_probs(targets: jax.Array, num_classes: int) -> jax.Array:
    if targets.ndim == 1:
        return jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    return targets.astype(jnp.float32)


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-sum_c t_c log softmax(z)_c."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), _as_probs(targets, logits.shape[-1]))


def sigmoid_binary_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """BCE summed over classes (the RSB recipes): mean over classes * C as timm's BinaryCrossEntropy."""
    probs = _as_probs(targets, logits.shape[-1])
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), probs), axis=-1)


def focal_loss(logits: jax.Array, targets: jax.Array, gamma: float = 2.0) -> jax.Array:
    """Softmax focal loss (Lin et al. 2017): -sum_c t_c (1 - p_c)^gamma log p_c."""
    probs = _as_probs(targets, logits.shape[-1])
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(probs * jnp.power(1.0 - jnp.exp(log_p), gamma) * log_p, axis=-1)


def make_loss_fn(name: str, *, focal_gamma: float = 2.0) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns loss(logits, targets) -> [N] for a config's ``train.loss``."""
    if name == "softmax_xent":
        return softmax_cross_entropy
    if name == "sigmoid_bce":
        return sigmoid_binary_cross_entropy
    if name == "focal":
        return lambda z, t: focal_loss(z, t, focal_gamma)
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
