"""Counting the operations a run dispatches: on a GPU each one that is not a view is a kernel launch, and at
small sizes (SmolLM2 on a few prompts) launches, not arithmetic, set the cost."""
import contextlib
from collections import Counter
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fxcircuits import heads, patching

SCALAR_READ = torch.ops.aten._local_scalar_dense.default  # ``.item()``, ``bool(t)``: on a GPU the host waits


class Operations(TorchDispatchMode):
    """``with Operations() as ops: run()``, then ``ops.launches()`` and ``ops.waits()``."""

    def __init__(self):
        super().__init__()
        self.counts = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func] += 1
        return func(*args, **(kwargs or {}))

    def launches(self) -> int:
        return sum(n for f, n in self.counts.items() if not f.is_view and f is not SCALAR_READ)

    def waits(self) -> int:
        return self.counts[SCALAR_READ]


def count(run) -> Operations:
    """The operations of one call of ``run``."""
    with Operations() as operations:
        run()
    return operations


@contextlib.contextmanager
def as_on_a_gpu(dense: bool = False):
    """The run-time choices a GPU makes, made on CPU: the corrupted run in the patched pass (``runs_alongside``),
    the routes that launch fewer operations (``heads.launch_bound``), and with ``dense`` the accumulation by the
    dense product (CUDA's route; the CPU's sparse routes are decided on the host, and cost more of it there)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(heads, "launch_bound", lambda device: True))
        if dense:
            stack.enter_context(mock.patch.object(patching, "_route", lambda *args: "dense"))
        yield
