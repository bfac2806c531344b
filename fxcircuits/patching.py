"""Masks over edges, and the one accumulation every patched run goes through.

A mask value m[u, d] = 1 lets downstream input d see upstream node u's output from the run being patched;
0 swaps in u's output from the other run (corrupted input, or an ablation value); values in between
interpolate, and everything is differentiable in m.  Because the residual stream is a sum,

    x_d = x_d(run) + Σ_u (1 − m[u, d]) · (a_u(other) − a_u(run)),

so a patched run costs one pass of the other input plus one pass of the patched input, whatever the mask.
``accumulate`` is the only place this sum is computed; a fused kernel can replace its body.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch

from .graph import Circuit, CircuitGraph


class DeltaStore:
    """The rows ``a_u(other) − a_u(run)`` of one patched pass, kept side by side as they are produced.

    Each reader group needs all rows written before it; keeping them in one buffer lets ``accumulate`` do a
    single matrix product per group instead of re-concatenating the rows every time."""

    def __init__(self, n_upstream: int):
        self.n_upstream, self.buffer, self.count = n_upstream, None, 0

    def extend(self, deltas: list[torch.Tensor]) -> torch.Tensor:
        """Copy in the groups not seen yet; return the rows of all of ``deltas``."""
        if self.buffer is None:
            self.buffer = deltas[0].new_empty(self.n_upstream, *deltas[0].shape[1:])
        total = sum(d.shape[0] for d in deltas)
        with torch.no_grad():
            first = 0
            for delta in deltas:
                n = delta.shape[0]
                if first >= self.count:
                    self.buffer[first:first + n] = delta
                first += n
        self.count = max(self.count, total)
        return self.buffer[:total]


def weighted_rows(weights: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``out[d, n] = Σ_u weights[n, u, d] · rows[u, n]`` by the cheapest exact route.

    A circuit or a single-edge patch moves few edges (few non-zero weights); "patch everything but a circuit"
    keeps few (few weights below 1).  Both are summed entry by entry; only a dense mix pays for the full
    product, which costs n_upstream × n_readers × activations."""
    n_masks, n_up, n_readers = weights.shape
    sparse = weights.numel() // 10
    moved = torch.count_nonzero(weights).item()
    if moved <= sparse:
        return _sparse_sum(weights, rows)
    kept = torch.count_nonzero(weights != 1).item()
    if kept <= sparse:  # Σ_u w·row = Σ_u row − Σ_u (1 − w)·row
        return _sparse_sum(weights - 1, rows, rows.sum(0).expand(n_readers, *rows.shape[1:]))
    return torch.einsum("nud,unx->dnx", weights, rows)


