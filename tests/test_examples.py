"""The two walkthroughs of examples/ run on the real SmolLM2-135M (at a reduced size) and say what they should."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
pytestmark = pytest.mark.slow


def _run(script: str, *args: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_high_level_circuit_finding(tmp_path):
    out = _run("high_level_circuit_finding.py", "--size", "8", "--out", str(tmp_path / "gt"), cwd=tmp_path)
    assert "task greater-than: 8 examples" in out
    clean, corrupted = map(float, re.search(r"clean (-?[\d.]+), corrupted (-?[\d.]+)", out).groups())
    assert clean > 0.5 > corrupted  # the model does greater-than; the corruption undoes it
    faithfulness = float(re.search(r"faithfulness (-?[\d.]+)", out).group(1))
    assert faithfulness > 0.5, out  # measured 0.770 on these 8 examples (1% of the edges)
    assert "123211 edges 1.00" in out  # the whole graph is the whole model
    edges, reached = re.search(r"keeps 85%: (\d+) edges, faithfulness ([\d.]+)", out).groups()
    assert 0 < int(edges) < 123211 and float(reached) >= 0.85, out
    push = float(re.search(r"of each alone:\n\s+\S+\s+([+-][\d.]+)", out).group(1))
    assert push > 0.05, out  # a node of the circuit alone favours the later years (a27.h4, +0.182, measured)
    for suffix in (".json", ".svg", "_curve.png"):
        assert (tmp_path / f"gt{suffix}").stat().st_size > 0


def test_low_level_circuit_finding(tmp_path):
    out = _run("low_level_circuit_finding.py", "--size", "2", cwd=tmp_path)
    assert "1. node patching" in out and "3. paths of" in out and "4. logit lens" in out and "5. attention" in out
    assert "by the token read" in out
    gap = float(re.search(r"relative difference ([\d.e+-]+)", out).group(1))
    assert gap < 1e-4, out  # edge patching by hand through the readout equals the engine's
    patched = float(re.search(r"direct to the logits ([-+][\d.]+)", out).group(1))
    estimated = float(re.search(r"clean less corrupted: \S+ ([-+][\d.]+)", out).group(1))
    assert abs(estimated - patched) < 0.25, out  # the top node's direct path, by DLA and by patching (2.45, 2.44)
    final = float(re.search(r"m29 ([\d.]+)", out).group(1))
    assert final > 0.3, out  # after the last layer the stream predicts the indirect object
    assert "mean weight on each role over the batch:" in out
    by_token, by_role = out.split("6. patched at one token")[1].split("   by role")
    rows = [re.match(r"\s*(\S+)  (.*)", line).groups() for line in by_token.splitlines()[1:] if line.strip()]
    cells = {node: [(int(p), float(v)) for p, v in re.findall(r"@(\d+) ([-+][\d.]+)", line)] for node, line in rows}
    last = max(p for row in cells.values() for p, _ in row)
    late = [row for node, row in cells.items() if node.startswith("a") and int(node[1:].split(".")[0]) >= 20]
    assert late and all(row[0][0] == last for row in late if abs(row[0][1]) >= 0.1), out  # late heads act at the end
    rows = [re.match(r"\s*(\S+)  (.*)", line).groups() for line in by_role.splitlines()[1:] if line.strip()]
    roles = {node: re.findall(r"(IO|S1|S2|END) ([-+][\d.]+)", line) for node, line in rows}
    assert roles.keys() == cells.keys()  # the same nodes, by role over the batch: the late heads at END too
    assert all(roles[node][0][0] == "END" for node, row in cells.items() if row in late and abs(row[0][1]) >= 0.1)
