"""Evaluation: is a circuit faithful to the model on the task?

A circuit runs by edge patching: every edge outside it carries the other run's value (not node removal).
Faithfulness f(C) = (m(C) − m(∅)) / (m(M) − m(∅)) with m the mean metric, M the full model and ∅ the empty
circuit (every edge patched).  MIB's CPR and CMD integrate f, or |1 − f|, over circuits of the
top 0.1% … 100% of edges, each pruned, ranked by signed score for CPR and by |score| for CMD, as MIB's own scripts
rank them.  ``smallest`` finds how few edges reach a given faithfulness (the size Hanna et al. 2024 compare
methods by).  Completeness knocks the circuit out of the full model; minimality
asks, for each edge of the circuit, how much faithfulness it is worth.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from . import metrics as metrics_
from .ablations import Ablation
from .circuit import Circuit
from .model import CircuitModel
from .positional import SpanCircuit, SpanScores
from .routes import METHOD as ROUTES
from .data import check_counts
from .runs import Calls, Prepared, call_size, check_finite, ends, metric_values, prepare
from .scores import EdgeScores

MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CPU_CALL_STREAM = 3 * 2 ** 16  # values of a call's stream [circuits · batch, seq, d_model] CPU runs best at


@dataclass
class Evaluation:
    """Per-example metric values of the circuit, the full model and the empty circuit ([examples] each)."""
    circuit: torch.Tensor
    full: torch.Tensor
    empty: torch.Tensor

    @property
    def faithfulness(self) -> float:
        return faithfulness(self.circuit.mean(), self.full.mean(), self.empty.mean())


def faithfulness(circuit, full, empty) -> float:
    """(m(C) − m(∅)) / (m(M) − m(∅)); raises when the model does not tell the runs apart: m(M) = m(∅) up to
    rounding (the two runs take different but equal sums, so equal scores may differ in their last digits)."""
    full, empty = float(full), float(empty)
    span = full - empty
    if abs(span) <= 1e-5 * max(abs(full), abs(empty)):
        raise ValueError("the full model and the empty circuit score the same, so faithfulness is undefined: "
                         "the corrupted prompts do not change the metric")
    return (float(circuit) - float(empty)) / span


class Evaluator:
    """Batches prepared once (the other run recorded), then any number of circuits evaluated on them,
    ``masks_per_call`` per patched call: by default 16 on an accelerator, whose runs wait on their launches, and on
    CPU what runs fastest for the model's width and the batches' size (``per_call``; SmolLM2, batches of 8 IOI
    prompts: two); fewer from a call on that ran out of the accelerator's memory (``runs.Calls``)."""

    def __init__(self, cm: CircuitModel, batches: dict | Iterable[dict], metric: str | Callable, *,
                 ablation: str | Ablation = "corrupted", reference: Iterable[dict] | None = None,
                 masks_per_call: int | None = None):
        self.cm, self.metric = cm, metrics_.get(metric)
        self.prepared: list[Prepared] = prepare(cm, batches, self.metric, ablation, reference)
        self.calls = Calls(per_call(self.prepared, masks_per_call))
        values = self.values(ends(cm.graph))
        check_finite(cm, self.prepared, self.metric, values)
        self.full, self.empty = values

    def values(self, masks: torch.Tensor, progress: bool = False, spans: list[str] | None = None,
               desc: str = "evaluate") -> torch.Tensor:
        """Per-example metric under each edge mask [n, E]: [n, examples].  With ``spans`` (a positional circuit's
        classes, ``SpanCircuit.spans``), masks [n, classes, E], each class applied at its tokens.  ``progress``: a
        bar over the calls, named ``desc``."""
        named = None if spans is None else spans[:-1]  # the last class is the rest, which no span names
        return self.calls.split(masks, lambda chunk: metric_values(self.cm, self.prepared, self.metric, chunk, named),
                                self.prepared, desc=desc if progress else None)

    @property
    def masks_per_call(self) -> int:
        """Circuits a patched call runs now: ``per_call``'s count, or less where a call ran out of memory."""
        return self.calls.size

    def faithfulness(self, masks: torch.Tensor, progress: bool = False, spans: list[str] | None = None) -> list[float]:
        return [faithfulness(v.mean(), self.full.mean(), self.empty.mean())
                for v in self.values(masks, progress, spans)]

    def evaluate(self, circuit: Circuit | SpanCircuit) -> Evaluation:
        """A circuit, or a positional one, on the batches."""
        if not isinstance(circuit, (Circuit, SpanCircuit)):
            raise TypeError(f"evaluate takes a Circuit or a SpanCircuit, not {type(circuit).__name__}: for edges by "
                            "name, Circuit(cm.graph, names); for scores, a cut of them (scores.topn(n))")
        return Evaluation(self.values(circuit.edge_mask(self.cm.graph)[None], spans=_spans(circuit))[0], self.full,
                          self.empty)

    def curve(self, scores: EdgeScores | SpanScores, fractions: Sequence[float] = MIB_FRACTIONS,
              absolute: bool = True, progress: bool = False, selection: str | None = None) -> "Curve":
        """Faithfulness of the circuits of the top ``p`` of the edges, ranked by |score| (``absolute``) or signed
        score, smallest ``p`` first, each cut by ``selection`` as MIB cuts them: ``"topn"`` (its default) and
        ``"greedy"`` (grown from the logits, its ``apply_greedy``, its default for information flow routes; None
        picks MIB's default for the method of ``scores``) pruned, ``"nodes"`` the top ``p`` of the upstream
        nodes (``topn_nodes``, its node level; unpruned, as a node-level circuit runs as node patching).  For scores
        by span, of (edge, span) pairs, which ``Curve.edges`` then counts."""
        _scores_given(scores, "curve")
        if not fractions:
            raise ValueError("no fractions to run: give the shares of the edges to keep, e.g. MIB_FRACTIONS")
        fractions = sorted(fractions)
        cut = _cutter(scores, selection, absolute)[0]
        circuits = [cut(float(p)) for p in fractions]
        masks = torch.stack([c.edge_mask(self.cm.graph) for c in circuits])
        return Curve(list(fractions), [len(c) for c in circuits], self.faithfulness(masks, progress, _spans(scores)))

    def mib(self, scores: EdgeScores | SpanScores, fractions: Sequence[float] = MIB_FRACTIONS,
            progress: bool = False, selection: str | None = None) -> dict:
        """MIB's CPR (signed ranking, area under f) and CMD (|score| ranking, area under |1 − f|), with curves;
        ``selection`` as in ``curve``."""
        signed = self.curve(scores, fractions, absolute=False, progress=progress, selection=selection)
        absolute = self.curve(scores, fractions, absolute=True, progress=progress, selection=selection)
        return {"cpr": cpr(signed.fractions, signed.faithfulness), "cmd": cmd(absolute.fractions, absolute.faithfulness),
                "cpr_curve": signed, "cmd_curve": absolute}

    def smallest(self, scores: EdgeScores | SpanScores, faithfulness: float = 0.85, selection: str | None = None,
                 absolute: bool = True, per_round: int = 16, progress: bool = False) -> Circuit | SpanCircuit:
        """The smallest circuit that ``selection`` (``"topn"``, ``"greedy"`` or ``"nodes"``: ``topn_nodes``; None as in
        ``curve``) cuts from ``scores`` whose faithfulness reaches ``faithfulness``; that faithfulness in its
        ``info["faithfulness"]``.

        Faithfulness need not grow with the size, so no search short of trying every size is sure of the
        smallest.  This one runs ``per_round`` sizes at a time, narrowing the first bracket where the
        faithfulness crosses the target — spaced by a common ratio while the bracket spans more than a factor 2,
        evenly after — until it is two adjacent sizes.  What it returns reaches the target and the cut one edge
        (node, pair) smaller does not; a smaller circuit that reaches it between two sizes of its first round can
        be missed.  More per round miss fewer such dips and cost more runs (on 32 SmolLM2 greater-than prompts,
        EAP at 85%: 3,560 edges 16 per round, 5,231 two per round); ``masks_per_call`` changes only the time."""
        if not math.isfinite(faithfulness) or faithfulness <= 0:
            raise ValueError(f"faithfulness {faithfulness} is no target: give one above 0 (0.85 for 85%); the empty "
                             "circuit already has 0")
        _scores_given(scores, "smallest")
        check_counts(per_round=per_round)
        cut, total = _cutter(scores, selection, absolute)
        # the empty circuit patches every edge, the full one none: faithfulness 0 and 1 by definition, which a run
        # among other masks would meet only to rounding (0.99999996 failed a target of 1)
        tried: dict[int, float] = {0: 0.0, total: 1.0}
        with tqdm(desc="smallest", unit="circuit", disable=not progress) as bar:
            def run(sizes: list[int]) -> tuple[int, int]:
                sizes = sorted(set(sizes) - tried.keys())
                masks = torch.stack([cut(n).edge_mask(self.cm.graph) for n in sizes])
                tried.update(zip(sizes, self.faithfulness(masks, spans=_spans(scores))))
                bar.update(len(sizes))
                low, high = _bracket(tried, faithfulness, total)
                bar.set_postfix_str(f"between {low} and {high}")
                return low, high

            low, high = run(_between(0, total, per_round))
            while high - low > 1:
                low, high = run(_between(low, high, per_round))
        circuit = cut(high)
        circuit.info["faithfulness"] = tried[high]
        return circuit

    def completeness(self, circuit: Circuit | SpanCircuit) -> float:
        """Faithfulness of the model with the circuit knocked out (its edges patched, every other edge kept):
        near 0 when the circuit holds all of the behaviour."""
        return self.faithfulness(1 - circuit.edge_mask(self.cm.graph)[None], spans=_spans(circuit))[0]

    def minimality(self, circuit: Circuit | SpanCircuit, progress: bool = False) -> dict:
        """For each edge of the circuit — each (edge, span) pair of a positional one — f(C) − f(C without it):
        what it is worth."""
        base, spans = circuit.edge_mask(self.cm.graph), _spans(circuit)
        kept = base.nonzero()  # [k, 1] edges, or [k, 2] (span, edge) pairs
        if len(kept) == 0:
            return {}
        masks = base.repeat(len(kept), *[1] * base.dim())
        masks[(torch.arange(len(kept)), *kept.T)] = 0.0
        whole = self.faithfulness(base[None], spans=spans)[0]
        without = self.faithfulness(masks, progress, spans)
        names = self.cm.graph.edges
        keys = ([names[e] for (e,) in kept.tolist()] if spans is None
                else [(names[e], spans[c]) for c, e in kept.tolist()])
        return {key: whole - f for key, f in zip(keys, without)}


