"""oneDNN's convolutions as XLA custom calls (nfjax/models/onednn.py): outputs and both gradients equal XLA's
convolution's, the CPU lowering picks them only where they can run, and a machine without them says why."""

import os
import shutil
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from nfjax.models import create_model, lowering, onednn
from nfjax.steps import apply_model

HEADER = "/usr/include/oneapi/dnnl/dnnl.hpp"
needs_onednn = pytest.mark.skipif(not onednn.available(), reason=f"oneDNN: {onednn.unavailable_reason()}")
TARGET = onednn.TARGETS["forward"]


def test_builds_wherever_the_library_and_a_compiler_are_installed():
    # The README's test command installs both; where they are, the convolutions must build and load.
    if not (os.path.exists(HEADER) and shutil.which(os.environ.get("CXX", "c++"))):
        pytest.skip("no oneDNN headers or C++ compiler on this machine")
    assert onednn.available(), onednn.unavailable_reason()
    assert onednn.unavailable_reason() is None
    assert onednn.version().count(".") == 2


def _xla_conv(x, w, strides, padding, groups):
    dn = ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn, feature_group_count=groups)


def _value_and_grads(conv, x, w):
    # A non-linear loss, so the gradients reaching the convolution differ per output element.
    return jax.jit(jax.value_and_grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))(x, w)


CASES = [
    # (batch, height, width, in, out, kernel, stride, padding, groups)
    (2, 9, 10, 8, 12, 3, 2, "SAME", 2),  # odd sizes, stride 2: SAME pads (0, 1) or (1, 1)
    (3, 8, 8, 12, 12, 3, 2, ((0, 1), (0, 1)), 3),  # DeepMind's explicit asymmetric padding
    (2, 10, 7, 6, 6, 1, 2, "VALID", 3),  # strided 1x1, grouped
    (1, 11, 11, 3, 8, 7, 2, ((3, 3), (3, 3)), 1),  # a ResNet stem
    (2, 6, 6, 8, 8, 3, 1, "SAME", 8),  # depthwise
]


@needs_onednn
@pytest.mark.parametrize("n,h,w,c,o,k,s,padding,groups", CASES)
@pytest.mark.parametrize("activations", ["nhwc", "blocked"])  # the weight gradient's layouts (CPUs choose one)
def test_output_and_gradients_equal_xla_convolution(n, h, w, c, o, k, s, padding, groups, activations, monkeypatch):
    monkeypatch.setenv("NFJAX_ONEDNN_ACTIVATIONS", activations)  # read by the library on every call
    x = jax.random.normal(jax.random.key(0), (n, h, w, c))
    kernel = jax.random.normal(jax.random.key(1), (k, k, c // groups, o)) * 0.3
    strides = (s, s)
    y = jax.jit(lambda x, w: onednn.conv2d(x, w, strides, padding, groups))(x, kernel)
    y_xla = _xla_conv(x, kernel, strides, padding, groups)
    assert y.shape == y_xla.shape
    np.testing.assert_allclose(y, y_xla, rtol=1e-5, atol=1e-5)
    value, grads = _value_and_grads(lambda x, w: onednn.conv2d(x, w, strides, padding, groups), x, kernel)
    value_xla, grads_xla = _value_and_grads(lambda x, w: _xla_conv(x, w, strides, padding, groups), x, kernel)
    np.testing.assert_allclose(value, value_xla, rtol=1e-5)
    chex.assert_trees_all_close(grads, grads_xla, rtol=1e-4, atol=1e-5)
    assert min(float(jnp.abs(g).max()) for g in grads) > 1e-2  # gradients large enough to tell apart


@needs_onednn
def test_the_lowering_sends_float32_convolutions_to_onednn_and_others_to_xla():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 8))
    w = jax.random.normal(jax.random.key(1), (3, 3, 4, 8)) * 0.3

    def program(x, w, impl):
        fn = lambda x, w: jnp.sum(jnp.sin(lowering.conv2d(x, w, (1, 1), "SAME", 2, impl)))
        return jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, w).as_text()

    text = program(x, w, "onednn")
    assert TARGET in text and onednn.TARGETS["backward"] in text and "convolution" not in text
    assert TARGET not in program(x, w, "split")
    bf16 = program(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), "onednn")  # float32 only: XLA's convolution
    assert TARGET not in bf16 and "convolution" in bf16
    y = lowering.conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), "SAME", 2, "onednn")
    y_split = lowering.conv2d(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1), "SAME", 2, "split")
    np.testing.assert_array_equal(y, y_split)


