"""Circuits: the edges kept from a model's graph, pruned of dangling pieces, saved as the field saves them.

A circuit runs by patching every edge outside it (``cm(..., edge_mask=circuit)``).  It is saved in the two forms
EAP-IG writes and MIB takes as submissions, so a circuit found here loads in those tools and back:
- JSON, as EAP-IG's ``Graph.to_json`` writes it: ``{"cfg", "nodes", "edges"}`` with every node and edge of the
  full graph, an ``in_graph`` flag, and each edge's score (which MIB's submissions of several circuits leave out:
  those read as circuits without scores).  Nodes get no score: EAP-IG reads one as node attribution, which an
  edge circuit has not (its loader would rank nodes by it, and its writer then fails on the ``logits`` node);
- ``torch.save`` (``Graph.to_pt``), compact for large models: ``cfg``, the ``src_nodes`` (upstream) and
  ``dst_nodes`` (downstream inputs) in graph order, and [src, dst] matrices of edge scores and flags, in which the
  cells of no edge (``m1->m0``) hold zeros.
"""
from __future__ import annotations

import itertools
import json
import numbers
from collections.abc import Iterable
from pathlib import Path

import networkx as nx
import torch

from .graph import CircuitGraph, names
from .metrics import wide

FORMATS = {".json": "json", ".pt": "pt", ".pth": "pt"}  # suffix → the format read and written


