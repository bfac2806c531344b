"""Activation patching: which node carries the behaviour, and which layer's stream or node at which token.

``patch_nodes`` patches each node's output at every token at once, one node at a time: which heads and MLPs the
behaviour needs (the layer × head picture of Wang et al.'s IOI; TransformerLens's ``*_all_pos`` patching);
``patch_inputs`` patches each head's query, key and value input, and each MLP's input: through which of them a head
matters.  A circuit's edges say *what* carries a behaviour; patching by position says *where in the prompt*.  A mask
restricted to some positions (``patch_positions``, ``CircuitModel.forward``) patches its edges there alone.
``patch_by_position`` sweeps units × positions with it: for each unit — the residual stream entering a layer (causal
tracing, Meng et al. 2022; TransformerLens's ``resid_pre``), one node's output (a head, an MLP) or one input —
and each position, one patched run, many in one call, and the metric's change; or, from gradients, every unit at
every position at once (attribution patching; with integrated gradients, closer).  A position is a token, or a span:
a named part of each prompt (IOI's S2), which lines up prompts of different templates so that their effects
average.  On SmolLM2's IOI prompts the stream carries the difference at the token the corrupted prompt changes (the
subject's second mention) through layer 19, and at the last token from the name movers' layers on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from . import metrics
from .ablations import Ablation
from .attribution import differences, fit_points, point_calls, points_per_edge, tapped
from .circuit import Circuit
from .data import attention_mask, batch_list, check_counts, span_weights
from .draw import plot_heatmap, plot_inputs, plot_nodes
from .evaluation import Evaluator
from .graph import CircuitGraph, names as name_list
from .lens import node_names
from .model import CircuitModel
from .patching import dense_keep
from .runs import Calls, Prepared

DIRECTIONS = ("noising", "denoising")
METHODS = ("exact", "attribution", "attribution-ig")
GRADIENTS = {"attribution": "eap", "attribution-ig": "eap-ig-inputs"}  # the attribution method of each estimate


@dataclass
class PositionEffects:
    """What patching each unit at each position does to the metric, per prompt: ``effects`` [units, batch, positions],
    NaN at padding.  ``units``: node or input names, or ``"layer {l}"`` for the stream entering layer l (in a
    hybrid, ``"into a2 m3"`` for the stream entering the block of those nodes, ``CircuitGraph.blocks``).  A
    position is a token, or with ``spans`` (their names) a named part of each prompt — IOI's ``S2``, wherever each
    prompt has it.

    Noising runs the clean prompts and patches in the corrupted prompts' values: the effect is metric(clean) −
    metric(patched), how much the behaviour needs that unit there.  Denoising runs the corrupted prompts and patches
    in the clean values: metric(patched) − metric(corrupted), how much of the behaviour that unit there restores.
    Either way larger means the unit carries more of it there; ``normalized`` divides by metric(clean) −
    metric(corrupted), the whole of it (``clean`` and ``corrupted`` [batch]: the metric on either prompt).
    ``method``: ``"exact"`` (patched runs), ``"attribution"`` (their first-order estimate) or ``"attribution-ig"``
    (their estimate by integrated gradients).

    ``example=`` of ``top``, ``table`` and ``plot`` picks one prompt, or None the mean over the prompts: by span,
    the mean over prompts of every template; by token, over the prompts that hold each position."""
    units: list[str]
    effects: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    direction: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    method: str = "exact"
    spans: list[str] | None = None

    @property
    def normalized(self) -> torch.Tensor:
        """``effects`` as a fraction of metric(clean) − metric(corrupted), per prompt."""
        return self.effects / (self.clean - self.corrupted)[None, :, None]

    def mean(self, normalized: bool = False) -> torch.Tensor:
        """[units, positions]: the mean over the prompts that hold each position.  By token it means something
        where the prompts share a template, so that a position plays one role in all of them; by span it does.
        ``normalized``: as a fraction of the mean whole effect over those prompts — a ratio of means, which a prompt
        whose clean and corrupted metrics nearly agree cannot blow up."""
        mean = self.effects.nanmean(1)
        if not normalized:
            return mean
        whole = (self.clean - self.corrupted)[None, :, None].expand_as(self.effects)
        return mean / whole.masked_fill(self.effects.isnan(), float("nan")).nanmean(1)

    def example(self, index: int = 0, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's effects over its real tokens (or every span), [units, positions], and their indices."""
        if not -len(self.input_ids) <= index < len(self.input_ids):
            raise IndexError(f"example {index}: the effects hold {len(self.input_ids)} prompts")
        values = self.normalized if normalized else self.effects
        if self.spans is not None:
            return values[:, index], torch.arange(len(self.spans))
        positions = self.attention_mask[index].bool().nonzero().flatten()
        return values[:, index, positions], positions

    def top(self, tokenizer=None, k: int = 3, example: int | None = 0,
            normalized: bool = False) -> list[tuple[str, list[tuple[str, int, float]]]]:
        """For each unit, the ``k`` positions where patching it moves the metric most (either sign), in one prompt
        or (``example=None``) on average: ``[(unit, [(token or span, position, effect), …]), …]``, as fractions of
        the whole where ``normalized``.  ``tokenizer`` names the tokens (by span it is not needed)."""
        check_counts(k=k)
        values, positions, labels = self._view(tokenizer, example, normalized)
        order = values.abs().nan_to_num(-1.0).topk(min(k, len(positions)), dim=-1).indices
        return [(unit, [(labels[i], int(positions[i]), float(row[i])) for i in picks])
                for unit, row, picks in zip(self.units, values, order.tolist())]

    def table(self, tokenizer=None, k: int = 3, example: int | None = 0, normalized: bool = False) -> str:
        """``top`` as aligned text, one row per unit, each token with its position (each span by its name, each
        position of the mean by token by its ``@position`` label alone: no one token stands there)."""
        width = max(len(unit) for unit in self.units)
        tokens = self.spans is None and example is not None
        cell = ("{0!r}@{1} {2:+.2f}" if tokens else "{0} {2:+.2f}").format
        return "\n".join(f"{unit:>{width}}  " + "  ".join(cell(*top) for top in tops)
                         for unit, tops in self.top(tokenizer, k, example, normalized))

    def plot(self, tokenizer=None, path: str | Path | None = None, *, example: int | None = 0,
             normalized: bool = True, ax: Axes | None = None, title: str | None = None) -> Figure:
        """A heatmap of units × positions — one prompt's tokens, its spans, or (``example=None``) their mean — each
        cell the effect of patching that unit there (by default as a fraction of the whole; 0 white, signs apart)."""
        values, _, labels = self._view(tokenizer, example, normalized)
        return plot_heatmap(values, self.units, labels, path, ax=ax, title=title, fmt="{:+.2f}")

    def _view(self, tokenizer, example: int | None, normalized: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The effects ``top`` and ``plot`` show, [units, positions], the positions' indices, and their labels."""
        if example is None:
            values = self.mean(normalized)
            positions = values.isfinite().any(0).nonzero().flatten()  # by token: those some prompt holds
            values = values[:, positions]
        else:
            values, positions = self.example(example, normalized)
        if self.spans is not None:
            return values, positions, [self.spans[int(i)] for i in positions]
        if example is None:
            return values, positions, [f"@{int(i)}" for i in positions]
        if tokenizer is None:
            raise ValueError("effects by token name their tokens with a tokenizer: pass the model's tokenizer")
        return values, positions, [tokenizer.decode([int(i)]) for i in self.input_ids[example, positions]]


@dataclass
class NodeEffects:
    """What patching each node's output (or input) at every token at once does to the metric, per prompt:
    ``effects`` [nodes, batch], ``units`` the nodes' names; ``clean``, ``corrupted`` [batch], the metric on either
    prompt (under zero or mean ``ablation``, ``corrupted`` is the clean prompt's with every node so ablated);
    ``direction`` and ``method`` as in ``PositionEffects``; ``inputs``: the units are downstream inputs
    (``patch_inputs``), not nodes' outputs; ``receivers``: the inputs each node was patched into alone (path
    patching), or None.  ``plot`` lays them out as the model is (layers × heads, ``draw.plot_nodes``; inputs by
    layer and each head's q, k and v, ``draw.plot_inputs``); ``example=`` picks one prompt, None the mean."""
    units: list[str]
    effects: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    direction: str
    method: str
    ablation: str
    graph: CircuitGraph
    inputs: bool = False
    receivers: list[str] | None = None

    @property
    def normalized(self) -> torch.Tensor:
        """``effects`` as a fraction of metric(clean) − metric(corrupted), per prompt."""
        return self.effects / (self.clean - self.corrupted)[None]

    def mean(self, normalized: bool = False) -> torch.Tensor:
        """[nodes]: the mean over the prompts; ``normalized``, as a fraction of the mean whole effect (a ratio of
        means, which a prompt whose clean and corrupted metrics nearly agree cannot blow up)."""
        mean = self.effects.mean(1)
        return mean / (self.clean - self.corrupted).mean() if normalized else mean

    def values(self, example: int | None = None, normalized: bool = False) -> torch.Tensor:
        """[nodes]: one prompt's effects, or (``example=None``) their mean."""
        if example is None:
            return self.mean(normalized)
        if not -len(self.clean) <= example < len(self.clean):
            raise IndexError(f"example {example}: the effects hold {len(self.clean)} prompts")
        return (self.normalized if normalized else self.effects)[:, example]

    def top(self, k: int = 10, example: int | None = None, normalized: bool = False) -> list[tuple[str, float]]:
        """The ``k`` nodes whose patching moves the metric most (either sign): ``[(node, effect), …]``."""
        check_counts(k=k)
        values = self.values(example, normalized)
        order = values.abs().topk(min(k, len(values))).indices.tolist()
        return [(self.units[i], float(values[i])) for i in order]

    def table(self, k: int = 10, example: int | None = None, normalized: bool = False) -> str:
        """``top`` as aligned text, one node a line."""
        tops = self.top(k, example, normalized)
        width = max(len(unit) for unit, _ in tops)
        return "\n".join(f"{unit:>{width}}  {value:+.3f}" for unit, value in tops)

    def plot(self, path: str | Path | None = None, *, example: int | None = None, normalized: bool = True,
             ax: Axes | None = None, title: str | None = None) -> Figure:
        """The effects by layer and head (and MLP), as fractions of the whole by default."""
        plot = plot_inputs if self.inputs else plot_nodes
        return plot(self.graph, self.units, self.values(example, normalized), path, ax=ax, title=title)


@torch.no_grad()
def patch_by_position(cm: CircuitModel, batches: dict | Iterable[dict], metric, *,
                      nodes: list[str] | Circuit | None = None, inputs: Sequence[str] | Circuit | None = None,
                      receivers: Sequence[str] | Circuit | None = None, spans: bool | Sequence[str] = False,
                      direction: str = "noising", method: str = "exact", steps: int = 5,
                      masks_per_call: int | None = None, progress: bool = False) -> PositionEffects:
    """Patch each unit at each position of ``batches`` (a batch dict, or several: ``clean``, ``corrupted``,
    ``attention_mask`` and what ``metric`` reads) and measure ``metric``: see ``PositionEffects``.

    ``nodes``: node names (or a circuit's nodes) whose outputs to patch one at a time; None patches the residual
    stream entering each layer (each block of a hybrid) instead (``CircuitGraph.into``).  ``inputs``: downstream
    input names (``"a23.h3<k>"``, ``"m20"``) to patch one at a time instead, each read from the other run there (see
    ``patch_inputs``): at which tokens a head's keys or values matter.  ``receivers``: with ``nodes``, each node
    patched on its edges into these inputs alone (path patching, see ``patch_nodes``).  ``spans``: False patches
    at each token; True at each span the batches name (``batch["spans"]``, ``data.make_batches``; the built-in
    tasks name theirs), all of its tokens at once, or a list of those names — positions that line up across prompts
    of different templates.
    ``direction``: ``"noising"`` (the clean run, the corrupted values patched in) or ``"denoising"`` (the other way
    round).  ``method``: ``"exact"``, one patched run per unit and position, ``masks_per_call`` of them (units ×
    positions; 16 where None) a call, each holding a whole batch of prompts; or ``"attribution"``, attribution
    patching: each edge's first-order score at each position from one forward and backward pass of the run
    (``patching.Tap`` by position), summed over each unit's edges — every node of a large model at every position,
    at the cost of one gradient, as a first look to pick what to patch exactly; or ``"attribution-ig"``, the
    gradients averaged over ``steps`` points between the corrupted and the clean input (EAP-IG-inputs),
    ``masks_per_call`` points a call: ``steps`` gradients, and closer where one patch moves the metric far (the
    stream at the changed token)."""
    given, metric, runs = _directed(batches, metric, direction, method, steps, masks_per_call)
    names = _span_names(given, spans)
    units, masks = _units(cm, nodes, inputs, receivers)
    idle = [unit for unit, mask in zip(units, masks) if bool(mask.eq(1).all())]
    if receivers is not None and idle:
        raise ValueError(f"no edge from {', '.join(idle[:3])} enters the receivers: a node that writes after every "
                         "receiver reads sends them nothing, and its effect would be 0 at every token; give nodes "
                         "of earlier layers")
    # the runs prepared, and their metric checked finite: a NaN of the model's own would fill every effect
    evaluator = Evaluator(cm, runs, metric, masks_per_call=16 if masks_per_call is None else masks_per_call)
    prepared, calls = evaluator.prepared, evaluator.calls
    run, other = evaluator.full, evaluator.empty  # every edge kept, every one patched
    columns = [_columns(batch, names, p.input_ids.shape[1]) for batch, p in zip(given, prepared)]
    if method == "exact":
        drops = _patched(cm, prepared, metric, masks, columns, run, calls, progress)
    else:
        drops = [_attributed(cm, p, metric, masks, c, method, steps, calls) for p, c in zip(prepared, columns)]
    real = [attention_mask(b).cpu() for b in given]
    drops = [d if names is not None else d.masked_fill(~r.bool(), float("nan")) for d, r in zip(drops, real)]
    effects = _joined(drops, fill=float("nan"))
    clean, corrupted = (run, other) if direction == "noising" else (other, run)
    return PositionEffects(units, effects if direction == "noising" else -effects, clean, corrupted, direction,
                           _joined([b["clean"].cpu() for b in given], fill=0),
                           _joined(real, fill=0), method, names)


@torch.no_grad()
def patch_nodes(cm: CircuitModel, batches: dict | Iterable[dict], metric, *,
                nodes: list[str] | Circuit | None = None, receivers: Sequence[str] | Circuit | None = None,
                direction: str = "noising", method: str = "exact", ablation: str | Ablation = "corrupted",
                reference: Iterable[dict] | None = None, steps: int = 5, masks_per_call: int | None = None,
                progress: bool = False) -> NodeEffects:
    """Patch each node's output at every token at once, one node at a time, on ``batches`` (a batch dict, or
    several) and measure ``metric``: see ``NodeEffects``.  ``nodes``: names, or a circuit's nodes; None, every
    head and MLP.  ``direction`` and ``method`` as for ``patch_by_position``: ``"exact"`` runs one patched run
    per node (``masks_per_call`` of them a call; by default as many as an ``Evaluator`` runs), ``"attribution"``
    estimates them all from one gradient, ``"attribution-ig"`` from ``steps``.  ``ablation``: what a patched
    output becomes — the other prompt's (``"corrupted"``), zero (``"zero"``), or its mean over the real tokens of
    ``reference`` batches (``"mean"``): knocking each node out of the clean run, which is noising.

    ``receivers``: downstream inputs (``"a23.h3<q>"``, ``"m20"``; or a circuit's, those its edges enter); each node
    is then patched on its edges into them alone, every other path from it left as it is — path patching (Wang et
    al. 2022: which heads move the name movers' queries), each sender's direct effect through the receivers.  A
    node that writes after every receiver reads has no such edge, and its effect is 0."""
    receivers = None if receivers is None else _input_names(cm.graph, receivers)
    units = _units(cm, cm.graph.upstream[1:] if nodes is None else nodes, None, receivers)
    return _everywhere(cm, batches, metric, units, direction, method, ablation, reference, steps, masks_per_call,
                       progress, receivers=receivers)


@torch.no_grad()
def patch_inputs(cm: CircuitModel, batches: dict | Iterable[dict], metric, *,
                 inputs: Sequence[str] | Circuit | None = None,
                 direction: str = "noising", method: str = "exact", ablation: str | Ablation = "corrupted",
                 reference: Iterable[dict] | None = None, steps: int = 5, masks_per_call: int | None = None,
                 progress: bool = False) -> NodeEffects:
    """Patch each downstream input at every token at once, one at a time, and measure ``metric``: see
    ``NodeEffects``.  An input is what one reader reads from the stream — a head's query, key or value input
    (``"a23.h3<q>"``), an MLP's input (``"m20"``), the logits' — and patching it patches every edge into it, so
    its reader alone computes from the other run's stream: TransformerLens's q, k and v patching, which tells
    whether a head matters for what it attends from or for what it moves.  ``inputs``: names, or a circuit (the
    inputs its edges enter); None, every head's q, k and v and every MLP's input.  The rest as for
    ``patch_nodes``; ``"zero"`` and ``"mean"`` ablation set the input itself (the sum of what its edges carry) to
    zero or its mean, before its reader's norm — save what no node writes (a projection's bias), which stays."""
    units = _units(cm, None, cm.graph.downstream[:-1] if inputs is None else inputs)
    return _everywhere(cm, batches, metric, units, direction, method, ablation, reference, steps, masks_per_call,
                       progress, inputs=True)


def _everywhere(cm: CircuitModel, batches: dict | Iterable[dict], metric, units: tuple[list[str], torch.Tensor],
                direction: str, method: str, ablation: str | Ablation, reference: Iterable[dict] | None, steps: int,
                masks_per_call: int | None, progress: bool, **kind) -> NodeEffects:
    """Each unit (names, edge masks) patched at every token: ``patch_nodes`` and ``patch_inputs``; ``kind``, what
    ``NodeEffects`` records of the units (``inputs``, ``receivers``)."""
    if ablation != "corrupted" and direction == "denoising":
        raise ValueError(f"denoising patches the clean prompt's values into the corrupted run, and {ablation} "
                         "ablation has none to patch in: knock units out of the clean run with direction='noising'")
    if str(ablation) == "zero" and method == "attribution-ig":  # attribution's own refusal would name its methods
        raise ValueError("method 'attribution-ig' integrates from the other run's input, all zero under zero ablation, "
                         "where the norms' gradients blow up: use method 'attribution' or 'exact', or ablation 'mean'")
    _, metric, runs = _directed(batches, metric, direction, method, steps, masks_per_call)
    names, masks = units
    evaluator = Evaluator(cm, runs, metric, ablation=ablation, reference=reference,
                          masks_per_call=masks_per_call)  # checks the runs' metric is finite
    run, other = evaluator.full, evaluator.empty  # every edge kept, every one patched
    if method == "exact":
        drops = torch.zeros(len(masks), len(run), dtype=run.dtype)
        patching = masks.ne(1).any(1)  # a sender that writes after every receiver reads patches nothing: no run
        if patching.any():
            desc = f"patching {'inputs' if kind.get('inputs') else 'nodes'}"
            drops[patching] = run - evaluator.values(masks[patching], progress, desc=desc)
    else:
        prepared = evaluator.prepared
        calls = point_calls(prepared, masks_per_call)
        drops = torch.cat([_attributed(cm, p, metric, masks, p.attention_mask.float().cpu()[None], method, steps,
                                       calls)[..., 0] for p in prepared], -1)  # every real token, one column
    clean, corrupted = (run, other) if direction == "noising" else (other, run)
    return NodeEffects(names, drops if direction == "noising" else -drops, clean, corrupted, direction, method,
                       str(ablation), cm.graph, **kind)


def _directed(batches: dict | Iterable[dict], metric, direction: str, method: str, steps: int,
              masks_per_call: int | None) -> tuple[list[dict], object, list[dict]]:
    """The sweep's arguments checked: the batches as given, the metric, and the batches as run — for denoising the
    corrupted prompts, the clean values patched in."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    check_counts(masks_per_call=masks_per_call, steps=steps)
    metric = metrics.get(metric)
    given = batch_list(batches)
    if not given:
        raise ValueError("no batches given: pass at least one batch (see fxcircuits.data.make_batches)")
    if method == "attribution":
        metrics.check_gradient_at_clean(metric, "method 'attribution'", "method 'exact' or 'attribution-ig'")
    if direction == "denoising" and metrics.needs_clean_logits(metric):
        raise ValueError(f"{metrics.name_of(metric)} compares with the run being patched, which denoising runs on "
                         "the corrupted prompts: use a metric of the answers (logit_diff, prob_diff, logprob), or "
                         "noising")
    runs = [{**b, "clean": b["corrupted"], "corrupted": b["clean"]} if direction == "denoising" else b for b in given]
    return given, metric, runs


def _span_names(batches: list[dict], spans: bool | Sequence[str] | None) -> list[str] | None:
    """The spans to patch at (None: each token), each named by every batch."""
    if spans is False or spans is None:
        return None
    if not all("spans" in batch for batch in batches):
        raise ValueError("patching by span needs batches that name their spans (batch['spans']): build them with "
                         "fxcircuits.data.make_batches(..., spans=...), or use a built-in task, which names its own")
    names = list(batches[0]["spans"]) if spans is True else name_list(spans, "span")
    for batch in batches:
        missing = [name for name in names if name not in batch["spans"]]
        if missing:
            raise ValueError(f"no span named {', '.join(map(repr, missing))} in a batch; the batches name "
                             f"{', '.join(map(repr, batch['spans']))}")
    if not names:
        raise ValueError("spans=[] names no span to patch at")
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ValueError(f"spans={names!r} names {', '.join(map(repr, twice))} more than once: name each span once")
    return names


def _columns(batch: dict, names: list[str] | None, width: int) -> torch.Tensor:
    """Where each position of the effects patches, as weights [positions, batch, width]: each token, or each span's
    tokens in each prompt (``width``: the prepared prompts', which a capture may have padded)."""
    if names is None:
        size, seq = batch["clean"].shape
        return torch.eye(seq, width)[:, None].expand(seq, size, width)
    return torch.stack([span_weights(batch["spans"][name].cpu(), width) for name in names])


def _joined(parts: list[torch.Tensor], fill: float) -> torch.Tensor:
    """Per-batch ``parts`` [..., batch, positions] concatenated along the batch, each padded with ``fill`` at its end
    to the most positions."""
    longest = max(part.shape[-1] for part in parts)
    return torch.cat([torch.nn.functional.pad(part, (0, longest - part.shape[-1]), value=fill) for part in parts], -2)


def _patched(cm: CircuitModel, prepared: list[Prepared], metric, masks: torch.Tensor, columns: list[torch.Tensor],
             run: torch.Tensor, calls: Calls, progress: bool) -> list[torch.Tensor]:
    """metric(run) − the metric with each unit patched at each position, [units, batch, positions] per batch: 0
    where the unit moves nothing there (``_moving``), a patched run's difference elsewhere."""
    per_call = calls.size  # a chunk's masks share a prefix; one too large for memory is split in calls
    runs = []  # per batch, the (unit, position) pairs that move something: by unit, so a call's masks share a prefix
    for p, weights in zip(prepared, columns):
        moving = (_moving(cm, p, masks).float() @ weights.ne(0).any(1).float().T).ne(0)
        runs.append(moving.nonzero().tolist())
    bar = tqdm(total=sum(-(-len(r) // per_call) for r in runs), desc="patching by position", unit="call",
               disable=not progress)
    drops, offset = [], 0
    for p, weights, pairs in zip(prepared, columns, runs):
        baseline = run[offset:offset + p.size]
        offset += p.size
        values = baseline.repeat(len(masks), len(weights), 1)  # [units, positions, batch]

        def measure(part: torch.Tensor) -> torch.Tensor:  # (unit, position) pairs [n, 2]: the metric [n, batch]
            keep = dense_keep(cm.graph, masks[part[:, 0]], device=cm.device)
            where = weights[part[:, 1]].to(cm.device)
            return p.measure(cm, metric, keep, recorded=p.recorded, where=where).cpu()

        for start in range(0, len(pairs), per_call):
            chunk = torch.tensor(pairs[start:start + per_call])
            values[chunk[:, 0], chunk[:, 1]] = calls.split(chunk, measure, [p])
            bar.update()
        drops.append(baseline[None, :, None] - values.permute(0, 2, 1))
    bar.close()
    return drops


def _moving(cm: CircuitModel, p: Prepared, masks: torch.Tensor) -> torch.Tensor:
    """Per unit and position, whether patching the unit there moves anything, [units, width]: whether the other run
    differs from this one there, in some prompt, at a node (or side input) whose edges the unit patches.  Where the
    prompts share their first tokens — a corrupted prompt that changes one name — a causal model's runs agree
    before the change in every layer, and those patched runs would each cost a forward to give the run itself."""
    _, delta, sides = differences(cm, p)
    differs = delta.ne(0).flatten(3).any(-1).any(1)  # [upstream, width]
    for side in sides:  # the input node's edges carry them
        differs[0] |= side.ne(0).flatten(2).any(-1).any(0)
    patched = torch.zeros(len(masks), len(cm.graph.upstream)).index_add_(1, cm.graph.src, 1 - masks)
    return (patched.ne(0).float() @ differs.float().cpu()).ne(0)


def _attributed(cm: CircuitModel, p: Prepared, metric, masks: torch.Tensor, columns: torch.Tensor, method: str,
                steps: int, calls: Calls) -> torch.Tensor:
    """``_patched`` estimated from gradients, [units, batch, positions]: each edge's score at each token — at the
    run itself (``"attribution"``), or averaged over ``steps`` points with the input's edges at 0, 1/steps, …
    (``"attribution-ig"``, EAP-IG-inputs) — summed over each unit's edges (those its mask patches) and weighted by
    each position's ``columns``."""
    gradients = GRADIENTS[method]
    fit_points(calls, gradients, steps)
    named = method, "method='exact'"
    scores = calls.run(lambda n: tapped(cm, p, metric, gradients, steps, n, by_position=True, named=named), [p])
    scores = scores / points_per_edge(gradients, steps)
    per_edge = metrics.wide(scores[cm.graph.src, cm.graph.dst])  # [edges, batch · seq]
    by_token = ((1 - masks).to(per_edge) @ per_edge).view(len(masks), p.size, -1)
    return torch.einsum("ubw,cbw->ubc", by_token, columns.to(by_token))


def _units(cm: CircuitModel, nodes: list[str] | Circuit | None, inputs: Sequence[str] | Circuit | None,
           receivers: Sequence[str] | Circuit | None = None) -> tuple[list[str], torch.Tensor]:
    """The units' names and their edge masks [units, E]: 0 on the edges each one patches — given nodes' outgoing
    edges (into ``receivers`` alone where given), given inputs' incoming edges, or (neither given) the edges into
    each layer."""
    if nodes is not None and inputs is not None:
        raise ValueError("patch nodes' outputs (nodes=) or downstream inputs (inputs=), not both at once")
    if receivers is not None and nodes is None:
        raise ValueError("receivers= keeps each patched node's edges into them alone (path patching): name the nodes "
                         "whose outputs to patch (nodes=) too")
    graph = cm.graph
    if inputs is not None:
        names = _input_names(graph, inputs)
        index = torch.tensor([graph.port_index[n] for n in names])
        return names, (graph.dst[None, :] != index[:, None]).float()
    if nodes is None:
        blocks = graph.blocks
        return ([f"layer {b.layer}" if b.layer is not None else f"into {b.name}" for b in blocks],
                torch.stack([(~graph.into(b)).float() for b in blocks]))
    names = node_names(cm, nodes)
    index = torch.tensor([graph.node_index[n] for n in names])
    kept = graph.src[None, :] != index[:, None]
    if receivers is not None:
        into = torch.zeros(len(graph.downstream), dtype=torch.bool)
        into[[graph.port_index[n] for n in _input_names(graph, receivers)]] = True
        kept |= ~into[graph.dst][None, :]
    return names, kept.float()


def _input_names(graph: CircuitGraph, inputs: Sequence[str] | Circuit) -> list[str]:
    """Downstream input names as given, each checked; or the inputs a circuit's edges enter, in graph order."""
    if isinstance(inputs, Circuit):
        inputs.check_graph(graph)
        inputs = [inputs.graph.downstream[d] for d in inputs.graph.dst[inputs.in_graph].unique().tolist()]
    inputs = name_list(inputs, "input")
    if not inputs:
        raise ValueError("an empty list names no input: give names such as 'a0.h0<q>' (cm.graph.downstream)")
    unknown = [name for name in inputs if name not in graph.port_index]
    if unknown:
        raise KeyError(f"unknown input{'s' if len(unknown) > 1 else ''} {unknown[:3]}: "
                       f"{graph.not_an_input(unknown[0])}")
    return inputs
