"""Per-class loss weights: ``train.class_weights`` and the training label counts -> one weight per class.

Modes, for ``n_c`` training examples of class ``c`` (``N = sum_c n_c``, ``K`` classes):

  'none'            no weights: the plain loss
  'balanced'        w_c = N / (K n_c)                                scikit-learn's 'balanced'
  'sqrt'            w_c proportional to n_c^(-1/2)
  'effective:BETA'  w_c proportional to (1 - BETA) / (1 - BETA^n_c)  Cui et al. 2019, effective number; 0 <= BETA < 1
  'w1,w2,...'       K given weights, used as they are

The computed modes are scaled so that the example-weighted mean weight ``sum_c n_c w_c / N`` is 1: one epoch's
summed loss weight equals the unweighted one, so the learning rate keeps its meaning ('balanced' is exactly
scikit-learn's; Cui et al. scale to ``sum_c w_c = K`` instead, which only moves the learning rate). A class
without training examples has no finite computed weight: that is an error naming it (give the weights as a list
to train such a split). The weights enter the loss as ``-sum_c w_c t_c log p_c`` (:mod:`nfjax.losses`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

FIELD = "train.class_weights"
MODES = ("none", "balanced", "sqrt", "effective:BETA", "a comma-separated list of one weight per class")
SHOWN_CLASSES = 10  # classes printed at the start of a run; all of them are in class_weights.json


@dataclasses.dataclass(frozen=True)
class WeightSpec:
    """A parsed ``train.class_weights``: ``mode`` is 'none', 'balanced', 'sqrt', 'effective' (with ``beta``)
    or 'given' (with ``given``, the weights)."""

    mode: str
    beta: float = 0.0
    given: tuple[float, ...] = ()


def _invalid(spec, why: str) -> ValueError:
    return ValueError(f"{FIELD}={spec!r} is invalid: {why}; valid: {', '.join(MODES)} (e.g. '1.0,2.5,0.5')")


def parse_class_weights(spec) -> WeightSpec:
    """The mode of ``train.class_weights``; ValueError naming the field and its value when it is none of them."""
    if not isinstance(spec, str):
        raise _invalid(spec, f"expected a string, got a {type(spec).__name__}")
    text = spec.strip()
    if text in ("none", "balanced", "sqrt"):
        return WeightSpec(text)
    if text.startswith("effective:"):
        raw = text.partition(":")[2]
        try:
            beta = float(raw)
        except ValueError:
            raise _invalid(spec, f"BETA {raw!r} is not a number") from None
        if not 0.0 <= beta < 1.0:
            raise _invalid(spec, f"BETA must be in [0, 1) (Cui et al. use 0.9 to 0.9999), got {beta:g}")
        return WeightSpec("effective", beta=beta)
    try:
        given = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise _invalid(spec, "not a mode name and not a list of numbers") from None
    if not all(math.isfinite(w) and w >= 0 for w in given):
        raise _invalid(spec, "every given weight must be a finite number >= 0")
    if not any(w > 0 for w in given):
        raise _invalid(spec, "at least one given weight must be positive")
    return WeightSpec("given", given=given)


def class_weights_from_counts(spec: WeightSpec, counts: np.ndarray, class_names: tuple[str, ...] = ()) -> np.ndarray:
    """float64 [K] weights of ``spec`` for the label counts ``counts`` [K] (see the module docstring)."""
    counts = np.asarray(counts, np.int64)
    names = class_names or tuple(str(c) for c in range(len(counts)))
    if spec.mode == "given":
        if len(spec.given) != len(counts):
            raise ValueError(
                f"{FIELD} lists {len(spec.given)} weights but the dataset has {len(counts)} classes "
                f"({', '.join(names[:SHOWN_CLASSES])}{', ...' if len(names) > SHOWN_CLASSES else ''}); "
                "give one weight per class, in class order"
            )
        return np.asarray(spec.given, np.float64)
    empty = [names[c] for c in np.flatnonzero(counts == 0)]
    if empty:
        raise ValueError(
            f"{FIELD}='{spec.mode}' needs training examples of every class, but {len(empty)} have none "
            f"({', '.join(empty[:SHOWN_CLASSES])}); fix data.train_split, or give the weights as a list"
        )
    n = counts.astype(np.float64)
    if spec.mode == "balanced":
        raw = 1.0 / n
    elif spec.mode == "sqrt":
        raw = n**-0.5
    elif spec.mode == "effective":
        raw = (1.0 - spec.beta) / (1.0 - spec.beta**n)
    else:
        raise ValueError(f"{FIELD}: no weights for mode {spec.mode!r}")
    return raw * n.sum() / np.sum(n * raw)


@dataclasses.dataclass(frozen=True)
class ClassWeights:
    """The weights of a run, with what they were computed from."""

    spec: str  # train.class_weights as configured
    class_names: tuple[str, ...]
    counts: np.ndarray  # int64 [K] training examples per class
    weights: np.ndarray  # float64 [K]

    def to_json(self) -> dict:
        return {
            "class_weights": self.spec,
            "classes": [
                {"class": name, "count": int(n), "weight": float(w)}
                for name, n, w in zip(self.class_names, self.counts, self.weights, strict=True)
            ],
        }

    def summary(self) -> str:
        """One line: the first SHOWN_CLASSES classes as ``name w (n)``."""
        shown = ", ".join(
            f"{name} {w:.4g} ({n})"
            for name, n, w in list(zip(self.class_names, self.counts, self.weights, strict=True))[:SHOWN_CLASSES]
        )
        more = f", ... ({len(self.weights)} classes)" if len(self.weights) > SHOWN_CLASSES else ""
        return f"class weights ({FIELD}={self.spec!r}), weight (training examples): {shown}{more}"


def make_class_weights(spec: str, counts: np.ndarray, class_names: tuple[str, ...]) -> ClassWeights | None:
    """The run's :class:`ClassWeights` (None for 'none')."""
    parsed = parse_class_weights(spec)
    if parsed.mode == "none":
        return None
    weights = class_weights_from_counts(parsed, counts, class_names)
    return ClassWeights(spec, tuple(class_names), np.asarray(counts, np.int64), weights)


def write_class_weights(weights: ClassWeights, workdir: str) -> str:
    """Writes ``workdir/class_weights.json`` (counts and weights per class name); returns its path."""
    path = os.path.join(workdir, "class_weights.json")
    with open(path, "w") as f:
        json.dump(weights.to_json(), f, indent=2)
    return path
