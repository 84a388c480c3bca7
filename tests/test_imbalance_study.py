"""scripts/fmnist_imbalance.py on tiny settings: the imbalanced split it writes, one training run, the report."""

import json

import numpy as np
import pytest

from helpers import load_script


@pytest.fixture(scope="module")
def study():
    return load_script("fmnist_imbalance")


def test_imbalanced_indices_keep_the_fraction_of_the_cut_classes_and_all_others(study):
    labels = np.repeat(np.arange(4), [100, 40, 100, 7])
    kept = study.imbalanced_indices(labels, [0, 3], 0.05, seed=1)
    assert np.all(np.diff(kept) > 0)  # sorted, no repeats
    assert np.bincount(labels[kept], minlength=4).tolist() == [5, 40, 100, 0]  # round(0.05 * 7) = 0
    assert np.array_equal(kept, study.imbalanced_indices(labels, [0, 3], 0.05, seed=1))
    assert not np.array_equal(kept, study.imbalanced_indices(labels, [0, 3], 0.05, seed=2))


def test_the_study_trains_a_variant_and_reports_macro_f1(study, tmp_path, capsys):
    out = tmp_path / "study"
    args = ["--out", str(out), "--classes", "2,6", "--fraction", "0.1", "--variants", "weighted"]
    args += ["--train-limit", "600", "--test-limit", "200", "--"]
    args += ["--config.model.kwargs.widths=(8,16,16)", "--config.model.kwargs.stem_width=8"]
    args += ["--config.train.total_steps=2", "--config.train.global_batch=32", "--config.optim.warmup_epochs=0"]
    args += ["--config.train.eval_batch=200"]
    assert study.main(args) == 0
    subset = json.loads((out / "data" / "subset.json").read_text())
    labels = study.load_idx_split(study.DEBIAN_SOURCE_DIR, "train")[1][:600]
    expected = np.bincount(labels, minlength=10)
    expected[[2, 6]] = np.round(0.1 * expected[[2, 6]])
    assert subset["train_counts"] == expected.tolist() and subset["test_examples"] == 200
    weights = json.loads((out / "weighted_s0" / "class_weights.json").read_text())
    counts = {row["class"]: row["count"] for row in weights["classes"]}
    assert counts["Shirt"] == expected[6]  # the run trained on the cut split, with class weights
    report = json.loads((out / "report.json").read_text())
    (row,) = report["runs"]
    eval_report = json.loads((out / "weighted_s0" / "eval_report.json").read_text())["eval"]
    assert row["macro_f1"] == eval_report["macro_f1"] and row["variant"] == "weighted"
    table = (out / "report.md").read_text()
    assert "| weighted |" in table and "recall Shirt" in table
    # a second call with other settings is refused: the runs there used the first split
    with pytest.raises(SystemExit, match="use another --out"):
        study.main(["--out", str(out), "--fraction", "0.2", "--report-only"])
