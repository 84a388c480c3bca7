"""Training without TensorFlow: the array cache (same arrays and info as TFDS, slices cut as TFDS cuts them, one
clear error for a cache that cannot be used), synthetic data, and tiny trainer runs with TensorFlow unimportable."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from nfjax import data, train
from nfjax.data import array_cache, folds, pipeline, split_spec, tf_lazy
from nfjax.data.source_info import SourceInfo
from nfjax.data.sources import TfdsSource, decode_tfds_split, make_source
from nfjax.data.synthetic import synthetic_arrays

from helpers import assert_clean_error, nf_args, subprocess_env

SPECS = [
    "test", "test[:90%]", "test[90%:]", "test[12.5%:-40%]", "test[-7%:]", "test[33%:67%]", "test[:1]", "test[10:-10]",
    "test[-5:]", "test[7:3]", "test[0%:100%]", "test[:-0.5%]", "test[1_0:2_0]", "test[:101%]", "test[-12:]",
]  # fmt: skip


def _ensure_cached(data_dir, *splits):
    """The array cache of the fixture's splits (written by the first in-memory load; a no-op afterwards)."""
    for split in splits:
        TfdsSource("fashion_mnist", split, data_dir).load_arrays()


@pytest.mark.parametrize("num_examples", [10_000, 60_000, 7, 333, 1001])
def test_split_slices_are_cut_as_tfds_cuts_them(num_examples):
    tfds = tf_lazy.import_tfds()
    infos = {"test": SimpleNamespace(num_examples=num_examples, shard_lengths=[num_examples])}
    for spec in SPECS:
        try:
            (absolute,) = tfds.core.ReadInstruction.from_spec(spec).to_absolute(infos)
            expected = (absolute.from_ or 0, num_examples if absolute.to is None else absolute.to)
            if expected[1] < expected[0]:
                expected = ValueError  # TFDS fails when reading it (a negative example count)
        except ValueError:
            expected = ValueError
        try:
            got = split_spec.absolute_bounds(split_spec.parse_slice(spec), num_examples)
        except ValueError:
            got = ValueError
        assert got == expected, spec
    for spec in ("train+test", "all", "train[1shard]", "train[5]", "train[:]", "train[1.5:]"):
        assert split_spec.parse_slice(spec) is None, spec


def test_cache_gives_the_arrays_and_info_of_tfds_including_a_slice(fmnist_dir):
    _ensure_cached(fmnist_dir, "test")
    array_cache.forget_arrays()  # read the files, not the copies this process decoded
    cfg = data.fashion_mnist_data_config(fmnist_dir)
    for split in ("test", "test[12.5%:-40%]"):
        source = make_source(cfg, split)
        assert isinstance(source, array_cache.CachedTfdsSource), split
        tfds_source = TfdsSource("fashion_mnist", split, fmnist_dir)
        assert source.info() == tfds_source.info(), split
        for cached, decoded in zip(source.load_arrays(), decode_tfds_split(tfds_source), strict=True):
            assert cached.dtype == decoded.dtype and not cached.flags.writeable
            np.testing.assert_array_equal(cached, decoded, err_msg=split)
    meta = json.loads((array_cache.version_folder("fashion_mnist", fmnist_dir) / "nfjax_arrays/test.json").read_text())
    assert (meta["version"], meta["shard_lengths"], meta["num_examples"]) == ("3.0.1", [10_000], 10_000)
    # k-fold assignment reads its labels from the cache: the labels TFDS's records hold
    cached_labels = make_source(cfg, "test").load_arrays()[1]
    tfds_labels = folds._tfds_labels(TfdsSource("fashion_mnist", "test", fmnist_dir))
    np.testing.assert_array_equal(cached_labels, tfds_labels)


def _small_cache(root, version="3.0.1"):
    """A cache of 20 'fashion_mnist' examples (no TFDS files beside it), as a copied cache would be."""
    folder = root / "fashion_mnist" / version
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (20, 28, 28, 1), dtype=np.uint8), np.arange(20, dtype=np.int32) % 10
    info = SourceInfo(20, 10, (28, 28, 1), tuple(f"c{i}" for i in range(10)))
    array_cache.store("fashion_mnist", folder, "test", arrays, info, [20])
    array_cache.forget_arrays()
    return folder / "nfjax_arrays"


