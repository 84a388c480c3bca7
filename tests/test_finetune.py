"""Fine-tuning (``model.init_from``, nfjax/finetune.py): what a run starts from, which parts train, clear refusals,
resume, and a CLI run onto a new classifier.

A source is made in a second: a tiny model's weights drawn in NumPy (or its own init), saved like a run's workdir
(checkpoint + config.json). Everything runs on the 8 simulated devices of conftest.py.
"""

import shutil

import jax
import numpy as np
import pytest
from PIL import Image

from nfjax import train
from nfjax.config_lib import base_config, load_config_file
from nfjax.data import DatasetInfo, to_global_batch
from nfjax.data.config import IMAGENET_MEAN
from nfjax.experiment import build_experiment
from nfjax.finetune import InitFromError, abstract_trees
from nfjax.runs import save_config

from helpers import ROOT, assert_clean_error, checkpoint_steps, snapshot, train_rows

TINY = dict(widths=(8, 16, 16), stem_width=8)
SIZE = 8  # image side of the experiment-level runs


def make_config(model="nf_resnet_small", kwargs=TINY, **fields):
    """A tiny run's config; ``fields``: ``section__key=value``."""
    cfg = base_config(model, dict(kwargs))
    cfg.train.update(global_batch=16, total_steps=10, async_checkpoints=False)
    cfg.optim.update(warmup_epochs=0.0, ema_decay=0.0)
    for key, value in fields.items():
        section, name = key.split("__")
        cfg[section][name] = value
    return cfg


def experiment(cfg, classes=10, channels=1, size=SIZE):
    info = DatasetInfo(64, 16, classes, (size, size, channels), tuple(f"c{i}" for i in range(classes)))
    return build_experiment(cfg, info=info)


def make_source(
    directory, model="nf_resnet_small", kwargs=TINY, classes=10, channels=1, size=SIZE, ema=False, step=5, **fields
):
    """A run's workdir with a checkpoint at ``step`` of random weights drawn in NumPy (nothing to compile), or with
    ``fresh=True`` the model's own init; returns its weight trees."""
    fresh = fields.pop("fresh", False)
    exp = experiment(make_config(model, kwargs, **fields), classes, channels, size)
    rng = np.random.default_rng(step)
    draw = lambda tree: jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), tree)
    trees = jax.device_get(exp.create_state()) if fresh else abstract_trees(exp.model.identity())
    weights = dict(params=draw(trees["params"]), **(dict(ema=draw(trees["params"])) if ema else {}))
    if fresh:
        weights["params"] = trees["params"]
    if trees.get("batch_stats"):
        weights["batch_stats"] = draw(trees["batch_stats"])
    ckpt = exp.checkpointer(str(directory))
    ckpt.save(step, dict(weights, step=np.int32(step), opt_state={}), exp.checkpoint_meta())
    ckpt.close()
    save_config(exp.cfg, str(directory))
    return weights


def equal(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: np.array_equal(np.asarray(x), np.asarray(y)), a, b))


def without_head(params):
    return {k: v for k, v in params.items() if k != "classifier"}


def steps(exp, state, n):
    """``n`` train steps on fixed random data; returns the state on the host."""
    rng = np.random.default_rng(0)
    batch = dict(
        image=rng.normal(size=(16, SIZE, SIZE, 1)).astype(np.float32), label=rng.integers(0, 10, 16).astype(np.int32)
    )
    step = exp.train_step()
    for _ in range(n):
        state, _ = step(state, to_global_batch(batch, exp.mesh))
    return jax.device_get(state)


# ------------------------------------------------------------------------------------ what a run starts from


