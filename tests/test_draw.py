"""Pictures: every circuit node and edge drawn once (found by id in the SVG), q/k/v told apart, widths by |score|."""
import xml.etree.ElementTree as ET
from collections import Counter

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fxcircuits.circuit import Circuit
from fxcircuits.draw import (COMPARISON_COLOURS, PORT_COLOURS, SEVERAL_SPANS, SIGN_COLOURS, SPAN_COLOURS, _layout,
                             draw_circuit, draw_comparison, draw_span_circuit, plot_faithfulness, plot_heatmap,
                             plot_inputs, plot_nodes)
from fxcircuits.graph import CircuitGraph
from fxcircuits.positional import SpanCircuit

LEFT_OUT = "a1.h2"  # no edge of the test circuits touches this head
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_graph(parallel: bool) -> CircuitGraph:
    return CircuitGraph.from_config({"n_layers": 4, "n_heads": 4, "parallel_attn_mlp": parallel, "d_model": 8})


def signed_circuit(graph: CircuitGraph, size: int = 60, scored: bool = True) -> Circuit:
    """The ``size`` edges of largest |score| (scores of both signs) that avoid ``LEFT_OUT``, plus all three inputs
    of one head, so q, k and v ports of one head are in use."""
    scores = torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0))
    allowed = torch.tensor([LEFT_OUT not in name for name in graph.edges])
    chosen = torch.where(allowed, scores.abs(), -1.0).topk(size).indices
    edges = {graph.edges[i] for i in chosen.tolist()} | {f"input->a2.h1<{role}>" for role in "qkv"}
    return Circuit(graph, sorted(edges), scores if scored else None)


def svg_ids(path) -> Counter:
    return Counter(element.get("id") for element in ET.parse(path).iter() if element.get("id") is not None)


def artist(fig, gid: str):
    (found,) = fig.findobj(lambda a: a.get_gid() == gid)
    return found


@pytest.mark.parametrize("parallel", [False, True])
def test_svg_has_every_circuit_node_and_edge_once(tmp_path, parallel):
    graph = make_graph(parallel)
    circuit = signed_circuit(graph)
    path = tmp_path / "circuit.svg"
    draw_circuit(circuit, path)
    ids = svg_ids(path)
    for name in circuit.nodes + circuit.edges:
        assert ids[name] == 1, name
    assert LEFT_OUT not in ids and set(graph.nodes) & set(ids) == set(circuit.nodes)
    assert set(graph.edges) & set(ids) == set(circuit.edges)


def test_a_hybrid_draws_each_writer_in_its_own_row(tmp_path):
    """Layers without attention (Qwen3.5's linear attention: MLP nodes) get rows of their own, in stream order."""
    kinds = ["mlp", "mlp", "attention", "mlp", "mlp", "mlp", "attention", "mlp"]
    layers = [0, 1, 0, 2, 3, 4, 1, 5]
    writers = [[kind, layer, 4 if kind == "attention" else 0, step]
               for step, (kind, layer) in enumerate(zip(kinds, layers))]
    graph = CircuitGraph.from_config({"n_layers": 2, "n_heads": 4, "parallel_attn_mlp": False, "d_model": 8,
                                      "writers": writers})
    scores = torch.randn(len(graph.edges), generator=torch.Generator().manual_seed(0))
    circuit = Circuit(graph, [graph.edges[i] for i in scores.abs().topk(40).indices.tolist()], scores)
    path = tmp_path / "circuit.svg"
    draw_circuit(circuit, path)
    ids = svg_ids(path)
    assert all(ids[name] == 1 for name in circuit.nodes + circuit.edges)
    xy = _layout(graph, set(graph.nodes), compact=False).xy
    heights = [xy[name][1] for name in ("input", "m0", "m1", "a0.h0", "m2", "m3", "m4", "a1.h3", "m5", "logits")]
    assert heights == sorted(set(heights)) and xy["a0.h0"][1] == xy["a0.h3"][1]


