"""Data sources: a TFDS dataset by name, or a folder of images with one sub-folder per class.

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

from nfjax.data.config import DEFAULT_MAX_BAD_FRACTION
from nfjax.data.tf_lazy import import_tf, import_tfds

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
PREPARE_COMMAND = "python -m nfjax.data.prepare {name} --data-dir {data_dir}"
IMAGENET_STEPS = (
    "ImageNet cannot be downloaded automatically. Get ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from image-net.org, put them in {data_dir}/downloads/manual/. "
)


class DatasetNotFoundError(FileNotFoundError):
    """Raised at once (no network access, no waiting) when a dataset is not on disk."""


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Metadata of one split. image_shape is the stored (H, W, C); H and W are None when sizes vary."""

    num_examples: int
    num_classes: int
    image_shape: tuple
    class_names: tuple[str, ...]


def missing_dataset_message(name: str, data_dir: str, expected: str) -> str:
    """The error text for a dataset that is not prepared: where it was looked for, how to prepare it."""
    command = PREPARE_COMMAND.format(name=name, data_dir=data_dir)
    steps = IMAGENET_STEPS.format(data_dir=data_dir) if name.startswith("imagenet2012") else ""
    return (
        f"Dataset '{name}' is not prepared in data_dir '{data_dir}' (expected {expected}). "
        f"{steps}Prepare it with: {command}"
    )


class TfdsSource:
    """A TFDS dataset read from ``data_dir`` only: no GCS, no download."""

    def __init__(self, name: str, split: str, data_dir: str):
        self.name, self.split = name, split
        self.data_dir = os.path.expanduser(data_dir)
        self.builder = _tfds_builder(name, self.data_dir)

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
        return _load_tfds_arrays(self.name, self.split, self.data_dir)

    def _absolute_range(self, start: int, end: int):
        """A ReadInstruction for [start, end) counted inside the (possibly already sliced) split."""
        tfds = import_tfds()
        parts = tfds.core.ReadInstruction.from_spec(self.split).to_absolute(dict(self.builder.info.splits))
        if len(parts) != 1:
            raise ValueError(f"split '{self.split}' joins several splits; use a single (sliced) split")
        offset = parts[0].from_ or 0  # None means the start of the split
        return tfds.core.ReadInstruction(parts[0].splitname, from_=offset + start, to=offset + end, unit="abs")


def _tfds_builder(name: str, data_dir: str):
    tfds = import_tfds()
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


@functools.lru_cache(maxsize=4)
def _load_tfds_arrays(name: str, split: str, data_dir: str) -> tuple[np.ndarray, np.ndarray]:
    """Decodes a whole split once per process (cached: train and eval iterators share it)."""
    tfds = import_tfds()
    source = TfdsSource(name, split, data_dir)
    image_key, label_key = _supervised_keys(source.builder.info)
    ds = source.builder.as_dataset(split=split, shuffle_files=False, batch_size=-1)
    arrays = tfds.as_numpy(ds)
    images, labels = arrays[image_key], arrays[label_key].astype(np.int32)
    images.setflags(write=False)  # shared between iterators: nobody may augment it in place
    labels.setflags(write=False)
    return images, labels


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
    """The source for ``split`` of the dataset named in the data config."""
    if cfg.dataset == "image_folder":
        limit = cfg.get("max_bad_fraction", DEFAULT_MAX_BAD_FRACTION)  # absent from configs saved by older runs
        return ImageFolderSource(cfg.data_dir, split, cfg.holdout_fraction, limit)
    return TfdsSource(cfg.dataset, split, cfg.data_dir)


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
