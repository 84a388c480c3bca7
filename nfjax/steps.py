"""The jitted train and eval steps: pure functions over a plain-pytree train state.

State (a dict of pure pytrees, so orbax, shardings and donation see ordinary arrays):
  step         int32 []            optimizer steps applied
  params       nested dict          nnx.Param values (float32)
  batch_stats  nested dict          nnx.BatchStat values (BN running statistics; empty for NF models)
  opt_state    optax state
  ema          nested dict | None   float32 EMA of params (DeepMind schedule)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.eval_metrics import class_counts
from nfjax.models.layers import WSConv, prestandardized
from nfjax.optim import Optimizer


def apply_model(graphdef, params, batch_stats, images, *, train: bool, key=None):
    """Runs the model from pure dicts; returns (logits float32, new batch_stats)."""
    model = nnx.merge(graphdef, params, batch_stats)
    logits = model(images, train=train, key=key)
    new_stats = nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)) if batch_stats else batch_stats
    return logits, new_stats


def standardizes_weights(graphdef, params, batch_stats) -> bool:
    """Whether the model has weight-standardized convolutions (WSConv): every NF model, no BN model. The
    leaves may be abstract (``jax.ShapeDtypeStruct``)."""
    model = nnx.merge(graphdef, params, batch_stats)
    return any(isinstance(module, WSConv) for _, module in nnx.iter_modules(model))


def standardize_weights(graphdef, params, batch_stats) -> dict:
    """``params`` with every WSConv ``kernel`` replaced by the kernel it convolves with (standardized in float32,
    gain and gamma folded in); every other leaf as it is. Inference computes this once per set of weights instead
    of in every call: apply the model to the result only inside :func:`nfjax.models.layers.prestandardized`
    (outside it, the kernels would be standardized a second time). See :func:`prestandardized_fn`."""
    model = nnx.merge(graphdef, params, batch_stats)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, WSConv):
            module.kernel[...] = module.standardized_kernel()
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def prestandardized_fn(fn: Callable) -> Callable:
    """``fn(params, batch_stats, ...)`` for params from :func:`standardize_weights`: ``fn`` traced with
    :func:`nfjax.models.layers.prestandardized` in force (wrap before ``jax.jit``; the context is entered when
    the function is traced)."""

    def wrapped(*args, **kwargs):
        with prestandardized():
            return fn(*args, **kwargs)

    return wrapped


def mean_view_log_probs(logits_fn: Callable[[jax.Array], jax.Array], views: jax.Array) -> jax.Array:
    """Test-time augmentation: log of the mean softmax probability over V views of each image.

    views float32 [N, V, S, S, C] -> [N, K]: log((1/V) sum_v softmax(logits_fn(views[:, v]))), computed as
    logsumexp_v(log_softmax) - log(V) (stable where a probability underflows). All N * V views go through
    ``logits_fn`` as one batch (inference mode: no view sees another). Its softmax is the averaged
    probabilities, so top-k, argmax and softmax cross-entropy of it are those of the averaged probabilities.
    """
    n, v = views.shape[:2]
    log_probs = jax.nn.log_softmax(logits_fn(views.reshape(n * v, *views.shape[2:])), axis=-1)
    return jax.nn.logsumexp(log_probs.reshape(n, v, -1), axis=1) - math.log(v)


def with_flips(views: jax.Array) -> jax.Array:
    """[N, V, S, S, C] -> [N, 2V, S, S, C]: the views, then each mirrored (its width axis reversed)."""
    return jnp.concatenate([views, jnp.flip(views, axis=3)], axis=1)


def _targets(batch: dict) -> jax.Array:
    return batch["label_probs"] if "label_probs" in batch else batch["label"]


def _largest_grad_index(grads) -> jax.Array:
    """Index (in tree-leaf order) of the parameter with the largest gradient norm; NaN/inf counts as largest."""
    norms = jnp.stack([jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) for g in jax.tree.leaves(grads)])
    return jnp.argmax(jnp.where(jnp.isfinite(norms), norms, jnp.inf))


def make_train_step(
    graphdef,
    optimizer: Optimizer,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array],
    *,
    seed: int,
    mesh=None,
    skip_nonfinite: bool = False,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """Builds ``step(state, batch) -> (state, metrics)`` (not yet jitted).

    RNG: ``fold_in(key(seed), step)``; stochastic depth and dropout draw one mask per example, so every device
    and every step sees different masks. Gradients (with accumulation or SAM), the update, the EMA and the
    optimizer's metrics come from ``optimizer``. A non-finite loss leaves the state untouched (and is reported
    in ``metrics['finite']``) so the last good state and checkpoint survive; with ``skip_nonfinite`` only the
    step counter moves on (the update is skipped, the next step sees the next batch and learning rate).
    """

    def grad_fn(params, batch, key, batch_stats):
        def loss(params):
            logits, new_stats = apply_model(graphdef, params, batch_stats, batch["image"], train=True, key=key)
            per_example = loss_fn(logits, _targets(batch))
            top1 = jnp.mean((jnp.argmax(logits, -1) == batch["label"]).astype(jnp.float32))
            return jnp.mean(per_example), (new_stats, top1)

        return jax.value_and_grad(loss, has_aux=True)(params)

    def step(state, batch):
        key = jax.random.fold_in(jax.random.key(seed), state["step"])
        fn = lambda p, b, k: grad_fn(p, b, k, state.get("batch_stats", {}))
        (loss, (new_stats, top1)), grads = optimizer.gradients(fn, state["params"], batch, key, mesh)
        updated, optimizer_metrics = optimizer.apply(state, grads)
        new_state = dict(state, **updated)
        if "batch_stats" in state:
            new_state["batch_stats"] = new_stats
        finite = jnp.isfinite(loss)
        new_state = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        if skip_nonfinite:
            new_state["step"] = state["step"] + 1
        metrics = dict(
            loss=loss, top1=top1, finite=finite, largest_grad_param=_largest_grad_index(grads), **optimizer_metrics
        )
        return new_state, metrics

    return step


EVAL_TTA_MODES = ("none", "flip")


def make_eval_step(
    graphdef, loss_fn, tta: str = "none", with_probs: bool = False
) -> Callable[[dict, dict, dict], dict]:
    """``eval_step(params, batch_stats, batch) -> sums``: masked sums over the global batch.

    Returns count (real examples), top1/top5 correct counts and the summed loss, so metrics are exact
    example-weighted means however the last batch is padded, and the masked per-class counts of the top-1
    predictions (:func:`nfjax.eval_metrics.class_counts`: the int32 [K, K] confusion matrix, or per-class
    vectors for very large K).

    ``tta='flip'``: each image and its mirror are evaluated and the metrics are those of the mean of their two
    softmax probabilities p: top-1/top-5 rank p, the loss is -log p[label] (:func:`mean_view_log_probs` stands
    in for the logits). ``with_probs``: also the per-example ``probs`` float32 [B, K] (softmax of those
    logits), ``labels`` and ``mask`` [B], for the exact ROC-AUC computed on the host.
    """
    if tta not in EVAL_TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(EVAL_TTA_MODES)} for evaluation, got {tta!r}")

    def eval_step(params, batch_stats, batch):
        logits_fn = lambda x: apply_model(graphdef, params, batch_stats, x, train=False)[0]
        if tta == "flip":
            logits = mean_view_log_probs(logits_fn, with_flips(batch["image"][:, None]))
        else:
            logits = logits_fn(batch["image"])
        mask = batch.get("mask", jnp.ones(logits.shape[:1], jnp.float32))
        labels = batch["label"]
        k = min(5, logits.shape[-1])
        topk = jax.lax.top_k(logits, k)[1]
        correct5 = jnp.any(topk == labels[:, None], axis=-1)
        correct1 = topk[:, 0] == labels
        per_example = loss_fn(logits, labels)
        sums = dict(
            count=jnp.sum(mask),
            top1=jnp.sum(correct1 * mask),
            top5=jnp.sum(correct5 * mask),
            loss=jnp.sum(per_example * mask),
            **class_counts(labels, topk[:, 0], mask, logits.shape[-1]),
        )
        if with_probs:
            sums.update(probs=jax.nn.softmax(logits.astype(jnp.float32), axis=-1), labels=labels, mask=mask)
        return sums

    return eval_step
