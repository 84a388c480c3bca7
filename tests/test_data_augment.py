"""Each augmentation against its definition."""

import numpy as np
import pytest

from nfjax.data import augment, mix, numpy_backend
from nfjax.data import randaugment as ra
from nfjax.data.tf_lazy import import_tf

tf = import_tf()


def _seed(i):
    return tf.constant([7, i], tf.int64)


def _image(h=32, w=40, c=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)


def _constant_batch(n, h=8, w=8):
    """Example k is the constant image k + 1 with label k, so pixels tell where they came from."""
    images = np.broadcast_to(np.arange(1, n + 1, dtype=np.float32)[:, None, None, None], (n, h, w, 1)).copy()
    return images, np.arange(n, dtype=np.int32)


def _check_mixed(images, out, labels, partner_labels, ratio, num_classes, cut):
    probs = ratio[:, None] * mix.one_hot(labels, num_classes) + (1 - ratio[:, None]) * mix.one_hot(
        partner_labels, num_classes
    )
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)
    own, other = labels + 1.0, partner_labels + 1.0
    for i in range(len(out)):
        if own[i] == other[i]:
            continue
        if cut:  # every pixel is the image's own value or its partner's; the own share is the ratio
            assert np.isin(out[i], [own[i], other[i]]).all()
            np.testing.assert_allclose((out[i] == own[i]).mean(), ratio[i], atol=1e-6)
        else:
            np.testing.assert_allclose(out[i], ratio[i] * own[i] + (1 - ratio[i]) * other[i], rtol=1e-5)


def test_deepmind_mixup_cutmix_halves():
    images, labels = _constant_batch(16)
    rng = np.random.default_rng(0)
    out, partner_labels, ratio = mix.mix_deepmind(images, labels, rng, mixup_alpha=0.2, cutmix_alpha=1.0)
    _check_mixed(images[:8], out[:8], labels[:8], partner_labels[:8], ratio[:8], 16, cut=False)
    _check_mixed(images[8:], out[8:], labels[8:], partner_labels[8:], ratio[8:], 16, cut=True)
    assert set(partner_labels[:8]) == set(labels[:8])  # partners come from the same half
    assert len(set(ratio[:8])) == 8  # per-example MixUp ratios


@pytest.mark.parametrize("switch_prob,cut", [(0.0, False), (1.0, True)])
def test_timm_mixup_cutmix(switch_prob, cut):
    images, labels = _constant_batch(10, 16, 16)
    out, partner_labels, ratio = mix.mix_timm(images, labels, np.random.default_rng(1), 0.2, 1.0, switch_prob)
    assert len(set(ratio)) == 1  # one ratio per batch
    np.testing.assert_array_equal(partner_labels, labels[::-1])
    _check_mixed(images, out, labels, partner_labels, ratio, 10, cut=cut)


def test_mix_batch_targets_smoothing_and_bce():
    class Cfg:
        mixup_alpha, cutmix_alpha, mix_mode, switch_prob = 0.0, 0.0, "deepmind", 0.5
        label_smoothing, bce_target_thresh = 0.1, None

    images, labels = _constant_batch(4)
    out = mix.mix_batch({"image": images, "label": labels}, Cfg, 10, np.random.default_rng(0))
    expected = np.full((4, 10), 0.01, np.float32)
    expected[np.arange(4), labels] = 0.91  # 1 - 0.1 + 0.1 / 10
    np.testing.assert_allclose(out["label_probs"], expected, rtol=1e-6)
    np.testing.assert_array_equal(mix.bce_targets(np.array([[0.1, 0.2, 0.21, 0.7]]), 0.2), [[0, 0, 1, 1]])
    Cfg.bce_target_thresh = 0.2
    out = mix.mix_batch({"image": images, "label": labels}, Cfg, 10, np.random.default_rng(0))
    np.testing.assert_array_equal(out["label_probs"], mix.one_hot(labels, 10))


