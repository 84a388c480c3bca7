"""The BatchNorm ResNet small-image twin on Fashion-MNIST, offline (same topology and recipe as fmnist_nf).

    python -m nfjax.train --config configs/fmnist_bn.py:recipe=long --workdir runs/fmnist_bn_long

Expected: >= 94% test top-1 with recipe=long (see docs/fashion_mnist.md); recipe=quick is the 10-minute run.
Arguments: recipe (quick|long), data_dir, epochs, batch, seed.
"""

from nfjax.config_lib import fashion_mnist_twin_config


def get_config(arg=None):
    return fashion_mnist_twin_config("resnet_small", arg)
