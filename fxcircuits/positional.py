"""Positional circuits: edges kept at some parts of the prompt alone.

A circuit says which edges carry a behaviour; a positional circuit says at which tokens too, as position-aware
circuit discovery does (Haklay et al., 2025): in IOI, ``a0.h3->a2.h1<q>`` may matter at the last token and not at
the subject's second mention.  The prompts are cut into classes of positions by their spans — each named span,
then the rest (``data.position_classes``) — which line roles up across templates, and each edge is scored and
kept per class.  The engine runs such a circuit in one patched pass: one mask per class, each applied at its
class's tokens (``mask_positions``), so evaluating it costs what evaluating a circuit costs.

    scores = fxcircuits.attribute_by_span(cm, batches, "logit_diff")   # SpanScores [classes, edges]
    circuit = scores.topn(300)                                         # 300 (edge, span) pairs
    fxcircuits.evaluate(cm, circuit, batches, "logit_diff").faithfulness
"""
from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from .ablations import Ablation
from .attribution import scored
from .circuit import (Circuit, another_graph, edge_flags, graph_difference, is_positional, plain_info,
                      read_json)
from .data import REST
from .graph import CircuitGraph
from .metrics import wide
from .model import CircuitModel
from .scores import EdgeScores, Scores


def attribute_by_span(cm: CircuitModel, batches: dict | Iterable[dict], metric: str | Callable | None = None,
                      method: str = "eap-ig-inputs", *, spans: Sequence[str] | None = None,
                      steps: int | None = None, ablation: str | Ablation = "corrupted",
                      reference: Iterable[dict] | None = None,
                      threshold: float | None = None, masks_per_call: int | None = None, progress: bool = True,
                      seed: int = 0, **options) -> "SpanScores":
    """Every edge's score at each class of positions, by any of ``attribute``'s methods and with its settings.
    ``spans``: the spans to keep apart (every span the batches name where None); their tokens, and the rest, are
    the classes.

    The gradient methods take each edge's score at each token (its difference there times the gradient there) and
    sum it over each class's tokens, so an edge's classes add up to its ``attribute`` score.  ``exact`` patches
    one edge at one class's tokens per run, ``acdc`` walks (edge, class) pairs as it walks edges, and ``mask``
    learns a gate per pair (its ``density`` is a fraction of the pairs); their classes do not add up, as patching
    everywhere is not the sum of patching each part."""
    tensor, names, info = scored(cm, batches, metric, method, by_span=True, spans=spans, steps=steps,
                                 ablation=ablation, reference=reference, threshold=threshold,
                                 masks_per_call=masks_per_call, progress=progress, seed=seed, options=options)
    return SpanScores(cm.graph, names, tensor, method, info)


