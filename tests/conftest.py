"""Test setup: 8 fake CPU devices, set before JAX initializes its backends; shared fixtures."""

import fcntl
import os

# The suite compiles thousands of small programs and runs each a few times: LLVM's optimizations cost more
# compile time than they save (a random.normal initializer compiles 3.4x faster without them). The arithmetic is
# the same (no fast-math either way); only the generated loops are slower, and the convolutions and matrix
# products are library calls that this flag does not touch.
FAST_COMPILE = "--xla_backend_optimization_level=0"
FLAGS = f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FLAGS}".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import jax  # noqa: E402
import pytest  # noqa: E402

from helpers import CACHE_MIN_SECONDS  # noqa: E402


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    """Fashion-MNIST prepared once per run into a TFDS data_dir that every test module shares: under xdist in the
    folder above the workers' own (the run's), by whichever worker needs it first while the others wait on a file
    lock, then find it prepared (about 30 s of work, not once per worker)."""
    from nfjax import data

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    with open(root / "tfds.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        data.prepare_fashion_mnist(str(root / "tfds"))
    return str(root / "tfds")


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent XLA cache for the session (and its subprocesses): identical programs compile once."""
    try:
        from jax._src.compilation_cache import reset_cache  # private: without it the cache only starts later
    except ImportError:
        reset_cache = lambda: None
    path = str(tmp_path_factory.getbasetemp() / "jax_compile_cache")
    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(CACHE_MIN_SECONDS))
    reset_cache()  # JAX sets its cache up at the first compile; redo that with the new folder
    yield path
    jax.config.update("jax_compilation_cache_dir", before[0])
    jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])
    reset_cache()
