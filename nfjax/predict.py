"""Top-k predictions for image files: ``python -m nfjax.predict --workdir DIR IMAGE... [--top-k 5]``.

Restores the newest checkpoint of the run in DIR, or the weights of a folder written by ``nfjax.convert`` (EMA
weights when the run keeps them), preprocesses each image as the run's evaluation pipeline does (channels
converted to the dataset's, the eval resize/center crop, the mean/std normalization) and prints, per image,
the top-k class names with probabilities:

    shoe.png
      0.9123  Ankle boot
      0.0411  Sneaker
"""

from __future__ import annotations

import argparse
import os
import sys

from nfjax.host_devices import configure_host_devices

configure_host_devices()  # before JAX starts, as for training

import jax
import numpy as np

from nfjax import parallel
from nfjax.cli import run_parsed
from nfjax.convert.pretrained import dataset_info, read_record
from nfjax.data import augment, source_info
from nfjax.data.config import mean_std
from nfjax.data.pipeline import batch_image_shape
from nfjax.data.sources import make_source
from nfjax.data.tf_lazy import import_tf
from nfjax.experiment import load_config, load_run
from nfjax.steps import apply_model


class ImageReadError(ValueError):
    """An input file that PIL cannot open as an image."""


def read_image(path: str, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] (grayscale for 1 channel, RGB for 3) of an image file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except OSError as e:  # missing file, permission, or not an image (PIL's UnidentifiedImageError)
        reason = e.strerror or str(e)
        raise ImageReadError(f"cannot read {path} as an image ({reason}); give PNG or JPEG files") from None
    return array[..., None] if array.ndim == 2 else array


def input_format(data_cfg) -> tuple[int, int | None]:
    """(channels of the files as read, eval image size) of a run's evaluation pipeline."""
    info = source_info(make_source(data_cfg, data_cfg.eval_split), data_cfg, train=False)
    return info.image_shape[-1], batch_image_shape(data_cfg, info, train=False)[0]


def preprocess(images: list[np.ndarray], data_cfg, size_channels: tuple[int, int | None] | None = None) -> np.ndarray:
    """uint8 [H, W, C] images -> float32 [N, S, S, C'] exactly as the eval pipeline prepares its batches.
    ``size_channels``: (channels, size) when known without the dataset (a converted weights folder)."""
    channels, size = size_channels or input_format(data_cfg)
    mean, std = mean_std(data_cfg, channels)
    tf = import_tf()
    out = []
    for image in images:
        x = augment.eval_preprocess(
            tf.constant(image),
            size,
            data_cfg.eval_preprocess,
            data_cfg.crop_pct,
            channels,
            data_cfg.get("eval_interpolation", "bicubic"),  # runs saved before the option existed: bicubic
        )
        out.append(augment.normalize(x, mean, std, data_cfg.grayscale_to_rgb).numpy())
    return np.stack(out)


def predict(workdir: str, paths: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Per image, the ``top_k`` (class name, probability) pairs, most likely first."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    data_cfg = load_config(workdir).data
    record = read_record(workdir)  # a converted weights folder: no dataset to read the format from
    known = (record["in_channels"], data_cfg.eval_image_size) if record else None
    channels = known[0] if known else make_source(data_cfg, data_cfg.eval_split).info().image_shape[-1]
    images = [read_image(p, channels) for p in paths]  # unreadable files fail before the model is loaded
    # any number of images: no batch split over devices
    run = load_run(workdir, num_devices=1, info=dataset_info(record) if record else None)
    exp = run.experiment
    batch = preprocess(images, exp.cfg.data, known)
    weights = run.weights.get("ema", run.weights["params"])
    logits, _ = jax.jit(lambda p, s, x: apply_model(exp.graphdef, p, s, x, train=False))(
        weights, run.weights.get("batch_stats", {}), batch
    )
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    k = min(top_k, probs.shape[-1])
    names = exp.info.class_names
    return [[(names[i], float(row[i])) for i in np.argsort(-row)[:k]] for row in probs]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nfjax.predict", description="Top-k class predictions of a trained run for image files."
    )
    parser.add_argument(
        "--workdir", required=True, help="the --workdir of a training run, or a folder of converted weights"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG)")
    return parser


def main(argv: list[str] | None = None) -> int:
    def run(args):
        parallel.initialize_distributed()
        return list(zip(args.images, predict(args.workdir, args.images, args.top_k), strict=False))

    code, results = run_parsed(build_parser(), argv, run)
    for path, top in results or []:
        print(path)
        for name, prob in top:
            print(f"  {prob:.4f}  {name}")
    return code


if __name__ == "__main__":
    sys.exit(main())
