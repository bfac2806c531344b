"""Edge scores, and the ways the field turns them into a circuit: top-n edges, greedy, threshold, top-n nodes.

Sign and scale follow EAP-IG's reference implementation and MIB: score(e) ≈ mean over examples of metric(clean) −
metric(clean with e patched), summed over positions and hidden dimensions; positive means the edge helps the task.
Every edge selection (top-n, greedy, threshold) is pruned of dangling nodes and edges, as EAP-IG prunes, so what it
returns is a connected circuit from ``input`` to ``logits``, unless told not to (``prune=False``: the circuits ACDC
and a learned mask find, which they measured unpruned).  The node selection (``topn_nodes``) is not: it runs
as node patching, where a kept node whose inputs are all patched still computes from them.
"""
from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .circuit import Circuit, count_of
from .graph import CircuitGraph
from .metrics import wide

if TYPE_CHECKING:  # positional.py builds on this module
    from .positional import SpanCircuit, SpanScores


def ranked(scores: torch.Tensor, absolute: bool) -> torch.Tensor:
    """What a selection ranks by: |score| with ``absolute`` (MIB's CMD), else the signed score (MIB's CPR)."""
    return scores.abs() if absolute else scores


def at_least(scores: torch.Tensor, t: float, absolute: bool) -> torch.Tensor:
    """Which scores (``ranked``) reach the threshold ``t``; a NaN threshold, which none would, is refused."""
    if math.isnan(t):
        raise ValueError("threshold NaN keeps nothing: give a number (ACDC's τ, or -inf to keep every edge)")
    return ranked(scores, absolute) >= t


def finite(tensor: torch.Tensor, graph: CircuitGraph) -> torch.Tensor:
    """Scores [..., E] as given, refused where any is NaN or infinite: no ranking can place those."""
    bad = (~torch.isfinite(tensor)).nonzero()
    if len(bad):
        raise ValueError(f"{len(bad)} scores are NaN or infinite, e.g. {graph.edges[int(bad[0, -1])]}'s "
                         f"({float(tensor[tuple(bad[0])])}): no ranking can place them")
    return tensor


class Scores:
    """What ``EdgeScores`` and ``SpanScores`` share: scores over the units of ``graph`` — its edges, or (edge, class
    of positions) pairs — refused where one is not finite, how they were found (``method``; ``info``: metric,
    ablation…), and their cuts into circuits.  A subclass checks the tensor's shape and says what its cuts are:
    ``circuit_type``, built by ``_layout`` and ``_circuit``; ``kind``, its name in errors; ``unit``, what a cut's
    size counts."""

    circuit_type: type = Circuit
    kind = "circuit"
    unit = "edges"

    def __init__(self, graph: CircuitGraph, tensor: torch.Tensor, method: str = "", info: dict | None = None):
        self.graph, self.tensor = graph, finite(wide(tensor.detach()).cpu(), graph)
        self.method, self.info = method, dict(info or {})

    @staticmethod
    def _layout(source) -> tuple:
        """What ``circuit_type`` takes between the graph and the flags, read off these scores or off a circuit of
        that type (``load``): nothing for plain circuits."""
        return ()

    def _circuit(self, flags: torch.Tensor, pruned: bool = True) -> Circuit | SpanCircuit:
        """The circuit of ``flags``, pruned unless told not, saying how its scores were found (method, metric,
        ablation…)."""
        circuit = self.circuit_type(self.graph, *self._layout(self), flags, self.tensor,
                                    {"method": self.method, **self.info})
        return circuit.pruned() if pruned else circuit

    def _unselected(self) -> Circuit | SpanCircuit:
        """Every score and no unit kept: what ``save`` writes, as a circuit file holds scores."""
        return self._circuit(torch.zeros(self.tensor.shape, dtype=torch.bool), pruned=False)

    def topn(self, n: int | float, absolute: bool = True, prune: bool = True) -> Circuit | SpanCircuit:
        """The ``n`` highest-scoring edges (by span, (edge, class) pairs; a float is a fraction of them all: 0.01,
        or 1.0 for all), pruned unless ``prune=False``.

        ``absolute=True`` ranks by |score| (MIB's CMD); ``False`` by signed score (MIB's CPR).  A learned mask's
        top ``density`` gates, unpruned, are the circuit it trained (``info["circuit_distance"]`` is its
        distance): pruned, they would lose the edges out of a node whose inputs are all patched, which under zero
        or mean ablation still writes what it computes from the ablated stream."""
        return self.cuts("topn", absolute, prune)(n)

    def greedy(self, n: int | float, absolute: bool = True, prune: bool = True) -> Circuit | SpanCircuit:
        """``n`` edges (by span, (edge, class) pairs) grown from ``logits`` backwards, best first (EAP-IG's greedy
        search): one becomes a candidate once its edge's destination node is in the circuit (by span, at any
        class), so the result is connected to the logits by construction; pruned unless ``prune=False``."""
        return self.cuts("greedy", absolute, prune)(n)

    def cuts(self, selection: str = "topn", absolute: bool = True,
             prune: bool = True) -> Callable[[int | float], Circuit | SpanCircuit]:
        """``topn`` or ``greedy`` as a function of the size, the order of the edges (by span, pairs) found once:
        for cutting many sizes (greedy's order takes about 0.5 s on SmolLM2's 123,211 edges)."""
        rows = self.tensor.reshape(-1, len(self.graph.edges))  # [classes, E]: edge scores are one class
        order = ordered(self.graph, rows, selection, absolute)
        return lambda n: self._circuit(kept(order, count_of(n, self.tensor.numel(), self.unit), self.tensor.shape),
                                       pruned=prune)

    def threshold(self, t: float, absolute: bool = True, prune: bool = True) -> Circuit | SpanCircuit:
        """Every edge (by span, (edge, class) pair) whose score (|score| with ``absolute``) is at least ``t``,
        pruned unless ``prune=False``.

        ACDC's scores at its τ, signed and unpruned, are the edges it kept: ``threshold(scores.info["threshold"],
        absolute=False, prune=False)``.  Pruned, they would lose the edges out of a node whose inputs ACDC all
        removed after it had judged those edges: under zero or mean ablation such a node still writes what it
        computes from the ablated stream, which ACDC measured and pruning would patch away."""
        return self._circuit(at_least(self.tensor, t, absolute), pruned=prune)

    def save(self, path: str | Path) -> None:
        """Every score in a circuit file with nothing in the circuit: for edge scores EAP-IG/MIB JSON for a path
        ending in ``.json``, EAP-IG's ``torch.save`` form (compact for large graphs) for ``.pt`` or ``.pth``; by
        span, a positional circuit file (``SpanCircuit.save``)."""
        self._unselected().save(path)

    @classmethod
    def load(cls, path: str | Path) -> EdgeScores | SpanScores:
        """Read what ``save`` wrote, or the scores of any circuit file of the kind that has them (EAP-IG/MIB's,
        for edge scores; a positional one, by span)."""
        circuit = cls.circuit_type.load(path)
        if circuit.scores is None:
            raise ValueError(f"{path} holds a {cls.kind} without scores")
        return cls(circuit.graph, *cls._layout(circuit), circuit.scores, *method_apart(circuit.info))


