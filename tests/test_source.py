"""The source itself: pyflakes finds no unused name, undefined name or repeated key (a zoo entry written twice
silently keeps only the last)."""
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
