"""NF-ResNet-50 on ImageNet: 90 epochs of SGD-Nesterov + AGC (lambda 0.01) at batch 1024, cosine, EMA.

    python -m nfjax.train --config configs/nf_resnet50.py --workdir runs/nf_resnet50

Recipe sources (DeepMind's generic ImageNet experiment, the NF-ResNet code): docs/recipes.md.
Expected: about 76-77% ImageNet top-1 (the NF-ResNet paper's 90-epoch regime; not yet reproduced by us).
Arguments: dataset, data_dir, batch (0: 1024), epochs (0: 90).
"""

from nfjax.recipes import nf_resnet50_imagenet_config


def get_config(arg=None):
    return nf_resnet50_imagenet_config(arg)
