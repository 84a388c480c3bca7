"""In-memory path: the split is decoded once into uint8 arrays; batches are gathered with fancy indexing
and augmented in NumPy (pad-and-random-crop, horizontal flip). Costs microseconds per small-image batch and
leaves both CPU cores to XLA, where a tf.data pipeline would compete with it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from nfjax.data import sharding

AUG_SALT = 0xA06  # seeds pad-crop/flip: [seed, AUG_SALT, step, process_index]


def pad_and_random_crop(images: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [B, H, W, C] -> [B, H, W, C]: zero-pad each side by ``padding``, crop a random H x W window."""
    batch, height, width, _ = images.shape
    padded = np.pad(images, [(0, 0), (padding, padding), (padding, padding), (0, 0)])
    top = rng.integers(0, 2 * padding + 1, size=batch)
    left = rng.integers(0, 2 * padding + 1, size=batch)
    rows = (top[:, None] + np.arange(height))[:, :, None]  # [B, H, 1]
    cols = (left[:, None] + np.arange(width))[:, None, :]  # [B, 1, W]
    return padded[np.arange(batch)[:, None, None], rows, cols]


def random_flip(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Mirrors each image left-right with probability 1/2."""
    flip = rng.random(len(images)) < 0.5
    return np.where(flip[:, None, None, None], images[:, :, ::-1], images)


def normalize(images: np.ndarray, mean, std, to_rgb: bool) -> np.ndarray:
    """uint8 [B, H, W, C] -> float32 (x - 255 mean) / (255 std); 1 channel copied to 3 first if ``to_rgb`` (so
    3-value RGB statistics, e.g. of pretrained weights, apply per copied channel)."""
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    shift = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    if to_rgb and images.shape[-1] == 1:
        images = np.repeat(images, 3, axis=-1)
    return images.astype(np.float32) * scale + shift


def augment(images: np.ndarray, cfg, rng: np.random.Generator) -> np.ndarray:
    if cfg.pad_crop > 0:
        images = pad_and_random_crop(images, cfg.pad_crop, rng)
    if cfg.flip:
        images = random_flip(images, rng)
    return images


def train_batches(
    arrays, cfg, plan: sharding.HostPlan, num_examples: int, seed: int, start_step: int, mean, std, probs=None
) -> Iterator[dict]:
    """Endless {'image': float32 [b, H, W, C'], 'label': int32 [b]} from global step ``start_step`` on; ``probs``
    [num_examples]: class-balanced draws (:func:`nfjax.data.sharding.epoch_order`)."""
    images, labels = arrays
    per_epoch = sharding.steps_per_epoch(num_examples, plan.global_batch)
    step, order_epoch, order = start_step, None, None
    while True:
        epoch, step_in_epoch = divmod(step, per_epoch)
        if epoch != order_epoch:
            order_epoch, order = epoch, sharding.epoch_order(num_examples, seed, epoch, cfg.repeated_aug, probs)
        index = order[sharding.host_step_slices(order, plan, step_in_epoch, 1)]
        rng = np.random.default_rng([seed, AUG_SALT, step, plan.process_index])
        batch_images = augment(images[index], cfg, rng)
        yield {"image": normalize(batch_images, mean, std, cfg.grayscale_to_rgb), "label": labels[index]}
        step += 1


def eval_batches(arrays, cfg, plan: sharding.HostPlan, mean, std) -> Iterator[dict]:
    """Every example of this host's block once, padded (with a copy of its first example) to the same
    number of steps on every host; 'mask' is 1 for real examples and 0 for padding."""
    images, labels = arrays
    start, end = sharding.eval_host_range(len(labels), plan.process_index, plan.process_count)
    total = sharding.eval_steps(len(labels), plan) * plan.local_batch
    index = np.full(total, min(start, len(labels) - 1), np.int64)
    index[: end - start] = np.arange(start, end)
    mask = (np.arange(total) < end - start).astype(np.float32)
    for i in range(0, total, plan.local_batch):
        rows = index[i : i + plan.local_batch]
        yield {
            "image": normalize(images[rows], mean, std, cfg.grayscale_to_rgb),
            "label": labels[rows],
            "mask": mask[i : i + plan.local_batch],
        }
