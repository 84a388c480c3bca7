"""Pipeline: determinism, exact resume, host sharding, eval padding/masking, batch checks, global arrays."""

import collections

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from nfjax import data
from nfjax.data import sharding


def _cfg(fmnist_dir, backend="numpy", num_train=640, **overrides):
    cfg = data.fashion_mnist_data_config(fmnist_dir)
    cfg.backend, cfg.num_train_examples = backend, num_train
    if backend == "tfdata_streaming":
        cfg.backend, cfg.cache_in_memory = "tfdata", False
    for key, value in overrides.items():
        cfg[key] = value
    return cfg


def _take(cfg, n, **kwargs):
    kwargs = {"global_batch": 64, "device_count": 8, "process_index": 0, "process_count": 1, **kwargs}
    iterator = data.build_train_iterator(cfg, **kwargs)
    return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for key in x:
            np.testing.assert_array_equal(x[key], y[key], err_msg=key)


BACKENDS = ["numpy", "tfdata", "tfdata_streaming"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_seed_same_batches_and_exact_resume(fmnist_dir, backend):
    # 640 examples / 64 = 10 steps per epoch: step 13 resumes inside the second epoch.
    cfg = _cfg(fmnist_dir, backend, mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    full = _take(cfg, 16)
    _assert_same(full, _take(cfg, 16))
    _assert_same(full[13:], _take(cfg, 3, start_step=13))
    _assert_same(full[4:6], _take(cfg, 2, start_step=4))
    other_seed = _take(cfg, 1, seed=1)[0]
    assert not np.array_equal(other_seed["image"], full[0]["image"])
    assert full[0]["label_probs"].shape == (64, 10)
    np.testing.assert_allclose(full[0]["label_probs"].sum(-1), 1.0, rtol=1e-5)


def _image_keys(batches):
    return collections.Counter(im.tobytes() for b in batches for im in b["image"])


@pytest.mark.parametrize("backend", ["numpy", "tfdata_streaming"])
def test_two_hosts_see_disjoint_examples_covering_the_epoch(fmnist_dir, backend):
    cfg = _cfg(fmnist_dir, backend, pad_crop=0, flip=False)  # no augmentation: images identify examples
    per_host = [_take(cfg, 10, process_index=i, process_count=2) for i in range(2)]
    assert all(b["image"].shape[0] == 32 for host in per_host for b in host)
    whole_epoch = _image_keys(_take(cfg, 10))
    assert _image_keys(per_host[0]) + _image_keys(per_host[1]) == whole_epoch
    assert sum(whole_epoch.values()) == 640


def test_epoch_order_is_a_permutation_and_repeats_neighbours():
    order = sharding.epoch_order(600, seed=3, epoch=2)
    assert sorted(order) == list(range(600))
    assert not np.array_equal(order, sharding.epoch_order(600, seed=3, epoch=3))
    repeated = sharding.epoch_order(600, seed=3, epoch=2, repeats=3)
    assert len(repeated) == 600 and len(set(repeated)) == 200
    assert (repeated[0::3] == repeated[1::3]).all() and (repeated[0::3] == repeated[2::3]).all()
    plan = sharding.HostPlan(global_batch=60, process_index=1, process_count=3)
    np.testing.assert_array_equal(sharding.host_step_slices(order, plan, 2, 1), np.arange(140, 160))


@pytest.mark.parametrize("batch", [96, 128, 1000, 10000, 7])
def test_eval_counts_every_example_once(fmnist_dir, batch):
    cfg = _cfg(fmnist_dir)
    devices = 8 if batch % 8 == 0 else 1
    labels, steps = [], []
    for host in range(2 if batch % 2 == 0 else 1):
        count = 2 if batch % 2 == 0 else 1
        batches = list(
            data.build_eval_iterator(
                cfg, global_batch=batch, device_count=devices, process_index=host, process_count=count
            )
        )
        steps.append(len(batches))
        labels += [b["label"][b["mask"] == 1] for b in batches]
        assert all(b["image"].shape[0] == batch // count for b in batches)
    assert len(set(steps)) == 1
    labels = np.concatenate(labels)
    assert len(labels) == 10_000
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)


def test_eval_tfdata_two_hosts_same_steps(fmnist_dir):
    cfg = _cfg(fmnist_dir, "tfdata_streaming")
    per_host = [
        list(data.build_eval_iterator(cfg, global_batch=1536, device_count=8, process_index=i, process_count=2))
        for i in range(2)
    ]
    assert len(per_host[0]) == len(per_host[1]) == 7  # ceil(5000 / 768)
    labels = np.concatenate([b["label"][b["mask"] == 1] for host in per_host for b in host])
    np.testing.assert_array_equal(np.bincount(labels), [1000] * 10)
    # The same preprocessing in both backends: their first batches agree (the rest need not be decoded again).
    first = lambda c: next(data.build_eval_iterator(c, global_batch=1536, device_count=8, process_count=1))
    np.testing.assert_allclose(first(cfg)["image"], first(_cfg(fmnist_dir))["image"], atol=1e-5)


def test_global_batch_divisibility_errors(fmnist_dir):
    with pytest.raises(ValueError, match="global batch 100 is not divisible by 8 devices; choose a multiple of 8"):
        data.build_train_iterator(_cfg(fmnist_dir), global_batch=100, device_count=8, process_count=1)
    with pytest.raises(ValueError, match="not divisible by 4 processes"):
        data.check_global_batch(10, process_count=4, device_count=1)


def test_global_arrays_on_the_mesh_and_grayscale_to_rgb(fmnist_dir):
    mesh = Mesh(np.array(jax.devices()), ("data",))
    cfg = _cfg(fmnist_dir, grayscale_to_rgb=True)
    assert data.dataset_info(cfg).image_shape == (28, 28, 3)
    host = _take(cfg, 1)[0]
    batch = next(data.build_train_iterator(cfg, global_batch=64, mesh=mesh))
    assert isinstance(batch["image"], jax.Array) and batch["image"].shape == (64, 28, 28, 3)
    assert len(batch["image"].sharding.device_set) == 8
    assert batch["image"].addressable_shards[0].data.shape == (8, 28, 28, 3)
    np.testing.assert_array_equal(np.asarray(batch["image"]), host["image"])
    np.testing.assert_array_equal(host["image"][..., 0], host["image"][..., 2])


def test_backend_auto_and_numpy_limits(fmnist_dir):
    from nfjax.data.pipeline import resolve_backend
    from nfjax.data.sources import make_source

    cfg = _cfg(fmnist_dir, "auto")
    info = make_source(cfg, "train").info()
    assert resolve_backend(cfg, info, train=True) == "numpy"
    cfg.randaugment_layers = 2
    assert resolve_backend(cfg, info, train=True) == "tfdata"
    cfg.backend = "numpy"
    with pytest.raises(ValueError, match="randaugment"):
        resolve_backend(cfg, info, train=True)


def test_randaugment_and_random_resized_crop_run_in_the_pipeline(fmnist_dir):
    cfg = _cfg(
        fmnist_dir,
        "auto",
        image_size=32,
        random_resized_crop=True,
        randaugment_layers=2,
        randaugment_variant="timm",
        randaugment_magnitude=7,
        bce_target_thresh=0.2,
        mixup_alpha=0.1,
        cutmix_alpha=1.0,
        mix_mode="timm",
        repeated_aug=3,
    )
    batch = _take(cfg, 1, global_batch=16)[0]
    assert batch["image"].shape == (16, 32, 32, 1) and np.isfinite(batch["image"]).all()
    assert set(np.unique(batch["label_probs"])) <= {0.0, 1.0}


def _mixed_randaugment_cfg(fmnist_dir, backend, augment_before_mix):
    # mean 0, std 1/255: the batches hold pixel values, so RandAugment's uint8 output shows as whole numbers
    return _cfg(
        fmnist_dir,
        backend,
        image_size=32,
        randaugment_layers=2,
        randaugment_magnitude=10.0,
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        label_smoothing=0.1,
        augment_before_mix=augment_before_mix,
        mean=(0.0,),
        std=(1 / 255,),
    )


def test_randaugment_after_mix_is_deepminds_order(fmnist_dir):
    """augment_before_mix=False: RandAugment (uint8 in, uint8 out) runs on the mixed images, so every pixel of
    the batch is a whole number; the other order mixes RandAugment's output, so MixUp leaves fractions. The
    mixing draws (partners, ratios, targets) are the same in both orders."""
    after = _take(_mixed_randaugment_cfg(fmnist_dir, "tfdata", False), 1)[0]
    before = _take(_mixed_randaugment_cfg(fmnist_dir, "tfdata", True), 1)[0]
    assert after.keys() == before.keys() == {"image", "label", "label_probs"}
    np.testing.assert_array_equal(after["image"], np.round(after["image"]))
    half = len(before["image"]) // 2  # 'deepmind' mixing: MixUp on the first half
    assert np.abs(before["image"][:half] - np.round(before["image"][:half])).max() > 0.01
    np.testing.assert_array_equal(after["label_probs"], before["label_probs"])
    np.testing.assert_array_equal(after["label"], before["label"])
    assert not np.allclose(after["label_probs"].max(-1), 0.91)  # mixed, not only smoothed


@pytest.mark.parametrize("backend", ["tfdata", "tfdata_streaming"])
def test_randaugment_after_mix_resumes_exactly(fmnist_dir, backend):
    cfg = _mixed_randaugment_cfg(fmnist_dir, backend, False)
    full = _take(cfg, 13)
    _assert_same(full[11:], _take(cfg, 2, start_step=11))
    _assert_same(full[:2], _take(cfg, 2))


@pytest.mark.parametrize("field", ["rrc_mode", "train_interpolation", "eval_interpolation", "mix_mode"])
def test_an_invalid_choice_is_named_before_any_data_is_read(fmnist_dir, field):
    cfg = _cfg(fmnist_dir, "numpy", **{field: "lanczos"})
    with pytest.raises(ValueError, match=f"data.{field}='lanczos' is invalid; valid: "):
        data.dataset_info(cfg)
    with pytest.raises(ValueError, match=f"data.{field}="):
        _take(cfg, 1)
