"""Cheaper copies of the norm in front of each attention input, found in the graph rather than per architecture.

The patcher gives every q, k and v input of every head its own copy of the stream, so a layer runs its input norm
on 3·heads rows where the model runs it on one, and each of those passes over [readers, batch, seq, d_model]
costs about as much as a head's projection.  Two rewrites keep the values (up to float rounding) and drop most
of those passes:

* **Factors at the end of the norm move across the projection** (``peel``).  An RMSNorm ends
  ``x · rsqrt(mean(x²) + ε) · g``: a scale per row and a weight per column.  Since
  ``(x · s · g) @ W = s · (x @ (g ⊙ W))``, the weight is folded into the projection's rows where a projection
  runs (``heads.apply_columns``: into whichever of the rows and the weight is smaller) and the scale multiplies the
  projection's output, a head's columns rather than d_model.  The projection's bias is added after the scale,
  where it was.
* **mean(x²) without writing x²** (``fuse_mean_square``): one reduction instead of a pass that writes a copy of
  the rows and a second that reads it.

Both apply to a layer's stacked rows only (``Norm``).  Where every reader of a layer sees one shared value (no
edge into it patched, or all alike), the norm runs as captured: the model's own numbers, to the last bit, so an
all-ones mask gives exactly the clean run and an empty circuit on clean = corrupted exactly the full model.  A
LayerNorm is one fused ATen operation already and is left as it is, as is an RMSNorm computed by the fused
operation (``F.rms_norm``, ``nn.RMSNorm``).

The final norm, frozen (``freeze_statistics``): direct logit attribution reads each node's output through the final
norm with the norm's statistics taken from the whole stream, as if they were constants, so that the readout is
linear in what the nodes write and their direct logits add up.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node, map_arg
from torch.fx.operator_schemas import normalize_function

from . import heads
from .components import DecompositionError
from .heads import region_module
from .ops import COPIES, EXPANDS, PERMUTES, REDUCTIONS, RESHAPES

aten = torch.ops.aten
# Operations that leave a value as it is when they keep its dtype (``to(float32)`` on fp32 rows, ``type_as``)
IDENTITIES = COPIES | {aten.type_as.default}


@dataclass(frozen=True)
class Factors:
    """The projection's input as ``core · Π rows · Π columns``: ``rows`` hold one value per row ([…, 1], computed
    from the stream), ``columns`` one per column ([d], computed from weights alone)."""
    core: Node
    rows: tuple[Node, ...] = ()
    columns: tuple[Node, ...] = ()


def peel(end: Node, region: set[Node], values: dict) -> Factors:
    """Walk back from ``end`` (a projection's input) through multiplications by per-row or per-column factors and
    through casts that change nothing, while every value keeps ``end``'s shape and dtype.  ``region``: the nodes
    computed from the stream (the norm); a factor outside it is a constant of the run."""
    rows, columns, node = [], [], end
    shape, dtype = values[end].shape, values[end].dtype
    while node in region and _alike(values[node], shape, dtype):
        source = node.args[0] if node.args else None
        if node.target in IDENTITIES and isinstance(source, Node) and _alike(values[source], shape, dtype) \
                and set(node.kwargs) <= {"dtype", "memory_format"}:
            node = source
            continue
        if node.target is not aten.mul.Tensor or not all(isinstance(a, Node) for a in node.args[:2]):
            break
        a, b = node.args[:2]
        full, factor = (a, b) if _alike(values[a], shape, dtype) else (b, a)
        kind = _factor(values[factor], shape, dtype, factor in region)
        if kind is None or not _alike(values[full], shape, dtype):
            break
        (rows if kind == "row" else columns).append(factor)
        node = full
    return Factors(node, tuple(rows), tuple(columns))


class Norm:
    """The captured path from the stream to a projection's input, run on a layer's stacked reader rows [readers, …]:
    ``norm(rows, shared, *externals)`` → (output, per-row scale or None, per-column factors).

    Where the rows are one shared value (``shared``) it runs as captured and returns its output alone, and so where
    launches set the pace (``heads.launch_bound``): the rewrites save arithmetic at the cost of operations, the
    factors applied across each role's projection rather than once.  Otherwise it stops at the trailing factors
    (``peel``) with mean(x²) fused, and returns the product of the per-row factors and the per-column factors
    beside: the projection applies them (``heads.project_rounds``).  ``externals``:
    what the region reads from outside it, in the order the call takes them."""

    def __init__(self, region: list[Node], source: Node, end: Node, values: dict):
        self.__name__ = "norm"  # how FX names the node that calls it
        self.factors = peel(end, set(region), values)
        # both modules copy the whole region, so they read the same externals in the same order
        self.whole, self.externals = region_module(region, source, (end,))
        factored, _ = region_module(region, source, (self.factors.core, *self.factors.rows))
        self.factored = fuse_mean_square(factored)
        self.column_at = [self.externals.index(c) for c in self.factors.columns]  # constants the region reads

    def __call__(self, rows: torch.Tensor, shared: bool, *externals) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                             tuple[torch.Tensor, ...]]:
        if shared or heads.launch_bound(rows.device):
            return self.whole(rows, *externals)[0], None, ()
        core, *factors = self.factored(rows, *externals)
        return core, row_scale(*factors) if factors else None, tuple(externals[i] for i in self.column_at)


def _alike(value, shape: torch.Size, dtype: torch.dtype) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == shape and value.dtype == dtype


def _factor(value, shape: torch.Size, dtype: torch.dtype, from_stream: bool) -> str | None:
    """"row" for a value per row computed from the stream, "column" for a constant value per column, else None."""
    if not isinstance(value, torch.Tensor) or value.dtype != dtype:
        return None
    if from_stream and value.shape == shape[:-1] + (1,):
        return "row"
    if not from_stream and value.dim() >= 1 and value.shape[-1] == shape[-1] and value.numel() == shape[-1]:
        return "column"
    return None


def _dtype(node: Node) -> torch.dtype | None:
    value = node.meta.get("val")
    return value.dtype if isinstance(value, torch.Tensor) else None


# --------------------------------------------------------------------------------------------------
# Run-time helpers called from the patcher.

def row_scale(*rows: torch.Tensor) -> torch.Tensor:
    """The product of the per-row factors, [readers, …, 1]: what the projection's output is multiplied by."""
    scale = rows[0]
    for r in rows[1:]:
        scale = scale * r
    return scale


def mean_square(x: torch.Tensor, dim: list[int], keepdim: bool = False) -> torch.Tensor:
    """``mean(x², dim)`` as one reduction (the 2-norm, squared), never writing x² out."""
    return _MeanSquare.apply(x, dim, keepdim)


class _MeanSquare(torch.autograd.Function):
    """``mean_square`` with its gradient, x · 2g / count, as one pass over the rows: the 2-norm's own backward
    divides the rows by the norm, masks the rows of norm 0 and multiplies, three passes (0.76 s of a 13 s
    EAP-IG-inputs run on 8 SmolLM2 prompts)."""

    @staticmethod
    def forward(x: torch.Tensor, dim: list[int], keepdim: bool) -> torch.Tensor:
        count = math.prod(x.shape[d] for d in dim)
        return torch.linalg.vector_norm(x, 2, dim, keepdim).square() / count

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, ctx.dim, ctx.keepdim = inputs
        ctx.save_for_backward(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        if not ctx.keepdim:
            for d in sorted(d % x.dim() for d in ctx.dim):
                grad = grad.unsqueeze(d)
        return x * (grad * (2 / math.prod(x.shape[d] for d in ctx.dim))), None, None


def fuse_mean_square(gm: GraphModule) -> GraphModule:
    """Replace ``mean(pow(x, 2), dim)`` over fp32 or fp64 values, where the square serves nothing else, by
    ``mean_square`` (16-bit values keep their own rounding)."""
    for node in list(gm.graph.nodes):
        square = node.args[0] if node.target is aten.mean.dim and node.args else None
        if (isinstance(square, Node) and square.target is aten.pow.Tensor_Scalar and square.args[1] == 2
                and len(square.users) == 1 and not node.kwargs and len(node.args) >= 2
                and isinstance(node.args[1], (list, tuple)) and _dtype(square) in (torch.float32, torch.float64)):
            with gm.graph.inserting_before(node):
                fused = gm.graph.call_function(mean_square, (square.args[0], *node.args[1:]))
            node.replace_all_uses_with(fused)
            gm.graph.erase_node(node)
            gm.graph.erase_node(square)
    gm.recompile()
    return gm


# --------------------------------------------------------------------------------------------------
# The final norm with its statistics frozen, for direct logit attribution.

VIEWS = IDENTITIES | RESHAPES | PERMUTES | EXPANDS | {aten.slice.Tensor, aten.select.int, aten.t.default,
                                                    aten.squeeze.dim, aten.flatten.using_ints}
SUMS = {aten.add.Tensor, aten.sub.Tensor, aten.neg.default} | REDUCTIONS
# Products linear in one stream-dependent factor, and the argument positions it may take
PRODUCTS = {aten.mul.Tensor: (0, 1), aten.div.Tensor: (0,), aten.linear.default: (0,), aten.mm.default: (0, 1),
            aten.matmul.default: (0, 1), aten.addmm.default: (1, 2)}


def freeze_statistics(readout: GraphModule, model_name: str, reading: str = "the final norm") -> tuple[GraphModule,
                                                                                                      bool]:
    """``readout`` (stream → logits) with every statistic its norm computes from the stream detached: a row's
    mean square or variance, and what is computed from it alone (ε added, the reciprocal square root).  Under
    forward-mode differentiation (``torch.func.jvp``) the returned module then maps a node's output to the logits
    it writes directly, as the whole stream's norm scales it.  A fused ``layer_norm`` or ``rms_norm`` is written
    out, its statistics detached alike.  Any module whose first input stands for a sum of parts freezes alike
    (an attention layer's write region, from its core's output: ``rewrite.SourceWrites``); its other inputs are
    constants of the run.  ``reading`` names what it is, for a refusal.

    Returns the module and whether it is affine in the stream: true unless the readout computes an elementwise
    function of it beside the norm's statistics — Gemma 2's soft-capping ``tanh``, the activation of a prediction
    head before the norm (ModernBERT's decoder) — which the derivative then takes to first order at the whole stream.
    What mixes a row's values other than a norm (a softmax over the features) is refused."""
    graph, env = Graph(), {}
    stream = next(iter(readout.graph.find_nodes(op="placeholder")))
    dependent, affine = {stream}, {stream}  # nodes computed from the stream, and those of them affine in it
    for node in readout.graph.nodes:
        env[node] = graph.node_copy(node, env.__getitem__)
        read = [a for a in node.all_input_nodes if a in dependent]
        if node.op != "call_function" or not read or node.target is aten.sym_size.int:
            continue
        elif node.target in FUSED_NORMS:
            graph.erase_node(env[node])
            env[node] = _written_out(graph, FusedNorm.of(node), env)
            dependent.add(node)
            if read[0] in affine:
                affine.add(node)
        elif _affine(node, dependent) and all(a in affine for a in read):
            dependent.add(node)
            affine.add(node)
        elif _statistic(node):
            env[node] = graph.call_function(aten.detach.default, (env[node],))
        elif (_affine(node, dependent) and node.target not in REDUCTIONS
              or torch.Tag.pointwise in getattr(node.target, "tags", ())):
            dependent.add(node)  # taken to first order
        else:
            raise DecompositionError(model_name, node, f"{reading} mixes a row's values in a way that is neither a "
                                     "statistic of the row nor elementwise, so it cannot be frozen for direct logit "
                                     "attribution (the logit lens, logit_lens, still reads the nodes)")
    output = next(iter(readout.graph.find_nodes(op="output")))
    return GraphModule(readout, graph), all(n in affine for n in output.all_input_nodes)


def _affine(node: Node, dependent: set[Node]) -> bool:
    """Whether ``node``'s output is affine in its arguments computed from the stream (``dependent``)."""
    at = [i for i, a in enumerate(node.args) if isinstance(a, Node) and a in dependent]
    if node.target in VIEWS:  # type_as reads its second argument's dtype alone
        return at[:1] == [0] and (len(at) == 1 or node.target is aten.type_as.default)
    if node.target in SUMS:
        return True
    return node.target in PRODUCTS and len(at) == 1 and at[0] in PRODUCTS[node.target]


def _statistic(node: Node) -> bool:
    """Whether ``node`` holds one value per row of the stream: a reduction over its last dimension that keeps it,
    as a norm's does to broadcast back (one that drops it is refused, rather than guessed at)."""
    value = node.meta.get("val")
    return isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[-1] == 1


@dataclass(frozen=True)
class FusedNorm:
    """A fused ``layer_norm(x, shape, weight, bias, eps)`` or ``rms_norm(x, shape, weight, eps)`` call, read alike
    with torch's defaults filled in (LayerNorm's ε 1e-5; RMSNorm's the machine epsilon of its input's dtype), for
    the two places that take one apart: the readout frozen here, and a head's share of a norm in its write
    (``rewrite.linear_share``).  ``centre``: LayerNorm's, which removes the row's mean."""
    x: Node
    shape: list[int]
    weight: Node | None
    bias: Node | None
    eps: float
    centre: bool

    @classmethod
    def of(cls, node: Node) -> FusedNorm:
        bound = normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs
        eps = bound["eps"] if bound["eps"] is not None else torch.finfo(bound["input"].meta["val"].dtype).eps
        return cls(bound["input"], bound["normalized_shape"], bound["weight"], bound.get("bias"), eps,
                   node.target is aten.layer_norm.default)


def _written_out(graph: Graph, norm: FusedNorm, env: dict) -> Node:
    """``norm`` spelt out in ``graph`` (its arguments ``env``'s copies), the row's statistic — variance or mean
    square — detached."""
    x, weight, bias = map_arg((norm.x, norm.weight, norm.bias), env.__getitem__)
    dims = list(range(-len(norm.shape), 0))
    if norm.centre:
        spread = graph.call_function(aten.var.correction, (x, dims), {"correction": 0, "keepdim": True})
        x = graph.call_function(aten.sub.Tensor, (x, graph.call_function(aten.mean.dim, (x, dims, True))))
    else:
        spread = graph.call_function(aten.mean.dim, (graph.call_function(aten.mul.Tensor, (x, x)), dims, True))
    rstd = graph.call_function(aten.rsqrt.default, (graph.call_function(aten.add.Tensor, (spread, norm.eps)),))
    out = graph.call_function(aten.mul.Tensor, (x, graph.call_function(aten.detach.default, (rstd,))))
    if weight is not None:
        out = graph.call_function(aten.mul.Tensor, (out, weight))
    return out if bias is None else graph.call_function(aten.add.Tensor, (out, bias))


FUSED_NORMS = {aten.layer_norm.default, aten.rms_norm.default}
