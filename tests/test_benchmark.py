"""The training-step benchmark, run in-process on a tiny model (no timing assertions)."""

import json

import pytest

from nfjax.benchmark import main
from nfjax.benchmark_train import timm_name


def test_train_benchmark_json_report(capsys):
    argv = ["train", "--model", "nf_resnet_small", "--image-size", "32", "--batch", "8"]
    result = main(argv + ["--warmup", "1", "--steps", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(json.dumps(result))
    assert (report["model"], report["image_size"], report["batch"]) == ("nf_resnet_small", 32, 8)
    assert report["lowering"] == "split"  # auto on CPU: the CPU lowerings
    assert report["nfjax_over_timm"] is None
    (row,) = report["rows"]
    assert row["impl"] == "nfjax"
    for key in ("compile_s", "step_s", "step_cpu_s", "img_per_s", "gflop_per_s"):
        assert row[key] > 0, key
    assert len(row["step_times_s"]) == 1
    assert row["step_s"] == pytest.approx(row["step_times_s"][0])
    assert row["img_per_s"] == pytest.approx(8 / row["step_s"])
    gflop = 3 * 2 * report["forward_gmacs_per_image"] * 8
    assert report["train_gflop_per_step"] == pytest.approx(gflop)
    assert row["gflop_per_s"] == pytest.approx(gflop / row["step_s"])
    assert report["forward_gmacs_per_image"] > 0.01


def test_unknown_model_lists_valid_names(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "nfnet_x"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown model 'nfnet_x'" in err
    assert "nfnet_f0" in err and "resnet50" in err


def test_timm_names():
    assert timm_name("nfnet_f0") == "dm_nfnet_f0"
    assert timm_name("resnet50") == "resnet50"
    assert timm_name("nf_resnet50") == "nf_resnet50"
    assert timm_name("nfnet_f0plus") is None
    assert timm_name("nf_resnet_small") is None
