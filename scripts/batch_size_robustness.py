"""Batch-size robustness on Fashion-MNIST: the NF twin against the BN twin, from batch 8 to 2048, several seeds.

    python scripts/batch_size_robustness.py --runs runs/batch_size --out docs/results    # docs/results.md, item 2
    python scripts/batch_size_robustness.py --runs runs/batch_size --out docs/results --report-only

Trains, for every global batch B in ``--batches`` and seed in ``--seeds``, with the Fashion-MNIST twins' recipe
(configs/fmnist_nf.py and configs/fmnist_bn.py, recipe ``quick``: SGD-Nesterov, peak lr 0.4 x B / 256 (linear
scaling), warmup then cosine, label smoothing 0.1, no augmentation) for ``--epochs`` epochs:

- ``nf``: the NF twin (scaled WS, alpha/beta, SkipInit; AGC with lambda 0.08, the recipe's);
- ``bn``: the BN twin (same topology), BatchNorm statistics over the whole global batch (sync BN);
- ``bn_ghost``: the BN twin with statistics over consecutive groups of ``--ghost`` examples, as each device's BN
  sees on a many-device run without sync BN. Run only where B > ``--ghost`` (at B = ghost it is ``bn``).

Both twins are narrowed to ``--widths``/``--stem-width`` (default 24/48/96 and 16 channels instead of 48/96/192
and 24: about 3x cheaper on CPU, same depth and layout). Runs go to RUNS/VARIANT_bB_sSEED; a finished run is
skipped, an interrupted one resumes, so the same command continues a stopped study. A non-finite loss skips that
update and the run goes on (``train.nonfinite=skip``); the first logged interval that held one is reported.

Writes OUT/batch_size.csv (mean, sample std, min, max over seeds per variant and batch), OUT/batch_size.json
(settings, versions, every run, wall times) and OUT/batch_size.png (test top-1 and test loss vs batch size).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's nfjax and configs
import nfjax.train  # noqa: E402, F401  (first: it splits a CPU host into devices before JAX starts)
from nfjax import study  # noqa: E402
from nfjax.plotting import import_pyplot, save_png, write_table  # noqa: E402

VARIANTS = {  # name -> (config, what it is)
    "nf": ("fmnist_nf", "NF twin (AGC 0.08)"),
    "bn": ("fmnist_bn", "BN twin, statistics over the global batch"),
    "bn_ghost": ("fmnist_bn", "BN twin, statistics over groups of {ghost}"),
}
BASE_LR, BASE_BATCH = 0.4, 256  # the twins' quick recipe: peak lr = BASE_LR * batch / BASE_BATCH


def run_name(variant: str, batch: int, seed: int) -> str:
    return f"{variant}_b{batch}_s{seed}"


def jobs(args) -> list[tuple[str, int, int]]:
    """(variant, batch, seed) in the order they are trained: seed by seed, so that a study stopped early has whole
    seeds; bn_ghost only above its group size."""
    return [
        (v, b, s)
        for s in args.seeds
        for b in args.batches
        for v in args.variants
        if not (v == "bn_ghost" and b <= args.ghost)
    ]


def run_command(args, variant: str, batch: int, seed: int) -> tuple[str, str, list[str]]:
    config = study.config_path(VARIANTS[variant][0], batch=batch, epochs=args.epochs, seed=seed, data_dir=args.data_dir)
    steps = max(1, math.ceil(args.epochs * args.train_examples / batch))
    overrides = [
        f"--config.model.kwargs.widths=({args.widths})",
        f"--config.model.kwargs.stem_width={args.stem_width}",
        f"--config.train.log_every_steps={max(1, min(25, steps // 50))}",
        f"--config.train.checkpoint_every_steps={max(500, steps // 4)}",
        "--config.train.nonfinite=skip",
        f"--config.train.max_consecutive_nonfinite={10**9}",
    ]
    if variant == "bn_ghost":
        overrides.append(f"--config.model.kwargs.bn_ghost_size={args.ghost}")
    return os.path.join(args.runs, run_name(variant, batch, seed)), config, overrides + args.extra


def collect(args) -> list[dict]:
    """The finished runs of the planned ones (RunFailed when one was trained with other settings)."""
    rows = []
    for variant, batch, seed in jobs(args):
        result = study.run_result(*run_command(args, variant, batch, seed))
        if result is not None:
            rows.append(dict(variant=variant, batch=batch, seed=seed, peak_lr=BASE_LR * batch / BASE_BATCH) | result)
    return rows


def summarize(rows: list[dict], variants: list[str], batches: list[int]) -> list[dict]:
    out = []
    for variant in variants:
        for batch in batches:
            mine = [r for r in rows if (r["variant"], r["batch"]) == (variant, batch)]
            if not mine:
                continue
            top1, loss = study.mean_spread([r["top1"] for r in mine]), study.mean_spread([r["eval_loss"] for r in mine])
            walls = [r["wall_seconds"] for r in mine if r["wall_seconds"] is not None]
            out.append(
                dict(
                    variant=variant,
                    batch=batch,
                    seeds=len(mine),
                    peak_lr=mine[0]["peak_lr"],
                    steps=mine[0]["steps"],
                    **{f"top1_{k}": v for k, v in top1.items()},
                    **{f"eval_loss_{k}": v for k, v in loss.items()},
                    runs_with_nonfinite_steps=sum(r["nonfinite_at"] is not None for r in mine),
                    wall_seconds_mean=sum(walls) / len(walls) if walls else None,
                )
            )
    return out


def plot(summary: list[dict], rows: list[dict], labels: dict[str, str], title: str):
    """Two panels against batch size (log scale): test top-1 and test loss; per variant the mean over seeds as a
    line, min-max as error bars, each seed as a dot."""
    plt = import_pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, key, name in ((axes[0], "top1", "test top-1"), (axes[1], "eval_loss", "test loss")):
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in summary)):
            mine = [r for r in summary if r["variant"] == variant]
            xs = [r["batch"] for r in mine]
            ys = [r[f"{key}_mean"] for r in mine]
            err = [
                [r[f"{key}_mean"] - r[f"{key}_min"] for r in mine],
                [r[f"{key}_max"] - r[f"{key}_mean"] for r in mine],
            ]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=labels[variant])
            dots = [r for r in rows if r["variant"] == variant]
            ax.plot([r["batch"] for r in dots], [r[key] for r in dots], ".", color=f"C{i}", alpha=0.4)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("global batch size (peak lr = 0.4 x batch / 256)")
        ax.set_ylabel(f"{name} (mean over seeds; bars: min-max)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    study.add_twin_arguments(parser, runs="runs/batch_size", seeds="0,1,2")
    parser.add_argument("--batches", default="8,32,128,512,2048")
    parser.add_argument("--variants", default="nf,bn,bn_ghost", help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--ghost", type=int, default=8, help="examples per BatchNorm statistics group of bn_ghost")
    args, extra = parser.parse_known_args(argv)
    try:
        args.extra = study.config_overrides(extra)
        args.batches = sorted(study.number_list(args.batches, "--batches", int, 1))
        args.seeds = study.number_list(args.seeds, "--seeds", int, 0)
        args.widths = ",".join(map(str, study.number_list(args.widths, "--widths", int, 1, unique=False)))
        args.variants = study.number_list(args.variants, "--variants", str)
    except ValueError as e:
        parser.error(str(e))
    if any(v not in VARIANTS for v in args.variants):
        parser.error(f"--variants takes a comma-separated subset of {', '.join(VARIANTS)}; got {args.variants}")
    if args.ghost < 1 or args.epochs <= 0 or args.stem_width < 1:
        parser.error(
            f"--ghost and --stem-width must be at least 1 and --epochs positive; got --ghost {args.ghost}, "
            f"--stem-width {args.stem_width}, --epochs {args.epochs}"
        )
    uneven = [b for b in args.batches if b > args.ghost and b % args.ghost]
    if "bn_ghost" in args.variants and uneven:
        parser.error(f"bn_ghost splits each batch into groups of --ghost {args.ghost}; batches {uneven} do not divide")
    if not jobs(args):
        parser.error(f"nothing to train: bn_ghost alone runs only at batches above --ghost {args.ghost}")
    args.data_dir = os.path.abspath(os.path.expanduser(args.data_dir))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    import_pyplot()  # fail before training when matplotlib is missing
    start = time.time()
    todo = jobs(args)
    commands = [run_command(args, *job) for job in todo]
    rows = study.train_then_collect(commands, lambda: collect(args), args.runs, args.report_only)
    if rows is None:
        return 1
    summary = summarize(rows, args.variants, args.batches)
    labels = {v: VARIANTS[v][1].format(ghost=args.ghost) for v in args.variants}
    settings = dict(
        batches=args.batches,
        seeds=args.seeds,
        variants=labels,
        ghost=args.ghost,
        epochs=args.epochs,
        widths=args.widths,
        stem_width=args.stem_width,
        extra_overrides=args.extra,
    )
    settings = study.study_record(settings, rows, len(todo), start)
    csv_path, json_path = os.path.join(args.out, "batch_size.csv"), os.path.join(args.out, "batch_size.json")
    write_table(summary, csv_path, json_path, study.json_safe(dict(settings, summary=summary, runs=rows)))
    title = (
        f"Fashion-MNIST twins (widths {args.widths}), {args.epochs:g} epochs, {len(args.seeds)} seed(s); "
        f"{len(rows)} of {len(todo)} runs"
    )
    png = save_png(plot(summary, rows, labels, title), os.path.join(args.out, "batch_size.png"))
    for r in summary:
        print(
            f"{r['variant']:>9} batch {r['batch']:>5}: test top-1 {r['top1_mean']:.4f} ± {r['top1_std']:.4f} "
            f"(min {r['top1_min']:.4f}, max {r['top1_max']:.4f}, {r['seeds']} seeds)"
        )
    print(f"wrote {csv_path}, {json_path}, {png}")
    print(study.totals_line(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
