r"""Fine-tuning from converted or previously trained weights (model.init_from) onto another dataset.

    python -m nfjax.train --config configs/finetune.py:init_from=weights/nfnet_f0,dataset=cifar10 --workdir runs/ft

Expected: not measured for converted ImageNet weights (none, and no such data, on the development machine), so no
number is claimed for them. Measured on the 2-core CPU instead, from the NF Fashion-MNIST twin (runs/fmnist_nf,
92.6%) with a new classifier and only 1,000 training images (50 steps):

    python -m nfjax.train --config "configs/finetune.py:init_from=runs/fmnist_nf,dataset=fashion_mnist,\
        train_split=train[:1000],batch=100,epochs=5,augment=none" --config.model.reset_classifier=true --workdir runs/ft

91.6% test top-1 in about 35 s, against 32.5% for the same 50 steps from random init (docs/training.md,
"Fine-tuning"): the machinery reusing a source's features, not transfer to another domain.

Arguments: init_from (a run's --workdir or a folder written by python -m nfjax.convert), model (default: the
source's, with its constructor arguments from DIR/config.json), dataset, data_dir, train_split, eval_split
(default: validation for imagenet2012, 10% of each class held out for image_folder, test otherwise), batch,
epochs, optimizer (sgd|adamw), base_lr (0: the optimizer's default below), augment (light|flip|none),
image_size (0: the model's train size), seed.

The recipe, and where each value comes from (the rest are choices, marked so):
- SGD with Nesterov momentum 0.9 and AGC, the optimizer NFNets are trained with (Brock et al. 2021, arXiv
  2102.06171: AGC in Section 4; lambda 0.01 is their ImageNet value). The classifier is left out of AGC entirely
  (kernel and bias: a new classifier's bias starts at zero, and AGC's relative limit would hold it there).
- Learning rates: the classifier 0.1 x batch/256 (DeepMind's from-scratch NFNet lr), the pretrained backbone a
  tenth of that, 0.01 x batch/256 (optim.backbone_lr_scale=0.1). Choice, following two common practices: a
  pretrained network fine-tunes at about a tenth of its training lr, and a new last layer learns ten times
  faster than the rest (Caffe's fine-tuning example finetune_flickr_style: lr_mult 10 on the new layer). For
  scale: BiT's fine-tuning rule (Kolesnikov et al. 2020, arXiv 1912.11370) uses 0.003 at batch 512, SGD momentum
  0.9, for every layer. Measured here (the run above): the same 50 steps at 0.01 x batch/256 for every layer
  reached 80.5%. optimizer=adamw: AdamW with the classifier at 1e-3 x batch/256, the backbone a tenth of it, and
  decoupled weight decay 0.05 (choice, common timm practice for fine-tuning convnets with AdamW).
- Short linear warmup (0.5 epoch, choice), cosine decay to 0 over 10 epochs (choice; BiT fine-tunes for 500 to
  20k steps depending on the dataset size, so raise epochs for small datasets).
- Weight decay on kernels only (2e-5 for SGD, DeepMind's NFNet value), no EMA, no label smoothing, no MixUp,
  CutMix or RandAugment; augment=light is a random-resized crop and a flip (BiT fine-tunes with a random crop and
  a flip).
- Image size: the model's train size (models table); evaluation at its test size with the source's evaluation
  preprocessing and normalization (those of DIR/config.json), so the features see the inputs they were trained on.
"""

import json
import os

from nfjax.config_lib import ConfigError, base_config, finalize, parse_arg
from nfjax.models import model_metadata

ARGS = dict(
    init_from="",
    model="",
    dataset="imagenet2012",
    data_dir="~/tensorflow_datasets",
    train_split="",
    eval_split="",
    batch=256,
    epochs=10.0,
    optimizer="sgd",
    base_lr=0.0,
    augment="light",
    image_size=0,
    seed=0,
)
OPTIMIZERS = dict(  # per optimizer: the classifier's lr (per 256 examples), weight decay, decay mode
    sgd=dict(base_lr=0.1, weight_decay=2e-5, decay_mode="coupled"),
    adamw=dict(base_lr=1e-3, weight_decay=0.05, decay_mode="decoupled"),
)
BACKBONE_LR_SCALE = 0.1  # the pretrained backbone learns at a tenth of the classifier's lr
AUGMENT = dict(light=(True, True), flip=(False, True), none=(False, False))  # (random-resized crop, flip)
HOLDOUT_FRACTION = 0.1  # image_folder without an eval_split: this fraction of each class is held out


def source_config(init_from: str) -> dict:
    """The source folder's config.json as a dict ({} without init_from)."""
    if not init_from:
        return {}
    path = os.path.join(os.path.expanduser(init_from), "config.json")
    if not os.path.isfile(path):
        raise ConfigError(
            f"config argument init_from={init_from}: {path} not found; give a training run's --workdir or a folder "
            "written by python -m nfjax.convert"
        )
    with open(path) as f:
        return json.load(f)


def _data(cfg, args, source: dict, meta: dict) -> None:
    data, (crop, flip) = cfg.data, AUGMENT[args.augment]
    data.update(dataset=args.dataset, data_dir=args.data_dir, random_resized_crop=crop, flip=flip, seed=args.seed)
    data.image_size = args.image_size or meta["train_size"]
    data.eval_image_size = args.image_size or meta["test_size"]
    for field in ("eval_preprocess", "crop_pct", "mean", "std"):  # what the source's features expect
        value = source.get("data", {}).get(field)
        if value is not None:
            data[field] = tuple(value) if field in ("mean", "std") else value
    data.train_split = args.train_split or "train"
    if args.eval_split:
        data.eval_split = args.eval_split
    elif args.dataset == "image_folder":
        data.eval_split, data.holdout_fraction = "holdout", HOLDOUT_FRACTION
    elif args.dataset != "imagenet2012":
        data.eval_split = "test"


def get_config(arg=None):
    args = parse_arg(arg, **ARGS)
    for name, valid in (("optimizer", OPTIMIZERS), ("augment", AUGMENT)):
        if args[name] not in valid:
            raise ConfigError(f"config argument {name}={args[name]!r}: valid values are {', '.join(valid)}")
    source = source_config(args.init_from)
    source_model = source.get("model", {})
    model = args.model or source_model.get("name", "nfnet_f0")
    cfg = base_config(model, source_model.get("kwargs", {}) if model == source_model.get("name") else {})
    cfg.model.init_from = os.path.abspath(os.path.expanduser(args.init_from)) if args.init_from else None
    opt = OPTIMIZERS[args.optimizer]
    cfg.optim.update(
        name=args.optimizer,
        base_lr=args.base_lr or opt["base_lr"],
        backbone_lr_scale=BACKBONE_LR_SCALE,
        momentum=0.9,
        nesterov=True,
        weight_decay=opt["weight_decay"],
        decay_mode=opt["decay_mode"],
        clipping="agc",
        agc_lambda=0.01,
        clip_exclude=(r"^classifier/",),
        schedule="warmup_cosine",
        warmup_epochs=0.5,
        end_lr_factor=0.0,
        ema_decay=0.0,
    )
    cfg.train.update(global_batch=args.batch, epochs=args.epochs, seed=args.seed, eval_every_epochs=1.0)
    _data(cfg, args, source, model_metadata(model))
    return finalize(cfg)