def per_call(prepared: list[Prepared], given: int | None) -> int:
    """How many circuits an ``Evaluator`` runs per patched call on ``prepared``: ``given`` where given, else 16 on
    an accelerator, and on CPU as many as keep the call's stream within ``CPU_CALL_STREAM`` values for the largest
    batch (1 to 16).

    Circuits share nothing, so a larger call only adds rows, and on CPU rows past that point cost more each, the
    working set outgrowing the caches.  On two cores (AMD EPYC, 32 MB L3), random Llamas, random masks and IOI
    prompts of 17 tokens, the fastest per mask were: 8 prompts, d_model 64: 8–32 a call, 2.5× faster than one;
    d_model 256: 4, 2× faster than 32; d_model 512: 2, 1.4× faster than 32; SmolLM2 (576): 2, 10% faster than one
    (the search for IOI's 85% circuit: 118.5 s against 131.5 s) and 3× faster than 16.  32 prompts: d_model 64: 4,
    4× faster than 32; d_model 256: 1–4, 3× faster than 32.  This rule gives 16, 5, 2, 2, 5 and 1.

    ``attribute``'s exact runs differ: a call's masks patch neighbouring edges, the layers before them run once for
    all, and larger calls share more, so they keep their own bound (``attribution.EXACT_CALL_STREAM``)."""
    return call_size(prepared, given, cpu_stream=CPU_CALL_STREAM, most=16, accelerator=16)


