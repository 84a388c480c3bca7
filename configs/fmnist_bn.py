"""The BatchNorm ResNet small-image twin on Fashion-MNIST, offline (same topology and recipe as fmnist_nf).

    python -m nfjax.train --config configs/fmnist_bn.py:recipe=long --workdir runs/fmnist_bn_long

Expected: recipe=long (30 epochs) 94.28% in 75 minutes on 2 CPU cores; recipe=quick 91.8% in about 7.5 minutes
(both measured). See docs/fashion_mnist.md.
Arguments: recipe (quick|long), data_dir, epochs, batch, seed.
"""

from nfjax.recipes import fashion_mnist_twin_config


def get_config(arg=None):
    return fashion_mnist_twin_config("resnet_small", arg)
