"""Per-class evaluation metrics: the report against hand-computed values, the on-device counts against NumPy on a
padded multi-device batch, the evaluate CLI's JSON, table and PNG, and the trainer's eval rows and report."""

import io
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from nfjax import data, parallel, train
from nfjax import evaluate as evaluate_lib
from nfjax.confusion_png import draw_confusion
from nfjax.eval_metrics import MAX_CONFUSION_CLASSES, SUMMARY_KEYS, class_counts, classification_report, format_table
from nfjax.metrics import read_metrics
from nfjax.runs import load_run
from nfjax.steps import apply_model

from helpers import nf_args

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# rows: true class, columns: predicted. Class 2 is never predicted, class 3 has no examples.
CONFUSION = np.array([[5, 1, 0, 0], [2, 3, 0, 1], [1, 1, 0, 0], [0, 0, 0, 0]])


def test_report_matches_hand_computed_values():
    report = classification_report({"confusion": CONFUSION}, ["a", "b", "c", "d"])
    # precision = diagonal / column sum, recall = diagonal / row sum; 0 where a sum is 0 (zero_division=0)
    precision = [5 / 8, 3 / 5, 0.0, 0.0]  # class 2 never predicted; class 3 predicted once, wrongly
    recall = [5 / 6, 3 / 6, 0.0, 0.0]  # class 3 has no examples
    f1 = [2 * p * r / (p + r) if p + r else 0.0 for p, r in zip(precision, recall, strict=True)]
    support = [6, 6, 2, 0]
    rows = report["per_class"]
    assert [r["name"] for r in rows] == ["a", "b", "c", "d"] and [r["class"] for r in rows] == [0, 1, 2, 3]
    np.testing.assert_allclose([r["precision"] for r in rows], precision)
    np.testing.assert_allclose([r["recall"] for r in rows], recall)
    np.testing.assert_allclose([r["f1"] for r in rows], f1)
    assert [r["support"] for r in rows] == support
    np.testing.assert_allclose(f1[:2], [10 / 14, 6 / 11])  # 2PR/(P+R) by hand
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        assert report[f"macro_{name}"] == pytest.approx(np.mean(values))  # all 4 classes, as scikit-learn's
        assert report[f"weighted_{name}"] == pytest.approx(np.dot(values, support) / 14)
    assert report["confusion_matrix"] == CONFUSION.tolist()
    table = format_table(report, "title")
    assert table.splitlines()[0] == "title" and "macro avg" in table and "weighted avg" in table
    assert table.splitlines()[2].split() == ["a", "0.6250", "0.8333", "0.7143", "6"]


def test_per_class_vectors_give_the_same_report():
    """Above MAX_CONFUSION_CLASSES only the diagonal, column and row sums are kept: the metrics are the same."""
    vectors = dict(true_positives=np.diag(CONFUSION), predicted=CONFUSION.sum(0), support=CONFUSION.sum(1))
    from_vectors = classification_report(vectors, ["a", "b", "c", "d"])
    from_matrix = classification_report({"confusion": CONFUSION}, ["a", "b", "c", "d"])
    assert "confusion_matrix" not in from_vectors
    assert from_vectors == {k: v for k, v in from_matrix.items() if k != "confusion_matrix"}
    assert [r["name"] for r in classification_report(vectors, ["only one"])["per_class"]] == ["0", "1", "2", "3"]


@pytest.mark.parametrize("num_classes", [7, MAX_CONFUSION_CLASSES + 1])
def test_device_counts_equal_numpy_on_a_padded_sharded_batch(num_classes):
    mesh = parallel.make_mesh(8)
    rng = np.random.default_rng(num_classes)
    n, real = 64, 51  # 13 padded examples, spread over the last devices' shards
    labels = rng.integers(0, num_classes, n).astype(np.int32)
    preds = np.where(rng.random(n) < 0.5, labels, rng.integers(0, num_classes, n)).astype(np.int32)
    mask = (np.arange(n) < real).astype(np.float32)
    labels[real:], preds[real:] = 3, 5  # padding that would be counted in cell (3, 5) if the mask were ignored
    sharding = NamedSharding(mesh, PartitionSpec("data"))
    args = [jax.device_put(x, sharding) for x in (labels, preds, mask)]
    counts = jax.device_get(jax.jit(lambda y, p, m: class_counts(y, p, m, num_classes))(*args))
    expected = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(expected, (labels[:real], preds[:real]), 1)
    if num_classes <= MAX_CONFUSION_CLASSES:
        assert counts["confusion"].dtype == jnp.int32
        np.testing.assert_array_equal(counts["confusion"], expected)
    else:
        np.testing.assert_array_equal(counts["true_positives"], np.diag(expected))
        np.testing.assert_array_equal(counts["predicted"], expected.sum(0))
        np.testing.assert_array_equal(counts["support"], expected.sum(1))


