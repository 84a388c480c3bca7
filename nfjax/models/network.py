"""What the staged networks share above their blocks: the block plan of a stage table, the NF models' expected
signal scale per block (betas), the residual merge every NF block ends with, the forward tail (blocks, pooling,
dropout, classifier) and the per-block signal-propagation statistics."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.models.layers import dropout, stochastic_depth


def channel_stats(x: jax.Array) -> dict[str, jax.Array]:
    """Signal-propagation statistics of an NHWC tensor (Brock et al. 2021a).

    avg_sq_mean: mean over channels of (mean over N, H, W)^2; avg_var: mean over channels of the variance over
    N, H, W.
    """
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=(0, 1, 2))
    var = jnp.var(x32, axis=(0, 1, 2))
    return {"avg_sq_mean": jnp.mean(jnp.square(mean)), "avg_var": jnp.mean(var)}


def block_betas(depths: Sequence[int], alpha: float) -> list[float]:
    """beta = 1/expected_std for every block; expected_std resets at each stage's first block (the reference)."""
    betas, expected_std = [], 1.0
    for depth in depths:
        for i in range(depth):
            betas.append(1.0 / expected_std)
            if i == 0:
                expected_std = 1.0
            expected_std = float(np.sqrt(expected_std**2 + alpha**2))
    return betas


def stage_plan(widths: Sequence[int], depths: Sequence[int], strides: Sequence[int], in_ch: int):
    """Yields (index, in_ch, out_ch, stride) for every block of a staged network (stride on a stage's first)."""
    index = 0
    for width, depth, stride in zip(widths, depths, strides, strict=True):
        for i in range(depth):
            yield index, in_ch, width, stride if i == 0 else 1
            in_ch, index = width, index + 1


def blocks_and_head(model, x, *, train: bool, key, return_stats: bool, pre_pool=None):
    """Shared forward tail: blocks (key folded with the block index) -> pre_pool -> mean over H, W ->
    dropout -> ``model.classifier``; logits float32, plus the per-block statistics stacked when asked."""
    stats = [] if return_stats else None
    for i, block in enumerate(model.blocks):
        x = block(x, train=train, key=None if key is None else jax.random.fold_in(key, i), stats=stats)
    if pre_pool is not None:
        x = pre_pool(x)
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    drop_key = None if key is None else jax.random.fold_in(key, len(model.blocks))
    logits = model.classifier(dropout(pooled, model.drop_rate, drop_key, train)).astype(jnp.float32)
    if return_stats:
        return logits, jax.tree.map(lambda *v: jnp.stack(v), *stats)
    return logits


def nf_merge_residual(block, branch, shortcut, *, train: bool, key, stats: list | None):
    """The tail every NF block shares: branch = 2 * gate(branch) * branch (``block.se`` or ``block.eca``, if
    any); out = shortcut + alpha * skip_gain * stochastic_depth(branch) (no skip_gain factor when the block has
    none); appends the signal statistics of ``out`` and the residual variance (before stochastic depth and
    SkipInit) to ``stats`` when given."""
    for gate in (block.se, block.eca):
        if gate is not None:
            branch = 2.0 * gate(branch) * branch
    residual = branch
    branch = stochastic_depth(branch, block.stochdepth_rate, key, train)
    scale = block.alpha if block.skip_gain is None else block.skip_gain[...].astype(branch.dtype) * block.alpha
    out = shortcut + branch * scale
    if stats is not None:
        stats.append({**channel_stats(out), "res_avg_var": channel_stats(residual)["avg_var"]})
    return out
