"""Benchmarks: ``python -m nfjax.benchmark <benchmark> [options]``.

data   images/s (and per CPU core) of the training input pipeline, e.g.
       python -m nfjax.benchmark data --dataset synthetic_jpeg --preset crop_flip
       python -m nfjax.benchmark data --dataset fashion_mnist --data-dir DIR --preset small
       With synthetic_jpeg (or --compare-plain on an image folder) the same files also go through a plain
       tf.data decode -> crop -> flip -> resize loop, and the ratio of the two rates is reported.
       --compare-grain (preset crop_flip, image files; needs `pip install grain`) also runs the same work as a
       grain pipeline with 0, 1 and 2 worker processes (--grain-workers), checks its exact resume, and reports
       grain / nfjax (see nfjax/benchmark_grain.py).
train  training-step time, images/s and GFLOP/s of a model (see nfjax/benchmark_train.py), e.g.
       python -m nfjax.benchmark train --model nfnet_f0 --image-size 192 --batch 8 --compare timm
memory train-state bytes per device, plain data parallel vs FSDP, from shapes only (nfjax/benchmark_memory.py):
       python -m nfjax.benchmark memory --model nfnet_f4 nfnet_f5 nfnet_f6 nfnet_f7 --fsdp 8
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from nfjax.allocator import restart_with_tunables
from nfjax.host_devices import configure_host_devices, cpu_cores

if __name__ == "__main__":
    restart_with_tunables()  # first: malloc settings for XLA's per-step memory (CPU; nfjax/allocator.py)

configure_host_devices()  # before JAX starts, as for training

import numpy as np

from nfjax.benchmark_memory import add_memory_parser
from nfjax.benchmark_train import add_train_parser, check_counts


def make_synthetic_jpegs(root: str | Path, num_images: int = 300, num_classes: int = 4, seed: int = 0) -> Path:
    """Writes ImageNet-sized JPEGs (about 500x375, varied sizes) into root/<class>/: smooth colour fields
    with shapes and mild noise, so they compress like photographs rather than like noise or flat colour."""
    from PIL import Image, ImageDraw

    rng, root = np.random.default_rng(seed), Path(root)
    for i in range(num_images):
        width, height = int(rng.integers(400, 600)), int(rng.integers(300, 450))
        field = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
        image = Image.fromarray(field).resize((width, height), Image.BICUBIC)
        draw = ImageDraw.Draw(image)
        for _ in range(6):
            x0, y0 = int(rng.integers(0, width - 40)), int(rng.integers(0, height - 40))
            box = [x0, y0, x0 + int(rng.integers(20, 200)), y0 + int(rng.integers(20, 200))]
            draw.ellipse(box, fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
        pixels = np.asarray(image, np.int16) + rng.normal(0, 6, (height, width, 3)).astype(np.int16)
        folder = root / f"class_{i % num_classes}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"img_{i:05d}.jpg", quality=90)
    return root


def preset_config(preset: str, dataset: str, data_dir: str, image_size: int):
    """Data configs of the recipes: crop_flip (RRC + flip), nfnet (+ RandAugment 4x5, MixUp/CutMix),
    rsb_a1 (timm RandAugment m7, mixes, BCE targets, repeated augmentation), small (pad-crop + flip)."""
    from nfjax.data import default_data_config, fashion_mnist_data_config

    if preset == "small":
        cfg = fashion_mnist_data_config(data_dir)
        cfg.dataset = dataset
        return cfg
    cfg = default_data_config()
    cfg.dataset, cfg.data_dir, cfg.image_size = dataset, data_dir, image_size
    if preset == "nfnet":
        cfg.randaugment_layers, cfg.randaugment_magnitude = 4, 5.0
        cfg.mixup_alpha, cfg.cutmix_alpha, cfg.label_smoothing = 0.2, 1.0, 0.1
    elif preset == "rsb_a1":
        cfg.randaugment_layers, cfg.randaugment_magnitude, cfg.randaugment_variant = 2, 7.0, "timm"
        cfg.mixup_alpha, cfg.cutmix_alpha, cfg.mix_mode = 0.2, 1.0, "timm"
        cfg.label_smoothing, cfg.bce_target_thresh, cfg.repeated_aug = 0.1, 0.2, 3
    elif preset != "crop_flip":
        raise ValueError(f"unknown preset {preset!r}")
    return cfg


def process_tree_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process (every thread), its live descendants (e.g. grain's worker
    processes; counted with psutil, which orbax-checkpoint and TFDS install) and its reaped children."""
    import resource

    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = time.process_time() + reaped.ru_utime + reaped.ru_stime
    try:
        import psutil
    except ImportError:
        return total
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.Error:  # exited meanwhile: counted once reaped
            continue
        total += times.user + times.system
    return total


