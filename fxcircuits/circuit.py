"""Circuits: the edges kept from a model's graph, pruned of dangling pieces, saved as the field saves them.

A circuit runs by patching every edge outside it (``cm(..., edge_mask=circuit)``).  The JSON form is the one
EAP-IG writes and MIB takes as submissions (NOTES.md §4): ``{"cfg", "nodes", "edges"}`` with every node and
edge of the full graph, an ``in_graph`` flag and a score, so a circuit found here loads in those tools and back.
"""
from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import networkx as nx
import torch

from .graph import CircuitGraph


class Circuit:
    """A set of edges of ``graph`` (``in_graph``, bool [E] in ``graph.edges`` order), with the scores that chose
    them when there are any (float [E], all edges, also those left out)."""

    def __init__(self, graph: CircuitGraph, edges: Iterable[str] | torch.Tensor,
                 scores: torch.Tensor | None = None, info: dict | None = None):
        self.graph, self.info = graph, dict(info or {})  # info: model, task, method… kept in the JSON's cfg
        self.in_graph = _edge_flags(graph, edges)
        if scores is not None and scores.shape != (len(graph.edges),):
            raise ValueError(f"scores have shape {tuple(scores.shape)}; expected one per edge, [{len(graph.edges)}]")
        self.scores = None if scores is None else scores.detach().float().cpu()

    def __len__(self) -> int:
        return int(self.in_graph.sum())

    def __contains__(self, edge: str) -> bool:
        index = self.graph.edge_index.get(edge)
        return index is not None and bool(self.in_graph[index])

    def __repr__(self) -> str:
        return f"Circuit({len(self)} of {len(self.graph.edges)} edges, {len(self.nodes)} nodes)"

    @property
    def edges(self) -> list[str]:
        """Names of the edges in the circuit, in ``graph.edges`` order."""
        return [self.graph.edges[i] for i in self.in_graph.nonzero().flatten().tolist()]

    @property
    def nodes(self) -> list[str]:
        """Nodes an edge of the circuit leaves or enters, in ``graph.nodes`` order."""
        g = self.graph
        touched = torch.zeros(len(g.nodes), dtype=torch.bool)
        touched[g.src[self.in_graph]] = True
        touched[g.reader[g.dst[self.in_graph]]] = True
        return [g.nodes[i] for i in touched.nonzero().flatten().tolist()]

    def __and__(self, other: "Circuit") -> "Circuit":
        return self._combine(other, torch.logical_and)

    def __or__(self, other: "Circuit") -> "Circuit":
        return self._combine(other, torch.logical_or)

    def __sub__(self, other: "Circuit") -> "Circuit":
        return self._combine(other, lambda mine, theirs: mine & ~theirs)

    def _combine(self, other: "Circuit", op) -> "Circuit":
        """Edges of this circuit's graph from both circuits' flags.  The graphs must list the same edges (circuits
        read from files, or found on two models of one architecture, hold equal graphs of their own): a name such
        as ``m1->logits`` means another edge in a deeper model.  The scores are kept only where both circuits carry
        the same ones (two sizes cut from one ``EdgeScores``): otherwise no one score is right."""
        if not isinstance(other, Circuit):
            return NotImplemented
        if other.graph.edges != self.graph.edges:
            differ = next((a, b) for a, b in itertools.zip_longest(self.graph.edges, other.graph.edges) if a != b)
            raise ValueError(f"the circuits are of different graphs ({len(self.graph.edges)} and "
                             f"{len(other.graph.edges)} edges; first difference {differ[0]!r} against {differ[1]!r}): "
                             "combine or compare circuits of one model, or of models of one architecture")
        same = self.scores is not None and other.scores is not None and torch.equal(self.scores, other.scores)
        return Circuit(self.graph, op(self.in_graph, other.in_graph), self.scores if same else None)

    def overlap(self, other: "Circuit") -> dict[str, float]:
        """How far two circuits agree, as circuits found by two methods (or on two tasks or models) are compared:
        the edges and nodes they share, and each count over their union's (intersection over union: 1 is the same
        circuit, 0 disjoint; two empty circuits count as the same)."""
        shared, union = len(self & other), len(self | other)
        mine, theirs = set(self.nodes), set(other.nodes)
        return {"shared_edges": shared, "edge_iou": shared / union if union else 1.0,
                "shared_nodes": len(mine & theirs),
                "node_iou": len(mine & theirs) / len(mine | theirs) if mine | theirs else 1.0}

    def edge_mask(self, graph: CircuitGraph) -> torch.Tensor:
        """The mask [E] of ``graph`` that runs this circuit: 1 on its edges, 0 (patched) everywhere else."""
        if graph.edges == self.graph.edges:
            return self.in_graph.float()
        return _edge_flags(graph, self.edges).float()

    def to_networkx(self) -> nx.DiGraph:
        """The circuit as ``graph.to_networkx()`` draws the whole graph — its edges (with their ``score`` when the
        circuit has scores), their nodes, and the q/k/v inputs they enter joined to their heads — for networkx's
        path queries and layouts (``nx.all_simple_paths(circuit.to_networkx(), "input", "logits")``)."""
        full, kept = self.graph.to_networkx(), set(self.edges)
        edges = [(src, dst) for src, dst, name in full.edges(data="name") if name in kept]
        ports = [(port, head) for _, port in edges if full.nodes[port]["kind"] == "input"
                 for head in full.successors(port)]  # a q/k/v input's one link, to its head
        circuit = full.edge_subgraph(edges + ports).copy()
        if self.scores is not None:
            for src, dst, name in circuit.edges(data="name"):
                if name is not None:
                    circuit.edges[src, dst]["score"] = float(self.scores[self.graph.edge_index[name]])
        return circuit

    def pruned(self) -> "Circuit":
        """The circuit without dangling pieces, as EAP-IG prunes: repeatedly drop nodes that lack an incoming edge
        (``input`` needs none) or an outgoing one (``logits`` needs none), then the edges that touch them."""
        g, keep = self.graph, self.in_graph.clone()
        while True:
            alive = _nodes_alive(g, keep)
            pruned = keep & alive[g.src] & alive[g.reader[g.dst]]
            if torch.equal(pruned, keep):
                return Circuit(g, keep, self.scores, self.info)
            keep = pruned

    def node_scores(self) -> dict[str, float] | None:
        """A node's score is the sum of its outgoing edges' scores: patching a node patches all of them."""
        if self.scores is None:
            return None
        total = torch.zeros(len(self.graph.upstream)).index_add_(0, self.graph.src, self.scores)
        return dict(zip(self.graph.upstream, total.tolist()))

    def to_json(self, path: str | Path, **info) -> None:
        """Write the EAP-IG/MIB circuit JSON; ``info`` (model, task, method…) is kept in ``cfg``."""
        g = self.graph
        if g.d_model is None:
            raise ValueError("this graph does not know d_model, which EAP-IG's Graph.from_json needs; build it with "
                             "fxcircuits.trace(model) or CircuitGraph.from_config({... 'd_model': ...})")
        alive = set(self.nodes)
        nodes = {name: {"in_graph": name in alive} for name in g.nodes}
        for name, score in (self.node_scores() or {}).items():
            nodes[name]["score"] = score
        scores = self.scores.tolist() if self.scores is not None else [0.0] * len(g.edges)
        edges = {name: {"score": s, "in_graph": bool(flag)}
                 for name, s, flag in zip(g.edges, scores, self.in_graph.tolist())}
        cfg = {**self.info, **info, **g.cfg, "scored": self.scores is not None}
        Path(path).write_text(json.dumps({"cfg": cfg, "nodes": nodes, "edges": edges}))

    @classmethod
    def from_json(cls, path: str | Path) -> "Circuit":
        """Read a circuit JSON written by fxcircuits, EAP-IG or for MIB."""
        data = json.loads(Path(path).read_text())
        missing = {"cfg", "nodes", "edges"} - data.keys()
        if missing:
            raise ValueError(f"{path} is not an EAP-IG/MIB circuit file: it lacks {sorted(missing)}")
        graph = CircuitGraph.from_config(data["cfg"])
        unknown = data["edges"].keys() - graph.edge_index.keys()
        if unknown:
            raise ValueError(f"{path} names {len(unknown)} edges that a {data['cfg']['n_layers']}-layer, "
                             f"{data['cfg']['n_heads']}-head graph lacks, e.g. {sorted(unknown)[:3]}; "
                             f"{graph.not_an_edge(sorted(unknown)[0])}")
        in_graph = [name for name, edge in data["edges"].items() if edge["in_graph"]]
        scored = data["cfg"].get("scored", True)
        scores = torch.zeros(len(graph.edges))
        for name, edge in data["edges"].items():
            scores[graph.edge_index[name]] = float(edge.get("score") or 0.0)
        known = graph.cfg  # built once: it rebuilds the convention's graph to compare
        info = {k: v for k, v in data["cfg"].items() if k not in known and k != "scored"}
        return cls(graph, in_graph, scores if scored else None, info)


