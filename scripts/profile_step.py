"""Where a training step's time goes on this machine: per phase and per op kind, for one model.

    python scripts/profile_step.py --model nf_resnet50 --image-size 224 --batch 8 [--lowering native split]

Phases (each jitted alone, median of ``--repeats`` after one warm-up run): the forward in training mode with
the loss, forward + backward (value_and_grad), the whole train step (+ optimizer, metrics, non-finite guard),
the optimizer alone, and the eval step. Ops: every convolution, BatchNorm, max pool and weight
standardization the forward calls is recorded with its shapes (by tracing the model once), each distinct shape
is timed alone forward and forward + backward, and the times are summed over the network by kind: stem (the
convolutions before the first block), 1x1, 3x3, grouped 3x3, strided 1x1 shortcuts. The op sums leave out
what runs between the ops (activations, residual adds, squeeze-excite, pooling to the head): the remainder of
the forward + backward phase. Every lowering given is profiled in the same run, one after the other (not
alternated: compare them as a rough guide; ``--ablation`` alternates whole steps).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def timed(fn, *args, repeats: int) -> float:
    """Median seconds of ``fn(*args)`` (blocked until ready) after one untimed call."""
    import jax

    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


@contextlib.contextmanager
def recording():
    """Patches the layer functions the models call so one trace records every op and its shapes."""
    from nfjax.models import batchnorm, layers

    ops: list[tuple] = []
    saved = {name: getattr(layers, name) for name in ("conv2d", "max_pool_3x3_s2", "standardize_kernel")}
    saved_bn = batchnorm.BatchNorm.__call__

    def conv2d(x, kernel, strides=(1, 1), padding="SAME", groups=1, impl="auto"):
        padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        ops.append(("conv", x.shape, kernel.shape, tuple(strides), padding, groups))
        return saved["conv2d"](x, kernel, strides, padding, groups, impl)

    def max_pool(x, padding="SAME", impl="auto"):
        padding = padding if isinstance(padding, str) else tuple(tuple(p) for p in padding)
        ops.append(("max_pool", x.shape, padding))
        return saved["max_pool_3x3_s2"](x, padding, impl)

    def standardize(kernel, *args, **kwargs):
        ops.append(("weight_standardization", kernel.shape))
        return saved["standardize_kernel"](kernel, *args, **kwargs)

    def batch_norm(self, x, train=False):
        ops.append(("batch_norm", x.shape, self.ghost_batch_size))
        return saved_bn(self, x, train)

    layers.conv2d, layers.max_pool_3x3_s2, layers.standardize_kernel = conv2d, max_pool, standardize
    batchnorm.BatchNorm.__call__ = batch_norm
    try:
        yield ops
    finally:
        for name, fn in saved.items():
            setattr(layers, name, fn)
        batchnorm.BatchNorm.__call__ = saved_bn


def conv_kind(op: tuple, first_block_conv: int, index: int) -> str:
    _, x_shape, k_shape, strides, _, groups = op
    if index < first_block_conv:
        return "stem convs"
    if groups > 1:
        return f"grouped {k_shape[0]}x{k_shape[1]} convs"
    if k_shape[:2] == (1, 1):
        return "1x1 convs" if strides == (1, 1) else "strided 1x1 convs (shortcuts)"
    return f"{k_shape[0]}x{k_shape[1]} convs" + ("" if strides == (1, 1) else " (strided)")


def op_functions(op: tuple):
    """(forward fn, forward+backward fn, example args) for one recorded op."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from nfjax.models import batchnorm, layers

    key = jax.random.key(0)
    kind = op[0]
    if kind == "conv":
        _, x_shape, k_shape, strides, padding, groups = op
        args = (jax.random.normal(key, x_shape), jax.random.normal(key, k_shape))
        fwd = lambda x, k: layers.conv2d(x, k, strides, padding, groups)
        argnums = (0, 1)
    elif kind == "max_pool":
        args = (jax.nn.relu(jax.random.normal(key, op[1])),)
        fwd = lambda x: layers.max_pool_3x3_s2(x, op[2])
        argnums = (0,)
    elif kind == "batch_norm":
        bn = batchnorm.BatchNorm(op[1][-1], ghost_batch_size=op[2])
        graphdef, state = nnx.split(bn)
        args = (jax.random.normal(key, op[1]), state)
        fwd = lambda x, s: nnx.merge(graphdef, s)(x, train=True)
        argnums = (0, 1)  # the state too, so the running statistics are updated at the gradient's trace level
    else:
        args = (jax.random.normal(key, op[1]), jnp.ones(op[1][-1:]))
        fwd = lambda w, g: layers.standardize_kernel(w, g)
        argnums = (0, 1)
    both = jax.grad(lambda *a: jnp.sum(jnp.sin(fwd(*a))), argnums=argnums)
    return jax.jit(fwd), jax.jit(both), args


