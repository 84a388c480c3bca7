"""The accelerator checks of the speed work in one run: the trainer end to end against the bare step, and timm.

    python scripts/gpu_targets.py --out gpu_targets.json            # NF-ResNet-50, 224 px, bf16, batch 128

Made for a machine with a GPU (where it takes a few minutes) and run in the tests on a tiny model on CPU:

1. The bare train step (``python -m nfjax.benchmark train``), beside timm's same step in PyTorch on the same kind
   of device (automatic mixed precision in bf16, channels-last) when PyTorch and timm are installed.
2. The trainer end to end (``python -m nfjax.train`` on synthetic data in a fresh workdir: the NumPy input
   pipeline and prefetch, the metrics, a checkpoint at the end), its img/s the median of the logged intervals
   after the first (which holds the compilation). EMA is off on both sides (the benchmark has none).
3. The ratio trainer / bare step (the target: at least 0.9) and the card each number came from, written as JSON
   to ``--out`` and printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

TARGET = 0.9  # the trainer's img/s within 10% of the bare step's


def trainer_command(args, workdir: str) -> list[str]:
    """``nfjax.train`` on synthetic data with the benchmark's settings: no augmentation, EMA off, no warm-up."""
    size, steps = args.image_size, args.train_steps
    return [
        sys.executable, "-m", "nfjax.train", "--config", f"{args.config}:batch={args.batch},epochs=1",
        "--workdir", workdir,
        f"--config.model.name={args.model}",
        "--config.data.dataset=synthetic",
        f"--config.data.synthetic.image_shape=({size},{size},3)",
        "--config.data.synthetic.num_classes=1000",
        f"--config.data.synthetic.train_examples={args.batch * steps}",
        f"--config.data.synthetic.eval_examples={args.batch}",
        f"--config.data.image_size={size}",
        "--config.data.random_resized_crop=False",
        "--config.data.randaugment_layers=0",
        f"--config.data.eval_image_size={size}",
        "--config.data.eval_preprocess=none",
        "--config.optim.ema_decay=0",
        "--config.optim.warmup_epochs=0",
        f"--config.train.compute_dtype={args.dtype}",
        f"--config.train.log_every_steps={args.log_every}",
    ]  # fmt: skip


def trainer_speed(workdir: str) -> tuple[float, list[float]]:
    """(median img/s of the logged intervals after the first, all of them) from the run's metrics.jsonl."""
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        speeds = [row["img_per_sec"] for row in map(json.loads, f) if "img_per_sec" in row]
    if len(speeds) < 2:
        raise SystemExit(
            f"error: the trainer logged {len(speeds)} interval(s); raise --train-steps or lower --log-every"
        )
    return statistics.median(speeds[1:]), speeds


def run(args) -> dict:
    from nfjax.benchmark import main as benchmark

    argv = ["train", "--model", args.model, "--image-size", str(args.image_size), "--batch", str(args.batch)]
    argv += ["--dtype", args.dtype, "--steps", str(args.steps), "--warmup", str(args.warmup), "--json"]
    if not args.no_timm:
        argv += ["--compare", "timm", "--channels-last"]
    bare = benchmark(argv)
    workdir = args.workdir or tempfile.mkdtemp(prefix="gpu_targets_")
    env = dict(os.environ, NFJAX_HOST_DEVICES=os.environ.get("NFJAX_HOST_DEVICES", "1"))
    subprocess.run(trainer_command(args, workdir), check=True, env=env)
    trainer, intervals = trainer_speed(workdir)
    rows = {row["impl"]: row for row in bare["rows"]}
    nfjax_row = rows["nfjax"]
    timm_row = next((row for name, row in rows.items() if name.startswith("timm")), None)
    ratio = trainer / nfjax_row["img_per_s"]
    report = dict(
        model=args.model,
        image_size=args.image_size,
        batch=args.batch,
        dtype=args.dtype,
        jax_device=bare["device"],
        bare_step_img_per_s=nfjax_row["img_per_s"],
        trainer_img_per_s=trainer,
        trainer_intervals_img_per_s=intervals,
        trainer_over_bare=ratio,
        trainer_target=TARGET,
        trainer_target_met=ratio >= TARGET,
        timm_img_per_s=timm_row["img_per_s"] if timm_row else None,
        timm_device=timm_row.get("device") if timm_row else None,
        nfjax_over_timm=bare["nfjax_over_timm"],
        workdir=workdir,
    )
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nf_resnet50")
    parser.add_argument("--config", default="configs/nf_resnet50.py", help="the trainer's config (its recipe)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--steps", type=int, default=20, help="timed steps of the bare benchmark")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of the bare benchmark")
    parser.add_argument("--train-steps", type=int, default=200, help="steps the trainer runs")
    parser.add_argument("--log-every", type=int, default=25, help="the trainer's logging interval, in steps")
    parser.add_argument("--workdir", default=None, help="the trainer's workdir (default: a new temporary one)")
    parser.add_argument("--no-timm", action="store_true", help="skip the PyTorch/timm step")
    parser.add_argument("--out", default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    for name in ("batch", "image_size", "steps", "train_steps", "log_every"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
