"""The optimizer: an optax chain built from the config's ``optim`` section.

The chain applied to the (device-averaged, accumulated) gradient ``g`` of the params ``p`` is::

    clip (AGC | global norm | none)  ->  weight decay  ->  SGD-Nesterov | LAMB | AdamW  ->  -lr(t) * u

and, when fine-tuning, the backbone (every param outside the top-level ``classifier``) either gets no update at
all (``freeze_backbone``) or ``backbone_lr_scale`` times its update (its lr scaled; the classifier keeps lr(t)).
With reduce-on-plateau (``plateau_patience > 0``) every update is then multiplied by the plateau's scale.

For the DeepMind NFNet recipe (``name='sgd'``, ``clipping='agc'``, coupled decay) one step is

    1. g <- AGC(g, p)                   unit-wise, skipped for the classifier kernel
    2. g <- g + wd * p                  coupled L2, only where the decay mask is True
    3. buf <- m * buf + g               momentum buffer (zeros at step 0)
    4. g <- g + m * buf                 Nesterov
    5. p <- p - lr(t) * g               t = number of updates already applied (lr(0) = 0 with warmup)

:func:`build_optimizer` validates the section once and returns an :class:`Optimizer`, the one object that the
train step reads. Masks by parameter path and AGC live in :mod:`nfjax.clipping`, gradient accumulation and SAM
in :mod:`nfjax.optim_grads`, the schedules in :mod:`nfjax.schedules`; all are re-exported here. Reduce-on-plateau
is :mod:`nfjax.plateau`. See docs/optim.md for the table of config fields.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfjax.clipping import (
    CLASSIFIER_KERNEL,
    NO_DECAY_NAMES,
    adaptive_clip,
    clip_fraction,
    clip_mask,
    decay_mask,
    param_path,
    path_mask,
    unitwise_norm,
)
from nfjax.optim_grads import accumulated_grads, sam_grads, sam_perturbations
from nfjax.plateau import Plateau
from nfjax.schedules import (
    COSINE_SCHEDULES,
    LR_REFERENCE_BATCH,
    SCHEDULES,
    boundary_steps_of,
    build_schedule,
    decay_end_of,
    peak_learning_rate,
    warmup_steps_of,
)
from nfjax.suggest import did_you_mean

__all__ = [
    "CLASSIFIER_KERNEL",
    "HEAD",
    "LR_REFERENCE_BATCH",
    "SCHEDULES",
    "NO_DECAY_NAMES",
    "Optimizer",
    "accumulated_grads",
    "adaptive_clip",
    "build_optimizer",
    "clip_fraction",
    "clip_mask",
    "build_schedule",
    "decay_mask",
    "default_optim_config",
    "ema_decay_at",
    "head_labels",
    "init_ema",
    "param_path",
    "path_mask",
    "peak_learning_rate",
    "sam_grads",
    "sam_perturbations",
    "unitwise_norm",
    "update_ema",
    "validate_optim_config",
]

OPTIMIZERS = ("sgd", "lamb", "adamw")
SCHEDULE_UNITS = ("step", "epoch")
CLIPPINGS = ("agc", "global_norm", "none")
DECAY_MODES = ("coupled", "decoupled", "auto")
PLATEAU_METRICS = ("loss", "top1", "macro_f1")  # loss: lower is better; the others: higher is better
PLATEAU_SPLITS = ("eval", "eval_ema")


def default_optim_config() -> ml_collections.ConfigDict:
    """The ``optim`` section with every field at its default: DeepMind's NFNet SGD_AGC recipe."""
    return ml_collections.ConfigDict(
        dict(
            name="sgd",  # 'sgd' | 'lamb' | 'adamw'
            base_lr=0.1,  # peak lr, before batch scaling
            scale_lr_by_batch=True,  # peak lr = base_lr * global_batch / 256
            momentum=0.9,  # sgd only; 0 disables the momentum buffer
            nesterov=True,  # sgd only
            b1=0.9,  # lamb / adamw first-moment decay
            b2=0.999,  # lamb / adamw second-moment decay
            eps=1e-8,  # lamb / adamw denominator eps (timm's LAMB uses 1e-6)
            weight_decay=2e-5,
            decay_mode="auto",  # 'coupled' | 'decoupled' | 'auto' (coupled for sgd, else decoupled)
            decay_exclude=(NO_DECAY_NAMES,),  # regexes on the '/'-joined path: never decayed
            decay_min_ndim=2,  # params with ndim < this are never decayed (vectors, scalars)
            clipping="agc",  # 'agc' | 'global_norm' | 'none'
            agc_lambda=0.01,  # AGC ratio: max unit grad norm / unit param norm
            agc_eps=1e-3,  # floor on the unit param norm, so zero-init params still move
            clip_exclude=(CLASSIFIER_KERNEL,),  # regexes on the path: not clipped by AGC
            max_grad_norm=1.0,  # clipping='global_norm' only
            schedule="warmup_cosine",  # see SCHEDULES: cosines, 'step', 'exponential', 'cosine_restarts', 'constant'
            warmup_epochs=5.0,  # linear warmup from warmup_start_lr to the peak
            warmup_steps=0,  # > 0 overrides warmup_epochs
            warmup_start_lr=0.0,  # absolute lr at step 0 of the warmup (timm's --warmup-lr; DeepMind: 0)
            end_lr_factor=0.0,  # cosine floor, as a fraction of the peak lr
            cooldown_epochs=0.0,  # cosine schedules: the last epochs held at the floor (timm's --cooldown-epochs)
            schedule_unit="step",  # 'step': lr changes every step | 'epoch': held within each epoch (timm's default)
            step_boundaries_epochs=(30.0, 60.0, 80.0),  # schedule='step' only: the milestones (MultiStepLR)
            step_decay_factor=0.1,  # schedule='step': lr *= factor at each boundary
            exp_decay_rate=0.97,  # schedule='exponential': lr *= rate per epoch after the warmup (torch's gamma)
            restart_epochs=10.0,  # schedule='cosine_restarts': epochs of the first cycle (SGDR's T_0)
            restart_mult=1.0,  # schedule='cosine_restarts': each cycle is this many times the previous (T_mult)
            restart_decay=1.0,  # schedule='cosine_restarts': cycle i starts from peak x restart_decay ** i
            plateau_patience=0,  # evaluations without improvement before the lr scale is cut; 0: no plateau rule
            plateau_factor=0.1,  # lr scale *= factor at each cut
            plateau_metric="loss",  # 'loss' (lower is better) | 'top1' | 'macro_f1' (higher is better)
            plateau_split="eval",  # 'eval' (raw weights) | 'eval_ema' (needs ema_decay > 0)
            plateau_threshold=1e-4,  # relative improvement over the best value that counts as better
            plateau_cooldown=0,  # evaluations after a cut that count as neither bad nor good
            plateau_min_scale=0.0,  # the lr scale never goes below this
            ema_decay=0.99999,  # 0 disables the parameter EMA
            accum_steps=1,  # micro-batches per optimizer step
            sam_rho=0.0,  # SAM radius; 0 disables SAM
            sam_fraction=0.2,  # fraction of each device's batch used for the SAM ascent step
            freeze_backbone=False,  # fine-tuning: only the classifier trains; the backbone gets no update at all
            backbone_lr_scale=1.0,  # fine-tuning: backbone lr = lr x this (classifier: lr); ignored when frozen
        )
    )


