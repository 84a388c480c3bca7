"""NF vs BN step time on this machine: a thin driver around ``python -m nfjax.benchmark train``.

    python scripts/speed_nf_vs_bn.py --out docs/results --image-size 224 --batch 8 --steps 5 --warmup 2 --rounds 3

For each pair (default: NF-ResNet-50 vs BN ResNet-50, the same convolutions) and each step (the jitted train
step of ``nfjax.train`` and the eval step of ``nfjax.evaluate``), runs the benchmark in this process once per
side and round, alternating the order of the two sides from round to round (A B, B A, A B, ...) so that a
drifting machine load does not favour one side. Each run builds and compiles its step afresh; only the timed
steps count. Per (step, model) the table reports the median over rounds of the benchmark's median step time,
img/s, and the slowest/fastest round; per pair, BN step time / NF step time.

NFNet-F0 vs "the same network with BatchNorm in place of the NF machinery" is not measured: nfjax has no BN
variant of the NFNet, so that pair is listed as skipped.

Writes OUT/speed.csv, OUT/speed.json (every run's report, settings, versions, wall time) and OUT/speed.png
(img/s bars, one group per step, the rounds' range as error bars).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

try:
    from nfjax.plotting import environment, import_pyplot, save_png, write_table
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nfjax.plotting import environment, import_pyplot, save_png, write_table

STEPS = ("train", "eval")
SKIPPED_PAIRS = {"nfnet_f0:nfnet_f0 with BatchNorm": "nfjax has no BatchNorm variant of the NFNet"}


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """'nf_a:bn_a,nf_b:bn_b' -> [(nf_a, bn_a), (nf_b, bn_b)]; ValueError naming the bad item otherwise."""
    from nfjax.models import MODELS

    pairs = []
    for item in (part.strip() for part in text.split(",") if part.strip()):
        names = item.split(":")
        unknown = [n for n in names if n not in MODELS]
        if len(names) != 2 or unknown:
            raise ValueError(
                f"--pairs takes comma-separated NF:BN model pairs such as nf_resnet50:resnet50; {item!r} is not one"
                + (f" (unknown model {', '.join(map(repr, unknown))})" if unknown else "")
            )
        pairs.append((names[0], names[1]))
    if not pairs:
        raise ValueError(f"--pairs is empty ({text!r}); give at least one NF:BN pair such as nf_resnet50:resnet50")
    return pairs


def bench_once(model: str, step: str, args) -> dict:
    """One ``nfjax.benchmark train`` run of ``model``'s ``step`` (its report dict)."""
    from nfjax.benchmark import main as benchmark_main

    argv = ["train", "--model", model, "--step", step, "--image-size", str(args.image_size)]
    argv += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    return benchmark_main(argv)


