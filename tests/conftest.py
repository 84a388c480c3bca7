"""Test setup: 8 fake CPU devices, set before JAX initializes its backends; shared fixtures."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory):
    """Fashion-MNIST prepared once per session into a TFDS data_dir that every test module shares."""
    from nfjax import data

    data_dir = tmp_path_factory.getbasetemp() / "tfds"
    data.prepare_fashion_mnist(str(data_dir))
    return str(data_dir)
