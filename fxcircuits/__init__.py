"""fxcircuits: find circuits in any Hugging Face decoder-only model.

The pipeline, one module per stage: capture (torch.export) → components (residual stream, heads, MLPs)
→ rewrite (per-edge inputs) → patching (masks over edges).
"""
from .capture import CaptureError
from .components import DecompositionError
from .graph import Circuit, CircuitGraph
from .model import CircuitModel, trace

__all__ = ["trace", "CircuitModel", "CircuitGraph", "Circuit", "CaptureError", "DecompositionError"]
