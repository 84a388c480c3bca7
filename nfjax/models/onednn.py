"""Convolutions through oneDNN on the CPU backend: the library PyTorch's CPU convolutions use, called from XLA.

XLA:CPU has no library convolution with groups (it runs one convolution per group, at about 140 GFLOP/s where
oneDNN's grouped kernel reaches the GEMM peak), and its 1x1 and large-spatial 3x3 weight gradients are 1.1-2x
PyTorch's time (docs/performance.md). ``onednn_conv.cc`` next to this file exposes oneDNN's convolution forward,
input gradient and weight gradient as XLA FFI custom calls; :func:`conv2d` joins them with ``jax.custom_vjp``.
:mod:`nfjax.models.lowering` uses them for float32 convolutions on a single CPU device when they are available.

Built on first use, once per machine, by :mod:`nfjax.onednn_build` (the system's oneDNN, Debian/Ubuntu
``apt-get install libdnnl-dev g++``; cached in ``~/.cache/nfjax/onednn``). ``NFJAX_ONEDNN=off`` turns them off;
without the compiler or the library, :func:`available` is False, :func:`unavailable_reason` says why, and XLA's
own convolutions run instead.

Limits: float32 only (other dtypes use XLA's convolutions); reverse-mode gradients only (first order); the
custom calls are not partitioned, so programs over several devices keep XLA's convolutions (an unpartitioned
call would gather the batch onto every device); artifacts exported with ``jax.export`` never contain them.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nfjax import onednn_build

TARGETS = {
    "forward": "NfjaxOnednnConvForward",
    "backward": "NfjaxOnednnConvBackward",
}


class OnednnUnavailable(RuntimeError):
    """oneDNN's convolutions were asked for explicitly but cannot be built or loaded here."""


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    """(library, None) with the custom calls registered with XLA, or (None, the reason they are not)."""
    path, reason = onednn_build.library()
    if path is None:
        return None, reason
    try:
        library = ctypes.CDLL(str(path))
    except OSError as e:
        return None, f"loading {path} failed ({e}); {onednn_build.INSTALL_HINT}"
    for name in TARGETS.values():
        jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(library, name)), platform="cpu")
    return library, None


def available() -> bool:
    """Whether the oneDNN convolutions can run in this process (builds and loads them the first time)."""
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is False (None when it is True)."""
    return _load()[1]


def version() -> str | None:
    """oneDNN's version as loaded, e.g. '2.6.3' (None when unavailable)."""
    library = _load()[0]
    if library is None:
        return None
    v = library.NfjaxOnednnVersion()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def require() -> None:
    """Raises :class:`OnednnUnavailable`, saying why, unless the convolutions can run in this process."""
    backend = jax.default_backend()
    if backend != "cpu":
        raise OnednnUnavailable(f"oneDNN convolutions run on the CPU backend; this process runs on {backend}")
    if not available():
        raise OnednnUnavailable(f"oneDNN convolutions are unavailable: {unavailable_reason()}")


def explicit_padding(
    in_hw: Sequence[int], window: Sequence[int], strides: Sequence[int], padding
) -> tuple[tuple[int, int], tuple[int, int]]:
    """'SAME' / 'VALID' / explicit pairs -> ((top, bottom), (left, right)), as ``lax.conv_general_dilated``."""
    if isinstance(padding, str):
        pads = jax.lax.padtype_to_pads(tuple(in_hw), tuple(window), tuple(strides), padding)
    else:
        pads = padding
    (top, bottom), (left, right) = (tuple(int(v) for v in p) for p in pads)
    return (top, bottom), (left, right)


def _attrs(strides, pads, groups) -> dict:
    (top, bottom), (left, right) = pads
    values = dict(sh=strides[0], sw=strides[1], pt=top, pb=bottom, pl=left, pr=right, g=groups)
    return {k: np.int64(v) for k, v in values.items()}


def _out_size(size: int, window: int, stride: int, pad: tuple[int, int]) -> int:
    return (size + pad[0] + pad[1] - window) // stride + 1


def _call(which: str, shapes, *operands, strides, pads, groups):
    results = jax.tree.map(lambda shape: jax.ShapeDtypeStruct(shape, jnp.float32), shapes, is_leaf=_is_shape)
    call = jax.ffi.ffi_call(TARGETS[which], results, vmap_method="sequential")
    return call(*operands, **_attrs(strides, pads, groups))


def _is_shape(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) for v in value)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, kernel, strides, pads, groups):
    return _forward(x, kernel, strides, pads, groups)


def _forward(x, kernel, strides, pads, groups):
    n, h, w, _ = x.shape
    kh, kw, _, o = kernel.shape
    shape = (n, _out_size(h, kh, strides[0], pads[0]), _out_size(w, kw, strides[1], pads[1]), o)
    return _call("forward", shape, x, kernel, strides=strides, pads=pads, groups=groups)


def _fwd(x, kernel, strides, pads, groups):
    return _forward(x, kernel, strides, pads, groups), (x, kernel)


def _bwd(strides, pads, groups, residuals, dy):
    x, kernel = residuals
    dx, dkernel = _call("backward", (x.shape, kernel.shape), x, kernel, dy, strides=strides, pads=pads, groups=groups)
    return dx, dkernel


_conv.defvjp(_fwd, _bwd)


def supports(x: jax.Array, kernel: jax.Array) -> bool:
    """Whether :func:`conv2d` takes these operands (float32 NHWC input, HWIO kernel)."""
    return x.ndim == 4 and kernel.ndim == 4 and x.dtype == jnp.float32 and kernel.dtype == jnp.float32


def conv2d(x: jax.Array, kernel: jax.Array, strides: Sequence[int] = (1, 1), padding="SAME", groups: int = 1):
    """NHWC x HWIO convolution (``feature_group_count=groups``) by oneDNN; float32. Gradients with respect to
    both operands (reverse mode). Raises :class:`OnednnUnavailable` when the library cannot be loaded."""
    require()
    if not supports(x, kernel):
        raise ValueError(f"oneDNN convolutions take float32 NHWC x HWIO, got {x.dtype} {x.shape}, {kernel.dtype}")
    if x.shape[-1] != kernel.shape[2] * groups or kernel.shape[-1] % groups:
        raise ValueError(f"channels {x.shape[-1]} -> {kernel.shape[-1]} do not split into {groups} groups")
    strides = tuple(int(s) for s in strides)
    pads = explicit_padding(x.shape[1:3], kernel.shape[:2], strides, padding)
    return _conv(x, kernel, strides, pads, int(groups))
