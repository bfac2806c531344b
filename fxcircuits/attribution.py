"""Attribution: score every edge by how much of the task behaviour it carries.

    scores = fxcircuits.attribute(cm, batches, "logit_diff", method="eap-ig-inputs")
    circuit = scores.topn(0.01)

Sign and scale as EAP-IG's reference implementation and MIB: score(e) ≈ mean over examples of metric(clean) −
metric(clean with e patched).  Every method drives the same patcher (``CircuitModel.patched``):

* gradient methods (``eap``, ``eap-ig-inputs``, ``eap-ig-activations``, ``clean-corrupted``) run it at one or
  more points between the clean and the other run, with a ``patching.Tap`` that turns one backward pass into a
  score for every edge: Σ (a_u(clean) − a_u(other)) · ∂metric/∂x_d.  The integration steps of one batch run
  side by side as masks, so the cost grows with the steps, never with the edges;
* ``exact`` patches one edge per mask, many masks per call, in graph order: a call's edges go into one or two
  readers, and the layers before them run once for all its masks (``fxcircuits.prefix``); each call runs the clean
  run too, which its edges are measured against (``_costs``);
* ``acdc`` prunes edges destination by destination (Conmy et al. 2023), many candidates per call, each call
  beside the mask they are removed from;
* ``mask`` learns a hard-concrete edge mask that keeps the model's metric at a given density (Edge Pruning,
  Bhaskar et al. 2024), its gates starting ranked by a gradient method's scores;
* ``information-flow-routes`` (Ferrando & Voita 2024) drives no patcher: each edge's share of its reader's input
  in the clean run (``fxcircuits.routes``), with no metric and no other run.

The other run is the corrupted prompt (``ablation="corrupted"``), zeros (``"zero"``), the mean activation over
``reference`` batches (``"mean"``; at each position, ``"mean-positional"``), each node's optimal ablation constant
learned over them (``"optimal"``), or values computed once (``fxcircuits.ablations``).
``fxcircuits.attribute_by_span`` runs the same methods over masks per class of positions, [classes, E]
(``scored``): a plain run is the one class of the whole prompt.
"""
from __future__ import annotations

import functools
import numbers
from collections.abc import Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from . import metrics as metrics_
from . import learned, routes
from .ablations import Ablation
from .caller import gradients
from .data import check_counts, class_names
from .model import CircuitModel
from .patching import Tap, dense_keep
from .runs import (WITHOUT_GRADIENTS, Calls, Prepared, call_size, check_finite, differentiable, examples, mask_shape,
                   metric_values, not_finite, prepare)
from .scores import EdgeScores

GRADIENT_METHODS = ("eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted")
INTEGRATED = ("eap-ig-inputs", "eap-ig-activations")  # the gradient methods that take integration steps
LEARNED = ("mask", "ugs")  # the learned masks (``fxcircuits.learned``)
METHODS = GRADIENT_METHODS + ("exact", "acdc") + LEARNED + (routes.METHOD,)
POINTS_PER_CALL = 32  # gradient points a call runs at most, and where launches set the pace: steps of 5 in one
# Gradient points on CPU: a call's stream bound.  A point's backward keeps every reader's input, about twice
# [n_downstream, batch, seq, d_model] values, so a call's memory grows with its points, and past the caches each
# point costs more.  On two cores (AMD EPYC, 32 MB L3), EAP-IG-inputs (5 steps), each in a fresh process: 8
# prompts of 24 tokens on random 12-layer Llamas of d_model 256 ran alike at 1, 2 and 5 points a call, and of
# d_model 512 within 4% at 2 and 5 (1: 16% slower); a 4-layer Llama of d_model 2048 fastest at 1 or 2 (5: 30%
# slower; with 16 layers, 1.1B parameters, 5 a call ran out of 24 GB); SmolLM2, 17-token IOI prompts, at 5 in
# batches of 8 (2: 14% slower, 1: 16%), and at 1 in one batch of 32 (2: 19% slower; 5: 70% slower, and its
# memory grew by 10.4 GB against 1.5 GB).  This gives 5 (all the steps), 5, 1, 5 and 1.
POINTS_CALL_STREAM = 2 ** 19
# Exact and ACDC runs on CPU: a call's stream bound (``runs.call_size``).  Per mask, on two cores (AMD EPYC,
# 32 MB L3), 17-token prompts, patching neighbouring edges: random 12-layer Llamas of d_model 64, 256, 512 with 8
# prompts were fastest at 64, 16 and 32 a call, and within 9% from 16 to 64; SmolLM2 at 16 with 8 prompts (32:
# 6% slower), at 8 with 32 prompts (32: 38% slower); d_model 256 with 32 prompts flat from 8 to 32.  This gives 64,
# 60, 30, 26, 15 and 6.
EXACT_CALL_STREAM = 2 ** 21
LEARNED_DEFAULTS = {"mask": {"mask_steps": 200, "density": 0.05, "warm_start": "eap-ig-inputs"},
                    "ugs": {"mask_steps": 100, "samples": 2, "penalty": 1e-3, "lr": 0.05}}  # recorded in info
