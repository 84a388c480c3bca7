"""MixUp / CutMix, label smoothing and BCE targets on NumPy batches.

Mixing acts on each host's local batch. Partners come from the same batch, so an epoch means the same thing
with and without mixing. Where it runs depends on ``augment_before_mix``:
  True (timm's order, the default): per-image augmentation (RandAugment included) and normalization first, then
    mixing on the host (mixing is linear and CutMix pastes pixels, so normalizing first changes nothing);
  False (DeepMind's NFNet order): crop and flip per image, then mixing of the un-normalized [0, 255] images
    inside tf.data, then RandAugment on the mixed images (clipped and truncated to uint8, as DeepMind's
    ``_augment_image``), then normalization. Only matters when RandAugment and mixing are both on.
The random draws of a step come from ``mix_rng(seed, step, process_index)`` in both orders.

'deepmind': the first half of the batch gets MixUp (per-example ratio ~ Beta(mixup_alpha, mixup_alpha)), the
  second half CutMix (per-example box; kept area ~ Beta(cutmix_alpha, cutmix_alpha), i.e. uniform for alpha 1
  as in DeepMind's code). Example i of a half is mixed with the example in the mirrored position of that half.
  (DeepMind's pipeline draws partners from a second batch, reading 2x images per step; pairing inside the
  batch keeps epochs comparable.) With only one alpha > 0, the whole batch gets that one.
'timm': one ratio per batch; CutMix with probability switch_prob (when both alphas > 0), else MixUp; the
  partner of example i is example B-1-i; the CutMix ratio is corrected to the box area actually pasted.
Targets: label_probs = ratio * onehot(label) + (1 - ratio) * onehot(partner label); then label smoothing
(p * (1 - eps) + eps / K, identical whether applied before or after mixing); then, for BCE recipes,
binarization (p > thresh -> 1, else 0).
"""

from __future__ import annotations

import numpy as np

MIX_SALT = 0x31C  # seeds MixUp/CutMix: [seed, MIX_SALT, step, process_index]


def mix_rng(seed: int, step: int, process_index: int) -> np.random.Generator:
    """The generator of one step's mixing draws on one host (the same in both augmentation orders)."""
    return np.random.default_rng([int(seed), MIX_SALT, int(step), int(process_index)])


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """int [B] -> float32 [B, num_classes]."""
    return np.eye(num_classes, dtype=np.float32)[labels]


def smooth_labels(probs: np.ndarray, smoothing: float) -> np.ndarray:
    """[B, K] targets -> (1 - smoothing) * probs + smoothing / K."""
    return probs * (1.0 - smoothing) + smoothing / probs.shape[-1]


def bce_targets(probs: np.ndarray, threshold: float) -> np.ndarray:
    """[B, K] soft targets -> {0, 1} targets, 1 where probs > threshold (timm's target_threshold)."""
    return (probs > threshold).astype(np.float32)