class Circuit:
    """A set of edges of ``graph`` (``in_graph``, bool [E] in ``graph.edges`` order), with the scores that chose
    them when there are any (float [E], all edges, also those left out)."""

    def __init__(self, graph: CircuitGraph, edges: Iterable[str] | torch.Tensor,
                 scores: torch.Tensor | None = None, info: dict | None = None):
        self.graph, self.info = graph, dict(info or {})  # info: model, task, method… kept in the JSON's cfg
        self.in_graph = edge_flags(graph, edges)
        if scores is not None and scores.shape != (len(graph.edges),):
            raise ValueError(f"scores have shape {tuple(scores.shape)}; expected one per edge, [{len(graph.edges)}]")
        self.scores = None if scores is None else wide(scores.detach()).cpu()

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
            raise ValueError(f"the circuits are of different graphs ({graph_difference(self.graph, other.graph)}): "
                             "combine or compare circuits of one model, or of models of one architecture")
        same = self.scores is not None and other.scores is not None and torch.equal(self.scores, other.scores)
        return Circuit(self.graph, op(self.in_graph, other.in_graph), self.scores if same else None)

    def overlap(self, other: "Circuit") -> dict[str, float]:
        """How far two circuits agree, as circuits found by two methods (or on two tasks or models) are compared:
        the edges and nodes they share, and each count over their union's (intersection over union: 1 is the same
        circuit, 0 disjoint; two empty circuits count as the same).  Nodes are the heads and MLPs: every circuit
        with an edge holds ``input`` and ``logits``, which would lift the IoU of two disjoint circuits of k heads
        each from 0 to 2 / (2k + 2)."""
        shared, union = len(self & other), len(self | other)
        mine, theirs = (set(c.nodes) - {"input", "logits"} for c in (self, other))
        return {"shared_edges": shared, "edge_iou": shared / union if union else 1.0,
                "shared_nodes": len(mine & theirs),
                "node_iou": len(mine & theirs) / len(mine | theirs) if mine | theirs else 1.0}

    def edge_mask(self, graph: CircuitGraph) -> torch.Tensor:
        """The mask [E] of ``graph`` that runs this circuit: 1 on its edges, 0 (patched) everywhere else.  ``graph``
        must hold the edges the circuit's does, in any order: a name such as ``m1->logits`` is another edge in a
        deeper model, whose layers past the circuit's would all be patched."""
        if graph.edges == self.graph.edges:
            return self.in_graph.float()
        self.check_graph(graph)
        return edge_flags(graph, self.edges).float()

    def check_graph(self, graph: CircuitGraph) -> None:
        """Refuse a model's ``graph`` that holds other edges than the circuit's (in any order), before its names are
        read there."""
        if graph.edges != self.graph.edges and graph.edge_index.keys() != self.graph.edge_index.keys():
            raise another_graph(self.graph, graph)

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

    def strongest(self, n: int | float) -> "Circuit":
        """The circuit's ``n`` edges of largest |score| (a float: that fraction of its edges, 0.1 for a tenth): the
        core of a circuit too large to draw legibly (a few hundred edges are; a 1% circuit of a 30-layer model has a
        thousand).  A count past the circuit's size keeps it all.  ``.pruned()`` drops what then dangles."""
        if self.scores is None:
            raise ValueError("this circuit has no scores to rank its edges by; draw it whole, or pass a subset of "
                             "its edges to Circuit(graph, edges)")
        index = self.in_graph.nonzero().flatten()
        n = n.item() if isinstance(n, torch.Tensor) and n.numel() == 1 else n
        whole = isinstance(n, numbers.Integral) and not isinstance(n, bool) and n > len(index)
        count = count_of(len(index) if whole else n, len(index))
        flags = torch.zeros_like(self.in_graph)
        flags[index[self.scores[index].abs().argsort(descending=True, stable=True)[:count]]] = True
        return Circuit(self.graph, flags, self.scores, self.info)

    def pruned(self) -> "Circuit":
        """The circuit without dangling pieces, as EAP-IG prunes (``undangled``)."""
        return Circuit(self.graph, undangled(self.graph, self.in_graph), self.scores, self.info)

    def node_scores(self) -> dict[str, float] | None:
        """A node's score is the sum of its outgoing edges' scores: patching a node patches all of them."""
        if self.scores is None:
            return None
        return dict(zip(self.graph.upstream, self.graph.by_source(self.scores).tolist()))

    def save(self, path: str | Path, **info) -> None:
        """``to_json`` or ``to_pt``, as the path ends (``.json``; ``.pt`` or ``.pth``)."""
        (self.to_json if _format(path) == "json" else self.to_pt)(path, **info)

    @classmethod
    def load(cls, path: str | Path) -> "Circuit":
        """``from_json`` or ``from_pt``, as the path ends (``.json``; ``.pt`` or ``.pth``)."""
        return (cls.from_json if _format(path) == "json" else cls.from_pt)(path)

    def to_json(self, path: str | Path, **info) -> None:
        """Write the EAP-IG/MIB circuit JSON; ``info`` (model, task, method…) is kept in ``cfg``."""
        Path(path).write_text(json.dumps(self.json_form(**info)))

    def json_form(self, **info) -> dict:
        """What ``to_json`` writes, as a dict: ``{"cfg", "nodes", "edges"}``."""
        g = self.graph
        alive = set(self.nodes)
        nodes = {name: {"in_graph": name in alive} for name in g.nodes}  # no "score": EAP-IG's node attribution
        scores = self.scores.tolist() if self.scores is not None else [0.0] * len(g.edges)
        edges = {name: {"score": s, "in_graph": bool(flag)}
                 for name, s, flag in zip(g.edges, scores, self.in_graph.tolist())}
        return {"cfg": self._cfg(info), "nodes": nodes, "edges": edges}

    def to_pt(self, path: str | Path, **info) -> None:
        """Write the circuit as EAP-IG's ``Graph.to_pt`` does (``torch.save``; read by its ``Graph.from_pt`` and
        MIB's loader); ``info`` is kept in ``cfg``."""
        g = self.graph
        alive = set(self.nodes)
        data = {"cfg": self._cfg(info), "src_nodes": list(g.upstream), "dst_nodes": list(g.downstream),
                "edges_scores": self._matrix(self.scores if self.scores is not None else torch.zeros(len(g.edges))),
                "edges_in_graph": self._matrix(self.in_graph),
                "nodes_in_graph": torch.tensor([name in alive for name in g.upstream])}
        torch.save(data, path)

    @classmethod
    def from_json(cls, path: str | Path) -> "Circuit":
        """Read a circuit JSON written by fxcircuits, EAP-IG or for MIB."""
        return cls.from_json_form(read_json(path), path)

    @classmethod
    def from_json_form(cls, data: dict, path: str | Path = "the circuit") -> "Circuit":
        """A circuit from the dict ``from_json`` reads; ``path`` names where it came from, in errors."""
        if is_positional(data):
            raise ValueError(f"{path} holds a positional circuit, one circuit per span: read it with "
                             "fxcircuits.SpanCircuit.load (or fxcircuits.positional.load_circuit, for either kind)")
        _require(data, {"cfg", "nodes", "edges"}, path)
        for key in ("nodes", "edges"):
            if not isinstance(data[key], dict) or not all(isinstance(v, dict) for v in data[key].values()):
                raise ValueError(f"{path}: its {key} are not an object of {key[:-1]} names, each with its flags")
        unflagged = next((name for name, edge in data["edges"].items() if not isinstance(edge.get("in_graph"), bool)),
                         None)
        if unflagged is not None:
            raise ValueError(f"{path}: edge {unflagged!r} has no in_graph flag (true or false)")
        graph = _graph(data["cfg"], path)
        unknown = data["edges"].keys() - graph.edge_index.keys()
        if unknown:
            raise ValueError(f"{path} names {len(unknown)} edges that a {data['cfg']['n_layers']}-layer, "
                             f"{data['cfg']['n_heads']}-head graph lacks, e.g. {sorted(unknown)[:3]}; "
                             f"{graph.not_an_edge(sorted(unknown)[0])}")
        _whole_nodes(path, [(name, node["in_graph"], node["neurons"]) for name, node in data["nodes"].items()
                            if "neurons" in node])
        in_graph = [name for name, edge in data["edges"].items() if edge["in_graph"]]
        return cls._from_cfg(graph, data["cfg"], in_graph, _json_scores(graph, data["edges"], path))

    @classmethod
    def from_pt(cls, path: str | Path) -> "Circuit":
        """Read a circuit written by ``to_pt`` or by EAP-IG's ``Graph.to_pt``.  The cells of no edge are left out:
        EAP-IG scores every [src, dst] pair, and its node-level circuits flag every pair leaving a kept node."""
        try:
            data = torch.load(path, weights_only=True)
        except OSError:
            raise
        except Exception as error:  # what unpickling a file of another kind raises varies with its bytes
            raise ValueError(f"{path} is not a circuit file: torch.load cannot read it as torch.save writes one "
                             f"({type(error).__name__})") from None
        _require(data, {"cfg", "src_nodes", "dst_nodes", "edges_scores", "edges_in_graph", "nodes_in_graph"}, path)
        graph = _graph(data["cfg"], path)
        shape = (len(graph.upstream), len(graph.downstream))
        if (list(data["src_nodes"]), list(data["dst_nodes"])) != (graph.upstream, graph.downstream):
            raise ValueError(f"{path}: its src_nodes and dst_nodes are not those of the graph its cfg describes "
                             f"({shape[0]} upstream nodes, {shape[1]} downstream inputs, in graph order)")
        if data["edges_in_graph"].shape != shape or data["edges_scores"].shape != shape:
            raise ValueError(f"{path}: edges_in_graph and edges_scores must be [src, dst] = {list(shape)} matrices; "
                             f"they are {list(data['edges_in_graph'].shape)} and {list(data['edges_scores'].shape)}")
        if data.get("neurons_in_graph") is not None:
            _whole_nodes(path, zip(graph.upstream, data["nodes_in_graph"].tolist(), data["neurons_in_graph"]))
        flags, scores = (data[key].reshape(-1)[graph.cells] for key in ("edges_in_graph", "edges_scores"))
        wide = scores.dtype == torch.float64  # a float64 model's scores, as they were saved
        return cls._from_cfg(graph, data["cfg"], flags.bool(), scores if wide else scores.float())

    def _cfg(self, info: dict) -> dict:
        """The file's ``cfg``: the graph's shape as the convention gives it, with what is known of the circuit."""
        if self.graph.d_model is None:
            raise ValueError("this graph does not know d_model, which EAP-IG's Graph.from_json needs; build it with "
                             "fxcircuits.trace(model) or CircuitGraph.from_config({... 'd_model': ...})")
        return {**plain_info({**self.info, **info}), **self.graph.cfg, "scored": self.scores is not None}

    @classmethod
    def _from_cfg(cls, graph: CircuitGraph, cfg: dict, in_graph, scores: torch.Tensor | None) -> "Circuit":
        """A circuit read back, with the ``scores`` read (None where a JSON file's edges carry none) unless its
        ``cfg`` says it has none (fxcircuits writes an unscored circuit's scores as zeros, as EAP-IG's loader needs
        a score on every edge), and what ``cfg`` holds beyond the graph's shape as ``info``.  A file that does not
        say (EAP-IG's, or one made by hand for it) and scores every edge 0 is taken as unscored too: no attribution
        scores every edge exactly 0, and a ranking of ties would give CPR and CMD that mean nothing."""
        known = graph.cfg  # built once: it rebuilds the convention's graph to compare
        info = {k: v for k, v in cfg.items() if k not in known and k != "scored"}
        scored = cfg.get("scored", scores is not None and bool(scores.any()))
        return cls(graph, in_graph, scores if scored else None, info)

    def _matrix(self, values: torch.Tensor) -> torch.Tensor:
        """Per-edge ``values`` [E] laid out as EAP-IG's [src, dst] matrix, zeros where no edge is."""
        g = self.graph
        matrix = torch.zeros(len(g.upstream) * len(g.downstream), dtype=values.dtype)
        matrix[g.cells] = values
        return matrix.view(len(g.upstream), len(g.downstream))


