"""ResNet strikes back A2: BN ResNet-50, LAMB, BCE loss, 300 epochs at batch 2048 (Wightman et al. 2021);
timm's LAMB (global-norm clip 1.0), per-epoch cosine from 1e-5 warmup; docs/recipes.md cites each value.

    python -m nfjax.train --config configs/rsb_a2.py --workdir runs/rsb_a2

Expected: 79.8% ImageNet top-1 (paper, 224 px test, crop 0.95). Arguments: dataset, data_dir, batch, epochs.
"""

from nfjax.recipes import rsb_config


def get_config(arg=None):
    return rsb_config("a2", arg)
