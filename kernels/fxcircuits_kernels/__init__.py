"""Triton kernels, shipped as ``fxcircuits.kernels`` (pyproject maps this folder there); see ``accumulate``.

Deliberately empty: importing the package must not import Triton.  The folder sits one level down in ``kernels/``,
which has no ``__init__.py``, so that a Python started in a source checkout (``python -m pytest``, a REPL, a
notebook) never finds the checkout's ``kernels/`` as a top-level package ``kernels``: that is the name of Hugging
Face's PyPI package, which transformers requires and imports, and a folder without ``__init__.py`` leaves the
name to it."""
