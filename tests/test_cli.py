"""The command line end to end on a tiny random model saved as a local folder."""
import argparse
import json
import re
import shlex
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from fxcircuits import (Ablation, Circuit, CircuitGraph, DecompositionError, EdgeScores, Evaluator, SpanCircuit,
                        attention_patterns, attribute, attribute_by_span, cli, load_model, mean_ablation,
                        patch_by_position, optimal_ablation, patch_inputs, patch_nodes, source_logits, tasks, trace)
from fxcircuits.cli import main
from fxcircuits.draw import plot_faithfulness, plot_nodes
from fxcircuits.evaluation import MIB_FRACTIONS
from fxcircuits.runs import Calls


@pytest.fixture
def folder(tiny_folder):
    return str(tiny_folder)


def _common(folder):
    return ["--model", folder, "--task", "ioi", "--size", "8", "--batch-size", "4", "--no-progress"]


@pytest.mark.parametrize("command", ["discover", "evaluate", "show", "compare", "submit", "lens", "direct",
                                     "attention", "patch", "check"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0 and "usage: fxcircuits " + command in capsys.readouterr().out


def test_discover_evaluate_show_lens(folder, tmp_path, capsys):
    out = tmp_path / "circuit.json"
    assert main(["discover", *_common(folder), "--method", "eap", "--edges", "10%", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for key in ("model", "task", "baseline metric", "circuit", "faithfulness", "time"):
        assert key in printed
    data = json.loads(out.read_text())
    assert data["cfg"]["method"] == "eap" and data["cfg"]["task"] == "ioi" and data["cfg"]["n_layers"] == 2
    circuit = Circuit.from_json(out)
    assert 0 < len(circuit) <= 0.1 * len(circuit.graph.edges)
    f = float(next(line for line in printed.splitlines() if line.startswith("faithfulness")).split()[-1])
    assert f == pytest.approx(data["cfg"]["faithfulness"], abs=1e-3)
    ET.parse(out.with_suffix(".svg"))  # the drawing is valid SVG

    assert main(["evaluate", str(out), *_common(folder), "--plot", str(tmp_path / "curve.png")]) == 0
    printed = capsys.readouterr().out
    assert f"{f:.3f}" in printed and "CPR" in printed and "CMD" in printed
    assert (tmp_path / "curve.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="--plot is for the faithfulness curve of the circuit's scores, and .* holds "
                                         "none"):
        main(["evaluate", str(_unscored(circuit, tmp_path)), *_common(folder), "--plot", str(tmp_path / "c.png")])

    assert main(["show", str(out), "--out", str(tmp_path / "again.png")]) == 0
    assert (tmp_path / "again.png").exists()
    assert main(["show", str(out), "--edges", "5", "--out", str(tmp_path / "core.svg")]) == 0
    core = circuit.strongest(5).pruned()
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{len(core)} edges, {len(core.nodes)} nodes → ")
    assert len(core) <= 5
    assert set(core.edges) == set(circuit.edges) & {e.get("id") for e in ET.parse(tmp_path / "core.svg").iter()}
    assert main(["show", str(out), "--edges", "50%", "--out", str(tmp_path / "half.svg")]) == 0  # of its own edges
    half = circuit.strongest(len(circuit) // 2).pruned()
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"{len(half)} edges, {len(half.nodes)} nodes → ")
    with pytest.raises(SystemExit, match=f"the 0 strongest of the circuit's {len(circuit)} edges keep no edge once "
                                         "pruned"):  # a share that keeps none draws nothing
        main(["show", str(out), "--edges", "0.1%", "--out", str(tmp_path / "none.svg")])

    assert main(["lens", *_common(folder), "--out", str(tmp_path / "lens.svg")]) == 0
    printed = capsys.readouterr().out
    assert "input" in printed and "m1" in printed and "p(correct answer)" in printed
    ET.parse(tmp_path / "lens.svg")

    assert main(["lens", str(out), *_common(folder)]) == 0  # the circuit's nodes, explained
    _, correct, push = capsys.readouterr().out.split("mean over examples 0 to 3 (the batch of example 0):\n")
    correct = correct.split("\n\n")[0].split()
    assert correct[::2] == push.split()[::2] == [n for n in circuit.nodes if n != "logits"]
    assert all(0 <= float(p) <= 1 for p in correct[1::2]) and all(-1 <= float(p) <= 1 for p in push.split()[1::2])
    with pytest.raises(SystemExit, match="not both"):
        main(["lens", str(out), *_common(folder), "--nodes", "m0"])


def test_lens_labels_its_heatmap_with_the_tasks_examples(folder, tmp_path, capsys, monkeypatch):
    """The lens reads the batch that holds --example: its heatmap's columns are that batch's examples as the task
    numbers them (4 to 7 for example 6 in batches of 4), not 0 to 3, and the means say which examples they are."""
    drawn = {}
    monkeypatch.setattr(cli, "plot_heatmap", lambda values, rows, columns, path, **kw: drawn.update(columns=columns))
    assert main(["lens", *_common(folder), "--example", "6", "--out", str(tmp_path / "lens.svg")]) == 0
    assert drawn["columns"] == ["4", "5", "6", "7"]
    assert capsys.readouterr().out.count("mean over examples 4 to 7 (the batch of example 6):") == 2


def test_evaluate_plots_each_curve_at_the_fraction_of_edges_its_circuits_keep(folder, tmp_path, monkeypatch):
    """The curve's x axis says "fraction of edges in the circuit": each point is at the edges its circuit keeps
    after pruning over the graph's edges, not at the fraction asked for; a circuit pruned to nothing is left out
    of the log axis."""
    graph = trace(load_model(folder)[0]).graph
    scores = EdgeScores(graph, torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0)))
    scores.topn(0.1).to_json(tmp_path / "c.json", method="eap", task="ioi")
    drawn = []
    monkeypatch.setattr(cli, "plot_faithfulness", lambda sizes, faithfulness, path=None, **kw: drawn.append(
        (list(sizes), kw["label"])) or plot_faithfulness(sizes, faithfulness, path, **kw))
    assert main(["evaluate", str(tmp_path / "c.json"), *_common(folder), "--plot", str(tmp_path / "c.png")]) == 0
    for (sizes, label), absolute in zip(drawn, (True, False)):
        kept = [len(scores.topn(p, absolute)) / len(graph.edges) for p in MIB_FRACTIONS]
        assert label == ("|score|" if absolute else "signed score") and sizes == [k for k in kept if k > 0]
        assert sizes != list(MIB_FRACTIONS)  # pruning and rounding moved them from the fractions asked for
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_cuts_the_curve_as_asked(folder, tmp_path, capsys):
    """--selection greedy or nodes draws MIB's apply_greedy or node-level curve: the points are the faithfulness of
    the circuits ``Evaluator.curve`` cuts so; a file without scores has no curve to cut, and says so."""
    model = load_model(folder)[0]
    graph = trace(model).graph
    scores = EdgeScores(graph, torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0)))
    circuit = scores.topn(0.1)
    circuit.to_json(tmp_path / "c.json", method="eap", task="ioi")
    assert main(["evaluate", str(tmp_path / "c.json"), *_common(folder), "--selection", "nodes"]) == 0
    printed = re.search(r"curve \(nodes\)\s+(.*)\n", capsys.readouterr().out).group(1)
    shares = [float(point.split(":")[0]) for point in printed.split()]
    assert shares == list(MIB_FRACTIONS)
    with pytest.raises(SystemExit, match="--selection is for the faithfulness curve .* holds none"):
        main(["evaluate", str(_unscored(circuit, tmp_path)), *_common(folder), "--selection", "greedy"])


def test_a_circuit_runs_on_the_model_it_was_found_on(folder, tmp_path, capsys, monkeypatch):
    """Without --model, evaluate (as lens, direct, patch) loads the model the circuit file names — a folder by its
    absolute path, so the file may be read from anywhere — not SmolLM2, whose graph it would not fit."""
    monkeypatch.chdir(Path(folder).parent)
    options = ["--task", "ioi", "--size", "8", "--batch-size", "4", "--no-progress"]
    out = tmp_path / "c.json"
    assert main(["discover", "--model", Path(folder).name, *options, "--method", "eap", "--edges", "20%",
                 "--out", str(out)]) == 0
    assert json.loads(out.read_text())["cfg"]["model"] == str(Path(folder).resolve())
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["evaluate", str(out), *options]) == 0
    assert re.search(rf"model\s+{re.escape(str(Path(folder).resolve()))}\n", capsys.readouterr().out)


def _unscored(circuit: Circuit, tmp_path) -> Path:
    path = tmp_path / "unscored.json"
    Circuit(circuit.graph, circuit.in_graph, None, circuit.info).save(path)
    return path


