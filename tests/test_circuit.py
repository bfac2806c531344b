"""Selection, pruning and the EAP-IG/MIB circuit files."""
import json
import math
import re

import networkx as nx
import numpy as np
import pytest
import torch

import fxcircuits
from fxcircuits import Circuit, CircuitGraph, EdgeScores
import zoo

CFG = {"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8}


@pytest.fixture
def graph():
    return CircuitGraph.from_config(CFG)


def _scores(graph, values: dict[str, float]) -> EdgeScores:
    tensor = torch.zeros(len(graph.edges))
    for name, value in values.items():
        tensor[graph.edge_index[name]] = value
    return EdgeScores(graph, tensor, "hand")


@pytest.mark.parametrize("name", ["gpt2", "llama", "gpt_neox", "qwen3_5"])
def test_from_config_rebuilds_a_traced_graph(traced, name):
    """The convention's keys rebuild a transformer's graph; a hybrid's (Qwen3.5: a layer without attention) lists
    its writers too, and a file of either loads back."""
    graph = traced(name)[1].graph
    assert ("writers" in graph.cfg) == (name == "qwen3_5")
    rebuilt = CircuitGraph.from_config(json.loads(json.dumps(graph.cfg)))
    assert rebuilt.edges == graph.edges and rebuilt.downstream == graph.downstream


def test_pruning_drops_dangling_nodes_and_edges(graph):
    circuit = Circuit(graph, ["input->a0.h0<q>", "a0.h0->logits", "a0.h1->m1", "input->m0"]).pruned()
    # a0.h1 has no incoming edge and m0 no outgoing one: both go, with their edges
    assert circuit.edges == ["input->a0.h0<q>", "a0.h0->logits"]
    assert circuit.nodes == ["input", "a0.h0", "logits"]


def test_topn_ranks_by_absolute_or_signed_score(graph):
    scores = _scores(graph, {"input->logits": 1.0, "input->a1.h0<v>": -3.0, "a1.h0->logits": 2.0, "m0->logits": 0.5})
    assert scores.topn(2).edges == ["input->a1.h0<v>", "a1.h0->logits"]
    assert len(scores.topn(1, absolute=False)) == 0  # a1.h0->logits alone dangles: a1.h0 has no input
    assert scores.topn(2, absolute=False).edges == ["input->logits"]  # a1.h0->logits dangles without its input
    assert len(scores.topn(0.5)) <= int(0.5 * len(graph.edges))


def test_threshold_and_greedy(graph):
    scores = _scores(graph, {"input->logits": 1.0, "input->a1.h0<v>": -3.0, "a1.h0->logits": 2.0,
                             "input->m1": 5.0})
    assert scores.threshold(1.5).edges == ["input->a1.h0<v>", "a1.h0->logits"]
    assert len(scores.threshold(-math.inf, absolute=False)) == len(graph.edges)
    with pytest.raises(ValueError, match="threshold NaN keeps nothing"):
        scores.threshold(math.nan)
    # greedy grows from logits: input->m1 scores highest but m1 never reaches logits, so it is never a candidate
    greedy = scores.greedy(3)
    assert "input->m1" not in greedy.edges
    assert greedy.edges == ["input->a1.h0<v>", "input->logits", "a1.h0->logits"]


def _greedy_afresh(graph, scores: torch.Tensor, count: int) -> torch.Tensor:
    """EAP-IG's greedy search run for one size on its own: ``count`` times, the best edge not yet taken whose
    destination node is in the circuit (the lowest index among equals), its source node joining the circuit."""
    reached, flags = {len(graph.nodes) - 1}, torch.zeros(len(graph.edges), dtype=torch.bool)
    for _ in range(count):
        candidates = [e for e in range(len(graph.edges))
                      if not flags[e] and int(graph.reader[graph.dst[e]]) in reached]
        if not candidates:
            break
        best = max(candidates, key=lambda e: (float(scores[e]), -e))
        flags[best] = True
        reached.add(int(graph.src[best]))
    return flags


@pytest.mark.parametrize("absolute", [True, False])
def test_greedy_cuts_every_size_as_a_search_run_for_it_alone(graph, absolute):
    """``cuts("greedy")`` orders the edges once and cuts each size from that order; every size equals the search
    run afresh for it, with ties (scores rounded to a few values) broken alike."""
    tensor = (torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(3)) * 2).round() / 2
    scores = EdgeScores(graph, tensor)
    cut = scores.cuts("greedy", absolute)
    for n in range(len(graph.edges) + 1):
        reference = Circuit(graph, _greedy_afresh(graph, tensor.abs() if absolute else tensor, n), tensor).pruned()
        assert cut(n).edges == reference.edges == scores.greedy(n, absolute).edges, n
    with pytest.raises(ValueError, match="no selection 'threshold' by size: use topn or greedy"):
        scores.cuts("threshold")


