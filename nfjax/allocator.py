"""glibc malloc settings for XLA's per-step working memory on CPU: a kept heap and transparent huge pages.

XLA:CPU allocates an executable's temporaries as one block per execution (about 1 GiB for a ResNet-50 train step
at batch 8) and frees it afterwards. The block is larger than anything glibc's malloc keeps by default, so every
step maps fresh memory and the kernel faults it in, zeroed, as the step first writes it: 273,000 page faults and
0.5 CPU-seconds of system time per ResNet-50 step on the project's 2-core machine with 4 KiB pages. Two glibc
tunables remove that cost:

- **A kept heap** (``glibc.malloc.arena_max=1``, ``mmap_max=0``, ``trim_threshold`` = 2**62): every block comes
  from the one heap, and freed memory stays in it, so from the second or third step on a step reuses the memory
  of the one before: no page faults, no system time. Where the kernel or hypervisor reclaims freed memory after
  a few idle seconds, as on the project's CPU machines, it also removes up to 1.1 s of system time from the
  first step after any pause (an evaluation, a checkpoint). The price: the process never gives memory back, its
  heap fragments (the Fashion-MNIST main job peaks at about twice the memory), and every thread shares one
  malloc lock (compilation, which allocates a lot, can take a few seconds longer).
- **Transparent huge pages** (``glibc.malloc.hugetlb=1``, glibc 2.35+, kernel THP mode ``madvise``): 2 MiB pages
  for malloc's large regions, 512 times fewer faults where memory is still faulted in (the first steps, or with
  the heap not kept) and fewer TLB misses while the step runs.

Measured in docs/performance.md ("Huge pages" and "A kept heap"). glibc reads its tunables once, when a process
starts, so the command-line entry points (``python -m nfjax.train``, ``evaluate``, ``predict``, ``export``,
``benchmark``) restart themselves once, before JAX starts, with the tunables added to ``GLIBC_TUNABLES``
(:func:`restart_with_tunables`). They do so only where JAX will run on the CPU, on Linux with glibc, and for
each setting only where ``GLIBC_TUNABLES`` (or glibc's older ``MALLOC_*`` variables) does not already set it.
``NFJAX_KEEP_HEAP=off`` and ``NFJAX_HUGE_PAGES=off`` turn each off. This module must not import JAX.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
KEEP_HEAP_TUNABLES = (
    "glibc.malloc.arena_max=1",  # one heap for every thread: other arenas cannot hold blocks over 64 MiB
    "glibc.malloc.mmap_max=0",  # no block gets its own mapping (unmapped again when freed)
    f"glibc.malloc.trim_threshold={2**62}",  # freed memory at the heap's top is never given back
)
ENV = "NFJAX_HUGE_PAGES"  # "off": no huge-page tunable
KEEP_HEAP_ENV = "NFJAX_KEEP_HEAP"  # "off": malloc maps and unmaps large blocks as glibc does by default
_KEEP_HEAP_SET_BY = ("glibc.malloc.arena_max", "glibc.malloc.mmap_max", "glibc.malloc.trim_threshold")
_KEEP_HEAP_ALIASES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
THP_MODE_FILE = "/sys/kernel/mm/transparent_hugepage/enabled"
_ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")
_OFF = ("off", "0", "false", "no")


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


def heap_settings_set(environ=None) -> str | None:
    """The first of the kept heap's settings that the environment already gives (the user's choice), or None."""
    environ = os.environ if environ is None else environ
    tunables = environ.get("GLIBC_TUNABLES", "")
    return next((name for name in _KEEP_HEAP_SET_BY if name in tunables), None) or next(
        (name for name in _KEEP_HEAP_ALIASES if name in environ), None
    )


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


def _turned_off(environ, name: str) -> str | None:
    return f"turned off by {name}={environ[name]}" if environ.get(name, "").lower() in _OFF else None


def _common_reason(environ, glibc, minimum: tuple[int, int]) -> str | None:
    glibc = _glibc_version() if glibc is None else glibc
    if sys.platform != "linux" or glibc is None or glibc < minimum:
        return f"needs Linux with glibc {minimum[0]}.{minimum[1]} or later"
    if not _cpu_platform(environ):
        return "JAX runs on an accelerator here"
    return None


def reason_not_to(environ=None, mode: str | None = None, glibc: tuple[int, ...] | None = None) -> str | None:
    """None when adding the huge-page tunable would help here, else why not (the arguments are for tests)."""
    environ = os.environ if environ is None else environ
    off = _turned_off(environ, ENV)
    if off:
        return off
    if tunable_set(environ):
        return f"GLIBC_TUNABLES already sets it ({environ['GLIBC_TUNABLES']})"
    common = _common_reason(environ, glibc, (2, 35))
    if common:
        return common
    mode = thp_mode() if mode is None else mode
    if mode != "madvise":
        return f"the kernel's transparent huge page mode is {mode or 'unknown'} (only 'madvise' needs the tunable)"
    return None


def reason_not_to_keep_heap(environ=None, glibc: tuple[int, ...] | None = None) -> str | None:
    """None when the kept heap's tunables should be added here, else why not (the arguments are for tests)."""
    environ = os.environ if environ is None else environ
    off = _turned_off(environ, KEEP_HEAP_ENV)
    if off:
        return off
    already = heap_settings_set(environ)
    if already:
        return f"the environment already sets {already}"
    return _common_reason(environ, glibc, (2, 26))  # glibc's tunables


def tunables_to_add(environ=None, mode: str | None = None, glibc: tuple[int, ...] | None = None) -> list[str]:
    """The tunables a restart would add here: the kept heap's, then huge pages', each where it applies."""
    glibc = _glibc_version() if glibc is None else glibc  # once for both
    add = [] if reason_not_to_keep_heap(environ, glibc) else list(KEEP_HEAP_TUNABLES)
    return add + ([] if reason_not_to(environ, mode, glibc) else [TUNABLE])


def heap_kept(environ=None) -> bool:
    tunables = (os.environ if environ is None else environ).get("GLIBC_TUNABLES", "")
    return all(t in tunables.split(":") for t in KEEP_HEAP_TUNABLES)


def status() -> str:
    """One line for reports: whether this process's allocator asks for huge pages, and why (not)."""
    mode = thp_mode()
    if mode == "always":
        return "on (the kernel's THP mode is always)"
    if TUNABLE in os.environ.get("GLIBC_TUNABLES", ""):
        return f"on ({TUNABLE}; THP mode {mode or 'unknown'})"
    return f"off ({reason_not_to() or 'not restarted with the tunable'})"


def heap_status() -> str:
    """One line for reports: whether this process keeps freed memory in malloc's heap, and why (not)."""
    if heap_kept():
        return "kept (glibc.malloc.arena_max=1, mmap_max=0, no trimming)"
    return f"glibc's default ({reason_not_to_keep_heap() or 'not restarted with the tunables'})"


def restart_with_tunables() -> None:
    """Re-executes this process (same interpreter, arguments, pid) with :func:`tunables_to_add` appended to
    ``GLIBC_TUNABLES``, where there are any; otherwise returns. Call it first thing in a ``python -m`` entry
    point, before JAX or any thread starts. The restarted process finds the tunables set and does not restart
    again."""
    add = tunables_to_add()
    if not add or not getattr(sys, "orig_argv", None):
        return
    tunables = ":".join(filter(None, [os.environ.get("GLIBC_TUNABLES", ""), *add]))
    env = dict(os.environ, GLIBC_TUNABLES=tunables)
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:  # cannot re-execute (unusual interpreter setups): run on without the tunables
        return