def test_a_comparison_draws_both_circuits_edges_coloured_by_which_holds_them(tmp_path):
    graph = make_graph(False)
    first, second = signed_circuit(graph, 60), Circuit(graph, graph.edges[::7])
    path = tmp_path / "both.svg"
    fig = draw_comparison(first, second, path, labels=("eap", "acdc"))
    ids = svg_ids(path)
    union = set(first.edges) | set(second.edges)
    assert all(ids[name] == 1 for name in union) and set(graph.edges) & set(ids) == union
    assert set(graph.nodes) & set(ids) == set(first.nodes) | set(second.nodes)
    holders = set()
    for name in union:
        held = ("both" if name in first and name in second else "first" if name in first else "second")
        holders.add(held)
        assert np.allclose(artist(fig, name).get_edgecolor()[:3], _rgb(COMPARISON_COLOURS[held])), name
    assert holders == {"both", "first", "second"}
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend[:3] == ["in both", "only in eap", "only in acdc"]
    shared = len(set(first.edges) & set(second.edges))
    assert fig.axes[0].get_title() == (f"eap: {len(first)} edges, acdc: {len(second)} edges, {shared} shared "
                                       f"(IoU {shared / len(union):.2f})")


def test_a_positional_circuit_draws_each_edge_coloured_by_its_span(tmp_path):
    """Every edge kept at some span drawn once, in its span's colour, or the colour of several; widths follow the
    largest |score| among its spans."""
    graph = make_graph(False)
    edges = signed_circuit(graph, 40).edges
    kept = {"S2": edges[:25], "END": edges[15:], "rest": []}
    scores = torch.randn(3, len(graph.edges), generator=torch.Generator().manual_seed(1))
    circuit = SpanCircuit(graph, ["S2", "END", "rest"], kept, scores)
    path = tmp_path / "by_span.svg"
    fig = draw_span_circuit(circuit, path)
    ids = svg_ids(path)
    assert all(ids[name] == 1 for name in edges) and set(graph.edges) & set(ids) == set(edges)
    for name in edges:
        held = [s for s in ("S2", "END") if name in kept[s]]
        colour = SEVERAL_SPANS if len(held) == 2 else SPAN_COLOURS[circuit.spans.index(held[0])]
        assert np.allclose(artist(fig, name).get_edgecolor()[:3], _rgb(colour)), name
    legend = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
    assert legend[:3] == ["at S2", "at END", "at several"]
    assert not set(SPAN_COLOURS) & {*PORT_COLOURS.values(), *SIGN_COLOURS.values()}  # spans read apart from ports
    assert fig.axes[0].get_title().startswith(f"{len(circuit)} (edge, span) pairs (S2 25, END {len(edges) - 15}, "
                                              "rest 0)")
    widest = max(edges, key=lambda e: max(abs(float(scores[circuit.spans.index(s), graph.edge_index[e]]))
                                          for s in ("S2", "END") if e in kept[s]))
    assert artist(fig, widest).get_linewidth() == max(artist(fig, e).get_linewidth() for e in edges)


def test_png_is_written(tmp_path):
    path = tmp_path / "circuit.png"
    draw_circuit(signed_circuit(make_graph(False)), path, title="test")
    assert path.read_bytes()[:8] == PNG_MAGIC


def test_qkv_inputs_end_at_their_own_ports():
    fig = draw_circuit(signed_circuit(make_graph(False)))
    ends = {role: tuple(artist(fig, f"input->a2.h1<{role}>").get_path().vertices[-1]) for role in "qkv"}
    assert len(set(ends.values())) == 3
    for role, end in ends.items():
        assert np.allclose(artist(fig, f"a2.h1<{role}>").center, end)


def test_width_grows_with_abs_score_and_colour_follows_sign():
    circuit = signed_circuit(make_graph(False))
    fig = draw_circuit(circuit)
    scores = circuit.scores[circuit.in_graph].tolist()
    edges = [artist(fig, name) for name in circuit.edges]
    widths = [edge.get_linewidth() for _, edge in sorted(zip(map(abs, scores), edges), key=lambda pair: pair[0])]
    assert all(a <= b for a, b in zip(widths, widths[1:])) and widths[0] < widths[-1]
    colours = {score > 0: edge.get_edgecolor()[:3] for score, edge in zip(scores, edges)}
    assert np.allclose(colours[True], _rgb(SIGN_COLOURS["positive"]))
    assert np.allclose(colours[False], _rgb(SIGN_COLOURS["negative"]))


def test_unscored_edges_are_uniform():
    circuit = signed_circuit(make_graph(True), scored=False)
    fig = draw_circuit(circuit)
    assert len({artist(fig, name).get_linewidth() for name in circuit.edges}) == 1


