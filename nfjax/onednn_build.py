"""Builds oneDNN's convolution custom calls (``nfjax/models/onednn_conv.cc``) into a shared library, without
importing JAX: :mod:`nfjax.host_devices` asks before JAX starts whether they will be there.

Built on first use, once per machine: the C++ compiler (``$CXX`` or ``c++``) against JAX's FFI headers (shipped
with jaxlib) and the system's oneDNN (Debian/Ubuntu: ``apt-get install libdnnl-dev``), into
``~/.cache/nfjax/onednn`` (or ``$NFJAX_CACHE_DIR/onednn``), keyed by the source, jaxlib's version and the
compiler. ``NFJAX_ONEDNN=off`` turns them off. :mod:`nfjax.models.onednn` loads the library and registers it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCE = Path(__file__).with_name("models") / "onednn_conv.cc"
ENV = "NFJAX_ONEDNN"
INSTALL_HINT = "install oneDNN's headers and a C++ compiler (Debian/Ubuntu: apt-get install libdnnl-dev g++)"


class BuildError(RuntimeError):
    """The library could not be built; the message says why and what to install."""


def cache_dir() -> Path:
    root = os.environ.get("NFJAX_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nfjax")
    return Path(root) / "onednn"


def turned_off() -> bool:
    return os.environ.get(ENV, "").lower() in ("off", "0", "false", "no")


def _ffi_include_dir() -> str:
    """JAX's FFI headers, inside the jaxlib package (what ``jax.ffi.include_dir()`` returns)."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise BuildError("jaxlib is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "include")


def _build(compiler: str) -> Path:
    """Compiles the source into the cache (once per source, jaxlib and compiler), atomically: a process that
    finds the library there uses it, two that build at once each write a private file and rename it."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = SOURCE.read_bytes() + importlib.metadata.version("jaxlib").encode() + version.encode()
    target = cache_dir() / f"libnfjax_onednn_{hashlib.sha256(key).hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    command = [compiler, "-O2", "-std=c++17", "-shared", "-fPIC", f"-I{_ffi_include_dir()}", str(SOURCE)]
    result = subprocess.run(command + ["-o", tmp, "-ldnnl"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        os.unlink(tmp)
        last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise BuildError(f"building the oneDNN convolutions failed ({last}); {INSTALL_HINT}")
    os.replace(tmp, target)
    return target


@functools.cache
def library() -> tuple[Path | None, str | None]:
    """(path of the built library, None), or (None, why there is none)."""
    if turned_off():
        return None, f"turned off by {ENV}={os.environ[ENV]}"
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        return None, f"no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH; {INSTALL_HINT}"
    try:
        return _build(compiler), None
    except (BuildError, OSError) as e:
        return None, str(e)
