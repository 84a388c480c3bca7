"""The training-step benchmark, run in-process on a tiny model (no timing assertions)."""

import json

import pytest

from nfjax.benchmark import main
from nfjax.benchmark_memory import format_memory_report
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


def test_memory_report_counts_shard_bytes_without_allocating(capsys):
    report = main(["memory", "--model", "nf_resnet_small", "nfnet_f0", "--fsdp", "8", "--json"])
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(report))
    small, f0 = report["rows"]
    assert f0["params"] == 71_489_284  # nfnet_f0 with 1000 classes (tests/test_models.py)
    for row in (small, f0):
        dp, fsdp = row["dp"], row["fsdp"]
        assert dp["params"] == dp["ema"] == 4 * row["params"]  # float32, replicated
        assert dp["opt_state"] == 4 * row["params"] + 8  # SGD momentum, the AGC clip fraction and step count
        assert dp["params"] / 8 <= fsdp["params"] < dp["params"] / 4  # most bytes split 8 ways
    assert 0.87 < f0["saved"] < 0.875  # at most 7/8; the small leaves stay replicated
    assert "| nfnet_f0 | 71.5 |" in format_memory_report(report)


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
