"""Every hyperparameter of the shipped recipes beside its reference value and where that value comes from.

``REFERENCES[config file name]`` lists :class:`Ref` rows: a config key, the value the reference uses (in
nfjax's units) and the source (file and line of the reference code, or the paper's table). docs/recipes.md is
generated from these rows and the configs themselves (``python scripts/make_recipes_doc.py``), and the tests
fail when a config value no longer equals the reference value its row records or when the document is stale.
``DIFFERENCES`` lists what a config key cannot express: where nfjax knowingly differs, and what could not be
checked offline. ``OWN_RECIPES`` are nfjax's own recipes (no external reference): the document shows their
values, nothing is compared.

The reference values below are typed in from the sources, never read from nfjax's own tables, so that a change
to nfjax/recipes.py or nfjax/models/ that moves a recipe away from its reference fails the tests.
"""

from __future__ import annotations

import ast
import dataclasses
import glob
import inspect
import os
from typing import Any

import ml_collections

from nfjax.clipping import CLASSIFIER_KERNEL, NO_DECAY_NAMES
from nfjax.config_lib import load_config_file
from nfjax.models import MODELS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNVERIFIED = "UNVERIFIED offline"

# Short names used in the rows' sources -> the exact file, commit or paper. Every row names one of these.
SOURCES = {
    "dm/experiment_nfnets.py": "github.com/google-deepmind/deepmind-research @ 68a1754, nfnets/experiment_nfnets.py",
    "dm/base.py": "github.com/google-deepmind/deepmind-research @ 68a1754, nfnets/base.py",
    "dm/dataset.py": "github.com/google-deepmind/deepmind-research @ 3146ff9, nfnets/dataset.py",
    "dm/utils.py": "github.com/google-deepmind/deepmind-research @ a7d7501, nfnets/utils.py",
    "dm/optim.py": "github.com/google-deepmind/deepmind-research, nfnets/optim.py (cited by class and method; not read "
    "whole offline)",
    "dm/experiment.py": "github.com/google-deepmind/deepmind-research @ 6fcb842, nfnets/experiment.py "
    "(the generic ImageNet experiment; its model is a BN ResNet-50)",
    "dm/nf_resnet.py": "github.com/google-deepmind/deepmind-research @ abc9ba0, nfnets/nf_resnet.py",
    "NFNet paper": "Brock, De, Smith, Simonyan 2021, arXiv 2102.06171 (NFNets, AGC)",
    "NF-ResNet paper": "Brock, De, Smith 2021, arXiv 2101.08692, ICLR 2021 (NF-ResNets)",
    "SAM paper": "Foret et al. 2021, arXiv 2010.01412 (Sharpness-Aware Minimization)",
    "RSB Table 1": "Wightman, Touvron, Jegou 2021, arXiv 2110.00476, Table 1 (ResNet strikes back)",
    "timm-0.5.4": "github.com/huggingface/pytorch-image-models, release 0.5.4 (PyPI sdist; the RSB-era library)",
    "timm-1.0.31": "github.com/huggingface/pytorch-image-models, release 1.0.31 (PyPI wheel)",
    "timm train.py@004fb5f": "github.com/huggingface/pytorch-image-models @ 004fb5f, train.py (argument defaults, "
    "2022: the RSB-era script; cited by argument name)",
    "tv/train.py": "github.com/pytorch/vision @ 017e9b9, references/classification/train.py (cited by argument name)",
    "tv/presets.py": "github.com/pytorch/vision @ 080836e, references/classification/presets.py",
    "tv/README.md": "github.com/pytorch/vision @ 212ff51, references/classification/README.md",
    "tv/models/resnet.py": "github.com/pytorch/vision, torchvision/models/resnet.py (not re-read offline)",
}

