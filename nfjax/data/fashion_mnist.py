"""Fashion-MNIST from local IDX files (e.g. Debian's ``dataset-fashion-mnist``) into a TFDS data_dir.

The Debian files hold the same images as the upstream download but are compressed differently, so their
checksums do not match the ones TFDS registers and TFDS would not accept them as its download. Instead we
parse the IDX files and write a TFDS dataset named ``fashion_mnist`` with the features, version and splits of
the registered builder. Afterwards ``tfds.builder('fashion_mnist', data_dir=...)`` and ``tfds.load`` read it
like any prepared dataset, and the pipeline reads it through the same code path as every other dataset.
"""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import numpy as np
import PIL.Image

from nfjax.data.tf_lazy import require_tfds

DEBIAN_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
EXPECTED_COUNTS = {"train": 60_000, "test": 10_000}


REINSTALL = "reinstall the files (apt-get install --reinstall dataset-fashion-mnist) or pass a good copy"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Parses an IDX file (optionally gzipped): uint8 array of the shape stored in its header. A damaged file
    (bad gzip stream, wrong magic number, fewer bytes than the header promises) is a ValueError saying so."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (EOFError, gzip.BadGzipFile, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise ValueError(f"{path} cannot be read ({type(e).__name__}: {e}); {REINSTALL}") from None
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(
            f"{path} is not an unsigned-byte IDX file (its header is {data[:4].hex() or 'empty'}, "
            f"expected 00 00 08 and a dimension count); {REINSTALL}"
        )
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise ValueError(f"{path} ends inside its IDX header; {REINSTALL}")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = 4 + 4 * ndim + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(f"{path} holds {len(data)} bytes but its IDX header {shape} needs {expected}; {REINSTALL}")
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _find_idx(source_dir: Path, stem: str) -> Path:
    for candidate in (source_dir / f"{stem}.gz", source_dir / stem):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"{source_dir / stem}.gz not found. On Debian/Ubuntu: apt-get install dataset-fashion-mnist "
        f"(files land in {DEBIAN_SOURCE_DIR}), or pass the folder holding the four IDX files."
    )


def load_idx_split(source_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28, 1], labels uint8 [N]) for 'train' or 'test' straight from the IDX files."""
    image_stem, label_stem = IDX_FILES[split]
    images = read_idx(_find_idx(Path(source_dir), image_stem))
    labels = read_idx(_find_idx(Path(source_dir), label_stem))
    if images.shape != (EXPECTED_COUNTS[split], 28, 28) or labels.shape != (len(images),):
        raise ValueError(
            f"the Fashion-MNIST {split} files in {source_dir} hold images {images.shape} and labels {labels.shape}; "
            f"expected ({EXPECTED_COUNTS[split]}, 28, 28) and ({EXPECTED_COUNTS[split]},); {REINSTALL}"
        )
    return images[..., None], labels


def prepare_fashion_mnist(data_dir: str, source_dir: str = DEBIAN_SOURCE_DIR) -> str:
    """Writes TFDS ``fashion_mnist`` into data_dir from IDX files; returns the dataset folder.

    Idempotent: when the dataset is already prepared it returns at once without reading anything.
    """
    command = f"python -m nfjax.data.prepare fashion_mnist --data-dir {data_dir}"
    tfds = require_tfds(f"finding or preparing fashion_mnist in {data_dir} (it holds no array cache; `{command}`)")
    data_dir = os.path.expanduser(data_dir)
    registered = tfds.builder("fashion_mnist", data_dir=data_dir, try_gcs=False)
    if registered.is_prepared():
        return str(registered.data_dir)
    return store_fashion_mnist(data_dir, {name: load_idx_split(source_dir, name) for name in IDX_FILES})


def store_fashion_mnist(data_dir: str, splits: dict[str, tuple[np.ndarray, np.ndarray]]) -> str:
    """Writes ``splits`` (name -> (images uint8 [N, 28, 28, 1], labels [N])) as TFDS ``fashion_mnist`` with the
    registered builder's features and version into ``data_dir``; returns the dataset folder. The split sizes are
    those of the arrays, so a variant (e.g. a training split with some classes cut down) reads like the original."""
    tfds = require_tfds(f"writing fashion_mnist in {data_dir}")
    data_dir = os.path.expanduser(data_dir)
    registered = tfds.builder("fashion_mnist", data_dir=data_dir, try_gcs=False)
    for name, (images, labels) in splits.items():
        if images.dtype != np.uint8 or images.shape[1:] != (28, 28, 1) or len(labels) != len(images):
            raise ValueError(
                f"split {name!r}: images {images.dtype} {images.shape} and labels {labels.shape}; "
                "fashion_mnist takes uint8 images [N, 28, 28, 1] and N labels"
            )

    def examples(images: np.ndarray, labels: np.ndarray):
        for i in range(len(labels)):
            yield i, {"image": _png(images[i]), "label": int(labels[i])}

    info = registered.info  # the registered features/version, so the registered builder can read the result
    builder = tfds.dataset_builders.store_as_tfds_dataset(
        name="fashion_mnist",
        version=str(registered.version),
        features=info.features,
        split_datasets={name: examples(*arrays) for name, arrays in splits.items()},
        data_dir=data_dir,
        description=info.description,
        homepage=info.homepage,
        citation=info.citation,
        download_config=tfds.download.DownloadConfig(try_download_gcs=False),
    )
    return str(builder.data_dir)


def _png(image: np.ndarray) -> bytes:
    """One uint8 [28, 28, 1] image as PNG bytes, encoded here rather than by TFDS: its encoder runs one eager
    TensorFlow op per image, half of the preparation's time. PNG is lossless, so the stored pixels are the same."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image[..., 0]).save(buffer, format="PNG")
    return buffer.getvalue()