def _json_scores(graph: CircuitGraph, edges: dict[str, dict], path) -> torch.Tensor | None:
    """The scores [E] of a circuit JSON's ``edges``, or None where no edge carries one (``score`` missing or null):
    MIB's submissions of many circuits use EAP-IG's format without them, and reading those as zeros would rank
    and evaluate them as scores.  A file that scores some edges and not others is refused: no ranking is right."""
    given = {name: edge.get("score") for name, edge in edges.items()}
    unscored = [name for name, score in given.items() if score is None]
    if len(unscored) == len(given):
        return None
    if unscored:
        scored = next(name for name, score in given.items() if score is not None)
        raise ValueError(f"{path}: {len(given) - len(unscored)} of its {len(given)} edges carry a score and the "
                         f"others none (e.g. {scored!r} does, {unscored[0]!r} does not); a circuit file scores "
                         "every edge or none: write it again with a score on each edge, or with none")
    wrong = next((name for name, score in given.items() if isinstance(score, bool)
                  or not isinstance(score, (int, float))), None)
    if wrong is not None:
        raise ValueError(f"{path}: edge {wrong!r} has the score {given[wrong]!r}; a score is a number")
    values = torch.tensor(list(given.values()), dtype=torch.float64)
    scores = torch.zeros(len(graph.edges), dtype=_narrowest(values))
    scores[[graph.edge_index[name] for name in given]] = values.to(scores.dtype)
    return scores


