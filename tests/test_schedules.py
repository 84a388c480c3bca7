"""Step counting and learning-rate schedules against the references' own formulas, computed here in NumPy:
DeepMind's NFNet experiment (examples-based step count, fractional warmup) and timm's CosineLRScheduler (warmup
from --warmup-lr, cosine not shifted by the warmup, stepped per epoch or per update, cooldown). Where torch and
timm import (``/opt/timmenv/bin/python -m pytest tests/test_schedules.py``), also against timm's scheduler itself."""

import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nfjax import config_lib, experiment, optim
from nfjax.config_lib import load_config_file
from nfjax.data import DatasetInfo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGENET = DatasetInfo(1_281_167, 50_000, 1000, (192, 192, 3), ())


def lrs(schedule, steps) -> np.ndarray:
    return np.asarray(jax.jit(jax.vmap(schedule))(jnp.asarray(steps, jnp.int32)), np.float64)


def build(steps_per_epoch, total_steps, global_batch=256, **overrides) -> optim.Optimizer:
    return optim.build_optimizer(
        overrides, steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch
    )


# ------------------------------------------------------------------------------ DeepMind: step counting


def deepmind_lr(itr, max_val, num_steps, warmup_steps, dtype):
    """nfnets/optim.py WarmupCosineDecay(start_val=0, min_val=0) in ``dtype``, the same order of operations: the
    warmup value when ``itr <= warmup_steps``, else the cosine (it selects with ``warmup_steps < itr``)."""
    itr, warmup, f = dtype(itr), dtype(warmup_steps), dtype
    warmup_val = f(max_val) * (itr / warmup)
    cos = f(1) + np.cos(f(np.pi) * ((itr - warmup) / (f(num_steps) - warmup)))
    cos_val = f(0.5 * max_val) * cos
    return cos_val if warmup < itr else warmup_val


def test_nfnet_f0_examples_step_counting_is_deepminds():
    """experiment_nfnets.py: training_steps = 1281167 * 360 // 4096 = 112,602 (not 312 * 360 = 112,320) and
    warmup_steps = 5 * 1281167 / 4096 = 1563.88 (a float); lr = 1.6 * t / 1563.88 up to step 1563, then the cosine
    from step 1564. The data still yields whole batches: 312 per epoch."""
    cfg = load_config_file(f"{ROOT}/configs/nfnet_f0.py")
    cfg.train.step_counting = "examples"
    exp = experiment.build_experiment(cfg, info=IMAGENET)
    assert exp.lengths.steps_per_epoch == 312 and exp.lengths.total_steps == 112_602
    assert exp.lengths.schedule_steps_per_epoch == 1_281_167 / 4096
    opt = exp.optimizer
    assert opt.total_steps == 112_602 and optim.warmup_steps_of(opt.config, opt.steps_per_epoch) == 5 * 1_281_167 / 4096
    steps = [0, 1, 2, 781, 1563, 1564, 1565, 3000, 56_301, 100_000, 112_000, 112_600, 112_601]
    got = lrs(opt.schedule, steps)
    warmup = 5 * 1_281_167 / 4096
    f32 = [deepmind_lr(t, 1.6, 112_602, warmup, np.float32) for t in steps]
    f64 = [deepmind_lr(t, 1.6, 112_602, warmup, np.float64) for t in steps]
    np.testing.assert_allclose(got, f32, rtol=1e-6, atol=2.5e-7)  # float32 ulp of 1.6: 1.2e-7
    np.testing.assert_allclose(got, f64, rtol=2e-6, atol=4e-7)
    assert got[0] == 0 and got[4] == pytest.approx(1.6 * 1563 / warmup, rel=1e-6) and got[4] < 1.5991  # warming up
    assert got[5] == pytest.approx(1.6, rel=1e-6) and got[7] < got[5]  # step 1564: on the cosine, at its peak
    # The default counting stays timm's (and this project's so far): 312 whole batches x 360 epochs.
    cfg.train.step_counting = "epochs"
    exp = experiment.build_experiment(cfg, info=IMAGENET)
    assert (exp.lengths.total_steps, exp.lengths.schedule_steps_per_epoch, exp.optimizer.total_steps) == (
        112_320,
        312,
        112_320,
    )
    assert float(exp.optimizer.schedule(1560)) == pytest.approx(1.6, rel=1e-6)