def test_evaluate_runs_a_circuit_on_the_task_it_was_found_on(folder, tmp_path, capsys):
    """Without --task, a circuit is evaluated on its own task, with its metric, and says so; on another task it runs
    with that task's metric and the row names both tasks."""
    out = tmp_path / "sva.json"
    options = ["--model", folder, "--size", "8", "--batch-size", "4", "--no-progress"]
    assert main(["discover", *options, "--task", "sva", "--method", "eap", "--edges", "20%", "--out", str(out)]) == 0
    found = float(re.search(r"faithfulness\s+(\S+)", capsys.readouterr().out).group(1))
    assert main(["evaluate", str(out), *options]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"task\s+sva \(8 examples\)\n", printed) and re.search(r"metric\s+prob_diff,", printed)
    assert float(re.search(r"faithfulness\s+(\S+)", printed).group(1)) == pytest.approx(found, abs=1e-3)
    assert main(["evaluate", str(out), *options, "--task", "ioi"]) == 0
    printed = capsys.readouterr().out
    assert "ioi (8 examples); the circuit was found on sva" in printed and re.search(r"metric\s+logit_diff,", printed)
    Circuit.load(out).save(tmp_path / "mine.json", task="mine")  # a task file's stem, as older files record it
    with pytest.raises(SystemExit, match="found on the task file 'mine', not a built-in task: give that file"):
        main(["evaluate", str(tmp_path / "mine.json"), *options])


def test_a_circuit_found_on_a_task_file_is_not_run_on_the_built_in_task_of_its_name(folder, tmp_path, capsys):
    """A task file named ``ioi.jsonl`` is recorded by its path: evaluating its circuit asks for the file again,
    rather than running the built-in IOI (32 other prompts) under the same name."""
    task = tmp_path / "ioi.jsonl"
    task.write_text(json.dumps({"clean": "When Mary and John went to the store, John gave a drink to",
                                "corrupted": "When Mary and John went to the store, Paul gave a drink to",
                                "correct": " Mary", "incorrect": " John"}) + "\n")
    out = tmp_path / "mine.json"
    options = ["--model", folder, "--no-progress"]
    assert main(["discover", *options, "--task", str(task), "--method", "eap", "--edges", "20%", "--out",
                 str(out)]) == 0
    found = float(re.search(r"faithfulness\s+(\S+)", capsys.readouterr().out).group(1))
    assert Circuit.load(out).info["task_file"] == str(task.resolve())
    with pytest.raises(SystemExit, match=f"found on the task file {re.escape(repr(str(task.resolve())))}"):
        main(["evaluate", str(out), *options])
    assert main(["evaluate", str(out), *options, "--task", str(task)]) == 0
    printed = capsys.readouterr().out
    assert re.search(r"task\s+ioi \(1 examples\)\n", printed)  # the circuit's own task: no note
    assert float(re.search(r"faithfulness\s+(\S+)", printed).group(1)) == pytest.approx(found, abs=1e-3)
    assert main(["evaluate", str(out), *options, "--task", "ioi", "--size", "4"]) == 0
    assert f"; the circuit was found on {task.resolve()}" in capsys.readouterr().out


