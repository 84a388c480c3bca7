"""timm state dicts <-> nfjax weights, through one name table for every timm model nfjax reproduces exactly.

Each nfjax parameter (or BatchNorm statistic) maps to one timm tensor and one layout transform:

    conv     HWIO kernel        <-> OIHW weight         (permute 3, 2, 0, 1 / 2, 3, 1, 0)
    gain     WSConv gain (O,)   <-> (O, 1, 1, 1)
    linear   Dense (in, out)    <-> Linear (out, in)
    fc_conv  SE Dense (in, out) <-> 1x1 Conv2d (out, in, 1, 1)
    conv1d   ECA kernel (k,)    <-> Conv1d (1, 1, k)
    same     bias, scalar, BN scale/bias/mean/var

The tables below name a block's tensors relative to the block; block i of the flat nfjax list sits at timm's
``stages.{s}.{b}`` (NF models) or ``layer{s + 1}.{b}`` (BN ResNets), from the model's depths. The expected names
and shapes come from the abstract nfjax model (``nnx.eval_shape``: nothing is allocated).
"""

from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from nfjax.convert.errors import ConversionError, flatten, mismatch_message, unflatten

# timm's dm_nfnet_f*: DeepMind's layout with erf GELU, eps added to the variance (1e-5) and SE widths rounded
# to multiples of 8 (the same widths as DeepMind's at every zoo size).
DM_NFNET = dict(activation="gelu_exact", ws_eps_mode="add", ws_eps=1e-5, se_divisor=8)
# timm's nf_resnet*: PyTorch padding, avg-pool shortcuts, gamma folded into the convs, no SkipInit scalar.
NF_RESNET = dict(
    padding="symmetric", shortcut="avgpool", gamma_in_conv=True, skipinit=False, ws_eps_mode="add", ws_eps=1e-5
)

TIMM_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"dm_nfnet_f{i}": (f"nfnet_f{i}", DM_NFNET) for i in range(7)},
    "nfnet_l0": ("nfnet_l0", {}),
    "eca_nfnet_l0": ("eca_nfnet_l0", {}),
    "eca_nfnet_l1": ("eca_nfnet_l1", {}),
    "eca_nfnet_l2": ("eca_nfnet_l2", {}),
    **{f"nf_resnet{d}": (f"nf_resnet{d}", NF_RESNET) for d in (26, 50, 101)},
    "nf_seresnet50": ("nf_seresnet50", NF_RESNET | dict(se_ratio=1 / 16, se_divisor=8)),
    "nf_ecaresnet50": ("nf_resnet50", NF_RESNET | dict(attention="eca")),
    **{f"resnet{d}": (f"resnet{d}", {}) for d in (18, 34, 50, 101, 152)},
}

# Constructor arguments that change neither the parameters nor the inference function.
_TRAINING_ONLY = {
    "drop_rate",
    "stochdepth_rate",
    "dtype",
    "grouped_impl",
    "skipinit_gain",
    "bn_momentum",
    "bn_ghost_size",
    "zero_init_last",
}
# Arguments in which timm's dm_nfnet differs from DeepMind's layout without changing a parameter at the zoo's
# sizes: eps conventions (exactly compensated in the gains, see refold_gains) and SE width rounding.
_DM_NUMERICS = {"ws_eps", "ws_eps_mode", "se_divisor"}
# Every ScaledStdConv2d of the timm models above: eps 1e-5 added to the variance.
TIMM_WS_EPS = ("add", 1e-5)

_SHAPES = {
    "same": lambda s: tuple(s),
    "conv": lambda s: (s[3], s[2], s[0], s[1]),
    "gain": lambda s: (s[0], 1, 1, 1),
    "linear": lambda s: (s[1], s[0]),
    "fc_conv": lambda s: (s[1], s[0], 1, 1),
    "conv1d": lambda s: (1, 1, s[0]),
}
_TO_TIMM = {
    "same": lambda x: x,
    "conv": lambda x: x.transpose(3, 2, 0, 1),
    "gain": lambda x: x.reshape(-1, 1, 1, 1),
    "linear": lambda x: x.T,
    "fc_conv": lambda x: x.T[:, :, None, None],
    "conv1d": lambda x: x.reshape(1, 1, -1),
}
_TO_NFJAX = {
    "same": lambda x: x,
    "conv": lambda x: x.transpose(2, 3, 1, 0),
    "gain": lambda x: x.reshape(-1),
    "linear": lambda x: x.T,
    "fc_conv": lambda x: x[:, :, 0, 0].T,
    "conv1d": lambda x: x.reshape(-1),
}


