"""Top-k predictions for image files and folders: ``python -m nfjax.predict --workdir DIR INPUT... [--top-k 5]
[--out predictions.csv] [--batch 64] [--tta none|flip|crops5|flip+crops5]``.

Restores the newest checkpoint of the run in DIR, or the weights of a folder written by ``nfjax.convert`` (EMA
weights when the run keeps them), preprocesses each image as the run's evaluation pipeline does (channels
converted to the dataset's, the eval resize/center crop, the mean/std normalization), runs the images through
one jitted program of a fixed batch shape (the last batch padded) and prints, per image, the top-k class names
with probabilities:

    shoe.png
      0.9123  Ankle boot
      0.0411  Sneaker

A folder is searched recursively for .jpg/.jpeg/.png files. ``--out FILE.csv`` writes one CSV row per image
instead (path, class_1, prob_1, ..., class_k, prob_k, error) with a progress bar on stderr. A file named on the
command line must be readable (else nothing runs: one error message); a file found in a folder that cannot be
read gets a row with only its path and error, is listed on stderr at the end, and is skipped. ``--tta`` averages
the softmax probabilities over views of each image: its mirror (flip), the four corner and the center crops of
the eval resize (crops5), or both (flip+crops5, ten views). See docs/inference.md.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
from collections.abc import Sequence

from nfjax.allocator import restart_with_tunables
from nfjax.host_devices import configure_host_devices

if __name__ == "__main__":
    restart_with_tunables()  # first: malloc settings for XLA's per-step memory (CPU; nfjax/allocator.py)

configure_host_devices()  # before JAX starts, as for training

from nfjax import parallel
from nfjax.cli import run_parsed
from nfjax.data.sources import IMAGE_EXTENSIONS
from nfjax.inference import (  # noqa: F401  (ImageReadError, input_format, preprocess: this module's API)
    TTA_MODES,
    ImageReadError,
    Prediction,
    find_images,
    input_format,
    load_inference_model,
    preprocess,
    read_image,
    run_batches,
    top_k,
)
from nfjax.metrics import Progress

DEFAULT_BATCH = 64


def expand_inputs(inputs: Sequence[str]) -> tuple[list[str], list[str]]:
    """(every image file to predict, in order; the files named explicitly). Folders are searched recursively."""
    files, explicit = [], []
    for path in inputs:
        if os.path.isdir(path):
            found = find_images(path)
            if not found:
                raise FileNotFoundError(f"folder {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif os.path.exists(path):
            files.append(path)
            explicit.append(path)
        else:
            raise FileNotFoundError(f"{path} does not exist: give image files or folders of images")
    return files, explicit


def predict_inputs(
    workdir: str,
    inputs: Sequence[str],
    *,
    batch: int = DEFAULT_BATCH,
    tta: str = "none",
    show_progress: bool = False,
) -> tuple[list[Prediction], tuple[str, ...]]:
    """(a Prediction per image file of ``inputs``, in order; the class names). Files named explicitly must be
    readable (checked before the model loads); unreadable files found in folders come back with an error."""
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    if tta not in TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(TTA_MODES)}, got {tta!r}")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    files, explicit = expand_inputs(inputs)
    model = load_inference_model(workdir)  # restores the weights; the program compiles later, in run_batches
    model.check_tta(tta)  # five crops need an eval resize beyond the crop
    for path in explicit:
        read_image(path, model.channels)  # an unreadable file named on the command line: nothing runs
    batch = min(batch, len(files))
    progress = Progress(math.ceil(len(files) / batch), desc="predict", enabled=show_progress)
    done = 0

    def on_batch(n: int) -> None:
        nonlocal done
        done += n
        progress.update(1, images=done)

    try:
        predictions = list(run_batches(model, files, batch, tta, on_batch))
    finally:
        progress.close()
    return predictions, model.class_names


def predict(workdir: str, paths: list[str], top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Per image file, the ``top_k`` (class name, probability) pairs, most likely first."""
    if top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {top_k}")
    predictions, names = predict_inputs(workdir, paths)
    return [_top(p, names, top_k) for p in predictions]


def _top(prediction: Prediction, names: Sequence[str], k: int) -> list[tuple[str, float]]:
    return top_k(prediction.probs, names, k) if prediction.error is None else []


def write_csv(path: str, predictions: Sequence[Prediction], names: Sequence[str], k: int) -> None:
    """One row per file: path, class_1, prob_1, ..., class_k, prob_k, error (empty, or the reason it was
    skipped, with empty class and probability cells)."""
    k = min(k, len(names))
    header = ["path"] + [f"{c}_{i}" for i in range(1, k + 1) for c in ("class", "prob")] + ["error"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for p in predictions:
            cells = [cell for name, prob in _top(p, names, k) for cell in (name, f"{prob:.6f}")]
            writer.writerow([p.path, *(cells or [""] * 2 * k), p.error or ""])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nfjax.predict", description="Top-k class predictions of a trained run for image files."
    )
    parser.add_argument(
        "--workdir", required=True, help="the --workdir of a training run, or a folder of converted weights"
    )
    parser.add_argument("--top-k", type=int, default=5, help="classes to print per image (default 5)")
    parser.add_argument("--out", default=None, help="write a CSV file (one row per image) instead of printing")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH, help=f"images per batch (default {DEFAULT_BATCH})")
    parser.add_argument(
        "--tta",
        choices=TTA_MODES,
        default="none",
        help="average the softmax over views: flip (image and mirror), crops5 (4 corner + center crops of the "
        "eval resize), flip+crops5 (those 5 and their mirrors)",
    )
    parser.add_argument("images", nargs="+", metavar="INPUT", help="image files (PNG, JPEG) or folders of them")
    return parser


def run(args: argparse.Namespace) -> list[Prediction]:
    """Predicts, then writes the CSV (with --out) or prints top-k per image; lists skipped files on stderr."""
    if args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    out_dir = os.path.dirname(os.path.abspath(args.out)) if args.out else None
    if out_dir and not os.path.isdir(out_dir):
        raise FileNotFoundError(f"--out {args.out}: folder {out_dir} does not exist")
    parallel.initialize_distributed()
    predictions, names = predict_inputs(
        args.workdir, args.images, batch=args.batch, tta=args.tta, show_progress=bool(args.out)
    )
    if args.out:
        write_csv(args.out, predictions, names, args.top_k)
    else:
        for p in predictions:
            if p.error is None:
                print(p.path)
                print("\n".join(f"  {prob:.4f}  {name}" for name, prob in _top(p, names, args.top_k)))
    skipped = [p for p in predictions if p.error is not None]
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable file(s):", file=sys.stderr)
        print("\n".join(f"  {p.error}" for p in skipped), file=sys.stderr)
    if args.out:
        print(f"wrote {len(predictions) - len(skipped)} predictions to {args.out}", file=sys.stderr)
    return predictions


def main(argv: list[str] | None = None) -> int:
    code, _ = run_parsed(build_parser(), argv, run)
    return code


if __name__ == "__main__":
    sys.exit(main())
