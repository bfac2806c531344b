"""MIB submissions: the folders the leaderboard reads, their files, and what it would skip."""
import json

import pytest
import torch

from fxcircuits import Circuit, CircuitGraph, EdgeScores, SpanScores
from fxcircuits.evaluation import MIB_FRACTIONS
from fxcircuits.submission import folder_name, model_name, save_submission, submission_notes, task_name

# GPT-2's shape with a small d_model: 32,491 edges, so that MIB's smallest share, 0.1%, is 32 of them
CFG = {"n_layers": 12, "n_heads": 12, "parallel_attn_mlp": False, "d_model": 8}
# the keys MIB's loader (MIB_circuit_track.circuit_loading.load_graph_from_pt) asserts
MIB_PT_KEYS = {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph"}


@pytest.fixture(scope="module")
def graph():
    return CircuitGraph.from_config(CFG)


def _scores(graph, method="eap", seed=0, **info):
    """Scores that favour the edges out of ``input`` and into ``logits``, so that each cut keeps some of them joined
    (``input->logits`` at least) and pruning leaves a circuit at MIB's smallest share too."""
    generator = torch.Generator().manual_seed(seed)
    ends = [(e.startswith("input->")) + e.endswith("->logits") for e in graph.edges]
    values = torch.randn(len(graph.edges), generator=generator, dtype=torch.float64) + 3 * torch.tensor(ends)
    return EdgeScores(graph, values, method, {"task": "ioi", "model": "openai-community/gpt2", **info})


@pytest.mark.parametrize("format", ["pt", "json"])
def test_importances_hold_every_score_in_the_one_file_of_the_folder(graph, tmp_path, format):
    scores = _scores(graph)
    folder = save_submission(scores, tmp_path, format=format)
    assert folder == tmp_path / "ioi_gpt2"
    assert [p.name for p in folder.iterdir()] == [f"importances.{format}"]
    path = folder / f"importances.{format}"
    assert torch.equal(EdgeScores.load(path).tensor, scores.tensor)
    if format == "pt":
        saved = torch.load(path)
        assert MIB_PT_KEYS <= saved.keys()
        assert not saved["edges_in_graph"].any()  # MIB cuts the circuits itself
        assert float(saved["edges_scores"].abs().sum()) == pytest.approx(float(scores.tensor.abs().sum()))
    else:
        saved = json.loads(path.read_text())
        assert len(saved["edges"]) == len(graph.edges)
        assert saved["edges"]["a11.h0->logits"]["score"] == scores["a11.h0->logits"]
    assert {"n_layers", "n_heads", "parallel_attn_mlp", "d_model"} <= saved["cfg"].keys()


@pytest.mark.parametrize("absolute", [True, False])
def test_circuits_are_the_top_edges_at_each_of_mibs_shares_pruned(graph, tmp_path, absolute):
    """Nine circuits, each the int(p·E) best edges (by |score|, or signed), pruned: within MIB's bound, and nested."""
    scores = _scores(graph)
    folder = save_submission(scores, tmp_path, form="circuits", absolute=absolute)
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        ["edges_0.1pct.pt", "edges_0.2pct.pt", "edges_0.5pct.pt", "edges_1pct.pt", "edges_2pct.pt", "edges_5pct.pt",
         "edges_10pct.pt", "edges_20pct.pt", "edges_50pct.pt"])
    ranking = scores.tensor.abs() if absolute else scores.tensor
    before = set()
    for fraction in MIB_FRACTIONS[:-1]:
        circuit = Circuit.load(folder / f"edges_{100 * fraction:g}pct.pt")
        best = torch.argsort(ranking, descending=True)[:int(fraction * len(graph.edges))]
        expected = Circuit(graph, [graph.edges[i] for i in best.tolist()]).pruned()
        assert circuit.edges == expected.edges and len(circuit) > 0
        assert len(circuit) <= fraction * len(graph.edges)
        assert before <= set(circuit.edges)
        before = set(circuit.edges)
        assert torch.equal(circuit.scores, scores.tensor)  # MIB's loaders read a score on every edge
        assert circuit.info["selection"] == "topn" and circuit.info["absolute"] == absolute
        assert circuit.info["fraction"] == fraction


def test_circuits_of_information_flow_routes_are_cut_greedily_as_mib_cuts_them(graph, tmp_path):
    scores = _scores(graph, method="information-flow-routes")
    folder = save_submission(scores, tmp_path, form="circuits", format="json")
    for fraction in (0.001, 0.05):
        circuit = Circuit.load(folder / f"edges_{100 * fraction:g}pct.json")
        assert circuit.edges == scores.greedy(fraction).edges and circuit.info["selection"] == "greedy"
    topn = save_submission(scores, tmp_path / "topn", form="circuits", selection="topn")
    assert Circuit.load(topn / "edges_1pct.pt").edges == scores.topn(0.01).edges