def test_node_scores_sum_outgoing_edges(graph):
    scores = _scores(graph, {"a0.h1->logits": 1.5, "a0.h1->m1": -0.5, "m0->logits": 2.0})
    nodes = scores.nodes()
    assert nodes["a0.h1"] == pytest.approx(1.0) and nodes["m0"] == 2.0 and nodes["input"] == 0.0


def test_json_round_trip_in_the_eap_ig_format(graph, tmp_path):
    scores = EdgeScores(graph, torch.linspace(-1, 1, len(graph.edges)), "eap")
    circuit = scores.topn(10)
    path = tmp_path / "circuit.json"
    circuit.to_json(path, model="tiny", task="ioi")
    data = json.loads(path.read_text())
    assert set(data) == {"cfg", "nodes", "edges"}
    assert {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"} <= set(data["cfg"]) and data["cfg"]["task"] == "ioi"
    assert set(data["edges"]) == set(graph.edges) and set(data["nodes"]) == set(graph.nodes)
    assert all(set(e) == {"score", "in_graph"} for e in data["edges"].values())
    assert all(set(n) == {"in_graph"} for n in data["nodes"].values())  # a node's "score" is EAP-IG's node attribution
    loaded = Circuit.from_json(path)
    assert loaded.edges == circuit.edges and loaded.nodes == circuit.nodes
    torch.testing.assert_close(loaded.scores, circuit.scores)
    assert loaded.info["model"] == "tiny"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_scores_load_back_in_their_precision(graph, tmp_path, dtype):
    """A float64 model's scores come back from either file as saved, not rounded to float32 (a score of 1 + 1e-12
    read as 1); a float32 model's come back as float32."""
    values = 1 + torch.arange(len(graph.edges), dtype=dtype) * 1e-12
    for suffix in (".json", ".pt"):
        EdgeScores(graph, values, "eap").save(tmp_path / f"scores{suffix}")
        loaded = EdgeScores.load(tmp_path / f"scores{suffix}").tensor
        assert loaded.dtype == dtype and torch.equal(loaded, values)


def test_scores_save_and_load(graph, tmp_path):
    """Scores read back are the scores saved — the method apart from the rest of the info, as given — and save
    again (the file keeps the method among its info: kept in both, it was written twice)."""
    scores = EdgeScores(graph, torch.randn(len(graph.edges)), "eap-ig-inputs", {"steps": 5})
    for suffix in (".json", ".pt"):
        scores.save(tmp_path / f"scores{suffix}")
        loaded = EdgeScores.load(tmp_path / f"scores{suffix}")
        loaded.save(tmp_path / f"again{suffix}")
        for read in (loaded, EdgeScores.load(tmp_path / f"again{suffix}")):
            assert torch.equal(read.tensor, scores.tensor)
            assert read.method == "eap-ig-inputs" and read.info == {"steps": 5}
    broken = scores.tensor.clone()
    broken[3] = math.nan  # a file of another tool's, say: ranked, NaN would sort as it happens to
    Circuit(graph, [], broken).save(tmp_path / "broken.json")
    for make in (lambda: EdgeScores(graph, broken), lambda: EdgeScores.load(tmp_path / "broken.json")):
        with pytest.raises(ValueError, match=f"1 scores are NaN or infinite, e.g. {re.escape(graph.edges[3])}'s"):
            make()


def _without_scores(form: dict, edges=None, null: bool = False) -> dict:
    """A circuit's JSON form as MIB's submissions of many circuits write it: EAP-IG's, without fxcircuits'
    ``scored`` and the nodes' scores, and without the scores of ``edges`` (all where None): each one's key dropped,
    or null with ``null``."""
    cfg = {k: v for k, v in form["cfg"].items() if k != "scored"}
    unscored = {name: {**edge, "score": None} if null else {"in_graph": edge["in_graph"]}
                for name, edge in form["edges"].items() if edges is None or name in edges}
    return {"cfg": cfg, "nodes": {name: {"in_graph": node["in_graph"]} for name, node in form["nodes"].items()},
            "edges": {**form["edges"], **unscored}}


@pytest.mark.parametrize("null", [False, True])
def test_a_json_file_without_scores_is_an_unscored_circuit(graph, tmp_path, null):
    """Edges without a score (key missing or null) are a circuit without scores, as fxcircuits' own unscored
    circuits read back, not one whose every score is 0: nothing ranks its edges or reads its scores."""
    circuit = EdgeScores(graph, torch.linspace(-1, 1, len(graph.edges)), "eap").topn(6)
    path = tmp_path / "unscored.json"
    path.write_text(json.dumps(_without_scores(circuit.json_form(), null=null)))
    Circuit(graph, circuit.edges).save(tmp_path / "ours.json")
    for read in (Circuit.load(path), Circuit.load(tmp_path / "ours.json")):
        assert read.scores is None and read.edges == circuit.edges and read.node_scores() is None
        with pytest.raises(ValueError, match="no scores to rank its edges by"):
            read.strongest(3)
    with pytest.raises(ValueError, match="unscored.json holds a circuit without scores"):
        EdgeScores.load(path)


def test_a_file_that_does_not_say_whether_it_is_scored_and_scores_every_edge_0_is_unscored(graph, tmp_path):
    """EAP-IG's files carry no ``scored``; one made by hand for it scores every edge 0.0, which no attribution
    does: read as a circuit without scores, so no CPR or CMD is computed from a ranking of ties.  One edge scored
    is enough to read the scores."""
    circuit = Circuit(graph, EdgeScores(graph, torch.linspace(-1, 1, len(graph.edges)), "eap").topn(6).edges)
    form = circuit.json_form()
    del form["cfg"]["scored"]
    path = tmp_path / "by_hand.json"
    path.write_text(json.dumps(form))
    assert Circuit.load(path).scores is None and Circuit.load(path).edges == circuit.edges
    form["edges"][graph.edges[0]]["score"] = 0.5
    path.write_text(json.dumps(form))
    assert Circuit.load(path).scores[0] == 0.5


def test_a_json_file_scoring_some_edges_is_refused(graph, tmp_path):
    form = EdgeScores(graph, torch.linspace(-1, 1, len(graph.edges)), "eap").topn(6).json_form()
    path = tmp_path / "partly.json"
    path.write_text(json.dumps(_without_scores(form, edges=graph.edges[:2])))
    with pytest.raises(ValueError, match=re.escape(f"partly.json: {len(graph.edges) - 2} of its {len(graph.edges)} "
                                                   f"edges carry a score and the others none (e.g. "
                                                   f"{graph.edges[2]!r} does, {graph.edges[0]!r} does not)")):
        Circuit.load(path)
    form["edges"][graph.edges[1]]["score"] = "high"
    path.write_text(json.dumps(form))
    with pytest.raises(ValueError, match=re.escape(f"edge {graph.edges[1]!r} has the score 'high'; a score is a "
                                                   "number")):
        Circuit.load(path)


@pytest.mark.parametrize("parallel", [False, True])
def test_pt_files_lay_out_edges_as_eap_ig_indexes_them(parallel, tmp_path):
    """EAP-IG's [src, dst] matrices: src = 1 + l·(H+1) + h for a head, + H for the MLP; dst = l·(3H+1) + i·H + h
    for input i (q, k, v) of head h, + 3H for the MLP, the last for logits.  Each edge's score and flag lands in its
    cell, nothing else is flagged, and the file reads back."""
    graph = CircuitGraph.from_config({**CFG, "n_layers": 3, "n_heads": 3, "parallel_attn_mlp": parallel})
    scores = EdgeScores(graph, torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0)), "eap")
    circuit = scores.topn(15)
    circuit.save(tmp_path / "circuit.pt", task="ioi")
    data = torch.load(tmp_path / "circuit.pt", weights_only=True)
    heads = 3

    def src(name):
        if name == "input":
            return 0
        layer, head = re.fullmatch(r"[am](\d+)(?:\.h(\d+))?", name).groups()
        return 1 + int(layer) * (heads + 1) + (heads if head is None else int(head))

    def dst(name):
        if name == "logits":
            return data["edges_scores"].shape[1] - 1
        layer, head, role = re.fullmatch(r"[am](\d+)(?:\.h(\d+)<([qkv])>)?", name).groups()
        block = int(layer) * (3 * heads + 1)
        return block + 3 * heads if head is None else block + "qkv".index(role) * heads + int(head)

    flagged = torch.zeros_like(data["edges_in_graph"])
    for name in graph.edges:
        cell = src(name.split("->")[0]), dst(name.split("->")[1])
        assert data["edges_scores"][cell] == scores[name]
        flagged[cell] = name in circuit
    assert torch.equal(flagged, data["edges_in_graph"]) and data["cfg"]["task"] == "ioi"
    assert data["nodes_in_graph"].tolist() == [name in circuit.nodes for name in graph.upstream]
    assert "nodes_scores" not in data  # EAP-IG's node attribution, which an edge circuit has not
    loaded = Circuit.load(tmp_path / "circuit.pt")
    assert loaded.edges == circuit.edges and torch.equal(loaded.scores, scores.tensor) and loaded.info["task"] == "ioi"
    Circuit(graph, circuit.edges).save(tmp_path / "unscored.pth")
    assert Circuit.load(tmp_path / "unscored.pth").scores is None


