"""k-fold cross-validation splits (data.num_folds, data.fold) on an image folder and on a TFDS split (in memory and
streamed), and the exact one-vs-rest ROC-AUC of nfjax.evaluate --roc-auc. The evaluate CLI on a cross-validation
config and with --roc-auc: tests/test_eval_metrics.py (it reuses that module's 2-step run)."""

import hashlib
import io
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from nfjax import data, train
from nfjax.data import folds
from nfjax.eval_metrics import (
    MAX_ROC_AUC_CLASSES,
    MAX_ROC_AUC_VALUES,
    add_roc_auc,
    binary_roc_auc,
    check_roc_auc_size,
    classification_report,
    format_table,
    roc_auc_report,
)

from helpers import ROOT, assert_clean_error, nf_args

CLASS_SIZES = (7, 5, 4)  # a 3-class folder: K = 3 fits every class, K = 5 does not (class_2 has 4 images)
ITERATOR_ARGS = {"device_count": 1, "process_count": 1, "process_index": 0}


def _md5(key):
    return hashlib.md5(key.encode()).hexdigest()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """root/class_<c>/im<i>.png, 8x8 random pixels; CLASS_SIZES images per class."""
    root = tmp_path_factory.mktemp("kfold_folder")
    rng = np.random.default_rng(0)
    for c, size in enumerate(CLASS_SIZES):
        (root / f"class_{c}").mkdir()
        for i in range(size):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).save(root / f"class_{c}" / f"im{i}.png")
    return root


def _folder_cfg(root, num_folds=3, fold=0, backend="numpy"):
    cfg = data.default_data_config()
    cfg.dataset, cfg.data_dir, cfg.image_size = "image_folder", str(root), None
    cfg.train_split, cfg.eval_split = "all", "holdout"
    cfg.random_resized_crop, cfg.eval_preprocess, cfg.prefetch, cfg.backend = False, "none", 0, backend
    cfg.num_folds, cfg.fold = num_folds, fold
    return cfg


def _names(source):
    return [f"{p.split('/')[-2]}/{p.split('/')[-1]}" for p in source.paths]


def test_folder_folds_partition_every_class_by_hash_rank(folder):
    everything = set(_names(data.sources.ImageFolderSource(str(folder), "all")))
    held_out = []
    for k in range(3):
        cfg = _folder_cfg(folder, fold=k)
        train_part, eval_part = set(_names(folds.train_source(cfg))), _names(folds.eval_source(cfg))
        assert train_part | set(eval_part) == everything and not train_part & set(eval_part)
        held_out.append(eval_part)
        info = data.dataset_info(cfg)
        assert (info.num_train_examples, info.num_eval_examples) == (len(train_part), len(eval_part))
    assert sorted(itertools.chain(*held_out)) == sorted(everything)  # each example in exactly one fold
    for c, size in enumerate(CLASS_SIZES):
        # rank r by md5("class/file") goes to fold r % 3, by hand
        ranked = sorted((f"class_{c}/im{i}.png" for i in range(size)), key=_md5)
        for k in range(3):
            assert sorted(n for n in held_out[k] if n.startswith(f"class_{c}/")) == sorted(ranked[k::3])
    sizes = [[sum(n.startswith(f"class_{c}/") for n in part) for part in held_out] for c in range(3)]
    assert sizes == [[3, 2, 2], [2, 2, 1], [2, 1, 1]]  # per class at most one apart
    assert _names(folds.eval_source(_folder_cfg(folder, fold=1))) == held_out[1]  # stable across calls