class SpanCircuit:
    """Edges of ``graph`` kept per class of positions: ``in_graph`` bool [classes, E], the classes named by
    ``spans``.  It runs with every other edge patched, each class at its own tokens (``edge_mask``, with
    ``data.position_classes`` for ``mask_positions``); ``fxcircuits.evaluate`` does that over a dataset."""

    def __init__(self, graph: CircuitGraph, spans: Sequence[str], in_graph: torch.Tensor | dict[str, Iterable[str]],
                 scores: torch.Tensor | None = None, info: dict | None = None):
        self.graph, self.spans, self.info = graph, list(spans), dict(info or {})
        if not self.spans or self.spans[-1] != REST:
            raise ValueError(f"the classes {self.spans} must end with {REST!r}, the positions no span covers, as "
                             "fxcircuits.data.position_classes cuts the prompts (a circuit keeps nothing there where "
                             "that class keeps no edge)")
        if isinstance(in_graph, dict):  # {span: edge names}
            unknown = [s for s in in_graph if s not in self.spans]
            if unknown:
                raise KeyError(f"no class {unknown[0]!r} among the circuit's {self.spans}")
            in_graph = torch.stack([edge_flags(graph, in_graph.get(s, [])) for s in self.spans])
        if in_graph.shape != (len(self.spans), len(graph.edges)):
            raise ValueError(f"in_graph has shape {tuple(in_graph.shape)}; expected [{len(self.spans)}, "
                             f"{len(graph.edges)}] (one row of edge flags per class of positions)")
        self.in_graph = in_graph.bool().cpu()
        self.scores = None if scores is None else wide(scores.detach()).cpu()

    def __len__(self) -> int:
        """The (edge, class) pairs kept."""
        return int(self.in_graph.sum())

    def __repr__(self) -> str:
        return f"SpanCircuit({self.extent()} of {len(self.graph.edges)} edges)"

    def extent(self) -> str:
        """How much it keeps: "1144 (edge, span) pairs (IO 0, S1 0, S2 804, END 295, rest 45)"."""
        per = ", ".join(f"{s} {int(f.sum())}" for s, f in zip(self.spans, self.in_graph))
        return f"{len(self)} (edge, span) pairs ({per})"

    @property
    def edges(self) -> dict[str, list[str]]:
        """The edges kept in each class, by class name, in ``graph.edges`` order."""
        return {s: self.span(s).edges for s in self.spans}

    def span(self, name: str) -> Circuit:
        """The edges kept in one class, as a circuit (to draw, or to save in the field's format)."""
        flags = self.in_graph[_class_index(self.spans, name)]
        scores = None if self.scores is None else self.scores[_class_index(self.spans, name)]
        return Circuit(self.graph, flags, scores, {**self.info, "span": name})

    def union(self) -> Circuit:
        """Every edge kept in some class: the plain circuit this one refines."""
        return Circuit(self.graph, self.in_graph.any(0), None, self.info)

    def edge_mask(self, graph: CircuitGraph | None = None) -> torch.Tensor:
        """The masks [classes, E] that run this circuit: 1 on its edges in each class, 0 (patched) elsewhere."""
        if graph is not None and graph.edges != self.graph.edges:
            raise another_graph(self.graph, graph)
        return self.in_graph.float()

    def pruned(self) -> "SpanCircuit":
        """Without the pairs that cannot matter: those whose edge leaves a node no kept edge enters, in any class
        (its output is then the other run's at every token), or enters one that no kept edge leaves.  Per class
        the test would be wrong: attention carries a node's inputs at one class's tokens into its output at
        another's."""
        return SpanCircuit(self.graph, self.spans, self.in_graph & self.union().pruned().in_graph, self.scores,
                           self.info)

    def save(self, path: str | Path) -> None:
        """JSON: the classes' names, and per class the circuit in EAP-IG/MIB's JSON form (``Circuit.save``)."""
        path = Path(path)
        if path.suffix.lower() != ".json":
            raise ValueError(f"a positional circuit is saved as JSON: {path.name} does not end in .json")
        by_span = {s: self.span(s).json_form() for s in self.spans}
        path.write_text(json.dumps({"spans": self.spans, "info": plain_info(self.info), "circuits": by_span}))

    @classmethod
    def load(cls, path: str | Path) -> "SpanCircuit":
        """Read what ``save`` wrote."""
        return cls.from_json_form(read_json(path), path)

    @classmethod
    def from_json_form(cls, saved: dict, path: str | Path = "the circuit") -> "SpanCircuit":
        """A positional circuit from the dict ``load`` reads; ``path`` names where it came from, in errors."""
        if not is_positional(saved):
            raise ValueError(f"{path} is not a positional circuit (no 'spans' and 'circuits'): a plain circuit "
                             "loads with fxcircuits.Circuit.load")
        circuits = _span_circuits(saved, path)
        scores = None if circuits[0].scores is None else torch.stack([c.scores for c in circuits])
        try:
            return cls(circuits[0].graph, saved["spans"], torch.stack([c.in_graph for c in circuits]), scores,
                       saved.get("info"))
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