OPTIONS = {"mask": (*LEARNED_DEFAULTS["mask"], "lr", "warmup"), "ugs": tuple(LEARNED_DEFAULTS["ugs"])}


def attribute(cm: CircuitModel, batches: dict | Iterable[dict], metric: str | Callable | None = None,
              method: str = "eap-ig-inputs", *, steps: int | None = None, ablation: str | Ablation = "corrupted",
              reference: Iterable[dict] | None = None, threshold: float | None = None,
              masks_per_call: int | None = None, progress: bool = True, seed: int = 0, **options) -> EdgeScores:
    """Score every edge of ``cm.graph`` on ``batches`` (a batch dict, or several; see ``fxcircuits.data``) with
    ``metric``.

    ``metric``: a name from ``fxcircuits.metrics`` or any ``metric(logits, batch) -> Tensor[B]``, larger meaning
    more of the task; ACDC defaults to ``"kl"``; information flow routes read none, nor an ablation, a reference or
    ``masks_per_call``.  ``steps``: integration steps of the EAP-IG methods (and of a
    learned mask's warm start), 5.  ``threshold``: ACDC's τ, 0.01.  Each is refused by the methods that do not read
    it, where it would change nothing unseen.  ``masks_per_call``: how many patched runs one batched call
    evaluates — gradient points (default: 32 on an accelerator, and on CPU as many as keep the call's stream within
    ``POINTS_CALL_STREAM`` values: SmolLM2, 17-token prompts, 5 in batches of 8, 1 in batches of 32), or
    ``exact``'s and ``acdc``'s runs (default: 32 on an accelerator, and on CPU as many as keep the call's stream
    within ``EXACT_CALL_STREAM`` values: 26 in batches of 8, 6 in batches of 32); the scores do not depend on it.
    ``options`` are the learned masks'.  Edge Pruning (``"mask"``): ``mask_steps`` (passes over a batch, 200),
    ``density`` (the fraction of edges it keeps, or an int count, 0.05), ``warm_start`` (the gradient method whose
    scores rank the gates at the start, run with ``steps``, "eap-ig-inputs"; None starts them alike), ``lr``
    (0.5), ``warmup`` (the fraction of the steps over which its gates close to ``density``, 0.75; the rest train
    the circuit that ``topn(density, prune=False)`` keeps, whose mean |metric − the model's|
    ``info["circuit_distance"]`` records).  Uniform gradient sampling (``"ugs"``): ``mask_steps`` (100),
    ``samples`` (masks a step draws, each run on its batch, 2), ``penalty`` (λ on the expected number of edges
    kept, in the metric's units, 1e-3), ``lr`` (0.05); ``masks_per_call`` also counts the samples it runs a
    call.  Deterministic given ``seed``."""
    scores, _, info = scored(cm, batches, metric, method, by_span=False, steps=steps, ablation=ablation,
                             reference=reference, threshold=threshold, masks_per_call=masks_per_call,
                             progress=progress, seed=seed, options=options)
    return EdgeScores(cm.graph, scores, method, info)


