"""Building blocks shared by the model zoo.

Layout conventions: activations are NHWC, conv kernels HWIO, Dense kernels (in, out). Parameters are kept in
float32; ``dtype`` is the compute dtype (bf16 on GPU/TPU, f32 on CPU).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from nfjax.models import lowering

Padding = str | Sequence[tuple[int, int]]
GroupedConvImpl = lowering.ConvImpl

# act(x) * gamma has unit variance for x ~ N(0, 1): gamma = 1 / std(act(x)) (not 1 / rms: relu's is 1.714, not
# 1.414). The constants are DeepMind's table (nfnets/base.py ``nonlinearities``), every entry and literal as released;
# they are Monte-Carlo estimates, within 1.2e-3 of the exact integrals (tests). timm copies the same literals minus
# glu and spells soft_sign "softsign".
GAMMA = {
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
# Names that share another activation's gamma: timm's erf GELU (differs from the tanh form by < 1e-3) and timm's
# spelling of soft_sign.
_GAMMA_ALIASES = {"gelu_exact": "gelu", "softsign": "soft_sign"}

_BASE_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": lambda x: x,
    "celu": jax.nn.celu,
    "elu": jax.nn.elu,
    # DeepMind uses jax.nn.gelu's default tanh approximation; "gelu_exact" is timm's erf form.
    "gelu": jax.nn.gelu,
    "gelu_exact": lambda x: jax.nn.gelu(x, approximate=False),
    # Gates one half of the last axis with the other: [..., 2C] -> [..., C] (DeepMind's gamma assumes this).
    "glu": jax.nn.glu,
    "leaky_relu": jax.nn.leaky_relu,
    "log_sigmoid": jax.nn.log_sigmoid,
    # Normalizes over the last (channel) axis.
    "log_softmax": jax.nn.log_softmax,
    "relu": jax.nn.relu,
    "relu6": jax.nn.relu6,
    "selu": jax.nn.selu,
    "sigmoid": jax.nn.sigmoid,
    "silu": jax.nn.silu,
    "soft_sign": jax.nn.soft_sign,
    "softsign": jax.nn.soft_sign,
    "softplus": jax.nn.softplus,
    "tanh": jnp.tanh,
}
# Activations that change the channel count; the NF models' widths need a shape-preserving one.
_SHAPE_CHANGING = frozenset({"glu"})


def activation_gamma(name: str) -> float:
    """The gamma of activation ``name`` (aliases: ``gelu_exact`` -> gelu's, ``softsign`` -> soft_sign's)."""
    if name not in _BASE_ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; valid: {sorted(_BASE_ACTIVATIONS)}")
    return GAMMA[_GAMMA_ALIASES.get(name, name)]


def activation_fn(name: str, scaled: bool = True) -> Callable[[jax.Array], jax.Array]:
    """Returns ``act(x) * gamma`` (``scaled=True``) or the plain activation (gamma folded into the convs)."""
    gamma = activation_gamma(name)
    base = _BASE_ACTIVATIONS[name]
    if not scaled:
        return base
    return lambda x: base(x) * jnp.asarray(gamma, x.dtype)


def block_activation(name: str, scaled: bool = True) -> Callable[[jax.Array], jax.Array]:
    """:func:`activation_fn` for the NF models, which need an activation that keeps the channel count."""
    if name in _SHAPE_CHANGING:
        valid = sorted(set(_BASE_ACTIVATIONS) - _SHAPE_CHANGING)
        raise ValueError(
            f"activation {name!r} halves the channel axis, which the NF models' fixed widths cannot take; "
            f"valid: {valid}"
        )
    return activation_fn(name, scaled)


def make_divisible(value: float, divisor: int, round_limit: float = 0.0) -> int:
    """``value`` rounded to the nearest multiple of ``divisor`` (at least ``divisor``), bumped up one multiple
    when rounding lost more than ``1 - round_limit`` of it: timm's channel rounding."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < round_limit * value else rounded


# ----------------------------------------------------------------------------------------------------------
# Convolution helpers
# ----------------------------------------------------------------------------------------------------------


resolve_grouped_impl = lowering.resolve_impl  # the name models and tests have used since grouped convs
conv2d = lowering.conv2d  # NHWC x HWIO convolution, lowered per backend (nfjax/models/lowering.py)

