"""Full-size parity of the timm import: a randomly initialized timm model (constants perturbed as in the
fixtures) -> its state dict -> ``timm_to_nfjax`` -> nfjax logits, against timm's logits on the same two random
images at the model's test size. Prints a markdown table.

    pip install torch==2.13.0 timm==1.0.31 --extra-index-url https://download.pytorch.org/whl/cpu
    python scripts/timm_parity_full.py                 # e.g. /opt/timmenv/bin/python; about 5 minutes on 2 cores
    python scripts/timm_parity_full.py eca_nfnet_l0    # some models only

The last row imports the dm_nfnet_f0 weights into nfjax's default (DeepMind) layout, tanh GELU and eps floored
at 1e-4 (gains refolded for the eps convention): the difference left between a DeepMind-layout nfjax model and
timm's dm_nfnet_f0 running its exported weights, i.e. the GELU approximation.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from make_timm_fixtures import perturb_constants  # noqa: E402

from nfjax.benchmark_train import import_timm  # noqa: E402

MODELS = ("dm_nfnet_f0", "nf_resnet50", "eca_nfnet_l0", "resnet50")
DEEPMIND_LAYOUT = dict(activation="gelu", ws_eps_mode="floor", ws_eps=1e-4)
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def nfjax_logits(weights: dict, model: str, kwargs: dict, classes: int, images: np.ndarray) -> np.ndarray:
    import jax
    from flax import nnx

    from nfjax.models import create_model

    abstract = nnx.eval_shape(lambda: create_model(model, classes, rngs=nnx.Rngs(0), **kwargs))
    graphdef, params, stats = nnx.split(abstract, nnx.Param, nnx.BatchStat)
    nnx.replace_by_pure_dict(params, weights["params"])
    if "batch_stats" in weights:
        nnx.replace_by_pure_dict(stats, weights["batch_stats"])
    forward = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s)(x))
    return np.asarray(forward(params, stats, images))


def compare(timm, name: str, model_kwargs: dict | None = None) -> dict:
    from nfjax.convert.timm_layout import TIMM_MODELS, timm_to_nfjax

    model = timm.create_model(name, pretrained=False)
    perturb_constants(model, seed=0)
    model.eval()
    size = (model.pretrained_cfg.get("test_input_size") or model.pretrained_cfg["input_size"])[-1]
    images = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = model(images).numpy()
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    weights, classes = timm_to_nfjax(state, name, model_kwargs=model_kwargs)
    nfjax_model, overrides = TIMM_MODELS[name]
    overrides = {**overrides, **(model_kwargs or {})}
    start = time.perf_counter()
    got = nfjax_logits(weights, nfjax_model, overrides, classes, images.permute(0, 2, 3, 1).numpy())
    scale = float(np.abs(expected).max())
    diff = float(np.abs(got - expected).max())
    return dict(
        timm=name,
        nfjax=f"{nfjax_model} {overrides}" if overrides else nfjax_model,
        size=size,
        scale=scale,
        diff=diff,
        ulps=diff / (scale * FLOAT32_EPS),
        top1=bool(np.all(got.argmax(-1) == expected.argmax(-1))),
        seconds=time.perf_counter() - start,
    )


def main(argv: list[str]) -> None:
    timm = import_timm()
    torch.manual_seed(0)
    rows = [compare(timm, name) for name in (argv or MODELS)]
    if not argv or "dm_nfnet_f0" in argv:
        rows.append(compare(timm, "dm_nfnet_f0", DEEPMIND_LAYOUT))
    print(
        "| timm model | nfjax model | px | max abs logit | max abs diff | diff / (max logit * f32 eps) | top-1 same |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['timm']} | {r['nfjax']} | {r['size']} | {r['scale']:.3f} | {r['diff']:.2e} | {r['ulps']:.0f} "
            f"| {'yes' if r['top1'] else 'no'} |"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
