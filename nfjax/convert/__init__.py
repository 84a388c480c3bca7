"""Pretrained weights: import DeepMind and timm checkpoints, export to timm, and the converted-weights folder."""
