"""What every source shares: its metadata record and the error for a dataset that is not on disk."""

from __future__ import annotations

import dataclasses

PREPARE_COMMAND = "python -m nfjax.data.prepare {name} --data-dir {data_dir}"
IMAGENET_STEPS = (
    "ImageNet cannot be downloaded automatically. Get ILSVRC2012_img_train.tar and "
    "ILSVRC2012_img_val.tar from image-net.org, put them in {data_dir}/downloads/manual/. "
)


class DatasetNotFoundError(FileNotFoundError):
    """Raised at once (no network access, no waiting) when a dataset is not on disk."""


@dataclasses.dataclass(frozen=True)
class SourceInfo:
    """Metadata of one split. image_shape is the stored (H, W, C); H and W are None when sizes vary."""

    num_examples: int
    num_classes: int
    image_shape: tuple
    class_names: tuple[str, ...]


def missing_dataset_message(name: str, data_dir: str, expected: str) -> str:
    """The error text for a dataset that is not prepared: where it was looked for, how to prepare it."""
    command = PREPARE_COMMAND.format(name=name, data_dir=data_dir)
    steps = IMAGENET_STEPS.format(data_dir=data_dir) if name.startswith("imagenet2012") else ""
    return (
        f"Dataset '{name}' is not prepared in data_dir '{data_dir}' (expected {expected}). "
        f"{steps}Prepare it with: {command}"
    )
