"""Evaluation of a training run: ``python -m nfjax.evaluate --workdir DIR [--split SPLIT] [--batch N]
[--confusion-png PATH] [--no-table] [--tta flip] [--roc-auc]``.

Reads the run's config from the workdir, restores the weights of the newest checkpoint (params, BN statistics,
EMA; no optimizer state) into the shardings of the current device mesh (any device count: the run may have
trained on another), evaluates the raw weights and, when the run keeps them, the EMA weights over the whole
split, and prints one JSON object:

    {"step": 6, "split": "test", "top1": ..., "top5": ..., "loss": ..., "examples": 10000,
     "macro_precision": ..., "macro_recall": ..., "macro_f1": ..., "weighted_precision": ..., ...,
     "per_class": [{"class": 0, "name": "T-shirt/top", "precision": ..., "recall": ..., "f1": ...,
                    "support": 1000}, ...],
     "confusion_matrix": [[...], ...],                                     # rows true, columns predicted
     "ema": {the same keys for the EMA weights}}                            # "ema" only with EMA weights

``--roc-auc`` adds the one-vs-rest ROC-AUC: ``macro_roc_auc``, ``weighted_roc_auc`` and ``roc_auc`` in each
``per_class`` row (null for a class without examples in the split). A cross-validation run (data.num_folds) is
evaluated on its held-out fold by default; ``--split`` names a whole split instead (e.g. the test split).

``confusion_matrix`` is printed up to ``JSON_CONFUSION_CLASSES`` classes. A per-class table goes to stderr
(``--no-table``: none); ``--confusion-png PATH`` draws the confusion matrix of the EMA weights (when the run keeps
them, else of the raw weights). ``--tta flip`` evaluates the mean of the softmax probabilities of each image and
its mirror (top-1/top-5 and the per-class metrics rank them, the loss is -log of the label's); the JSON then says
``"tta": "flip"``. See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nfjax.allocator import restart_with_tunables
from nfjax.host_devices import configure_host_devices

if __name__ == "__main__":
    restart_with_tunables()  # first: malloc settings for XLA's per-step memory (CPU; nfjax/allocator.py)

configure_host_devices()  # before JAX starts, as for training

from nfjax import data as data_lib
from nfjax import parallel
from nfjax.cli import run_parsed
from nfjax.confusion_png import draw_confusion
from nfjax.eval_metrics import MAX_CONFUSION_CLASSES, format_table
from nfjax.runs import load_run
from nfjax.steps import EVAL_TTA_MODES

JSON_CONFUSION_CLASSES = 100  # larger confusion matrices stay out of the printed JSON


def evaluate_workdir(
    workdir: str,
    split: str | None = None,
    batch: int | None = None,
    data_dir: str | None = None,
    tta: str = "none",
    roc_auc: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5/loss/example count and per-class precision/recall/F1 (with macro and weighted averages and
    the confusion matrix) of the raw (and EMA) weights of the newest checkpoint over ``split`` (default: the
    run's eval split), every example counted exactly once. A folder of converted weights is evaluated on
    ImageNet's validation split with the preprocessing its weights expect (``data_dir``: where TFDS keeps
    ImageNet, default the folder's config). ``tta``: 'none' or 'flip' (test-time augmentation: the mean softmax
    of each image and its mirror); with 'flip' the result carries ``tta='flip'``. ``roc_auc``: also the
    one-vs-rest ROC-AUC, per class and averaged (of the TTA-averaged probabilities with ``tta='flip'``)."""
    if tta not in EVAL_TTA_MODES:
        raise ValueError(f"--tta must be one of {', '.join(EVAL_TTA_MODES)} for evaluation, got {tta!r}")
    parallel.initialize_distributed()  # multi-process only when the environment describes a cluster
    run = load_run(workdir, eval_split=split, eval_batch=batch, data_dir=data_dir)
    results = run.experiment.evaluate(run.weights, tta, roc_auc=roc_auc)
    out = dict(step=run.step, split=data_lib.eval_split_name(run.experiment.cfg.data))
    out |= dict(tta=tta) if tta != "none" else {}
    out |= results["eval"]
    if "eval_ema" in results:
        out["ema"] = results["eval_ema"]
    return out


def report_outputs(result: dict[str, Any], table: bool, png: str | None) -> dict[str, Any]:
    """Prints the per-class table(s) to stderr, draws the PNG, and returns the JSON to print (the confusion
    matrix left out above ``JSON_CONFUSION_CLASSES`` classes)."""
    reports = [("params", result)] + ([("ema", result["ema"])] if "ema" in result else [])
    if table:
        for name, report in reports:
            print(format_table(report, f"{result['split']} split, step {result['step']}, {name}:"), file=sys.stderr)
    if png:
        name, report = reports[-1]  # EMA weights when the run keeps them, as nfjax.predict uses
        if "confusion_matrix" not in report:
            raise ValueError(f"--confusion-png: no confusion matrix above {MAX_CONFUSION_CLASSES} classes")
        title = f"{result['split']} split, step {result['step']}, {name} weights: rows true, columns predicted"
        draw_confusion(report["confusion_matrix"], [row["name"] for row in report["per_class"]], png, title)
    out = _printable(result)
    if "ema" in result:
        out["ema"] = _printable(result["ema"])
    return out


def _printable(report: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``report``, without its confusion matrix above ``JSON_CONFUSION_CLASSES`` classes."""
    drop = len(report["per_class"]) > JSON_CONFUSION_CLASSES
    return {k: v for k, v in report.items() if not (drop and k == "confusion_matrix")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nfjax.evaluate", description="Evaluates the newest checkpoint of a training run."
    )
    parser.add_argument(
        "--workdir", required=True, help="the --workdir of a training run, or a folder of converted weights"
    )
    parser.add_argument(
        "--split", default=None, help="dataset split (default: the run's data.eval_split, or its held-out fold)"
    )
    parser.add_argument("--batch", type=int, default=None, help="global eval batch (default: the run's)")
    parser.add_argument("--data-dir", default=None, help="the dataset's folder (default: the run's data.data_dir)")
    parser.add_argument(
        "--confusion-png", default=None, metavar="PATH", help="draw the confusion matrix with class names as a PNG"
    )
    parser.add_argument("--no-table", action="store_true", help="no per-class table on stderr")
    parser.add_argument(
        "--tta",
        choices=EVAL_TTA_MODES,
        default="none",
        help="flip: evaluate the mean softmax of each image and its mirror (five-crop is predict-only)",
    )
    parser.add_argument(
        "--roc-auc", action="store_true", help="add the one-vs-rest ROC-AUC per class, macro and weighted (exact)"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    def run(args):
        result = evaluate_workdir(args.workdir, args.split, args.batch, args.data_dir, args.tta, args.roc_auc)
        return report_outputs(result, table=not args.no_table, png=args.confusion_png)

    code, result = run_parsed(build_parser(), argv, run)
    if code == 0 and result is not None:  # not after --help
        print(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
