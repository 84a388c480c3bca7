"""Signal propagation at initialization (NF-ResNet paper, Brock et al. 2021a): NF vs BN vs no normalization.

    python scripts/signal_propagation.py --out docs/results --image-size 128 --batch 16 --seed 0

Feeds a batch of unit-Gaussian inputs and a batch of Fashion-MNIST test images (resized bilinearly to the
image size, normalized with the dataset's mean/std, copied to 3 channels) through four networks at init and
records, per residual block, the three statistics of the paper's signal propagation plots:
avg_sq_mean = mean over channels of (mean over N, H, W of the block output)^2, avg_var = mean over channels of
its variance, res_avg_var = avg_var of the residual branch before it is scaled and added.

- NF-ResNet-50 with SkipInit opened (skipinit_gain=1), as in the paper's plots: at init the branches would
  otherwise be zero;
- BN ResNet-50 with train-mode BatchNorm (batch statistics) and zero_init_last off, for the same reason;
- the same ResNet-50 with every BatchNorm removed and nothing in its place (``norm='none'``);
- NFNet-F0, SkipInit opened.

Writes OUT/signal_propagation.csv and .json (rows: input, series, model, block, stage, transition, the three
statistics; the JSON adds the settings, versions and wall time) and one PNG per input,
OUT/signal_propagation_<input>.png (three panels, log-scale y, block index on x, hollow markers on each stage's
first block). Same --seed, same numbers.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

try:
    from nfjax.plotting import environment, import_pyplot, save_png, write_table
except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from nfjax.plotting import environment, import_pyplot, save_png, write_table

# label -> (model name, constructor overrides)
SERIES: dict[str, tuple[str, dict]] = {
    "NF-ResNet-50": ("nf_resnet50", {"skipinit_gain": 1.0}),
    "BN ResNet-50 (train-mode BN)": ("resnet50", {"zero_init_last": False}),
    "ResNet-50, BN removed": ("resnet50", {"norm": "none"}),
    "NFNet-F0": ("nfnet_f0", {"skipinit_gain": 1.0}),
}
INPUTS = ("gaussian", "fashion_mnist")
STATISTICS = ("avg_sq_mean", "avg_var", "res_avg_var")
FMNIST_SOURCE_DIR = "/usr/share/datasets/fashion-mnist"


def gaussian_inputs(seed: int, batch: int, size: int):
    """float32 [batch, size, size, 3] drawn from N(0, 1) with ``jax.random.key(seed)``."""
    import jax

    return jax.random.normal(jax.random.key(seed), (batch, size, size, 3))


def fashion_mnist_inputs(seed: int, batch: int, size: int, source_dir: str = FMNIST_SOURCE_DIR):
    """``batch`` test images picked with ``seed``: (x / 255 - 0.2860) / 0.3530, bilinear resize from 28 px to
    ``size``, copied to 3 channels -> float32 [batch, size, size, 3]."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from nfjax.data.config import DATASET_STATS
    from nfjax.data.fashion_mnist import load_idx_split

    images, _ = load_idx_split(source_dir, "test")
    picked = np.random.default_rng(seed).choice(len(images), batch, replace=False)
    (mean,), (std,) = DATASET_STATS["fashion_mnist"]
    x = (images[np.sort(picked)].astype(np.float32) / 255.0 - mean) / std
    x = jax.image.resize(jnp.asarray(x), (batch, size, size, 1), "bilinear")
    return jnp.repeat(x, 3, axis=-1)


def stage_starts(depths) -> list[int]:
    """Index of each stage's first block (a transition block): [0, d0, d0 + d1, ...]."""
    starts, total = [], 0
    for depth in depths:
        starts.append(total)
        total += depth
    return starts


def build(name: str, overrides: dict, seed: int):
    """(model, depths, train flag): the model at init with ``nnx.Rngs(seed)``; BN models run in train mode."""
    from flax import nnx

    from nfjax.models import MODELS, create_model, model_metadata

    model = create_model(name, num_classes=10, rngs=nnx.Rngs(seed), **overrides)
    depths = overrides.get("depths", MODELS[name][1].get("depths"))
    batch_norm = not model_metadata(name)["normalizer_free"] and overrides.get("norm", "batch") == "batch"
    return model, tuple(depths), batch_norm


def log_line(message: str) -> None:
    print(message, flush=True)


