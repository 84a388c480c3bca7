"""RandAugment in TensorFlow ops, in the two forms the recipes use.

'deepmind': the 16-op variant of DeepMind's NFNet code (from the TPU EfficientNet autoaugment): each of
  ``num_layers`` layers picks one op uniformly and ALWAYS applies it at the fixed ``magnitude`` (0..10 scale).
  Level -> argument: rotate 30 deg * m/10, shear 0.3 * m/10, translate 100 px * m/10 (absolute pixels),
  posterize int(4 * m/10) bits, solarize threshold int(256 * m/10), solarize-add int(110 * m/10),
  enhance factor 1.8 * m/10 + 0.1, cutout half-size int(40 * m/10). Fill value gray 128, nearest sampling.
  Note: in this variant enhance ops at m=0 use factor 0.1 and Solarize at m=0 inverts every pixel.
'timm': ``rand-mM-mstdS-inc1`` (the RSB recipes): 15 ops (no Cutout), "increasing" forms whose strength
  grows with m; each layer picks an op uniformly, applies it with probability ``prob`` (0.5), with magnitude
  ~ N(M, S) clipped to [0, 10]. Rotate/shear as above, translate 0.45 * m/10 of the image size, posterize
  4 - int(4 * m/10) bits, solarize threshold 256 - int(256 * m/10), enhance factor 1 +- 0.9 * m/10; fill is
  the dataset mean, bilinear sampling.
Every op maps uint8 [H, W, C] (C = 1 or 3) to uint8 [H, W, C]. Randomness is stateless (``seed`` [2]).
"""

from __future__ import annotations

import functools
import math

from nfjax.data.tf_lazy import import_tf

MAX_LEVEL = 10.0


def _tf():
    return import_tf()


def _float(image):
    return _tf().cast(image, _tf().float32)


def _to_uint8(image):
    tf = _tf()
    return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)


def blend(degenerate, image, factor):
    """degenerate + factor * (image - degenerate), rounded and clipped to [0, 255]; factor 1 returns the
    image exactly (rounding absorbs float error; DeepMind truncates, PIL rounds)."""
    return _to_uint8(_tf().round(_float(degenerate) + factor * (_float(image) - _float(degenerate))))


def grayscale(image):
    """Luma (ITU-R 601) replicated to the input's channel count; a 1-channel image is its own grayscale."""
    tf = _tf()
    if image.shape[-1] == 1:
        return image
    luma = tf.image.rgb_to_grayscale(_float(image))
    return _to_uint8(tf.round(tf.tile(luma, [1, 1, 3])))


def autocontrast(image):
    """Per channel, stretch [min, max] to [0, 255]; constant channels are left alone."""
    tf = _tf()
    x = _float(image)
    low, high = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 1.0)
    offset = tf.where(high > low, low, 0.0)
    return _to_uint8((x - offset) * scale)