def test_a_bn_run_starts_from_the_source_weights_and_statistics_on_8_devices(tmp_path, capsys):
    source = make_source(tmp_path / "src", "resnet_small")
    cfg = make_config("resnet_small", model__init_from=str(tmp_path / "src"), optim__ema_decay=0.999)
    state = experiment(cfg).create_state()
    assert equal(state["params"], source["params"]) and equal(state["batch_stats"], source["batch_stats"])
    assert equal(state["ema"], source["params"])  # the EMA restarts from the loaded params
    assert int(state["step"]) == 0 and all(not np.any(x) for x in jax.tree.leaves(state["opt_state"]))
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(state)} == {8}
    line = capsys.readouterr().err.strip()
    assert f"init_from={tmp_path / 'src'} (checkpoint step 5, resnet_small)" in line
    assert "weights from its params, classifier kept (10 classes); optimizer state, EMA and step start fresh" in line


@pytest.mark.parametrize("source_classes, reset, new_head", [(5, "auto", True), (10, "auto", False), (10, True, True)])
def test_the_classifier_is_reset_when_the_class_count_differs_or_when_asked(tmp_path, source_classes, reset, new_head):
    source = make_source(tmp_path / "src", classes=source_classes)
    cfg = make_config(model__init_from=str(tmp_path / "src"), model__reset_classifier=reset)
    state = jax.device_get(experiment(cfg).create_state())
    fresh = jax.device_get(experiment(make_config()).create_state())  # random init with the run's seed
    assert equal(without_head(state["params"]), without_head(source["params"]))
    head = (fresh if new_head else source)["params"]["classifier"]
    assert equal(state["params"]["classifier"], head)


