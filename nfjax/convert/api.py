"""The conversions behind ``python -m nfjax.convert``: DeepMind or timm file -> weights folder, run -> timm file."""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from nfjax.convert import deepmind as dm
from nfjax.convert import pretrained as pt
from nfjax.convert.errors import ConversionError
from nfjax.convert.safetensors_io import read_safetensors, write_safetensors

# timm's pretrained configs (timm 1.0.31 default_cfgs): train size, test size, and the crop fraction timm
# evaluates the published weights with at the test size (their top-1: docs/pretrained.md).
TIMM_PREPROCESSING = {
    "dm_nfnet_f0": (192, 256, 0.9),
    "dm_nfnet_f1": (224, 320, 0.91),
    "dm_nfnet_f2": (256, 352, 0.92),
    "dm_nfnet_f3": (320, 416, 0.94),
    "dm_nfnet_f4": (384, 512, 0.951),
    "dm_nfnet_f5": (416, 544, 0.954),
    "dm_nfnet_f6": (448, 576, 0.956),
    "nf_resnet50": (256, 288, 0.94),
    "eca_nfnet_l0": (224, 288, 1.0),
    "eca_nfnet_l1": (256, 320, 1.0),
    "eca_nfnet_l2": (320, 384, 1.0),
    "nfnet_l0": (224, 288, 1.0),
    "resnet50": (224, 288, 1.0),
}
DEEPMIND_MODELS = [f"nfnet_f{i}" for i in range(7)]


def read_class_names(path: str | None) -> list[str] | None:
    """One class name per line (blank lines ignored), or None without a file."""
    if path is None:
        return None
    with open(os.path.expanduser(path)) as f:
        return [line.strip() for line in f if line.strip()]


def _abstract_params(model: str, num_classes: int, model_kwargs: dict) -> dict:
    from flax import nnx

    from nfjax.models import create_model

    module = nnx.eval_shape(lambda: create_model(model, num_classes, rngs=nnx.Rngs(0), **model_kwargs))
    return nnx.to_pure_dict(nnx.state(module, nnx.Param))


def deepmind_variant(params: dict) -> str | None:
    """The nfjax model a DeepMind mapping holds (by its block count and widths), or None."""
    from nfjax.models import MODELS

    blocks = len({m.split("/~/")[1] for m in params if m.startswith(f"{dm.ROOT}nf_block")})
    final = params.get(f"{dm.ROOT}final_conv", {}).get("w")
    for name in DEEPMIND_MODELS + [f"{n}plus" for n in DEEPMIND_MODELS]:
        kwargs = MODELS[name][1]
        if sum(kwargs["depths"]) == blocks and final is not None and final.shape[2] == kwargs["widths"][-1]:
            return name
    return None


def convert_deepmind(
    path: str, model: str, out: str, class_names_file: str | None = None, model_kwargs: dict | None = None
) -> dict[str, Any]:
    """A DeepMind release file (``F0_haiku.npz``..) -> weights folder for nfjax model ``model`` (nfnet_f0..).
    ``model_kwargs``: constructor overrides for a file of a non-standard size (then no variant is detected)."""
    params = dm.load_deepmind_file(path)
    found = deepmind_variant(params)
    if not model_kwargs and found != model:
        hint = f"it holds {found}: use --model {found}" if found else "it holds no NFNet variant nfjax knows"
        raise ConversionError(f"{path} does not hold {model}; {hint}")
    classes = params[f"{dm.ROOT}linear"]["b"].shape[0]
    weights = {"params": dm.deepmind_to_nfjax(params, _abstract_params(model, classes, model_kwargs or {}))}
    from nfjax.models import model_metadata

    meta = model_metadata(model)
    test = meta["test_size"]
    prep = pt.preprocessing(meta["train_size"], test, resize="deepmind", crop_pct=test / (test + 32))
    source = dict(kind="deepmind", file=os.path.basename(path), sha256=pt.sha256_of(path))
    return pt.save_pretrained(
        out,
        model=model,
        model_kwargs=model_kwargs or {},
        weights=weights,
        source=source,
        prep=prep,
        class_names=read_class_names(class_names_file),
    )


