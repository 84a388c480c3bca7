"""Batch inference over folders (CSV, corrupt files, flip TTA) and jax.export for serving, on a tiny BN ResNet
written as a converted-weights folder (no training, no dataset)."""

import csv
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from nfjax import export, predict
from nfjax.convert import pretrained as pt
from nfjax.inference import load_inference_model, read_image
from nfjax.models import create_model

from helpers import assert_clean_error

KWARGS = dict(widths=(8, 16, 16), stem_width=8)
CLASSES = ["cat", "dog", "bird", "fish", "frog"]
SIZE = 16


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory):
    """resnet_small with perturbed weights and BN statistics (so both matter), 16 px ImageNet-style input."""
    abstract = nnx.eval_shape(lambda: create_model("resnet_small", len(CLASSES), rngs=nnx.Rngs(0), **KWARGS))
    _, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    rng = np.random.RandomState(0)

    def draw(path, x):  # kernels ~ 1/sqrt(fan_in), BN scales and variances near 1, small biases and means
        name, shape = str(path[-1]), x.shape
        noise = rng.standard_normal(shape).astype(np.float32)
        if len(shape) > 1:
            return noise / np.sqrt(np.prod(shape[:-1]))
        return 1 + 0.2 * np.abs(noise) if "scale" in name or "var" in name else 0.1 * noise

    params = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(params))
    stats = jax.tree_util.tree_map_with_path(draw, nnx.to_pure_dict(stats))
    out = str(tmp_path_factory.mktemp("export") / "weights")
    prep = pt.preprocessing(SIZE, SIZE, resize="crop_pct", crop_pct=0.875)
    pt.save_pretrained(
        out,
        model="resnet_small",
        model_kwargs=KWARGS,
        weights=dict(params=params, batch_stats=stats),
        source=dict(kind="test"),
        prep=prep,
        class_names=CLASSES,
    )
    return out