def profile_ops(ops: list[tuple], first_block_conv: int, repeats: int) -> dict[str, list[float]]:
    """{kind: [count, forward s, forward+backward s]} summed over the network (each distinct op timed once)."""
    cache: dict[tuple, tuple[float, float]] = {}
    totals: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0, 0.0])
    conv_index = 0
    for op in ops:
        if op not in cache:
            fwd, both, args = op_functions(op)
            cache[op] = (timed(fwd, *args, repeats=repeats), timed(both, *args, repeats=repeats))
        if op[0] == "conv":
            kind, conv_index = conv_kind(op, first_block_conv, conv_index), conv_index + 1
        else:
            kind = op[0].replace("_", " ")
        row = totals[kind]
        row[0] += 1
        row[1] += cache[op][0]
        row[2] += cache[op][1]
    return dict(totals)


def conv_flops(ops: list[tuple]) -> float:
    """Forward FLOPs of the recorded convolutions (2 per multiply-add)."""
    total = 0.0
    for op in ops:
        if op[0] == "conv":
            _, x_shape, k_shape, strides, _, _ = op
            out_hw = math.ceil(x_shape[1] / strides[0]) * math.ceil(x_shape[2] / strides[1])
            total += 2 * x_shape[0] * out_hw * math.prod(k_shape)
    return total


def record_ops(exp, state, batch) -> tuple[list[tuple], int]:
    """Every op of one training-mode forward with its shapes, and the index of the first convolution inside a
    residual block (the ones before it are the stem's)."""
    import jax

    from nfjax.models import network
    from nfjax.steps import apply_model

    saved_blocks = network.blocks_and_head
    marker: list[int] = []

    def blocks_and_head(model, x, **kwargs):
        marker.append(sum(op[0] == "conv" for op in ops))
        return saved_blocks(model, x, **kwargs)

    network.blocks_and_head = blocks_and_head
    try:
        with recording() as ops:
            forward = lambda p, s, x: apply_model(exp.graphdef, p, s, x, train=True, key=jax.random.key(0))
            jax.eval_shape(forward, state["params"], state.get("batch_stats", {}), batch["image"])
    finally:
        network.blocks_and_head = saved_blocks
    return ops, marker[0]


def undonated_train_step(exp, eigen_convs: bool = True):
    """The train step ``nfjax.train`` runs, jitted without donating the state, so it can run repeatedly. With
    ``eigen_convs`` it gets the compiler options the trainer's step gets (:func:`lowering.compiler_options`)."""
    import jax

    from nfjax.losses import make_loss_fn
    from nfjax.models import lowering
    from nfjax.steps import make_train_step

    step = make_train_step(exp.graphdef, exp.optimizer, make_loss_fn("softmax_xent"), seed=0, mesh=exp.mesh)
    return jax.jit(step, compiler_options=lowering.compiler_options() if eigen_convs else None)


def phase_functions(exp, state, batch) -> dict:
    """{phase: (jitted fn, args)}: forward with loss, forward + backward, optimizer, train step, eval step."""
    import jax
    import jax.numpy as jnp

    from nfjax.losses import make_loss_fn
    from nfjax.steps import apply_model

    stats = state.get("batch_stats", {})
    key = jax.random.key(0)
    xent = make_loss_fn("softmax_xent")

    def loss(params):
        logits, _ = apply_model(exp.graphdef, params, stats, batch["image"], train=True, key=key)
        return jnp.mean(xent(logits, batch["label"]))

    grads = jax.jit(jax.grad(loss))(state["params"])
    weights = exp.inference_weights(state["params"], stats)  # as evaluation runs it
    eval_step = exp.tta_eval_step("none", False, exp.prestandardized)
    return {
        "forward (train mode) + loss": (jax.jit(loss), (state["params"],)),
        "forward + backward": (jax.jit(jax.value_and_grad(loss)), (state["params"],)),
        "optimizer (AGC, decay, SGD-Nesterov)": (jax.jit(exp.optimizer.apply), (state, grads)),
        "whole train step": (undonated_train_step(exp), (state, batch)),
        "eval step (inference forward)": (eval_step, (weights, stats, batch)),
    }


def profile(args, lowering: str) -> dict:
    from nfjax.benchmark_train import build_benchmark_experiment
    from nfjax.models.lowering import forced_lowering

    with forced_lowering(lowering):
        exp, state, batch = build_benchmark_experiment(args.model, args.image_size, args.batch)
        ops, first_block = record_ops(exp, state, batch)
        phases = {
            name: timed(fn, *fn_args, repeats=args.repeats)
            for name, (fn, fn_args) in phase_functions(exp, state, batch).items()
        }
        kinds = profile_ops(ops, first_block, args.repeats)
    return dict(phases=phases, kinds=kinds, conv_gflop=conv_flops(ops) / 1e9)