def _equalize_channel(channel):
    tf = _tf()
    values = tf.cast(channel, tf.int32)
    histogram = tf.histogram_fixed_width(values, [0, 255], nbins=256)
    nonzero = tf.boolean_mask(histogram, histogram != 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
        lut = (tf.cumsum(histogram) + step // 2) // tf.maximum(step, 1)
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.gather(lut, values)

    return tf.cast(tf.cond(step == 0, lambda: values, equalized), tf.uint8)


def equalize(image):
    """Per-channel histogram equalization (PIL ImageOps.equalize semantics)."""
    return _tf().stack([_equalize_channel(image[..., c]) for c in range(image.shape[-1])], axis=-1)


def invert(image):
    return 255 - image


def posterize(image, bits):
    """Keeps the top ``bits`` bits of each value (bits 8: identity; bits 0: black)."""
    tf = _tf()
    shift = 8 - tf.cast(bits, tf.int32)
    return tf.cast(tf.bitwise.left_shift(tf.bitwise.right_shift(tf.cast(image, tf.int32), shift), shift), tf.uint8)


def solarize(image, threshold):
    """Inverts values >= threshold (threshold 256: identity)."""
    tf = _tf()
    return tf.where(tf.cast(image, tf.int32) < tf.cast(threshold, tf.int32), image, 255 - image)


def solarize_add(image, addition, threshold=128):
    """Adds ``addition`` to values below threshold (addition 0: identity)."""
    tf = _tf()
    added = _to_uint8(_float(image) + tf.cast(addition, tf.float32))
    return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def color(image, factor):
    return blend(grayscale(image), image, factor)


def contrast(image, factor):
    """Blend with a constant image at the mean gray level."""
    tf = _tf()
    mean = tf.reduce_mean(_float(grayscale(image)))
    return blend(tf.fill(tf.shape(image), mean), image, factor)


def brightness(image, factor):
    return blend(_tf().zeros_like(image), image, factor)


def sharpness(image, factor):
    """Blend with a 3x3 smoothed copy (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13; border pixels unsmoothed)."""
    tf = _tf()
    channels = image.shape[-1]
    kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
    smoothed = tf.nn.depthwise_conv2d(_float(image)[None], kernel, [1, 1, 1, 1], "VALID")[0]
    smoothed = tf.pad(tf.round(smoothed), [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(smoothed[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior > 0, smoothed, _float(image))
    return blend(degenerate, image, factor)


def transform(image, matrix, fill, interpolation: str = "NEAREST"):
    """Projective transform; ``matrix`` [8] maps output (x, y) to input coordinates (TF convention).
    Pixels from outside the image get ``fill`` (one value per channel)."""
    tf = _tf()
    x = _float(image)
    # An extra all-255 channel tells, after the transform, how much of each output pixel came from inside.
    wrapped = tf.concat([x, tf.fill(tf.concat([tf.shape(x)[:2], [1]], 0), 255.0)], axis=-1)
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=wrapped[None],
        transforms=tf.cast(tf.reshape(matrix, [1, 8]), tf.float32),
        output_shape=tf.shape(x)[:2],
        fill_value=0.0,
        interpolation=interpolation,
        fill_mode="CONSTANT",
    )[0]
    inside = out[..., -1:] / 255.0
    fill = tf.constant(fill, tf.float32)[: image.shape[-1]]
    return _to_uint8(tf.round(out[..., :-1] + (1.0 - inside) * fill))


def rotate(image, degrees, fill, interpolation="NEAREST"):
    """Rotates about the image center (positive: counter-clockwise)."""
    tf = _tf()
    angle = tf.cast(degrees, tf.float32) * math.pi / 180.0
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    x_offset = ((width - 1) - (cos * (width - 1) - sin * (height - 1))) / 2.0
    y_offset = ((height - 1) - (sin * (width - 1) + cos * (height - 1))) / 2.0
    return transform(image, tf.stack([cos, -sin, x_offset, sin, cos, y_offset, 0.0, 0.0]), fill, interpolation)


def shear_x(image, level, fill, interpolation="NEAREST"):
    matrix = _tf().stack([1.0, _tf().cast(level, "float32"), 0.0, 0.0, 1.0, 0.0, 0.0, 0.0])
    return transform(image, matrix, fill, interpolation)


def shear_y(image, level, fill, interpolation="NEAREST"):
    matrix = _tf().stack([1.0, 0.0, 0.0, _tf().cast(level, "float32"), 1.0, 0.0, 0.0, 0.0])
    return transform(image, matrix, fill, interpolation)


def translate_x(image, pixels, fill, interpolation="NEAREST"):
    matrix = _tf().stack([1.0, 0.0, -_tf().cast(pixels, "float32"), 0.0, 1.0, 0.0, 0.0, 0.0])
    return transform(image, matrix, fill, interpolation)


def translate_y(image, pixels, fill, interpolation="NEAREST"):
    matrix = _tf().stack([1.0, 0.0, 0.0, 0.0, 1.0, -_tf().cast(pixels, "float32"), 0.0, 0.0])
    return transform(image, matrix, fill, interpolation)


def cutout(image, half_size, fill, seed):
    """Fills the square [cy - s, cy + s) x [cx - s, cx + s) (clipped) with ``fill``; centre uniform."""
    tf = _tf()
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    center = tf.random.stateless_uniform([2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
    cy, cx = center[0] % height, center[1] % width
    rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
    inside = (rows >= cy - half_size) & (rows < cy + half_size) & (cols >= cx - half_size) & (cols < cx + half_size)
    fill_image = tf.cast(tf.ones_like(image, tf.float32) * tf.constant(fill, tf.float32)[: image.shape[-1]], tf.uint8)
    return tf.where(inside[..., None], fill_image, image)


def _random_sign(value, seed):
    tf = _tf()
    return tf.where(tf.random.stateless_uniform([], seed) < 0.5, -value, value)


def _deepmind_ops(fill):
    """(image, m, seed) -> image for the 16 ops of DeepMind's RandAugment, in its order."""
    f = fill
    enhance = lambda m: m / MAX_LEVEL * 1.8 + 0.1
    return [
        lambda im, m, s: autocontrast(im),
        lambda im, m, s: equalize(im),
        lambda im, m, s: invert(im),
        lambda im, m, s: rotate(im, _random_sign(m / MAX_LEVEL * 30.0, s), f),
        lambda im, m, s: posterize(im, _int(m / MAX_LEVEL * 4)),
        lambda im, m, s: solarize(im, _int(m / MAX_LEVEL * 256)),
        lambda im, m, s: color(im, enhance(m)),
        lambda im, m, s: contrast(im, enhance(m)),
        lambda im, m, s: brightness(im, enhance(m)),
        lambda im, m, s: sharpness(im, enhance(m)),
        lambda im, m, s: shear_x(im, _random_sign(m / MAX_LEVEL * 0.3, s), f),
        lambda im, m, s: shear_y(im, _random_sign(m / MAX_LEVEL * 0.3, s), f),
        lambda im, m, s: translate_x(im, _random_sign(m / MAX_LEVEL * 100.0, s), f),
        lambda im, m, s: translate_y(im, _random_sign(m / MAX_LEVEL * 100.0, s), f),
        lambda im, m, s: cutout(im, _int(m / MAX_LEVEL * 40), f, s),
        lambda im, m, s: solarize_add(im, _int(m / MAX_LEVEL * 110)),
    ]


def _timm_ops(fill):
    """(image, m, seed) -> image for timm's increasing ('inc1') RandAugment ops, in its order."""
    f, bl = fill, "BILINEAR"
    enhance = lambda m, s: 1.0 + _random_sign(m / MAX_LEVEL * 0.9, s)
    size = lambda im, axis: _tf().cast(_tf().shape(im)[axis], "float32")
    return [
        lambda im, m, s: autocontrast(im),
        lambda im, m, s: equalize(im),
        lambda im, m, s: invert(im),
        lambda im, m, s: rotate(im, _random_sign(m / MAX_LEVEL * 30.0, s), f, bl),
        lambda im, m, s: posterize(im, 4 - _int(m / MAX_LEVEL * 4)),
        lambda im, m, s: solarize(im, 256 - _int(m / MAX_LEVEL * 256)),
        lambda im, m, s: solarize_add(im, _int(m / MAX_LEVEL * 110)),
        lambda im, m, s: color(im, enhance(m, s)),
        lambda im, m, s: contrast(im, enhance(m, s)),
        lambda im, m, s: brightness(im, enhance(m, s)),
        lambda im, m, s: sharpness(im, enhance(m, s)),
        lambda im, m, s: shear_x(im, _random_sign(m / MAX_LEVEL * 0.3, s), f, bl),
        lambda im, m, s: shear_y(im, _random_sign(m / MAX_LEVEL * 0.3, s), f, bl),
        lambda im, m, s: translate_x(im, _random_sign(m / MAX_LEVEL * 0.45 * size(im, 1), s), f, bl),
        lambda im, m, s: translate_y(im, _random_sign(m / MAX_LEVEL * 0.45 * size(im, 0), s), f, bl),
    ]


def _int(value):
    """Python-int-like truncation for a float tensor (the ops' level arguments are integers)."""
    return _tf().cast(value, _tf().int32)


DEEPMIND_OPS = (
    "AutoContrast Equalize Invert Rotate Posterize Solarize Color Contrast Brightness Sharpness "
    "ShearX ShearY TranslateX TranslateY Cutout SolarizeAdd"
).split()
TIMM_OPS = (
    "AutoContrast Equalize Invert Rotate PosterizeIncreasing SolarizeIncreasing SolarizeAdd ColorIncreasing "
    "ContrastIncreasing BrightnessIncreasing SharpnessIncreasing ShearX ShearY TranslateXRel TranslateYRel"
).split()


@functools.cache
def op_table(variant: str, fill: tuple) -> list:
    if variant == "deepmind":
        return _deepmind_ops(fill)
    if variant == "timm":
        return _timm_ops(fill)
    raise ValueError(f"unknown RandAugment variant {variant!r}; use 'deepmind' or 'timm'")


def apply_op(image, name: str, magnitude: float, seed, variant: str = "deepmind", fill=(128, 128, 128)):
    """Applies one named op (see DEEPMIND_OPS / TIMM_OPS) at ``magnitude``; used by tests and tools."""
    names = DEEPMIND_OPS if variant == "deepmind" else TIMM_OPS
    op = op_table(variant, tuple(fill))[names.index(name)]
    return op(image, _tf().constant(float(magnitude)), seed)


def randaugment(
    image,
    seed,
    *,
    num_layers: int,
    magnitude: float,
    variant: str = "deepmind",
    magnitude_std: float = 0.0,
    prob: float = 1.0,
    fill=(128, 128, 128),
):
    """Applies ``num_layers`` random ops to a uint8 [H, W, C] image; returns uint8 [H, W, C].

    deepmind: every layer applies its op, at exactly ``magnitude``. timm: with probability ``prob``, at a
    magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10].
    """
    tf = _tf()
    ops = op_table(variant, tuple(fill))
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
        op_seed, magnitude_seed, apply_seed, arg_seed = tf.unstack(
            tf.random.experimental.stateless_split(layer_seed, 4)
        )
        index = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(ops), dtype=tf.int32)
        level = tf.constant(float(magnitude))
        if variant == "timm" and magnitude_std > 0:
            level = level + magnitude_std * tf.random.stateless_normal([], magnitude_seed)
            level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
        branches = [functools.partial(op, image, level, arg_seed) for op in ops]
        apply_layer = lambda b=branches, i=index, s=image.shape: tf.ensure_shape(tf.switch_case(i, b), s)
        if variant == "timm" and prob < 1.0:
            applied = tf.random.stateless_uniform([], apply_seed) < prob
            image = tf.cond(applied, apply_layer, lambda im=image: im)
        else:
            image = apply_layer()
    return image