@pytest.fixture(scope="module")
def model(weights_dir):
    return load_inference_model(weights_dir)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """20 PNG/JPEG images of assorted sizes in nested folders, one corrupt PNG and one text file."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.RandomState(1)
    for i in range(20):
        folder = root / ["", "a", "a/b"][i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = rng.randint(0, 256, (12 + i, 30 - i, 3), np.uint8)
        Image.fromarray(pixels).save(folder / f"img{i:02d}.{'jpg' if i % 4 == 0 else 'png'}")
    (root / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "a" / "b" / "notes.txt").write_text("not an image")
    return root


def read_rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def direct_logits(model, paths, flip=False):
    x = model.preprocess([read_image(str(p), model.channels) for p in paths])
    return np.asarray(model.logits(x[:, :, ::-1] if flip else x))


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_predict_folder_writes_one_row_per_readable_image(weights_dir, model, image_folder, tmp_path, capsys):
    out = tmp_path / "predictions.csv"
    args = ["--workdir", weights_dir, str(image_folder), "--out", str(out), "--top-k", "3", "--batch", "8"]
    assert predict.main(args) == 0
    err = capsys.readouterr().err
    rows = read_rows(out)
    good = [r for r in rows if not r["error"]]
    bad = [r for r in rows if r["error"]]
    assert len(good) == 20 and len(rows) == 21  # the text file is not an image: not listed at all
    assert [r["path"] for r in bad] == [str(image_folder / "a" / "broken.png")]
    assert bad[0]["class_1"] == "" and "cannot read" in bad[0]["error"]
    assert "skipped 1 unreadable file" in err and "broken.png" in err and "Traceback" not in err
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2", "class_3", "prob_3", "error"]
    probs = np.array([[float(r[f"prob_{i}"]) for i in (1, 2, 3)] for r in good])
    assert (np.diff(probs, axis=1) <= 0).all() and (probs.sum(1) <= 1 + 1e-5).all() and (probs[:, 0] < 0.99).all()
    # top-1 is the argmax of the model's logits, computed directly on the same files
    logits = direct_logits(model, [r["path"] for r in good])
    assert [r["class_1"] for r in good] == [CLASSES[i] for i in logits.argmax(-1)]
    np.testing.assert_allclose(probs[:, 0], softmax(logits).max(-1), atol=2e-6)


def test_flip_tta_averages_the_two_softmaxes(weights_dir, model, image_folder):
    paths = sorted(str(p) for p in image_folder.rglob("img*"))[:5]
    predictions, names = predict.predict_inputs(weights_dir, paths, batch=4, tta="flip")
    assert names == tuple(CLASSES) and [p.path for p in predictions] == paths
    expected = (softmax(direct_logits(model, paths)) + softmax(direct_logits(model, paths, flip=True))) / 2
    np.testing.assert_allclose(np.stack([p.probs for p in predictions]), expected, atol=1e-6)
    assert not np.allclose(expected, softmax(direct_logits(model, paths)), atol=1e-4)  # the flip changes something


# (file, its [H, W], the eval resize [H', W']): the short side to int(16 / 0.875) = 18, the long side scaled alike
CROP_CASES = [("img03.png", (15, 27), (18, 32)), ("a/img10.png", (22, 20), (20, 18))]


def five_crop_reference(model, path, hw, resized_hw):
    """float32 [5, 16, 16, 3]: the file resized as crop_pct does, then sliced by hand at the four corners and the
    center, and normalized with the contract's formula."""
    import tensorflow as tf

    image = read_image(path, 3)
    assert image.shape[:2] == hw
    scaled = tf.image.resize(image.astype(np.float32), resized_hw, method="bicubic", antialias=True).numpy()
    (h, w), s = resized_hw, SIZE
    corners = [(0, 0), (0, w - s), (h - s, 0), (h - s, w - s), ((h - s + 1) // 2, (w - s + 1) // 2)]
    prep = model.preprocessing_record()
    mean, std = np.array(prep["mean"], np.float32), np.array(prep["std"], np.float32)
    return np.stack([(scaled[t : t + s, c : c + s] - 255 * mean) / (255 * std) for t, c in corners])


@pytest.mark.parametrize("tta", ["crops5", "flip+crops5"])
def test_crop_tta_averages_the_softmax_of_the_five_crops(weights_dir, model, image_folder, tta):
    paths = [str(image_folder / name) for name, _, _ in CROP_CASES]
    predictions, _ = predict.predict_inputs(weights_dir, paths, batch=2, tta=tta)
    for prediction, (name, hw, resized_hw) in zip(predictions, CROP_CASES, strict=True):
        views = five_crop_reference(model, prediction.path, hw, resized_hw)
        # the center view is the image the model gets without TTA: the hand reference resizes as nfjax does
        np.testing.assert_allclose(views[4], direct_preprocessed(model, prediction.path), atol=1e-4)
        probs = softmax(np.asarray(model.logits(np.concatenate([views, views[:, :, ::-1]]))))  # 5 crops, 5 mirrors
        expected = probs.mean(0) if tta.startswith("flip") else probs[:5].mean(0)
        np.testing.assert_allclose(prediction.probs, expected, atol=1e-6, err_msg=name)
        assert not np.allclose(expected, probs[4], atol=1e-4)  # the corners change the center crop's probabilities


def direct_preprocessed(model, path):
    return model.preprocess([read_image(path, 3)])[0]


def test_crop_tta_needs_an_eval_resize_beyond_the_crop(weights_dir, image_folder, tmp_path, capsys):
    native = tmp_path / "native"
    shutil.copytree(weights_dir, native)
    config = json.loads((native / "config.json").read_text())
    config["data"]["eval_preprocess"] = "none"
    (native / "config.json").write_text(json.dumps(config))
    code = predict.main(["--workdir", str(native), "--tta", "crops5", str(image_folder / "img03.png")])
    assert_clean_error(code, capsys.readouterr().err, "--tta crops5", "'none'", "use --tta flip")


def test_explicit_files_print_top_k_and_an_unreadable_one_is_an_error(weights_dir, image_folder, capsys):
    path = str(image_folder / "img03.png")
    assert predict.main(["--workdir", weights_dir, "--top-k", "2", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == path and len(lines) == 3 and lines[1].split()[1] in CLASSES
    code = predict.main(["--workdir", weights_dir, path, str(image_folder / "a" / "broken.png")])
    assert_clean_error(code, capsys.readouterr().err, "broken.png")


def test_exported_model_runs_without_nfjax_on_a_new_batch_size(weights_dir, model, image_folder, tmp_path, capsys):
    out = tmp_path / "model.jax"
    assert export.main(["--workdir", weights_dir, "--out", str(out)]) == 0
    contract = json.loads((tmp_path / "model.jax.json").read_text())
    assert contract["input"]["shape"] == ["batch", SIZE, SIZE, 3] and contract["class_names"] == CLASSES
    assert contract["output"]["shape"] == ["batch", len(CLASSES)] and contract["weights"] == "params"
    assert contract["artifact_format"] == "jax" and contract["platforms"] == ["cpu"]
    assert contract["preprocessing"]["crop_pct"] == 0.875 and len(contract["preprocessing"]["mean"]) == 3
    x = model.preprocess([read_image(str(p), 3) for p in sorted(image_folder.rglob("img*"))[:7]])  # batch 7
    expected = np.asarray(model.logits(x))
    exported = jax.export.deserialize(bytearray(out.read_bytes()))
    np.testing.assert_allclose(np.asarray(exported.call(x)), expected, atol=1e-5, rtol=0)
    np.savez(tmp_path / "expected.npz", x=x, logits=expected)
    code = f"""
import sys, json, jax, numpy as np
exported = jax.export.deserialize(bytearray(open({str(out)!r}, "rb").read()))
data = np.load({str(tmp_path / "expected.npz")!r})
np.testing.assert_allclose(np.asarray(exported.call(data["x"])), data["logits"], atol=1e-5, rtol=0)
assert exported.call(data["x"][:2]).shape == (2, {len(CLASSES)})
assert "nfjax" not in sys.modules, "the exported model must not need nfjax"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


def test_saved_model_serves_the_same_logits_without_nfjax(weights_dir, model, image_folder, tmp_path, capsys):
    out = tmp_path / "serving" / "1"  # TF Serving's layout: a numbered version folder (its parent is made)
    assert export.main(["--workdir", weights_dir, "--out", str(out), "--format", "saved_model"]) == 0
    assert "signature serving_default" in capsys.readouterr().out
    assert (out / "saved_model.pb").is_file() and not (tmp_path / "serving" / "1.tmp").exists()
    contract = json.loads((tmp_path / "serving" / "1.json").read_text())
    assert contract["artifact_format"] == "saved_model" and contract["signature"] == "serving_default"
    assert contract["input"]["shape"] == ["batch", SIZE, SIZE, 3] and contract["class_names"] == CLASSES
    assert contract["output_names"] == ["logits", "probabilities"] and contract["platforms"] == ["cpu"]
    x = model.preprocess([read_image(str(p), 3) for p in sorted(image_folder.rglob("img*"))[:7]])
    np.savez(tmp_path / "expected.npz", x=x, logits=np.asarray(model.logits(x)))
    code = f"""
import sys, numpy as np, tensorflow as tf
serve = tf.saved_model.load({str(out)!r}).signatures["serving_default"]
data = np.load({str(tmp_path / "expected.npz")!r})
for n in (7, 2):  # two batch sizes through the one polymorphic signature
    out = serve(images=tf.constant(data["x"][:n]))
    np.testing.assert_allclose(out["logits"].numpy(), data["logits"][:n], atol=1e-5, rtol=0)
    e = np.exp(data["logits"][:n] - data["logits"][:n].max(-1, keepdims=True))
    np.testing.assert_allclose(out["probabilities"].numpy(), e / e.sum(-1, keepdims=True), atol=1e-6, rtol=0)
assert "nfjax" not in sys.modules, "the SavedModel must not need nfjax"
print("ok")
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "XLA_FLAGS")}
    env |= dict(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    # a second export replaces the SavedModel; a folder holding something else is never overwritten
    assert export.main(["--workdir", weights_dir, "--out", str(out), "--format", "saved_model"]) == 0
    code = export.main(["--workdir", weights_dir, "--out", str(image_folder), "--format", "saved_model"])
    assert_clean_error(code, capsys.readouterr().err, "holds no SavedModel")
    blocked = tmp_path / "expected.npz" / "serving" / "1"  # a file where a folder would have to be made
    code = export.main(["--workdir", weights_dir, "--out", str(blocked), "--format", "saved_model"])
    assert_clean_error(code, capsys.readouterr().err, "is a file, not a folder")


def test_saved_model_without_tensorflow_says_how_to_install_it(weights_dir, tmp_path, capsys, monkeypatch):
    from nfjax import saved_model

    def missing():
        raise ImportError("No module named 'tensorflow'")

    monkeypatch.setattr(saved_model, "import_tf", missing)
    code = export.main(["--workdir", weights_dir, "--out", str(tmp_path / "m"), "--format", "saved_model"])
    assert_clean_error(code, capsys.readouterr().err, "pip install tensorflow", "--format jax")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("command", ["predict", "export"])
@pytest.mark.parametrize("make", ["missing_folder", "no_checkpoint"])
def test_bad_input_is_one_clear_message(weights_dir, image_folder, tmp_path, capsys, command, make):
    workdir, inputs = weights_dir, [str(image_folder)]
    if make == "no_checkpoint":
        workdir = str(tmp_path / "run")
        os.makedirs(workdir)
        shutil.copy(os.path.join(weights_dir, "config.json"), workdir)
    else:
        inputs = [str(tmp_path / "no_such_folder")]
    if command == "predict":
        code = predict.main(["--workdir", workdir, *inputs, "--out", str(tmp_path / "p.csv")])
    else:
        code = export.main(["--workdir", workdir if make == "no_checkpoint" else inputs[0], "--out", "m.jax"])
    needle = "checkpoint" if make == "no_checkpoint" else "no_such_folder"
    assert_clean_error(code, capsys.readouterr().err, needle)
    assert not (tmp_path / "p.csv").exists()


def test_a_thousand_images_give_a_thousand_rows(weights_dir, tmp_path, capsys):
    rng = np.random.RandomState(2)
    for i in range(1000):
        folder = tmp_path / "images" / f"{i // 100}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.randint(0, 256, (8, 8, 3), np.uint8)).save(folder / f"{i}.png")
    out = tmp_path / "predictions.csv"
    assert predict.main(["--workdir", weights_dir, str(tmp_path / "images"), "--out", str(out), "--batch", "256"]) == 0
    rows = read_rows(out)
    assert len(rows) == 1000 and not any(r["error"] for r in rows) and len({r["path"] for r in rows}) == 1000
    assert "wrote 1000 predictions" in capsys.readouterr().err


def test_nf_model_is_served_on_kernels_standardized_once(tmp_path, image_folder):
    """An NF model's export and predict convolve with kernels standardized once (no rsqrt left in the served
    program) and give the logits of the per-call standardization."""
    from nfjax.inference import run_batches

    abstract = nnx.eval_shape(lambda: create_model("nf_resnet_small", len(CLASSES), rngs=nnx.Rngs(0)))
    _, params, _ = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    rng = np.random.RandomState(2)
    draw = lambda x: (rng.standard_normal(x.shape) * (0.3 if x.ndim == 1 else 1) + (x.ndim == 1)).astype(np.float32)
    params = jax.tree.map(draw, nnx.to_pure_dict(params))  # gains and biases away from 1 and 0
    out = str(tmp_path / "weights")
    prep = pt.preprocessing(SIZE, SIZE, resize="crop_pct", crop_pct=0.875)
    weights = dict(params=params, batch_stats={})
    pt.save_pretrained(
        out,
        model="nf_resnet_small",
        model_kwargs={},
        weights=weights,
        source=dict(kind="test"),
        prep=prep,
        class_names=CLASSES,
    )
    model = load_inference_model(out)
    files = [str(p) for p in sorted(image_folder.rglob("img*"))[:3]]
    x = model.preprocess([read_image(f, 3) for f in files])
    expected = np.asarray(model.logits(x))  # standardizes in the call
    exported = export.export_model(model)
    tolerance = 1e-5 * np.abs(expected).max()  # float rounding: the kernels are computed in another program
    np.testing.assert_allclose(np.asarray(exported.call(x)), expected, rtol=0, atol=tolerance)
    assert "rsqrt" not in exported.mlir_module() and "rsqrt" in jax.jit(model.logits).lower(x).as_text()
    probs = np.stack([p.probs for p in run_batches(model, files, batch=2)])
    np.testing.assert_allclose(probs, np.asarray(jax.nn.softmax(expected)), rtol=1e-5, atol=1e-6)
    from nfjax.saved_model import serving_module  # the SavedModel's function, with its weights as variables

    served = serving_module(model).serve(images=x)["logits"].numpy()
    np.testing.assert_allclose(served, expected, rtol=0, atol=tolerance)
