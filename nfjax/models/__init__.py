"""The model zoo: one explicit table from names to (class, constructor arguments, metadata).

    from flax import nnx
    from nfjax.models import create_model, list_models
    model = create_model("nfnet_f0", num_classes=1000, rngs=nnx.Rngs(0))
    logits = model(images)                       # images: [N, H, W, 3] float, normalized
    logits = model(images, train=True, key=key)  # stochastic depth / dropout / BN batch statistics

The table is data: adding a variant is adding a row. Importing this package never imports TensorFlow.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from nfjax.models.nf_resnet import NF_RESNET_DEPTHS, NFResNet
from nfjax.models.nfnet import NFNET_PLUS_WIDTHS, NFNET_VARIANTS, NFNET_WIDTHS, NFNet
from nfjax.models.resnet import BASIC_WIDTHS, BOTTLENECK_WIDTHS, RESNET_LAYOUTS, ResNet
from nfjax.suggest import did_you_mean

# Small-image twins (28-32 px): identical topology, one NF, one BN. 3x3 stride-1 stem, no max-pool,
# three stages of basic blocks.
SMALL_TWIN = dict(
    widths=(64, 128, 256), depths=(1, 1, 1), strides=(1, 2, 2), block="basic", stem="small", stem_width=32
)


# timm's NFNet-L family ("light" NFNets, timm's own layout): depths, final conv multiplier, and the train /
# test sizes of timm's default_cfgs; dropout as the F variant of the same depths.
NFNET_L_VARIANTS = {
    "l0": dict(depths=(1, 2, 6, 3), final_conv_mult=1.5, drop_rate=0.2, train_size=224, test_size=288),
    "l1": dict(depths=(2, 4, 12, 6), final_conv_mult=2.0, drop_rate=0.3, train_size=256, test_size=320),
    "l2": dict(depths=(3, 6, 18, 9), final_conv_mult=2.0, drop_rate=0.4, train_size=320, test_size=384),
}
NFNET_L_LAYOUT = dict(
    widths=NFNET_WIDTHS,
    activation="silu",
    bottleneck_ratio=0.25,
    group_size=64,
    se_ratio=0.25,
    se_divisor=8,
    padding="symmetric",
    gamma_in_conv=True,
    skipinit=False,
    ws_eps_mode="add",
    ws_eps=1e-5,
)


def _nfnet_rows() -> dict[str, tuple[type, dict, dict]]:
    rows = {}
    for variant, v in NFNET_VARIANTS.items():
        meta = {k: v[k] for k in ("train_size", "test_size", "ra_magnitude")}
        meta |= {"family": "nfnet", "normalizer_free": True}
        base = dict(depths=v["depths"], drop_rate=v["drop_rate"])
        rows[f"nfnet_{variant.lower()}"] = (NFNet, base | dict(widths=NFNET_WIDTHS), meta)
        rows[f"nfnet_{variant.lower()}plus"] = (NFNet, base | dict(widths=NFNET_PLUS_WIDTHS), meta)
    for variant, v in NFNET_L_VARIANTS.items():
        meta = {"family": "nfnet", "normalizer_free": True, "train_size": v["train_size"], "test_size": v["test_size"]}
        kwargs = NFNET_L_LAYOUT | {k: v[k] for k in ("depths", "final_conv_mult", "drop_rate")}
        rows[f"eca_nfnet_{variant}"] = (NFNet, kwargs | dict(attention="eca"), meta)
        if variant == "l0":
            rows["nfnet_l0"] = (NFNet, kwargs | dict(attention="se"), meta)
    return rows


def _resnet_rows() -> dict[str, tuple[type, dict, dict]]:
    rows = {}
    meta = {"train_size": 224, "test_size": 224}
    nf, bn = {"family": "nf_resnet", "normalizer_free": True}, {"family": "resnet", "normalizer_free": False}
    for depth, blocks in NF_RESNET_DEPTHS.items():
        rows[f"nf_resnet{depth}"] = (NFResNet, dict(depths=blocks), meta | nf)
    rows["nf_seresnet50"] = (
        NFResNet,
        dict(depths=NF_RESNET_DEPTHS[50], se_ratio=0.25),
        meta | nf,
    )
    for depth, (block, blocks) in RESNET_LAYOUTS.items():
        widths = BASIC_WIDTHS if block == "basic" else BOTTLENECK_WIDTHS
        rows[f"resnet{depth}"] = (
            ResNet,
            dict(depths=blocks, widths=widths, block=block),
            meta | bn,
        )
    small = {"train_size": 28, "test_size": 28}
    rows["nf_resnet_small"] = (NFResNet, dict(SMALL_TWIN), small | nf)
    rows["resnet_small"] = (ResNet, dict(SMALL_TWIN), small | bn)
    return rows


MODELS: dict[str, tuple[type, dict[str, Any], dict[str, Any]]] = {**_nfnet_rows(), **_resnet_rows()}


def list_models() -> list[str]:
    """All model names accepted by :func:`create_model`, sorted."""
    return sorted(MODELS)


def model_metadata(name: str) -> dict[str, Any]:
    """Facts of a model: family, normalizer_free, train_size, test_size (and ra_magnitude for NFNets)."""
    _check_name(name)
    return dict(MODELS[name][2])


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}.{did_you_mean(name, MODELS)} Valid names: {', '.join(list_models())}")


def create_model(
    name: str,
    num_classes: int = 1000,
    in_channels: int = 3,
    *,
    rngs: nnx.Rngs | None = None,
    pretrained: str | None = None,
    **overrides: Any,
) -> nnx.Module:
    """Builds the named model; ``overrides`` replace constructor arguments (e.g. ``drop_rate=0.0``,
    ``dtype=jnp.bfloat16``, ``stochdepth_rate=0.25``, ``widths=(...)``). ``pretrained``: a folder written by
    ``python -m nfjax.convert`` (or a training workdir) whose model is ``name``; the model then has its weights,
    class count and options, and ``overrides`` may only change training behaviour (drop rates, dtype)."""
    _check_name(name)
    if pretrained is not None:
        from nfjax.models.pretrained import load_pretrained

        return load_pretrained(pretrained, create_model, expect=name, **overrides)
    cls, kwargs, _ = MODELS[name]
    kwargs = {**kwargs, **overrides}
    try:
        return cls(num_classes=num_classes, in_channels=in_channels, rngs=rngs or nnx.Rngs(0), **kwargs)
    except TypeError as e:
        import inspect

        valid = [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "rngs")]
        raise ValueError(f"bad override for model {name!r}: {e}. Valid arguments: {', '.join(valid)}") from None


__all__ = [
    "MODELS",
    "NFNet",
    "NFResNet",
    "ResNet",
    "create_model",
    "list_models",
    "model_metadata",
]
