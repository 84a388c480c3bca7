"""Classification losses. Logits are cast to float32 first; every loss returns per-example values [N].

Targets are either integer labels [N] or soft targets [N, C] (after MixUp/CutMix, label smoothing or BCE
binarization in the input pipeline).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

LOSSES = ("softmax_xent", "sigmoid_bce", "focal")


def _as_probs(targets: jax.Array, num_classes: int) -> jax.Array:
    if targets.ndim == 1:
        return jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    return targets.astype(jnp.float32)


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0) -> jax.Array:
    """-sum_c t_c log softmax(z)_c with t = (1 - s) * t + s / C (smoothing applied after mixing)."""
    probs = _as_probs(targets, logits.shape[-1])
    if label_smoothing:
        probs = optax.smooth_labels(probs, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), probs)


def sigmoid_binary_cross_entropy(
    logits: jax.Array, targets: jax.Array, label_smoothing: float = 0.0, target_threshold: float | None = None
) -> jax.Array:
    """BCE summed over classes (the RSB recipes): mean over classes * C as timm's BinaryCrossEntropy.

    ``target_threshold`` binarizes (mixed) targets: t > threshold -> 1 else 0 (RSB A1 uses 0.2).
    """
    num_classes = logits.shape[-1]
    probs = _as_probs(targets, num_classes)
    if label_smoothing:
        # timm: off = s / C, on = 1 - s + off, applied to one-hot targets before mixing; same values here.
        probs = optax.smooth_labels(probs, label_smoothing)
    if target_threshold is not None:
        probs = (probs > target_threshold).astype(jnp.float32)
    per_class = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), probs)
    return jnp.sum(per_class, axis=-1)


def focal_loss(logits: jax.Array, targets: jax.Array, gamma: float = 2.0, label_smoothing: float = 0.0) -> jax.Array:
    """Softmax focal loss (Lin et al. 2017): -sum_c t_c (1 - p_c)^gamma log p_c."""
    probs = _as_probs(targets, logits.shape[-1])
    if label_smoothing:
        probs = optax.smooth_labels(probs, label_smoothing)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(probs * jnp.power(1.0 - jnp.exp(log_p), gamma) * log_p, axis=-1)


def make_loss_fn(name: str, *, label_smoothing: float = 0.0, bce_threshold: float | None = None, focal_gamma=2.0):
    """Returns loss(logits, targets) -> [N] for a config's ``train.loss``."""
    if name == "softmax_xent":
        return lambda z, t: softmax_cross_entropy(z, t, label_smoothing)
    if name == "sigmoid_bce":
        return lambda z, t: sigmoid_binary_cross_entropy(z, t, label_smoothing, bce_threshold)
    if name == "focal":
        return lambda z, t: focal_loss(z, t, focal_gamma, label_smoothing)
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
