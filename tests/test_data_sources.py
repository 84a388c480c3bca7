"""Sources: offline Fashion-MNIST through TFDS, missing datasets, image folders, lazy TF import."""

import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from nfjax import data
from nfjax.data.sources import ImageFolderSource


def test_fashion_mnist_offline_official_split(fmnist_dir):
    from nfjax.data.tf_lazy import import_tfds

    tfds = import_tfds()
    builder = tfds.builder("fashion_mnist", data_dir=fmnist_dir, try_gcs=False)
    assert builder.is_prepared()
    info = data.dataset_info(data.fashion_mnist_data_config(fmnist_dir))
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (60_000, 10_000, 10)
    assert info.image_shape == (28, 28, 1) and info.class_names[0] == "T-shirt/top"
    for split, per_class in (("train", 6_000), ("test", 1_000)):
        labels = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))["label"]
        np.testing.assert_array_equal(np.bincount(labels, minlength=10), [per_class] * 10)
    # Idempotent and cheap the second time.
    start = time.perf_counter()
    assert data.prepare_fashion_mnist(fmnist_dir) == str(builder.data_dir)
    assert time.perf_counter() - start < 3.0


def test_fashion_mnist_pixels_match_idx_files(fmnist_dir):
    from nfjax.data.fashion_mnist import DEBIAN_SOURCE_DIR, load_idx_split
    from nfjax.data.sources import TfdsSource

    idx_images, idx_labels = load_idx_split(DEBIAN_SOURCE_DIR, "test")
    images, labels = TfdsSource("fashion_mnist", "test", fmnist_dir).load_arrays()
    # TFDS stores examples in its own (hashed) order: compare as sets of (image bytes, label).
    key = lambda ims, labs: sorted(im.tobytes() + bytes([lab]) for im, lab in zip(ims, labs, strict=True))
    assert key(images, labels) == key(idx_images, idx_labels)


@pytest.mark.parametrize("images", [np.zeros((4, 32, 32, 1), np.uint8), np.zeros((4, 28, 28, 1), np.float32)])
def test_storing_images_of_another_shape_or_type_is_refused_before_writing(tmp_path, images):
    from nfjax.data.fashion_mnist import store_fashion_mnist

    with pytest.raises(ValueError, match=r"split 'train'.*fashion_mnist takes uint8 images \[N, 28, 28, 1\]"):
        store_fashion_mnist(str(tmp_path), {"train": (images, np.zeros(4, np.uint8))})
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("name", ["cifar10", "imagenet2012"])
def test_missing_tfds_dataset_fails_fast(tmp_path, name):
    cfg = data.default_data_config()
    cfg.dataset, cfg.data_dir = name, str(tmp_path)
    start = time.perf_counter()
    with pytest.raises(data.DatasetNotFoundError) as error:
        data.build_train_iterator(cfg, global_batch=8, device_count=1, process_count=1, process_index=0)
    assert time.perf_counter() - start < 10.0
    message = str(error.value)
    assert str(tmp_path) in message and f"python -m nfjax.data.prepare {name} --data-dir {tmp_path}" in message
    if name == "imagenet2012":
        assert "downloads/manual" in message and "ILSVRC2012_img_train.tar" in message


def test_prepare_offline_dispatches_by_table(fmnist_dir, tmp_path, monkeypatch):
    from nfjax.data.tf_lazy import import_tfds

    assert data.OFFLINE_PREPARERS["fashion_mnist"] is data.prepare_fashion_mnist
    cfg = data.fashion_mnist_data_config(fmnist_dir)
    assert data.prepare_offline(cfg) is None  # already prepared: idempotent
    assert import_tfds().builder("fashion_mnist", data_dir=fmnist_dir, try_gcs=False).is_prepared()
    calls = []
    monkeypatch.setitem(data.OFFLINE_PREPARERS, "fashion_mnist", lambda *args: calls.append(args) or "done")
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg.data_dir = "~/tfds"
    data.prepare_offline(cfg)
    assert calls == [(str(tmp_path / "tfds"),)]  # called with the expanded data_dir
    cfg.dataset, cfg.data_dir = "cifar10", str(tmp_path / "cifar")  # not offline: nothing happens, no network
    start = time.perf_counter()
    data.prepare_offline(cfg)
    assert calls == [(str(tmp_path / "tfds"),)] and not (tmp_path / "cifar").exists()
    assert time.perf_counter() - start < 1.0


