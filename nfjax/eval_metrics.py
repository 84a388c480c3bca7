"""Per-class evaluation metrics: exact confusion counts on device, precision / recall / F1 on the host.

On device (inside the jitted eval step, over the padded, masked global batch):

    class_counts(labels, preds, mask, K) -> {"confusion": int32 [K, K]}            # K <= MAX_CONFUSION_CLASSES
                                            {"true_positives", "predicted", "support": int32 [K]}   # larger K

Row ``i``, column ``j`` of the confusion matrix counts the examples of true class ``i`` predicted as ``j``
(the top-1 class, as the top-1 accuracy counts it). A scatter-add of the 0/1 mask: padded examples add 0, every
real example adds exactly 1, and a batch never holds 2**31 examples, so int32 per batch is exact; the host sums
batches in int64. Cost: O(batch + K**2) per batch (K = 1000: a 4 MB matrix, ~10 ms on 2 CPU cores for a batch
of 1024 on 8 simulated devices), no one-hot matmul.

On the host: :func:`classification_report` turns the summed counts into per-class precision, recall, F1 and
support, macro and support-weighted averages. A class never predicted has precision 0, a class without examples
recall 0, and F1 is 0 where precision + recall is 0 (scikit-learn's ``zero_division=0``).

One-vs-rest ROC-AUC (``python -m nfjax.evaluate --roc-auc``): :func:`roc_auc_report` on the host, from every
example's softmax probabilities gathered over the whole split (exact, not binned; see :func:`binary_roc_auc`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

MAX_CONFUSION_CLASSES = 1024  # above: per-class vectors only (a [K, K] int32 matrix per device grows as K**2)
SUMMARY_KEYS = (
    "macro_precision",
    "macro_recall",
    "macro_f1",
    "weighted_precision",
    "weighted_recall",
    "weighted_f1",
)
DETAIL_KEYS = ("per_class", "confusion_matrix")  # lists: in eval reports, never in metrics.jsonl rows
COUNT_KEYS = ("confusion", "true_positives", "predicted", "support")
MAX_ROC_AUC_CLASSES = 1000  # ImageNet's 1000 classes: 1000 sorts of the split's scores on the host, seconds
MAX_ROC_AUC_VALUES = 200_000_000  # examples * classes: 0.8 GB of float32 probabilities gathered on the host


def class_counts(labels: jax.Array, preds: jax.Array, mask: jax.Array, num_classes: int) -> dict[str, jax.Array]:
    """Masked per-class counts of one batch. labels, preds: int [N]; mask: [N] of 0/1 (0: padding).

    ``num_classes <= MAX_CONFUSION_CLASSES``: ``{"confusion": int32 [K, K]}``; otherwise the per-class
    vectors ``true_positives`` (diagonal), ``predicted`` (column sums) and ``support`` (row sums), int32 [K]."""
    weight = mask.astype(jnp.int32)
    labels, preds = labels.astype(jnp.int32), preds.astype(jnp.int32)
    if num_classes <= MAX_CONFUSION_CLASSES:
        flat = jnp.zeros((num_classes * num_classes,), jnp.int32)
        flat = flat.at[labels * num_classes + preds].add(weight, mode="drop")
        return {"confusion": flat.reshape(num_classes, num_classes)}
    zeros = jnp.zeros((num_classes,), jnp.int32)
    return {
        "true_positives": zeros.at[labels].add(weight * (labels == preds), mode="drop"),
        "predicted": zeros.at[preds].add(weight, mode="drop"),
        "support": zeros.at[labels].add(weight, mode="drop"),
    }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den with 0 where den is 0 (zero_division=0)."""
    out = np.zeros(num.shape, np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def classification_report(counts: dict[str, np.ndarray], class_names: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Per-class and averaged precision / recall / F1 from summed :func:`class_counts` (int64 on the host).

    Returns ``SUMMARY_KEYS`` scalars, ``per_class`` (a list of ``{"class", "name", "precision", "recall", "f1",
    "support"}``, one per class) and, when the counts hold it, ``confusion_matrix`` (rows: true class, columns:
    predicted class, nested int lists). Macro: the unweighted mean over all K classes (classes without
    examples count, with recall 0, as scikit-learn's); weighted: weighted by support."""
    if "confusion" in counts:
        confusion = np.asarray(counts["confusion"], np.int64)
        tp, predicted, support = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    else:
        confusion = None
        tp, predicted, support = (np.asarray(counts[k], np.int64) for k in ("true_positives", "predicted", "support"))
    precision, recall = _ratio(tp, predicted), _ratio(tp, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    names = list(class_names) if len(class_names) == len(tp) else [str(i) for i in range(len(tp))]
    total = support.sum()
    report: dict[str, Any] = {}
    for name, values in (("precision", precision), ("recall", recall), ("f1", f1)):
        report[f"macro_{name}"] = float(values.mean())
        report[f"weighted_{name}"] = float((values * support).sum() / total) if total else 0.0
    report["per_class"] = [
        {"class": i, "name": names[i], "precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for i, (p, r, f, s) in enumerate(zip(precision, recall, f1, support, strict=True))
    ]
    if confusion is not None:
        report["confusion_matrix"] = confusion.tolist()
    return report


def split_details(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(scalars, details): the scalar metrics for log rows, and the per-class lists (``DETAIL_KEYS``)."""
    scalars = {k: v for k, v in metrics.items() if k not in DETAIL_KEYS}
    return scalars, {k: metrics[k] for k in DETAIL_KEYS if k in metrics}


def format_table(report: dict[str, Any], title: str = "") -> str:
    """A plain-text table: one row per class (name, precision, recall, F1, support, and ROC-AUC when the report has
    it; '-' where undefined), then macro and weighted averages."""
    rows = report["per_class"]
    auc = "macro_roc_auc" in report
    width = max([len("weighted avg"), *(len(r["name"]) for r in rows)])
    number = lambda v: f"{v:>9.4f}" if v is not None else f"{'-':>9}"
    line = lambda name, p, r, f, s, a=None: (
        f"{name:<{width}}  {p:>9.4f}  {r:>9.4f}  {f:>9.4f}  {s:>9}" + (f"  {number(a)}" if auc else "")
    )
    out = [title] if title else []
    header = f"{'class':<{width}}  {'precision':>9}  {'recall':>9}  {'f1':>9}  {'support':>9}"
    out.append(header + (f"  {'roc_auc':>9}" if auc else ""))
    out += [line(r["name"], r["precision"], r["recall"], r["f1"], r["support"], r.get("roc_auc")) for r in rows]
    total = sum(r["support"] for r in rows)
    for kind in ("macro", "weighted"):
        values = (report[f"{kind}_{m}"] for m in ("precision", "recall", "f1"))
        out.append(line(f"{kind} avg", *values, total, report.get(f"{kind}_roc_auc")))
    return "\n".join(out)


def check_roc_auc_size(num_classes: int, num_examples: int) -> None:
    """ValueError when the split's probabilities (``num_examples`` x ``num_classes`` float32) are too many to gather
    on the host, or the classes too many to rank one by one."""
    if num_classes > MAX_ROC_AUC_CLASSES:
        raise ValueError(
            f"--roc-auc: {num_classes} classes exceed the limit of {MAX_ROC_AUC_CLASSES} (one ranking of the whole "
            "split per class); evaluate without --roc-auc"
        )
    if num_classes * num_examples > MAX_ROC_AUC_VALUES:
        raise ValueError(
            f"--roc-auc: {num_examples} examples x {num_classes} classes = {num_classes * num_examples} probabilities "
            f"exceed the limit of {MAX_ROC_AUC_VALUES} held on the host; evaluate a smaller split (--split) or "
            "without --roc-auc"
        )


def average_ranks(values: np.ndarray) -> np.ndarray:
    """float64 [N] ranks 1..N of ``values`` [N] in increasing order; tied values share the mean of their ranks."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # first position of each run of ties
    ends = np.r_[starts[1:], len(values)]
    mean_rank = (starts + ends + 1) / 2.0  # mean of the 1-based ranks starts+1 ... ends
    ranks = np.empty(len(values), np.float64)
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def binary_roc_auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``scores`` [N] for the 0/1 ``positive`` [N]; None without positives or negatives.

    Mann-Whitney: AUC = (R+ - n+(n+ + 1)/2) / (n+ n-), R+ the sum of the positives' average ranks; equal to the
    probability that a random positive outscores a random negative, ties counted 1/2 (the trapezoidal area)."""
    positive = np.asarray(positive, bool)
    num_pos = int(positive.sum())
    num_neg = len(positive) - num_pos
    if num_pos == 0 or num_neg == 0:
        return None
    rank_sum = average_ranks(np.asarray(scores))[positive].sum()
    return float((rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def roc_auc_report(probs: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """One-vs-rest ROC-AUC of ``probs`` float [N, K] against ``labels`` int [N]: ``per_class_roc_auc`` (K floats,
    None for a class without examples in the split, or when every example is of that class), ``macro_roc_auc``
    (the mean over the classes that have a value; scikit-learn's ``roc_auc_score(multi_class='ovr',
    average='macro')`` when every class is present) and ``weighted_roc_auc`` (weighted by support); None when no
    class has a value."""
    labels = np.asarray(labels)
    per_class = [binary_roc_auc(probs[:, k], labels == k) for k in range(probs.shape[1])]
    support = np.bincount(labels, minlength=probs.shape[1])
    defined = [k for k, auc in enumerate(per_class) if auc is not None]
    values = np.array([per_class[k] for k in defined])
    weights = support[defined]
    return {
        "macro_roc_auc": float(values.mean()) if defined else None,
        "weighted_roc_auc": float((values * weights).sum() / weights.sum()) if defined else None,
        "per_class_roc_auc": per_class,
    }


def add_roc_auc(report: dict[str, Any], auc: dict[str, Any]) -> dict[str, Any]:
    """``report`` with the macro / weighted ROC-AUC beside the other averages and ``roc_auc`` in each per-class row."""
    rows = [row | {"roc_auc": value} for row, value in zip(report["per_class"], auc["per_class_roc_auc"], strict=True)]
    averages = {k: auc[k] for k in ("macro_roc_auc", "weighted_roc_auc")}
    return report | averages | {"per_class": rows}
