"""Class imbalance on Fashion-MNIST: some classes cut to a few percent of their training images, trained with and
without the balancing options, compared on macro-F1 and on the recall of the cut classes.

    python scripts/fmnist_imbalance.py --out runs/imbalance                      # the study in docs/imbalance.md
    python scripts/fmnist_imbalance.py --out runs/imbalance --report-only        # rebuild the report only
    python scripts/fmnist_imbalance.py --out runs/imbalance --variants baseline,weighted --seeds 0,1

1. Writes OUT/data: TFDS ``fashion_mnist`` whose training split keeps ``--fraction`` of the images of each class in
   ``--classes`` (a seeded draw, the same on every machine) and all images of the others; the test split is the
   full, balanced test set. The draw is recorded in OUT/data/subset.json.
2. Trains the NF-ResNet twin (configs/fmnist_nf.py, recipe ``quick`` unless ``--recipe``) once per variant and seed
   in OUT/VARIANT_sSEED, each with the ``--config`` overrides of its variant (VARIANTS below; extra arguments after
   ``--`` are passed to every run). A finished run is skipped and an interrupted one resumes.
3. Writes OUT/report.md and OUT/report.json: test top-1, macro-F1, weighted F1 and per-class recall of the cut
   classes for every run, and mean and spread over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # this checkout's nfjax and configs
import nfjax.train  # noqa: E402, F401  (first: it splits a CPU host into devices before JAX starts)
from nfjax import study  # noqa: E402
from nfjax.data.fashion_mnist import DEBIAN_SOURCE_DIR, load_idx_split, store_fashion_mnist  # noqa: E402

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
VARIANTS = {  # name -> (--config overrides, what it is)
    "baseline": ([], "no balancing"),
    "weighted": (["--config.train.class_weights=balanced"], "class-weighted cross-entropy, w_c = N / (K n_c)"),
    "sampler": (["--config.data.balanced_sampling=1.0"], "class-balanced sampler (every class equally often)"),
    "sqrt_sampler": (["--config.data.balanced_sampling=0.5"], "square-root sampler (p proportional to n_c^-0.5)"),
    "focal": (
        ["--config.train.loss=focal", "--config.train.class_weights=balanced"],
        "focal loss (gamma 2) with alpha_c = balanced weights",
    ),
}
DEFAULT_VARIANTS = "baseline,weighted,sampler,sqrt_sampler,focal"


def imbalanced_indices(labels: np.ndarray, classes: list[int], fraction: float, seed: int) -> np.ndarray:
    """Sorted indices of the examples kept: every example of the other classes, and round(fraction * n_c) of each
    class c in ``classes``, drawn without replacement by a generator seeded with ``seed``."""
    rng = np.random.default_rng(seed)
    keep = [np.flatnonzero(~np.isin(labels, classes))]
    for c in classes:
        members = np.flatnonzero(labels == c)
        keep.append(rng.choice(members, size=round(fraction * len(members)), replace=False))
    return np.sort(np.concatenate(keep))


def prepare_data(
    out: str, classes: list[int], fraction: float, seed: int, source_dir: str, train_limit: int, test_limit: int
) -> str:
    """OUT/data, written once; a second call with other settings is refused (the runs there used the first)."""
    data_dir = os.path.join(out, "data")
    record = dict(
        classes=classes,
        fraction=fraction,
        seed=seed,
        source_dir=source_dir,
        train_limit=train_limit,
        test_limit=test_limit,
    )
    path = os.path.join(data_dir, "subset.json")
    if os.path.exists(path):
        with open(path) as f:
            existing = json.load(f)
        if {k: existing.get(k) for k in record} != record:
            sys.exit(
                f"error: {data_dir} was made with {existing}, not {record}; use another --out or the same settings"
            )
        return data_dir
    images, labels = load_idx_split(source_dir, "train")
    test = load_idx_split(source_dir, "test")
    if train_limit:
        images, labels = images[:train_limit], labels[:train_limit]
    if test_limit:
        test = (test[0][:test_limit], test[1][:test_limit])
    kept = imbalanced_indices(labels, classes, fraction, seed)
    print(f"writing {data_dir}: {len(kept)} of {len(labels)} training images kept", flush=True)
    store_fashion_mnist(data_dir, {"train": (images[kept], labels[kept]), "test": test})
    counts = np.bincount(labels[kept], minlength=len(CLASS_NAMES))
    with open(path, "w") as f:
        json.dump(record | {"train_counts": counts.tolist(), "test_examples": len(test[1])}, f, indent=2)
    return data_dir


def run_name(variant: str, seed: int) -> str:
    return f"{variant}_s{seed}"


def train(out: str, data_dir: str, variant: str, seed: int, recipe: str, extra: list[str]) -> None:
    """One run in OUT/VARIANT_sSEED (skipped when finished, resumed when interrupted): nfjax.study.run_training."""
    config = study.config_path("fmnist_nf", recipe=recipe, data_dir=os.path.abspath(data_dir), seed=seed)
    study.run_training(os.path.join(out, run_name(variant, seed)), config, [*VARIANTS[variant][0], *extra])


def summarize(out: str, variant: str, seed: int, classes: list[int]) -> dict | None:
    """The run's last evaluation (raw weights): top-1, macro/weighted F1 and the cut classes' recall."""
    workdir = os.path.join(out, run_name(variant, seed))
    path = os.path.join(workdir, "eval_report.json")
    if not study.finished(workdir) or not os.path.exists(path):
        return None
    with open(path) as f:
        report = json.load(f)["eval"]
    wall = study.wall_seconds(workdir)
    recall = {row["class"]: row["recall"] for row in report["per_class"]}
    return dict(
        variant=variant,
        seed=seed,
        top1=report["top1"],
        macro_f1=report["macro_f1"],
        weighted_f1=report["weighted_f1"],
        cut_recall={CLASS_NAMES[c]: recall[c] for c in classes},
        wall_seconds=wall,
    )


def _mean_spread(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ± {np.std(values, ddof=1):.4f}"


def report(rows: list[dict], subset: dict, variants: list[str], classes: list[int]) -> str:
    counts = subset["train_counts"]
    cut = ", ".join(f"{CLASS_NAMES[c]} ({counts[c]})" for c in classes)
    lines = [
        f"Training images: {sum(counts)}; cut to {subset['fraction']:.0%}: {cut}; test images: "
        f"{subset['test_examples']}{'' if subset['test_limit'] else ' (the whole test split, balanced)'}. Metrics of "
        "the raw weights at the end of training.",
        "",
        "| variant | what | runs | test top-1 | macro-F1 | weighted F1 | "
        + " | ".join(f"recall {CLASS_NAMES[c]}" for c in classes)
        + " | wall time per run |",
        "|---|---|---|---|---|---|" + "---|" * len(classes) + "---|",
    ]
    for variant in variants:
        runs = [r for r in rows if r["variant"] == variant]
        if not runs:
            lines.append(f"| {variant} | {VARIANTS[variant][1]} | 0 | not run |" + " |" * (3 + len(classes)))
            continue
        walls = [r["wall_seconds"] for r in runs if r["wall_seconds"]]
        wall = f"{np.mean(walls) / 60:.1f} min" if walls else "not recorded"
        recalls = " | ".join(_mean_spread([r["cut_recall"][CLASS_NAMES[c]] for r in runs]) for c in classes)
        lines.append(
            f"| {variant} | {VARIANTS[variant][1]} | {len(runs)} | {_mean_spread([r['top1'] for r in runs])} | "
            f"{_mean_spread([r['macro_f1'] for r in runs])} | {_mean_spread([r['weighted_f1'] for r in runs])} | "
            f"{recalls} | {wall} |"
        )
    lines += ["", "With several seeds: mean ± sample standard deviation over seeds."]
    return "\n".join(lines) + "\n"


def _int_list(text: str, what: str, parser: argparse.ArgumentParser) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        parser.error(f"{what} takes comma-separated integers; got {text!r}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/imbalance")
    parser.add_argument("--classes", default="2,4,6", help="class indices cut down (default Pullover, Coat, Shirt)")
    parser.add_argument("--fraction", type=float, default=0.05, help="fraction of their training images kept")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated training seeds")
    parser.add_argument("--subset-seed", type=int, default=0, help="seed of the draw of the kept images")
    parser.add_argument("--recipe", default="quick", choices=["quick", "long"])
    parser.add_argument("--source-dir", default=DEBIAN_SOURCE_DIR, help="folder of the Fashion-MNIST IDX files")
    parser.add_argument("--train-limit", type=int, default=0, help="use only the first N training images (tests)")
    parser.add_argument("--test-limit", type=int, default=0, help="use only the first N test images (tests)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from existing runs")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    unknown_args = [a for a in extra if not a.startswith("--config")]
    if unknown_args:
        parser.error(f"unrecognized arguments {unknown_args}; only --config.* overrides are passed to the runs")
    classes = _int_list(args.classes, "--classes", parser)
    seeds = _int_list(args.seeds, "--seeds", parser)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or any(v not in VARIANTS for v in variants):
        parser.error(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}; got {args.variants!r}")
    if not classes or any(not 0 <= c < len(CLASS_NAMES) for c in classes):
        parser.error(f"--classes takes class indices 0..{len(CLASS_NAMES) - 1}; got {args.classes!r}")
    if not 0 < args.fraction <= 1:
        parser.error(f"--fraction must be in (0, 1]; got {args.fraction}")
    start = time.time()
    try:
        data_dir = prepare_data(
            args.out, classes, args.fraction, args.subset_seed, args.source_dir, args.train_limit, args.test_limit
        )
    except (OSError, ValueError) as e:
        print(f"error: cannot prepare the imbalanced dataset: {e}", file=sys.stderr)
        return 2
    jobs = [(v, s) for s in seeds for v in variants]
    if not args.report_only:
        for i, (variant, seed) in enumerate(jobs, 1):
            print(f"[{i}/{len(jobs)}] {variant}, seed {seed} ({(time.time() - start) / 60:.1f} min so far)", flush=True)
            try:
                train(args.out, data_dir, variant, seed, args.recipe, extra)
            except study.RunFailed as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
    rows = [r for v, s in jobs if (r := summarize(args.out, v, s, classes)) is not None]
    with open(os.path.join(data_dir, "subset.json")) as f:
        subset = json.load(f)
    text = report(rows, subset, variants, classes)
    with open(os.path.join(args.out, "report.md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, "report.json"), "w") as f:
        json.dump({"subset": subset, "runs": rows}, f, indent=2)
    print(text)
    print(f"report: {os.path.join(args.out, 'report.md')}; total time {(time.time() - start) / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
