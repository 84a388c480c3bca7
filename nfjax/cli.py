"""Command-line plumbing shared by ``nfjax.train`` and friends.

``--config path/to/config.py[:arg]`` loads ``get_config(arg)`` (a locked ConfigDict); every
``--config.a.b=value`` then overrides one existing field, its value parsed by the field's type. A mistyped key
is an error naming the nearest valid keys. Errors the user must act on print one paragraph, not a traceback.
"""

from __future__ import annotations

import argparse
import ast
import difflib
import importlib.util
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError)


class UsageError(ValueError):
    pass


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """``'configs/x.py:a=1,b=2'`` -> ``get_config('a=1,b=2')`` of that file."""
    path, _, arg = spec.partition(":")
    if not os.path.exists(path):
        raise UsageError(f"config file {path!r} not found (give a path such as configs/fmnist_nf.py)")
    module_spec = importlib.util.spec_from_file_location(f"nfjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise UsageError(f"config file {path} has no get_config(arg=None) function")
    return module.get_config(arg or None)


def flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for k, v in cfg.items():
        keys += flat_keys(v, f"{prefix}{k}.") if isinstance(v, ml_collections.ConfigDict) else [f"{prefix}{k}"]
    return keys


def apply_override(cfg: ml_collections.ConfigDict, dotted: str, raw: str) -> None:
    """Sets an existing field ``a.b.c`` from its string form; unknown keys name the nearest valid ones."""
    valid = flat_keys(cfg)
    parent_path, _, leaf = dotted.rpartition(".")
    node = cfg
    for part in filter(None, parent_path.split(".")):
        node = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        if isinstance(node, ml_collections.ConfigDict) and not node.is_locked and dotted.startswith("model.kwargs."):
            node[leaf] = _literal(raw)
            return
        close = difflib.get_close_matches(dotted, valid, n=3, cutoff=0.6)
        hint = f" Did you mean {' or '.join('--config.' + c for c in close)}?" if close else ""
        raise UsageError(f"unknown config key --config.{dotted}.{hint} Run with --print-config to see every key.")
    node[leaf] = _parse_as(raw, node[leaf], dotted)


def _literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


def _parse_as(raw: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        if raw.lower() not in ("true", "false", "1", "0"):
            raise UsageError(f"--config.{key}={raw!r}: expected true or false")
        return raw.lower() in ("true", "1")
    if isinstance(current, str):
        return raw
    value = _literal(raw)
    if current is None or value is None:
        return value
    if isinstance(current, (int, float)) and isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(current, int) and isinstance(value, float) and not value.is_integer():
            raise UsageError(f"--config.{key}={raw!r}: expected an integer")
        return type(current)(value)
    if isinstance(current, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(current)(value)
    if type(value) is not type(current):
        raise UsageError(f"--config.{key}={raw!r}: expected a {type(current).__name__} like {current!r}")
    return value


def parse_args(prog: str, argv: list[str]) -> tuple[ml_collections.ConfigDict, str, bool]:
    """Returns (config, workdir, print_config)."""
    config_spec, workdir, overrides, print_config = None, None, [], False
    it = iter(argv)
    for arg in it:
        name, eq, value = arg.partition("=")
        if name in ("-h", "--help"):
            raise UsageError(
                f"usage: python -m {prog} --config configs/X.py[:key=value,...] --workdir DIR "
                "[--config.section.key=value ...] [--print-config]"
            )
        if name == "--print-config":
            print_config = True
            continue
        if not eq and name in ("--config", "--workdir") or (name.startswith("--config.") and not eq):
            value = next(it, None)
            if value is None:
                raise UsageError(f"{name} needs a value")
        if name == "--config":
            config_spec = value
        elif name == "--workdir":
            workdir = value
        elif name.startswith("--config."):
            overrides.append((name[len("--config.") :], value))
        else:
            raise UsageError(f"unknown argument {arg!r}; expected --config, --workdir or --config.KEY=VALUE")
    if config_spec is None:
        raise UsageError(f"--config is required, e.g. python -m {prog} --config configs/fmnist_nf.py --workdir DIR")
    cfg = load_config_file(config_spec)
    for key, value in overrides:
        apply_override(cfg, key, value)
    return cfg, workdir, print_config


def run_guarded(fn: Callable[[], Any]) -> tuple[int, Any]:
    """(exit code, result) of ``fn()``: a user error prints one paragraph to stderr and gives 2, not a traceback."""
    try:
        return 0, fn()
    except USER_ERRORS as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {message}", file=sys.stderr)
        return 2, None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130, None


def run_parsed(parser: argparse.ArgumentParser, argv: list[str] | None, fn: Callable[[Any], Any]) -> tuple[int, Any]:
    """(exit code, result) of ``fn(args)`` for an argparse CLI: usage errors give argparse's code, user errors 2."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and the problem
        return int(e.code or 0), None
    return run_guarded(lambda: fn(args))


def run_cli(prog: str, argv: list[str] | None, fn: Callable[[ml_collections.ConfigDict, str], Any]) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def run():
        cfg, workdir, print_config = parse_args(prog, argv)
        if print_config:
            print(cfg)
            return None
        if not workdir:
            raise UsageError("--workdir is required: the folder for checkpoints, metrics and logs")
        return fn(cfg, os.path.abspath(os.path.expanduser(workdir)))

    code, result = run_guarded(run)
    if result:
        import json

        print(json.dumps(result, indent=2))
    return code
