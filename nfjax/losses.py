"""Classification losses. Logits are cast to float32 first; every loss returns per-example values [N].

Targets are either integer labels [N] or soft targets [N, C]. Label smoothing, MixUp/CutMix and the BCE target
threshold are applied to the targets by the input pipeline (``label_probs``), so the losses take no such options.

Class weights ``w`` [C] (``train.class_weights``, see :mod:`nfjax.class_weights`) scale each class's term of the
softmax losses: ``-sum_c w_c t_c log p_c``, so an integer label y gives ``w_y`` times the plain loss and a soft
target weighs every class it mixes. The train step keeps the plain mean over the batch (Keras' ``class_weight``).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

LOSSES = ("softmax_xent", "sigmoid_bce", "focal")
BCE_REDUCTIONS = ("mean", "sum")


def _as_probs(targets: jax.Array, num_classes: int) -> jax.Array:
    if targets.ndim == 1:
        return jax.nn.one_hot(targets, num_classes, dtype=jnp.float32)
    return targets.astype(jnp.float32)


def _weighted_probs(targets: jax.Array, num_classes: int, class_weights: jax.Array | None) -> jax.Array:
    """``w_c t_c`` [N, C] (``t_c`` when no weights are given)."""
    probs = _as_probs(targets, num_classes)
    return probs if class_weights is None else probs * jnp.asarray(class_weights, jnp.float32)


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array, class_weights: jax.Array | None = None) -> jax.Array:
    """-sum_c w_c t_c log softmax(z)_c (w_c = 1 without ``class_weights`` [C])."""
    return optax.softmax_cross_entropy(
        logits.astype(jnp.float32), _weighted_probs(targets, logits.shape[-1], class_weights)
    )


def sigmoid_binary_cross_entropy(logits: jax.Array, targets: jax.Array, reduction: str = "mean") -> jax.Array:
    """One-vs-all BCE of each example, reduced over its C classes: ``'mean'`` (``1/C sum_c``) or ``'sum'``.

    The train step then averages over examples, so ``'mean'`` is timm's BinaryCrossEntropy with its default
    ``reduction='mean'`` (the mean over batch x classes, used by the ResNet-strikes-back runs) and ``'sum'`` is
    C times that (loss and gradients), timm's opt-in sum over classes.
    """
    if reduction not in BCE_REDUCTIONS:
        raise ValueError(f"BCE reduction {reduction!r} is invalid; valid: {', '.join(map(repr, BCE_REDUCTIONS))}")
    probs = _as_probs(targets, logits.shape[-1])
    per_class = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), probs)
    return jnp.mean(per_class, axis=-1) if reduction == "mean" else jnp.sum(per_class, axis=-1)


def focal_loss(
    logits: jax.Array, targets: jax.Array, gamma: float = 2.0, class_weights: jax.Array | None = None
) -> jax.Array:
    """Softmax focal loss (Lin et al. 2017): -sum_c w_c t_c (1 - p_c)^gamma log p_c; ``class_weights`` [C] are the
    per-class alpha_c (1 when not given)."""
    probs = _weighted_probs(targets, logits.shape[-1], class_weights)
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.sum(probs * jnp.power(1.0 - jnp.exp(log_p), gamma) * log_p, axis=-1)


def make_loss_fn(
    name: str, *, focal_gamma: float = 2.0, bce_reduction: str = "mean", class_weights: jax.Array | None = None
) -> Callable[[jax.Array, jax.Array], jax.Array]:
    """Returns loss(logits, targets) -> [N] for a config's ``train.loss`` (``bce_reduction``: ``train.bce_reduction``,
    read by ``sigmoid_bce`` only; ``class_weights`` [C]: the weights of ``train.class_weights``, softmax losses
    only)."""
    if class_weights is not None:
        class_weights = np.asarray(class_weights, np.float32)  # a constant of the compiled step
    if name == "softmax_xent":
        return functools.partial(softmax_cross_entropy, class_weights=class_weights)
    if name == "sigmoid_bce":
        if class_weights is not None:
            raise ValueError(
                "train.class_weights applies to loss 'softmax_xent' or 'focal', not 'sigmoid_bce' (its one-vs-all "
                "terms have no single class to weigh); set train.class_weights='none' or change train.loss"
            )
        if bce_reduction not in BCE_REDUCTIONS:
            raise ValueError(
                f"train.bce_reduction={bce_reduction!r} is invalid; valid: {', '.join(map(repr, BCE_REDUCTIONS))} "
                "('mean' averages the BCE over classes as timm's BinaryCrossEntropy does, 'sum' adds it up)"
            )
        return functools.partial(sigmoid_binary_cross_entropy, reduction=bce_reduction)
    if name == "focal":
        return lambda z, t: focal_loss(z, t, focal_gamma, class_weights)
    raise ValueError(f"unknown loss {name!r}; valid: {', '.join(LOSSES)}")