def measure(batches: Iterator, batch_size: int, steps: int, warmup: int, label: str) -> tuple[float, float]:
    """(images per wall-clock second, images per CPU-second of the process tree) over ``steps`` batches after
    ``warmup`` batches. CPU time counts every thread of the process and of its worker processes, so the second
    number is the cost per core and is less sensitive to other programs sharing the machine."""
    from tqdm import tqdm

    for _ in range(warmup):
        next(batches)
    wall, cpu = time.perf_counter(), process_tree_cpu_seconds()
    for _ in tqdm(range(steps), desc=label, unit="batch", leave=False, mininterval=1.0):
        next(batches)
    images = steps * batch_size
    return images / (time.perf_counter() - wall), images / (process_tree_cpu_seconds() - cpu)


def plain_tfdata_batches(files: Sequence[str], batch_size: int, image_size: int) -> Iterator:
    """The reference: read -> decode_jpeg -> sampled crop -> flip -> bicubic resize -> batch, AUTOTUNE."""
    from nfjax.data.augment import RRC_AREA_RANGE, RRC_ASPECT_RANGE, RRC_MAX_ATTEMPTS
    from nfjax.data.tf_lazy import import_tf

    tf = import_tf()

    def load(path):
        image = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            tf.shape(image),
            tf.zeros([0, 0, 4]),
            area_range=RRC_AREA_RANGE,
            aspect_ratio_range=RRC_ASPECT_RANGE,
            max_attempts=RRC_MAX_ATTEMPTS,
            use_image_if_no_bounding_boxes=True,
        )
        image = tf.image.random_flip_left_right(tf.slice(image, begin, size))
        return tf.image.resize(image, [image_size, image_size], method="bicubic")

    ds = tf.data.Dataset.from_tensor_slices(list(files)).shuffle(len(files)).repeat()
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True)
    return ds.prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def _grain_builders(args: argparse.Namespace, cfg, source) -> dict:
    """The grain pipelines of ``--grain-workers``, each checked once for exact resume (reported on stdout)."""
    from nfjax.benchmark_grain import GrainSpec, check_resume, grain_builders
    from nfjax.data.config import mean_std

    mean, std = mean_std(cfg, 3)
    spec = GrainSpec(source.paths, source.labels, args.batch, args.image_size, mean, std, threads=args.grain_threads)
    builders = grain_builders(spec, args.grain_workers)
    for name, build in builders.items():
        verdict = "exact" if check_resume(build) else "DIFFERENT BATCHES"
        print(f"{name}: resume from get_state() after 3 batches, next 3 batches: {verdict}", flush=True)
    return builders


def _check_data_args(args: argparse.Namespace) -> None:
    """Exits through the subcommand's ``parser.error`` (usage, one line naming the flag, exit code 2) when the
    sizes cannot give a measurement, as ``benchmark train`` and ``benchmark memory`` do."""
    check_counts(args, ("batch", "steps", "rounds", "image_size", "num_images"))
    if args.dataset == "synthetic_jpeg" and args.num_images < args.batch:
        args.error(
            f"--num-images={args.num_images} is smaller than --batch={args.batch}: the generated folder must hold at "
            f"least one batch; use --num-images {args.batch} or more (or a smaller --batch)"
        )
    _check_grain_args(args)


def _check_grain_args(args: argparse.Namespace) -> None:
    """Exits through ``parser.error`` when --compare-grain cannot run: grain missing, or not the crop_flip work
    on files."""
    if not args.compare_grain:
        return
    from nfjax.benchmark_grain import grain_missing_message

    if message := grain_missing_message():
        args.error(message)
    if args.preset != "crop_flip" or args.dataset not in ("synthetic_jpeg", "image_folder"):
        args.error(
            "--compare-grain runs the crop_flip preset on image files: use --preset crop_flip with "
            "--dataset synthetic_jpeg or image_folder"
        )


