"""Datasets prepared offline from local files, by TFDS name: one table, so callers need no name tests."""

from __future__ import annotations

import os
from typing import Protocol

from nfjax.data import array_cache
from nfjax.data.fashion_mnist import prepare_fashion_mnist


class OfflinePreparer(Protocol):
    """Writes the dataset into the TFDS ``data_dir`` from local files (``source_dir``: the preparer's default
    folder when omitted) and returns the dataset folder; idempotent."""

    def __call__(self, data_dir: str, source_dir: str = ...) -> str: ...


OFFLINE_PREPARERS: dict[str, OfflinePreparer] = {"fashion_mnist": prepare_fashion_mnist}


def prepare_offline(data_cfg) -> None:
    """Prepares ``data_cfg.dataset`` into ``data_cfg.data_dir`` when it is in OFFLINE_PREPARERS and the data_dir
    holds no array cache of it (a cache means it was prepared, possibly on another machine: the preparers need
    TensorFlow); otherwise does nothing (other datasets are prepared with ``python -m nfjax.data.prepare``)."""
    preparer = OFFLINE_PREPARERS.get(data_cfg.dataset)
    if preparer is not None and not array_cache.has_cache(data_cfg.dataset, data_cfg.data_dir):
        preparer(os.path.expanduser(data_cfg.data_dir))
