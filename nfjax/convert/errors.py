"""The error every converter raises for a file that cannot be converted (shown to users as one paragraph), and
the helpers that build its message and walk nested parameter dicts."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ConversionError(ValueError):
    """A checkpoint file cannot be converted: unreadable, unsafe, or not the model it was said to be."""


def mismatch_message(missing: list[str], unexpected: list[str], wrong: list[str], limit: int = 8) -> str:
    """One paragraph naming (up to ``limit`` of) each kind of difference between a file and the model."""

    def part(label: str, items: list[str]) -> str:
        more = f" and {len(items) - limit} more" if len(items) > limit else ""
        return f"{len(items)} {label}: {', '.join(items[:limit])}{more}"

    parts = [
        part(label, items)
        for label, items in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
        if items
    ]
    return "the file does not match the model (" + "; ".join(parts) + ")"


def flatten(tree: Mapping, prefix: tuple = ()) -> dict[tuple, Any]:
    """Nested mapping -> {path tuple: leaf}."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def unflatten(flat: Mapping[tuple, Any]) -> dict:
    """{path tuple: leaf} -> nested dicts (the inverse of flatten)."""
    out: dict = {}
    for path, value in flat.items():
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = value
    return out