def measure(series: dict, inputs: dict, seed: int, log=log_line) -> list[dict]:
    """One row per (input, series, block) with the three statistics; each model is built and compiled once
    and sees every input (same shapes)."""
    import numpy as np
    from flax import nnx

    rows = []
    for index, (label, (name, overrides)) in enumerate(series.items()):
        model, depths, train = build(name, overrides, seed)
        forward = nnx.jit(lambda m, x, train=train: m(x, train=train, return_stats=True)[1])
        starts = stage_starts(depths)
        for input_name, x in inputs.items():
            start = time.perf_counter()
            stats = {k: np.asarray(v, np.float64) for k, v in forward(model, x).items()}
            log(f"[{index + 1}/{len(series)}] {label} ({name}) on {input_name}: {time.perf_counter() - start:.1f} s")
            for block in range(len(stats["avg_var"])):
                stage = sum(block >= s for s in starts) - 1
                row = dict(input=input_name, series=label, model=name, block=block, stage=stage)
                row["transition"] = block in starts
                rows.append(row | {k: float(stats[k][block]) for k in STATISTICS})
    return rows


def plot(rows: list[dict], input_name: str, title: str):
    """Figure with one panel per statistic, one line per series (label = series), log-scale y; each stage's
    first block gets a hollow marker (a line labelled '_transitions <series>', left out of the legend)."""
    plt = import_pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    labels = list(dict.fromkeys(r["series"] for r in rows if r["input"] == input_name))
    for ax, key in zip(axes, STATISTICS, strict=True):
        for i, label in enumerate(labels):
            mine = [r for r in rows if r["input"] == input_name and r["series"] == label]
            color = f"C{i}"
            ax.plot([r["block"] for r in mine], [r[key] for r in mine], marker=".", color=color, label=label)
            edges = [r for r in mine if r["transition"]]
            ax.plot(
                [r["block"] for r in edges],
                [r[key] for r in edges],
                linestyle="none",
                marker="o",
                markersize=9,
                markerfacecolor="none",
                color=color,
                label=f"_transitions {label}",
            )
        ax.set_yscale("log")
        ax.set_title(key)
        ax.set_xlabel("residual block (hollow marker: first block of a stage)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def write_outputs(rows: list[dict], out: str, settings: dict) -> list[str]:
    """OUT/signal_propagation.csv, .json and one PNG per input; returns the paths written."""
    csv_path, json_path = os.path.join(out, "signal_propagation.csv"), os.path.join(out, "signal_propagation.json")
    write_table(rows, csv_path, json_path, dict(settings, rows=rows))
    paths = [csv_path, json_path]
    for input_name in dict.fromkeys(r["input"] for r in rows):
        title = (
            f"Signal propagation at init, {input_name} inputs, {settings['image_size']} px, batch "
            f"{settings['batch']}, seed {settings['seed']}"
        )
        paths.append(save_png(plot(rows, input_name, title), os.path.join(out, f"signal_propagation_{input_name}.png")))
    return paths


def run(series: dict, input_names, image_size: int, batch: int, seed: int, out: str, fmnist_dir: str) -> dict:
    """Measures and writes everything; returns the settings, versions, wall time, rows and paths."""
    import_pyplot()  # fail before measuring when matplotlib is missing
    start = time.perf_counter()
    makers = {
        "gaussian": lambda: gaussian_inputs(seed, batch, image_size),
        "fashion_mnist": lambda: fashion_mnist_inputs(seed, batch, image_size, fmnist_dir),
    }
    rows = measure(series, {name: makers[name]() for name in input_names}, seed)
    settings = dict(
        image_size=image_size,
        batch=batch,
        seed=seed,
        series={label: [name, overrides] for label, (name, overrides) in series.items()},
        environment=environment(),
        wall_seconds=round(time.perf_counter() - start, 1),
    )
    paths = write_outputs(rows, out, settings)
    return dict(settings, rows=rows, paths=paths)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="docs/results", help="folder for the CSV, JSON and PNGs")
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="model init, Gaussian draw and image choice")
    parser.add_argument("--inputs", default=",".join(INPUTS), help=f"comma-separated subset of {', '.join(INPUTS)}")
    parser.add_argument("--fmnist-dir", default=FMNIST_SOURCE_DIR, help="folder of the Fashion-MNIST IDX files")
    args = parser.parse_args(argv)
    inputs = [name.strip() for name in args.inputs.split(",") if name.strip()]
    if not inputs or any(name not in INPUTS for name in inputs):
        parser.error(f"--inputs takes a comma-separated subset of {', '.join(INPUTS)}; got {args.inputs!r}")
    if args.image_size < 32 or args.batch < 2:
        parser.error(f"--image-size must be at least 32 and --batch at least 2; got {args.image_size}, {args.batch}")
    result = run(SERIES, inputs, args.image_size, args.batch, args.seed, args.out, args.fmnist_dir)
    print("wrote " + ", ".join(result["paths"]))
    print(f"total wall time {result['wall_seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
