"""Positional circuits: edge scores by span against the gradient of positional masks and against ``attribute``,
and circuits of (edge, span) pairs evaluated against direct patched calls."""
import json
import re

import pytest
import torch

import fxcircuits
from fxcircuits import CircuitGraph, EdgeScores, metrics
from fxcircuits.data import position_classes
from fxcircuits.positional import SpanCircuit, SpanScores, load_circuit
from test_attribution import steps_of
from test_activation_patching import _batch, _spanned
from zoo import make


@pytest.fixture
def llama(traced):
    return traced("llama")[1]


def _mean_metric(cm, batch, masks, weights):
    """The mean logit difference with ``masks`` [classes, E] at the classes ``weights`` [classes, batch, seq]."""
    logits = cm(batch["clean"], batch["attention_mask"], corrupted_input_ids=batch["corrupted"], edge_mask=masks,
                mask_positions=weights)
    return metrics.logit_diff(logits, batch).mean()


def test_eap_by_span_is_the_gradient_of_a_mask_per_class(llama, prompts):
    """EAP's score of an edge at a class is the gradient of the metric with respect to that class's mask value at
    every edge kept: the tap's scores by token, summed by class, against the engine's own mask gradient."""
    batch = _spanned(prompts)
    scores = fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "eap", progress=False)
    names, weights = position_classes(batch)
    assert scores.spans == names == ["A", "B", "rest"]
    keep = torch.ones(3, len(llama.graph.edges), requires_grad=True)
    (grad,) = torch.autograd.grad(_mean_metric(llama, batch, keep, weights), keep)
    torch.testing.assert_close(scores.tensor, grad, atol=1e-6, rtol=1e-4)
    assert (grad[0] - grad[1]).abs().max() > 1e-3  # the classes differ


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted"])
def test_scores_by_span_add_up_to_attribute(llama, prompts, method):
    batch = _spanned(prompts)
    halves = [{k: (v[:2] if k != "spans" else {n: r[:2] for n, r in v.items()}) for k, v in batch.items()},
              {k: (v[2:] if k != "spans" else {n: r[2:] for n, r in v.items()}) for k, v in batch.items()}]
    by_span = fxcircuits.attribute_by_span(llama, halves, "logit_diff", method, progress=False, **steps_of(method, 3))
    plain = fxcircuits.attribute(llama, [batch], "logit_diff", method, progress=False, **steps_of(method, 3))
    torch.testing.assert_close(by_span.total().tensor, plain.tensor, atol=1e-6, rtol=1e-4)
    assert by_span.info["examples"] == 3 and by_span.method == method
    only_b = fxcircuits.attribute_by_span(llama, halves, "logit_diff", method, spans=["B"], progress=False,
                                          **steps_of(method, 3))
    assert only_b.spans == ["B", "rest"]
    torch.testing.assert_close(only_b.span("B").tensor, by_span.span("B").tensor)
    torch.testing.assert_close(only_b.span("rest").tensor, by_span.span("A").tensor + by_span.span("rest").tensor)


