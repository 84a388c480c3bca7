"""RandAugment 'deepmind' equals DeepMind's nfnets/autoaugment.py pixel for pixel; 'deepmind_fixed' departs
from it only where docs/data.md says.

The reference outputs were recorded from DeepMind's own code, with its random draws forced, by
scripts/make_randaugment_reference.py (tests/data/randaugment/deepmind_ops.npz); no DeepMind code runs here.
"""

import json
import os

import numpy as np
import pytest

from nfjax.data import config as data_config
from nfjax.data import randaugment as ra
from nfjax.data import tfdata_backend
from nfjax.data.tf_lazy import import_tf

tf = import_tf()
REFERENCE = os.path.join(os.path.dirname(__file__), "data", "randaugment", "deepmind_ops.npz")
QUIRKY_OPS = {"AutoContrast", "Posterize", "Solarize", "Color", "Contrast", "Brightness", "Sharpness"}


@pytest.fixture(scope="module")
def reference():
    with np.load(REFERENCE) as stored:
        arrays = {key: stored[key] for key in stored.files}
    return json.loads(str(arrays.pop("cases"))), arrays


def _draws(negate, center):
    return ra.OpDraws(tf.constant(negate), tf.constant(center, tf.int32))


def _run(arrays, case, variant="deepmind"):
    """The case's layers applied in order, each with the draws DeepMind's code was given."""
    image = tf.constant(arrays["image/" + case["image"]])
    for name, negate, center in case["layers"]:
        image = ra.apply_op(image, name, case["magnitude"], variant=variant, draws=_draws(negate, center))
    return image.numpy()


def _group(case):
    return case["layers"][0][0] if len(case["layers"]) == 1 else "4 layers"


def _mismatches(arrays, cases):
    return [
        f"{c['image']} m={c['magnitude']} {c['layers']}"
        for c in cases
        if not np.array_equal(_run(arrays, c), arrays[c["out"]])
    ]


def test_reference_covers_every_op_and_the_recipe_magnitudes(reference):
    cases, arrays = reference
    assert {_group(c) for c in cases} == set(ra.DEEPMIND_OPS) | {"4 layers"}
    assert {0, 2, 2.5, 5, 10, 15} <= {c["magnitude"] for c in cases}
    assert {c["magnitude"] for c in cases if len(c["layers"]) == 4} == {5, 10, 15}
    assert {arrays["image/" + c["image"]].shape[:2] for c in cases} >= {(16, 16), (256, 256)}
    assert {c["layers"][0][1] for c in cases if _group(c) == "Rotate"} == {True, False}  # both signs


@pytest.mark.parametrize("group", ra.DEEPMIND_OPS + ["4 layers"])
def test_deepmind_variant_equals_deepmind_code(reference, group):
    cases, arrays = reference
    selected = [c for c in cases if _group(c) == group]
    mismatches = _mismatches(arrays, selected)
    assert selected and not mismatches, f"{len(mismatches)} of {len(selected)} differ: {mismatches[:5]}"


def test_deepmind_variant_traced_in_tf_data_equals_deepmind_code(reference):
    """Training runs the ops inside tf.data maps (graphs, not eager); they must match there too."""
    cases, arrays = reference
    selected = [
        c
        for c in cases
        if c["image"] == "smooth_32x40" and (len(c["layers"]) > 1 or (c["magnitude"] == 15 and c["layers"][0][1]))
    ]
    for case in selected:
        dataset = tf.data.Dataset.from_tensors(arrays["image/" + case["image"]])
        dataset = dataset.map(lambda x, c=case: _apply_layers(x, c["layers"], c["magnitude"]))
        out = next(iter(dataset)).numpy()
        assert np.array_equal(out, arrays[case["out"]]), f"{case['magnitude']} {case['layers']}"


def _apply_layers(image, layers, magnitude):
    for name, negate, center in layers:
        image = ra.apply_op(image, name, magnitude, draws=_draws(negate, center))
    return image


def test_fixed_variant_departs_from_deepmind_only_in_its_quirky_ops(reference):
    cases, arrays = reference
    single = [c for c in cases if len(c["layers"]) == 1]
    differing = {_group(c) for c in single if not np.array_equal(_run(arrays, c, "deepmind_fixed"), arrays[c["out"]])}
    assert differing == QUIRKY_OPS


def _op(image, name, magnitude, variant):
    return ra.apply_op(tf.constant(image), name, magnitude, tf.constant([0, 1], tf.int64), variant).numpy()


