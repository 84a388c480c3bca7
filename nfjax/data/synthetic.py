"""Synthetic data (``data.dataset='synthetic'``): generated in memory, deterministic, no file and no TensorFlow.

Each class has a random uint8 template image; an example is half its class template plus half uniform noise,
``(template[y] >> 1) + (noise >> 1)``, so the classes are learnable and a run's loss falls. Templates come from
``synthetic.seed`` alone, so every split shares them; each split draws its own labels (a shuffled, balanced
``arange(n) % K``) and noise from ``[seed, crc32(split name)]``. The train split (``data.train_split``) has
``synthetic.train_examples`` examples, every other split ``synthetic.eval_examples``. Meant for throughput runs
of the real trainer and for machines without datasets; it goes through the in-memory NumPy backend like
Fashion-MNIST (or tf.data's in-memory path for TF-only augmentations), never streamed.
"""

from __future__ import annotations

import functools
import zlib

import numpy as np

from nfjax.data.source_info import SourceInfo

SYNTHETIC = "synthetic"
# Mean and std of (a >> 1) + (b >> 1), a and b uniform uint8, in [0, 1] units: 127 / 255 and sqrt(2 (128^2 - 1)
# / 12) / 255; every channel alike.
SYNTHETIC_STATS = ((0.498,), (0.205,))


class SyntheticSource:
    """``split`` of the synthetic dataset: ``info``/``load_arrays`` as every source; ``tf_dataset`` refuses."""

    def __init__(self, split: str, image_shape: tuple, num_classes: int, num_examples: int, seed: int):
        self.name, self.split, self.data_dir = SYNTHETIC, split, None
        self.image_shape = tuple(int(d) for d in image_shape)
        self.num_classes, self.num_examples, self.seed = int(num_classes), int(num_examples), int(seed)

    @classmethod
    def from_config(cls, cfg, split: str) -> SyntheticSource:
        """``split`` as the data config's ``synthetic`` section describes it (see the module docstring)."""
        synthetic = cfg.synthetic
        count = synthetic.train_examples if split == cfg.train_split else synthetic.eval_examples
        return cls(split, synthetic.image_shape, synthetic.num_classes, count, synthetic.seed)

    def info(self) -> SourceInfo:
        names = tuple(f"class_{k}" for k in range(self.num_classes))
        return SourceInfo(self.num_examples, self.num_classes, self.image_shape, names)

    def load_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(images uint8 [N, H, W, C], labels int32 [N]), generated once per process and read-only."""
        return synthetic_arrays(self.image_shape, self.num_classes, self.num_examples, self.seed, self.split)

    def tf_dataset(self, start: int, end: int):
        raise ValueError(
            "data.dataset='synthetic' is generated in memory and cannot be streamed: leave data.cache_in_memory "
            "unset (or True)"
        )


@functools.lru_cache(maxsize=4)
def synthetic_arrays(
    image_shape: tuple, num_classes: int, num_examples: int, seed: int, split: str
) -> tuple[np.ndarray, np.ndarray]:
    """images uint8 [num_examples, *image_shape], labels int32 [num_examples]: see the module docstring."""
    templates = np.random.default_rng([seed, 0]).integers(0, 256, (num_classes, *image_shape), dtype=np.uint8)
    rng = np.random.default_rng([seed, 1, zlib.crc32(split.encode())])
    labels = rng.permutation(np.arange(num_examples) % num_classes).astype(np.int32)
    images = rng.integers(0, 256, (num_examples, *image_shape), dtype=np.uint8)
    images >>= 1
    images += templates[labels] >> 1  # at most 127 + 127: no overflow
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def check_synthetic_config(cfg) -> None:
    """ValueError naming the field when the ``synthetic`` section cannot describe a dataset."""
    synthetic = cfg.get("synthetic")
    if synthetic is None:
        raise ValueError("data.dataset='synthetic' needs the data.synthetic section (nfjax.data.default_data_config)")
    if cfg.get("cache_in_memory") is False:
        raise ValueError(
            "data.dataset='synthetic' is generated in memory and cannot be streamed: leave data.cache_in_memory unset"
        )
    shape = synthetic.image_shape
    if not isinstance(shape, (tuple, list)) or len(shape) != 3 or not all(_positive_int(d) for d in shape):
        raise ValueError(f"data.synthetic.image_shape={shape!r} is invalid: use (H, W, C), e.g. (32, 32, 3)")
    for field in ("num_classes", "train_examples", "eval_examples"):
        if not _positive_int(synthetic[field]):
            raise ValueError(f"data.synthetic.{field}={synthetic[field]!r} is invalid: use a whole number >= 1")


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1
