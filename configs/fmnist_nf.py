"""The NF-ResNet small-image twin on Fashion-MNIST, offline: the project's main job.

    python -m nfjax.train --config configs/fmnist_nf.py --workdir runs/fmnist_nf

Expected: 92.6% test top-1 in about 6.5 minutes on a 2-core CPU, everything included (recipe=quick, the default).
The comparison run: --config configs/fmnist_nf.py:recipe=long (30 epochs: 94.41% in 60 minutes on 2 CPU cores,
measured; see docs/fashion_mnist.md).
Arguments: recipe (quick|long), data_dir, epochs, batch, seed.
"""

from nfjax.recipes import fashion_mnist_twin_config


def get_config(arg=None):
    return fashion_mnist_twin_config("nf_resnet_small", arg)