def scored(cm: CircuitModel, batches: dict | Iterable[dict], metric: str | Callable | None, method: str, *,
           by_span: bool, spans: Sequence[str] | None = None, steps: int | None, ablation: str | Ablation,
           reference: Iterable[dict] | None, threshold: float | None, masks_per_call: int | None, progress: bool,
           seed: int, options: dict) -> tuple[torch.Tensor, list[str] | None, dict]:
    """What ``attribute`` and ``attribute_by_span`` share: the settings checked, the batches prepared and
    ``method`` run.  Every method scores a mask per class of positions, [classes, E]: by span, the classes are
    ``spans`` (every span the batches name where None) and the rest of the prompt, each patched at its own tokens
    alone; else one class, the whole prompt, and the scores are [E].  Returns the scores, the classes' names (by
    span) and how they were found."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if options and method not in LEARNED:
        raise TypeError(f"{sorted(options)} are options of a learned mask (method 'mask' or 'ugs'), not of "
                        f"{method!r}")
    if options and set(options) - set(OPTIONS[method]):
        raise TypeError(f"unknown options {sorted(set(options) - set(OPTIONS[method]))} of method={method!r}; it "
                        f"takes {', '.join(OPTIONS[method])}")
    check_counts(steps=steps, masks_per_call=masks_per_call)
    steps = _read_by(method, INTEGRATED + ("mask",), 5, steps=steps)
    threshold = _read_by(method, ("acdc",), 0.01, threshold=threshold)
    if isinstance(threshold, bool) or not isinstance(threshold, numbers.Real) or not threshold > 0:
        raise ValueError(f"threshold={threshold!r}: ACDC's τ is a positive number (it removes an edge whose removal "
                         "costs less than τ; at τ ≤ 0 an edge removed at no cost would score as one kept)")
    if method == routes.METHOD:
        return _routes(cm, batches, by_span, spans, progress, metric=metric,
                       ablation=None if ablation == "corrupted" else ablation, reference=reference,
                       masks_per_call=masks_per_call)
    if method == "eap" and metric is not None:
        metrics_.check_gradient_at_clean(metrics_.get(metric), "eap", "eap-ig-inputs, exact or acdc")
    if method == "clean-corrupted" and ablation != "corrupted":
        raise ValueError("clean-corrupted takes gradients at the corrupted input, so it needs ablation='corrupted'")
    metric = metrics_.get(metric if metric is not None else _default_metric(method))
    prepared = prepare(cm, batches, metric, ablation, reference)
    names = class_names([p.batch for p in prepared], spans) if by_span else None
    named = None if names is None else names[:-1]
    info = {"metric": metrics_.name_of(metric), "ablation": str(ablation), "examples": examples(prepared)}
    if method in ("exact", "acdc"):
        calls = Calls(call_size(prepared, masks_per_call, cpu_stream=EXACT_CALL_STREAM, most=64, accelerator=32))
    else:  # gradient points: a gradient method's, or a learned mask's warm start
        calls = point_calls(prepared, masks_per_call)
    if method in GRADIENT_METHODS:
        scores = _gradient_scores(cm, prepared, metric, method, steps, calls, progress, named)
        if method in INTEGRATED:
            info["steps"] = steps
    elif method == "exact":
        scores = _exact(cm, prepared, metric, calls, progress, named)
    elif method == "acdc":
        scores, info["threshold"] = _acdc(cm, prepared, metric, threshold, calls, progress, named), threshold
    else:  # checked first: the warm start's NaN scores would become ranks, and few steps may miss the NaNs
        check_finite(cm, prepared, metric)
        scores = _learned(cm, prepared, metric, method, progress, seed, named, steps, calls, options, info)
    if not torch.isfinite(scores).all():
        raise not_finite(cm, prepared, metric)
    return (scores, names, info) if by_span else (scores[0], None, info)


def _routes(cm: CircuitModel, batches, by_span: bool, spans: Sequence[str] | None, progress: bool,
            **unread) -> tuple[torch.Tensor, list[str] | None, dict]:
    """``scored`` for information flow routes (``fxcircuits.routes``): shares of a clean run's streams, which read
    no metric, no other run and no patched calls, so each of those given is refused."""
    given = [f"{name}={value!r}" if isinstance(value, (str, int, float)) else f"{name}=…"
             for name, value in unread.items() if value is not None]
    if given:
        raise TypeError(f"{', '.join(given)}: method {routes.METHOD!r} scores each edge's share of its reader's input "
                        "in the clean run, reading no metric, other run or patched calls: leave "
                        f"{'it' if len(given) == 1 else 'them'} out")
    scores, names, count = routes.route_scores(cm, batches, spans, by_span, progress)
    return (scores, names, {"examples": count}) if by_span else (scores[0], None, {"examples": count})


def _read_by(method: str, readers: tuple[str, ...], default, **setting):
    """The one setting given (``default`` where None), refused where ``method`` is not among its ``readers``."""
    (name, value), = setting.items()
    if value is None:
        return default
    if method not in readers:
        raise TypeError(f"{name}={value!r} is read by method {' or '.join(map(repr, readers))}, not by {method!r}: "
                        "leave it out")
    return value


def _learned(cm, prepared, metric, method: str, progress, seed, spans, steps: int, calls: Calls, options: dict,
             info: dict) -> torch.Tensor:
    """A learned mask's scores (``fxcircuits.learned``), with what it ran with added to ``info``: its options
    as given or by default, and for Edge Pruning, its warm start's steps and its held circuit's distance."""
    options = {**LEARNED_DEFAULTS[method], **options}
    info.update(steps=options["mask_steps"], **{k: v for k, v in options.items() if k != "mask_steps"})
    if method == "ugs":
        return learned.uniform_gradient_sampling(cm, prepared, metric, progress, seed, spans, calls, **options)
    start = options.pop("warm_start")
    if start is not None and start not in GRADIENT_METHODS:
        raise ValueError(f"a learned mask's warm_start is a gradient method ({', '.join(GRADIENT_METHODS)}) or None, "
                         f"got {start!r}")
    prior = None if start is None else (
        lambda: _gradient_scores(cm, prepared, metric, start, steps, calls, progress, spans).cpu())
    scores, circuit_distance = learned.edge_pruning(cm, prepared, metric, progress, seed, spans, prior=prior,
                                                    **options)
    if circuit_distance is not None:
        info["circuit_distance"] = circuit_distance
    if start in INTEGRATED:
        info["warm_start_steps"] = steps
    return scores


def _costs(cm: CircuitModel, prepared: list[Prepared], metric, reference: torch.Tensor, masks: torch.Tensor,
           spans: list[str] | None) -> torch.Tensor:
    """Mean metric under ``reference`` [classes, E] minus under each of ``masks`` [n, classes, E], all in one call:
    a call runs every reader that any of its masks moves on the patched path (the reader's own copy of its layer,
    ``norms`` and ``heads``), for every mask of the call, and that path rounds otherwise than the model's fused
    pass.  Two runs of one call differ by their masks alone; measured against a run of another call, or the model's
    own, a score carries that rounding too: in bfloat16, as much as an edge's effect (exact's scores of a tiny Llama
    rank by |score| with Spearman 0.61 against float64's where this gives 0.85)."""
    masks = torch.cat([reference[None], masks])
    values = metric_values(cm, prepared, metric, masks[:, 0] if spans is None else masks, spans).mean(-1)
    return values[0] - values[1:]


