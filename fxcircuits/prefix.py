"""Masks evaluated in one call share the layers before the first reader they patch.

A batched patched call holds one copy of the prompts per mask.  Exact patching patches one edge per mask, and
ACDC the edges into the readers it has judged so far: every layer before the first reader any mask moves an
edge into computes the same values for every mask.  This pass lets the patcher run those layers on one copy of
the batch.  Before each reader group's ``accumulate`` it inserts ``widen``, which — at the group the mask picks
(``DeltaStore.widen_at``), and nowhere else — repeats for every mask whatever the later layers read of the
prefix: the stream, the attention mask and tables built from it, the inputs, the batch sizes.  The writes of the
prefix's nodes are not repeated: the store takes one batch of them for every mask, as it takes one batch of the
other run.  Exact patching of an edge into layer l then computes l layers once instead of once per mask.

Which values carry the batch, and along which axis, is found by running the patcher at two batch sizes — by
what the graph computes, not by what any model is.  A value that changes with the batch in any other way than
along one axis (or as a count), or that does not hold one copy per prompt along it, leaves the patcher as it was:
every mask then runs the whole model.
"""
from __future__ import annotations

import operator

import torch
from torch.fx import Graph, GraphModule, Node

from .heads import record_values
from .patching import DeltaStore, accumulate

COUNT = "count"  # a value that is a number of rows (or of rows times positions): widened by multiplying


def share_prefix(patcher: GraphModule, recorder: GraphModule, input_ids: torch.Tensor,
                 attention_mask: torch.Tensor) -> bool:
    """Insert ``widen`` before every ``accumulate`` of ``patcher`` (in place).  Returns whether it could: False
    where some value the later layers read depends on the batch in a way ``widen`` cannot repeat."""
    graph = patcher.graph
    nodes = list(graph.nodes)
    position = {n: i for i, n in enumerate(nodes)}
    boundaries = [n for n in nodes if n.target is accumulate]
    last = _last_reads(nodes, position)
    crossing = [[n for n in nodes[:position[b]] if last[n] >= position[b]] for b in boundaries]
    store = next(n for n in nodes if n.target is DeltaStore)
    axes = _batch_axes(patcher, recorder, store, {n for c in crossing for n in c}, input_ids, attention_mask)
    if axes is None:
        return False
    current: dict[Node, Node] = {}
    for group, (boundary, values) in enumerate(zip(boundaries, crossing)):
        values = [n for n in values if axes[n] is not None]
        if values:
            _insert_widen(graph, store, group, boundary, values, [axes[n] for n in values], current, position)
    patcher.recompile()
    return True


def widen(store: DeltaStore, group: int, axes: tuple, *values):
    """``values`` as the patcher reads them from reader group ``group`` on: repeated for every mask at the group
    where the shared prefix ends, unchanged anywhere else."""
    if store.widen_at != group:
        return values
    lead, masks = int(store.ahead), store.keep.shape[0]
    return tuple(_widened(v, axis, lead, masks) for v, axis in zip(values, axes))


def _widened(value, axis, lead: int, masks: int):
    """``value`` with its one copy of the batch along ``axis`` repeated ``masks`` times.  Where the other run rides
    in the same pass, its ``lead`` block of rows comes first and stays single (``DeltaStore``)."""
    if axis == COUNT:
        return value // (lead + 1) * (lead + masks)
    blocks = value.unflatten(axis, (lead + 1, -1))
    head, body = blocks.split([lead, 1], axis)
    body = body.expand(*blocks.shape[:axis], masks, *blocks.shape[axis + 1:])
    return torch.cat([head, body], axis).flatten(axis, axis + 1)


def _last_reads(nodes: list[Node], position: dict[Node, int]) -> dict[Node, int]:
    """Per node, the position of its last reader other than an ``accumulate`` that reads it as an upstream output
    (it takes one batch of those), or -1: a value computed before a boundary crosses it — the later layers take it
    from the earlier ones — where that last read lies at the boundary or after.  Weights (get_attr) never cross."""
    return {node: -1 if node.op == "get_attr" else
            max((position[u] for u in node.users if not _upstream_output(node, u)), default=-1) for node in nodes}