# Set while a model whose WSConv kernels are already standardized is traced (see :func:`prestandardized`).
_PRESTANDARDIZED: contextvars.ContextVar[bool] = contextvars.ContextVar("nfjax_prestandardized", default=False)


@contextlib.contextmanager
def prestandardized() -> Iterator[None]:
    """While active, every WSConv traced takes its ``kernel`` param as the finished standardized kernel (gain
    and gamma included) instead of standardizing it: for params from :func:`nfjax.steps.standardize_weights`,
    which does the standardization once for inference rather than on every call. Like
    :func:`nfjax.models.lowering.forced_lowering`, it applies to functions traced inside the block."""
    token = _PRESTANDARDIZED.set(True)
    try:
        yield
    finally:
        _PRESTANDARDIZED.reset(token)


def standardize_kernel(
    kernel: jax.Array,
    gain: jax.Array | None = None,
    eps: float = 1e-4,
    eps_mode: Literal["floor", "add"] = "floor",
    gamma: float = 1.0,
    impl: lowering.ConvImpl = "auto",
) -> jax.Array:
    """Scaled weight standardization of an HWIO (or (in, out)) kernel, in float32.

    Per output channel (last axis), with mean mu and population variance var over all other axes and
    fan_in = prod(kernel.shape[:-1]):
      floor (DeepMind): w_hat = (w - mu) * gain * gamma * rsqrt(max(var * fan_in, eps))
      add   (timm):     w_hat = (w - mu) * gain * gamma / sqrt(fan_in * (var + eps))
    """
    if eps_mode not in ("floor", "add"):
        raise ValueError(f"eps_mode must be 'floor' (DeepMind) or 'add' (timm), got {eps_mode!r}")
    w = kernel.astype(jnp.float32)
    gain = jnp.ones(w.shape[-1:], jnp.float32) if gain is None else gain.astype(jnp.float32)  # x * 1 is exact
    # the CPU form has the same forward, with a closed-form backward
    form = lowering.standardize_kernel if lowering.cpu_forms(impl) else lowering.standardize_plain
    return form(w, gain, eps, eps_mode == "floor", gamma)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)  # type: ignore[return-value]


