"""Faithfulness, CPR/CMD, completeness and minimality against direct computations."""
import pytest
import torch

import fxcircuits
from fxcircuits import Circuit, EdgeScores
from fxcircuits.evaluation import MIB_FRACTIONS, cmd, cpr
from fxcircuits.metrics import logit_diff
from test_attribution import _batch


def test_cpr_and_cmd_by_hand():
    fractions, f = [0.1, 0.2, 0.5], [0.5, 1.0, 1.2]
    assert cpr(fractions, f) == pytest.approx(0.1 * (0.5 + 1.0) / 2 + 0.3 * (1.0 + 1.2) / 2)
    assert cmd(fractions, f) == pytest.approx(0.1 * (0.5 + 0.0) / 2 + 0.3 * (0.0 + 0.2) / 2)


@pytest.fixture(scope="module")
def setup(traced):
    _, cm = traced("llama")
    batch = _batch()
    return cm, batch, fxcircuits.Evaluator(cm, [batch], "logit_diff")


def _direct(cm, batch, mask) -> torch.Tensor:
    with torch.no_grad():
        return logit_diff(cm(batch["clean"], batch["attention_mask"], corrupted_input_ids=batch["corrupted"],
                             edge_mask=mask), batch)


def test_evaluate_patches_every_edge_outside_the_circuit(setup):
    cm, batch, evaluator = setup
    circuit = EdgeScores(cm.graph, torch.randn(len(cm.graph.edges), generator=torch.Generator().manual_seed(0))).topn(30)
    result = fxcircuits.evaluate(cm, circuit, [batch], "logit_diff")
    torch.testing.assert_close(result.circuit, _direct(cm, batch, circuit.in_graph.float()))
    with torch.no_grad():
        torch.testing.assert_close(result.full, logit_diff(cm(batch["clean"], batch["attention_mask"]), batch))
        torch.testing.assert_close(result.empty, logit_diff(cm(batch["corrupted"], batch["attention_mask"]), batch),
                                   atol=1e-5, rtol=1e-5)
    expected = (result.circuit.mean() - result.empty.mean()) / (result.full.mean() - result.empty.mean())
    assert result.faithfulness == pytest.approx(float(expected))


def test_full_and_empty_circuits(setup):
    cm, _, evaluator = setup
    everything = Circuit(cm.graph, torch.ones(len(cm.graph.edges), dtype=torch.bool))
    nothing = Circuit(cm.graph, [])
    assert evaluator.evaluate(everything).faithfulness == pytest.approx(1.0)
    assert evaluator.evaluate(nothing).faithfulness == pytest.approx(0.0, abs=1e-5)
    assert evaluator.completeness(everything) == pytest.approx(0.0, abs=1e-5)
    assert evaluator.completeness(nothing) == pytest.approx(1.0)


def test_minimality_is_the_faithfulness_each_edge_is_worth(setup):
    cm, batch, evaluator = setup
    circuit = EdgeScores(cm.graph, torch.randn(len(cm.graph.edges), generator=torch.Generator().manual_seed(1))).greedy(12)
    worth = evaluator.minimality(circuit)
    assert len(circuit) > 0 and evaluator.minimality(Circuit(cm.graph, [])) == {}
    assert list(worth) == circuit.edges
    edge = circuit.edges[0]
    without = Circuit(cm.graph, [e for e in circuit.edges if e != edge])
    expected = evaluator.evaluate(circuit).faithfulness - evaluator.evaluate(without).faithfulness
    assert worth[edge] == pytest.approx(expected, abs=1e-6)


def test_mib_curves(setup):
    cm, batch, evaluator = setup
    scores = fxcircuits.attribute(cm, [batch], "logit_diff", "eap", progress=False)
    result = evaluator.mib(scores)
    for curve in (result["cpr_curve"], result["cmd_curve"]):
        assert curve.fractions == list(MIB_FRACTIONS)
        assert curve.edges[-1] == len(cm.graph.edges) and curve.faithfulness[-1] == pytest.approx(1.0)
        assert all(n <= int(p * len(cm.graph.edges)) for n, p in zip(curve.edges, curve.fractions))
    assert result["cpr"] == pytest.approx(cpr(MIB_FRACTIONS, result["cpr_curve"].faithfulness))
    assert result["cmd"] == pytest.approx(cmd(MIB_FRACTIONS, result["cmd_curve"].faithfulness))


def test_a_task_the_corruption_does_not_change_is_refused(setup):
    cm, batch, _ = setup
    same = {**batch, "corrupted": batch["clean"]}
    with pytest.raises(ValueError, match="faithfulness is undefined"):
        fxcircuits.evaluate(cm, Circuit(cm.graph, []), [same], "logit_diff").faithfulness
