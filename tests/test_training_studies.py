"""The training-study drivers (scripts/batch_size_robustness.py, scripts/agc_sweep.py) and nfjax.study on tiny
settings: real training runs on 64 Fashion-MNIST images, tables, PNGs with the expected series, skip on rerun."""

import csv
import importlib.util
import json
import math
import os

import numpy as np
import pytest

from nfjax import study
from nfjax.plotting import is_png

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--widths", "8,16,16", "--stem-width", "8", "--epochs", "1", "--train-examples", "64"]
TINY_CONFIG = ["--", "--config.train.eval_batch=32", "--config.optim.warmup_epochs=0"]


def _load(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "scripts", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    """TFDS fashion_mnist with the first 64 training and 32 test images."""
    from nfjax.data.fashion_mnist import DEBIAN_SOURCE_DIR, load_idx_split, store_fashion_mnist

    train, test = load_idx_split(DEBIAN_SOURCE_DIR, "train"), load_idx_split(DEBIAN_SOURCE_DIR, "test")
    path = str(tmp_path_factory.mktemp("tiny_tfds"))
    store_fashion_mnist(path, {"train": (train[0][:64], train[1][:64]), "test": (test[0][:32], test[1][:32])})
    return path


@pytest.fixture(scope="module")
def batch_study(tiny_data, tmp_path_factory):
    driver = _load("batch_size_robustness")
    base = tmp_path_factory.mktemp("batch_study")
    argv = ["--runs", str(base / "runs"), "--out", str(base / "out"), "--batches", "8,16", "--seeds", "0"]
    argv += ["--variants", "nf,bn_ghost", "--ghost", "8", "--data-dir", tiny_data, *TINY, *TINY_CONFIG]
    assert driver.main(argv) == 0
    return driver, base, argv


def test_batch_study_trains_each_variant_and_batch_and_plots_them(batch_study):
    driver, base, _ = batch_study
    # bn_ghost only above its group size: at batch 8 it would be the plain BN twin
    names = sorted(os.listdir(base / "runs"))
    assert names == sorted(["bn_ghost_b16_s0", "nf_b8_s0", "nf_b16_s0"])
    ghost = json.loads((base / "runs" / "bn_ghost_b16_s0" / "config.json").read_text())
    nf = json.loads((base / "runs" / "nf_b8_s0" / "config.json").read_text())
    assert ghost["model"]["name"] == "resnet_small" and ghost["model"]["kwargs"]["bn_ghost_size"] == 8
    assert nf["model"]["name"] == "nf_resnet_small" and nf["optim"]["clipping"] == "agc"
    assert nf["train"]["global_batch"] == 8 and nf["model"]["kwargs"]["widths"] == [8, 16, 16]
    with open(base / "out" / "batch_size.csv") as f:
        table = list(csv.DictReader(f))
    assert [(t["variant"], int(t["batch"])) for t in table] == [("nf", 8), ("nf", 16), ("bn_ghost", 16)]
    for t in table:  # the table's numbers are the runs' last evaluation
        name = driver.run_name(t["variant"], int(t["batch"]), 0)
        (last, *_) = study.read_metrics(str(base / "runs" / name), "eval")[::-1]
        assert float(t["top1_mean"]) == pytest.approx(last["top1"]) and int(t["seeds"]) == 1
        assert int(t["steps"]) == 64 // int(t["batch"])
    assert is_png(base / "out" / "batch_size.png")
    record = json.loads((base / "out" / "batch_size.json").read_text())
    assert record["runs_planned"] == record["runs_finished"] == 3 and record["environment"]["jax"]
    fig = driver.plot(record["summary"], record["runs"], record["variants"], "tiny")
    for ax, key in zip(fig.axes, ("top1_mean", "eval_loss_mean"), strict=True):
        assert ax.get_xscale() == "log"
        series = ax.containers  # one errorbar per variant: mean line, min-max bars
        assert [c.get_label() for c in series] == ["NF twin (AGC 0.08)", "BN twin, statistics over groups of 8"]
        np.testing.assert_allclose(np.asarray(series[0].lines[0].get_xdata(), float), [8, 16])
        np.testing.assert_allclose(
            np.asarray(series[0].lines[0].get_ydata(), float), [r[key] for r in record["summary"][:2]]
        )


def test_batch_study_rerun_skips_finished_runs_and_reproduces_the_table(batch_study, capsys):
    driver, base, argv = batch_study
    before = (base / "out" / "batch_size.csv").read_text()
    capsys.readouterr()
    assert driver.main(argv) == 0
    out = capsys.readouterr().out
    assert out.count("finished earlier, skipped") == 3 and "[3/3] bn_ghost_b16_s0" in out
    assert (base / "out" / "batch_size.csv").read_text() == before


def test_study_summary_mean_and_sample_std_by_hand():
    assert study.mean_spread([0.5, 0.7, 0.9]) == pytest.approx(dict(mean=0.7, std=0.2, min=0.5, max=0.9))
    assert study.mean_spread([0.5])["std"] == 0.0


def test_agc_sweep_runs_off_and_each_lambda_and_draws_the_curves(tiny_data, tmp_path):
    from nfjax.cli import parse_args

    driver = _load("agc_sweep")
    argv = ["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--batch", "16", "--lrs", "0.4"]
    argv += ["--lambdas", "0.16", "--classifier", "excl", "--data-dir", tiny_data, *TINY, *TINY_CONFIG]
    assert driver.main(argv) == 0
    runs = tmp_path / "runs"
    assert sorted(os.listdir(runs)) == ["lr0.4_agc0.16_excl_s0", "lr0.4_off_s0"]
    optim = {n: json.loads((runs / n / "config.json").read_text())["optim"] for n in os.listdir(runs)}
    assert optim["lr0.4_off_s0"]["clipping"] == "none" and optim["lr0.4_off_s0"]["base_lr"] == 0.4
    assert optim["lr0.4_agc0.16_excl_s0"]["clipping"] == "agc" and optim["lr0.4_agc0.16_excl_s0"]["agc_lambda"] == 0.16
    assert any("classifier" in p for p in optim["lr0.4_agc0.16_excl_s0"]["clip_exclude"])
    # the clipped-classifier setting's command line gives a config that clips everything but the SkipInit gains
    workdir, config, overrides = driver.run_command(driver.parse(argv), 0.4, 0.02, "clip", 0)
    cfg = parse_args("nfjax.train", ["--config", config, "--workdir", workdir, *overrides])[0]
    assert tuple(cfg.optim.clip_exclude) == ("(^|/)skip_gain$",) and cfg.optim.agc_lambda == 0.02
    train = study.read_metrics(str(runs / "lr0.4_agc0.16_excl_s0"), "train")
    assert [r["step"] for r in train] == [1, 2, 3, 4]  # every step logged: the curves
    record = json.loads((tmp_path / "out" / "agc_sweep.json").read_text())
    by_name = {(r["setting"]): r for r in record["summary"]}
    assert list(by_name) == ["off", "agc0.16_excl"]
    assert by_name["off"]["agc_clip_fraction_mean"] is None
    assert 0 <= by_name["agc0.16_excl"]["agc_clip_fraction_mean"] <= 1
    last_eval = study.read_metrics(str(runs / "lr0.4_agc0.16_excl_s0"), "eval")[-1]
    assert by_name["agc0.16_excl"]["top1_mean"] == last_eval["top1"]
    for name in ("agc_sweep.png", "agc_curves.png"):
        assert is_png(tmp_path / "out" / name)
    clipped = dict(
        by_name["agc0.16_excl"], setting="agc0.16_clip", classifier="clip", top1_mean=0.5, top1_min=0.5, top1_max=0.5
    )
    fig = driver.plot_sweep([*record["summary"], clipped], "tiny")
    ax = fig.axes[0]
    assert [c.get_label() for c in ax.containers] == ["AGC, classifier not clipped", "AGC, classifier clipped"]
    np.testing.assert_allclose(np.asarray(ax.containers[0].lines[0].get_xdata(), float), [0.16])
    np.testing.assert_allclose(np.asarray(ax.containers[1].lines[0].get_ydata(), float), [0.5])
    (off_line,) = [line for line in ax.get_lines() if line.get_label() == "AGC off"]
    assert off_line.get_ydata()[0] == by_name["off"]["top1_mean"]
    fig = driver.plot_curves(record["runs"], 0, "tiny")
    lines = [line for line in fig.axes[0].get_lines() if not line.get_label().startswith("_")]
    assert [line.get_label() for line in lines] == ["AGC off", "AGC lambda 0.16"]
    off = next(r for r in record["runs"] if r["setting"] == "off")
    np.testing.assert_allclose(lines[0].get_ydata(), [v if math.isfinite(v) else np.nan for _, v in off["curve"]])


@pytest.mark.parametrize(
    "name, argv, message",
    [
        ("batch_size_robustness", ["--variants", "nf,gn"], "--variants takes a comma-separated subset"),
        ("batch_size_robustness", ["--batches", "8,0"], "--batches takes comma-separated positive integers"),
        ("agc_sweep", ["--lambdas", "0.01,x"], "--lambdas takes comma-separated numbers"),
        ("agc_sweep", ["--classifier", "head"], "--classifier takes excl, clip or excl,clip"),
        ("agc_sweep", ["--", "--epochs=3"], "only --config.* overrides are passed"),
    ],
)
def test_study_drivers_refuse_bad_arguments_in_one_line(name, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        _load(name).main(["--runs", str(tmp_path / "r"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "r")
