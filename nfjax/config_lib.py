"""Experiment configs: the sections, and the one loader and parser for config files and command-line overrides.

A config has five sections: ``model`` (name, constructor overrides, the weights it starts from; read in
:mod:`nfjax.finetune`), ``optim`` (defaults and validation in :mod:`nfjax.optim`), ``data`` (defaults in
:mod:`nfjax.data.config`), ``train`` (steps, batch, loss, logging, checkpoints) and ``distributed``. The defaults
of ``model``, ``train`` and ``distributed`` are here, the others next to the code that validates and reads them;
:func:`base_config` assembles them. Configs are locked: a mistyped key is an error naming the nearest valid keys.

Config files (``configs/*.py``) define ``get_config(arg=None)``; ``arg`` is the ``key=value,...`` string after
the file name (big_vision style), parsed by :func:`parse_arg`. Command-line overrides ``--config.a.b=value`` are
applied by :func:`apply_override`. Both parse values with :func:`parse_value`, the single string-to-value parser.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any

import ml_collections

from nfjax.suggest import did_you_mean


class ConfigError(ValueError):
    """A config file, argument or override the user must fix; the message says what and how."""


# ------------------------------------------------------------------------------------------------ sections


def default_model_config(model: str, model_kwargs: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The ``model`` section: the model and where its weights start (validated and read in :mod:`nfjax.finetune`)."""
    cfg = ml_collections.ConfigDict(dict(name=model, kwargs=ml_collections.ConfigDict(model_kwargs or {})))
    # A training run's --workdir or a folder written by `python -m nfjax.convert`: the run starts from the weights
    # of its newest readable checkpoint (None: random init). Ignored when the run's own workdir has a checkpoint.
    cfg.init_from = ml_collections.FieldReference(None, field_type=str)
    cfg.init_weights = "auto"  # which tree of the source: 'auto' (its EMA when it keeps one) | 'params' | 'ema'
    # 'auto': a new classifier only when the class counts differ | True: always new | False: keep (must fit)
    cfg.reset_classifier = ml_collections.FieldReference("auto", field_type=object)
    return cfg


def default_train_config() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(
        dict(
            global_batch=256,
            epochs=90.0,  # training length in epochs of the train split ...
            total_steps=0,  # ... or in steps when > 0
            # How epochs become optimizer steps. 'epochs': floor(N / B) whole batches per epoch, epochs x that in
            # all (timm). 'examples': (N x epochs) // B in all, and the schedule's epochs are N / B steps, a
            # fraction (DeepMind's NFNet experiment). The input pipeline batches each epoch the same in both.
            step_counting="epochs",
            seed=0,
            loss="softmax_xent",  # 'softmax_xent' | 'sigmoid_bce' | 'focal'
            focal_gamma=2.0,
            bce_reduction="mean",  # loss='sigmoid_bce': 'mean' over classes (timm's default) | 'sum' over classes
            # Per-class loss weights (softmax_xent, focal) from the training label counts n_c: 'none' | 'balanced'
            # (N / (K n_c)) | 'sqrt' (n_c^-0.5) | 'effective:BETA' (Cui et al. 2019) | 'w1,w2,...' (given). See
            # nfjax/class_weights.py and docs/training.md.
            class_weights="none",
            compute_dtype="auto",  # 'auto' (bf16 on GPU/TPU, float32 on CPU) | 'float32' | 'bfloat16'
            num_devices=0,  # 0: every visible device
            # Size of a second mesh axis 'fsdp' (must divide the devices): params, EMA and optimizer state are split
            # over it (FSDP), the batch over all devices as before. 1: plain data parallelism. docs/training.md.
            fsdp=1,
            log_every_steps=50,
            eval_every_steps=0,  # 0: once per eval_every_epochs
            eval_every_epochs=1.0,
            eval_batch=0,  # 0: the training global batch
            checkpoint_every_steps=1000,
            keep_checkpoints=3,
            async_checkpoints=True,
            max_steps=0,  # > 0: stop after this many steps of this invocation (schedule unchanged)
            warn_no_agc_batch=2048,  # warn when an NF model trains without AGC at or above this batch
            nonfinite="stop",  # a non-finite loss: 'stop' the run, or 'skip' the update and go on
            max_consecutive_nonfinite=10,  # nonfinite='skip': stop after this many non-finite steps in a row
            stall_timeout_s=600.0,  # multi-process: a process with no progress for this long exits (0: never)
        )
    )