def test_pt_files_of_another_layout_are_refused(graph, tmp_path):
    """EAP-IG scores every [src, dst] pair, and its node-level circuits flag every pair leaving a kept node, real
    edge or not: those cells are left out.  Other node lists, other shapes or missing keys mean another file."""
    Circuit(graph, graph.edges[:4], torch.ones(len(graph.edges))).save(tmp_path / "c.pt")
    data = torch.load(tmp_path / "c.pt", weights_only=True)
    data["edges_scores"][3, 0], data["edges_in_graph"][3, 0] = 9.0, True  # m0 -> a0.h0<q>: no edge
    torch.save(data, tmp_path / "c.pt")
    loaded = Circuit.load(tmp_path / "c.pt")
    assert loaded.edges == graph.edges[:4] and torch.equal(loaded.scores, torch.ones(len(graph.edges)))
    for change, says in ((lambda d: d["src_nodes"].reverse(), "src_nodes and dst_nodes are not those"),
                         (lambda d: d.update(edges_scores=d["edges_scores"][:, :-1]), r"must be \[src, dst\]"),
                         (lambda d: d.pop("edges_in_graph"), r"lacks \['edges_in_graph'\]")):
        broken = torch.load(tmp_path / "c.pt", weights_only=True)
        change(broken)
        torch.save(broken, tmp_path / "broken.pt")
        with pytest.raises(ValueError, match=says):
            Circuit.load(tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="'c.txt': a circuit file ends in .json or .pt"):
        Circuit(graph, []).save(tmp_path / "c.txt")


