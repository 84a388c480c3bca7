"""The losses against NumPy references, with hard and soft targets."""

import jax.numpy as jnp
import numpy as np
import pytest

from nfjax.losses import LOSSES, make_loss_fn


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


REFERENCES = {
    "softmax_xent": lambda z, t: -(t * np_log_softmax(z)).sum(-1),
    "sigmoid_bce": lambda z, t: (np.maximum(z, 0) - z * t + np.log1p(np.exp(-np.abs(z)))).sum(-1),
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
