"""RandAugment in TensorFlow ops, in the forms the recipes use (``data.randaugment_variant``).

'deepmind': the 16-op RandAugment of DeepMind's NFNet code (nfnets/autoaugment.py, from the TPU EfficientNet
  code), equal to it pixel for pixel, quirks included: DeepMind's F0-F7 results were trained with them.
  tests/test_randaugment_reference.py checks every op against outputs of DeepMind's own code. Each of
  ``num_layers`` layers picks one op uniformly and ALWAYS applies it at the fixed ``magnitude`` (0..10 scale;
  the recipes use 5, 10, 15). Level -> argument, in Python float arithmetic as DeepMind does it: rotate
  30 deg * m/10, shear 0.3 * m/10, translate 100 px * m/10, posterize int(4 * m/10) bits, solarize threshold
  int(256 * m/10), solarize-add int(110 * m/10), enhance factor 1.8 * m/10 + 0.1, cutout half-size
  int(40 * m/10). Rotate, shear and translate negate their argument with probability 1/2. Fill gray 128,
  nearest sampling. Quirks: Solarize compares with the threshold wrapped to uint8 (m=10: 256 -> 0, every
  pixel inverted; m=15: 384 -> 128); Contrast blends with the gray level min(H*W/256, 255) (the sum of a
  256-bin histogram / 256), not the mean; Color, Contrast, Brightness and Sharpness truncate (their gray or
  smoothed image too); AutoContrast computes x*s - lo*s; Posterize with 0 bits (m < 2.5) keeps 1 bit (TF
  clamps the shift of 8 to 7). In this variant enhance ops at m=0 use factor 0.1 and Solarize at m=0 inverts
  every pixel, as in the reference.
'deepmind_fixed': the same ops, level maps and random draws without the quirks: the real threshold (>= 256
  leaves the image alone), the mean luma for Contrast, rounding in every blend, gray and smoothed image and
  in AutoContrast ((x - lo) * s), Posterize keeps between 1 and 8 bits. docs/data.md tabulates the differences.
'timm': ``rand-mM-mstdS-inc1`` (the RSB recipes): 15 ops (no Cutout), "increasing" forms whose strength
  grows with m; each layer picks an op uniformly, applies it with probability ``prob`` (0.5), with magnitude
  ~ N(M, S) clipped to [0, 10]. Rotate/shear as above, translate 0.45 * m/10 of the image size, posterize
  4 - int(4 * m/10) bits, solarize threshold 256 - int(256 * m/10), enhance factor 1 +- 0.9 * m/10; fill is
  the dataset mean, bilinear sampling, rounding blends.
Every op maps uint8 [H, W, C] (C = 1 or 3) to uint8 [H, W, C]. Randomness is stateless (``seed`` [2]).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

from nfjax.data.tf_lazy import import_tf

MAX_LEVEL = 10.0
VARIANTS = ("deepmind", "deepmind_fixed", "timm")


def _tf():
    return import_tf()


def _float(image):
    return _tf().cast(image, _tf().float32)


def _to_uint8(image):
    """Clips to [0, 255] and casts (the cast truncates toward zero)."""
    tf = _tf()
    return tf.cast(tf.clip_by_value(image, 0.0, 255.0), tf.uint8)


def blend(degenerate, image, factor, truncate: bool = False):
    """degenerate + factor * (image - degenerate), clipped to [0, 255] and rounded (``truncate``: truncated,
    as DeepMind's code does). Factor 0 gives ``degenerate`` and factor 1 ``image`` exactly either way."""
    mixed = _float(degenerate) + factor * (_float(image) - _float(degenerate))
    return _to_uint8(mixed if truncate else _tf().round(mixed))


def grayscale(image, truncate: bool = False):
    """Luma (ITU-R 601) replicated to the input's channel count; a 1-channel image is its own grayscale.
    Rounded; ``truncate``: TF's uint8 conversion (luma of x/255, times 255.5, truncated), as DeepMind."""
    tf = _tf()
    if image.shape[-1] == 1:
        return image
    if truncate:
        return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))
    luma = tf.image.rgb_to_grayscale(_float(image))
    return _to_uint8(tf.round(tf.tile(luma, [1, 1, 3])))


def autocontrast(image, truncate: bool = False):
    """Per channel, stretch [lo, hi] to [0, 255] with s = 255 / (hi - lo); constant channels are left alone.
    Rounds (x - lo) * s; ``truncate``: truncates x * s + (-lo * s), DeepMind's (and PIL's) float order."""
    tf = _tf()
    x = _float(image)
    low, high = tf.reduce_min(x, axis=[0, 1]), tf.reduce_max(x, axis=[0, 1])
    scale = 255.0 / tf.maximum(high - low, 1.0)  # hi - lo >= 1 wherever the result is used
    stretched = x * scale + (-low * scale) if truncate else tf.round((x - low) * scale)
    return tf.where(high > low, _to_uint8(stretched), image)


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


