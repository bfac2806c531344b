"""Masks over edges, and the one accumulation every patched run goes through.

A mask value m[u, d] = 1 lets downstream input d see upstream node u's output from the run being patched;
0 swaps in u's output from the other run (corrupted input, or an ablation value); values in between
interpolate, and everything is differentiable in m.  Because the residual stream is a sum,

    x_d = x_d(run) + Σ_u (1 − m[u, d]) · (a_u(other) − a_u(run)),

so a patched run costs one pass of the other input plus one pass of the patched input, whatever the mask.
``accumulate`` is the only place this sum is computed; on CUDA it runs the fused Triton kernels of
``fxcircuits.kernels`` (see ``products``).
"""
from __future__ import annotations

import importlib.util
from collections.abc import Callable, Mapping

import torch

from .circuit import Circuit
from .graph import CircuitGraph


class DeltaStore:
    """The rows ``a_u(other) − a_u(run)`` of one patched pass, written once, side by side, as the writers produce them.

    Each reader group needs all rows written before it; keeping them in one buffer lets ``accumulate`` do a
    single matrix product per group instead of re-concatenating the rows every time.  The store also keeps the
    running sum of its rows, which patching "everything but a circuit" needs for every group: extending the
    last group's sum costs one pass over the new rows instead of one over all of them."""

    def __init__(self, n_upstream: int):
        self.n_upstream, self.buffer, self.count = n_upstream, None, 0
        self.summed, self.sum = 0, None

    def extend(self, writes: list[torch.Tensor], others: list[torch.Tensor]) -> torch.Tensor:
        """Write ``other − write`` for the groups not seen yet; return the rows of all of ``writes``."""
        if self.buffer is None:
            self.buffer = writes[0].new_empty(self.n_upstream, *writes[0].shape[1:])
        first = 0
        with torch.no_grad():
            for write, other in zip(writes, others):
                n = write.shape[0]
                if first >= self.count:
                    torch.sub(other, write, out=self.buffer[first:first + n])
                first += n
        self.count = max(self.count, first)
        return self.buffer[:first]

    def rows_sum(self) -> torch.Tensor:
        """Σ of the rows written so far."""
        with torch.no_grad():
            if self.sum is None:
                self.sum = self.buffer[:self.count].sum(0)
            elif self.summed < self.count:
                self.sum = self.sum + self.buffer[self.summed:self.count].sum(0)
        self.summed = self.count
        return self.sum


