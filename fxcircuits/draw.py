"""Pictures of circuits, faithfulness curves, logit-lens heatmaps and values by node, drawn with matplotlib alone.

Every function returns a ``matplotlib.figure.Figure`` and, given a ``path``, saves it as SVG or PNG by the
path's suffix.  Figures are built on the non-interactive Agg canvas, never through ``pyplot``, so drawing works
without a display and leaves no global figure state behind.

In ``draw_circuit`` each node and edge artist carries its name as ``gid`` (and a head's q/k/v port its input
name, ``a2.h1<k>``), so an SVG has one element with ``id="a0.h3->a2.h1<k>"`` per edge: a picture can be
checked, or restyled, by name.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Circle, FancyBboxPatch, PathPatch
from matplotlib.path import Path as BezierPath

from .circuit import Circuit
from .graph import QKV, CircuitGraph
from .positional import SpanCircuit

SUFFIXES = (".png", ".svg")

# Layout in data units (axes have equal aspect, so circles stay round).
COLUMN = 1.3  # between head columns; wider than the gap between rows, as deep models make tall pictures
HEAD_RADIUS = 0.24
PORT_RADIUS = 0.065
PORT_ANGLES = {"q": 215.0, "k": 270.0, "v": 325.0}  # where on a head's rim each input enters, in degrees
BOX = {"mlp": (0.9, 0.34), "end": (1.8, 0.4)}  # (width, height) of an MLP and of input / logits
ROW_GAP = {"heads": 0.9, "mlp": 0.55, "end": 1.2}  # distance from the row below, by what the row holds
COMPACT = 0.2  # rows without a drawn node keep this fraction of their gap: order stays, empty space goes
CURVE, MAX_BEND = 0.15, 1.2  # an edge's sideways pull (fraction of its length, at most MAX_BEND): it bulges half that
MARGIN = (0.8, 0.75)  # room beside the outer columns for bulging edges, and above and below the end boxes

# Sizes scale with the picture: this many inches per data unit at most, and never a taller figure than this.
MAX_INCHES_PER_UNIT, MAX_HEIGHT_INCHES = 0.9, 36.0
LABEL_SIZE = 0.13  # node label font height, in data units
EDGE_WIDTH = (0.3, 2.4)  # edge linewidth range (points per inch of data unit), weakest to strongest |score|

SIGN_COLOURS = {"positive": "#2166ac", "negative": "#b2182b", "unscored": "#666666"}
COMPARISON_COLOURS = {"both": "#542788", "first": "#1b7837", "second": "#e08214"}  # which circuit holds an edge
# by span, in order: none of the ports' colours, nor the signs'
SPAN_COLOURS = ("#d95f02", "#1f78b4", "#e7298a", "#8c510a", "#17becf", "#fb9a99", "#000080")
SEVERAL_SPANS = "#333333"  # an edge a positional circuit keeps at more than one span
PORT_COLOURS = {"q": "#1b9e77", "k": "#e6ab02", "v": "#7570b3"}
NODE_COLOURS = {"head": "#fbfbfb", "mlp": "#e3e3e3", "end": "#d0d0d0"}


@dataclass(frozen=True)
class _Layout:
    """Where every node of the full graph sits; ``ticks`` name the rows that hold drawn nodes.  Nodes span
    [0, width] × [0, height]; the axes show that with ``MARGIN`` around it."""
    xy: dict[str, tuple[float, float]]
    ticks: list[tuple[float, str]]
    width: float
    height: float

    @property
    def extent(self) -> tuple[float, float]:
        return self.width + 2 * MARGIN[0], self.height + 2 * MARGIN[1]


def draw_circuit(circuit: Circuit, path: str | Path | None = None, *, ax: Axes | None = None,
                 title: str | None = None, compact: bool = True) -> Figure:
    """Draw ``circuit`` bottom (``input``) to top (``logits``), one row per layer's heads and one per MLP.

    Nodes keep their full-graph places (head ``h`` of every layer in column ``h``; the MLP above its layer's
    heads, or beside them when attention and MLP run in parallel), so pictures of two circuits of one model line
    up.  Only the circuit's nodes are drawn, and with ``compact`` the rows left empty shrink instead of leaving
    gaps.  Edges end on the q, k or v port of a head; their width follows |score| and their colour its sign
    (grey when the circuit has no scores).  Call ``circuit.pruned()`` first to leave out dangling pieces.
    """
    if circuit.scores is None:
        scores, strength = np.full(len(circuit), np.nan), np.full(len(circuit), 0.5)
    else:
        scores = circuit.scores[circuit.in_graph].numpy()
        strength = np.abs(scores) / max(np.abs(scores).max(initial=0.0), 1e-12)
    colours = [_sign_colour(score) for score in scores]
    signs = ("positive", "negative") if circuit.scores is not None else ("unscored",)
    key = [(SIGN_COLOURS[s], f"{s} score" if circuit.scores is not None else "edge") for s in signs]
    title = title if title is not None else f"{len(circuit)} edges, {len(circuit.nodes)} nodes"
    return _draw(circuit, colours, strength, key, path, ax, title, compact)


def draw_comparison(first: Circuit, second: Circuit, path: str | Path | None = None, *,
                    labels: tuple[str, str] = ("first", "second"), ax: Axes | None = None, title: str | None = None,
                    compact: bool = True) -> Figure:
    """Two circuits of one model in one picture, laid out as ``draw_circuit`` lays out each: every edge of
    either, coloured by which of them holds it (``labels`` name them in the key), so where two methods, tasks or
    models agree and where they part reads at a glance."""
    union = first | second
    mine, theirs = (c.edge_mask(union.graph).bool()[union.in_graph].tolist() for c in (first, second))
    held = ["both" if a and b else "first" if a else "second" for a, b in zip(mine, theirs)]
    colours = [COMPARISON_COLOURS[h] for h in held]
    strength = np.array([1.0 if h == "both" else 0.5 for h in held])  # shared edges on top
    key = [(COMPARISON_COLOURS["both"], "in both"), (COMPARISON_COLOURS["first"], f"only in {labels[0]}"),
           (COMPARISON_COLOURS["second"], f"only in {labels[1]}")]
    overlap = first.overlap(second)
    title = title if title is not None else (f"{labels[0]}: {len(first)} edges, {labels[1]}: {len(second)} edges, "
                                             f"{overlap['shared_edges']} shared (IoU {overlap['edge_iou']:.2f})")
    return _draw(union, colours, strength, key, path, ax, title, compact)


def draw_span_circuit(circuit: SpanCircuit, path: str | Path | None = None, *, ax: Axes | None = None,
                      title: str | None = None, compact: bool = True) -> Figure:
    """A positional circuit (``fxcircuits.positional``) laid out as ``draw_circuit`` lays out a circuit: every edge
    it keeps at some span, coloured by that span (``SPAN_COLOURS`` in the order of ``circuit.spans``; one colour for
    an edge kept at several), its width by its largest |score| among them."""
    union = circuit.union()
    kept = circuit.in_graph[:, union.in_graph]  # [spans, edges drawn]
    colour = {s: SPAN_COLOURS[i % len(SPAN_COLOURS)] for i, s in enumerate(circuit.spans)}
    held = [[s for s, k in zip(circuit.spans, column) if k] for column in kept.T.tolist()]
    colours = [colour[h[0]] if len(h) == 1 else SEVERAL_SPANS for h in held]
    if circuit.scores is None:
        strength = np.full(len(held), 0.5)
    else:
        best = (circuit.scores[:, union.in_graph].abs() * kept).amax(0).numpy()
        strength = best / max(best.max(initial=0.0), 1e-12)
    shown = [s for s in circuit.spans if any(len(h) == 1 and h[0] == s for h in held)]
    key = [(colour[s], f"at {s}") for s in shown] + [(SEVERAL_SPANS, "at several")] * any(len(h) > 1 for h in held)
    title = title if title is not None else f"{circuit.extent()}, {len(union.nodes)} nodes"
    return _draw(union, colours, strength, key, path, ax, title, compact)


def _draw(circuit: Circuit, colours: list[str], strength: np.ndarray, key: list[tuple[str, str]],
          path: str | Path | None, ax: Axes | None, title: str, compact: bool) -> Figure:
    """Lay out ``circuit``'s nodes and draw its edges in ``colours``, widths and opacities by ``strength`` (0 to
    1, in ``circuit.edges`` order), with ``key`` (colour, label) for the edges in the legend."""
    _check_suffix(path)
    nodes = circuit.nodes
    layout = _layout(circuit.graph, set(nodes), compact)
    fig, ax = _circuit_axes(ax, layout)
    ax.set_title(title, fontsize=10)
    _legend(ax, key)
    scale = _inches_per_unit(ax, layout)
    _draw_edges(ax, circuit.edges, colours, strength, layout.xy, scale)
    for name in nodes:
        _draw_node(ax, name, layout.xy[name], scale)
    _draw_ports(ax, circuit.edges, layout.xy)
    ax.set_yticks([y for y, _ in layout.ticks], [label for _, label in layout.ticks], fontsize=LABEL_SIZE * 72 * scale)
    return _save(fig, path)


def plot_faithfulness(sizes: Sequence[float] | torch.Tensor, faithfulness: Sequence[float] | torch.Tensor,
                      path: str | Path | None = None, *, ax: Axes | None = None, label: str | None = None,
                      xscale: str = "log") -> Figure:
    """Faithfulness against circuit size (edge counts, or fractions of the graph's edges when all are ≤ 1).

    Lines at 0 (as bad as the corrupted run) and 1 (as good as the full model) frame the curve.  Pass the
    returned figure's axes back as ``ax`` with another ``label`` to compare methods on one plot."""
    _check_suffix(path)
    sizes, faithfulness = _numpy(sizes).ravel(), _numpy(faithfulness).ravel()
    if sizes.shape != faithfulness.shape:
        raise ValueError(f"{sizes.size} sizes but {faithfulness.size} faithfulness values")
    fig, ax = _axes(ax, size=(6.0, 4.0))
    for level in (0, 1):
        if not any(line.get_gid() == f"faithfulness={level}" for line in ax.lines):
            ax.axhline(level, color="#999999", linestyle="--", linewidth=0.8, gid=f"faithfulness={level}")
    ax.plot(sizes, faithfulness, marker="o", markersize=3, linewidth=1.5, label=label)
    ax.set_xscale(xscale)
    ax.set_xlabel("fraction of edges in the circuit" if sizes.max(initial=0) <= 1 else "edges in the circuit")
    ax.set_ylabel("faithfulness")
    if label is not None:
        ax.legend(frameon=False)
    return _save(fig, path)


def plot_heatmap(values, row_labels: Sequence[str], col_labels: Sequence[str], path: str | Path | None = None, *,
                 ax: Axes | None = None, title: str | None = None, cmap: str | None = None,
                 limits: tuple[float, float] | None = None, annotate: bool = True, fmt: str = "{:.2f}",
                 max_annotated: int = 400) -> Figure:
    """A grid of ``values`` [rows, cols] (a tensor or array), e.g. the logit lens over layer × position.

    With no ``cmap``, values of both signs get a diverging map centred on 0 (so 0 is white and signs read at a
    glance) and one-signed values ``viridis``; a given ``cmap`` spans the values' range, or ``limits`` (low, high)
    where given (probabilities read on 0 to 1).  Cells carry their value, as ``fmt`` writes it, when ``annotate``
    and the grid has at most ``max_annotated`` cells; beyond that the numbers would not fit."""
    _check_suffix(path)
    grid = _numpy(values)
    if grid.ndim != 2 or grid.shape != (len(row_labels), len(col_labels)):
        raise ValueError(f"values have shape {grid.shape}; expected [{len(row_labels)}, {len(col_labels)}] "
                         "(one row per row label, one column per column label)")
    fig, ax = _axes(ax, size=(min(2.5 + 0.6 * grid.shape[1], 30), min(1.5 + 0.4 * grid.shape[0], 30)))
    image = ax.imshow(grid, aspect="auto", **_colour_scale(grid, cmap, limits))
    fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    ax.set_xticks(range(grid.shape[1]), col_labels, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(grid.shape[0]), row_labels)
    if annotate and grid.size <= max_annotated:
        _annotate(ax, image, grid, fmt)
    if title is not None:
        ax.set_title(title)
    return _save(fig, path)


def plot_nodes(graph: CircuitGraph, nodes: Sequence[str], values, path: str | Path | None = None, *,
               ax: Axes | None = None, title: str | None = None, fmt: str = "{:+.2f}") -> Figure:
    """A value per node (``values`` [len(nodes)]: what patching it does, its direct share of the answer) laid out
    as the model is: a row per layer, a column per head and one for the layer's MLP — the layer × head picture of
    activation-patching studies (a hybrid's rows are its blocks, ``CircuitGraph.blocks``, named by their nodes).
    A row for ``input`` leads where it is among ``nodes``; cells of nodes the model lacks, or that ``nodes`` leaves
    out, stay blank."""
    unknown = [name for name in nodes if name not in graph.node_index]
    if unknown:
        raise KeyError(graph.not_a_node(unknown[0]))
    return _plot_cells(_grid(graph, ("",), "input" in nodes, False), nodes, values, path, ax, title, fmt)


def plot_inputs(graph: CircuitGraph, inputs: Sequence[str], values, path: str | Path | None = None, *,
                ax: Axes | None = None, title: str | None = None, fmt: str = "{:+.2f}") -> Figure:
    """A value per downstream input (``values`` [len(inputs)]: what patching it does) laid out as ``plot_nodes``
    lays out nodes, with a column for each head's query, key and value input (``h0<q>`` …, all queries first, so
    each role reads as a block) and one for the MLP's input; a row for ``logits`` ends the grid where it is among
    ``inputs``.  One colour scale for all, so a head's roles compare at a glance."""
    unknown = [name for name in inputs if name not in graph.port_index]
    if unknown:
        raise KeyError(graph.not_an_input(unknown[0]))
    return _plot_cells(_grid(graph, QKV, False, "logits" in inputs), inputs, values, path, ax, title, fmt)


def _plot_cells(grid: tuple[list[str], list[str], dict[str, tuple[int, int]]], names: Sequence[str], values,
                path: str | Path | None, ax: Axes | None, title: str | None, fmt: str) -> Figure:
    """``values``, one per name, each in its cell of ``grid`` (rows, columns, cells), as a heatmap."""
    values = _numpy(values)
    if values.shape != (len(names),):
        raise ValueError(f"values have shape {values.shape}; expected [{len(names)}], one per name")
    rows, columns, cell = grid
    cells = np.full((len(rows), len(columns)), np.nan)
    for name, value in zip(names, values):
        cells[cell[name]] = value
    return plot_heatmap(cells, rows, columns, path, ax=ax, title=title, fmt=fmt)


def _grid(graph: CircuitGraph, roles: Sequence[str], with_input: bool,
          with_logits: bool) -> tuple[list[str], list[str], dict[str, tuple[int, int]]]:
    """Rows (a block's, ``CircuitGraph.blocks``: ``L{layer}``, after ``input`` and before ``logits`` where asked
    for), columns (per role, ``h0`` … — ``h0<q>`` … where ``roles`` are q, k and v — then ``mlp``), and each name's
    cell: a head's per role (its inputs', or its own for the role ``""``), an MLP's in the last column, ``input``
    and ``logits`` in the first."""
    blocks = graph.blocks
    n_heads = max((w.n_heads for w in graph.writers if w.kind == "attention"), default=0)
    suffix = {role: f"<{role}>" if role else "" for role in roles}
    columns = [f"h{h}{suffix[role]}" for role in roles for h in range(n_heads)]
    columns += ["mlp"] * any(w.kind == "mlp" for w in graph.writers)
    first = int(with_input)
    cell = {"input": (0, 0)} if with_input else {}
    for row, w in ((first + index, w) for index, block in enumerate(blocks) for w in block.writers):
        if w.kind == "attention":
            cell.update({f"{head}{suffix[role]}": (row, r * n_heads + h)
                         for r, role in enumerate(roles) for h, head in enumerate(w.nodes)})
        else:
            cell[w.name] = (row, len(columns) - 1)
    if with_logits:
        cell["logits"] = (first + len(blocks), 0)
    rows = ["input"] * with_input + [block.name for block in blocks] + ["logits"] * with_logits
    return rows, columns, cell


# ---- layout -------------------------------------------------------------------------------------------------


def _rows(graph: CircuitGraph) -> list[tuple[str, str, list[str]]]:
    """The full graph's rows, bottom to top, as (kind, tick label, node names): one per residual step, its heads
    (and the MLP beside them when parallel) or its MLP."""
    rows = [("end", "", ["input"])]
    for step in sorted({w.step for w in graph.writers}):
        writers = [w for w in graph.writers if w.step == step]
        attention = [w for w in writers if w.kind == "attention"]
        heads = [node for w in attention for node in w.nodes]
        mlps = [w.name for w in writers if w.kind == "mlp"]
        rows.append(("heads", f"L{attention[0].layer}", heads + mlps) if attention else ("mlp", "", mlps))
    return rows + [("end", "", ["logits"])]


def _column(name: str, graph: CircuitGraph) -> float:
    """Head ``h`` in column ``h``; an MLP beside the heads when parallel, else centred; input and logits centred."""
    beside = COLUMN * (graph.n_heads - 0.3)
    if name.startswith("a"):
        return COLUMN * int(name.split(".h")[1])
    if name.startswith("m") and graph.parallel_attn_mlp:
        return beside
    return (beside if graph.parallel_attn_mlp else COLUMN * (graph.n_heads - 1)) / 2


def _layout(graph: CircuitGraph, drawn: set[str], compact: bool) -> _Layout:
    """Full-graph positions; with ``compact``, rows with no drawn node shrink to ``COMPACT`` of their gap."""
    xy, ticks, y = {}, [], 0.0
    for index, (kind, label, names) in enumerate(_rows(graph)):
        occupied = not drawn.isdisjoint(names)
        if index:
            y += ROW_GAP[kind] * (1.0 if occupied or not compact else COMPACT)
        xy.update({name: (_column(name, graph), y) for name in names})
        if occupied and label:
            ticks.append((y, label))
    return _Layout(xy, ticks, max(x for x, _ in xy.values()), y)


def _port(head_xy: tuple[float, float], role: str) -> tuple[float, float]:
    """Where input ``role`` (q, k or v) enters a head: its own point on the lower rim."""
    angle = np.radians(PORT_ANGLES[role])
    return head_xy[0] + HEAD_RADIUS * np.cos(angle), head_xy[1] + HEAD_RADIUS * np.sin(angle)


def _kind(name: str) -> str:
    """``head``, ``mlp`` or ``end`` (input and logits): what shape a node gets."""
    if name in ("input", "logits"):
        return "end"
    return "head" if name.startswith("a") else "mlp"


def _attach(name: str, xy: dict[str, tuple[float, float]], toward: float, side: int) -> tuple[float, float]:
    """Where an edge meets a node's top (``side`` 1) or bottom (-1): a head at its centre line, a box at the
    point of its width nearest the other end (``toward``, an x), which fans the many edges of input and logits."""
    x, y = xy[name]
    kind = _kind(name)
    if kind == "head":
        return x, y + side * HEAD_RADIUS
    width, height = BOX[kind]
    reach = width / 2 - 0.1
    return float(np.clip(toward, x - reach, x + reach)), y + side * height / 2


def _edge_ends(name: str, xy: dict[str, tuple[float, float]]) -> tuple[tuple[float, float], tuple[float, float]]:
    """An edge leaves the top of its source and enters its destination's port (or bottom, for MLP and logits)."""
    src, dst = name.split("->")
    port = re.fullmatch(r"(.+)<([qkv])>", dst)
    end = _port(xy[port[1]], port[2]) if port else _attach(dst, xy, xy[src][0], side=-1)
    return _attach(src, xy, end[0], side=1), end


# ---- drawing ------------------------------------------------------------------------------------------------


def _axes(ax: Axes | None, size: tuple[float, float]) -> tuple[Figure, Axes]:
    """The caller's axes, or one on a new Agg figure of ``size`` inches."""
    if ax is None:
        fig = Figure(figsize=size, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
    return ax.figure, ax


def _circuit_axes(ax: Axes | None, layout: _Layout) -> tuple[Figure, Axes]:
    """Axes for ``layout`` at equal aspect, so heads stay round; a new figure gets up to
    ``MAX_INCHES_PER_UNIT`` inches per data unit, fewer where that would pass ``MAX_HEIGHT_INCHES``."""
    width, height = layout.extent
    inches = min(MAX_INCHES_PER_UNIT, MAX_HEIGHT_INCHES / height)
    fig, ax = _axes(ax, size=(width * inches + 2.2, height * inches + 0.6))  # + legend and title
    ax.set_aspect("equal")
    ax.set_xlim(-MARGIN[0], layout.width + MARGIN[0])
    ax.set_ylim(-MARGIN[1], layout.height + MARGIN[1])
    ax.tick_params(left=False, bottom=False, labelbottom=False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig, ax


def _inches_per_unit(ax: Axes, layout: _Layout) -> float:
    """How many inches one data unit spans on ``ax``, so fonts and lines scale with the picture."""
    fig = ax.figure
    fig.draw_without_rendering()  # settles the layout engine's axes position
    box = ax.get_position()
    inches = fig.get_size_inches() * (box.width, box.height)
    return float(min(inches / layout.extent))


def _draw_node(ax: Axes, name: str, xy: tuple[float, float], scale: float) -> None:
    """A head is a circle, an MLP a small box, input and logits wide boxes; each labelled with its name."""
    kind = _kind(name)
    style = dict(facecolor=NODE_COLOURS[kind], edgecolor="#333333", linewidth=0.8 * scale, zorder=3, gid=name)
    if kind == "head":
        ax.add_patch(Circle(xy, HEAD_RADIUS, **style))
    else:
        width, height = BOX[kind]
        ax.add_patch(FancyBboxPatch((xy[0] - width / 2, xy[1] - height / 2), width, height,
                                    boxstyle="round,pad=0,rounding_size=0.08", **style))
    ax.text(*xy, name, ha="center", va="center", fontsize=LABEL_SIZE * 72 * scale, zorder=4)


def _draw_ports(ax: Axes, edges: list[str], xy: dict[str, tuple[float, float]]) -> None:
    """A coloured dot on the rim for each head input that the circuit's edges enter."""
    for port in sorted({name.split("->")[1] for name in edges if name.endswith(">")}):
        head, role = port[:-3], port[-2]
        ax.add_patch(Circle(_port(xy[head], role), PORT_RADIUS, facecolor=PORT_COLOURS[role], edgecolor="none",
                            zorder=5, gid=port))


def _draw_edges(ax: Axes, names: list[str], colours: list[str], strength: np.ndarray,
                xy: dict[str, tuple[float, float]], scale: float) -> None:
    """Curved edges, weakest first so the strong ones lie on top; width and opacity grow with ``strength``."""
    for i in np.argsort(strength, kind="stable"):
        start, end = _edge_ends(names[i], xy)
        ax.add_patch(PathPatch(_curve(start, end), facecolor="none", edgecolor=colours[i],
                               linewidth=scale * (EDGE_WIDTH[0] + (EDGE_WIDTH[1] - EDGE_WIDTH[0]) * strength[i]),
                               alpha=0.25 + 0.55 * strength[i], capstyle="round", zorder=1 + strength[i],
                               gid=names[i]))


def _curve(start: tuple[float, float], end: tuple[float, float]) -> BezierPath:
    """A quadratic Bézier bent sideways, by ``CURVE`` of its length up to ``MAX_BEND``: a straight edge along a
    column would run through every node between its ends, and the cap keeps long edges near their columns."""
    (x0, y0), (x1, y1) = start, end
    length = max(np.hypot(x1 - x0, y1 - y0), 1e-9)
    bend = min(CURVE * length, MAX_BEND) / length
    control = ((x0 + x1) / 2 + bend * (y1 - y0), (y0 + y1) / 2 - bend * (x1 - x0))
    return BezierPath([start, control, end], [BezierPath.MOVETO, BezierPath.CURVE3, BezierPath.CURVE3])


def _sign_colour(score: float) -> str:
    """Blue for a positive score, red for a negative one, grey for none (or exactly 0)."""
    if np.isnan(score) or score == 0:
        return SIGN_COLOURS["unscored"]
    return SIGN_COLOURS["positive" if score > 0 else "negative"]


def _legend(ax: Axes, key: list[tuple[str, str]]) -> None:
    """Explain edge colours (``key``: colour, label) and the q/k/v port dots, outside the drawing on the right."""
    handles = [Line2D([], [], color=colour, linewidth=2, label=label) for colour, label in key]
    handles += [Line2D([], [], linestyle="none", marker="o", markersize=6, color=PORT_COLOURS[r], label=f"{r} input")
                for r in QKV]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False, fontsize=8)


# ---- heatmap and output -------------------------------------------------------------------------------------


def _colour_scale(grid: np.ndarray, cmap: str | None, limits: tuple[float, float] | None = None) -> dict:
    """Without a ``cmap``: values of both signs on a diverging map centred on 0, others on ``viridis``.  The
    caller's ``cmap`` spans the values' range, or the caller's ``limits``."""
    if limits is not None:
        return {"cmap": cmap or "viridis", "vmin": limits[0], "vmax": limits[1]}
    if cmap is None and np.nanmin(grid, initial=0) < 0 < np.nanmax(grid, initial=0):
        bound = np.nanmax(np.abs(grid))
        return {"cmap": "RdBu_r", "vmin": -bound, "vmax": bound}
    return {"cmap": cmap or "viridis"}


def _annotate(ax: Axes, image, grid: np.ndarray, fmt: str) -> None:
    """Write each value in its cell, dark on light colours and light on dark ones; a NaN cell, blank, is left so."""
    colours = image.cmap(image.norm(grid))
    luminance = colours[..., :3] @ np.array([0.299, 0.587, 0.114])
    for (row, col), value in np.ndenumerate(grid):
        if np.isnan(value):
            continue
        ax.text(col, row, fmt.format(value), ha="center", va="center", fontsize=7,
                color="black" if luminance[row, col] > 0.5 else "white")


def _numpy(values) -> np.ndarray:
    """Tensors (any device, with grad) and sequences alike → a float numpy array."""
    if isinstance(values, torch.Tensor):
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=float)


def _check_suffix(path: str | Path | None) -> None:
    """Fail before drawing, not after, when the file type cannot be written."""
    if path is not None and Path(path).suffix.lower() not in SUFFIXES:
        raise ValueError(f"cannot save a figure as {Path(path).name!r}: use a path ending in .png or .svg")


def _save(fig: Figure, path: str | Path | None) -> Figure:
    """Write ``fig`` to ``path`` (if any), PNGs at 200 dpi so small node labels stay legible."""
    if path is not None:
        fig.savefig(path, dpi=200 if Path(path).suffix.lower() == ".png" else "figure")
    return fig


__all__ = ["draw_circuit", "draw_comparison", "draw_span_circuit", "plot_faithfulness", "plot_heatmap", "plot_inputs",
           "plot_nodes"]
