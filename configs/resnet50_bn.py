"""BN ResNet-50 baseline, torchvision's classic recipe: 90 epochs SGD momentum 0.9 at batch 256, lr 0.1 per 256
divided by 10 at epochs 30 and 60, wd 1e-4 on every parameter, torchvision crops, BN statistics over groups of 32
(its 8 GPUs x 32 without SyncBN); docs/recipes.md cites each value.

    python -m nfjax.train --config configs/resnet50_bn.py --workdir runs/resnet50_bn

Expected: about 76.1% ImageNet top-1 (torchvision's figure for this recipe; not yet reproduced by us).
Arguments: dataset, data_dir, batch (0: 256), epochs (0: 90).
"""

from nfjax.recipes import resnet50_bn_imagenet_config


def get_config(arg=None):
    return resnet50_bn_imagenet_config(arg)