def test_a_span_circuit_evaluates_as_its_masks_at_its_classes(llama, prompts):
    """``evaluate`` of (edge, span) pairs is the metric of one call with a mask per class at its tokens; the same
    edges in every class are the plain circuit, every pair is the model, and knocking the circuit out is
    completeness measured the same way."""
    batch = _spanned(prompts)
    scores = fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "eap", progress=False)
    circuit = scores.topn(40)
    assert 0 < len(circuit) <= 40 and circuit.spans == ["A", "B", "rest"]
    weights = position_classes(batch)[1]
    evaluator = fxcircuits.Evaluator(llama, [batch], "logit_diff")
    with torch.no_grad():
        direct = metrics.logit_diff(llama(batch["clean"], batch["attention_mask"],
                                          corrupted_input_ids=batch["corrupted"], edge_mask=circuit.edge_mask(),
                                          mask_positions=weights), batch)
        knocked = _mean_metric(llama, batch, 1 - circuit.edge_mask(), weights)
    evaluation = evaluator.evaluate(circuit)
    torch.testing.assert_close(evaluation.circuit, direct.float())
    assert evaluator.completeness(circuit) == pytest.approx(
        fxcircuits.evaluation.faithfulness(knocked, evaluator.full.mean(), evaluator.empty.mean()), abs=1e-5)
    plain = scores.total().topn(30)
    alike = SpanCircuit(llama.graph, circuit.spans, plain.in_graph.expand(3, -1))
    assert evaluator.evaluate(alike).faithfulness == pytest.approx(evaluator.evaluate(plain).faithfulness, abs=1e-5)
    everything = SpanCircuit(llama.graph, circuit.spans, torch.ones(3, len(llama.graph.edges), dtype=torch.bool))
    assert evaluator.evaluate(everything).faithfulness == pytest.approx(1.0, abs=1e-5)
    curve = evaluator.curve(scores, fractions=[0.1, 1.0])
    assert curve.edges == [len(scores.topn(0.1)), 3 * len(llama.graph.edges)]
    # beside another mask, the kept rows are summed as all rows less the moved ones: rounding of 1e-7, over a
    # full-minus-empty difference of 0.004 in this random model
    assert curve.faithfulness[1] == pytest.approx(1.0, abs=1e-4)


def test_minimality_of_a_span_circuit_drops_one_pair_at_a_time(llama, prompts):
    batch = _spanned(prompts)
    circuit = SpanCircuit(llama.graph, ["A", "B", "rest"], {"A": ["input->logits", "m1->logits"], "B": ["m1->logits"],
                                                            "rest": ["input->logits"]})
    evaluator = fxcircuits.Evaluator(llama, [batch], "logit_diff")
    worth = evaluator.minimality(circuit)
    assert list(worth) == [("input->logits", "A"), ("m1->logits", "A"), ("m1->logits", "B"), ("input->logits", "rest")]
    whole = evaluator.evaluate(circuit).faithfulness
    without = SpanCircuit(llama.graph, circuit.spans, {"A": ["input->logits", "m1->logits"], "rest": ["input->logits"]})
    assert worth["m1->logits", "B"] == pytest.approx(whole - evaluator.evaluate(without).faithfulness, abs=1e-5)


def test_pruning_drops_pairs_whose_edge_no_kept_edge_feeds_or_reads(llama):
    g = llama.graph
    kept = {"A": ["input->a0.h0<q>", "a0.h0->logits"], "B": ["m1->logits"], "rest": ["a0.h1->m1"]}
    circuit = SpanCircuit(g, ["A", "B", "rest"], kept)
    assert circuit.edges == kept  # a0.h1 is fed at no class, but m1 is fed by it and read: the pairs stay apart
    pruned = circuit.pruned()
    assert pruned.edges == {"A": ["input->a0.h0<q>", "a0.h0->logits"], "B": [], "rest": []}
    assert pruned.union().edges == ["input->a0.h0<q>", "a0.h0->logits"]
    # across classes: a0.h0's input at A feeds its output at B through attention, so the pair at B stays
    across = SpanCircuit(g, ["A", "B", "rest"], {"A": ["input->a0.h0<q>"], "B": ["a0.h0->logits"]}).pruned()
    assert across.edges == {"A": ["input->a0.h0<q>"], "B": ["a0.h0->logits"], "rest": []}