def test_neuron_level_circuits_are_refused_whole_nodes_read(graph, tmp_path):
    """EAP-IG's neuron-level circuits keep part of a node, which no edge mask can: refused in both formats, unless
    every kept node keeps all its neurons (then it is an edge circuit); a dropped node's neurons do not matter."""
    circuit = Circuit(graph, ["input->a0.h1<q>", "a0.h1->logits"])
    circuit.save(tmp_path / "c.json")
    circuit.save(tmp_path / "c.pt")
    data, pt = json.loads((tmp_path / "c.json").read_text()), torch.load(tmp_path / "c.pt", weights_only=True)
    pt["neurons_in_graph"] = torch.ones(len(graph.upstream), 8, dtype=torch.bool)
    pt["neurons_in_graph"][graph.node_index["m1"], 3] = False  # m1 is not in the circuit
    for name, node in data["nodes"].items():
        node["neurons"] = [name != "m1" or i != 3 for i in range(8)]
    for keep_part in (False, True):
        if keep_part:
            pt["neurons_in_graph"][graph.node_index["a0.h1"], 5] = False
            data["nodes"]["a0.h1"]["neurons"][5] = False
        (tmp_path / "n.json").write_text(json.dumps(data))
        torch.save(pt, tmp_path / "n.pt")
        for path in (tmp_path / "n.json", tmp_path / "n.pt"):
            if keep_part:
                with pytest.raises(ValueError, match="part of the neurons of 1 node.*a0.h1"):
                    Circuit.load(path)
            else:
                assert Circuit.load(path).edges == circuit.edges