LABELS = {
    "model.name": "model",
    "model.kwargs.se_ratio": "squeeze-excite ratio (0: none)",
    "model.kwargs.alpha": "residual alpha",
    "model.kwargs.stochdepth_rate": "stochastic depth rate",
    "model.kwargs.drop_rate": "dropout before the classifier",
    "model.kwargs.activation": "activation",
    "model.kwargs.final_conv_mult": "final conv width multiplier",
    "model.kwargs.use_two_convs": "two 3x3 convs per block",
    "model.kwargs.zero_init_last": "last BN scale of each block starts at 0",
    "model.kwargs.bn_ghost_size": "examples per BatchNorm statistics group (0: the whole batch)",
    "train.global_batch": "global batch",
    "train.epochs": "epochs",
    "train.step_counting": "step counting",
    "train.loss": "loss",
    "train.bce_reduction": "BCE reduction",
    "optim.name": "optimizer",
    "optim.base_lr": "peak lr per 256 examples",
    "optim.scale_lr_by_batch": "lr scaled by batch / 256",
    "optim.momentum": "momentum",
    "optim.nesterov": "Nesterov",
    "optim.b1": "beta1",
    "optim.b2": "beta2",
    "optim.eps": "eps",
    "optim.weight_decay": "weight decay",
    "optim.decay_mode": "weight decay mode",
    "optim.decay_exclude": "params without weight decay",
    "optim.decay_min_ndim": "params of rank < this: no weight decay",
    "optim.clipping": "gradient clipping",
    "optim.agc_lambda": "AGC lambda",
    "optim.agc_eps": "AGC eps",
    "optim.clip_exclude": "params not clipped",
    "optim.max_grad_norm": "max global grad norm",
    "optim.schedule": "lr schedule",
    "optim.schedule_unit": "lr changes every",
    "optim.warmup_epochs": "warmup epochs",
    "optim.warmup_start_lr": "lr at warmup start",
    "optim.end_lr_factor": "final lr / peak lr",
    "optim.cooldown_epochs": "cooldown epochs",
    "optim.step_boundaries_epochs": "lr step boundaries (epochs)",
    "optim.step_decay_factor": "lr factor at each step",
    "optim.ema_decay": "parameter EMA decay (0: off)",
    "optim.sam_rho": "SAM rho (0: off)",
    "optim.sam_fraction": "SAM ascent batch fraction",
    "optim.backbone_lr_scale": "backbone lr / classifier lr",
    "data.image_size": "train image size",
    "data.eval_image_size": "eval image size",
    "data.eval_preprocess": "eval preprocessing",
    "data.crop_pct": "eval crop fraction",
    "data.eval_interpolation": "eval resize interpolation",
    "data.random_resized_crop": "random-resized crop",
    "data.rrc_mode": "random-resized crop sampler",
    "data.train_interpolation": "train resize interpolation",
    "data.pad_crop": "pad-and-crop pixels",
    "data.flip": "horizontal flip",
    "data.randaugment_layers": "RandAugment layers (0: off)",
    "data.randaugment_magnitude": "RandAugment magnitude",
    "data.randaugment_variant": "RandAugment ops",
    "data.randaugment_magnitude_std": "RandAugment magnitude std",
    "data.randaugment_prob": "RandAugment op probability",
    "data.mixup_alpha": "MixUp alpha (0: off)",
    "data.cutmix_alpha": "CutMix alpha (0: off)",
    "data.mix_mode": "MixUp / CutMix combination",
    "data.switch_prob": "CutMix switch probability",
    "data.augment_before_mix": "RandAugment before mixing",
    "data.label_smoothing": "label smoothing",
    "data.bce_target_thresh": "BCE target threshold",
    "data.repeated_aug": "repeated augmentation",
}


@dataclasses.dataclass(frozen=True)
class Ref:
    """One hyperparameter: ``key`` a dotted config path (``model.kwargs.X`` falls back to the zoo's and the
    constructor's defaults), ``value`` the reference's value in nfjax's units, ``source`` where it comes from."""

    label: str
    key: str
    value: Any
    source: str
    note: str = ""


def ref(key: str, value: Any, source: str, note: str = "") -> Ref:
    """A :class:`Ref` labelled from :data:`LABELS`."""
    return Ref(LABELS[key], key, value, source, note)


def config_value(cfg: ml_collections.ConfigDict, key: str) -> Any:
    """The value a run of ``cfg`` uses for ``key``; model kwargs not set by the config come from the model
    table, then from the constructor's signature."""
    node: Any = cfg
    parts = key.split(".")
    if parts[:2] == ["model", "kwargs"] and parts[2] not in cfg.model.kwargs:
        model_cls, table_kwargs, _ = MODELS[cfg.model.name]
        if parts[2] in table_kwargs:
            return table_kwargs[parts[2]]
        params = inspect.signature(model_cls.__init__).parameters
        if parts[2] not in params:
            raise KeyError(f"{key}: {model_cls.__name__} has no argument {parts[2]!r}")
        return params[parts[2]].default
    for part in parts:
        node = node[part]
    return tuple(node) if isinstance(node, list) else node


def same(a: Any, b: Any) -> bool:
    """Equality for config values: numbers compare within float rounding (bools only with bools), sequences
    element-wise."""
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if a is None or b is None:
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(a - b) <= 1e-12 * max(1.0, abs(a), abs(b))
    return a == b


# ------------------------------------------------------------------------------------------------ NFNets

# DeepMind's nfnet_params (dm/base.py, the entry of F0 starts at line 58, each entry 4 lines): train size, test
# size, dropout; RandAugment magnitude from the RA levels of dm/experiment_nfnets.py:87-88 ('405' = 4 x 5).
DM_NFNET = {
    "F0": (192, 256, 0.2, 5.0),
    "F1": (224, 320, 0.3, 10.0),
    "F2": (256, 352, 0.4, 10.0),
    "F3": (320, 416, 0.4, 15.0),
    "F4": (384, 512, 0.5, 15.0),
    "F5": (416, 544, 0.5, 15.0),
    "F6": (448, 576, 0.5, 15.0),
    "F7": (480, 608, 0.5, 15.0),
}
XN = "dm/experiment_nfnets.py"


