"""Writes the timm parity fixtures of tests/test_convert_timm.py (tests/data/timm/): tiny timm models with the
layouts nfjax converts, their state dicts and their logits on a fixed input.

Runs in a Python that has torch and timm (the tests themselves need neither):

    pip install torch==2.13.0 timm==1.0.31 --extra-index-url https://download.pytorch.org/whl/cpu
    python scripts/make_timm_fixtures.py            # e.g. /opt/timmenv/bin/python scripts/make_timm_fixtures.py

Each model is built from timm's own configuration of a released model (dm_nfnet_f0, nf_resnet50, eca_nfnet_l0,
resnet50) with every layout flag kept and only widths and depths shrunk. Random init, then every tensor that
timm initializes to a constant (gains, biases, SkipInit gains, BatchNorm weights, biases and running
statistics, the zero-initialized last gains) is redrawn, and the classifier is scaled to give logits of order
one, so that a wrong name, transpose or layout option cannot pass. inputs.npy holds the images, [2, 72, 72, 3]
NHWC; for each fixture NAME: NAME.safetensors (the state dict), NAME.npy (its logits, [2, 10]) and NAME.json
(the timm model it is a reduced version of, and the nfjax constructor overrides of that reduction).
72 px makes the later stages odd-sized (9, 5, 3), which exercises padding and the avg-pool shortcut there.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from nfjax.benchmark_train import import_timm  # noqa: E402
from nfjax.convert.safetensors_io import write_safetensors  # noqa: E402

OUT = os.path.join(ROOT, "tests", "data", "timm")
NUM_CLASSES = 10
IMAGE_SIZE = 72

# name -> (released timm model whose config is reduced, NfCfg replacements or ResNet args, nfjax size overrides)
FIXTURES = {
    "dm_nfnet": (
        "dm_nfnet_f0",
        dict(depths=(1, 2, 1, 1), channels=(32, 48, 64, 64), stem_chs=16, group_size=8, num_features=128),
        dict(depths=[1, 2, 1, 1], widths=[32, 48, 64, 64], stem_widths=[2, 4, 8], group_size=8),
    ),
    "nf_resnet": (
        "nf_resnet50",
        dict(depths=(1, 2, 1, 1), channels=(32, 64, 96, 128), stem_chs=16),
        dict(depths=[1, 2, 1, 1], widths=[32, 64, 96, 128], stem_width=16),
    ),
    "eca_nfnet": (
        "eca_nfnet_l0",
        dict(depths=(1, 2, 1, 1), channels=(32, 64, 96, 128), stem_chs=16, group_size=8, num_features=192),
        dict(depths=[1, 2, 1, 1], widths=[32, 64, 96, 128], stem_widths=[2, 4, 8], group_size=8),
    ),
    "resnet": (
        "resnet50",
        dict(layers=(1, 2, 1, 1), channels=(8, 16, 24, 32)),  # timm's 7x7 stem is always 64 wide
        dict(depths=[1, 2, 1, 1], widths=[32, 64, 96, 128], stem_width=64),
    ),
}


def perturb_constants(model: torch.nn.Module, seed: int = 0) -> None:
    """Redraws every tensor whose entries are all equal (what timm initializes to a constant): biases and BN
    running means ~ N(0, 0.1^2), everything else (gains, SkipInit gains, BN weights and variances) ~ U(0.5, 1.5);
    rescales the classifier to std 1/sqrt(fan_in) so the logits are of order one."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point() or tensor.numel() == 0:
                continue
            flat = tensor.reshape(-1)
            if tensor.numel() > 1 and not torch.all(flat == flat[0]):
                continue
            if name.endswith("bias") or name.endswith("running_mean"):
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=gen))
            else:
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=gen))
        fc = model.get_classifier()
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=gen) / fc.weight.shape[1] ** 0.5)


def build_reduced(timm, released: str, replacements: dict) -> torch.nn.Module:
    """timm's config of ``released`` with smaller widths and depths, built by timm's own model classes."""
    if released.startswith("resnet"):
        from timm.models.resnet import Bottleneck, ResNet

        return ResNet(Bottleneck, num_classes=NUM_CLASSES, **replacements)
    from timm.models.nfnet import NormFreeNet, model_cfgs

    return NormFreeNet(dataclasses.replace(model_cfgs[released], **replacements), num_classes=NUM_CLASSES)


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def main() -> None:
    timm = import_timm()
    from nfjax.convert.timm_layout import TIMM_MODELS

    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    images = torch.randn(2, 3, IMAGE_SIZE, IMAGE_SIZE, generator=torch.Generator().manual_seed(1))
    np.save(os.path.join(OUT, "inputs.npy"), images.permute(0, 2, 3, 1).numpy())
    for name, (released, replacements, nfjax_sizes) in FIXTURES.items():
        model = build_reduced(timm, released, replacements)
        perturb_constants(model)
        model.eval()
        with torch.no_grad():
            logits = model(images).numpy()
        state = state_dict_numpy(model)
        write_safetensors(os.path.join(OUT, f"{name}.safetensors"), state, {"format": "pt"})
        np.save(os.path.join(OUT, f"{name}.npy"), logits.astype(np.float32))
        nfjax_model, overrides = TIMM_MODELS[released]
        record = dict(
            timm_model=released,
            nfjax_model=nfjax_model,
            timm_overrides=overrides,
            model_kwargs=nfjax_sizes,
            timm_config=replacements,
        )
        with open(os.path.join(OUT, f"{name}.json"), "w") as f:
            f.write(json.dumps(record) + "\n")
        params = sum(p.numel() for p in model.parameters())
        print(f"{name}: {params} params, logits std {logits.std():.3f}, {len(state)} tensors")


if __name__ == "__main__":
    main()