def _edge_flags(graph: CircuitGraph, edges: Iterable[str] | torch.Tensor) -> torch.Tensor:
    """Edge names or a bool tensor [E] → bool tensor [E], with a clear error for names the graph lacks."""
    if isinstance(edges, torch.Tensor):
        if edges.shape != (len(graph.edges),):
            raise ValueError(f"edge flags have shape {tuple(edges.shape)}; expected [{len(graph.edges)}]")
        return edges.detach().cpu().bool()
    edges = list(edges)
    unknown = [e for e in edges if e not in graph.edge_index]
    if unknown:
        raise KeyError(f"circuit has {len(unknown)} edge(s) not in this model's graph, e.g. {unknown[:3]}; "
                       f"{graph.not_an_edge(unknown[0])} (see cm.graph.edges)")
    flags = torch.zeros(len(graph.edges), dtype=torch.bool)
    flags[[graph.edge_index[e] for e in edges]] = True
    return flags


def _nodes_alive(graph: CircuitGraph, keep: torch.Tensor) -> torch.Tensor:
    """Nodes with an outgoing kept edge and an incoming one (``input`` counts as fed, ``logits`` as read)."""
    outgoing = torch.zeros(len(graph.nodes), dtype=torch.bool)
    outgoing[graph.src[keep]] = True
    outgoing[-1] = True
    incoming = torch.zeros(len(graph.nodes), dtype=torch.bool)
    incoming[graph.reader[graph.dst[keep]]] = True
    incoming[0] = True
    return outgoing & incoming