@pytest.mark.parametrize("backend", ["numpy", "tfdata_streaming"])
def test_folder_fold_batches_hold_the_fold(folder, backend):
    cfg = _folder_cfg(folder, fold=2, backend="tfdata" if backend.startswith("tfdata") else backend)
    cfg.cache_in_memory = False if backend == "tfdata_streaming" else None
    cfg.mean, cfg.std = (0.0,), (1 / 255,)  # identity: batches hold the stored pixels
    source = folds.eval_source(cfg)
    images, labels = source.load_arrays()
    batches = list(data.build_eval_iterator(cfg, global_batch=4, **ITERATOR_ARGS))
    real = np.concatenate([b["mask"] for b in batches]) > 0
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in batches])[real], labels)
    np.testing.assert_array_equal(np.concatenate([b["image"] for b in batches])[real], images)
    trained = next(iter(data.build_train_iterator(cfg, global_batch=4, **ITERATOR_ARGS)))
    assert trained["image"].shape == (4, 8, 8, 3)


def test_tfds_folds_in_memory_and_streamed(fmnist_dir):
    cfg = data.fashion_mnist_data_config(fmnist_dir)
    cfg.train_split, cfg.num_folds, cfg.prefetch = "train[:300]", 4, 0
    all_images, all_labels = data.sources.TfdsSource("fashion_mnist", "train[:300]", fmnist_dir).load_arrays()
    # by hand: within each class, rank r by md5("fashion_mnist/train[:300]/index") goes to fold r % 4
    expected = np.empty(300, int)
    for label in range(10):
        members = sorted(np.flatnonzero(all_labels == label), key=lambda i: _md5(f"fashion_mnist/train[:300]/{i}"))
        expected[members] = np.arange(len(members)) % 4
    seen = np.zeros(300, int)
    for k in range(4):
        cfg.fold = k
        train_part, eval_part = folds.train_source(cfg), folds.eval_source(cfg)
        np.testing.assert_array_equal(eval_part.indices, np.flatnonzero(expected == k))
        assert sorted([*train_part.indices, *eval_part.indices]) == list(range(300))
        seen[eval_part.indices] += 1
        info = data.dataset_info(cfg)
        assert (info.num_train_examples, info.num_eval_examples) == (
            300 - len(eval_part.indices),
            len(eval_part.indices),
        )
    assert (seen == 1).all()
    counts = np.array([np.bincount(all_labels[expected == k], minlength=10) for k in range(4)])
    assert (counts.max(0) - counts.min(0) <= 1).all()  # stratified
    # in memory: the fold's rows; streamed: the same examples, a host block at a time
    images, labels = eval_part.load_arrays()
    np.testing.assert_array_equal(labels, all_labels[eval_part.indices])
    streamed = list(eval_part.tf_dataset(5, 40).as_numpy_iterator())
    decoded = np.stack([np.asarray(Image.open(io.BytesIO(im))) for im, _ in streamed])
    np.testing.assert_array_equal(decoded, images[5:40, ..., 0])
    assert [int(lab) for _, lab in streamed] == list(labels[5:40])
    cfg.backend, cfg.cache_in_memory = "tfdata", False
    batches = list(data.build_eval_iterator(cfg, global_batch=32, **ITERATOR_ARGS))
    assert sum(b["mask"].sum() for b in batches) == len(labels)


@pytest.mark.parametrize(
    ("fields", "needles"),
    [
        ({"num_folds": 1}, ["data.num_folds=1", "K >= 2"]),
        ({"num_folds": -2}, ["data.num_folds=-2"]),
        ({"fold": 1}, ["data.fold=1", "data.num_folds >= 2"]),
        ({"num_folds": 3, "fold": 3}, ["data.fold=3", "0 ... 2"]),
        ({"num_folds": 5, "fold": 0}, ["data.num_folds=5", "class_2", "<= 4"]),
    ],
)
def test_bad_fold_fields_are_one_clear_error(folder, fields, needles):
    cfg = _folder_cfg(folder, **{"num_folds": 0, **fields})
    with pytest.raises(ValueError) as error:
        data.dataset_info(cfg)
    assert all(needle in str(error.value) for needle in needles), error.value


