"""NFNet-F6 on ImageNet, DeepMind's recipe (batch 4096, 360 epochs, SGD-Nesterov + AGC 0.01, EMA, SAM rho 0.05).

    python -m nfjax.train --config configs/nfnet_f6.py --workdir runs/nfnet_f6

Expected: ImageNet top-1 86.5 (paper, trained with SAM as here; EMA weights at test resolution). Needs TFDS
imagenet2012 prepared in data_dir (see docs/data.md); another dataset:
--config configs/nfnet_f6.py:dataset=cifar10,data_dir=DIR.
Arguments: dataset, data_dir, batch (0: 4096), epochs (0: 360).
Memory: --config.train.fsdp=8 splits params, EMA and momentum over groups of 8 devices, 4.90 -> 0.63 GiB
per device between steps; SAM gathers the params whole during the step (docs/training.md, FSDP).
"""

from nfjax.recipes import nfnet_imagenet_config


def get_config(arg=None):
    return nfnet_imagenet_config("F6", arg)
