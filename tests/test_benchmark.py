"""The benchmarks, run in-process on tiny inputs (no timing assertions): the training step on a tiny model, and
the parts of the grain comparison that run without grain."""

import json
import sys

import jax
import numpy as np
import pytest

from nfjax import benchmark, benchmark_grain
from nfjax.benchmark import main
from nfjax.benchmark_grain import (
    GRAIN_INSTALL_HINT,
    CropFlipNormalize,
    GrainSpec,
    check_resume,
    distorted_box_window,
    grain_builders,
)
from nfjax.benchmark_memory import format_memory_report
from nfjax.benchmark_train import timm_name
from nfjax.data import augment
from nfjax.data.tf_lazy import import_tf
from nfjax.models import onednn


def test_train_benchmark_json_report(capsys):
    argv = ["train", "--model", "nf_resnet_small", "--image-size", "32", "--batch", "8"]
    result = main(argv + ["--warmup", "1", "--steps", "1", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(json.dumps(result))
    assert (report["model"], report["image_size"], report["batch"]) == ("nf_resnet_small", 32, 8)
    # auto: per backend; on CPU oneDNN's convolutions where they load (the step runs on one device)
    on_cpu = "onednn" if onednn.available() else "split"
    assert report["lowering"] == (on_cpu if report["backend"] == "cpu" else "native")
    assert report["onednn"] == (onednn.version() if report["lowering"] == "onednn" else None)
    assert report["nfjax_over_timm"] is None
    (row,) = report["rows"]
    assert row["impl"] == "nfjax"
    for key in ("compile_s", "step_s", "step_cpu_s", "img_per_s", "gflop_per_s"):
        assert row[key] > 0, key
    assert isinstance(row["page_faults"], int) and row["page_faults"] >= 0
    assert report["huge_pages"].startswith(("on (", "off ("))  # this process was not restarted: off, or THP always
    assert report["heap"].startswith(("kept (", "glibc's default ("))
    assert len(row["step_times_s"]) == 1
    assert row["step_s"] == pytest.approx(row["step_times_s"][0])
    assert row["img_per_s"] == pytest.approx(8 / row["step_s"])
    gflop = 3 * 2 * report["forward_gmacs_per_image"] * 8
    assert report["train_gflop_per_step"] == pytest.approx(gflop)
    assert row["gflop_per_s"] == pytest.approx(gflop / row["step_s"])
    assert report["forward_gmacs_per_image"] > 0.01


def test_eval_benchmark_times_the_step_evaluation_runs(capsys):
    """The eval row times the step evaluate and predict run per batch: on kernels standardized once."""
    from nfjax.benchmark_train import build_benchmark_experiment, build_jax_step

    step, state, batch = build_jax_step("nf_resnet_small", 32, 8, "float32", "eval")
    exp, raw, _ = build_benchmark_experiment("nf_resnet_small", 32, 8)
    kernel = lambda params: params["stem_conv"]["kernel"]
    assert not np.allclose(kernel(state["params"]), kernel(raw["params"]))  # standardized, not the raw kernel
    per_call = exp.eval_step(raw["params"], {}, batch)  # standardizes inside, as before
    once = step(state["params"], {}, batch)
    np.testing.assert_allclose(once["loss"], per_call["loss"], rtol=1e-5)
    argv = ["train", "--model", "nf_resnet_small", "--image-size", "32", "--batch", "8", "--step", "eval"]
    (row,) = main(argv + ["--warmup", "1", "--steps", "1", "--json"])["rows"]
    assert row["img_per_s"] > 0


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


def test_compare_grain_without_grain_is_one_line(monkeypatch, capsys):
    """grain is optional (not in the test extra): --compare-grain without it exits with the install hint,
    before any file is written."""
    monkeypatch.setitem(sys.modules, "grain", None)  # `import grain` raises ImportError
    monkeypatch.setattr(benchmark, "make_synthetic_jpegs", lambda *a, **k: pytest.fail("files were written"))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--compare-grain"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {GRAIN_INSTALL_HINT}")
    assert "\n" not in GRAIN_INSTALL_HINT and "pip install grain" in GRAIN_INSTALL_HINT


def test_compare_grain_needs_crop_flip_on_files(monkeypatch, capsys):
    monkeypatch.setattr(benchmark_grain, "grain_missing_message", lambda: None)
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "--compare-grain", "--preset", "nfnet"])
    assert exit_info.value.code == 2 and "--preset crop_flip" in capsys.readouterr().err


