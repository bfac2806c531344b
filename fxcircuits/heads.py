"""Splitting attention into heads, found by probing the graph rather than by reading module code.

Two questions are answered numerically, once, at trace time, on a small random input:

* **Read side.** Which output columns of the q (k, v) projection feed each head of the attention core?
  A backward pass from one head of the core input to the projection output answers it for any layout
  (fused qkv, interleaved NeoX layout, multi-query, grouped-query with ``repeat_kv``, per-head norms,
  rotary).  When every head reads its own block of columns the projection can be computed per head
  from that head's own input at the cost of one ordinary projection; when heads share columns in a
  non-separable way (a norm over all heads, as in OLMo 2) each head gets a full projection of its own.
* **Write side.** Which input columns of the output projection carry each head's result?  Each head's
  write is that block of columns times the matching block of the weight, carried linearly through what
  follows (bias dropped; a norm after attention keeps the normalisation scale of the whole write, so the
  heads' writes still sum exactly to what the layer adds to the stream).

The functions below the line marking run-time helpers are called by the rewritten graph as it runs (``Post``
is built at trace time and called at run time).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .caller import gradients
from .components import DecompositionError, between
from .ops import EXPANDS, LAYOUTS

aten = torch.ops.aten


def copy_into(target: torch.Tensor, source: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``aten.copy`` (what functionalisation makes of a slice assignment, as DeepSeek's attention writes its shared
    rotary key into every head) spelled with a derivative: ``source`` broadcast to ``target``'s shape and dtype."""
    return source.to(target.dtype).expand(target.shape).clone()


# Copies of the graph see tensors whose memory layout may differ from the captured run's; ``view`` relies on
# that layout, ``reshape`` gives the same values whatever it is.  ``aten.copy`` has no derivative, which probing
# the heads' columns needs.
RELAYOUT = {aten.view.default: aten.reshape.default, aten.copy.default: copy_into}
Ranges = tuple[tuple[int, int], ...]  # column blocks as (start, length)


@dataclass(frozen=True)
class Projection:
    """A linear map with a fixed weight: ``x @ W_in_out + bias`` in one of three ATen spellings."""
    node: Node
    x: Node
    weight: Node
    bias: Node | None
    layout: str  # "out_in" (aten.linear) or "in_out" (addmm / matmul / mm)


def as_projection(node: Node, stream_dependent: set[Node]) -> Projection | None:
    if node.op != "call_function":
        return None
    if node.target is aten.linear.default and node.args[1] not in stream_dependent:
        bias = node.args[2] if len(node.args) > 2 else None
        return Projection(node, node.args[0], node.args[1], bias, "out_in")
    if node.target is aten.addmm.default and node.args[2] not in stream_dependent and not node.kwargs:
        return Projection(node, node.args[1], node.args[2], node.args[0], "in_out")
    if node.target in (aten.matmul.default, aten.mm.default) and node.args[1] not in stream_dependent:
        return Projection(node, node.args[0], node.args[1], None, "in_out")
    return None


def last_projection(start: Node, end: Node, model_name: str) -> Projection:
    """The last projection that every path from the stream ``start`` to the attention input ``end`` goes through.

    Usually the last projection on the path (``q_proj``).  Multi-head latent attention (DeepSeek V2/V3, MiniCPM3)
    projects the stream to a latent and on to the heads' keys, but adds a rotary key taken from the latent
    directly: only the first projection carries everything the key reads."""
    path = between(start, [end])
    found = [p for n in sorted(path) if (p := as_projection(n, path)) is not None]
    if not found:
        raise DecompositionError(model_name, end, "no linear projection between the residual stream and this "
                                 "attention input")
    for p in reversed(found):
        before = between(start, [p.x]) if p.x is not start else set()
        if path <= before | between(p.node, [end]) | {p.node}:
            return p
    raise DecompositionError(model_name, end, "this attention input reads the residual stream other than through "
                             "one projection that every path goes through")


def first_projection(start: Node, ends: list[Node], model_name: str) -> Projection:
    path = between(start, ends)
    for node in sorted(path):
        if (p := as_projection(node, path)) is not None:
            return p
    raise DecompositionError(model_name, start, "no output projection between the attention core and the stream")


