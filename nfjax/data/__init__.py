"""Input pipelines: TFDS datasets, offline Fashion-MNIST, image folders, and the recipes' augmentations.

Importing this package does not import TensorFlow; the first pipeline that needs it imports it (with GPUs
hidden from TF and TFDS kept off the network). The in-memory NumPy path needs none when the TFDS split is in the
array cache (decoded splits beside the TFDS files, nfjax/data/array_cache.py) or the data is synthetic
(``dataset='synthetic'``, nfjax/data/synthetic.py).

API (``cfg`` is the ``data`` ConfigDict from ``default_data_config()``; every field is in docs/data.md):

  default_data_config() -> ConfigDict
  fashion_mnist_data_config(data_dir) -> ConfigDict           # native 28x28x1, pad-crop + flip, NumPy path
  dataset_info(cfg) -> DatasetInfo(num_train_examples, num_eval_examples, num_classes, image_shape,
                                   class_names)              # metadata only, cheap
  source_info(source, cfg, train=True) -> SourceInfo         # image folder without image_size: common
                                                             # (H, W) from the image headers, or ValueError
  build_train_iterator(cfg, *, global_batch, mesh=None, start_step=0, seed=None,
                       process_index=None, process_count=None, device_count=None) -> Iterator[dict]
  build_eval_iterator(cfg, *, global_batch, split=None, mesh=None,
                      process_index=None, process_count=None, device_count=None) -> Iterator[dict]
  to_global_batch(batch, mesh, data_axis=None) -> dict[str, jax.Array]   # None: over every mesh axis
  check_tensorflow_needs(cfg) -> None   # without TensorFlow: error now if train/eval input needs tf.data
  train_label_counts(cfg) -> int64 [K]        # training examples per class (train.class_weights)
  bad_files(cfg) -> [(path, reason)]                             # image-folder files left out (unusable)
  eval_split_name(cfg) -> str      # data.eval_split, or 'train fold 2 of 5' with data.num_folds (folds.py)
  fold_note(cfg, num_train, num_eval) -> str | None              # the trainer's cross-validation line
  prepare_fashion_mnist(data_dir, source_dir='/usr/share/datasets/fashion-mnist') -> str
  OFFLINE_PREPARERS: dict[name, (data_dir, source_dir=default) -> str]   # datasets prepared from local files
  prepare_offline(cfg) -> None     # runs OFFLINE_PREPARERS[cfg.dataset] on cfg.data_dir if present, else no-op
  (CLI: python -m nfjax.data.prepare fashion_mnist --data-dir DIR; also writes the array cache)

Batches are dicts of host NumPy arrays (or global jax Arrays when ``mesh`` is given), b = local batch:
  'image'       float32 [b, H, W, C]  normalized on the host: (x - 255 * mean) / (255 * std)
  'label'       int32 [b]             the class (for MixUp/CutMix: the dominant image's class)
  'label_probs' float32 [b, K]        train only, when mixing, label smoothing or BCE targets are on
  'mask'        float32 [b]           eval only: 1 for real examples, 0 for padding
Training batch ``start_step`` of a resumed pipeline equals the batch at that step of an uninterrupted one.
"""

from nfjax.data.config import default_data_config, fashion_mnist_data_config
from nfjax.data.fashion_mnist import prepare_fashion_mnist
from nfjax.data.folds import eval_split_name, fold_note
from nfjax.data.offline import OFFLINE_PREPARERS, prepare_offline
from nfjax.data.pipeline import (
    DatasetInfo,
    build_eval_iterator,
    build_train_iterator,
    check_tensorflow_needs,
    dataset_info,
    source_info,
    train_label_counts,
)
from nfjax.data.sharding import check_global_batch, to_global_batch
from nfjax.data.sources import DatasetNotFoundError, bad_files

__all__ = [
    "DatasetInfo",
    "DatasetNotFoundError",
    "bad_files",
    "OFFLINE_PREPARERS",
    "build_eval_iterator",
    "build_train_iterator",
    "check_global_batch",
    "check_tensorflow_needs",
    "dataset_info",
    "default_data_config",
    "eval_split_name",
    "fashion_mnist_data_config",
    "fold_note",
    "prepare_fashion_mnist",
    "prepare_offline",
    "source_info",
    "to_global_batch",
    "train_label_counts",
]