def resolve_padding(padding: Padding, kernel_size: Sequence[int], strides: Sequence[int]) -> Padding:
    """'symmetric' -> explicit PyTorch-style padding ((s - 1) + (k - 1)) // 2 on both sides of each spatial
    axis (timm's non-``dm_`` models); 'SAME' (TF/Haiku: the extra pixel of a stride-2 conv goes after), 'VALID'
    and explicit pairs pass through."""
    if padding != "symmetric":
        return padding
    pads = [((s - 1) + (k - 1)) // 2 for k, s in zip(kernel_size, strides, strict=True)]
    return tuple((p, p) for p in pads)


def conv_padding(padding: str) -> str:
    """A model's ``padding`` option -> WSConv's: 'same' (TF/Haiku) -> 'SAME', 'symmetric' (PyTorch) as is."""
    if padding not in ("same", "symmetric"):
        raise ValueError(f"padding must be 'same' (TF/Haiku) or 'symmetric' (PyTorch), got {padding!r}")
    return "SAME" if padding == "same" else "symmetric"


class WSConv(nnx.Module):
    """Conv2D with scaled weight standardization (NF-ResNet / NFNet), a learnable gain and a bias.

    Parameters: ``kernel`` [kh, kw, in/groups, out] (variance scaling 1.0, fan_in, normal), ``gain`` [out] (1),
    ``bias`` [out] (0). The kernel is standardized in float32 on every call, then cast to ``dtype`` (inside
    :func:`prestandardized`, the ``kernel`` param is taken as already standardized).
    ``gamma`` folds an activation gamma into the kernel (timm's non-``dm_`` models); ``gain_init`` 0 makes a
    residual branch start silent without a SkipInit scalar (timm's ``skipinit=False`` layout);
    ``padding='symmetric'`` pads like PyTorch (see :func:`resolve_padding`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int | Sequence[int] = 3,
        strides: int | Sequence[int] = 1,
        padding: Padding = "SAME",
        groups: int = 1,
        use_bias: bool = True,
        eps: float = 1e-4,
        eps_mode: Literal["floor", "add"] = "floor",
        gamma: float = 1.0,
        grouped_impl: GroupedConvImpl = "auto",
        dtype: jnp.dtype | None = None,
        gain_init: float = 1.0,
        *,
        rngs: nnx.Rngs,
    ):
        if in_features % groups or out_features % groups:
            raise ValueError(f"channels {in_features}->{out_features} are not divisible by groups={groups}")
        kh, kw = _pair(kernel_size)
        shape = (kh, kw, in_features // groups, out_features)
        init = jax.nn.initializers.variance_scaling(1.0, "fan_in", "normal")
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.gain = nnx.Param(jnp.full((out_features,), gain_init, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        self.strides = _pair(strides)
        self.padding = resolve_padding(padding, (kh, kw), self.strides)
        self.groups = groups
        self.eps = eps
        self.eps_mode = eps_mode
        self.gamma = gamma
        self.grouped_impl = grouped_impl
        self.dtype = dtype

    def standardized_kernel(self) -> jax.Array:
        return standardize_kernel(
            self.kernel[...], self.gain[...], self.eps, self.eps_mode, self.gamma, impl=self.grouped_impl
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        w = self.kernel[...] if _PRESTANDARDIZED.get() else self.standardized_kernel()
        w = w.astype(dtype)
        y = conv2d(x.astype(dtype), w, self.strides, self.padding, self.groups, self.grouped_impl)
        if self.bias is not None:
            y = y + self.bias[...].astype(dtype)
        return y


class Conv(nnx.Module):
    """Plain Conv2D (BN baseline): HWIO ``kernel``, optional ``bias``; torchvision-style symmetric padding."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 3,
        strides: int = 1,
        padding: Padding | None = None,
        groups: int = 1,
        use_bias: bool = False,
        grouped_impl: GroupedConvImpl = "auto",
        dtype: jnp.dtype | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        shape = (kernel_size, kernel_size, in_features // groups, out_features)
        # Kaiming normal, fan_out, ReLU gain: torchvision's ResNet init.
        init = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")
        self.kernel = nnx.Param(init(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_features,), jnp.float32)) if use_bias else None
        pad = (kernel_size - 1) // 2
        self.padding = padding if padding is not None else ((pad, pad), (pad, pad))
        self.strides = (strides, strides)
        self.groups = groups
        self.grouped_impl = grouped_impl
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        y = conv2d(
            x.astype(dtype),
            self.kernel[...].astype(dtype),
            self.strides,
            self.padding,
            self.groups,
            self.grouped_impl,
        )
        return y if self.bias is None else y + self.bias[...].astype(dtype)


def torch_linear_init(fan_in: int) -> Callable:
    """torch.nn.Linear's default init for its weight and its bias alike: uniform on [-1/sqrt(fan_in), 1/sqrt(fan_in)]
    (the weight's kaiming_uniform with a=sqrt(5) reduces to this bound)."""
    bound = 1.0 / math.sqrt(fan_in)
    return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


class Linear(nnx.Module):
    """Dense layer with an (in, out) ``kernel`` and an [out] ``bias``; float32 params, compute in ``dtype``.

    Default init: kernel truncated normal with stddev 1/sqrt(in_features) (Haiku's hk.Linear), bias 0.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_init: Callable | None = None,
        dtype: jnp.dtype | None = None,
        bias_init: Callable | None = None,
        *,
        rngs: nnx.Rngs,
    ):
        stddev = 1.0 / math.sqrt(in_features)
        init = kernel_init or jax.nn.initializers.truncated_normal(stddev)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), jnp.float32))
        # No key drawn for the zero bias: the other layers' draws stay those of earlier versions.
        if bias_init is None:
            bias = jnp.zeros((out_features,), jnp.float32)
        else:
            bias = bias_init(rngs.params(), (out_features,), jnp.float32)
        self.bias = nnx.Param(bias)
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        return x.astype(dtype) @ self.kernel[...].astype(dtype) + self.bias[...].astype(dtype)


class SqueezeExcite(nnx.Module):
    """Squeeze-and-excite gate: mean over H, W -> fc0 -> ReLU -> fc1 -> sigmoid; returns [N, 1, 1, C].

    The ReLU is plain (no gamma): the released NFNet weights were trained that way.
    hidden = max(1, int(in_features * ratio)) (DeepMind), or with ``divisor`` > 0 timm's
    make_divisible(in_features * ratio, divisor) (the same numbers for the zoo's widths).
    """

    def __init__(
        self, in_features: int, out_features: int, ratio: float, dtype=None, divisor: int = 0, *, rngs: nnx.Rngs
    ):
        hidden = make_divisible(in_features * ratio, divisor) if divisor else max(1, int(in_features * ratio))
        self.fc0 = Linear(in_features, hidden, dtype=dtype, rngs=rngs)
        self.fc1 = Linear(hidden, out_features, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jnp.mean(x, axis=(1, 2))
        h = self.fc1(jax.nn.relu(self.fc0(h)))
        return jax.nn.sigmoid(h)[:, None, None, :]


def eca_kernel_size(channels: int) -> int:
    """ECA-Net's adaptive kernel size: t = int(|log2(C) + 1| / 2), the next odd number from t, at least 3."""
    t = int(abs(math.log(channels, 2) + 1) / 2)
    return max(t if t % 2 else t + 1, 3)


class EfficientChannelAttention(nnx.Module):
    """ECA gate (Wang et al. 2020, timm's EcaModule): mean over H, W -> 1-D conv across channels (zero padding,
    no bias) -> sigmoid; returns [N, 1, 1, C]. Parameter: ``kernel`` [k], k = :func:`eca_kernel_size`, init
    uniform(+-1/sqrt(k)) (PyTorch's Conv1d default)."""

    def __init__(self, channels: int, dtype=None, *, rngs: nnx.Rngs):
        size = eca_kernel_size(channels)
        bound = 1.0 / math.sqrt(size)
        self.kernel = nnx.Param(jax.random.uniform(rngs.params(), (size,), jnp.float32, -bound, bound))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = self.dtype or x.dtype
        h = jnp.mean(x, axis=(1, 2)).astype(dtype)  # [N, C]
        kernel = self.kernel[...].astype(dtype)
        size, channels = kernel.shape[0], h.shape[-1]
        pad = (size - 1) // 2
        padded = jnp.pad(h, ((0, 0), (pad, size - 1 - pad)))
        # Cross-correlation (PyTorch's conv): out[c] = sum_j kernel[j] * h[c + j - pad].
        out = sum(kernel[j] * padded[:, j : j + channels] for j in range(size))
        return jax.nn.sigmoid(out)[:, None, None, :]


def attention_kind(attention: str | None) -> str | None:
    """Validates a block's ``attention`` option: 'se' (squeeze-excite, on when se_ratio > 0), 'eca' or None."""
    if attention not in ("se", "eca", None):
        raise ValueError(f"attention must be 'se', 'eca' or None, got {attention!r}")
    return attention


def stochastic_depth(
    x: jax.Array, rate: float, key: jax.Array | None, train: bool, scale_by_keep: bool = False
) -> jax.Array:
    """Drops the whole residual branch of each example with probability ``rate`` (mask shape [N, 1, 1, 1]).

    DeepMind's convention (default): no rescaling at train time, so the branch's expected value shrinks by
    (1 - rate) in training; ``scale_by_keep=True`` divides kept branches by (1 - rate) instead (timm).
    """
    if not train or rate <= 0.0:
        return x
    if key is None:
        raise ValueError("stochastic depth in training needs a PRNG key: call the model with key=...")
    keep = 1.0 - rate
    mask = jnp.floor(keep + jax.random.uniform(key, (x.shape[0], 1, 1, 1), jnp.float32)).astype(x.dtype)
    if scale_by_keep:
        x = x / jnp.asarray(keep, x.dtype)
    return x * mask


def dropout(x: jax.Array, rate: float, key: jax.Array | None, train: bool) -> jax.Array:
    """Inverted dropout (kept units scaled by 1/(1-rate)), active only in training."""
    if not train or rate <= 0.0:
        return x
    if key is None:
        raise ValueError("dropout in training needs a PRNG key: call the model with key=...")
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def avg_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 stride-2 average pool with SAME padding that averages only real pixels (Haiku's avg_pool)."""
    # Init values are NumPy constants: a traced init (jnp under jit) makes reduce_window a generic reduction
    # that JAX cannot differentiate; a concrete one selects the differentiable sum/max window primitives.
    window, zero = (1, 2, 2, 1), np.zeros((), x.dtype)
    summed = jax.lax.reduce_window(x, zero, jax.lax.add, window, window, "SAME")
    ones = np.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    counts = jax.lax.reduce_window(ones, zero, jax.lax.add, window, window, "SAME")
    return summed / counts


max_pool_3x3_s2 = lowering.max_pool_3x3_s2
