"""Parameter and compute accounting without allocating the model (``nnx.eval_shape`` + abstract tracing)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.models import create_model, lowering


def abstract_model(name: str, **kwargs: Any) -> nnx.Module:
    """The model with ShapeDtypeStruct leaves: costs no memory even for F7."""
    return nnx.eval_shape(lambda: create_model(name, rngs=nnx.Rngs(0), **kwargs))


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (nnx.Param leaves; BN running statistics are not counted)."""
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def _forward_fn(model: nnx.Module):
    graphdef, state = nnx.split(model)
    return (lambda state, x: nnx.merge(graphdef, state)(x)), state


def _count_macs(jaxpr) -> int:
    total = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            out, kernel = eqn.outvars[0].aval.shape, eqn.invars[1].aval.shape
            # HWIO kernel: each output element costs kh * kw * (in / groups) multiply-adds.
            total += math.prod(out) * math.prod(kernel[:-1])
        elif eqn.primitive.name == "dot_general":
            (lhs_contract, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in lhs_contract)
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", param)
            if hasattr(inner, "eqns"):
                total += _count_macs(inner)
    return total


def count_macs(model: nnx.Module, image_size: int, in_channels: int = 3) -> int:
    """Multiply-accumulates of one forward pass of one image in convolutions and matmuls.

    Counted from the traced program's conv/dot ops, every kernel tap included (the papers' "FLOPs"
    convention). Weight standardization and elementwise ops are not counted.
    """
    fn, state = _forward_fn(model)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, in_channels), jnp.float32)
    with lowering.forced_lowering("native"):  # XLA's own convolutions: a library's custom call is not counted
        return _count_macs(jax.make_jaxpr(fn)(state, x).jaxpr)


def xla_flops_per_image(model: nnx.Module, image_size: int, in_channels: int = 3) -> float:
    """Forward FLOPs per image from XLA's cost analysis: flops(batch 2) - flops(batch 1).

    The difference removes the batch-independent work (weight standardization). XLA counts only the
    multiply-adds that touch real pixels, so with SAME padding this is a little below 2 * count_macs.
    """
    fn, state = _forward_fn(model)
    jitted = jax.jit(fn)

    def flops(batch: int) -> float:
        x = jax.ShapeDtypeStruct((batch, image_size, image_size, in_channels), jnp.float32)
        with lowering.forced_lowering("native"):  # XLA's cost analysis does not see into custom calls
            return float(jitted.lower(state, x).cost_analysis()["flops"])

    return flops(2) - flops(1)
