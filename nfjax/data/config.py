"""The data section of an experiment config: every field, its default, and per-dataset statistics."""

from __future__ import annotations

import math

import ml_collections

from nfjax.data.synthetic import SYNTHETIC, SYNTHETIC_STATS, check_synthetic_config

# Per-channel mean/std in [0, 1] units. Images are normalized as (x - 255 * mean) / (255 * std).
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
DATASET_STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),  # measured on the 60,000 training images
    "mnist": ((0.1307,), (0.3081,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    SYNTHETIC: SYNTHETIC_STATS,  # exact for its template + noise images, any channel count
}

DEFAULT_DATA_DIR = "~/tensorflow_datasets"
DEFAULT_MAX_IN_MEMORY_BYTES = 4 * 2**30
DEFAULT_MAX_BAD_FRACTION = 0.001  # image folders: more unusable files than this fraction stop the run


def default_data_config() -> ml_collections.ConfigDict:
    """All data fields with ImageNet-style defaults (no mixing, no RandAugment). See docs/data.md."""
    c = ml_collections.ConfigDict()
    c.dataset = "imagenet2012"  # a TFDS name, "image_folder" (then data_dir is the folder) or "synthetic"
    c.data_dir = DEFAULT_DATA_DIR
    c.train_split = "train"  # TFDS split syntax works: "train[:90%]"
    c.eval_split = "validation"
    c.holdout_fraction = 0.0  # image_folder only: fraction of each class kept for split "holdout"
    c.num_folds = 0  # K >= 2: k-fold cross-validation of train_split (nfjax/data/folds.py); 0: off
    c.fold = 0  # with num_folds: train on train_split minus this fold, evaluate on it (instead of eval_split)
    c.max_bad_fraction = (
        DEFAULT_MAX_BAD_FRACTION  # image_folder only: unusable files are skipped and listed; more is an error
    )
    c.num_train_examples = ml_collections.FieldReference(None, field_type=int)  # None: from the split
    c.image_size = ml_collections.FieldReference(224, field_type=int)  # None: native size
    c.eval_image_size = ml_collections.FieldReference(None, field_type=int)  # None: image_size
    c.eval_preprocess = "deepmind"  # 'deepmind' (resize to S+32, crop S) | 'crop_pct' | 'none'
    c.crop_pct = 0.875
    c.random_resized_crop = True
    c.rrc_mode = "deepmind"  # random-resized-crop sampler: 'deepmind' (TF distorted box) | 'torchvision'
    c.train_interpolation = "bicubic"  # random-resized crop: 'bicubic' | 'bilinear' | 'random' (timm: per image)
    c.eval_interpolation = "bicubic"  # eval_preprocess 'crop_pct': 'bicubic' (timm) | 'bilinear' (torchvision)
    c.pad_crop = 0  # pixels of zero padding before a random crop back to size (small images)
    c.flip = True
    c.randaugment_layers = 0  # 0: off
    c.randaugment_magnitude = 10.0
    c.randaugment_variant = "deepmind"  # 'deepmind' (DeepMind's ops, bit-exact) | 'deepmind_fixed' | 'timm'
    c.randaugment_magnitude_std = 0.5  # timm only
    c.randaugment_prob = 0.5  # timm only: each layer applies its op with this probability
    c.mixup_alpha = 0.0
    c.cutmix_alpha = 0.0
    # True: RandAugment per image, then mixing (timm) | False: mixing, then RandAugment on the mixed images
    # (DeepMind's NFNet recipe); see nfjax/data/mix.py
    c.augment_before_mix = True
    c.mix_mode = "deepmind"  # 'deepmind': half MixUp, half CutMix | 'timm': one per batch, switch_prob
    c.switch_prob = 0.5
    c.label_smoothing = 0.0
    c.bce_target_thresh = ml_collections.FieldReference(None, field_type=float)  # e.g. 0.2 for RSB A1
    c.repeated_aug = 1  # RSB uses 3: each image appears this many times per epoch
    # q > 0: epochs of N draws with replacement, example i drawn with probability proportional to n_{y_i}^-q
    # (1.0: every class equally often; 0.5: square-root balancing); 0: shuffled epochs. See docs/data.md.
    c.balanced_sampling = 0.0
    c.grayscale_to_rgb = False
    c.mean = ml_collections.FieldReference(None, field_type=tuple)  # None: DATASET_STATS or ImageNet
    c.std = ml_collections.FieldReference(None, field_type=tuple)
    c.backend = "auto"  # 'auto' | 'tfdata' | 'numpy' (in-memory arrays, numpy augmentation)
    c.cache_in_memory = ml_collections.FieldReference(None, field_type=bool)  # None: when it fits
    c.max_in_memory_bytes = DEFAULT_MAX_IN_MEMORY_BYTES
    c.shuffle_buffer = 16384  # tf.data streaming path only
    c.prefetch = 2  # host batches prepared ahead by a background thread
    c.tf_threads = 0  # tf.data private thread pool size; 0: TF default (all cores)
    c.seed = 0
    # dataset 'synthetic' only (nfjax/data/synthetic.py): generated in memory; train_examples for train_split,
    # eval_examples for every other split; seed fixes the images (data.seed still fixes the order)
    c.synthetic = ml_collections.ConfigDict(
        dict(image_shape=(32, 32, 3), num_classes=10, train_examples=50_000, eval_examples=10_000, seed=0)
    )
    return c


DATA_CHOICES = {
    "eval_preprocess": ("deepmind", "crop_pct", "none"),
    "rrc_mode": ("deepmind", "torchvision"),
    "train_interpolation": ("bicubic", "bilinear", "random"),
    "eval_interpolation": ("bicubic", "bilinear"),
    "randaugment_variant": ("deepmind", "deepmind_fixed", "timm"),
    "mix_mode": ("deepmind", "timm"),
    "backend": ("auto", "tfdata", "numpy"),
}


def check_data_config(cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field, its value and the valid choices, before any data is read."""
    for field, valid in DATA_CHOICES.items():
        if cfg.get(field) not in valid:
            raise ValueError(f"data.{field}={cfg.get(field)!r} is invalid; valid: {', '.join(map(repr, valid))}")
    q = cfg.get("balanced_sampling", 0.0)  # absent from configs saved by older runs
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not math.isfinite(q) or q < 0:
        raise ValueError(
            f"data.balanced_sampling={q!r} is invalid: must be a number >= 0 (0: off, 0.5: square-root balancing, "
            "1: every class equally often)"
        )
    check_fold_config(cfg)
    if cfg.dataset == SYNTHETIC:
        check_synthetic_config(cfg)


def check_fold_config(cfg) -> None:
    """ValueError naming the field when data.num_folds / data.fold cannot describe a fold."""
    num_folds, fold = cfg.get("num_folds", 0), cfg.get("fold", 0)
    if not isinstance(num_folds, int) or num_folds == 1 or num_folds < 0:
        raise ValueError(
            f"data.num_folds={num_folds!r} is invalid: use 0 (no cross-validation) or a fold count K >= 2 "
            "(e.g. --config.data.num_folds=5)"
        )
    if num_folds == 0 and fold != 0:
        raise ValueError(f"data.fold={fold!r} needs data.num_folds >= 2 (e.g. --config.data.num_folds=5)")
    if num_folds and (not isinstance(fold, int) or not 0 <= fold < num_folds):
        raise ValueError(
            f"data.fold={fold!r} is out of range for data.num_folds={num_folds}: use 0 ... {num_folds - 1}"
        )


def fashion_mnist_data_config(data_dir: str = DEFAULT_DATA_DIR) -> ml_collections.ConfigDict:
    """Fashion-MNIST at its native 28x28x1, pad-crop + flip, in-memory NumPy backend."""
    c = default_data_config()
    c.dataset, c.data_dir = "fashion_mnist", data_dir
    c.train_split, c.eval_split = "train", "test"
    c.image_size = None
    c.eval_preprocess = "none"
    c.random_resized_crop = False
    c.pad_crop = 2
    return c


def mean_std(cfg: ml_collections.ConfigDict, channels: int) -> tuple[tuple, tuple]:
    """Mean/std in [0, 1] units: one value, or one per input channel (three for 1-channel images copied to RGB
    with ``grayscale_to_rgb``, as RGB pretrained weights expect)."""
    mean, std = cfg.mean, cfg.std
    if mean is None or std is None:
        mean, std = DATASET_STATS.get(cfg.dataset, (IMAGENET_MEAN, IMAGENET_STD))
        if channels == 1 and len(mean) == 3:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    allowed = (1, 3) if channels == 1 and cfg.grayscale_to_rgb else (1, channels)
    if len(mean) not in allowed or len(std) not in allowed:
        raise ValueError(f"mean/std have {len(mean)}/{len(std)} values but images have {channels} channels")
    return tuple(mean), tuple(std)
