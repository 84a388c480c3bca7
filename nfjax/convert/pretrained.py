"""The folder a conversion writes: a workdir like a training run's, plus a record of where the weights came from.

    DIR/config.json      an nfjax config: the model (name + constructor arguments) and the evaluation
                         preprocessing the weights expect (ImageNet, test size, resize/crop, mean/std)
    DIR/checkpoints/0/   the weights as an nfjax checkpoint (params; BatchNorm statistics for BN models)
    DIR/pretrained.json  model, options, classes, source file and its sha256, preprocessing, class names

Because it is a workdir, everything that reads a run reads it too: ``nfjax.evaluate --workdir DIR``,
``nfjax.predict --workdir DIR``, ``--config.model.init_from=DIR`` (fine-tuning), ``convert export-timm DIR``,
and :func:`nfjax.models.create_model` ``(name, pretrained=DIR)``.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from nfjax.convert.errors import ConversionError

PRETRAINED_FILE = "pretrained.json"
PRETRAINED_FORMAT = 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PLACEHOLDER_BATCH = 8  # the folder's config is for evaluation; evaluate/predict choose their own batch


def sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def preprocessing(
    train_size: int,
    test_size: int,
    *,
    resize: str,
    crop_pct: float,
    interpolation: str = "bicubic",
    mean: tuple = IMAGENET_MEAN,
    std: tuple = IMAGENET_STD,
) -> dict[str, Any]:
    """How the weights expect images at evaluation. ``resize``: 'deepmind' (resize the whole image to
    (test + 32)^2, center-crop test) or 'crop_pct' (timm: short side to test / crop_pct, center-crop test)."""
    if resize not in ("deepmind", "crop_pct"):
        raise ValueError(f"resize must be 'deepmind' or 'crop_pct', got {resize!r}")
    return dict(
        train_size=train_size,
        test_size=test_size,
        resize=resize,
        crop_pct=crop_pct,
        interpolation=interpolation,
        mean=list(mean),
        std=list(std),
    )


def _config(model: str, model_kwargs: dict, prep: Mapping[str, Any]):
    """The folder's config.json: the model, and an ImageNet data section with the weights' preprocessing."""
    from nfjax.config_lib import base_config, finalize

    cfg = base_config(model, model_kwargs)
    data = cfg.data
    data.image_size, data.eval_image_size = prep["train_size"], prep["test_size"]
    data.eval_preprocess, data.crop_pct = prep["resize"], prep["crop_pct"]
    data.eval_interpolation = prep.get("interpolation", "bicubic")  # pretrained.json files of older versions lack it
    data.mean, data.std = tuple(prep["mean"]), tuple(prep["std"])
    cfg.train.global_batch = cfg.train.eval_batch = PLACEHOLDER_BATCH
    return finalize(cfg)


def dataset_info(record: Mapping[str, Any]):
    """The DatasetInfo the folder's model implies, for prediction without the dataset (the example counts
    only size a schedule that is never run: one batch of ``PLACEHOLDER_BATCH``)."""
    from nfjax.data import DatasetInfo

    size = record["preprocessing"]["test_size"]
    names = record.get("class_names") or [f"class {i}" for i in range(record["num_classes"])]
    return DatasetInfo(PLACEHOLDER_BATCH, 0, record["num_classes"], (size, size, record["in_channels"]), tuple(names))


def load_weights(workdir: str, num_devices: int | None = 1):
    """The newest weights of a run or a weights folder (a SavedRun) without opening its dataset: the model's
    class count and input channels come from the checkpoint (class names from pretrained.json when present)."""
    from nfjax.checkpoint import newest_meta_in
    from nfjax.data import DatasetInfo
    from nfjax.runs import load_config, load_run

    workdir = os.path.abspath(os.path.expanduser(workdir))
    record = read_record(workdir)
    if record is not None:
        return load_run(workdir, num_devices=num_devices, info=dataset_info(record))
    cfg = load_config(workdir)
    if not os.path.isdir(os.path.join(workdir, "checkpoints")):
        raise FileNotFoundError(f"{workdir} holds no checkpoints folder: the run saved no checkpoint yet")
    meta = newest_meta_in(workdir)
    if meta is None:
        raise FileNotFoundError(f"no checkpoint in {workdir}/checkpoints: train the run longer or check the path")
    size = cfg.data.eval_image_size or cfg.data.image_size or 32
    shape = (size, size, meta["in_channels"])
    names = tuple(f"class {i}" for i in range(meta["num_classes"]))
    info = DatasetInfo(cfg.train.global_batch, 0, meta["num_classes"], shape, names)
    return load_run(workdir, num_devices=num_devices, info=info)


def save_pretrained(
    out_dir: str,
    *,
    model: str,
    model_kwargs: Mapping[str, Any],
    weights: Mapping[str, Any],
    source: Mapping[str, Any],
    prep: Mapping[str, Any],
    class_names: list[str] | None = None,
) -> dict[str, Any]:
    """Writes the folder (see the module docstring) and returns its pretrained.json record.

    ``weights``: {'params': pure dict, 'batch_stats': pure dict (BN models)} of NumPy/JAX arrays, exactly the
    trees of ``create_model(model, num_classes, **model_kwargs)``; checked against the model before writing.
    """
    from nfjax.experiment import build_experiment
    from nfjax.runs import save_config

    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    if os.path.exists(out_dir) and os.listdir(out_dir):
        raise ConversionError(f"--out {out_dir} exists and is not empty; give a new folder (nothing was written)")
    num_classes = int(np.shape(weights["params"]["classifier"]["bias"])[0])
    if class_names is not None and len(class_names) != num_classes:
        raise ConversionError(f"{len(class_names)} class names given for a model with {num_classes} classes")
    record = dict(
        format=PRETRAINED_FORMAT,
        model=model,
        model_kwargs=dict(model_kwargs),
        num_classes=num_classes,
        in_channels=3,
        source=dict(source),
        preprocessing=dict(prep),
        class_names=class_names,
    )
    cfg = _config(model, dict(model_kwargs), prep)
    exp = build_experiment(cfg, num_devices=1, info=dataset_info(record), training=False)
    trees = {k: weights[k] for k in ("params", "batch_stats") if weights.get(k)}
    expected = exp.abstract_weights(sorted(trees))
    check_trees(trees, expected)
    state = jax.tree.map(np.asarray, trees) | dict(step=np.zeros((), np.int32), opt_state={})
    ckpt = exp.checkpointer(out_dir)
    try:
        ckpt.save(0, state, exp.checkpoint_meta())
    finally:
        ckpt.close()
    save_config(cfg, out_dir)
    with open(os.path.join(out_dir, PRETRAINED_FILE), "w") as f:
        json.dump(record, f, indent=2)
    return record


def check_trees(trees: Mapping[str, Any], expected: Mapping[str, Any]) -> None:
    """Raises ConversionError unless ``trees`` has exactly the paths and shapes of ``expected``."""
    from nfjax.convert.errors import flatten, mismatch_message

    got, want = flatten(trees), flatten(expected)
    name = lambda path: ".".join(map(str, path))
    missing = [name(p) for p in want if p not in got]
    unexpected = [name(p) for p in got if p not in want]
    wrong = [
        f"{name(p)} {tuple(np.shape(got[p]))} (expected {tuple(want[p].shape)})"
        for p in want
        if p in got and tuple(np.shape(got[p])) != tuple(want[p].shape)
    ]
    if missing or unexpected or wrong:
        raise ConversionError(mismatch_message(missing, unexpected, wrong))


def read_record(directory: str) -> dict[str, Any] | None:
    """The folder's pretrained.json record, or None when ``directory`` is not a converted-weights folder."""
    path = os.path.join(os.path.expanduser(directory), PRETRAINED_FILE)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)
