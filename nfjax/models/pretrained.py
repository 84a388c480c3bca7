"""``create_model(name, pretrained=DIR)``: a model with the weights of a converted folder or a training run.

Reads only the checkpoint (its meta names the model, its constructor arguments, classes and input channels), so
it needs neither the run's dataset nor its config; the weights land on the default device.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


def load_pretrained(directory: str, create, *, expect: str | None = None, tree: str = "auto", **overrides: Any):
    """The nnx model of the newest readable checkpoint in ``directory`` (``create`` is ``create_model``).

    ``expect``: the model name the folder must hold. ``tree``: 'params', 'ema' or 'auto' (EMA when the run keeps
    one). ``overrides``: constructor arguments that leave the parameters alone (drop rates, dtype).
    """
    from nfjax.checkpoint import Checkpointer

    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(os.path.join(directory, "checkpoints")):
        raise FileNotFoundError(
            f"{directory} holds no checkpoints: give a folder written by python -m nfjax.convert or a run's --workdir"
        )
    if tree not in ("auto", "params", "ema"):
        raise ValueError(f"tree must be 'params', 'ema' or 'auto', got {tree!r}")
    ckpt = Checkpointer(directory, create=False, async_save=False)
    try:
        meta = ckpt.newest_meta()
        if meta is None:
            raise FileNotFoundError(f"no complete checkpoint in {ckpt.directory}")
        if expect is not None and expect != meta["model"]:
            raise ValueError(
                f"{directory} holds {meta['model']}, not {expect}: call create_model({meta['model']!r}, pretrained=...)"
            )
        build = lambda: create(
            meta["model"],
            meta["num_classes"],
            meta["in_channels"],
            rngs=nnx.Rngs(0),
            **meta["model_kwargs"],
            **overrides,
        )
        graphdef, params, stats = nnx.split(nnx.eval_shape(build), nnx.Param, nnx.BatchStat)
        found = ckpt.newest_readable(lambda step: ckpt.restore_weights(_target(ckpt, step, params, stats), step))
    finally:
        ckpt.close()
    weights = found[1]
    if tree == "ema" and "ema" not in weights:
        raise ValueError(f"{directory} keeps no EMA weights; use tree='params'")
    chosen = "ema" if tree == "ema" or (tree == "auto" and "ema" in weights) else "params"
    nnx.replace_by_pure_dict(params, weights[chosen])
    if weights.get("batch_stats"):
        nnx.replace_by_pure_dict(stats, weights["batch_stats"])
    return nnx.merge(graphdef, params, stats)


def _target(ckpt, step: int, params, stats) -> dict:
    """Restore target (ShapeDtypeStructs on the default device) for the weight trees saved at ``step``."""
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    struct = lambda dtype=None: lambda x: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=device)
    trees = dict(params=nnx.to_pure_dict(params), batch_stats=nnx.to_pure_dict(stats))
    trees["ema"] = trees["params"]
    return {
        k: jax.tree.map(struct(jnp.float32 if k == "ema" else None), trees[k]) for k in ckpt.read_meta(step)["weights"]
    }