def test_bad_files_and_names(graph, tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"cfg": CFG, "edges": {}}))
    with pytest.raises(ValueError, match="lacks"):
        Circuit.from_json(path)
    path.write_text(json.dumps({"cfg": CFG, "nodes": {}, "edges": {"a7.h0->logits": {"score": 1, "in_graph": True}}}))
    with pytest.raises(ValueError, match="a7.h0->logits"):
        Circuit.from_json(path)
    path.write_text('{"cfg": ')
    for load in (Circuit.load, fxcircuits.SpanCircuit.load, fxcircuits.positional.load_circuit):
        with pytest.raises(ValueError, match=r"bad.json is not a circuit file: it is not JSON \(Expecting value"):
            load(path)
    good = Circuit(graph, graph.edges[:3]).json_form()
    for broken, says in (({"cfg": []}, "its cfg is a list, not an object of n_layers, n_heads"),
                         ({"cfg": {**CFG, "n_layers": "two"}}, "its cfg's n_layers is 'two'; a circuit file's cfg"),
                         ({"cfg": {k: v for k, v in CFG.items() if k != "n_heads"}}, "its cfg's n_heads is None"),
                         ({"cfg": {**CFG, "writers": [[1]]}}, "its cfg's writers describe no graph"),
                         ({"edges": None}, "its edges are not an object of edge names"),
                         ({"edges": {name: {"score": 0, "in_graph": "yes"} for name in good["edges"]}},
                          "edge 'input->a0.h0<q>' has no in_graph flag")):
        path.write_text(json.dumps({**good, **broken}))
        with pytest.raises(ValueError, match=re.escape(says)):
            Circuit.load(path)
    for text in ("hi\n", json.dumps(good)):  # no torch.save file, whatever the unpickler makes of its bytes
        (tmp_path / "bad.pt").write_text(text)
        with pytest.raises(ValueError, match="bad.pt is not a circuit file: torch.load cannot read it as torch.save"):
            Circuit.load(tmp_path / "bad.pt")
    with pytest.raises(KeyError, match="not in this model's graph"):
        Circuit(graph, ["a0.h0->a0.h1<q>"])
    with pytest.raises(TypeError, match=r"edges are a list of names, not one string: \['input->logits'\]"):
        Circuit(graph, "input->logits")
    with pytest.raises(ValueError, match="asked for"):
        EdgeScores(graph, torch.zeros(len(graph.edges))).topn(len(graph.edges) + 1)
    with pytest.raises(ValueError, match="1.5 is no fraction of the edges.*pass an int"):
        EdgeScores(graph, torch.zeros(len(graph.edges))).greedy(1.5)


def test_topn_nodes_keeps_every_edge_among_the_best_nodes(graph):
    """Node scores sum outgoing edges; the best n nodes keep every edge among them and into logits, unpruned (a
    kept node fed by no kept node stays, as in EAP-IG's node-level cut); a float is a fraction of the nodes."""
    scores = _scores(graph, {"input->m1": 3.0, "a0.h1->logits": -2.5, "m0->logits": 0.5, "a1.h0->logits": -0.1,
                             "a0.h0->m1": 0.2, "m1->logits": 1.0})
    # node scores: input 3, a0.h1 −2.5, m1 1, m0 0.5, a0.h0 0.2, a1.h0 −0.1
    kept = {"input", "a0.h1", "m1"}
    expected = [e for e in graph.edges if e.split("->")[0] in kept
                and re.sub(r"<.>$", "", e.split("->")[1]) in kept | {"logits"}]
    assert scores.topn_nodes(3).edges == expected and scores.topn_nodes(3).nodes == ["input", "a0.h1", "m1", "logits"]
    assert set(scores.topn_nodes(3, absolute=False).nodes) == {"input", "m1", "m0", "logits"}
    assert _scores(graph, {"m1->logits": 5.0}).topn_nodes(1).edges == ["m1->logits"]  # m1 alone, fed by no kept node
    assert scores.topn_nodes(0.5).edges == scores.topn_nodes(3).edges  # half of 7 upstream nodes
    with pytest.raises(ValueError, match="asked for 8 nodes of 7"):
        scores.topn_nodes(8)


