"""A persistent XLA compilation cache for the command-line runs, on by default.

Compiling a large train step takes tens of seconds (NFNet-F0 about 24 s on a 2-core CPU; docs/performance.md);
resuming, rerunning or evaluating the same program again loads it from the cache in about a second. JAX keys
each entry by the program, the JAX/XLA versions, the devices and the compiler flags, so a stale entry is never
used. ``NFJAX_XLA_CACHE`` chooses the folder (default ``~/.cache/nfjax/xla``); ``NFJAX_XLA_CACHE=off``
disables it. A cache folder already configured in JAX (``JAX_COMPILATION_CACHE_DIR`` or
``jax.config.update('jax_compilation_cache_dir', ...)``) is left as it is.
"""

from __future__ import annotations

import os

import jax

ENV = "NFJAX_XLA_CACHE"
DEFAULT_DIR = "~/.cache/nfjax/xla"
MIN_COMPILE_SECONDS = 1.0  # programs that compile faster than this are not worth a file


def configure_compilation_cache() -> str | None:
    """Points JAX's persistent compilation cache at ``$NFJAX_XLA_CACHE`` (or the default folder) unless it is
    off or JAX already has a folder; returns the folder in use, or None."""
    configured = jax.config.jax_compilation_cache_dir
    if configured:
        return configured
    setting = os.environ.get(ENV, DEFAULT_DIR).strip()
    if setting.lower() in ("", "off", "0", "false", "none"):
        return None
    path = os.path.abspath(os.path.expanduser(setting))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:  # an unwritable home: run without the cache rather than fail
        print(f"note: no compilation cache ({ENV}={setting}: {e.strerror}); every run compiles afresh")
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return path