def _corrupt(folder, how):
    npz, meta_path = folder / "test.npz", folder / "test.json"
    meta = json.loads(meta_path.read_text())
    if how == "truncated npz":
        npz.write_bytes(npz.read_bytes()[:1000])
        meta["npz_bytes"] = 1000
    elif how == "wrong shape":
        meta["num_examples"] = 21
    elif how == "unreadable json":
        meta_path.write_text("{not json")
        return
    elif how == "stale":
        (folder.parent / "dataset_info.json").write_text("{}")
        meta["dataset_info_sha256"] = "0" * 64
    meta_path.write_text(json.dumps(meta))


@pytest.mark.parametrize("how", ["truncated npz", "wrong shape", "unreadable json", "stale"])
def test_an_unusable_cache_is_one_clear_error(tmp_path, how, capsys):
    folder = _small_cache(tmp_path)
    cfg = data.fashion_mnist_data_config(str(tmp_path))
    np.testing.assert_array_equal(make_source(cfg, "test[:5]").load_arrays()[1], np.arange(5))  # usable first
    array_cache.forget_arrays()
    _corrupt(folder, how)
    with pytest.raises(array_cache.ArrayCacheError) as error:
        make_source(cfg, "test").load_arrays()
    message = str(error.value)
    assert "\n" not in message and "cannot be used" in message
    assert f"python -m nfjax.data.prepare fashion_mnist --data-dir {tmp_path}" in message
    code = train.main(nf_args(str(tmp_path), tmp_path / "run", "--config.data.train_split=test"))
    assert_clean_error(code, capsys.readouterr().err, "array cache", "cannot be used", "nfjax.data.prepare")


def test_the_newest_version_folder_is_read(tmp_path):
    _small_cache(tmp_path, "3.0.1")
    (tmp_path / "fashion_mnist" / "10.0.0").mkdir()  # not prepared: no dataset_info.json, no cache
    assert array_cache.version_folder("fashion_mnist", str(tmp_path)).name == "3.0.1"
    shutil.copytree(tmp_path / "fashion_mnist" / "3.0.1", tmp_path / "fashion_mnist" / "3.1.0")
    assert array_cache.version_folder("fashion_mnist", str(tmp_path)).name == "3.1.0"
    assert array_cache.version_folder("fashion_mnist:3.0.1", str(tmp_path)).name == "3.0.1"
    assert array_cache.lookup("fashion_mnist", "train", str(tmp_path)) is None  # not cached: TFDS would be read


def test_slices_of_a_multi_shard_split_are_found_only_under_their_own_string(tmp_path):
    """TFDS interleaves the shards of such a split, so its slices are not slices of the whole."""
    folder = tmp_path / "fashion_mnist" / "3.0.1"
    arrays = np.zeros((20, 4, 4, 1), np.uint8), np.arange(20, dtype=np.int32) % 10
    info = SourceInfo(20, 10, (4, 4, 1), tuple(f"c{i}" for i in range(10)))
    array_cache.store("fashion_mnist", folder, "test", arrays, info, [10, 10])
    assert array_cache.lookup("fashion_mnist", "test", str(tmp_path)).info().num_examples == 20
    assert array_cache.lookup("fashion_mnist", "test[:5]", str(tmp_path)) is None
    piece, piece_info = (arrays[0][:2] + 7, arrays[1][:2]), SourceInfo(2, 10, (4, 4, 1), info.class_names)
    array_cache.store("fashion_mnist", folder, "test[12.5%:22.5%]", piece, piece_info, None)
    array_cache.forget_arrays()
    found = array_cache.lookup("fashion_mnist", "test[12.5%:22.5%]", str(tmp_path)).load_arrays()
    np.testing.assert_array_equal(found[0], piece[0])
    assert array_cache.lookup("fashion_mnist", "test[12.5%:]", str(tmp_path)) is None  # no prefix match


