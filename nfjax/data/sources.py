"""Data sources: a TFDS dataset by name, a folder of images with one sub-folder per class, or synthetic data.

A TFDS split that the array cache holds (nfjax/data/array_cache.py) is served from it without TensorFlow; the first
in-memory load of one that it does not hold decodes it through TFDS and writes it there.

Every source exposes the same three things, so one pipeline serves all of them:
  ``info()``            -> SourceInfo (cheap: metadata only, never reads the images);
  ``tf_dataset(a, b)``  -> tf.data.Dataset of (image, label int32) for examples [a, b) in stored order, where
                           image is the *encoded* file (JPEG/PNG bytes, decoded later so that JPEG decoding
                           can be fused with the random crop);
  ``load_arrays()``     -> (images uint8 [N, H, W, C], labels int32 [N]), the whole split decoded in memory.
An image folder's ``info()`` reports H, W = None (sizes unknown until read); ``common_image_size()`` reads the
image headers (not the pixels) when the pipeline needs the native size.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from pathlib import Path

import numpy as np

from nfjax.data import array_cache, split_spec
from nfjax.data.config import DEFAULT_MAX_BAD_FRACTION
from nfjax.data.source_info import PREPARE_COMMAND, DatasetNotFoundError, SourceInfo, missing_dataset_message
from nfjax.data.synthetic import SYNTHETIC, SyntheticSource
from nfjax.data.tf_lazy import import_tf, import_tfds, require_tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")


class TfdsSource:
    """A TFDS dataset read from ``data_dir`` only: no GCS, no download. ``purpose`` names the reading in the error
    when TensorFlow cannot be imported."""

    def __init__(self, name: str, split: str, data_dir: str, purpose: str | None = None):
        self.name, self.split = name, split
        self.data_dir = os.path.expanduser(data_dir)
        if purpose is None:
            command = PREPARE_COMMAND.format(name=name, data_dir=data_dir)
            purpose = (
                f"split '{split}' of '{name}' is not in the array cache of {data_dir}, and reading it from TFDS "
                f"(prepare the cache where TensorFlow is installed with `{command}`, then copy data_dir)"
            )
        self.builder = _tfds_builder(name, self.data_dir, purpose)

    def info(self) -> SourceInfo:
        info = self.builder.info
        image_key, label_key = _supervised_keys(info)
        label = info.features[label_key]
        return SourceInfo(
            num_examples=int(info.splits[self.split].num_examples),
            num_classes=int(label.num_classes),
            image_shape=tuple(info.features[image_key].shape),
            class_names=tuple(label.names),
        )

    def tf_dataset(self, start: int, end: int):
        """Examples [start, end) of the split, as (encoded image bytes, int32 label)."""
        tfds, tf = import_tfds(), import_tf()
        image_key, label_key = _supervised_keys(self.builder.info)
        ds = self.builder.as_dataset(
            split=self._absolute_range(start, end),
            shuffle_files=False,
            decoders={image_key: tfds.decode.SkipDecoding()},
            read_config=tfds.ReadConfig(try_autocache=False),
        )
        return ds.map(lambda ex: (ex[image_key], tf.cast(ex[label_key], tf.int32)))

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The split decoded in memory: from the array cache when it holds it, else through TFDS (which then
        writes the cache, see :func:`_load_tfds_arrays`)."""
        cached = array_cache.lookup(self.name, self.split, self.data_dir)
        if cached is not None:
            return cached.load_arrays()
        return _load_tfds_arrays(self.name, self.split, self.data_dir)

    def _absolute_range(self, start: int, end: int):
        """A ReadInstruction for [start, end) counted inside the (possibly already sliced) split."""
        tfds = import_tfds()
        parts = tfds.core.ReadInstruction.from_spec(self.split).to_absolute(dict(self.builder.info.splits))
        if len(parts) != 1:
            raise ValueError(f"split '{self.split}' joins several splits; use a single (sliced) split")
        offset = parts[0].from_ or 0  # None means the start of the split
        return tfds.core.ReadInstruction(parts[0].splitname, from_=offset + start, to=offset + end, unit="abs")


