"""Signal propagation at initialization (Brock et al. 2021a): NF-ResNet vs BN ResNet vs an unnormalized ResNet.

    python scripts/signal_propagation.py --model nf_resnet50 --image-size 64 --batch 16 [--png spp.png]

Feeds unit-Gaussian inputs through the model at init and prints, per block, avg_sq_mean, avg_var and
res_avg_var. For NF models SkipInit is opened (skipinit_gain=1) so that the residual branches contribute, as in
the paper's plots. ``--png`` draws the three curves with matplotlib when it is installed.
"""

from __future__ import annotations

import argparse

import jax
import numpy as np
from flax import nnx

from nfjax.models import create_model, model_metadata


def signal_stats(name: str, image_size: int, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    normalizer_free = model_metadata(name)["normalizer_free"]
    overrides = {"skipinit_gain": 1.0} if normalizer_free else {"zero_init_last": False}
    model = create_model(name, num_classes=10, rngs=nnx.Rngs(seed), **overrides)
    x = jax.random.normal(jax.random.key(seed), (batch, image_size, image_size, 3))
    forward = nnx.jit(lambda m, x: m(x, train=not normalizer_free, return_stats=True)[1])
    return {k: np.asarray(v) for k, v in forward(model, x).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="nf_resnet50")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--png", default=None)
    args = parser.parse_args()
    stats = signal_stats(args.model, args.image_size, args.batch)
    print(f"{'block':>5} {'avg_sq_mean':>12} {'avg_var':>10} {'res_avg_var':>12}")
    for i in range(len(stats["avg_var"])):
        print(f"{i:5d} {stats['avg_sq_mean'][i]:12.4f} {stats['avg_var'][i]:10.4f} {stats['res_avg_var'][i]:12.4f}")
    if args.png:
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        for ax, key in zip(axes, ("avg_sq_mean", "avg_var", "res_avg_var"), strict=True):
            ax.plot(stats[key], marker="o")
            ax.set_title(key)
            ax.set_xlabel("block")
        fig.suptitle(args.model)
        fig.tight_layout()
        fig.savefig(args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