def nfnet_refs(variant: str) -> list[Ref]:
    """DeepMind's NFNet ImageNet recipe for one variant."""
    train_px, test_px, drop, ra_m = DM_NFNET[variant]
    line = 58 + 4 * list(DM_NFNET).index(variant)
    table = f"dm/base.py:{line}-{line + 3}"
    sam = variant == "F6"
    return [
        ref("model.name", f"nfnet_{variant.lower()}", f"{XN}:71", "model_kwargs.variant"),
        ref("model.kwargs.se_ratio", 0.5, f"{XN}:73"),
        ref("model.kwargs.alpha", 0.2, f"{XN}:74"),
        ref("model.kwargs.stochdepth_rate", 0.25, f"{XN}:75"),
        ref("model.kwargs.drop_rate", drop, f"{XN}:76; {table}", "drop_rate=None: the variant's native rate"),
        ref("model.kwargs.activation", "gelu", f"{XN}:77"),
        ref("model.kwargs.final_conv_mult", 2.0, f"{XN}:78"),
        ref("model.kwargs.use_two_convs", True, f"{XN}:80"),
        ref("train.global_batch", 4096, f"{XN}:28"),
        ref("train.epochs", 360.0, f"{XN}:30"),
        ref("train.step_counting", "examples", f"{XN}:31-32", "(1281167 x 360) // 4096 steps; epochs of N / B steps"),
        ref("train.loss", "softmax_xent", f"{XN}:54; dm/utils.py:49"),
        ref("optim.name", "sgd", f"{XN}:65", "SGD_AGC"),
        ref("optim.base_lr", 0.1, f"{XN}:38"),
        ref("optim.scale_lr_by_batch", True, f"{XN}:63, 110-111", "max lr = 0.1 x 4096 / 256 = 1.6"),
        ref("optim.momentum", 0.9, f"{XN}:66"),
        ref("optim.nesterov", True, f"{XN}:66"),
        ref("optim.weight_decay", 2e-5, f"{XN}:67"),
        ref("optim.decay_mode", "coupled", "dm/optim.py: SGD_AGC -> SGD.update_param", "wd x param added to the grad"),
        ref(
            "optim.decay_exclude",
            (NO_DECAY_NAMES,),
            f"{XN}:100-104, 120",
            "DeepMind: names scale, offset, b, or containing gain / bias; the same params under nfjax's names",
        ),
        ref("optim.decay_min_ndim", 2, f"{XN}:100-104", "every NFNet param of rank < 2 is a gain or bias already"),
        ref("optim.clipping", "agc", f"{XN}:65"),
        ref("optim.agc_lambda", 0.01, f"{XN}:68"),
        ref("optim.agc_eps", 1e-3, f"{XN}:68"),
        ref("optim.clip_exclude", (CLASSIFIER_KERNEL,), f"{XN}:105-108, 121", "the final 'linear' (not SE) kernel"),
        ref("optim.schedule", "warmup_cosine", f"{XN}:57", "WarmupCosineDecay"),
        ref("optim.schedule_unit", "step", f"{XN}:58", "num_steps = training steps: lr changes every step"),
        ref("optim.warmup_epochs", 5.0, f"{XN}:61", "warmup_steps = 5 x steps_per_epoch"),
        ref("optim.warmup_start_lr", 0.0, f"{XN}:59"),
        ref("optim.end_lr_factor", 0.0, f"{XN}:60"),
        ref("optim.ema_decay", 0.99999, f"{XN}:43-44; dm/utils.py:75", "decay min(0.99999, (1+t)/(10+t))"),
        ref(
            "optim.sam_rho",
            0.05 if sam else 0.0,
            "SAM paper (default rho); NFNet paper (F6 trained with SAM)" if sam else f"{XN} (no SAM in the code)",
            f"rho for ImageNet not published: {UNVERIFIED}" if sam else "",
        ),
        *([ref("optim.sam_fraction", 0.2, "NFNet paper (SAM ascent on 20% of the batch)", UNVERIFIED)] if sam else []),
        ref("data.image_size", train_px, f"{table} (train_imsize)"),
        ref("data.eval_image_size", test_px, f"{table} (test_imsize)"),
        ref("data.eval_preprocess", "deepmind", f"{XN}:48; dm/dataset.py:531-538", "resize to S+32 (bicubic), crop S"),
        ref("data.random_resized_crop", True, "dm/dataset.py:373"),
        ref("data.rrc_mode", "deepmind", "dm/dataset.py:465-475", "area 0.08-1, aspect 3/4-4/3, 10 tries"),
        ref("data.train_interpolation", "bicubic", "dm/dataset.py:376"),
        ref("data.flip", True, "dm/dataset.py:374"),
        ref("data.randaugment_layers", 4, f"{XN}:87-88; dm/dataset.py:410-412"),
        ref("data.randaugment_magnitude", ra_m, f"{XN}:87-88"),
        ref("data.randaugment_variant", "deepmind", "dm/dataset.py:416-417", "DeepMind's autoaugment.py ops"),
        ref("data.mixup_alpha", 0.2, f"{XN}:89; dm/dataset.py:158"),
        ref("data.cutmix_alpha", 1.0, "dm/dataset.py:247-248", "area ~ U(0, 1), i.e. Beta(1, 1)"),
        ref("data.mix_mode", "deepmind", "dm/dataset.py:201-203, 309-329", "half the batch MixUp, half CutMix"),
        ref("data.augment_before_mix", False, f"{XN}:47; dm/dataset.py:205-208"),
        ref("data.label_smoothing", 0.1, f"{XN}:40"),
        ref("data.repeated_aug", 1, "dm/dataset.py:131-136", "plain shuffled repeat"),
    ]


