"""The one error every converter raises for a file that cannot be converted (shown to users as one paragraph)."""

from __future__ import annotations


class ConversionError(ValueError):
    """A checkpoint file cannot be converted: unreadable, unsafe, or not the model it was said to be."""