def default_distributed_config() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.coordinator_address = ml_collections.FieldReference(None, field_type=str)
    cfg.num_processes = ml_collections.FieldReference(None, field_type=int)
    cfg.process_id = ml_collections.FieldReference(None, field_type=int)
    cfg.cpu_collectives = ml_collections.FieldReference(None, field_type=str)  # 'gloo' for CPU multi-process
    return cfg


def base_config(model: str, model_kwargs: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """An unlocked config with every section at its default; recipes edit it, then call :func:`finalize`."""
    from nfjax.data import default_data_config
    from nfjax.optim import default_optim_config

    cfg = ml_collections.ConfigDict()
    cfg.model = default_model_config(model, model_kwargs)
    cfg.optim = default_optim_config()
    cfg.data = default_data_config()
    cfg.train = default_train_config()
    cfg.distributed = default_distributed_config()
    return cfg


def finalize(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Locks the config (typos fail loudly) and returns it."""
    cfg.lock()
    return cfg


# ------------------------------------------------------------------------------------------------ parsing


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def parse_value(raw: str, current: Any, where: str) -> Any:
    """``raw`` (command-line text) as a value of the type of ``current``; ``where`` names it in errors.

    bool: true/false/1/0. str: as given ('None': None, as for the numbers and sequences). None (an untyped
    field): a Python literal, else the string. int/float: a number (an int field refuses 2.5). tuple/list: a
    literal sequence. Anything else must be a literal of the same type.
    """
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise ConfigError(f"{where}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1")
    if isinstance(current, str):
        return None if raw == "None" else raw
    value = _literal(raw)
    if current is None or value is None:
        return value
    if isinstance(current, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{where}={raw!r}: expected an integer")
        return type(current)(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if type(value) is not type(current):
        raise ConfigError(f"{where}={raw!r}: expected a {type(current).__name__} like {current!r}")
    return value


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
    """Parses a config file's argument ``'a=1,b=foo'`` against typed ``defaults``; unknown keys are an error."""
    out = dict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"config argument {item!r} must look like key=value")
        if key not in defaults:
            raise ConfigError(
                f"unknown config argument {key!r}.{did_you_mean(key, defaults)} Valid: {', '.join(sorted(defaults))}"
            )
        out[key] = parse_value(raw.strip(), defaults[key], f"config argument {key}")
    return ml_collections.ConfigDict(out)


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of ``cfg`` as a dotted path."""
    keys = []
    for k, v in cfg.items():
        keys += flat_keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
    return keys


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Sets the existing field ``a.b.c`` from its command-line text. ``model.kwargs`` also takes new keys
    (constructor arguments, checked when the model is built); any other unknown key names the nearest ones."""
    parent_path, _, leaf = dotted.rpartition(".")
    node = cfg
    for part in filter(None, parent_path.split(".")):
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        if isinstance(node, ml_collections.ConfigDict) and dotted.startswith("model.kwargs."):
            with node.unlocked():  # shipped configs lock their fields; kwargs are checked when the model is built
                node[leaf] = _literal(raw)
            return
        hint = did_you_mean(dotted, flat_keys(cfg), prefix="--config.")
        raise ConfigError(f"unknown config key --config.{dotted}.{hint} Run with --print-config to see every key.")
    current = node[leaf]
    if current is None and raw.strip() != "None":  # a typed field whose value is None: parse by its type
        field_type = node.get_ref(leaf).get_type()
        current = field_type() if field_type in (bool, int, float, str, tuple, list) else None
    try:
        node[leaf] = parse_value(raw, current, f"--config.{dotted}")
    except TypeError as e:  # ConfigDict's own type check
        raise ConfigError(f"--config.{dotted}={raw!r}: {e}") from None


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``'configs/x.py:a=1,b=2'`` -> ``get_config('a=1,b=2')`` of that file."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (give a path such as configs/fmnist_nf.py)")
    module_spec = importlib.util.spec_from_file_location(f"nfjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(
            f"config file {path} is not valid Python: {e.msg} at line {e.lineno}"
            f"{f': {e.text.strip()!r}' if e.text else ''}. Fix the file and rerun."
        ) from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config(arg=None) function")
    return module.get_config(arg or None)


def load_config(spec: str, overrides: list[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config of ``--config SPEC`` with each ``--config.KEY=VALUE`` of ``overrides`` applied in order."""
    cfg = load_config_file(spec)
    for key, raw in overrides:
        apply_override(cfg, key, raw)
    return cfg
