"""Training-step throughput: ``python -m nfjax.benchmark train --model nfnet_f0 --image-size 192 --batch 8``.

Times the jitted train step that ``nfjax.train`` runs, assembled by the same experiment (forward, backward,
AGC -> weight decay -> SGD-Nesterov, donated state) on random data, and with ``--compare timm`` the same step
in PyTorch/timm on the same shapes: forward, cross-entropy, backward, timm's AGC on every parameter but the
classifier, SGD-Nesterov with weight decay on matrices only. Reported per implementation: compile time
(PyTorch: its first step; nfjax: a load time instead where JAX's persistent compilation cache is configured and
already holds the step), the median step time over ``--rounds`` x ``--steps`` timed steps after ``--warmup``
(the implementations alternated round by round), images/s and achieved GFLOP/s, where one training step
counts as 3x the forward multiply-adds (``nfjax.models.summary.count_macs``) x 2 FLOPs. The parameter EMA is
off: it is not part of the PyTorch step either. ``--step eval`` times the jitted eval step of
``nfjax.evaluate`` instead (inference-mode forward, loss and top-1/top-5 sums; one forward, so 1x the
multiply-adds), and with ``--compare timm`` timm's inference forward under ``no_grad`` with the same sums.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence

from nfjax import allocator
from nfjax.host_devices import cpu_cores

TORCH_INSTALL_HINT = (
    "pip install torch==2.13.0 timm  (pins the CPU build; a plain `pip install torch` pulls a multi-GB CUDA build)"
)
PROGRESS_AFTER_S = 1.0  # a step at least this long gets its own progress line on stderr


def timm_name(name: str) -> str | None:
    """The timm model with the same architecture as the nfjax model ``name``, or None."""
    if re.fullmatch(r"nfnet_f\d", name):
        return f"dm_{name}"  # timm's DeepMind-compatible NFNet (nfjax's 'plus' variants have no timm twin)
    if re.fullmatch(r"(nf_)?(se)?resnet\d+", name):
        return name
    return None


def build_benchmark_experiment(name: str, image_size: int, batch: int, dtype: str = "float32"):
    """(experiment, train state, batch on the device) for one device, assembled as ``nfjax.train`` does it
    (default optimizer: AGC -> weight decay -> SGD-Nesterov; EMA off), on random data of 1000 classes."""
    import jax
    import numpy as np

    from nfjax import parallel
    from nfjax.config_lib import base_config
    from nfjax.data import DatasetInfo
    from nfjax.experiment import build_experiment

    cfg = base_config(name, {})
    cfg.optim.ema_decay = 0.0
    cfg.train.update(global_batch=batch, total_steps=1000, compute_dtype=dtype)
    info = DatasetInfo(100 * batch, 0, 1000, (image_size, image_size, 3), ())
    exp = build_experiment(cfg, num_devices=1, info=info)
    rng = np.random.default_rng(0)
    data = dict(
        image=rng.standard_normal((batch, image_size, image_size, 3), np.float32),
        label=rng.integers(0, 1000, batch).astype(np.int32),
    )
    return exp, exp.create_state(), jax.device_put(data, parallel.batch_sharding(exp.mesh))


def build_jax_step(name: str, image_size: int, batch: int, dtype: str, step: str = "train"):
    """Returns (jitted step, state, batch): the experiment's train step, or with ``step='eval'`` the eval step
    that evaluation runs on every batch, ``eval_step(params, batch_stats, batch)``, with the state's params
    replaced by the weights it takes (NF models: every kernel standardized once, as ``nfjax.evaluate``, the
    trainer's evaluations and ``nfjax.predict`` do, see :meth:`nfjax.experiment.Experiment.inference_weights`)."""
    exp, state, data = build_benchmark_experiment(name, image_size, batch, dtype)
    if step == "train":
        return exp.train_step(), state, data
    weights = exp.inference_weights(state["params"], state.get("batch_stats", {}))
    return exp.tta_eval_step("none", False, exp.prestandardized), dict(state, params=weights), data


def _progress(label: str, index: int, total: int, phase: str, seconds: float) -> None:
    if seconds >= PROGRESS_AFTER_S:
        print(f"  {label} step {index + 1}/{total} ({phase}): {seconds:.2f} s", file=sys.stderr)


class Runner:
    """One implementation's step: ``run()`` does a step and returns its loss; ``info`` goes into its row."""

    def __init__(self, label: str, run, info: dict):
        self.label, self.run, self.info = label, run, info
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.page_faults: list[int] = []
        self.loss = float("nan")

    def step(self, index: int, total: int, phase: str, timed: bool) -> None:
        faults = _minor_page_faults()
        start, cpu_start = time.perf_counter(), time.process_time()
        self.loss = self.run()
        seconds = time.perf_counter() - start
        _progress(self.label, index, total, phase, seconds)
        if timed:
            self.times.append(seconds)
            self.cpu_times.append(time.process_time() - cpu_start)
            self.page_faults.append(_minor_page_faults() - faults)

    def row(self) -> dict:
        cpu_s = statistics.median(self.cpu_times)
        faults = int(statistics.median(self.page_faults))
        return dict(
            impl=self.label, **self.info, step_times_s=self.times, step_cpu_s=cpu_s, page_faults=faults, loss=self.loss
        )


def _minor_page_faults() -> int:
    """The process's minor page faults so far (memory the kernel mapped in on first touch)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_rounds(runners: list[Runner], args) -> None:
    """Warms every runner up, then alternates them: ``rounds`` rounds of ``steps`` timed steps each, so that
    load from other programs on a shared machine falls on every side alike."""
    for runner in runners:
        for index in range(args.warmup):
            runner.step(index, args.warmup, "warm-up", timed=False)
    total = args.rounds * args.steps
    for r in range(args.rounds):
        for runner in runners:
            for i in range(args.steps):
                runner.step(r * args.steps + i, total, f"round {r + 1}/{args.rounds}", timed=True)


def check_counts(args: argparse.Namespace, positive: Sequence[str]) -> None:
    """Exits through the subcommand's ``parser.error`` (usage, one line naming the flag, exit code 2) when one
    of ``positive`` is below 1 or ``--warmup`` below 0: sizes that cannot give a measurement. Shared by the
    ``train`` and ``data`` benchmarks."""
    for flag in positive:
        if getattr(args, flag) < 1:
            args.error(f"--{flag.replace('_', '-')}={getattr(args, flag)} is invalid: it must be at least 1")
    if args.warmup < 0:
        args.error(f"--warmup={args.warmup} is invalid: it must be 0 or more")


def jax_runner(args) -> Runner:
    """The nfjax step, compiled (with ``--lowering`` in force while it is traced) and run once."""
    import resource

    import jax

    from nfjax.models.lowering import forced_lowering

    with forced_lowering(None if args.lowering == "auto" else args.lowering):  # jit's compiler options too
        start = time.perf_counter()
        step, state, batch = build_jax_step(args.model, args.image_size, args.batch, args.dtype, args.step)
        init_s = time.perf_counter() - start
        print(f"  nfjax: compiling the {args.step} step of {args.model} ...", file=sys.stderr)
        start = time.perf_counter()
        weights = (state["params"], state.get("batch_stats", {}))
        compiled = (step.lower(*weights, batch) if args.step == "eval" else step.lower(state, batch)).compile()
        compile_s = time.perf_counter() - start
    holder = {"state": state}

    def run_step() -> float:
        if args.step == "eval":
            sums = jax.block_until_ready(compiled(*weights, batch))
            return float(sums["loss"]) / args.batch
        holder["state"], metrics = compiled(holder["state"], batch)
        jax.block_until_ready((holder["state"], metrics))
        return float(metrics["loss"])

    run_step()  # allocates: the peak resident memory below includes one executed step
    info = dict(init_s=init_s, compile_s=compile_s, **step_memory(compiled))
    info["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    return Runner("nfjax", run_step, info)


def step_memory(compiled) -> dict:
    """XLA's memory plan of a compiled step, GiB: arguments, outputs (aliased with donated arguments) and
    temporaries (activations kept for the backward pass, gradients, workspace). Empty where not reported."""
    try:
        stats = compiled.memory_analysis()
    except Exception:  # not every backend/jaxlib implements it
        return {}
    if stats is None:
        return {}
    return dict(
        argument_gib=stats.argument_size_in_bytes / 2**30,
        output_gib=stats.output_size_in_bytes / 2**30,
        temp_gib=stats.temp_size_in_bytes / 2**30,
    )


def timm_runner(args, name: str) -> Runner:
    """The same step in eager PyTorch. Train: timm model, cross-entropy, backward, AGC, SGD-Nesterov. Eval:
    inference-mode forward under no_grad, summed cross-entropy and the top-1/top-5 counts."""
    import torch
    import torch.nn.functional as F

    timm = import_timm()
    adaptive_clip_grad = timm.utils.adaptive_clip_grad
    device = torch_device(args, torch)
    torch.set_num_threads(cpu_cores())
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=1000).train(args.step == "train").to(device)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if args.channels_last:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=device)
    head = {id(p) for p in model.get_classifier().parameters()}
    clipped = [p for p in model.parameters() if id(p) not in head]
    groups = [
        dict(params=[p for p in model.parameters() if p.ndim >= 2], weight_decay=2e-5),
        dict(params=[p for p in model.parameters() if p.ndim < 2], weight_decay=0.0),
    ]
    opt = torch.optim.SGD(groups, lr=0.1 * args.batch / 256, momentum=0.9, nesterov=True)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")

    def train_step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        adaptive_clip_grad(clipped, clip_factor=0.01, eps=1e-3)
        opt.step()
        return loss.item()

    def eval_step() -> float:
        with torch.no_grad(), autocast:
            logits = model(x).float()
            loss = F.cross_entropy(logits, y, reduction="sum")
            hits = logits.topk(5, dim=-1).indices == y[:, None]
            _ = (hits[:, 0].sum().item(), hits.any(-1).sum().item())  # top-1 and top-5 counts, as nfjax sums
        return float(loss) / args.batch

    run_step = train_step if args.step == "train" else eval_step  # .item() waits for the device
    start = time.perf_counter()
    run_step()  # eager: the first step plays the part of compilation (allocations, oneDNN primitive caches)
    label = f"timm {name}" + (f" ({device})" if device != "cpu" else "")
    card = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    return Runner(label, run_step, dict(init_s=0.0, compile_s=time.perf_counter() - start, device=card))


def torch_device(args, torch) -> str:
    """PyTorch's device for the comparison: ``--torch-device``, where 'auto' is 'cuda' when JAX runs on a GPU and
    PyTorch sees one too (the same kind of device on both sides), else 'cpu'."""
    import jax

    choice = args.torch_device
    if choice == "cuda" and not torch.cuda.is_available():
        args.error("--torch-device cuda: this PyTorch sees no GPU (a CPU build, or no driver); use cpu or auto")
    if choice == "auto":
        return "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
    return choice


def _finish_row(row: dict, batch: int, train_gflop: float) -> dict:
    step_s = statistics.median(row["step_times_s"])
    return dict(row, step_s=step_s, img_per_s=batch / step_s, gflop_per_s=train_gflop / step_s)


_TORCHVISION_SCHEMAS = []  # keeps the torch.library fragment below alive (dropping it deregisters the ops)


def import_timm():
    """Imports timm, working around a broken torchvision next to the CPU build of torch.

    timm needs torchvision, whose PyPI Linux wheels are CUDA builds: next to the CPU torch their C++ ops do not
    load, and ``import torchvision`` then fails registering fake kernels for two of them ("operator
    torchvision::nms does not exist"). Classification models never call those ops, so on that error their
    schemas are declared (without kernels) and the import is retried.
    """
    try:
        import timm
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        import torch

        lib = torch.library.Library("torchvision", "FRAGMENT")
        for op in ("nms", "qnms"):
            lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _TORCHVISION_SCHEMAS.append(lib)
        for module in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "timm")]:
            del sys.modules[module]
        import timm
    return timm


def timm_available() -> tuple[bool, str]:
    try:
        import_timm()
    except Exception as e:  # ImportError, or a torch/torchvision mismatch that fails at import time
        return False, f"--compare timm skipped ({type(e).__name__}: {e}); install with: {TORCH_INSTALL_HINT}"
    return True, ""


def compare_timm(args) -> Runner | None:
    name = timm_name(args.model)
    if name is None:
        print(f"--compare timm skipped: {args.model} has no timm counterpart", file=sys.stderr)
        return None
    ok, message = timm_available()
    if not ok:
        print(message, file=sys.stderr)
        return None
    timm = import_timm()
    if not timm.is_model(name):
        print(f"--compare timm skipped: timm {timm.__version__} has no model {name!r}", file=sys.stderr)
        return None
    return timm_runner(args, name)


def benchmark_train(args: argparse.Namespace) -> dict:
    """Runs the training-step benchmark; returns the report as a dict (also printed, or dumped with --json)."""
    import jax
    import jax.numpy as jnp

    from nfjax.models import MODELS, list_models, onednn
    from nfjax.models.lowering import forced_lowering, on_devices, resolve_impl
    from nfjax.models.summary import abstract_model, count_macs

    if args.model not in MODELS:
        args.error(f"unknown model {args.model!r}; valid names: {', '.join(list_models())}")
    check_counts(args, ("batch", "image_size", "steps", "rounds"))
    if args.lowering == "onednn":
        try:
            onednn.require()
        except onednn.OnednnUnavailable as e:
            args.error(f"--lowering onednn: {e}")
    if args.compare == "timm" and args.torch_device == "cuda":
        try:
            import torch
        except ImportError:
            pass  # compare_timm says how to install it
        else:
            torch_device(args, torch)  # --torch-device cuda without a GPU fails here, before any compilation
    load_before = os.getloadavg()[0]
    dtype = {"dtype": jnp.bfloat16} if args.dtype == "bfloat16" else {}
    macs = count_macs(abstract_model(args.model, num_classes=1000, **dtype), args.image_size)
    step_gflop = (3 if args.step == "train" else 1) * 2 * macs * args.batch / 1e9
    runners = [jax_runner(args)]
    if args.compare == "timm":
        runners.append(compare_timm(args))
    runners = [runner for runner in runners if runner is not None]
    time_rounds(runners, args)
    rows = [_finish_row(runner.row(), args.batch, step_gflop) for runner in runners]
    with forced_lowering(None if args.lowering == "auto" else args.lowering):
        lowering = on_devices(resolve_impl, 1)("auto")  # the benchmark's step runs on one device
    report = dict(
        model=args.model,
        step=args.step,
        image_size=args.image_size,
        batch=args.batch,
        dtype=args.dtype,
        lowering=lowering,
        onednn=onednn.version() if lowering == "onednn" else None,
        huge_pages=allocator.status(),  # nfjax/allocator.py: set when this process started
        heap=allocator.heap_status(),
        steps=args.steps,
        rounds=args.rounds,
        warmup=args.warmup,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,  # the card (or 'cpu') that gave nfjax's numbers
        cores=cpu_cores(),
        load_avg_before=load_before,
        load_avg_after=os.getloadavg()[0],
        forward_gmacs_per_image=macs / 1e9,
        train_gflop_per_step=step_gflop,  # the timed step's FLOPs (the name predates --step eval)
        gemm_peak_gflop_per_s=gemm_peak() if jax.default_backend() == "cpu" else None,  # CPU: the ceiling
        rows=rows,
        nfjax_over_timm=rows[0]["img_per_s"] / rows[1]["img_per_s"] if len(rows) > 1 else None,
    )
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return report


def format_report(report: dict) -> str:
    lowering = {
        "split": "CPU lowerings",
        "onednn": f"CPU lowerings, oneDNN {report.get('onednn')} convolutions",
        "native": "native XLA ops",
    }[report["lowering"]]
    times_forward = "3x" if report["step"] == "train" else "1x"
    alternated = " (implementations alternated by round)" if report["rounds"] > 1 and len(report["rows"]) > 1 else ""
    lines = [
        f"{report['step']} step: {report['model']} {report['image_size']}px batch {report['batch']} "
        f"{report['dtype']}, {lowering}; {report['forward_gmacs_per_image']:.2f} GMACs/image forward, "
        f"{report['train_gflop_per_step']:.1f} GFLOP/step ({times_forward} forward); backend {report['backend']} "
        f"({report['device']}), "
        f"{report['cores']} cores, load average "
        f"{report['load_avg_before']:.2f} -> {report['load_avg_after']:.2f}; median of {report['rounds']} x "
        f"{report['steps']} steps{alternated} after {report['warmup']} warm-up",
        f"  {'implementation':<24} {'compile s':>10} {'step s':>9} {'CPU s':>8} {'img/s':>8} {'GFLOP/s':>9} "
        f"{'page faults':>12}",
    ]
    for row in report["rows"]:
        lines.append(
            f"  {row['impl']:<24} {row['compile_s']:10.1f} {row['step_s']:9.3f} {row['step_cpu_s']:8.2f} "
            f"{row['img_per_s']:8.2f} {row['gflop_per_s']:9.1f} {row['page_faults']:12d}"
        )
    if report["nfjax_over_timm"] is not None:
        lines.append(f"  nfjax / timm throughput: {report['nfjax_over_timm']:.2f}x")
    if report["gemm_peak_gflop_per_s"] is not None:
        lines.append(f"  dense fp32 matmul peak (2048^2, XLA, CPU): {report['gemm_peak_gflop_per_s']:.0f} GFLOP/s")
    lines.append(f"  huge pages for the process's large blocks: {report['huge_pages']}")
    lines.append(f"  malloc heap: {report['heap']}")
    nfjax = report["rows"][0]
    if "temp_gib" in nfjax:
        lines.append(
            f"  nfjax memory: XLA plan {nfjax['argument_gib']:.2f} GiB arguments + {nfjax['temp_gib']:.2f} GiB "
            f"temporaries; process peak resident {nfjax['peak_rss_gib']:.2f} GiB"
        )
    return "\n".join(lines)


def gemm_peak(size: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a jitted float32 [size, size] @ [size, size] matmul, median of ``repeats``: the machine's
    dense-GEMM ceiling through XLA, measured in the same process as the step."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision=jax.lax.Precision.HIGHEST))
    jax.block_until_ready(matmul(a, a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, a))
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times) / 1e9


def add_train_parser(subparsers) -> None:
    parser = subparsers.add_parser("train", help="training-step throughput (optionally next to PyTorch/timm)")
    parser.add_argument("--model", default="nfnet_f0", help="an nfjax model name (python -m nfjax.models lists)")
    parser.add_argument("--image-size", type=int, default=192)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--step", default="train", choices=["train", "eval"], help="which jitted step to time")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--rounds", type=int, default=1, help="rounds of --steps per implementation, alternated")
    parser.add_argument(
        "--lowering",
        default="auto",
        choices=["auto", "native", "split", "onednn"],
        help="nfjax op lowerings: split = the CPU forms (grouped convs per group, 1x1 convs as dots, max-pool "
        "gradient as masks, BatchNorm's closed-form backward), onednn = the same with every float32 convolution "
        "by oneDNN, native = XLA's ops; auto = onednn on a one-device CPU where oneDNN builds, else split on "
        "CPU, native elsewhere",
    )
    parser.add_argument("--compare", default=None, choices=["timm"], help="also time the PyTorch/timm step")
    parser.add_argument("--channels-last", action="store_true", help="PyTorch: channels-last memory format")
    parser.add_argument(
        "--torch-device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="PyTorch's device; auto = cuda when JAX runs on a GPU and PyTorch sees one, else cpu",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=benchmark_train, error=parser.error)