def test_examples_counting_with_fractional_epochs_and_total_steps_override():
    train = config_lib.default_train_config()
    train.update(global_batch=64, epochs=2.5, step_counting="examples")
    info = IMAGENET._replace(num_train_examples=1000)
    lengths = experiment._lengths(train, info)
    assert (lengths.steps_per_epoch, lengths.total_steps, lengths.schedule_steps_per_epoch) == (15, 39, 15.625)
    train.epochs = 3.0
    assert experiment._lengths(train, info).total_steps == 46  # 3000 // 64
    train.total_steps = 50
    assert experiment._lengths(train, info).total_steps == 50
    train.update(step_counting="epochs", total_steps=0)
    assert experiment._lengths(train, info).total_steps == 45  # round(3 x 15)
    del train["step_counting"]  # a config.json saved before the field existed reads as 'epochs'
    assert experiment._lengths(train, info).schedule_steps_per_epoch == 15


def test_fractional_epochs_for_warmup_and_step_boundaries():
    """With a float steps_per_epoch the warmup and the step boundaries stay fractional: 1000 examples at batch 64
    are 15.625 steps an epoch; boundaries at epochs 2 and 4 are steps 31.25 and 62.5, so the lr drops at 32 and 63."""
    opt = build(15.625, 100, schedule="step", warmup_epochs=1.0, step_boundaries_epochs=(2.0, 4.0), base_lr=0.4)
    got = lrs(opt.schedule, [0, 15, 16, 31, 32, 62, 63, 99])
    want = [0.0, 0.4 * 15 / 15.625, 0.4, 0.4, 0.04, 0.04, 0.004, 0.004]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    whole = build(15, 100, schedule="step", warmup_epochs=1.0, step_boundaries_epochs=(2.0, 4.0), base_lr=0.4)
    np.testing.assert_allclose(
        lrs(whole.schedule, [14, 15, 29, 30, 59, 60]), [0.4 * 14 / 15, 0.4, 0.4, 0.04, 0.04, 0.004], rtol=1e-6
    )


def test_warmup_cosine_default_is_unchanged():
    """The default schedule with whole steps: linear from 0 over round(5 x 312) = 1560 steps, then the cosine
    over the rest, as optax.join_schedules(linear_schedule, cosine_decay_schedule) gave before."""
    import optax

    opt = build(312, 112_320, global_batch=4096)
    reference = optax.join_schedules(
        [optax.linear_schedule(0.0, 1.6, 1560), optax.cosine_decay_schedule(1.6, 112_320 - 1560)], [1560]
    )
    steps = np.arange(0, 112_321, 37)
    np.testing.assert_allclose(lrs(opt.schedule, steps), lrs(reference, steps), rtol=1e-5, atol=2.5e-7)


# ------------------------------------------------------------------------------ timm: CosineLRScheduler


def timm_lr(t, *, lr, t_initial, warmup_t, warmup_lr, lr_min=0.0, warmup_prefix=False):
    """timm's CosineLRScheduler._get_lr (one cycle, no noise, k=1), written from its formula: t in the scheduler's
    unit (epochs by default, updates with --sched-on-updates)."""
    if t < warmup_t:
        return warmup_lr + t * (lr - warmup_lr) / warmup_t
    if warmup_prefix:
        t -= warmup_t
    if t >= t_initial:  # past the one cycle: the cooldown holds lr_min
        return lr_min
    return lr_min + 0.5 * (lr - lr_min) * (1 + math.cos(math.pi * t / t_initial))


RSB_A2 = dict(name="lamb", base_lr=5e-3 * 256 / 2048, weight_decay=0.02, eps=1e-6, ema_decay=0.0)


