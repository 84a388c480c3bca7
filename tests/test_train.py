"""The trainer end to end on Fashion-MNIST with tiny models: CLI runs, resume, device-count and multi-process
equivalence, evaluate/predict, fail-fast configs, bad input, non-finite loss, SIGTERM.

Every run shares one tiny NF model and recipe (``TINY``); with the persistent compilation cache below, later
runs reuse the compiled init/train/eval programs of the first one, which keeps this module to a few minutes.
"""

import json
import os
import shutil
import signal
import threading
import time

import jax
import numpy as np
import pytest

from nfjax import evaluate as evaluate_lib
from nfjax import optim, predict, train, trainer
from nfjax.clipping import leaf_paths
from nfjax.config_lib import load_config_file
from nfjax.runs import load_run

from helpers import (
    MAX_FLIPPED_EXAMPLES,
    ROOT,
    STEPS,
    assert_clean_error,
    checkpoint_steps,
    launch_two_processes,
    nf_args,
    snapshot,
    train_rows,
)


@pytest.fixture(scope="module")
def trained(fmnist_dir, tmp_path_factory):
    """The shared run: STEPS steps of the tiny NF model on all 8 devices, from the CLI; ends with an eval."""
    workdir = tmp_path_factory.mktemp("trained")
    assert train.main(nf_args(fmnist_dir, workdir, f"--config.train.max_steps={STEPS}")) == 0
    return workdir


# ------------------------------------------------------------------------------------------ end to end


def test_cli_run_learns_writes_metrics_and_a_checkpoint(trained):
    rows = train_rows(trained)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    losses = [r["loss"] for r in rows]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.03, losses
    assert checkpoint_steps(trained) == [STEPS]
    final = json.loads((trained / "final_metrics.json").read_text())
    assert final["step"] == STEPS and final["eval"]["examples"] == 10_000
    assert final["finished"] is False  # stopped by train.max_steps, before the schedule's 100 steps
    config = json.loads((trained / "config.json").read_text())
    assert config["model"]["kwargs"]["widths"] == [8, 16, 16]


def test_second_invocation_resumes(trained, fmnist_dir, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    assert train.main(nf_args(fmnist_dir, workdir, "--config.train.max_steps=3")) == 0
    steps = [r["step"] for r in train_rows(workdir)]
    assert steps == list(range(1, STEPS + 4))  # continued at STEPS + 1, did not restart at 1
    assert checkpoint_steps(workdir)[-1] == STEPS + 3


def test_8_devices_equal_1_device(trained, fmnist_dir, tmp_path):
    extra = (f"--config.train.max_steps={STEPS}", "--config.train.num_devices=1", "--config.train.eval_every_steps=0")
    assert train.main(nf_args(fmnist_dir, tmp_path, *extra)) == 0
    one, eight = train_rows(tmp_path), train_rows(trained)
    assert len(one) == len(eight) == STEPS
    # Float sums in another order, and one device convolves through oneDNN where eight use XLA's own convolutions:
    # step 1 agrees to 1e-7 on an AVX-512 machine, 2e-5 on an AVX2 one, 1.6e-4 there with the suite's unoptimized
    # compiles; then lr 0.5 amplifies the rounding step by step. The loss and the weights stay within 1e-3; the
    # gradient norm is the most sensitive: 1.1% apart at step 10 on one machine, 3.0% at step 12 on another. A
    # real difference (a mean over one device's shard instead of the global batch, a missing all-reduce) moves
    # step 1 by far more than 1e-3, checked below.
    for key, rtol in (("loss", 1e-3), ("param_norm", 1e-3), ("grad_norm", 0.1), ("update_norm", 0.1)):
        np.testing.assert_allclose([r[key] for r in one], [r[key] for r in eight], rtol=rtol, err_msg=key)
    for key in ("grad_norm", "update_norm"):  # the first steps, before the rounding has grown
        np.testing.assert_allclose([r[key] for r in one[:4]], [r[key] for r in eight[:4]], rtol=5e-3, err_msg=key)
    np.testing.assert_allclose(one[0]["grad_norm"], eight[0]["grad_norm"], rtol=1e-3)


def test_two_processes_equal_one_process(trained, fmnist_dir, tmp_path, compile_cache):
    """jax.distributed over loopback with gloo, one CPU device per process, same global batch and steps."""
    workdir = tmp_path / "run"
    procs = launch_two_processes(fmnist_dir, workdir, compile_cache, tmp_path, f"--config.train.max_steps={STEPS}")
    try:
        outputs = [p.communicate(timeout=240)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-3000:] for o in outputs)
    rows, reference = train_rows(workdir), train_rows(trained)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))  # only process 0 writes metrics
    np.testing.assert_allclose([r["loss"] for r in rows], [r["loss"] for r in reference], rtol=2e-4)
    two = json.loads((workdir / "final_metrics.json").read_text())["eval"]
    one = json.loads((trained / "final_metrics.json").read_text())["eval"]
    assert two["examples"] == one["examples"] == 10_000
    # Another summation order moves near-tied logits: one of 10,000 argmaxes flipped in a CI run (0.2123 vs
    # 0.2124). Counts may differ by a few examples; a real difference (another lr, a lost shard) moves hundreds.
    for key in ("top1", "top5"):
        assert abs(two[key] - one[key]) * 10_000 <= MAX_FLIPPED_EXAMPLES, (key, two[key], one[key])
    np.testing.assert_allclose(two["loss"], one["loss"], rtol=2e-4)
    # Both processes wrote their part of the checkpoint; it restores here, on 8 devices, to the same params.
    for item in ("weights", "train"):
        written = sorted(p.name for p in (workdir / f"checkpoints/{STEPS}/{item}").glob("ocdbt.process_*"))
        assert written == ["ocdbt.process_0", "ocdbt.process_1"], item
    restored, expected = load_run(workdir), load_run(trained)
    flat = lambda tree: np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])
    a, b = flat(restored.weights["params"]), flat(expected.weights["params"])
    assert np.linalg.norm(a - b) / np.linalg.norm(b) < 1e-4 and np.abs(a - b).max() < 1e-3