def weighted_rows(weights: torch.Tensor, rows: torch.Tensor,
                  rows_sum: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
    """``out[d, n] = Σ_u weights[n, u, d] · rows[u, n]`` by the cheapest exact route.

    A circuit or a single-edge patch moves few edges (few non-zero weights); "patch everything but a circuit"
    keeps few (few weights below 1).  Both are summed entry by entry; only a dense mix pays for the full
    product, which costs n_upstream × n_readers × activations.  ``rows_sum`` gives Σ_u rows[u] [N, X] where the
    caller keeps it; the rows are summed here otherwise."""
    n_masks, n_up, n_readers = weights.shape
    if rows.is_cuda:  # CUDA's sparse products lack bf16; there the Triton kernels skip empty tiles instead
        return torch.einsum("nud,unx->dnx", weights, rows)
    sparse = weights.numel() // 10
    moved = torch.count_nonzero(weights).item()
    if moved <= sparse:
        return _sparse_sum(weights, rows)
    kept = torch.count_nonzero(weights != 1).item()
    if kept <= sparse:  # Σ_u w·row = Σ_u row − Σ_u (1 − w)·row
        total = rows_sum() if rows_sum is not None else rows.sum(0)
        return _sparse_sum(weights - 1, rows, total.reshape(rows.shape[1:]).expand(n_readers, *rows.shape[1:]))
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


class TorchProducts:
    """The three products of ``_Accumulate`` in torch, shaped as ``fxcircuits.kernels`` takes them.

    stream [N, X], keep [N, U, D], rows [U, N, X], grad [D, N, X] (N masks, U upstream nodes, D readers).
    ``rows_sum``: where the caller keeps Σ_u rows[u] (the patcher's ``DeltaStore`` does), a function giving it."""

    def __init__(self, rows_sum: Callable[[], torch.Tensor] | None = None):
        self.rows_sum = rows_sum

    def accumulate(self, stream: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """out[d, n] = stream[n] + Σ_u (1 − keep[n, u, d]) · rows[u, n], by ``weighted_rows``' cheapest route."""
        # the product is a fresh tensor of the output's size: adding in place spares another large allocation
        return weighted_rows((1 - keep).to(rows.dtype), rows, self.rows_sum).add_(stream)

    @staticmethod
    def grad_keep(rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """grad_keep[n, u, d] = − Σ_x rows[u, n, x] · grad[d, n, x]: the EAP edge scores."""
        return -torch.einsum("unx,dnx->nud", rows, grad)

    @staticmethod
    def grad_rows(keep: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """grad_rows[u, n] = Σ_d (1 − keep[n, u, d]) · grad[d, n]: the forward's product with the mask transposed,
        so the same cheap routes apply (nothing to multiply where every edge is kept, as in attribution)."""
        return weighted_rows((1 - keep).transpose(1, 2).to(grad.dtype), grad)


def products(rows: torch.Tensor, rows_sum: Callable[[], torch.Tensor] | None = None):
    """Who computes the accumulation: ``fxcircuits.kernels`` (fused Triton) for CUDA tensors of a dtype they
    read, else ``TorchProducts`` — always on CPU, where its sparse routes are the fast path.

    Triton is optional (the ``triton`` extra): without it CUDA runs take the torch path.  With it installed, a
    failure to import or run the kernels is raised, never papered over by the slower path.  A benchmark
    compares the two paths by patching this function."""
    if not rows.is_cuda or importlib.util.find_spec("triton") is None:
        return TorchProducts(rows_sum)
    from .kernels import accumulate as kernels
    return kernels if rows.dtype in kernels.DTYPES else TorchProducts(rows_sum)


class _Accumulate(torch.autograd.Function):
    """``stream + Σ_u (1 − keep[u, d]) · rows_u`` with rows_u = other_u − write_u, and gradients for the stream,
    the mask, this run's writes and (where they need it) the other run's."""

    @staticmethod
    def forward(ctx, stream, keep, store, n_groups, *writes_and_others):
        n_masks, n_up, n_readers = keep.shape
        writes, others = writes_and_others[:n_groups], writes_and_others[n_groups:]
        rows = store.extend(writes, others)
        ctx.save_for_backward(keep)
        ctx.rows, ctx.sizes, ctx.products = rows, [w.shape[0] for w in writes], products(rows, store.rows_sum)
        ctx.other_shapes = [o.shape for o in others]
        ctx.moved = not bool((keep == 1).all())
        if not ctx.moved:  # every edge into these readers is kept: they all read the stream as it is
            return stream.expand(n_readers, *stream.shape)
        patched = ctx.products.accumulate(stream.reshape(n_masks, -1), keep, rows.reshape(n_up, n_masks, -1))
        return patched.reshape(n_readers, *stream.shape)

    @staticmethod
    def backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        n_masks, n_up, n_readers = keep.shape
        grad_rows = grad.reshape(n_readers, n_masks, -1)
        grad_keep, n_groups = None, len(ctx.sizes)
        if ctx.needs_input_grad[1]:
            grad_keep = ctx.products.grad_keep(ctx.rows.reshape(n_up, n_masks, -1), grad_rows).to(keep.dtype)
        grads = [None] * (2 * n_groups)
        # with every edge kept clean (attribution at the clean point) no row reaches the output: no product, and
        # no [n_up, rows] of zeros to allocate
        if any(ctx.needs_input_grad[4:]) and ctx.moved:
            flat = ctx.products.grad_rows(keep, grad_rows).reshape(n_up, *ctx.rows.shape[1:])
            for i, part in enumerate(flat.split(ctx.sizes)):
                if ctx.needs_input_grad[4 + i]:
                    grads[i] = -part
                if ctx.needs_input_grad[4 + n_groups + i]:
                    grads[n_groups + i] = part.sum_to_size(ctx.other_shapes[i])
        return (grad.sum(0), grad_keep, None, None, *grads)


def accumulate(store: DeltaStore, stream: torch.Tensor, writes: list[torch.Tensor], others: list[torch.Tensor],
               keep: torch.Tensor) -> torch.Tensor:
    """Inputs of a group of downstream readers.

    stream: the residual stream they read, any shape holding ``rows × …`` values (rows = n_masks · batch).
    writes: per upstream group written so far, this run's outputs, [n_nodes, rows, seq, d_model];
    others: the other run's outputs of the same groups, broadcastable to them.
    keep:   mask block [n_masks, n_upstream, n_readers] over those groups' nodes.
    Returns [n_readers, *stream.shape]: a view of ``stream`` where no edge into the readers is patched."""
    return _Accumulate.apply(stream, keep, store, len(writes), *writes, *others)


def mask_block(keep: torch.Tensor, n_upstream: int, first: int, last: int) -> torch.Tensor:
    """The rows of upstream nodes written so far and the columns of one group of readers."""
    return keep[:, :n_upstream, first:last]


class Tap:
    """Edge attribution at any point of a run: ``weight.grad[u, d] += Σ (a_u(clean) − a_u(other)) · ∂metric/∂x_d``.

    Gradient methods (EAP, EAP-IG, clean-corrupted) need the gradient of the metric with respect to every
    per-edge input x_d, at some point between the clean and the corrupted run, times each upstream node's
    clean-vs-other difference.  A tap sits on every group of readers in the patcher: the identity going forward,
    it adds that product to ``weight.grad`` going backward, so one backward pass scores every edge and no
    gradient of size [n_downstream, batch, seq, d_model] is ever kept.

    delta: ``a(other) − a(clean)`` per upstream node, [n_upstream, batch, seq, d_model] — the run may hold several
    points of one batch side by side (masks × batch rows); their gradients are summed."""

    def __init__(self, delta: torch.Tensor, n_downstream: int):
        self.delta = delta.detach()
        self.weight = torch.zeros(delta.shape[0], n_downstream, device=delta.device, requires_grad=True)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, delta):
        ctx.delta, ctx.weight_dtype = delta, weight.dtype
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad):
        n_up, n_readers = ctx.delta.shape[0], grad.shape[0]
        rows = ctx.delta.reshape(n_up, 1, -1)
        summed = grad.reshape(n_readers, -1, rows.shape[-1]).sum(1, keepdim=True).to(rows.dtype)
        return grad, products(rows).grad_keep(rows, summed)[0].to(ctx.weight_dtype), None


def tap(t: Tap | None, inputs: torch.Tensor, n_upstream: int, first: int, last: int) -> torch.Tensor:
    """The readers ``first:last`` through ``t`` (see ``Tap``); unchanged when there is no tap."""
    if t is None:
        return inputs
    return _Tap.apply(inputs, t.weight[:n_upstream, first:last], t.delta[:n_upstream])


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