def test_span_scores_and_circuits_read_back(llama, prompts, tmp_path):
    batch = _spanned(prompts)
    scores = fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "eap", progress=False)
    edge = llama.graph.edges[5]
    assert scores[edge, "B"] == pytest.approx(float(scores.tensor[1, 5]))
    scores.save(tmp_path / "scores.json")
    again = SpanScores.load(tmp_path / "scores.json")
    assert again.spans == scores.spans and again.method == "eap" and again.info["examples"] == 3
    torch.testing.assert_close(again.tensor, scores.tensor)
    circuit = scores.threshold(float(scores.tensor.abs().max()) / 4)
    with pytest.raises(ValueError, match="threshold NaN keeps nothing"):
        scores.threshold(float("nan"))
    broken = scores.tensor.clone()
    broken[0, 2] = float("inf")
    with pytest.raises(ValueError, match="1 scores are NaN or infinite"):
        SpanScores(scores.graph, scores.spans, broken)
    circuit.save(tmp_path / "c.json")
    again = SpanCircuit.load(tmp_path / "c.json")
    assert again.spans == circuit.spans and again.edges == circuit.edges
    circuit.save(tmp_path / "C.JSON")  # as Circuit.save takes it
    assert load_circuit(tmp_path / "C.JSON").edges == circuit.edges
    torch.testing.assert_close(again.scores, circuit.scores)
    assert again.span("A").info["span"] == "A"
    with pytest.raises(ValueError, match="must end with 'rest'"):
        SpanCircuit(llama.graph, ["A", "B"], torch.zeros(2, len(llama.graph.edges)))
    with pytest.raises(KeyError, match="no class 'C'"):
        SpanCircuit(llama.graph, ["A", "rest"], {"C": []})
    with pytest.raises(ValueError, match="expected \\[3, 110\\]"):
        SpanScores(llama.graph, ["A", "B", "rest"], torch.zeros(110))
    circuit.span("A").save(tmp_path / "a.json")  # one class, in the field's own format
    assert fxcircuits.Circuit.load(tmp_path / "a.json").edges == circuit.edges["A"]
    with pytest.raises(ValueError, match="not a positional circuit"):
        SpanCircuit.load(tmp_path / "a.json")
    with pytest.raises(ValueError, match="holds a positional circuit"):
        fxcircuits.Circuit.load(tmp_path / "c.json")
    assert isinstance(load_circuit(tmp_path / "c.json"), SpanCircuit)
    assert load_circuit(tmp_path / "a.json").edges == circuit.edges["A"]


SPANS, CFG = ["S2", "END", "rest"], {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}


def _span_scores(n_layers: int = 2) -> SpanScores:
    graph = CircuitGraph.from_config({**CFG, "n_layers": n_layers})
    tensor = torch.randn(len(SPANS), len(graph.edges), generator=torch.Generator().manual_seed(n_layers))
    return SpanScores(graph, SPANS, tensor, "eap", {"examples": 3})


def test_span_scores_read_back_save_again_as_they_were(tmp_path):
    """Read back, the method is apart from the rest of the info, as given; a class's scores, or their sum, save
    again and read back as they were (the file keeps the method among its info: kept in both, it was written
    twice)."""
    scores = _span_scores()
    scores.save(tmp_path / "scores.json")
    loaded = SpanScores.load(tmp_path / "scores.json")
    assert loaded.spans == SPANS and torch.equal(loaded.tensor, scores.tensor)
    assert loaded.method == "eap" and loaded.info == {"examples": 3}
    for name, part, original in (("end", loaded.span("END"), scores.span("END")),
                                 ("total", loaded.total(), scores.total())):
        for suffix in (".json", ".pt"):
            part.save(tmp_path / f"{name}{suffix}")
            again = EdgeScores.load(tmp_path / f"{name}{suffix}")
            assert torch.equal(again.tensor, original.tensor)
            assert again.method == "eap" and again.info == original.info