@contextlib.contextmanager
def only_lowerings(kinds: set[str]):
    """Forces the CPU lowerings, then puts XLA's own op back for every kind not in ``kinds`` (of 'grouped',
    'pointwise', 'max_pool', 'batch_norm', 'weight_std'), so one lowering's effect on the whole step can be
    measured. The kind 'eigen_convs' (XLA's Eigen convolutions instead of YNNPACK) is a compiler option: see
    :func:`ablation`."""
    import jax

    from nfjax.models import layers, lowering

    saved = dict(
        conv2d=layers.conv2d,
        pointwise=lowering.pointwise_conv,
        pool=lowering._max_pool_slices,
        bn=lowering.batch_norm_train,
        ws=lowering.standardize_kernel,
    )

    def conv2d(x, kernel, strides=(1, 1), padding="SAME", groups=1, impl="auto"):
        native = groups > 1 and "grouped" not in kinds
        return saved["conv2d"](x, kernel, strides, padding, groups, "native" if native else impl)

    def pointwise(x, kernel, strides=(1, 1)):
        return lowering.conv2d(x, kernel, strides, "VALID", impl="native")

    def pool(x, pads_h, pads_w):
        return lowering.max_pool_3x3_s2(x, (pads_h, pads_w), impl="native")

    def batch_norm(x, scale, bias, eps):  # the plain form, differentiated by JAX
        mean, var = lowering.batch_norm_stats(x)
        y = (x - mean) * jax.lax.rsqrt(var + eps) * scale + bias
        return y, jax.lax.stop_gradient(mean), jax.lax.stop_gradient(var)

    layers.conv2d = conv2d
    if "weight_std" not in kinds:
        lowering.standardize_kernel = lowering.standardize_plain  # differentiated by JAX
    if "pointwise" not in kinds:
        lowering.pointwise_conv = pointwise
    if "max_pool" not in kinds:
        lowering._max_pool_slices = pool
    if "batch_norm" not in kinds:
        lowering.batch_norm_train = batch_norm
    try:
        with lowering.forced_lowering("split"):
            yield
    finally:
        layers.conv2d, lowering.pointwise_conv = saved["conv2d"], saved["pointwise"]
        lowering._max_pool_slices, lowering.batch_norm_train = saved["pool"], saved["bn"]
        lowering.standardize_kernel = saved["ws"]


ABLATIONS = {
    "XLA's ops": set(),
    "+ grouped split": {"grouped"},
    "+ 1x1 as dots": {"pointwise"},
    "+ max-pool gradient": {"max_pool"},
    "+ BatchNorm backward": {"batch_norm"},
    "+ Eigen convolutions": {"eigen_convs"},
    "+ weight standardization backward": {"weight_std"},
    "all CPU lowerings": {"grouped", "pointwise", "max_pool", "batch_norm", "eigen_convs", "weight_std"},
    "all but the weight standardization backward": {"grouped", "pointwise", "max_pool", "batch_norm", "eigen_convs"},
}


def ablation(args) -> None:
    """Times the whole train step with each CPU lowering alone, alternated over ``repeats`` rounds."""
    import jax

    from nfjax.benchmark_train import build_benchmark_experiment

    exp, state, batch = build_benchmark_experiment(args.model, args.image_size, args.batch)
    compiled, times = {}, collections.defaultdict(list)
    for name in args.ablation:
        with only_lowerings(ABLATIONS[name]):
            step = undonated_train_step(exp, eigen_convs="eigen_convs" in ABLATIONS[name])
            compiled[name] = step.lower(state, batch).compile()
        jax.block_until_ready(compiled[name](state, batch))
        print(f"  compiled: {name}", file=sys.stderr, flush=True)
    for _ in range(args.repeats):
        for name, fn in compiled.items():
            for _ in range(2):
                start = time.perf_counter()
                jax.block_until_ready(fn(state, batch))
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times[args.ablation[0]])
    print(f"| {args.model} {args.image_size}px batch {args.batch}: train step | ms | speed-up |")
    for name in args.ablation:
        median = statistics.median(times[name])
        print(f"| {name} | {median * 1e3:.0f} | {base / median:.2f}x |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="nf_resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lowering", nargs="+", default=["native", "split"], choices=["native", "split"])
    parser.add_argument(
        "--ablation", nargs="+", choices=list(ABLATIONS), help="instead: the whole step with each lowering alone"
    )
    args = parser.parse_args(argv)
    if args.ablation:
        ablation(args)
        return 0
    results = {lowering: profile(args, lowering) for lowering in args.lowering}
    print(f"{args.model} {args.image_size}px batch {args.batch}, float32, ms (median of {args.repeats})")
    header = " | ".join(args.lowering)
    print(f"| phase | {header} |")
    for phase in next(iter(results.values()))["phases"]:
        print(f"| {phase} | " + " | ".join(f"{r['phases'][phase] * 1e3:.0f}" for r in results.values()) + " |")
    print("| op kind (count) | " + " | ".join(f"{lw} fwd / fwd+bwd" for lw in args.lowering) + " |")
    kinds = sorted({k for r in results.values() for k in r["kinds"]})
    for kind in kinds:
        cells = []
        for r in results.values():
            count, fwd, both = r["kinds"].get(kind, (0, 0.0, 0.0))
            cells.append(f"{fwd * 1e3:.0f} / {both * 1e3:.0f}")
        count = next(r["kinds"][kind][0] for r in results.values() if kind in r["kinds"])
        print(f"| {kind} ({count}) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
