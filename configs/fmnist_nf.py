"""The NF-ResNet small-image twin on Fashion-MNIST, offline: the project's main job.

    python -m nfjax.train --config configs/fmnist_nf.py --workdir runs/fmnist_nf

Expected: >= 91% test top-1 within 10 minutes on a 2-core CPU (recipe=quick, the default).
The comparison run: --config configs/fmnist_nf.py:recipe=long (>= 94%; see docs/fashion_mnist.md).
Arguments: recipe (quick|long), data_dir, epochs, batch, seed.
"""

from nfjax.config_lib import fashion_mnist_twin_config


def get_config(arg=None):
    return fashion_mnist_twin_config("nf_resnet_small", arg)