def test_a_damaged_newest_source_step_falls_back_to_the_previous_one_untouched(tmp_path, capsys):
    source = make_source(tmp_path / "src")
    make_source(tmp_path / "src", step=9)
    weights = tmp_path / "src/checkpoints/9/weights"
    max(
        (p for p in weights.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size
    ).unlink()
    before = snapshot(tmp_path / "src")
    state = experiment(make_config(model__init_from=str(tmp_path / "src"))).create_state()
    assert equal(state["params"], source["params"])
    err = capsys.readouterr().err
    assert "warning: checkpoint step 9" in err and "left in place" in err and "(checkpoint step 5," in err
    assert snapshot(tmp_path / "src") == before


@pytest.mark.parametrize("field, value", [("init_weights", "latest"), ("reset_classifier", "maybe")])
def test_invalid_init_fields_are_refused_when_the_run_is_built(field, value):
    with pytest.raises(ValueError, match=f"model.{field}='{value}' is invalid: valid values are 'auto'"):
        experiment(make_config(**{f"model__{field}": value}))


def test_keeping_a_classifier_of_another_class_count_is_refused(tmp_path):
    make_source(tmp_path / "src", classes=5)
    cfg = make_config(model__init_from=str(tmp_path / "src"), model__reset_classifier="false")
    with pytest.raises(InitFromError, match="reset_classifier=false .* 5 classes, but this run's dataset has 10"):
        experiment(cfg).create_state()


def test_init_weights_chooses_the_ema_or_the_params(tmp_path):
    source = make_source(tmp_path / "ema", ema=True)
    for which, expected in (("auto", "ema"), ("ema", "ema"), ("params", "params")):
        cfg = make_config(model__init_from=str(tmp_path / "ema"), model__init_weights=which)
        assert equal(experiment(cfg).create_state()["params"], source[expected]), which
    make_source(tmp_path / "plain")
    cfg = make_config(model__init_from=str(tmp_path / "plain"), model__init_weights="ema")
    with pytest.raises(InitFromError, match="keeps no EMA weights"):
        experiment(cfg).create_state()


def test_a_converted_weights_folder_is_a_source_and_sets_the_recipe(tmp_path):
    """A folder written by nfjax.convert (3 channels, 1000 classes, ImageNet preprocessing)."""
    from nfjax.convert import pretrained

    rng = np.random.default_rng(3)
    identity = dict(model="nf_resnet_small", model_kwargs=TINY, num_classes=1000, in_channels=3)
    params = jax.tree.map(lambda x: rng.normal(0, 0.1, x.shape).astype(np.float32), abstract_trees(identity)["params"])
    prep = pretrained.preprocessing(28, 32, resize="crop_pct", crop_pct=0.9)
    folder = str(tmp_path / "converted")
    pretrained.save_pretrained(
        folder, model="nf_resnet_small", model_kwargs=TINY, weights=dict(params=params), source={}, prep=prep
    )
    cfg = load_config_file(f"{ROOT}/configs/finetune.py:init_from={folder},dataset=image_folder,data_dir={tmp_path}")
    assert (cfg.model.name, cfg.model.kwargs.widths, cfg.model.init_from) == ("nf_resnet_small", [8, 16, 16], folder)
    data = cfg.data
    assert (data.eval_preprocess, data.crop_pct, data.mean, data.image_size) == ("crop_pct", 0.9, IMAGENET_MEAN, 28)
    state = experiment(make_config(model__init_from=folder), channels=3).create_state()
    assert equal(without_head(state["params"]), without_head(params))
    assert state["params"]["classifier"]["kernel"].shape == (16, 10)


# ---------------------------------------------------------------------------------------- what trains


def test_freeze_backbone_trains_the_classifier_only(tmp_path):
    make_source(tmp_path / "src")
    cfg = make_config(model__init_from=str(tmp_path / "src"), optim__freeze_backbone=True)
    exp = experiment(cfg)
    start = jax.device_get(state := exp.create_state())
    end = steps(exp, state, 2)
    assert equal(without_head(end["params"]), without_head(start["params"]))  # bit-identical: not even decay
    assert not np.array_equal(end["params"]["classifier"]["kernel"], start["params"]["classifier"]["kernel"])


def test_backbone_lr_scale_scales_the_backbone_update_only(tmp_path):
    make_source(tmp_path / "src")
    plain_sgd = dict(optim__momentum=0.0, optim__clipping="none", optim__weight_decay=0.0, optim__schedule="constant")
    start, deltas = None, {}
    for scale in (1.0, 0.5, 0.0):
        cfg = make_config(
            model__init_from=str(tmp_path / "src"), optim__backbone_lr_scale=scale, optim__base_lr=8.0, **plain_sgd
        )
        exp = experiment(cfg)
        if start is None:
            start = jax.device_get(exp.create_state())
        # the same start for every scale; only the (stateless) optimizer's empty state differs
        state = jax.device_put(dict(start, opt_state=exp.optimizer.tx.init(start["params"])), exp.state_spec.shardings)
        deltas[scale] = jax.tree.map(lambda a, b: a - b, steps(exp, state, 1)["params"], start["params"])
    full, half, zero = deltas[1.0], deltas[0.5], deltas[0.0]
    assert equal(half["classifier"], full["classifier"]) and equal(zero["classifier"], full["classifier"])
    assert all(not np.any(x) for x in jax.tree.leaves(without_head(zero)))  # 0: frozen values
    moved = max(np.abs(x).max() for x in jax.tree.leaves(without_head(full)))
    assert moved > 1e-3
    for a, b in zip(jax.tree.leaves(without_head(half)), jax.tree.leaves(without_head(full)), strict=True):
        np.testing.assert_allclose(a, 0.5 * b, rtol=1e-4, atol=1e-6)  # float32 rounding of p + u only


# ------------------------------------------------------------------------------------- refused sources


@pytest.mark.parametrize(
    "model, kwargs, channels, needles",
    [
        ("resnet_small", TINY, 1, ["model 'resnet_small' (this run: 'nf_resnet_small')", "missing from the source"]),
        ("nf_resnet_small", dict(TINY, widths=(8, 16, 32)), 1, ["model.kwargs.widths=[8, 16, 32]", "of another shape"]),
        ("nf_resnet_small", TINY, 3, ["3 input channels (this run's data: 1", "grayscale_to_rgb=true"]),
    ],
)
def test_a_source_of_another_model_is_refused_naming_what_differs(tmp_path, model, kwargs, channels, needles):
    make_source(tmp_path / "src", model, kwargs, channels=channels)
    exp = experiment(make_config(model__init_from=str(tmp_path / "src")))
    with pytest.raises(InitFromError) as error:
        exp.create_state()
    for needle in [*needles, "Only the classifier may differ", "config.json"]:
        assert needle in str(error.value), str(error.value)


def test_training_only_arguments_may_differ(tmp_path):
    source = make_source(tmp_path / "src")
    kwargs = dict(TINY, stochdepth_rate=0.2, drop_rate=0.3)
    state = experiment(make_config(kwargs=kwargs, model__init_from=str(tmp_path / "src"))).create_state()
    assert equal(state["params"], source["params"])


# --------------------------------------------------------------------------------------------- the CLI


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A 10-class image folder of 28x28 RGB PNGs: stripes of a per-class angle and frequency, random phase, noise
    (global pooling keeps the stripes' orientation, so a classifier on pooled features can learn the classes)."""
    root = tmp_path_factory.mktemp("folder")
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:28, 0:28] / 28.0
    for c in range(10):
        (root / f"class_{c}").mkdir()
        along = (2 + c % 3) * (x * np.cos(np.pi * c / 10) + y * np.sin(np.pi * c / 10))  # cycles across the image
        for i in range(12):
            wave = np.sin(2 * np.pi * along + rng.uniform(0, 2 * np.pi))[..., None]
            pixels = np.clip(128 + 100 * wave + rng.normal(0, 10, (28, 28, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class_{c}" / f"{i}.png")
    return root


# The fine-tuning run's settings; its resumption repeats them (the same step program: compiled once).
CLI_RUN = ("--config.train.log_every_steps=1", "--config.train.eval_every_steps=1000", "--config.optim.base_lr=4.0")


def cli_args(source, folder, workdir, *extra):
    arg = f"init_from={source},dataset=image_folder,data_dir={folder},batch=16,epochs=2,augment=none"
    return ["--config", f"{ROOT}/configs/finetune.py:{arg}", "--workdir", str(workdir), *extra]


@pytest.fixture(scope="module")
def finetuned(folder, tmp_path_factory):
    """8 steps of configs/finetune.py from a 4-class source onto the 10-class folder (a new classifier)."""
    source, workdir = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("finetuned")
    make_source(source, classes=4, channels=3, size=28, data__eval_preprocess="none", fresh=True)
    assert train.main(cli_args(source, folder, workdir, "--config.train.max_steps=8", *CLI_RUN)) == 0
    return source, workdir


def test_cli_fine_tuning_onto_a_new_head_learns(finetuned):
    _, workdir = finetuned
    losses = [r["loss"] for r in train_rows(workdir)]
    assert len(losses) == 8 and np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.1, losses
    assert checkpoint_steps(workdir) == [8]


def test_resume_ignores_init_from(finetuned, folder, tmp_path, capsys):
    source, workdir = finetuned
    shutil.copytree(workdir, tmp_path / "run")
    extra = ("--config.train.max_steps=2", *CLI_RUN, f"--config.model.init_from={tmp_path / 'gone'}")
    assert train.main(cli_args(source, folder, tmp_path / "run", *extra)) == 0
    assert "model.init_from is ignored: resuming the run's own checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in train_rows(tmp_path / "run")] == list(range(1, 11))


def test_cli_refuses_a_source_of_another_model_before_writing_anything(folder, tmp_path, capsys):
    make_source(tmp_path / "src", "resnet_small", classes=4, channels=3, size=28)
    code = train.main(cli_args(tmp_path / "src", folder, tmp_path / "run", "--config.model.name=nf_resnet_small"))
    assert_clean_error(code, capsys.readouterr().err, "model 'resnet_small' (this run: 'nf_resnet_small')")
    assert not (tmp_path / "run").exists()
