"""Per-image TensorFlow preprocessing: decode, crops, flips, resizes, normalization.

All randomness is *stateless*: every function takes a ``seed`` (int32/int64 [2]) derived from
(seed, epoch, position in the epoch), so an example's augmentation does not depend on thread scheduling or on
where the pipeline was (re)started. Inputs are either encoded bytes (JPEG/PNG; JPEG crops are decoded with the
fused ``decode_and_crop_jpeg``, which only decodes the crop window) or decoded uint8 [H, W, C] tensors.
Outputs are float32 [H, W, C] in [0, 255] units (bicubic resizes can overshoot that range slightly, as in
DeepMind's pipeline).
"""

from __future__ import annotations

import numpy as np

from nfjax.data.tf_lazy import import_tf

# DeepMind's random-resized-crop parameters (Inception-style distorted bounding box).
RRC_AREA_RANGE = (0.08, 1.0)
RRC_ASPECT_RANGE = (3 / 4, 4 / 3)
RRC_MAX_ATTEMPTS = 10
RRC_MIN_OBJECT_COVERED = 0.1
CENTER_CROP_PADDING = 32  # DeepMind eval: resize to size + 32, crop size


def is_encoded(image) -> bool:
    return image.dtype == import_tf().string


def decode(image, channels: int):
    """Encoded bytes -> uint8 [H, W, channels]; a decoded tensor passes through."""
    tf = import_tf()
    if not is_encoded(image):
        return image
    return tf.io.decode_image(image, channels=channels, expand_animations=False)


def image_shape(image):
    """[H, W, C] of encoded JPEG bytes (header only) or of a decoded tensor."""
    return import_tf().image.extract_jpeg_shape(image) if is_encoded(image) else import_tf().shape(image)


def crop(image, window, channels: int):
    """Crops window [y, x, h, w]; JPEG bytes are decoded only inside the window."""
    tf = import_tf()
    if is_encoded(image):
        return tf.image.decode_and_crop_jpeg(image, tf.stack(window), channels=channels)
    return tf.image.crop_to_bounding_box(image, window[0], window[1], window[2], window[3])