def _default_metric(method: str) -> str:
    if method != "acdc":
        raise ValueError(f"method {method!r} needs a metric: a name ({', '.join(metrics_.METRICS)}) or a callable "
                         "metric(logits, batch) -> Tensor[B]")
    return "kl"


def _ones(cm: CircuitModel, n: int = 1) -> torch.Tensor:
    """``n`` masks keeping every edge, in the dtype of the model's scores (``metrics.wide_dtype``): a float64
    model's gradient in the mask, and EAP-IG-inputs' points k/steps set in it, keep float64's digits."""
    every = torch.ones(len(cm.graph.edges), dtype=metrics_.wide_dtype(cm.dtype))
    return dense_keep(cm.graph, every, device=cm.device).expand(n, -1, -1).clone()


# ---------------------------------------------------------------- gradient methods

def _gradient_scores(cm, prepared, metric, method, steps, calls: Calls, progress, spans) -> torch.Tensor:
    """Σ over batches and points of the edge scores, divided by examples and by points per edge: [classes, E].  By
    span, each edge's score at each token summed over each class's tokens."""
    total = torch.zeros(mask_shape(cm, spans), dtype=metrics_.wide_dtype(cm.dtype))
    src, dst = cm.graph.src, cm.graph.dst
    fit_points(calls, method, steps)
    for p in tqdm(prepared, desc=method if spans is None else f"{method} by span", disable=not progress):
        def run(n: int) -> torch.Tensor:  # this batch's scores, n points a call
            if method == "eap" and spans is None:
                return _mask_gradient(cm, p, metric)
            return tapped(cm, p, metric, method, steps, n, by_position=spans is not None)

        scores = calls.run(run, [p])
        if spans is None:
            total[0] += scores[src, dst]
        else:
            total += _by_class(scores[src, dst], p.classes(spans))
    return total / (examples(prepared) * points_per_edge(method, steps))


