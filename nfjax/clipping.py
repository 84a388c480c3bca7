"""Parameter masks by path, unit-wise norms and adaptive gradient clipping (AGC) that reports what it clipped.

Masks select parameters by their '/'-joined path (``'blocks/3/conv1/kernel'``) and rank, so they work on
``nnx.State`` and on plain nested dicts alike.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

CLASSIFIER_KERNEL = r"(^|/)classifier/kernel$"
NO_DECAY_NAMES = r"(^|/)(bias|scale|offset|gain|skip_gain)$"
DIV_EPS = 1e-6  # guards the division in the clip factor (optax's value); cannot engage when clipping applies


def param_path(keypath: Sequence[Any]) -> tuple[str | int, ...]:
    """A JAX key path as plain keys: ``(DictKey('blocks'), SequenceKey(3), ...)`` -> ``('blocks', 3, ...)``.

    The ``GetAttrKey('value')`` that an ``nnx.Variable`` node adds at the end is dropped, so an
    ``nnx.State`` and the equivalent nested dict give the same paths.
    """
    keys = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                keys.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(k.idx)
        else:  # DictKey, FlattenedIndexKey
            keys.append(k.key)
    return tuple(keys)


def leaf_paths(tree: Any) -> list[str]:
    """'/'-joined paths of the leaves of ``tree``, in ``jax.tree.leaves`` order."""
    return ["/".join(str(p) for p in param_path(kp)) for kp, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def path_mask(predicate: Callable[[tuple[str | int, ...], jax.Array], bool]) -> Callable[[Any], Any]:
    """A mask function for ``optax.masked``: ``tree -> tree of bools``, ``predicate(path, leaf)``."""

    def mask_fn(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda kp, x: bool(predicate(param_path(kp), x)), tree)

    return mask_fn


def _matches(patterns: Sequence[str], path: tuple[str | int, ...]) -> bool:
    joined = "/".join(str(k) for k in path)
    return any(re.search(p, joined) for p in patterns)


def clip_mask(exclude: Sequence[str] = (CLASSIFIER_KERNEL,)) -> Callable[[Any], Any]:
    """True where AGC applies: every param whose path matches none of ``exclude``."""
    return path_mask(lambda path, _: not _matches(exclude, path))


def decay_mask(exclude: Sequence[str] = (NO_DECAY_NAMES,), min_ndim: int = 2) -> Callable[[Any], Any]:
    """True where weight decay applies: ``ndim >= min_ndim`` and the path matches none of ``exclude``.

    The defaults exempt gains, biases, skip_gain, BN scale/bias and every vector or scalar, and decay
    conv/SE kernels and the classifier kernel.
    """
    return path_mask(lambda path, x: jnp.ndim(x) >= min_ndim and not _matches(exclude, path))


def unitwise_norm(x: jax.Array) -> jax.Array:
    """L2 norm of each output unit, broadcast back to ``x.shape``.

    ``optax.transforms.unitwise_norm`` matches the Flax layouts used here, so it is used as is:
    scalars and (squeezed) vectors -> whole-tensor norm; rank 2 Dense ``(in, out)`` -> over axis 0;
    rank 4 Conv ``HWIO`` (grouped: ``(H, W, I/groups, O)``) -> over axes (0, 1, 2). Rank 3 is reduced
    over axis 0 only (multi-head Dense), which would be wrong for 1D-conv ``WIO`` kernels; no model
    here has those.
    """
    return optax.transforms.unitwise_norm(x)


class AGCState(NamedTuple):
    """What the last AGC update did: the fraction of clipped parameters (elements of clipped units over all
    elements AGC sees). Read by the train step's metrics (``optax.tree.get(opt_state, 'clip_fraction')``)."""

    clip_fraction: jax.Array  # float32 []


def _clip_unitwise(g: jax.Array, p: jax.Array, agc_lambda: float, eps: float) -> tuple[jax.Array, jax.Array]:
    """(clipped g, bool mask of the elements whose unit was clipped), the rule of ``optax.adaptive_grad_clip``."""
    g_norm = unitwise_norm(g)
    max_norm = agc_lambda * jnp.maximum(unitwise_norm(p), eps)
    keep = g_norm < max_norm
    return jnp.where(keep, g, g * (max_norm / jnp.maximum(g_norm, DIV_EPS))), ~keep


def adaptive_clip(agc_lambda: float, eps: float, exclude: Sequence[str]) -> optax.GradientTransformation:
    """AGC (Brock et al. 2021) on every param not matched by ``exclude``.

    Per unit: ``g <- g * agc_lambda * max(|p|, eps) / |g|`` if ``|g| >= agc_lambda * max(|p|, eps)``, else
    ``g`` unchanged (bit-identical to ``optax.adaptive_grad_clip`` under ``optax.masked``). The state records
    the fraction of clipped parameters from the same norms, so reporting it costs no second pass.
    """
    mask_fn = clip_mask(exclude)

    def init(params: Any) -> AGCState:
        del params
        return AGCState(clip_fraction=jnp.zeros((), jnp.float32))

    def update(updates: Any, state: AGCState, params: Any = None) -> tuple[Any, AGCState]:
        del state
        if params is None:
            raise ValueError("adaptive_clip needs the params: call tx.update(grads, state, params)")
        mask, treedef = jax.tree.flatten(mask_fn(params))
        grads, params_leaves = treedef.flatten_up_to(updates), treedef.flatten_up_to(params)
        out, clipped, total = [], jnp.zeros((), jnp.float32), 0
        for g, p, m in zip(grads, params_leaves, mask, strict=True):
            if m:
                g, hit = _clip_unitwise(g, p, agc_lambda, eps)
                clipped, total = clipped + jnp.sum(hit.astype(jnp.float32)), total + g.size
            out.append(g)
        return treedef.unflatten(out), AGCState(clip_fraction=clipped / max(total, 1))

    return optax.GradientTransformation(init, update)


def clip_fraction(opt_state: Any) -> jax.Array:
    """The AGC clip fraction recorded in ``opt_state`` (0 when the chain has no AGC)."""
    return optax.tree.get(opt_state, "clip_fraction", jnp.zeros((), jnp.float32))