def _narrowest(values: torch.Tensor) -> torch.dtype:
    """float32 where every one of ``values`` is a float32 (as a float32 model's scores, written by JSON exactly, all
    are), float64 otherwise: a float64 model's scores come back as they were, not rounded to float32's 7 digits."""
    return torch.float32 if torch.equal(values.float().double(), values) else torch.float64


def plain_info(info: dict) -> dict:
    """``info`` in the plain values a circuit file holds — numbers, strings, lists and dicts of them; numpy's and
    torch's numbers and arrays made Python's — each refused by name otherwise, when saving: JSON cannot write
    the rest, and the ``weights_only`` load that reads a ``.pt`` file back refuses it."""
    plain = {}
    for key, value in info.items():
        try:
            plain[key] = json.loads(json.dumps(value, default=_listed))
        except (TypeError, ValueError):
            raise TypeError(f"the circuit's info {key!r} is a {type(value).__name__}, which a circuit file cannot "
                            "hold: give numbers, strings, or lists and dicts of them (a metric by its name)") from None
    return plain


def _listed(value):
    """What JSON writes for a numpy or torch value: its Python number, or nested list of them."""
    if not hasattr(value, "tolist"):
        raise TypeError(type(value).__name__)
    return value.tolist()


def another_graph(mine: CircuitGraph, model: CircuitGraph) -> ValueError:
    """The refusal of a circuit of the graph ``mine`` run on a model of the graph ``model``: plain circuits and
    positional ones (``positional.SpanCircuit``) refuse alike."""
    return ValueError(f"this circuit is of another graph than the model's ({graph_difference(mine, model)}): run a "
                      "circuit on the model it was found on, or on one of its architecture and size")