@pytest.mark.parametrize("parallel", [False, True])
def test_layout_rows(parallel):
    """Layers go up; an MLP sits above its layer's heads, or beside them when parallel."""
    graph = make_graph(parallel)
    circuit = Circuit(graph, ["input->a0.h0<q>", "a0.h0->a1.h0<q>", "a0.h0->m1", "m1->a3.h0<v>", "a1.h0->a3.h0<k>",
                              "a3.h0->logits"])
    fig = draw_circuit(circuit)
    y = {name: artist(fig, name).center[1] if name.startswith("a") else _box_centre(artist(fig, name))[1]
         for name in circuit.nodes}
    assert y["input"] < y["a0.h0"] < y["a1.h0"] < y["a3.h0"] < y["logits"]
    if parallel:
        assert y["m1"] == pytest.approx(y["a1.h0"])
    else:
        assert y["a1.h0"] < y["m1"] < y["a3.h0"]


def test_full_graph_positions_without_compaction():
    """With ``compact=False`` a node sits at the same place whatever else the circuit holds."""
    graph = make_graph(False)
    small = Circuit(graph, ["input->a3.h1<k>", "a3.h1->logits"])
    centres = [artist(draw_circuit(c, compact=False), "a3.h1").center for c in (small, signed_circuit(graph))]
    assert np.allclose(*centres)
    compact = artist(draw_circuit(small), "a3.h1").center
    assert compact[1] < centres[0][1]  # the empty layers below shrank


def test_empty_circuit_and_given_axes(tmp_path):
    fig = Figure(figsize=(4, 6))
    FigureCanvasAgg(fig)
    assert draw_circuit(Circuit(make_graph(False), []), tmp_path / "empty.svg", ax=fig.add_subplot()) is fig
    assert ET.parse(tmp_path / "empty.svg").getroot().tag.endswith("svg")


def test_unsupported_suffix(tmp_path):
    circuit = signed_circuit(make_graph(False))
    for draw in (lambda p: draw_circuit(circuit, p), lambda p: plot_faithfulness([1], [1], p),
                 lambda p: plot_heatmap([[1.0]], ["r"], ["c"], p)):
        with pytest.raises(ValueError, match=r"\.png or \.svg"):
            draw(tmp_path / "figure.jpg")
    assert not (tmp_path / "figure.jpg").exists()


def test_faithfulness_curves_share_axes(tmp_path):
    fig = plot_faithfulness(torch.tensor([10, 100, 1000]), torch.tensor([0.2, 0.7, 0.95]), label="EAP")
    plot_faithfulness([10, 100, 1000], [0.1, 0.5, 1.02], tmp_path / "faith.png", ax=fig.axes[0], label="EAP-IG")
    ax = fig.axes[0]
    assert [line.get_label() for line in ax.lines if line.get_gid() is None] == ["EAP", "EAP-IG"]
    assert sorted(line.get_ydata()[0] for line in ax.lines if line.get_gid()) == [0, 1]
    assert (tmp_path / "faith.png").read_bytes()[:8] == PNG_MAGIC


def test_heatmap_annotations_match_values(tmp_path):
    values = torch.tensor([[0.123, -1.5, 2.0], [3.25, 0.0, -0.5]])
    fig = plot_heatmap(values, ["L0", "L1"], ["the", "cat", "sat"], tmp_path / "lens.svg", title="logit lens")
    texts = [float(t.get_text()) for t in fig.axes[0].texts]
    assert texts == pytest.approx(values.flatten().tolist(), abs=0.005)
    assert ET.parse(tmp_path / "lens.svg").getroot().tag.endswith("svg")
    assert not plot_heatmap(torch.zeros(30, 30), list(map(str, range(30))), list(map(str, range(30)))).axes[0].texts
    with pytest.raises(ValueError, match="expected"):
        plot_heatmap(values, ["L0"], ["the", "cat", "sat"])


