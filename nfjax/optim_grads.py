"""Gradients for one optimizer step: micro-batch accumulation and SAM (sharpness-aware minimization).

Both take a ``grad_fn(params, batch[, rng]) -> (value, grads)``, e.g.
``jax.value_and_grad(loss_fn, has_aux=True)`` (then ``value = (loss, aux)``), and return the same
``(value, grads)`` pair for the whole batch, so the optimizer chain (and its clipping) sees one averaged
gradient per step. Batches are pytrees of arrays with the example axis first.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nfjax.parallel import batch_axes

GradFn = Callable[..., tuple[Any, Any]]


def _call(grad_fn: GradFn, params: Any, batch: Any, rng: jax.Array | None) -> tuple[Any, Any]:
    return grad_fn(params, batch) if rng is None else grad_fn(params, batch, rng)


def _batch_size(batch: Any) -> int:
    sizes = {x.shape[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
        raise ValueError(f"batch leaves disagree on the example axis: sizes {sorted(sizes)}")
    return sizes.pop()


def split_microbatches(batch: Any, accum_steps: int) -> Any:
    """``(B, ...) -> (k, B // k, ...)``; micro-batch ``j`` holds examples ``j, j + k, j + 2k, ...``.

    Strided rather than contiguous: with the batch sharded over devices, every device then holds an
    equal share of every micro-batch and the split needs no communication.
    """
    size = _batch_size(batch)
    if size % accum_steps:
        raise ValueError(f"batch of {size} examples does not split into optim.accum_steps={accum_steps}")
    split = lambda x: x.reshape(size // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1)
    return jax.tree.map(split, batch)


def accumulated_grads(
    grad_fn: GradFn, params: Any, batch: Any, accum_steps: int, rng: jax.Array | None = None
) -> tuple[Any, Any]:
    """Mean ``(value, grads)`` over ``accum_steps`` micro-batches, computed with ``jax.lax.scan``.

    ``grads = (1/k) sum_j grad_fn(params, micro_j)``, which equals the full-batch gradient of a
    mean-reduced loss. Clip after this, once per optimizer step (never per micro-batch).
    Every leaf of ``value`` is averaged too. With ``rng`` given, ``grad_fn`` gets
    ``fold_in(rng, j)`` for micro-batch ``j``.

    Memory: activations of one micro-batch (``B / k`` examples) instead of ``B``, plus two
    params-sized float32 buffers while the step runs (the running sum in the scan carry and the
    current micro-batch's gradient) and ``k`` stacked copies of ``value`` (keep it to scalars).
    Unlike ``optax.MultiSteps`` nothing persists in the optimizer state between steps, and each call
    is one optimizer step.
    """
    if accum_steps == 1:
        return _call(grad_fn, params, batch, rng)
    micro = split_microbatches(batch, accum_steps)
    zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), params)

    def body(grad_sum, xs):
        index, micro_batch = xs
        micro_rng = None if rng is None else jax.random.fold_in(rng, index)
        value, grads = _call(grad_fn, params, micro_batch, micro_rng)
        grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
        return grad_sum, value

    grad_sum, values = jax.lax.scan(body, zeros, (jnp.arange(accum_steps), micro))
    grads = jax.tree.map(lambda s, p: (s / accum_steps).astype(jnp.result_type(p)), grad_sum, params)
    return jax.tree.map(lambda v: jnp.mean(v, axis=0), values), grads


def _place(tree: Any, mesh: Mesh, spec: P) -> Any:
    """Lays ``tree`` out as ``spec`` on ``mesh``, for meshes with Auto or Explicit axes alike."""
    sharding = NamedSharding(mesh, spec)
    explicit = any(t == AxisType.Explicit for t in mesh.axis_types)
    place = jax.reshard if explicit else jax.lax.with_sharding_constraint
    return jax.tree.map(lambda x: place(x, sharding), tree)


def _ascent_size(local_size: int, fraction: float) -> int:
    """Examples of the local batch used for the ascent step: ``round(fraction * n)``, at least 1."""
    return min(local_size, max(1, round(fraction * local_size)))


def _perturbation(grad_fn, params, local_batch, rng, rho: float, fraction: float) -> Any:
    """``e = rho * g / |g|`` with ``g`` the gradient on the first ``fraction`` of ``local_batch``."""
    n = _ascent_size(_batch_size(local_batch), fraction)
    ascent_batch = jax.tree.map(lambda x: x[:n], local_batch)
    _, grads = _call(grad_fn, params, ascent_batch, rng)
    scale = rho / (optax.tree.norm(grads) + 1e-12)
    return jax.tree.map(lambda g: (scale * g).astype(g.dtype), grads)


def _local_params(params: Any, axis: str | tuple[str, ...]) -> Any:
    """Marks the replicated params as device-varying before differentiating.

    Inside ``shard_map`` the gradient with respect to a replicated (axis-invariant) input is
    all-reduced over the axis by autodiff; SAM's ascent gradient must stay per device, so each
    device differentiates its own copy.
    """
    return jax.lax.pcast(params, axis, to="varying")


def _local_rng(rng: jax.Array | None, axis: str | tuple[str, ...]) -> jax.Array | None:
    # Distinct per device: stochastic depth / dropout masks must differ across devices.
    return None if rng is None else jax.random.fold_in(rng, jax.lax.axis_index(axis))


def sam_grads(
    grad_fn: GradFn,
    params: Any,
    batch: Any,
    *,
    rho: float,
    fraction: float,
    mesh: Mesh,
    rng: jax.Array | None = None,
    axis: str | tuple[str, ...] | None = None,
) -> tuple[Any, Any]:
    """SAM as in the NFNet paper; call inside ``jax.jit``. Returns the synchronized ``(value, grads)``.

    On each device ``d`` of ``mesh[axis]``, with local batch ``b_d`` (``n_d`` examples):

    1. ascent, unsynchronized: ``g_d = grad L(p; first round(fraction * n_d) examples of b_d)``,
       ``e_d = rho * g_d / |g_d|`` (global L2 norm over all params);
    2. descent: ``h_d = grad L(p + e_d; b_d)``;

    then ``grads = mean_d h_d`` (and ``value = mean_d value_d``), i.e. the mean over the global batch.
    With ``rho = 0`` this is the plain gradient. ``params`` are replicated (gathered first when they are
    sharded, as under FSDP), ``batch`` is sharded along ``axis``, a mesh axis or a tuple of them (``('data',
    'fsdp')``: every device of a 2-D mesh is one ``d``). Costs about ``1 + fraction`` forward/backward passes.
    """
    axis = batch_axes(mesh) if axis is None else axis  # default: every mesh axis, each device its own slice
    params = _place(params, mesh, P())
    batch = _place(batch, mesh, P(axis))

    def per_device(params, local_batch, rng):
        params, rng = _local_params(params, axis), _local_rng(rng, axis)
        e = _perturbation(grad_fn, params, local_batch, rng, rho, fraction)
        perturbed = jax.tree.map(lambda p, d: p + d, params, e)
        return jax.lax.pmean(_call(grad_fn, perturbed, local_batch, rng), axis)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=P())(params, batch, rng)


def sam_perturbations(
    grad_fn: GradFn,
    params: Any,
    batch: Any,
    *,
    rho: float,
    fraction: float,
    mesh: Mesh,
    rng: jax.Array | None = None,
    axis: str | tuple[str, ...] | None = None,
) -> Any:
    """Every device's ascent perturbation ``e_d`` stacked on a leading axis (diagnostics and tests)."""
    axis = batch_axes(mesh) if axis is None else axis  # default: every mesh axis, each device its own slice
    params = _place(params, mesh, P())
    batch = _place(batch, mesh, P(axis))

    def per_device(params, local_batch, rng):
        params, rng = _local_params(params, axis), _local_rng(rng, axis)
        e = _perturbation(grad_fn, params, local_batch, rng, rho, fraction)
        return jax.tree.map(lambda x: x[None], e)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(axis), P()), out_specs=P(axis))(params, batch, rng)
