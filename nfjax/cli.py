"""Command-line plumbing shared by ``nfjax.train`` and friends.

``--config path/to/config.py[:arg]`` loads ``get_config(arg)`` (a locked ConfigDict); every
``--config.a.b=value`` then overrides one existing field (both parsed by :mod:`nfjax.config_lib`). Errors the
user must act on print one paragraph, not a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

import ml_collections

from nfjax.config_lib import load_config

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, RuntimeError)


class UsageError(ValueError):
    pass


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
    return load_config(config_spec, overrides), workdir, print_config


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
        from nfjax.compile_cache import configure_compilation_cache  # imports jax: only once a run starts

        configure_compilation_cache()
        return fn(cfg, os.path.abspath(os.path.expanduser(workdir)))

    code, result = run_guarded(run)
    if result:
        print(json.dumps(result, indent=2))
    return code
