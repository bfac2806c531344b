"""The source itself: pyflakes finds no unused name, undefined name or repeated key (a zoo entry written twice
silently keeps only the last); a checkout shadows no package that its dependencies import."""
import subprocess
import sys
from pathlib import Path

from pyflakes.api import checkPath
from pyflakes.reporter import Reporter

ROOT = Path(__file__).resolve().parent.parent


class _Collected(Reporter):
    def __init__(self):
        self.found = []

    def unexpectedError(self, filename, message):
        self.found.append(f"{filename}: {message}")

    def syntaxError(self, filename, message, lineno, offset, text):
        self.found.append(f"{filename}:{lineno}: {message}")

    def flake(self, message):
        self.found.append(str(message))


def test_pyflakes_finds_nothing():
    reporter = _Collected()
    for folder in ("fxcircuits", "kernels", "tests", "examples", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            checkPath(str(path), reporter)
    assert not reporter.found, "\n".join(reporter.found)


def test_a_python_started_in_the_checkout_imports_transformers_and_the_kernels():
    """Python puts the working directory first on ``sys.path`` (``python -m pytest``, a REPL, a notebook), so a
    package folder ``kernels/`` there would shadow Hugging Face's PyPI package ``kernels``, which transformers
    imports by name (5.25 requires it): the folder is no package, and ``fxcircuits.kernels`` still imports."""
    code = ("import transformers.activations, kernels, fxcircuits.kernels.accumulate; "
            "print(getattr(kernels, '__file__', None))")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    assert not run.stdout.strip().startswith(str(ROOT)), run.stdout
