"""Warnings at the user's line, wherever in the package they are raised.

A fixed ``stacklevel`` is right for one call path only: the same warning reached through ``tasks.from_file``
instead of ``data.make_batches``, or through ``nn.Module.__call__`` instead of ``forward``, would point inside
fxcircuits or torch, where the user can do nothing with it.
"""
from __future__ import annotations

import sys
import warnings


def warn_at_caller(message: str) -> None:
    """``warnings.warn`` at the first frame outside fxcircuits and torch: the line that called into them."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("fxcircuits.", "torch.")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)
