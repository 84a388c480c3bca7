"""Train-state memory per device: ``python -m nfjax.benchmark memory --model nfnet_f7 --fsdp 8``.

For each model, the bytes one device holds of the train state (params, EMA, optimizer state, BN statistics, step
and counters) under plain data parallelism (``train.fsdp=1``: every leaf replicated) and under FSDP with
``train.fsdp=F`` (large leaves split over the ``fsdp`` axis, :func:`nfjax.parallel.param_sharding`). Computed from
the abstract state of the experiment (``jax.eval_shape`` of its init, the optimizer as the config builds it) and
each leaf's shard shape on an ``AbstractMesh``: nothing is allocated and no accelerator is needed, so F7 is
reported on any CPU. The data axis does not change what a device holds, so only ``F`` is asked for. Activations,
gradients and the weights gathered for the layer being computed come on top and are not counted.
"""

from __future__ import annotations

import argparse
import json
import math

GIB = 2**30
PARTS = ("params", "ema", "opt_state", "other")  # 'other': batch_stats, step, plateau


def state_bytes(abstract: dict, shardings: dict) -> dict[str, int]:
    """Bytes per device of each part of a train state: ``abstract`` (ShapeDtypeStructs) laid out as ``shardings``
    (one NamedSharding per leaf); a leaf costs ``prod(shard_shape) * itemsize``."""
    import jax

    out = dict.fromkeys(PARTS, 0)
    for key, tree in abstract.items():
        leaves = zip(jax.tree.leaves(tree), jax.tree.leaves(shardings[key]), strict=True)
        size = sum(math.prod(s.shard_shape(x.shape)) * x.dtype.itemsize for x, s in leaves)
        out[key if key in out else "other"] += size
    return out


def abstract_experiment(model: str, fsdp: int, optimizer: str, ema: bool):
    """An :class:`nfjax.experiment.Experiment` of ``model`` (1000 classes, the default ``optim`` section with
    ``optim.name=optimizer``) on an abstract ``(1, fsdp)`` mesh (``(1,)`` for fsdp 1): shapes and shardings only."""
    from jax.sharding import AbstractMesh

    from nfjax import parallel
    from nfjax.config_lib import base_config
    from nfjax.data import DatasetInfo
    from nfjax.experiment import Experiment

    cfg = base_config(model)
    cfg.optim.update(name=optimizer, ema_decay=cfg.optim.ema_decay if ema else 0.0)
    cfg.train.update(total_steps=0, fsdp=fsdp)  # the schedule (epochs x examples / batch) is irrelevant here
    axes = (parallel.DATA_AXIS,) if fsdp == 1 else (parallel.DATA_AXIS, parallel.FSDP_AXIS)
    mesh = AbstractMesh((1,) * (len(axes) - 1) + (fsdp,), axes)
    info = DatasetInfo(100 * cfg.train.global_batch, 0, 1000, (224, 224, 3), ())
    return Experiment(cfg, info, mesh)


def model_memory(model: str, fsdp: int, optimizer: str = "sgd", ema: bool = True) -> dict:
    """One row: parameter count, and bytes per device by part under plain DP (``dp``) and FSDP (``fsdp``)."""
    import jax

    rows = {}
    for name, size in (("dp", 1), ("fsdp", fsdp)):
        spec = abstract_experiment(model, size, optimizer, ema).state_spec
        rows[name] = state_bytes(spec.abstract, spec.shardings)
    params = sum(math.prod(x.shape) for x in jax.tree.leaves(spec.abstract["params"]))
    dp, sharded = sum(rows["dp"].values()), sum(rows["fsdp"].values())
    return dict(model=model, params=params, dp=rows["dp"], fsdp=rows["fsdp"], saved=1 - sharded / dp)


def memory_report(models: list[str], fsdp: int, optimizer: str = "sgd", ema: bool = True) -> dict:
    from nfjax import parallel

    rows = [model_memory(m, fsdp, optimizer, ema) for m in models]
    return dict(fsdp=fsdp, optimizer=optimizer, ema=ema, min_shard_size=parallel.FSDP_MIN_SIZE, rows=rows)


def format_memory_report(report: dict) -> str:
    """A Markdown table, GiB per device (float32 state)."""
    f = report["fsdp"]
    gib = lambda n: f"{n / GIB:.2f}"
    lines = [
        f"train state per device, GiB: plain data parallel (fsdp=1) vs fsdp={f}; optimizer {report['optimizer']}, "
        f"EMA {'on' if report['ema'] else 'off'}; leaves under {report['min_shard_size']} elements replicated",
        "",
        f"| model | params (M) | params | EMA | optimizer state | total, fsdp=1 | total, fsdp={f} | saved |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["rows"]:
        dp, sharded = r["dp"], r["fsdp"]
        parts = " | ".join(f"{gib(dp[k])} -> {gib(sharded[k])}" for k in ("params", "ema", "opt_state"))
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.1f} | {parts} | {gib(sum(dp.values()))} | "
            f"{gib(sum(sharded.values()))} | {100 * r['saved']:.1f}% |"
        )
    return "\n".join(lines)


def benchmark_memory(args: argparse.Namespace) -> dict:
    from nfjax.models import MODELS, list_models

    unknown = [m for m in args.model if m not in MODELS]
    if unknown:
        args.error(f"unknown model {unknown[0]!r}; valid names: {', '.join(list_models())}")
    if args.fsdp < 1:
        args.error("--fsdp must be at least 1")
    report = memory_report(args.model, args.fsdp, args.optimizer, not args.no_ema)
    print(json.dumps(report, indent=2) if args.json else format_memory_report(report))
    return report


def add_memory_parser(subparsers) -> None:
    parser = subparsers.add_parser("memory", help="train-state bytes per device, data parallel vs FSDP (no compute)")
    parser.add_argument("--model", nargs="+", default=["nfnet_f7"], help="one or more nfjax model names")
    parser.add_argument("--fsdp", type=int, default=8, help="size of the fsdp mesh axis (train.fsdp)")
    parser.add_argument("--optimizer", default="sgd", choices=["sgd", "lamb", "adamw"], help="optim.name")
    parser.add_argument("--no-ema", action="store_true", help="without the parameter EMA (optim.ema_decay=0)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.set_defaults(run=benchmark_memory, error=parser.error)