@gradients("attribution by EAP (method='eap')")
def _mask_gradient(cm: CircuitModel, p: Prepared, metric) -> torch.Tensor:
    """EAP's scores on one batch, [n_upstream, n_downstream]: at the clean point the mask's own gradient is the
    score, so no tap and no clean pass apart are needed."""
    keep = _ones(cm).requires_grad_(True)
    value = p.measure(cm, metric, keep).sum()
    return torch.autograd.grad(differentiable(value, "eap"), keep)[0][0].cpu()


def _by_class(by_token: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Scores by token [E, batch · seq] summed over each class's tokens: [classes, E]."""
    return weights.reshape(weights.shape[0], -1).to(by_token) @ by_token.T


def point_calls(prepared: list[Prepared], masks_per_call: int | None) -> Calls:
    """How many gradient points a call runs on ``prepared``: ``masks_per_call`` where given, else
    ``POINTS_PER_CALL`` on an accelerator and, on CPU, as many as keep the call's stream within
    ``POINTS_CALL_STREAM`` values (``runs.call_size``) — for attribution and for attribution patching alike."""
    return Calls(call_size(prepared, masks_per_call, cpu_stream=POINTS_CALL_STREAM, most=POINTS_PER_CALL,
                           accelerator=POINTS_PER_CALL))


def fit_points(calls: Calls, method: str, steps: int) -> None:
    """Cap ``calls`` at the points of ``method`` that share their inputs — an integrated method's ``steps``, else
    one (``_points`` yields clean-corrupted's two apart): ``tapped`` runs each such set in calls of its own, so a
    larger size would fill no call, and an out-of-memory halving would start from a size never run."""
    calls.size = min(calls.size, steps if method in INTEGRATED else 1)


def points_per_edge(method: str, steps: int) -> int:
    """How many gradient points a gradient method sums for each edge: its scores are their mean."""
    return {"eap": 1, "clean-corrupted": 2}.get(method, steps)


def tapped(cm: CircuitModel, p: Prepared, metric, method: str, steps: int, per_call: int,
           by_position: bool = False, named: tuple[str, str] | None = None) -> torch.Tensor:
    """Every edge's tap score (``Tap``) on one batch, summed over the points ``method`` takes its gradients at
    (``_points``; "eap": the run itself), ``per_call`` points a call: [n_upstream, n_downstream], or by position
    [n_upstream, n_downstream, batch · seq].  ``named``: how the caller's messages name the method and the
    caller's methods without gradients (``differentiable``), where the caller is not ``attribute``."""
    clean, delta, sides = differences(cm, p)
    name, instead = named or (method, WITHOUT_GRADIENTS)
    total = 0.0
    for input_ids, keep, other, rows, side_rows in _points(cm, p, clean, delta, sides, method, steps):
        for first in range(0, keep.shape[0], per_call):
            chunk = slice(first, first + per_call)
            tap = Tap(rows, len(cm.graph.downstream), side_rows, by_position=by_position)
            with gradients(f"attribution by {name!r}"):
                value = p.measure(cm, metric, keep[chunk], input_ids=input_ids, other=_masks(other, chunk, p.size),
                                  tap=tap).sum()
                total = total + tap.scores(differentiable(value, name, instead)).cpu()
    return total


def differences(cm: CircuitModel, p: Prepared) -> tuple[list[torch.Tensor], torch.Tensor, list[torch.Tensor]]:
    """The batch's own run (per writer group, then per side input, as ``CircuitModel.recording`` gives it), and
    what a ``Tap`` scores: the other run less it per upstream node, [n_upstream, batch, seq, d_model], and per side
    input, [batch, seq, …]."""
    with torch.no_grad():
        run = cm.recording(p.input_ids, p.attention_mask)[0]
    n_groups = len(cm.graph.group_sizes)
    deltas = [o.expand_as(r) - r for o, r in zip(p.other, run)]
    return run, torch.cat(deltas[:n_groups]), [d[0] for d in deltas[n_groups:]]


def _masks(other: list[torch.Tensor], chunk: slice, size: int) -> list[torch.Tensor]:
    """The other run's rows of the masks in ``chunk`` (groups shared by all masks pass unchanged)."""
    rows = slice(chunk.start * size, chunk.stop * size)
    return [g if g.shape[1] in (1, size) else g[:, rows] for g in other]


def _points(cm, p: Prepared, clean: list[torch.Tensor], delta: torch.Tensor, sides: list[torch.Tensor],
            method: str, steps: int):
    """Where the tap methods take their gradients: (input ids, keep [n, U, D], the other run per group and side
    input, the differences the tap scores, the side inputs' differences) per set of points that share them."""
    if method == "eap":
        yield p.input_ids, _ones(cm), p.other, delta, sides
    elif method == "clean-corrupted":
        yield p.input_ids, _ones(cm), p.other, delta, sides
        yield p.batch["corrupted"], _ones(cm), p.other, delta, sides
    elif method == "eap-ig-inputs":  # the input node's edges at k/steps, k = 0 … steps−1, as EAP-IG's reference
        # takes them (the corrupted end included, the clean end not): scores comparable with published ones
        _check_start(p)
        keep = _ones(cm, steps)
        keep[:, 0, :] = torch.arange(steps, device=keep.device, dtype=keep.dtype)[:, None] / steps
        yield p.input_ids, keep, p.other, delta, sides
    else:
        yield from _activation_points(cm, p, clean, delta, sides, steps)


def _check_start(p: Prepared) -> None:
    """Refuse EAP-IG-inputs' path where it starts at an all-zero input (zero ablation): every layer then reads a
    zero stream, where a norm's gradient is 1/√eps, and the scores grow by that factor layer by layer (3e2 on a
    2-layer GPT-2, 1e27 on other 2-layer models) — the method's own definition, but no ranking of edges."""
    if not p.other[0].any():
        raise ValueError("eap-ig-inputs integrates from the other run's input, here all zero (zero ablation): at "
                         "that point every layer reads a zero stream, where the norms' gradients blow up, so its "
                         "scores rank nothing; use method 'eap-ig-activations' or 'eap', or ablation 'mean'")


def _activation_points(cm, p: Prepared, clean: list[torch.Tensor], delta: torch.Tensor, sides: list[torch.Tensor],
                       steps: int):
    """EAP-IG-activations: each writer's outputs in turn (the input, a layer's heads, an MLP) are set to
    α·clean + (1 − α)·other, α = k/steps for k = 1 … steps, while everything else runs on the clean input.  The
    side inputs go with the input's outputs, whose edges carry them.

    An edge u → d is scored at the points that move u's own writer, so its integral follows the path of u's
    output, and on a model linear in its activations the score is exact.  (EAP-IG's reference averages every
    edge over the points of all writers, including those that cut the paths from d to the logits.)"""
    alphas = torch.arange(1, steps + 1, device=cm.device, dtype=clean[0].dtype) / steps
    n_groups, first = len(cm.graph.group_sizes), 0
    for group in range(n_groups):
        n = clean[group].shape[0]
        node_mask = torch.ones(steps, len(cm.graph.upstream), device=cm.device)
        node_mask[:, first:first + n] = 0.0  # every edge out of this writer's nodes, and nothing else
        keep = dense_keep(cm.graph, node_mask=node_mask, device=cm.device)
        other = [g.new_zeros(g.shape[0], *[1] * (g.dim() - 1)) for g in clean]
        for i in [group] + (list(range(n_groups, len(clean))) if group == 0 else []):
            c, o = clean[i], p.other[i]
            a = alphas.view(1, steps, *[1] * (c.dim() - 1))
            other[i] = (a * c[:, None] + (1 - a) * o[:, None]).reshape(c.shape[0], -1, *c.shape[2:])
        rows = torch.zeros_like(delta)
        rows[first:first + n] = delta[first:first + n]
        first += n
        yield p.input_ids, keep, other, rows, sides if group == 0 else [torch.zeros_like(s) for s in sides]


# ---------------------------------------------------------------- patching methods

def _exact(cm, prepared, metric, calls: Calls, progress: bool, spans) -> torch.Tensor:
    """score(e) = m(clean) − m(clean with e alone patched); by span, e patched at one class's tokens alone, class by
    class, so that a call's edges still share their readers."""
    shape = mask_shape(cm, spans)
    units, first = shape[0] * shape[1], 0
    scores = torch.empty(units, dtype=metrics_.wide_dtype(cm.dtype))
    with tqdm(total=units, desc="exact", disable=not progress) as bar:
        while first < units:
            costs = calls.run(functools.partial(_alone, cm, prepared, metric, shape, first, spans), prepared)
            scores[first:first + len(costs)] = costs
            first += len(costs)
            bar.update(len(costs))
    return scores.view(shape)


def _alone(cm, prepared, metric, shape: tuple[int, int], first: int, spans, n: int) -> torch.Tensor:
    """The costs of units ``first`` on, each patched alone, in one call of ``n`` masks with the clean run
    (``_costs``): n − 1 units, one at least."""
    units = torch.arange(first, min(first + max(1, n - 1), shape[0] * shape[1]))
    masks = torch.ones(len(units), shape[0] * shape[1]).index_put_((torch.arange(len(units)), units),
                                                                    torch.tensor(0.0))
    return _costs(cm, prepared, metric, torch.ones(shape), masks.view(-1, *shape), spans)


def _acdc(cm, prepared, metric, tau: float, calls: Calls, progress: bool, spans) -> torch.Tensor:
    """ACDC: destinations from ``logits`` back to the first layer, each one's incoming edges from the latest
    upstream node back (by span, each edge at each class in turn); an edge is removed when removing it costs less
    than τ (mean metric before − after).

    Sequential decisions are evaluated speculatively in batches: mask j removes candidates i…j together, which
    is what the sequential walk evaluates if i…j−1 were all removed; at the first edge that must stay, the
    batch's later masks are void and the walk resumes after it.  Scores are each edge's cost when it was
    judged (edges of destinations that no longer reach ``logits`` are removed at no cost: score 0).  A call runs
    the mask before the batch too, ``_costs``: mask j's cost is then its difference from mask j − 1 in one call."""
    g = cm.graph
    current = torch.ones(mask_shape(cm, spans))
    scores = torch.zeros(mask_shape(cm, spans), dtype=metrics_.wide_dtype(cm.dtype))
    into = [[] for _ in g.downstream]
    for e, d in enumerate(g.dst.tolist()):
        into[d].append(e)
    for d in tqdm(range(len(g.downstream) - 1, -1, -1), desc="acdc", disable=not progress):
        reader = int(g.reader[d])
        # a node (logits aside) with no kept outgoing edge, at any class, reaches nothing: its inputs go at no cost
        if reader < len(g.upstream) and not bool(current[:, g.src == reader].any()):
            current[:, into[d]] = 0.0
            continue
        candidates = [(c, e) for e in reversed(into[d]) for c in range(len(current)) if current[c, e] == 1]
        while candidates:
            costs = calls.run(functools.partial(_removals, cm, prepared, metric, current, candidates, spans),
                              prepared)
            batch, kept_at = candidates[:len(costs)], None
            for j, unit in enumerate(batch):
                scores[unit] = costs[j]
                if scores[unit] >= tau:
                    kept_at = j
                    break
            for unit in (batch if kept_at is None else batch[:kept_at]):
                current[unit] = 0.0
            candidates = candidates[len(batch) if kept_at is None else kept_at + 1:]
    return scores


def _removals(cm, prepared, metric, current: torch.Tensor, candidates: list, spans, n: int) -> list[float]:
    """The cost of removing each of the first n − 1 ``candidates`` (one at least) after those before it, from
    ``current``, in one call (``_costs``)."""
    batch = candidates[:max(1, n - 1)]
    masks = current.repeat(len(batch), 1, 1)
    for j, (c, e) in enumerate(batch):
        masks[j:, c, e] = 0.0
    costs = _costs(cm, prepared, metric, current, masks, spans)
    return torch.diff(costs, prepend=costs.new_zeros(1)).tolist()