def read_state_dict(path: str) -> dict[str, np.ndarray]:
    """A timm state dict from ``.safetensors`` (NumPy only) or ``.pth``/``.bin`` (torch, weights only)."""
    if path.endswith(".safetensors"):
        return read_safetensors(path)
    try:
        import torch
    except ImportError:
        raise ConversionError(
            f"{path} is a PyTorch pickle; reading it needs torch (pip install torch), or convert the "
            ".safetensors file of the same weights, which needs no torch"
        ) from None
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's errors for refused globals, truncation and bad zip files vary
        raise ConversionError(f"cannot read {path} as a PyTorch state dict ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(data, dict) and isinstance(data.get(key), dict):
            data = data[key]
            break
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in data.items()}


def convert_timm(
    path: str, model: str, out: str, class_names_file: str | None = None, model_kwargs: dict | None = None
) -> dict[str, Any]:
    """A timm checkpoint -> weights folder. ``model`` is timm's name (dm_nfnet_f0, eca_nfnet_l0, ...);
    ``model_kwargs`` adds constructor overrides for a file of a non-standard size (widths, depths, ...)."""
    from nfjax.convert import timm_layout

    if model not in timm_layout.TIMM_MODELS:
        raise ConversionError(
            f"unknown timm model {model!r}; nfjax converts: {', '.join(sorted(timm_layout.TIMM_MODELS))}"
        )
    state = read_state_dict(path)
    found = timm_layout.detect_timm_model(state)
    if not model_kwargs and found is not None and found != model:
        raise ConversionError(f"{path} holds timm's {found}, not {model}: use --model {found}")
    weights, _ = timm_layout.timm_to_nfjax(state, model, model_kwargs=model_kwargs)
    name, kwargs = timm_layout.TIMM_MODELS[model]
    kwargs = {**kwargs, **(model_kwargs or {})}
    train, test, crop = TIMM_PREPROCESSING.get(model, (224, 224, 0.875))
    prep = pt.preprocessing(train, test, resize="crop_pct", crop_pct=crop)
    source = dict(kind="timm", timm_model=model, file=os.path.basename(path), sha256=pt.sha256_of(path))
    return pt.save_pretrained(
        out,
        model=name,
        model_kwargs=kwargs,
        weights=weights,
        source=source,
        prep=prep,
        class_names=read_class_names(class_names_file),
    )


def export_timm(run_dir: str, out: str, which: str = "auto") -> str:
    """Writes the weights of a run (or a weights folder) as a timm state dict in safetensors; returns the timm
    model name to build it with. ``which``: 'params', 'ema', or 'auto' (EMA when the run keeps one)."""
    from nfjax.convert import timm_layout

    run = pt.load_weights(run_dir)
    model, kwargs = run.experiment.model.name, run.experiment.model.kwargs
    timm_name = timm_layout.timm_name_for(model, kwargs)
    if timm_name is None:
        raise ConversionError(
            f"the run's model {model} {kwargs} has no timm equivalent; timm-compatible models: "
            + ", ".join(f"{n} ({m} {k})" for n, (m, k) in sorted(timm_layout.TIMM_MODELS.items()))
        )
    if which not in ("auto", "params", "ema"):
        raise ConversionError(f"--weights must be auto, params or ema, got {which!r}")
    if which == "ema" and "ema" not in run.weights:
        raise ConversionError(f"{run_dir} keeps no EMA weights; use --weights params")
    tree = "ema" if which == "ema" or (which == "auto" and "ema" in run.weights) else "params"
    weights = {"params": run.weights[tree], "batch_stats": run.weights.get("batch_stats", {})}
    weights = jax.tree.map(np.asarray, weights)
    classes = run.experiment.model.num_classes
    state = timm_layout.nfjax_to_timm(weights, model, kwargs, classes)
    write_safetensors(out, state, {"format": "pt", "timm_model": timm_name, "num_classes": str(classes)})
    return timm_name