NFNET_DIFFERENCES = [
    "DeepMind trains in bfloat16 (dm/experiment_nfnets.py:55); nfjax's train.compute_dtype='auto' does so on "
    "GPU and TPU and uses float32 on CPU.",
]
F6_DIFFERENCES = [
    "SAM: DeepMind's released code has no SAM; the NFNet paper reports F6 trained with SAM but gives no rho for "
    f"ImageNet. nfjax uses rho 0.05 (the SAM paper's default) and an ascent batch of 20% ({UNVERIFIED}: both "
    "come from the project's notes on the paper, not from a source read here).",
]


# ------------------------------------------------------------------------------------------------ NF-ResNet-50

XG = "dm/experiment.py"
NF_RESNET50 = [
    ref("model.name", "nf_resnet50", "dm/nf_resnet.py:27", "depths (3, 4, 6, 3)"),
    ref("model.kwargs.alpha", 0.2, "dm/nf_resnet.py:36"),
    ref("model.kwargs.stochdepth_rate", 0.1, "dm/nf_resnet.py:36"),
    ref(
        "model.kwargs.drop_rate",
        0.25,
        "NF-ResNet paper",
        f"{UNVERIFIED}; dm/nf_resnet.py:36 has no usable default (None reads a missing table entry)",
    ),
    ref("model.kwargs.activation", "relu", "dm/nf_resnet.py:37"),
    ref("model.kwargs.se_ratio", 0.0, "dm/nf_resnet.py:38", "use_se=False"),
    ref("train.global_batch", 1024, f"{XG}:46"),
    ref("train.epochs", 90.0, f"{XG}:48"),
    ref("train.step_counting", "examples", f"{XG}:47-50", "(1281167 x 90) // 1024 steps"),
    ref("train.loss", "softmax_xent", f"{XG}:73"),
    ref("optim.name", "sgd", f"{XG}:86"),
    ref("optim.base_lr", 0.1, f"{XG}:55"),
    ref("optim.scale_lr_by_batch", True, f"{XG}:84", "max lr = 0.1 x 1024 / 256 = 0.4"),
    ref("optim.momentum", 0.9, f"{XG}:88"),
    ref("optim.nesterov", True, f"{XG}:89"),
    ref(
        "optim.weight_decay",
        5e-5,
        "NF-ResNet paper",
        f"{UNVERIFIED}; dm/experiment.py:90 (a BN ResNet-50 config) has 1e-4; see the differences",
    ),
    ref("optim.decay_mode", "coupled", "dm/optim.py: SGD.update_param", "wd x param added to the grad"),
    ref("optim.decay_exclude", (NO_DECAY_NAMES,), f"{XG}:184-188", "scale, offset, b, *gain*, *bias*"),
    ref("optim.decay_min_ndim", 2, f"{XG}:184-188", "every NF-ResNet param of rank < 2 is a gain or bias"),
    ref("optim.clipping", "agc", "NFNet paper (Section 4: AGC on NF-ResNets)", "not in the NF-ResNet paper"),
    ref("optim.agc_lambda", 0.01, f"{XN}:68; NFNet paper"),
    ref("optim.agc_eps", 1e-3, f"{XN}:68"),
    ref("optim.clip_exclude", (CLASSIFIER_KERNEL,), f"{XN}:105-108, 121"),
    ref("optim.schedule", "warmup_cosine", f"{XG}:77"),
    ref("optim.schedule_unit", "step", f"{XG}:79", "num_steps = training steps"),
    ref("optim.warmup_epochs", 5.0, f"{XG}:82"),
    ref("optim.warmup_start_lr", 0.0, f"{XG}:80"),
    ref("optim.end_lr_factor", 0.0, f"{XG}:81"),
    ref("optim.ema_decay", 0.99999, f"{XN}:43-44", f"the NFNet recipe's EMA; {XG}:60 has use_ema=False"),
    ref("optim.sam_rho", 0.0, XG, "no SAM"),
    ref("data.image_size", 224, f"{XG}:59"),
    ref("data.eval_image_size", 224, f"{XG}:59"),
    ref(
        "data.eval_preprocess",
        "crop_pct",
        f"{XG}:66; dm/dataset.py:378-381, 479-500",
        "'crop_resize': centre window of S/(S+32) of the short side, resized to S",
    ),
    ref("data.crop_pct", 0.875, "dm/dataset.py:489-494", "224 / (224 + 32)"),
    ref("data.eval_interpolation", "bicubic", "dm/dataset.py:381"),
    ref("data.random_resized_crop", True, "dm/dataset.py:373"),
    ref("data.rrc_mode", "deepmind", "dm/dataset.py:465-475"),
    ref("data.train_interpolation", "bicubic", "dm/dataset.py:376"),
    ref("data.flip", True, "dm/dataset.py:374"),
    ref("data.randaugment_layers", 0, f"{XG}:64", "augment_name=None"),
    ref("data.mixup_alpha", 0.0, f"{XG}:64"),
    ref("data.cutmix_alpha", 0.0, f"{XG}:64"),
    ref("data.label_smoothing", 0.1, f"{XG}:57"),
    ref("data.repeated_aug", 1, "dm/dataset.py:131-136"),
]
NF_RESNET50_DIFFERENCES = [
    "The NF-ResNet paper's own training setup (its appendix) could not be read offline: the weight decay 5e-5, "
    f"the dropout 0.25 and whether the paper used an EMA of the weights are {UNVERIFIED}. DeepMind's released "
    "generic experiment (dm/experiment.py) trains a BN ResNet-50 with weight decay 1e-4 and no EMA.",
    "AGC (lambda 0.01) comes from the later NFNet paper, which trains NF-ResNets with it at large batch sizes; "
    "the NF-ResNet paper trains without gradient clipping. nfjax keeps AGC for this recipe (optim.clipping='none' "
    "reproduces the unclipped setting).",
    "EMA 0.99999 is the NFNet recipe's, not the generic experiment's (use_ema=False, dm/experiment.py:60). Every "
    "evaluation reports the raw weights as well, and those are the comparable numbers.",
    "Evaluation: DeepMind's 'crop_resize' crops the centre window first and resizes it (bicubic) to 224; nfjax's "
    "'crop_pct' resizes the short side to 256 and then crops 224: the same window, resampled in the other order.",
]


