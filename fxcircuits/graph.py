"""The computational graph as the field names it: upstream nodes, downstream inputs, and the edges between.

Names follow EAP-IG / MIB (NOTES.md §4): ``input``, ``a{layer}.h{head}``, ``m{layer}``, ``logits``; an edge is
``"{src}->{dst}"`` with ``<q>``, ``<k>`` or ``<v>`` appended when the destination is a head.  Every writer to the
residual stream feeds every reader that reads the stream after it was written, so an MLP reads the heads of
its own layer unless attention and MLP run in parallel.  Order is fixed: upstream nodes by the position where
they write; downstream inputs by the position where they read (per layer: all q inputs, all k, all v, then the
MLP; ``logits`` last); edges grouped by downstream input, then by upstream node.
"""
from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
import torch

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Writer:
    """What the graph needs to know of one writer: its kind, layer, head count and residual step."""
    kind: str   # "attention" or "mlp"
    layer: int
    n_heads: int
    step: int


class CircuitGraph:
    """Nodes and edges of a traced model, with the index maps the masks use."""

    def __init__(self, writers: list[Writer], n_steps: int):
        self.upstream: list[str] = ["input"]
        self.downstream: list[str] = []
        writes, reads = [-1], []
        for w in writers:
            if w.kind == "attention":
                heads = [f"a{w.layer}.h{h}" for h in range(w.n_heads)]
                self.downstream += [f"{head}<{role}>" for role in QKV for head in heads]
                reads += [w.step] * (3 * w.n_heads)
                self.upstream += heads
                writes += [w.step] * w.n_heads
            else:
                self.downstream.append(f"m{w.layer}")
                reads.append(w.step)
                self.upstream.append(f"m{w.layer}")
                writes.append(w.step)
        self.downstream.append("logits")
        reads.append(n_steps)
        self.writers = writers
        self.nodes: list[str] = self.upstream + ["logits"]
        pairs = [(u, d) for d in range(len(self.downstream)) for u in range(len(self.upstream)) if writes[u] < reads[d]]
        self.edges: list[str] = [f"{self.upstream[u]}->{self.downstream[d]}" for u, d in pairs]
        self.edge_index = {name: i for i, name in enumerate(self.edges)}
        self.node_index = {name: i for i, name in enumerate(self.upstream)}
        self.src = torch.tensor([u for u, _ in pairs], dtype=torch.long)
        self.dst = torch.tensor([d for _, d in pairs], dtype=torch.long)

    @property
    def group_sizes(self) -> list[int]:
        """Upstream nodes per writer, in order: ``input``, then a layer's heads or one MLP."""
        return [1] + [w.n_heads if w.kind == "attention" else 1 for w in self.writers]

    @property
    def n_layers(self) -> int:
        return sum(w.kind == "attention" for w in self.writers)

    @property
    def n_heads(self) -> int:
        return max(w.n_heads for w in self.writers)

    @property
    def parallel_attn_mlp(self) -> bool:
        steps = [w.step for w in self.writers]
        return len(set(steps)) < len(steps)

    def __repr__(self) -> str:
        return (f"CircuitGraph({self.n_layers} layers, {len(self.upstream)} upstream nodes, "
                f"{len(self.downstream)} downstream inputs, {len(self.edges)} edges)")

    def to_networkx(self) -> nx.DiGraph:
        """A ``networkx.DiGraph`` in which every edge of ours is exactly one networkx edge.

        A head's q, k and v inputs are nodes of their own (``a2.h1<q>``, kind ``"input"``) joined to the head,
        so that ``a0.h3->a2.h1<k>`` and ``a0.h3->a2.h1<v>`` stay distinct; the other nodes have kind ``"node"``."""
        g = nx.DiGraph()
        g.add_nodes_from(self.nodes, kind="node")
        for port in self.downstream:
            if port.endswith(">"):
                g.add_node(port, kind="input", role=port[-2])
                g.add_edge(port, port.split("<")[0], name=None)
        for name in self.edges:
            src, dst = name.split("->")
            g.add_edge(src, dst, name=name)
        return g


@dataclass(frozen=True)
class Circuit:
    """A set of edges kept from the full graph; every other edge is patched when the circuit runs."""
    edges: frozenset[str]

    def edge_mask(self, graph: CircuitGraph) -> torch.Tensor:
        unknown = self.edges - graph.edge_index.keys()
        if unknown:
            raise KeyError(f"circuit has {len(unknown)} edges not in this model's graph, e.g. {sorted(unknown)[:3]}")
        mask = torch.zeros(len(graph.edges))
        mask[[graph.edge_index[e] for e in self.edges]] = 1.0
        return mask
