"""The computational graph as the field names it: upstream nodes, downstream inputs, and the edges between.

Names follow EAP-IG's reference implementation and MIB: ``input``, ``a{layer}.h{head}``, ``m{layer}``, ``logits``; an edge is
``"{src}->{dst}"`` with ``<q>``, ``<k>`` or ``<v>`` appended when the destination is a head.  Every writer to the
residual stream feeds every reader that reads the stream after it was written, so an MLP reads the heads of
its own layer unless attention and MLP run in parallel.  Order is fixed: upstream nodes by the position where
they write; downstream inputs by the position where they read (per layer: all q inputs, all k, all v, then the
MLP; ``logits`` last — where a layer reuses an earlier layer's keys and values, its k and v inputs read at that
layer, after that layer's own inputs, and an MLP whose write is delayed reads with the layer where it reads, after
that layer's own inputs); edges grouped by downstream input, then by upstream node.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import networkx as nx
import torch

QKV = ("q", "k", "v")


def names(given: Iterable[str], what: str) -> list[str]:
    """``given`` names as a list, one string refused: it would be read as its characters, and each one reported
    as no name of the graph."""
    if isinstance(given, str):
        raise TypeError(f"{what}s are a list of names, not one string: [{given!r}] for one {what}")
    return list(given)


@dataclass(frozen=True)
class Writer:
    """What the graph needs to know of one writer: its kind, layer, head count and residual step; and where it reads
    at an earlier step than it writes, that step: the k and v inputs of an attention layer that reuses an earlier
    layer's keys and values (KV sharing), the input of an MLP whose output is added later (a delayed write)."""
    kind: str   # "attention" or "mlp"
    layer: int
    n_heads: int
    step: int
    read_step: int | None = None

    @property
    def name(self) -> str:
        """``a{layer}`` (its heads are ``a{layer}.h{h}``) or ``m{layer}``."""
        return f"{'a' if self.kind == 'attention' else 'm'}{self.layer}"

    @property
    def nodes(self) -> list[str]:
        """The upstream nodes it writes: its heads ``a{layer}.h{h}``, or itself ``m{layer}``."""
        return [f"{self.name}.h{h}" for h in range(self.n_heads)] if self.kind == "attention" else [self.name]

    def reads(self) -> list[tuple[str, int]]:
        """Its downstream inputs, each with the step at which it reads."""
        early = self.step if self.read_step is None else self.read_step
        if self.kind != "attention":
            return [(self.name, early)]
        steps = {"q": self.step, "k": early, "v": early}
        return [(f"{head}<{role}>", steps[role]) for role in QKV for head in self.nodes]


@dataclass(frozen=True)
class Block:
    """An attention layer and the writer after it (beside it, where parallel), or a writer alone: a row of a layers
    × heads picture, and a unit of causal tracing.  ``layer``: the layer it is, where every block of the graph is
    one layer's attention and MLP (or one of them), as in any transformer; None in a hybrid, which counts its
    attention layers and its other writers apart and may hold a recurrent block or a second attention within one
    decoder layer — which the graph cannot tell from a layer of its own, so such a block is named by its nodes."""
    writers: tuple[Writer, ...]
    layer: int | None

    @property
    def name(self) -> str:
        """``L{layer}``, or its writers' names (``m0``, ``a2 m3``)."""
        return f"L{self.layer}" if self.layer is not None else " ".join(w.name for w in self.writers)


