"""Activation patching by position: which layer's stream, or which node, carries the behaviour at which token.

A circuit's edges say *what* carries a behaviour; patching by position says *where in the prompt*.  A mask
restricted to some positions (``patch_positions``, ``CircuitModel.forward``) patches its edges there alone.
``patch_by_position`` sweeps units × positions with it: for each unit — the residual stream entering a layer (causal
tracing, Meng et al. 2022; TransformerLens's ``resid_pre``) or one node's output (a head, an MLP) — and each
position, one patched run, many in one call, and the metric's change; or, to first order, every unit at every
position from one backward pass (attribution patching).  On SmolLM2's first IOI prompt the stream carries the
difference at the token the corrupted prompt changes (the subject's second mention) through layer 19, and at the
last token from the name movers' layers on.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from . import metrics
from .attribution import differences
from .circuit import Circuit
from .draw import plot_heatmap
from .lens import node_names
from .model import CircuitModel
from .patching import Tap, dense_keep
from .runs import Prepared, check_finite, ends, metric_values, prepare

DIRECTIONS = ("noising", "denoising")
METHODS = ("exact", "attribution")


@dataclass
class PositionEffects:
    """What patching each unit at each position does to the metric, per prompt: ``effects`` [units, batch, seq],
    NaN at padding.  ``units``: node names, or ``"layer {l}"`` for the stream entering layer l.

    Noising runs the clean prompts and patches in the corrupted prompts' values: the effect is metric(clean) −
    metric(patched), how much the behaviour needs that unit there.  Denoising runs the corrupted prompts and patches
    in the clean values: metric(patched) − metric(corrupted), how much of the behaviour that unit there restores.
    Either way larger means the unit carries more of it there; ``normalized`` divides by metric(clean) −
    metric(corrupted), the whole of it (``clean`` and ``corrupted`` [batch]: the metric on either prompt).
    ``method``: ``"exact"`` (patched runs) or ``"attribution"`` (their first-order estimate)."""
    units: list[str]
    effects: torch.Tensor
    clean: torch.Tensor
    corrupted: torch.Tensor
    direction: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    method: str = "exact"

    @property
    def normalized(self) -> torch.Tensor:
        """``effects`` as a fraction of metric(clean) − metric(corrupted), per prompt."""
        return self.effects / (self.clean - self.corrupted)[None, :, None]

    def mean(self, normalized: bool = False) -> torch.Tensor:
        """[units, seq]: the mean over the prompts that hold each position.  It means something where the prompts
        share a template, so that a position plays one role in all of them."""
        return (self.normalized if normalized else self.effects).nanmean(1)

    def example(self, index: int = 0, normalized: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt's effects over its real tokens, [units, tokens], and those tokens' positions."""
        if not -len(self.input_ids) <= index < len(self.input_ids):
            raise IndexError(f"example {index}: the effects hold {len(self.input_ids)} prompts")
        positions = self.attention_mask[index].bool().nonzero().flatten()
        values = self.normalized if normalized else self.effects
        return values[:, index, positions], positions

    def top(self, tokenizer, k: int = 3, example: int = 0,
            normalized: bool = False) -> list[tuple[str, list[tuple[str, int, float]]]]:
        """For each unit, the ``k`` positions of one prompt where patching it moves the metric most (either sign):
        ``[(unit, [(token, position, effect), …]), …]``, as fractions of the whole where ``normalized``."""
        values, positions = self.example(example, normalized)
        order = values.abs().topk(min(k, len(positions)), dim=-1).indices
        ids = self.input_ids[example, positions]
        return [(unit, [(tokenizer.decode([int(ids[i])]), int(positions[i]), float(row[i])) for i in picks])
                for unit, row, picks in zip(self.units, values, order.tolist())]

    def table(self, tokenizer, k: int = 3, example: int = 0, normalized: bool = False) -> str:
        """``top`` as aligned text, one row per unit, each token with its position."""
        width = max(len(unit) for unit in self.units)
        return "\n".join(f"{unit:>{width}}  " + "  ".join(f"{token!r}@{p} {v:+.2f}" for token, p, v in tops)
                         for unit, tops in self.top(tokenizer, k, example, normalized))

    def plot(self, tokenizer, path: str | Path | None = None, *, example: int = 0, normalized: bool = True,
             ax: Axes | None = None, title: str | None = None) -> Figure:
        """A heatmap of units × one prompt's tokens, each cell the effect of patching that unit at that token (by
        default as a fraction of the whole effect; 0 white, the signs apart)."""
        values, positions = self.example(example, normalized)
        tokens = [tokenizer.decode([int(i)]) for i in self.input_ids[example, positions]]
        return plot_heatmap(values, self.units, tokens, path, ax=ax, title=title, fmt="{:+.2f}")


