"""NFNet-F4 on ImageNet, DeepMind's recipe (batch 4096, 360 epochs, SGD-Nesterov + AGC 0.01, EMA).

    python -m nfjax.train --config configs/nfnet_f4.py --workdir runs/nfnet_f4

Expected: ImageNet top-1 85.9 (paper, EMA weights at test resolution). Needs TFDS imagenet2012 prepared in
data_dir (see docs/data.md); another dataset: --config configs/nfnet_f4.py:dataset=cifar10,data_dir=DIR.
Arguments: dataset, data_dir, batch (0: 4096), epochs (0: 360).
Memory: --config.train.fsdp=8 splits params, EMA and momentum over groups of 8 devices, 3.53 -> 0.45 GiB
per device (docs/training.md, FSDP; docs/performance.md).
"""

from nfjax.recipes import nfnet_imagenet_config


def get_config(arg=None):
    return nfnet_imagenet_config("F4", arg)