class CircuitGraph:
    """Nodes and edges of a traced model, with the index maps the masks use."""

    def __init__(self, writers: list[Writer], n_steps: int, d_model: int | None = None):
        self.d_model = d_model
        self.upstream: list[str] = ["input"]
        writes = [-1]
        for w in writers:
            self.upstream += w.nodes
            writes += [w.step] * len(w.nodes)
        if writes != sorted(writes):
            raise ValueError("writers must be listed in the order they write to the stream")
        inputs = sorted([r for w in writers for r in w.reads()], key=lambda r: r[1]) + [("logits", n_steps)]
        self.downstream: list[str] = [name for name, _ in inputs]
        self.writers = writers
        self.nodes: list[str] = self.upstream + ["logits"]
        # upstream nodes come in the order they write, so each input reads a prefix of them: those written before
        self.write_steps, self.read_steps = torch.tensor(writes), torch.tensor([step for _, step in inputs])
        self.n_sources = torch.searchsorted(self.write_steps, self.read_steps).tolist()
        self.first_edge = list(itertools.accumulate(self.n_sources, initial=0))[:-1]
        arrows = [f"{name}->" for name in self.upstream]
        self.edges: list[str] = [arrow + port for port, n in zip(self.downstream, self.n_sources)
                                 for arrow in arrows[:n]]
        self.node_index = {name: i for i, name in enumerate(self.upstream)}
        self.port_index = {name: d for d, name in enumerate(self.downstream)}
        self.edge_index = EdgeIndex(self)
        counts = torch.tensor(self.n_sources)
        self.dst = torch.repeat_interleave(torch.arange(len(self.downstream)), counts)
        self.src = torch.arange(len(self.edges)) - torch.repeat_interleave(torch.tensor(self.first_edge), counts)
        self.cells = self.src * len(self.downstream) + self.dst  # each edge's place in an [upstream, downstream] block
        position = {name: i for i, name in enumerate(self.nodes)}
        # for each downstream input, the index in ``nodes`` of the node it feeds (a head, an MLP, ``logits``)
        self.reader = torch.tensor([position[port.split("<")[0]] for port in self.downstream], dtype=torch.long)

    def by_source(self, values: torch.Tensor) -> torch.Tensor:
        """Per-edge ``values`` [E] summed over each upstream node's outgoing edges, [U]: a node's score, since
        patching a node patches every edge it sends."""
        return torch.zeros(len(self.upstream), dtype=values.dtype).index_add_(0, self.src, values)

    def edge_id(self, name: str) -> int | None:
        """``name``'s index in ``edges``, or None for a name that is no edge of this graph."""
        if not isinstance(name, str):
            return None
        source, arrow, port = name.partition("->")
        u, d = self.node_index.get(source), self.port_index.get(port)
        if not arrow or u is None or d is None or u >= self.n_sources[d]:
            return None
        return self.first_edge[d] + u

    def not_an_edge(self, name) -> str:
        """Why ``name`` names no edge of this graph, as an error message says it: names are typed by hand, and
        "unknown edge" alone does not tell a missing port from an edge that runs backwards."""
        if not isinstance(name, str):
            return f"{name!r} ({type(name).__name__}) is no edge name: those are strings such as {self.edges[-1]!r}"
        tidy = "".join(name.split()).lower()
        if tidy != name and self.edge_id(tidy) is not None:
            return f"{name!r} is not written as edges are (lower case, no spaces): the edge is {tidy!r}"
        source, arrow, port = name.partition("->")
        if not arrow:
            return f"{name!r} has no '->': an edge is named '{{upstream node}}->{{downstream input}}', e.g. {self.edges[-1]!r}"
        if source not in self.node_index:
            return f"{name!r}: {self.not_a_node(source)}"
        if port not in self.port_index:
            return f"{name!r}: {self.not_an_input(port)}"
        return (f"{name!r}: {source} writes to the stream after {port} reads it (or as it reads it), so no edge joins "
                "them; edges run from earlier writers to later readers")

    def not_a_node(self, name) -> str:
        """Why ``name`` is no upstream node (what node masks, activations and the logit lens take)."""
        if name == "logits":
            return "'logits' reads the stream and writes nothing, so it is no upstream node; mask its edges instead"
        if isinstance(name, str) and "->" in name:
            return f"{name!r} is an edge, not a node: pass it in edge_mask"
        if isinstance(name, str) and name.partition("<")[0] in self.node_index:
            return f"{name!r} is one of {name.partition('<')[0]}'s inputs, not a node: its edges are '…->{name}'"
        return (f"{name!r} is not an upstream node of this graph: those are 'input', the heads "
                f"{self._span('a')} and the MLPs {self._span('m')} (cm.graph.upstream)")

    def not_an_input(self, port) -> str:
        """Why ``port`` is no downstream input (what edges end at, and what input patching patches)."""
        if not isinstance(port, str):
            return f"{port!r} ({type(port).__name__}) is no input name: those are strings such as {self.downstream[0]!r}"
        if f"{port}<q>" in self.port_index:
            return f"{port} is a head, read through three inputs: name one, {port}<q>, {port}<k> or {port}<v>"
        node = port.partition("<")[0]
        if node != port and node in self.port_index:
            return f"{node} has a single input, named {node!r} with no <q>, <k> or <v>"
        return (f"{port!r} is not a downstream input of this graph: those are each head's <q>, <k> and <v>, the "
                f"MLPs {self._span('m')} and 'logits' (cm.graph.downstream)")

    def _span(self, kind: str) -> str:
        """The first and last upstream node of a kind ("a" heads, "m" MLPs), as 'a0.h0'…'a5.h3'."""
        names = [n for n in self.upstream if n[0] == kind]
        return f"{names[0]!r}…{names[-1]!r}" if names else "(none)"

    @classmethod
    def from_config(cls, cfg: dict) -> "CircuitGraph":
        """The graph the EAP-IG/MIB convention builds from ``n_layers``, ``n_heads`` and ``parallel_attn_mlp``.

        It is the graph of any traced model with that shape, so a circuit saved from one tool loads in another.
        A graph of another shape (a hybrid's layers without attention) lists its ``writers`` in ``cfg`` too."""
        if "writers" in cfg:
            writers = [Writer(*w) for w in cfg["writers"]]
            return cls(writers, max(w.step for w in writers) + 1, cfg.get("d_model"))
        layers, parallel = range(cfg["n_layers"]), bool(cfg["parallel_attn_mlp"])
        writers = [Writer(kind, layer, cfg["n_heads"] if kind == "attention" else 0,
                          layer if parallel else 2 * layer + (kind == "mlp"))
                   for layer in layers for kind in ("attention", "mlp")]
        return cls(writers, len(layers) * (1 if parallel else 2), cfg.get("d_model"))

    @property
    def cfg(self) -> dict:
        """What EAP-IG's ``Graph.from_json`` needs to rebuild this graph; and where the convention's shape is not
        this graph's, every writer (kind, layer, heads, residual step), from which ``from_config`` rebuilds it."""
        cfg = {"n_layers": self.n_layers, "n_heads": self.n_heads, "parallel_attn_mlp": self.parallel_attn_mlp,
               "d_model": self.d_model}
        if CircuitGraph.from_config(cfg).edges != self.edges:
            cfg["writers"] = [[w.kind, w.layer, w.n_heads, w.step] + ([w.read_step] if w.read_step is not None else [])
                              for w in self.writers]
        return cfg

    @property
    def group_sizes(self) -> list[int]:
        """Upstream nodes per writer, in order: ``input``, then a layer's heads or one MLP."""
        return [1] + [w.n_heads if w.kind == "attention" else 1 for w in self.writers]

    @property
    def blocks(self) -> list[Block]:
        """The writers in stream order, grouped into blocks: each attention layer starts one, and a writer after
        another that is not attention starts one too."""
        groups: list[list[Writer]] = []
        for w in sorted(self.writers, key=lambda w: (w.step, w.kind != "attention")):
            if not groups or w.kind == "attention" or any(v.kind != "attention" for v in groups[-1]):
                groups.append([])
            groups[-1].append(w)
        layers = [{w.layer for w in group} for group in groups]
        layered = all(len(one) == 1 for one in layers) and len(set().union(*layers)) == len(groups)
        return [Block(tuple(group), group[0].layer if layered else None) for group in groups]

    def into(self, block: Block) -> torch.Tensor:
        """The edges that carry the residual stream into ``block``, bool [E]: from every node written before the
        block first reads the stream to every input read there or later.  Patched at a position, they patch the
        stream entering the block there (causal tracing's unit, TransformerLens's ``resid_pre`` for a layer): the
        block and those after it see that position's stream from the other run, the blocks before their own.  (Keys
        and values a layer reuses from an earlier one were read before it, and stay as they were.)"""
        first = min(step for w in block.writers for name, step in w.reads() if not name.endswith(("<k>", "<v>")))
        return (self.write_steps[self.src] < first) & (self.read_steps[self.dst] >= first)

    @property
    def n_layers(self) -> int:
        """The attention layers, as the EAP-IG/MIB convention counts a model's layers: a hybrid's recurrent or
        MLP-only blocks are not among them."""
        return sum(w.kind == "attention" for w in self.writers)

    @property
    def n_heads(self) -> int:
        """Query heads per attention layer, the most of any layer's (the convention's one number)."""
        return max(w.n_heads for w in self.writers)

    @property
    def parallel_attn_mlp(self) -> bool:
        """Whether a layer's attention and MLP read the same stream (GPT-J, Pythia): neither feeds the other."""
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


class EdgeIndex(Mapping):
    """``{edge name: its index in graph.edges}``, worked out from the name (``CircuitGraph.edge_id``) rather than
    stored: a model of 14B parameters has ~6M edges, and a dict of them took longer to build than the rest of
    the graph, and a gigabyte."""

    def __init__(self, graph: CircuitGraph):
        self.graph = graph

    def __getitem__(self, name: str) -> int:
        index = self.graph.edge_id(name)
        if index is None:
            raise KeyError(self.graph.not_an_edge(name))
        return index

    def __contains__(self, name) -> bool:
        return self.graph.edge_id(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self.graph.edges)

    def __len__(self) -> int:
        return len(self.graph.edges)