def test_positional_mean_ablation_serves_a_task_of_one_template(folder, tmp_path, capsys):
    """``--ablation mean-positional`` averages each position over the task's clean prompts, all of one length:
    discover and evaluate patch with it, and the file records it; a task of several lengths is refused."""
    template = "When {} and John went to the store, John gave a drink to"
    task = tmp_path / "one.jsonl"
    task.write_text("".join(json.dumps({"clean": template.format(name), "corrupted": template.format(name).replace(
        "John gave", "Paul gave"), "correct": f" {name}", "incorrect": " John"}) + "\n" for name in ("Mary", "Anna")))
    out = tmp_path / "circuit.json"
    options = ["--model", folder, "--task", str(task), "--no-progress", "--ablation", "mean-positional"]
    assert main(["discover", *options, "--method", "eap", "--edges", "20%", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patched edges carry their mean at each position over the task" in printed
    found = float(re.search(r"faithfulness\s+(\S+)", printed).group(1))
    assert Circuit.load(out).info["ablation"] == "mean-positional"
    model, tokenizer = load_model(folder)
    cm, loaded = trace(model), tasks.from_file(task, tokenizer)
    means = mean_ablation(cm, loaded.batches, positional=True)
    scores = attribute(cm, loaded.batches, loaded.metric, "eap", ablation=means, progress=False)
    assert Circuit.load(out).edges == scores.topn(0.2).edges
    assert main(["evaluate", str(out), "--model", folder, "--task", str(task), "--no-progress"]) == 0
    assert float(re.search(r"faithfulness\s+(\S+)", capsys.readouterr().out).group(1)) == pytest.approx(found,
                                                                                                     abs=1e-3)
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", str(out), *_common(folder)])
    assert refused.value.code == 1 and "positional mean ablation averages each position over prompts of one length" \
        in capsys.readouterr().err


def test_discover_by_span_evaluate_and_show(folder, tmp_path, capsys):
    """A positional circuit from the shell: its (edge, span) pairs per span, its faithfulness beside the plain
    circuit of as many edges, saved and evaluated again to the same figure, and drawn."""
    out = tmp_path / "by_span.json"
    assert main(["discover", *_common(folder), "--method", "eap", "--spans", "--edges", "40", "--out",
                 str(out)]) == 0
    printed = capsys.readouterr().out
    circuit = SpanCircuit.load(out)
    assert circuit.spans == ["IO", "S1", "S2", "END", "rest"] and 0 < len(circuit) <= 40
    per = ", ".join(f"{s} {len(e)}" for s, e in circuit.edges.items())
    assert f"{len(circuit)} (edge, span) pairs ({per})" in printed
    f = float(next(line for line in printed.splitlines() if line.startswith("faithfulness")).split()[-1])
    assert f == pytest.approx(circuit.info["faithfulness"], abs=1e-3)
    assert re.search(r"^plain circuit +\d+ edges at every token: faithfulness -?[\d.]+$", printed, re.M)
    ET.parse(out.with_suffix(".svg"))

    assert main(["evaluate", str(out), *_common(folder)]) == 0
    printed = capsys.readouterr().out
    assert f"{f:.3f}" in printed and "CPR" in printed and "(edge, span) pairs" in printed
    assert main(["show", str(out), "--out", str(tmp_path / "again.svg")]) == 0
    assert f"; {len(circuit.union())} edges, {len(circuit.union().nodes)} nodes" in capsys.readouterr().out
    drawn = {e.get("id") for e in ET.parse(tmp_path / "again.svg").iter()}
    assert set(circuit.union().edges) <= drawn

    assert main(["discover", *_common(folder), "--method", "eap", "--spans", "S2,END", "--edges", "20",
                 "--selection", "greedy", "--out", str(out)]) == 0
    greedy = SpanCircuit.load(out)
    assert greedy.spans == ["S2", "END", "rest"] and 0 < len(greedy) <= 20
    assert "plain circuit" in capsys.readouterr().out
    # any method: ACDC keeps the (edge, span) pairs it kept, and no plain circuit is cut from sums of its scores
    assert main(["discover", *_common(folder), "--method", "acdc", "--spans", "S2,END", "--threshold", "1e-4",
                 "--out", str(out)]) == 0
    printed, acdc = capsys.readouterr().out, SpanCircuit.load(out)
    assert acdc.info["method"] == "acdc" and "plain circuit" not in printed
    assert acdc.info["threshold"] == 1e-4 and len(acdc) > 0 and bool((acdc.scores[acdc.in_graph] >= 1e-4).all())
    with pytest.raises(SystemExit, match="topn, greedy or threshold, not nodes"):
        main(["discover", *_common(folder), "--method", "eap", "--spans", "--nodes", "5", "--out", str(out)])
    with pytest.raises(SystemExit, match="saved as JSON"):
        main(["discover", *_common(folder), "--method", "eap", "--spans", "--out", str(tmp_path / "c.pt")])
    for command in (["compare", str(out), str(out)], ["lens", str(out), *_common(folder)]):
        with pytest.raises(SystemExit, match=f"holds a positional circuit, and {command[0]} reads a plain one"):
            main(command)
    with pytest.raises(SystemExit, match="--edges 500: .* has 110 edges; give fewer, or a percentage"):
        main(["discover", *_common(folder), "--method", "eap", "--edges", "500", "--out", str(tmp_path / "c.json")])


def test_direct_lists_the_largest_shares_and_what_they_add_up_to(folder, tmp_path, capsys, monkeypatch):
    """``direct`` lists the nodes of largest mean direct share of the logit difference, and accounts for the
    model's logit difference: the nodes read, the others, and what no node writes (nothing, in a Llama); and draws
    every node's mean share by layer and head."""
    def accounts() -> dict[str, float]:
        printed = capsys.readouterr().out
        shares = printed.split("largest first:\n")[1].split("\nthe model")[0].split()
        account = dict(re.findall(r"^(the model's logit difference|the \d+ nodes? read|the other nodes|"
                                  r"what no node writes) +([-+][\d.]+)", printed, re.M))
        return dict(zip(shares[::2], map(float, shares[1::2]))), {k: float(v) for k, v in account.items()}

    grid, drawn = tmp_path / "grid.svg", {}
    monkeypatch.setattr(cli, "plot_nodes", lambda graph, nodes, values, path, **kw: drawn.update(zip(nodes, values))
                        or plot_nodes(graph, nodes, values, path, **kw))
    assert main(["direct", *_common(folder), "--rows", "3", "--out", str(tmp_path / "direct.svg"),
                 "--grid", str(grid)]) == 0
    shares, account = accounts()
    graph = trace(load_model(folder)[0]).graph
    assert list(drawn) == graph.upstream and grid.stat().st_size > 0  # every node, laid out by layer and head
    assert {node: float(drawn[node]) for node in shares} == pytest.approx(shares, abs=6e-4)
    assert len(shares) == 3 and set(shares) <= set(graph.upstream)
    assert [abs(v) for v in shares.values()] == sorted(map(abs, shares.values()), reverse=True)
    read = account[f"the {len(graph.upstream)} nodes read"]
    assert read == pytest.approx(account["the model's logit difference"], abs=2e-3)
    assert account["the other nodes"] == pytest.approx(0, abs=2e-3) and account["what no node writes"] == 0
    ET.parse(tmp_path / "direct.svg")

    assert main(["direct", *_common(folder), "--nodes", "m0,a1.h0"]) == 0
    some, account = accounts()
    assert set(some) == {"m0", "a1.h0"} and "the 2 nodes read" in account
    assert account["the 2 nodes read"] + account["the other nodes"] == pytest.approx(read, abs=2e-3)


def test_submit_lays_saved_scores_out_for_mib_and_says_what_it_would_skip(tmp_path, capsys):
    """Each file's scores in the folder of the task and model it records (or the ones named), as importances or
    nine circuits; what the leaderboard would skip is noted, what cannot be submitted refused."""
    graph = CircuitGraph.from_config({"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8})
    scores = EdgeScores(graph, torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0)), "eap",
                        {"task": "ioi", "model": "openai-community/gpt2"})
    scores.topn(12).save(tmp_path / "ioi.json")
    scores.topn(12).save(tmp_path / "mcqa.pt", task="mcqa", model="/models/Qwen2.5-0.5B")
    out = tmp_path / "submission"
    assert main(["submit", str(tmp_path / "ioi.json"), str(tmp_path / "mcqa.pt"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'ioi.json'}  {out / 'ioi_gpt2'}: importances.pt" in printed and "note" not in printed
    assert torch.equal(EdgeScores.load(out / "mcqa_qwen2.5" / "importances.pt").tensor, scores.tensor)

    assert main(["submit", str(tmp_path / "ioi.json"), "--out", str(tmp_path / "nine"), "--form", "circuits",
                 "--signed", "--selection", "greedy", "--model", "smollm2-135m"]) == 0
    printed = capsys.readouterr().out
    assert f"{tmp_path / 'nine' / 'ioi_smollm2-135m'}: 9 circuits" in printed
    assert "note: ioi_smollm2-135m: the leaderboard evaluates no ioi on smollm2-135m and skips it" in printed
    assert "note: MIB takes submissions for two tasks at least; this one has 0" in printed
    circuit = Circuit.load(tmp_path / "nine" / "ioi_smollm2-135m" / "edges_50pct.pt")
    assert circuit.edges == scores.greedy(0.5, absolute=False).edges

    with pytest.raises(SystemExit, match="--selection and --signed cut --form circuits"):
        main(["submit", str(tmp_path / "ioi.json"), "--out", str(out), "--signed"])
    with pytest.raises(SystemExit, match="ioi.json and .*ioi.json both go to ioi_gpt2: a folder holds one task on "
                                         "one model"):
        main(["submit", str(tmp_path / "ioi.json"), str(tmp_path / "ioi.json"), "--out", str(tmp_path / "twice")])
    Circuit(graph, graph.edges[:3]).save(tmp_path / "bare.json", task="ioi", model="gpt2")
    with pytest.raises(SystemExit, match="bare.json holds a circuit without scores"):
        main(["submit", str(tmp_path / "bare.json"), "--out", str(out)])
    with pytest.raises(SystemExit) as refused:
        main(["submit", str(tmp_path / "ioi.json"), "--out", str(out), "--form", "circuits"])
    assert refused.value.code == 1
    assert "ioi_gpt2 already holds importances.pt" in capsys.readouterr().err


def test_compare_prints_what_two_circuits_share_and_draws_both(tmp_path, capsys):
    """Shared edges and nodes with their IoU, and each file's strongest edges that the other lacks, by |score|."""
    graph = CircuitGraph.from_config({"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8})
    scores = EdgeScores(graph, torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0)))
    scores.topn(12).to_json(tmp_path / "big.json", method="eap")
    Circuit(graph, graph.edges[::4]).to_json(tmp_path / "other.json")
    big, other = Circuit.from_json(tmp_path / "big.json"), Circuit.from_json(tmp_path / "other.json")
    assert main(["compare", str(tmp_path / "big.json"), str(tmp_path / "other.json"), "--top", "2",
                 "--out", str(tmp_path / "both.svg")]) == 0
    printed = capsys.readouterr().out
    overlap = big.overlap(other)
    assert f"big            {len(big)} edges, {len(big.nodes)} nodes, method eap" in printed
    assert f"shared edges   {overlap['shared_edges']} (IoU {overlap['edge_iou']:.3f})" in printed
    assert f"shared nodes   {overlap['shared_nodes']} heads and MLPs (IoU {overlap['node_iou']:.3f})" in printed
    alone = big - other
    strongest = sorted(alone.edges, key=lambda e: -abs(scores[e]))[:2]
    assert f"only in big    {len(alone)} edges\n" + "".join(f"               {e} {scores[e]:+.4g}\n"
                                                           for e in strongest) in printed
    assert f"only in other  {len(other - big)} edges\n" in printed  # unscored: listed in graph order
    ET.parse(tmp_path / "both.svg")
    deeper = CircuitGraph.from_config({"n_layers": 3, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8})
    Circuit(deeper, ["a2.h0->logits"]).to_json(tmp_path / "deeper.json")
    with pytest.raises(SystemExit, match="deeper.json is no circuit of .*big.json's model: the circuits are of "
                                         "different graphs"):
        main(["compare", str(tmp_path / "big.json"), str(tmp_path / "deeper.json")])


def test_attention_without_a_split_by_token_still_shows_the_patterns(folder, tmp_path, capsys, monkeypatch):
    """Where the heads' writes do not split by key position, ``attention`` says why and still prints and draws
    the weights."""
    def refuse(*args, **kwargs):
        raise DecompositionError("Model", None, "its core is not weights times values")

    monkeypatch.setattr(cli, "source_logits", refuse)
    out = tmp_path / "attention.svg"
    assert main(["attention", *_common(folder), "--heads", "a1.h0", "--out", str(out),
                 "--direct-out", str(tmp_path / "direct.svg")]) == 0
    printed = capsys.readouterr().out
    assert "(not split: cannot decompose Model" in printed and "its core is not weights times values" in printed
    assert printed.splitlines()[1].startswith("a1.h0") and out.exists() and not (tmp_path / "direct.svg").exists()


def test_attention_prints_and_draws_the_heads_weights(folder, tmp_path, capsys):
    """Each named head's top tokens from the last position, their weights summing to at most 1, and a heatmap
    with one row per head; then the tokens whose values each head writes most directly into the logit difference,
    with their positions, by size."""
    out = tmp_path / "attention.svg"
    assert main(["attention", *_common(folder), "--heads", "a1.h0,a0.h3", "--top", "2", "--example", "5",
                 "--out", str(out), "--direct-out", str(tmp_path / "direct.svg")]) == 0  # example 5: the second batch's
    looks, writes = capsys.readouterr().out.split("by the token it reads")
    rows = [line.strip() for line in looks.splitlines() if line.lstrip().startswith("a")]
    assert [row.split()[0] for row in rows] == ["a1.h0", "a0.h3"]
    for row in rows:
        weights = [float(w) for w in re.findall(r"['\"] (\d\.\d\d)", row)]  # each token's repr, then its weight
        assert len(weights) == 2 and weights == sorted(weights, reverse=True) and 0 < sum(weights) <= 1.005
    rows = [line.strip() for line in writes.splitlines() if line.lstrip().startswith("a")]
    assert [row.split()[0] for row in rows] == ["a1.h0", "a0.h3"]
    for row in rows:
        shares = [float(w) for w in re.findall(r"['\"]@\d+ ([+-]\d+\.\d\d)", row)]
        assert len(shares) == 2 and [abs(v) for v in shares] == sorted(map(abs, shares), reverse=True)
    ET.parse(out)
    ET.parse(tmp_path / "direct.svg")
    with pytest.raises(SystemExit, match="the task has 8 examples"):
        main(["attention", *_common(folder), "--heads", "a1.h0", "--example", "8"])
    with pytest.raises(SystemExit, match=r"--position=99: \d+ positions were read, position 0 to \d+ .*'last'"):
        main(["attention", *_common(folder), "--heads", "a1.h0", "--position", "99"])


@pytest.mark.parametrize("command, says", [
    (["discover", "--edges", "abc"], "a count (500) or a percentage above 0%, up to 100%"),
    (["discover", "--edges", "150%"], "a count (500) or a percentage above 0%, up to 100%"),
    (["discover", "--edges", "-3"], "a count (500) or a percentage above 0%, up to 100%"),
    (["discover", "--edges", "0"], "a count (500) or a percentage above 0%, up to 100%"),  # an empty circuit
    (["discover", "--nodes", "0%"], "a count (500) or a percentage above 0%, up to 100%"),
    (["discover", "--size", "0"], "'0': give a whole number, 1 or more"),
    (["evaluate", "c.json", "--batch-size", "0"], "'0': give a whole number, 1 or more"),
    (["discover", "--steps", "-1"], "'-1': give a whole number, 1 or more"),
    (["evaluate", "c.json", "--per-call", "0"], "'0': give a whole number, 1 or more"),
    (["attention", "--heads", "a0.h0", "--position", "1.5"], "'1.5': give 'last', a position (an integer) or, "
                                                             "with --spans, a span's name"),
    (["discover", "--faithfulness", "0"], "'0': give a faithfulness above 0, as 0.85 or 85%"),
    (["discover", "--faithfulness", "most"], "'most': give a faithfulness above 0, as 0.85 or 85%"),
    (["discover", "--faithfulness", "85"], "'85': a faithfulness is a share of the model's own (1 is all of it): give "
                                            "0.85 or 85%"),
    (["discover", "--faithfulness", "1.5"], "'1.5': a faithfulness is a share of the model's own (1 is all of it): "
                                             "past the model's own, write a percentage (150%)"),
    (["discover", "--out", "circuit.svg"], "'circuit.svg': a circuit file ends in .json or .pt"),
    (["discover", "--seed", "99999999999999999999"], "give a whole number from -2**63 to 2**64 - 1")])
def test_options_out_of_their_range_are_usage_errors(folder, command, says, capsys):
    """Refused in one line that names the option and says what it takes (argparse printed the usage above it)."""
    with pytest.raises(SystemExit) as exit_:
        main([*command, "--model", folder])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and says in err and len(err.splitlines()) == 1
    assert err.startswith(f"fxcircuits {command[0]}: error: ") and err.endswith("--help lists what it takes)\n")


@pytest.mark.parametrize("option, value, says", [
    ("--task", "nonsense", "argument --task: unknown task 'nonsense': use one of greater-than, sva, ioi, ioi-abc, "
                           "induction or a .csv/.jsonl file"),
    ("--task", "missing.jsonl", "argument --task: no task file 'missing.jsonl'"),
    ("--device", "nowhere", "argument --device: 'nowhere' is no device: Expected one of cpu, cuda"),
    ("--device", "hpu", "argument --device: 'hpu': this machine's torch has no hpu device")])
def test_a_task_or_device_that_cannot_be_had_is_refused_before_the_model_loads(option, value, says, capsys,
                                                                               monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exit_:
        main(["discover", option, value])
    assert exit_.value.code == 2 and says in capsys.readouterr().err


@pytest.mark.parametrize("command, says", [
    (["patch", "--all-positions", "--example", "3"], "--example picks the example patched token by token, and "
                                                     "--all-positions and --spans average every example"),
    (["patch", "--spans", "--example", "3"], "--all-positions and --spans average every example"),
    (["patch", "--steps", "9"], "--steps counts the integration steps of --method attribution-ig; exact takes none"),
    (["attention", "--heads", "a0.h0", "--spans", "--example", "3"], "--spans averages every example by span"),
    (["attention", "--heads", "a0.h0", "--spans", "--top", "2"], "--example and --top pick one example's tokens"),
    (["patch", "--method", "attribution", "--per-call", "3"], "attribution takes one backward pass: leave it out"),
    (["patch", "--all-positions", "--method", "attribution-ig", "--ablation", "zero"],
     "use --method attribution or exact, or --ablation mean"),
    (["patch", "--method", "attribution", "--metric", "kl"], "--metric kl is smallest at the clean run, where "
                                                             "--method attribution takes its gradient"),
    (["patch", "--direction", "denoising", "--metric", "kl"], "--metric kl compares with the run being patched, "
                                                              "which denoising runs on the corrupted prompts")])
def test_options_a_command_would_not_read_are_refused_before_the_model_loads(command, says, monkeypatch):
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match=says):
        main(command)


def test_size_of_a_task_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    """--size draws a built-in task's examples; a task file runs every row, so --size beside one would be ignored."""
    task = tmp_path / "mine.jsonl"
    task.write_text(json.dumps({"clean": "a b", "corrupted": "a c", "correct": " d", "incorrect": " e"}) + "\n")
    monkeypatch.setattr(cli, "load_model", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit, match="--size draws examples of a built-in task, and .*mine.jsonl is a task file"):
        main(["lens", "--task", str(task), "--size", "4"])


def test_show_edges_of_an_unscored_circuit_is_refused_naming_the_option(tmp_path):
    graph = CircuitGraph.from_config({"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8})
    Circuit(graph, graph.edges[:6]).save(tmp_path / "c.json")
    with pytest.raises(SystemExit, match="--edges draws the circuit's strongest edges, and .*c.json holds no scores "
                                         "to rank them by: leave --edges out"):
        main(["show", str(tmp_path / "c.json"), "--out", str(tmp_path / "c.svg"), "--edges", "3"])
    assert not (tmp_path / "c.svg").exists()


def test_sizes_by_span_count_pairs_and_are_checked_before_the_run(folder, tmp_path, capsys, monkeypatch):
    """--spans --edges counts (edge, span) pairs: more pairs than the model has edges is a circuit (the plain one
    beside it then holds every edge), more than the pairs, or a share that keeps none, is refused before scoring."""
    out = tmp_path / "by_span.json"
    assert main(["discover", *_common(folder), "--method", "eap", "--spans", "--edges", "200", "--out", str(out)]) == 0
    assert len(SpanCircuit.load(out)) == 200
    assert re.search(r"^plain circuit +110 edges at every token: faithfulness", capsys.readouterr().out, re.M)
    monkeypatch.setattr(cli, "attribute_by_span", lambda *args, **kwargs: pytest.fail("scored"))
    monkeypatch.setattr(cli, "attribute", lambda *args, **kwargs: pytest.fail("scored"))
    for options, says in ((["--spans", "S2,END", "--edges", "400"], "--edges 400: .* has 330 \\(edge, span\\) pairs "
                                                                     "\\(110 edges at 3 spans"),
                          (["--spans", "S2,END", "--edges", "0.1%"], "--edges 0.1%: that share of .* 330 \\(edge, "
                                                                     "span\\) pairs .* keeps none"),
                          (["--edges", "0.5%"], "--edges 0.5%: that share of .* 110 edges keeps none"),
                          (["--nodes", "5%"], "--nodes 5%: that share of .* 11 nodes keeps none")):
        with pytest.raises(SystemExit, match=says):
            main(["discover", *_common(folder), "--method", "eap", *options, "--out", str(out)])
    with pytest.raises(SystemExit):
        main(["discover", *_common(folder), "--method", "eap", "--spans", "S9", "--out", str(out)])
    assert "no span 'S9' in the batch" in capsys.readouterr().err


def test_spans_of_a_task_file_that_names_none_are_refused_saying_how_to_name_them(folder, tmp_path):
    task = tmp_path / "plain.jsonl"
    task.write_text(json.dumps({"clean": "When Mary and John went to the store, John gave a drink to",
                                "corrupted": "When Mary and John went to the store, Paul gave a drink to",
                                "correct": " Mary", "incorrect": " John"}) + "\n")
    options = ["--model", folder, "--task", str(task), "--no-progress"]
    for command in (["discover", "--method", "eap", "--spans"], ["patch", "--spans"],
                    ["attention", "--heads", "a0.h0", "--spans"]):
        with pytest.raises(SystemExit, match="--spans: the task 'plain' names no spans \\(give your file a 'spans'"):
            main([*command, *options])


def test_mismatched_rows_of_a_task_file_are_dropped_where_asked(folder, tmp_path, capsys):
    clean = "When Mary and John went to the store, John gave a drink to"
    rows = [{"clean": clean, "corrupted": clean.replace("John gave", "Bartholomew gave"), "correct": " Mary",
             "incorrect": " John"}, {"clean": clean, "corrupted": clean.replace("John gave", "Paul gave"),
                                     "correct": " Mary", "incorrect": " John"}]
    task = tmp_path / "mixed.jsonl"
    task.write_text("".join(json.dumps(row) + "\n" for row in rows))
    options = ["lens", "--model", folder, "--task", str(task), "--no-progress"]
    with pytest.raises(SystemExit):
        main(options)
    assert "line 1: the clean prompt is" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="dropped 1 of 2 .*: line 1"):
        assert main([*options, "--drop-mismatched"]) == 0
    assert capsys.readouterr().out.startswith(f"example 0: {clean!r}")
    with pytest.raises(SystemExit, match="--drop-mismatched reads a task file"):
        main(["lens", "--model", folder, "--task", "ioi", "--drop-mismatched"])


def _two_lengths(folder, tmp_path) -> tuple[Path, list[int]]:
    """A task file of four prompts, two of one token length and then two longer, so batches of two hold one
    length each; and the two lengths, as the model's tokenizer counts them."""
    prompts = ["When Mary and John went to the store, John gave a drink to"] * 2 + \
        ["After Mary and John went to the big old store, John gave a drink to"] * 2
    task = tmp_path / "lengths.jsonl"
    task.write_text("".join(json.dumps({"clean": p, "corrupted": p.replace("John gave", "Paul gave"),
                                        "correct": " Mary", "incorrect": " John"}) + "\n" for p in prompts))
    tokenizer = load_model(folder)[1]
    return task, [len(tokenizer(prompts[i]).input_ids) for i in (0, 2)]


def test_check_verifies_every_batch_of_a_task(folder, tmp_path, capsys, monkeypatch):
    """Prompts of two lengths, in two batches: both are verified, the prompts row says so, and a check that fails
    in both says so rather than list them."""
    task, (short, long) = _two_lengths(folder, tmp_path)
    assert short < long
    verify, verified = cli.verify, []
    monkeypatch.setattr(cli, "verify", lambda cm, model, ids, *args, **kwargs: verified.append(ids.shape[1]) or
                        verify(cm, model, ids, *args, **kwargs))
    options = ["check", "--model", folder, "--task", str(task), "--batch-size", "2", "--no-progress"]
    assert main(options) == 0
    printed = capsys.readouterr().out
    assert verified == [short, long]
    assert f"lengths: 4 prompts in 2 batches of {short}–{long} tokens, and their corrupted prompts" in printed
    assert "; largest in batch " in printed and printed.strip().endswith("ok: every check within 0.0001")
    assert main([*options, "--tolerance", "0"]) == 1  # every patched run rounds a little
    assert "WRONG: corrupted in every batch; " in capsys.readouterr().out


def test_check_names_the_batch_a_check_fails_in(folder, tmp_path, capsys, monkeypatch):
    """A trace off only on the longer prompts, with every edge patched: ``corrupted`` fails in their batch alone,
    which the WRONG line names by index and length."""
    task, (_, long) = _two_lengths(folder, tmp_path)

    def off_on_long_prompts(model, **kwargs):
        cm = trace(model, **kwargs)
        forward = cm.forward

        def off(input_ids, *args, edge_mask=None, **kwargs):
            out = forward(input_ids, *args, edge_mask=edge_mask, **kwargs)
            every_edge = torch.is_tensor(edge_mask) and not edge_mask.any()
            return out + 1e-2 * out.abs().max() if every_edge and input_ids.shape[1] == long else out
        monkeypatch.setattr(cm, "forward", off)
        return cm
    monkeypatch.setattr(cli, "trace", off_on_long_prompts)
    assert main(["check", "--model", folder, "--task", str(task), "--batch-size", "2", "--no-progress"]) == 1
    printed = capsys.readouterr().out
    assert printed.strip().splitlines()[-1] == f"WRONG: corrupted in batch 1 ({long} tokens) differ by more than 0.0001"
    row = next(line for line in printed.splitlines() if line.startswith("corrupted "))
    assert "WRONG" in row and row.endswith(f"; largest in batch 1 ({long} tokens)")


def test_a_device_is_one_of_the_accelerators_devices(monkeypatch):
    """As on a machine with one GPU: cuda and cuda:0 are taken, cuda:1 and mps are refused."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: True)
    monkeypatch.setattr(torch.accelerator, "current_accelerator", lambda *args: torch.device("cuda"))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: 1)
    assert [cli._device(text) for text in ("cpu", "cuda", "cuda:0")] == ["cpu", "cuda", "cuda:0"]
    for text, says in [("cuda:1", "this machine has 1 cuda device(s), numbered from 0"),
                       ("mps", "no mps device (its accelerator: cuda)")]:
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape(says)):
            cli._device(text)


def test_metric_and_ablation_are_chosen_saved_and_read_back(folder, tmp_path, capsys):
    """``--metric`` and ``--ablation`` reach attribution and evaluation, the circuit file records them, and
    ``evaluate`` patches as the file says unless told otherwise; the numbers are the library's own."""
    out = tmp_path / "circuit.json"
    assert main(["discover", *_common(folder), "--method", "eap", "--metric", "prob_diff", "--ablation", "mean",
                 "--edges", "10%", "--out", str(out)]) == 0
    assert "prob_diff, patched edges carry their mean over the task" in capsys.readouterr().out
    cfg = json.loads(out.read_text())["cfg"]
    assert cfg["metric"] == "prob_diff" and cfg["ablation"] == "mean" and cfg["method"] == "eap"

    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    mean = dict(ablation="mean", reference=task.batches)
    circuit = Circuit.from_json(out)
    assert circuit.edges == attribute(cm, task.batches, "prob_diff", "eap", progress=False, **mean).topn(0.1).edges
    faithfulness = {ablation: Evaluator(cm, task.batches, "prob_diff", **options).evaluate(circuit).faithfulness
                    for ablation, options in [("mean", mean), ("zero", dict(ablation="zero"))]}
    assert cfg["faithfulness"] == pytest.approx(faithfulness["mean"], abs=1e-6)
    assert abs(faithfulness["mean"] - faithfulness["zero"]) > 1e-2  # the ablation matters on this circuit

    for flags, ablation in [([], "mean"), (["--ablation", "zero"], "zero")]:
        assert main(["evaluate", str(out), *_common(folder), *flags]) == 0
        printed = capsys.readouterr().out
        row = next(line for line in printed.splitlines() if line.startswith("faithfulness"))
        assert row.split()[-1] == f"{faithfulness[ablation]:.3f}" and "prob_diff" in printed


def test_optimal_ablation_is_learned_once_and_read_back(folder, tmp_path, capsys, monkeypatch):
    """``--ablation optimal`` learns the values once over the task's clean prompts, for scoring and evaluating
    both, and saves them beside the circuit; the file records both, and ``evaluate`` reads the values back where
    they are still there, and learns them again (deterministic) where they are not."""
    learned = []

    def optimal(cm, reference, **options):  # fewer steps than a user's, counted
        learned.append(options)
        return optimal_ablation(cm, reference, **{**options, "steps": 3})
    monkeypatch.setattr(cli, "optimal_ablation", optimal)
    out = tmp_path / "circuit.json"
    assert main(["discover", *_common(folder), "--method", "eap", "--ablation", "optimal", "--edges", "10%",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "patched edges carry their optimal ablation value over the task" in printed
    assert learned == [{"progress": False}] and str(tmp_path / "circuit.optimal.pt") in printed
    cfg = json.loads(out.read_text())["cfg"]
    assert cfg["ablation"] == "optimal" and cfg["ablation_values"] == str(tmp_path / "circuit.optimal.pt")

    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    values = optimal_ablation(cm, task.batches, steps=3, progress=False)
    circuit = Circuit.from_json(out)
    assert circuit.edges == attribute(cm, task.batches, task.metric, "eap", ablation=values,
                                      progress=False).topn(0.1).edges
    faithfulness = Evaluator(cm, task.batches, task.metric, ablation=values).evaluate(circuit).faithfulness
    assert cfg["faithfulness"] == pytest.approx(faithfulness, abs=1e-6)
    saved = Ablation.load(cfg["ablation_values"])
    assert saved.name == "optimal" and all(torch.equal(a, b) for a, b in zip(saved.values, values.values))
    for learns in (0, 1):
        assert main(["evaluate", str(out), *_common(folder)]) == 0
        row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("faithfulness"))
        assert row.split()[-1] == f"{faithfulness:.3f}" and len(learned) == 1 + learns
        Path(cfg["ablation_values"]).unlink(missing_ok=True)  # the second time, learned again


def test_ablation_values_given_are_patched_in_and_optimal_steps_set_the_learning(folder, tmp_path, capsys,
                                                                                  monkeypatch):
    """``--ablation-values`` patches values computed before (their kind the ablation) in discover, evaluate and
    patch, learning nothing; ``--optimal-steps`` sets optimal ablation's steps; contradictions are refused."""
    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    values = optimal_ablation(cm, task.batches, steps=2, progress=False)
    values.save(tmp_path / "values.pt")
    learned = []

    def optimal(cm, reference, **options):
        learned.append(options)
        return optimal_ablation(cm, reference, **options)
    monkeypatch.setattr(cli, "optimal_ablation", optimal)
    out = tmp_path / "circuit.json"
    assert main(["discover", *_common(folder), "--method", "eap", "--edges", "10%", "--ablation-values",
                 str(tmp_path / "values.pt"), "--out", str(out)]) == 0
    assert "patched edges carry their optimal ablation value over the task" in capsys.readouterr().out
    assert learned == [] and json.loads(out.read_text())["cfg"]["ablation"] == "optimal"
    expected = attribute(cm, task.batches, task.metric, "eap", ablation=values, progress=False).topn(0.1)
    assert Circuit.from_json(out).edges == expected.edges
    assert main(["evaluate", str(out), *_common(folder), "--ablation-values", str(tmp_path / "values.pt")]) == 0
    faithfulness = Evaluator(cm, task.batches, task.metric, ablation=values).evaluate(expected).faithfulness
    assert f"faithfulness  {faithfulness:.3f}" in capsys.readouterr().out and learned == []
    assert main(["patch", *_common(folder), "--all-positions", "--nodes", "a0.h0,m1", "--ablation-values",
                 str(tmp_path / "values.pt")]) == 0
    assert "optimal ablation" in capsys.readouterr().out and learned == []

    assert main(["evaluate", str(out), *_common(folder), "--optimal-steps", "2"]) == 0  # learned again, 2 steps
    assert learned == [{"progress": False, "steps": 2}]
    learned.clear()
    assert main(["discover", *_common(folder), "--method", "eap", "--edges", "10%", "--ablation", "optimal",
                 "--optimal-steps", "2", "--out", str(out)]) == 0
    cfg = json.loads(out.read_text())["cfg"]
    assert learned == [{"progress": False, "steps": 2}] and cfg["optimal_steps"] == 2
    assert Circuit.from_json(out).edges == expected.edges  # values learned as those given above were
    Path(cfg["ablation_values"]).unlink()
    assert main(["evaluate", str(out), *_common(folder)]) == 0  # learned again as the file records
    assert learned[1:] == [{"progress": False, "steps": 2}]
    capsys.readouterr()

    for options, refusal in (
            (["--ablation", "mean", "--ablation-values", str(tmp_path / "values.pt")],
             "--ablation-values holds optimal ablation values, and --ablation asks for mean: leave one out"),
            (["--optimal-steps", "3"], "--optimal-steps sets how long optimal ablation values are learned, and this "
                                       "command patches with corrupted: leave it out"),
            (["--optimal-steps", "3", "--ablation-values", str(tmp_path / "values.pt")],
             "this command reads them from --ablation-values")):
        with pytest.raises(SystemExit, match=re.escape(refusal)):
            main(["discover", *_common(folder), "--method", "eap", *options, "--out", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="add --all-positions"):
        main(["patch", *_common(folder), "--ablation-values", str(tmp_path / "values.pt")])
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", str(out), *_common(folder), "--ablation-values", str(out)])
    assert refused.value.code == 2 and "is no file torch.save wrote" in capsys.readouterr().err
    Ablation("optimal", [torch.zeros(1, 1, 1, 3)]).save(tmp_path / "other.pt")
    with pytest.raises(SystemExit) as refused:
        main(["evaluate", str(out), *_common(folder), "--ablation-values", str(tmp_path / "other.pt")])
    assert refused.value.code == 1 and "it was found for another model" in capsys.readouterr().err


def test_runs_a_call_are_given_to_attribution_and_evaluation(folder, tmp_path, monkeypatch):
    """``--per-call`` sets how many runs a call both ``attribute`` and the ``Evaluator`` start at (EAP then takes
    its one point); without it each sizes its calls itself."""
    sizes, calls = [], Calls.__init__
    monkeypatch.setattr(Calls, "__init__", lambda self, size: sizes.append(size) or calls(self, size))
    out = str(tmp_path / "c.json")
    assert main(["discover", *_common(folder), "--method", "exact", "--edges", "5", "--per-call", "3",
                 "--out", out]) == 0
    assert sizes == [3, 3]
    sizes.clear()
    assert main(["evaluate", out, *_common(folder), "--per-call", "2"]) == 0 and sizes == [2]
    sizes.clear()
    assert main(["evaluate", out, *_common(folder)]) == 0 and sizes == [16]  # the tiny model's CPU default


def test_a_learned_mask_is_trained_to_the_size_asked_for(folder, tmp_path):
    """``--method mask`` trains its gates for --steps steps to keep the --edges asked for: the saved scores (each
    gate's probability of being open) add up to that count, and are ``attribute``'s with those options (also
    when ``--faithfulness`` cuts the circuit); the gates start ranked by EAP-IG, or alike with ``--warm-start
    none``."""
    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    scores = attribute(cm, task.batches, task.metric, "mask", mask_steps=20, density=12, progress=False)
    out = tmp_path / "mask.json"
    assert main(["discover", *_common(folder), "--method", "mask", "--steps", "20", "--edges", "12",
                 "--out", str(out)]) == 0
    circuit = Circuit.load(out)
    assert circuit.info["steps"] == 20 and circuit.info["density"] == 12
    torch.testing.assert_close(circuit.scores, scores.tensor)
    torch.testing.assert_close(circuit.scores.sum(), torch.tensor(12.0))
    assert circuit.edges == scores.topn(12, prune=False).edges and circuit.info["warm_start"] == "eap-ig-inputs"
    assert len(circuit) == 12  # the circuit it trained, unpruned
    assert main(["discover", *_common(folder), "--method", "mask", "--steps", "20", "--edges", "12",
                 "--faithfulness", "0.8", "--out", str(out)]) == 0  # trained to 12 edges, cut where it reaches 0.8
    smallest = Evaluator(cm, task.batches, task.metric).smallest(scores, 0.8)
    assert Circuit.load(out).edges == smallest.edges and Circuit.load(out).info["density"] == 12
    alike = attribute(cm, task.batches, task.metric, "mask", mask_steps=20, density=12, warm_start=None,
                      progress=False)
    assert main(["discover", *_common(folder), "--method", "mask", "--steps", "20", "--edges", "12",
                 "--warm-start", "none", "--out", str(out)]) == 0
    torch.testing.assert_close(Circuit.load(out).scores, alike.tensor)
    assert Circuit.load(out).info["warm_start"] is None and not torch.equal(alike.tensor, scores.tensor)
    with pytest.raises(SystemExit, match="--warm-start starts a learned mask's gates: add --method mask"):
        main(["discover", *_common(folder), "--warm-start", "eap", "--out", str(out)])



def test_uniform_gradient_sampling_runs_its_steps_at_its_penalty(folder, tmp_path):
    """``--method ugs`` trains for --steps steps at --penalty: the saved scores are ``attribute``'s with those
    options, and the circuit their top --edges, pruned (MIB cuts UGS's scores by top-n, as other methods'); its
    options are refused with other methods."""
    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    scores = attribute(cm, task.batches, task.metric, "ugs", mask_steps=6, penalty=0.01, progress=False)
    out = tmp_path / "ugs.json"
    assert main(["discover", *_common(folder), "--method", "ugs", "--steps", "6", "--penalty", "0.01", "--edges",
                 "12", "--out", str(out)]) == 0
    circuit = Circuit.load(out)
    assert {k: circuit.info[k] for k in ("method", "steps", "samples", "penalty")} == {
        "method": "ugs", "steps": 6, "samples": 2, "penalty": 0.01}
    torch.testing.assert_close(circuit.scores, scores.tensor)
    assert circuit.edges == scores.topn(12).edges
    with pytest.raises(SystemExit, match="--penalty is the lambda of uniform gradient sampling: add --method ugs"):
        main(["discover", *_common(folder), "--method", "mask", "--penalty", "0.1", "--out", str(out)])
    with pytest.raises(SystemExit, match="--steps counts .* training steps \\(mask and ugs\\); exact takes none"):
        main(["discover", *_common(folder), "--method", "exact", "--steps", "3", "--out", str(out)])

def test_selections_acdc_threshold_and_nodes(folder, tmp_path):
    """``--method acdc`` cuts its circuit at τ on the signed score (the edges ACDC kept), ``--threshold`` being τ;
    ``--selection threshold`` on another method keeps |score| ≥ the threshold; ``--nodes`` cuts a node-level
    circuit; a size that does not size the selection is refused before any run."""
    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    tau = 0.02 * abs(task.baseline(cm) - task.baseline(cm, corrupted=True))  # kept 12 to 21 of 110 edges, 5 seeds
    acdc = attribute(cm, task.batches, task.metric, "acdc", threshold=tau, progress=False)
    out = tmp_path / "acdc.json"
    assert main(["discover", *_common(folder), "--method", "acdc", "--metric", "logit_diff", "--threshold", repr(tau),
                 "--out", str(out)]) == 0
    circuit = Circuit.load(out)
    assert circuit.edges == acdc.threshold(tau, absolute=False, prune=False).edges and circuit.info["threshold"] == tau
    assert 0 < len(circuit) < len(cm.graph.edges)
    # under zero ablation an MLP whose inputs ACDC removed still writes what it computes from zeros: kept, unpruned
    zero = attribute(cm, task.batches, task.metric, "acdc", threshold=tau, ablation="zero", progress=False)
    assert main(["discover", *_common(folder), "--method", "acdc", "--metric", "logit_diff", "--threshold", repr(tau),
                 "--ablation", "zero", "--out", str(out)]) == 0
    circuit = Circuit.load(out)
    assert circuit.edges == zero.threshold(tau, absolute=False, prune=False).edges
    assert len(circuit) > len(zero.threshold(tau, absolute=False))  # 12 edges kept, 9 of them pruned

    scores = attribute(cm, task.batches, task.metric, "eap", progress=False)
    cut = float(scores.tensor.abs().quantile(0.9))
    assert main(["discover", *_common(folder), "--method", "eap", "--selection", "threshold", "--threshold", str(cut),
                 "--out", str(out)]) == 0
    assert Circuit.load(out).edges == scores.threshold(cut).edges

    assert main(["discover", *_common(folder), "--method", "eap", "--nodes", "4", "--out", str(out)]) == 0
    assert Circuit.load(out).edges == scores.topn_nodes(4).edges

    for options, says in ((["--selection", "threshold", "--threshold", "1", "--edges", "5"],
                           "--edges does not size a threshold circuit: give --threshold instead"),
                          (["--nodes", "3", "--edges", "5"], "--edges and --nodes both size the circuit"),
                          (["--selection", "greedy", "--nodes", "3"], "--nodes does not size a greedy circuit: give "
                                                                      "--edges instead"),
                          (["--method", "acdc", "--edges", "5"], "ACDC's own cut keeps the edges it kept; add "
                                                                 "--selection topn to cut its scores by size"),
                          (["--selection", "nodes"], "--selection nodes needs --nodes"),
                          (["--method", "eap", "--selection", "threshold"], "needs --threshold"),
                          (["--method", "eap", "--steps", "50"],
                           "--steps counts the integration steps of eap-ig-inputs and .*eap takes none"),
                          (["--method", "eap", "--threshold", "0.5"], "--threshold is ACDC's tau, or the least score "
                                                                      "of --selection threshold")):
        with pytest.raises(SystemExit, match=says):
            main(["discover", *_common(folder), *options])


def test_discover_sized_by_faithfulness(folder, tmp_path, capsys):
    """``--faithfulness`` cuts the smallest circuit that reaches it, as ``Evaluator.smallest`` does, for plain and
    positional circuits; a second size beside it, or a threshold cut, is refused before any run."""
    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    evaluator = Evaluator(cm, task.batches, task.metric)
    scores = attribute(cm, task.batches, task.metric, "eap", progress=False)
    out = tmp_path / "c.json"
    for options, expected in ((["--faithfulness", "80%"], evaluator.smallest(scores, 0.8)),
                              (["--faithfulness", "0.5", "--selection", "nodes"],
                               evaluator.smallest(scores, 0.5, "nodes"))):
        assert main(["discover", *_common(folder), "--method", "eap", *options, "--out", str(out)]) == 0
        printed = capsys.readouterr().out
        assert Circuit.load(out).edges == expected.edges and len(expected) < len(cm.graph.edges)
        assert f"faithfulness     {expected.info['faithfulness']:.3f} (the smallest cut that reaches" in printed
    assert main(["discover", *_common(folder), "--method", "eap", "--spans", "--faithfulness", "0.8", "--out",
                 str(out)]) == 0
    by_span = attribute_by_span(cm, task.batches, task.metric, "eap", progress=False)
    assert torch.equal(SpanCircuit.load(out).in_graph, evaluator.smallest(by_span, 0.8).in_graph)
    for options, says in ((["--edges", "5"], "--edges and --faithfulness both size the circuit"),
                          (["--nodes", "5"], "--nodes and --faithfulness both size the circuit"),
                          (["--selection", "threshold", "--threshold", "1"], "leave out --selection threshold")):
        with pytest.raises(SystemExit, match=says):
            main(["discover", *_common(folder), "--faithfulness", "0.8", *options])


def test_discover_by_information_flow_routes(folder, tmp_path, capsys):
    """``--method information-flow-routes`` scores the clean prompts alone and, as MIB does, cuts its scores
    greedily; the metric and the ablation then evaluate the circuit (here zero ablation), by span too."""
    model, tokenizer = load_model(folder)
    cm, task = trace(model), tasks.load("ioi", tokenizer, size=8, batch_size=4)
    scores = attribute(cm, task.batches, method="information-flow-routes", progress=False)
    out = tmp_path / "routes.json"
    assert main(["discover", *_common(folder), "--method", "information-flow-routes", "--edges", "20",
                 "--ablation", "zero", "--out", str(out)]) == 0
    expected = scores.greedy(20)
    faithfulness = Evaluator(cm, task.batches, task.metric, ablation="zero").evaluate(expected).faithfulness
    circuit = Circuit.load(out)
    assert circuit.edges == expected.edges and torch.equal(circuit.scores, scores.tensor)
    assert circuit.info["method"] == "information-flow-routes" and circuit.info["ablation"] == "zero"
    assert f"faithfulness     {faithfulness:.3f}" in capsys.readouterr().out
    assert main(["evaluate", str(out), *_common(folder)]) == 0  # the file's zero ablation, MIB's greedy curve
    cpr = Evaluator(cm, task.batches, task.metric, ablation="zero").mib(scores, selection="greedy")["cpr"]
    printed = capsys.readouterr().out
    assert "curve (greedy)" in printed and re.search(rf"^CPR +{cpr:.3f}$", printed, re.MULTILINE)
    assert main(["discover", *_common(folder), "--method", "information-flow-routes", "--spans", "--edges", "30",
                 "--out", str(out)]) == 0
    by_span = attribute_by_span(cm, task.batches, method="information-flow-routes", progress=False)
    assert torch.equal(SpanCircuit.load(out).in_graph, by_span.greedy(30).in_graph)
    assert not len(scores.topn(20))  # its top edges feed the first layers, and pruned they are gone: refused
    with pytest.raises(SystemExit, match="the topn cut keeps no edge once pruned"):
        main(["discover", *_common(folder), "--method", "information-flow-routes", "--selection", "topn", "--edges",
              "20", "--out", str(tmp_path / "none.json")])


def test_refused_input_is_one_line_and_traceback_shows_where(tmp_path, capsys):
    """A missing file, an unknown node or a bad picture suffix: exit status 1 and the library's message on stderr;
    with --traceback the exception itself."""
    missing = str(tmp_path / "missing.json")
    with pytest.raises(SystemExit) as exit_:
        main(["show", missing, "--out", str(tmp_path / "c.svg")])
    err = capsys.readouterr().err
    assert exit_.value.code == 1 and err.startswith("fxcircuits show: error: ") and missing in err
    assert "Traceback" not in err
    graph = CircuitGraph.from_config({"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False, "d_model": 8})
    Circuit(graph, graph.edges[:3]).save(tmp_path / "c.json")
    assert "(fxcircuits --traceback show … shows where it was raised)" in err
    for out, says in (("c.txt", "c.txt': a picture ends in .png or .svg"),
                      ("nowhere/c.svg", "nowhere/c.svg': there is no folder '"),):
        with pytest.raises(SystemExit):  # refused as it is parsed, before any run
            main(["show", str(tmp_path / "c.json"), "--out", str(tmp_path / out)])
        assert says in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["discover", "--out", str(tmp_path / "nowhere" / "c.json")])
    assert "there is no folder" in capsys.readouterr().err
    for tolerance in ("nan", "-1"):
        with pytest.raises(SystemExit):
            main(["check", "--tolerance", tolerance])
        assert f"'{tolerance}': give a number of 0 or more" in capsys.readouterr().err
    with pytest.raises(FileNotFoundError):
        main(["--traceback", "show", missing, "--out", str(tmp_path / "c.svg")])


def test_patch_prints_and_draws_where_each_layers_stream_carries_the_answer(folder, tmp_path, capsys):
    """``patch`` sweeps the stream entering each layer over one example's tokens, and lists per layer the tokens of
    largest effect as fractions of the whole: those of the library run on the whole batch holding the example."""
    out = tmp_path / "patch.svg"
    assert main(["patch", *_common(folder), "--example", "5", "--top", "2", "--per-call", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line for line in printed.splitlines() if line.lstrip().startswith("layer")]
    model, tokenizer = load_model(folder)
    task = tasks.load("ioi", tokenizer, size=8, seed=0, batch_size=4)
    batch, row = task.locate(5)
    values, positions = patch_by_position(trace(model), batch, task.metric).example(row, normalized=True)
    assert len(rows) == len(values) == 2
    for line, expected in zip(rows, values):
        cells = [(int(p), float(v)) for p, v in re.findall(r"@(\d+) ([-+]\d+\.\d\d)", line)]
        assert len(cells) == 2 and cells[0][0] == int(positions[expected.abs().argmax()])
        for p, v in cells:  # each the library's value there, and among its two largest (ties at rounding aside)
            assert v == pytest.approx(float(expected[positions.tolist().index(p)]), abs=0.006)
            assert abs(v) >= float(expected.abs().topk(2).values[-1]) - 0.006
    assert out.exists()


def test_patch_by_span_averages_every_example_of_the_task(folder, tmp_path, capsys):
    """``patch --spans`` sweeps the stream entering each layer over IOI's named spans in all of the task's examples:
    per layer, the spans of largest mean effect as fractions of the mean whole, the library's figures."""
    out = tmp_path / "spans.png"
    assert main(["patch", *_common(folder), "--spans", "--top", "4", "--per-call", "5", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("8 examples; logit_diff:") and out.stat().st_size > 0
    model, tokenizer = load_model(folder)
    task = tasks.load("ioi", tokenizer, size=8, seed=0, batch_size=4)
    mean = patch_by_position(trace(model), task.batches, task.metric, spans=True).mean(normalized=True)
    rows = [line for line in printed.splitlines() if line.lstrip().startswith("layer")]
    assert len(rows) == len(mean) == 2
    for line, expected in zip(rows, mean):
        cells = dict((name, float(v)) for name, v in re.findall(r"(IO|S1|S2|END) ([-+]\d+\.\d\d)", line))
        assert set(cells) == {"IO", "S1", "S2", "END"}
        for column, name in enumerate(["IO", "S1", "S2", "END"]):
            assert cells[name] == pytest.approx(float(expected[column]), abs=0.006)
    assert main(["patch", *_common(folder), "--spans", "S2,END", "--nodes", "m0", "--top", "1"]) == 0
    assert re.search(r"m0  (S2|END) [-+]", capsys.readouterr().out)
    with pytest.raises(SystemExit):
        main(["patch", *_common(folder), "--spans", "S3"])
    assert "no span named 'S3'" in capsys.readouterr().err


def _prints_top(printed: str, expected: list[tuple[str, float]]) -> None:
    """The printed table (``NodeEffects.table``: a name and a signed value a line) is ``expected``, in order."""
    rows = [line.split() for line in printed.splitlines()]
    rows = [row for row in rows if len(row) == 2 and row[1][0] in "+-"]
    assert [row[0] for row in rows] == [name for name, _ in expected]
    assert [float(row[1]) for row in rows] == pytest.approx([value for _, value in expected], abs=6e-4)


def test_patch_at_all_positions_ranks_every_node_over_the_task(folder, tmp_path, capsys):
    """``patch --all-positions``: every head and MLP patched at every token, the nodes of largest mean effect as
    fractions of the mean whole over all of the task's examples — the library's figures — and a layer × head grid."""
    out = tmp_path / "heads.png"
    assert main(["patch", *_common(folder), "--all-positions", "--top", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("8 examples; logit_diff:") and out.stat().st_size > 0
    model, tokenizer = load_model(folder)
    task = tasks.load("ioi", tokenizer, size=8, seed=0, batch_size=4)
    _prints_top(printed, patch_nodes(trace(model), task.batches, task.metric).top(3, normalized=True))
    assert main(["patch", *_common(folder), "--all-positions", "--nodes", "m0,m1", "--method", "attribution"]) == 0
    assert "noising (to first order)" in capsys.readouterr().out
    assert main(["patch", *_common(folder), "--all-positions", "--nodes", "m0,a1.h0", "--ablation", "mean"]) == 0
    printed = capsys.readouterr().out
    mean = patch_nodes(trace(model), task.batches, task.metric, nodes=["m0", "a1.h0"], ablation="mean",
                       reference=task.batches)
    assert "with every node's output at its mean (means); noising, mean ablation" in printed
    _prints_top(printed, mean.top(2, normalized=True))
    assert main(["patch", *_common(folder), "--all-positions", "--nodes", "m0,a1.h0", "--metric", "kl"]) == 0
    printed = capsys.readouterr().out  # the divergence from the clean prediction: none on the clean prompts
    assert printed.startswith("8 examples; kl: ") and "0.000 on the clean prompts" in printed
    _prints_top(printed, patch_nodes(trace(model), task.batches, "kl", nodes=["m0", "a1.h0"]).top(2, normalized=True))
    with pytest.raises(SystemExit, match="leave out --spans"):
        main(["patch", *_common(folder), "--all-positions", "--spans"])
    with pytest.raises(SystemExit, match="add --all-positions"):
        main(["patch", *_common(folder), "--ablation", "zero"])


def test_patch_inputs_and_paths_rank_as_the_library_does(folder, tmp_path, capsys):
    """``patch --all-positions --inputs``: each head's q, k and v input and each MLP's input patched at every token,
    ranked as the library ranks them, drawn by layer and role; given inputs by position too.  ``--receivers``: each
    node patched into given inputs alone (path patching), everywhere and by position."""
    out = tmp_path / "qkv.png"
    assert main(["patch", *_common(folder), "--all-positions", "--inputs", "--top", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "the inputs whose patching at every token moves it most" in printed and out.stat().st_size > 0
    model, tokenizer = load_model(folder)
    task = tasks.load("ioi", tokenizer, size=8, seed=0, batch_size=4)
    _prints_top(printed, patch_inputs(trace(model), task.batches, task.metric).top(4, normalized=True))
    assert main(["patch", *_common(folder), "--all-positions", "--inputs", "m1,a1.h0<k>", "--ablation", "zero"]) == 0
    assert "with every input zero (means); noising, zero ablation" in capsys.readouterr().out
    assert main(["patch", *_common(folder), "--inputs", "a1.h0<k>,a1.h0<q>", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "a1.h0<k>" in printed and "a1.h0<q>" in printed
    with pytest.raises(SystemExit, match="leave out --nodes"):
        main(["patch", *_common(folder), "--inputs", "--nodes", "m0"])
    circuit = tmp_path / "c.json"
    Circuit(CircuitGraph.from_config(trace(model).graph.cfg), ["a0.h1->a1.h0<v>", "m0->m1"]).save(circuit)
    assert main(["patch", str(circuit), *_common(folder), "--all-positions", "--inputs"]) == 0
    printed = capsys.readouterr().out
    entered = patch_inputs(trace(model), task.batches, task.metric, inputs=["a1.h0<v>", "m1"])
    _prints_top(printed, entered.top(5, normalized=True))
    with pytest.raises(SystemExit, match="with a circuit, a bare --inputs patches the inputs its edges enter"):
        main(["patch", str(circuit), *_common(folder), "--inputs", "m1"])
    options = ["--all-positions", "--nodes", "a0.h1,m0", "--receivers", "a1.h0<q>,m1"]
    assert main(["patch", *_common(folder), *options]) == 0
    printed = capsys.readouterr().out
    paths = patch_nodes(trace(model), task.batches, task.metric, nodes=["a0.h1", "m0"], receivers=["a1.h0<q>", "m1"])
    assert "noising, into a1.h0<q>, m1 alone, the nodes whose patching" in printed
    _prints_top(printed, paths.top(2, normalized=True))
    assert main(["patch", *_common(folder), "--nodes", "a0.h1", "--receivers", "m1"]) == 0
    printed = capsys.readouterr().out
    assert "noising, into m1 alone, the tokens where patching each row" in printed and "a0.h1" in printed
    for wrong in (["--receivers", "m1"], ["--inputs", "--receivers", "m1"]):
        with pytest.raises(SystemExit, match="--receivers patches nodes' outputs into them"):
            main(["patch", *_common(folder), *wrong])
    with pytest.raises(SystemExit):
        main(["patch", *_common(folder), "--all-positions", "--inputs", "a1.h0"])
    assert "a1.h0 is a head, read through three inputs" in capsys.readouterr().err


def test_attention_by_span_averages_every_example_of_the_task(folder, tmp_path, capsys):
    """``attention --spans``: per head, the mean weight on IOI's spans from the last token (or S2's), and the mean
    direct share from each: the library's figures over all of the task's examples."""
    out, direct = tmp_path / "weights.png", tmp_path / "direct.png"
    assert main(["attention", *_common(folder), "--heads", "a1.h0,a0.h1", "--spans", "--out", str(out),
                 "--direct-out", str(direct)]) == 0
    printed = capsys.readouterr().out
    model, tokenizer = load_model(folder)
    task = tasks.load("ioi", tokenizer, size=8, seed=0, batch_size=4)
    cm, heads = trace(model), ["a1.h0", "a0.h1"]
    weights = torch.cat([attention_patterns(cm, b["clean"], b["attention_mask"], heads=heads).by_span(b["spans"])
                         for b in task.batches], 1).mean(1)
    shares = torch.cat([source_logits(cm, b["clean"], b["attention_mask"], heads=heads).by_span(
        b["spans"], b["correct"], b["incorrect"]) for b in task.batches], 1).mean(1)
    lines = [line.split() for line in printed.splitlines() if line.lstrip().startswith(("a1.h0", "a0.h1"))]
    assert len(lines) == 4 and out.stat().st_size > 0 and direct.stat().st_size > 0
    for line, expected in zip(lines, [*weights, *shares]):
        assert line[1::2] == ["IO", "S1", "S2", "END"]
        assert [float(v) for v in line[2::2]] == pytest.approx(expected.tolist(), abs=0.006)
    assert main(["attention", *_common(folder), "--heads", "a1.h0", "--spans", "--position", "S2"]) == 0
    assert "from S2:" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="names a span: add --spans"):
        main(["attention", *_common(folder), "--heads", "a1.h0", "--position", "S2"])


@pytest.mark.parametrize("method, says", [("attribution", "noising (to first order)"),
                                          ("attribution-ig", "noising (by integrated gradients, 2 steps)")])
def test_patch_by_attribution_reads_given_nodes_from_gradients(folder, capsys, method, says):
    steps = ["--steps", "2"] if method == "attribution-ig" else []  # attribution takes none
    assert main(["patch", *_common(folder), "--nodes", "a1.h0,m0", "--method", method, *steps, "--top", "1"]) == 0
    printed = capsys.readouterr().out
    assert says in printed
    rows = {line.split()[0]: line for line in printed.splitlines() if line.lstrip().startswith(("a1.h0", "m0"))}
    model, tokenizer = load_model(folder)
    task = tasks.load("ioi", tokenizer, size=8, seed=0, batch_size=4)
    effects = patch_by_position(trace(model), task.batches[0], task.metric, nodes=["a1.h0", "m0"], method=method,
                                steps=2)
    values, positions = effects.example(0, normalized=True)  # example 0: the first batch's first row
    for unit, row in zip(effects.units, values):
        (cell,) = re.findall(r"@(\d+) ([-+]\d+\.\d\d)", rows[unit])
        assert int(cell[0]) == int(positions[row.abs().argmax()])
        assert float(cell[1]) == pytest.approx(float(row[row.abs().argmax()]), abs=0.006)


def test_every_command_the_readme_shows_parses():
    """Each ``fxcircuits …`` line of the README's shell examples is a command the parser takes, options and all: a
    renamed option would otherwise leave the README wrong and no test failing."""
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, flags=re.S)
    lines = [line.split(" && ")[-1] for block in blocks for line in block.splitlines()]
    commands = [shlex.split(line, comments=True)[1:] for line in lines if line.startswith("fxcircuits ")]
    assert len(commands) > 20
    parser = cli._parser()
    for argv in commands:
        args = parser.parse_args(argv)
        assert args.command == argv[0] and callable(args.run)
