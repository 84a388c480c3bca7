"""Inference on images outside a dataset, shared by ``nfjax.predict`` and ``nfjax.export``.

:func:`load_inference_model` restores the newest weights of a run (EMA weights when the run keeps them) or of a
folder written by ``nfjax.convert``, together with the evaluation preprocessing its images need;
:func:`run_batches` predicts class probabilities for many files through one jitted program of a fixed batch
shape (the last batch padded), with optional test-time augmentation (flip, five crops, or both).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nfjax.convert.pretrained import dataset_info, read_record
from nfjax.data import augment, source_info
from nfjax.data.config import mean_std
from nfjax.data.pipeline import batch_image_shape
from nfjax.data.sources import IMAGE_EXTENSIONS, make_source
from nfjax.data.tf_lazy import import_tf
from nfjax.experiment import Experiment
from nfjax.models import lowering
from nfjax.runs import load_config, load_run
from nfjax.steps import apply_model, mean_view_log_probs, prestandardized_fn, with_flips

TTA_MODES = ("none", "flip", "crops5", "flip+crops5")
CROP_TTA_MODES = ("crops5", "flip+crops5")  # five crops of the resized image instead of its center crop
CROP_RESIZES = ("deepmind", "crop_pct")  # eval_preprocess modes that resize beyond the crop


class ImageReadError(ValueError):
    """An input file that PIL cannot open as an image."""


def read_image(path: str, channels: int) -> np.ndarray:
    """uint8 [H, W, channels] (grayscale for 1 channel, RGB for 3) of an image file."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # missing, permission, not an image, truncated or corrupt data
        reason = getattr(e, "strerror", None) or str(e)
        raise ImageReadError(f"cannot read {path} as an image ({reason}); give PNG or JPEG files") from None
    return array[..., None] if array.ndim == 2 else array


def input_format(data_cfg) -> tuple[int, int | None]:
    """(channels of the files as read, eval image size) of a run's evaluation pipeline."""
    info = source_info(make_source(data_cfg, data_cfg.eval_split), data_cfg, train=False)
    return info.image_shape[-1], batch_image_shape(data_cfg, info, train=False)[0]


def preprocess(
    images: list[np.ndarray],
    data_cfg,
    size_channels: tuple[int, int | None] | None = None,
    crops: bool = False,
) -> np.ndarray:
    """uint8 [H, W, C] images -> float32 [N, S, S, C'] exactly as the eval pipeline prepares its batches.
    ``size_channels``: (channels, size) when known without the dataset (a converted weights folder).
    ``crops``: float32 [N, 5, S, S, C'] instead, the four corner crops and the center crop of the eval resize
    (:func:`nfjax.data.augment.five_crops`), each normalized; needs eval_preprocess 'deepmind' or 'crop_pct'."""
    channels, size = size_channels or input_format(data_cfg)
    mean, std = mean_std(data_cfg, channels)
    tf = import_tf()
    prep = (size, data_cfg.eval_preprocess, data_cfg.crop_pct, channels)
    interpolation = data_cfg.get("eval_interpolation", "bicubic")  # runs saved before the option existed: bicubic
    normalize = lambda x: augment.normalize(x, mean, std, data_cfg.grayscale_to_rgb).numpy()
    out = []
    for image in images:
        if crops:
            views = augment.five_crops(augment.eval_resize(tf.constant(image), *prep, interpolation), size, channels)
            out.append(np.stack([normalize(view) for view in tf.unstack(views)]))
        else:
            out.append(normalize(augment.eval_preprocess(tf.constant(image), *prep, interpolation)))
    return np.stack(out)


