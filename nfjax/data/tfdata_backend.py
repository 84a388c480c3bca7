"""tf.data path: decoding and per-image augmentation in TensorFlow's parallel map, for datasets that do not
fit in memory (ImageNet) or need TF-only augmentations (random-resized crop, RandAugment).

Two orderings, both functions of (seed, epoch) only:
  in memory:  the NumPy path's global epoch order (exact, O(1) resume); tf.data only gathers and augments;
  streaming:  each host reads its own contiguous block of the split; the epoch order is a seeded shuffle
              buffer over that block; a resume skips the raw (still encoded) records of the partial epoch.
Per-example augmentation seeds are [epoch seed, position in the epoch], so resumed and uninterrupted runs
produce identical batches. The streaming skip costs reading (not decoding) up to one epoch of this host's
records; the in-memory skip is free.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import NamedTuple

import numpy as np

from nfjax.data import augment, sharding
from nfjax.data.mix import mix_batch, mix_rng, randaugment_after_mix
from nfjax.data.randaugment import randaugment
from nfjax.data.tf_lazy import import_tf


def _options(cfg):
    tf = import_tf()
    options = tf.data.Options()
    options.deterministic = True
    options.threading.max_intra_op_parallelism = 1  # parallelism comes from the map, not inside each op
    if cfg.tf_threads > 0:
        options.threading.private_threadpool_size = cfg.tf_threads
    return options


def _randaugment(image, seed, cfg, fill):
    tf = import_tf()
    image_u8 = tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)
    out = randaugment(
        image_u8,
        seed,
        num_layers=cfg.randaugment_layers,
        magnitude=cfg.randaugment_magnitude,
        variant=cfg.randaugment_variant,
        magnitude_std=cfg.randaugment_magnitude_std,
        prob=cfg.randaugment_prob,
        fill=fill,
    )
    return tf.cast(out, tf.float32)


class TrainStages(NamedTuple):
    """The tf.data train stages. ``per_image(image, label, seed [2])`` -> dict; with RandAugment after mixing
    (``mix`` set) it yields un-normalized images plus their RandAugment seed, ``mix`` turns a batched dataset
    into mixed examples and ``finish`` runs RandAugment and normalization on each mixed example."""

    per_image: Callable
    mix: Callable | None = None
    finish: Callable | None = None


def make_train_stages(cfg, channels: int, size: int, mean, std, num_classes: int, seed: int) -> TrainStages:
    """Per-image crop/pad/flip, RandAugment and normalization; see :mod:`nfjax.data.mix` for the two orders."""
    tf = import_tf()
    fill = tuple(int(round(255 * m)) for m in mean) if cfg.randaugment_variant == "timm" else (128,) * 3
    fill = fill * 3 if len(fill) == 1 else fill
    after_mix = randaugment_after_mix(cfg)

    def geometric(image, crop_seed, pad_seed, flip_seed):
        if cfg.random_resized_crop:
            image = augment.random_resized_crop(image, size, crop_seed, channels, cfg.rrc_mode, cfg.train_interpolation)
        else:
            image = augment.resize_to(image, cfg.image_size, channels)
        image = tf.ensure_shape(image, [size, size, channels])
        if cfg.pad_crop > 0:
            image = augment.pad_and_random_crop(image, cfg.pad_crop, pad_seed)
        if cfg.flip:
            image = augment.random_flip(image, flip_seed)
        return image

    def finish(example):
        example = dict(example)
        image, ra_seed = example["image"], example.pop("ra_seed")
        if cfg.randaugment_layers > 0:
            image = _randaugment(image, ra_seed, cfg, fill)
        return {**example, "image": augment.normalize(image, mean, std, cfg.grayscale_to_rgb)}

    def per_image(image, label, seed):
        crop_seed, pad_seed, flip_seed, ra_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 4))
        example = {"image": geometric(image, crop_seed, pad_seed, flip_seed), "label": label, "ra_seed": ra_seed}
        return example if after_mix else finish(example)

    per_image, finish = _as_written(per_image), _as_written(finish)
    if not after_mix:
        return TrainStages(per_image)

    def mix_numpy(step, images, labels, process_index):
        batch = mix_batch({"image": images, "label": labels}, cfg, num_classes, mix_rng(seed, step, process_index))
        return batch["image"].astype(np.float32), batch["label"].astype(labels.dtype), batch["label_probs"]

    def mix(ds, first_step: int, process_index: int):
        """Batched un-normalized examples -> mixed examples (unbatched), the draws of ``mix_rng`` per step."""

        def mix_one(step, batch):
            out = [tf.float32, batch["label"].dtype, tf.float32]
            images, labels, probs = tf.numpy_function(
                mix_numpy, [step, batch["image"], batch["label"], process_index], out, stateful=False
            )
            return {
                "image": tf.ensure_shape(images, batch["image"].shape),
                "label": tf.ensure_shape(labels, batch["label"].shape),
                "label_probs": tf.ensure_shape(probs, [batch["image"].shape[0], num_classes]),
                "ra_seed": batch["ra_seed"],
            }

        return ds.enumerate(first_step).map(mix_one).unbatch()

    return TrainStages(per_image, mix, finish)


def make_eval_transform(cfg, channels: int, size: int | None, mean, std) -> Callable:
    """(image, label, mask) -> {'image': float32 [S, S, C'], 'label', 'mask'}."""

    def transform(image, label, mask):
        image = augment.eval_preprocess(
            image, size, cfg.eval_preprocess, cfg.crop_pct, channels, cfg.eval_interpolation
        )
        return {"image": augment.normalize(image, mean, std, cfg.grayscale_to_rgb), "label": label, "mask": mask}

    return _as_written(transform)


def _as_written(fn: Callable) -> Callable:
    """``fn`` traced by tf.data as written, not through AutoGraph. The transforms branch on tensors with tf.cond /
    tf.switch_case themselves (Python ``if`` only on settings), and converting their source (RandAugment's 16 ops,
    the crops, the resizes) cost about 1 s of every pipeline's construction: 2.6 against 1.7 s for a map of
    RandAugment alone (two layers, 224 px)."""
    return import_tf().autograph.experimental.do_not_convert(fn)


def _seed(epoch_seed: int, position):
    tf = import_tf()
    return tf.stack([tf.constant(epoch_seed, tf.int64), tf.cast(position, tf.int64)])


def _finish(ds, cfg, local_batch: int) -> Iterator[dict]:
    tf = import_tf()
    ds = ds.batch(local_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    return ds.with_options(_options(cfg)).as_numpy_iterator()


def _finish_train(ds, cfg, plan, stages: TrainStages, first_step: int) -> Iterator[dict]:
    """Batches of per-image examples; with RandAugment after mixing: batch, mix, RandAugment, normalize, batch."""
    if stages.mix is not None:
        tf = import_tf()
        ds = ds.batch(plan.local_batch, drop_remainder=True)
        ds = stages.mix(ds, first_step, plan.process_index).map(stages.finish, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds, cfg, plan.local_batch)


def in_memory_train_batches(arrays, cfg, plan, num_examples, seed, start_step, stages, probs=None) -> Iterator[dict]:
    """Same example order as the NumPy path (``probs``: class-balanced draws); augmentation in tf.data."""
    tf = import_tf()
    images, labels = tf.constant(arrays[0]), tf.constant(arrays[1])
    fetch = lambda i: (tf.gather(images, i), tf.gather(labels, i))
    return _indexed_train_batches(fetch, cfg, plan, num_examples, seed, start_step, stages, probs)


def folder_train_batches(source, cfg, plan, num_examples, seed, start_step, stages, probs) -> Iterator[dict]:
    """An image folder read by index in the in-memory paths' epoch order (class-balanced sampling without
    caching the split): each example is read from its file when its position comes up."""
    tf = import_tf()
    paths, labels = tf.constant(source.paths), tf.constant(source.labels)
    fetch = lambda i: (tf.io.read_file(tf.gather(paths, i)), tf.gather(labels, i))
    return _indexed_train_batches(fetch, cfg, plan, num_examples, seed, start_step, stages, probs)


def _indexed_train_batches(fetch, cfg, plan, num_examples, seed, start_step, stages, probs) -> Iterator[dict]:
    """Batches of ``fetch(index) -> (image, label)`` in the order of :func:`sharding.epoch_order`."""
    tf = import_tf()
    per_epoch = sharding.steps_per_epoch(num_examples, plan.global_batch)
    epoch, offset = divmod(start_step, per_epoch)
    while True:
        order = sharding.epoch_order(num_examples, seed, epoch, cfg.repeated_aug, probs)
        positions = sharding.host_step_slices(order, plan, offset, per_epoch - offset)
        epoch_seed = sharding.derive_seed(seed, epoch, 1)
        ds = tf.data.Dataset.from_tensor_slices((order[positions], positions))
        ds = ds.map(
            lambda i, pos, s=epoch_seed: stages.per_image(*fetch(i), _seed(s, pos)),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        yield from _finish_train(ds, cfg, plan, stages, epoch * per_epoch + offset)
        epoch, offset = epoch + 1, 0


def stream_labels(source, num_examples: int, batch: int = 8192) -> np.ndarray:
    """int32 [num_examples]: the labels of the first ``num_examples`` records, read without decoding an image
    (the source's encoded records), with a progress bar on stderr."""
    from tqdm import tqdm

    ds = source.tf_dataset(0, num_examples).map(lambda image, label: label).batch(batch)
    steps = -(-num_examples // batch)
    parts = list(tqdm(ds.as_numpy_iterator(), total=steps, desc="counting training labels", unit="batch"))
    return np.concatenate(parts).astype(np.int32) if parts else np.zeros(0, np.int32)


def streaming_train_batches(source, cfg, plan, num_examples, seed, start_step, stages) -> Iterator[dict]:
    """Per-host block of the split, seeded shuffle per epoch, skip of raw records on resume.

    One tf.data pipeline spans all epochs (flat_map over epoch numbers), so the parallel map never drains
    at epoch boundaries; every epoch yields exactly steps_per_epoch * local_batch records, so batches never
    straddle two epochs.
    """
    tf = import_tf()
    start, end = sharding.train_host_range(num_examples, plan)
    per_epoch = sharding.steps_per_epoch(num_examples, plan.global_batch)
    first_epoch, offset = divmod(start_step, per_epoch)
    host_seed = tf.constant(sharding.derive_seed(seed, plan.process_index), tf.int64)
    records = source.tf_dataset(start, end)

    def epoch_records(epoch):
        """(augmentation seed [2], image, label) for one epoch, in its shuffled order."""
        epoch_seed = tf.random.stateless_uniform(
            [], tf.stack([host_seed, epoch]), minval=0, maxval=2**31 - 1, dtype=tf.int64
        )
        ds = records.shuffle(min(cfg.shuffle_buffer, end - start), seed=epoch_seed, reshuffle_each_iteration=False)
        if cfg.repeated_aug > 1:
            ds = ds.flat_map(lambda im, lab: tf.data.Dataset.from_tensors((im, lab)).repeat(cfg.repeated_aug))
        ds = ds.take(per_epoch * plan.local_batch).enumerate()
        return ds.map(lambda pos, rec: (tf.stack([epoch_seed, pos]), rec[0], rec[1]))

    # Skipping before the map reads records of the partial epoch but decodes none of them.
    first = epoch_records(tf.constant(first_epoch, tf.int64)).skip(offset * plan.local_batch)
    later = tf.data.Dataset.range(first_epoch + 1, 2**62).flat_map(epoch_records)
    ds = first.concatenate(later).map(
        lambda s, image, label: stages.per_image(image, label, s), num_parallel_calls=tf.data.AUTOTUNE
    )
    return _finish_train(ds, cfg, plan, stages, start_step)


def in_memory_eval_batches(arrays, cfg, plan, transform) -> Iterator[dict]:
    tf = import_tf()
    images, labels = tf.constant(arrays[0]), tf.constant(arrays[1])
    num_examples = len(arrays[1])
    start, end = sharding.eval_host_range(num_examples, plan.process_index, plan.process_count)
    total = sharding.eval_steps(num_examples, plan) * plan.local_batch
    index = np.full(total, min(start, num_examples - 1), np.int64)
    index[: end - start] = np.arange(start, end)
    mask = (np.arange(total) < end - start).astype(np.float32)
    ds = tf.data.Dataset.from_tensor_slices((index, mask))
    ds = ds.map(lambda i, m: transform(tf.gather(images, i), tf.gather(labels, i), m), tf.data.AUTOTUNE)
    return _finish(ds, cfg, plan.local_batch)


def streaming_eval_batches(source, cfg, plan, num_examples, transform) -> Iterator[dict]:
    """This host's block, then copies of one record with mask 0 up to the common step count."""
    tf = import_tf()
    start, end = sharding.eval_host_range(num_examples, plan.process_index, plan.process_count)
    total = sharding.eval_steps(num_examples, plan) * plan.local_batch
    real = source.tf_dataset(start, end).map(lambda im, lab: (im, lab, tf.constant(1.0)))
    pad_start = min(start, num_examples - 1)
    padding = source.tf_dataset(pad_start, pad_start + 1).map(lambda im, lab: (im, lab, tf.constant(0.0)))
    ds = real.concatenate(padding.repeat()).take(total)
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE)
    return _finish(ds, cfg, plan.local_batch)