def test_prepare_cli_uses_the_table_and_source_dir(tmp_path, monkeypatch, capsys):
    from nfjax.data import prepare

    calls, cached = [], []
    monkeypatch.setitem(data.OFFLINE_PREPARERS, "fashion_mnist", lambda *args: calls.append(args) or "ready-dir")
    monkeypatch.setattr(prepare, "cache_tfds_splits", lambda *args: cached.append(args) or ["train: cached"])
    assert prepare.main(["fashion_mnist", "--data-dir", "d", "--source-dir", "idx"]) == 0
    assert prepare.main(["fashion_mnist", "--data-dir", "d", "--no-array-cache"]) == 0
    assert calls == [("d", "idx"), ("d",)] and cached == [("fashion_mnist", "d")]
    out = capsys.readouterr().out
    assert "fashion_mnist ready in ready-dir" in out and "array cache: train: cached" in out
    assert prepare.main(["cifar10", "--data-dir", str(tmp_path), "--source-dir", "idx"]) == 2
    assert "--source-dir applies only to fashion_mnist" in capsys.readouterr().err


def _write_folder(root, sizes=((20, 30), (24, 24), (40, 28)), per_class=10):
    """Class c: solid images of gray level 60 * c + 30, in varied sizes, alternating PNG and JPEG."""
    for c in range(3):
        (root / f"class_{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            image = Image.fromarray(np.full((h, w, 3), 60 * c + 30, np.uint8))
            image.save(root / f"class_{c}" / f"im{i}.{'png' if i % 2 else 'jpg'}")


def test_image_folder_holdout_split(tmp_path):
    _write_folder(tmp_path)
    train = ImageFolderSource(str(tmp_path), "train", holdout_fraction=0.2)
    holdout = ImageFolderSource(str(tmp_path), "holdout", holdout_fraction=0.2)
    assert (train.info().num_examples, holdout.info().num_examples) == (24, 6)
    assert train.info().class_names == ("class_0", "class_1", "class_2")
    assert set(train.paths).isdisjoint(holdout.paths)
    assert set(train.paths) | set(holdout.paths) == set(ImageFolderSource(str(tmp_path), "all").paths)
    np.testing.assert_array_equal(np.bincount(holdout.labels), [2, 2, 2])
    again = ImageFolderSource(str(tmp_path), "holdout", holdout_fraction=0.2)
    np.testing.assert_array_equal(again.paths, holdout.paths)  # deterministic


def test_image_folder_pipeline_labels_follow_folders(tmp_path):
    _write_folder(tmp_path)
    cfg = data.default_data_config()
    cfg.dataset, cfg.data_dir, cfg.holdout_fraction = "image_folder", str(tmp_path), 0.2
    cfg.eval_split, cfg.image_size, cfg.mean, cfg.std = "holdout", 16, (0.0,), (1 / 255,)
    batch = next(iter(data.build_train_iterator(cfg, global_batch=8, device_count=8, process_count=1)))
    assert batch["image"].shape == (8, 16, 16, 3)
    np.testing.assert_allclose(batch["image"].mean(axis=(1, 2, 3)), 60 * batch["label"] + 30, atol=2.0)
    batches = list(data.build_eval_iterator(cfg, global_batch=4, device_count=1, process_count=1))
    assert sum(b["mask"].sum() for b in batches) == 6


def test_image_folder_split_subfolders(tmp_path):
    _write_folder(tmp_path / "train")
    _write_folder(tmp_path / "val", per_class=2)
    assert ImageFolderSource(str(tmp_path), "val").info().num_examples == 6
    assert ImageFolderSource(str(tmp_path), "train").info().num_examples == 30
    with pytest.raises(data.DatasetNotFoundError, match="does not exist"):
        ImageFolderSource(str(tmp_path / "nowhere"), "train")


def test_importing_data_and_models_does_not_import_tensorflow():
    code = (
        "import sys, importlib.util\n"
        "import nfjax.data\n"
        "if importlib.util.find_spec('nfjax.models') is not None:\n"
        "    import nfjax.models\n"
        "assert 'tensorflow' not in sys.modules, 'TensorFlow imported eagerly'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