@dataclasses.dataclass
class InferenceModel:
    """A restored model with its evaluation preprocessing: ``preprocess`` files, then ``logits`` or ``probs``."""

    experiment: Experiment
    params: dict  # the weights used: the EMA weights when the run keeps them, else the raw params
    batch_stats: dict  # BN statistics ({} for normalizer-free models)
    weights_name: str  # 'ema' or 'params': which weights ``params`` are
    step: int
    channels: int  # channels of the files as read (before any grayscale -> RGB copy)
    eval_size: int | None  # the eval resize/crop size; None: images keep the dataset's size

    @property
    def class_names(self) -> tuple[str, ...]:
        return tuple(self.experiment.info.class_names)

    @property
    def image_size(self) -> int:
        """S: the model takes [N, S, S, C] images."""
        return self.eval_size or self.experiment.info.image_shape[0]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """[S, S, C] of one preprocessed image, C the model's input channels."""
        return (self.image_size, self.image_size, self.experiment.model.in_channels)

    def preprocess(self, images: list[np.ndarray], crops: bool = False) -> np.ndarray:
        """uint8 [H, W, C] images -> the float32 [N, S, S, C] batch the model takes (``crops``: [N, 5, S, S, C],
        the five crops of each image, see :func:`preprocess`)."""
        return preprocess(images, self.experiment.cfg.data, (self.channels, self.eval_size), crops)

    def check_tta(self, tta: str) -> None:
        """Raises ValueError for an unknown ``tta`` or, for five-crop modes, a run whose eval preprocessing
        does not resize beyond the crop (the five crops would all be the same image)."""
        if tta not in TTA_MODES:
            raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
        resize = self.experiment.cfg.data.eval_preprocess
        if tta in CROP_TTA_MODES and (resize not in CROP_RESIZES or self.eval_size is None):
            raise ValueError(
                f"--tta {tta} crops the eval resize, but this run's data.eval_preprocess is {resize!r} with "
                f"eval image size {self.eval_size} (images are not resized beyond the crop, so the five crops "
                "would be one); use --tta flip"
            )

    def logits(self, images: jax.Array) -> jax.Array:
        """float32 [N, num_classes] logits of preprocessed images (weights closed over: traceable, exportable)."""
        return apply_model(self.experiment.graphdef, self.params, self.batch_stats, images, train=False)[0]

    def serving_weights(self) -> dict:
        """The params as served, NF models' kernels standardized once
        (:meth:`nfjax.experiment.Experiment.inference_weights`)."""
        return self.experiment.inference_weights(self.params, self.batch_stats)

    def serving_logits(self) -> Callable[[jax.Array], jax.Array]:
        """:meth:`logits` over :meth:`serving_weights`, closed over: the function ``nfjax.export`` serializes, so
        an artifact of an NF model computes no weight standardization when it serves."""
        params, graphdef, batch_stats = self.serving_weights(), self.experiment.graphdef, self.batch_stats

        def logits(images: jax.Array) -> jax.Array:
            return apply_model(graphdef, params, batch_stats, images, train=False)[0]

        return prestandardized_fn(logits) if self.experiment.prestandardized else logits

    def preprocessing_record(self) -> dict[str, Any]:
        """What a caller must do to a file before the model sees it (the eval pipeline, spelled out)."""
        data = self.experiment.cfg.data
        mean, std = mean_std(data, self.channels)
        return dict(
            read_as="grayscale" if self.channels == 1 else "RGB",
            grayscale_to_rgb=bool(data.grayscale_to_rgb and self.channels == 1),
            resize=data.eval_preprocess,
            crop_pct=float(data.crop_pct),
            interpolation=data.get("eval_interpolation", "bicubic"),
            image_size=self.image_size,
            mean=[float(m) for m in mean],
            std=[float(s) for s in std],
            normalize="x = (pixel - 255 * mean) / (255 * std), pixel in [0, 255], per channel",
        )


