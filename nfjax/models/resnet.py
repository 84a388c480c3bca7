"""BatchNorm ResNet baseline (torchvision / timm layout, ResNet v1.5: the stride sits on the 3x3 conv).

BN statistics are those of the global batch under ``jax.jit`` sharding, or of consecutive "ghost" groups of
``bn_ghost_size`` examples. Stochastic depth follows timm (rate * i / (num_blocks - 1), kept branches scaled
by 1/keep), as used by the "ResNet strikes back" recipes. ``norm='none'`` removes every BatchNorm and adds
nothing in its place (no scaled WS, no alpha/beta, no zero init): the unnormalized ResNet of the NF-ResNet paper's
signal propagation plots, which is not meant to be trained.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import jax
from flax import nnx

from nfjax.models import batchnorm, network
from nfjax.models import layers as L

RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, ...]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}
BASIC_WIDTHS = (64, 128, 256, 512)
BOTTLENECK_WIDTHS = (256, 512, 1024, 2048)
NORMS = ("batch", "none")


class NoNorm(nnx.Module):
    """Stands in for BatchNorm under ``norm='none'``: y = x (no statistics, no scale or bias, so no zero init)."""

    def __init__(self, features: int, scale_init: float = 1.0):
        del features, scale_init  # the BatchNorm signature, so that blocks build either one the same way

    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        return x


class ResBlock(nnx.Module):
    """Post-activation block: convs each followed by BN (ReLU between), projection shortcut conv+BN, add, ReLU."""

    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        *,
        stride: int,
        kind: str,
        bottleneck_ratio: float = 0.25,
        stochdepth_rate: float = 0.0,
        zero_init_last: bool = True,
        conv=L.Conv,
        norm=batchnorm.BatchNorm,
        rngs: nnx.Rngs,
    ):
        self.kind, self.stochdepth_rate = kind, stochdepth_rate
        last_scale = 0.0 if zero_init_last else 1.0
        if kind == "bottleneck":
            width = int(out_ch * bottleneck_ratio)
            self.conv1, self.bn1 = conv(in_ch, width, 1, rngs=rngs), norm(width)
            self.conv2, self.bn2 = conv(width, width, 3, strides=stride, rngs=rngs), norm(width)
            self.conv3, self.bn3 = conv(width, out_ch, 1, rngs=rngs), norm(out_ch, scale_init=last_scale)
        elif kind == "basic":
            self.conv1, self.bn1 = conv(in_ch, out_ch, 3, strides=stride, rngs=rngs), norm(out_ch)
            self.conv2, self.bn2 = conv(out_ch, out_ch, 3, rngs=rngs), norm(out_ch, scale_init=last_scale)
            self.conv3 = self.bn3 = None
        else:
            raise ValueError(f"block kind must be 'bottleneck' or 'basic', got {kind!r}")
        if stride > 1 or in_ch != out_ch:
            self.down_conv, self.down_bn = conv(in_ch, out_ch, 1, strides=stride, rngs=rngs), norm(out_ch)
        else:
            self.down_conv = self.down_bn = None

    def __call__(self, x, *, train: bool = False, key=None, stats: list | None = None):
        out = jax.nn.relu(self.bn1(self.conv1(x), train))
        out = self.bn2(self.conv2(out), train)
        if self.conv3 is not None:
            out = self.bn3(self.conv3(jax.nn.relu(out)), train)
        shortcut = x if self.down_conv is None else self.down_bn(self.down_conv(x), train)
        residual = out
        out = L.stochastic_depth(out, self.stochdepth_rate, key, train, scale_by_keep=True)
        out = jax.nn.relu(out + shortcut)
        if stats is not None:
            stats.append({**network.channel_stats(out), "res_avg_var": network.channel_stats(residual)["avg_var"]})
        return out


class ResNet(nnx.Module):
    """BN ResNet. ``stem='imagenet'``: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool; ``stem='small'``: 3x3/1 conv, BN,
    ReLU. ``__call__(x, train=False, key=None, return_stats=False)`` -> logits [N, classes] float32; in
    training, BatchNorm updates its running statistics in place (nnx.BatchStat). ``norm='none'``: every
    BatchNorm is the identity (a block computes relu(x + convs(x)) with Kaiming-initialized convs).
    """

    def __init__(
        self,
        num_classes: int = 1000,
        in_channels: int = 3,
        *,
        depths: Sequence[int] = RESNET_LAYOUTS[50][1],
        widths: Sequence[int] = BOTTLENECK_WIDTHS,
        strides: Sequence[int] = (1, 2, 2, 2),
        block: str = "bottleneck",
        bottleneck_ratio: float = 0.25,
        stem: str = "imagenet",
        stem_width: int = 64,
        stochdepth_rate: float = 0.0,
        drop_rate: float = 0.0,
        zero_init_last: bool = True,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        bn_ghost_size: int = 0,
        norm: str = "batch",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if stem not in ("imagenet", "small"):
            raise ValueError(f"stem must be 'imagenet' or 'small', got {stem!r}")
        if norm not in NORMS:
            raise ValueError(
                f"norm must be 'batch' (the baseline) or 'none' (no normalization, for signal propagation plots), "
                f"got {norm!r}"
            )
        conv = partial(L.Conv, dtype=dtype)
        batch_norm = partial(
            batchnorm.BatchNorm, momentum=bn_momentum, eps=bn_eps, ghost_batch_size=bn_ghost_size, dtype=dtype
        )
        make_norm = batch_norm if norm == "batch" else NoNorm
        self.dtype, self.drop_rate, self.stem_kind = dtype, drop_rate, stem
        self.stem_conv = conv(
            in_channels,
            stem_width,
            7 if stem == "imagenet" else 3,
            strides=2 if stem == "imagenet" else 1,
            rngs=rngs,
        )
        self.stem_bn = make_norm(stem_width)
        last = max(sum(depths) - 1, 1)
        blocks = [
            ResBlock(
                cin,
                cout,
                stride=stride,
                kind=block,
                bottleneck_ratio=bottleneck_ratio,
                stochdepth_rate=stochdepth_rate * i / last,
                zero_init_last=zero_init_last,
                conv=conv,
                norm=make_norm,
                rngs=rngs,
            )
            for i, cin, cout, stride in network.stage_plan(widths, depths, strides, stem_width)
        ]
        ch = widths[-1]
        self.blocks = nnx.List(blocks)
        # torch.nn.Linear's default init, kernel and bias: torchvision's and timm's ResNets keep it for fc.
        fc_init = L.torch_linear_init(ch)
        self.classifier = L.Linear(ch, num_classes, kernel_init=fc_init, bias_init=fc_init, dtype=dtype, rngs=rngs)

    def __call__(self, x, *, train: bool = False, key=None, return_stats: bool = False):
        if self.dtype is not None:
            x = x.astype(self.dtype)
        x = jax.nn.relu(self.stem_bn(self.stem_conv(x), train))
        if self.stem_kind == "imagenet":
            x = L.max_pool_3x3_s2(x, padding=((1, 1), (1, 1)))
        return network.blocks_and_head(self, x, train=train, key=key, return_stats=return_stats)
