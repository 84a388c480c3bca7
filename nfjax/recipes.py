"""The published training recipes as config builders; each file in configs/ is one call to one of these.

Every value is the reference's (the docstrings name the source); ``arg`` is the ``key=value,...`` string after
the config file name, e.g. ``--config configs/nfnet_f0.py:dataset=cifar10,data_dir=/data/tfds``.
"""

from __future__ import annotations

import ml_collections

from nfjax.config_lib import ConfigError, base_config, finalize, parse_arg
from nfjax.data import fashion_mnist_data_config
from nfjax.models import model_metadata
from nfjax.models.nfnet import RANDAUGMENT_LAYERS

IMAGENET_ARGS = dict(dataset="imagenet2012", data_dir="~/tensorflow_datasets", batch=0, epochs=0.0)


def _apply_dataset_args(cfg: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
    """The ``:dataset=...,data_dir=...,batch=...,epochs=...`` arguments every ImageNet recipe takes."""
    cfg.data.dataset, cfg.data.data_dir = args.dataset, args.data_dir
    if args.dataset != "imagenet2012":
        cfg.data.eval_split = "test"  # most TFDS classification datasets name their held-out split 'test'
    if args.batch:
        cfg.train.global_batch = args.batch
    if args.epochs:
        cfg.train.epochs = args.epochs


def nfnet_imagenet_config(variant: str, arg: str | None) -> ml_collections.ConfigDict:
    """DeepMind's NFNet ImageNet recipe for one variant (F0..F7), data per the variant table."""
    args = parse_arg(arg, **IMAGENET_ARGS)
    name = f"nfnet_{variant.lower()}"
    meta = model_metadata(name)
    cfg = base_config(name, dict(stochdepth_rate=0.25))
    cfg.train.update(
        global_batch=4096,
        epochs=360.0,
        step_counting="examples",  # (N x epochs) // batch steps, warmup in the same units
        eval_every_epochs=10.0,
        checkpoint_every_steps=2000,
    )
    cfg.optim.update(
        name="sgd",
        base_lr=0.1,
        momentum=0.9,
        nesterov=True,
        weight_decay=2e-5,
        decay_mode="coupled",  # DeepMind's SGD adds wd x param to the gradient before momentum
        clipping="agc",
        agc_lambda=0.01,
        agc_eps=1e-3,
        schedule="warmup_cosine",
        warmup_epochs=5.0,
        ema_decay=0.99999,
    )
    cfg.data.update(
        image_size=meta["train_size"],
        eval_image_size=meta["test_size"],
        eval_preprocess="deepmind",
        random_resized_crop=True,
        flip=True,
        randaugment_layers=RANDAUGMENT_LAYERS,
        randaugment_variant="deepmind",
        randaugment_magnitude=float(meta["ra_magnitude"]),
        mixup_alpha=0.2,
        cutmix_alpha=1.0,
        mix_mode="deepmind",
        augment_before_mix=False,  # RandAugment runs on the mixed images
        label_smoothing=0.1,
    )
    if variant.upper() == "F6":  # F6 is the one variant DeepMind reports trained with SAM
        cfg.optim.update(sam_rho=0.05, sam_fraction=0.2)
    _apply_dataset_args(cfg, args)
    return finalize(cfg)


def nf_resnet50_imagenet_config(arg: str | None) -> ml_collections.ConfigDict:
    """NF-ResNet-50 (Brock et al. 2021a): DeepMind's generic ImageNet experiment (90 epochs, batch 1024, SGD-Nesterov,
    lr 0.1 x batch/256, wd 5e-5, label smoothing 0.1, 5 warmup epochs + cosine) plus AGC as in the NFNet recipe;
    docs/recipes.md gives the source of every value."""
    args = parse_arg(arg, **IMAGENET_ARGS)
    cfg = base_config("nf_resnet50", dict(stochdepth_rate=0.1, drop_rate=0.25))
    cfg.train.update(global_batch=1024, epochs=90.0, step_counting="examples", checkpoint_every_steps=2000)
    cfg.optim.update(
        name="sgd",
        base_lr=0.1,
        nesterov=True,
        weight_decay=5e-5,
        decay_mode="coupled",
        clipping="agc",
        agc_lambda=0.01,
        schedule="warmup_cosine",
        warmup_epochs=5.0,
        ema_decay=0.99999,
    )
    cfg.data.update(
        image_size=224, eval_image_size=224, eval_preprocess="crop_pct", crop_pct=0.875, label_smoothing=0.1
    )
    _apply_dataset_args(cfg, args)
    return finalize(cfg)


def resnet50_bn_imagenet_config(arg: str | None) -> ml_collections.ConfigDict:
    """torchvision's classic ResNet-50 recipe: 90 epochs of SGD momentum 0.9 at batch 256 (32 x 8 GPUs), lr 0.1
    x batch/256 divided by 10 every 30 epochs, wd 1e-4 on every parameter, torchvision crops (bilinear)."""
    args = parse_arg(arg, **IMAGENET_ARGS)
    # 8 GPUs x 32 without SyncBN: BN statistics over groups of 32 examples (below)
    cfg = base_config("resnet50", dict(zero_init_last=False, bn_ghost_size=32))
    cfg.train.update(global_batch=256, epochs=90.0, checkpoint_every_steps=5000)
    cfg.optim.update(
        name="sgd",
        base_lr=0.1,
        nesterov=False,
        weight_decay=1e-4,
        decay_mode="coupled",
        decay_exclude=(),  # torch.optim.SGD's weight_decay reaches every parameter: BN scales, biases too
        decay_min_ndim=0,
        clipping="none",
        schedule="step",
        warmup_epochs=0.0,
        step_boundaries_epochs=(30.0, 60.0),  # StepLR(step_size=30, gamma=0.1) over 90 epochs
        step_decay_factor=0.1,
        ema_decay=0.0,
    )
    cfg.data.update(
        image_size=224,
        eval_image_size=224,
        rrc_mode="torchvision",
        train_interpolation="bilinear",
        eval_preprocess="crop_pct",  # resize 256, center crop 224
        crop_pct=0.875,
        eval_interpolation="bilinear",
    )
    _apply_dataset_args(cfg, args)
    if cfg.train.global_batch % 32:  # another batch (:batch=N) not split into 32s: statistics of the whole batch
        cfg.model.kwargs.bn_ghost_size = 0
    return finalize(cfg)


RSB_RECIPES = {
    "a1": dict(
        epochs=600.0,
        lr=5e-3,
        wd=0.01,
        smoothing=0.1,
        bce_thresh=0.2,
        mixup=0.2,
        ra_m=7.0,
        repeat=3,
        drop_path=0.05,
        train_px=224,
    ),
    "a2": dict(
        epochs=300.0,
        lr=5e-3,
        wd=0.02,
        smoothing=0.0,
        bce_thresh=0.2,
        mixup=0.1,
        ra_m=7.0,
        repeat=3,
        drop_path=0.05,
        train_px=224,
    ),
    "a3": dict(
        epochs=100.0,
        lr=8e-3,
        wd=0.02,
        smoothing=0.0,
        bce_thresh=0.2,
        mixup=0.1,
        ra_m=6.0,
        repeat=1,
        drop_path=0.0,
        train_px=160,
    ),
}


def rsb_config(which: str, arg: str | None) -> ml_collections.ConfigDict:
    """ResNet strikes back (Wightman et al. 2021) A1/A2/A3 for the BN ResNet-50: LAMB, BCE, cosine."""
    r = RSB_RECIPES[which]
    args = parse_arg(arg, **IMAGENET_ARGS)
    cfg = base_config("resnet50", dict(stochdepth_rate=r["drop_path"], zero_init_last=True))
    cfg.train.update(global_batch=2048, epochs=r["epochs"], loss="sigmoid_bce", checkpoint_every_steps=2000)
    # lr is quoted at batch 2048; base_lr is per 256 so other batches scale linearly.
    cfg.optim.update(
        name="lamb",
        base_lr=r["lr"] * 256 / 2048,
        scale_lr_by_batch=True,
        weight_decay=r["wd"],
        decay_mode="decoupled",
        eps=1e-6,
        clipping="global_norm",  # timm's Lamb clips the global gradient norm to 1.0 inside the optimizer
        max_grad_norm=1.0,
        schedule="timm_cosine",
        schedule_unit="epoch",  # timm steps its scheduler once per epoch
        warmup_epochs=5.0,
        warmup_start_lr=1e-5,  # timm's --warmup-lr
        end_lr_factor=0.0,
        cooldown_epochs=0.0,
        ema_decay=0.0,
    )
    cfg.data.update(
        image_size=r["train_px"],
        eval_image_size=224,
        rrc_mode="torchvision",  # timm's RandomResizedCropAndInterpolation samples like torchvision
        train_interpolation="random",  # timm's --train-interpolation default: bilinear or bicubic per image
        eval_preprocess="crop_pct",
        crop_pct=0.95,
        eval_interpolation="bicubic",
        randaugment_layers=2,
        randaugment_variant="timm",
        randaugment_magnitude=r["ra_m"],
        randaugment_magnitude_std=0.5,
        mixup_alpha=r["mixup"],
        cutmix_alpha=1.0,
        mix_mode="timm",
        switch_prob=0.5,
        label_smoothing=r["smoothing"],
        repeated_aug=r["repeat"],
    )
    cfg.data.bce_target_thresh = r["bce_thresh"]
    _apply_dataset_args(cfg, args)
    return finalize(cfg)


# The small-image twins share one topology; the recipes below are identical for both apart from AGC,
# which is part of the NF machinery (the BN twin trains unclipped, as BN ResNets do).
FMNIST_TWIN = dict(widths=(48, 96, 192), depths=(1, 1, 1), strides=(2, 2, 2), stem_width=24)
FMNIST_RECIPES = {
    # main job: >= 91% top-1 within 10 minutes on a 2-core CPU, compile and evaluation included
    "quick": dict(epochs=3.0, batch=256, lr=0.4, warmup=0.3, pad_crop=0, flip=False, ema=0.0),
    # the longer comparison run: >= 94% for both twins
    "long": dict(epochs=30.0, batch=256, lr=0.4, warmup=1.0, pad_crop=2, flip=True, ema=0.0),
}


def fashion_mnist_twin_config(model: str, arg: str | None) -> ml_collections.ConfigDict:
    """Fashion-MNIST (offline, from the Debian package files) for the NF or BN small-image twin."""
    args = parse_arg(arg, recipe="quick", data_dir="~/tensorflow_datasets", epochs=0.0, batch=0, seed=0)
    if args.recipe not in FMNIST_RECIPES:
        raise ConfigError(f"unknown recipe {args.recipe!r}; valid: {', '.join(FMNIST_RECIPES)}")
    r = FMNIST_RECIPES[args.recipe]
    nf = model_metadata(model)["normalizer_free"]
    cfg = base_config(model, dict(FMNIST_TWIN) | ({"stochdepth_rate": 0.0} if nf else {}))
    cfg.data = fashion_mnist_data_config(args.data_dir)
    cfg.data.update(pad_crop=r["pad_crop"], flip=r["flip"], label_smoothing=0.1, seed=args.seed)
    epochs = args.epochs or r["epochs"]
    cfg.train.update(
        global_batch=args.batch or r["batch"],
        epochs=epochs,
        seed=args.seed,
        log_every_steps=25,
        eval_every_epochs=1.0 if epochs <= 10 else 2.0,
        checkpoint_every_steps=500,
        eval_batch=1000,
    )
    cfg.optim.update(
        name="sgd",
        base_lr=r["lr"],
        nesterov=True,
        weight_decay=5e-5,
        schedule="warmup_cosine",
        warmup_epochs=r["warmup"],
        ema_decay=r["ema"],
        clipping="agc" if nf else "none",
        agc_lambda=0.08,
        clip_exclude=(r"(^|/)classifier/kernel$", r"(^|/)skip_gain$"),
    )
    return finalize(cfg)
