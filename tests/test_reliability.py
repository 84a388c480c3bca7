"""Faults: kill -9 mid-run or mid-save, damaged checkpoints, failed saves, non-finite steps (docs/reliability.md).

One reference run (12 steps, a checkpoint every 4) is shared; every fault is played on a copy of it or against it.
"""

import contextlib
import errno
import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from nfjax import evaluate as evaluate_lib
from nfjax import train
from nfjax.runs import load_run

from helpers import (
    ROOT,
    assert_clean_error,
    checkpoint_steps,
    launch_two_processes,
    nf_args,
    snapshot,
    subprocess_env,
    train_rows,
    two_class_image_folder,
)

# Slices of Fashion-MNIST: a run (and each of its processes) decodes 2,280 images, not 70,000; no fault depends on
# the data.
DATA = ("--config.data.train_split=train[:1280]", "--config.data.eval_split=test[:1000]")
RUN = ("--config.train.total_steps=12", "--config.train.checkpoint_every_steps=4", "--config.train.keep_checkpoints=3")


def args(fmnist_dir, workdir, *extra):
    return nf_args(fmnist_dir, workdir, *DATA, *RUN, *extra)


def params_of(workdir):
    return jax.tree.map(np.asarray, load_run(workdir, num_devices=1).weights["params"])


def assert_bit_identical(a, b):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    assert all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b, strict=True))


def tensorboard_steps(workdir, tag="train/loss"):
    """The steps TensorBoard shows for ``tag``: events replayed in file order, a purge event (SessionLog START
    at step s, written by a resumed run) dropping every earlier event at step >= s, as TensorBoard does."""
    import tensorflow as tf

    steps = []
    for path in sorted((Path(workdir) / "tensorboard").glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            if event.HasField("session_log") and event.session_log.status == event.session_log.START:
                steps = [s for s in steps if s < event.step]
            for value in event.summary.value:
                if value.tag == tag:
                    steps.append(event.step)
    return steps


@pytest.fixture(scope="module")
def reference(fmnist_dir, tmp_path_factory):
    """12 uninterrupted steps, checkpoints at 4, 8 and 12."""
    workdir = tmp_path_factory.mktemp("reference")
    assert train.main(args(fmnist_dir, workdir)) == 0
    assert checkpoint_steps(workdir) == [4, 8, 12]
    return workdir


def copy_of(reference, tmp_path):
    shutil.copytree(reference, tmp_path / "run")
    return tmp_path / "run"


# --------------------------------------------------------------------------------------------- kill -9


def test_kill_9_mid_run_or_mid_save_then_rerun_is_bit_identical(reference, fmnist_dir, tmp_path, compile_cache):
    """SIGKILL as soon as a save is in flight (its temporary folder exists) or the run is past step 5, whichever
    comes first; then a save torn at step 8 is left behind as well. The same command finishes the run with the
    reference's parameters, bit for bit, and every step logged once (JSON lines and TensorBoard)."""
    workdir = tmp_path / "run"
    victim = subprocess.Popen(
        [sys.executable, "-m", "nfjax.train", *args(fmnist_dir, workdir)],
        env=subprocess_env(compile_cache, devices=8),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    killed_during, deadline = None, time.time() + 240
    while victim.poll() is None and time.time() < deadline:
        folder = workdir / "checkpoints"
        saving = folder.is_dir() and any("tmp" in p.name for p in folder.iterdir())
        if saving or (workdir / "metrics.jsonl").exists() and len(train_rows(workdir)) >= 6:
            victim.send_signal(signal.SIGKILL)
            killed_during = "save" if saving else "run"
            break
        time.sleep(0.002)
    victim.wait(timeout=60)
    assert killed_during is not None, "the run ended before it could be killed"
    assert victim.returncode == -signal.SIGKILL
    logged = len(train_rows(workdir))
    assert 0 < logged < 12, (killed_during, logged)
    # A save of step 8 torn mid-way: orbax's temporary folder without its commit marker.
    if checkpoint_steps(workdir):
        torn = workdir / "checkpoints" / "8.orbax-checkpoint-tmp-1"
        if not torn.exists():
            shutil.copytree(workdir / "checkpoints" / str(checkpoint_steps(workdir)[-1]), torn)
            (torn / "commit_success.txt").unlink(missing_ok=True)
    assert train.main(args(fmnist_dir, workdir)) == 0
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, 13)), killed_during
    assert tensorboard_steps(workdir) == list(range(1, 13))
    assert not [p for p in (workdir / "checkpoints").iterdir() if "tmp" in p.name]
    assert_bit_identical(params_of(workdir), params_of(reference))


