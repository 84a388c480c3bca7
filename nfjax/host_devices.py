"""CPU training default: split the host into several XLA devices before JAX starts, unless oneDNN runs the
convolutions.

On a CPU-only machine, XLA runs one device's convolutions on a thread pool that small convolutions do not keep
busy. Simulating one device per core (``--xla_force_host_platform_device_count``) and training data-parallel over
them keeps every core working: on a 2-core machine the Fashion-MNIST twins' train step ran 17% (NF) and 30% (BN)
faster with two host devices than with one (docs/fashion_mnist.md). The flag only shapes the CPU platform, so
GPU/TPU runs are unaffected. Where oneDNN's convolutions build (:mod:`nfjax.onednn_build`) the host stays one
device: oneDNN keeps the cores busy itself, and the Fashion-MNIST twins trained faster that way (see
:func:`onednn_takes_the_cores`). This module must not import JAX.
"""

from __future__ import annotations

import os
import sys

FLAG = "--xla_force_host_platform_device_count"
ENV = "NFJAX_HOST_DEVICES"  # an explicit count; 1 keeps XLA's single host device


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def default_host_devices(cpu_count: int | None = None) -> int:
    """The largest power of two <= min(cores, 8): global batches (multiples of 8) stay divisible by it."""
    cores = max(1, min(cpu_count or os.cpu_count() or 1, 8))
    return 1 << (cores.bit_length() - 1)


def onednn_takes_the_cores() -> bool:
    """Whether CPU programs here will run their convolutions with oneDNN (its library builds; the CPU platform
    is not excluded by ``JAX_PLATFORMS``). oneDNN's kernels use every core themselves: one device is then faster
    than one per core (docs/performance.md), and a one-device program is what takes them
    (:func:`nfjax.models.lowering.onednn_by_default`)."""
    platforms = os.environ.get("JAX_PLATFORMS", "")
    if platforms and "cpu" not in platforms.split(","):
        return False
    from nfjax import onednn_build  # no JAX there

    return onednn_build.library()[0] is not None


def configure_host_devices() -> int | None:
    """Adds the host device flag to XLA_FLAGS unless JAX already started or the user set it; returns the count.
    Without an explicit ``NFJAX_HOST_DEVICES``, one device (no flag) where oneDNN's convolutions build."""
    if "jax" in sys.modules or FLAG in os.environ.get("XLA_FLAGS", ""):
        return None
    if os.environ.get(ENV):
        count = int(os.environ[ENV])
    else:
        count = 1 if onednn_takes_the_cores() else default_host_devices()
    if count <= 1:
        return None
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAG}={count}".strip()
    return count