IDENTITY_AT_ZERO = {
    "deepmind": ["Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY", "Cutout", "SolarizeAdd"],
    "timm": [
        "Rotate",
        "SolarizeIncreasing",
        "SolarizeAdd",
        "ColorIncreasing",
        "ContrastIncreasing",
        "BrightnessIncreasing",
        "SharpnessIncreasing",
        "ShearX",
        "ShearY",
        "TranslateXRel",
        "TranslateYRel",
    ],
}


@pytest.mark.parametrize("variant", ["deepmind", "timm"])
@pytest.mark.parametrize("channels", [1, 3])
def test_randaugment_ops_at_magnitude_zero_are_identities(variant, channels):
    image = tf.constant(_image(c=channels))
    for name in IDENTITY_AT_ZERO[variant]:
        out = ra.apply_op(image, name, 0.0, _seed(3), variant)
        np.testing.assert_array_equal(out.numpy(), image.numpy(), err_msg=name)


def test_randaugment_ops_that_are_not_identities():
    image = _image()
    x = tf.constant(image)
    np.testing.assert_array_equal(ra.apply_op(x, "Invert", 0.0, _seed(0)).numpy(), 255 - image)
    np.testing.assert_array_equal(ra.apply_op(x, "Solarize", 0.0, _seed(0)).numpy(), 255 - image)  # threshold 0
    np.testing.assert_array_equal(ra.apply_op(x, "Posterize", 10.0, _seed(0)).numpy(), image & 0xF0)  # 4 bits
    np.testing.assert_array_equal(ra.apply_op(x, "PosterizeIncreasing", 0.0, _seed(0), "timm").numpy(), image & 0xF0)
    assert ra.apply_op(x, "Brightness", 0.0, _seed(0)).numpy().max() <= 26  # factor 0.1
    auto = ra.autocontrast(tf.constant(image // 2 + 10)).numpy()
    assert (auto.min(axis=(0, 1)) == 0).all() and (auto.max(axis=(0, 1)) == 255).all()
    cut = ra.apply_op(x, "Cutout", 10.0, _seed(5)).numpy()
    assert 0 < (cut != image).any(-1).sum() <= 80 * 80 and (cut[(cut != image).any(-1)] == 128).all()
    translated = ra.translate_x(x, 5, (128, 128, 128)).numpy()
    np.testing.assert_array_equal(translated[:, 5:], image[:, :-5])
    assert (translated[:, :5] == 128).all()


def test_randaugment_layers_deterministic_per_seed():
    image = tf.constant(_image())
    for variant in ("deepmind", "timm"):
        run = lambda s, v=variant: ra.randaugment(
            image, _seed(s), num_layers=3, magnitude=9, variant=v, magnitude_std=0.5, prob=0.5
        ).numpy()
        np.testing.assert_array_equal(run(1), run(1))
        assert run(1).dtype == np.uint8 and run(1).shape == image.shape
        assert any(not np.array_equal(run(1), run(s)) for s in range(2, 6))


def test_random_resized_crop_window_bounds():
    shape = tf.constant([375, 500, 3])
    center = [int(v) for v in augment.center_crop_window(shape, 224)]
    for i in range(200):
        y, x, h, w = (int(v) for v in augment.sample_crop_window(shape, _seed(i), 224))
        assert 0 <= y and 0 <= x and y + h <= 375 and x + w <= 500
        if [y, x, h, w] == center:
            continue
        assert 0.08 <= h * w / (375 * 500) <= 1.0
        assert 3 / 4 - 0.02 <= w / h <= 4 / 3 + 0.02  # integer rounding of the box sides
    crop = augment.random_resized_crop(tf.constant(_image(64, 48)), 24, _seed(0), 3)
    assert crop.shape == (24, 24, 3) and crop.dtype == tf.float32


def _torchvision_window(height, width, u, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params written out in NumPy, with its random draws given as ``u``
    [4, 10] uniforms (area, log aspect, top, left per attempt). Returns (window, whether no attempt fitted)."""
    area = height * width
    for k in range(10):
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0, k])
        aspect = np.exp(np.log(ratio[0]) + (np.log(ratio[1]) - np.log(ratio[0])) * u[1, k])
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return [int(u[2, k] * (height - h + 1)), int(u[3, k] * (width - w + 1)), h, w], False
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        w, h = int(round(height * max(ratio))), height
    else:
        w, h = width, height
    return [(height - h) // 2, (width - w) // 2, h, w], True


@pytest.mark.parametrize("shape", [(375, 500), (500, 333), (64, 64), (12, 300), (300, 9)])
def test_torchvision_crop_window_equals_torchvision_get_params(shape):
    rng = np.random.default_rng(shape[0])
    fallbacks = 0
    for _ in range(60):
        u = rng.random((4, 10)).astype(np.float32)
        got = [int(v) for v in augment.torchvision_crop_window(tf.constant([*shape, 3]), tf.constant(u))]
        want, fallback = _torchvision_window(*shape, u.astype(np.float64))
        assert got == want
        fallbacks += fallback
    if shape[0] * 10 < shape[1] or shape[1] * 10 < shape[0]:  # no box fits a sliver: always the fallback
        assert fallbacks == 60


def test_torchvision_random_resized_crop_uses_its_interpolation():
    image = tf.constant(_image(64, 48))
    outs = {
        m: augment.random_resized_crop(image, 24, _seed(3), 3, "torchvision", m).numpy() for m in augment.INTERPOLATIONS
    }
    assert all(o.shape == (24, 24, 3) for o in outs.values())
    assert not np.allclose(outs["bilinear"], outs["bicubic"])
    randoms = [augment.random_resized_crop(image, 24, _seed(i), 3, "torchvision", "random") for i in range(12)]
    picked = {
        m
        for i, r in enumerate(randoms)
        for m in ("bilinear", "bicubic")
        if np.array_equal(r, augment.random_resized_crop(image, 24, _seed(i), 3, "torchvision", m))
    }
    assert picked == {"bilinear", "bicubic"}  # 'random' is one of the two, per image
    with pytest.raises(ValueError, match="rrc_mode"):
        augment.random_resized_crop(image, 24, _seed(0), 3, "inception")


def test_jpeg_fused_crop_equals_decode_then_crop():
    encoded = tf.io.encode_jpeg(tf.constant(_image(64, 80)), quality=95)
    window = [5, 7, 30, 40]
    fused = augment.crop(encoded, window, 3).numpy()
    plain = augment.crop(tf.io.decode_jpeg(encoded), window, 3).numpy()
    assert np.abs(fused.astype(int) - plain).max() <= 2  # libjpeg may upsample chroma slightly differently


def test_flips_are_flips():
    image = _image()
    outs = [augment.random_flip(tf.constant(image), _seed(i)).numpy() for i in range(16)]
    assert all(np.array_equal(o, image) or np.array_equal(o, image[:, ::-1]) for o in outs)
    assert any(np.array_equal(o, image[:, ::-1]) for o in outs) and any(np.array_equal(o, image) for o in outs)
    batch = np.stack([_image(seed=i) for i in range(32)])
    flipped = numpy_backend.random_flip(batch, np.random.default_rng(0))
    mirrored = [np.array_equal(f, b[:, ::-1]) for f, b in zip(flipped, batch, strict=True)]
    assert all(m or np.array_equal(f, b) for m, f, b in zip(mirrored, flipped, batch, strict=True))
    assert 4 < sum(mirrored) < 28


def _is_window_of(out, padded):
    h, w = out.shape[:2]
    return any(
        np.array_equal(out, padded[t : t + h, s : s + w])
        for t in range(padded.shape[0] - h + 1)
        for s in range(padded.shape[1] - w + 1)
    )


def test_pad_crop_content_comes_from_the_padded_image():
    batch = np.stack([_image(12, 10, 1, seed=i) for i in range(8)])
    out = numpy_backend.pad_and_random_crop(batch, 3, np.random.default_rng(0))
    padded = np.pad(batch, [(0, 0), (3, 3), (3, 3), (0, 0)])
    assert out.shape == batch.shape and all(_is_window_of(o, p) for o, p in zip(out, padded, strict=True))
    assert not all(np.array_equal(o, b) for o, b in zip(out, batch, strict=True))
    tf_out = augment.pad_and_random_crop(tf.constant(batch[0]), 3, _seed(1)).numpy()
    assert _is_window_of(tf_out, padded[0])


def test_eval_preprocess_protocols():
    image = _image(60, 90)
    deepmind = augment.eval_preprocess(tf.constant(image), 32, "deepmind", 0.875, 3).numpy()
    resized = tf.image.resize(tf.cast(image, tf.float32), [64, 64], method="bicubic").numpy()
    np.testing.assert_allclose(deepmind, resized[16:48, 16:48], rtol=1e-6)
    timm = augment.eval_preprocess(tf.constant(image), 32, "crop_pct", 0.875, 3).numpy()
    short = tf.image.resize(tf.cast(image, tf.float32), [36, 54], method="bicubic", antialias=True).numpy()
    np.testing.assert_allclose(timm, short[2:34, 11:43], rtol=1e-6)  # 32 / 0.875 -> 36 px short side
    torchvision = augment.eval_preprocess(tf.constant(image), 32, "crop_pct", 0.875, 3, "bilinear").numpy()
    short = tf.image.resize(tf.cast(image, tf.float32), [36, 54], method="bilinear", antialias=True).numpy()
    np.testing.assert_allclose(torchvision, short[2:34, 11:43], rtol=1e-6)
    none = augment.eval_preprocess(tf.constant(image[:32, :32]), 32, "none", 0.875, 3).numpy()
    np.testing.assert_array_equal(none, image[:32, :32])


def test_normalize_matches_definition():
    image = _image(4, 4, 1)
    mean, std = (0.2860,), (0.3530,)
    expected = (image.astype(np.float32) - 255 * 0.2860) / (255 * 0.3530)
    np.testing.assert_allclose(numpy_backend.normalize(image[None], mean, std, False)[0], expected, rtol=1e-5)
    tf_rgb = augment.normalize(tf.cast(tf.constant(image), tf.float32), mean, std, True).numpy()
    np.testing.assert_allclose(tf_rgb, np.repeat(expected, 3, -1), rtol=1e-5)


def test_grayscale_copied_to_rgb_takes_rgb_statistics():
    """RGB pretrained weights fine-tuned on grayscale data: the copy to RGB comes first, then each copied channel
    is normalized with its own mean/std, on both backends."""
    from ml_collections import ConfigDict

    from nfjax.data.config import mean_std

    gray = np.random.RandomState(0).randint(0, 256, (2, 6, 5, 1), np.uint8)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    expected = (np.repeat(gray, 3, -1).astype(np.float32) / 255.0 - np.float32(mean)) / np.float32(std)
    got_np = numpy_backend.normalize(gray, mean, std, to_rgb=True)
    got_tf = np.stack([augment.normalize(tf.constant(g, tf.float32), mean, std, True).numpy() for g in gray])
    np.testing.assert_allclose(got_np, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_tf, expected, rtol=1e-5, atol=1e-5)
    cfg = ConfigDict(dict(mean=mean, std=std, dataset="fashion_mnist", grayscale_to_rgb=True))
    assert mean_std(cfg, 1) == (mean, std)
    cfg.grayscale_to_rgb = False
    with pytest.raises(ValueError, match="3/3 values but images have 1 channels"):
        mean_std(cfg, 1)


def test_resize_to_with_a_static_shape_of_another_size():
    """In-memory arrays have a static shape when tf.data traces the map: upsizing 28 px images (fine-tuning at a
    pretrained model's size) must not trace a branch that asserts the target shape."""
    images = tf.data.Dataset.from_tensor_slices(np.zeros((2, 28, 28, 1), np.uint8))
    out = next(iter(images.map(lambda x: augment.resize_to(x, 32, 1)).batch(2)))
    assert out.shape == (2, 32, 32, 1) and out.dtype == tf.float32
    same = next(iter(images.map(lambda x: augment.resize_to(x, 28, 1)).batch(2)))
    assert same.shape == (2, 28, 28, 1)
