"""NF-ResNets (Brock et al. 2021a): pre-activation ResNets without normalization, DeepMind layout.

Scaled weight standardization, gamma-scaled ReLU, beta = 1/expected_std on each block's input, alpha on the
residual branch, SkipInit (``skip_gain``, init 0). Bottleneck blocks for the ImageNet models; basic blocks and a
3x3 stride-1 stem for the small-image twin used on 28-32 px data.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.models import layers as L

NF_RESNET_DEPTHS = {
    26: (2, 2, 2, 2),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
    288: (24, 24, 24, 24),
}


class NFResBlock(nnx.Module):
    """Pre-activation residual block; ``kind`` 'bottleneck' (1x1 -> 3x3 stride -> 1x1) or 'basic' (3x3 x2).

    out = act(x) * beta; shortcut = conv_shortcut(out) (1x1, stride) when the shape changes, else x;
    branch = convs(out) [-> 2 * SE * branch]; return shortcut + alpha * skip_gain * stochdepth(branch).
    """

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int,
        beta: float,
        alpha: float,
        kind: str = "bottleneck",
        bottleneck_ratio: float = 0.25,
        se_ratio: float = 0.0,
        stochdepth_rate: float = 0.0,
        activation: str = "relu",
        skipinit_gain: float = 0.0,
        conv=L.WSConv,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        self.beta, self.alpha, self.kind = beta, alpha, kind
        self.stochdepth_rate = stochdepth_rate
        self.act = L.activation_fn(activation)
        if kind == "bottleneck":
            width = int(out_ch * bottleneck_ratio)
            self.conv0 = conv(in_ch, width, 1, rngs=rngs)
            self.conv1 = conv(width, width, 3, strides=stride, rngs=rngs)
            self.conv2 = conv(width, out_ch, 1, rngs=rngs)
        elif kind == "basic":
            self.conv0 = conv(in_ch, out_ch, 3, strides=stride, rngs=rngs)
            self.conv1 = conv(out_ch, out_ch, 3, rngs=rngs)
            self.conv2 = None
        else:
            raise ValueError(f"block kind must be 'bottleneck' or 'basic', got {kind!r}")
        projection = stride > 1 or in_ch != out_ch
        self.conv_shortcut = conv(in_ch, out_ch, 1, strides=stride, rngs=rngs) if projection else None
        self.se = L.SqueezeExcite(out_ch, out_ch, se_ratio, dtype=dtype, rngs=rngs) if se_ratio else None
        self.skip_gain = nnx.Param(jnp.full((), skipinit_gain, jnp.float32))

    def __call__(self, x, *, train: bool = False, key=None, stats: list | None = None):
        out = self.act(x) * jnp.asarray(self.beta, x.dtype)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(out)
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        if self.conv2 is not None:
            out = self.conv2(self.act(out))
        return L.nf_merge_residual(self, out, shortcut, train=train, key=key, stats=stats)


class NFResNet(nnx.Module):
    """NF-ResNet. ``stem='imagenet'``: 7x7/2 WSConv + 3x3/2 max-pool; ``stem='small'``: one 3x3/1 WSConv.

    ``__call__(x, train=False, key=None, return_stats=False)`` -> logits [N, classes] float32
    (and the per-block signal propagation statistics when ``return_stats``).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        depths: Sequence[int] = NF_RESNET_DEPTHS[50],
        widths: Sequence[int] = (256, 512, 1024, 2048),
        strides: Sequence[int] = (1, 2, 2, 2),
        stem: str = "imagenet",
        stem_width: int = 64,
        block: str = "bottleneck",
        bottleneck_ratio: float = 0.25,
        alpha: float = 0.2,
        se_ratio: float = 0.0,
        activation: str = "relu",
        stochdepth_rate: float = 0.1,
        drop_rate: float = 0.0,
        skipinit_gain: float = 0.0,
        ws_eps: float = 1e-4,
        ws_eps_mode: str = "floor",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        conv = partial(L.WSConv, eps=ws_eps, eps_mode=ws_eps_mode, dtype=dtype)
        self.act = L.activation_fn(activation)
        self.dtype, self.drop_rate, self.stem_kind = dtype, drop_rate, stem
        if stem == "imagenet":
            self.stem_conv = conv(in_channels, stem_width, 7, strides=2, rngs=rngs)
        else:
            self.stem_conv = conv(in_channels, stem_width, 3, strides=1, rngs=rngs)
        betas = L.block_betas(depths, alpha)
        num_blocks = sum(depths)
        blocks = [
            NFResBlock(
                cin,
                cout,
                stride=stride,
                beta=betas[i],
                alpha=alpha,
                kind=block,
                bottleneck_ratio=bottleneck_ratio,
                se_ratio=se_ratio,
                activation=activation,
                stochdepth_rate=stochdepth_rate * i / num_blocks,
                skipinit_gain=skipinit_gain,
                conv=conv,
                dtype=dtype,
                rngs=rngs,
            )
            for i, cin, cout, stride in L.stage_plan(widths, depths, strides, stem_width)
        ]
        ch = widths[-1]
        self.blocks = nnx.List(blocks)
        self.classifier = L.Linear(
            ch, num_classes, kernel_init=jax.nn.initializers.normal(0.01), dtype=dtype, rngs=rngs
        )

    def __call__(self, x, *, train: bool = False, key=None, return_stats: bool = False):
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = self.stem_conv(x)
        if self.stem_kind == "imagenet":
            x = L.max_pool_3x3_s2(x)
        return L.blocks_and_head(self, x, train=train, key=key, return_stats=return_stats, pre_pool=self.act)
