"""The array cache: decoded TFDS splits as NumPy files, so that in-memory training needs no TensorFlow.

Layout, beside the TFDS files of the dataset version the arrays were decoded from:

    <data_dir>/<name>/<version>/nfjax_arrays/<split>.npz    images uint8 [N, H, W, C], labels int32 [N]
    <data_dir>/<name>/<version>/nfjax_arrays/<split>.json   the SourceInfo fields, the TFDS version, the split's
                                                            shard lengths, the sha256 of dataset_info.json

An entry is written when an in-memory load decodes a split through TFDS (``nfjax.data.sources``) and by
``python -m nfjax.data.prepare`` (every split that fits, see :func:`worth_caching`). Each file goes through a
temporary file and a rename, the JSON last: a reader sees a whole entry or none, never half of one.

:func:`lookup` finds ``split`` without importing TensorFlow: the entry stored under that exact string, else a
slice (nfjax/data/split_spec.py, TFDS's rounding) of the entry of a whole split stored in one shard. A multi-shard
split is read by TFDS in interleaved blocks, so its slices are not slices of the whole: they are found only when
stored under their own string (TFDS decoded them once). The version folder searched is the newest one on disk.

A cache that cannot be used (unreadable, not the shapes its JSON names, another format, or written before the TFDS
files beside it changed) is an :class:`ArrayCacheError` naming the file and the command that rewrites it; it is
never silently replaced, so a run cannot read other data than the cache it was started on said.
"""

from __future__ import annotations

import collections
import hashlib
import json
import math
import os
import re
import urllib.parse
import uuid
import warnings
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np

from nfjax.data import split_spec
from nfjax.data.config import DEFAULT_MAX_IN_MEMORY_BYTES
from nfjax.data.source_info import PREPARE_COMMAND, SourceInfo

CACHE_FOLDER = "nfjax_arrays"
FORMAT = 1
MAX_CACHE_BYTES = DEFAULT_MAX_IN_MEMORY_BYTES  # larger splits are streamed by default, so never cached
_VERSION_RE = re.compile(r"^\d+\.\d+\.\d+$")
_MEMO_SIZE = 4  # arrays kept per process (train and eval iterators share them)
_memo: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()


class ArrayCacheError(ValueError):
    """An array cache entry exists but cannot be used; the message names it and how to rewrite it."""


def worth_caching(num_examples: int, image_shape: tuple, limit: int = MAX_CACHE_BYTES) -> bool:
    """True for splits of fixed-size images that take at most ``limit`` bytes as uint8."""
    return None not in image_shape and num_examples * math.prod(image_shape) <= limit


def version_folder(name: str, data_dir: str) -> Path | None:
    """``<data_dir>/<name>/<version>`` for a name with ``:version``, else the newest version folder that holds a
    prepared dataset or an array cache; None when there is none. ``name`` may hold a TFDS config ('a/b')."""
    base, _, version = name.partition(":")
    root = Path(os.path.expanduser(data_dir), *base.split("/"))
    if version:
        return root / version if (root / version).is_dir() else None
    if not root.is_dir():
        return None
    found = [
        p
        for p in root.iterdir()
        if _VERSION_RE.match(p.name) and ((p / "dataset_info.json").is_file() or (p / CACHE_FOLDER).is_dir())
    ]
    return max(found, key=lambda p: tuple(int(x) for x in p.name.split(".")), default=None)


def has_cache(name: str, data_dir: str) -> bool:
    """True when the newest version folder of ``name`` holds at least one cache entry."""
    folder = version_folder(name, data_dir)
    return folder is not None and any((folder / CACHE_FOLDER).glob("*.json"))


def forget_arrays() -> None:
    """Drops this process's copies of cached arrays: the next load reads the files (as a new process would)."""
    _memo.clear()


def _entry(version_dir: Path, key: str) -> tuple[Path, Path]:
    """(arrays .npz, metadata .json) of entry ``key`` (the split string, %-escaped: 'train%5B%3A90%25%5D')."""
    stem = str(version_dir / CACHE_FOLDER / urllib.parse.quote(key, safe=""))
    return Path(stem + ".npz"), Path(stem + ".json")