def test_a_node_circuit_runs_as_node_patching(traced):
    """Running a node-level circuit patches every other node on all its edges: the logits of node patching, with
    the corrupted prompt's values and with zeros, also where a kept node is fed by no kept node."""
    _, cm = traced("llama")
    g = torch.Generator().manual_seed(0)
    clean, corrupted = torch.randint(0, 128, (2, 6), generator=g), torch.randint(0, 128, (2, 6), generator=g)
    scores = EdgeScores(cm.graph, torch.randn(len(cm.graph.edges), generator=g))
    for n in (5, 1):
        circuit = scores.topn_nodes(n)
        dropped = {node: 0.0 for node in cm.graph.upstream if node not in circuit.nodes}
        assert 0 < len(dropped) < len(cm.graph.upstream)
        for other in ({"corrupted_input_ids": corrupted},
                      {"corrupted_activations": torch.zeros_like(cm.activations(clean))}):
            torch.testing.assert_close(cm(clean, edge_mask=circuit, **other), cm(clean, node_mask=dropped, **other),
                                       atol=1e-5, rtol=1e-5)


def test_strongest_keeps_a_circuits_edges_of_largest_abs_score(graph):
    """Of the circuit's own edges only (an edge outside it scores higher here), the n of largest |score|."""
    scores = _scores(graph, {"input->a0.h0<q>": 5.0, "a0.h0->logits": -4.0, "input->m1": 3.0, "m1->logits": 0.5,
                             "input->logits": 9.0})
    circuit = Circuit(graph, ["input->a0.h0<q>", "a0.h0->logits", "input->m1", "m1->logits"], scores.tensor)
    assert circuit.strongest(3).edges == ["input->a0.h0<q>", "input->m1", "a0.h0->logits"]
    assert circuit.strongest(3).pruned().edges == ["input->a0.h0<q>", "a0.h0->logits"]  # m1 feeds nothing now
    assert circuit.strongest(10).edges == circuit.edges
    assert circuit.strongest(0.5).edges == ["input->a0.h0<q>", "a0.h0->logits"]  # a share of its own 4 edges
    assert circuit.strongest(0.6).edges == circuit.strongest(2).edges  # int(0.6 · 4), as every cut by size rounds
    assert circuit.strongest(1.0).edges == circuit.edges
    assert circuit.strongest(torch.tensor(1000)).edges == circuit.edges  # a one-element tensor reads as its number
    with pytest.raises(ValueError, match="no scores to rank"):
        Circuit(graph, circuit.edges).strongest(2)
    for bad, error, message in ((-1, ValueError, "asked for -1 edges of 4"),  # -1 would slice off the weakest edge
                                (2.5, ValueError, "2.5 is no fraction of the edges"),
                                (True, TypeError, "True is neither a count of edges")):
        with pytest.raises(error, match=message):
            circuit.strongest(bad)


def test_a_float_is_a_fraction_and_one_is_every_edge(graph):
    """MIB's fractions, 1.0 among them, keep int(p·E) edges; an int is a count, 1 one edge."""
    scores = _scores(graph, {"input->logits": 1.0})
    assert len(scores.topn(1.0)) == len(graph.edges) == len(scores.greedy(1.0))
    assert scores.topn(1).edges == ["input->logits"]
    assert len(scores.topn(0.0)) == 0