def _upstream_output(node: Node, user: Node) -> bool:
    """Whether ``user`` is an ``accumulate`` that reads ``node`` as this run's or the other run's outputs alone."""
    return user.target is accumulate and node is not user.args[1] and (node in user.args[2] or node in user.args[3])


def _insert_widen(graph: Graph, store: Node, group: int, boundary: Node, values: list[Node], axes: list,
                  current: dict[Node, Node], position: dict[Node, int]) -> None:
    """One ``widen`` before ``boundary``, and every later read of ``values`` re-pointed to its outputs.
    ``current``: what each value is read as so far (the outputs of an earlier ``widen``)."""
    sources = [current.get(n, n) for n in values]
    with graph.inserting_before(boundary):
        call = graph.call_function(widen, (store, group, tuple(axes), *sources))
        outs = [graph.call_function(operator.getitem, (call, i)) for i in range(len(values))]
    at = position[boundary]
    for value, source, out in zip(values, sources, outs):
        for user in list(source.users):
            if user in position and position[user] >= at:
                user.replace_input_with(source, out)
        current[value] = out


def _batch_axes(patcher: GraphModule, recorder: GraphModule, store: Node, nodes: set[Node], input_ids: torch.Tensor,
                attention_mask: torch.Tensor) -> dict[Node, object] | None:
    """For each of ``nodes``, how its value carries the batch: an axis, ``COUNT``, or None (not at all); found
    by running the patcher unmasked on 2 and 3 prompts.  None where some value carries it otherwise.  ``store``:
    the patcher's ``DeltaStore`` node, whose arguments give the mask's size."""
    keep = torch.ones(1, sum(store.args[1]), sum(store.args[2]), device=input_ids.device)
    with torch.no_grad():
        other = recorder(input_ids[:1], attention_mask[:1])[0]  # one prompt of the other run serves every row
    runs = []
    for batch in (2, 3):
        ids = input_ids[:1].expand(batch, -1).contiguous()
        mask = attention_mask[:1].expand(batch, -1).contiguous()
        values = record_values(patcher, ids, mask, other, keep)
        runs.append({n: _signature(values[n]) for n in nodes})
    axes = {n: _axis(runs[0][n], runs[1][n]) for n in nodes}
    if any(a is _UNKNOWN or isinstance(a, int) and not _copies(values[n], a, batch)  # the last run's values
           for n, a in axes.items()):
        return None
    return axes


def _copies(value: torch.Tensor, axis: int, batch: int) -> bool:
    """Whether ``value``, computed for ``batch`` copies of one prompt, holds one copy per prompt along ``axis`` —
    what ``widen`` repeats — rather than something that only grows with the batch (an index over the batch's
    tokens, which repeated would point into the first copy alone)."""
    if value.numel() == 0:
        return True
    blocks = value.unflatten(axis, (batch, -1))
    first = blocks.narrow(axis, 0, 1).expand_as(blocks)
    if not value.is_floating_point():
        return torch.equal(blocks, first)
    return torch.allclose(blocks, first, rtol=1e-4, atol=1e-6 * float(value.abs().max()))


_UNKNOWN = object()


def _signature(value):
    """What of ``value`` may depend on the batch: a tensor's shape, a number, a sequence's parts; None else."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape))
    if isinstance(value, (int, float)):
        return value
    if isinstance(value, (list, tuple)):
        return tuple(_signature(v) for v in value)
    return None


def _axis(two, three):
    """How a value with signature ``two`` at 2 prompts and ``three`` at 3 carries the batch (``_batch_axes``)."""
    if two == three:
        return None
    if isinstance(two, int) and not isinstance(two, bool) and isinstance(three, int) and two * 3 == three * 2:
        return COUNT
    if isinstance(two, tuple) and two and two[0] == "tensor" and three[0] == "tensor" and len(two[1]) == len(three[1]):
        changed = [i for i, (a, b) in enumerate(zip(two[1], three[1])) if a != b]
        if len(changed) == 1 and two[1][changed[0]] * 3 == three[1][changed[0]] * 2:
            return changed[0]
    return _UNKNOWN
