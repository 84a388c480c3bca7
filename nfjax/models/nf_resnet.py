"""NF-ResNets (Brock et al. 2021a): pre-activation ResNets without normalization, DeepMind layout.

Scaled weight standardization, gamma-scaled ReLU, beta = 1/expected_std on each block's input, alpha on the
residual branch, SkipInit (``skip_gain``, init 0). Bottleneck blocks for the ImageNet models; basic blocks and a
3x3 stride-1 stem for the small-image twin used on 28-32 px data. Options reproduce timm's ``nf_resnet`` layout
(PyTorch padding, avg-pool shortcuts, gamma folded into the convs, no SkipInit scalar; see :class:`NFResNet`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.models import layers as L
from nfjax.models import network

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

    out = act(x) * beta; shortcut = conv_shortcut(out) (1x1, stride) when the shape changes, else x
    (``shortcut='avgpool'``: conv_shortcut(avg_pool_2x2(out)) with a stride-1 conv when strided);
    branch = convs(out) [-> 2 * attention * branch]; return shortcut + alpha * skip_gain * stochdepth(branch).
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
        skipinit: bool = True,
        gamma_in_conv: bool = False,
        shortcut: str = "conv",
        attention: str | None = "se",
        se_divisor: int = 0,
        conv=L.WSConv,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if shortcut not in ("conv", "avgpool"):
            raise ValueError(f"shortcut must be 'conv' (DeepMind) or 'avgpool' (timm), got {shortcut!r}")
        self.beta, self.alpha, self.kind = beta, alpha, kind
        self.stochdepth_rate = stochdepth_rate
        self.act = L.block_activation(activation, scaled=not gamma_in_conv)
        last_gain = 1.0 if skipinit else 0.0
        if kind == "bottleneck":
            width = int(out_ch * bottleneck_ratio)
            self.conv0 = conv(in_ch, width, 1, rngs=rngs)
            self.conv1 = conv(width, width, 3, strides=stride, rngs=rngs)
            self.conv2 = conv(width, out_ch, 1, gain_init=last_gain, rngs=rngs)
        elif kind == "basic":
            self.conv0 = conv(in_ch, out_ch, 3, strides=stride, rngs=rngs)
            self.conv1 = conv(out_ch, out_ch, 3, gain_init=last_gain, rngs=rngs)
            self.conv2 = None
        else:
            raise ValueError(f"block kind must be 'bottleneck' or 'basic', got {kind!r}")
        projection = stride > 1 or in_ch != out_ch
        self.pool_shortcut = shortcut == "avgpool" and stride > 1
        shortcut_stride = 1 if self.pool_shortcut else stride
        self.conv_shortcut = conv(in_ch, out_ch, 1, strides=shortcut_stride, rngs=rngs) if projection else None
        use_se = L.attention_kind(attention) == "se" and se_ratio
        self.se = L.SqueezeExcite(out_ch, out_ch, se_ratio, dtype, se_divisor, rngs=rngs) if use_se else None
        self.eca = L.EfficientChannelAttention(out_ch, dtype, rngs=rngs) if attention == "eca" else None
        self.skip_gain = nnx.Param(jnp.full((), skipinit_gain, jnp.float32)) if skipinit else None

    def __call__(self, x, *, train: bool = False, key=None, stats: list | None = None):
        out = self.act(x) * jnp.asarray(self.beta, x.dtype)
        shortcut = x
        if self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(L.avg_pool_2x2(out) if self.pool_shortcut else out)
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        if self.conv2 is not None:
            out = self.conv2(self.act(out))
        return network.nf_merge_residual(self, out, shortcut, train=train, key=key, stats=stats)


class NFResNet(nnx.Module):
    """NF-ResNet. ``stem='imagenet'``: 7x7/2 WSConv + 3x3/2 max-pool; ``stem='small'``: one 3x3/1 WSConv.

    ``__call__(x, train=False, key=None, return_stats=False)`` -> logits [N, classes] float32
    (and the per-block signal propagation statistics when ``return_stats``).

    timm's ``nf_resnet`` layout: ``padding='symmetric'`` (PyTorch padding for the convs and the max-pool),
    ``shortcut='avgpool'`` (2x2 average pool, then a stride-1 1x1 conv), ``gamma_in_conv=True`` (activation
    gamma folded into every conv, plain activations), ``skipinit=False`` (no skip_gain; last conv gain starts
    at 0), ``ws_eps_mode='add'``, ``ws_eps=1e-5``. ``attention`` 'se' (with ``se_ratio``) or 'eca'.
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
        padding: str = "same",
        shortcut: str = "conv",
        gamma_in_conv: bool = False,
        skipinit: bool = True,
        attention: str | None = "se",
        se_divisor: int = 0,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        gamma = L.activation_gamma(activation) if gamma_in_conv else 1.0
        pad = L.conv_padding(padding)
        conv = partial(L.WSConv, eps=ws_eps, eps_mode=ws_eps_mode, padding=pad, gamma=gamma, dtype=dtype)
        self.act = L.block_activation(activation, scaled=not gamma_in_conv)
        self.pool_padding = "SAME" if pad == "SAME" else ((1, 1), (1, 1))
        self.dtype, self.drop_rate, self.stem_kind = dtype, drop_rate, stem
        if stem == "imagenet":
            self.stem_conv = conv(in_channels, stem_width, 7, strides=2, rngs=rngs)
        else:
            self.stem_conv = conv(in_channels, stem_width, 3, strides=1, rngs=rngs)
        betas = network.block_betas(depths, alpha)
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
                skipinit=skipinit,
                gamma_in_conv=gamma_in_conv,
                shortcut=shortcut,
                attention=attention,
                se_divisor=se_divisor,
                conv=conv,
                dtype=dtype,
                rngs=rngs,
            )
            for i, cin, cout, stride in network.stage_plan(widths, depths, strides, stem_width)
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
            x = L.max_pool_3x3_s2(x, self.pool_padding)
        return network.blocks_and_head(self, x, train=train, key=key, return_stats=return_stats, pre_pool=self.act)