@pytest.mark.parametrize("half", [torch.tensor(0.5), np.float32(0.5), np.float64(0.5)])
def test_fractions_and_counts_of_numpy_and_torch_are_read_as_python_s(graph, half):
    """A fraction as a tensor or numpy number keeps that share (``int()`` would make it 0 edges); numpy's and
    one-element tensors' integers are counts; what is no number is refused."""
    scores = EdgeScores(graph, torch.linspace(0.1, 1, len(graph.edges)))
    assert scores.topn(half).edges == scores.topn(0.5).edges != []
    assert scores.topn_nodes(half).edges == scores.topn_nodes(0.5).edges
    assert scores.topn(np.int64(3)).edges == scores.topn(torch.tensor(3)).edges == scores.topn(3).edges
    for bad in ("10%", True, [3]):
        with pytest.raises(TypeError, match="is neither a count of edges .* nor a fraction of them"):
            scores.topn(bad)


def test_a_circuit_runs_as_an_edge_mask(traced):
    _, cm = traced("llama")
    scores = EdgeScores(cm.graph, torch.linspace(-1, 1, len(cm.graph.edges)))
    circuit = scores.topn(20)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    corrupted = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(cm(ids, corrupted_input_ids=corrupted, edge_mask=circuit),
                               cm(ids, corrupted_input_ids=corrupted, edge_mask=circuit.in_graph.float()))
    assert fxcircuits.Circuit(CircuitGraph.from_config(cm.graph.cfg), circuit.edges).edge_mask(cm.graph).sum() == len(circuit)


def test_a_circuit_in_networkx_holds_its_edges_and_their_scores(graph):
    """One networkx edge per circuit edge, scored; q/k/v inputs linked to their heads; and, the circuit being
    pruned, every node on a path from input to logits."""
    scores = _scores(graph, {"input->a0.h1<k>": 3.0, "a0.h1->a1.h0<v>": -2.0, "a1.h0->logits": 1.5,
                             "input->m0": 1.0, "m0->logits": 0.5, "a0.h0->m1": 4.0})
    circuit = scores.topn(6)
    assert "a0.h0->m1" not in circuit.edges  # a0.h0 has no input: pruned
    g = circuit.to_networkx()
    named = {data["name"]: data["score"] for *_, data in g.edges(data=True) if data["name"] is not None}
    assert named == {e: scores[e] for e in circuit.edges}
    assert set(g.nodes) == set(circuit.nodes) | {"a0.h1<k>", "a1.h0<v>"}
    assert set(g.successors("a0.h1<k>")) == {"a0.h1"} and g.nodes["a1.h0<v>"]["kind"] == "input"
    assert nx.descendants(g, "input") | {"input"} == set(g.nodes) == nx.ancestors(g, "logits") | {"logits"}
    assert len(list(nx.all_simple_paths(g, "input", "logits"))) == 2
    unscored = Circuit(graph, circuit.edges).to_networkx()
    assert all("score" not in data for *_, data in unscored.edges(data=True))


def test_circuits_combine_as_sets_of_edge_names(graph, tmp_path):
    """&, | and - agree with Python's sets of edge names, also against a circuit read back from a file (a graph
    of its own); the scores stay only where both circuits carry the same ones."""
    scores = EdgeScores(graph, torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0)))
    big, small = scores.topn(20), scores.topn(6)
    other = Circuit(graph, graph.edges[::3])
    other.to_json(tmp_path / "other.json")
    read = Circuit.from_json(tmp_path / "other.json")
    for mine, theirs in ((big, other), (big, read), (small, big), (other, small)):
        for combined, expected in ((mine & theirs, set(mine.edges) & set(theirs.edges)),
                                   (mine | theirs, set(mine.edges) | set(theirs.edges)),
                                   (mine - theirs, set(mine.edges) - set(theirs.edges))):
            assert set(combined.edges) == expected and combined.graph is mine.graph
    assert torch.equal((big | small).scores, scores.tensor) and (big & other).scores is None