def record_values(gm: GraphModule, *inputs: torch.Tensor) -> dict[Node, object]:
    """Run ``gm`` once and keep every node's value, for probing."""
    values: dict[Node, object] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n):
            values[n] = result = super().run_node(n)
            return result

    with torch.no_grad():
        Recorder(gm).run(*inputs)
    return values


def _evaluate(region: list[Node], values: dict, replaced: Node, value: torch.Tensor) -> dict[Node, object]:
    env = {replaced: value}
    lookup = lambda n: env[n] if n in env else values[n]  # noqa: E731
    for node in region:
        args = torch.fx.node.map_arg(node.args, lookup)
        kwargs = torch.fx.node.map_arg(node.kwargs, lookup)
        env[node] = RELAYOUT.get(node.target, node.target)(*args, **kwargs)
    return env


def _random_like(value: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(value.shape, generator=generator).to(value)


def columns_read(source: Node, target: Node, values: dict, masks: torch.Tensor | None = None) -> list[frozenset[int]]:
    """For each head of ``target`` (axis 1), the last-axis columns of ``source`` it depends on.  With ``masks``
    (``head_elements``: each head's elements of a product that ``target`` is broadcast into), for each head the
    columns its elements of ``target`` depend on."""
    region = sorted(between(source, [target]))
    generator = torch.Generator().manual_seed(0)
    found = []
    with gradients("trace()"):  # which heads a projection reads, by their gradients
        leaf = _random_like(values[source], generator).requires_grad_(True)
        out = _evaluate(region, values, source, leaf)[target]
        for head in range(out.shape[1] if masks is None else len(masks)):
            picked = out[:, head] if masks is None else out * masks[head]
            (grad,) = torch.autograd.grad((picked * _random_like(picked, generator)).sum(), leaf, retain_graph=True)
            found.append(frozenset(torch.nonzero(grad.abs().flatten(0, -2).sum(0)).flatten().tolist()))
    return found


def repeated_heads(target: Node, values: dict) -> Node:
    """The node whose heads (axis 1) ``target`` repeats, each one for several heads in a row, by moving data alone
    (``repeat_kv``: grouped-query keys and values copied for each query head of their group); ``target`` itself
    where there is none.  Patching gives every query head its own keys and values, so such copies would only be
    thrown away: the heads are gathered from before them (``gather_heads``)."""
    found, node = target, target
    while node.target in LAYOUTS | EXPANDS | {aten.slice.Tensor} and isinstance(node.args[0], Node):
        node = node.args[0]
        if _repeats_heads(node, target, values):
            found = node
    return found


def _repeats_heads(source: Node, target: Node, values: dict) -> bool:
    before, after = values.get(source), values[target]
    if not isinstance(before, torch.Tensor) or before.dim() != after.dim() or before.dim() < 2:
        return False
    heads, copies = before.shape[1], after.shape[1] // max(before.shape[1], 1)
    if (before.shape[0], *before.shape[2:]) != (after.shape[0], *after.shape[2:]) or copies < 2 \
            or heads * copies != after.shape[1]:
        return False
    probe = _random_like(before, torch.Generator().manual_seed(0))
    out = _evaluate(sorted(between(source, [target])), values, source, probe)[target]
    return torch.equal(out, probe.repeat_interleave(copies, 1))


def columns_written(source: Node, target: Node, values: dict) -> list[frozenset[int]]:
    """For each head of ``source`` (axis 1), the last-axis columns of ``target`` it reaches.

    The region between them only moves values around (transpose, reshape), so feeding one head of random
    values and zeros elsewhere lights up exactly that head's columns."""
    region = sorted(between(source, [target]))
    generator = torch.Generator().manual_seed(0)
    value = _random_like(values[source], generator)
    found = []
    for head in range(value.shape[1]):
        alone = torch.zeros_like(value)
        alone[:, head] = value[:, head]
        out = _evaluate(region, values, source, alone)[target]
        found.append(frozenset(torch.nonzero(out.abs().flatten(0, -2).sum(0)).flatten().tolist()))
    return found


def head_elements(source: Node, target: Node, values: dict) -> torch.Tensor | None:
    """For each head of ``source`` (axis 1), the elements of ``target`` it reaches, over the axes after the leading
    ones of dynamic size (batch, sequence): [heads, *those axes] of 0 and 1 in ``target``'s dtype.  None where two
    heads reach one element."""
    region = sorted(between(source, [target]))
    value = _random_like(values[source], torch.Generator().manual_seed(0))
    lead = next(i for i, size in enumerate(target.meta["val"].shape) if isinstance(size, int))
    found = []
    for head in range(value.shape[1]):
        alone = torch.zeros_like(value)
        alone[:, head] = value[:, head]
        out = _evaluate(region, values, source, alone)[target] if region else alone
        found.append(out.abs().flatten(0, lead - 1).sum(0) != 0)
    masks = torch.stack(found)
    return masks.to(values[target].dtype) if bool((masks.sum(0) <= 1).all()) else None


class HeadGate:
    """``value · gate`` where each head's elements (``masks``, from ``head_elements``) take the gate computed from
    that head's own input: ``rounds`` [rounds, *gate shape] as the gate's ``ReadPlan`` computes them, head h's in
    round ``picks[h]``.  Where one round holds every head's (each head's columns from its own row), or all heads'
    inputs are alike, it is the plain product; otherwise exactly one head owns each element, so the sum over heads
    adds zeros to the plain product.  A callable object, so that the patcher's graph holds the masks."""

    def __init__(self, masks: torch.Tensor, picks: tuple[int, ...]):
        self.__name__ = "head_gate"  # how FX names the node that calls it
        self.masks, self.picks = masks, list(picks)

    def __call__(self, value: torch.Tensor, rounds: torch.Tensor) -> torch.Tensor:
        if rounds.shape[0] == 1:
            return value * rounds[0]
        gates = rounds[self.picks]
        gates = gates.reshape(gates.shape[0], *[1] * (value.dim() + 1 - gates.dim()), *gates.shape[1:])
        masks = self.masks.reshape(self.masks.shape[0], *[1] * (value.dim() + 1 - self.masks.dim()),
                                   *self.masks.shape[1:])
        return (value.unsqueeze(0) * masks * gates).sum(0)


def broadcasts(start: Node, end: Node, values: dict) -> bool:
    """Whether the computation from ``start`` to ``end`` (a norm) also runs on inputs stacked on a new leading
    axis, giving each row's own result — then all heads' copies can run as one."""
    if end is start:
        return True
    region = sorted(between(start, [end]))
    generator = torch.Generator().manual_seed(0)
    rows = [_random_like(values[start], generator) for _ in range(2)]
    try:
        together = _evaluate(region, values, start, torch.stack(rows))[end]
    except RuntimeError:
        return False
    apart = torch.stack([_evaluate(region, values, start, row)[end] for row in rows])
    return together.numel() == apart.numel() and torch.equal(together.reshape(apart.shape), apart)


def region_module(region: list[Node], source: Node, outputs) -> tuple[GraphModule, list[Node]]:
    """``region`` (nodes in graph order) as a module of its own, ``module(x, *externals) → outputs``: ``x`` stands
    for ``source``, and ``externals`` are the nodes outside the region that it reads (weights, rotary tables),
    in order of first use.  ``outputs``: a node of the region, or a tuple of them.  What the outputs do not need
    is dropped."""
    graph, externals = torch.fx.Graph(), []
    env = {source: graph.placeholder("x")}

    def lookup(node: Node) -> Node:
        if node not in env:
            env[node] = graph.placeholder(f"external_{len(externals)}")
            externals.append(node)
        return env[node]

    for node in region:
        env[node] = graph.node_copy(node, lookup)
        env[node].target = RELAYOUT.get(env[node].target, env[node].target)
    graph.output(torch.fx.node.map_arg(outputs, env.__getitem__))
    graph.eliminate_dead_code()
    return GraphModule(torch.nn.Module(), graph), externals


def to_ranges(columns: frozenset[int] | set[int]) -> Ranges:
    """Sorted columns as maximal contiguous blocks."""
    ranges, ordered = [], sorted(columns)
    for c in ordered:
        if ranges and ranges[-1][0] + ranges[-1][1] == c:
            ranges[-1][1] += 1
        else:
            ranges.append([c, 1])
    return tuple((s, n) for s, n in ranges)


def batch_uses(source: Node, target: Node, externals: list[Node]) -> tuple[str | None, ...] | None:
    """How a region from ``source`` to ``target`` that reads ``externals`` sees the batch, from the shapes export
    captured: per external, "size" (a size that counts batch elements: multiply it by the rounds folded into the
    batch), "rows" (a tensor with a leading axis of batch elements: repeat it) or None (neither).  None where
    folding rounds into the leading axis cannot apply: the source or target does not lead with the batch, or the
    batch appears any other way."""
    placeholder = next(iter(source.graph.find_nodes(op="placeholder")))  # input_ids [batch, seq]
    batch = _symbol(placeholder.meta.get("val").shape[0])
    if batch is None or _leading(source, batch) != "rows" or _leading(target, batch) != "rows":
        return None
    uses = tuple(_leading(e, batch) for e in externals)
    return None if "other" in uses else uses


def _symbol(size):
    """The sympy expression of a symbolic size, or None for a plain int."""
    return size.node.expr if isinstance(size, torch.SymInt) else None


def _counts(size, batch) -> str | None:
    """Whether a size counts batch elements: "linear" (a multiple of the batch), None (free of it) or "other"."""
    expr = _symbol(size)
    if expr is None or batch not in expr.free_symbols:
        return None
    return "linear" if batch not in (expr / batch).free_symbols else "other"


def _leading(node: Node, batch) -> str | None:
    """"size" for a size counting the batch, "rows" for a tensor whose leading axis alone does, None for a value
    free of the batch, "other" for anything else."""
    if "val" not in node.meta:
        return "other"
    value = node.meta["val"]
    if isinstance(value, torch.SymInt):
        return {"linear": "size", None: None}.get(_counts(value, batch), "other")
    if not isinstance(value, torch.Tensor):
        return None if isinstance(value, (int, float, bool, type(None))) else "other"
    counts = [_counts(size, batch) for size in value.shape]
    if not any(counts):
        return None
    return "rows" if counts[0] == "linear" and not any(counts[1:]) else "other"


# --------------------------------------------------------------------------------------------------
# Run-time helpers called from the rewritten graph.

def _in_out(weight: torch.Tensor, layout: str) -> torch.Tensor:
    return weight.t() if layout == "out_in" else weight


def _take(t: torch.Tensor, dim: int, ranges: Ranges) -> torch.Tensor:
    parts = [t.narrow(dim, s, n) for s, n in ranges]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def project_columns(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str,
                    ranges: Ranges, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``(x · scale @ W + b)[..., columns]`` computed for those columns only (``scale``: one value per row of
    ``x``, applied to the product: see ``norms``)."""
    out = _scaled(x @ _take(_in_out(weight, layout), -1, ranges), scale)
    return out if bias is None else out + _take(bias, 0, ranges)


def apply_columns(x: torch.Tensor, weight: torch.Tensor, layout: str,
                  columns: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` and the projection's weight (in its own ``layout``) with the column factors (a norm's trailing
    weight: ``norms``) applied to whichever is smaller: ``(x ⊙ g) @ W = x @ (g ⊙ W)``.  The weight where many rows
    are projected; the rows where few are (one row shared by a role's heads, a short batch)."""
    for g in columns:
        g = g if g.dim() == 1 else g.reshape(-1)
        if x.numel() <= weight.numel():
            x = x * g
        else:
            weight = weight * (g if layout == "out_in" else g[:, None])
    return x, weight


def _scaled(out: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """A product of rows times their scale: ``(x · s) @ W = s · (x @ W)``, with ``s`` shaped like x's rows."""
    return out if scale is None else out * scale.reshape(*out.shape[:-1], 1)


@functools.cache
def grid(ranges: tuple[Ranges, ...]) -> tuple[int, int, int, int, int] | None:
    """The heads' column blocks as a grid a strided view can read: (groups, heads per group, first column, step,
    width) when every head reads one block of ``width`` columns, consecutive heads share a block in equal
    numbers (grouped-query attention) and the blocks start ``step`` apart.  None for any other layout."""
    if any(len(r) != 1 for r in ranges):
        return None
    blocks = [r[0] for r in ranges]
    distinct = list(dict.fromkeys(blocks))
    per_group, (start, width) = len(blocks) // len(distinct), distinct[0]
    step = distinct[1][0] - start if len(distinct) > 1 else width
    regular = all(b == (start + g * step, width) for g, b in enumerate(distinct))
    if not regular or step < width or blocks != [b for b in distinct for _ in range(per_group)]:
        return None
    return len(distinct), per_group, start, step, width


def _grid_view(t: torch.Tensor, dim: int, layout: tuple[int, int, int, int, int]) -> torch.Tensor:
    """The grid's blocks of ``t`` along ``dim``, without a copy: ``dim`` becomes [groups, …, width] (groups first)."""
    groups, _, start, step, width = layout
    span = (groups - 1) * step + width
    blocks = (t if start == 0 and span == t.shape[dim] else t.narrow(dim, start, span)).unfold(dim, width, step)
    return blocks.movedim(dim if dim >= 0 else dim - 1, 0)


def project_heads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str,
                  ranges: tuple[Ranges, ...], scale: torch.Tensor | None = None) -> torch.Tensor:
    """Head h's columns ``ranges[h]`` of ``x[h] · scale[h] @ W + b`` for every head in one batched matmul.

    ``x`` holds the heads' inputs stacked on axis 0 (or flattened with them, as after ``view(-1, d)``), and
    ``scale`` one value per row of it, or None; returns [heads, *rows, columns] with the per-head leading shape
    kept where ``x`` kept it.  Where the columns form a grid the weight is read in place (heads of a group share
    a block and one matmul)."""
    n = len(ranges)
    rows = x.shape[1:-1] if x.shape[0] == n and x.dim() > 2 else (-1,)
    w, blocks = _in_out(weight, layout), grid(ranges)
    if blocks is not None:
        out = _scaled(torch.bmm(x.reshape(blocks[0], -1, x.shape[-1]), _grid_view(w, -1, blocks)), scale)
        if bias is not None:
            out = out + _grid_view(bias, 0, blocks)[:, None]
    else:
        out = _scaled(torch.bmm(x.reshape(n, -1, x.shape[-1]), torch.stack([_take(w, -1, r) for r in ranges])),
                      scale)
        if bias is not None:
            out = out + torch.stack([_take(bias, 0, r) for r in ranges])[:, None]
    return out.reshape(n, *rows, out.shape[-1])


def place_columns(parts: list[torch.Tensor], ranges: list[Ranges], width: int) -> torch.Tensor:
    """A ``width``-column tensor holding each part at its columns and zeros elsewhere."""
    out = parts[0].new_zeros(*parts[0].shape[:-1], width)
    for part, blocks in zip(parts, ranges):
        place_columns_into(out, part, blocks)
    return out


def place_columns_into(out: torch.Tensor, part: torch.Tensor, blocks: Ranges) -> None:
    """Write ``part``'s columns, in order, into ``out``'s column ``blocks``."""
    offset = 0
    for start, n in blocks:
        out[..., start:start + n] = part[..., offset:offset + n]
        offset += n


def launch_bound(device: torch.device) -> bool:
    """Whether a run on ``device`` is bound by the operations it launches rather than by their arithmetic: on an
    accelerator, where a model this size waits on the host.  On CPU the arithmetic sets the pace.  Every route
    gives the same numbers; this only picks the cheaper (here, in ``norms`` and in ``CircuitModel.runs_alongside``,
    which call it through this module, so that tests and benchmarks make a GPU's choices on CPU by patching it)."""
    return device.type != "cpu"


def shared_input(store, tap, rows: torch.Tensor) -> bool:
    """Whether every reader of ``rows`` [readers, …] sees the same value and none needs its own gradient
    (``own_gradients``).

    ``accumulate`` hands one value, expanded, to readers whose edges are all weighted alike (none patched, or
    every one by the same node mask).  Their heads then all read one stream, as in the unmodified model, so the
    plain projection serves them all."""
    return rows.stride(0) == 0 and not own_gradients(store, tap)


def own_gradients(store, tap) -> bool:
    """Whether each reader needs a gradient of its own: where the gradient of the mask (``store``'s, a
    ``patching.DeltaStore``: EAP's edge scores) or a tap's (``patching.Tap``) is taken, both of which read every
    reader's.  A gradient for anything else — the other run's values (optimal ablation), the model's weights —
    flows through a value the readers share as it flows through the model."""
    return torch.is_grad_enabled() and (tap is not None or store.keep.requires_grad)


def distinct_rows(rows: torch.Tensor, shared: bool) -> torch.Tensor:
    """The rows the layer's norms must run on: one where all readers share it."""
    return rows[:1] if shared else rows


def role_parts(rows: torch.Tensor | None, shared: bool, n: int, roles: int) -> tuple:
    """Each role's (q, k or v) ``n`` readers among a layer's rows, by one split, whose gradient is one
    concatenation (a slice per role would zero-fill all the rows for each); the one shared row for every role where
    all read the same.  A norm may have flattened the readers with batch and sequence (``view(-1, d)``): they lead,
    so they split.  None (no per-row scale: ``norms.Norm``) stays None."""
    if shared or rows is None:
        return (rows,) * roles
    if rows.shape[0] != n * roles:
        rows = rows.reshape(n * roles, -1, rows.shape[-1])
    return rows.split(n)


def role_shared(store, tap, shared: bool, first: int, n: int) -> bool:
    """Whether one role's ``n`` readers (from reader ``first``) all see one value: the layer's readers all do
    (``shared``), or the mask (``store``, a ``patching.DeltaStore``) weights their edges alike — say the k inputs
    of a layer none of whose k edges a circuit keeps — and none needs its own gradient (``own_gradients``)."""
    return shared or not own_gradients(store, tap) and store.alike(first, first + n)


def role_input(rows: torch.Tensor | None, alike: bool, shared: bool) -> torch.Tensor | None:
    """The rows one role projects: the first where its readers share one value (it already is the only one where
    the whole layer shares).  None stays None (``role_parts``)."""
    return rows[:1] if alike and not shared and rows is not None else rows


def wholly_patched(store, rows: torch.Tensor, first: int, n: int, recorded: torch.Tensor | None) -> tuple[int, ...]:
    """The heads among one role's ``n`` readers (from reader ``first``) whose every edge the mask patches fully.

    They read the other run's stream exactly, so their projection is the one the recording pass computed
    (``recorded``) and needs no computing: in a circuit found by attribution, a third to a half of the q, k and v
    inputs have no edge of their own.  None where there is no recording (ablation values are no run of the
    model) or where the rows need their own gradient.  Where launches set the pace (``launch_bound``), only where
    all ``n`` are: projecting some heads one by one launches more than the batched product."""
    if recorded is None or (rows.requires_grad and torch.is_grad_enabled()):
        return ()
    heads = store.wholly_patched(first, first + n)
    return heads if len(heads) == n or not launch_bound(rows.device) else ()


def project_rounds(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str,
                   ranges: tuple[Ranges, ...], rounds: tuple[tuple[tuple[int, Ranges], ...], ...], width: int,
                   shared: bool, recorded_heads: tuple[int, ...] = (),
                   recorded: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                   columns: tuple[torch.Tensor, ...] = ()) -> torch.Tensor:
    """The projection's output as the post-projection path reads it, one per round: [rounds, *rows, width].

    Each round holds its heads' columns (``ranges[h]`` for query head h), each computed from that head's own row
    of ``x`` [heads, …] (zeros elsewhere) times its ``scale`` (one value per row, or None) and the ``columns``
    factors (the norm's trailing factors, ``norms.Norm``).  Where all heads share one row (``shared``) the plain
    projection holds every head's columns and a single round serves them all.  The heads in ``recorded_heads``
    take their columns from ``recorded``, the projection's output in the other run (``wholly_patched``)."""
    if recorded_heads:
        recorded = _for_every_mask(recorded, x if shared else x[0])
    if recorded_heads and shared:  # readers alike and all wholly patched: the other run's projection serves all
        return recorded.unsqueeze(0)
    x, weight = apply_columns(x, weight, layout, columns)
    if recorded_heads:
        return _rounds_with_recorded(x, weight, bias, layout, ranges, rounds, recorded_heads, recorded, scale)
    if shared:
        out = _scaled(x @ _in_out(weight, layout), scale)
        out = out if bias is None else out + bias
        return out if x.shape[0] == 1 and x.dim() > 2 else out.unsqueeze(0)
    projected = project_heads(x, weight, bias, layout, ranges, scale)
    blocks, rest = grid(ranges), projected.shape[1:-1]
    if blocks is None:
        return torch.stack([place_columns([projected[h] for h, _ in heads], [r for _, r in heads], width)
                            for heads in rounds])
    groups, per_group, start, step, columns = blocks  # round r holds head r of every group
    by_round = projected.reshape(groups, per_group, *rest, columns).movedim(0, -2)
    if start == 0 and step == columns and groups * columns == width:
        return by_round.reshape(per_group, *rest, width)
    out = projected.new_zeros(per_group, *rest, width)
    out.narrow(-1, start, (groups - 1) * step + columns).unfold(-1, columns, step).copy_(by_round)
    return out


def _for_every_mask(recorded: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The recorded projection (one batch of the other run) repeated for every mask whose rows one reader's input
    ``x`` holds, mask after mask as ``CircuitModel.patched`` lays them: copied only where a head reads it."""
    masks = x.numel() // x.shape[-1] // (recorded.numel() // recorded.shape[-1])
    return recorded if masks == 1 else recorded.repeat(masks, *[1] * (recorded.dim() - 1))


def _rounds_with_recorded(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, layout: str,
                          ranges: tuple[Ranges, ...], rounds, recorded_heads: tuple[int, ...],
                          recorded: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``project_rounds``' rounds with only the heads outside ``recorded_heads`` projected: every round starts as
    the other run's projection ``recorded`` (columns of heads a round does not hold are never read), and each
    projected head's columns are written over its own round's, one head at a time (gathering the heads' rows
    and weights for one batched product would copy more than the product saves)."""
    out = recorded.expand(len(rounds), *recorded.shape).clone()
    w, rows = _in_out(weight, layout), out.shape[1:-1]
    round_of = {h: r for r, heads in enumerate(rounds) for h, _ in heads}
    for h in range(len(ranges)):
        if h not in recorded_heads:
            part = project_columns(x[h], w, bias, "in_out", ranges[h], None if scale is None else scale[h])
            part = part.reshape(*rows, -1)
            place_columns_into(out[round_of[h]], part, ranges[h])
    return out


class Post:
    """The captured path from a q (k, v) projection's output to the attention core's input (reshape into heads,
    rotary, per-head norms, repeat_kv), run on all rounds at once.

    Rounds [rounds, batch, …] are folded into the batch axis and the path runs once on rounds·batch rows: the
    sizes it reads that count the batch are multiplied by the number of rounds, and the tensors it reads with a
    row per batch element (rotary tables built from per-prompt positions) are repeated.  Which ones those are is
    read from the captured shapes (``batch_uses``), and the folded run is checked once, at trace time, against the
    rounds run one after another — which is what runs where folding does not apply.  (``torch.vmap`` would find
    the same batching on every call, at a cost of hundreds of microseconds each: on a GPU, where a run this small
    is bound by the host, that was more than the model's whole forward.)"""

    def __init__(self, region: list[Node], source: Node, target: Node, values: dict):
        self.__name__ = "post"  # how FX names the node that calls it
        self.module, self.externals = region_module(region, source, target)
        self.uses = batch_uses(source, target, self.externals)
        if self.uses is not None and not self._folds(values[source], [values[e] for e in self.externals]):
            self.uses = None

    def _folds(self, x: torch.Tensor, externals: list) -> bool:
        rounds = torch.stack([x, _random_like(x, torch.Generator().manual_seed(0))])
        try:
            with torch.no_grad():
                folded = self._folded(rounds, externals)
        except RuntimeError:
            return False
        apart = self._apart(rounds, externals)
        return folded.shape == apart.shape and torch.allclose(folded, apart, rtol=1e-5, atol=1e-6)

    def _folded(self, rounds: torch.Tensor, externals) -> torch.Tensor:
        n = rounds.shape[0]
        scaled = [e * n if use == "size" else e.repeat(n, *[1] * (e.dim() - 1)) if use == "rows" else e
                  for e, use in zip(externals, self.uses)]
        return self.module(rounds.flatten(0, 1), *scaled).unflatten(0, (n, -1))

    def _apart(self, rounds: torch.Tensor, externals) -> torch.Tensor:
        return torch.stack([self.module(r, *externals) for r in rounds])

    def __call__(self, rounds: torch.Tensor, *externals) -> torch.Tensor:
        if rounds.shape[0] == 1:
            return self.module(rounds[0], *externals).unsqueeze(0)
        return self._apart(rounds, externals) if self.uses is None else self._folded(rounds, externals)


def gather_heads(core: torch.Tensor, picks: tuple[tuple[int, int], ...], shared: bool) -> torch.Tensor:
    """Query head h's tensor is head ``picks[h][1]`` of round ``picks[h][0]`` of ``core`` [rounds, B, heads, …],
    stacked on axis 1 (round 0 alone where all heads shared one)."""
    n_rounds, n_core = core.shape[0], core.shape[2]
    if shared:
        picks = tuple((0, c) for _, c in picks)
    if n_core == len(picks) and all(c == h for h, (_, c) in enumerate(picks)):
        if all(r == 0 for r, _ in picks):
            return core[0]
        # grouped heads: round r serves head r of each group
        if n_core % n_rounds == 0 and all(r == h % n_rounds for h, (r, _) in enumerate(picks)):
            by_group = core.unflatten(2, (n_core // n_rounds, n_rounds)).diagonal(0, 0, 3)
            return by_group.movedim(-1, 2).flatten(1, 2)
    per_core, rest = divmod(len(picks), n_core)
    if not rest and per_core == n_rounds and picks == tuple((h % n_rounds, h // n_rounds) for h in range(len(picks))):
        # grouped heads gathered before their copies (``repeated_heads``): round r serves head r of each group
        return core.movedim(0, 2).flatten(1, 2)
    if not rest and picks == tuple((0, h // per_core) for h in range(len(picks))):
        # one round (all heads read one stream) of grouped-query heads: each core head serves consecutive query
        # heads, as repeat_kv spreads them (one copy, where stacking would slice every head)
        return core[0].unsqueeze(2).expand(-1, -1, per_core, *core.shape[3:]).flatten(1, 2)
    return torch.stack([core[r, :, c] for r, c in picks], dim=1)


def head_writes(z: torch.Tensor, weight: torch.Tensor, layout: str, ranges: tuple[Ranges, ...],
                each: bool = True) -> torch.Tensor:
    """Each head's share of the output projection, stacked on a new leading axis (bias excluded); or, where no
    one reads the heads' writes apart (``each`` false: a patched pass that stores none of them), their sum alone
    on a leading axis of one — the plain projection, without the heads' [heads, rows, d_model] of writes."""
    w, blocks = _in_out(weight, layout), grid(ranges)
    if not each:
        columns = _union(ranges)
        x = _take(z, -1, columns)
        return torch.mm(x.reshape(-1, x.shape[-1]), _take(w, 0, columns)).reshape(1, *z.shape[:-1], w.shape[-1])
    if blocks is None or blocks[1] != 1:
        return torch.stack([_take(z, -1, r) @ _take(w, 0, r) for r in ranges])
    heads = _grid_view(z.reshape(-1, z.shape[-1]), -1, blocks)            # [heads, rows, width]
    out = torch.bmm(heads, _grid_view(w, 0, blocks).transpose(1, 2))        # [heads, rows, d_out]
    return out.reshape(len(ranges), *z.shape[:-1], w.shape[-1])


def heads_sum(shares: torch.Tensor) -> torch.Tensor:
    """The heads' shares [heads or 1, …] summed: what the output projection adds to the stream."""
    return shares[0] if shares.shape[0] == 1 else shares.sum(0)


@functools.cache
def _union(ranges: tuple[Ranges, ...]) -> Ranges:
    """The columns of all heads' blocks, as blocks."""
    return to_ranges({c for r in ranges for start, n in r for c in range(start, start + n)})


def norm_share(share: torch.Tensor, total: torch.Tensor, weight: torch.Tensor | None, eps: float,
               centre: bool) -> torch.Tensor:
    """LayerNorm (``centre``: the part's own mean removed, which is linear) or RMSNorm of one part of a sum over
    the last dimension, scaled by the whole sum's spread, so the parts' norms sum to the norm of the sum."""
    if centre:
        share = share - share.mean(-1, keepdim=True)
        spread = total.var(-1, unbiased=False, keepdim=True)
    else:
        spread = total.pow(2).mean(-1, keepdim=True)
    out = share * torch.rsqrt(spread + eps)
    return out if weight is None else out * weight
