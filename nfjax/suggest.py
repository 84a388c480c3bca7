"""The one "did you mean" helper: every unknown name (config key, model, recipe argument) is answered with it."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(name: str, valid: Iterable[str], prefix: str = "") -> str:
    """``" Did you mean X or Y?"`` naming the closest of ``valid`` to ``name`` (each shown with ``prefix``),
    or ``""`` when none is close. Meant to be appended to an error message."""
    close = difflib.get_close_matches(name, list(valid), n=3, cutoff=0.6)
    return f" Did you mean {' or '.join(prefix + c for c in close)}?" if close else ""
