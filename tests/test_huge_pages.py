"""The entry points' restart with glibc's huge-page tunable (nfjax/huge_pages.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nfjax import huge_pages

HELPS = dict(mode="madvise", glibc=(2, 36))


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert huge_pages.thp_mode(str(path)) == "always"
    assert huge_pages.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(sys.platform != "linux", reason="the tunable is glibc's")
def test_when_a_restart_helps_and_when_not():
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert huge_pages.reason_not_to(cpu, **HELPS) is None
    assert "NFJAX_HUGE_PAGES=off" in huge_pages.reason_not_to(cpu | {"NFJAX_HUGE_PAGES": "off"}, **HELPS)
    already = cpu | {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert "already" in huge_pages.reason_not_to(already, **HELPS)
    assert huge_pages.reason_not_to(cpu | {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **HELPS) is None
    assert "2.35" in huge_pages.reason_not_to(cpu, mode="madvise", glibc=(2, 31))
    for mode in ("always", "never"):
        assert "huge page mode" in huge_pages.reason_not_to(cpu, mode=mode, glibc=(2, 36))
    assert "accelerator" in huge_pages.reason_not_to({"JAX_PLATFORMS": "cuda,cpu"}, **HELPS)


def _run(code: str, env: dict) -> list[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("NFJAX_HUGE_PAGES", "GLIBC_TUNABLES"))}
    out = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def test_restart_keeps_the_process_and_its_arguments_and_adds_the_tunable():
    code = (
        "import os, sys, nfjax.huge_pages as h\n"
        "print('before', os.getpid(), flush=True)\n"
        "h.restart_with_huge_pages()\n"
        "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n"
        "print(h.status())\n"
    )
    wants = huge_pages.reason_not_to({"JAX_PLATFORMS": "cpu"}) is None
    lines = _run(code + "# arg", {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    befores = [line.split()[1] for line in lines if line.startswith("before")]
    after = next(line for line in lines if line.startswith("after")).split(maxsplit=3)
    assert after[1] == befores[0]  # the same process (execve), not a child
    if wants:  # this machine: Linux, glibc 2.35+, THP mode madvise
        assert len(befores) == 2  # the code ran once before the restart and once after
        assert after[2] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"  # the user's tunables kept
        assert lines[-1].startswith("on (glibc.malloc.hugetlb=1")
    else:
        assert len(befores) == 1 and after[2] == "glibc.malloc.arena_max=4"
        assert lines[-1].startswith(("off (", "on (the kernel's THP mode is always"))
    off = _run(code, {"JAX_PLATFORMS": "cpu", "NFJAX_HUGE_PAGES": "off"})
    assert len([line for line in off if line.startswith("before")]) == 1
    assert "NFJAX_HUGE_PAGES=off" in off[-1] or off[-1].startswith("on (the kernel's")


@pytest.mark.parametrize("module", ["train", "evaluate", "predict", "export", "benchmark"])
def test_entry_points_restart_first_when_run_as_programs(module):
    source = (Path(huge_pages.__file__).parent / f"{module}.py").read_text()
    restart = re.search(r'^if __name__ == "__main__":\n    restart_with_huge_pages\(\)', source, re.M)
    assert restart is not None
    assert restart.start() < source.index("\nconfigure_host_devices()")  # before anything else is set up
    assert "import jax" not in source[: restart.start()]
