"""Starting a run from the weights of another (fine-tuning): the ``model.init_from`` part of the model section.

A source is a folder laid out like a training run's workdir, ``DIR/checkpoints/<step>/`` written by
:class:`nfjax.checkpoint.Checkpointer`: a run's ``--workdir``, or a folder written by ``python -m nfjax.convert``.
The run starts from the source's newest readable checkpoint: its params (or their EMA) and its BatchNorm running
statistics; the optimizer state, the EMA and the step start fresh. The source's model must be the run's model:
only the classifier (the top-level ``classifier`` subtree of the params) may differ, and it is re-initialised
when the class counts differ (``model.reset_classifier='auto'``)::

    settings = init_settings(cfg.model)                    # validated once; None without model.init_from
    source = describe_source(settings, identity, trees)     # reads the meta only; refuses another model
    step, weights = read_source(source, mesh)              # the arrays, restored into the run's shardings
    params, stats = start_weights(fresh, stats, weights, source)   # inside the jitted state init
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from nfjax import parallel
from nfjax.checkpoint import FORMAT, Checkpointer, abstract_like
from nfjax.clipping import param_path
from nfjax.models import MODELS, create_model
from nfjax.optim import HEAD

INIT_WEIGHTS = ("auto", "params", "ema")
# Constructor arguments that change how the model trains, not its parameters: free to differ from the source.
TRAINING_ONLY_KWARGS = ("drop_rate", "stochdepth_rate", "dtype")
LISTED = 4  # differing tensors named in an error, per kind


class InitFromError(ValueError):
    """The source of ``model.init_from`` cannot start this run; the message says what differs and what to do."""


@dataclasses.dataclass(frozen=True)
class InitSettings:
    """The validated ``model.init_from`` / ``init_weights`` / ``reset_classifier`` fields."""

    directory: str  # absolute path of the source folder
    weights: str  # 'auto' | 'params' | 'ema'
    reset_classifier: str | bool  # 'auto' | True | False


@dataclasses.dataclass(frozen=True)
class Source:
    """A checked source: what will be loaded from it, decided from its newest checkpoint's meta."""

    directory: str
    meta: dict[str, Any]  # model, model_kwargs, num_classes, in_channels, weights (the trees it holds), ...
    tree: str  # the tree the run's params start from: 'params' | 'ema'
    reset_head: bool  # the run's classifier is its own fresh init, not the source's


