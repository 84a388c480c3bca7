"""Writes tests/data/randaugment/deepmind_ops.npz: outputs of DeepMind's own RandAugment code on a small
fixture, with its random draws forced, for tests/test_randaugment_reference.py (which needs no DeepMind code).

    python scripts/make_randaugment_reference.py --deepmind-autoaugment /tmp/dm_nfnets/autoaugment.py \\
        [--tensorflow-addons /tmp/tfa] [--out tests/data/randaugment/deepmind_ops.npz]

DeepMind's file is ``nfnets/autoaugment.py`` of the GitHub repository google-deepmind/deepmind-research
(Apache 2.0). Save it anywhere outside this project; it is imported from that path and never copied here.
It needs TensorFlow, ml_collections and ``tensorflow_addons.image`` (rotate, translate, transform).
tensorflow_addons is end-of-life and its package no longer imports whole next to Keras 3; if
``import tensorflow_addons`` fails, unpack its last wheel and pass the folder, from which only the image
transform modules are loaded:

    pip download tensorflow-addons==0.23.0 --no-deps -d /tmp/wheels
    python -m zipfile -e /tmp/wheels/tensorflow_addons-0.23.0-*.whl /tmp/tfa

Every case runs ``distort_image_with_randaugment(image, num_layers, magnitude)``, DeepMind's whole RandAugment
entry point, with its ``tf.random_uniform`` answered from a script: per layer the op index, the sign of a
signed argument (u = 0.25 negates, 0.75 keeps) and Cutout's centre (row, column). Its uses of
``inspect.getargspec`` (gone since Python 3.11) are served by ``getfullargspec``. The file holds the fixture
images once, each distinct output once, and a JSON list of cases: image, magnitude, layers
[(op, negate, [row, col])], output key. Eager and traced (tf.function) runs of DeepMind's code are compared
on a subset; the script stops if they differ.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import importlib.util
import inspect
import json
import os
import sys
import types
from typing import Any

import numpy as np

OPS = (
    "AutoContrast Equalize Invert Rotate Posterize Solarize Color Contrast Brightness Sharpness "
    "ShearX ShearY TranslateX TranslateY Cutout SolarizeAdd"
).split()
SIGNED = {"Rotate", "ShearX", "ShearY", "TranslateX", "TranslateY"}
NO_LEVEL = {"AutoContrast", "Equalize", "Invert"}
MAGNITUDES = [0, 1, 2, 2.5, 3, 5, 7, 9, 10, 15]
EXTRA_MAGNITUDES = {"Posterize": [11, 20, 22.5, 25], "Solarize": [11, 12.5, 20, 25], "SolarizeAdd": [20, 25]}
LAYER_MAGNITUDES = [5, 10, 15]  # the NFNet recipes: 4 layers at 5 (F0), 10 (F1, F2), 15 (F3+)
DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "..", "tests", "data", "randaugment", "deepmind_ops.npz")


def fixture_images() -> dict[str, np.ndarray]:
    """Small uint8 RGB images: smooth, noisy, edge cases, constant; and a 256 px one (Contrast's gray level
    saturates at 255 from 65,280 pixels on; translations of 100 px keep content), made of 8x8 blocks so that
    it and its outputs compress well."""
    rng = np.random.default_rng(20210211)
    y, x = np.mgrid[0:32, 0:40].astype(np.float64)
    smooth = np.stack([x * 255 / 39, y * 255 / 31, 128 + 100 * np.sin(x / 5.0) * np.cos(y / 7.0)], -1)
    edges = np.zeros((32, 36, 3), np.uint8)
    edges[:, :, 0] = np.where((np.arange(36) // 3) % 2, 255, 0)[None, :]  # stripes 0 / 255
    edges[:, :, 1] = np.array([0, 1, 126, 127, 128, 129, 254, 255])[(np.arange(32) // 4)][:, None]
    edges[:, :, 2] = 100 + (np.add.outer(np.arange(32), np.arange(36)) % 41)  # narrow range 100..140
    coarse_y, coarse_x = np.mgrid[0:32, 0:32].astype(np.float64)
    coarse = np.stack(
        [
            128 + 110 * np.sin(coarse_x / 3.0 + coarse_y / 4.0),
            np.where(coarse_y < 16, coarse_x * 8, 255 - coarse_y * 8),
            96 + 60 * np.cos(np.hypot(coarse_x - 12, coarse_y - 17)),
        ],
        -1,
    )
    blocks = np.repeat(np.repeat(np.clip(np.round(coarse), 0, 255), 8, axis=0), 8, axis=1)
    return {
        "smooth_32x40": np.clip(np.round(smooth), 0, 255).astype(np.uint8),
        "noise_16x24": rng.integers(0, 256, (16, 24, 3), dtype=np.uint8),
        "edges_32x36": edges,
        "constant_16x16": np.full((16, 16, 3), 77, np.uint8),
        "blocks_256x256": blocks.astype(np.uint8),
    }


def single_op_cases(images: dict) -> list[dict]:
    """Every op at every magnitude on each small image (both signs; Cutout at an inner and a corner centre);
    the 256 px image gets Contrast at every magnitude and each op at magnitude 10."""
    cases = []
    for name, image in images.items():
        height, width = image.shape[:2]
        centers = [[height // 3, width // 2], [1, width - 2]]
        big = name.startswith("blocks")
        for op in OPS:
            if big and op != "Contrast":
                magnitudes = [10]
            else:
                magnitudes = [5] if op in NO_LEVEL else MAGNITUDES + EXTRA_MAGNITUDES.get(op, [])
            signs = [True, False] if op in SIGNED and not big else [True]
            for m in magnitudes:
                for negate in signs:
                    for center in centers if op == "Cutout" and not big else centers[:1]:
                        cases.append(dict(image=name, magnitude=m, layers=[[op, negate, center]]))
    return cases


def layer_cases(images: dict) -> list[dict]:
    """4 layers with seeded op choices, signs and centres, at the recipes' magnitudes."""
    rng = np.random.default_rng(4)
    cases = []
    for name, image in images.items():
        for m in LAYER_MAGNITUDES:
            for _ in range(1 if name.startswith("blocks") else 2):
                layers = [
                    [OPS[rng.integers(16)], bool(rng.integers(2)), [int(rng.integers(s)) for s in image.shape[:2]]]
                    for _ in range(4)
                ]
                cases.append(dict(image=name, magnitude=m, layers=layers))
    return cases