def _ws_conv(nf: str, tm: str) -> dict[str, tuple[str, str]]:
    return {
        f"{nf}.kernel": (f"{tm}.weight", "conv"),
        f"{nf}.gain": (f"{tm}.gain", "gain"),
        f"{nf}.bias": (f"{tm}.bias", "same"),
    }


def _dense(nf: str, tm: str, transform: str) -> dict[str, tuple[str, str]]:
    return {f"{nf}.kernel": (f"{tm}.weight", transform), f"{nf}.bias": (f"{tm}.bias", "same")}


def _plain_conv(nf: str, tm: str) -> dict[str, tuple[str, str]]:
    return {f"{nf}.kernel": (f"{tm}.weight", "conv")}


def _batch_norm(nf: str, tm: str) -> dict[str, tuple[str, str]]:
    names = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
    return {f"{nf}.{a}": (f"{tm}.{b}", "same") for a, b in names.items()}


# nfjax name (relative to the model or to a block) -> (timm name, transform).
NF_BLOCK = {
    **_ws_conv("conv0", "conv1"),
    **_ws_conv("conv1", "conv2"),
    **_ws_conv("conv1b", "conv2b"),
    **_ws_conv("conv2", "conv3"),
    **_ws_conv("conv_shortcut", "downsample.conv"),
    **_dense("se.fc0", "attn_last.fc1", "fc_conv"),
    **_dense("se.fc1", "attn_last.fc2", "fc_conv"),
    "eca.kernel": ("attn_last.conv.weight", "conv1d"),
    "skip_gain": ("skipinit_gain", "same"),
}
NFNET_TOP = {
    **{k: v for i in range(8) for k, v in _ws_conv(f"stem.{i}", f"stem.conv{i + 1}").items()},
    **_ws_conv("final_conv", "final_conv"),
    **_dense("classifier", "head.fc", "linear"),
}
NF_RESNET_TOP = {**_ws_conv("stem_conv", "stem.conv"), **_dense("classifier", "head.fc", "linear")}
RESNET_BLOCK = {
    **{k: v for i in (1, 2, 3) for k, v in _plain_conv(f"conv{i}", f"conv{i}").items()},
    **{k: v for i in (1, 2, 3) for k, v in _batch_norm(f"bn{i}", f"bn{i}").items()},
    **_plain_conv("down_conv", "downsample.0"),
    **_batch_norm("down_bn", "downsample.1"),
}
RESNET_TOP = {
    **_plain_conv("stem_conv", "conv1"),
    **_batch_norm("stem_bn", "bn1"),
    **_dense("classifier", "fc", "linear"),
}
# model class name -> (top-level table, block table, timm block prefix)
LAYOUTS = {
    "NFNet": (NFNET_TOP, NF_BLOCK, "stages.{stage}.{index}"),
    "NFResNet": (NF_RESNET_TOP, NF_BLOCK, "stages.{stage}.{index}"),
    "ResNet": (RESNET_TOP, RESNET_BLOCK, "layer{stage_1}.{index}"),
}
CLASSIFIERS = ("head.fc", "fc")


def _model_class_and_kwargs(model_name: str, model_kwargs: Mapping | None) -> tuple[type, dict]:
    from nfjax.models import MODELS

    if model_name not in MODELS:
        raise ConversionError(f"unknown nfjax model {model_name!r}")
    cls, row, _ = MODELS[model_name]
    return cls, {**row, **(model_kwargs or {})}


def _block_prefixes(depths, pattern: str) -> list[str]:
    return [pattern.format(stage=s, stage_1=s + 1, index=b) for s, depth in enumerate(depths) for b in range(depth)]


