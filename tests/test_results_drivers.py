"""The result drivers in scripts/ on tiny settings: tables, PNGs with the expected series, seeds, no matplotlib."""

import csv
import json
import os
import sys

import numpy as np
import pytest

from nfjax.plotting import PLOTS_INSTALL_HINT, is_png

from helpers import load_script

TINY = dict(widths=(8, 16), depths=(2, 1), strides=(1, 2), stem_width=8)
TINY_SERIES = {
    "NF": ("nf_resnet_small", {"skipinit_gain": 1.0, **TINY}),
    "BN": ("resnet_small", {"zero_init_last": False, **TINY}),
    "no norm": ("resnet_small", {"norm": "none", **TINY}),
}
FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="module")
def signal():
    return load_script("signal_propagation")


@pytest.fixture(scope="module")
def speed():
    return load_script("speed_nf_vs_bn")


@pytest.fixture(scope="module")
def signal_run(signal, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("signal"))
    return signal.run(TINY_SERIES, ["gaussian", "fashion_mnist"], 16, 4, 0, out, FMNIST)


def test_signal_propagation_writes_tables_and_pngs_with_every_series(signal, signal_run):
    rows = signal_run["rows"]
    assert len(rows) == 2 * 3 * 3  # inputs x series x blocks
    # depths (2, 1): blocks 0 and 2 open a stage
    assert [(r["block"], r["stage"], r["transition"]) for r in rows[:3]] == [(0, 0, True), (1, 0, False), (2, 1, True)]
    paths = signal_run["paths"]
    pngs = [p for p in paths if p.endswith(".png")]
    assert [os.path.basename(p) for p in pngs] == [
        "signal_propagation_gaussian.png",
        "signal_propagation_fashion_mnist.png",
    ]
    assert all(is_png(p) and os.path.getsize(p) < 150_000 for p in pngs)
    with open(paths[0]) as f:
        table = list(csv.DictReader(f))
    assert [(t["series"], int(t["block"])) for t in table] == [(r["series"], r["block"]) for r in rows]
    assert float(table[4]["avg_var"]) == pytest.approx(rows[4]["avg_var"])
    with open(paths[1]) as f:
        meta = json.load(f)
    assert (meta["image_size"], meta["batch"], meta["seed"]) == (16, 4, 0) and meta["environment"]["jax"]
    fig = signal.plot(rows, "fashion_mnist", "tiny")
    for ax, key in zip(fig.axes, signal.STATISTICS, strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert [label for label in lines if not label.startswith("_")] == list(TINY_SERIES)
        assert ax.get_yscale() == "log"
        mine = [r[key] for r in rows if r["input"] == "fashion_mnist" and r["series"] == "BN"]
        np.testing.assert_allclose(lines["BN"].get_ydata(), mine)
        np.testing.assert_array_equal(lines["_transitions BN"].get_xdata(), [0, 2])


def test_signal_propagation_values_are_the_models_statistics(signal, signal_run):
    """The table's numbers are those of model(x, return_stats=True) on the driver's inputs, recomputed here."""
    from flax import nnx

    from nfjax.models import create_model

    model = create_model("nf_resnet_small", num_classes=10, rngs=nnx.Rngs(0), **TINY_SERIES["NF"][1])
    _, stats = model(signal.gaussian_inputs(0, 4, 16), return_stats=True)
    got = [r["avg_var"] for r in signal_run["rows"] if r["input"] == "gaussian" and r["series"] == "NF"]
    np.testing.assert_allclose(got, stats["avg_var"], rtol=1e-5)
    images = np.asarray(signal.fashion_mnist_inputs(0, 4, 16, FMNIST))
    assert images.shape == (4, 16, 16, 3) and np.array_equal(images[..., 0], images[..., 2])
    assert -1.0 < images.min() < -0.7  # the black background: (0 - 0.2860) / 0.3530 = -0.81


def test_signal_propagation_is_reproducible_with_its_seed(signal, signal_run, tmp_path):
    two = {k: TINY_SERIES[k] for k in ("NF", "no norm")}
    again = signal.run(two, ["gaussian"], 16, 4, 0, str(tmp_path / "a"), FMNIST)["rows"]
    first = [r for r in signal_run["rows"] if r["input"] == "gaussian" and r["series"] in two]
    assert again == first  # every number identical
    other = signal.run(two, ["gaussian"], 16, 4, 1, str(tmp_path / "b"), FMNIST)["rows"]
    assert [r["avg_var"] for r in other] != [r["avg_var"] for r in first]


def test_speed_driver_writes_table_and_bar_plot_from_the_benchmark(speed, tmp_path, capsys):
    argv = ["--out", str(tmp_path), "--pairs", "nf_resnet_small:resnet_small", "--steps-of", "eval"]
    result = speed.main(argv + ["--image-size", "16", "--batch", "2", "--steps", "1", "--warmup", "0", "--rounds", "1"])
    assert [(r["model"], r["side"], r["step"]) for r in result["runs"]] == [
        ("nf_resnet_small", "nf", "eval"),
        ("resnet_small", "bn", "eval"),
    ]
    assert all(r["step_s"] > 0 and r["img_per_s"] == pytest.approx(2 / r["step_s"]) for r in result["runs"])
    assert is_png(os.path.join(tmp_path, "speed.png"))
    with open(os.path.join(tmp_path, "speed.csv")) as f:
        assert [row["model"] for row in csv.DictReader(f)] == ["nf_resnet_small", "resnet_small"]
    out = capsys.readouterr().out
    assert "eval step: nf_resnet_small 16px batch 2" in out and "(1x forward)" in out  # the benchmark's report
    assert "skipped pair nfnet_f0" in out and "total wall time" in out
    fig = speed.plot(result["summary"], "tiny")
    labels = [c.get_label() for c in fig.axes[0].containers]
    assert [label for label in labels if not label.startswith("_")] == ["nf_resnet_small", "resnet_small"]


def test_speed_driver_alternates_the_order_of_the_two_sides(speed, monkeypatch, tmp_path):
    calls = []

    def fake_benchmark(model, step, args):
        calls.append((step, model))
        seconds = {"nf": 1.0, "bn": 2.0}["nf" if model.startswith("nf_") else "bn"]
        return {"rows": [dict(step_s=seconds, img_per_s=args.batch / seconds, compile_s=0.0)]}

    monkeypatch.setattr(speed, "bench_once", fake_benchmark)
    result = speed.main(["--out", str(tmp_path), "--pairs", "nf_resnet_small:resnet_small", "--rounds", "3"])
    nf, bn = "nf_resnet_small", "resnet_small"
    assert [model for _, model in calls] == [nf, bn, bn, nf, nf, bn] * 2
    assert [step for step, _ in calls] == ["train"] * 6 + ["eval"] * 6
    assert [(r["step"], r["model"], r["bn_over_nf"]) for r in result["summary"]] == [
        ("train", nf, 2.0),
        ("train", bn, 2.0),
        ("eval", nf, 2.0),
        ("eval", bn, 2.0),
    ]


def test_speed_summary_medians_ranges_and_ratio_by_hand(speed):
    rows = [
        dict(pair="a:b", step="train", model=m, side=s, round=i, step_s=t, img_per_s=8 / t)
        for m, s, times in (("a", "nf", (1.0, 2.0, 4.0)), ("b", "bn", (3.0, 6.0, 5.0)))
        for i, t in enumerate(times)
    ]
    nf, bn = speed.summarize(rows)
    assert (nf["step_s"], nf["img_per_s"], nf["img_per_s_min"], nf["img_per_s_max"]) == (2.0, 4.0, 2.0, 8.0)
    assert (bn["step_s"], bn["img_per_s"]) == (5.0, 8 / 5)
    assert nf["bn_over_nf"] == bn["bn_over_nf"] == 2.5


def test_speed_driver_refuses_a_bad_pair(speed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--pairs", "nf_resnet50:resnet5"])
    assert exit_info.value.code == 2
    assert "'nf_resnet50:resnet5' is not one (unknown model 'resnet5')" in capsys.readouterr().err


@pytest.mark.parametrize("driver", ["signal_propagation", "speed_nf_vs_bn"])
def test_missing_matplotlib_stops_with_the_install_command(driver, monkeypatch, tmp_path):
    module = load_script(driver)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    argv = ["--out", str(tmp_path / "out")] + (["--pairs", "nf_resnet_small:resnet_small"] if "speed" in driver else [])
    with pytest.raises(SystemExit) as exit_info:
        module.main(argv)
    message = str(exit_info.value.code)  # SystemExit(str): Python prints it alone, exit status 1, no traceback
    assert "matplotlib is not installed" in message and PLOTS_INSTALL_HINT in message
    assert not os.path.exists(tmp_path / "out")  # stopped before measuring anything


def test_gpu_targets_sets_the_trainer_against_the_bare_step(tmp_path):
    """scripts/gpu_targets.py (made for an accelerator) on a tiny model on CPU: its report's numbers and ratio."""
    import statistics

    import jax

    from helpers import ROOT

    targets = load_script("gpu_targets")
    out, workdir = tmp_path / "report.json", tmp_path / "run"
    argv = ["--model", "nf_resnet_small", "--config", str(ROOT / "configs" / "nf_resnet50.py"), "--image-size", "16"]
    argv += ["--batch", "8", "--dtype", "float32", "--steps", "1", "--warmup", "1", "--train-steps", "30"]
    assert targets.main(argv + ["--log-every", "10", "--no-timm", "--workdir", str(workdir), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["jax_device"] == jax.devices()[0].device_kind and report["timm_img_per_s"] is None
    intervals = report["trainer_intervals_img_per_s"]
    assert len(intervals) == 3 and report["trainer_img_per_s"] == statistics.median(intervals[1:])
    ratio = report["trainer_img_per_s"] / report["bare_step_img_per_s"]
    assert report["trainer_over_bare"] == pytest.approx(ratio) and ratio > 0
    assert report["trainer_target_met"] == (ratio >= 0.9)
    assert json.loads((workdir / "final_metrics.json").read_text())["finished"]