# ------------------------------------------------------------------------------------ evaluate, predict


def test_evaluate_cli_counts_the_whole_test_split(trained, capsys):
    assert evaluate_lib.main(["--workdir", str(trained)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["examples"] == 10_000 and result["step"] == STEPS and result["split"] == "test"
    final = json.loads((trained / "final_metrics.json").read_text())["eval"]
    np.testing.assert_allclose(
        [result[k] for k in ("top1", "top5", "loss")], [final[k] for k in ("top1", "top5", "loss")]
    )


def test_evaluate_restores_weights_without_building_an_optimizer(trained, tmp_path, capsys):
    """The optim section of the saved config is never read: an invalid one does not stop evaluation."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["optim"].update(name="no_such_optimizer", base_lr=-1.0)
    (workdir / "config.json").write_text(json.dumps(config))
    assert evaluate_lib.main(["--workdir", str(workdir)]) == 0
    result = json.loads(capsys.readouterr().out)
    final = json.loads((trained / "final_metrics.json").read_text())["eval"]
    assert result["examples"] == 10_000 and result["top1"] == pytest.approx(final["top1"])
    run = load_run(workdir, num_devices=1)
    assert set(run.weights) == {"params"} and run.step == STEPS  # NF model without EMA: params only


def test_a_checkpoint_of_another_format_is_refused_untouched(trained, fmnist_dir, tmp_path, capsys, monkeypatch):
    from nfjax import checkpoint

    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir)
    monkeypatch.setattr(checkpoint, "FORMAT", checkpoint.FORMAT + 1)
    assert_clean_error(evaluate_lib.main(["--workdir", str(workdir)]), capsys.readouterr().err, "format")
    code = train.main(nf_args(fmnist_dir, workdir, "--config.train.max_steps=1"))
    assert_clean_error(code, capsys.readouterr().err, f"format {checkpoint.FORMAT - 1}", "new --workdir")
    assert snapshot(workdir) == before


@pytest.mark.parametrize("make", ["missing", "no_checkpoint"])
def test_evaluate_cli_errors(tmp_path, capsys, trained, make):
    if make == "no_checkpoint":
        shutil.copy(trained / "config.json", tmp_path / "config.json")
    code = evaluate_lib.main(["--workdir", str(tmp_path / ("nothing" if make == "missing" else ""))])
    assert_clean_error(code, capsys.readouterr().err, "workdir" if make == "missing" else "checkpoint")
    assert not (tmp_path / "checkpoints").exists()


def test_predict_cli_prints_class_names(trained, fmnist_dir, tmp_path, capsys):
    from PIL import Image

    from nfjax import data

    cfg = data.fashion_mnist_data_config(fmnist_dir)
    first = next(data.build_eval_iterator(cfg, global_batch=8, device_count=1, process_count=1, process_index=0))
    images, _ = data.sources.TfdsSource("fashion_mnist", "test", fmnist_dir).load_arrays()
    path = tmp_path / "test0.png"
    Image.fromarray(images[0][..., 0]).save(path)
    # The file goes through the evaluation preprocessing exactly.
    x = predict.preprocess([predict.read_image(str(path), 1)], cfg)
    np.testing.assert_allclose(x[0], first["image"][0], atol=1e-6)

    assert predict.main(["--workdir", str(trained), "--top-k", "3", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = data.dataset_info(cfg).class_names
    assert lines[0] == str(path) and len(lines) == 4
    probs = [float(line.split()[0]) for line in lines[1:]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1.0001
    assert all(line.split(None, 1)[1] in names for line in lines[1:])

    (tmp_path / "broken.png").write_text("not an image")
    code = predict.main(["--workdir", str(trained), str(path), str(tmp_path / "broken.png")])
    assert_clean_error(code, capsys.readouterr().err, "broken.png")


# ------------------------------------------------------------------------------- ImageNet config, fail fast


def test_nfnet_f0_config_builds_without_running():
    from flax import nnx

    from nfjax.models import create_model

    cfg = load_config_file(f"{ROOT}/configs/nfnet_f0.py")
    model = nnx.eval_shape(
        lambda: create_model(cfg.model.name, 1000, 3, rngs=nnx.Rngs(0), **cfg.model.kwargs.to_dict())
    )
    params = nnx.state(model, nnx.Param)
    count = sum(x.size for x in jax.tree.leaves(params))
    assert 71_000_000 < count < 72_000_000  # NFNet-F0: 71.5M parameters
    opt = optim.build_optimizer(cfg.optim, steps_per_epoch=1_281_167 // 4096, total_steps=112_590, global_batch=4096)
    tx, schedule = opt.tx, opt.schedule
    opt_state = jax.eval_shape(tx.init, nnx.to_pure_dict(params))
    assert sum(x.size for x in jax.tree.leaves(opt_state)) >= count  # momentum buffers
    assert schedule(0) == 0 and float(schedule(312 * 5)) == pytest.approx(0.1 * 4096 / 256, rel=1e-3)
    d = cfg.data
    assert (d.dataset, d.image_size, d.eval_image_size, d.randaugment_layers) == ("imagenet2012", 192, 256, 4)
    assert (d.mixup_alpha, d.cutmix_alpha, d.label_smoothing) == (0.2, 1.0, 0.1)
    assert (cfg.train.global_batch, cfg.optim.clipping, cfg.optim.agc_lambda) == (4096, "agc", 0.01)


def test_nfnet_f0_without_imagenet_fails_fast(tmp_path, capsys):
    data_dir, workdir = tmp_path / "empty_tfds", tmp_path / "run"
    data_dir.mkdir()
    start = time.perf_counter()
    code = train.main(["--config", f"{ROOT}/configs/nfnet_f0.py:data_dir={data_dir}", "--workdir", str(workdir)])
    elapsed = time.perf_counter() - start
    assert_clean_error(code, capsys.readouterr().err, str(data_dir), "python -m nfjax.data.prepare imagenet2012")
    assert elapsed < 20
    assert not workdir.exists()


# --------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "override, needles",
    [
        ("--config.model.name=nfnet_f9", ["unknown model 'nfnet_f9'", "nfnet_f0", "resnet_small"]),
        ("--config.train.epoch=3", ["--config.train.epoch", "--config.train.epochs"]),
        ("--config.train.global_batch=100", ["100", "8 devices"]),
        ("--config.train.fsdp=3", ["train.fsdp=3", "8 devices", "choose one of 1, 2, 4, 8"]),
    ],
)
def test_bad_input_is_one_clear_paragraph(fmnist_dir, tmp_path, capsys, override, needles):
    workdir = tmp_path / "run"
    code = train.main(nf_args(fmnist_dir, workdir, override))
    assert_clean_error(code, capsys.readouterr().err, *needles)
    assert not workdir.exists()


@pytest.mark.parametrize(
    "config, extra, needles",
    [
        ("fmnist_bn.py", (), ["different model", "model='nf_resnet_small'", "model='resnet_small'"]),
        ("fmnist_nf.py", ("--config.model.kwargs.widths=(8,16,32)",), ["different model", "[8, 16, 16]"]),
        ("fmnist_nf.py", ("--config.optim.clipping=none",), ["does not fit", "optim.clipping"]),
    ],
)
def test_workdir_of_another_model_is_refused_untouched(trained, fmnist_dir, tmp_path, capsys, config, extra, needles):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir)
    code = train.main(nf_args(fmnist_dir, workdir, "--config.train.max_steps=2", *extra, config=config))
    assert_clean_error(code, capsys.readouterr().err, *needles)
    assert snapshot(workdir) == before


def test_non_finite_loss_stops_and_keeps_the_checkpoint(trained, fmnist_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    before = snapshot(workdir / "checkpoints")
    code = train.main(nf_args(fmnist_dir, workdir, "--config.optim.base_lr=1e9", "--config.train.max_steps=10"))
    message = assert_clean_error(code, capsys.readouterr().err, "non-finite loss", f"after step {STEPS}")
    step = int(message.split(" at step ")[1].split(";")[0])
    assert STEPS < step <= STEPS + 10
    assert train_rows(workdir)[-1]["step"] == step - 1  # the failed step was not logged as done
    paths = leaf_paths(load_run(workdir, num_devices=1).weights["params"])
    assert any(f"norm is {p}." in message for p in paths), message
    assert snapshot(workdir / "checkpoints") == before


def metric_dicts(tree) -> int:
    """How many steps' metrics (dicts with 'finite') a ``jax.device_get`` argument holds."""
    if isinstance(tree, dict):
        return 1 if "finite" in tree else sum(metric_dicts(v) for v in tree.values())
    return sum(metric_dicts(v) for v in tree) if isinstance(tree, (list, tuple)) else 0


def test_metrics_are_fetched_once_per_log_step_not_every_step(trained, fmnist_dir, tmp_path, monkeypatch):
    """8 steps logged every 4, no evaluation or checkpoint between: two transfers of metrics, 4 steps each."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    fetches, device_get = [], jax.device_get

    def counting(tree):
        if metric_dicts(tree):
            fetches.append(metric_dicts(tree))
        return device_get(tree)

    monkeypatch.setattr(trainer.jax, "device_get", counting)
    code = train.main(nf_args(fmnist_dir, workdir, "--config.train.max_steps=8", "--config.train.log_every_steps=4"))
    monkeypatch.undo()
    assert code == 0
    assert fetches == [4, 4]
    rows = [r for r in train_rows(workdir) if r["step"] > STEPS]
    assert [r["step"] for r in rows] == [STEPS + 4, STEPS + 8] and all(np.isfinite(r["loss"]) for r in rows)
    assert checkpoint_steps(workdir) == [STEPS, STEPS + 8]


def test_a_non_finite_step_between_log_steps_stops_before_the_next_checkpoint(
    trained, fmnist_dir, tmp_path, capsys, monkeypatch
):
    """A NaN batch at step STEPS + 5, logs every 10 steps, checkpoints every 3: the checkpoint due one step later
    checks the pending steps first, so the run stops there naming the bad step, and the newest checkpoint stays the
    last good one (step 15)."""
    workdir = tmp_path / "run"
    shutil.copytree(trained, workdir)
    bad, next_batch = STEPS + 5, trainer.TrainingLoop._next_batch

    def poisoned(self, batches, step):
        batch = next_batch(self, batches, step)
        return dict(batch, image=batch["image"] * np.nan) if step == bad else batch

    monkeypatch.setattr(trainer.TrainingLoop, "_next_batch", poisoned)
    extra = ("--config.train.max_steps=8", "--config.train.log_every_steps=10")
    extra += ("--config.train.checkpoint_every_steps=3",)
    code = train.main(nf_args(fmnist_dir, workdir, *extra))
    assert_clean_error(code, capsys.readouterr().err, f"non-finite loss (nan) at step {bad};", "after step 15")
    assert checkpoint_steps(workdir) == [STEPS, 15]
    assert train_rows(workdir)[-1]["step"] == STEPS


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(fmnist_dir, tmp_path, capsys):
    """SIGTERM (preemption) mid-run: a checkpoint at the current step, exit code 0, the handler given back."""
    previous, returned = signal.getsignal(signal.SIGTERM), threading.Event()

    def send_sigterm_after_the_first_log_line():
        while not train_rows(tmp_path):
            if returned.wait(0.02):  # the run ended without logging: never signal this process then
                return
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_sigterm_after_the_first_log_line, daemon=True)
    sender.start()
    try:
        code = train.main(nf_args(fmnist_dir, tmp_path, "--config.train.eval_every_steps=0"))
    finally:
        returned.set()
        sender.join()
    assert code == 0
    assert "SIGTERM: saved a checkpoint" in capsys.readouterr().err
    saved = checkpoint_steps(tmp_path)
    assert len(saved) == 1 and 1 <= saved[0] < 100
    assert train_rows(tmp_path)[-1]["step"] == saved[0]
    assert signal.getsignal(signal.SIGTERM) == previous