def _tfds_builder(name: str, data_dir: str, purpose: str):
    tfds = require_tfds(purpose)
    try:
        builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise DatasetNotFoundError(missing_dataset_message(name, data_dir, f"{data_dir}/{name}")) from e
    if not builder.is_prepared():
        expected = os.path.join(str(builder.data_dir), "dataset_info.json")
        raise DatasetNotFoundError(missing_dataset_message(name, data_dir, expected))
    return builder


def _supervised_keys(info) -> tuple[str, str]:
    keys = info.supervised_keys
    return (keys[0], keys[1]) if keys else ("image", "label")


def decode_tfds_split(source: TfdsSource, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, H, W, C], labels int32 [N]) of ``split`` (default: the source's) decoded by TFDS, in the
    order TFDS reads it; no cache involved."""
    tfds = import_tfds()
    image_key, label_key = _supervised_keys(source.builder.info)
    ds = source.builder.as_dataset(split=split or source.split, shuffle_files=False, batch_size=-1)
    arrays = tfds.as_numpy(ds)
    return arrays[image_key], arrays[label_key].astype(np.int32)


@functools.lru_cache(maxsize=4)
def _load_tfds_arrays(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a split through TFDS once per process (cached: train and eval iterators share it) and stores it in
    the array cache. A slice of a whole split stored in one shard (``'train[:90%]'``) decodes and stores the whole
    split, then cuts the slice from it, so every slice of it is found in the cache later; other splits (joins,
    slices of multi-shard splits) are stored under their own string."""
    source = TfdsSource(name, split, data_dir)
    whole = _whole_split_to_store(source)
    if whole is not None and whole != split:
        array_cache.store(name, source.builder.data_dir, whole, decode_tfds_split(source, whole), *_meta(source, whole))
    cached = array_cache.lookup(name, split, data_dir)
    if cached is not None:
        return cached.load_arrays()
    arrays = decode_tfds_split(source)
    for array in arrays:
        array.setflags(write=False)  # shared between iterators: nobody may augment it in place
    info = source.info()
    if array_cache.worth_caching(info.num_examples, info.image_shape):
        array_cache.store(name, source.builder.data_dir, split, arrays, info, _shard_lengths(source, split))
    return arrays


def _whole_split_to_store(source: TfdsSource) -> str | None:
    """The name of the whole split that ``source.split`` slices (itself when it is one), when it lies in one shard
    and is worth caching whole; else None."""
    piece = split_spec.parse_slice(source.split)
    if piece is None or piece.split_name not in source.builder.info.splits:
        return None
    info, shard_lengths = _meta(source, piece.split_name)
    if len(shard_lengths) != 1 or not array_cache.worth_caching(info.num_examples, info.image_shape):
        return None
    return piece.split_name


def _meta(source: TfdsSource, whole: str) -> tuple[SourceInfo, list[int]]:
    """(SourceInfo, shard lengths) of the whole split ``whole`` of the source's dataset."""
    info = dataclasses.replace(source.info(), num_examples=int(source.builder.info.splits[whole].num_examples))
    return info, _shard_lengths(source, whole)


def _shard_lengths(source: TfdsSource, split: str) -> list[int] | None:
    """The shard lengths of a whole split; None for a slice or a join (not one stored split)."""
    splits = source.builder.info.splits
    return [int(n) for n in splits[split].shard_lengths] if split in splits else None


def cache_tfds_splits(name: str, data_dir: str) -> list[str]:
    """Decodes every split of a prepared TFDS dataset that is worth caching (:func:`array_cache.worth_caching`)
    into the array cache, rewriting what is there; returns one line per split saying what was done."""
    purpose = f"writing the array cache of '{name}'"
    lines = []
    for split in _tfds_builder(name, os.path.expanduser(data_dir), purpose).info.splits:
        source = TfdsSource(name, split, data_dir, purpose)
        info = source.info()
        if not array_cache.worth_caching(info.num_examples, info.image_shape):
            limit = array_cache.MAX_CACHE_BYTES / 2**30
            lines.append(f"{split}: not cached (images of varying size, or more than {limit:g} GiB: streamed)")
            continue
        path = array_cache.store(name, source.builder.data_dir, split, decode_tfds_split(source), *_meta(source, split))
        lines.append(f"{split}: {info.num_examples} examples cached in {path}" if path else f"{split}: not written")
    return lines


class ImageFolderSource:
    """``root/<class>/*.{jpg,png}``; or ``root/<split>/<class>/*`` when a folder named after the split
    exists. Otherwise splits 'train' / 'holdout' / 'all' divide each class deterministically: files are
    ranked by a hash of their relative path and the first round(holdout_fraction * n) go to 'holdout'."""

    def __init__(
        self,
        root: str,
        split: str = "train",
        holdout_fraction: float = 0.0,
        max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION,
    ):
        """Files that cannot be used (empty, not an image, unsupported mode, truncated) are left out and listed
        in ``bad_files``; more than ``max_bad_fraction`` of them is an error naming some."""
        self.root = Path(os.path.expanduser(root))
        if not self.root.is_dir():
            raise DatasetNotFoundError(
                f"image folder '{self.root}' does not exist; expected {self.root}/<class_name>/<image>.jpg"
            )
        self.split = split
        paths, labels, self.class_names = _list_image_folder(self.root, split, holdout_fraction)
        self.bad_files = scan_image_files(tuple(paths))
        _check_bad_fraction(self.bad_files, len(paths), max_bad_fraction, self.root)
        bad = {path for path, _ in self.bad_files}
        keep = np.array([p not in bad for p in paths], bool)
        self.paths, self.labels = paths[keep], labels[keep]

    def info(self) -> SourceInfo:
        return SourceInfo(len(self.paths), len(self.class_names), (None, None, 3), self.class_names)

    def common_image_size(self) -> tuple[int, int]:
        """(H, W) shared by every image of the split, from the file headers; ValueError when sizes vary."""
        return common_image_size(tuple(self.paths))

    def tf_dataset(self, start: int, end: int):
        tf = import_tf()
        ds = tf.data.Dataset.from_tensor_slices((self.paths[start:end], self.labels[start:end]))
        return ds.map(lambda path, label: (tf.io.read_file(path), label))

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from PIL import Image

        images = [_decode_rgb(Image, p) for p in self.paths]
        if len({im.shape for im in images}) > 1:
            raise ValueError(f"images in {self.root} differ in size; use backend 'tfdata' to resize them")
        return np.stack(images), self.labels.copy()


SUPPORTED_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "I;16")  # what the decoders turn into RGB
END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}  # a file cut short lacks its end marker
TAIL_BYTES = 4096  # the end marker is searched for this far from the end (JPEGs may carry trailing bytes)


