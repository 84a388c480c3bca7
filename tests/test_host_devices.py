"""The trainer's CPU default of one XLA host device per core (set before JAX starts)."""

import os
import subprocess
import sys

import pytest

from nfjax.host_devices import default_host_devices


@pytest.mark.parametrize("cores,expected", [(1, 1), (2, 2), (3, 2), (6, 4), (8, 8), (64, 8)])
def test_default_is_a_power_of_two_capped_at_8(cores, expected):
    assert default_host_devices(cores) == expected


def _configure(env: dict) -> str:
    code = "import os, nfjax.host_devices as h; print(h.configure_host_devices(), os.environ.get('XLA_FLAGS', ''))"
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NFJAX_HOST_DEVICES")}
    out = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_configure_sets_the_flag_and_respects_the_user():
    assert _configure({"NFJAX_HOST_DEVICES": "2"}) == "2 --xla_force_host_platform_device_count=2"
    assert _configure({"NFJAX_HOST_DEVICES": "1"}) == "None"
    kept = _configure({"XLA_FLAGS": "--xla_force_host_platform_device_count=3"})
    assert kept == "None --xla_force_host_platform_device_count=3"


def test_training_entry_point_gets_host_devices():
    code = "import nfjax.train, jax; print(jax.device_count())"
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env = base | {"NFJAX_HOST_DEVICES": "2", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "2"


def test_one_device_where_onednn_runs_the_convolutions():
    code = (
        "import os, sys, nfjax.host_devices as h; n = h.configure_host_devices(); "
        "print(n, h.onednn_takes_the_cores(), 'jax' in sys.modules)"
    )
    base = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "NFJAX_HOST_DEVICES", "JAX_PLATFORMS")}
    run = lambda env: subprocess.run(
        [sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True
    ).stdout.split()
    count, onednn, jax_imported = run({})
    assert jax_imported == "False"  # decided before JAX starts
    expected = default_host_devices()
    assert count == ("None" if onednn == "True" or expected == 1 else str(expected))
    off = run({"NFJAX_ONEDNN": "off"})
    assert off[1] == "False" and off[0] == ("None" if expected == 1 else str(expected))
    assert run({"JAX_PLATFORMS": "cuda"})[1] == "False"  # no CPU programs: nothing to build