def test_names_are_mibs_short_ones(graph):
    assert [model_name(m) for m in ("Qwen/Qwen2.5-0.5B", "/models/qwen2.5-0.5b", "google/gemma-2-2b",
                                    "meta-llama/Llama-3.1-8B", "gpt2", "openai-community/gpt2", "gpt2-small",
                                    "interpbench", "/somewhere/My_Model")] == [
        "qwen2.5", "qwen2.5", "gemma2", "llama3", "gpt2", "gpt2", "gpt2", "interpbench", "my-model"]
    assert task_name("arc_easy") == "arc-easy" and task_name("IOI") == "ioi"
    assert folder_name("arithmetic_addition", "meta-llama/Llama-3.1-8B") == "arithmetic-addition_llama3"


def test_given_names_override_the_recorded_ones(graph, tmp_path):
    folder = save_submission(_scores(graph), tmp_path, task="mcqa", model="qwen2.5")
    assert folder.name == "mcqa_qwen2.5"


def test_a_folder_is_written_again_but_never_beside_other_files(graph, tmp_path):
    save_submission(_scores(graph), tmp_path)
    folder = save_submission(_scores(graph, seed=1), tmp_path)  # the same file, overwritten
    assert torch.equal(EdgeScores.load(folder / "importances.pt").tensor, _scores(graph, seed=1).tensor)
    with pytest.raises(ValueError, match="ioi_gpt2 already holds importances.pt, and the leaderboard reads every "
                                         "file in a task's folder"):
        save_submission(_scores(graph), tmp_path, form="circuits")
    (tmp_path / "other" / "ioi_gpt2").mkdir(parents=True)
    (tmp_path / "other" / "ioi_gpt2" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="already holds notes.txt"):
        save_submission(_scores(graph), tmp_path / "other")


def test_what_it_cannot_write_is_refused(graph, tmp_path):
    bare = EdgeScores(graph, torch.randn(len(graph.edges)), "eap")
    with pytest.raises(ValueError, match=r"do not record their task, .*name it \(task=…, or --task; MIB's: ioi, "
                                         "mcqa"):
        save_submission(bare, tmp_path)
    with pytest.raises(ValueError, match="selection and absolute are for form='circuits'"):
        save_submission(_scores(graph), tmp_path, selection="greedy")
    with pytest.raises(ValueError, match="unknown form 'nine'; choose one of importances, circuits"):
        save_submission(_scores(graph), tmp_path, form="nine")
    with pytest.raises(ValueError, match="unknown format 'csv'; choose one of pt, json"):
        save_submission(_scores(graph), tmp_path, format="csv")
    by_span = SpanScores(graph, ["IO", "rest"], torch.randn(2, len(graph.edges)), "eap")
    with pytest.raises(TypeError, match="a MIB submission holds edge scores .* not a SpanScores"):
        save_submission(by_span, tmp_path, task="ioi", model="gpt2")
    with pytest.raises(ValueError, match="no selection 'nodes' by size"):
        save_submission(_scores(graph), tmp_path / "n", form="circuits", selection="nodes")
    assert not list(tmp_path.iterdir())  # nothing written by a refusal


def test_notes_say_what_the_leaderboard_would_skip_or_refuse(graph, tmp_path):
    save_submission(_scores(graph), tmp_path)
    assert submission_notes(tmp_path) == ["MIB takes submissions for two tasks at least; this one has 1 (ioi)",
                                          "MIB takes submissions for two models at least; this one has 1 (gpt2)"]
    save_submission(_scores(graph), tmp_path, task="mcqa", model="Qwen/Qwen2.5-0.5B")
    assert submission_notes(tmp_path) == []
    save_submission(_scores(graph), tmp_path, model="smollm2-135m")
    (tmp_path / "ioi_llama3").mkdir()
    notes = submission_notes(tmp_path)
    assert notes[0] == "ioi_llama3: holds no circuit file (.pt or .json)"
    assert notes[1] == "ioi_smollm2-135m: the leaderboard evaluates no ioi on smollm2-135m and skips it"
    assert notes[2].startswith("the leaderboard evaluates ioi on gpt2, qwen2.5, gemma2, llama3, interpbench; mcqa on")
    assert len(notes) == 3
