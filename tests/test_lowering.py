"""The CPU lowerings (nfjax/models/lowering.py) compute what the plain XLA ops compute: outputs and gradients."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nfjax.models import batchnorm, create_model, lowering, onednn
from nfjax.models import layers as L
from nfjax.steps import apply_model


def _value_and_grads(fn, impl, *args):
    with lowering.forced_lowering(impl):
        return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args)))))(*args)


@pytest.mark.parametrize(
    "size,stride,padding",
    [(9, 1, "SAME"), (9, 2, "SAME"), (8, 2, "SAME"), (7, 2, "VALID"), (8, 2, ((0, 0), (0, 0))), (6, 3, "SAME")],
)
def test_pointwise_conv_as_dot_matches_the_convolution(size, stride, padding):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 5))
    w = jax.random.normal(jax.random.key(1), (1, 1, 5, 6))
    conv = lambda x, w: lowering.conv2d(x, w, (stride, stride), padding)
    (v_native, g_native), (v_split, g_split) = (_value_and_grads(conv, i, x, w) for i in ("native", "split"))
    y_native = lowering.conv2d(x, w, (stride, stride), padding, impl="native")
    y_split = lowering.conv2d(x, w, (stride, stride), padding, impl="split")
    assert y_split.shape == y_native.shape
    np.testing.assert_allclose(y_split, y_native, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(v_split, v_native, rtol=1e-5)
    chex.assert_trees_all_close(g_split, g_native, rtol=1e-5, atol=1e-5)


def test_a_padded_pointwise_conv_keeps_the_convolution():
    x = jax.random.normal(jax.random.key(0), (1, 4, 4, 3))
    w = jax.random.normal(jax.random.key(1), (1, 1, 3, 2))
    pad = ((1, 1), (1, 1))
    y = lowering.conv2d(x, w, (1, 1), pad, impl="split")
    np.testing.assert_allclose(y, lowering.conv2d(x, w, (1, 1), pad, impl="native"), rtol=1e-6)
    assert y.shape == (1, 6, 6, 2)


@pytest.mark.parametrize(
    "size,padding", [(9, "SAME"), (8, "SAME"), (8, ((1, 1), (1, 1))), (9, ((1, 1), (1, 1))), (7, "VALID")]
)
def test_max_pool_gradient_goes_to_the_same_element_as_select_and_scatter(size, padding):
    # ReLU'd and rounded: many windows hold several equal maxima (zeros above all); each gradient must go to the
    # first maximum in row-major window order, as XLA's select-and-scatter does, so the results are equal exactly.
    x = jnp.round(2 * jax.nn.relu(jax.random.normal(jax.random.key(2), (2, size, size + 1, 4)))) / 2
    weights = jnp.arange(1.0, 5.0)
    pool = lambda x: L.max_pool_3x3_s2(x, padding) * weights
    (v_native, g_native), (v_split, g_split) = (_value_and_grads(pool, i, x) for i in ("native", "split"))
    np.testing.assert_array_equal(v_split, v_native)
    np.testing.assert_array_equal(g_split[0], g_native[0])


def test_max_pool_gradient_with_minus_infinity_windows_matches_select_and_scatter():
    x = jnp.full((1, 7, 7, 2), -jnp.inf).at[0, 3:, 3:, :].set(1.0).at[0, 1, 1, 1].set(2.0)
    for padding in ("SAME", ((1, 1), (1, 1))):
        grads = []
        for impl in ("native", "split"):
            y, pullback = jax.vjp(lambda x, i=impl, p=padding: L.max_pool_3x3_s2(x, p, i), x)
            grads.append(pullback(jnp.arange(1.0, 1.0 + y.size).reshape(y.shape))[0])
        np.testing.assert_array_equal(grads[1], grads[0])


def test_batch_norm_closed_form_backward_matches_autodiff():
    x = 2.0 * jax.random.normal(jax.random.key(3), (4, 6, 6, 8)) + 1.0

    def run(impl):
        bn = batchnorm.BatchNorm(8)
        bn.scale[...] = jnp.linspace(0.5, 1.5, 8)
        bn.bias[...] = jnp.linspace(-1.0, 1.0, 8)
        graphdef, state = nnx.split(bn)

        def loss(x, state):
            module = nnx.merge(graphdef, state)
            return jnp.sum(jnp.sin(jax.nn.relu(module(x, train=True)))), nnx.state(module)

        with lowering.forced_lowering(impl):
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(x, state)

    native, split = run("native"), run("split")
    chex.assert_trees_all_close(split, native, rtol=2e-5, atol=2e-6)  # value, running statistics, gradients


@pytest.mark.parametrize(
    "shape, eps_mode, with_gain, gamma, spread",
    [
        ((3, 3, 16, 8), "floor", True, 1.0, 1.0),
        ((1, 1, 24, 6), "add", True, 1.7139588594436646, 1.0),
        ((3, 3, 4, 5), "floor", False, 1.0, 1.0),
        ((20, 7), "add", False, 1.0, 1.0),
        ((3, 3, 8, 4), "floor", True, 1.0, 1e-4),  # var * fan_in below eps: the floor holds the scale
    ],
)
def test_weight_standardization_closed_form_matches_autodiff(shape, eps_mode, with_gain, gamma, spread):
    kernel = spread * jax.random.normal(jax.random.key(1), shape) + 0.3 * spread
    kernel = kernel.at[..., 0].multiply(5.0)  # channels of unequal variance
    gain = jnp.linspace(0.5, 2.0, shape[-1]) if with_gain else None
    probe = jax.random.normal(jax.random.key(2), shape)

    def run(impl):
        def loss(kernel, gain):
            w = L.standardize_kernel(kernel, gain, 1e-4, eps_mode, gamma, impl=impl)
            return jnp.sum(jnp.sin(3.0 * w) * probe), w

        argnums = (0, 1) if with_gain else 0
        return jax.jit(jax.value_and_grad(loss, argnums=argnums, has_aux=True))(kernel, gain)

    (value_n, w_n), grads_n = run("native")
    (value_s, w_s), grads_s = run("split")
    np.testing.assert_array_equal(w_s, w_n)  # the forward is the plain one, operation for operation
    chex.assert_trees_all_close((value_s, grads_s), (value_n, grads_n), rtol=2e-5, atol=1e-6)
    assert np.abs(np.asarray(jax.tree.leaves(grads_n)[0])).max() > 1e-3  # a gradient that can differ


def test_auto_resolves_per_backend_and_can_be_forced():
    on_this_backend = "split" if jax.default_backend() == "cpu" else "native"
    assert lowering.resolve_impl("auto") == on_this_backend
    with lowering.forced_lowering("native"):
        assert lowering.resolve_impl("auto") == "native"
        assert lowering.resolve_impl("split") == "split"  # an explicit choice wins
    assert lowering.resolve_impl("auto") == on_this_backend
    with pytest.raises(ValueError, match="lowering must be"):
        with lowering.forced_lowering("fast"):
            pass


@pytest.mark.parametrize(
    "platforms,expected", [(("cpu",), "split"), (("cuda",), "native"), (("cpu", "tpu"), "native"), (None, None)]
)
def test_exports_get_the_lowering_of_their_target_platforms(platforms, expected):
    with lowering.for_platforms(platforms):
        resolved = lowering.resolve_impl("auto")
    assert resolved == (expected or lowering.resolve_impl("auto"))


@pytest.mark.parametrize("name", ["resnet_small", "nf_resnet_small"])
def test_small_networks_give_the_same_loss_and_gradients_under_both_lowerings(name):
    model = create_model(name, num_classes=5, rngs=nnx.Rngs(0))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, stats = nnx.to_pure_dict(params), nnx.to_pure_dict(stats)
    x = jax.random.normal(jax.random.key(5), (4, 16, 16, 3))
    labels = jnp.arange(4) % 5

    def loss(params):
        logits, _ = apply_model(graphdef, params, stats, x, train=True, key=jax.random.key(6))
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], -1))

    results = {}
    for impl in ("native", "split") + (("onednn",) if onednn.available() else ()):  # oneDNN's convolutions too
        with lowering.forced_lowering(impl):
            results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    v_native, g_native = results.pop("native")
    for v, g in results.values():
        np.testing.assert_allclose(v, v_native, rtol=1e-5)
        chex.assert_trees_all_close(g, g_native, rtol=1e-3, atol=1e-5)


def test_the_profiler_records_every_op_of_the_forward_and_restores_the_layers():
    from nfjax.benchmark_train import build_benchmark_experiment

    from helpers import load_script

    profile = load_script("profile_step")
    exp, state, batch = build_benchmark_experiment("resnet_small", 16, 8)
    patched = lambda: (
        L.conv2d,
        lowering.pointwise_conv,
        lowering.batch_norm_train,
        batchnorm.BatchNorm.__call__,
        lowering.standardize_kernel,
    )
    before = patched()
    ops, first_block = profile.record_ops(exp, state, batch)
    with profile.only_lowerings({"max_pool"}):
        assert lowering.pointwise_conv is not before[1] and lowering.batch_norm_train is not before[2]
        assert lowering.standardize_kernel is lowering.standardize_plain
    assert patched() == before
    convs = [op for op in ops if op[0] == "conv"]
    kinds = {op[0] for op in ops}
    assert kinds == {"conv", "batch_norm"}  # the small-image BN ResNet: no max pool, no weight standardization
    assert first_block == 1 and convs[0][1:3] == ((8, 16, 16, 3), (3, 3, 3, 32))  # its 3x3 stem, then the blocks
    assert sum(op[0] == "batch_norm" for op in ops) == len(convs)  # one BN per convolution
    assert profile.conv_kind(convs[0], first_block, 0) == "stem convs"
    assert {profile.conv_kind(op, first_block, i) for i, op in enumerate(convs)} >= {"1x1 convs", "3x3 convs"}


def _ynn_convolutions(hlo: str) -> int:
    """How many YNNPACK fusions of a compiled module's text are one convolution (their computation's root)."""
    called = set()
    for line in hlo.splitlines():
        if '"__ynn_fusion"' in line and "calls=" in line:
            called.add(line.split("calls=")[1].split(",")[0].strip())
    count, current = 0, None
    for line in hlo.splitlines():
        if line and not line.startswith(" "):  # a computation's header: "%name (params) -> shape {"
            current = line.split()[0]
        elif current in called and line.lstrip().startswith("ROOT") and " convolution(" in line:
            count += 1
    return count


def test_cpu_steps_compile_convolutions_to_eigen_with_the_same_values():
    if jax.default_backend() != "cpu":
        pytest.skip("the compiler options are for the CPU backend")
    options = lowering.compiler_options()
    with lowering.forced_lowering("native"):
        assert lowering.compiler_options() is None  # 'native' keeps every XLA default
    assert lowering.compiler_options("native") is None
    with pytest.MonkeyPatch.context() as patch:  # the user's own choice in XLA_FLAGS wins
        patch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
        assert lowering.compiler_options() is None
    if options is None:
        pytest.skip("this jaxlib does not take the YNNPACK fusion option")
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 32))  # large enough for YNNPACK to take by default
    w = jax.random.normal(jax.random.key(1), (3, 3, 32, 32)) * 0.1
    fn = lambda x, w: jax.grad(lambda x, w: jnp.sum(jnp.sin(lowering.conv2d(x, w))), argnums=(0, 1))(x, w)
    default, eigen = jax.jit(fn), jax.jit(fn, compiler_options=options)
    assert _ynn_convolutions(eigen.lower(x, w).compile().as_text()) == 0
    chex.assert_trees_all_close(eigen(x, w), default(x, w), rtol=1e-4, atol=1e-4)


def test_the_experiment_steps_get_the_cpu_compiler_options():
    if jax.default_backend() != "cpu" or lowering.compiler_options() is None:
        pytest.skip("no CPU compiler options on this backend or jaxlib")
    from nfjax.benchmark_train import build_benchmark_experiment

    exp, state, batch = build_benchmark_experiment("resnet_small", 16, 8)
    with lowering.forced_lowering("split"):  # XLA's convolutions (not oneDNN's), traced here
        hlo = exp.eval_step.lower(state["params"], state["batch_stats"], batch).compile().as_text()
        assert "convolution(" in hlo and _ynn_convolutions(hlo) == 0
        hlo = exp.train_step().lower(state, batch).compile().as_text()
        assert "convolution(" in hlo and _ynn_convolutions(hlo) == 0
