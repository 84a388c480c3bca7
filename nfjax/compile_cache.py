"""A persistent XLA compilation cache for ``nfjax.train`` runs, on by default.

Compiling a large train step takes tens of seconds (NFNet-F0 about 24 s on a 2-core CPU; docs/performance.md);
resuming or rerunning the same program loads it from the cache in about a second. JAX keys each entry by the
program, the JAX/XLA versions, the devices and the compiler flags, so a stale entry is never used.
``NFJAX_XLA_CACHE`` chooses the folder (default ``~/.cache/nfjax/xla``); ``NFJAX_XLA_CACHE=off`` disables it.
The cache is capped at ``MAX_BYTES`` (least recently used entries go first; the cap also makes JAX lock its
writes, so two runs on one machine never read a half-written entry). Settings already given to JAX
(``JAX_COMPILATION_CACHE_DIR``, ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``,
``JAX_COMPILATION_CACHE_MAX_SIZE`` or ``jax.config.update``) are left as they are. Call it before the process
compiles anything: JAX decides once per process whether it uses the cache.
"""

from __future__ import annotations

import os
import sys

import jax

ENV = "NFJAX_XLA_CACHE"
DEFAULT_DIR = "~/.cache/nfjax/xla"
MIN_COMPILE_SECONDS = 1.0  # programs that compile faster than this are not worth a file
MAX_BYTES = 4 * 2**30


def configure_compilation_cache() -> str | None:
    """Points JAX's persistent compilation cache at ``$NFJAX_XLA_CACHE`` (or the default folder) unless it is
    off or JAX already has a folder; returns the folder in use, or None."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    setting = os.environ.get(ENV, DEFAULT_DIR).strip()
    if setting.lower() in ("", "off", "0", "false", "none"):
        return None
    path = os.path.expanduser(setting)
    if path.startswith("~"):  # no home folder to expand it against (some containers)
        return None
    path = os.path.abspath(path)
    try:
        os.makedirs(path, exist_ok=True)
        writable = os.access(path, os.W_OK | os.X_OK)
    except OSError as e:
        writable, reason = False, e.strerror
    else:
        reason = "not writable"
    if not writable:  # run without the cache rather than fail, or warn at every write
        print(f"note: no compilation cache ({ENV}={setting}: {reason}); every run compiles afresh", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
        jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return path
