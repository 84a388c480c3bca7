"""NFNet F0..F7 (Brock et al. 2021b), DeepMind layout by default, as Flax NNX modules.

Parameter names follow the reference release (stem_conv0..3, blocks[i].conv0/conv1/conv1b/conv2/conv_shortcut,
se.fc0/fc1, skip_gain, final_conv) with Flax's ``kernel``/``bias`` for weights; the classifier is ``classifier``.
Options reproduce timm's layouts exactly (its NFNet-L family, ``dm_nfnet``): PyTorch ``padding='symmetric'``,
the activation gamma folded into every conv (``gamma_in_conv``), no SkipInit scalar (``skipinit=False``: the
last conv's gain starts at 0 instead), ECA attention, and timm's SE width rounding (``se_divisor``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx

from nfjax.models import layers as L
from nfjax.models import network

# Per-variant data of the reference: depths, train/test resolution, RandAugment magnitude, dropout.
NFNET_VARIANTS: dict[str, dict] = {
    "F0": dict(depths=(1, 2, 6, 3), train_size=192, test_size=256, ra_magnitude=5, drop_rate=0.2),
    "F1": dict(depths=(2, 4, 12, 6), train_size=224, test_size=320, ra_magnitude=10, drop_rate=0.3),
    "F2": dict(depths=(3, 6, 18, 9), train_size=256, test_size=352, ra_magnitude=10, drop_rate=0.4),
    "F3": dict(depths=(4, 8, 24, 12), train_size=320, test_size=416, ra_magnitude=15, drop_rate=0.4),
    "F4": dict(depths=(5, 10, 30, 15), train_size=384, test_size=512, ra_magnitude=15, drop_rate=0.5),
    "F5": dict(depths=(6, 12, 36, 18), train_size=416, test_size=544, ra_magnitude=15, drop_rate=0.5),
    "F6": dict(depths=(7, 14, 42, 21), train_size=448, test_size=576, ra_magnitude=15, drop_rate=0.5),
    "F7": dict(depths=(8, 16, 48, 24), train_size=480, test_size=608, ra_magnitude=15, drop_rate=0.5),
}
NFNET_WIDTHS = (256, 512, 1536, 1536)
NFNET_PLUS_WIDTHS = (384, 768, 2048, 2048)
RANDAUGMENT_LAYERS = 4


class NFBlock(nnx.Module):
    """NFNet bottleneck block: 1x1 -> grouped 3x3 (stride) -> grouped 3x3 -> 1x1, SE, SkipInit, alpha."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int,
        beta: float,
        alpha: float,
        bottleneck_ratio: float = 0.5,
        group_size: int = 128,
        se_ratio: float = 0.5,
        stochdepth_rate: float = 0.0,
        use_two_convs: bool = True,
        activation: str = "gelu",
        skipinit_gain: float = 0.0,
        skipinit: bool = True,
        gamma_in_conv: bool = False,
        attention: str | None = "se",
        se_divisor: int = 0,
        conv=L.WSConv,
        dtype=None,
        rngs: nnx.Rngs,
    ):
        width = int(out_ch * bottleneck_ratio)
        groups = max(1, width // group_size)
        width = group_size * groups if width >= group_size else width
        self.stride, self.beta, self.alpha = stride, beta, alpha
        self.stochdepth_rate = stochdepth_rate
        self.act = L.block_activation(activation, scaled=not gamma_in_conv)
        self.conv0 = conv(in_ch, width, 1, rngs=rngs)
        self.conv1 = conv(width, width, 3, strides=stride, groups=groups, rngs=rngs)
        self.conv1b = conv(width, width, 3, groups=groups, rngs=rngs) if use_two_convs else None
        self.conv2 = conv(width, out_ch, 1, gain_init=1.0 if skipinit else 0.0, rngs=rngs)
        self.conv_shortcut = conv(in_ch, out_ch, 1, rngs=rngs) if stride > 1 or in_ch != out_ch else None
        use_se = L.attention_kind(attention) == "se" and se_ratio
        self.se = L.SqueezeExcite(out_ch, out_ch, se_ratio, dtype, se_divisor, rngs=rngs) if use_se else None
        self.eca = L.EfficientChannelAttention(out_ch, dtype, rngs=rngs) if attention == "eca" else None
        self.skip_gain = nnx.Param(jnp.full((), skipinit_gain, jnp.float32)) if skipinit else None

    def __call__(self, x, *, train: bool = False, key=None, stats: list | None = None):
        out = self.act(x) * jnp.asarray(self.beta, x.dtype)
        if self.stride > 1:
            shortcut = L.avg_pool_2x2(out)
            if self.conv_shortcut is not None:
                shortcut = self.conv_shortcut(shortcut)
        elif self.conv_shortcut is not None:
            shortcut = self.conv_shortcut(out)
        else:
            shortcut = x
        out = self.conv0(out)
        out = self.conv1(self.act(out))
        if self.conv1b is not None:
            out = self.conv1b(self.act(out))
        out = self.conv2(self.act(out))
        return network.nf_merge_residual(self, out, shortcut, train=train, key=key, stats=stats)


class NFNet(nnx.Module):
    """NFNet: 4-conv stem, NFBlocks with beta/alpha signal bookkeeping, 1x1 final conv, pooled linear head.

    ``__call__(x, train=False, key=None, return_stats=False)``: x [N, H, W, C] -> logits [N, classes] (float32).
    ``key`` drives stochastic depth and dropout in training; ``return_stats`` also returns per-block signal
    propagation statistics stacked over blocks.

    timm layouts: ``padding`` 'same' (TF/Haiku, default) or 'symmetric' (PyTorch); ``gamma_in_conv`` folds the
    activation gamma into every WSConv (stem, shortcut and final conv too) and uses plain activations;
    ``skipinit=False`` drops the skip_gain scalars and starts each block's last conv gain at 0; ``attention``
    'se' (with ``se_ratio``; ``se_divisor`` > 0 rounds its width like timm) or 'eca'.
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        depths: Sequence[int] = NFNET_VARIANTS["F0"]["depths"],
        widths: Sequence[int] = NFNET_WIDTHS,
        strides: Sequence[int] = (1, 2, 2, 2),
        stem_widths: Sequence[int] = (16, 32, 64),
        bottleneck_ratio: float = 0.5,
        group_size: int = 128,
        alpha: float = 0.2,
        se_ratio: float = 0.5,
        activation: str = "gelu",
        stochdepth_rate: float = 0.1,
        drop_rate: float = 0.2,
        final_conv_mult: float = 2.0,
        use_two_convs: bool = True,
        skipinit_gain: float = 0.0,
        ws_eps: float = 1e-4,
        ws_eps_mode: str = "floor",
        padding: str = "same",
        gamma_in_conv: bool = False,
        skipinit: bool = True,
        attention: str | None = "se",
        se_divisor: int = 0,
        grouped_impl: L.GroupedConvImpl = "auto",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        conv = partial(
            L.WSConv,
            eps=ws_eps,
            eps_mode=ws_eps_mode,
            padding=L.conv_padding(padding),
            gamma=L.activation_gamma(activation) if gamma_in_conv else 1.0,
            grouped_impl=grouped_impl,
            dtype=dtype,
        )
        self.act = L.block_activation(activation, scaled=not gamma_in_conv)
        self.dtype = dtype
        self.drop_rate = drop_rate
        stem_out = widths[0] // 2
        chans = (in_channels, *stem_widths, stem_out)
        stem_strides = (2,) + (1,) * (len(stem_widths) - 1) + (2,)
        self.stem = nnx.List(
            [conv(chans[i], chans[i + 1], 3, strides=s, rngs=rngs) for i, s in enumerate(stem_strides)]
        )
        betas = network.block_betas(depths, alpha)
        num_blocks = sum(depths)
        blocks = [
            NFBlock(
                cin,
                cout,
                stride=stride,
                beta=betas[i],
                alpha=alpha,
                bottleneck_ratio=bottleneck_ratio,
                group_size=group_size,
                se_ratio=se_ratio,
                stochdepth_rate=stochdepth_rate * i / num_blocks,
                use_two_convs=use_two_convs,
                activation=activation,
                skipinit_gain=skipinit_gain,
                skipinit=skipinit,
                gamma_in_conv=gamma_in_conv,
                attention=attention,
                se_divisor=se_divisor,
                conv=conv,
                dtype=dtype,
                rngs=rngs,
            )
            for i, cin, cout, stride in network.stage_plan(widths, depths, strides, stem_out)
        ]
        ch = widths[-1]
        self.blocks = nnx.List(blocks)
        final_ch = int(final_conv_mult * ch)
        self.final_conv = conv(ch, final_ch, 1, rngs=rngs)
        self.classifier = L.Linear(
            final_ch, num_classes, kernel_init=jax.nn.initializers.normal(0.01), dtype=dtype, rngs=rngs
        )

    def __call__(self, x, *, train: bool = False, key=None, return_stats: bool = False):
        if self.dtype is not None:
            x = x.astype(self.dtype)
        for i, conv in enumerate(self.stem):
            x = conv(x)
            if i < len(self.stem) - 1:
                x = self.act(x)
        pre_pool = lambda h: self.act(self.final_conv(h))
        return network.blocks_and_head(self, x, train=train, key=key, return_stats=return_stats, pre_pool=pre_pool)