def test_values_by_node_lie_by_layer_and_head(tmp_path):
    """A row per layer, a column per head and one for the MLPs; a model with MLP-like mixers alone (Mamba) has that
    column only.  Cells left out are blank — not coloured, not annotated, not counted in the colour scale."""
    graph = CircuitGraph.from_config({"n_layers": 2, "n_heads": 3, "parallel_attn_mlp": False})
    nodes = graph.upstream[1:]  # a0.h0 a0.h1 a0.h2 m0 a1.h0 …
    values = torch.arange(len(nodes), dtype=torch.float) - 3
    axes = plot_nodes(graph, nodes, values, tmp_path / "nodes.svg").axes[0]
    grid = axes.images[0].get_array()
    assert [t.get_text() for t in axes.get_xticklabels()] == ["h0", "h1", "h2", "mlp"]
    assert grid.tolist() == [[-3, -2, -1, 0], [1, 2, 3, 4]] and len(axes.texts) == 8
    some = ["a1.h2", "m0"]
    axes = plot_nodes(graph, some, torch.tensor([-0.5, 0.25])).axes[0]
    image = axes.images[0]
    assert image.get_array().mask.sum() == 6 and [float(t.get_text()) for t in axes.texts] == [0.25, -0.5]
    assert (image.norm.vmin, image.norm.vmax) == (-0.5, 0.5)  # diverging around 0, the blanks aside
    mixers = CircuitGraph.from_config({"n_layers": 0, "n_heads": 0, "parallel_attn_mlp": False,
                                       "writers": [["mlp", 0, 1, 0], ["mlp", 1, 1, 1]]})
    axes = plot_nodes(mixers, ["m0", "m1"], [1.0, 2.0]).axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["mlp"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["L0", "L1"]
    with pytest.raises(ValueError, match=r"expected \[2\], one per name"):
        plot_nodes(graph, some, [1.0])
    with pytest.raises(KeyError, match="'a2.h0' is not an upstream node"):
        plot_nodes(graph, ["a2.h0"], [1.0])


def test_a_hybrids_values_lie_in_rows_of_its_blocks():
    """RecurrentGemma's writers (recurrent block, MLP, recurrent block, MLP, then attention and MLP) count attention
    and the rest apart: its heads a0 share a row with m4, the MLP after them, not with m0, and rows are named by
    their nodes, each node in a cell of its own."""
    writers = [["mlp", 0, 0, 0], ["mlp", 1, 0, 1], ["mlp", 2, 0, 2], ["mlp", 3, 0, 3], ["attention", 0, 2, 4],
               ["mlp", 4, 0, 5]]
    graph = CircuitGraph.from_config({"n_layers": 1, "n_heads": 2, "parallel_attn_mlp": False, "writers": writers})
    nodes = graph.upstream[1:]
    axes = plot_nodes(graph, nodes, torch.arange(len(nodes), dtype=torch.float)).axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["m0", "m1", "m2", "m3", "a0 m4"]
    grid = axes.images[0].get_array()
    assert grid[4].tolist() == [nodes.index("a0.h0"), nodes.index("a0.h1"), nodes.index("m4")]
    assert grid.count() == len(nodes)


def test_values_by_input_lie_by_layer_and_role(tmp_path):
    """A column per head and role, the queries first, then the MLPs' inputs; ``logits`` in a row of its own at the
    end.  Names that are nodes, not inputs, are refused."""
    graph = CircuitGraph.from_config({"n_layers": 2, "n_heads": 2, "parallel_attn_mlp": False})
    inputs = graph.downstream  # a0.h0<q> a0.h1<q> a0.h0<k> … m0 a1.h0<q> … m1 logits
    values = torch.arange(len(inputs), dtype=torch.float)
    axes = plot_inputs(graph, inputs, values, tmp_path / "inputs.png").axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["h0<q>", "h1<q>", "h0<k>", "h1<k>", "h0<v>", "h1<v>",
                                                              "mlp"]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["L0", "L1", "logits"]
    grid = axes.images[0].get_array()
    assert grid[:2].tolist() == [list(range(7)), list(range(7, 14))] and grid[2, 0] == 14 and grid.mask[2].sum() == 6
    axes = plot_inputs(graph, ["a1.h1<v>", "m0"], [0.5, -1.0]).axes[0]
    grid = axes.images[0].get_array()
    assert (grid[1, 5], grid[0, 6]) == (0.5, -1.0) and grid.mask.sum() == 12
    assert [t.get_text() for t in axes.get_yticklabels()] == ["L0", "L1"]
    with pytest.raises(KeyError, match="a0.h1 is a head, read through three inputs"):
        plot_inputs(graph, ["a0.h1"], [1.0])
    with pytest.raises(ValueError, match=r"expected \[1\], one per name"):
        plot_inputs(graph, ["m0"], [1.0, 2.0])


def _rgb(hex_colour: str) -> tuple[float, float, float]:
    return tuple(int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5))


def _box_centre(patch) -> tuple[float, float]:
    return patch.get_x() + patch.get_width() / 2, patch.get_y() + patch.get_height() / 2