def _reset_value(value: Any) -> str | bool:
    """'auto', True or False; the strings 'true'/'false' (command line) are booleans."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value is True or value is False or value == "auto":
        return value
    raise ValueError(f"model.reset_classifier={value!r} is invalid: valid values are 'auto', true, false")


def init_settings(model_cfg: ml_collections.ConfigDict) -> InitSettings | None:
    """Validates the model section's init fields (configs saved before they existed read as their defaults);
    None when the run starts from random weights."""
    weights = model_cfg.get("init_weights", "auto")
    if weights not in INIT_WEIGHTS:
        valid = ", ".join(map(repr, INIT_WEIGHTS))
        raise ValueError(f"model.init_weights={weights!r} is invalid: valid values are {valid}")
    reset = _reset_value(model_cfg.get("reset_classifier", "auto"))
    directory = model_cfg.get("init_from")
    if not directory:
        return None
    return InitSettings(os.path.abspath(os.path.expanduser(directory)), weights, reset)


# ------------------------------------------------------------------------------------------ comparing


def _json(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def architecture(identity: dict[str, Any]) -> dict[str, Any]:
    """The constructor arguments that shape the parameters: the model table's defaults with the run's overrides,
    without the training-only ones."""
    defaults = MODELS[identity["model"]][1] if identity["model"] in MODELS else {}
    kwargs = _json({**defaults, **identity.get("model_kwargs", {})})
    return {k: v for k, v in kwargs.items() if k not in TRAINING_ONLY_KWARGS}


def abstract_trees(identity: dict[str, Any]) -> dict[str, Any]:
    """``{'params', 'batch_stats'}`` of the model an identity describes, as ShapeDtypeStructs (nothing allocated)."""
    kwargs = identity.get("model_kwargs", {})
    model = nnx.eval_shape(
        lambda: create_model(
            identity["model"], identity["num_classes"], identity["in_channels"], rngs=nnx.Rngs(0), **kwargs
        )
    )
    _, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return dict(params=nnx.to_pure_dict(params), batch_stats=nnx.to_pure_dict(stats))


def _shapes(trees: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """``{'params/blocks/0/conv/kernel': shape, ...}`` without the classifier."""
    out = {}
    for name, tree in trees.items():
        for keypath, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            path = param_path(keypath)
            if not (name == "params" and path[:1] == (HEAD,)):
                out["/".join(map(str, (name, *path)))] = tuple(leaf.shape)
    return out


def tensor_differences(source: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """What differs between two models' ``{'params', 'batch_stats'}`` outside the classifier (empty: nothing)."""
    have, want = _shapes(source), _shapes(run)
    listed = lambda paths: (
        ", ".join(paths[:LISTED]) + (f" and {len(paths) - LISTED} more" if len(paths) > LISTED else "")
    )
    missing = [p for p in want if p not in have]
    extra = [p for p in have if p not in want]
    shaped = [f"{p} {have[p]} (this run: {want[p]})" for p in want if p in have and have[p] != want[p]]
    out = [f"missing from the source: {listed(missing)}"] if missing else []
    out += [f"not in this run's model: {listed(extra)}"] if extra else []
    return out + ([f"of another shape: {listed(shaped)}"] if shaped else [])


