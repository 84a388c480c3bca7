"""k-fold cross-validation splits of ``data.train_split`` (``data.num_folds`` = K >= 2, ``data.fold`` = k).

Fold assignment, stratified and deterministic: within each class the examples are ranked by the md5 hex digest of
a key that names them, and the example of rank r goes to fold ``r % K``. Keys: an image folder's path relative to
the class root (``"cat/0001.jpg"``, the key of its 'holdout' split), a TFDS example's ``"dataset/split/index"``
(``split`` as written in data.train_split, ``index`` counted inside it), and likewise synthetic data's
``"synthetic/split/index"``. So every example lies in exactly one fold, fold sizes differ by at most one per class,
and the folds depend only on the examples, their labels and K.

With folds on, training reads ``train_split`` minus fold k and the evaluation during training reads fold k of
``train_split`` instead of ``data.eval_split`` (evaluate the held-out split afterwards with
``python -m nfjax.evaluate --workdir DIR --split test``). TFDS labels are read once per process for the
assignment: from the array cache when it holds the split, else in a pass over the split's records that decodes no
image.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
from pathlib import Path

import numpy as np

from nfjax.data import array_cache
from nfjax.data.sources import ImageFolderSource, SourceInfo, TfdsSource, make_source
from nfjax.data.synthetic import SyntheticSource
from nfjax.data.tf_lazy import import_tf, import_tfds


def folds_on(cfg) -> bool:
    """True when cross-validation folds replace the train and eval splits (configs saved before: off)."""
    return cfg.get("num_folds", 0) >= 2


def stratified_folds(keys, labels: np.ndarray, num_folds: int, class_names=()) -> np.ndarray:
    """int64 [N] fold of each example: within each class, rank r by md5(key) goes to fold r % num_folds.
    keys: N strings; labels: int [N]. ValueError when a class present has fewer than num_folds examples."""
    labels = np.asarray(labels)
    digests = np.array([hashlib.md5(key.encode()).hexdigest() for key in keys])
    folds = np.empty(len(labels), np.int64)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if len(members) < num_folds:
            name = class_names[label] if label < len(class_names) else str(label)
            raise ValueError(
                f"data.num_folds={num_folds} exceeds the {len(members)} examples of class '{name}' in "
                f"data.train_split: every fold needs every class; use data.num_folds <= {len(members)}"
            )
        ranked = members[np.argsort(digests[members], kind="stable")]
        folds[ranked] = np.arange(len(ranked)) % num_folds
    return folds


@functools.lru_cache(maxsize=8)
def _folder_folds(keys: tuple[str, ...], labels: bytes, num_folds: int, class_names: tuple) -> np.ndarray:
    """The folds of examples held in memory (an image folder's files, synthetic data): computed once per process
    for the same keys, int32 labels (as bytes, so the call is hashable), K and class names."""
    return stratified_folds(keys, np.frombuffer(labels, np.int32), num_folds, class_names)


@functools.lru_cache(maxsize=8)
def _tfds_folds(name: str, split: str, data_dir: str, num_folds: int) -> np.ndarray:
    """Labels from the array cache when it holds the split (no TensorFlow), else read from the TFDS records."""
    cached = array_cache.lookup(name, split, data_dir)
    if cached is not None:
        labels, class_names = cached.load_arrays()[1].astype(np.int64), cached.info().class_names
    else:
        source = TfdsSource(name, split, data_dir)
        labels, class_names = _tfds_labels(source), source.info().class_names
    keys = [f"{name}/{split}/{i}" for i in range(len(labels))]
    return stratified_folds(keys, labels, num_folds, class_names)


def _tfds_labels(source: TfdsSource) -> np.ndarray:
    """int64 [N] labels of the split in stored order; the image feature is not parsed."""
    tfds = import_tfds()
    label_key = source.builder.info.supervised_keys[1] if source.builder.info.supervised_keys else "label"
    ds = source.builder.as_dataset(
        split=source.split,
        shuffle_files=False,
        decoders=tfds.decode.PartialDecoding({label_key: True}),
        read_config=tfds.ReadConfig(try_autocache=False),
    )
    batches = tfds.as_numpy(ds.map(lambda ex: ex[label_key]).batch(8192))
    return np.concatenate([np.asarray(b, np.int64) for b in batches] or [np.zeros(0, np.int64)])


def fold_ids(source, cfg) -> np.ndarray:
    """int64 [N]: the fold of each example of ``source`` (a train_split source), see the module docstring."""
    if isinstance(source, ImageFolderSource):
        keys = tuple(f"{Path(p).parent.name}/{Path(p).name}" for p in source.paths)
        labels = np.asarray(source.labels, np.int32).tobytes()
        return _folder_folds(keys, labels, cfg.num_folds, tuple(source.class_names))
    if isinstance(source, SyntheticSource):
        labels = np.asarray(source.load_arrays()[1], np.int32)
        keys = tuple(f"{source.name}/{source.split}/{i}" for i in range(len(labels)))
        return _folder_folds(keys, labels.tobytes(), cfg.num_folds, tuple(source.info().class_names))
    return _tfds_folds(source.name, source.split, source.data_dir, cfg.num_folds)


def subset(source, indices: np.ndarray):
    """The examples ``indices`` (int, increasing) of ``source``, as a source of the same interface."""
    if isinstance(source, ImageFolderSource):
        part = copy.copy(source)
        part.paths, part.labels = source.paths[indices], source.labels[indices]
        return part
    return TfdsSubset(source, indices)


class TfdsSubset:
    """Some examples of a TFDS split, in stored order: ``info``/``tf_dataset``/``load_arrays`` as TfdsSource.
    ``tf_dataset(a, b)`` reads the records between the a-th and the (b-1)-th chosen example and drops the others
    before any decoding."""

    def __init__(self, source: TfdsSource, indices: np.ndarray):
        self.source, self.indices = source, np.asarray(indices, np.int64)
        self.name, self.split, self.data_dir = source.name, source.split, source.data_dir

    def info(self) -> SourceInfo:
        return dataclasses.replace(self.source.info(), num_examples=len(self.indices))

    def tf_dataset(self, start: int, end: int):
        tf = import_tf()
        chosen = self.indices[start:end]
        if len(chosen) == 0:
            return self.source.tf_dataset(0, 0)
        first, last = int(chosen[0]), int(chosen[-1]) + 1
        keep = np.zeros(last - first, bool)
        keep[chosen - first] = True
        keep = tf.constant(keep)
        records = self.source.tf_dataset(first, last).enumerate()
        return records.filter(lambda i, record: tf.gather(keep, i)).map(lambda i, record: record)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.source.load_arrays()
        return images[self.indices], labels[self.indices]


def train_source(cfg):
    """The source training reads: data.train_split, minus fold data.fold when folds are on."""
    source = make_source(cfg, cfg.train_split)
    if not folds_on(cfg):
        return source
    return subset(source, np.flatnonzero(fold_ids(source, cfg) != cfg.fold))


def eval_source(cfg, split: str | None = None):
    """The source evaluation reads: ``split``; by default data.eval_split, or fold data.fold of
    data.train_split when folds are on."""
    if split is not None or not folds_on(cfg):
        return make_source(cfg, split or cfg.eval_split)
    source = make_source(cfg, cfg.train_split)
    return subset(source, np.flatnonzero(fold_ids(source, cfg) == cfg.fold))


def eval_split_name(cfg) -> str:
    """How reports name the default eval split: data.eval_split, or e.g. 'train fold 2 of 5'."""
    if folds_on(cfg):
        return f"{cfg.train_split} fold {cfg.fold} of {cfg.num_folds}"
    return cfg.eval_split


def fold_note(cfg, num_train: int, num_eval: int) -> str | None:
    """The line the trainer prints at the start of a cross-validation run (None without folds)."""
    if not folds_on(cfg):
        return None
    return (
        f"cross-validation: training on {cfg.train_split} minus fold {cfg.fold} of {cfg.num_folds} ({num_train} "
        f"examples); evaluating on that fold ({num_eval} examples) instead of data.eval_split={cfg.eval_split!r}. "
        "Evaluate a held-out test split afterwards with: python -m nfjax.evaluate --workdir DIR --split SPLIT "
        f"(e.g. --split {cfg.eval_split} if that split exists)"
    )