def load_tensorflow_addons_image(folder: str | None) -> None:
    """Makes ``from tensorflow_addons import image`` work: the installed package, or else only the image
    transform modules of an unpacked tensorflow_addons (its package __init__ imports Keras 2 internals)."""
    try:
        importlib.import_module("tensorflow_addons.image")
        return
    except Exception as error:  # noqa: BLE001 - any import failure means: fall back to the folder
        for key in [k for k in sys.modules if k.split(".")[0] == "tensorflow_addons"]:
            del sys.modules[key]
        if folder is None:
            raise SystemExit(f"tensorflow_addons does not import ({error}); pass --tensorflow-addons DIR") from None
    root = os.path.join(os.path.abspath(folder), "tensorflow_addons")
    for name, path in [("", root), (".utils", "utils"), (".image", "image")]:
        module = types.ModuleType("tensorflow_addons" + name)
        module.__path__ = [os.path.join(root, path) if name else root]
        sys.modules[module.__name__] = module
    typing_stub = types.ModuleType("tensorflow_addons.utils.types")
    typing_stub.TensorLike = typing_stub.Number = Any
    sys.modules[typing_stub.__name__] = typing_stub
    image = sys.modules["tensorflow_addons.image"]
    for module_name in ("transform_ops", "translate_ops"):
        module = importlib.import_module(f"tensorflow_addons.image.{module_name}")
        for attr in ("rotate", "transform", "translate"):
            if hasattr(module, attr):
                setattr(image, attr, getattr(module, attr))
    sys.modules["tensorflow_addons"].image = image


