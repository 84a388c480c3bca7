"""The builders the trainer calls: dataset_info, build_train_iterator, build_eval_iterator.

Backend choice (config ``backend``): 'numpy' runs the in-memory NumPy path (small images; pad-crop and flip
only); 'tfdata' runs tf.data (any augmentation, any size); 'auto' picks 'numpy' when the split fits in
memory (``cache_in_memory``/``max_in_memory_bytes``) and every requested augmentation has a NumPy version.
The NumPy path (train and eval) imports no TensorFlow: with a TFDS split in the array cache
(nfjax/data/array_cache.py) or synthetic data it runs where TensorFlow is not installed.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from nfjax.data import array_cache, numpy_backend, sharding, tfdata_backend
from nfjax.data.config import check_data_config, mean_std
from nfjax.data.folds import eval_source, train_source
from nfjax.data.mix import mix_batch, mix_rng, needs_label_probs, randaugment_after_mix
from nfjax.data.sources import ImageFolderSource, SourceInfo
from nfjax.data.synthetic import SYNTHETIC
from nfjax.data.tf_lazy import require_tf, tf_installed


class DatasetInfo(NamedTuple):
    """What the trainer needs to size the model and the schedule; read from metadata only."""

    num_train_examples: int
    num_eval_examples: int
    num_classes: int
    image_shape: tuple[int, int, int]  # (H, W, C) of train batches, after grayscale->RGB if configured
    class_names: tuple[str, ...]


def source_info(source, cfg, train: bool = True) -> SourceInfo:
    """``source.info()``; when the native size is needed (no image_size set) and the source is an image
    folder, H and W come from its image headers (read once, cached): every image must share one size."""
    info = source.info()
    requested = cfg.image_size if train else (cfg.eval_image_size or cfg.image_size)
    if requested is None and info.image_shape[0] is None and isinstance(source, ImageFolderSource):
        info = dataclasses.replace(info, image_shape=(*source.common_image_size(), info.image_shape[-1]))
    return info


def _native_size(cfg, info: SourceInfo) -> int | None:
    """The stored side length of square images; None when sizes vary; ValueError for non-square ones."""
    height, width = info.image_shape[:2]
    if height != width:
        raise ValueError(
            f"images of '{cfg.dataset}' are {height}x{width} (height x width), not square: set data.image_size "
            f"(e.g. --config.data.image_size={min(height, width)})"
        )
    return None if height is None else int(height)


def _train_size(cfg, info: SourceInfo) -> int:
    size = cfg.image_size or _native_size(cfg, info)
    if size is None:
        raise ValueError(
            f"images of '{cfg.dataset}' vary in size: set data.image_size (e.g. --config.data.image_size=224)"
        )
    return int(size)


def _eval_size(cfg, info: SourceInfo) -> int | None:
    return cfg.eval_image_size or cfg.image_size or _native_size(cfg, info)


def batch_image_shape(cfg, info: SourceInfo, train: bool = True) -> tuple[int, int, int]:
    """(H, W, C) of the images in train (or eval) batches."""
    size = _train_size(cfg, info) if train else _eval_size(cfg, info)
    channels = 3 if cfg.grayscale_to_rgb else info.image_shape[-1]
    return (size, size, channels)


def dataset_info(cfg) -> DatasetInfo:
    """Example counts, classes and batch image shape from the dataset's metadata (no pixel is decoded; an
    image folder without data.image_size has its image headers read once, see ``source_info``). With
    cross-validation folds (data.num_folds) the counts are those of the fold subsets, see nfjax/data/folds.py."""
    check_data_config(cfg)
    train = source_info(train_source(cfg), cfg)
    evaluation = eval_source(cfg).info()
    return DatasetInfo(
        num_train_examples=cfg.num_train_examples or train.num_examples,
        num_eval_examples=evaluation.num_examples,
        num_classes=train.num_classes,
        image_shape=batch_image_shape(cfg, train),
        class_names=train.class_names,
    )


def fits_in_memory(cfg, info: SourceInfo) -> bool:
    if cfg.cache_in_memory is not None:
        return bool(cfg.cache_in_memory)
    if cfg.dataset == SYNTHETIC:
        return True  # generated in memory, whatever its size
    return array_cache.worth_caching(info.num_examples, info.image_shape, cfg.max_in_memory_bytes)


def numpy_unsupported(cfg, info: SourceInfo, train: bool) -> list[str]:
    """Requested options the NumPy path cannot do (empty: it can run this config)."""
    native = info.image_shape[0]
    reasons = []
    if None in info.image_shape:
        reasons.append("images of varying size")
    if train and cfg.random_resized_crop:
        reasons.append("random_resized_crop")
    if train and cfg.randaugment_layers > 0:
        reasons.append("randaugment")
    if (cfg.image_size or native) != native or (not train and (_eval_size(cfg, info) != native)):
        reasons.append(f"resizing from the stored {native} px")
    if not train and cfg.eval_preprocess != "none" and (cfg.eval_image_size or cfg.image_size):
        reasons.append(f"eval_preprocess '{cfg.eval_preprocess}'")
    return reasons


def resolve_backend(cfg, info: SourceInfo, train: bool) -> str:
    """'numpy' or 'tfdata' for this config (see module docstring)."""
    if cfg.backend not in ("auto", "numpy", "tfdata"):
        raise ValueError(f"unknown data backend {cfg.backend!r}; use 'auto', 'numpy' or 'tfdata'")
    unsupported = numpy_unsupported(cfg, info, train)
    if cfg.backend == "numpy" and unsupported:
        raise ValueError(f"backend 'numpy' cannot do: {', '.join(unsupported)}; use backend 'tfdata'")
    if cfg.backend == "auto":
        return "numpy" if fits_in_memory(cfg, info) and not unsupported else "tfdata"
    return cfg.backend


def _require_tf_data(cfg, info: SourceInfo, train: bool) -> None:
    """The tf.data path imports TensorFlow: where it cannot be imported, one error saying why this config needs
    the tf.data path (the NumPy path needs no TensorFlow)."""
    reasons = numpy_unsupported(cfg, info, train)
    if not reasons and cfg.backend == "tfdata":
        reasons = ["data.backend='tfdata'"]
    elif not reasons:
        reasons = ["a split streamed from disk (data.cache_in_memory=False, or more than data.max_in_memory_bytes)"]
    require_tf(f"the tf.data {'train' if train else 'eval'} input pipeline ({', '.join(reasons)})")


def check_tensorflow_needs(cfg) -> None:
    """Where TensorFlow is not installed, a config whose train or eval input needs tf.data fails here, with the
    reason, rather than after compiling or at the first evaluation; elsewhere a no-op that imports nothing."""
    if tf_installed():
        return
    for train in (True, False):
        source = train_source(cfg) if train else eval_source(cfg)
        info = source_info(source, cfg, train)
        if resolve_backend(cfg, info, train) == "tfdata":
            _require_tf_data(cfg, info, train)


def _plan(global_batch, mesh, process_index, process_count, device_count):
    if device_count is None and mesh is not None:
        device_count = mesh.devices.size  # the batch is split over every axis of the mesh (to_global_batch)
    return sharding.make_host_plan(global_batch, process_index, process_count, device_count)


def build_train_iterator(
    cfg,
    *,
    global_batch: int,
    mesh=None,
    start_step: int = 0,
    seed: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
) -> Iterator[dict]:
    """Endless train batches from global step ``start_step`` on (exactly those an uninterrupted run yields).

    Each item: {'image': float32 [b, H, W, C], 'label': int32 [b]} plus 'label_probs' float32 [b, K] when
    mixing / smoothing / BCE targets are on; b = global_batch / process_count on the host, or global jax
    Arrays sharded over the mesh's devices (every axis) when ``mesh`` is given. ``seed`` defaults to cfg.seed.
    """
    check_data_config(cfg)
    plan = _plan(global_batch, mesh, process_index, process_count, device_count)
    seed = cfg.seed if seed is None else seed
    source = train_source(cfg)
    info = source_info(source, cfg)
    size = _train_size(cfg, info)  # checked on both paths: fails early when no size can be used
    num_examples = cfg.num_train_examples or info.num_examples
    mean, std = mean_std(cfg, info.image_shape[-1])
    if resolve_backend(cfg, info, train=True) == "numpy":
        arrays = source.load_arrays()
        probs = _balanced_probs(cfg, arrays[1], num_examples)
        batches = numpy_backend.train_batches(arrays, cfg, plan, num_examples, seed, start_step, mean, std, probs)
    else:
        _require_tf_data(cfg, info, train=True)
        stages = tfdata_backend.make_train_stages(cfg, info.image_shape[-1], size, mean, std, info.num_classes, seed)
        batches = _tfdata_train_batches(source, info, cfg, plan, num_examples, seed, start_step, stages)
        if randaugment_after_mix(cfg):  # mixed inside tf.data, before RandAugment
            return _deliver(batches, cfg.prefetch, mesh)
    if needs_label_probs(cfg):
        batches = _mixed(batches, cfg, info.num_classes, seed, start_step, plan.process_index)
    return _deliver(batches, cfg.prefetch, mesh)


def _tfdata_train_batches(
    source, info: SourceInfo, cfg, plan, num_examples, seed, start_step, stages
) -> Iterator[dict]:
    """The tf.data train path: in memory, an image folder read by index (class-balanced sampling), or streamed."""
    args = (cfg, plan, num_examples, seed, start_step, stages)
    if fits_in_memory(cfg, info):
        arrays = source.load_arrays()
        return tfdata_backend.in_memory_train_batches(arrays, *args, _balanced_probs(cfg, arrays[1], num_examples))
    if not _balanced(cfg):
        return tfdata_backend.streaming_train_batches(source, *args)
    if isinstance(source, ImageFolderSource):
        probs = _balanced_probs(cfg, source.labels, num_examples)
        return tfdata_backend.folder_train_batches(source, *args, probs)
    raise ValueError(
        f"data.balanced_sampling={cfg.balanced_sampling} draws examples by index, which the streamed TFDS split "
        f"'{cfg.dataset}' {cfg.train_split} cannot do (it is not cached in memory): set data.cache_in_memory=True "
        "if the split fits in host memory, or data.balanced_sampling=0 (train.class_weights reweighs the loss instead)"
    )


def _balanced(cfg) -> bool:
    return cfg.get("balanced_sampling", 0.0) > 0  # absent from configs saved by older runs


def _balanced_probs(cfg, labels: np.ndarray, num_examples: int) -> np.ndarray | None:
    """Per-example draw probabilities of ``data.balanced_sampling`` over the first ``num_examples`` labels (None:
    off, shuffled epochs)."""
    if not _balanced(cfg):
        return None
    return sharding.balanced_probs(labels[:num_examples], cfg.balanced_sampling)


def train_labels(cfg) -> np.ndarray:
    """int32 [N]: the labels of the training examples (the train split's first ``num_train_examples``, without
    the held-out fold when data.num_folds is set): an image folder's from its file list, an in-memory split's
    from its arrays, a streamed TFDS split's read from the records without decoding the images (with a progress
    bar)."""
    check_data_config(cfg)
    return _labels_of(cfg, train_source(cfg))  # minus the held-out fold with data.num_folds


def _labels_of(cfg, source) -> np.ndarray:
    info = source.info()
    num_examples = cfg.num_train_examples or info.num_examples
    if isinstance(source, ImageFolderSource):
        return source.labels[:num_examples]
    if fits_in_memory(cfg, info):
        return source.load_arrays()[1][:num_examples]
    return tfdata_backend.stream_labels(source, num_examples)


def train_label_counts(cfg) -> np.ndarray:
    """int64 [K]: training examples per class (see :func:`train_labels`); the split is listed once."""
    check_data_config(cfg)
    source = train_source(cfg)
    return np.bincount(_labels_of(cfg, source), minlength=source.info().num_classes).astype(np.int64)


def _mixed(batches, cfg, num_classes, seed, start_step, process_index) -> Iterator[dict]:
    for step, batch in enumerate(batches, start_step):
        yield mix_batch(batch, cfg, num_classes, mix_rng(seed, step, process_index))


def build_eval_iterator(
    cfg,
    *,
    global_batch: int,
    split: str | None = None,
    mesh=None,
    process_index: int | None = None,
    process_count: int | None = None,
    device_count: int | None = None,
) -> Iterator[dict]:
    """One pass over ``split`` (default cfg.eval_split, or the held-out fold with data.num_folds): {'image',
    'label', 'mask' float32 [b]}.

    Every example is counted exactly once (sum of 'mask' over all hosts = split size) and every host runs
    the same number of steps, ceil(largest host block / local batch); padded rows have mask 0.
    """
    plan = _plan(global_batch, mesh, process_index, process_count, device_count)
    source = eval_source(cfg, split)
    info = source_info(source, cfg, train=False)
    mean, std = mean_std(cfg, info.image_shape[-1])
    if resolve_backend(cfg, info, train=False) == "numpy":
        batches = numpy_backend.eval_batches(source.load_arrays(), cfg, plan, mean, std)
    else:
        _require_tf_data(cfg, info, train=False)
        transform = tfdata_backend.make_eval_transform(cfg, info.image_shape[-1], _eval_size(cfg, info), mean, std)
        if fits_in_memory(cfg, info):
            batches = tfdata_backend.in_memory_eval_batches(source.load_arrays(), cfg, plan, transform)
        else:
            batches = tfdata_backend.streaming_eval_batches(source, cfg, plan, info.num_examples, transform)
    return _deliver(batches, cfg.prefetch, mesh)


def close_pipeline(iterator) -> None:
    """Stops a pipeline that can be stopped (its threads or worker processes), so that nothing of it keeps
    running once its user is done with it; iterators without ``close`` are left to the garbage collector."""
    if hasattr(iterator, "close"):
        iterator.close()


def _deliver(batches: Iterator[dict], prefetch: int, mesh) -> Iterator[dict]:
    convert = None if mesh is None else (lambda batch: sharding.to_global_batch(batch, mesh))
    if prefetch <= 0:
        return batches if convert is None else map(convert, batches)
    return Prefetcher(batches, prefetch, convert)


class Prefetcher:
    """Runs an iterator (and an optional per-item transform, e.g. the host-to-device transfer) in a
    background thread, ``size`` items ahead. Errors are re-raised in the consumer; ``close()`` stops it."""

    _END = object()

    def __init__(self, iterator: Iterator, size: int, transform: Callable | None = None):
        self._iterator, self._transform = iterator, transform
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, size))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nfjax-prefetch", daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for item in self._iterator:
                if not self._put(item if self._transform is None else self._transform(item)):
                    return
        except BaseException as error:  # handed to the consumer, which re-raises it
            self._put(error)
            return
        self._put(self._END)

    def __iter__(self):
        return self

    def __next__(self):
        item = self._queue.get()
        if item is self._END:
            self._queue.put(item)  # later next() calls keep raising StopIteration
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()

    def __del__(self):
        self._stop.set()