def check_image_file(path: str) -> str | None:
    """Why the image file at ``path`` cannot be used (None when it can): empty, not an image, an unsupported
    mode, or truncated. Reads the header and the last bytes only, never decodes pixels, so a folder of a million
    files is checked in minutes."""
    from PIL import Image, UnidentifiedImageError

    try:
        size = os.path.getsize(path)
        if size == 0:
            return "empty file"
        with Image.open(path) as image:
            kind, mode = image.format, image.mode
        if mode not in SUPPORTED_MODES:
            return f"unsupported image mode {mode}"
        marker = END_MARKERS.get(kind)
        if marker is not None:
            with open(path, "rb") as f:
                f.seek(max(0, size - TAIL_BYTES))
                if marker not in f.read():
                    return f"truncated {kind} (no end marker)"
    except UnidentifiedImageError:
        return "not an image"
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    return None


@functools.lru_cache(maxsize=8)
def scan_image_files(paths: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """``(path, reason)`` of every unusable file among ``paths`` (cached: a split is scanned once per process;
    a progress bar on stderr for large folders)."""
    from tqdm import tqdm

    files = tqdm(paths, desc="checking image files", unit="file", disable=len(paths) < 20_000, mininterval=5.0)
    return tuple((path, reason) for path in files if (reason := check_image_file(path)) is not None)


def _check_bad_fraction(bad: tuple[tuple[str, str], ...], total: int, limit: float, root: Path) -> None:
    if total and len(bad) > limit * total:
        named = "; ".join(f"{path} ({reason})" for path, reason in bad[:5])
        raise ValueError(
            f"{len(bad)} of {total} files in image folder {root} cannot be used ({len(bad) / total:.2%}, more than "
            f"data.max_bad_fraction={limit:g}), e.g. {named}. Fix or remove them, or raise data.max_bad_fraction."
        )


def _decode_rgb(image_module, path: str) -> np.ndarray:
    """uint8 [H, W, 3] of the file; a file damaged past what the pre-check sees is a ValueError naming it."""
    try:
        with image_module.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # PIL reports damaged data with all three
        raise ValueError(
            f"{path} cannot be decoded ({type(e).__name__}: {e}) although its header and end look intact; "
            "remove or replace it and rerun"
        ) from None


def _header_size(path: str) -> tuple[int, int]:
    """(H, W) of an image file from its header: PIL opens files lazily and decodes no pixel here."""
    from PIL import Image

    with Image.open(path) as image:
        width, height = image.size
    return height, width


@functools.lru_cache(maxsize=8)
def common_image_size(paths: tuple[str, ...]) -> tuple[int, int]:
    """(H, W) shared by the images at ``paths``, from their headers; cached, so a split is scanned once per
    process. Stops at the first image whose size differs from the first one: ValueError naming both files."""
    if not paths:
        raise ValueError("no images to take the size from")
    first = _header_size(paths[0])
    for path in paths[1:]:
        size = _header_size(path)
        if size != first:
            raise ValueError(
                f"image sizes vary: {paths[0]} is {first[0]}x{first[1]} but {path} is {size[0]}x{size[1]} "
                "(height x width); set data.image_size to resize them (e.g. --config.data.image_size=224)"
            )
    return first


def _list_image_folder(root: Path, split: str, holdout_fraction: float):
    """Returns (paths [N] str, labels int32 [N], class names) in a stable order."""
    if (root / split).is_dir():
        root, split, holdout_fraction = root / split, "all", 0.0
    if split not in ("train", "holdout", "all"):
        raise ValueError(f"image folder split must be 'train', 'holdout' or 'all' (or a sub-folder), got {split}")
    class_names = tuple(sorted(d.name for d in root.iterdir() if d.is_dir()))
    if not class_names:
        raise DatasetNotFoundError(
            f"no class sub-folders in image folder '{root}'; expected {root}/<class_name>/<image>.jpg"
        )
    paths, labels = [], []
    for label, name in enumerate(class_names):
        files = sorted(
            (p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS),
            key=lambda p: hashlib.md5(f"{name}/{p.name}".encode()).hexdigest(),
        )
        if not files:
            raise DatasetNotFoundError(
                f"class folder '{root / name}' holds no images ({', '.join(IMAGE_EXTENSIONS)}); add images to it "
                "or remove it (every sub-folder of an image folder is a class)"
            )
        num_holdout = round(holdout_fraction * len(files))
        chosen = {"train": files[num_holdout:], "holdout": files[:num_holdout], "all": files}[split]
        chosen = sorted(chosen)
        paths += [str(p) for p in chosen]
        labels += [label] * len(chosen)
    return np.array(paths), np.array(labels, np.int32), class_names


def make_source(cfg, split: str):
    """The source for ``split`` of the dataset named in the data config. A TFDS split that the array cache holds
    is served from it without importing TensorFlow (nfjax/data/array_cache.py)."""
    if cfg.dataset == "image_folder":
        limit = cfg.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)  # absent from configs saved by older runs
        return ImageFolderSource(cfg.data_dir, split, cfg.holdout_fraction, limit)
    if cfg.dataset == SYNTHETIC:
        return SyntheticSource.from_config(cfg, split)
    return tfds_source(cfg.dataset, split, cfg.data_dir)


def tfds_source(name: str, split: str, data_dir: str):
    """A CachedTfdsSource when the array cache holds ``split``, else a TfdsSource (which needs TensorFlow)."""
    cached = array_cache.lookup(name, split, data_dir)
    if cached is None:
        return TfdsSource(name, split, data_dir)
    streaming = f"streaming split '{split}' of '{name}' (the config does not keep it in memory) through TFDS"
    return array_cache.CachedTfdsSource(cached, split, lambda: TfdsSource(name, split, data_dir, streaming))


def bad_files(cfg) -> list[tuple[str, str]]:
    """``(path, reason)`` of the files left out of the train and eval splits (image folders; [] otherwise). With
    cross-validation folds (data.num_folds) evaluation reads a fold of the train split, so data.eval_split is not
    read at all."""
    if cfg.dataset != "image_folder":
        return []
    found = {}
    splits = (cfg.train_split,) if cfg.get("num_folds", 0) else (cfg.train_split, cfg.eval_split)
    for split in splits:
        found.update(make_source(cfg, split).bad_files)
    return sorted(found.items())
