"""``bench/architectures.py``, the survey of every causal-LM type, on three types whose answers are known (Laguna:
attention sinks beside the core and a per-head output gate from the stream)."""
import json
import subprocess
import sys
from pathlib import Path

SURVEY = Path(__file__).resolve().parents[1] / "bench" / "architectures.py"


def test_survey_checks_refuses_and_flags(tmp_path):
    out = tmp_path / "survey.jsonl"
    done = subprocess.run([sys.executable, str(SURVEY), "--only", "llama,bert,laguna", "--out", str(out),
                           "--jobs", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    results = {r["type"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert results["llama"]["status"] == "ok" and results["laguna"]["status"] == "ok"
    assert set(results["llama"]["checks"]) == {"clean", "corrupted", "logits", "input", "positions", "masks", "heads",
                                                 "patterns", "direct", "tokens", "sources"}
    assert results["llama"]["readout"] == results["laguna"]["readout"] == "linear"
    assert all(v <= 1e-4 for v in results["laguna"]["checks"].values())
    assert results["bert"]["status"] == "refused" and "not causal" in results["bert"]["error"]
    assert "ok: 2, refused: 1" in done.stdout
