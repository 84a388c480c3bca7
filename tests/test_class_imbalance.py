"""Class imbalance: train.class_weights (weights from label counts, weighted softmax losses) and
data.balanced_sampling (class-balanced epochs drawn with replacement), against hand-computed references."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from nfjax import data, train
from nfjax.class_weights import class_weights_from_counts, make_class_weights, parse_class_weights
from nfjax.config_lib import default_train_config
from nfjax.data import sharding
from nfjax.experiment import _check_train
from nfjax.losses import make_loss_fn

from helpers import nf_args

COUNTS = np.array([10, 30, 60])  # N = 100, K = 3


# ------------------------------------------------------------------------------------------ class weights


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("balanced", [100 / 30, 100 / 90, 100 / 180]),  # N / (K n_c)
        # n_c^-1/2 scaled by N / sum_c n_c n_c^-1/2 = N / sum_c sqrt(n_c)
        ("sqrt", np.array([10, 30, 60]) ** -0.5 * 100 / (10**0.5 + 30**0.5 + 60**0.5)),
        ("effective:0.0", [1.0, 1.0, 1.0]),  # BETA = 0: every class counts as one example
        ("1,2.5,0", [1.0, 2.5, 0.0]),
        (" 0.5, 2 ,1 ", [0.5, 2.0, 1.0]),
    ],
)
def test_weights_of_each_mode_for_known_counts(spec, expected):
    weights = class_weights_from_counts(parse_class_weights(spec), COUNTS)
    np.testing.assert_allclose(weights, expected, rtol=1e-12)
    if not spec[0].isdigit() and not spec.startswith(" "):  # computed modes: example-weighted mean weight 1
        assert np.sum(COUNTS * weights) / COUNTS.sum() == pytest.approx(1.0, rel=1e-12)


def test_effective_number_weights():
    # (1 - b) / (1 - b^n) for b = 0.9: 0.9^10 = 0.34867844, 0.9^30 = 0.04239116, 0.9^60 = 0.00179701
    raw = np.array([0.1 / (1 - 0.34867844), 0.1 / (1 - 0.04239116), 0.1 / (1 - 0.00179701)])
    expected = raw * 100 / np.sum(COUNTS * raw)
    weights = class_weights_from_counts(parse_class_weights("effective:0.9"), COUNTS)
    np.testing.assert_allclose(weights, expected, rtol=1e-7)
    assert weights[0] > weights[1] > weights[2]


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("balance", "not a mode name and not a list of numbers"),
        ("1,-2,3", "finite number >= 0"),
        ("0,0,0", "at least one given weight must be positive"),
        ("1,nan,1", "finite number >= 0"),
        ("effective:1.0", "BETA must be in [0, 1)"),
        ("effective:x", "BETA 'x' is not a number"),
        (3, "expected a string"),
    ],
)
def test_bad_class_weights_name_the_field_and_value(spec, needle):
    with pytest.raises(ValueError) as error:
        parse_class_weights(spec)
    message = str(error.value)
    assert message.startswith(f"train.class_weights={spec!r} is invalid") and needle in message, message
    assert "balanced" in message and "\n" not in message


def test_weights_must_fit_the_classes_and_computed_modes_need_every_class():
    with pytest.raises(ValueError, match=r"lists 2 weights but the dataset has 3 classes \(a, b, c\); give one"):
        make_class_weights("1,2", COUNTS, ("a", "b", "c"))
    with pytest.raises(ValueError, match=r"'balanced' needs training examples of every class.*1 have none \(b\)"):
        make_class_weights("balanced", np.array([5, 0, 7]), ("a", "b", "c"))
    given = make_class_weights("1,0,2", np.array([5, 0, 7]), ("a", "b", "c"))  # a list may cover an empty class
    assert given.to_json()["classes"][1] == {"class": "b", "count": 0, "weight": 0.0}
    assert make_class_weights("none", COUNTS, ("a", "b", "c")) is None


def test_config_checks_refuse_bce_and_bad_values_before_any_data_is_read():
    cfg = default_train_config()
    assert cfg.class_weights == "none"
    cfg.class_weights, cfg.loss = "balanced", "sigmoid_bce"
    with pytest.raises(ValueError, match=r"train.class_weights='balanced' applies to loss 'softmax_xent' or 'focal'"):
        _check_train(cfg)
    cfg.loss, cfg.class_weights = "focal", "sqrtt"
    with pytest.raises(ValueError, match=r"train.class_weights='sqrtt' is invalid"):
        _check_train(cfg)
    with pytest.raises(ValueError, match="not 'sigmoid_bce'"):
        make_loss_fn("sigmoid_bce", class_weights=np.ones(3))


# ------------------------------------------------------------------------------------------ weighted losses


def np_log_softmax(z):
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_weighted_cross_entropy_and_focal_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(5, 3)).astype(np.float32) * 2
    labels = np.array([0, 1, 2, 2, 0])
    soft = rng.dirichlet(np.ones(3), 5).astype(np.float32)
    w = np.array([3.0, 0.5, 1.25])
    log_p = np_log_softmax(logits.astype(np.float64))
    xent, focal = make_loss_fn("softmax_xent", class_weights=w), make_loss_fn("focal", focal_gamma=2.0, class_weights=w)
    # integer labels: w_y times the plain loss
    plain = -log_p[np.arange(5), labels]
    np.testing.assert_allclose(xent(jnp.asarray(logits), jnp.asarray(labels)), w[labels] * plain, rtol=1e-5)
    p_y = np.exp(-plain)
    want_focal = w[labels] * (1 - p_y) ** 2 * plain
    np.testing.assert_allclose(focal(jnp.asarray(logits), jnp.asarray(labels)), want_focal, rtol=1e-5)
    # soft targets: each class's term weighted by its own w_c
    np.testing.assert_allclose(xent(jnp.asarray(logits), jnp.asarray(soft)), -(w * soft * log_p).sum(-1), rtol=1e-5)
    want_soft = -(w * soft * (1 - np.exp(log_p)) ** 2 * log_p).sum(-1)
    np.testing.assert_allclose(focal(jnp.asarray(logits), jnp.asarray(soft)), want_soft, rtol=1e-5)
    # no weights: the plain loss, as the eval step uses it
    np.testing.assert_allclose(make_loss_fn("softmax_xent")(jnp.asarray(logits), jnp.asarray(labels)), plain, rtol=1e-5)


# ------------------------------------------------------------------------------------------ balanced sampling


LABELS = np.repeat([0, 1, 2], COUNTS)  # 10, 30, 60 examples


@pytest.mark.parametrize("q", [1.0, 0.5])
def test_drawn_class_frequencies_match_the_target(q):
    probs = sharding.balanced_probs(LABELS, q)
    np.testing.assert_allclose(probs[[0, 10, 40]], COUNTS**-q / np.sum(COUNTS ** (1 - q)), rtol=1e-12)
    epochs = 200  # 20,000 draws
    drawn = np.concatenate([LABELS[sharding.epoch_order(100, seed=0, epoch=e, probs=probs)] for e in range(epochs)])
    target = COUNTS ** (1 - q) / np.sum(COUNTS ** (1 - q))  # q=1: 1/3 each; q=0.5: sqrt(n_c) / sum sqrt(n)
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    tolerance = 5 * np.sqrt(target * (1 - target) / len(drawn))  # 5 binomial standard deviations
    assert np.all(np.abs(freq - target) < tolerance), (freq, target, tolerance)


def test_q_zero_order_is_todays_permutation_and_draws_depend_on_seed_and_epoch():
    today = np.random.default_rng(sharding.derive_seed(4, 2, 0x5EED)).permutation(100)
    np.testing.assert_array_equal(sharding.epoch_order(100, 4, 2), today)
    probs = sharding.balanced_probs(LABELS, 1.0)
    a = sharding.epoch_order(100, 4, 2, probs=probs)
    np.testing.assert_array_equal(a, sharding.epoch_order(100, 4, 2, probs=probs))
    assert len(a) == 100 and len(set(a)) < 100  # with replacement
    assert not np.array_equal(a, sharding.epoch_order(100, 4, 3, probs=probs))
    assert not np.array_equal(a, sharding.epoch_order(100, 5, 2, probs=probs))
    probs_99 = sharding.balanced_probs(LABELS[:99], 1.0)
    repeated = sharding.epoch_order(99, 4, 2, repeats=3, probs=probs_99)  # each draw 3 times in a row
    np.testing.assert_array_equal(repeated[0::3], repeated[1::3])
    np.testing.assert_array_equal(repeated[0::3], sharding.epoch_order(99, 4, 2, probs=probs_99)[:33])


def _write_folder(root):
    """root/c<k>/<i>.png with 2, 6 and 16 distinct 4x4 images (N = 24)."""
    rng = np.random.default_rng(0)
    for k, n in enumerate((2, 6, 16)):
        (root / f"c{k}").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (4, 4, 3), np.uint8)).save(root / f"c{k}" / f"{i:02d}.png")


def _folder_cfg(root, backend, q=1.0, in_memory=True):
    cfg = data.default_data_config()
    cfg.dataset, cfg.data_dir, cfg.image_size, cfg.train_split = "image_folder", str(root), None, "all"
    cfg.random_resized_crop, cfg.flip, cfg.prefetch, cfg.balanced_sampling = False, False, 0, q
    cfg.mean, cfg.std = (0.0,), (1 / 255,)  # identity normalization: batches hold the stored pixels
    cfg.backend, cfg.cache_in_memory = backend, in_memory
    return cfg


def _take(cfg, n, **kwargs):
    iterator = data.build_train_iterator(
        cfg, **{"global_batch": 8, "device_count": 1, "process_index": 0, "process_count": 1, **kwargs}
    )
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_balanced_image_folder_batches_numpy_and_streamed_alike_resume_exactly_and_split_over_hosts(tmp_path):
    _write_folder(tmp_path)
    numpy_cfg, tfdata_cfg = _folder_cfg(tmp_path, "numpy"), _folder_cfg(tmp_path, "tfdata")
    folder_cfg = _folder_cfg(tmp_path, "tfdata", in_memory=False)
    full = _take(numpy_cfg, 9)  # 24 / 8 = 3 steps per epoch: 3 epochs
    labels = np.concatenate([b["label"] for b in full])
    assert np.bincount(labels, minlength=3).min() >= 12  # class 0 has 2 of 24 images, yet about 1/3 of the draws
    _same(full, _take(tfdata_cfg, 9))  # tf.data in memory: the same order
    _same(full, _take(folder_cfg, 9))  # not cached: read file by file in the same order
    _same(full[4:], _take(numpy_cfg, 5, start_step=4))  # resume inside the second epoch
    _same(full[4:7], _take(tfdata_cfg, 3, start_step=4))
    _same(full[4:7], _take(folder_cfg, 3, start_step=4))
    hosts = [_take(numpy_cfg, 9, process_index=i, process_count=2) for i in range(2)]
    for step, batch in enumerate(full):
        np.testing.assert_array_equal(
            np.concatenate([hosts[0][step]["label"], hosts[1][step]["label"]]), batch["label"]
        )
    # many steps on the NumPy path: every class drawn about equally often (binomial tolerance, 5 sigma)
    drawn = np.concatenate([b["label"] for b in _take(numpy_cfg, 600)])
    freq = np.bincount(drawn, minlength=3) / len(drawn)
    assert np.all(np.abs(freq - 1 / 3) < 5 * np.sqrt(2 / 9 / len(drawn))), freq
    off = _take(_folder_cfg(tmp_path, "numpy", q=0.0), 3)  # q = 0: today's shuffled epoch, each image once
    order = sharding.epoch_order(24, 0, 0)
    np.testing.assert_array_equal(np.concatenate([b["label"] for b in off]), np.repeat([0, 1, 2], [2, 6, 16])[order])
    assert data.train_label_counts(numpy_cfg).tolist() == [2, 6, 16]


def test_streamed_tfds_counts_labels_and_refuses_balanced_sampling(fmnist_dir):
    cfg = data.fashion_mnist_data_config(fmnist_dir)
    cfg.backend, cfg.cache_in_memory, cfg.num_train_examples, cfg.balanced_sampling = "tfdata", False, 640, 1.0
    in_memory = data.fashion_mnist_data_config(fmnist_dir)
    in_memory.num_train_examples = 640
    expected = np.bincount(data.pipeline.train_labels(in_memory), minlength=10)
    assert expected.sum() == 640
    np.testing.assert_array_equal(data.train_label_counts(cfg), expected)  # read from the records, no decoding
    with pytest.raises(ValueError, match=r"data.balanced_sampling=1.0 .* set data.cache_in_memory=True"):
        data.build_train_iterator(cfg, global_batch=64, device_count=1, process_index=0, process_count=1)


@pytest.mark.parametrize("value", [-0.5, float("nan"), "1"])
def test_bad_balanced_sampling_is_named(fmnist_dir, value):
    cfg = data.fashion_mnist_data_config(fmnist_dir)
    with cfg.ignore_type():
        cfg.balanced_sampling = value
    with pytest.raises(ValueError, match=r"data.balanced_sampling=.* is invalid: must be a number >= 0"):
        data.dataset_info(cfg)


# ------------------------------------------------------------------------------------------ end to end


def test_training_with_class_weights_and_balanced_sampling_writes_the_weights(fmnist_dir, tmp_path, capsys):
    workdir = tmp_path / "run"
    extra = [
        "--config.train.class_weights=balanced",
        "--config.data.balanced_sampling=1.0",
        "--config.data.num_train_examples=1280",
        "--config.train.max_steps=2",
    ]
    assert train.main(nf_args(fmnist_dir, workdir, *extra)) == 0
    written = json.loads((workdir / "class_weights.json").read_text())
    cfg = data.fashion_mnist_data_config(fmnist_dir)
    cfg.num_train_examples = 1280
    counts = np.bincount(data.pipeline.train_labels(cfg), minlength=10)
    assert written["class_weights"] == "balanced"
    assert [c["count"] for c in written["classes"]] == counts.tolist()
    assert written["classes"][0]["class"] == "T-shirt/top"
    np.testing.assert_allclose([c["weight"] for c in written["classes"]], 1280 / (10 * counts), rtol=1e-12)
    assert "class weights (train.class_weights='balanced')" in capsys.readouterr().err
