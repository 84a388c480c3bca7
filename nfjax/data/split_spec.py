"""TFDS split strings read without TFDS: ``'train'``, ``'train[:90%]'``, ``'test[1000:-500]'``.

The array cache (nfjax/data/array_cache.py) stores whole splits; a slice of one is cut from it here exactly as
``tfds.core.ReadInstruction`` resolves it (tensorflow_datasets/core/splits.py, ``_rel_to_abs_instr`` with the
'closest' rounding that string specs always get): a percent boundary b of a split of n examples is
``int(round(b * n / 100))`` (Python's round: halves go to the even integer), a negative boundary counts from the
end; a percentage beyond 100, a boundary beyond n either way, or an end before the start is a ValueError (TFDS
fails on those too). Joins (``'train+test'``), shard units (``'train[1shard]'``) and ``'all'`` are not single
slices: ``parse_slice`` returns None for them and the caller reads TFDS (or a cache entry stored under that exact
string).
"""

from __future__ import annotations

import re
from typing import NamedTuple

# The grammar of tensorflow_datasets/core/splits.py (_SUB_SPEC_RE, _SLICE_RE), restricted to one sub-split.
_SUB_SPEC_RE = re.compile(r"^(?P<split_name>[\w-]+)(\[(?P<split_selector>[\d\w%:.-]+)\])?$")
_SLICE_RE = re.compile(r"^((?P<val>-?[\d_.]+)(?P<unit>(?:%|shard))?)?$")


class SplitSlice(NamedTuple):
    """``split_name[start:stop]`` in ``unit`` ('abs' or '%'); None: from the start / to the end."""

    split_name: str
    start: float | int | None
    stop: float | int | None
    unit: str


def parse_slice(spec: str) -> SplitSlice | None:
    """The slice ``spec`` names, or None when it is not one slice of one named split (a join, shards, 'all', or
    text TFDS would refuse). ``'train'`` is ``SplitSlice('train', None, None, 'abs')``."""
    match = _SUB_SPEC_RE.match(spec)
    if match is None or match["split_name"] == "all":
        return None
    selector = match["split_selector"]
    if selector is None:
        return SplitSlice(match["split_name"], None, None, "abs")
    bounds = [_SLICE_RE.match(part) for part in selector.split(":")]
    if len(bounds) != 2 or not all(bounds) or not any(b.group(0) for b in bounds):
        return None  # 'train[5]' (TFDS: shards only), 'train[1:2:3]', 'train[:]'
    unit = bounds[0]["unit"] or bounds[1]["unit"] or "abs"  # TFDS: one unit for both ends
    if unit == "shard":
        return None
    convert = float if unit == "%" else int
    try:
        start, stop = (None if b["val"] is None else convert(b["val"]) for b in bounds)
    except ValueError:
        return None  # 'train[1.5:]': TFDS refuses it
    return SplitSlice(match["split_name"], start, stop, unit)


def absolute_bounds(piece: SplitSlice, num_examples: int) -> tuple[int, int]:
    """[start, stop) of ``piece`` in a split of ``num_examples``, as TFDS reads it. ValueError (TFDS's words)
    when a boundary lies outside the split."""
    start, stop = piece.start, piece.stop
    if piece.unit == "%":
        if abs(start or 0) > 100 or abs(stop or 0) > 100:
            raise ValueError(f"When unit=%, percent slice boundaries should be in [-100, 100]. Got: {piece}")
        start = 0 if start is None else int(round(start * num_examples / 100.0))
        stop = num_examples if stop is None else int(round(stop * num_examples / 100.0))
    else:
        start = 0 if start is None else start
        stop = num_examples if stop is None else stop
    if abs(start) > num_examples or abs(stop) > num_examples:
        raise ValueError(
            f"Requested slice [{start or ''}:{stop or ''}] incompatible with {num_examples} examples "
            f"(split '{piece.split_name}')."
        )
    start = start + num_examples if start < 0 else start
    stop = stop + num_examples if stop < 0 else stop
    if stop < start:  # TFDS resolves it to a negative count and fails when reading
        raise ValueError(f"slice '{piece.split_name}[{piece.start}:{piece.stop}]' ends before it starts")
    return start, stop