# ---------------------------------------------------------------------------------------- damaged files


def damage(workdir, step, how):
    """Flips 64 bytes in (or deletes) every data file of the step's weights. Orbax may leave data files in more
    than one ``d`` folder (per process and merged) and reads only some of them, so damaging only the largest
    one sometimes hit a file the restore never reads."""
    folder = Path(workdir) / "checkpoints" / str(step) / "weights"
    targets = [p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"]
    assert targets, f"no data files under {folder}"
    for target in targets:
        if how == "flip":
            data = bytearray(target.read_bytes())
            for i in range(len(data) // 3, min(len(data) // 3 + 64, len(data))):
                data[i] ^= 0xFF
            target.write_bytes(bytes(data))
        else:
            target.unlink()


@pytest.mark.parametrize("how", ["flip", "delete"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(reference, fmnist_dir, tmp_path, capsys, how):
    workdir = copy_of(reference, tmp_path)
    damage(workdir, 12, how)
    damaged = snapshot(workdir / "checkpoints" / "12")

    assert evaluate_lib.main(["--workdir", str(workdir)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["step"] == 8
    warnings = [line for line in err.splitlines() if line.startswith("warning: checkpoint step 12")]
    assert len(warnings) == 1 and "unreadable" in warnings[0] and "left in place" in warnings[0], err
    assert "Traceback" not in err

    assert train.main(args(fmnist_dir, workdir, "--config.train.total_steps=16")) == 0
    err = capsys.readouterr().err
    assert "warning: checkpoint step 12" in err and "resuming from the checkpoint at step 8" in err
    assert snapshot(workdir / "checkpoints_unreadable" / "12") == damaged  # set aside, never deleted
    assert checkpoint_steps(workdir) == [8, 12, 16]
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, 17))
    assert tensorboard_steps(workdir) == list(range(1, 17))


def test_no_readable_checkpoint_is_one_clear_message(reference, tmp_path, capsys):
    workdir = copy_of(reference, tmp_path)
    for step in (4, 8, 12):
        damage(workdir, step, "delete")
    code = evaluate_lib.main(["--workdir", str(workdir)])
    assert_clean_error(code, capsys.readouterr().err, "no readable checkpoint", "[12, 8, 4]")


# ------------------------------------------------------------------------------------------ failed saves


def test_a_failed_save_stops_with_one_message_and_keeps_the_previous_checkpoint(
    reference, fmnist_dir, tmp_path, capsys, monkeypatch
):
    import orbax.checkpoint as ocp

    workdir = copy_of(reference, tmp_path)

    def disk_full(self, step, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ocp.CheckpointManager, "save", disk_full)
    code = train.main(args(fmnist_dir, workdir, "--config.train.total_steps=16"))
    message = assert_clean_error(code, capsys.readouterr().err, "step 16", "No space left", "step 12 is intact")
    assert "rerun the same command" in message
    monkeypatch.undo()
    assert load_run(workdir, num_devices=1).step == 12


# ------------------------------------------------------------------------------------- non-finite steps


def test_skip_policy_skips_and_counts_then_stops_after_n_in_a_row(reference, fmnist_dir, tmp_path, capsys):
    workdir = copy_of(reference, tmp_path)
    before = snapshot(workdir / "checkpoints")
    extra = ("--config.optim.base_lr=1e9", "--config.train.total_steps=20")
    skip = ("--config.train.nonfinite=skip", "--config.train.max_consecutive_nonfinite=3")
    code = train.main(args(fmnist_dir, workdir, *extra, *skip))
    err = capsys.readouterr().err
    assert_clean_error(code, err, "3 non-finite steps in a row", "after step 12")
    skipped = [line for line in err.splitlines() if "the update was skipped" in line]
    rows = [r for r in train_rows(workdir) if r["step"] > 12]
    first_bad = 12 + len(rows) + 1 - len(skipped)  # the rows end with the skipped steps before the stop
    assert 1 <= len(skipped) == 2 and [r["nonfinite_steps"] for r in rows][-2:] == [1, 1], (rows, err)
    assert rows[-1]["step"] == first_bad + 1
    assert snapshot(workdir / "checkpoints") == before


def test_a_nan_batch_is_skipped_on_device_and_the_step_moves_on(fmnist_dir):
    from nfjax.config_lib import load_config
    from nfjax.data import build_train_iterator
    from nfjax.experiment import build_experiment

    cfg = load_config(f"{ROOT}/configs/fmnist_nf.py:data_dir={fmnist_dir}")
    cfg.train.update(global_batch=64, total_steps=12, nonfinite="skip")
    cfg.optim.warmup_epochs = 0.0
    cfg.model.kwargs.update(widths=(8, 16, 16), stem_width=8)
    exp = build_experiment(cfg)
    step = exp.train_step()
    batch = next(build_train_iterator(cfg.data, global_batch=64, mesh=exp.mesh))
    state = exp.create_state()
    before = jax.tree.map(np.asarray, state["params"])
    poisoned = dict(batch, image=batch["image"] * np.nan)
    state, metrics = step(state, poisoned)
    assert not bool(metrics["finite"]) and int(state["step"]) == 1
    assert_bit_identical(jax.tree.map(np.asarray, state["params"]), before)
    state, metrics = step(state, batch)
    assert bool(metrics["finite"]) and int(state["step"]) == 2
    after = jax.tree.leaves(jax.tree.map(np.asarray, state["params"]))
    assert sum(not np.array_equal(a, b) for a, b in zip(after, jax.tree.leaves(before), strict=True)) > 0


# ------------------------------------------------------------------------------------- bad image files


def image_folder_with_bad_files(root, per_class=12):
    """root/{train,test}/{a,b}/*.png: 28x28 RGB images, plus in train/a a truncated PNG, an empty file and a
    text file named .jpg."""
    two_class_image_folder(root, per_class)
    bad = root / "train" / "a"
    whole = (bad / "0.png").read_bytes()
    (bad / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (bad / "empty.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image")
    return ["empty.png", "notes.jpg", "truncated.png"]


def folder_args(root, workdir, *extra):
    return [
        "--config",
        f"{ROOT}/configs/fmnist_nf.py",
        "--workdir",
        str(workdir),
        "--config.data.dataset=image_folder",
        f"--config.data.data_dir={root}",
        "--config.model.kwargs.widths=(8,16,16)",
        "--config.model.kwargs.stem_width=8",
        "--config.train.global_batch=8",
        "--config.train.total_steps=2",
        "--config.train.eval_batch=8",
        "--config.optim.warmup_epochs=0",
        *extra,
    ]


def test_an_image_folder_with_bad_files_trains_and_lists_them(tmp_path, capsys):
    bad = image_folder_with_bad_files(tmp_path / "images")
    workdir = tmp_path / "run"
    assert train.main(folder_args(tmp_path / "images", workdir, "--config.data.max_bad_fraction=0.2")) == 0
    err = capsys.readouterr().err
    assert "warning: 3 unusable image files left out" in err and "Traceback" not in err
    listed = (workdir / "bad_files.txt").read_text().splitlines()
    assert sorted(Path(line.split("\t")[0]).name for line in listed) == bad
    reasons = dict(line.split("\t") for line in listed)
    assert sorted(reasons.values()) == ["empty file", "not an image", "truncated PNG (no end marker)"]
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["eval"]["examples"] == 8 and checkpoint_steps(workdir) == [2]


def test_too_many_bad_files_stop_before_the_first_step(tmp_path, capsys):
    image_folder_with_bad_files(tmp_path / "images")
    workdir = tmp_path / "run"
    code = train.main(folder_args(tmp_path / "images", workdir))  # default max_bad_fraction 0.001
    assert_clean_error(code, capsys.readouterr().err, "3 of 27 files", "data.max_bad_fraction", "truncated.png")
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()


@pytest.mark.parametrize("make, needle", [("empty_class", "holds no images"), ("no_classes", "no class sub-folders")])
def test_empty_image_folders_are_one_clear_message(tmp_path, capsys, make, needle):
    root = tmp_path / "images"
    (root / "train").mkdir(parents=True)
    if make == "empty_class":
        image_folder_with_bad_files(tmp_path / "good")
        shutil.copytree(tmp_path / "good" / "train", root / "train", dirs_exist_ok=True)
        shutil.copytree(tmp_path / "good" / "test", root / "test")
        (root / "train" / "c").mkdir()
    code = train.main(folder_args(root, tmp_path / "run", "--config.data.max_bad_fraction=0.5"))
    assert_clean_error(code, capsys.readouterr().err, needle)


def test_a_damaged_fashion_mnist_file_and_a_bad_workdir_are_one_clear_message(fmnist_dir, tmp_path, capsys):
    from nfjax.data.fashion_mnist import DEBIAN_SOURCE_DIR, IDX_FILES, prepare_fashion_mnist

    source = tmp_path / "idx"
    shutil.copytree(DEBIAN_SOURCE_DIR, source)
    stem = IDX_FILES["test"][0]
    target = next(p for p in source.iterdir() if p.name.startswith(stem))
    header = b"\x00\x00\x0d\x03" + b"\x00" * 64  # 0x0d (float) where the IDX type byte must be 0x08 (uint8)
    target.write_bytes(gzip.compress(header) if target.suffix == ".gz" else header)
    with pytest.raises(ValueError, match="not an unsigned-byte IDX file.*reinstall"):
        prepare_fashion_mnist(str(tmp_path / "tfds"), str(source))

    (tmp_path / "a_file").write_text("x")
    code = train.main(nf_args(fmnist_dir, tmp_path / "a_file" / "run"))
    assert_clean_error(code, capsys.readouterr().err, "cannot use", "--workdir")


# ---------------------------------------------------------------------------------------- multi-process

STALL_S = 20  # train.stall_timeout_s of the two-process run
BOUND_S = STALL_S + 40  # the survivor must be gone this long after its peer was killed


@pytest.mark.parametrize("fault", ["kill", "stop"])
def test_a_dead_or_hung_process_stops_the_other_in_bounded_time_and_both_resume(
    fmnist_dir, tmp_path, compile_cache, fault
):
    """SIGKILL: the survivor's next collective fails and it exits at once with one message; rerun, both resume.
    SIGSTOP (a hung machine: the process and its own watchdog are both stopped, so the peer's watchdog cannot end
    it and break the collective first): the survivor blocks in a collective until its watchdog ends it after
    train.stall_timeout_s."""
    workdir = tmp_path / "run"
    run = (
        *DATA,
        f"--config.train.stall_timeout_s={STALL_S}",
        "--config.train.total_steps=16",
        "--config.train.checkpoint_every_steps=4",
        "--config.train.eval_every_steps=12",
    )
    launch = lambda: launch_two_processes(fmnist_dir, workdir, compile_cache, tmp_path, *run)
    procs = launch()
    try:
        deadline = time.time() + 240
        while time.time() < deadline and procs[0].poll() is None:
            if (workdir / "metrics.jsonl").exists() and len(train_rows(workdir)) >= 6:
                break
            time.sleep(0.05)
        assert procs[0].poll() is None, procs[0].communicate()[0][-3000:]
        os.killpg(procs[1].pid, signal.SIGKILL if fault == "kill" else signal.SIGSTOP)
        killed = time.time()
        output = procs[0].communicate(timeout=BOUND_S + 30)[0]
        elapsed = time.time() - killed
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGKILL)  # the stopped peer, and both watchdogs
            p.wait()
    assert procs[0].returncode not in (0, None), output[-3000:]
    assert elapsed < BOUND_S, (elapsed, output[-3000:])
    assert "died" in output and "rerun the same command" in output.lower(), output[-3000:]
    assert "Traceback" not in output and "stack trace" not in output, output[-3000:]
    if fault == "stop":
        assert elapsed >= STALL_S and "train.stall_timeout_s" in output, (elapsed, output[-3000:])
        return  # the resume after a lost process is the same as after the kill below

    procs = launch()
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    assert [r["step"] for r in train_rows(workdir)] == list(range(1, 17))


@pytest.mark.parametrize("backend", ["numpy", "tfdata"])
def test_a_file_damaged_in_the_middle_is_one_clear_message(tmp_path, capsys, backend):
    """Header and end marker intact, pixel data garbled: the pre-check cannot see it; decoding finds it, and
    the run stops with one paragraph naming the file (NumPy path, before training) or the step (tf.data)."""
    image_folder_with_bad_files(tmp_path / "images")
    folder = tmp_path / "images" / "train" / "a"
    for name in ("truncated.png", "empty.png", "notes.jpg"):
        (folder / name).unlink()
    data = bytearray((folder / "3.png").read_bytes())
    data[60:-40] = bytes(len(data) - 100)  # zeros over the compressed pixels; the IEND chunk stays
    (folder / "3.png").write_bytes(bytes(data))
    workdir = tmp_path / "run"
    streaming = ["--config.data.cache_in_memory=false"] if backend == "tfdata" else []
    code = train.main(folder_args(tmp_path / "images", workdir, f"--config.data.backend={backend}", *streaming))
    needle = "3.png cannot be decoded" if backend == "numpy" else "reading the training data for step"
    assert_clean_error(code, capsys.readouterr().err, needle)
