"""The training-study drivers (scripts/batch_size_robustness.py, scripts/agc_sweep.py) and nfjax.study on tiny
settings: real training runs on 64 Fashion-MNIST images, tables, PNGs with the expected series, skip on rerun."""

import csv
import json
import math
import os

import numpy as np
import pytest

from nfjax import study
from nfjax.plotting import is_png

from helpers import load_script

TINY = ["--widths", "8,16,16", "--stem-width", "8", "--epochs", "1", "--train-examples", "64"]
TINY_CONFIG = ["--", "--config.train.eval_batch=32", "--config.optim.warmup_epochs=0"]


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
    driver = load_script("batch_size_robustness")
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


def test_batch_study_refuses_runs_trained_with_other_settings(batch_study, capsys):
    driver, base, argv = batch_study
    capsys.readouterr()
    assert driver.main([*argv[: argv.index("--")], "--epochs", "2", *argv[argv.index("--") :]]) == 1
    err = capsys.readouterr().err
    assert "holds a run with other settings" in err and "epochs=2" in err and "Use another --runs folder" in err


def test_a_run_that_stops_before_the_end_of_its_schedule_stops_the_study(monkeypatch, tmp_path):
    import nfjax.train

    monkeypatch.setattr(nfjax.train, "main", lambda argv: 0)  # returns without reaching the end (as after SIGTERM)
    with pytest.raises(study.RunFailed, match="stopped before the end of its schedule; rerun the driver to resume"):
        study.run_training(str(tmp_path / "run"), study.config_path("fmnist_nf"), [], log=lambda line: None)
    assert json.loads((tmp_path / "run" / "study_run.json").read_text())["settings"] == ["configs/fmnist_nf.py"]


def test_run_result_reports_the_first_interval_with_a_skipped_update(tmp_path):
    rows = [
        dict(step=5, split="train", loss=2.2, nonfinite_steps=0),
        dict(step=10, split="train", loss=5e30, nonfinite_steps=2),  # finite mean of the steps that were applied
        dict(step=15, split="train", loss="nan", nonfinite_steps=5),  # as the metrics writer stores it
        dict(step=20, split="train", loss=2.3, nonfinite_steps=0),
        dict(step=20, split="eval", top1=0.1, loss="inf"),
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert study.run_result(str(tmp_path)) is None  # not finished: no final_metrics.json
    (tmp_path / "final_metrics.json").write_text(json.dumps({"finished": True}))
    result = study.run_result(str(tmp_path))
    assert (result["nonfinite_at"], result["top1"], result["train_loss"], result["steps"]) == (10, 0.1, 2.3, 20)
    assert result["eval_loss"] == math.inf and math.isnan(study.read_metrics(str(tmp_path), "train")[2]["loss"])
    assert study.json_safe({"a": [math.inf, 1.0], "b": math.nan}) == {"a": ["inf", 1.0], "b": "nan"}
    (tmp_path / "final_metrics.json").write_text('{"finished": tr')  # cut short while written: not finished
    assert study.run_result(str(tmp_path)) is None


def test_agc_summary_averages_over_seeds_and_skips_nan_clip_fractions():
    driver = load_script("agc_sweep")
    run = dict(base_lr=0.4, peak_lr=3.2, setting="agc0.02_excl", agc_lambda=0.02, classifier="excl", eval_loss=1.0)
    rows = [
        dict(run, seed=0, top1=0.8, max_train_loss=3.0, nonfinite_at=None, agc_clip_fraction_mean=0.2),
        dict(run, seed=1, top1=0.6, max_train_loss=9.0, nonfinite_at=7, agc_clip_fraction_mean=0.4),
    ]
    (row,) = driver.summarize(rows)
    assert (row["seeds"], row["top1_mean"], row["top1_min"], row["max_train_loss"]) == (2, pytest.approx(0.7), 0.6, 9.0)
    assert row["agc_clip_fraction_mean"] == pytest.approx(0.3) and row["first_nonfinite_step"] == 7
    assert row["runs_with_nonfinite_steps"] == 1


def test_study_summary_mean_and_sample_std_by_hand():
    assert study.mean_spread([0.5, 0.7, 0.9]) == pytest.approx(dict(mean=0.7, std=0.2, min=0.5, max=0.9))
    assert study.mean_spread([0.5])["std"] == 0.0


def test_agc_sweep_runs_off_and_each_lambda_and_draws_the_curves(tiny_data, tmp_path):
    from nfjax.cli import parse_args

    driver = load_script("agc_sweep")
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
        ("batch_size_robustness", ["--batches", "8,0"], "--batches takes values of at least 1"),
        ("agc_sweep", ["--lambdas", "0.01,x"], "--lambdas takes comma-separated float values"),
        ("agc_sweep", ["--classifier", "head"], "--classifier takes excl, clip or excl,clip"),
        ("agc_sweep", ["--", "--epochs=3"], "only --config.KEY=VALUE overrides"),
        ("agc_sweep", ["--lr", "0.1"], "only --config.KEY=VALUE overrides"),  # no abbreviations of --lrs
        ("batch_size_robustness", ["--seeds", "0,x"], "--seeds takes comma-separated int values"),
        ("batch_size_robustness", ["--batches", "8,36"], "batches [36] do not divide"),
        ("batch_size_robustness", ["--variants", "bn_ghost", "--batches", "8"], "nothing to train"),
    ],
)
def test_study_drivers_refuse_bad_arguments_in_one_line(name, argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).main(["--runs", str(tmp_path / "r"), *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["batch_size_robustness", "agc_sweep"])
def test_study_drivers_without_matplotlib_stop_before_training(name, monkeypatch, tmp_path):
    import sys

    from nfjax.plotting import PLOTS_INSTALL_HINT

    module = load_script(name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out")])
    assert "matplotlib is not installed" in str(exit_info.value.code) and PLOTS_INSTALL_HINT in str(
        exit_info.value.code
    )
    assert not os.path.exists(tmp_path / "runs") and not os.path.exists(tmp_path / "out")