# ------------------------------------------------------------------------------------------------ torchvision

TV = "tv/train.py"
RESNET50_BN = [
    ref("model.name", "resnet50", f"{TV} --model", "ResNet-50 v1.5 (stride 2 in the 3x3 conv), as nfjax's"),
    ref("model.kwargs.zero_init_last", False, "tv/models/resnet.py", "zero_init_residual=False"),
    ref("model.kwargs.stochdepth_rate", 0.0, "tv/models/resnet.py", "none"),
    ref("model.kwargs.drop_rate", 0.0, "tv/models/resnet.py", "none"),
    ref(
        "model.kwargs.bn_ghost_size",
        32,
        "tv/README.md:7; tv/train.py --sync-bn",
        "8 GPUs x 32 images without --sync-bn: each BN layer's statistics are those of 32 images",
    ),
    ref("train.global_batch", 256, f"{TV} --batch-size 32 per GPU; tv/README.md:7", "8 GPUs x 32"),
    ref("train.epochs", 90.0, f"{TV} --epochs"),
    ref("train.step_counting", "epochs", f"{TV}", "one pass of the data loader per epoch"),
    ref("train.loss", "softmax_xent", f"{TV} (nn.CrossEntropyLoss)"),
    ref("optim.name", "sgd", f"{TV} --opt"),
    ref("optim.base_lr", 0.1, f"{TV} --lr", "0.1 at batch 256: 0.1 per 256"),
    ref("optim.scale_lr_by_batch", True, f"{TV} --lr", "torchvision does not scale; equal at batch 256"),
    ref("optim.momentum", 0.9, f"{TV} --momentum"),
    ref("optim.nesterov", False, f"{TV} --opt sgd", "Nesterov only for --opt sgd_nesterov"),
    ref("optim.weight_decay", 1e-4, f"{TV} --wd"),
    ref("optim.decay_mode", "coupled", f"{TV} (torch.optim.SGD)", "wd x param added to the grad"),
    ref("optim.decay_exclude", (), f"{TV} --norm-weight-decay None", "BN params and biases decayed too"),
    ref("optim.decay_min_ndim", 0, f"{TV} --norm-weight-decay None"),
    ref("optim.clipping", "none", f"{TV} --clip-grad-norm None"),
    ref("optim.schedule", "step", f"{TV} --lr-scheduler steplr"),
    ref("optim.schedule_unit", "step", f"{TV} --lr-scheduler steplr", "boundaries at whole epochs: same lr"),
    ref("optim.warmup_epochs", 0.0, f"{TV} --lr-warmup-epochs"),
    ref("optim.step_boundaries_epochs", (30.0, 60.0), f"{TV} --lr-step-size 30", "every 30 of 90 epochs"),
    ref("optim.step_decay_factor", 0.1, f"{TV} --lr-gamma"),
    ref("optim.ema_decay", 0.0, f"{TV} --model-ema (off)"),
    ref("optim.sam_rho", 0.0, TV, "no SAM"),
    ref("data.image_size", 224, f"{TV} --train-crop-size"),
    ref("data.eval_image_size", 224, f"{TV} --val-crop-size"),
    ref("data.eval_preprocess", "crop_pct", "tv/presets.py:62-63", "Resize(256) of the short side, CenterCrop(224)"),
    ref("data.crop_pct", 0.875, f"{TV} --val-resize-size 256", "224 / 256"),
    ref("data.eval_interpolation", "bilinear", f"{TV} --interpolation; tv/presets.py:57"),
    ref("data.random_resized_crop", True, "tv/presets.py:20"),
    ref("data.rrc_mode", "torchvision", "tv/presets.py:20", "RandomResizedCrop: area 0.08-1, aspect 3/4-4/3"),
    ref("data.train_interpolation", "bilinear", f"{TV} --interpolation; tv/presets.py:13, 20"),
    ref("data.flip", True, "tv/presets.py:14, 21-22"),
    ref("data.randaugment_layers", 0, f"{TV} --auto-augment None"),
    ref("data.mixup_alpha", 0.0, f"{TV} --mixup-alpha"),
    ref("data.cutmix_alpha", 0.0, f"{TV} --cutmix-alpha"),
    ref("data.label_smoothing", 0.0, f"{TV} --label-smoothing"),
    ref("data.repeated_aug", 1, TV, "no repeated-augmentation sampler"),
]
RESNET50_BN_DIFFERENCES = [
    "BatchNorm statistics: the config's bn_ghost_size=32 gives each group of 32 consecutive examples its own "
    "statistics, as torchvision's 8 GPUs without --sync-bn do; the running averages nfjax keeps for evaluation "
    "are the mean over the groups (torchvision evaluates with GPU 0's).",
    "torchvision's train loader keeps the last partial batch of each epoch; nfjax takes floor(N / 256) whole "
    "batches per epoch (5,004 instead of 5,005 steps on ImageNet).",
    "The expected 76.13% top-1 belongs to torchvision's original ResNet50_Weights.IMAGENET1K_V1, trained with an "
    "earlier version of this script; the current README's ResNet section and table could not be read offline "
    f"({UNVERIFIED}); the defaults above are those of train.py @ 017e9b9.",
]