def _fingerprint(version_dir: Path) -> str | None:
    """sha256 of the dataset_info.json beside the cache (None when only the cache was copied)."""
    path = version_dir / "dataset_info.json"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


# ------------------------------------------------------------------------------------------------ writing


def store(
    name: str,
    version_dir: str | os.PathLike,
    key: str,
    arrays: tuple[np.ndarray, np.ndarray],
    info: SourceInfo,
    shard_lengths: list[int] | None,
) -> Path | None:
    """Writes ``arrays`` (images uint8 [N, H, W, C], labels int32 [N]) of dataset ``name`` as entry ``key`` of the
    cache in ``version_dir`` and remembers them for this process; returns the JSON path. A folder that cannot be written
    (read-only data_dir, full disk) is a warning, not an error: the run goes on reading TFDS."""
    version_dir = Path(version_dir)
    npz, meta_path = _entry(version_dir, key)
    images, labels = arrays
    meta = dict(
        format=FORMAT,
        dataset=name,
        version=version_dir.name,
        split=key,
        num_examples=int(info.num_examples),
        num_classes=int(info.num_classes),
        image_shape=list(info.image_shape),
        class_names=list(info.class_names),
        shard_lengths=shard_lengths,
        dataset_info_sha256=_fingerprint(version_dir),
    )
    try:
        npz.parent.mkdir(parents=True, exist_ok=True)
        _write_atomically(npz, lambda f: np.savez(f, images=images, labels=labels.astype(np.int32)))
        meta["npz_bytes"] = npz.stat().st_size
        _write_atomically(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    except OSError as e:
        message = f"could not write the array cache {npz} ({e}); in-memory loads keep decoding TFDS"
        warnings.warn(message, stacklevel=2)
        return None
    _remember(str(npz), arrays)
    return meta_path


def _write_atomically(path: Path, write: Callable) -> None:
    """``write(file)`` into a temporary file beside ``path``, synced, then renamed onto ``path``."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(temporary, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _remember(key: str, arrays: tuple[np.ndarray, np.ndarray]) -> None:
    for array in arrays:
        array.setflags(write=False)  # shared between iterators: nobody may augment it in place
    _memo[key] = arrays
    _memo.move_to_end(key)
    while len(_memo) > _MEMO_SIZE:
        _memo.popitem(last=False)


# ------------------------------------------------------------------------------------------------ reading


class CachedSplit(NamedTuple):
    """Examples [start, stop) of the cache entry ``meta`` whose arrays are in ``npz``."""

    name: str
    data_dir: str
    npz: Path
    meta: dict
    start: int
    stop: int

    def info(self) -> SourceInfo:
        meta = self.meta
        return SourceInfo(
            num_examples=self.stop - self.start,
            num_classes=int(meta["num_classes"]),
            image_shape=tuple(meta["image_shape"]),
            class_names=tuple(meta["class_names"]),
        )

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [n, H, W, C], labels int32 [n]), read-only, read once per process."""
        images, labels = _read_arrays(self)
        return images[self.start : self.stop], labels[self.start : self.stop]


def lookup(name: str, split: str, data_dir: str) -> CachedSplit | None:
    """The cached examples of ``split`` (see the module docstring), or None when the cache does not hold them.
    ArrayCacheError when the entry that would serve them cannot be used."""
    version_dir = version_folder(name, data_dir)
    if version_dir is None or not (version_dir / CACHE_FOLDER).is_dir():
        return None
    npz, meta_path = _entry(version_dir, split)
    exact = _read_meta(name, data_dir, npz, meta_path)
    if exact is not None:
        return CachedSplit(name, data_dir, npz, exact, 0, int(exact["num_examples"]))
    piece = split_spec.parse_slice(split)
    if piece is None:
        return None
    npz, meta_path = _entry(version_dir, piece.split_name)
    whole = _read_meta(name, data_dir, npz, meta_path)
    if whole is None or len(whole.get("shard_lengths") or ()) != 1:
        return None
    start, stop = split_spec.absolute_bounds(piece, int(whole["num_examples"]))
    return CachedSplit(name, data_dir, npz, whole, start, stop)


def _unusable(name: str, data_dir: str, path: Path, reason: str) -> ArrayCacheError:
    command = PREPARE_COMMAND.format(name=name, data_dir=data_dir)
    return ArrayCacheError(
        f"the array cache {path} cannot be used: {reason}. Rewrite it with `{command}` (needs TensorFlow), "
        f"or delete {path.parent} to read TFDS instead"
    )


def _read_meta(name: str, data_dir: str, npz: Path, path: Path) -> dict | None:
    """The JSON of a cache entry (None when there is none) after checking that the entry can be used."""
    if not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text())
        fields = [meta[k] for k in ("num_examples", "num_classes", "image_shape", "class_names", "npz_bytes")]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _unusable(name, data_dir, path, f"unreadable ({type(e).__name__}: {e})") from None
    if meta.get("format") != FORMAT:
        raise _unusable(name, data_dir, path, f"format {meta.get('format')!r}, this nfjax reads format {FORMAT}")
    if not isinstance(fields[0], int) or len(fields[2]) != 3 or len(fields[3]) != fields[1]:
        raise _unusable(name, data_dir, path, "its fields do not describe a split")
    now = _fingerprint(path.parent.parent)
    if now is not None and meta.get("dataset_info_sha256") not in (None, now):
        raise _unusable(name, data_dir, path, "the TFDS dataset beside it changed after it was written (stale)")
    _check_npz(name, data_dir, npz, meta)
    return meta


