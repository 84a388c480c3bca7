"""Layer-level faithfulness: weight standardization, gamma constants, grouped conv lowering, SD, BN."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nfjax.models import batchnorm, network
from nfjax.models import layers as L


@pytest.mark.parametrize("shape", [(3, 3, 16, 32), (1, 1, 64, 8), (3, 3, 8, 48), (3, 3, 1, 24), (64, 10)])
@pytest.mark.parametrize("eps_mode", ["floor", "add"])
def test_standardized_kernel_has_zero_mean_and_inverse_fan_in_variance(shape, eps_mode):
    # (3,3,8,48) is the kernel of a 6-group conv with 48 inputs; (3,3,1,24) is depthwise.
    w = jax.random.normal(jax.random.key(0), shape) * 3.0 + 0.5
    w_hat = np.asarray(L.standardize_kernel(w, eps_mode=eps_mode, eps=1e-8))
    axes = tuple(range(len(shape) - 1))
    fan_in = np.prod(shape[:-1])
    np.testing.assert_allclose(w_hat.mean(axis=axes), 0.0, atol=1e-6)
    np.testing.assert_allclose(w_hat.var(axis=axes), 1.0 / fan_in, rtol=1e-4)


def test_standardization_eps_conventions_differ_as_documented():
    w = jnp.full((1, 1, 4, 2), 0.3).at[0, 0, 0, 0].set(0.31)  # tiny variance: eps dominates
    fan_in = 4
    var = np.var(np.asarray(w)[..., 0])
    floor = L.standardize_kernel(w, eps=1e-4, eps_mode="floor")
    add = L.standardize_kernel(w, eps=1e-5, eps_mode="add")
    centered = np.asarray(w)[0, 0, 0, 0] - np.mean(np.asarray(w)[..., 0])
    np.testing.assert_allclose(floor[0, 0, 0, 0], centered / np.sqrt(max(var * fan_in, 1e-4)), rtol=1e-5)
    np.testing.assert_allclose(add[0, 0, 0, 0], centered / np.sqrt(fan_in * (var + 1e-5)), rtol=1e-5)


def test_standardization_applies_gain_and_folded_gamma():
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 5))
    gain = jnp.arange(1.0, 6.0)
    base = L.standardize_kernel(w)
    np.testing.assert_allclose(L.standardize_kernel(w, gain, gamma=1.7), base * gain * 1.7, rtol=1e-5)


def test_standardization_statistics_are_float32_for_bf16_weights():
    w = jax.random.normal(jax.random.key(2), (3, 3, 32, 16)).astype(jnp.bfloat16)
    w_hat = L.standardize_kernel(w)
    assert w_hat.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(w_hat).var(axis=(0, 1, 2)), 1 / 288, rtol=1e-3)


# DeepMind's nfnets/base.py ``nonlinearities``, every entry, literals as released.
DEEPMIND_GAMMA = {
    "identity": 1.0,
    "celu": 1.270926833152771,
    "elu": 1.2716004848480225,
    "gelu": 1.7015043497085571,
    "glu": 1.8484294414520264,
    "leaky_relu": 1.70590341091156,
    "log_sigmoid": 1.9193484783172607,
    "log_softmax": 1.0002083778381348,
    "relu": 1.7139588594436646,
    "relu6": 1.7131484746932983,
    "selu": 1.0008515119552612,
    "sigmoid": 4.803835391998291,
    "silu": 1.7881293296813965,
    "soft_sign": 2.338853120803833,
    "softplus": 1.9203323125839233,
    "tanh": 1.5939117670059204,
}


def test_gamma_table_is_deepminds_exactly():
    assert L.GAMMA == DEEPMIND_GAMMA  # same names, bit-identical floats
    assert L.activation_gamma("softsign") == DEEPMIND_GAMMA["soft_sign"]  # timm's spelling
    assert L.activation_gamma("gelu_exact") == DEEPMIND_GAMMA["gelu"]


def _gaussian_moments(f) -> tuple[float, float]:
    """E[f(x)], E[f(x)^2] for x ~ N(0, 1): a uniform grid on [-12, 12], 480,001 points (error < 1e-6 even for a
    kinked f, where Gauss-Hermite quadrature is off by 1e-3)."""
    x = np.linspace(-12.0, 12.0, 480_001)
    w = np.exp(-(x**2) / 2) / np.sqrt(2 * np.pi) * (x[1] - x[0])
    y = np.asarray(f(jnp.asarray(x, jnp.float32)), np.float64)
    return float(np.sum(w * y)), float(np.sum(w * y * y))


def _exact_gamma(name: str) -> float:
    """1 / std(act(x)) for x ~ N(0, 1) by quadrature; glu from its gate alone, log_softmax by Monte Carlo."""
    act = L.activation_fn(name, scaled=False)
    if name == "glu":
        # glu([a, b]) = a * sigmoid(b), a and b independent N(0, 1): var = E[a^2] E[sigmoid(b)^2] - 0.
        _, second = _gaussian_moments(lambda b: act(jnp.stack([jnp.ones_like(b), b], -1))[..., 0])
        return 1.0 / np.sqrt(second)
    if name == "log_softmax":
        # Not elementwise: over 1,024 channels, 4M samples (standard error of the estimate about 4e-4).
        y = np.asarray(act(jax.random.normal(jax.random.key(0), (4096, 1024))), np.float64)
        return 1.0 / float(np.std(y))
    first, second = _gaussian_moments(act)
    return 1.0 / np.sqrt(second - first**2)


def test_gamma_is_inverse_std_not_inverse_rms():
    # relu: E[relu(x)^2] = 1/2, E[relu(x)] = 1/sqrt(2 pi). DeepMind's 1.71396 is 1/std (1.71286), not 1/rms (1.41421).
    inverse_std = 1.0 / np.sqrt(0.5 - 1 / (2 * np.pi))
    np.testing.assert_allclose(_exact_gamma("relu"), inverse_std, rtol=1e-6)
    assert abs(DEEPMIND_GAMMA["relu"] / inverse_std - 1) < 1e-3
    assert abs(DEEPMIND_GAMMA["relu"] * np.sqrt(0.5) - 1) > 0.2


@pytest.mark.parametrize("name", sorted(DEEPMIND_GAMMA))
def test_gamma_constant_matches_inverse_std_of_activation(name):
    # DeepMind's constants are Monte-Carlo estimates: within 1.2e-3 of the integral (glu the farthest, 1.19e-3;
    # elu and celu, the same function, differ by 5e-4).
    exact = _exact_gamma(name)
    assert abs(DEEPMIND_GAMMA[name] / exact - 1) < 1.5e-3, (name, DEEPMIND_GAMMA[name], exact)
    # and the scaled activation has unit variance on Gaussian input
    x = jax.random.normal(jax.random.key(3), (1024, 1024))
    assert abs(float(jnp.var(L.activation_fn(name)(x))) - 1.0) < 0.01


def test_glu_halves_channels_and_models_refuse_it():
    chex.assert_shape(L.activation_fn("glu")(jnp.ones((2, 3, 3, 8))), (2, 3, 3, 4))
    with pytest.raises(ValueError, match="halves the channel axis"):
        L.block_activation("glu")
    assert L.block_activation("celu", scaled=False) is jax.nn.celu


def test_unknown_activation_lists_valid_names():
    with pytest.raises(ValueError, match="valid:.*gelu"):
        L.activation_fn("swishy")


@pytest.mark.parametrize("groups,stride", [(6, 1), (2, 2), (4, 1)])
def test_split_grouped_conv_matches_native_outputs_and_gradients(groups, stride):
    kx, kw = jax.random.split(jax.random.key(4))
    x = jax.random.normal(kx, (2, 12, 12, 24))
    w = jax.random.normal(kw, (3, 3, 24 // groups, 36))

    def loss(impl):
        return lambda x, w: jnp.sum(jnp.sin(L.conv2d(x, w, (stride, stride), "SAME", groups, impl)))

    y_native = L.conv2d(x, w, (stride, stride), "SAME", groups, "native")
    y_split = L.conv2d(x, w, (stride, stride), "SAME", groups, "split")
    np.testing.assert_allclose(y_split, y_native, rtol=1e-5, atol=1e-5)
    g_native = jax.grad(loss("native"), argnums=(0, 1))(x, w)
    g_split = jax.grad(loss("split"), argnums=(0, 1))(x, w)
    for a, b in zip(g_split, g_native, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_auto_grouped_impl_is_split_on_cpu():
    assert jax.default_backend() == "cpu"
    assert L.resolve_grouped_impl("auto") == "split"
    assert L.resolve_grouped_impl("native") == "native"
    with pytest.raises(ValueError, match="conv impl must be"):
        L.resolve_grouped_impl("fast")


def test_wsconv_parameters_and_shapes():
    conv = L.WSConv(12, 24, 3, strides=2, groups=3, rngs=nnx.Rngs(0))
    chex.assert_shape(conv.kernel[...], (3, 3, 4, 24))
    chex.assert_trees_all_equal(conv.gain[...], jnp.ones(24))
    chex.assert_trees_all_equal(conv.bias[...], jnp.zeros(24))
    y = conv(jnp.ones((2, 16, 16, 12)))
    chex.assert_shape(y, (2, 8, 8, 24))
    with pytest.raises(ValueError, match="divisible by groups"):
        L.WSConv(10, 24, 3, groups=3, rngs=nnx.Rngs(0))


def test_stochastic_depth_masks_whole_examples_independently():
    x = jnp.ones((512, 4, 4, 8))
    y = L.stochastic_depth(x, 0.5, jax.random.key(5), train=True)
    per_example = np.asarray(y).reshape(512, -1)
    # each example is all-kept or all-dropped, unscaled (DeepMind convention) ...
    assert set(np.unique(per_example)) <= {0.0, 1.0}
    assert np.all(per_example.min(1) == per_example.max(1))
    # ... and examples differ from one another, about half dropped
    kept = per_example[:, 0].mean()
    assert 0.4 < kept < 0.6
    np.testing.assert_array_equal(L.stochastic_depth(x, 0.5, None, train=False), x)
    scaled = L.stochastic_depth(x, 0.5, jax.random.key(5), train=True, scale_by_keep=True)
    np.testing.assert_allclose(np.unique(np.asarray(scaled)), [0.0, 2.0])
    with pytest.raises(ValueError, match="PRNG key"):
        L.stochastic_depth(x, 0.5, None, train=True)


def test_block_betas_match_reference_f0_schedule():
    expected = [1, 0.9806, 0.9806, 0.9623, 0.9806, 0.9623, 0.9449, 0.9285, 0.9129, 0.898, 0.9806, 0.9623]
    np.testing.assert_allclose(network.block_betas((1, 2, 6, 3), 0.2), expected, atol=1e-4)


def test_batchnorm_normalizes_and_tracks_running_statistics():
    bn = batchnorm.BatchNorm(3, momentum=0.1)
    x = jax.random.normal(jax.random.key(6), (64, 4, 4, 3)) * 2.0 + 5.0
    y = bn(x, train=True)
    np.testing.assert_allclose(np.asarray(y).mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y).var(axis=(0, 1, 2)), 1.0, rtol=1e-3)
    n = 64 * 16
    np.testing.assert_allclose(bn.mean[...], 0.1 * np.asarray(x).mean(axis=(0, 1, 2)), rtol=1e-5)
    unbiased = np.asarray(x).var(axis=(0, 1, 2)) * n / (n - 1)
    np.testing.assert_allclose(bn.var[...], 0.9 + 0.1 * unbiased, rtol=1e-5)


def test_ghost_batchnorm_normalizes_each_group_separately():
    bn = batchnorm.BatchNorm(2, ghost_batch_size=4)
    x = jnp.concatenate([jnp.zeros((4, 2, 2, 2)), 10 + jnp.zeros((4, 2, 2, 2))]) + jax.random.normal(
        jax.random.key(7), (8, 2, 2, 2)
    )
    y = np.asarray(bn(x, train=True))
    for group in (y[:4], y[4:]):
        np.testing.assert_allclose(group.mean(axis=(0, 1, 2)), 0.0, atol=1e-5)
    whole = np.asarray(batchnorm.BatchNorm(2)(x, train=True))
    assert np.abs(whole[:4].mean()) > 0.5  # global statistics mix the two groups
    with pytest.raises(ValueError, match="ghost_batch_size"):
        batchnorm.BatchNorm(2, ghost_batch_size=3)(x, train=True)


@pytest.mark.parametrize("pool", [L.avg_pool_2x2, L.max_pool_3x3_s2])
def test_pools_are_differentiable_under_jit(pool):
    # A traced reduce_window init value makes the window reduction non-differentiable under jit.
    x = jax.random.normal(jax.random.key(0), (2, 7, 7, 4))
    grad = lambda x: jax.grad(lambda x: jnp.sum(pool(x) ** 2))(x)
    chex.assert_trees_all_close(jax.jit(grad)(x), grad(x), rtol=1e-6)
