"""The exponential and SGDR (cosine with warm restarts) schedules against hand-computed values, reduce-on-plateau's
logic on a given sequence of evaluations, its scale in the train step, and a run stopped and resumed through the
trainer that continues exactly as the uninterrupted one (docs/optim.md#reduce-on-plateau)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfjax import config_lib, experiment, optim, plateau, runs, train
from nfjax.metrics import read_metrics

from helpers import ROOT, checkpoint_steps, two_class_image_folder


def lrs(schedule, steps) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)), np.float64)


def schedule_of(steps_per_epoch=10, total_steps=200, **overrides):
    """Peak L = 0.1 (no batch scaling), warmup from 0."""
    fields = dict(base_lr=0.1, scale_lr_by_batch=False, warmup_epochs=0.0) | overrides
    return optim.build_optimizer(fields, steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=256)


def sgdr_reference(t, *, warmup, spe, peak, floor, period, mult, decay):
    """lr(t) after the warmup by walking the cycles one by one (no logarithm): torch's CosineAnnealingWarmRestarts
    with eta_min = floor, each cycle's peak times ``decay``."""
    e, i, length = (t - warmup) / spe, 0, period
    while e >= length:
        e, i, length = e - length, i + 1, length * mult
    top = max(peak * decay**i, floor)
    return floor + (top - floor) * (1 + math.cos(math.pi * e / length)) / 2


# ------------------------------------------------------------------------------------------- exponential


def test_exponential_after_warmup_with_floor_and_epoch_staircase():
    """W = 20 steps (2 epochs of 10), L = 0.1, gamma 0.5 per epoch, floor 0.01: lr = max(0.1 * 0.5 ** ((t - 20) /
    10), 0.01)."""
    fields = dict(schedule="exponential", warmup_epochs=2.0, exp_decay_rate=0.5, end_lr_factor=0.1)
    steps = [0, 10, 19, 20, 25, 30, 40, 50, 60, 199]
    expected = [0.0, 0.05, 0.095, 0.1, 0.1 * 0.5**0.5, 0.05, 0.025, 0.0125, 0.01, 0.01]  # 0.00625 -> floor
    np.testing.assert_allclose(lrs(schedule_of(**fields).schedule, steps), expected, rtol=1e-6)
    # Per epoch: held at the value of the epoch's first step (warmup included), as torch stepped once per epoch.
    staircase = schedule_of(**fields, schedule_unit="epoch").schedule
    np.testing.assert_allclose(lrs(staircase, [15, 25, 29, 30, 39, 41]), [0.05, 0.1, 0.1, 0.05, 0.05, 0.025], rtol=1e-6)


def test_exponential_with_fractional_steps_per_epoch():
    """12.5 steps per epoch (step_counting='examples'), one warmup epoch: W = 12.5, so step 12 still warms up and
    step 13 is 0.04 epochs into the decay."""
    opt = schedule_of(12.5, schedule="exponential", warmup_epochs=1.0, exp_decay_rate=0.5)
    expected = [0.1 * 12 / 12.5, 0.1 * 0.5**0.04, 0.05, 0.1 * 0.5**1.96]  # step 37: (37 - 12.5) / 12.5 epochs
    np.testing.assert_allclose(lrs(opt.schedule, [12, 13, 25, 37]), expected, rtol=1e-6)
    staircase = schedule_of(12.5, schedule="exponential", warmup_epochs=1.0, exp_decay_rate=0.5, schedule_unit="epoch")
    # step 37: epoch 2 starts at step 25 (e = 1); step 38: epoch 3 starts at 37.5 (e = 2).
    np.testing.assert_allclose(lrs(staircase.schedule, [12, 13, 37, 38]), [0.0, 0.1, 0.05, 0.025], rtol=1e-6)


# ------------------------------------------------------------------------------------------- SGDR


