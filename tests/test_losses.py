"""The losses against NumPy references, with hard and soft targets."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfjax.losses import LOSSES, make_loss_fn


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_bce(z, t):
    """Per-class BCE with logits, the stable form: max(z, 0) - z t + log(1 + exp(-|z|))."""
    return np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))


REFERENCES = {
    "softmax_xent": lambda z, t: -(t * np_log_softmax(z)).sum(-1),
    "sigmoid_bce": lambda z, t: np_bce(z, t).mean(-1),  # the default reduction: timm's mean over classes
    "focal": lambda z, t: -(t * (1 - np.exp(np_log_softmax(z))) ** 2 * np_log_softmax(z)).sum(-1),
}


@pytest.mark.parametrize("name", LOSSES)
def test_loss_matches_numpy_for_labels_and_soft_targets(name):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(6, 5)).astype(np.float32) * 3
    labels = rng.integers(0, 5, 6)
    soft = rng.dirichlet(np.ones(5), 6).astype(np.float32)
    loss = make_loss_fn(name)
    for targets, probs in ((labels, np.eye(5, dtype=np.float32)[labels]), (soft, soft)):
        got = np.asarray(loss(jnp.asarray(logits), jnp.asarray(targets)))
        want = REFERENCES[name](logits.astype(np.float64), probs)
        assert got.shape == (6,)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_focal_gamma_zero_is_cross_entropy_and_unknown_loss_is_named():
    z, t = jnp.asarray([[2.0, -1.0, 0.5]]), jnp.asarray([2])
    np.testing.assert_allclose(make_loss_fn("focal", focal_gamma=0.0)(z, t), make_loss_fn("softmax_xent")(z, t))
    with pytest.raises(ValueError, match="unknown loss 'xent'.*softmax_xent"):
        make_loss_fn("xent")


def test_bce_reduction_mean_over_classes_is_timms_default_and_sum_is_c_times_it():
    """timm's BinaryCrossEntropy(reduction='mean') averages over batch x classes; the train step averages the
    per-example values over the batch, so 'mean' must be the per-example mean over the C classes. 'sum' (the old
    behaviour, kept selectable) is C times it, in the loss and in every gradient."""
    rng = np.random.default_rng(1)
    n, c = 4, 7
    logits = rng.normal(size=(n, c)).astype(np.float32) * 2
    soft = rng.dirichlet(np.ones(c), n).astype(np.float32)
    binarized = (soft > 0.2).astype(np.float32)  # RSB A1's target threshold, applied by the input pipeline
    for targets in (soft, binarized, rng.integers(0, c, n)):
        probs = np.eye(c, dtype=np.float32)[targets] if targets.ndim == 1 else targets
        per_class = np_bce(logits.astype(np.float64), probs)
        mean, total = make_loss_fn("sigmoid_bce"), make_loss_fn("sigmoid_bce", bce_reduction="sum")
        np.testing.assert_allclose(mean(jnp.asarray(logits), jnp.asarray(targets)), per_class.mean(-1), rtol=1e-5)
        np.testing.assert_allclose(total(jnp.asarray(logits), jnp.asarray(targets)), per_class.sum(-1), rtol=1e-5)
        # The train step's scalar: the batch mean of the per-example values = timm's mean over all N x C terms.
        batch_loss = lambda fn, z, t=targets: jnp.mean(fn(z, jnp.asarray(t)))
        assert float(batch_loss(mean, jnp.asarray(logits))) == pytest.approx(per_class.mean(), rel=1e-6)
        g_mean = np.asarray(jax.grad(batch_loss, argnums=1)(mean, jnp.asarray(logits)))
        g_sum = np.asarray(jax.grad(batch_loss, argnums=1)(total, jnp.asarray(logits)))
        np.testing.assert_allclose(g_sum, c * g_mean, rtol=1e-6, atol=1e-9)
        # d/dz of the mean over N x C terms is (sigmoid(z) - t) / (N C)
        np.testing.assert_allclose(g_mean, (1 / (1 + np.exp(-logits)) - probs) / (n * c), rtol=1e-5, atol=1e-8)


def test_bad_bce_reduction_is_one_clear_message():
    with pytest.raises(ValueError, match=r"train.bce_reduction='avg' is invalid; valid: 'mean', 'sum'") as err:
        make_loss_fn("sigmoid_bce", bce_reduction="avg")
    assert "\n" not in str(err.value)