# ----------------------------------------------------------------------------- validation


def _fail(field: str, value: Any, must: str) -> None:
    raise ValueError(f"optim.{field}={value!r} is invalid: {must}.")


def _check_choice(cfg: ml_collections.ConfigDict, field: str, valid: Sequence[str]) -> None:
    if cfg[field] not in valid:
        _fail(field, cfg[field], "valid values are " + ", ".join(repr(v) for v in valid))


def _merge(cfg: Mapping[str, Any] | ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Overlays ``cfg`` on the defaults; unknown fields and wrong types raise ValueError."""
    merged = default_optim_config()
    unknown = sorted(set(cfg.keys()) - set(merged.keys()))
    if unknown:
        hint = did_you_mean(unknown[0], merged.keys(), prefix="optim.")
        raise ValueError(f"unknown optim field(s) {unknown}.{hint} Valid fields are {sorted(merged.keys())}.")
    for key in cfg.keys():
        try:
            merged[key] = cfg[key]
        except TypeError as err:  # ConfigDict refuses e.g. a str for a float field
            _fail(key, cfg[key], f"expected {type(merged[key]).__name__} ({err})")
    return merged


def _check_numbers(c: ml_collections.ConfigDict) -> None:
    checks = [
        ("base_lr", c.base_lr > 0 and math.isfinite(c.base_lr), "must be a finite number > 0"),
        ("momentum", 0 <= c.momentum < 1, "must be in [0, 1); DeepMind uses 0.9"),
        ("b1", 0 <= c.b1 < 1, "must be in [0, 1)"),
        ("b2", 0 <= c.b2 < 1, "must be in [0, 1)"),
        ("eps", c.eps > 0, "must be > 0"),
        ("weight_decay", c.weight_decay >= 0, "must be >= 0 (0 disables weight decay)"),
        ("decay_min_ndim", c.decay_min_ndim >= 0, "must be >= 0 (0 decays vectors and scalars too)"),
        ("agc_lambda", c.agc_lambda > 0, "must be > 0; use 0.01 (batch 1024..4096) or clipping='none'"),
        ("agc_eps", c.agc_eps > 0, "must be > 0, else zero-initialized params never move; use 1e-3"),
        ("max_grad_norm", c.max_grad_norm > 0, "must be > 0; use clipping='none' to disable clipping"),
        ("warmup_epochs", c.warmup_epochs >= 0, "must be >= 0"),
        ("warmup_steps", c.warmup_steps >= 0, "must be >= 0 (0 means: use warmup_epochs)"),
        ("warmup_start_lr", 0 <= c.warmup_start_lr < math.inf, "must be a finite lr >= 0 (0: warm up from 0)"),
        ("cooldown_epochs", 0 <= c.cooldown_epochs < math.inf, "must be a finite number of epochs >= 0"),
        ("end_lr_factor", 0 <= c.end_lr_factor <= 1, "must be in [0, 1] (fraction of the peak lr)"),
        ("step_decay_factor", c.step_decay_factor > 0, "must be > 0"),
        ("exp_decay_rate", 0 < c.exp_decay_rate <= 1, "must be in (0, 1]: the lr factor per epoch (1: constant)"),
        ("restart_epochs", 0 < c.restart_epochs < math.inf, "must be a finite number of epochs > 0"),
        ("restart_mult", 1 <= c.restart_mult < math.inf, "must be a finite number >= 1 (1: cycles of equal length)"),
        ("restart_decay", 0 < c.restart_decay <= 1, "must be in (0, 1] (1: every cycle starts at the peak lr)"),
        ("plateau_patience", c.plateau_patience >= 0, "must be an integer >= 0 (0 disables reduce-on-plateau)"),
        ("plateau_factor", 0 < c.plateau_factor < 1, "must be in (0, 1), e.g. 0.1 (torch's ReduceLROnPlateau)"),
        ("plateau_threshold", 0 < c.plateau_threshold < 1, "must be in (0, 1), e.g. 1e-4 (relative)"),
        ("plateau_cooldown", c.plateau_cooldown >= 0, "must be an integer >= 0 (evaluations)"),
        ("plateau_min_scale", 0 <= c.plateau_min_scale < 1, "must be in [0, 1) (0: no lower bound on the scale)"),
        ("ema_decay", 0 <= c.ema_decay < 1, "must be in [0, 1) (0 disables the EMA; DeepMind 0.99999)"),
        ("accum_steps", c.accum_steps >= 1, "must be an integer >= 1 (1 disables accumulation)"),
        ("sam_rho", c.sam_rho >= 0, "must be >= 0 (0 disables SAM)"),
        ("sam_fraction", 0 < c.sam_fraction <= 1, "must be in (0, 1]; the NFNet paper uses 0.2"),
        ("backbone_lr_scale", 0 <= c.backbone_lr_scale < math.inf, "must be a finite number >= 0 (1: no scaling)"),
    ]
    for field, ok, must in checks:
        if not ok:
            _fail(field, c[field], must)
    for field in ("decay_exclude", "clip_exclude"):
        for pattern in c[field]:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as err:
                _fail(field, pattern, f"each entry must be a regular expression ({err})")


def _check_steps(c: ml_collections.ConfigDict, steps_per_epoch: float, total_steps: int, batch: int) -> None:
    for name, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid: must be >= 1 optimizer step.")
    if batch < 1 or batch % c.accum_steps:
        _fail("accum_steps", c.accum_steps, f"must divide the global batch {batch} (>= 1)")
    if c.cooldown_epochs and c.schedule not in COSINE_SCHEDULES:
        _fail("cooldown_epochs", c.cooldown_epochs, f"only the cosine schedules have a cooldown, not {c.schedule!r}")
    warmup, end = warmup_steps_of(c, steps_per_epoch), decay_end_of(c, steps_per_epoch, total_steps)
    if warmup >= total_steps:
        field = "warmup_steps" if c.warmup_steps else "warmup_epochs"
        _fail(field, c[field], f"the warmup ({warmup:g} steps) must be shorter than training ({total_steps} steps)")
    if warmup >= end:
        _fail(
            "cooldown_epochs",
            c.cooldown_epochs,
            f"the warmup ({warmup:g} steps) and the cooldown ({total_steps - end:g} steps) leave no steps for the "
            f"cosine in training ({total_steps} steps); shorten either",
        )
    if c.schedule == "step":
        bounds = boundary_steps_of(c, steps_per_epoch)
        ok = all(a < b for a, b in zip([warmup, *bounds], [*bounds, total_steps], strict=True))
        if not bounds or not ok:
            _fail(
                "step_boundaries_epochs",
                tuple(c.step_boundaries_epochs),
                f"need increasing epochs after the warmup ({warmup:g} steps) and before the end "
                f"({total_steps / steps_per_epoch:g} epochs)",
            )
    if c.schedule == "cosine_restarts" and c.restart_epochs * steps_per_epoch < 1:
        _fail(
            "restart_epochs",
            c.restart_epochs,
            f"a restart cycle must last at least one step ({steps_per_epoch:g} steps per epoch); use at least "
            f"{1 / steps_per_epoch:g} epochs",
        )


def validate_optim_config(
    cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    steps_per_epoch: float,
    total_steps: int,
    global_batch: int,
) -> ml_collections.ConfigDict:
    """Returns ``cfg`` overlaid on :func:`default_optim_config`, or raises ValueError naming the bad field.

    Runs before any compute. ``steps_per_epoch`` and ``total_steps`` count optimizer steps (one step per
    ``accum_steps`` micro-batches); ``global_batch`` is the batch of one optimizer step, all devices.
    ``steps_per_epoch`` is an epoch as the schedule counts it: an int rounds epoch lengths to whole steps, a float
    (``train.step_counting='examples'``: examples / batch) keeps them fractional (see :func:`build_schedule`).
    """
    c = _merge(cfg)
    for field, valid in (
        ("name", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("schedule_unit", SCHEDULE_UNITS),
        ("plateau_metric", PLATEAU_METRICS),
        ("plateau_split", PLATEAU_SPLITS),
        ("clipping", CLIPPINGS),
        ("decay_mode", DECAY_MODES),
    ):
        _check_choice(c, field, valid)
    _check_numbers(c)
    if c.plateau_patience and c.plateau_split == "eval_ema" and not c.ema_decay:
        _fail("plateau_split", c.plateau_split, "there is no EMA to evaluate (ema_decay=0); use 'eval'")
    _check_steps(c, steps_per_epoch, total_steps, global_batch)
    return c


def _clipping(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    if c.clipping == "agc":
        return adaptive_clip(c.agc_lambda, c.agc_eps, tuple(c.clip_exclude))
    if c.clipping == "global_norm":
        return optax.clip_by_global_norm(c.max_grad_norm)
    return optax.identity()


# ----------------------------------------------------------------------------- optimizers


def _lamb(c: ml_collections.ConfigDict, lr: optax.Schedule, mask: Callable, decoupled: bool):
    """LAMB with the trust ratio only on the decayed params (as timm's LAMB, used by the RSB recipes).

    ``optax.lamb`` applies the layer-wise trust ratio ``|p| / |u|`` to every param, gains and biases
    included; LAMB's authors and timm exempt the no-decay group, so the chain is rebuilt from optax's
    pieces with the trust ratio masked like the decay.
    """
    decay = optax.add_decayed_weights(c.weight_decay, mask)
    adam = optax.scale_by_adam(b1=c.b1, b2=c.b2, eps=c.eps)
    first = [adam, decay] if decoupled else [decay, adam]
    return optax.chain(*first, optax.masked(optax.scale_by_trust_ratio(), mask), optax.scale_by_learning_rate(lr))


def _optimizer(c: ml_collections.ConfigDict, lr: optax.Schedule) -> optax.GradientTransformation:
    mask = decay_mask(tuple(c.decay_exclude), c.decay_min_ndim)
    decoupled = c.decay_mode == "decoupled" or (c.decay_mode == "auto" and c.name != "sgd")
    decay = optax.add_decayed_weights(c.weight_decay, mask)
    if c.name == "lamb":
        return _lamb(c, lr, mask, decoupled)
    if c.name == "adamw":
        if decoupled:
            return optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay, mask=mask)
        return optax.chain(decay, optax.adam(lr, b1=c.b1, b2=c.b2, eps=c.eps))
    momentum = c.momentum or None  # None: no momentum buffer at all
    if not decoupled:  # DeepMind: decay enters the momentum buffer
        return optax.chain(decay, optax.sgd(lr, momentum=momentum, nesterov=c.nesterov))
    trace = optax.trace(c.momentum, nesterov=c.nesterov) if momentum else optax.identity()
    return optax.chain(trace, decay, optax.scale_by_learning_rate(lr))  # SGDW


HEAD = "classifier"  # every zoo model's classifier is the top-level 'classifier' subtree of its params


def head_labels(params: Any) -> Any:
    """``'head'`` for the leaves of the top-level ``classifier`` subtree, ``'backbone'`` for every other leaf."""
    return jax.tree_util.tree_map_with_path(
        lambda kp, _: "head" if param_path(kp)[:1] == (HEAD,) else "backbone", params
    )


def _backbone_rule(c: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> optax.GradientTransformation:
    """Fine-tuning. ``freeze_backbone``: the chain sees the classifier only and the backbone's updates are zero
    (no weight decay, no optimizer state; ``backbone_lr_scale`` is ignored). ``backbone_lr_scale = s``: the
    backbone's updates are multiplied by ``s`` after the chain, i.e. its learning rate is ``s * lr(t)`` (every
    optimizer here applies -lr(t) last)."""
    if c.freeze_backbone:
        return optax.multi_transform({"head": tx, "backbone": optax.set_to_zero()}, head_labels)
    if c.backbone_lr_scale != 1:
        backbone = path_mask(lambda path, _: path[:1] != (HEAD,))
        return optax.chain(tx, optax.masked(optax.scale(c.backbone_lr_scale), backbone))
    return tx


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """The ``optim`` section, validated once, and everything built from it: the one object the train step,
    the trainer and the benchmarks read optimizer settings from.

    ``tx = clipping -> weight decay -> optimizer -> -lr(t)``; ``tx.update(grads, state, params)`` needs
    ``params`` (AGC and weight decay read them). Counts are optimizer steps: with ``accum_steps = k`` one
    step averages the gradients of k micro-batches (:func:`accumulated_grads`), so clipping acts once per step.
    """

    config: ml_collections.ConfigDict  # the validated section, every field present
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    steps_per_epoch: float  # an epoch as the schedule counts it (see build_schedule)
    total_steps: int
    plateau: Plateau | None = None  # reduce-on-plateau (plateau_patience > 0), else None

    @property
    def uses_ema(self) -> bool:
        return self.config.ema_decay > 0

    def init(self, params: Any) -> dict[str, Any]:
        """The optimizer's part of a train state: ``opt_state``, ``ema`` when the EMA is on, and ``plateau``
        (the reduce-on-plateau state: lr scale, best value, counters) when the plateau rule is on."""
        state = dict(opt_state=self.tx.init(params))
        if self.uses_ema:
            state["ema"] = init_ema(params)
        if self.plateau is not None:
            state["plateau"] = self.plateau.init()
        return state

    def gradients(self, grad_fn: Callable, params: Any, batch: Any, rng: jax.Array, mesh) -> tuple[Any, Any]:
        """``(value, grads)`` of one optimizer step: SAM when ``sam_rho > 0``, else micro-batch accumulation
        (plain ``grad_fn`` when ``accum_steps == 1``). ``grad_fn(params, batch, rng) -> (value, grads)``. SAM's
        per-device ascent runs over every axis of ``mesh`` (each device, holding its own slice of the batch)."""
        c = self.config
        if c.sam_rho > 0:
            return sam_grads(grad_fn, params, batch, rho=c.sam_rho, fraction=c.sam_fraction, mesh=mesh, rng=rng)
        return accumulated_grads(grad_fn, params, batch, c.accum_steps, rng=rng)

    def apply(self, state: dict[str, Any], grads: Any) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """One update of the train state ``state`` (keys step, params, opt_state[, ema][, plateau]) with ``grads``.

        Returns the updated fields (step, params, opt_state[, ema]) and the optimizer's metrics: lr of this
        step (``schedule(step) * scale`` with the plateau rule, whose ``scale`` is also returned as
        ``lr_scale``), global norms of the gradient, of the params the step starts from (the previous step's
        result) and of the update, and the AGC clip fraction (0 without AGC).
        The plateau ``scale`` multiplies the chain's final updates, which is the lr times the scale (every
        optimizer here applies ``-lr(t)`` last); the state's ``plateau`` changes only between steps (the trainer).
        """
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        lr, extra = self.schedule(state["step"]), {}
        if "plateau" in state:
            scale = state["plateau"].scale
            updates = jax.tree.map(lambda u: (scale * u).astype(u.dtype), updates)
            lr, extra = lr * scale, dict(lr_scale=scale)
        params = optax.apply_updates(state["params"], updates)
        new = dict(step=state["step"] + 1, params=params, opt_state=opt_state)
        if "ema" in state:
            new["ema"] = update_ema(state["ema"], params, state["step"], self.config.ema_decay)
        metrics = dict(
            lr=lr,
            **extra,
            grad_norm=optax.tree.norm(grads),
            # The params the step starts from: their buffers are read as they are. The new params' norm made XLA
            # fuse the whole update into one more reduction per array: ~1 s of F0's compile (docs/performance.md).
            param_norm=optax.tree.norm(state["params"]),
            update_norm=optax.tree.norm(updates),
            agc_clip_fraction=clip_fraction(opt_state),
        )
        return new, metrics


def build_optimizer(
    cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    steps_per_epoch: float,
    total_steps: int,
    global_batch: int,
) -> Optimizer:
    """Validates ``cfg`` (the ``optim`` section, fields missing from it take their defaults) and builds the
    :class:`Optimizer`. Raises ValueError naming the bad field before anything is computed."""
    c = validate_optim_config(cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch)
    schedule = build_schedule(c, steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch)
    tx = _backbone_rule(c, optax.chain(_clipping(c), _optimizer(c, schedule)))
    return Optimizer(c, tx, schedule, steps_per_epoch, total_steps, Plateau.from_config(c))


# ----------------------------------------------------------------------------- EMA


def ema_decay_at(step: jax.typing.ArrayLike, decay: float) -> jax.Array:
    """DeepMind's (TF1-style) warmed-up EMA decay: ``min(decay, (1 + t) / (10 + t))``."""
    t = jnp.asarray(step, jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))


def init_ema(params: Any) -> Any:
    """A float32 copy of ``params``; a real copy, so donating ``params`` never frees the EMA."""
    return jax.tree.map(lambda p: jnp.array(p, dtype=jnp.float32, copy=True), params)


def update_ema(ema: Any, params: Any, step: jax.typing.ArrayLike, decay: float) -> Any:
    """``ema <- d * ema + (1 - d) * params`` with ``d = ema_decay_at(step, decay)``, in float32.

    Call after every update with the new params and ``step`` = number of updates before this one (so
    the first call uses ``t = 0``, ``d = 0.1``). After n calls with constant params ``p`` the EMA is
    ``P * ema_0 + (1 - P) * p`` with ``P = prod_{t<n} d_t`` (``= 9! n! / (n + 9)!`` while the warmup
    term is the smaller one).
    """
    d = ema_decay_at(step, decay)
    return jax.tree.map(lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), ema, params)