def test_distorted_box_window_matches_tf_sampler():
    """The NumPy port draws windows like augment.sample_crop_window (same distribution, other random numbers)."""
    tf = import_tf()
    height, width, size = 375, 500, 224
    rng = np.random.default_rng(0)
    ours = np.array([distorted_box_window(height, width, size, rng) for _ in range(2000)])
    sample = tf.function(lambda seed: tf.stack(augment.sample_crop_window(tf.constant([height, width, 3]), seed, size)))
    theirs = np.array([sample(tf.constant([3, i], tf.int64)).numpy() for i in range(1000)])
    assert (ours[:, :2] >= 0).all() and (ours[:, 0] + ours[:, 2] <= height).all()
    assert (ours[:, 1] + ours[:, 3] <= width).all()
    for windows in (ours, theirs):
        area, aspect = windows[:, 2] * windows[:, 3] / (height * width), windows[:, 3] / windows[:, 2]
        assert area.min() >= augment.RRC_MIN_OBJECT_COVERED
        assert 3 / 4 - 0.01 <= aspect.min() and aspect.max() <= 4 / 3 + 0.01
    area = lambda w: np.mean(w[:, 2] * w[:, 3]) / (height * width)
    aspect = lambda w: np.mean(w[:, 3] / w[:, 2])
    assert area(ours) == pytest.approx(area(theirs), abs=0.03)  # both about 0.39, standard error 0.008
    assert aspect(ours) == pytest.approx(aspect(theirs), abs=0.02)  # both about 1.04
    # No box can cover 10% of a 20 x 2000 strip: both fall back to the same centred square.
    fallback = augment.sample_crop_window(tf.constant([20, 2000, 3]), tf.constant([3, 0], tf.int64), size)
    assert distorted_box_window(20, 2000, size, rng) == tuple(int(v) for v in fallback)


def test_grain_crop_flip_is_a_function_of_the_generator(tmp_path):
    from PIL import Image

    path = tmp_path / "image.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), np.uint8)).save(path)
    transform = CropFlipNormalize(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    first = transform((str(path), 3), np.random.default_rng(5))
    again = transform((str(path), 3), np.random.default_rng(5))
    np.testing.assert_array_equal(first["image"], again["image"])
    assert first["image"].shape == (32, 32, 3) and first["image"].dtype == np.float32 and first["label"] == 3
    assert -1.0 <= first["image"].min() and first["image"].max() <= 1.0  # uint8 pixels normalized to [-1, 1]


def test_grain_pipeline_resumes_exactly(tmp_path):
    pytest.importorskip("grain")  # not installed in CI
    root = benchmark.make_synthetic_jpegs(tmp_path, num_images=12, num_classes=2)
    files = sorted(str(p) for p in root.glob("*/*.jpg"))
    spec = GrainSpec(files, [int("class_1" in f) for f in files], batch=4, size=16, mean=(0.5,) * 3, std=(0.5,) * 3)
    build = grain_builders(spec, workers=(0,))["grain_w0"]
    assert check_resume(build, skip=4, compare=3)  # crosses the end of the 12-file epoch


def test_rounds_alternate_the_implementations_after_every_warm_up():
    from types import SimpleNamespace

    from nfjax.benchmark_train import Runner, time_rounds

    calls = []
    runners = [Runner(name, lambda name=name: calls.append(name) or 1.0, {}) for name in ("nfjax", "timm")]
    time_rounds(runners, SimpleNamespace(warmup=1, steps=2, rounds=3))
    assert calls == ["nfjax", "timm"] + ["nfjax", "nfjax", "timm", "timm"] * 3
    for runner in runners:
        row = runner.row()
        assert len(row["step_times_s"]) == 6 and row["loss"] == 1.0  # warm-up steps are not timed


def test_bad_rounds_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "nf_resnet_small", "--rounds", "0"])
    assert exit_info.value.code == 2
    assert "--rounds=0 is invalid: it must be at least 1" in capsys.readouterr().err


def test_lowering_onednn_where_it_cannot_load_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(onednn, "_load", lambda: (None, "no C++ compiler (c++) on PATH; install ..."))
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", "nf_resnet_small", "--lowering", "onednn"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--lowering onednn: oneDNN convolutions are unavailable: no C++ compiler" in err


@pytest.mark.parametrize("flag", ["--batch", "--image-size", "--steps"])
def test_train_benchmark_sizes_that_cannot_run_are_one_line(capsys, flag):
    with pytest.raises(SystemExit) as exit_info:  # --batch 0 was a traceback, --image-size 0 a nonsense number
        main(["train", "--model", "nf_resnet_small", flag, "0"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {flag}=0 is invalid: it must be at least 1")


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--num-images", "8", "--batch", "16"], "--num-images=8 is smaller than --batch=16"),
        (["--batch", "0"], "--batch=0 is invalid"),
        (["--warmup", "-1"], "--warmup=-1 is invalid"),
    ],
)
def test_data_benchmark_sizes_that_cannot_run_are_one_line(monkeypatch, capsys, flags, message):
    monkeypatch.setattr(benchmark, "make_synthetic_jpegs", lambda *a, **k: pytest.fail("files were written"))
    with pytest.raises(SystemExit) as exit_info:
        main(["data", *flags])
    assert exit_info.value.code == 2  # usage and one error line, as `benchmark train` and `memory` give
    assert message in capsys.readouterr().err.splitlines()[-1]


def test_torch_device_follows_jax_and_refuses_a_missing_gpu():
    from types import SimpleNamespace

    from nfjax.benchmark_train import torch_device

    def args(choice):
        def error(message):
            raise SystemExit(message)

        return SimpleNamespace(torch_device=choice, error=error)

    torch_with = lambda gpu: SimpleNamespace(cuda=SimpleNamespace(is_available=lambda: gpu))
    assert jax.default_backend() == "cpu"
    assert torch_device(args("auto"), torch_with(True)) == "cpu"  # JAX on the CPU: timm on the CPU too
    assert torch_device(args("cuda"), torch_with(True)) == "cuda"
    assert torch_device(args("cpu"), torch_with(False)) == "cpu"
    with pytest.raises(SystemExit, match="sees no GPU"):
        torch_device(args("cuda"), torch_with(False))
