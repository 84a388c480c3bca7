"""Prepare a dataset into a TFDS data_dir, offline where possible.

python -m nfjax.data.prepare fashion_mnist --data-dir ~/tensorflow_datasets [--source-dir DIR]
python -m nfjax.data.prepare imagenet2012 --data-dir DIR   # tars in DIR/downloads/manual/
python -m nfjax.data.prepare cifar10 --data-dir DIR        # needs network (TFDS download)

Afterwards every split that fits in memory (fixed image size, at most 4 GiB as uint8) is decoded into the array
cache beside the TFDS files (nfjax/data/array_cache.py; rewritten on every run, --no-array-cache skips it), so that
a copy of data_dir trains on a machine without TensorFlow.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Sequence

from nfjax.data.fashion_mnist import DEBIAN_SOURCE_DIR
from nfjax.data.offline import OFFLINE_PREPARERS
from nfjax.data.sources import cache_tfds_splits
from nfjax.data.tf_lazy import require_tfds


def prepare_tfds(name: str, data_dir: str) -> str:
    """Runs the TFDS builder; manual files (ImageNet tars) are read from data_dir/downloads/manual."""
    tfds = require_tfds(f"preparing {name} in {data_dir}")
    data_dir = os.path.expanduser(data_dir)
    builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
    if not builder.is_prepared():
        manual_dir = os.path.join(data_dir, "downloads", "manual")
        config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
        builder.download_and_prepare(download_config=config)
    return str(builder.data_dir)


def prepare_dataset(name: str, data_dir: str, source_dir: str | None = None) -> str:
    """Prepares ``name`` offline when OFFLINE_PREPARERS has it (from ``source_dir`` if given), else with TFDS."""
    preparer = OFFLINE_PREPARERS.get(name)
    if preparer is None:
        if source_dir is not None:
            raise ValueError(f"--source-dir applies only to {', '.join(sorted(OFFLINE_PREPARERS))}")
        return prepare_tfds(name, data_dir)
    return preparer(data_dir) if source_dir is None else preparer(data_dir, source_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", help="TFDS name, e.g. fashion_mnist, imagenet2012, cifar10")
    parser.add_argument("--data-dir", default="~/tensorflow_datasets")
    parser.add_argument(
        "--source-dir",
        help=f"offline datasets ({', '.join(sorted(OFFLINE_PREPARERS))}): folder of the local files "
        f"(fashion_mnist: IDX files, default {DEBIAN_SOURCE_DIR})",
    )
    parser.add_argument(
        "--array-cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write the decoded splits that fit in memory beside the TFDS files (default: yes)",
    )
    args = parser.parse_args(argv)
    try:
        path = prepare_dataset(args.dataset, args.data_dir, args.source_dir)
        cached = cache_tfds_splits(args.dataset, args.data_dir) if args.array_cache else []
    # TFDS reports a missing/empty manual_dir by assertion; a missing TensorFlow is a RuntimeError
    except (AssertionError, OSError, ValueError, RuntimeError) as e:
        reason = " ".join(str(e).split())
        if type(e).__name__ == "DatasetNotFoundError":  # TFDS appends its whole catalog: keep its suggestion only
            close = re.search(r"Did you mean: \S+ -> (\S+)", reason)
            reason = f"no TFDS dataset is named '{args.dataset}'" + (f"; did you mean '{close[1]}'?" if close else "")
        print(f"error: could not prepare '{args.dataset}' in {args.data_dir}: {reason}", file=sys.stderr)
        return 2
    print(f"{args.dataset} ready in {path}")
    for line in cached:
        print(f"  array cache: {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