def load_deepmind(path: str):
    spec = importlib.util.spec_from_file_location("deepmind_nfnets_autoaugment", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(inspect, "getargspec"):
        module.inspect = types.SimpleNamespace(getargspec=inspect.getfullargspec)
    return module


class ForcedTf:
    """tensorflow.compat.v1 for DeepMind's module, whose ``random_uniform`` returns the scripted draws."""

    def __init__(self, tf_v1, layers: list):
        self._tf, self._layers, self._layer, self._center_calls = tf_v1, layers, -1, 0

    def __getattr__(self, name):
        return getattr(self._tf, name)

    def random_uniform(self, shape, minval=0, maxval=None, dtype=None, seed=None, name=None):
        tf = self._tf
        if dtype == tf.int32 and not tf.is_tensor(maxval):  # a layer's op choice
            self._layer, self._center_calls = self._layer + 1, 0
            return tf.constant(OPS.index(self._layers[self._layer][0]), tf.int32)
        op, negate, center = self._layers[self._layer]
        if dtype == tf.int32:  # Cutout's centre: row, then column
            self._center_calls += 1
            return tf.constant(center[(self._center_calls - 1) % 2], tf.int32)
        if minval == 0.2:  # a per-op probability the RandAugment path does not use
            return tf.constant(0.5, tf.float32)
        return tf.constant(0.25 if negate else 0.75, tf.float32)  # negated iff floor(u + 0.5) == 0


def run_deepmind(dm, tf, image: np.ndarray, case: dict, traced: bool = False) -> np.ndarray:
    original = dm.tf
    dm.tf = ForcedTf(tf.compat.v1, case["layers"])
    try:
        run = lambda x: dm.distort_image_with_randaugment(x, len(case["layers"]), case["magnitude"])
        run = tf.function(run) if traced else run
        return run(tf.constant(image)).numpy()
    finally:
        dm.tf = original


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deepmind-autoaugment", required=True, help="path of DeepMind's nfnets/autoaugment.py")
    parser.add_argument("--tensorflow-addons", default=None, help="folder holding an unpacked tensorflow_addons")
    parser.add_argument("--out", default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    import tensorflow as tf

    load_tensorflow_addons_image(args.tensorflow_addons)
    dm = load_deepmind(args.deepmind_autoaugment)
    images = fixture_images()
    cases = single_op_cases(images) + layer_cases(images)
    arrays = {f"image/{name}": image for name, image in images.items()}
    keys = {}  # output bytes and shape -> its key: identical outputs are stored once
    for case in cases:
        out = run_deepmind(dm, tf, images[case["image"]], case)
        case["out"] = keys.setdefault((out.tobytes(), out.shape), f"out/{len(keys):05d}")
        arrays[case["out"]] = out
    check_traced(dm, tf, images, cases, arrays)
    with open(args.deepmind_autoaugment, "rb") as f:
        source_sha = hashlib.sha256(f.read()).hexdigest()
    meta = dict(deepmind_autoaugment_sha256=source_sha, tensorflow=tf.__version__, numpy=np.__version__)
    arrays["cases"] = np.array(json.dumps(cases))
    arrays["meta"] = np.array(json.dumps(meta))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    np.savez_compressed(args.out, **arrays)
    size = os.path.getsize(args.out) / 1e6
    print(f"{len(cases)} cases, {len(keys)} distinct outputs -> {args.out} ({size:.2f} MB)")


def check_traced(dm, tf, images, cases, arrays) -> None:
    """DeepMind ran these ops inside tf.data graphs: traced runs must give the eager outputs."""
    subset = [c for c in cases if c["magnitude"] == 10 or len(c["layers"]) > 1]
    for case in subset[:: max(1, len(subset) // 60)]:
        traced = run_deepmind(dm, tf, images[case["image"]], case, traced=True)
        if not np.array_equal(traced, arrays[case["out"]]):
            raise SystemExit(f"DeepMind's code gives different eager and traced outputs for {case}")


if __name__ == "__main__":
    main()
