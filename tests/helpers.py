"""Shared helpers of the trainer tests: the tiny NF run's arguments, log and checkpoint readers, error checks."""

import contextlib
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

from nfjax.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 12  # steps of the shared run; it evaluates once, at the end
TINY = [
    "--config.model.kwargs.widths=(8,16,16)",
    "--config.model.kwargs.stem_width=8",
    "--config.train.global_batch=64",
    "--config.train.total_steps=100",
    "--config.optim.warmup_epochs=0",
    "--config.optim.base_lr=2.0",
    "--config.train.log_every_steps=1",
    f"--config.train.eval_every_steps={STEPS}",
    "--config.train.eval_batch=1000",
]
CACHE_MIN_SECONDS = "0.5"
MAX_FLIPPED_EXAMPLES = 5  # of the 10,000 test examples, between two runs that differ only in summation order


def nf_args(fmnist_dir, workdir, *extra, config="fmnist_nf.py"):
    return ["--config", f"{ROOT}/configs/{config}:data_dir={fmnist_dir}", "--workdir", str(workdir), *TINY, *extra]


def train_rows(workdir):
    return [r for r in read_metrics(workdir) if r["split"] == "train"]


def checkpoint_steps(workdir):
    folder = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []


def snapshot(folder):
    """{relative path: sha1} of every file under ``folder`` (to prove nothing was rewritten)."""
    return {
        str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).rglob("*"))
        if p.is_file()
    }


def assert_clean_error(code, err, *needles):
    assert code == 2, err
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(message) == 1, err
    for needle in needles:
        assert needle in message[0], message[0]
    return message[0]


def subprocess_env(compile_cache, devices):
    """The suite's environment (conftest's XLA flags included) with ``devices`` host devices instead of 8."""
    count = "--xla_force_host_platform_device_count"
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(count)]
    env = dict(os.environ, XLA_FLAGS=" ".join([f"{count}={devices}", *flags]), JAX_PLATFORMS="cpu")
    env.update(JAX_COMPILATION_CACHE_DIR=compile_cache, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=CACHE_MIN_SECONDS)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def free_port():
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_processes(fmnist_dir, workdir, compile_cache, cwd, *extra):
    """``python -m nfjax.train`` as two processes of one run (jax.distributed on loopback, gloo, one CPU device
    each) on the tiny NF run; stdout and stderr of each are piped together (text). Each process leads its own
    process group (with its watchdog child), so a test can signal one process together with its children."""
    port = free_port()
    distributed = [
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        "--config.distributed.cpu_collectives=gloo",
    ]
    return [
        subprocess.Popen(
            [sys.executable, "-m", "nfjax.train", *nf_args(fmnist_dir, workdir, *distributed, *extra)]
            + [f"--config.distributed.process_id={i}"],
            env=subprocess_env(compile_cache, devices=1),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            start_new_session=True,
        )
        for i in range(2)
    ]


def two_class_image_folder(root, per_class=16):
    """root/{train,test}/{a,b}/*.png: ``per_class`` training and 4 test images per class, 28x28 RGB, class b
    brighter than class a (pixels 0-119 vs 120-239), so a tiny model learns it in a few steps."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("test", 4)):
        for label, name in enumerate("ab"):
            folder = Path(root) / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (28, 28, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def load_script(name):
    """scripts/NAME.py imported as a module (the drivers are scripts, not part of the package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