def cutmix_box(height: int, width: int, kept_ratio: float, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """Box (y0, y1, x0, x1) whose sides are sqrt(1 - kept_ratio) of the image, centre uniform, clipped."""
    cut = np.sqrt(1.0 - kept_ratio)
    cut_h, cut_w = int(height * cut), int(width * cut)
    cy, cx = rng.integers(0, height), rng.integers(0, width)
    y0, y1 = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    x0, x1 = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    return int(y0), int(y1), int(x0), int(x1)


def _paste(images: np.ndarray, partner: np.ndarray, box: tuple[int, int, int, int]) -> float:
    """Pastes partner's box into images (in place); returns the fraction of the image left untouched."""
    y0, y1, x0, x1 = box
    images[..., y0:y1, x0:x1, :] = partner[..., y0:y1, x0:x1, :]
    return 1.0 - (y1 - y0) * (x1 - x0) / (images.shape[-3] * images.shape[-2])


def _mirror(n: int) -> np.ndarray:
    return np.arange(n)[::-1]


def mixup_deepmind(images: np.ndarray, rng: np.random.Generator, alpha: float):
    """Per-example MixUp with the mirrored partner; returns (mixed images, partner index, ratio [B])."""
    partner = _mirror(len(images))
    ratio = rng.beta(alpha, alpha, size=len(images)).astype(np.float32)
    mixed = ratio[:, None, None, None] * images + (1.0 - ratio[:, None, None, None]) * images[partner]
    return mixed.astype(np.float32), partner, ratio


def cutmix_deepmind(images: np.ndarray, rng: np.random.Generator, alpha: float):
    """Per-example CutMix with the mirrored partner; returns (mixed images, partner index, ratio [B])."""
    partner = _mirror(len(images))
    mixed, ratio = images.copy(), np.empty(len(images), np.float32)
    height, width = images.shape[1:3]
    for i, j in enumerate(partner):
        box = cutmix_box(height, width, rng.beta(alpha, alpha), rng)
        ratio[i] = _paste(mixed[i], images[j], box)
    return mixed, partner, ratio


def mix_deepmind(images, labels, rng, mixup_alpha: float, cutmix_alpha: float):
    """Half MixUp, half CutMix. images float [B, H, W, C], labels int [B] ->
    (images [B, H, W, C], partner labels [B], ratio [B])."""
    groups = []
    if mixup_alpha > 0 and cutmix_alpha > 0:
        half = len(images) // 2
        groups = [(slice(0, half), mixup_deepmind, mixup_alpha), (slice(half, None), cutmix_deepmind, cutmix_alpha)]
    elif mixup_alpha > 0:
        groups = [(slice(None), mixup_deepmind, mixup_alpha)]
    elif cutmix_alpha > 0:
        groups = [(slice(None), cutmix_deepmind, cutmix_alpha)]
    out, partner_labels, ratio = images.copy(), labels.copy(), np.ones(len(images), np.float32)
    for rows, fn, alpha in groups:
        out[rows], partner, ratio[rows] = fn(images[rows], rng, alpha)
        partner_labels[rows] = labels[rows][partner]
    return out, partner_labels, ratio


def mix_timm(images, labels, rng, mixup_alpha: float, cutmix_alpha: float, switch_prob: float):
    """timm's batch-mode Mixup: one ratio, one op per batch. Returns (images, partner labels, ratio [B])."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or rng.random() < switch_prob)
    lam = float(rng.beta(*(2 * [cutmix_alpha if use_cutmix else mixup_alpha])))
    partner = _mirror(len(images))
    if use_cutmix:
        out = images.copy()
        lam = _paste(out, images[partner], cutmix_box(images.shape[1], images.shape[2], lam, rng))
    else:
        out = (lam * images + (1.0 - lam) * images[partner]).astype(np.float32)
    return out, labels[partner], np.full(len(images), lam, np.float32)


def mix_batch(batch: dict, cfg, num_classes: int, rng: np.random.Generator) -> dict:
    """Adds 'label_probs' [B, K] (mixing, smoothing and BCE binarization as configured) to a train batch."""
    images, labels = batch["image"], batch["label"]
    probs = one_hot(labels, num_classes)
    if cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0:
        if cfg.mix_mode == "deepmind":
            images, partner_labels, ratio = mix_deepmind(images, labels, rng, cfg.mixup_alpha, cfg.cutmix_alpha)
        elif cfg.mix_mode == "timm":
            images, partner_labels, ratio = mix_timm(
                images, labels, rng, cfg.mixup_alpha, cfg.cutmix_alpha, cfg.switch_prob
            )
        else:
            raise ValueError(f"unknown mix_mode {cfg.mix_mode!r}; use 'deepmind' or 'timm'")
        probs = ratio[:, None] * probs + (1.0 - ratio[:, None]) * one_hot(partner_labels, num_classes)
    if cfg.label_smoothing > 0:
        probs = smooth_labels(probs, cfg.label_smoothing)
    if cfg.bce_target_thresh is not None:
        probs = bce_targets(probs, cfg.bce_target_thresh)
    return {**batch, "image": images, "label_probs": probs.astype(np.float32)}


def randaugment_after_mix(cfg) -> bool:
    """Whether RandAugment runs on the mixed images (DeepMind's order; see the module docstring)."""
    mixing = cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0
    return bool(mixing and cfg.randaugment_layers > 0 and not cfg.augment_before_mix)


def needs_label_probs(cfg) -> bool:
    """Whether train batches carry 'label_probs' (any of mixing, smoothing or BCE targets is on)."""
    return bool(
        cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0 or cfg.label_smoothing > 0 or cfg.bce_target_thresh is not None
    )