def graph_difference(mine: CircuitGraph, theirs: CircuitGraph) -> str:
    """How two graphs' edge lists differ, for an error: their sizes and the first edge where they part (in every
    refusal of circuits of different graphs, plain or positional)."""
    first = next((a, b) for a, b in itertools.zip_longest(mine.edges, theirs.edges) if a != b)
    return f"{len(mine.edges)} and {len(theirs.edges)} edges; first difference {first[0]!r} against {first[1]!r}"


def _format(path: str | Path) -> str:
    """``json`` or ``pt`` by the file's suffix; any other suffix is refused rather than guessed."""
    suffix = Path(path).suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(f"{Path(path).name!r}: a circuit file ends in {' or '.join(FORMATS)}, by its format")
    return FORMATS[suffix]


def _whole_nodes(path, nodes: Iterable[tuple[str, bool, object]]) -> None:
    """Refuse a neuron-level circuit (EAP-IG's neurons in graph, per node): it keeps part of a node, which an edge
    mask cannot, and evaluating the whole node instead would give another circuit's answer.  ``nodes``: (name, in
    the circuit, its neuron flags)."""
    partial = [name for name, kept, neurons in nodes if kept and not bool(torch.as_tensor(neurons).bool().all())]
    if partial:
        raise ValueError(f"{path} keeps part of the neurons of {len(partial)} node(s), e.g. {partial[0]}: "
                         "neuron-level circuits are not edge circuits; fxcircuits reads circuits of whole nodes")


def is_positional(saved) -> bool:
    """Whether a circuit file's JSON is a positional circuit's (``positional.SpanCircuit.save``): one circuit per
    span, which ``Circuit.from_json`` refuses and ``positional.load_circuit`` reads."""
    return isinstance(saved, dict) and {"spans", "circuits"} <= saved.keys()


def read_json(path: str | Path):
    """A circuit file's JSON; a file that is not JSON is refused naming it, where json would name only a column."""
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not a circuit file: it is not JSON ({error})") from None


def _graph(cfg, path) -> CircuitGraph:
    """The graph a circuit file's ``cfg`` describes, refused naming what is wrong with it."""
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: its cfg is a {type(cfg).__name__}, not an object of n_layers, n_heads and "
                         "parallel_attn_mlp")
    if "writers" not in cfg:
        shapes = {"n_layers": int, "n_heads": int, "parallel_attn_mlp": bool}
        wrong = [key for key, kind in shapes.items() if not isinstance(cfg.get(key), kind)
                 or (kind is int and (isinstance(cfg[key], bool) or cfg[key] < 0))]
        if wrong:
            raise ValueError(f"{path}: its cfg's {wrong[0]} is {cfg.get(wrong[0])!r}; a circuit file's cfg holds "
                             "n_layers and n_heads (whole numbers) and parallel_attn_mlp (true or false)")
    try:
        return CircuitGraph.from_config(cfg)
    except (KeyError, TypeError, ValueError) as error:
        raise ValueError(f"{path}: its cfg's writers describe no graph ({error!r})") from None