def load_inference_model(workdir: str, weights: str = "auto") -> InferenceModel:
    """The newest weights of a run or a converted weights folder on one device. ``weights``: 'auto' (EMA when
    the run keeps them, as predict always did), 'ema' or 'params' (the raw weights)."""
    if weights not in ("auto", "ema", "params"):
        raise ValueError(f"weights must be 'auto', 'ema' or 'params', got {weights!r}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    record = read_record(workdir)  # a converted weights folder: no dataset to read the format from
    data_cfg = load_config(workdir).data
    known = (record["in_channels"], data_cfg.eval_image_size) if record else None
    run = load_run(workdir, num_devices=1, info=dataset_info(record) if record else None)
    channels, size = known or input_format(run.experiment.cfg.data)
    name = "ema" if weights == "auto" and "ema" in run.weights else weights if weights != "auto" else "params"
    if name not in run.weights:
        raise ValueError(f"the checkpoint in {workdir} keeps no EMA weights; use --weights params")
    return InferenceModel(
        experiment=run.experiment,
        params=run.weights[name],
        batch_stats=run.weights.get("batch_stats", {}),
        weights_name=name,
        step=run.step,
        channels=channels,
        eval_size=size,
    )


def find_images(folder: str) -> list[str]:
    """Image files (by extension: .jpg, .jpeg, .png) under ``folder``, recursively, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        found += [os.path.join(root, f) for f in sorted(files) if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS]
    return found


def make_probs_fn(model: InferenceModel, tta: str = "none") -> Callable[[dict, dict, jax.Array], jax.Array]:
    """A jitted (params, batch_stats, images) -> softmax probabilities [N, classes]; params from
    :meth:`InferenceModel.serving_weights` (NF models: standardized once); images float32
    [N, S, S, C], or [N, 5, S, S, C] (:meth:`InferenceModel.preprocess` with crops) for the crop modes.
    'none': softmax(model(x)). Otherwise p = (1/V) sum_v softmax(model(x_v)), the mean of the softmax
    probabilities (not of the logits) over V views: 'flip' x and its mirror (width axis reversed), V = 2;
    'crops5' the five crops, V = 5; 'flip+crops5' the five crops and their mirrors, V = 10."""
    model.check_tta(tta)
    graphdef = model.experiment.graphdef

    def probs(params, batch_stats, images):
        logits_fn = lambda x: apply_model(graphdef, params, batch_stats, x, train=False)[0]
        if tta == "none":
            return jax.nn.softmax(logits_fn(images), axis=-1)
        views = images if tta in CROP_TTA_MODES else images[:, None]
        views = with_flips(views) if tta.startswith("flip") else views
        return jnp.exp(mean_view_log_probs(logits_fn, views))

    probs = prestandardized_fn(probs) if model.experiment.prestandardized else probs
    probs = lowering.on_devices(probs, model.experiment.mesh.size)
    return jax.jit(probs, compiler_options=lowering.compiler_options())


@dataclasses.dataclass
class Prediction:
    """One file's outcome: class probabilities [num_classes], or the reason it could not be read."""

    path: str
    probs: np.ndarray | None = None
    error: str | None = None


def run_batches(
    model: InferenceModel, paths: Sequence[str], batch: int, tta: str = "none", on_batch: Callable[[int], Any] = None
) -> Iterator[Prediction]:
    """A Prediction per path, in order. Files are read and preprocessed ``batch`` at a time and padded to
    exactly ``batch`` images (one compiled program); unreadable files become Predictions with an error. Batch
    i+1 is read while batch i runs. ``on_batch(files)`` is called after each batch is done."""
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    probs_fn = make_probs_fn(model, tta)  # an unknown mode fails here, before any file is read
    weights = model.serving_weights()  # NF models: standardized once for all the batches, not in each
    crops = tta in CROP_TTA_MODES
    pending = None  # (chunk results, device probabilities) of the batch in flight
    for start in range(0, len(paths), batch):
        chunk, images = [], []
        for path in paths[start : start + batch]:
            try:
                images.append(model.preprocess([read_image(path, model.channels)], crops)[0])
                chunk.append(Prediction(path))
            except ImageReadError as e:
                chunk.append(Prediction(path, error=str(e)))
            except Exception as e:  # noqa: BLE001 - a file PIL opens but TF cannot decode or resize: skip it too
                chunk.append(Prediction(path, error=f"cannot preprocess {path} ({type(e).__name__}: {e})"))
        in_flight = None
        if images:
            padded = np.zeros((batch, *images[0].shape), np.float32)
            padded[: len(images)] = np.stack(images)
            in_flight = probs_fn(weights, model.batch_stats, padded)
        if pending is not None:
            yield from _finish(*pending, on_batch)
        pending = (chunk, in_flight)
    if pending is not None:
        yield from _finish(*pending, on_batch)


def _finish(chunk: list[Prediction], probs: jax.Array | None, on_batch) -> Iterator[Prediction]:
    rows = iter(np.asarray(probs) if probs is not None else ())
    for prediction in chunk:
        if prediction.error is None:
            prediction.probs = next(rows)
    if on_batch is not None:
        on_batch(len(chunk))
    yield from chunk


def top_k(probs: np.ndarray, class_names: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most likely (class name, probability) pairs of one image, most likely first."""
    order = np.argsort(-probs, kind="stable")[: min(k, len(probs))]
    return [(class_names[i], float(probs[i])) for i in order]