def _between(low: int, high: int, k: int) -> list[int]:
    """About ``k`` sizes strictly between ``low`` and ``high``: spaced by a common ratio while ``high`` is over twice
    ``low`` (circuit sizes span orders of magnitude), evenly after; the midpoint where rounding leaves none."""
    bottom = max(low, 1)
    points = (torch.logspace(math.log10(bottom), math.log10(high), k + 2, dtype=torch.float64) if high > 2 * bottom
              else torch.linspace(low, high, k + 2, dtype=torch.float64))
    inside = sorted({n for n in points[1:-1].round().long().tolist() if low < n < high})
    return inside or [(low + high) // 2]


def _bracket(tried: dict[int, float], target: float, total: int) -> tuple[int, int]:
    """The smallest size tried that reaches ``target``, and the largest tried below it, which does not."""
    reached = [n for n, f in tried.items() if f >= target]
    if not reached:
        best = max(tried, key=tried.get)
        shown = f"{tried[best]:.3f}" if round(tried[best], 3) < target else repr(tried[best])  # never the target
        raise ValueError(f"no circuit cut from these scores reaches faithfulness {target}: of the {len(tried)} sizes "
                         f"tried, the best, {best} of {total}, has {shown}")
    high = min(reached)
    return max(n for n in tried if n < high), high


def _scores_given(scores, use: str) -> None:
    """Refuse what is not scores to cut circuits from, naming what to pass."""
    if not isinstance(scores, (EdgeScores, SpanScores)):
        raise TypeError(f"{use} cuts circuits from scores, EdgeScores or SpanScores (as attribute and "
                        f"attribute_by_span give them), not a {type(scores).__name__}"
                        + ("; evaluate runs a circuit" if isinstance(scores, (Circuit, SpanCircuit)) else ""))


def mib_selection(method: str) -> str:
    """How MIB cuts ``method``'s scores by size: greedily from the logits for information flow routes (its
    ``apply_greedy``), since every reader's scores add up to 1 and the top ones go into the first layers, whose
    edges top-n would keep and pruning then drop; top-n for every other method."""
    return "greedy" if method == ROUTES else "topn"


def _cutter(scores: EdgeScores | SpanScores, selection: str | None,
            absolute: bool) -> tuple[Callable[[int], Circuit | SpanCircuit], int]:
    """``selection`` as a function of the circuit's size, and the largest size: all edges (or (edge, span)
    pairs), or all upstream nodes for ``"nodes"``; None as MIB cuts the scores' method (``mib_selection``)."""
    selection = mib_selection(scores.method) if selection is None else selection
    if selection == "nodes" and isinstance(scores, EdgeScores):
        return (lambda n: scores.topn_nodes(n, absolute)), len(scores.graph.upstream)
    if selection in ("topn", "greedy"):
        return scores.cuts(selection, absolute), scores.tensor.numel()
    raise ValueError(f"no selection {selection!r} by size for {type(scores).__name__}: use topn or greedy"
                     + (", or nodes" if isinstance(scores, EdgeScores) else ""))


def _spans(circuit: Circuit | SpanCircuit | EdgeScores | SpanScores) -> list[str] | None:
    """The classes of positions of a positional circuit or of scores by span; None for plain ones."""
    return circuit.spans if isinstance(circuit, (SpanCircuit, SpanScores)) else None


@dataclass
class Curve:
    """Faithfulness against circuit size: the requested fractions, the edges kept after pruning, f."""
    fractions: list[float]
    edges: list[int]
    faithfulness: list[float]


def evaluate(cm: CircuitModel, circuit: Circuit | SpanCircuit, batches: dict | Iterable[dict], metric: str | Callable,
             **options) -> Evaluation:
    """Per-example metric of ``circuit`` (every other edge patched), with the full and empty baselines."""
    return Evaluator(cm, batches, metric, **options).evaluate(circuit)


def _area(fractions: Sequence[float], values: Sequence[float]) -> float:
    """Σ_i (p_{i+1} − p_i)·(v_i + v_{i+1})/2 over the fractions in increasing order (given in another, the sum
    would flip its sign or mean nothing): trapezoids on the linear fractions, as MIB integrates."""
    if len(fractions) != len(values):
        raise ValueError(f"{len(fractions)} fractions and {len(values)} faithfulness values: give one per fraction")
    points = sorted(zip(fractions, values))
    return sum((b - a) * (u + v) / 2 for (a, u), (b, v) in zip(points, points[1:]))


def cpr(fractions: Sequence[float], faithfulness_values: Sequence[float]) -> float:
    """Circuit performance ratio: the area under f (higher is better)."""
    return _area(fractions, faithfulness_values)


def cmd(fractions: Sequence[float], faithfulness_values: Sequence[float]) -> float:
    """Circuit–model distance: the area under |1 − f| (lower is better)."""
    return _area(fractions, [abs(1 - f) for f in faithfulness_values])
