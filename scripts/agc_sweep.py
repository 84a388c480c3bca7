"""AGC at large batch and high learning rate: the NF twin on Fashion-MNIST with AGC off, and on with lambda swept,
the classifier clipped or not.

    python scripts/agc_sweep.py --runs runs/agc --out docs/results                  # docs/results.md, item 3
    python scripts/agc_sweep.py --runs runs/agc --out docs/results --report-only

Trains the NF twin (configs/fmnist_nf.py, recipe ``quick``: SGD-Nesterov, warmup then cosine, label smoothing 0.1,
no augmentation, narrowed to ``--widths``/``--stem-width`` as in scripts/batch_size_robustness.py) at global
batch ``--batch`` for ``--epochs`` epochs, for each base learning rate in ``--lrs`` (peak lr = base x batch / 256,
the recipe's linear scaling; its own base is 0.4) and seed in ``--seeds``:

- ``off``: no gradient clipping;
- ``agcL_excl``: AGC with lambda L (each of ``--lambdas``) on every parameter except the classifier kernel and the
  SkipInit gains, as the NFNet paper recommends (the recipe's setting);
- ``agcL_clip``: the same lambda with the classifier kernel clipped too (only the SkipInit gains excluded).

Every step is logged, so the training-loss curves show where training blows up. A non-finite loss skips that
update and the run goes on (``train.nonfinite=skip``); the first step with one is reported. A finished
run is skipped and an interrupted one resumes, so the same command continues a stopped sweep.

Writes OUT/agc_sweep.csv (one row per learning rate and setting: test top-1 and loss, mean over seeds, the largest
training loss, the first non-finite step, AGC's clip fraction), OUT/agc_sweep.json (settings, versions, every run,
wall times), OUT/agc_sweep.png (test top-1 vs lambda, one panel per learning rate, AGC off as a dashed line) and
OUT/agc_curves.png (training loss vs step of AGC off and of each lambda with the classifier excluded).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's nfjax and configs
import nfjax.train  # noqa: E402, F401  (first: it splits a CPU host into devices before JAX starts)
from nfjax import study  # noqa: E402
from nfjax.plotting import import_pyplot, save_png, write_table  # noqa: E402

CLASSIFIER = {  # setting -> (clip_exclude regexes, what it is)
    "excl": ("('(^|/)classifier/kernel$', '(^|/)skip_gain$')", "classifier not clipped"),
    "clip": ("('(^|/)skip_gain$',)", "classifier clipped"),
}


def setting_name(lam: float | None, classifier: str | None) -> str:
    return "off" if lam is None else f"agc{lam:g}_{classifier}"


def run_name(lr: float, lam: float | None, classifier: str | None, seed: int) -> str:
    return f"lr{lr:g}_{setting_name(lam, classifier)}_s{seed}"


def jobs(args) -> list[tuple[float, float | None, str | None, int]]:
    """(base lr, lambda or None for AGC off, classifier setting, seed): per seed and lr, off first, then each lambda
    with the classifier excluded, then clipped."""
    out = []
    for seed in args.seeds:
        for lr in args.lrs:
            out.append((lr, None, None, seed))
            out += [(lr, lam, c, seed) for c in args.classifier for lam in args.lambdas]
    return out


def run_command(args, lr: float, lam: float | None, classifier: str | None, seed: int) -> tuple[str, str, list[str]]:
    config = study.config_path("fmnist_nf", batch=args.batch, epochs=args.epochs, seed=seed, data_dir=args.data_dir)
    steps = math.ceil(args.epochs * args.train_examples / args.batch)
    overrides = [
        f"--config.model.kwargs.widths=({args.widths})",
        f"--config.model.kwargs.stem_width={args.stem_width}",
        f"--config.optim.base_lr={lr}",
        "--config.train.log_every_steps=1",
        f"--config.train.checkpoint_every_steps={max(20, steps // 3)}",
        "--config.train.nonfinite=skip",
        f"--config.train.max_consecutive_nonfinite={10**9}",
    ]
    if lam is None:
        overrides.append("--config.optim.clipping=none")
    else:
        overrides += [
            "--config.optim.clipping=agc",
            f"--config.optim.agc_lambda={lam}",
            f"--config.optim.clip_exclude={CLASSIFIER[classifier][0]}",
        ]
    return os.path.join(args.runs, run_name(lr, lam, classifier, seed)), config, overrides + args.extra


def collect(args) -> list[dict]:
    rows = []
    for lr, lam, classifier, seed in jobs(args):
        workdir, config, overrides = run_command(args, lr, lam, classifier, seed)
        result = study.run_result(workdir, config, overrides)
        if result is None:
            continue
        train = study.read_metrics(workdir, "train")
        finite = [r["loss"] for r in train if math.isfinite(r["loss"])]
        clip = [r["agc_clip_fraction"] for r in train if lam is not None and math.isfinite(r["agc_clip_fraction"])]
        rows.append(
            dict(
                base_lr=lr,
                peak_lr=lr * args.batch / 256,
                setting=setting_name(lam, classifier),
                agc_lambda=lam,
                classifier=classifier,
                seed=seed,
                **result,
                max_train_loss=max(finite) if finite else None,
                nonfinite_steps=sum(r.get("nonfinite_steps", 0) for r in train),
                agc_clip_fraction_mean=sum(clip) / len(clip) if clip else None,
                curve=[(r["step"], r["loss"] if math.isfinite(r["loss"]) else None) for r in train],
            )
        )
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for key in dict.fromkeys((r["base_lr"], r["setting"]) for r in rows):
        mine = [r for r in rows if (r["base_lr"], r["setting"]) == key]
        top1, loss = study.mean_spread([r["top1"] for r in mine]), study.mean_spread([r["eval_loss"] for r in mine])
        first = mine[0]
        clips = [r["agc_clip_fraction_mean"] for r in mine if r["agc_clip_fraction_mean"] is not None]
        out.append(
            dict(
                base_lr=first["base_lr"],
                peak_lr=first["peak_lr"],
                setting=first["setting"],
                agc_lambda=first["agc_lambda"],
                classifier=first["classifier"],
                seeds=len(mine),
                **{f"top1_{k}": v for k, v in top1.items()},
                eval_loss_mean=loss["mean"],
                max_train_loss=max(
                    (r["max_train_loss"] for r in mine if r["max_train_loss"] is not None), default=None
                ),
                runs_with_nonfinite_steps=sum(r["nonfinite_at"] is not None for r in mine),
                first_nonfinite_step=min(
                    (r["nonfinite_at"] for r in mine if r["nonfinite_at"] is not None), default=None
                ),
                agc_clip_fraction_mean=None if first["agc_lambda"] is None else float(np.mean(clips)),
            )
        )
    return out


def plot_sweep(summary: list[dict], title: str):
    """Test top-1 vs lambda (log x), one panel per base lr: a line per classifier setting (min-max over seeds as
    error bars) and AGC off as a dashed horizontal line."""
    plt = import_pyplot()
    lrs = list(dict.fromkeys(r["base_lr"] for r in summary))
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        mine = [r for r in summary if r["base_lr"] == lr]
        for i, classifier in enumerate(CLASSIFIER):
            pts = sorted((r for r in mine if r["classifier"] == classifier), key=lambda r: r["agc_lambda"])
            if not pts:
                continue
            ys = [r["top1_mean"] for r in pts]
            err = [[r["top1_mean"] - r["top1_min"] for r in pts], [r["top1_max"] - r["top1_mean"] for r in pts]]
            xs = [r["agc_lambda"] for r in pts]
            ax.errorbar(
                xs, ys, yerr=err, marker="o", capsize=3, color=f"C{i}", label=f"AGC, {CLASSIFIER[classifier][1]}"
            )
        for r in mine:
            if r["setting"] == "off":
                ax.axhline(r["top1_mean"], color="k", linestyle="--", label="AGC off")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("AGC lambda")
        ax.set_ylabel("test top-1")
        ax.set_title(f"base lr {lr:g} (peak {mine[0]['peak_lr']:g})", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_curves(rows: list[dict], seed: int, title: str):
    """Training loss vs step (log y) of one seed, one panel per base lr: AGC off and each lambda with the
    classifier excluded. A non-finite step is marked with an x at the top of the panel."""
    plt = import_pyplot()
    lrs = list(dict.fromkeys(r["base_lr"] for r in rows))
    lambdas = sorted({r["agc_lambda"] for r in rows if r["agc_lambda"] is not None})  # one colour each
    fig, axes = plt.subplots(1, len(lrs), figsize=(5.5 * len(lrs), 4), squeeze=False)
    for ax, lr in zip(axes[0], lrs, strict=True):
        mine = [r for r in rows if r["base_lr"] == lr and r["seed"] == seed and r["classifier"] in (None, "excl")]
        mine.sort(key=lambda r: -1 if r["agc_lambda"] is None else r["agc_lambda"])
        for r in mine:
            steps = [s for s, _ in r["curve"]]
            loss = [float("nan") if v is None else v for _, v in r["curve"]]
            lam = r["agc_lambda"]
            color = "k" if lam is None else f"C{lambdas.index(lam) % 10}"
            style = dict(color=color, linewidth=2 if lam is None else 1)
            label = "AGC off" if r["agc_lambda"] is None else f"AGC lambda {r['agc_lambda']:g}"
            ax.plot(steps, loss, label=label, **style)
            bad = [s for s, v in r["curve"] if v is None]
            if bad:
                ax.plot(bad, [1.0] * len(bad), "x", color=style["color"], transform=ax.get_xaxis_transform())
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (log; x: non-finite)")
        ax.set_title(f"base lr {lr:g}, classifier not clipped, seed {seed}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def parse(argv):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    study.add_twin_arguments(parser, runs="runs/agc", seeds="0")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--lrs", default="0.4,1.6", help="base learning rates (per 256 examples)")
    parser.add_argument("--lambdas", default="0.01,0.02,0.04,0.08,0.16")
    parser.add_argument("--classifier", default="excl,clip", help="classifier settings: excl, clip or both")
    args, extra = parser.parse_known_args(argv)
    try:
        args.extra = study.config_overrides(extra)
        args.lrs = study.number_list(args.lrs, "--lrs", float, 1e-12)
        args.lambdas = sorted(study.number_list(args.lambdas, "--lambdas", float, 1e-12))
        args.seeds = study.number_list(args.seeds, "--seeds", int, 0)
        args.widths = ",".join(map(str, study.number_list(args.widths, "--widths", int, 1, unique=False)))
        args.classifier = study.number_list(args.classifier, "--classifier", str)
    except ValueError as e:
        parser.error(str(e))
    if any(c not in CLASSIFIER for c in args.classifier):
        parser.error(f"--classifier takes excl, clip or excl,clip; got {args.classifier}")
    if len({f"{v:g}" for v in args.lrs}) < len(args.lrs) or len({f"{v:g}" for v in args.lambdas}) < len(args.lambdas):
        parser.error("--lrs and --lambdas name their runs with 6 significant digits; give values that differ in them")
    if args.batch < 1 or args.epochs <= 0 or args.stem_width < 1:
        parser.error(
            f"--batch and --stem-width must be at least 1 and --epochs positive; got --batch {args.batch}, "
            f"--stem-width {args.stem_width}, --epochs {args.epochs}"
        )
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
    summary = summarize(rows)
    settings = dict(
        batch=args.batch,
        base_lrs=args.lrs,
        lambdas=args.lambdas,
        classifier={c: CLASSIFIER[c][1] for c in args.classifier},
        seeds=args.seeds,
        epochs=args.epochs,
        widths=args.widths,
        stem_width=args.stem_width,
        extra_overrides=args.extra,
    )
    settings = study.study_record(settings, rows, len(todo), start)
    csv_path, json_path = os.path.join(args.out, "agc_sweep.csv"), os.path.join(args.out, "agc_sweep.json")
    write_table(summary, csv_path, json_path, study.json_safe(dict(settings, summary=summary, runs=rows)))
    title = (
        f"NF twin (widths {args.widths}), batch {args.batch}, {args.epochs:g} epochs; {len(rows)} of {len(todo)} runs"
    )
    pngs = [
        save_png(plot_sweep(summary, title), os.path.join(args.out, "agc_sweep.png")),
        save_png(plot_curves(rows, args.seeds[0], title), os.path.join(args.out, "agc_curves.png")),
    ]
    for r in summary:
        bad = (
            "" if r["first_nonfinite_step"] is None else f", first non-finite loss at step {r['first_nonfinite_step']}"
        )
        peak = "none finite" if r["max_train_loss"] is None else f"{r['max_train_loss']:.3g}"
        print(
            f"base lr {r['base_lr']:g} {r['setting']:>14}: test top-1 {r['top1_mean']:.4f}, "
            f"largest training loss {peak}{bad}"
        )
    print(f"wrote {csv_path}, {json_path}, {', '.join(pngs)}")
    print(study.totals_line(settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
