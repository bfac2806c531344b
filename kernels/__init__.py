"""Triton kernels, shipped as ``fxcircuits.kernels`` (pyproject maps this folder there); see ``accumulate``.

Deliberately empty.  Importing the package must not import Triton, and tools import a top-level ``kernels``
from wherever the working directory puts it first on ``sys.path``: transformers probes for the PyPI package of
that name by importing it, so from a source checkout this file runs as ``kernels`` and must do nothing."""
