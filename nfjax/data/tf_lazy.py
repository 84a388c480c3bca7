"""Lazy, side-effect-controlled imports of TensorFlow and TensorFlow Datasets.

TensorFlow is only needed by the input pipeline; importing it costs seconds and, left alone, it would grab
GPU memory that belongs to JAX. Every module in ``nfjax.data`` goes through these two functions so that the
first import hides the GPUs from TensorFlow and keeps TFDS away from the network.
"""

from __future__ import annotations

import functools
import importlib
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