def test_cosine_restarts_boundaries_with_mult_2_and_decay():
    """W = 10 (1 epoch), T_0 = 2 epochs, T_mult = 2, restart_decay 0.5, floor 0.01: cycles of 20, 40, 80 steps
    starting at steps 10, 30, 70, 150 from peaks 0.1, 0.05, 0.025, 0.0125."""
    fields = dict(schedule="cosine_restarts", warmup_epochs=1.0, end_lr_factor=0.1)
    fields |= dict(restart_epochs=2.0, restart_mult=2.0, restart_decay=0.5)
    opt = schedule_of(**fields)
    cos = lambda top, progress: 0.01 + (top - 0.01) * (1 + math.cos(math.pi * progress)) / 2
    hand = {
        9: 0.09,  # warmup
        10: 0.1,  # first cycle's peak
        20: 0.055,  # half-way down the first cycle
        29: cos(0.1, 0.95),
        30: 0.05,  # restart: peak x 0.5
        50: 0.03,  # half-way through the second cycle (40 steps)
        69: cos(0.05, 39 / 40),
        70: 0.025,
        150: 0.0125,
        199: cos(0.0125, 49 / 160),
    }
    np.testing.assert_allclose(lrs(opt.schedule, list(hand)), list(hand.values()), rtol=1e-5)
    every = np.arange(10, 200)
    reference = [sgdr_reference(t, warmup=10, spe=10, peak=0.1, floor=0.01, period=2, mult=2, decay=0.5) for t in every]
    np.testing.assert_allclose(lrs(opt.schedule, every), reference, rtol=1e-5, atol=1e-8)
    # Per epoch: step 35 holds step 30's value (the restart), step 29 holds step 20's.
    staircase = schedule_of(**fields, schedule_unit="epoch").schedule
    np.testing.assert_allclose(lrs(staircase, [29, 35, 75]), [0.055, 0.05, 0.025], rtol=1e-5)


@pytest.mark.parametrize("mult", [1.0, 1.5])
def test_cosine_restarts_with_fractional_steps_per_epoch(mult):
    """7.5 steps per epoch, T_0 = 1.5 epochs: the first restart falls between steps 11 and 12 (11.25)."""
    fields = dict(schedule="cosine_restarts", restart_epochs=1.5, restart_mult=mult, restart_decay=0.8)
    opt = schedule_of(7.5, total_steps=300, **fields)
    every = np.arange(0, 300)
    kw = dict(warmup=0, spe=7.5, peak=0.1, floor=0.0, period=1.5, mult=mult, decay=0.8)
    np.testing.assert_allclose(lrs(opt.schedule, every), [sgdr_reference(t, **kw) for t in every], atol=2e-7)
    # Step 12 is 0.75 steps (0.1 epochs) into the second cycle, whose peak is 0.08.
    assert lrs(opt.schedule, [12])[0] == pytest.approx(0.04 * (1 + math.cos(math.pi * 0.1 / (1.5 * mult))), rel=1e-5)


# ------------------------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "overrides, needles",
    [
        (dict(exp_decay_rate=0.0), ["optim.exp_decay_rate=0.0", "(0, 1]"]),
        (dict(exp_decay_rate=1.5), ["optim.exp_decay_rate=1.5", "(0, 1]"]),
        (dict(restart_mult=0.5), ["optim.restart_mult=0.5", ">= 1"]),
        (dict(restart_decay=0.0), ["optim.restart_decay=0.0", "(0, 1]"]),
        (dict(restart_epochs=0.0), ["optim.restart_epochs=0.0", "> 0"]),
        (dict(schedule="cosine_restarts", restart_epochs=0.05), ["optim.restart_epochs=0.05", "at least 0.1 epochs"]),
        (dict(schedule="exponential", cooldown_epochs=1.0), ["optim.cooldown_epochs=1.0", "'exponential'"]),
        (dict(schedule="sgdr"), ["optim.schedule='sgdr'", "'cosine_restarts'", "'exponential'"]),
        (dict(plateau_patience=-1), ["optim.plateau_patience=-1", ">= 0"]),
        (dict(plateau_factor=1.0), ["optim.plateau_factor=1.0", "(0, 1)"]),
        (dict(plateau_threshold=0.0), ["optim.plateau_threshold=0.0", "(0, 1)"]),
        (dict(plateau_threshold=1.0), ["optim.plateau_threshold=1.0", "(0, 1)"]),
        (dict(plateau_min_scale=1.0), ["optim.plateau_min_scale=1.0", "[0, 1)"]),
        (dict(plateau_cooldown=-2), ["optim.plateau_cooldown=-2", ">= 0"]),
        (dict(plateau_metric="acc"), ["optim.plateau_metric='acc'", "'top1'", "'macro_f1'"]),
        (
            dict(plateau_patience=2, plateau_split="eval_ema", ema_decay=0.0),
            ["optim.plateau_split='eval_ema'", "ema_decay=0", "'eval'"],
        ),
    ],
)
def test_bad_values_name_the_field(overrides, needles):
    with pytest.raises(ValueError) as err:
        schedule_of(**overrides)
    for needle in needles:
        assert needle in str(err.value), str(err.value)