def identity_differences(source: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """Model name, parameter-shaping constructor arguments and input channels that differ (empty: none)."""
    if source["model"] != run["model"]:
        return [f"model {source['model']!r} (this run: {run['model']!r})"]
    have, want = architecture(source), architecture(run)
    out = [
        f"model.kwargs.{k}={have.get(k)!r} (this run: {want.get(k)!r})"
        for k in sorted(set(have) | set(want))
        if have.get(k) != want.get(k)
    ]
    if source["in_channels"] != run["in_channels"]:
        hint = "; for grayscale data set --config.data.grayscale_to_rgb=true" if source["in_channels"] == 3 else ""
        out.append(f"{source['in_channels']} input channels (this run's data: {run['in_channels']}{hint})")
    return out


def check_same_model(directory: str, meta: dict[str, Any], run: dict[str, Any], run_trees: dict[str, Any]) -> None:
    """Raises InitFromError naming every difference beyond the classifier between the source and the run."""
    differences = identity_differences(meta, run)
    if meta["model"] in MODELS:
        differences += tensor_differences(abstract_trees(meta), run_trees)
    if differences:
        raise InitFromError(
            f"model.init_from={directory} holds a {meta['model']} that differs from this run's model beyond the "
            f"classifier: {'; '.join(differences)}. Only the classifier may differ. Build the source's model "
            f"(its model section is in {directory}/config.json: --config.model.name=..., "
            "--config.model.kwargs.KEY=VALUE), or unset model.init_from to start from random weights."
        )


# ------------------------------------------------------------------------------------------ the source


def _open(directory: str) -> Checkpointer:
    if not os.path.isdir(directory):
        raise InitFromError(
            f"model.init_from={directory} does not exist; give a training run's --workdir or a folder written by "
            "python -m nfjax.convert"
        )
    if not os.path.isdir(os.path.join(directory, "checkpoints")):
        raise InitFromError(
            f"model.init_from={directory} holds no checkpoints folder: it is neither a training run's --workdir "
            "(one that saved a checkpoint) nor a folder written by python -m nfjax.convert"
        )
    return Checkpointer(directory, async_save=False, create=False)


def _chosen_tree(settings: InitSettings, held: list[str]) -> str:
    if settings.weights == "ema" and "ema" not in held:
        raise InitFromError(
            f"model.init_weights=ema but model.init_from={settings.directory} keeps no EMA weights (it holds "
            f"{', '.join(held)}); use model.init_weights=params or auto"
        )
    return "ema" if settings.weights == "ema" or (settings.weights == "auto" and "ema" in held) else "params"


def _reset_head(settings: InitSettings, source_classes: int, run_classes: int) -> bool:
    if settings.reset_classifier is False and source_classes != run_classes:
        raise InitFromError(
            f"model.reset_classifier=false keeps the classifier of model.init_from={settings.directory}, which has "
            f"{source_classes} classes, but this run's dataset has {run_classes}; use model.reset_classifier=auto "
            "(a new classifier when the class counts differ)"
        )
    return settings.reset_classifier is True or source_classes != run_classes


def describe_source(settings: InitSettings, run: dict[str, Any], run_trees: dict[str, Any]) -> Source:
    """Reads the newest meta of the source (no arrays), refuses a source of another model and decides which tree
    is loaded and whether the classifier is kept. ``run``: the run's model identity (model, model_kwargs,
    num_classes, in_channels); ``run_trees``: its abstract ``{'params', 'batch_stats'}``."""
    ckpt = _open(settings.directory)
    try:
        meta = ckpt.newest_meta()
    finally:
        ckpt.close()
    if meta is None:
        raise InitFromError(f"model.init_from={settings.directory} holds no complete checkpoint")
    if meta.get("format") != FORMAT:
        raise InitFromError(
            f"model.init_from={settings.directory} holds a checkpoint in format {meta.get('format', 1)}; this nfjax "
            f"reads format {FORMAT}. Convert or train the source again with this version."
        )
    check_same_model(settings.directory, meta, run, run_trees)
    tree = _chosen_tree(settings, meta["weights"])
    return Source(settings.directory, meta, tree, _reset_head(settings, meta["num_classes"], run["num_classes"]))


def read_source(source: Source, mesh: jax.sharding.Mesh) -> tuple[int, dict[str, Any]]:
    """``(step, weights)`` of the source's newest readable checkpoint (damaged newer steps are reported and left
    in place), restored straight into ``mesh``'s shardings: the tree the run starts from, and batch_stats."""
    trees = abstract_trees(source.meta)
    trees["ema"] = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, jnp.float32), trees["params"])
    ckpt = _open(source.directory)

    def read(step: int) -> dict[str, Any]:
        held = {k: trees[k] for k in ckpt.read_meta(step)["weights"]}
        weights = ckpt.restore_weights(abstract_like(held, parallel.param_sharding(mesh, held)), step)
        return {k: weights[k] for k in (source.tree, "batch_stats") if k in weights}

    try:
        found = ckpt.newest_readable(read)
    finally:
        ckpt.close()
    if found is None or source.tree not in found[1]:
        raise InitFromError(f"model.init_from={source.directory}: no readable checkpoint holds its {source.tree}")
    return int(found[0]), found[1]


def start_weights(
    fresh_params: dict[str, Any], fresh_stats: dict[str, Any], loaded: dict[str, Any], source: Source
) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, batch_stats)`` a fine-tuning run starts from: the source's (its ``source.tree`` as params, its
    running statistics), with the fresh classifier when ``source.reset_head``. Traced inside the state init."""
    params = dict(loaded[source.tree])
    if source.reset_head:
        params[HEAD] = fresh_params[HEAD]
    return params, loaded.get("batch_stats") or fresh_stats


def announce(source: Source, step: int, run_classes: int) -> None:
    """The one line saying what the run starts from (process 0, stderr)."""
    classes = source.meta["num_classes"]
    head = (
        f"classifier reset ({classes} -> {run_classes} classes)"
        if source.reset_head
        else f"classifier kept ({classes} classes)"
    )
    if jax.process_index() == 0:
        print(
            f"starting from model.init_from={source.directory} (checkpoint step {step}, {source.meta['model']}): "
            f"weights from its {source.tree}, {head}; optimizer state, EMA and step start fresh",
            file=sys.stderr,
            flush=True,
        )
