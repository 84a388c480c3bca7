"""Export for serving: ``python -m nfjax.export --workdir DIR --out model.jax [--format jax|saved_model]
[--weights auto|ema|params] [--platforms cpu,cuda]``.

``--format jax`` (the default) serializes the model's inference function with ``jax.export``: float32 NHWC
images, already preprocessed (eval resize/center crop and mean/std normalization) -> float32 logits [batch,
num_classes], with a symbolic batch dimension and the weights embedded as constants (EMA weights when the run
keeps them, as ``nfjax.predict`` uses). ``--format saved_model`` writes the same function as a TensorFlow
SavedModel folder for TF Serving (:mod:`nfjax.saved_model`; needs TensorFlow). Beside either, ``OUT.json``
records the input and output contract, the preprocessing to apply to a file, and the class names. The artifact
loads without nfjax:

    exported = jax.export.deserialize(bytearray(open("model.jax", "rb").read()))
    logits = exported.call(images)   # images: float32 [N, S, S, C], normalized as model.jax.json says

See docs/inference.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

from nfjax.allocator import restart_with_tunables
from nfjax.host_devices import configure_host_devices

if __name__ == "__main__":
    restart_with_tunables()  # first: malloc settings for XLA's per-step memory (CPU; nfjax/allocator.py)

configure_host_devices()  # before JAX starts, as for training

import jax
import jax.numpy as jnp

from nfjax import parallel, saved_model
from nfjax.cli import run_parsed
from nfjax.inference import InferenceModel, load_inference_model
from nfjax.models import lowering

CONTRACT_FORMAT = 1
FORMATS = ("jax", "saved_model")


def export_model(model: InferenceModel, platforms: tuple[str, ...] | None = None) -> jax.export.Exported:
    """The model's logits function, lowered for ``platforms`` (default: the current backend) with a symbolic
    batch dimension: float32 [batch, S, S, C] -> float32 [batch, num_classes]."""
    (batch,) = jax.export.symbolic_shape("batch")
    spec = jax.ShapeDtypeStruct((batch, *model.input_shape), jnp.float32)
    with lowering.for_platforms(platforms):  # CPU lowerings only in an artifact for CPUs alone
        return jax.export.export(jax.jit(model.serving_logits()), platforms=platforms)(spec)


def contract(model: InferenceModel, artifact: str, **serialization: Any) -> dict[str, Any]:
    """The JSON written beside the artifact: what goes in, what comes out, and how to prepare a file.
    ``serialization``: the format's own entries (platforms, versions, the SavedModel's signature)."""
    spec = model.experiment.model
    return dict(
        format=CONTRACT_FORMAT,
        artifact=os.path.basename(artifact),
        model=spec.name,
        model_kwargs=spec.kwargs,
        step=model.step,
        weights=model.weights_name,
        input=dict(
            layout="NHWC",
            dtype="float32",
            shape=["batch", *model.input_shape],
            preprocessed=True,  # resized, center-cropped and normalized as "preprocessing" says; not in the graph
        ),
        output=dict(name="logits", dtype="float32", shape=["batch", spec.num_classes], softmax=False),
        preprocessing=model.preprocessing_record(),
        class_names=list(model.class_names),
        jax_version=jax.__version__,
        **serialization,
    )


def _write_atomic(path: str, data: bytes | str) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "wb" if isinstance(data, bytes | bytearray) else "w") as f:
        f.write(data)
    os.replace(tmp, path)


def _check_parent(out: str) -> None:
    """Refuses ``out`` when its folder can never be made: a file is in the way, or the nearest existing folder is
    not writable. Missing folders are created only once the model has loaded."""
    existing = os.path.dirname(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--out {out}: {existing} is a file, not a folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable by this user; choose another --out")


def export_workdir(
    workdir: str,
    out: str,
    *,
    weights: str = "auto",
    platforms: tuple[str, ...] | None = None,
    artifact_format: str = "jax",
) -> dict[str, Any]:
    """Writes ``out`` (the serialized jax.export artifact, or with ``artifact_format='saved_model'`` a SavedModel
    folder) and ``out + '.json'`` (its contract); returns the contract."""
    if artifact_format not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, got {artifact_format!r}")
    out = os.path.abspath(os.path.expanduser(out.rstrip("/\\") or out))
    _check_parent(out)
    if artifact_format == "jax" and os.path.isdir(out):
        raise ValueError(f"--out {out} is a folder; give a file name such as {os.path.join(out, 'model.jax')}")
    if artifact_format == "saved_model":
        saved_model.check_out(out)  # before the weights load: a bad folder or a missing TensorFlow fails fast
        saved_model.import_tensorflow()
    model = load_inference_model(workdir, weights)
    os.makedirs(os.path.dirname(out), exist_ok=True)  # e.g. serving/NAME/ of a TF Serving version folder
    if artifact_format == "saved_model":
        saved_model.save_saved_model(model, out, platforms)
        record = contract(model, out, artifact_format=artifact_format, **saved_model.signature_record(platforms))
    else:
        exported = export_model(model, platforms)
        record = contract(
            model,
            out,
            artifact_format=artifact_format,
            platforms=list(exported.platforms),
            calling_convention_version=exported.calling_convention_version,
        )
        _write_atomic(out, exported.serialize())
    _write_atomic(f"{out}.json", json.dumps(record, indent=2) + "\n")
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nfjax.export",
        description="Serializes a run's model for serving: a jax.export file or a TF SavedModel folder.",
    )
    parser.add_argument(
        "--workdir", required=True, help="the --workdir of a training run, or a folder of converted weights"
    )
    parser.add_argument(
        "--out",
        required=True,
        help="the artifact to write: a file (--format jax) or a folder (saved_model); its contract goes to OUT.json",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="jax",
        help="jax (default): a jax.export file; saved_model: a TensorFlow SavedModel folder for TF Serving",
    )
    parser.add_argument(
        "--weights",
        choices=("auto", "ema", "params"),
        default="auto",
        help="auto (default): EMA weights when the run keeps them, else the raw params",
    )
    parser.add_argument(
        "--platforms", default=None, help="comma-separated, e.g. cpu,cuda,tpu (default: this machine's backend)"
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    parallel.initialize_distributed()
    platforms = tuple(p.strip() for p in args.platforms.split(",") if p.strip()) if args.platforms else None
    record = export_workdir(
        args.workdir, args.out, weights=args.weights, platforms=platforms, artifact_format=args.format
    )
    shape = "x".join(map(str, record["input"]["shape"]))
    what = f"{record['model']}, {record['weights']} weights of step {record['step']}, input {shape}"
    if args.format == "saved_model":
        what += f", signature {record['signature']}"
    print(f"wrote {args.out} ({what})")
    print(f"wrote {args.out}.json (input contract, preprocessing, class names)")
    return record


def main(argv: list[str] | None = None) -> int:
    code, _ = run_parsed(build_parser(), argv, run)
    return code


if __name__ == "__main__":
    sys.exit(main())