@pytest.mark.parametrize(
    "case",
    [
        # timm 1.0's train.py defaults: --warmup-lr 1e-5, --min-lr 0, --cooldown-epochs 0, stepped per epoch
        dict(warmup_lr=1e-5, min_lr=0.0, cooldown=0, unit="epoch"),
        # timm train.py of the RSB era (0.4.x-0.6.x): --warmup-lr 1e-4, --min-lr 1e-6, --cooldown-epochs 10
        dict(warmup_lr=1e-4, min_lr=1e-6, cooldown=10, unit="epoch"),
        # --sched-on-updates: the same curve in update units
        dict(warmup_lr=1e-5, min_lr=0.0, cooldown=0, unit="step"),
    ],
    ids=["timm1.0", "rsb-era", "on-updates"],
)
def test_timm_cosine_matches_timms_formula_for_rsb_a2(case):
    """RSB A2: lr 5e-3 at batch 2048, --epochs 300, 5 warmup epochs; ImageNet at batch 2048 is 625 updates an
    epoch (drop_last). timm trains --epochs + cooldown epochs; nfjax's train.epochs counts them all."""
    spe, epochs, cooldown = 625, 300, case["cooldown"]
    total = (epochs + cooldown) * spe
    opt = build(
        spe,
        total,
        global_batch=2048,
        **RSB_A2,
        schedule="timm_cosine",
        warmup_epochs=5.0,
        warmup_start_lr=case["warmup_lr"],
        end_lr_factor=case["min_lr"] / 5e-3,
        cooldown_epochs=float(cooldown),
        schedule_unit=case["unit"],
    )
    per_epoch = case["unit"] == "epoch"
    unit = spe if per_epoch else 1
    kw = dict(lr=5e-3, t_initial=epochs * spe // unit, warmup_t=5 * spe // unit, warmup_lr=case["warmup_lr"])
    steps = sorted({*range(0, 8 * spe, 97), *range(0, total, 611), 624, 625, 3124, 3125, 3126, total - 1})
    want = [timm_lr(t // unit, **kw, lr_min=case["min_lr"]) for t in steps]
    np.testing.assert_allclose(lrs(opt.schedule, steps), want, rtol=2e-6, atol=1e-9)  # float32: 2e-7 x peak
    got = lrs(opt.schedule, [0, spe - 1, spe, 5 * spe - 1, 5 * spe])
    if per_epoch:  # held for the whole epoch; the warmup never reaches 5e-3: epoch 5 is already on the cosine
        assert got[0] == got[1] == pytest.approx(case["warmup_lr"]) and got[2] > got[1]
        floor = case["min_lr"]
        assert got[4] == pytest.approx(floor + 0.5 * (5e-3 - floor) * (1 + math.cos(math.pi * 5 / 300)), rel=1e-6)
    else:
        assert got[1] == pytest.approx(case["warmup_lr"] + 624 * (5e-3 - case["warmup_lr"]) / 3125, rel=1e-6)
    if cooldown:
        assert lrs(opt.schedule, [epochs * spe - 1, epochs * spe, total - 1])[1:] == pytest.approx([1e-6, 1e-6])


def test_warmup_cosine_is_timms_warmup_prefix_and_cooldown_holds_the_floor():
    """timm with warmup_prefix=True runs the cosine after the warmup over --epochs: nfjax's warmup_cosine with
    train.epochs = warmup + --epochs (+ cooldown)."""
    spe, warmup, epochs, cooldown = 10, 3, 20, 2
    total = (warmup + epochs + cooldown) * spe
    opt = build(spe, total, warmup_epochs=float(warmup), warmup_start_lr=0.01, end_lr_factor=0.1, cooldown_epochs=2.0)
    kw = dict(lr=0.1, t_initial=epochs * spe, warmup_t=warmup * spe, warmup_lr=0.01, lr_min=0.01, warmup_prefix=True)
    steps = list(range(total))
    np.testing.assert_allclose(lrs(opt.schedule, steps), [timm_lr(t, **kw) for t in steps], rtol=2e-6, atol=1e-9)


# ------------------------------------------------------------------------------ timm itself (optional)


def import_timm_or_skip():
    pytest.importorskip("torch")
    try:
        from nfjax.benchmark_train import import_timm

        return import_timm()
    except ImportError:
        pytest.skip("timm is not installed")


def timm_replay(timm, *, lr, epochs, warmup_epochs, warmup_lr, min_lr, cooldown, updates_per_epoch, on_updates, prefix):
    """The lr of every update of a timm train.py run: the scheduler from timm's own factory, stepped as train.py
    steps it (step_update(num_updates) after each update, step(epoch + 1) after each epoch)."""
    import torch
    from timm.scheduler import create_scheduler_v2

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler, num_epochs = create_scheduler_v2(
        optimizer,
        sched="cosine",
        num_epochs=epochs,
        warmup_epochs=warmup_epochs,
        warmup_lr=warmup_lr,
        min_lr=min_lr,
        cooldown_epochs=cooldown,
        warmup_prefix=prefix,
        step_on_epochs=not on_updates,
        updates_per_epoch=updates_per_epoch,
    )
    used, num_updates = [], 0
    for epoch in range(num_epochs):
        for _ in range(updates_per_epoch):
            used.append(optimizer.param_groups[0]["lr"])
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
        scheduler.step(epoch + 1)
    return num_epochs, np.asarray(used)


@pytest.mark.parametrize("on_updates", [False, True], ids=["per-epoch", "per-update"])
@pytest.mark.parametrize("prefix", [False, True], ids=["timm_cosine", "warmup_prefix"])
def test_schedules_equal_timms_cosine_lr_scheduler(on_updates, prefix):
    timm = import_timm_or_skip()
    spe, epochs, warmup, cooldown, lr = 10, 30, 5, 3, 5e-3
    args = dict(lr=lr, epochs=epochs, warmup_epochs=warmup, warmup_lr=1e-5, min_lr=1e-6, cooldown=cooldown)
    num_epochs, want = timm_replay(timm, **args, updates_per_epoch=spe, on_updates=on_updates, prefix=prefix)
    assert num_epochs == epochs + cooldown + (warmup if prefix else 0)  # what nfjax's train.epochs must be
    opt = build(
        spe,
        num_epochs * spe,
        base_lr=lr,
        scale_lr_by_batch=False,
        schedule="warmup_cosine" if prefix else "timm_cosine",
        warmup_epochs=float(warmup),
        warmup_start_lr=1e-5,
        end_lr_factor=1e-6 / lr,
        cooldown_epochs=float(cooldown),
        schedule_unit="step" if on_updates else "epoch",
    )
    np.testing.assert_allclose(
        lrs(opt.schedule, np.arange(num_epochs * spe)), want, rtol=2e-6, atol=2e-7 * lr
    )  # float32 near the floor


# ------------------------------------------------------------------------------ validation

BAD = [
    ({"schedule": "cosine"}, ["optim.schedule", "'timm_cosine'", "'warmup_cosine'"]),
    ({"schedule_unit": "epochs"}, ["optim.schedule_unit", "'step'", "'epoch'"]),
    ({"warmup_start_lr": -1e-5}, ["optim.warmup_start_lr", ">= 0"]),
    ({"cooldown_epochs": -1.0}, ["optim.cooldown_epochs", ">= 0"]),
    ({"schedule": "step", "cooldown_epochs": 2.0}, ["optim.cooldown_epochs", "cosine schedules", "'step'"]),
    ({"cooldown_epochs": 6.0}, ["optim.cooldown_epochs", "warmup (50 steps)", "cooldown (60 steps)", "shorten"]),
    ({"warmup_epochs": 10.5}, ["optim.warmup_epochs", "warmup (105 steps)", "shorter than training (100 steps)"]),
]


@pytest.mark.parametrize(("overrides", "needles"), BAD, ids=[str(o) for o, _ in BAD])
def test_bad_schedule_fields_are_one_clear_paragraph(overrides, needles):
    with pytest.raises(ValueError) as err:
        build(10, 100, **overrides)
    assert "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))


@pytest.mark.parametrize(
    ("field", "value", "needles"),
    [
        ("step_counting", "images", ["train.step_counting='images'", "'epochs'", "'examples'", "DeepMind"]),
        ("bce_reduction", "none", ["train.bce_reduction='none'", "mean", "sum", "timm"]),
    ],
)
def test_bad_train_fields_are_one_clear_paragraph(field, value, needles):
    cfg = load_config_file(f"{ROOT}/configs/nfnet_f0.py")
    cfg.train[field] = value
    with pytest.raises(ValueError) as err:
        experiment.build_experiment(cfg, info=IMAGENET)
    assert "\n" not in str(err.value)
    for needle in needles:
        assert needle in str(err.value), (needle, str(err.value))
