"""Lazy, side-effect-controlled imports of TensorFlow and TensorFlow Datasets.

TensorFlow is only needed by the input pipeline; importing it costs seconds and, left alone, it would grab
GPU memory that belongs to JAX. Every module in ``nfjax.data`` goes through these two functions so that the
first import hides the GPUs from TensorFlow and keeps TFDS away from the network. ``require_tf`` and
``require_tfds`` do the same but turn a missing TensorFlow into one error that says what needed it.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
from types import ModuleType


@functools.cache
def import_tf() -> ModuleType:
    """Imports TensorFlow with GPUs hidden (JAX owns the accelerators; TF only runs input ops on CPU)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tf = importlib.import_module("tensorflow")
    try:
        tf.config.set_visible_devices([], "GPU")
    except RuntimeError:
        pass  # TF was already initialized by someone else; its device list can no longer change.
    return tf


@functools.cache
def import_tfds() -> ModuleType:
    """Imports tensorflow_datasets configured for offline use (no GCS lookups)."""
    import_tf()
    _alias_importlib_resources()
    tfds = importlib.import_module("tensorflow_datasets")
    # TFDS may otherwise look up dataset metadata on GCS, which hangs without network.
    gcs_utils = importlib.import_module("tensorflow_datasets.core.utils.gcs_utils")
    gcs_utils._is_gcs_disabled = True
    return tfds


def tf_installed() -> bool:
    """True when TensorFlow can be found (cheap: nothing is imported)."""
    return importlib.util.find_spec("tensorflow") is not None


class TensorFlowMissingError(ImportError, RuntimeError):
    """TensorFlow or TFDS cannot be imported where something needs it; the message says what needed it. An
    ImportError (callers may treat it as one) and a RuntimeError (the command lines print it as a one-line error)."""


def require_tf(purpose: str) -> ModuleType:
    """:func:`import_tf`, or TensorFlowMissingError saying that ``purpose`` needs TensorFlow."""
    try:
        return import_tf()
    except ImportError as e:
        raise TensorFlowMissingError(_missing_message(purpose, e)) from None


def require_tfds(purpose: str) -> ModuleType:
    """:func:`import_tfds`, or TensorFlowMissingError saying that ``purpose`` needs TensorFlow Datasets."""
    try:
        return import_tfds()
    except ImportError as e:
        raise TensorFlowMissingError(_missing_message(purpose, e)) from None


def _missing_message(purpose: str, error: ImportError) -> str:
    return (
        f"{purpose} needs TensorFlow, which cannot be imported ({error}); install it (pip install tensorflow-cpu "
        "tensorflow-datasets), or see 'Training without TensorFlow' in docs/data.md"
    )


def _alias_importlib_resources() -> None:
    """TFDS's builder code references the ``importlib_resources`` backport, which its package metadata only
    requires on Python < 3.9. On 3.11 the standard library module offers the same API (``abc.Traversable``),
    so alias it when the backport is absent rather than fail inside ``download_and_prepare``."""
    try:
        importlib.import_module("importlib_resources")
    except ImportError:
        resources = importlib.import_module("importlib.resources")
        importlib.import_module("importlib.resources.abc")  # makes .abc an attribute of the package
        sys.modules["importlib_resources"] = resources
