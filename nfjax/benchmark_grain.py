"""grain vs tf.data: ``python -m nfjax.benchmark data --compare-grain`` (see docs/benchmarks.md).

The grain pipeline does the work of the ``crop_flip`` preset on the same image-folder files: a
``grain.MapDataset`` over (path, label) pairs, shuffled per epoch and repeated, a per-index random map
(DeepMind random-resized crop, flip, bicubic resize to ``size``, normalization to float32), then batches,
optionally in ``worker_count`` worker processes (``mp_prefetch``). Every random draw comes from the generator
grain derives from (seed, index), so a batch does not depend on threads, workers or where iteration resumed.

The crop window is :func:`distorted_box_window`, a NumPy port of the sampler behind
``tf.image.stateless_sample_distorted_bounding_box`` with the parameters of :mod:`nfjax.data.augment`
(same distribution, not the same draws: TF's Philox stream is not reproduced). PIL cannot decode a window of a
JPEG, so the whole image is decoded and the window resized from it (``Image.resize(box=...)``);
``Image.draft`` is not used: it lowers the decoded resolution (DCT scaling) rather than the decoded region.

This module imports grain and PIL only inside functions: ``nfjax.benchmark`` imports it without grain.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from nfjax.data.augment import (
    CENTER_CROP_PADDING,
    RRC_AREA_RANGE,
    RRC_ASPECT_RANGE,
    RRC_MAX_ATTEMPTS,
    RRC_MIN_OBJECT_COVERED,
)
from nfjax.data.pipeline import close_pipeline

GRAIN_INSTALL_HINT = "grain is not installed: pip install grain  (or pip install 'nfjax[grain]')"


def grain_missing_message() -> str | None:
    """None when grain imports; otherwise the one line that says how to install it."""
    try:
        import grain  # noqa: F401
    except ImportError:
        return GRAIN_INSTALL_HINT
    return None


def _random_crop(height: int, width: int, aspect: float, rng: np.random.Generator):
    """One attempt of TF's ``GenerateRandomCrop``: a box of width round(aspect * h) whose height is uniform
    between the heights of the smallest and largest allowed areas; None when rounding breaks the area range."""
    min_area, max_area = RRC_AREA_RANGE[0] * width * height, RRC_AREA_RANGE[1] * width * height
    box_h, max_h = int(np.rint(math.sqrt(min_area / aspect))), int(np.rint(math.sqrt(max_area / aspect)))
    if np.rint(max_h * aspect) > width:  # the largest height whose rounded width still fits
        max_h = int((width + 0.5 - 1e-7) / aspect)
        max_h -= int(np.rint(max_h * aspect) > width)
    max_h = min(max_h, height)
    box_h = min(box_h, max_h)
    if box_h < max_h:
        box_h += int(rng.integers(0, max_h - box_h + 1))
    box_w = int(np.rint(box_h * aspect))
    if box_w * box_h < min_area:  # rounding fixes, as TF tries them: one row taller, then one shorter
        box_h += 1
        box_w = int(np.rint(box_h * aspect))
    if box_w * box_h > max_area:
        box_h -= 1
        box_w = int(np.rint(box_h * aspect))
    area = box_w * box_h
    if not (min_area <= area <= max_area and 0 < box_w <= width and 0 < box_h <= height):
        return None
    top = int(rng.integers(0, height - box_h)) if box_h < height else 0  # TF: Uniform(n) is in [0, n)
    left = int(rng.integers(0, width - box_w)) if box_w < width else 0
    return top, left, box_h, box_w


def distorted_box_window(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """DeepMind random-resized-crop window (top, left, h, w) of an ``height`` x ``width`` image, as
    :func:`nfjax.data.augment.sample_crop_window` samples it: up to RRC_MAX_ATTEMPTS boxes (aspect w / h uniform
    in RRC_ASPECT_RANGE) that must cover RRC_MIN_OBJECT_COVERED of the image; when all fail, the centred square
    that eval crops for output ``size`` (side = short side * size / (size + 32))."""
    for _ in range(RRC_MAX_ATTEMPTS):
        aspect = rng.random(dtype=np.float32) * (RRC_ASPECT_RANGE[1] - RRC_ASPECT_RANGE[0]) + RRC_ASPECT_RANGE[0]
        box = _random_crop(height, width, float(aspect), rng)
        if box is not None and box[2] * box[3] >= RRC_MIN_OBJECT_COVERED * height * width:
            if (box[2], box[3]) != (height, width):  # TF's whole-image result counts as a failure
                return box
            break
    side = int(np.float32(min(height, width)) / np.float32(size + CENTER_CROP_PADDING) * np.float32(size))
    return (height - side + 1) // 2, (width - side + 1) // 2, side, side


class CropFlipNormalize:
    """grain random map (a picklable callable): (path, label) -> {'image': float32 [size, size, 3], 'label': int32}.

    Decode (PIL, whole JPEG), DeepMind random-resized-crop window, bicubic resize of the window to size x size
    (PIL's bicubic on uint8), flip with probability 1/2, (x - 255 * mean) / (255 * std).
    """

    def __init__(self, size: int, mean: Sequence[float], std: Sequence[float]):
        # Full-shape constants, as in nfjax.data.augment.normalize: NumPy's per-channel broadcast over a last axis
        # of 3 made normalization 2.5x slower.
        shape = (size, size, len(mean))
        self.size = size
        self.scale = np.broadcast_to(1.0 / (255.0 * np.asarray(std, np.float32)), shape).astype(np.float32)
        self.shift = np.broadcast_to(-np.asarray(mean, np.float32) / np.asarray(std, np.float32), shape).astype(
            np.float32
        )

    def __call__(self, element, rng: np.random.Generator) -> dict:
        from PIL import Image

        path, label = element
        with Image.open(path) as image:
            image = image if image.mode == "RGB" else image.convert("RGB")
            top, left, h, w = distorted_box_window(image.height, image.width, self.size, rng)
            resized = image.resize((self.size, self.size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
        if rng.random() < 0.5:
            resized = resized.transpose(Image.Transpose.FLIP_LEFT_RIGHT)  # on uint8, before the float copy
        image = np.asarray(resized).astype(np.float32)
        image *= self.scale
        image += self.shift
        return {"image": image, "label": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class GrainSpec:
    """The grain pipeline: ``files`` and their ``labels``, ``batch`` images of ``size`` x ``size`` normalized
    with ``mean``/``std``; run by ``workers`` processes (0: in this process), each reading with ``threads``
    threads (grain's ReadOptions.num_threads, default 16) and ``buffer`` elements ahead."""

    files: Sequence[str]
    labels: Sequence[int]
    batch: int
    size: int
    mean: Sequence[float]
    std: Sequence[float]
    seed: int = 0
    workers: int = 0
    threads: int = 16
    buffer: int = 128


def grain_dataset(spec: GrainSpec):
    """The grain IterDataset of endless train batches {'image': float32 [batch, size, size, 3], 'label' int32}."""
    import grain

    records = list(zip((str(f) for f in spec.files), (int(y) for y in spec.labels), strict=True))
    ds = grain.MapDataset.source(records).shuffle(seed=spec.seed).repeat()
    ds = ds.random_map(CropFlipNormalize(spec.size, spec.mean, spec.std), seed=spec.seed + 1)
    read = grain.ReadOptions(num_threads=spec.threads, prefetch_buffer_size=spec.buffer)
    ds = ds.to_iter_dataset(read).batch(spec.batch, drop_remainder=True)
    if spec.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain reads its absl flags when it starts workers (google/grain#1355)
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=spec.workers))
    return ds


def check_resume(build: Callable[[], Iterator[dict]], skip: int = 3, compare: int = 3) -> bool:
    """True when a fresh iterator (``build()``) restored with the ``get_state()`` of another after ``skip``
    batches yields the same next ``compare`` batches as the uninterrupted one."""
    first = build()
    for _ in range(skip):
        next(first)
    state = first.get_state()
    expected = [next(first) for _ in range(compare)]
    close_pipeline(first)
    restored = build()
    restored.set_state(state)
    actual = [next(restored) for _ in range(compare)]
    close_pipeline(restored)
    return all(
        np.array_equal(a[key], e[key]) for a, e in zip(actual, expected, strict=True) for key in ("image", "label")
    )


def grain_builders(spec: GrainSpec, workers: Sequence[int]) -> dict[str, Callable[[], Iterator[dict]]]:
    """{'grain_w<N>': a function that builds a fresh iterator of ``spec`` run by N worker processes}."""

    def build(spec: GrainSpec) -> Iterator[dict]:
        return iter(grain_dataset(spec))

    return {f"grain_w{n}": functools.partial(build, dataclasses.replace(spec, workers=n)) for n in workers}