# ------------------------------------------------------------------------------------------------ RSB

# RSB Table 1 per procedure: epochs, lr at batch 2048, weight decay, label smoothing, MixUp alpha, RandAugment
# magnitude, repeated augmentation, stochastic depth, train size.
RSB_TABLE = {
    "a1": (600.0, 5e-3, 0.01, 0.1, 0.2, 7.0, 3, 0.05, 224),
    "a2": (300.0, 5e-3, 0.02, 0.0, 0.1, 7.0, 3, 0.05, 224),
    "a3": (100.0, 8e-3, 0.02, 0.0, 0.1, 6.0, 1, 0.0, 160),
}
T5, T1 = "timm-0.5.4", "timm-1.0.31"
TT = "timm train.py@004fb5f"


def rsb_refs(which: str) -> list[Ref]:
    """ResNet strikes back A1 / A2 / A3 (BN ResNet-50, LAMB, BCE)."""
    epochs, lr, wd, smoothing, mixup, ra_m, repeats, drop_path, train_px = RSB_TABLE[which]
    rsb = "RSB Table 1"
    return [
        ref("model.name", "resnet50", rsb),
        ref("model.kwargs.stochdepth_rate", drop_path, rsb, "stochastic depth (drop path)"),
        ref("model.kwargs.zero_init_last", True, f"{T5} timm/models/resnet.py:590-592", "zero_init_last_bn=True"),
        ref("model.kwargs.drop_rate", 0.0, f"{rsb}; {TT} --drop", "no dropout"),
        ref("train.global_batch", 2048, rsb),
        ref("train.epochs", epochs, rsb),
        ref("train.step_counting", "epochs", f"{T5} timm/data/loader.py:235", "drop_last: floor(N / B) steps"),
        ref("train.loss", "sigmoid_bce", rsb),
        ref("train.bce_reduction", "mean", f"{T5} timm/loss/binary_cross_entropy.py:18, 43-47", "mean over classes"),
        ref("optim.name", "lamb", rsb),
        ref("optim.base_lr", lr * 256 / 2048, rsb, f"lr {lr:g} at batch 2048 = {lr * 256 / 2048:g} per 256"),
        ref("optim.scale_lr_by_batch", True, rsb, "linear in the batch, as timm's --lr at another batch"),
        ref("optim.b1", 0.9, f"{T5} timm/optim/lamb.py:88"),
        ref("optim.b2", 0.999, f"{T5} timm/optim/lamb.py:88"),
        ref("optim.eps", 1e-6, f"{T5} timm/optim/lamb.py:88"),
        ref("optim.weight_decay", wd, rsb),
        ref("optim.decay_mode", "decoupled", f"{T5} timm/optim/lamb.py:170-172", "wd x param added to the update"),
        ref("optim.decay_exclude", (NO_DECAY_NAMES,), f"{T5} timm/optim/optim_factory.py:37", "biases, BN params"),
        ref("optim.decay_min_ndim", 2, f"{T5} timm/optim/optim_factory.py:37", "1-d params not decayed"),
        ref("optim.clipping", "global_norm", f"{T5} timm/optim/lamb.py:108-127", "inside timm's Lamb"),
        ref("optim.max_grad_norm", 1.0, f"{T5} timm/optim/lamb.py:89"),
        ref("optim.schedule", "timm_cosine", f"{rsb}; {T5} timm/scheduler/cosine_lr.py"),
        ref("optim.schedule_unit", "epoch", f"{T5} timm/scheduler/cosine_lr.py:39", "t_in_epochs=True"),
        ref("optim.warmup_epochs", 5.0, rsb),
        ref(
            "optim.warmup_start_lr",
            1e-5,
            f"{T1} timm/scheduler/scheduler_factory.py:36, 76",
            f"timm 1.0's --warmup-lr; {TT} --warmup-lr: 1e-4",
        ),
        ref(
            "optim.end_lr_factor",
            0.0,
            f"{T1} timm/scheduler/scheduler_factory.py:35, 75",
            f"timm 1.0's --min-lr 0; {TT} --min-lr: 1e-6",
        ),
        ref(
            "optim.cooldown_epochs",
            0.0,
            f"{T1} timm/scheduler/scheduler_factory.py:32, 72",
            f"timm 1.0's default; {TT} --cooldown-epochs: 10",
        ),
        ref("optim.ema_decay", 0.0, f"{rsb}; {TT} --model-ema (off)", "no EMA"),
        ref("optim.sam_rho", 0.0, rsb, "no SAM"),
        ref("data.image_size", train_px, rsb),
        ref("data.eval_image_size", 224, rsb),
        ref("data.eval_preprocess", "crop_pct", f"{T5} timm/data/transforms_factory.py:130-151"),
        ref("data.crop_pct", 0.95, f"{rsb}; {T5} timm/models/resnet.py:56-58"),
        ref("data.eval_interpolation", "bicubic", f"{T5} timm/models/resnet.py:58"),
        ref("data.random_resized_crop", True, f"{T5} timm/data/transforms_factory.py:69-72"),
        ref("data.rrc_mode", "torchvision", f"{T5} timm/data/transforms.py:100", "area 0.08-1, aspect 3/4-4/3"),
        ref("data.train_interpolation", "random", f"{TT} --train-interpolation; {T5} transforms_factory.py:52"),
        ref("data.flip", True, f"{T5} timm/data/transforms_factory.py:48, 73-74"),
        ref("data.randaugment_layers", 2, f"{T5} timm/data/auto_augment.py:684", "rand-m7-mstd0.5-inc1: no n"),
        ref("data.randaugment_magnitude", ra_m, rsb),
        ref("data.randaugment_variant", "timm", f"{rsb}; {T5} timm/data/auto_augment.py:705", "'inc1' ops"),
        ref("data.randaugment_magnitude_std", 0.5, rsb),
        ref("data.randaugment_prob", 0.5, f"{T5} timm/data/auto_augment.py:638"),
        ref("data.mixup_alpha", mixup, rsb),
        ref("data.cutmix_alpha", 1.0, rsb),
        ref("data.mix_mode", "timm", f"{TT} --mixup-mode batch", "MixUp or CutMix per batch"),
        ref("data.switch_prob", 0.5, f"{TT} --mixup-switch-prob"),
        ref("data.augment_before_mix", True, f"{T5} timm/data/transforms_factory.py:79-91", "per image, then Mixup"),
        ref("data.label_smoothing", smoothing, rsb),
        ref(
            "data.bce_target_thresh",
            0.2,
            f"{rsb}; {T5} timm/loss/binary_cross_entropy.py:40-42",
            "A1 per Table 1"
            if which == "a1"
            else "the reference notes' Table 1 gives none for A2 / A3; third-party repositories training with the "
            "A2 arguments (--bce-loss --bce-target-thresh 0.2 beside LAMB, wd .02, --mixup .1, --aug-repeats 3, "
            f"--smoothing 0) use 0.2; the paper itself: {UNVERIFIED}",
        ),
        ref("data.repeated_aug", repeats, f"{rsb}; {T5} timm/data/loader.py:210-211"),
    ]


