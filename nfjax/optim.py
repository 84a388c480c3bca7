"""The optimizer: an optax chain built from the config's ``optim`` section.

The chain applied to the (device-averaged, accumulated) gradient ``g`` of the params ``p`` is::

    clip (AGC | global norm | none)  ->  weight decay  ->  SGD-Nesterov | LAMB | AdamW  ->  -lr(t) * u

For the DeepMind NFNet recipe (``name='sgd'``, ``clipping='agc'``, coupled decay) one step is

    1. g <- AGC(g, p)                   unit-wise, skipped for the classifier kernel
    2. g <- g + wd * p                  coupled L2, only where the decay mask is True
    3. buf <- m * buf + g               momentum buffer (zeros at step 0)
    4. g <- g + m * buf                 Nesterov
    5. p <- p - lr(t) * g               t = number of updates already applied (lr(0) = 0 with warmup)

Masks select parameters by path (``'blocks/3/conv1/kernel'``) and rank, so they work on ``nnx.State`` and
on plain nested dicts alike. Gradient accumulation and SAM live in :mod:`nfjax.optim_grads` and are
re-exported here. See docs/optim.md for the full description and the table of config fields.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from nfjax.optim_grads import accumulated_grads, sam_grads, sam_perturbations

__all__ = [
    "accumulated_grads",
    "adaptive_clip",
    "build_optimizer",
    "build_schedule",
    "decay_mask",
    "default_optim_config",
    "ema_decay_at",
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
SCHEDULES = ("warmup_cosine", "step", "constant")
CLIPPINGS = ("agc", "global_norm", "none")
DECAY_MODES = ("coupled", "decoupled", "auto")
LR_REFERENCE_BATCH = 256  # lr = base_lr * global_batch / 256 (Goyal et al.; DeepMind's lr_scale_by_bs)

CLASSIFIER_KERNEL = r"(^|/)classifier/kernel$"
NO_DECAY_NAMES = r"(^|/)(bias|scale|offset|gain|skip_gain)$"


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
            schedule="warmup_cosine",  # 'warmup_cosine' | 'step' | 'constant'
            warmup_epochs=5.0,  # linear warmup from 0
            warmup_steps=0,  # > 0 overrides warmup_epochs
            end_lr_factor=0.0,  # cosine floor, as a fraction of the peak lr
            step_boundaries_epochs=(30.0, 60.0, 80.0),  # schedule='step' only
            step_decay_factor=0.1,  # schedule='step': lr *= factor at each boundary
            ema_decay=0.99999,  # 0 disables the parameter EMA
            accum_steps=1,  # micro-batches per optimizer step
            sam_rho=0.0,  # SAM radius; 0 disables SAM
            sam_fraction=0.2,  # fraction of each device's batch used for the SAM ascent step
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
        raise ValueError(f"unknown optim field(s) {unknown}; valid fields are {sorted(merged.keys())}.")
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
        ("end_lr_factor", 0 <= c.end_lr_factor <= 1, "must be in [0, 1] (fraction of the peak lr)"),
        ("step_decay_factor", c.step_decay_factor > 0, "must be > 0"),
        ("ema_decay", 0 <= c.ema_decay < 1, "must be in [0, 1) (0 disables the EMA; DeepMind 0.99999)"),
        ("accum_steps", c.accum_steps >= 1, "must be an integer >= 1 (1 disables accumulation)"),
        ("sam_rho", c.sam_rho >= 0, "must be >= 0 (0 disables SAM)"),
        ("sam_fraction", 0 < c.sam_fraction <= 1, "must be in (0, 1]; the NFNet paper uses 0.2"),
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


def _check_steps(c: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int, batch: int) -> None:
    for name, value in (("steps_per_epoch", steps_per_epoch), ("total_steps", total_steps)):
        if value < 1:
            raise ValueError(f"{name}={value} is invalid: must be >= 1 optimizer step.")
    if batch < 1 or batch % c.accum_steps:
        _fail("accum_steps", c.accum_steps, f"must divide the global batch {batch} (>= 1)")
    warmup = warmup_steps_of(c, steps_per_epoch)
    if warmup >= total_steps:
        _fail(
            "warmup_steps" if c.warmup_steps else "warmup_epochs",
            c.warmup_steps or c.warmup_epochs,
            f"the warmup ({warmup} steps) must be shorter than training ({total_steps} steps)",
        )
    if c.schedule == "step":
        bounds = [round(e * steps_per_epoch) for e in c.step_boundaries_epochs]
        ok = all(a < b for a, b in zip([warmup, *bounds], [*bounds, total_steps], strict=True))
        if not bounds or not ok:
            _fail(
                "step_boundaries_epochs",
                tuple(c.step_boundaries_epochs),
                f"need increasing epochs after the warmup ({warmup} steps) and before the end "
                f"({total_steps / steps_per_epoch:g} epochs)",
            )


def validate_optim_config(
    cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    steps_per_epoch: int,
    total_steps: int,
    global_batch: int,
) -> ml_collections.ConfigDict:
    """Returns ``cfg`` overlaid on :func:`default_optim_config`, or raises ValueError naming the bad field.

    Runs before any compute. ``steps_per_epoch`` and ``total_steps`` count optimizer steps (one step per
    ``accum_steps`` micro-batches); ``global_batch`` is the batch of one optimizer step, all devices.
    """
    c = _merge(cfg)
    for field, valid in (
        ("name", OPTIMIZERS),
        ("schedule", SCHEDULES),
        ("clipping", CLIPPINGS),
        ("decay_mode", DECAY_MODES),
    ):
        _check_choice(c, field, valid)
    _check_numbers(c)
    _check_steps(c, steps_per_epoch, total_steps, global_batch)
    return c


# ----------------------------------------------------------------------------- masks by path


def param_path(keypath: Sequence[Any]) -> tuple[str | int, ...]:
    """A JAX key path as plain keys: ``(DictKey('blocks'), SequenceKey(3), ...)`` -> ``('blocks', 3, ...)``.

    The ``GetAttrKey('value')`` that an ``nnx.Variable`` node adds at the end is dropped, so an
    ``nnx.State`` and the equivalent nested dict give the same paths.
    """
    keys = []
    for k in keypath:
        if isinstance(k, jax.tree_util.GetAttrKey):
            if k.name != "value":
                keys.append(k.name)
        elif isinstance(k, jax.tree_util.SequenceKey):
            keys.append(k.idx)
        else:  # DictKey, FlattenedIndexKey
            keys.append(k.key)
    return tuple(keys)


def path_mask(predicate: Callable[[tuple[str | int, ...], jax.Array], bool]) -> Callable[[Any], Any]:
    """A mask function for ``optax.masked``: ``tree -> tree of bools``, ``predicate(path, leaf)``."""

    def mask_fn(tree: Any) -> Any:
        return jax.tree_util.tree_map_with_path(lambda kp, x: bool(predicate(param_path(kp), x)), tree)

    return mask_fn


def _matches(patterns: Sequence[str], path: tuple[str | int, ...]) -> bool:
    joined = "/".join(str(k) for k in path)
    return any(re.search(p, joined) for p in patterns)


def clip_mask(exclude: Sequence[str] = (CLASSIFIER_KERNEL,)) -> Callable[[Any], Any]:
    """True where AGC applies: every param whose path matches none of ``exclude``."""
    return path_mask(lambda path, _: not _matches(exclude, path))


def decay_mask(exclude: Sequence[str] = (NO_DECAY_NAMES,), min_ndim: int = 2) -> Callable[[Any], Any]:
    """True where weight decay applies: ``ndim >= min_ndim`` and the path matches none of ``exclude``.

    The defaults exempt gains, biases, skip_gain, BN scale/bias and every vector or scalar, and decay
    conv/SE kernels and the classifier kernel.
    """
    return path_mask(lambda path, x: jnp.ndim(x) >= min_ndim and not _matches(exclude, path))


# ----------------------------------------------------------------------------- AGC


def unitwise_norm(x: jax.Array) -> jax.Array:
    """L2 norm of each output unit, broadcast back to ``x.shape``.

    ``optax.transforms.unitwise_norm`` matches the Flax layouts used here, so it is used as is:
    scalars and (squeezed) vectors -> whole-tensor norm; rank 2 Dense ``(in, out)`` -> over axis 0;
    rank 4 Conv ``HWIO`` (grouped: ``(H, W, I/groups, O)``) -> over axes (0, 1, 2). Rank 3 is reduced
    over axis 0 only (multi-head Dense), which would be wrong for 1D-conv ``WIO`` kernels; no model
    here has those.
    """
    return optax.transforms.unitwise_norm(x)


def adaptive_clip(agc_lambda: float, eps: float, exclude: Sequence[str]) -> optax.GradientTransformation:
    """AGC (Brock et al. 2021) on every param not matched by ``exclude``.

    Per unit: ``g <- g * agc_lambda * max(|p|, eps) / |g|`` if ``|g| > agc_lambda * max(|p|, eps)``,
    else ``g`` unchanged (bit-identical). This is ``optax.adaptive_grad_clip`` inside ``optax.masked``.
    """
    return optax.masked(optax.adaptive_grad_clip(agc_lambda, eps=eps), clip_mask(exclude))


def _clipping(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    if c.clipping == "agc":
        return adaptive_clip(c.agc_lambda, c.agc_eps, tuple(c.clip_exclude))
    if c.clipping == "global_norm":
        return optax.clip_by_global_norm(c.max_grad_norm)
    return optax.identity()


# ----------------------------------------------------------------------------- schedules


def peak_learning_rate(c: ml_collections.ConfigDict, global_batch: int) -> float:
    """``base_lr * global_batch / 256`` when ``scale_lr_by_batch``, else ``base_lr``."""
    return c.base_lr * global_batch / LR_REFERENCE_BATCH if c.scale_lr_by_batch else c.base_lr


def warmup_steps_of(c: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """``warmup_steps`` if > 0, else ``round(warmup_epochs * steps_per_epoch)``."""
    return int(c.warmup_steps) if c.warmup_steps > 0 else round(c.warmup_epochs * steps_per_epoch)


def _after_warmup(main: optax.Schedule, peak: float, warmup: int) -> optax.Schedule:
    """lr(t) = peak * t / warmup for t < warmup, then ``main(t - warmup)``."""
    if warmup == 0:  # optax.linear_schedule with 0 steps would hold its init value (0)
        return main
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def build_schedule(
    c: ml_collections.ConfigDict, *, steps_per_epoch: int, total_steps: int, global_batch: int
) -> optax.Schedule:
    """The lr schedule, evaluated at the number of updates already applied (``t = 0`` for the first).

    With ``W`` warmup steps, ``T = total_steps``, peak ``L`` and floor ``F = end_lr_factor * L``:

    - ``warmup_cosine``: ``L t / W`` for ``t < W``; ``F + (L - F) (1 + cos(pi (t - W) / (T - W))) / 2``.
    - ``step``: warmup, then ``L * step_decay_factor ** (number of boundaries <= t)``.
    - ``constant``: warmup, then ``L``.
    """
    peak, warmup = peak_learning_rate(c, global_batch), warmup_steps_of(c, steps_per_epoch)
    if c.schedule == "warmup_cosine":
        main = optax.cosine_decay_schedule(peak, total_steps - warmup, alpha=c.end_lr_factor)
    elif c.schedule == "step":
        bounds = [round(e * steps_per_epoch) - warmup for e in c.step_boundaries_epochs]
        main = optax.piecewise_constant_schedule(peak, {b: c.step_decay_factor for b in bounds})
    else:
        main = optax.constant_schedule(peak)
    return _after_warmup(main, peak, warmup)


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


def build_optimizer(
    cfg: Mapping[str, Any] | ml_collections.ConfigDict,
    *,
    steps_per_epoch: int,
    total_steps: int,
    global_batch: int,
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """Validates ``cfg`` (the ``optim`` section), then returns ``(chain, lr_schedule)``.

    ``chain = clipping -> weight decay -> optimizer -> -lr(t)``; ``tx.update(grads, state, params)``
    needs ``params`` (AGC and weight decay read them). Counts are optimizer steps: with
    ``accum_steps = k`` the trainer calls ``tx.update`` once per k micro-batches, on the averaged
    gradient (see :func:`accumulated_grads`), so clipping acts once per step.
    """
    c = validate_optim_config(cfg, steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch)
    schedule = build_schedule(c, steps_per_epoch=steps_per_epoch, total_steps=total_steps, global_batch=global_batch)
    return optax.chain(_clipping(c), _optimizer(c, schedule)), schedule


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
