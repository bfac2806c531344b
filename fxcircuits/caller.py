"""The caller's side: warnings at the user's line, and gradients whatever grad mode the user calls in.

A fixed ``stacklevel`` is right for one call path only: the same warning reached through ``tasks.from_file``
instead of ``data.make_batches``, or through ``nn.Module.__call__`` instead of ``forward``, would point inside
fxcircuits or torch, where the user can do nothing with it.  And a study is often run under ``torch.no_grad()``
as a whole, where the package's own gradients (attribution; trace's search for which heads a projection reads)
must still be taken.
"""
from __future__ import annotations

import contextlib
import sys
import warnings

import torch


def warn_at_caller(message: str) -> None:
    """``warnings.warn`` at the first frame outside fxcircuits and torch: the line that called into them."""
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_globals.get("__name__", "").startswith(("fxcircuits.", "torch.")):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level)


@contextlib.contextmanager
def gradients(what: str):
    """Autograd on for ``what`` (a decorator, or a ``with`` block), also under the caller's ``torch.no_grad()``.
    Inference mode is refused by name: its tensors can never be saved for a backward pass, and autograd's own
    error ("does not require grad", "Inference tensors cannot be saved") does not say who asked for one."""
    if torch.is_inference_mode_enabled():
        raise RuntimeError(f"{what} takes gradients, which torch.inference_mode() rules out: call it outside "
                           "inference mode (under torch.no_grad() is fine)")
    with torch.enable_grad():
        yield