def center_crop_window(shape, size: int, padding: int = CENTER_CROP_PADDING):
    """The largest centred window of aspect 1 that leaves ``padding`` px (at ``size`` scale) on the short side."""
    tf = import_tf()
    height, width = shape[0], shape[1]
    scale = tf.minimum(tf.cast(height, tf.float32), tf.cast(width, tf.float32)) / float(size + padding)
    side = tf.cast(scale * float(size), tf.int32)
    return [(height - side + 1) // 2, (width - side + 1) // 2, side, side]


def sample_crop_window(shape, seed, size: int, area_range=RRC_AREA_RANGE, aspect_range=RRC_ASPECT_RANGE):
    """DeepMind random-resized-crop window [y, x, h, w] for an image of ``shape`` [H, W, C].

    Up to 10 attempts at a box of area in area_range (relative) and aspect (w / h) in aspect_range; when all
    fail the sampler returns the whole image, which (as in DeepMind's code) is replaced by the padded center
    crop used at eval for output ``size``.
    """
    tf = import_tf()
    whole_image = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, box_size, _ = tf.image.stateless_sample_distorted_bounding_box(
        shape,
        bounding_boxes=whole_image,
        seed=seed,
        min_object_covered=RRC_MIN_OBJECT_COVERED,
        aspect_ratio_range=aspect_range,
        area_range=area_range,
        max_attempts=RRC_MAX_ATTEMPTS,
        use_image_if_no_bounding_boxes=True,
    )
    window = [begin[0], begin[1], box_size[0], box_size[1]]
    failed = tf.logical_and(tf.equal(box_size[0], shape[0]), tf.equal(box_size[1], shape[1]))
    fallback = center_crop_window(shape, size)
    return [tf.where(failed, f, w) for f, w in zip(fallback, window, strict=True)]


def torchvision_crop_window(shape, uniforms, area_range=RRC_AREA_RANGE, aspect_range=RRC_ASPECT_RANGE):
    """torchvision's ``RandomResizedCrop.get_params`` window [y, x, h, w] from ``uniforms`` float32 [4, 10] in
    [0, 1): per attempt the relative area (uniform in area_range), the log aspect (uniform in log aspect_range)
    and the top/left offsets. The first of 10 attempts whose rounded box fits is taken; when none fits, the
    centred crop of the whole image with its aspect clamped to aspect_range."""
    tf = import_tf()
    height, width = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    area = height * width * (area_range[0] + (area_range[1] - area_range[0]) * uniforms[0])
    log_lo, log_hi = np.log(aspect_range[0]), np.log(aspect_range[1])
    aspect = tf.exp(log_lo + (log_hi - log_lo) * uniforms[1])
    w, h = tf.round(tf.sqrt(area * aspect)), tf.round(tf.sqrt(area / aspect))
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = tf.argmax(tf.cast(fits, tf.int32))
    y = tf.floor(uniforms[2][first] * (height - h[first] + 1.0))
    x = tf.floor(uniforms[3][first] * (width - w[first] + 1.0))
    in_aspect = width / height
    fallback_w = tf.where(in_aspect > aspect_range[1], tf.round(height * aspect_range[1]), width)
    fallback_h = tf.where(in_aspect < aspect_range[0], tf.round(width / aspect_range[0]), height)
    fallback = [tf.floor((height - fallback_h) / 2), tf.floor((width - fallback_w) / 2), fallback_h, fallback_w]
    window = tf.where(tf.reduce_any(fits), tf.stack([y, x, h[first], w[first]]), tf.stack(fallback))
    return tf.unstack(tf.cast(window, tf.int32))


RRC_MODES = ("deepmind", "torchvision")
INTERPOLATIONS = ("bicubic", "bilinear", "random")


def resize(image, height: int, width: int, antialias: bool = False, method="bicubic"):
    """Resize to [height, width] as float32 (no clipping, like DeepMind); bicubic unless ``method`` says."""
    tf = import_tf()
    return tf.image.resize(tf.cast(image, tf.float32), [height, width], method=method, antialias=antialias)


def _resize_with(image, size: int, seed, interpolation: str, antialias: bool):
    """Resize to size x size with ``interpolation``; 'random' picks bilinear or bicubic per image from ``seed``
    (timm's default train interpolation)."""
    tf = import_tf()
    if interpolation != "random":
        return resize(image, size, size, antialias=antialias, method=interpolation)
    return tf.cond(
        tf.random.stateless_uniform([], seed) < 0.5,
        lambda: resize(image, size, size, antialias=antialias, method="bilinear"),
        lambda: resize(image, size, size, antialias=antialias, method="bicubic"),
    )


def random_resized_crop(image, size: int, seed, channels: int, mode: str = "deepmind", interpolation="bicubic"):
    """Encoded or decoded image -> float32 [size, size, channels] random-resized crop.

    mode 'deepmind': TF's distorted-bounding-box sampler with DeepMind's fallback; resized without antialiasing
      (DeepMind: bicubic).
    mode 'torchvision': ``torchvision_crop_window``; resized with antialiasing, as PIL does.
    ``interpolation``: 'bicubic', 'bilinear' or 'random' (one of the two per image).
    """
    tf = import_tf()
    if mode not in RRC_MODES:
        raise ValueError(f"unknown rrc_mode {mode!r}; use one of {', '.join(RRC_MODES)}")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"unknown train_interpolation {interpolation!r}; use one of {', '.join(INTERPOLATIONS)}")
    window_seed, method_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))

    def crop_and_resize(im):
        if mode == "deepmind":
            cropped = crop(im, sample_crop_window(image_shape(im), seed, size), channels)
        else:
            uniforms = tf.random.stateless_uniform([4, RRC_MAX_ATTEMPTS], window_seed)
            cropped = crop(im, torchvision_crop_window(image_shape(im), uniforms), channels)
        return _resize_with(cropped, size, method_seed, interpolation, antialias=mode == "torchvision")

    if not is_encoded(image):
        return crop_and_resize(image)
    # Only JPEG can be decoded inside a window; PNG (and others) are decoded whole first.
    return tf.cond(
        tf.io.is_jpeg(image),
        lambda: crop_and_resize(image),
        lambda: crop_and_resize(decode(image, channels)),
    )


def pad_and_random_crop(image, padding: int, seed):
    """Zero-pads ``padding`` px on each side, then crops a random window of the original size."""
    tf = import_tf()
    shape = tf.shape(image)
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, shape, seed=seed)


def random_flip(image, seed):
    return import_tf().image.stateless_random_flip_left_right(image, seed=seed)