def _sparse_sum(weights: torch.Tensor, rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The same product with the weights as a sparse block-diagonal matrix [masks·readers, masks·upstream]."""
    n_masks, n_up, n_readers = weights.shape
    n, d, u = weights.transpose(1, 2).nonzero(as_tuple=True)  # sorted by (mask, reader, upstream): coalesced
    matrix = torch.sparse_coo_tensor(torch.stack([n * n_readers + d, n * n_up + u]), weights[n, u, d],
                                     (n_masks * n_readers, n_masks * n_up), is_coalesced=True, check_invariants=False)
    product = torch.sparse.mm(matrix, rows.transpose(0, 1).reshape(n_masks * n_up, -1))
    product = product.reshape(n_masks, n_readers, -1).transpose(0, 1)
    return product if out is None else product.add_(out)  # product is fresh: add in place


class _Accumulate(torch.autograd.Function):
    """``stream + Σ_u (1 − keep[u, d]) · delta_u`` with gradients for the stream, the mask and every delta."""

    @staticmethod
    def forward(ctx, stream, keep, rows, *deltas):
        n_masks, n_up, n_readers = keep.shape
        weights = (1 - keep).to(rows.dtype)
        patched = weighted_rows(weights, rows.reshape(n_up, n_masks, -1))
        ctx.save_for_backward(keep)
        ctx.rows, ctx.sizes = rows, [d.shape[0] for d in deltas]
        # ``patched`` is a fresh tensor of the output's size: adding in place spares another large allocation
        return patched.reshape(n_readers, *stream.shape).add_(stream)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        n_masks, n_up, n_readers = keep.shape
        grad_rows = grad.reshape(n_readers, n_masks, -1)
        grad_keep = grad_deltas = None
        if ctx.needs_input_grad[1]:
            rows = ctx.rows.reshape(n_up, n_masks, -1)
            grad_keep = -torch.einsum("unx,dnx->nud", rows, grad_rows).to(keep.dtype)
        if any(ctx.needs_input_grad[3:]):
            weights = (1 - keep).to(grad.dtype)
            flat = torch.einsum("nud,dnx->unx", weights, grad_rows).reshape(n_up, *ctx.rows.shape[1:])
            grad_deltas = flat.split(ctx.sizes)
        return (grad.sum(0), grad_keep, None, *(grad_deltas or [None] * len(ctx.sizes)))


def accumulate(store: DeltaStore, stream: torch.Tensor, deltas: list[torch.Tensor], keep: torch.Tensor) -> torch.Tensor:
    """Inputs of a group of downstream readers.

    stream: the residual stream they read, any shape holding ``rows × …`` values (rows = n_masks · batch).
    deltas: per upstream group written so far, ``a(other) − a(run)`` of shape [n_nodes, rows, seq, d_model].
    keep:   mask block [n_masks, n_upstream, n_readers] over those groups' nodes.
    Returns [n_readers, *stream.shape]."""
    return _Accumulate.apply(stream, keep, store.extend(deltas), *deltas)


def mask_block(keep: torch.Tensor, n_upstream: int, first: int, last: int) -> torch.Tensor:
    """The rows of upstream nodes written so far and the columns of one group of readers."""
    return keep[:, :n_upstream, first:last]


def edge_vector(graph: CircuitGraph, edge_mask) -> torch.Tensor:
    """An ``edge_mask`` given as tensor, ``{edge: value}`` dict or ``Circuit`` → tensor [E] or [N, E]."""
    if isinstance(edge_mask, Circuit):
        return edge_mask.edge_mask(graph)
    if not isinstance(edge_mask, (Mapping, torch.Tensor)):
        raise TypeError("edge_mask must be a tensor, a dict of edge names or a Circuit, "
                        f"not {type(edge_mask).__name__}")
    return _vector(edge_mask, graph.edge_index, "edge", "cm.graph.edges")


def node_vector(graph: CircuitGraph, node_mask) -> torch.Tensor:
    """A ``node_mask`` given as tensor [U] / [N, U] over upstream nodes, or ``{node: value}`` dict."""
    return _vector(node_mask, graph.node_index, "node", "cm.graph.upstream")


def _vector(mask, index: dict[str, int], what: str, listing: str) -> torch.Tensor:
    """A mask by name (missing names = 1) or by position, checked against the ``index`` it refers to."""
    if isinstance(mask, Mapping):
        unknown = [name for name in mask if name not in index]
        if unknown:
            raise KeyError(f"unknown {what} name(s) {unknown[:3]}; names look like {next(iter(index))!r} — "
                           f"see {listing}")
        vector = torch.ones(len(index))
        for name, value in mask.items():
            vector[index[name]] = float(value)
        return vector
    if mask.dim() not in (1, 2) or mask.shape[-1] != len(index):
        raise ValueError(f"{what}_mask has shape {tuple(mask.shape)}; expected [{len(index)}] (one value per {what} "
                         f"in {listing} order) or [n_masks, {len(index)}]")
    return mask


def dense_keep(graph: CircuitGraph, edge_mask=None, node_mask=None, *, device=None) -> torch.Tensor:
    """Edge and node masks combined into the [n_masks, n_upstream, n_downstream] block ``accumulate`` reads.

    A node mask multiplies the mask of every edge leaving that node.  Pairs that are not edges stay 1."""
    edges = torch.ones(len(graph.edges), device=device) if edge_mask is None else edge_vector(graph, edge_mask)
    edges = edges.to(device) if edges.is_floating_point() else edges.to(device, torch.float32)
    if node_mask is not None:
        edges = edges * node_vector(graph, node_mask).to(edges)[..., graph.src.to(edges.device)]
    edges = edges.reshape(-1, len(graph.edges))
    if not torch.isfinite(edges).all():
        raise ValueError("edge/node mask contains NaN or infinite values")
    keep = edges.new_ones(edges.shape[0], len(graph.upstream), len(graph.downstream))
    src, dst = graph.src.to(edges.device), graph.dst.to(edges.device)
    return keep.index_put((torch.arange(edges.shape[0], device=edges.device)[:, None], src, dst), edges)