def posterize_deepmind(image, bits: int, quirks: bool):
    """Posterize with a Python int ``bits``. ``quirks``: DeepMind shifts the uint8 image by 8 - bits, which
    TF wraps to uint8 and its shift kernel clamps to 7 (bits 0 and bits > 8 keep 1 bit); else 1..8 bits."""
    shift = min((8 - bits) % 256, 7) if quirks else 8 - min(max(bits, 1), 8)
    tf = _tf()
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def solarize(image, threshold):
    """Inverts values >= threshold (threshold 256: identity)."""
    tf = _tf()
    return tf.where(tf.cast(image, tf.int32) < tf.cast(threshold, tf.int32), image, 255 - image)


def solarize_deepmind(image, threshold: int, quirks: bool):
    """Solarize with a Python int ``threshold``. ``quirks``: DeepMind compares the uint8 image with the int,
    which TF converts to uint8 first, so it wraps (256 -> 0: every pixel inverted; 384 -> 128)."""
    return solarize(image, threshold % 256 if quirks else threshold)


def solarize_add(image, addition, threshold=128):
    """Adds ``addition`` to values below threshold (addition 0: identity)."""
    tf = _tf()
    added = _to_uint8(_float(image) + tf.cast(addition, tf.float32))
    return tf.where(tf.cast(image, tf.int32) < threshold, added, image)


def color(image, factor, truncate: bool = False):
    return blend(grayscale(image, truncate), image, factor, truncate)


def contrast(image, factor, truncate: bool = False):
    """Blend with a constant image at the mean gray level."""
    tf = _tf()
    mean = tf.reduce_mean(_float(grayscale(image)))
    return blend(tf.fill(tf.shape(image), mean), image, factor, truncate)


def contrast_deepmind(image, factor):
    """DeepMind's Contrast: its "mean" is the sum of the gray histogram / 256, i.e. the pixel count / 256,
    clipped to 255 and truncated (144 at 192 px, 196 at 224 px, 255 from 256 px), whatever the image."""
    tf = _tf()
    pixels = tf.cast(tf.shape(image)[0] * tf.shape(image)[1], tf.float32)
    gray = tf.cast(tf.clip_by_value(pixels / 256.0, 0.0, 255.0), tf.uint8)
    return blend(tf.fill(tf.shape(image), gray), image, factor, truncate=True)


def brightness(image, factor, truncate: bool = False):
    return blend(_tf().zeros_like(image), image, factor, truncate)


def sharpness(image, factor, truncate: bool = False):
    """Blend with a 3x3 smoothed copy (kernel [[1,1,1],[1,5,1],[1,1,1]] / 13; border pixels unsmoothed).
    The smoothed copy is rounded (``truncate``: truncated, as the blend)."""
    tf = _tf()
    if truncate:
        smoothed = _smooth_as_deepmind(image)
    else:  # no pixel of the smoothed copy lies near .5 (S / 13 never does): any summation order rounds alike
        channels = image.shape[-1]
        kernel = tf.constant([[1.0, 1.0, 1.0], [1.0, 5.0, 1.0], [1.0, 1.0, 1.0]]) / 13.0
        kernel = tf.tile(kernel[:, :, None, None], [1, 1, channels, 1])
        smoothed = tf.round(tf.nn.depthwise_conv2d(_float(image)[None], kernel, [1, 1, 1, 1], "VALID")[0])
    smoothed = _float(_to_uint8(smoothed))
    smoothed = tf.pad(smoothed, [[1, 1], [1, 1], [0, 0]])
    interior = tf.pad(tf.ones_like(smoothed[1:-1, 1:-1]), [[1, 1], [1, 1], [0, 0]])
    degenerate = tf.where(interior > 0, smoothed, _float(image))
    return blend(degenerate, image, factor, truncate)