def test_damaged_positional_files_are_refused_naming_the_file_and_the_problem(tmp_path):
    """A positional circuit file whose spans and circuits disagree — in their names, their graphs, or having
    scores — is refused naming the file and what is wrong, by every reader, rather than failing in torch.stack
    (no ValueError, a traceback from the shell), on a bare KeyError, or reading a string's letters as spans."""
    two, three = _span_scores(2), _span_scores(3)
    forms = {}
    for name, scores in (("two", two), ("three", three)):
        scores.save(tmp_path / f"{name}.json")
        forms[name] = json.loads((tmp_path / f"{name}.json").read_text())
    good = forms["two"]["circuits"]
    unscored = fxcircuits.Circuit(two.graph, []).json_form(span="END")
    cases = [({"circuits": {**good, "END": forms["three"]["circuits"]["END"]}},
              f"the circuits of spans 'S2' and 'END' are of different graphs ({len(two.graph.edges)} and "
              f"{len(three.graph.edges)} edges; first difference"),
             ({"circuits": {s: c for s, c in good.items() if s != "END"}},
              "span 'END' is listed in spans but has no circuit"),
             ({"circuits": {**good, "IO": good["S2"]}}, "it holds a circuit for span 'IO', which its spans"),
             ({"spans": "S2"}, "spans must be a list of names, each once, the last 'rest'; got 'S2'"),
             ({"spans": ["S2", "S2", "END", "rest"]}, "spans must be a list of names, each once"),
             ({"spans": []}, "spans must be a list of names"),
             ({"circuits": [good["S2"]]}, "its circuits must be an object from span names to circuits; got a list"),
             ({"circuits": {**good, "END": unscored}}, "span 'S2''s circuit has scores and span 'END''s none"),
             ({"spans": ["S2", "END"], "circuits": {s: c for s, c in good.items() if s != "rest"}},
              "the classes ['S2', 'END'] must end with 'rest'")]
    path = tmp_path / "damaged.json"
    for change, says in cases:
        path.write_text(json.dumps({**forms["two"], **change}))
        for load in (SpanCircuit.load, SpanScores.load, load_circuit):
            with pytest.raises(ValueError, match=re.escape(f"{path}: {says}")):
                load(path)


def test_span_scores_are_indexed_by_edge_and_span(llama):
    """An edge alone picks no score of ``SpanScores`` (it has one per class): refused saying to give the span too,
    or to take a class's scores or their sum, not "too many values to unpack"."""
    scores = SpanScores(llama.graph, ["A", "rest"], torch.arange(2.0)[:, None].expand(2, len(llama.graph.edges)))
    edge = llama.graph.edges[-1]
    assert scores[edge, "rest"] == 1.0
    for key in (edge, (edge,), (edge, "A", "rest")):
        with pytest.raises(KeyError, match=r"index as scores\[edge, span\] \(spans 'A', 'rest'\).*scores.span"
                                           r"\(name\).*scores.total\(\)"):
            scores[key]
    with pytest.raises(KeyError, match="no span 'B'"):
        scores[edge, "B"]


@pytest.fixture(scope="module")
def llama64():
    return fxcircuits.trace(make("llama", dtype=torch.float64))


def _whole(prompts) -> dict:
    """The batch with one span over every real token: its class is the whole prompt, the rest its padding."""
    return {**_batch(prompts), "spans": {"all": torch.tensor([[2, 7], [0, 7], [0, 7]])}}


def _shared_and_changed(prompts) -> dict:
    """The batch cut where its clean and corrupted prompts part: the tokens they share (the first row's padding
    aside, which is the rest), then the others."""
    spans = {"shared": torch.tensor([[2, 3], [0, 3], [0, 3]]), "changed": torch.tensor([[3, 7]] * 3)}
    return {**_batch(prompts), "spans": spans}


def test_greedy_by_span_grows_pairs_from_the_logits(llama, prompts):
    """Pairs join best first once their edge's destination node is reached, at any class: each kept pair's edge
    ends at logits or at the source of another kept pair.  Scores at one class alone grow as the plain greedy
    search grows that class's edge scores."""
    g = llama.graph
    scores = fxcircuits.attribute_by_span(llama, [_spanned(prompts)], "logit_diff", "eap", progress=False)
    circuit = scores.greedy(30)
    assert 0 < len(circuit) <= 30
    kept = circuit.in_graph.nonzero().tolist()
    sources = {int(g.src[e]) for _, e in kept}
    assert all(int(g.reader[g.dst[e]]) in sources | {len(g.nodes) - 1} for _, e in kept)
    into_logits = scores.tensor[:, g.reader[g.dst] == len(g.nodes) - 1].abs()
    first = circuit.in_graph[:, g.reader[g.dst] == len(g.nodes) - 1]
    assert bool(first.flatten()[into_logits.flatten().argmax()])  # the best pair into logits comes first
    alone = torch.zeros_like(scores.tensor)
    alone[1] = scores.tensor[1]
    plain = fxcircuits.EdgeScores(g, scores.tensor[1]).greedy(12)
    assert (plain.scores[plain.in_graph] != 0).all()
    one = SpanScores(g, scores.spans, alone).greedy(12)
    assert one.edges == {"A": [], "B": plain.edges, "rest": []}