def test_plateau_needs_evaluations_during_training():
    opt = schedule_of(plateau_patience=2)
    train_cfg = config_lib.default_train_config()
    train_cfg.update(eval_every_steps=50)
    experiment._check_plateau_evaluations(opt, experiment.Lengths(10, 200, 50, 10), train_cfg)  # 3 before the end
    train_cfg.update(eval_every_steps=100)
    with pytest.raises(ValueError) as err:
        experiment._check_plateau_evaluations(opt, experiment.Lengths(10, 200, 100, 10), train_cfg)
    for needle in ("optim.plateau_patience=2", "train.eval_every_steps=100", "1 times before the end", "at least 3"):
        assert needle in str(err.value), str(err.value)


# ------------------------------------------------------------------------------------------- plateau logic


def run_plateau(values, **fields):
    rule = plateau.Plateau.from_config(
        optim.validate_optim_config(fields, steps_per_epoch=10, total_steps=100, global_batch=256)
    )
    state, seen = rule.init(), []
    update = jax.jit(rule.update)
    for v in values:
        state = update(state, rule.value_of(v))
        seen.append(plateau.describe(jax.device_get(state)))
    return seen


def test_plateau_cuts_the_scale_after_patience_bad_evaluations_with_cooldown_and_min_scale():
    """patience 2, factor 0.5, relative threshold 0.1 (improved: v < 0.9 best), cooldown 1, min scale 0.2."""
    losses = [1.0, 0.95, 0.8, 0.79, 0.85, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7, 0.7]
    fields = dict(plateau_patience=2, plateau_factor=0.5, plateau_threshold=0.1, plateau_cooldown=1)
    seen = run_plateau([{"eval": {"loss": v}} for v in losses], plateau_min_scale=0.2, **fields)
    # 0.95 is not 10% better than 1.0, nor 0.79 than 0.8: two bad in a row at 0.85 -> cut, then one evaluation of
    # cooldown (0.7 becomes the best there), two bad -> 0.25, cooldown, two bad -> 0.125, held at 0.2.
    expected = [1, 1, 1, 1, 0.5, 0.5, 0.5, 0.25, 0.25, 0.25, 0.2, 0.2]
    np.testing.assert_allclose([s["lr_scale"] for s in seen], expected, rtol=1e-7)  # 0.2 in float32
    assert [s["bad_evaluations"] for s in seen] == [0, 1, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
    assert [s["cooldown_left"] for s in seen] == [0, 0, 0, 0, 1, 0, 0, 1, 0, 0, 1, 0]
    np.testing.assert_allclose([s["best"] for s in seen], [1, 1, 0.8, 0.8, 0.8] + [0.7] * 7, rtol=1e-6)


def test_plateau_on_top1_of_the_ema_is_higher_is_better():
    """top1 0.5, 0.6, 0.6, 0.55 of eval_ema (eval's values would improve): fed as errors 0.5, 0.4, 0.4, 0.45;
    patience 1, so the first evaluation without improvement cuts the scale by 0.1."""
    results = [{"eval": {"top1": 0.1 * i}, "eval_ema": {"top1": v}} for i, v in enumerate([0.5, 0.6, 0.6, 0.55])]
    seen = run_plateau(results, plateau_patience=1, plateau_metric="top1", plateau_split="eval_ema")
    np.testing.assert_allclose([s["lr_scale"] for s in seen], [1, 1, 0.1, 0.01], rtol=1e-6)
    np.testing.assert_allclose([s["best"] for s in seen], [0.5, 0.4, 0.4, 0.4], rtol=1e-6)


def test_the_scale_multiplies_the_update_and_the_logged_lr():
    """SGD without momentum, decay or clipping at lr 0.1 and scale 0.25: p <- p - 0.025 g; metrics lr = 0.025."""
    opt = schedule_of(
        schedule="constant", momentum=0.0, weight_decay=0.0, clipping="none", ema_decay=0.0, plateau_patience=1
    )
    params = {"w": jnp.array([1.0, 2.0])}
    state = dict(step=jnp.zeros((), jnp.int32), params=params, **opt.init(params))
    assert float(state["plateau"].scale) == 1.0
    state["plateau"] = state["plateau"]._replace(scale=jnp.float32(0.25))
    new, metrics = jax.jit(opt.apply)(state, {"w": jnp.array([4.0, -8.0])})
    np.testing.assert_allclose(new["params"]["w"], [1 - 0.1, 2 + 0.2], rtol=1e-6)
    assert float(metrics["lr"]) == pytest.approx(0.025) and float(metrics["lr_scale"]) == 0.25
    # the parameter norm is the starting params' (the previous step's result), the update norm the step's own
    assert float(metrics["param_norm"]) == pytest.approx(math.sqrt(5.0), rel=1e-6)
    assert float(metrics["update_norm"]) == pytest.approx(0.025 * math.sqrt(80.0), rel=1e-6)
    assert float(metrics["grad_norm"]) == pytest.approx(math.sqrt(80.0), rel=1e-6)


# ------------------------------------------------------------------------------------------- through the trainer


def image_folder(root):
    """root/{train,test}/{a,b}/*.png: 16 training and 4 test images per class, 28x28 RGB."""
    return two_class_image_folder(root, per_class=16)


def run_args(data, workdir, *extra):
    """8 steps of 8 images, an evaluation every 2 steps, a checkpoint every 4; constant lr 0.5 with
    reduce-on-plateau (patience 1) on the eval loss. The threshold 0.9 (a 90% drop needed) makes every evaluation
    after the first a bad one, so the scale is 1, 0.1, 0.01, 0.001 after the evaluations at steps 2, 4, 6, 8."""
    return [
        "--config",
        f"{ROOT}/configs/fmnist_nf.py",
        "--workdir",
        str(workdir),
        "--config.data.dataset=image_folder",
        f"--config.data.data_dir={data}",
        "--config.model.kwargs.depths=(1,)",  # one stage of one block: the init and the step compile in seconds
        "--config.model.kwargs.widths=(8,)",
        "--config.model.kwargs.strides=(2,)",
        "--config.model.kwargs.stem_width=8",
        "--config.train.num_devices=2",  # the plateau state replicated over a mesh of more than one device
        "--config.train.global_batch=8",
        "--config.train.total_steps=8",
        "--config.train.eval_batch=8",
        "--config.train.eval_every_steps=2",
        "--config.train.checkpoint_every_steps=4",
        "--config.train.log_every_steps=1",
        "--config.optim.warmup_epochs=0",
        "--config.optim.schedule=constant",
        "--config.optim.base_lr=16.0",  # 16 * 8 / 256 = 0.5
        "--config.optim.plateau_patience=1",
        "--config.optim.plateau_threshold=0.9",
        *extra,
    ]


def rows(workdir, split):
    return [r for r in read_metrics(workdir) if r["split"] == split]


def test_a_resumed_run_continues_the_plateau_exactly(tmp_path):
    data = image_folder(tmp_path / "images")
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert train.main(run_args(data, whole)) == 0
    assert train.main(run_args(data, parts, "--config.train.max_steps=4")) == 0
    assert checkpoint_steps(parts) == [4]
    assert train.main(run_args(data, parts)) == 0  # resumes at step 5, with the checkpointed scale and best loss
    scales = [(r["step"], r["lr_scale"]) for r in rows(whole, "plateau")]
    assert scales == [(2, 1.0), (4, pytest.approx(0.1)), (6, pytest.approx(0.01)), (8, pytest.approx(0.001))]
    lr = [r["lr"] for r in rows(whole, "train")]  # the lr of each step: schedule x the scale before it
    np.testing.assert_allclose(lr, [0.5] * 4 + [0.05] * 2 + [0.005] * 2, rtol=1e-6)
    assert [r["lr_scale"] for r in rows(whole, "train")] == pytest.approx([1] * 4 + [0.1] * 2 + [0.01] * 2)
    for split, keys in (("plateau", ("value", "lr_scale", "best", "bad_evaluations")), ("train", ("lr", "loss"))):
        a, b = rows(whole, split), rows(parts, split)
        assert [r["step"] for r in a] == [r["step"] for r in b], split
        for key in keys:
            np.testing.assert_allclose([r[key] for r in b], [r[key] for r in a], rtol=1e-5, err_msg=f"{split}/{key}")
    final_a = runs.load_run(str(whole), num_devices=1).weights["params"]
    final_b = runs.load_run(str(parts), num_devices=1).weights["params"]
    for x, y in zip(jax.tree.leaves(final_a), jax.tree.leaves(final_b), strict=True):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-5, atol=1e-6)