def _smooth_as_deepmind(image):
    """The interior of DeepMind's smoothed copy in float32, before it is truncated, the same on every CPU.

    DeepMind's code truncates a float32 depthwise convolution with the weights fl(1/13) and fl(5/13). Where the
    exact value S / 13 is a whole number, the float sum lands just above or just below it, and which one depends
    on the order of the nine products and on fused multiply-adds, which TensorFlow's kernel chooses per CPU: the
    recorded reference (AVX-512) and an AVX2 machine disagree on 26 of 45 test cases. This is the AVX-512 form,
    which reproduces all 45: the taps row by row, each added with one rounding (a fused multiply-add). The
    product of an 8-bit pixel and a float32 weight and its sum with a float32 partial fit float64 exactly, so
    rounding that sum to float32 is the fused multiply-add."""
    tf = _tf()
    third, centre = tf.constant(1.0) / 13.0, tf.constant(5.0) / 13.0  # float32 divisions, as DeepMind's kernel
    weights = [[third, third, third], [third, centre, third], [third, third, third]]
    pixels = tf.cast(image, tf.float64)
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    total = tf.zeros_like(pixels[1:-1, 1:-1], tf.float32)
    for i in range(3):
        for j in range(3):
            tap = pixels[i : height - 2 + i, j : width - 2 + j]
            total = tf.cast(tap * tf.cast(weights[i][j], tf.float64) + tf.cast(total, tf.float64), tf.float32)
    return total


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
    """Rotates about the image center (positive: counter-clockwise). Float32 arithmetic in the order of
    tensorflow_addons' rotate (which DeepMind's code calls), so the nearest-pixel choices match it."""
    tf = _tf()
    angle = tf.cast(degrees, tf.float32) * (math.pi / 180.0)
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
    """Moves the content ``pixels`` to the right."""
    matrix = _tf().stack([1.0, 0.0, -_tf().cast(pixels, "float32"), 0.0, 1.0, 0.0, 0.0, 0.0])
    return transform(image, matrix, fill, interpolation)


def translate_y(image, pixels, fill, interpolation="NEAREST"):
    """Moves the content ``pixels`` down."""
    matrix = _tf().stack([1.0, 0.0, 0.0, 0.0, 1.0, -_tf().cast(pixels, "float32"), 0.0, 0.0])
    return transform(image, matrix, fill, interpolation)


def cutout(image, half_size, fill, center):
    """Fills the square [cy - s, cy + s) x [cx - s, cx + s) (clipped) with ``fill``; ``center`` = (cy, cx)."""
    tf = _tf()
    height, width = tf.shape(image)[0], tf.shape(image)[1]
    cy, cx = center[0], center[1]
    rows, cols = tf.range(height)[:, None], tf.range(width)[None, :]
    inside = (rows >= cy - half_size) & (rows < cy + half_size) & (cols >= cx - half_size) & (cols < cx + half_size)
    fill_image = tf.cast(tf.ones_like(image, tf.float32) * tf.constant(fill, tf.float32)[: image.shape[-1]], tf.uint8)
    return tf.where(inside[..., None], fill_image, image)


class OpDraws(NamedTuple):
    """The random choices of one op: ``negate`` (bool scalar) flips the sign of a signed argument (rotate,
    shear, translate; timm's enhance factors); ``center`` int32 [2] is Cutout's (row, column) centre."""

    negate: Any
    center: Any


def draw_op_randomness(image, seed) -> OpDraws:
    """Both draws from one stateless ``seed`` [2]; the centre is uniform over the image's pixels."""
    tf = _tf()
    negate = tf.random.stateless_uniform([], seed) < 0.5
    center = tf.random.stateless_uniform([2], seed, minval=0, maxval=tf.int32.max, dtype=tf.int32)
    return OpDraws(negate, center % tf.shape(image)[:2])


def _signed(value, draws: OpDraws):
    return _tf().where(draws.negate, -value, value)


def _deepmind_ops(fill, quirks: bool):
    """(image, m: Python float, draws) -> image for DeepMind's 16 ops, in its order. Levels are computed in
    Python floats as DeepMind's code does, so float32 arguments are rounded once, from the same doubles."""
    f, q = fill, quirks
    enhance = lambda m: m / MAX_LEVEL * 1.8 + 0.1
    return [
        lambda im, m, d: autocontrast(im, q),
        lambda im, m, d: equalize(im),
        lambda im, m, d: invert(im),
        lambda im, m, d: rotate(im, _signed(m / MAX_LEVEL * 30.0, d), f),
        lambda im, m, d: posterize_deepmind(im, int(m / MAX_LEVEL * 4), q),
        lambda im, m, d: solarize_deepmind(im, int(m / MAX_LEVEL * 256), q),
        lambda im, m, d: color(im, enhance(m), q),
        lambda im, m, d: contrast_deepmind(im, enhance(m)) if q else contrast(im, enhance(m)),
        lambda im, m, d: brightness(im, enhance(m), q),
        lambda im, m, d: sharpness(im, enhance(m), q),
        lambda im, m, d: shear_x(im, _signed(m / MAX_LEVEL * 0.3, d), f),
        lambda im, m, d: shear_y(im, _signed(m / MAX_LEVEL * 0.3, d), f),
        # DeepMind's TranslateX/Y(p) moves the content by -p (left / up).
        lambda im, m, d: translate_x(im, -_signed(m / MAX_LEVEL * 100.0, d), f),
        lambda im, m, d: translate_y(im, -_signed(m / MAX_LEVEL * 100.0, d), f),
        lambda im, m, d: cutout(im, int(m / MAX_LEVEL * 40), f, d.center),
        lambda im, m, d: solarize_add(im, int(m / MAX_LEVEL * 110)),
    ]