def resize_to(image, size: int | None, channels: int):
    """Decodes and (only if needed) resizes to size x size (not aspect-preserving); float32."""
    tf = import_tf()
    image = decode(image, channels)
    if size is None:
        return tf.cast(image, tf.float32)
    if image.shape[:2].is_fully_defined():  # known when tracing (in-memory arrays): no branch to trace
        same_size = tuple(image.shape[:2]) == (size, size)
        return tf.cast(image, tf.float32) if same_size else resize(image, size, size)
    shape = tf.shape(image)
    same = tf.logical_and(tf.equal(shape[0], size), tf.equal(shape[1], size))
    return tf.cond(
        same,
        lambda: tf.cast(tf.ensure_shape(image, [size, size, channels]), tf.float32),
        lambda: resize(image, size, size),
    )


def eval_preprocess(image, size: int | None, mode: str, crop_pct: float, channels: int, interpolation="bicubic"):
    """Eval transform -> float32 [size, size, channels].

    'deepmind': resize (not aspect-preserving, bicubic) to (size + 32)^2, center-crop size.
    'crop_pct': timm / torchvision; resize the short side to floor(size / crop_pct) (aspect-preserving,
                antialiased, ``interpolation`` 'bicubic' (timm) or 'bilinear' (torchvision)), center-crop size.
    'none':     decode only (resize to size if the stored size differs).
    """
    if mode == "none" or size is None:
        return resize_to(image, size, channels)
    scaled = eval_resize(image, size, mode, crop_pct, channels, interpolation)
    return _crop_at(scaled, size, channels, *_center_offsets(scaled, size))


def eval_resize(image, size: int, mode: str, crop_pct: float, channels: int, interpolation="bicubic"):
    """The resize step of :func:`eval_preprocess` ('deepmind' or 'crop_pct'): float32 [H', W', channels] with
    H', W' >= size, before the crop."""
    tf = import_tf()
    image = decode(image, channels)
    if mode == "deepmind":
        return resize(image, size + CENTER_CROP_PADDING, size + CENTER_CROP_PADDING)
    if mode == "crop_pct":
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        short_side = float(int(size / crop_pct))
        new_hw = tf.cast(tf.round(shape * short_side / tf.reduce_min(shape)), tf.int32)
        new_hw = tf.maximum(new_hw, size)
        if interpolation not in ("bicubic", "bilinear"):
            raise ValueError(f"unknown eval_interpolation {interpolation!r}; use 'bicubic' or 'bilinear'")
        return tf.image.resize(tf.cast(image, tf.float32), new_hw, method=interpolation, antialias=True)
    raise ValueError(f"unknown eval_preprocess {mode!r}; use 'deepmind', 'crop_pct' or 'none'")


def _center_offsets(scaled, size: int):
    tf = import_tf()
    shape = tf.shape(scaled)
    return (shape[0] - size + 1) // 2, (shape[1] - size + 1) // 2


def _crop_at(scaled, size: int, channels: int, top, left):
    tf = import_tf()
    return tf.ensure_shape(scaled[top : top + size, left : left + size], [size, size, channels])


def five_crops(scaled, size: int, channels: int):
    """float32 [5, size, size, channels]: the top-left, top-right, bottom-left and bottom-right corners and the
    center crop (the one :func:`eval_preprocess` takes) of an image resized by :func:`eval_resize`."""
    tf = import_tf()
    shape = tf.shape(scaled)
    bottom, right = shape[0] - size, shape[1] - size
    corners = [(0, 0), (0, right), (bottom, 0), (bottom, right), _center_offsets(scaled, size)]
    return tf.stack([_crop_at(scaled, size, channels, top, left) for top, left in corners])


def normalize(image, mean, std, to_rgb: bool):
    """(x - 255 * mean) / (255 * std) per channel; a 1-channel image is first copied to 3 if ``to_rgb`` (so 3-value
    RGB statistics, e.g. of pretrained weights, apply per copied channel).

    With a static image shape the per-channel constants are expanded to the full [H, W, C] shape: TF's
    elementwise kernels broadcasting a [C] vector over the last axis were 4-5x slower than same-shape ones,
    which made normalization cost more than the random-resized crop itself.
    """
    tf = import_tf()
    if to_rgb and image.shape[-1] == 1:
        image = tf.tile(image, [1, 1, 3])
    shift = -np.asarray(mean, np.float32) / np.asarray(std, np.float32)
    scale = 1.0 / (255.0 * np.asarray(std, np.float32))
    if image.shape.is_fully_defined():
        shift, scale = np.broadcast_to(shift, image.shape).copy(), np.broadcast_to(scale, image.shape).copy()
    return image * tf.constant(scale) + tf.constant(shift)