class SpanScores(Scores):
    """A score per edge and class of positions, ``tensor`` [classes, E] (classes named by ``spans``, the last
    ``"rest"``), and how they were found.  Sign and scale are ``EdgeScores``'."""

    circuit_type = SpanCircuit
    kind = "positional circuit"
    unit = "(edge, span) pairs"

    def __init__(self, graph: CircuitGraph, spans: Sequence[str], tensor: torch.Tensor, method: str = "",
                 info: dict | None = None):
        if tensor.shape != (len(spans), len(graph.edges)):
            raise ValueError(f"scores have shape {tuple(tensor.shape)}; expected [{len(spans)}, {len(graph.edges)}]"
                             " (one row of edge scores per class of positions)")
        self.spans = list(spans)
        super().__init__(graph, tensor, method, info)

    @staticmethod
    def _layout(source) -> tuple:
        """The classes' names, which ``SpanCircuit`` takes between the graph and the flags."""
        return (source.spans,)

    def __repr__(self) -> str:
        return f"SpanScores({self.method or 'unnamed'}, {len(self.graph.edges)} edges × {self.spans})"

    def __getitem__(self, key: tuple[str, str]) -> float:
        """``scores["a0.h1->logits", "END"]``: an edge has a score per class, so one name alone picks none."""
        if not (isinstance(key, tuple) and len(key) == 2):
            raise KeyError(f"scores[{key!r}]: an edge has a score per class of positions; index as scores[edge, span] "
                           f"(spans {', '.join(map(repr, self.spans))}), or take scores.span(name) for one class's "
                           "edge scores, scores.total() for each edge's summed over them")
        edge, span = key
        return float(self.tensor[_class_index(self.spans, span), self.graph.edge_index[edge]])

    def span(self, name: str) -> EdgeScores:
        """One class's edge scores."""
        return EdgeScores(self.graph, self.tensor[_class_index(self.spans, name)], self.method,
                          {**self.info, "span": name})

    def total(self) -> EdgeScores:
        """Each edge's scores summed over the classes: for the gradient methods, its score at every position, as
        ``attribute`` gives it."""
        return EdgeScores(self.graph, self.tensor.sum(0), self.method, self.info)


def _span_circuits(saved: dict, path) -> list[Circuit]:
    """Each span's circuit of a positional circuit file, in the order its ``spans`` lists them, refused naming the
    file and what is damaged — spans that are no list of names, a span without its circuit or a circuit of no
    span, circuits of different graphs, some scored and some not — where stacking them would fail obscurely or
    read a string's letters as spans.  ``SpanCircuit.load`` and ``SpanScores.load`` read files through it."""
    spans, by_span = saved["spans"], saved["circuits"]
    if not (isinstance(spans, list) and spans and all(isinstance(s, str) for s in spans)
            and len(set(spans)) == len(spans)):
        raise ValueError(f"{path}: spans must be a list of names, each once, the last {REST!r}; got {spans!r}")
    if not isinstance(by_span, dict):
        raise ValueError(f"{path}: its circuits must be an object from span names to circuits; got a "
                         f"{type(by_span).__name__}")
    for span in spans:
        if span not in by_span:
            raise ValueError(f"{path}: span {span!r} is listed in spans but has no circuit")
    for span in by_span:
        if span not in spans:
            raise ValueError(f"{path}: it holds a circuit for span {span!r}, which its spans ({spans}) do not list")
    circuits = [Circuit.from_json_form(by_span[s], f"{path}, span {s}") for s in spans]
    for span, circuit in zip(spans[1:], circuits[1:]):
        if circuit.graph.edges != circuits[0].graph.edges:
            raise ValueError(f"{path}: the circuits of spans {spans[0]!r} and {span!r} are of different graphs "
                             f"({graph_difference(circuits[0].graph, circuit.graph)}): a positional circuit's spans "
                             "are all of one model's graph")
        if (circuit.scores is None) != (circuits[0].scores is None):
            scored, unscored = (spans[0], span) if circuit.scores is None else (span, spans[0])
            raise ValueError(f"{path}: span {scored!r}'s circuit has scores and span {unscored!r}'s none: a "
                             "positional circuit scores every span or none")
    return circuits


def _class_index(spans: list[str], name: str) -> int:
    """Where the class ``name`` lies among ``spans``, refused by name where it is none of them."""
    if name not in spans:
        raise KeyError(f"no span {name!r}: the classes are {', '.join(map(repr, spans))}")
    return spans.index(name)


def load_circuit(path: str | Path) -> Circuit | SpanCircuit:
    """A saved circuit, plain (EAP-IG/MIB's JSON or ``torch.save`` form) or positional (``SpanCircuit.save``)."""
    if Path(path).suffix.lower() != ".json":
        return Circuit.load(path)
    saved = read_json(path)
    return SpanCircuit.from_json_form(saved, path) if is_positional(saved) else Circuit.from_json_form(saved, path)