def _timm_ops(fill):
    """(image, m: float32 scalar tensor, draws) -> image for timm's increasing ('inc1') ops, in its order."""
    f, bl = fill, "BILINEAR"
    enhance = lambda m, d: 1.0 + _signed(m / MAX_LEVEL * 0.9, d)
    size = lambda im, axis: _tf().cast(_tf().shape(im)[axis], "float32")
    return [
        lambda im, m, d: autocontrast(im, truncate=True),  # PIL's autocontrast: int(x * s + (-lo * s))
        lambda im, m, d: equalize(im),
        lambda im, m, d: invert(im),
        lambda im, m, d: rotate(im, _signed(m / MAX_LEVEL * 30.0, d), f, bl),
        lambda im, m, d: posterize(im, 4 - _int(m / MAX_LEVEL * 4)),
        lambda im, m, d: solarize(im, 256 - _int(m / MAX_LEVEL * 256)),
        lambda im, m, d: solarize_add(im, _int(m / MAX_LEVEL * 110)),
        lambda im, m, d: color(im, enhance(m, d)),
        lambda im, m, d: contrast(im, enhance(m, d)),
        lambda im, m, d: brightness(im, enhance(m, d)),
        lambda im, m, d: sharpness(im, enhance(m, d)),
        lambda im, m, d: shear_x(im, _signed(m / MAX_LEVEL * 0.3, d), f, bl),
        lambda im, m, d: shear_y(im, _signed(m / MAX_LEVEL * 0.3, d), f, bl),
        lambda im, m, d: translate_x(im, _signed(m / MAX_LEVEL * 0.45 * size(im, 1), d), f, bl),
        lambda im, m, d: translate_y(im, _signed(m / MAX_LEVEL * 0.45 * size(im, 0), d), f, bl),
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
    """The ops of ``variant``, each (image, magnitude, OpDraws) -> image; order of op_names(variant)."""
    if variant in ("deepmind", "deepmind_fixed"):
        return _deepmind_ops(fill, quirks=variant == "deepmind")
    if variant == "timm":
        return _timm_ops(fill)
    raise ValueError(f"unknown RandAugment variant {variant!r}; use one of {', '.join(map(repr, VARIANTS))}")


def op_names(variant: str) -> list[str]:
    return TIMM_OPS if variant == "timm" else DEEPMIND_OPS


def _level(variant: str, magnitude: float):
    """DeepMind's level maps run on the Python float; timm's on a float32 tensor (it may be randomized)."""
    return float(magnitude) if variant != "timm" else _tf().constant(float(magnitude))


def apply_op(
    image, name: str, magnitude: float, seed=None, variant: str = "deepmind", fill=(128, 128, 128), draws=None
):
    """Applies one named op (see op_names) at ``magnitude``; used by tests and tools. The random choices come
    from ``seed`` [2], or are given as ``draws`` (an OpDraws) to reproduce a particular draw."""
    op = op_table(variant, tuple(fill))[op_names(variant).index(name)]
    return op(image, _level(variant, magnitude), draw_op_randomness(image, seed) if draws is None else draws)


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

    deepmind, deepmind_fixed: every layer applies its op, at exactly ``magnitude``. timm: with probability
    ``prob``, at a magnitude drawn from N(magnitude, magnitude_std) clipped to [0, 10].
    """
    tf = _tf()
    ops = op_table(variant, tuple(fill))
    for layer_seed in tf.unstack(tf.random.experimental.stateless_split(seed, num_layers)):
        op_seed, magnitude_seed, apply_seed, arg_seed = tf.unstack(
            tf.random.experimental.stateless_split(layer_seed, 4)
        )
        index = tf.random.stateless_uniform([], op_seed, minval=0, maxval=len(ops), dtype=tf.int32)
        level = _level(variant, magnitude)
        if variant == "timm" and magnitude_std > 0:
            level = level + magnitude_std * tf.random.stateless_normal([], magnitude_seed)
            level = tf.clip_by_value(level, 0.0, MAX_LEVEL)
        draws = draw_op_randomness(image, arg_seed)
        branches = [functools.partial(op, image, level, draws) for op in ops]
        apply_layer = lambda b=branches, i=index, s=image.shape: tf.ensure_shape(tf.switch_case(i, b), s)
        if variant == "timm" and prob < 1.0:
            applied = tf.random.stateless_uniform([], apply_seed) < prob
            image = tf.cond(applied, apply_layer, lambda im=image: im)
        else:
            image = apply_layer()
    return image