def test_fixed_solarize_uses_the_real_threshold():
    image = np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    for m in (10, 15, 20):  # thresholds 256, 384, 512: nothing reaches them
        np.testing.assert_array_equal(_op(image, "Solarize", m, "deepmind_fixed"), image)
    np.testing.assert_array_equal(_op(image, "Solarize", 10, "deepmind"), 255 - image)  # 256 wraps to 0
    np.testing.assert_array_equal(_op(image, "Solarize", 15, "deepmind"), np.where(image < 128, image, 255 - image))
    np.testing.assert_array_equal(_op(image, "Solarize", 5, "deepmind_fixed"), _op(image, "Solarize", 5, "deepmind"))


def test_fixed_contrast_blends_with_the_mean_gray():
    image = np.full((16, 16, 3), 100, np.uint8)
    image[8:] = 200  # mean gray 150
    out = _op(image, "Contrast", 10, "deepmind_fixed")  # factor 1.9: 150 -+ 1.9 * 50
    np.testing.assert_array_equal(out[:8], 55)
    np.testing.assert_array_equal(out[8:], 245)
    # DeepMind's gray level is the pixel count / 256 = 1: 1 + 1.9 * 99 = 189.1, 1 + 1.9 * 199 > 255.
    np.testing.assert_array_equal(_op(image, "Contrast", 10, "deepmind")[:8], 189)
    constant = np.full((32, 32, 3), 77, np.uint8)
    for m in (0, 2, 15):
        np.testing.assert_array_equal(_op(constant, "Contrast", m, "deepmind_fixed"), constant)
        assert not np.array_equal(_op(constant, "Contrast", m, "deepmind"), constant)


def test_fixed_blends_round_and_deepmind_truncates():
    image = np.full((8, 8, 3), 255, np.uint8)  # factor 0.1 at m=0: 25.5
    assert (_op(image, "Brightness", 0, "deepmind_fixed") == 26).all()
    assert (_op(image, "Brightness", 0, "deepmind") == 25).all()


def test_posterize_bits_at_the_ends_of_the_magnitude_range():
    image = np.arange(256, dtype=np.uint8).reshape(16, 16, 1).repeat(3, -1)
    for variant in ("deepmind", "deepmind_fixed"):  # int(4 * m / 10) = 0 bits: both keep 1 bit, not black
        np.testing.assert_array_equal(_op(image, "Posterize", 2, variant), image & 0x80)
    np.testing.assert_array_equal(_op(image, "Posterize", 25, "deepmind_fixed"), image)  # 10 bits: identity
    np.testing.assert_array_equal(_op(image, "Posterize", 25, "deepmind"), image & 0x80)  # shift -2 wraps, clamps to 7


def test_fixed_autocontrast_rounds_the_stretch():
    image = np.random.default_rng(1).integers(30, 200, (24, 24, 3), dtype=np.uint8)
    out = _op(image, "AutoContrast", 5, "deepmind_fixed").astype(np.float64)
    low, high = image.min((0, 1)), image.max((0, 1))
    exact = (image - low) * 255.0 / (high - low)
    assert np.abs(out - exact).max() <= 0.5 + 1e-4
    assert (out.min((0, 1)) == 0).all() and (out.max((0, 1)) == 255).all()


def test_variants_run_in_the_training_transform():
    cfg = data_config.default_data_config()
    cfg.image_size, cfg.random_resized_crop, cfg.randaugment_layers = 24, False, 1
    image = tf.constant(np.random.default_rng(2).integers(0, 256, (24, 24, 3), dtype=np.uint8))
    outputs = {}
    for variant in ra.VARIANTS:
        cfg.randaugment_variant = variant
        transform = tfdata_backend.make_train_stages(
            cfg, 3, 24, data_config.IMAGENET_MEAN, data_config.IMAGENET_STD, 10, 0
        ).per_image
        dataset = tf.data.Dataset.from_tensors((image, 0)).map(
            lambda x, y, t=transform: t(x, y, tf.constant([3, 4], tf.int64))
        )
        outputs[variant] = next(iter(dataset))["image"].numpy()
        assert outputs[variant].shape == (24, 24, 3) and np.isfinite(outputs[variant]).all()
    cfg.randaugment_variant = "deepmind_v2"
    with pytest.raises(ValueError, match="deepmind_fixed"):
        tfdata_backend.make_train_stages(
            cfg, 3, 24, data_config.IMAGENET_MEAN, data_config.IMAGENET_STD, 10, 0
        ).per_image(image, 0, tf.constant([3, 4], tf.int64))