RSB_DIFFERENCES = [
    "The Table 1 values are taken from a transcription of the table (the project's reference notes); the paper "
    f"itself could not be read offline ({UNVERIFIED}).",
    "Scheduler defaults changed between timm versions: the RSB-era train.py (@ 004fb5f) defaults to --warmup-lr "
    "1e-4, --min-lr 1e-6 and --cooldown-epochs 10 (10 epochs at min-lr after the cosine); timm 1.0 defaults to "
    "1e-5, 0 and 0. nfjax follows timm 1.0 (timm's current defaults); which values "
    f"the RSB runs used is {UNVERIFIED}. Third-party repositories that train with the A2 arguments pass "
    "--warmup-lr 1e-4; to match them: --config.optim.warmup_start_lr=1e-4 (lr per 256 is scaled, this one is not).",
    "BatchNorm statistics: timm trains with per-GPU BN (no --sync-bn in the recipe as far as known); nfjax's BN "
    "sees the global batch. --config.model.kwargs.bn_ghost_size=N reproduces per-GPU statistics of N images (the "
    f"RSB per-GPU batch is {UNVERIFIED}).",
]


# ------------------------------------------------------------------------------------------------ tables

REFERENCES: dict[str, list[Ref]] = {
    **{f"nfnet_{v.lower()}.py": nfnet_refs(v) for v in DM_NFNET},
    "nf_resnet50.py": NF_RESNET50,
    "resnet50_bn.py": RESNET50_BN,
    **{f"rsb_{w}.py": rsb_refs(w) for w in RSB_TABLE},
}
DIFFERENCES: dict[str, list[str]] = {
    **{f"nfnet_{v.lower()}.py": NFNET_DIFFERENCES + (F6_DIFFERENCES if v == "F6" else []) for v in DM_NFNET},
    "nf_resnet50.py": NF_RESNET50_DIFFERENCES,
    "resnet50_bn.py": RESNET50_BN_DIFFERENCES,
    **{f"rsb_{w}.py": RSB_DIFFERENCES for w in RSB_TABLE},
}
# nfjax's own recipes: (what the source of the values is, the keys shown). Values at the default arguments.
OWN_KEYS = (
    "model.name train.global_batch train.epochs optim.name optim.base_lr optim.nesterov optim.weight_decay "
    "optim.decay_mode optim.clipping optim.agc_lambda optim.clip_exclude optim.schedule optim.warmup_epochs "
    "optim.end_lr_factor optim.ema_decay data.image_size data.random_resized_crop data.pad_crop data.flip "
    "data.label_smoothing"
).split()
FMNIST_ORIGIN = (
    "nfjax/recipes.py at the default arguments (recipe=quick: FMNIST_RECIPES['quick'], FMNIST_TWIN); "
    "see docs/fashion_mnist.md"
)
OWN_RECIPES: dict[str, tuple[str, list[str]]] = {
    "fmnist_nf.py": (FMNIST_ORIGIN, OWN_KEYS),
    "fmnist_bn.py": (FMNIST_ORIGIN, OWN_KEYS),
    "finetune.py": (
        "configs/finetune.py (optimizer=sgd; its docstring gives the reason for each value)",
        [*OWN_KEYS, "optim.backbone_lr_scale"],
    ),
}