@needs_onednn
def test_a_grouped_nfnet_gives_the_same_logits_and_gradients():
    # The small BN and NF ResNets are compared under every lowering in tests/test_lowering.py.
    tiny = dict(widths=(32, 64, 96, 96), depths=(1, 1, 1, 1), group_size=16, stem_widths=(8, 8, 16))  # 2-6 groups
    model = create_model("nfnet_f0", num_classes=10, rngs=nnx.Rngs(0), **tiny)
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params = nnx.to_pure_dict(params)
    x = jax.random.normal(jax.random.key(3), (2, 32, 32, 3))
    loss = lambda p: jnp.sum(jnp.sin(apply_model(graphdef, p, {}, x, train=False)[0]))
    results = {}
    for impl in ("split", "onednn"):
        with lowering.forced_lowering(impl):
            results[impl] = jax.jit(jax.value_and_grad(loss))(params)
    np.testing.assert_allclose(results["onednn"][0], results["split"][0], rtol=1e-4, atol=1e-5)
    chex.assert_trees_all_close(results["onednn"][1], results["split"][1], rtol=1e-3, atol=1e-5)


def test_auto_takes_onednn_only_on_a_single_device():
    if jax.default_backend() != "cpu":
        pytest.skip("a CPU choice")
    assert jax.device_count() > 1  # the suite runs on 8 simulated devices (conftest)
    assert lowering.resolve_impl("auto") == "split"  # the custom calls are not partitioned over devices
    assert not lowering.onednn_by_default()
    # One device: 'auto' is 'onednn' exactly when the library loads (a fresh process: the device count is fixed
    # when JAX starts).
    code = "from nfjax.models import lowering, onednn; print(lowering.resolve_impl('auto'), onednn.available())"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    resolved, loads = out.split()
    assert resolved == ("onednn" if loads == "True" else "split")


@needs_onednn
def test_a_one_device_experiment_takes_onednn_in_a_process_with_several():
    from nfjax.benchmark_train import build_benchmark_experiment

    exp, state, batch = build_benchmark_experiment("nf_resnet_small", 16, 8)  # a mesh of one device
    assert exp.mesh.size == 1 < jax.device_count()
    assert TARGET in exp.train_step().lower(state, batch).as_text()
    assert TARGET in exp.eval_step.lower(state["params"], {}, batch).as_text()


def test_exports_never_contain_the_custom_calls():
    with lowering.forced_lowering("onednn" if onednn.available() else None):
        with lowering.for_platforms(("cpu",)):
            assert lowering.resolve_impl("auto") == "split"  # portable: XLA's own convolutions


def _load_in_subprocess(tmp_path, env_update: dict) -> str:
    code = textwrap.dedent(
        """
        from nfjax.models import lowering, onednn
        print(onednn.available(), lowering.onednn_by_default())
        print(onednn.unavailable_reason())
        try:
            lowering.resolve_impl("onednn")
        except onednn.OnednnUnavailable as e:
            print("raised:", e)
        """
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(NFJAX_CACHE_DIR=str(tmp_path), **env_update)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return result.stdout


def test_turned_off_or_unbuildable_falls_back_and_says_why(tmp_path):
    out = _load_in_subprocess(tmp_path, {"NFJAX_ONEDNN": "off"})
    assert out.splitlines()[0] == "False False"
    assert "turned off by NFJAX_ONEDNN=off" in out and "raised: oneDNN convolutions are unavailable" in out

    out = _load_in_subprocess(tmp_path, {"CXX": "no-such-compiler"})
    assert out.splitlines()[0] == "False False"
    assert "no C++ compiler (no-such-compiler)" in out and "apt-get install libdnnl-dev" in out

    failing = tmp_path / "failing-cxx"
    failing.write_text("#!/bin/sh\necho 'fatal error: oneapi/dnnl/dnnl.hpp: No such file' >&2\nexit 1\n")
    failing.chmod(0o755)
    out = _load_in_subprocess(tmp_path, {"CXX": str(failing)})
    assert "building the oneDNN convolutions failed (fatal error: oneapi/dnnl/dnnl.hpp" in out
    assert not list((tmp_path / "onednn").glob("*.so"))  # nothing half-built left in the cache


@needs_onednn
def test_bad_operands_are_a_clear_error():
    x = jnp.ones((1, 4, 4, 6))
    with pytest.raises(ValueError, match="do not split into 4 groups"):
        onednn.conv2d(x, jnp.ones((3, 3, 2, 8)), groups=4)
    with pytest.raises(ValueError, match="float32"):
        onednn.conv2d(x.astype(jnp.bfloat16), jnp.ones((3, 3, 6, 8), jnp.bfloat16))


@needs_onednn
def test_macs_and_flops_count_the_network_whatever_runs_its_convolutions():
    from nfjax.models.summary import abstract_model, count_macs, xla_flops_per_image

    model = abstract_model("nf_resnet_small", num_classes=10)
    counts = {}
    for impl in ("split", "onednn"):  # a one-device process (the summary CLI, the benchmark) takes oneDNN
        with lowering.forced_lowering(impl):
            counts[impl] = (count_macs(model, 28), xla_flops_per_image(model, 28))
    assert counts["onednn"] == counts["split"] and counts["split"][0] > 1e6