def _abstract_weights(model_name: str, num_classes: int, model_kwargs: Mapping | None) -> dict[str, dict]:
    from flax import nnx

    from nfjax.models import create_model

    module = nnx.eval_shape(lambda: create_model(model_name, num_classes, rngs=nnx.Rngs(0), **dict(model_kwargs or {})))
    return {
        "params": nnx.to_pure_dict(nnx.state(module, nnx.Param)),
        "batch_stats": nnx.to_pure_dict(nnx.state(module, nnx.BatchStat)),
    }


def name_table(model_name: str, model_kwargs: Mapping | None, num_classes: int) -> dict[tuple, tuple[str, str, tuple]]:
    """(collection, *nfjax path) -> (timm name, transform, nfjax shape) for every tensor of the model."""
    cls, kwargs = _model_class_and_kwargs(model_name, model_kwargs)
    top, block, pattern = LAYOUTS[cls.__name__]
    prefixes = _block_prefixes(kwargs["depths"], pattern)
    table = {}
    for collection, tree in _abstract_weights(model_name, num_classes, model_kwargs).items():
        for path, leaf in flatten(tree).items():
            name = ".".join(str(p) for p in path)
            if path[0] == "blocks":
                timm_name, transform = block[".".join(str(p) for p in path[2:])]
                timm_name = f"{prefixes[path[1]]}.{timm_name}"
            else:
                timm_name, transform = top[name]
            table[(collection, *path)] = (timm_name, transform, tuple(leaf.shape))
    return table


def _ws_scale(kernel: np.ndarray, mode: str, eps: float) -> np.ndarray:
    """Per output channel, what weight standardization multiplies (w - mean) by (before the gain), float64."""
    w = np.asarray(kernel, np.float64).reshape(-1, kernel.shape[-1])
    fan_in, var = w.shape[0], w.var(axis=0)
    return 1 / np.sqrt(np.maximum(var * fan_in, eps)) if mode == "floor" else 1 / np.sqrt(fan_in * (var + eps))


def refold_gains(params: Mapping, source: tuple[str, float], target: tuple[str, float]) -> dict:
    """nfjax params whose WSConvs compute, under eps convention ``target`` ((mode, eps)), the standardized
    kernels they computed under ``source``: each gain times scale_source / scale_target (same raw kernels).
    Makes a DeepMind-layout model (eps floored at 1e-4) and timm's (eps 1e-5 added) the same function."""
    flat = dict(flatten(params))
    if tuple(source) == tuple(target):
        return unflatten(flat)
    for path, gain in flat.items():
        if path[-1] == "gain":
            kernel = flat[path[:-1] + ("kernel",)]
            factor = _ws_scale(kernel, *source) / _ws_scale(kernel, *target)
            flat[path] = (np.asarray(gain, np.float64) * factor).astype(np.float32)
    return unflatten(flat)


def _ws_eps(model_name: str, model_kwargs: Mapping | None) -> tuple[str, float] | None:
    """(ws_eps_mode, ws_eps) of a weight-standardized model, None for the BN ResNet."""
    resolved = _resolved(model_name, model_kwargs)[1]
    return (resolved["ws_eps_mode"], resolved["ws_eps"]) if "ws_eps_mode" in resolved else None


def _timm_shapes(table: Mapping) -> dict[str, tuple]:
    return {name: _SHAPES[transform](shape) for name, transform, shape in table.values()}


def _num_classes(state_dict: Mapping[str, np.ndarray]) -> int | None:
    for name in CLASSIFIERS:
        if f"{name}.bias" in state_dict:
            return int(np.shape(state_dict[f"{name}.bias"])[0])
    return None