def benchmark_data(args: argparse.Namespace) -> dict:
    """Runs the data benchmark; returns {name: [(img/s, img per CPU-second) per round]}.

    Pipelines are measured one at a time, alternating over ``args.rounds`` rounds, each built afresh and
    closed after its measurement; the report takes the median round.
    """
    from nfjax.data import build_train_iterator
    from nfjax.data.pipeline import close_pipeline
    from nfjax.data.sources import ImageFolderSource

    _check_data_args(args)
    with tempfile.TemporaryDirectory() as tmp:
        dataset, data_dir = args.dataset, args.data_dir
        if dataset == "synthetic_jpeg":
            dataset, data_dir = "image_folder", str(make_synthetic_jpegs(tmp, args.num_images))
        cfg = preset_config(args.preset, dataset, data_dir, args.image_size)
        if args.backend:
            cfg.backend = args.backend
        builders = {
            "nfjax": lambda: build_train_iterator(
                cfg, global_batch=args.batch, device_count=1, process_count=1, process_index=0
            )
        }
        # The reference loop does crop + flip only, so by default it is compared with that preset alone.
        compare_plain = args.compare_plain or (args.dataset == "synthetic_jpeg" and args.preset == "crop_flip")
        source = ImageFolderSource(data_dir, "all") if compare_plain or args.compare_grain else None
        if compare_plain:
            builders["plain_tfdata"] = lambda: plain_tfdata_batches(source.paths, args.batch, args.image_size)
        if args.compare_grain:
            builders.update(_grain_builders(args, cfg, source))
        result = {name: [] for name in builders}
        for round_index in range(args.rounds):
            for name, build in builders.items():
                iterator = build()
                label = f"{name} round {round_index + 1}/{args.rounds}"
                result[name].append(measure(iterator, args.batch, args.steps, args.warmup, label))
                close_pipeline(iterator)  # its threads and workers must not compete with the next one
                del iterator
                gc.collect()  # frees what a closed pipeline still holds (grain: nested iterators, shared memory)
    _report(result, args)
    return result


def _median(rounds: list, index: int) -> float:
    return float(np.median([r[index] for r in rounds]))


def _report(result: dict, args: argparse.Namespace) -> None:
    cores = cpu_cores()
    print(
        f"data benchmark: dataset={args.dataset} preset={args.preset} batch={args.batch} steps={args.steps} "
        f"rounds={args.rounds} cores={cores} (median round)"
    )
    for name, rounds in result.items():
        wall, cpu = _median(rounds, 0), _median(rounds, 1)
        print(
            f"  {name:<13} {wall:8.1f} images/s  {wall / cores:8.1f} images/s per core (wall)  "
            f"{cpu:8.1f} images per CPU-second"
        )
    if "plain_tfdata" in result:
        ratios = [_median(result["nfjax"], i) / _median(result["plain_tfdata"], i) for i in (0, 1)]
        print(f"  nfjax / plain tf.data: {ratios[0]:.2f} (wall-clock), {ratios[1]:.2f} (per CPU-second)")
    for name in (n for n in result if n.startswith("grain")):
        ratios = [_median(result[name], i) / _median(result["nfjax"], i) for i in (0, 1)]
        print(f"  {name} / nfjax: {ratios[0]:.2f} (wall-clock), {ratios[1]:.2f} (per CPU-second)")


def _int_list(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(",") if part.strip())


def add_data_parser(subparsers) -> None:
    parser = subparsers.add_parser("data", help="input pipeline throughput")
    parser.add_argument("--dataset", default="synthetic_jpeg", help="TFDS name, image_folder or synthetic_jpeg")
    parser.add_argument("--data-dir", default="~/tensorflow_datasets", help="TFDS data_dir or image folder")
    parser.add_argument("--preset", default="crop_flip", choices=["crop_flip", "nfnet", "rsb_a1", "small"])
    parser.add_argument("--backend", default=None, choices=["auto", "tfdata", "numpy"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurements; the median is reported")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--num-images", type=int, default=300, help="synthetic_jpeg: files to generate")
    parser.add_argument("--compare-plain", action="store_true", help="also time a plain tf.data loop")
    parser.add_argument(
        "--compare-grain", action="store_true", help="also time the crop_flip work as a grain pipeline (needs grain)"
    )
    parser.add_argument(
        "--grain-workers", type=_int_list, default=(0, 1, 2), help="--compare-grain: worker process counts, e.g. 0,2"
    )
    parser.add_argument("--grain-threads", type=int, default=16, help="--compare-grain: read threads per process")
    parser.set_defaults(run=benchmark_data, error=parser.error)


def main(argv: Sequence[str] | None = None):
    """Parses ``argv`` and runs the chosen benchmark; returns its result."""
    parser = argparse.ArgumentParser(
        prog="python -m nfjax.benchmark", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    subparsers = parser.add_subparsers(dest="benchmark", required=True)
    add_data_parser(subparsers)
    add_train_parser(subparsers)
    add_memory_parser(subparsers)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    main()