def test_train_cli_refuses_a_bad_fold(fmnist_dir, tmp_path, capsys):
    code = train.main(nf_args(fmnist_dir, tmp_path / "run", "--config.data.num_folds=4", "--config.data.fold=4"))
    assert_clean_error(code, capsys.readouterr().err, "data.fold=4", "0 ... 3")
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------- ROC-AUC


def test_binary_auc_by_hand_with_ties():
    # positives 0.4 and 0.8; negatives 0.1, 0.35, 0.4: 0.4 beats two and ties one (1/2), 0.8 beats three
    scores, positive = np.array([0.1, 0.4, 0.35, 0.8, 0.4]), np.array([0, 1, 0, 1, 0])
    assert binary_roc_auc(scores, positive) == pytest.approx(5.5 / 6)
    assert binary_roc_auc(scores, np.zeros(5)) is None and binary_roc_auc(scores, np.ones(5)) is None


def test_ovr_auc_by_hand_and_a_missing_class():
    probs = np.array([[0.7, 0.2, 0.1, 0.0], [0.2, 0.5, 0.3, 0.0], [0.5, 0.5, 0.0, 0.0], [0.1, 0.1, 0.8, 0.0]])
    labels = np.array([0, 1, 1, 2])  # class 3 has no example
    auc = roc_auc_report(probs, labels)
    # class 0: its positive 0.7 outscores 0.2, 0.5, 0.1; class 1: 0.5, 0.5 outscore 0.2, 0.1; class 2: 0.8
    # outscores 0.1, 0.3, 0.0; class 3: no positive, undefined
    assert auc["per_class_roc_auc"] == [1.0, 1.0, 1.0, None]
    assert auc["macro_roc_auc"] == 1.0 and auc["weighted_roc_auc"] == 1.0
    probs[0, 1] = 0.5  # a negative of class 1 now ties both positives: (1/2 + 1/2 + 1 + 1) / 4
    auc = roc_auc_report(probs, labels)
    assert auc["per_class_roc_auc"][1] == pytest.approx(3 / 4)
    assert auc["macro_roc_auc"] == pytest.approx((1 + 0.75 + 1) / 3)  # class 3 left out of the mean
    assert auc["weighted_roc_auc"] == pytest.approx((1 * 1 + 0.75 * 2 + 1 * 1) / 4)
    report = add_roc_auc(classification_report({"confusion": np.eye(4, dtype=int)}, "abcd"), auc)
    assert [r["roc_auc"] for r in report["per_class"]] == auc["per_class_roc_auc"]
    rows = format_table(report).splitlines()
    assert rows[0].split()[-1] == "roc_auc" and rows[4].split()[-1] == "-" and rows[2].split()[-1] == "0.7500"


def test_ovr_auc_equals_the_pairwise_count_on_random_data():
    rng = np.random.default_rng(3)
    n, k = 300, 5
    probs = np.round(rng.dirichlet(np.ones(k), n), 1)  # rounded: many tied scores
    labels = rng.integers(0, k, n)
    auc = roc_auc_report(probs, labels)
    for c in range(k):
        pos, neg = probs[labels == c, c], probs[labels != c, c]
        wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        assert auc["per_class_roc_auc"][c] == pytest.approx(wins / (len(pos) * len(neg)), abs=1e-12)
    assert auc["macro_roc_auc"] == pytest.approx(np.mean(auc["per_class_roc_auc"]), abs=1e-12)