def test_overlap_counts_shared_edges_and_nodes(graph):
    one = Circuit(graph, ["input->a0.h1<q>", "a0.h1->m0", "m0->logits"])
    two = Circuit(graph, ["input->a0.h1<k>", "a0.h1->m0", "input->m1", "m1->logits"])
    # edges: 1 shared of 6; nodes (heads and MLPs): {a0.h1, m0} and {a0.h1, m0, m1}
    assert one.overlap(two) == {"shared_edges": 1, "edge_iou": 1 / 6, "shared_nodes": 2, "node_iou": 2 / 3}
    apart = Circuit(graph, ["input->a0.h0<q>", "a0.h0->logits"]), Circuit(graph, ["input->m1", "m1->logits"])
    assert apart[0].overlap(apart[1])["node_iou"] == 0.0  # input and logits, in both, are no shared component
    assert one.overlap(one)["edge_iou"] == 1.0 and one.overlap(Circuit(graph, []))["edge_iou"] == 0.0
    assert Circuit(graph, []).overlap(Circuit(graph, [])) == {"shared_edges": 0, "edge_iou": 1.0,
                                                            "shared_nodes": 0, "node_iou": 1.0}


def test_circuits_of_different_graphs_do_not_combine(graph):
    deeper = CircuitGraph.from_config({**CFG, "n_layers": 3})
    for edges in (["a2.h0->logits"], ["m1->logits"]):  # m1->logits names another edge in the deeper graph
        with pytest.raises(ValueError, match=r"different graphs \(\d+ and \d+ edges; first difference"):
            Circuit(graph, graph.edges[:5]) | Circuit(deeper, edges)
    with pytest.raises(TypeError):
        Circuit(graph, graph.edges[:5]) & set(graph.edges[:5])


def test_a_circuit_of_another_graph_is_refused_where_it_would_run(traced):
    """A circuit of a 2-layer Llama run on a 3-layer one would patch every edge into layer 2: refused, where a
    circuit read back from its file (a graph of its own with the same edges) runs as the circuit itself."""
    _, cm = traced("llama")
    deeper = fxcircuits.trace(zoo.make("llama", num_hidden_layers=3))
    circuit = EdgeScores(cm.graph, torch.linspace(-1, 1, len(cm.graph.edges))).topn(20)
    for either in (circuit, fxcircuits.SpanCircuit(cm.graph, ["A", "rest"], {"A": circuit.edges})):
        with pytest.raises(ValueError, match=r"another graph than the model's \(110 and 262 edges; first difference"):
            either.edge_mask(deeper.graph)
    batch = {"clean": torch.zeros(1, 4, dtype=torch.long), "corrupted": torch.ones(1, 4, dtype=torch.long),
             "correct": torch.tensor([[2]]), "incorrect": torch.tensor([[3]])}
    for read in (lambda: fxcircuits.logit_lens(deeper, batch["clean"], nodes=circuit),  # nodes and inputs alike
                 lambda: fxcircuits.patch_nodes(deeper, batch, "logit_diff", receivers=circuit)):
        with pytest.raises(ValueError, match="another graph than the model's"):
            read()
    read_back = Circuit(CircuitGraph.from_config(json.loads(json.dumps(cm.graph.cfg))), circuit.edges)
    assert torch.equal(read_back.edge_mask(cm.graph), circuit.in_graph.float())


def test_edge_flags_are_bool_or_zero_and_one(graph):
    flags = torch.zeros(len(graph.edges))
    flags[:3] = 1
    assert Circuit(graph, flags).edges == graph.edges[:3]
    with pytest.raises(ValueError, match="edge flags are bool, or 0 and 1: other values .* say no edge is in or out"):
        Circuit(graph, flags * 0.5)


@pytest.mark.parametrize("suffix", [".json", ".pt"])
def test_info_saves_as_plain_values_or_is_refused_by_name(graph, tmp_path, suffix):
    """numpy's and torch's numbers and arrays are saved as Python's, and load back (a .pt file's weights_only
    load refuses anything else); what no circuit file holds is refused when saving, naming it."""
    circuit = Circuit(graph, graph.edges[:3])
    path = tmp_path / f"c{suffix}"
    circuit.save(path, faithfulness=np.float32(0.5), sizes=torch.tensor([1, 2]), step=np.int64(3))
    assert {k: Circuit.load(path).info[k] for k in ("faithfulness", "sizes", "step")} == \
        {"faithfulness": 0.5, "sizes": [1, 2], "step": 3}
    with pytest.raises(TypeError, match="the circuit's info 'metric' is a function, which a circuit file cannot"):
        circuit.save(path, metric=lambda logits, batch: logits)
