"""Every shipped config runs: each file in configs/ trains two steps end to end (train, eval, checkpoint), then a
second invocation of the same command resumes from step 2 and does the same for steps 3 and 4.

Each config keeps its own pipeline branches and recipe (RandAugment, MixUp/CutMix, BCE targets, repeated
augmentation, EMA, AGC, SAM: whatever it sets, schedule included); the overrides below only shrink sizes: model
widths and depths, image sizes, batch sizes, how often it evaluates and how many steps one invocation runs. The
ImageNet recipes and the fine-tuning recipe read a tiny generated folder of JPEGs of varied sizes
(``dataset=image_folder``); the Fashion-MNIST twins read their own dataset (the session's ``fmnist_dir``), sliced,
since their branch is the in-memory TFDS one at the native 28 px. A new file in configs/ is picked up by the glob;
one that takes other arguments or builds a model family without tiny sizes here fails loudly.

NFNet-F1 to F7 are ``nfnet_imagenet_config`` with another variant name, the function F0's file calls. Shrunk as
here they would train the same tiny network as F0 with another dropout rate and RandAugment magnitude, so they do
not train again: their test checks that each differs from F0's config only in the model and the variant's sizes
and magnitude (its metadata), and that its run assembles (data, mesh, optimizer, the abstract train state). F6
also sets SAM (the one variant DeepMind trained with it), another train step: it trains too, one invocation (F0's
covers the resume).
"""

import inspect
import json
import math
import re

import numpy as np
import pytest

from nfjax import train
from nfjax.config_lib import load_config, load_config_file
from nfjax.convert.errors import flatten
from nfjax.metrics import read_metrics
from nfjax.models import MODELS, model_metadata

from helpers import ROOT, checkpoint_steps

# finetune.py last: its source run is nfnet_f0.py's first invocation, whose compiled programs are then cached
CONFIGS = sorted((p.name for p in (ROOT / "configs").glob("*.py")), key=lambda name: (name == "finetune.py", name))
CLASSES, TRAIN_PER_CLASS, TEST_PER_CLASS = 4, 6, 2  # 24 training images: one batch of BATCH per epoch
IMAGE = 32  # train and eval side of the image-folder runs
STAGES = 2  # stages of every tiny model, one block each: half the compile time of four
# configs that are F0's recipe function with another variant: checked against F0's config, not trained again
SAME_RECIPE_AS_F0 = re.compile(r'nfnet_imagenet_config\("F[1-7]"')
F0_VARIANTS = sorted(name for name in CONFIGS if SAME_RECIPE_AS_F0.search((ROOT / "configs" / name).read_text()))
SAM_VARIANT = "nfnet_f6.py"
TRAINED = [name for name in CONFIGS if name not in F0_VARIANTS or name == SAM_VARIANT]
BATCH = 16  # two examples on each of the 8 simulated devices
WIDTH = 32  # widest stage of every tiny model (the first is half of it)

# Sizes only (per model family); activations, attention, drop rates and stochastic depth stay the recipe's.
# NFNet: group_size 8 keeps the grouped convolutions of the real models (stage one 1 group, the others 2).
FAMILY_KWARGS = {
    "nfnet": dict(stem_widths=(4, 8, 8), group_size=8),
    "nf_resnet": dict(stem_width=8),
    "resnet": dict(stem_width=8),
}
# The recipe's own schedule (epochs, warmup, decay) stays: an epoch of the generated folder is one step, and each
# invocation stops after two steps (max_steps), evaluates and saves a checkpoint: the first at step 2, the second,
# resumed, at step 4.
STEPS = [
    f"--config.train.global_batch={BATCH}",
    f"--config.train.eval_batch={BATCH}",
    "--config.train.max_steps=2",
    "--config.train.eval_every_steps=2",
    "--config.train.log_every_steps=1",
]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """root/{train,test}/class_<c>/<i>.jpg: JPEGs of varied, mostly non-square sizes (40-64 px), one of them
    grayscale; per class a colour gradient plus noise. ``test`` is the eval split of the ImageNet recipes."""
    from PIL import Image

    root = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for split, count in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
        for c in range(CLASSES):
            folder = root / split / f"class_{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                height, width = rng.integers(40, 65, size=2)
                ramp = np.linspace(0, 1, width)[None, :, None] * np.linspace(0.2, 1, height)[:, None, None]
                colour = np.roll(np.array([220.0, 120.0, 30.0]), c)
                pixels = ramp * colour + rng.normal(0, 20, (height, width, 3))
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                if split == "train" and c == 0 and i == 0:
                    image = image.convert("L")  # ImageNet holds grayscale JPEGs too
                image.save(folder / f"{i}.jpg", quality=90)
    return root


@pytest.fixture(scope="module")
def finetune_source(image_folder, tmp_path_factory):
    """A training run's workdir to fine-tune from: the tiny NFNet-F0 of this module, two steps."""
    workdir = tmp_path_factory.mktemp("finetune_source")
    spec = f"{ROOT}/configs/nfnet_f0.py:dataset=image_folder,data_dir={image_folder}"
    args = ["--config", spec, "--workdir", str(workdir), *shrink(spec), *STEPS]
    assert train.main(args) == 0
    return workdir