def measure(pairs, steps, args, log=print) -> list[dict]:
    """One row per run: pair, step, model, side, round, step seconds, img/s, compile seconds."""
    rows = []
    for pair in pairs:
        for step in steps:
            for round_index in range(args.rounds):
                order = pair if round_index % 2 == 0 else pair[::-1]
                for model in order:
                    report = bench_once(model, step, args)
                    row = report["rows"][0]
                    side = "nf" if model == pair[0] else "bn"
                    rows.append(
                        dict(
                            pair=f"{pair[0]}:{pair[1]}",
                            step=step,
                            model=model,
                            side=side,
                            round=round_index,
                            step_s=row["step_s"],
                            img_per_s=row["img_per_s"],
                            compile_s=row["compile_s"],
                        )
                    )
                    log(f"{step} {model} round {round_index + 1}/{args.rounds}: {row['step_s']:.3f} s/step", flush=True)
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (pair, step, model): median / min / max over rounds of step time and img/s; ``bn_over_nf`` is the
    BN side's median step time over the NF side's (above 1: NF is faster)."""
    out = []
    for key in dict.fromkeys((r["pair"], r["step"], r["model"], r["side"]) for r in rows):
        mine = [r for r in rows if (r["pair"], r["step"], r["model"], r["side"]) == key]
        times, rates = [r["step_s"] for r in mine], [r["img_per_s"] for r in mine]
        out.append(
            dict(zip(("pair", "step", "model", "side"), key, strict=True))
            | dict(
                rounds=len(mine),
                step_s=statistics.median(times),
                img_per_s=statistics.median(rates),
                img_per_s_min=min(rates),
                img_per_s_max=max(rates),
            )
        )
    for row in out:
        nf = next(r for r in out if (r["pair"], r["step"], r["side"]) == (row["pair"], row["step"], "nf"))
        bn = next((r for r in out if (r["pair"], r["step"], r["side"]) == (row["pair"], row["step"], "bn")), None)
        row["bn_over_nf"] = None if bn is None else bn["step_s"] / nf["step_s"]
    return out


def plot(summary: list[dict], title: str):
    """img/s bars: one group per (pair, step), one bar per model (container label = model), range as error bars."""
    plt = import_pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    groups = list(dict.fromkeys((r["pair"], r["step"]) for r in summary))
    models = list(dict.fromkeys(r["model"] for r in summary))
    width = 0.8 / len(models)
    for i, model in enumerate(models):
        mine = {(r["pair"], r["step"]): r for r in summary if r["model"] == model}
        xs = [g + i * width for g, key in enumerate(groups) if key in mine]
        picked = [mine[key] for key in groups if key in mine]
        heights = [r["img_per_s"] for r in picked]
        errors = [
            [r["img_per_s"] - r["img_per_s_min"] for r in picked],
            [r["img_per_s_max"] - r["img_per_s"] for r in picked],
        ]
        ax.bar(xs, heights, width, yerr=errors, capsize=3, label=model, color=f"C{i}")
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))])
    ax.set_xticklabels([f"{step} step\n{pair}" for pair, step in groups], fontsize=8)
    ax.set_ylabel("images / s (median round; bars: range)")
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def write_outputs(rows: list[dict], summary: list[dict], out: str, settings: dict) -> list[str]:
    csv_path, json_path = os.path.join(out, "speed.csv"), os.path.join(out, "speed.json")
    write_table(summary, csv_path, json_path, dict(settings, summary=summary, runs=rows, skipped=SKIPPED_PAIRS))
    title = (
        f"NF vs BN step speed, {settings['image_size']} px, batch {settings['batch']}, {settings['rounds']} "
        f"alternating rounds, {settings['environment']['cpu_count']} CPUs"
    )
    return [csv_path, json_path, save_png(plot(summary, title), os.path.join(out, "speed.png"))]


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results")
    parser.add_argument("--pairs", default="nf_resnet50:resnet50", help="comma-separated NF:BN model pairs")
    parser.add_argument("--steps-of", default="train,eval", help="which steps to time: train, eval or both")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per run (the benchmark's median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per side")
    args = parser.parse_args(argv)
    import nfjax.benchmark  # noqa: F401  (first: it splits a CPU host into devices before JAX starts, as its CLI)

    try:
        pairs = parse_pairs(args.pairs)
    except ValueError as e:
        parser.error(str(e))
    steps = [s.strip() for s in args.steps_of.split(",") if s.strip()]
    if not steps or any(s not in STEPS for s in steps):
        parser.error(f"--steps-of takes train, eval or train,eval; got {args.steps_of!r}")
    if args.rounds < 1:
        parser.error(f"--rounds must be at least 1, got {args.rounds}")
    import_pyplot()  # fail before measuring when matplotlib is missing
    for pair, why in SKIPPED_PAIRS.items():
        print(f"skipped pair {pair}: {why}")
    start = time.perf_counter()
    rows = measure(pairs, steps, args)
    settings = dict(
        image_size=args.image_size, batch=args.batch, steps=args.steps, warmup=args.warmup, rounds=args.rounds
    )
    settings |= dict(environment=environment(), wall_seconds=round(time.perf_counter() - start, 1))
    summary = summarize(rows)
    paths = write_outputs(rows, summary, args.out, settings)
    print("wrote " + ", ".join(paths))
    print(f"total wall time {settings['wall_seconds']:.1f} s")
    return dict(settings, summary=summary, runs=rows, paths=paths)


if __name__ == "__main__":
    main()
