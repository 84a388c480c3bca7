"""Image folders without data.image_size: the common size from the image headers, on every backend."""

import numpy as np
import pytest
from PIL import Image, ImageFile

from nfjax import data
from nfjax.data.sources import ImageFolderSource, common_image_size


def _write_images(root, sizes_by_class):
    """root/class_<c>/im<i>.png, image i of class c of size sizes_by_class[c][i], random pixels (seeded)."""
    rng = np.random.default_rng(0)
    images = []
    for c, sizes in enumerate(sizes_by_class):
        (root / f"class_{c}").mkdir(parents=True)
        for i, (height, width) in enumerate(sizes):
            pixels = rng.integers(0, 256, (height, width, 3), np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"im{i}.png")
            images.append(pixels)
    return images


def _cfg(root, backend="numpy"):
    cfg = data.default_data_config()
    cfg.dataset, cfg.data_dir, cfg.image_size = "image_folder", str(root), None
    cfg.train_split, cfg.eval_split, cfg.holdout_fraction = "train", "holdout", 1 / 3
    cfg.random_resized_crop, cfg.eval_preprocess, cfg.prefetch = False, "none", 0
    cfg.mean, cfg.std = (0.0,), (1 / 255,)  # identity normalization: batches hold the stored pixel values
    cfg.backend = "tfdata" if backend.startswith("tfdata") else backend
    if backend == "tfdata_streaming":
        cfg.cache_in_memory = False
    if backend == "tfdata_rrc":
        cfg.random_resized_crop = True
    return cfg


ITERATOR_ARGS = {"device_count": 1, "process_count": 1, "process_index": 0}


@pytest.fixture
def same_size_folder(tmp_path):
    """2 classes x 6 PNGs of 20x20; returns (root, the images uint8 [20, 20, 3])."""
    return tmp_path, _write_images(tmp_path, [[(20, 20)] * 6] * 2)


def test_dataset_info_reads_the_size_from_headers_once(same_size_folder, monkeypatch):
    root, _ = same_size_folder

    def no_decoding(self):
        raise AssertionError("pixels decoded to find the image size")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    info = data.dataset_info(_cfg(root))
    assert info.image_shape == (20, 20, 3)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (8, 4, 2)
    hits = common_image_size.cache_info().hits
    assert data.dataset_info(_cfg(root)).image_shape == (20, 20, 3)
    assert common_image_size.cache_info().hits == hits + 1  # cached: the headers are read once
    cfg = _cfg(root)
    holdout = data.source_info(ImageFolderSource(str(root), "holdout", 1 / 3), cfg, train=False)
    assert holdout.image_shape == (20, 20, 3)
    assert ImageFolderSource(str(root), "train", 1 / 3).info().image_shape == (None, None, 3)  # info() stays cheap


@pytest.mark.parametrize("backend", ["numpy", "tfdata", "tfdata_streaming", "tfdata_rrc", "auto"])
def test_trains_and_evaluates_at_the_native_size(same_size_folder, backend):
    root, images = same_size_folder
    cfg = _cfg(root, backend)
    stored = {im.tobytes() for im in images}
    train = data.build_train_iterator(cfg, global_batch=4, **ITERATOR_ARGS)
    for _ in range(3):
        batch = next(train)
        assert batch["image"].shape == (4, 20, 20, 3) and batch["label"].shape == (4,)
        if backend != "tfdata_rrc":  # no resize and no augmentation beyond the flip: stored pixels, or mirrored
            for image in np.rint(batch["image"]).astype(np.uint8):
                assert image.tobytes() in stored or image[:, ::-1].tobytes() in stored
    evaluation = list(data.build_eval_iterator(cfg, global_batch=4, **ITERATOR_ARGS))
    assert all(b["image"].shape == (4, 20, 20, 3) for b in evaluation)
    assert sum(b["mask"].sum() for b in evaluation) == 4
    for b in evaluation:
        assert {im.tobytes() for im in np.rint(b["image"]).astype(np.uint8)} <= stored


def test_sizes_that_vary_name_two_files(tmp_path):
    _write_images(tmp_path, [[(20, 20)], [(24, 24)]])
    cfg = _cfg(tmp_path)
    cfg.holdout_fraction = 0.0
    for build in (data.dataset_info, lambda c: data.build_train_iterator(c, global_batch=2, **ITERATOR_ARGS)):
        with pytest.raises(ValueError) as error:
            build(cfg)
        message = str(error.value)
        assert "vary" in message and "20x20" in message and "24x24" in message and "data.image_size" in message
        assert str(tmp_path / "class_0" / "im0.png") in message and str(tmp_path / "class_1" / "im0.png") in message
    cfg.image_size, cfg.backend = 16, "auto"  # a set size resizes them instead (on the tf.data path)
    assert next(data.build_train_iterator(cfg, global_batch=2, **ITERATOR_ARGS))["image"].shape == (2, 16, 16, 3)


def test_scan_stops_at_the_first_mismatch(tmp_path):
    _write_images(tmp_path, [[(20, 20), (24, 24)]])
    (tmp_path / "class_0" / "im2.png").write_bytes(b"not an image")  # left out as a bad file, never sized
    with pytest.raises(ValueError, match="im1.png is 24x24"):
        ImageFolderSource(str(tmp_path), "all", max_bad_fraction=1.0).common_image_size()


def test_non_square_images_need_an_image_size(tmp_path):
    _write_images(tmp_path, [[(20, 30)] * 2] * 2)
    cfg = _cfg(tmp_path)
    with pytest.raises(ValueError, match=r"20x30 \(height x width\), not square: set data.image_size"):
        data.dataset_info(cfg)
    with pytest.raises(ValueError, match="not square"):
        data.build_train_iterator(cfg, global_batch=2, **ITERATOR_ARGS)