@torch.no_grad()
def patch_by_position(cm: CircuitModel, batch: dict, metric, *, nodes: list[str] | Circuit | None = None,
                      direction: str = "noising", method: str = "exact", masks_per_call: int = 16,
                      progress: bool = False) -> PositionEffects:
    """Patch each unit at each position of ``batch`` (a batch dict: ``clean``, ``corrupted``, ``attention_mask`` and
    what ``metric`` reads) and measure ``metric``: see ``PositionEffects``.

    ``nodes``: node names (or a circuit's nodes) whose outputs to patch one at a time; None patches the residual
    stream entering each layer instead (``CircuitGraph.into_layer``).  ``direction``: ``"noising"`` (the clean run,
    the corrupted values patched in) or ``"denoising"`` (the other way round).  ``method``: ``"exact"``, one
    patched run per unit and position, ``masks_per_call`` of them (units × positions) a call, each holding the
    whole batch of prompts; or ``"attribution"``, attribution patching: each edge's first-order score at each
    position from one forward and backward pass of the run (``patching.Tap`` by position), summed over each unit's
    edges — every node of a large model at every position, at the cost of one gradient, as a first look to pick
    what to patch exactly."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose one of {', '.join(DIRECTIONS)}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    if masks_per_call < 1:
        raise ValueError(f"masks_per_call must be at least 1, got {masks_per_call}")
    metric = metrics.get(metric)
    given = batch
    if direction == "denoising":
        if metrics.needs_clean_logits(metric):
            raise ValueError(f"{metrics.name_of(metric)} compares with the run being patched, which denoising "
                             "runs on the corrupted prompts: use a metric of the answers (logit_diff, prob_diff, "
                             "logprob), or noising")
        batch = {**batch, "clean": batch["corrupted"], "corrupted": batch["clean"]}
    (prepared,) = prepare(cm, [batch], metric)
    units, masks = _units(cm, nodes)
    seq = batch["clean"].shape[1]  # the prompts as given: a capture may have padded them (``runs.served_lengths``)
    run_and_other = metric_values(cm, [prepared], metric, ends(cm.graph))  # every edge kept, every one patched
    check_finite(cm, [prepared], metric, run_and_other)  # a NaN of the model's own would fill every effect
    run, other = run_and_other
    if method == "exact":
        moving = _moving(cm, prepared, masks)[:, :seq]
        drops = run[:, None] - _patched(cm, prepared, metric, masks, moving, run, masks_per_call, progress)
    else:
        drops = _attributed(cm, prepared, metric, masks)[..., :seq]
    effects = drops if direction == "noising" else -drops
    mask = given.get("attention_mask", torch.ones_like(given["clean"])).cpu()
    effects = effects.masked_fill(~mask.bool(), float("nan"))
    clean, corrupted = (run, other) if direction == "noising" else (other, run)
    return PositionEffects(units, effects, clean, corrupted, direction, given["clean"].cpu(), mask, method)


def _patched(cm: CircuitModel, p: Prepared, metric, masks: torch.Tensor, moving: torch.Tensor, run: torch.Tensor,
             per_call: int, progress: bool) -> torch.Tensor:
    """The metric with each unit patched at each position, [units, batch, seq]: ``run`` (the metric unpatched)
    where the unit moves nothing there (``moving`` [units, seq] False), a patched run elsewhere."""
    width = p.input_ids.shape[1]
    runs = moving.nonzero().tolist()  # by unit: the masks of a call share a prefix
    values = run.repeat(*moving.shape, 1)  # [units, seq, batch]
    for start in tqdm(range(0, len(runs), per_call), desc="patching by position", unit="call",
                      disable=not progress):
        chunk = torch.tensor(runs[start:start + per_call])
        keep = dense_keep(cm.graph, masks[chunk[:, 0]], device=cm.device)
        where = torch.zeros(len(chunk), 1, width, device=cm.device)
        where[torch.arange(len(chunk)), 0, chunk[:, 1].to(cm.device)] = 1.0
        values[chunk[:, 0], chunk[:, 1]] = p.measure(cm, metric, keep, recorded=p.recorded, where=where).float().cpu()
    return values.permute(0, 2, 1)


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


def _attributed(cm: CircuitModel, p: Prepared, metric, masks: torch.Tensor) -> torch.Tensor:
    """metric(run) − ``_patched`` to first order, [units, batch, seq]: each edge's score at each position, summed
    over each unit's edges (those its mask patches)."""
    _, delta, sides = differences(cm, p)
    tap = Tap(delta, len(cm.graph.downstream), sides, by_position=True)
    with torch.enable_grad():
        value = p.measure(cm, metric, dense_keep(cm.graph, device=cm.device), tap=tap).sum()
        scores = tap.scores(value)  # [upstream, downstream, batch · seq]
    per_edge = scores[cm.graph.src, cm.graph.dst].float().cpu()
    return ((1 - masks) @ per_edge).view(len(masks), p.size, -1)


def _units(cm: CircuitModel, nodes: list[str] | Circuit | None) -> tuple[list[str], torch.Tensor]:
    """The units' names and their edge masks [units, E]: 0 on the edges each one patches."""
    if nodes is None:
        layers = cm.graph.layers
        return [f"layer {layer}" for layer in layers], torch.stack([(~cm.graph.into_layer(layer)).float()
                                                                    for layer in layers])
    names = node_names(cm, nodes)
    index = torch.tensor([cm.graph.node_index[n] for n in names])
    return names, (cm.graph.src[None, :] != index[:, None]).float()
