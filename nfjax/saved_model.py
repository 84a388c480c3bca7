"""A TensorFlow SavedModel of a restored model, for TF Serving (``python -m nfjax.export --format saved_model``).

The model's inference function ``(weights, images) -> logits`` is converted with ``jax.experimental.jax2tf``
(native serialization: StableHLO lowered by ``jax.export``, run by TF's XlaCallModule op) with a
polymorphic batch dimension ``(b, S, S, C)``. The weights (params, and BN statistics for BN models) become
TF variables of the SavedModel (its ``variables/`` folder) rather than graph constants, so the graph stays
small whatever the model's size. The ``serving_default`` signature takes

    images: float32 [batch, S, S, C], preprocessed (resized, center-cropped, normalized) as the JSON contract says

and returns ``{"logits": float32 [batch, K], "probabilities": softmax(logits) over the K classes}``. TensorFlow
is imported only here, and only when a SavedModel is asked for.
"""

from __future__ import annotations

import os
import shutil
from types import ModuleType
from typing import Any

import jax

from nfjax.data.tf_lazy import import_tf
from nfjax.inference import InferenceModel
from nfjax.models import lowering
from nfjax.steps import apply_model, prestandardized_fn

SIGNATURE = "serving_default"
INPUT_NAME = "images"
OUTPUT_NAMES = ("logits", "probabilities")


def import_tensorflow() -> tuple[ModuleType, Any]:
    """(tensorflow, jax2tf), or one clear error when TensorFlow is not installed."""
    try:
        tf = import_tf()  # GPUs hidden from TF: JAX owns them
        from jax.experimental import jax2tf
    except ImportError as e:
        raise RuntimeError(
            f"--format saved_model needs TensorFlow, which cannot be imported ({e}); pip install tensorflow "
            "(or tensorflow-cpu), or use the default --format jax"
        ) from None
    return tf, jax2tf


def serving_module(model: InferenceModel, platforms: tuple[str, ...] | None = None) -> Any:
    """A ``tf.Module`` holding the weights as variables and a ``serve`` tf.function of the signature above.
    ``platforms``: those the StableHLO is lowered for (default: this machine's backend)."""
    tf, jax2tf = import_tensorflow()
    weights = dict(params=model.serving_weights(), batch_stats=model.batch_stats)  # NF kernels standardized once
    leaves, treedef = jax.tree_util.tree_flatten(weights)
    graphdef = model.experiment.graphdef

    def logits_fn(weights, images):
        return apply_model(graphdef, weights["params"], weights["batch_stats"], images, train=False)[0]

    logits_fn = prestandardized_fn(logits_fn) if model.experiment.prestandardized else logits_fn

    size, _, channels = model.input_shape
    converted = jax2tf.convert(
        logits_fn,
        polymorphic_shapes=[None, f"(b, {size}, {size}, {channels})"],
        with_gradient=False,
        native_serialization_platforms=platforms,
    )
    module = tf.Module()
    # a flat list: TF cannot save dicts with the integer keys that NNX gives to layer lists
    module.weights = [tf.Variable(leaf, trainable=False) for leaf in jax.device_get(leaves)]

    @tf.function(
        autograph=False, input_signature=[tf.TensorSpec([None, size, size, channels], tf.float32, name=INPUT_NAME)]
    )
    def serve(images):
        logits = converted(jax.tree_util.tree_unflatten(treedef, list(module.weights)), images)
        return {OUTPUT_NAMES[0]: logits, OUTPUT_NAMES[1]: tf.nn.softmax(logits, axis=-1)}

    module.serve = serve
    return module


def save_saved_model(model: InferenceModel, out: str, platforms: tuple[str, ...] | None = None) -> None:
    """Writes the SavedModel folder ``out`` (``saved_model.pb``, ``variables/``), replacing a SavedModel already
    there (:func:`check_out`). Written to ``out.tmp`` first, so a failed export leaves no half-written model
    behind."""
    check_out(out)
    tf, _ = import_tensorflow()
    tmp = f"{out}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with lowering.for_platforms(platforms):  # traced here: CPU lowerings only in an artifact for CPUs alone
        module = serving_module(model, platforms)
        tf.saved_model.save(module, tmp, signatures={SIGNATURE: module.serve})
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)


def check_out(out: str) -> None:
    """Raises ValueError when ``out`` is a file or a non-empty folder that holds no SavedModel (a SavedModel
    there is replaced; anything else is never overwritten)."""
    if os.path.isfile(out):
        raise ValueError(f"--out {out} is a file; --format saved_model writes a folder: give a new folder name")
    if os.path.isdir(out) and os.listdir(out) and not os.path.exists(os.path.join(out, "saved_model.pb")):
        raise ValueError(
            f"--out {out} is a non-empty folder that holds no SavedModel; give a new (or empty) folder so that "
            "nothing else is overwritten"
        )


def signature_record(platforms: tuple[str, ...] | None) -> dict[str, Any]:
    """The SavedModel part of the JSON contract: signature, tensor names, lowering platforms, versions."""
    tf, _ = import_tensorflow()
    return dict(
        signature=SIGNATURE,
        input_name=INPUT_NAME,
        output_names=list(OUTPUT_NAMES),
        platforms=list(platforms or (jax.export.default_export_platform(),)),
        tensorflow_version=tf.__version__,
    )