def test_png_labels_every_row_and_column(tmp_path):
    from PIL import Image

    names = [f"class {i}" for i in range(4)]
    boxes = draw_confusion(CONFUSION, names, str(tmp_path / "c.png"), "title")
    image = np.asarray(Image.open(tmp_path / "c.png").convert("L"))
    for side in ("rows", "columns"):
        assert list(boxes[side]) == names
        for x0, y0, x1, y1 in boxes[side].values():
            assert 0 <= x0 < x1 <= image.shape[1] and 0 <= y0 < y1 <= image.shape[0]
            assert image[y0:y1, x0:x1].min() < 100  # dark text is drawn there


# ------------------------------------------------------------------------------- trainer and evaluate CLI


@pytest.fixture(scope="module")
def run2(fmnist_dir, tmp_path_factory):
    """The tiny NF run of tests/helpers.py for 2 steps (same programs as test_train's), evaluated at step 2."""
    workdir = tmp_path_factory.mktemp("eval_metrics_run")
    extra = ("--config.train.max_steps=2", "--config.train.eval_every_steps=2")
    assert train.main(nf_args(fmnist_dir, workdir, *extra)) == 0
    return workdir


def test_trainer_logs_macro_f1_and_writes_the_report(run2, fmnist_dir):
    rows = [r for r in read_metrics(run2) if r["split"] == "eval"]
    assert [r["step"] for r in rows] == [2]
    assert set(SUMMARY_KEYS) <= set(rows[0]) and 0 <= rows[0]["macro_f1"] <= 1
    assert "per_class" not in rows[0] and "confusion_matrix" not in rows[0]  # rows stay small
    assert "per_class" not in json.loads((run2 / "final_metrics.json").read_text())["eval"]
    report = json.loads((run2 / "eval_report.json").read_text())
    assert report["step"] == 2 and report["split"] == "test"
    names = data.dataset_info(data.fashion_mnist_data_config(fmnist_dir)).class_names
    assert [r["name"] for r in report["eval"]["per_class"]] == list(names)
    matrix = np.array(report["eval"]["confusion_matrix"])
    assert matrix.shape == (10, 10) and matrix.sum() == 10_000 and list(matrix.sum(1)) == [1000] * 10
    assert np.trace(matrix) / 10_000 == pytest.approx(rows[0]["top1"], abs=1e-12)  # the top-1 class, exactly
    assert report["eval"]["macro_f1"] == rows[0]["macro_f1"]


def test_evaluate_cli_prints_per_class_metrics_a_table_and_a_png(run2, tmp_path, capsys):
    from PIL import Image

    png = tmp_path / "confusion.png"
    assert evaluate_lib.main(["--workdir", str(run2), "--confusion-png", str(png)]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert {"step", "split", "top1", "top5", "loss", "examples"} <= set(result)  # the keys from before
    assert set(SUMMARY_KEYS) | {"per_class", "confusion_matrix"} <= set(result)
    logged = next(r for r in read_metrics(run2) if r["split"] == "eval")
    assert result["macro_f1"] == pytest.approx(logged["macro_f1"], abs=1e-9)
    names = [r["name"] for r in result["per_class"]]
    assert sum(r["support"] for r in result["per_class"]) == result["examples"] == 10_000
    table = captured.err.splitlines()
    assert all(any(line.startswith(name + " ") for line in table) for name in names)
    assert any(line.startswith("macro avg") for line in table)

    content = png.read_bytes()
    assert content[:8] == PNG_SIGNATURE
    image = Image.open(io.BytesIO(content))
    assert image.format == "PNG" and image.size[0] > 10 * 40 and image.size[1] > 10 * 40
    # The CLI's drawing is the matrix with these class names: redrawn here, it is the same image, labels where
    # draw_confusion says (each box holds dark text).
    title = "test split, step 2, params weights: rows true, columns predicted"
    boxes = draw_confusion(result["confusion_matrix"], names, str(tmp_path / "again.png"), title)
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(tmp_path / "again.png")))
    pixels = np.asarray(image.convert("L"))
    assert list(boxes["rows"]) == list(boxes["columns"]) == names
    assert all(pixels[y0:y1, x0:x1].min() < 100 for x0, y0, x1, y1 in boxes["rows"].values())