def _synthetic_cfg(**fields):
    cfg = data.default_data_config()
    cfg.dataset, cfg.image_size, cfg.eval_image_size, cfg.random_resized_crop = "synthetic", None, None, False
    cfg.eval_preprocess, cfg.train_split, cfg.eval_split = "none", "train", "test"
    cfg.synthetic.update(dict(image_shape=(8, 8, 3), num_classes=4, train_examples=64, eval_examples=24) | fields)
    return cfg


def test_synthetic_data_is_deterministic_in_memory_and_validated(monkeypatch):
    cfg = _synthetic_cfg()
    info = data.dataset_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes, info.image_shape) == (
        64,
        24,
        4,
        (8, 8, 3),
    )
    images, labels = make_source(cfg, "train").load_arrays()
    again = synthetic_arrays((8, 8, 3), 4, 64, 0, "train")
    assert images is again[0] and np.bincount(labels).tolist() == [16] * 4
    other_seed = synthetic_arrays((8, 8, 3), 4, 64, 1, "train")[0]
    assert not np.array_equal(images, other_seed)
    batch = next(iter(data.build_train_iterator(cfg, global_batch=16, device_count=1, process_count=1)))
    assert batch["image"].shape == (16, 8, 8, 3) and abs(float(batch["image"].mean())) < 0.5  # its own mean/std
    evals = list(data.build_eval_iterator(cfg, global_batch=16, device_count=1, process_count=1))
    assert sum(b["mask"].sum() for b in evals) == 24
    with pytest.raises(ValueError, match=r"data.synthetic.num_classes=0 is invalid"):
        data.dataset_info(_synthetic_cfg(num_classes=0))
    # A transform only tf.data has: where TensorFlow cannot be imported, one error says it is needed and why, from
    # the trainer's check before anything compiles, else when the iterator is built.
    monkeypatch.setattr(tf_lazy, "import_tf", lambda: (_ for _ in ()).throw(ImportError("No module 'tensorflow'")))
    monkeypatch.setattr(pipeline, "tf_installed", lambda: False)
    data.check_tensorflow_needs(cfg)  # the NumPy path needs none
    cfg.eval_preprocess, cfg.eval_image_size = "deepmind", 8
    needed = r"eval input pipeline \(eval_preprocess 'deepmind'\) needs TensorFlow"
    with pytest.raises(tf_lazy.TensorFlowMissingError, match=needed):
        data.check_tensorflow_needs(cfg)
    with pytest.raises(tf_lazy.TensorFlowMissingError, match=needed):
        pipeline.build_eval_iterator(cfg, global_batch=16, device_count=1, process_count=1)


NO_TENSORFLOW = """
import json, sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None  # as if not installed: imports fail
from nfjax import train
for argv in json.loads(sys.argv[1]):
    assert train.main(argv) == 0, argv
loaded = [m for m, module in sys.modules.items() if m.split(".")[0] in ("tensorflow", "tensorflow_datasets") and module]
print("tensorflow modules:", loaded)
"""


def test_trains_without_tensorflow_from_the_cache_and_from_synthetic_data(fmnist_dir, compile_cache, tmp_path):
    """Both runs have the shapes of test_train.py's shared run, so their compiled programs are shared."""
    _ensure_cached(fmnist_dir, "train", "test")
    steps = ["--config.train.max_steps=2", "--config.train.eval_every_steps=2"]
    synthetic = ["--config.data.dataset=synthetic", "--config.data.synthetic.image_shape=(28,28,1)"]
    synthetic += ["--config.data.synthetic.train_examples=256", "--config.data.synthetic.eval_examples=100"]
    runs = [
        nf_args(fmnist_dir, tmp_path / "cache", *steps),
        nf_args(fmnist_dir, tmp_path / "synthetic", *steps, *synthetic),
    ]
    result = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, json.dumps(runs, default=str)],
        env=subprocess_env(compile_cache, devices=8),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "tensorflow modules: []" in result.stdout
    for run, examples in (("cache", 10_000), ("synthetic", 100)):
        final = json.loads((tmp_path / run / "final_metrics.json").read_text())
        assert final["step"] == 2 and final["eval"]["examples"] == examples