def _tensors(state_dict: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The state dict without BatchNorm's step counters (nfjax keeps none)."""
    return {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def _depths(names, family_prefix: str) -> tuple[int, ...]:
    """Blocks per stage, counted from names like ``stages.2.5.conv1.weight`` / ``layer3.5.conv1.weight``."""
    counts: dict[int, int] = {}
    for name in names:
        parts = name.split(".")
        if family_prefix == "stages" and parts[0] == "stages" and len(parts) > 2:
            stage, index = int(parts[1]), int(parts[2])
        elif family_prefix == "layer" and parts[0].startswith("layer") and parts[0][5:].isdigit() and len(parts) > 1:
            stage, index = int(parts[0][5:]) - 1, int(parts[1])
        else:
            continue
        counts[stage] = max(counts.get(stage, 0), index + 1)
    return tuple(counts[s] for s in sorted(counts))


@functools.lru_cache(maxsize=32)
def _expected_shapes(timm_name: str, num_classes: int) -> dict[str, tuple]:
    model_name, overrides = TIMM_MODELS[timm_name]
    return _timm_shapes(name_table(model_name, overrides, num_classes))


def detect_timm_model(state_dict: Mapping[str, np.ndarray]) -> str | None:
    """The timm model (a key of TIMM_MODELS) whose names and shapes the state dict holds exactly, or None."""
    tensors = _tensors(state_dict)
    classes = _num_classes(tensors)
    if classes is None:
        return None
    shapes = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    for timm_name, (model_name, overrides) in TIMM_MODELS.items():
        cls, kwargs = _model_class_and_kwargs(model_name, overrides)
        prefix = "layer" if LAYOUTS[cls.__name__][2].startswith("layer") else "stages"
        if tuple(kwargs["depths"]) != _depths(shapes, prefix):
            continue  # cheap filter before building the abstract model
        if _expected_shapes(timm_name, classes) == shapes:
            return timm_name
    return None


def _mismatch(given: Mapping[str, tuple], expected: Mapping[str, tuple]) -> tuple[list, list, list]:
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    common = sorted(set(given) & set(expected))
    wrong = [f"{k} {given[k]} (expected {expected[k]})" for k in common if given[k] != expected[k]]
    return missing, unexpected, wrong


def timm_to_nfjax(
    state_dict: Mapping[str, np.ndarray], timm_name: str, *, model_kwargs: dict | None = None
) -> tuple[dict, int]:
    """A timm state dict -> ({'params': ..., 'batch_stats': ... (BN models only)}, num_classes).

    The weights are pure dicts shaped like ``nnx.to_pure_dict(nnx.state(model, nnx.Param))`` (float32 NumPy)
    of ``create_model(TIMM_MODELS[timm_name][0], num_classes, **overrides, **model_kwargs)``; the class count is
    the classifier's. Every tensor must be used and every nfjax tensor found with its shape, otherwise
    ConversionError names each missing, unexpected and mis-shaped tensor (and the model the file looks like).
    ``model_kwargs`` with another weight-standardization eps (e.g. DeepMind's floor 1e-4) get gains refolded
    so the convolutions compute what timm's did (:func:`refold_gains`).
    """
    if timm_name not in TIMM_MODELS:
        raise ConversionError(f"unknown timm model {timm_name!r}; nfjax converts: {', '.join(sorted(TIMM_MODELS))}")
    tensors = _tensors(state_dict)
    classes = _num_classes(tensors)
    if classes is None:
        raise ConversionError(
            f"the file has no classifier ({' or '.join(c + '.weight' for c in CLASSIFIERS)}): it is not a timm "
            f"{timm_name} state dict"
        )
    model_name, overrides = TIMM_MODELS[timm_name]
    table = name_table(model_name, {**overrides, **(model_kwargs or {})}, classes)
    given = {k: tuple(np.shape(v)) for k, v in tensors.items()}
    missing, unexpected, wrong = _mismatch(given, _timm_shapes(table))
    if missing or unexpected or wrong:
        message = f"{mismatch_message(missing, unexpected, wrong)} for timm's {timm_name}"
        found = detect_timm_model(state_dict)
        if found is not None and found != timm_name:
            message += f"; the file looks like timm's {found}: use --model {found}"
        elif model_kwargs:
            message += f" with model_kwargs {json.dumps(model_kwargs)}"
        raise ConversionError(message)
    flat = {}
    for path, (name, transform, _) in table.items():
        flat[path] = np.array(_TO_NFJAX[transform](np.asarray(tensors[name], np.float32)), order="C")
    weights = unflatten(flat)
    if not weights.get("batch_stats"):
        weights.pop("batch_stats", None)
    eps = _ws_eps(model_name, {**overrides, **(model_kwargs or {})})
    if eps is not None:
        weights["params"] = refold_gains(weights["params"], TIMM_WS_EPS, eps)
    return weights, classes


def nfjax_to_timm(weights: Mapping, model_name: str, model_kwargs: Mapping | None, num_classes: int) -> dict:
    """nfjax weights ({'params', 'batch_stats'}) of ``create_model(model_name, num_classes, **model_kwargs)``
    -> a timm state dict (torch layouts, float32; BatchNorm ``num_batches_tracked`` int64 0) that loads into the
    timm model :func:`timm_name_for` names with ``strict=True``. A model with DeepMind's eps convention gets its
    gains refolded for timm's (:func:`refold_gains`); timm layouts convert exactly."""
    table = name_table(model_name, model_kwargs, num_classes)
    given = {}
    for collection in ("params", "batch_stats"):
        given.update({(collection, *p): v for p, v in flatten(weights.get(collection) or {}).items()})
    shown = lambda path: "/".join(str(p) for p in path)  # noqa: E731
    missing, unexpected, wrong = _mismatch(
        {shown(p): tuple(np.shape(v)) for p, v in given.items()}, {shown(p): s for p, (_, _, s) in table.items()}
    )
    if missing or unexpected or wrong:
        raise ConversionError(f"the weights do not match {model_name}: " + mismatch_message(missing, unexpected, wrong))
    eps = _ws_eps(model_name, model_kwargs)
    if eps is not None:
        params = refold_gains(weights["params"], eps, TIMM_WS_EPS)
        given.update({("params", *p): v for p, v in flatten(params).items()})
    out = {}
    for path, (name, transform, _) in table.items():
        out[name] = np.array(_TO_TIMM[transform](np.asarray(given[path], np.float32)), order="C")
        if name.endswith(".running_mean"):
            out[name.removesuffix("running_mean") + "num_batches_tracked"] = np.zeros((), np.int64)
    return out


def _resolved(model_name: str, model_kwargs: Mapping | None) -> tuple[str, dict]:
    """(class name, every constructor argument that shapes the inference function), JSON-normalized."""
    cls, kwargs = _model_class_and_kwargs(model_name, model_kwargs)
    params = inspect.signature(cls.__init__).parameters
    full = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    full.update(kwargs)
    full = {k: v for k, v in full.items() if k not in _TRAINING_ONLY | {"num_classes"}}
    return cls.__name__, json.loads(json.dumps(full, default=str))


def _dm_tolerant(resolved: dict) -> dict:
    out = {k: v for k, v in resolved.items() if k not in _DM_NUMERICS}
    if out.get("activation") == "gelu":
        out["activation"] = "gelu_exact"
    return out


def timm_name_for(model_name: str, model_kwargs: Mapping | None) -> str | None:
    """The timm model that runs the weights of nfjax ``model_name`` built with ``model_kwargs``, or None.

    Exact layouts match exactly. An nfjax NFNet in DeepMind's layout also maps to timm's ``dm_nfnet_f*``: its
    eps convention (floored at 1e-4, timm adds 1e-5) is compensated exactly in the exported gains, its tanh GELU
    becomes timm's erf GELU (the approximation timm makes for DeepMind's own release; logits move by about
    3e-4 of their scale).
    """
    try:
        target = _resolved(model_name, model_kwargs)
    except (ConversionError, TypeError):
        return None
    for timm_name, (name, overrides) in TIMM_MODELS.items():
        if _resolved(name, overrides) == target:
            return timm_name
    for timm_name, (name, overrides) in TIMM_MODELS.items():
        cls, candidate = _resolved(name, overrides)
        if timm_name.startswith("dm_") and cls == target[0] and _dm_tolerant(candidate) == _dm_tolerant(target[1]):
            return timm_name
    return None