def test_exact_by_span_patches_one_edge_at_one_class_per_run(llama64, prompts):
    """Each (edge, class) score is m(clean) − m(that edge patched at that class's tokens alone), each pair run on
    its own through ``cm(...)``; the batched calls (7 pairs each) cross from class to class."""
    batch = _spanned(prompts)
    scores = fxcircuits.attribute_by_span(llama64, [batch], "logit_diff", "exact", masks_per_call=7, progress=False)
    names, weights = position_classes(batch)
    assert scores.spans == names and scores.method == "exact"
    n_edges = len(llama64.graph.edges)
    clean = metrics.logit_diff(llama64(batch["clean"], batch["attention_mask"]), batch).mean()
    pairs = [(c, e) for c in range(3) for e in range(c, n_edges, 13)]
    reference = []
    with torch.no_grad():
        for c, e in pairs:
            masks = torch.ones(3, n_edges, dtype=torch.float64)
            masks[c, e] = 0.0
            reference.append(clean - _mean_metric(llama64, batch, masks, weights))
    torch.testing.assert_close(torch.stack([scores.tensor[c, e] for c, e in pairs]), torch.stack(reference),
                               atol=1e-6, rtol=1e-5)
    assert (scores.tensor[0] - scores.tensor[1]).abs().max() > 1e-3  # the classes differ


def test_one_class_over_the_whole_prompt_is_the_plain_method(llama64, prompts):
    """A span over every token makes its class the whole prompt: exact and ACDC score it as ``attribute`` scores
    the edges, and the rest, the first row's padding, moves nothing (ACDC removes it at no cost)."""
    batch = _whole(prompts)
    for method, options in (("exact", {}), ("acdc", {"threshold": 1e-3})):
        by_span = fxcircuits.attribute_by_span(llama64, [batch], "kl", method, masks_per_call=9, progress=False,
                                               **options)
        plain = fxcircuits.attribute(llama64, [batch], "kl", method, masks_per_call=9, progress=False, **options)
        assert by_span.spans == ["all", "rest"]
        torch.testing.assert_close(by_span.span("all").tensor, plain.tensor, atol=1e-6, rtol=1e-5)
        assert by_span.span("rest").tensor.abs().max() < 1e-6
    kept = by_span.threshold(1e-3, absolute=False)
    assert kept.edges["all"] == plain.threshold(1e-3, absolute=False).edges and kept.edges["rest"] == []


def test_acdc_by_span_batched_equals_sequential(llama64, prompts):
    """The speculative batches walk (edge, class) pairs as the one-at-a-time walk does.  Pairs at the tokens both
    prompts share cost nothing, and go; a node stays while it feeds a kept pair at some class, so the walk reaches
    the first layer through the class of tokens that differ."""
    batch = _shared_and_changed(prompts)
    runs = [fxcircuits.attribute_by_span(llama64, [batch], "kl", "acdc", threshold=1e-5, masks_per_call=n,
                                         progress=False) for n in (1, 16)]
    torch.testing.assert_close(runs[1].tensor, runs[0].tensor, atol=1e-9, rtol=1e-6)
    kept = runs[0].threshold(1e-5, absolute=False)
    assert kept.edges["shared"] == kept.edges["rest"] == [] and runs[0].span("shared").tensor.abs().max() < 1e-9
    assert 0 < len(kept.edges["changed"]) < len(llama64.graph.edges)
    assert any(e.startswith("input->a0.") for e in kept.edges["changed"])