def test_evaluate_cli_without_a_table(run2, capsys):
    assert evaluate_lib.main(["--workdir", str(run2), "--no-table"]) == 0
    captured = capsys.readouterr()
    assert "macro avg" not in captured.err and "macro_f1" in json.loads(captured.out)


def test_evaluate_flip_tta_scores_the_mean_softmax_of_each_image_and_its_mirror(run2, capsys):
    split = "test[:200]"  # 200 examples, one batch of 200 over the 8 devices
    args = ["--workdir", str(run2), "--no-table", "--split", split, "--batch", "200", "--tta", "flip", "--roc-auc"]
    assert evaluate_lib.main(args) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta"] == "flip" and result["examples"] == 200 and result["split"] == split
    # reference: the model applied to the same images and to their mirrors, the softmaxes averaged in NumPy
    run = load_run(str(run2), eval_split=split)
    (batch,) = list(data.build_eval_iterator(run.experiment.cfg.data, global_batch=200))
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])
    assert np.asarray(batch["mask"]).all()
    apply = jax.jit(lambda x: apply_model(run.experiment.graphdef, run.weights["params"], {}, x, train=False)[0])
    logits = lambda x: np.asarray(apply(x), np.float64)  # one program for the images and their mirrors
    probs = (softmax(logits(images)) + softmax(logits(images[:, :, ::-1]))) / 2
    assert result["top1"] == pytest.approx(np.mean(probs.argmax(-1) == labels), abs=1e-12)
    assert result["loss"] == pytest.approx(-np.log(probs[np.arange(200), labels]).mean(), rel=1e-5)
    top5 = np.argsort(-probs, axis=-1)[:, :5]
    assert result["top5"] == pytest.approx(np.mean((top5 == labels[:, None]).any(-1)), abs=1e-12)
    assert not np.allclose(probs, softmax(logits(images)), atol=1e-3)  # the mirror changes the probabilities
    # --roc-auc ranks the same averaged probabilities: the share of (positive, negative) pairs ordered right, between
    # the bounds where pairs closer than float32 rounding count as wrong or as right
    for row in result["per_class"]:
        pos, neg = probs[labels == row["class"], row["class"]], probs[labels != row["class"], row["class"]]
        if not len(pos):
            assert row["roc_auc"] is None
            continue
        diff = pos[:, None] - neg[None, :]
        assert np.mean(diff > 1e-6) - 1e-9 <= row["roc_auc"] <= np.mean(diff > -1e-6) + 1e-9, row
    code = evaluate_lib.main(["--workdir", str(run2), "--tta", "crops5"])
    assert code == 2 and "invalid choice: 'crops5'" in capsys.readouterr().err  # five crops: predict only


def softmax(logits):
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_evaluate_cli_on_a_cross_validation_run_and_with_roc_auc(run2, tmp_path, capsys):
    """A run whose config holds folds is evaluated on its held-out fold by default; --split names a whole split
    (folds off there), here with --roc-auc."""
    workdir = tmp_path / "cv"
    shutil.copytree(run2, workdir)
    config = json.loads((workdir / "config.json").read_text())
    config["data"].update(train_split="train[:1280]", num_folds=5, fold=2)  # fold sizes: 260, 259, 256, 253, 252
    (workdir / "config.json").write_text(json.dumps(config))
    assert evaluate_lib.main(["--workdir", str(workdir), "--no-table"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "train[:1280] fold 2 of 5" and result["examples"] == 256
    assert "macro_roc_auc" not in result and "roc_auc" not in result["per_class"][0]

    assert evaluate_lib.main(["--workdir", str(workdir), "--split", "test[:300]", "--roc-auc"]) == 0
    captured = capsys.readouterr()
    result = json.loads(captured.out)
    assert result["split"] == "test[:300]" and result["examples"] == 300
    aucs = [r["roc_auc"] for r in result["per_class"]]
    assert all(0 <= a <= 1 for a in aucs)  # every class is in test[:300]
    support = [r["support"] for r in result["per_class"]]
    assert result["macro_roc_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert result["weighted_roc_auc"] == pytest.approx(np.dot(aucs, support) / 300, abs=1e-12)
    assert any(line.split()[-1] == "roc_auc" for line in captured.err.splitlines())


@pytest.mark.parametrize("module", ["nfjax.evaluate", "nfjax.convert.__main__"])
def test_help_prints_the_usage_and_nothing_else(module, capsys):
    import importlib

    assert importlib.import_module(module).main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:") and "null" not in out