def config_spec(config, request):
    """``--config`` of ``config`` on this module's data; a config taking other arguments fails here, loudly."""
    path = f"{ROOT}/configs/{config}"
    if config.startswith("fmnist_"):
        return f"{path}:data_dir={request.getfixturevalue('fmnist_dir')}"
    images = request.getfixturevalue("image_folder")
    if config == "finetune.py":  # its default eval split for an image folder: a held-out part of each class
        source = request.getfixturevalue("finetune_source")
        return f"{path}:init_from={source},dataset=image_folder,data_dir={images}/train"
    return f"{path}:dataset=image_folder,data_dir={images}"


def shrink(spec):
    """Overrides that shrink the model, images and batches of the config at ``spec``, and nothing else."""
    cfg = load_config_file(spec)
    family = model_metadata(cfg.model.name)["family"]
    assert family in FAMILY_KWARGS, f"{spec}: no tiny sizes for model family {family!r}; add them to FAMILY_KWARGS"
    strides = cfg.model.kwargs.get("strides", MODELS[cfg.model.name][1].get("strides"))
    if strides is None:
        strides = inspect.signature(MODELS[cfg.model.name][0].__init__).parameters["strides"].default
    widths = (WIDTH // 2,) + (WIDTH,) * (STAGES - 1)
    kwargs = dict(depths=(1,) * STAGES, widths=widths, strides=tuple(strides)[:STAGES])
    kwargs |= FAMILY_KWARGS[family]
    out = [f"--config.model.kwargs.{k}={v!r}".replace(" ", "") for k, v in kwargs.items()]
    if cfg.data.dataset == "fashion_mnist":  # native 28 px; a slice of each split
        return out + ["--config.data.train_split=train[:256]", "--config.data.eval_split=test[:64]"]
    return out + [f"--config.data.image_size={IMAGE}", f"--config.data.eval_image_size={IMAGE}"]


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.parametrize("config", TRAINED)
def test_config_trains_evaluates_checkpoints_and_resumes(config, request, tmp_path, capsys):
    spec = config_spec(config, request)
    args = ["--config", spec, "--workdir", str(tmp_path), *shrink(spec), *STEPS]
    cfg = load_config_file(spec)
    evals = ["eval", "eval_ema"] if cfg.optim.ema_decay > 0 else ["eval"]

    assert train.main(args) == 0
    check_run(tmp_path, steps=[1, 2], evals=evals)
    if cfg.model.init_from:  # fine-tuning started from the source's weights
        assert f"init_from={cfg.model.init_from} (checkpoint step 2" in capsys.readouterr().err
    capsys.readouterr()
    if config == SAM_VARIANT:
        return

    assert train.main(args) == 0
    assert f"resuming from the checkpoint at step 2 in {tmp_path}" in capsys.readouterr().err
    check_run(tmp_path, steps=[1, 2, 3, 4], evals=evals)  # continued at step 3, did not start over


def check_run(workdir, steps, evals):
    """Train metrics of every step in ``steps``, finite; an eval of each split in ``evals`` at every second step,
    finite; a checkpoint and final_metrics.json of the last step."""
    rows = read_metrics(workdir)
    train_rows = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train_rows] == steps
    assert all(finite(r[k]) for r in train_rows for k in ("loss", "grad_norm", "param_norm")), train_rows
    assert checkpoint_steps(workdir)[-1] == steps[-1]
    eval_rows = [r for r in rows if r["split"].startswith("eval")]
    assert [(r["step"], r["split"]) for r in eval_rows] == [(s, e) for s in steps[1::2] for e in evals]
    for r in eval_rows:
        assert finite(r["loss"]) and 0 <= r["top1"] <= r["top5"] <= 1 and r["examples"] > 0, r
    final = json.loads((workdir / "final_metrics.json").read_text())
    assert final["step"] == steps[-1] and sorted(k for k in final if k not in ("step", "finished")) == sorted(evals)
    assert final["finished"] is False, final  # max_steps stopped it: every recipe's schedule is longer


def flat(cfg):
    return {".".join(path): value for path, value in flatten(cfg.to_dict()).items()}


@pytest.mark.parametrize("config", F0_VARIANTS)
def test_nfnet_variant_config_is_f0s_recipe_at_its_own_sizes_and_assembles(config, request):
    from nfjax.experiment import build_experiment

    variant = load_config_file(f"{ROOT}/configs/{config}")
    f0 = load_config_file(f"{ROOT}/configs/nfnet_f0.py")
    meta = model_metadata(variant.model.name)
    assert variant.model.name == config.removesuffix(".py") != f0.model.name
    expected = {
        "model.name": variant.model.name,
        "data.image_size": meta["train_size"],
        "data.eval_image_size": meta["test_size"],
        "data.randaugment_magnitude": meta["ra_magnitude"],
    } | ({"optim.sam_rho": 0.05} if config == SAM_VARIANT else {})
    mine, theirs = flat(variant), flat(f0)
    assert {k: v for k, v in mine.items() if theirs.get(k) != v} == expected
    assert mine.keys() == theirs.keys()

    spec = config_spec(config, request)
    overrides = [arg.removeprefix("--config.").split("=", 1) for arg in [*shrink(spec), *STEPS]]
    exp = build_experiment(load_config(spec, overrides))
    state = exp.state_spec.abstract  # traced, not compiled
    assert exp.model.name == variant.model.name and state


def test_the_configs_are_found():
    assert "nfnet_f0.py" in CONFIGS and "finetune.py" in CONFIGS
    assert F0_VARIANTS == [f"nfnet_f{i}.py" for i in range(1, 8)]
    assert 'nfnet_imagenet_config("F0"' in (ROOT / "configs" / "nfnet_f0.py").read_text()