def test_a_mask_learned_by_span_moves_the_gates_that_matter(llama64, prompts):
    """A gate per (edge, class): where both prompts agree, and at the first row's padding (the rest), patching
    changes nothing and the loss pulls on no gate, so those gates move alike, by the projection to the density
    alone, and close; at the tokens that differ they part, from shut to open.  (Alike to rounding: HF's attention
    takes its softmax in float32, and Adam scales the gradient of 1e-9 that leaves toward a step.)  Deterministic
    given the seed; the distance recorded is that of the circuit kept, run through the public call."""
    batch = _shared_and_changed(prompts)
    runs = [fxcircuits.attribute_by_span(llama64, [batch], "logit_diff", "mask", mask_steps=40, density=0.2,
                                         seed=3, progress=False) for _ in range(2)]
    assert torch.equal(runs[0].tensor, runs[1].tensor) and runs[0].info["examples"] == 3
    for idle in ("shared", "rest"):
        gates = runs[0].span(idle).tensor
        assert gates.max() < 0.5 and gates.max() - gates.min() < 0.05, idle
    changed = runs[0].span("changed").tensor
    assert changed.max() - changed.min() > 0.9 and abs(float(runs[0].tensor.mean()) - 0.2) < 1e-6
    # the held circuit, the top fifth of the (edge, class) pairs, each class at its tokens, is the one recorded
    kept = torch.zeros(runs[0].tensor.numel(), dtype=torch.float64)
    kept[runs[0].tensor.flatten().argsort(descending=True, stable=True)[:int(0.2 * kept.numel())]] = 1.0
    with torch.no_grad():
        model = metrics.logit_diff(llama64(batch["clean"], batch["attention_mask"]), batch)
        patched = metrics.logit_diff(llama64(batch["clean"], batch["attention_mask"],
                                             corrupted_input_ids=batch["corrupted"],
                                             edge_mask=kept.view(runs[0].tensor.shape),
                                             mask_positions=position_classes(batch)[1]), batch)
    assert runs[0].info["circuit_distance"] == pytest.approx(float((patched - model).abs().mean()), rel=1e-6)



def test_uniform_gradient_sampling_by_span_moves_the_edges_that_matter(llama64, prompts):
    """An edge per class: where both prompts agree, and at the first row's padding (the rest), patching changes
    nothing, and the penalty alone moves those edges, all alike, down from where they start (σ(1)); at the tokens
    that differ the distance pulls them apart.  Deterministic given the seed."""
    batch = _shared_and_changed(prompts)
    runs = [fxcircuits.attribute_by_span(llama64, [batch], "logit_diff", "ugs", mask_steps=40, seed=3,
                                         progress=False) for _ in range(2)]
    assert torch.equal(runs[0].tensor, runs[1].tensor) and runs[0].tensor.shape == (3, len(llama64.graph.edges))
    start = torch.sigmoid(torch.tensor(1.0, dtype=torch.float64))
    for idle in ("shared", "rest"):
        kept = runs[0].span(idle).tensor
        assert kept.max() < start and kept.max() - kept.min() < 1e-3, idle
    changed = runs[0].span("changed").tensor
    assert changed.max() - changed.min() > 0.3

def test_scores_by_span_need_spans_and_a_method(llama, prompts):
    batch = _spanned(prompts)
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "nope")
    with pytest.raises(TypeError, match=r"options of a learned mask \(method 'mask' or 'ugs'\), not of 'exact'"):
        fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "exact", density=0.1)
    with pytest.raises(ValueError, match="no spans"):
        fxcircuits.attribute_by_span(llama, [{k: v for k, v in batch.items() if k != "spans"}], "logit_diff", "eap")
    with pytest.raises(KeyError, match="no span 'C'"):
        fxcircuits.attribute_by_span(llama, [batch], "logit_diff", "eap", spans=["C"])