def _check_npz(name: str, data_dir: str, npz: Path, meta: dict) -> None:
    """The arrays file exists, has the size the JSON names and holds the shapes and dtypes it names; reads the
    array headers only, so a bad cache fails before a run compiles anything."""
    expected = {
        "images": ((meta["num_examples"], *meta["image_shape"]), "uint8"),
        "labels": ((meta["num_examples"],), "int32"),
    }
    try:
        if npz.stat().st_size != meta["npz_bytes"]:
            raise ValueError(f"{npz.stat().st_size} bytes where its JSON says {meta['npz_bytes']}")
        with zipfile.ZipFile(npz) as archive:
            found = {key: _npy_header(archive, f"{key}.npy") for key in expected}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise _unusable(name, data_dir, npz, f"unreadable ({type(e).__name__}: {e})") from None
    if found != {key: (tuple(shape), np.dtype(dtype)) for key, (shape, dtype) in expected.items()}:
        described = ", ".join(f"{key} {dtype} {shape}" for key, (shape, dtype) in found.items())
        raise _unusable(name, data_dir, npz, f"holds {described}, not what its JSON says")


def _npy_header(archive: zipfile.ZipFile, member: str) -> tuple[tuple, np.dtype]:
    with archive.open(member) as f:
        version = np.lib.format.read_magic(f)
        readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
        shape, _, dtype = readers[version](f)
    return tuple(shape), dtype


def _read_arrays(cached: CachedSplit) -> tuple[np.ndarray, np.ndarray]:
    npz = cached.npz
    if str(npz) in _memo:
        _memo.move_to_end(str(npz))
        return _memo[str(npz)]
    try:
        with np.load(npz, allow_pickle=False) as stored:
            images, labels = stored["images"], stored["labels"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise _unusable(cached.name, cached.data_dir, npz, f"unreadable ({type(e).__name__}: {e})") from None
    expected = (cached.meta["num_examples"], *cached.meta["image_shape"])
    if images.shape != expected or labels.shape != expected[:1]:  # the file changed since lookup checked it
        raise _unusable(cached.name, cached.data_dir, npz, f"holds {images.shape} images, its JSON says {expected}")
    _remember(str(npz), (images, labels))
    return images, labels


class CachedTfdsSource:
    """A TFDS split served by the array cache: ``info`` and ``load_arrays`` without TensorFlow; ``tf_dataset``
    (streaming, when the config does not keep the split in memory) reads the TFDS records through
    ``tfds_source()``, exactly as a TfdsSource would."""

    def __init__(self, cached: CachedSplit, split: str, tfds_source: Callable):
        self.cached, self.split, self._tfds_source = cached, split, tfds_source
        self.name, self.data_dir = cached.name, cached.data_dir

    def info(self) -> SourceInfo:
        return self.cached.info()

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        return self.cached.load_arrays()

    def tf_dataset(self, start: int, end: int):
        return self._tfds_source().tf_dataset(start, end)