def load(name: str, root: str = ROOT) -> ml_collections.ConfigDict:
    """The config of ``configs/<name>`` at its default arguments."""
    return load_config_file(os.path.join(root, "configs", name))


def config_names(root: str = ROOT) -> list[str]:
    """Every config file name in ``configs/``, sorted."""
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(root, "configs", "*.py")))


def command(name: str, root: str = ROOT) -> str:
    """The training command of a config: the first ``python -m nfjax.train`` line of its docstring."""
    with open(os.path.join(root, "configs", name)) as f:
        doc = ast.get_docstring(ast.parse(f.read())) or ""
    found = [line.strip() for line in doc.splitlines() if line.strip().startswith("python -m nfjax.train")]
    return found[0] if found else f"python -m nfjax.train --config configs/{name} --workdir runs/{name[:-3]}"


def mismatches(cfg: ml_collections.ConfigDict, refs: list[Ref]) -> list[str]:
    """One message per row whose config value differs from its reference value."""
    out = []
    for r in refs:
        value = config_value(cfg, r.key)
        if not same(value, r.value):
            out.append(f"{r.key}: nfjax {fmt(value)} != reference {fmt(r.value)} ({r.source})")
    return out


def _text(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_text(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def fmt(value: Any) -> str:
    """A value as the document shows it (markdown-safe: '|' escaped)."""
    return _text(value).replace("|", "\\|")


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


INTRO = """\
# Recipes and their references

Every shipped recipe in configs/, each hyperparameter beside the value of the recipe it reproduces and the
place that value comes from. Generated from the configs and from the reference rows in
nfjax/recipe_sources.py; do not edit by hand. Regenerate with

    python scripts/make_recipes_doc.py

and check with `python scripts/make_recipes_doc.py --check`. tests/test_recipes.py fails when a config value
no longer equals the reference value its row records, when this file is stale, or when a config in configs/
has no section here.

Values are in nfjax's units: `optim.base_lr` is the peak learning rate per 256 examples (scaled linearly with
the global batch when `optim.scale_lr_by_batch`), epochs are epochs of the train split, model arguments not
set by a config are the model table's or the constructor's defaults. The "nfjax" column is read from the
config at its default arguments; a row whose "nfjax" and "reference" values differ is an error, never a table
entry, so what nfjax does differently, and what could not be checked offline, is listed under each table.
"{unverified}" marks a value whose source could not be read when this file was written.

Sources (line numbers refer to these versions):

"""


def _section(name: str, root: str) -> list[str]:
    cfg = load(name, root)
    lines = [f"## configs/{name}", "", f"    {command(name, root)}", ""]
    lines += ["| hyperparameter | config key | nfjax | reference | source |", "|---|---|---|---|---|"]
    if name in REFERENCES:
        bad = mismatches(cfg, REFERENCES[name])
        if bad:
            raise ValueError(f"configs/{name} differs from its reference:\n  " + "\n  ".join(bad))
        for r in REFERENCES[name]:
            source = _cell(r.source + (f" ({r.note})" if r.note else ""))
            lines.append(f"| {r.label} | `{r.key}` | {fmt(config_value(cfg, r.key))} | {fmt(r.value)} | {source} |")
        notes = DIFFERENCES.get(name, [])
        if notes:
            lines += ["", "Differences and unverified points:", "", *(f"- {d}" for d in notes)]
    else:
        origin, keys = OWN_RECIPES[name]
        lines[4:4] = [f"nfjax's own recipe, no external reference: nothing is compared. Values from {origin}.", ""]
        for key in keys:
            lines.append(f"| {LABELS[key]} | `{key}` | {fmt(config_value(cfg, key))} | none | this project |")
    return lines + [""]


def render(root: str = ROOT) -> str:
    """docs/recipes.md; ValueError when a config differs from a reference value its rows record."""
    lines = [INTRO.format(unverified=UNVERIFIED).rstrip("\n"), ""]
    lines += [f"- {short}: {full}" for short, full in SOURCES.items()] + [""]
    for name in [*REFERENCES, *OWN_RECIPES]:
        lines += _section(name, root)
    return "\n".join(lines).rstrip("\n") + "\n"