def _require(data, keys: set[str], path) -> None:
    """Refuse a file that is no circuit file, naming what it lacks."""
    missing = keys - data.keys() if isinstance(data, dict) else keys
    if missing:
        raise ValueError(f"{path} is not an EAP-IG/MIB circuit file: it lacks {sorted(missing)}")


def edge_flags(graph: CircuitGraph, edges: Iterable[str] | torch.Tensor) -> torch.Tensor:
    """Edge names or a bool tensor [E] → bool tensor [E], with a clear error for names the graph lacks: how a
    circuit, and each class of a positional one, reads the edges it is given."""
    if isinstance(edges, torch.Tensor):
        if edges.shape != (len(graph.edges),):
            raise ValueError(f"edge flags have shape {tuple(edges.shape)}; expected [{len(graph.edges)}]")
        if edges.dtype != torch.bool and not ((edges == 0) | (edges == 1)).all():
            raise ValueError("edge flags are bool, or 0 and 1: other values (a soft mask, scores) say no edge is in "
                             "or out; cut them to a circuit first, e.g. EdgeScores(graph, values).topn(n)")
        return edges.detach().cpu().bool()
    edges = names(edges, "edge")
    unknown = [e for e in edges if e not in graph.edge_index]
    if unknown:
        raise KeyError(f"circuit has {len(unknown)} edge(s) not in this model's graph, e.g. {unknown[:3]}; "
                       f"{graph.not_an_edge(unknown[0])} (see cm.graph.edges)")
    flags = torch.zeros(len(graph.edges), dtype=torch.bool)
    flags[[graph.edge_index[e] for e in edges]] = True
    return flags


def undangled(graph: CircuitGraph, keep: torch.Tensor) -> torch.Tensor:
    """Edge flags [..., E] without dangling pieces, each row alone: repeatedly drop nodes that lack an incoming
    kept edge (``input`` needs none) or an outgoing one (``logits`` needs none), then the edges that touch them."""
    rows = keep.reshape(-1, len(graph.edges))
    while True:
        alive = _nodes_alive(graph, rows)
        pruned = rows & alive[:, graph.src] & alive[:, graph.reader[graph.dst]]
        if torch.equal(pruned, rows):
            return pruned.view_as(keep)
        rows = pruned


def _nodes_alive(graph: CircuitGraph, rows: torch.Tensor) -> torch.Tensor:
    """Per row of edge flags [n, E], the nodes with an outgoing kept edge and an incoming one (``input`` counts
    as fed, ``logits`` as read): [n, nodes]."""
    flags = rows.to(torch.int32)
    outgoing = flags.new_zeros(len(rows), len(graph.nodes)).index_add_(1, graph.src, flags) > 0
    incoming = flags.new_zeros(len(rows), len(graph.nodes)).index_add_(1, graph.reader[graph.dst], flags) > 0
    outgoing[:, -1] = True
    incoming[:, 0] = True
    return outgoing & incoming


def count_of(n: int | float, total: int, what: str = "edges") -> int:
    """``n`` of ``total`` edges (or nodes, (edge, span) pairs, a learned mask's gates: ``what``): an integer is a
    count, any other real number a fraction (MIB's int(p·E); 1.0 is all) — numpy's and one-element tensors' alike,
    which ``int()`` would truncate to 0.  Every cut by size reads its size so, and so does a mask's density."""
    if isinstance(n, torch.Tensor) and n.numel() == 1:
        n = n.item()
    if isinstance(n, numbers.Integral) and not isinstance(n, bool):
        if not 0 <= n <= total:
            raise ValueError(f"asked for {n} {what} of {total}")
        return int(n)
    if isinstance(n, numbers.Real) and not isinstance(n, bool):
        if not 0 <= n <= 1:
            raise ValueError(f"{n} is no fraction of the {what}: a float is a fraction from 0 to 1 (0.01 keeps 1%); "
                             f"pass an int to keep a count of {what}")
        return int(n * total)
    raise TypeError(f"{n!r} is neither a count of {what} (an int) nor a fraction of them (a float from 0 to 1: 0.01 "
                    "keeps 1%)")
