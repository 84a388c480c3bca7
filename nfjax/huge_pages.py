"""Transparent huge pages for XLA's per-step working memory on CPU.

XLA:CPU allocates an executable's temporaries as one block per execution (about 1 GiB for a ResNet-50 train step
at batch 8) and frees it afterwards. The block is larger than anything glibc's malloc keeps, so every step maps
fresh memory and the kernel faults it in 4 KiB at a time: 273,000 page faults and 0.5 CPU-seconds of system time
per ResNet-50 step on the project's 2-core machine. glibc (2.35 and later) can ask the kernel for transparent huge
pages on such blocks (the tunable ``glibc.malloc.hugetlb=1``): 2 MiB pages, 512 times fewer faults, and fewer TLB
misses while the step runs. Measured with oneDNN's convolutions: NFNet-F0's train step 2.72-2.76 -> 2.22-2.28 s,
ResNet-50's from 0.95-0.97x to 1.04-1.12x timm's speed (docs/performance.md).

glibc reads its tunables once, when a process starts, so the command-line entry points (``python -m nfjax.train``,
``evaluate``, ``predict``, ``export``, ``benchmark``) restart themselves once, before JAX starts, with the tunable
added to ``GLIBC_TUNABLES`` (:func:`restart_with_huge_pages`). They do so only where it helps: Linux with glibc
2.35+, the kernel's THP mode ``madvise`` (with ``always`` every block already gets huge pages; with ``never`` none
can), CPU the platform JAX will use, and the tunable not set already. ``NFJAX_HUGE_PAGES=off`` turns it off.
This module must not import JAX.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
ENV = "NFJAX_HUGE_PAGES"  # "off" keeps the process's allocator as it started
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def thp_mode(path: str = THP_MODE_FILE) -> str | None:
    """The kernel's transparent huge page mode (``always``, ``madvise`` or ``never``), None where unreadable."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def tunable_set(environ=None) -> bool:
    """Whether ``GLIBC_TUNABLES`` (as this process started with it) already says anything about hugetlb."""
    return "glibc.malloc.hugetlb" in (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")


def _glibc_version() -> tuple[int, ...] | None:
    library, version = platform.libc_ver()
    if library != "glibc" or not version:
        return None
    return tuple(int(part) for part in version.split(".")[:2] if part.isdigit())


def _cpu_platform(environ) -> bool:
    """Whether JAX will run on the CPU: ``JAX_PLATFORMS`` puts it first, or is unset and no accelerator plugin is
    installed."""
    platforms = environ.get("JAX_PLATFORMS", "")
    if platforms:
        return platforms.split(",")[0].strip() == "cpu"
    return not any(importlib.util.find_spec(name) is not None for name in _ACCELERATOR_PLUGINS)


def reason_not_to(environ=None, mode: str | None = None, glibc: tuple[int, ...] | None = None) -> str | None:
    """None when a restart with the tunable would help here, else why not (the arguments are for tests)."""
    environ = os.environ if environ is None else environ
    if environ.get(ENV, "").lower() in ("off", "0", "false", "no"):
        return f"turned off by {ENV}={environ[ENV]}"
    if tunable_set(environ):
        return f"GLIBC_TUNABLES already sets it ({environ['GLIBC_TUNABLES']})"
    glibc = _glibc_version() if glibc is None else glibc
    if sys.platform != "linux" or glibc is None or glibc < (2, 35):
        return "needs Linux with glibc 2.35 or later"
    mode = thp_mode() if mode is None else mode
    if mode != "madvise":
        return f"the kernel's transparent huge page mode is {mode or 'unknown'} (only 'madvise' needs the tunable)"
    if not _cpu_platform(environ):
        return "JAX runs on an accelerator here"
    return None


def status() -> str:
    """One line for reports: whether this process's allocator asks for huge pages, and why (not)."""
    mode = thp_mode()
    if mode == "always":
        return "on (the kernel's THP mode is always)"
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return f"on ({TUNABLE}; THP mode {mode or 'unknown'})"
    return f"off ({reason_not_to() or 'not restarted with the tunable'})"


def restart_with_huge_pages() -> None:
    """Re-executes this process (same interpreter, arguments, pid) with ``glibc.malloc.hugetlb=1`` added to
    ``GLIBC_TUNABLES``, where :func:`reason_not_to` finds nothing against it; otherwise returns. Call it first
    thing in a ``python -m`` entry point, before JAX or any thread starts. The restarted process finds the tunable
    set and does not restart again."""
    if reason_not_to() is not None or not getattr(sys, "orig_argv", None):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES", ""), TUNABLE]))
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # cannot re-execute (unusual interpreter setups): run on without the tunable
        return