def test_roc_auc_size_limits():
    check_roc_auc_size(MAX_ROC_AUC_CLASSES, 50_000)  # ImageNet's validation split fits
    with pytest.raises(ValueError, match="classes exceed"):
        check_roc_auc_size(MAX_ROC_AUC_CLASSES + 1, 10)
    with pytest.raises(ValueError, match="--split"):
        check_roc_auc_size(10, MAX_ROC_AUC_VALUES // 10 + 1)


def test_fold_note_and_split_name():
    cfg = data.fashion_mnist_data_config()
    assert data.fold_note(cfg, 60_000, 10_000) is None and data.eval_split_name(cfg) == "test"
    cfg.num_folds, cfg.fold = 5, 2
    assert data.eval_split_name(cfg) == "train fold 2 of 5"
    assert data.fold_note(cfg, 48_000, 12_000) == (
        "cross-validation: training on train minus fold 2 of 5 (48000 examples); evaluating on that fold (12000 "
        "examples) instead of data.eval_split='test'. Evaluate a held-out test split afterwards with: "
        "python -m nfjax.evaluate --workdir DIR --split SPLIT (e.g. --split test if that split exists)"
    )


def test_a_fold_run_never_reads_the_unused_eval_split(folder):
    """The folder has no 'validation' split (only class folders): with folds, evaluation reads a fold of the train
    split, so nothing may try to open data.eval_split (the default 'validation' would be refused)."""
    cfg = _folder_cfg(folder)
    cfg.eval_split = "validation"
    assert data.bad_files(cfg) == []
    assert data.dataset_info(cfg).num_eval_examples == 3 + 2 + 2  # ceil(n / 3) of the 7, 5, 4 images per class
    cfg.num_folds, cfg.fold = 0, 0
    with pytest.raises(ValueError, match="got validation"):
        data.bad_files(cfg)


def test_cv_summary_script(tmp_path):
    """scripts/cv_summary.py: mean and sample std of the fold runs' final metrics, by hand."""
    script = ROOT / "scripts" / "cv_summary.py"
    for k, (top1, loss) in enumerate([(0.8, 0.5), (0.9, 0.3), (0.7, 0.4)]):
        (tmp_path / str(k)).mkdir()
        final = {"step": 6, "eval": {"top1": top1, "loss": loss, "examples": 100}, "eval_ema": {"top1": top1 / 2}}
        (tmp_path / str(k) / "final_metrics.json").write_text(json.dumps(final))
    runs = [str(tmp_path / str(k)) for k in range(3)]
    done = subprocess.run([sys.executable, str(script), *runs], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout)
    assert result["steps"] == [6, 6, 6]
    assert result["eval"]["top1"]["mean"] == pytest.approx(0.8)
    assert result["eval"]["top1"]["std"] == pytest.approx(0.1)  # sqrt((0.01 + 0.01 + 0) / 2)
    assert result["eval"]["loss"]["std"] == pytest.approx(0.1) and result["eval"]["examples"]["std"] == 0
    assert result["eval_ema"]["top1"]["mean"] == pytest.approx(0.4)
    missing = subprocess.run([sys.executable, str(script), str(tmp_path / "nope")], capture_output=True, text=True)
    assert missing.returncode == 2 and "final_metrics.json not found" in missing.stderr
    final["finished"] = False  # e.g. stopped by SIGTERM or train.max_steps: its metrics are not the final ones
    (tmp_path / "2" / "final_metrics.json").write_text(json.dumps(final))
    stopped = subprocess.run([sys.executable, str(script), *runs], capture_output=True, text=True)
    assert stopped.returncode == 2 and "before the end of its schedule" in stopped.stderr


def test_folds_cut_the_train_part_and_leave_holdout_whole(folder):
    cfg = _folder_cfg(folder, fold=0)
    cfg.train_split, cfg.holdout_fraction = "train", 1 / 3
    holdout = set(_names(folds.eval_source(cfg, "holdout")))  # the test split, as nfjax.evaluate --split reads it
    train_part = set(_names(data.sources.ImageFolderSource(str(folder), "train", 1 / 3)))
    assert len(holdout) == 2 + 2 + 1 and not holdout & train_part  # round(n / 3) per class
    held_out = [set(_names(folds.eval_source(_folder_cfg_train(cfg, k)))) for k in range(3)]
    assert set().union(*held_out) == train_part and sum(map(len, held_out)) == len(train_part)


def _folder_cfg_train(cfg, fold):
    cfg = cfg.copy_and_resolve_references()
    cfg.fold = fold
    return cfg
