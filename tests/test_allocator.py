"""The entry points' restart with glibc malloc tunables: a kept heap and huge pages (nfjax/allocator.py)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from nfjax import allocator

HELPS = dict(mode="madvise", glibc=(2, 36))
KEEP = ":".join(allocator.KEEP_HEAP_TUNABLES)

# Faults in a malloc'd block of 256 MiB, written through, freed, then allocated and written again: the second
# pass's faults say whether freed memory stayed with the process (a kept heap) or went back to the kernel.
REFAULT = (
    "import ctypes, resource\n"
    "libc = ctypes.CDLL(None); libc.malloc.restype = ctypes.c_void_p; libc.free.argtypes = [ctypes.c_void_p]\n"
    "def faults():\n"
    "    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
    "for _ in range(2):\n"
    "    block = libc.malloc(1 << 28); start = faults(); ctypes.memset(block, 1, 1 << 28)\n"
    "    written = faults() - start; libc.free(block)\n"
    "print('refaults', written)\n"
)


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert allocator.thp_mode(str(path)) == "madvise"
    path.write_text("[always] madvise never\n")
    assert allocator.thp_mode(str(path)) == "always"
    assert allocator.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(sys.platform != "linux", reason="the tunables are glibc's")
def test_when_each_tunable_is_added_and_when_not():
    cpu = {"JAX_PLATFORMS": "cpu"}
    assert allocator.reason_not_to(cpu, **HELPS) is None
    assert "NFJAX_HUGE_PAGES=off" in allocator.reason_not_to(cpu | {"NFJAX_HUGE_PAGES": "off"}, **HELPS)
    already = cpu | {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}
    assert "already" in allocator.reason_not_to(already, **HELPS)
    assert allocator.reason_not_to(cpu | {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, **HELPS) is None
    assert "2.35" in allocator.reason_not_to(cpu, mode="madvise", glibc=(2, 31))
    for mode in ("always", "never"):
        assert "huge page mode" in allocator.reason_not_to(cpu, mode=mode, glibc=(2, 36))
    assert "accelerator" in allocator.reason_not_to({"JAX_PLATFORMS": "cuda,cpu"}, **HELPS)

    assert allocator.tunables_to_add(cpu, **HELPS) == [*allocator.KEEP_HEAP_TUNABLES, allocator.TUNABLE]
    assert allocator.tunables_to_add(cpu, mode="never", glibc=(2, 31)) == list(allocator.KEEP_HEAP_TUNABLES)
    assert allocator.tunables_to_add(cpu | {"NFJAX_KEEP_HEAP": "off"}, **HELPS) == [allocator.TUNABLE]
    for users in ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, {"MALLOC_ARENA_MAX": "4"}):
        assert "already sets" in allocator.reason_not_to_keep_heap(cpu | users, glibc=(2, 36))  # theirs kept
    assert "2.26" in allocator.reason_not_to_keep_heap(cpu, glibc=(2, 17))
    assert allocator.tunables_to_add({"JAX_PLATFORMS": "tpu"}, **HELPS) == []


def _run(code: str, env: dict) -> list[str]:
    ours = ("NFJAX_HUGE_PAGES", "NFJAX_KEEP_HEAP", "GLIBC_TUNABLES", "MALLOC_")
    base = {k: v for k, v in os.environ.items() if not k.startswith(ours)}
    out = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True)
    return out.stdout.splitlines()


def _refaults(lines: list[str]) -> int:
    return int(next(line for line in lines if line.startswith("refaults")).split()[1])


def test_restart_keeps_the_process_and_its_arguments_and_adds_the_tunables():
    code = (
        "import os, sys, nfjax.allocator as a\n"
        "print('before', os.getpid(), flush=True)\n"
        "a.restart_with_tunables()\n"
        "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES', ''), sys.argv[1:])\n"
        + REFAULT
        + "print(a.heap_status())\nprint(a.status())\n"
    )
    add = allocator.tunables_to_add({"JAX_PLATFORMS": "cpu"})
    lines = _run(code + "# arg", {"JAX_PLATFORMS": "cpu", "GLIBC_TUNABLES": "glibc.malloc.top_pad=0"})
    befores = [line.split()[1] for line in lines if line.startswith("before")]
    after = next(line for line in lines if line.startswith("after")).split(maxsplit=3)
    assert after[1] == befores[0]  # the same process (execve), not a child
    if add:  # Linux with glibc: at least the kept heap
        assert len(befores) == 2  # the code ran once before the restart and once after
        assert after[2] == ":".join(["glibc.malloc.top_pad=0", *add])  # the user's tunables kept, ours after
        assert lines[-2].startswith("kept (")
        assert _refaults(lines) < 64  # 256 MiB written again in memory the process kept
    else:
        assert len(befores) == 1 and after[2] == "glibc.malloc.top_pad=0"
    if allocator.TUNABLE in add:  # THP mode madvise and glibc 2.35+
        assert lines[-1].startswith("on (glibc.malloc.hugetlb=1")
    off = _run(code, {"JAX_PLATFORMS": "cpu", "NFJAX_HUGE_PAGES": "off", "NFJAX_KEEP_HEAP": "off"})
    assert len([line for line in off if line.startswith("before")]) == 1
    assert "NFJAX_KEEP_HEAP=off" in off[-2]
    assert "NFJAX_HUGE_PAGES=off" in off[-1] or off[-1].startswith("on (the kernel's")


@pytest.mark.skipif(sys.platform != "linux", reason="the tunables are glibc's")
def test_the_kept_heap_reuses_freed_blocks_where_glibc_gives_them_back():
    kept = _refaults(_run(REFAULT, {"GLIBC_TUNABLES": KEEP}))
    default = _refaults(_run(REFAULT, {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}))
    assert kept < 64
    assert default >= 100  # 256 MiB faulted in again: 65,536 4-KiB pages, or 128 2-MiB ones under THP "always"


@pytest.mark.parametrize("module", ["train", "evaluate", "predict", "export", "benchmark"])
def test_entry_points_restart_first_when_run_as_programs(module):
    source = (Path(allocator.__file__).parent / f"{module}.py").read_text()
    restart = re.search(r'^if __name__ == "__main__":\n    restart_with_tunables\(\)', source, re.M)
    assert restart is not None
    assert restart.start() < source.index("\nconfigure_host_devices()")  # before anything else is set up
    assert "import jax" not in source[: restart.start()]