class EdgeScores(Scores):
    """One score per edge of ``graph`` (``tensor``, float [E] in ``graph.edges`` order) and how they were found."""

    def __init__(self, graph: CircuitGraph, tensor: torch.Tensor, method: str = "", info: dict | None = None):
        if tensor.shape != (len(graph.edges),):
            raise ValueError(f"scores have shape {tuple(tensor.shape)}; expected [{len(graph.edges)}]")
        super().__init__(graph, tensor, method, info)

    def __getitem__(self, edge: str) -> float:
        return float(self.tensor[self.graph.edge_index[edge]])

    def __len__(self) -> int:
        return len(self.tensor)

    def __repr__(self) -> str:
        return f"EdgeScores({self.method or 'unnamed'}, {len(self)} edges)"

    def nodes(self) -> dict[str, float]:
        """Node-level scores: the sum of each upstream node's outgoing edge scores (patching a node patches
        every edge it sends)."""
        return self._unselected().node_scores()

    def topn_nodes(self, n: int | float, absolute: bool = True) -> Circuit:
        """A node-level circuit, cut as EAP-IG's ``apply_topn(level="node")`` cuts one: the ``n`` upstream nodes of
        highest score (``nodes()``; a float is a fraction of them), with every edge among them and from them into
        ``logits``.  Running it patches every other node on all its edges: node (activation) patching, for every
        ablation.  Not pruned, for that reason: a kept node whose inputs are all patched still computes from them
        (under zero or mean ablation, not what patching it would give)."""
        g, by_node = self.graph, self.graph.by_source(self.tensor)
        kept = torch.zeros(len(g.nodes), dtype=torch.bool)
        order = torch.argsort(ranked(by_node, absolute), descending=True, stable=True)
        kept[order[:count_of(n, len(by_node), "nodes")]] = True
        kept[-1] = True  # logits reads whatever is kept
        return self._circuit(kept[g.src] & kept[g.reader[g.dst]], pruned=False)


def method_apart(info: dict) -> tuple[str, dict]:
    """A score file's ``method`` and the rest of its ``info``, apart, as scores hold them: the file keeps the method
    among the circuit's info, and scores that kept it in both would write it twice when saved again."""
    rest = dict(info)
    return str(rest.pop("method", "")), rest


def ordered(graph: CircuitGraph, scores: torch.Tensor, selection: str, absolute: bool) -> torch.Tensor:
    """The (edge, class) units of ``scores`` [classes, E], as flat indices, in the order ``selection`` keeps them:
    the circuit of size n is the first n.  ``"topn"``: best first (``ranked``).  ``"greedy"``: as EAP-IG's greedy
    search grows them from ``logits`` backwards, best first among the candidates — a unit becomes one once its
    edge's destination node is in the circuit, at any class (attention carries a node's inputs at one class's
    tokens into its output at another's); units it never reaches are left out."""
    values = ranked(scores, absolute)
    if selection == "topn":
        return torch.argsort(values.flatten(), descending=True, stable=True)
    if selection != "greedy":
        raise ValueError(f"no selection {selection!r} by size: use topn or greedy")
    n_edges, flat = values.shape[1], values.flatten().tolist()
    into = [[] for _ in graph.nodes]  # edges by destination node
    for e, d in enumerate(graph.dst.tolist()):
        into[int(graph.reader[d])].append(e)
    order, reached, heap = [], set(), []

    def reach(node: int) -> None:
        reached.add(node)
        for e in into[node]:
            for unit in range(e, len(flat), n_edges):
                heapq.heappush(heap, (-flat[unit], unit))

    reach(len(graph.nodes) - 1)
    while heap:
        unit = heapq.heappop(heap)[1]
        order.append(unit)
        source = int(graph.src[unit % n_edges])
        if source not in reached:
            reach(source)
    return torch.tensor(order, dtype=torch.long)


def kept(order: torch.Tensor, count: int, shape: torch.Size) -> torch.Tensor:
    """Flags of ``shape`` for the first ``count`` units of ``order`` (``ordered``)."""
    flags = torch.zeros(shape.numel(), dtype=torch.bool)
    flags[order[:count]] = True
    return flags.view(shape)


