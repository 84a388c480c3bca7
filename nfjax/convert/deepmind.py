"""DeepMind's released NFNet weights (``F0_haiku.npz`` .. ``F6_haiku.npz``) <-> nfjax NFNet params.

Despite the suffix, the release files are dill pickles of ``{module_path: {param_name: ndarray}}`` (Haiku's
naming: ``NFNet/~/nf_block_3/~/conv1b`` with ``w``/``gain``/``bias``). Unpickling runs whatever code a file
names, so files are read with :class:`SafeUnpickler`, which admits only the few NumPy constructors such a file
needs and refuses everything else before it runs. Kernels are already HWIO and linear weights (in, out), as in
nfjax: conversion is renaming only.
"""

from __future__ import annotations

import io
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from nfjax.convert.errors import ConversionError, flatten, mismatch_message, unflatten

ROOT = "NFNet/~/"
_RECONSTRUCT = np.zeros(1).__reduce__()[0]  # numpy's array constructor, whatever module numpy keeps it in
_SCALAR = np.float32(0).__reduce__()[0]


def _create_array(constructor, args, state, npdict=None):
    """What dill records for an ndarray: the constructor call, then ``__setstate__``; no extra attributes."""
    if constructor is not _RECONSTRUCT or npdict:
        raise pickle.UnpicklingError("array with a non-NumPy constructor or extra attributes")
    array = constructor(*args)
    array.__setstate__(state)
    return array


def _safe_encode(text: str, encoding: str = "latin1") -> bytes:
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


# (module, name) -> the object used instead. Every entry only builds arrays, dtypes or bytes.
ALLOWED = {
    **{(m, "_reconstruct"): _RECONSTRUCT for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    **{(m, "scalar"): _SCALAR for m in ("numpy.core.multiarray", "numpy._core.multiarray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("dill._dill", "_create_array"): _create_array,
    ("_codecs", "encode"): _safe_encode,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers, NumPy arrays and dtypes; any other global is refused."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"the file asks to load {module}.{name}") from None


def load_deepmind_file(path: str) -> dict[str, dict[str, np.ndarray]]:
    """The two-level parameter mapping of a DeepMind release file, read without running code from it."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        params = SafeUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as e:
        raise ConversionError(
            f"refused to load {path}: {e}. DeepMind's weight files hold only dicts of NumPy arrays; this file "
            "holds something else and was not unpickled further (no code from it ran). Check where it came from."
        ) from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise ConversionError(
            f"{path} is not a readable DeepMind weight file ({type(e).__name__}: {e}); it may be truncated "
            "(download it again)"
        ) from None
    if not isinstance(params, dict) or not all(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{path} does not hold DeepMind's {{module: {{param: array}}}} mapping")
    return params


def _module_name(path: tuple) -> tuple[str, str]:
    """nfjax param path -> (Haiku module path, Haiku param name)."""
    leaf = {"kernel": "w", "gain": "gain", "bias": "bias", "skip_gain": "skip_gain"}
    if path[0] == "stem":
        return f"{ROOT}stem_conv{path[1]}", leaf[path[2]]
    if path[0] in ("final_conv",):
        return f"{ROOT}final_conv", leaf[path[1]]
    if path[0] == "classifier":
        return f"{ROOT}linear", {"kernel": "w", "bias": "b"}[path[1]]
    if path[0] == "blocks":
        block = f"{ROOT}nf_block" + (f"_{path[1]}" if path[1] else "")
        if path[2] == "skip_gain":
            return block, "skip_gain"
        if path[2] == "se":
            linear = {"fc0": "linear", "fc1": "linear_1"}[path[3]]
            return f"{block}/~/squeeze_excite/~/{linear}", {"kernel": "w", "bias": "b"}[path[4]]
        return f"{block}/~/{path[2]}", leaf[path[3]]
    raise KeyError(path)


def haiku_names(abstract_params: Mapping) -> dict[tuple, tuple[str, str]]:
    """nfjax param path -> (Haiku module, param name) for every leaf of an NFNet's params (pure dict)."""
    return {path: _module_name(path) for path in flatten(abstract_params)}


def deepmind_to_nfjax(params: Mapping[str, Mapping[str, np.ndarray]], abstract_params: Mapping) -> dict:
    """DeepMind's mapping -> nfjax params (pure dict shaped like ``abstract_params``, float32 NumPy).

    Every nfjax parameter must be found with its shape, and every tensor of the file must be used; otherwise
    ConversionError lists the missing, unexpected and mis-shaped names.
    """
    names = haiku_names(abstract_params)
    expected = flatten(abstract_params)
    given = {(m, p): np.asarray(v) for m, inner in params.items() for p, v in inner.items()}
    out, missing, wrong = {}, [], []
    for path, key in names.items():
        if key not in given:
            missing.append("/".join(key))
            continue
        value, shape = given[key], tuple(expected[path].shape)
        if value.shape != shape:
            wrong.append(f"{'/'.join(key)} {value.shape} (expected {shape})")
            continue
        out[path] = value.astype(np.float32)
    unexpected = sorted("/".join(k) for k in set(given) - set(names.values()))
    if missing or unexpected or wrong:
        raise ConversionError(mismatch_message(missing, unexpected, wrong))
    return unflatten(out)


def nfjax_to_deepmind(params: Mapping) -> dict[str, dict[str, np.ndarray]]:
    """nfjax NFNet params -> DeepMind's ``{module: {param: array}}`` layout (the inverse of the above)."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for path, value in flatten(params).items():
        module, name = _module_name(path)
        out.setdefault(module, {})[name] = np.asarray(value)
    return out
