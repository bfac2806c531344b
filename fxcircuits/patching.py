"""Masks over edges, and the one accumulation every patched run goes through.

A mask value m[u, d] = 1 lets downstream input d see upstream node u's output from the run being patched;
0 swaps in u's output from the other run (corrupted input, or an ablation value); values in between
interpolate, and everything is differentiable in m.  Because the residual stream is a sum,

    x_d = x_d(run) + Σ_u (1 − m[u, d]) · (a_u(other) − a_u(run)),

so a patched run costs one pass of the other input plus one pass of the patched input, whatever the mask.
``accumulate`` is the only place this sum is computed; on CUDA it runs the fused Triton kernels of
``fxcircuits.kernels`` (see ``products``).  A mask may apply at some positions alone, weights w[p] per prompt
(``position_weights``): then each difference is weighted by w at its position as it is stored (``DeltaStore``),
and x_d[p] = x_d(run)[p] + Σ_u (1 − m[u, d]) · w[p] · (a_u(other)[p] − a_u(run)[p]).  A positional mask holds one
mask per class of positions, each with its weights (``mask_weights``): the sum then runs over the classes too, and
an edge may be kept at some tokens and patched at others in one run (``fxcircuits.positional``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import itertools
import math
import threading
import warnings
from collections.abc import Callable, Iterator, Mapping

import torch

from . import heads
from .circuit import Circuit
from .graph import CircuitGraph
from .metrics import wide_dtype


class DeltaStore:
    """The rows ``a_u(other) − a_u(run)`` of one patched pass, written once, side by side, as writers produce them.

    Each reader group needs the rows written before it; keeping them in one buffer lets ``accumulate`` do a
    single matrix product per group instead of re-concatenating the rows every time.  Only the groups with an
    edge the mask moves (keep ≠ 1) are stored — all of them where the mask needs a gradient — so a single-edge
    patch writes one group's rows, not the model's.  The store also keeps the running sum of its rows, which
    patching "everything but a circuit" needs for every reader group.

    A dense mask's product is bound by arithmetic, and a matrix product with few readers (an MLP's one, a
    layer's 3·heads) runs at half the speed of one with more; an MLP's one reader also reads every row for a
    single output.  So a dense product serves the next groups' readers too, over the rows written so far
    (``carried``), and those groups add only the rows written since.

    keep: the whole mask [n_masks, n_upstream, n_downstream]; sizes: the upstream groups' sizes, in order;
    readers: the reader groups' sizes, in order; reads: how many upstream nodes each reader group reads;
    scratch: where the rows may be written when no gradient will read them back (``Scratch``), or None;
    ahead: whether the other run rides in the same pass, as the batch's first rows (``accumulate``);
    prefix: whether the masks share the layers before the first reader any of them moves: the pass runs them on
    one copy of the batch and widens to every mask's rows at that reader group, ``widen_at`` (``fxcircuits.prefix``).
    Writes of that one copy then serve every mask's rows here, as one batch of the other run does;
    where: the positions each mask patches, [n_masks, classes, batch, seq] (``position_weights``), or None for all
    of them.  The rows are weighted by it as they are written, so every sum over them — products, carried sums, the
    rows' sum — and the mask's gradient see the edges patched there alone.

    A mask may also hold one block per class of positions, keep [n_masks, classes, n_upstream, n_downstream] with
    ``where`` saying where each applies (``mask_weights``): an edge kept at some tokens and patched at others, as a
    positional circuit is.  Because x_d[p] = x_d(run)[p] + Σ_s Σ_u (1 − m_s[u, d]) · w_s[p] · δ_u[p], each node
    then writes one row per class, its difference weighted by that class's positions, and the classes' blocks are
    the mask over those rows: every product, route and gradient below runs unchanged on them.  The rows lie group by
    group, and within a group class by class (``_by_group``); ``sizes`` and ``starts`` count rows.  Where the
    classes lie apart, as spans do, the dense products multiply each class's rows at its own positions alone
    (``partition``, a ``Partition``), so that they cost what one class would."""

    def __init__(self, keep: torch.Tensor, sizes: list[int], readers: list[int], reads: list[int],
                 scratch: Scratch | None = None, ahead: bool = False, prefix: bool = False,
                 where: torch.Tensor | None = None):
        self.classes = 1 if keep.dim() == 3 else keep.shape[1]
        if keep.dim() == 4:
            if where is None:
                raise ValueError("a mask with one block per class of positions needs the classes' positions: pass "
                                 "their weights (mask_positions)")
            keep = _by_group(keep, sizes)
        sizes = [n * self.classes for n in sizes]
        self.scratch = None if torch.is_grad_enabled() else scratch  # a backward pass reads the rows after the run
        if ahead and torch.is_grad_enabled():
            raise RuntimeError("a patched pass that runs the other run alongside takes no gradient: run it under "
                               "torch.no_grad(), or record the other run first and pass its outputs")
        self.ahead, self.blocks = ahead, keep.shape[0] + 1  # blocks of rows where the other run rides ahead
        detached = keep.detach()
        change, moved_into, moved_from, alike = _summary(detached)
        self.keep, self.moved_into = keep, moved_into
        self.sizes, self.starts = sizes, list(itertools.accumulate(sizes, initial=0))
        self.stored = [keep.requires_grad or any(moved_from[f:f + n]) for f, n in zip(self.starts, sizes)]
        nodes = [u for f, n, kept in zip(self.starts, sizes, self.stored) if kept for u in range(f, f + n)]
        self.n_stored = len(nodes)
        # the stored rows' mask, [n_masks, n_stored, readers], and 1 − that where the summary found it (``_weights``)
        self.block, self.weights = detached, change
        if self.n_stored < keep.shape[1]:
            index = torch.tensor(nodes, dtype=torch.long, device=keep.device)
            self.block, self.weights = detached.index_select(1, index), None
        self.alike_to = _runs(alike)
        self.readers, self.reads = readers, reads
        self.buffer, self.count, self.groups = None, 0, 0
        self.summed, self.sum = 0, None
        self.ends = list(itertools.accumulate(readers))
        self.carry: tuple[int, int, int, torch.Tensor] | None = None  # readers first:last, over rows :count, sums
        self.widen_at = self._first_moved_group() if prefix else None
        self.where = where
        self.partition = None if where is None else Partition.of(where, sizes, self.stored)

    def _first_moved_group(self) -> int:
        """The first reader group into which some mask moves an edge (the last, the logits, where none does)."""
        starts = [0] + self.ends[:-1]
        moved = (g for g, (s, e) in enumerate(zip(starts, self.ends)) if any(self.moved_into[s:e]))
        return next(moved, len(self.ends) - 1)

    def stores(self, group: int) -> bool:
        """Whether the pass reads upstream group ``group``'s writes apart (else only their sum, in the stream)."""
        return self.stored[group]

    def moves(self, first: int, last: int) -> bool:
        """Whether the mask moves any edge into readers ``first:last``."""
        return any(self.moved_into[first:last])

    def extend(self, writes: list[torch.Tensor], others: list[torch.Tensor], size: int) -> torch.Tensor:
        """Write ``other − write`` for the stored groups not seen yet; ``size``: how many values one mask's rows of
        one node hold.  Returns the stored rows so far (their upstream nodes are ``nodes[:len(rows)]``)."""
        with torch.no_grad():
            for write, other in zip(writes[self.groups:], others[self.groups:]):
                if self.stored[self.groups]:
                    other, write = self._by_block(write, other, size)
                    n, masks = write.shape[0], self.keep.shape[0]
                    dtype = torch.promote_types(write.dtype, other.dtype)
                    if self.buffer is None:  # pages of rows never written are never touched
                        shape, fresh = (self.n_stored, masks * write.shape[2], *write.shape[3:]), self.scratch is None
                        self.buffer = (write.new_empty(shape, dtype=dtype) if fresh
                                       else self.scratch.take(write, shape, "rows", dtype))
                    self.widen(dtype)
                    rows = n * self.classes
                    out = self.buffer[self.count:self.count + rows].view(self.classes, n, masks, *write.shape[2:])
                    first = out[0]
                    torch.sub(other, write if write.shape == first.shape else write.expand(first.shape), out=first)
                    if self.where is not None:  # each class's rows [n, n_masks, …] as ``at_where`` reads them
                        for c in range(self.classes - 1, -1, -1):  # the first class's rows, read by all, weighted last
                            at_where(first, self.where[:, c], out[c])
                    self.count += rows
                self.groups += 1
        return self.rows()

    def _by_block(self, write: torch.Tensor, other: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """One group's outputs in the other run and in this one as [n, 1 or n_masks, rows of one mask, …]: the
        batch's rows lie mask after mask (``CircuitModel.patched``), and one batch of either run, with a single
        block, serves every mask — the other run's, and this run's writes in a prefix the masks share.  Where
        the other run rides in the same pass, its block leads this run's writes (``accumulate``)."""
        blocks = math.prod(write.shape[1:]) // size
        write = write.unflatten(1, (blocks, -1))
        if self.ahead:
            return tuple(write.split([1, blocks - 1], 1))
        per_mask = write.shape[2]
        return (other.unsqueeze(1) if other.shape[1] in (1, per_mask) else other.unflatten(1, (-1, per_mask))), write

    def rows(self) -> torch.Tensor:
        """The rows stored so far, [nodes, n_masks · rows of one mask, …]."""
        return self.buffer[:self.count] if self.buffer is not None else self.keep.new_empty(0)

    def widen(self, dtype: torch.dtype) -> torch.Tensor:
        """The rows so far, held from now on in ``dtype`` where that is wider than theirs.  A model may keep its
        stream wider than its layers compute (Ergo: a float32 stream in a bf16 model, whose embedding is bf16 and
        whose layers' writes are normed in float32): the stream sums in the wider dtype, and so do the rows."""
        if self.buffer is not None and torch.promote_types(self.buffer.dtype, dtype) != self.buffer.dtype:
            self.buffer = self.buffer.to(dtype)
            self.carry, self.sum, self.summed = None, None, 0  # sums of the narrower rows: summed again
        return self.rows()

    def alike(self, first: int, last: int) -> bool:
        """Whether the mask weights the edges into readers ``first:last`` alike, so that they all see one value."""
        return self.alike_to[first] >= last - 1

    def wholly_patched(self, first: int, last: int) -> tuple[int, ...]:
        """Readers among ``first:last`` (counted from ``first``) each of whose edges every mask patches fully."""
        return tuple(d - first for d in range(first, last) if self.wholly[d])

    @functools.cached_property
    def wholly(self) -> list[bool]:
        """Per reader, whether every mask patches each of its edges fully; found on first use, as only runs that
        recorded their other run and need no gradient ask.  None does where the masks patch some positions alone:
        the reader then reads the other run's stream at those positions only."""
        if self.where is not None:
            return [False] * sum(self.readers)
        return _wholly_patched(self.keep.detach(), self.readers, self.reads)

    def carried(self, first: int, last: int, stream: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """``stream + Σ_u (1 − keep[u, d]) · rows[u]`` for readers ``first:last`` [readers, n_masks, X], through a
        dense product over the rows so far that also serves the dense groups after them (up to ``CARRIED``
        readers), then only the rows written since.  None where a sparse route is the cheaper one."""
        if self.carry is None or not self.carry[0] <= first < last <= self.carry[1]:
            if not self._dense(first, last, rows):
                return None
            ahead = last  # the next groups whose own product is dense, up to CARRIED readers in all
            for end in (e for e in self.ends if e > last):
                if ahead - first >= CARRIED or not self._dense(ahead, end, rows):
                    break
                ahead = end
            if ahead == last:
                return None
            self.carry = first, ahead, len(rows), self._sums(first, ahead, rows)
        start, _, count, sums = self.carry
        sums = sums[first - start:last - start]
        if count == len(rows):
            return sums + stream
        since = None if self.partition is None else self.partition.after(count)
        return weighted_rows(self._weights(count, len(rows), first, last, rows), rows[count:], stream,
                             partition=since).add_(sums)

    def _sums(self, first: int, last: int, rows: torch.Tensor) -> torch.Tensor:
        """``carried``'s dense product over the rows so far for readers ``first:last``, written into the scratch where
        there is one (``Scratch``: fresh memory this size is mapped afresh by the OS every time).  Each product
        replaces the one before, which no reader holds: ``carried`` hands out sums computed from it, never views."""
        weights = self._weights(0, len(rows), first, last, rows)
        shape = last - first, weights.shape[0], rows.shape[2]
        out = None if self.scratch is None else self.scratch.take(rows, shape, "sums")
        return _dense_rows(weights, rows, out=out, partition=self.partition)

    def _weights(self, start: int, stop: int, first: int, last: int, rows: torch.Tensor) -> torch.Tensor:
        """1 − keep over stored rows ``start:stop`` and readers ``first:last``, as ``weighted_rows`` takes it."""
        if self.weights is None:
            self.weights = 1 - self.block
        if self.weights.dtype != rows.dtype:
            self.weights = self.weights.to(rows.dtype)
        return self.weights[:, start:stop, first:last]

    def _dense(self, first: int, last: int, rows: torch.Tensor) -> bool:
        """Whether readers ``first:last`` would take the dense product over the rows stored so far."""
        return _route(self._weights(0, len(rows), first, last, rows), rows, True, self.partition) == "dense"

    def rows_sum(self) -> torch.Tensor:
        """Σ of the rows stored so far."""
        with torch.no_grad():
            if self.sum is None:
                self.sum = self.buffer[:self.count].sum(0)
            elif self.summed < self.count:
                self.sum = self.sum + self.buffer[self.summed:self.count].sum(0)
        self.summed = self.count
        return self.sum


def _by_group(keep: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """A mask with one block per class of positions, [n_masks, classes, n_upstream, readers], as the rows of
    ``DeltaStore`` lie: [n_masks, classes · n_upstream, readers], group after group, and within a group each class's
    block of its nodes in turn — so that a group's rows, for every class, are written and read together."""
    n_masks, classes, n_up, readers = keep.shape
    order = [c * n_up + start + i for start, n in zip(itertools.accumulate(sizes, initial=0), sizes)
             for c in range(classes) for i in range(n)]
    return keep.reshape(n_masks, classes * n_up, readers).index_select(1, torch.tensor(order, device=keep.device))


def _unweighted(grad: torch.Tensor, where: torch.Tensor | None) -> torch.Tensor:
    """The gradient [classes · n, …] of one group's rows, class by class (``DeltaStore``), as the gradient [n, …]
    of the group's difference they were weighted from: Σ_c where[:, c] · grad of class c's rows."""
    if where is None:
        return grad
    by_class = grad.unflatten(0, (where.shape[1], -1))
    return sum(at_where(by_class[c], where[:, c]) for c in range(where.shape[1]))


def at_where(rows: torch.Tensor, where: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows`` [n, n_masks · batch or n_masks, …] — each mask's values in prompt, position, feature order — each
    weighted by ``where`` [n_masks, batch, seq] at its prompt and position: the rows of masks that patch some
    positions alone (``DeltaStore``).  Into ``out`` where given (``rows`` itself, in place)."""
    shaped = rows.reshape(rows.shape[0], *where.shape, -1)
    weights = where.to(rows.dtype).unsqueeze(-1)
    if out is None:
        return (shaped * weights).view(rows.shape)
    torch.mul(shaped, weights, out=out.view(shaped.shape))
    return out


class Partition:
    """The classes of a positional mask whose positions lie apart — no position in two classes — alike in every
    mask of the call, as a task's spans are.  Each class's rows (``DeltaStore``) are then zero outside its own
    positions, so a product over the rows need multiply each class's rows at its positions alone: the arithmetic
    of one product for all the classes, where the rows as they lie cost one product per class.  Each class keeps
    its rows at its positions in a block of its own, copied from the rows group by group when a product first
    reads them (``_fill``), so that products read them where they lie rather than gather them every time, and a
    pass whose routes are all sparse (a circuit's) never copies them.

    points: a mask's positions, batch · seq; positions: per class, its own among them, and weights: its weights
    there; rows: per class, its rows among the stored rows (which lie group by group and within a group class by
    class), one for each stored node in their order; groups: per stored group, its first row, its first node and
    its nodes; none: the positions of no class (where every edge is kept: padding, or a part of the prompt no class
    names); own: per class, its rows at its positions, [n_masks, nodes, positions, features], and filled: per
    group, whether they hold its rows yet.  A product reads the rows from the first stored row up to a group's end,
    or (``after``) from a group's start; ``after``'s partitions share ``own`` and ``filled``."""

    def __init__(self, points: int, positions: list[torch.Tensor], weights: list[torch.Tensor], none: torch.Tensor,
                 rows: list[torch.Tensor], groups: list[tuple[int, int, int]],
                 own: list[torch.Tensor | None] | None = None, filled: list[bool] | None = None, first: int = 0):
        self.points, self.positions, self.weights, self.none = points, positions, weights, none
        self.rows, self.groups, self.first = rows, groups, first
        self.own = [None] * len(rows) if own is None else own
        self.filled = [False] * len(groups) if filled is None else filled

    @classmethod
    def of(cls, where: torch.Tensor, sizes: list[int], stored: list[bool]) -> Partition | None:
        """The partition of ``where`` [n_masks, classes, batch, seq] over the groups of ``sizes`` rows that are
        ``stored``; None where there is one class, the classes share a position or differ between masks, or the
        device launches operations dearer than it multiplies (``heads.launch_bound``: a product per class)."""
        n_masks, classes = where.shape[:2]
        if classes == 1 or heads.launch_bound(where.device):
            return None
        first = where[0].reshape(classes, -1)
        alike = n_masks == 1 or where.stride(0) == 0 or torch.equal(where, where[:1].expand_as(where))
        if not alike or (first != 0).sum(0).max() > 1:
            return None
        nodes = [n // classes for n, kept in zip(sizes, stored) if kept]
        starts = itertools.accumulate((n * classes for n in nodes), initial=0)
        groups = list(zip(starts, itertools.accumulate(nodes, initial=0), nodes))
        rows = [torch.tensor([start + c * n + i for start, _, n in groups for i in range(n)], dtype=torch.long,
                             device=where.device) for c in range(classes)]
        positions = [row.nonzero().squeeze(1) for row in first]
        weights, none = [row[at] for row, at in zip(first, positions)], (first == 0).all(0).nonzero().squeeze(1)
        return cls(first.shape[1], positions, weights, none, rows, groups)

    def after(self, start: int) -> Partition:
        """The partition of the stored rows from ``start`` (a group's first row) on, counted from there."""
        classes = len(self.rows)
        rows = [rows[start // classes:] - start for rows in self.rows]
        return Partition(self.points, self.positions, self.weights, self.none, rows, self.groups, self.own,
                         self.filled, self.first + start // classes)

    def _fill(self, rows: torch.Tensor) -> None:
        """Copy each class's rows at its positions from ``rows`` [R, n_masks, X] (the stored rows from this
        partition's first on) for the groups among them not copied yet.  The copies take the rows' dtype, which
        widens where the stream is wider than the writes so far (``DeltaStore.widen``)."""
        classes, n_masks = len(self.rows), rows.shape[1]
        self.own[:] = [own if own is None or own.dtype == rows.dtype else own.to(rows.dtype) for own in self.own]
        for g, (start, node, n) in enumerate(self.groups):
            start -= self.first * classes
            if self.filled[g] or start < 0 or start + n * classes > len(rows):
                continue
            by_class = rows[start:start + n * classes].view(classes, n, n_masks, self.points, -1)
            for c, at in enumerate(self.positions):
                if self.own[c] is None:
                    nodes = sum(size for _, _, size in self.groups)
                    self.own[c] = rows.new_empty(n_masks, nodes, len(at), by_class.shape[-1])
                self.own[c][:, node:node + n] = by_class[c].index_select(2, at).transpose(0, 1)
            self.filled[g] = True

    def _classes(self, n_rows: int) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """For each class with positions: the class, its rows among the first ``n_rows`` (a group's end), its
        positions and its weights there."""
        for c, (rows, at, weight) in enumerate(zip(self.rows, self.positions, self.weights)):
            if len(at):
                yield c, rows[:n_rows // len(self.rows)], at, weight

    def _own(self, c: int, n: int) -> torch.Tensor:
        """Class ``c``'s rows at its positions for this partition's first ``n`` nodes, [n_masks, n, positions ·
        features]."""
        return self.own[c][:, self.first:self.first + n].flatten(2)

    def _index(self, n_masks: int, rows: torch.Tensor, at: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The index of ``rows`` at positions ``at`` in values [R, n_masks, points, features], in the order
        [n_masks, rows, positions]."""
        masks = torch.arange(n_masks, device=rows.device)
        return rows[None, :, None], masks[:, None, None], at[None, None, :]

    def _by_point(self, values: torch.Tensor) -> torch.Tensor:
        """[R, n_masks, X] as [R, n_masks, points, features]."""
        return values.view(*values.shape[:2], self.points, -1)

    def dense(self, weights: torch.Tensor, rows: torch.Tensor, base: torch.Tensor | None,
              out: torch.Tensor | None) -> torch.Tensor:
        """``_dense_rows``: [d, n, x] = base[n, x] + Σ_u weights[n, u, d] · rows[u, n, x], written into ``out``
        [d, n, x] where given; weights [n, u, d], rows [u, n, x]."""
        n_masks, n_up, n_readers = weights.shape
        out = rows.new_empty(n_readers, n_masks, rows.shape[2]) if out is None else out
        if base is None:
            out.zero_()
        else:
            out.copy_(torch.broadcast_to(base, out.shape))
        spread = out.view(n_readers, n_masks, self.points, -1)
        self._fill(rows)
        for c, class_rows, at, _ in self._classes(n_up):
            own = self._own(c, len(class_rows))
            product = own.new_empty(n_readers, n_masks, own.shape[2])  # in the output's layout (``_dense_rows``)
            torch.bmm(weights.index_select(1, class_rows).transpose(1, 2), own, out=product.transpose(0, 1))
            spread.index_add_(2, at, product.view(n_readers, n_masks, len(at), -1))
        return out

    def grad_keep(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """``TorchProducts.grad_keep``: [n, u, d] = − Σ_x rows[u, n, x] · grad[d, n, x], each class's rows read
        from its own copy at its positions (``_fill``: copied from ``rows`` where a product has not yet)."""
        n_up, n_masks, n_readers = rows.shape[0], rows.shape[1], grad.shape[0]
        out = rows.new_zeros(n_masks, n_up, n_readers)
        readers = torch.arange(n_readers, device=rows.device)
        self._fill(rows)
        for c, class_rows, at, _ in self._classes(n_up):
            seen = self._by_point(grad)[self._index(n_masks, readers, at)]  # [n, readers, positions, features]
            own = self._own(c, len(class_rows))
            out.index_copy_(1, class_rows, -torch.bmm(own, seen.flatten(2).transpose(1, 2)))
        return out

    def grad_differences(self, weights: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """The gradient of the stored nodes' differences [nodes, n, x] — of which each class's rows are the
        weighted copies — from the gradient of the readers' sums, grad [d, n, x], and 1 − keep, weights
        [n, d, rows] (keep − 1 gives the writes' gradient: ``_writes_grad``): at each position,
        Σ_d weights[n, d, u] · grad[d, n, x] for u the row of its own class, times that class's weight there
        (``TorchProducts.grad_rows``' dense route and ``_unweighted`` in one)."""
        n_masks, n_readers, n_up = weights.shape
        nodes = n_up // len(self.rows)
        out = grad.new_empty(nodes, n_masks, grad.shape[2])
        self._by_point(out).index_fill_(2, self.none, 0)  # the classes' positions are all written below
        readers, every = (torch.arange(n, device=grad.device) for n in (n_readers, nodes))
        for _, class_rows, at, weight in self._classes(n_up):
            seen = self._by_point(grad)[self._index(n_masks, readers, at)]  # [n, readers, positions, features]
            product = torch.bmm(weights.index_select(2, class_rows).transpose(1, 2), seen.flatten(2))
            product = product.view(n_masks, nodes, len(at), -1).mul_(weight.to(product.dtype)[:, None])
            self._by_point(out)[self._index(n_masks, every, at)] = product
        return out


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The gradient [n, n_masks·batch, …] of a tensor of ``shape`` that served every mask's rows: summed over the
    masks where it holds one batch for all (``DeltaStore._by_block``), else over the axes it was broadcast along."""
    if shape[1] not in (1, grad.shape[1]):
        grad = grad.reshape(grad.shape[0], -1, shape[1], *grad.shape[2:]).sum(1)
    return grad.sum_to_size(shape)


class Scratch:
    """Memory for the rows of patched runs on CPU, and for their dense products, kept from one run to the next.

    The rows take tens of MB (SmolLM2 on 8 prompts: 78 MB), a dense product 29 MB.  The C allocator hands a buffer
    that large back to the OS when it is freed, so every run paid for mapping them afresh: about 20,000 page
    faults for the rows (2–6% of a patched pass) and 7,000 per product (80 ms of system time in a dense run).
    CUDA's caching allocator keeps freed memory already, so runs on a GPU never use this.  A run that needs a
    gradient keeps its rows for the backward pass and gets its own memory; so does a run that starts while another
    holds this one (``lend``).  ``clear()`` frees it."""

    def __init__(self):
        self._buffers: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def lend(self) -> Iterator[Scratch | None]:
        """This scratch for the length of one run, or None where another run holds it."""
        if not self._lock.acquire(blocking=False):
            yield None
            return
        try:
            yield self
        finally:
            self._lock.release()

    def take(self, like: torch.Tensor, shape: tuple[int, ...], use: str,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """A tensor of ``shape`` with ``like``'s device and dtype (or ``dtype``), in the memory kept for ``use`` where
        it fits (else fresh).  Each use has its own memory: what one holds is never overwritten by another."""
        dtype = dtype or like.dtype
        if like.device.type != "cpu":
            return like.new_empty(shape, dtype=dtype)
        size = math.prod(shape)
        held = self._buffers.get(use)
        if held is None or held.numel() < size or held.dtype != dtype or held.device != like.device:
            with torch.inference_mode(False):  # memory made under inference mode could not be written outside it
                self._buffers[use] = held = like.new_empty(size, dtype=dtype)
        return held[:size].view(shape)

    def clear(self) -> None:
        self._buffers.clear()


CARRIED = 100  # readers a dense product serves at once (see DeltaStore); measured best among 56, 100 and 200


def _dense_cost(n_masks: int, n_up: int, n_readers: int) -> float:
    """What a dense product costs on CPU, in entries of a sparse one (each reads its row once): about half a row
    per row for one reader, up to five for ten readers and more, where the product is bound by arithmetic
    (measured at SmolLM2's shapes; it only picks the route — every route gives the same numbers)."""
    return n_masks * n_up * min(5.0, max(0.5, n_readers / 2))


def _route(weights: torch.Tensor, rows: torch.Tensor, summed: bool, partition: Partition | None = None) -> str:
    """How ``weighted_rows`` sums: "moved" (a sparse product over the non-zero weights), "kept" (the sum of all
    rows minus a sparse product over the weights below 1; ``summed``: that sum is kept by the caller) or "dense".
    Where the rows' classes lie apart (``partition``), a dense product multiplies each class's rows at its own
    positions alone, the arithmetic of one class's rows, while a sparse entry still reads its row whole.
    CUDA's sparse products lack bf16; there the Triton kernels skip empty tiles instead, so CUDA is dense."""
    if rows.is_cuda:
        return "dense"
    n_masks, n_up, n_readers = weights.shape
    moved = torch.count_nonzero(weights).item()
    kept = torch.count_nonzero(weights != 1).item() + (0 if summed else n_masks * n_up)
    multiplied = n_up if partition is None else n_up // len(partition.rows)
    if min(moved, kept) > _dense_cost(n_masks, multiplied, n_readers):
        return "dense"
    return "moved" if moved <= kept else "kept"


def weighted_rows(weights: torch.Tensor, rows: torch.Tensor, base: torch.Tensor | None = None,
                  rows_sum: Callable[[], torch.Tensor] | None = None,
                  partition: Partition | None = None) -> torch.Tensor:
    """``out[d, n] = base[n] + Σ_u weights[n, u, d] · rows[u, n]`` by the cheapest exact route.

    A circuit or a single-edge patch moves few edges (few non-zero weights); "patch everything but a circuit"
    keeps few (few weights below 1).  Both are summed entry by entry, reading one row per entry; a dense mix
    pays for the full product.  Each route gives the same numbers; the cheapest (``_dense_cost``) runs.
    ``rows_sum`` gives Σ_u rows[u] [N, X] where the caller keeps it; the rows are summed here otherwise.
    ``partition``: the rows' classes of positions, where they lie apart (``Partition``), for the dense route."""
    route = _route(weights, rows, rows_sum is not None, partition)
    if route == "moved":
        return _sparse_sum(weights, rows, base)
    if route == "kept":  # Σ_u w·row = Σ_u row − Σ_u (1 − w)·row
        total = (rows_sum() if rows_sum is not None else rows.sum(0)).reshape(rows.shape[1:])
        return _sparse_sum(weights - 1, rows, total if base is None else base + total)
    return _dense_rows(weights, rows, base, partition=partition)


def _dense_rows(weights: torch.Tensor, rows: torch.Tensor, base: torch.Tensor | None = None,
               out: torch.Tensor | None = None, partition: Partition | None = None) -> torch.Tensor:
    """``weighted_rows``' dense route: one bmm over the masks, [n, d, u] @ [n, u, x], the base added by the same
    call (einsum would reach the same bmm through a dozen view ops, and where the host sets the pace each costs as
    much as the product).  The bmm writes straight into the output's layout, [d, n, x] (``out`` where given), as
    a transposed view: its own layout, [n, d, x], would be copied by every reader's reshape — on SmolLM2 a
    gradient's two products spent a fifth of their time in that copy.  Rows in classes that lie apart
    (``partition``) multiply at their own class's positions alone."""
    if partition is not None:
        return partition.dense(weights, rows, base, out)
    n_masks, _, n_readers = weights.shape
    out = rows.new_empty(n_readers, n_masks, rows.shape[2]) if out is None else out
    product = weights.transpose(1, 2), rows.transpose(0, 1)
    if base is None:
        torch.bmm(*product, out=out.transpose(0, 1))
    else:
        start = torch.broadcast_to(base, out.shape).transpose(0, 1)
        torch.baddbmm(start, *product, out=out.transpose(0, 1))
    return out


CSR_ROW_ENTRIES = 24  # entries in an output row beyond which MKL's CSR product loses to torch's COO one (below)


def _sparse_sum(weights: torch.Tensor, rows: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """The same product with the weights as a sparse matrix [readers·masks, upstream·masks] times the rows as
    they lie, [upstream·masks, X]: the result [readers·masks, X] is already in the output's layout.

    Two products, the same sums: MKL's CSR (fp32, fp64) splits the output rows among threads, but slows per entry
    as a row gathers more of them, to a quarter of the speed of torch's COO product for an MLP's one reader with
    ~90 (a found circuit's MLP inputs keep that many edges); COO adds one entry's row at a time, threaded along
    the row, at the speed of memory whatever the rows.  So CSR takes the products whose rows are all short — a
    random circuit's, where its threads gain a quarter — and COO the rest (measured on SmolLM2's calls)."""
    n_masks, n_up, n_readers = weights.shape
    d, n, u = weights.permute(2, 0, 1).nonzero(as_tuple=True)  # sorted by (reader, mask, upstream)
    row, column, size = d * n_masks + n, u * n_masks + n, (n_readers * n_masks, n_up * n_masks)
    entries = torch.bincount(row, minlength=size[0])
    if rows.dtype in (torch.float32, torch.float64) and entries.max() <= CSR_ROW_ENTRIES:
        crow = torch.zeros(size[0] + 1, dtype=torch.long, device=row.device)
        crow[1:] = entries.cumsum(0)
        with warnings.catch_warnings():  # torch calls CSR "beta"; the product here is checked against the dense one
            warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta", UserWarning)
            matrix = torch.sparse_csr_tensor(crow, column, weights[n, u, d], size, check_invariants=False)
    else:
        matrix = torch.sparse_coo_tensor(torch.stack([row, column]), weights[n, u, d], size, is_coalesced=True,
                                         check_invariants=False)
    dense = rows.reshape(size[1], -1)
    if base is None:
        return (matrix @ dense).reshape(n_readers, n_masks, -1)
    start = base.reshape(1, n_masks, -1).expand(n_readers, -1, -1).reshape(size[0], -1)
    return torch.addmm(start, matrix, dense).reshape(n_readers, n_masks, -1)


class TorchProducts:
    """The three products of ``_Accumulate`` in torch, shaped as ``fxcircuits.kernels`` takes them.

    stream [N, X], keep [N, U, D], rows [U, N, X], grad [D, N, X] (N masks, U upstream nodes, D readers).
    ``rows_sum``: where the caller keeps Σ_u rows[u] (the patcher's ``DeltaStore`` does), a function giving it;
    ``partition``: where the rows are a positional mask's classes lying apart, which (``Partition``)."""

    def __init__(self, rows_sum: Callable[[], torch.Tensor] | None = None, partition: Partition | None = None):
        self.rows_sum, self.partition = rows_sum, partition

    def accumulate(self, stream: torch.Tensor, keep: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """out[d, n] = stream[n] + Σ_u (1 − keep[n, u, d]) · rows[u, n], by ``weighted_rows``' cheapest route."""
        return weighted_rows((1 - keep).to(rows.dtype), rows, stream, self.rows_sum, self.partition)

    def grad_keep(self, rows: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """grad_keep[n, u, d] = − Σ_x rows[u, n, x] · grad[d, n, x]: the EAP edge scores."""
        if self.partition is not None:
            return self.partition.grad_keep(rows, grad)
        return -torch.einsum("unx,dnx->nud", rows, grad)

    @staticmethod
    def grad_rows(keep: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """grad_rows[u, n] = Σ_d (1 − keep[n, u, d]) · grad[d, n]: the forward's product with the mask transposed,
        so the same cheap routes apply (nothing to multiply where every edge is kept, as in attribution)."""
        return weighted_rows((1 - keep).transpose(1, 2).to(grad.dtype), grad)


def products(rows: torch.Tensor, rows_sum: Callable[[], torch.Tensor] | None = None,
             partition: Partition | None = None):
    """Who computes the accumulation: ``fxcircuits.kernels`` (fused Triton) for CUDA tensors of a dtype they
    read, else ``TorchProducts`` — always on CPU, where its sparse routes are the fast path.

    Triton is optional (the ``triton`` extra): without it CUDA runs take the torch path.  With it installed, a
    failure to import or run the kernels is raised, never papered over by the slower path.  A benchmark
    compares the two paths by patching this function."""
    if not rows.is_cuda or importlib.util.find_spec("triton") is None:
        return TorchProducts(rows_sum, partition)
    from .kernels import accumulate as kernels
    return kernels if rows.dtype in kernels.DTYPES else TorchProducts(rows_sum, partition)


def _summary(keep: torch.Tensor) -> tuple[torch.Tensor, list[bool], list[bool], list[bool]]:
    """What the patcher decides from the mask ``keep`` [n_masks, upstream, readers], found for every reader and
    node at once, with one transfer from the device (asking per group would wait for the device at every layer):
    per reader, whether some mask moves an edge into it; per upstream node, whether some mask moves an edge out
    of it; per reader d but the last, whether reader d + 1 has the same column of ``keep`` (see ``_runs``).  The
    weights 1 − keep, found on the way, come first.

    Differences and maxima, not comparisons: on CPU, a comparison writing booleans costs six times the
    arithmetic, on a block of SmolLM2's size (250,000 values) hundreds of microseconds a run."""
    change = 1 - keep  # 0 exactly where keep is 1
    size = change.abs()
    steps = (change[..., 1:] - change[..., :-1]).abs()
    found = torch.cat([size.amax(1).amax(0), size.amax(2).amax(0), steps.amax(1).amax(0)]).tolist()
    n_up, n_readers = keep.shape[1:]
    moved = [v != 0 for v in found]  # NaN counts as moved and as unlike
    return change, moved[:n_readers], moved[n_readers:n_readers + n_up], [not m for m in moved[n_readers + n_up:]]


def _wholly_patched(keep: torch.Tensor, readers: list[int], reads: list[int]) -> list[bool]:
    """For each reader, whether ``keep`` [n_masks, upstream, readers] is 0 on every edge into it in every mask.

    Such a reader's input is the other run's stream, Σ_u a_u(other), exactly: a circuit leaves many readers
    with no edge of their own, and where the other run is a run (a corrupted prompt), what they compute from it
    is what that run computed (``heads.wholly_patched``).  ``reads``: how many upstream nodes each group of
    ``readers`` reads; the rows after those are not edges (``dense_keep`` leaves them at 1)."""
    device = keep.device  # counts in fp32, exact where a low-precision mask's dtype would not be
    upstream = torch.tensor(reads, device=device, dtype=torch.float32).repeat_interleave(
        torch.tensor(readers, device=device))
    edges = (upstream - torch.arange(keep.shape[1], device=device, dtype=torch.float32)[:, None]).clamp_(0, 1)
    return [v == 0 for v in (keep.abs() * edges).amax(1).amax(0).tolist()]  # edges are 1, the rest 0: no comparison


def _runs(alike: list[bool]) -> list[int]:
    """For each reader d, the last reader e ≥ d such that readers d…e have the same column of the mask — whose
    edges the mask weights alike, so that they see the same value.  ``alike[d]``: reader d + 1 is like reader d.

    A node mask (activation patching) moves a node's edges into every later reader together, and a circuit leaves
    many readers with no edge of its own.  Such readers' sum is computed once and handed to all of them as a
    view, and their heads then read through the plain projections (``heads.shared_input``), as the unpatched
    model does."""
    runs = [len(alike)]
    for d in range(len(alike) - 1, -1, -1):
        runs.append(runs[-1] if alike[d] else d)
    return runs[::-1]


def _read(store: DeltaStore, stream: torch.Tensor, writes, others, first: int,
          last: int) -> tuple[torch.Tensor | None, torch.Tensor]:
    """``accumulate``'s sums [readers, n_masks, X] (a single row, expanded, where the readers share one), or None
    where the readers all read ``stream`` as it is; and the store's rows so far."""
    n_readers, n_masks, moved = last - first, store.keep.shape[0], store.moves(first, last)
    # the rows are written where a product reads them: where the mask moves an edge into the readers, or needs a
    # gradient (its backward reads them all); a shared prefix's readers (``DeltaStore``) move none
    if moved or store.keep.requires_grad:
        rows = store.extend(writes, others, stream.numel() // n_masks)
    else:
        rows = store.rows()
    # every edge kept, or nothing stored yet (no node written so far has a moved edge, whatever the mask says of
    # later ones): the readers all read the stream as it is
    if not moved or len(rows) == 0:
        return None, rows
    rows = store.widen(stream.dtype)  # a stream wider than the rows stored so far (``DeltaStore.widen``)
    flat, by_mask = stream.reshape(n_masks, -1).to(rows.dtype), rows.reshape(len(rows), n_masks, -1)
    out = None if rows.is_cuda else store.carried(first, last, flat, by_mask)
    if out is None:  # on CUDA the fused kernels read each row once for all readers already
        weights = store.block[:, :len(rows), first:last]
        if n_readers > 1 and store.alike(first, last):  # readers weighted alike: one sum, handed to all
            weights = weights[..., :1]
        out = products(rows, store.rows_sum, store.partition).accumulate(flat, weights, by_mask)
    out = out.to(stream.dtype)  # the readers read the stream's dtype, where the model casts its stream down
    return (out if out.shape[0] == n_readers else out.expand(n_readers, -1, -1)), rows


def _as_read(out: torch.Tensor | None, stream: torch.Tensor, n_readers: int) -> torch.Tensor:
    """``_read``'s sums in the stream's shape, [readers, *stream.shape]; the stream itself, expanded, for None."""
    if out is None:
        return stream.expand(n_readers, *stream.shape)
    return out.reshape(n_readers, *stream.shape)


class _Accumulate(torch.autograd.Function):
    """``stream + Σ_u (1 − keep[u, d]) · rows_u`` with rows_u = other_u − write_u, and gradients for the stream,
    the mask, this run's writes and (where they need it) the other run's.  Rows the store leaves out belong to
    nodes whose every edge is kept: their weights are 0 for every reader, and so are their gradients."""

    @staticmethod
    def forward(ctx, stream, keep, store, first, last, n_groups, *writes_and_others):
        writes, others = writes_and_others[:n_groups], writes_and_others[n_groups:]
        out, ctx.rows = _read(store, stream, writes, others, first, last)
        ctx.moved = out is not None
        ctx.products = products(ctx.rows, store.rows_sum, store.partition)
        ctx.weights = store.block[:, :len(ctx.rows), first:last]  # the stored rows' block of the mask
        ctx.sizes, ctx.stored, ctx.where = store.sizes[:n_groups], store.stored[:n_groups], store.where
        ctx.partition = store.partition
        ctx.write_shapes, ctx.other_shapes = [w.shape for w in writes], [o.shape for o in others]
        ctx.save_for_backward(keep)
        return _as_read(out, stream, last - first)

    @staticmethod
    def backward(ctx, grad):
        with _unautocast(grad.device.type):  # as the forward ran (``accumulate``)
            return _Accumulate._backward(ctx, grad)

    @staticmethod
    def _backward(ctx, grad):
        (keep,) = ctx.saved_tensors
        n_masks, n_up, n_readers = keep.shape
        # with every edge kept clean (attribution at the clean point) no row reaches the output: no product, and
        # no [n_up, rows] of zeros to allocate
        to_rows = any(ctx.needs_input_grad[6:]) and ctx.moved
        if ctx.needs_input_grad[1] or to_rows:  # then the readers hold every mask's rows (not a shared prefix's one)
            grad_rows = grad.reshape(n_readers, n_masks, -1).to(ctx.rows.dtype)
        grad_keep, n_groups = None, len(ctx.sizes)
        if ctx.needs_input_grad[1]:  # the store keeps every row when the mask needs a gradient
            grad_keep = ctx.products.grad_keep(ctx.rows.reshape(n_up, n_masks, -1), grad_rows).to(keep.dtype)
        grads = [None] * (2 * n_groups)
        if to_rows:
            for i, part in enumerate(_writes_grad(ctx, grad_rows)):
                if part is not None and ctx.needs_input_grad[6 + i]:
                    grads[i] = _sum_to(part, ctx.write_shapes[i])  # summed over masks in a shared prefix
                if part is not None and ctx.needs_input_grad[6 + n_groups + i]:
                    grads[n_groups + i] = -_sum_to(part, ctx.other_shapes[i])
        return (grad.sum(0), grad_keep, None, None, None, None, *grads)


def _writes_grad(ctx, grad: torch.Tensor) -> list[torch.Tensor | None]:
    """``_Accumulate.backward``: per upstream group, the gradient of this run's writes a_u(run) [n, rows of the
    masks, …] — minus that of the differences a_u(other) − a_u(run) the rows hold — from the readers' ``grad``
    [readers, n_masks, X]; None for a group not stored.  The rows were weighted by position as they were written,
    one row per class (``DeltaStore``).

    The sign is taken in the weights, or in place in the one fresh product that holds every group's gradient:
    negating into new memory would cost what mapping it does, tens of MB a call on CPU (``Scratch``)."""
    per_group = [n for n, kept in zip(ctx.sizes, ctx.stored) if kept]
    weights = None if ctx.partition is None else (1 - ctx.weights).transpose(1, 2).to(grad.dtype)
    if weights is not None and _route(weights, grad, False, ctx.partition) == "dense":  # routed as 1 − keep
        flat = ctx.partition.grad_differences(weights.neg_(), grad)
        classes = len(ctx.partition.rows)
        parts = iter(flat.reshape(len(flat), *ctx.rows.shape[1:]).split([n // classes for n in per_group]))
    else:
        flat = ctx.products.grad_rows(ctx.weights, grad).reshape(ctx.rows.shape).neg_()
        parts = (_unweighted(part, ctx.where) for part in flat.split(per_group))
    return [next(parts) if kept else None for kept in ctx.stored]


def accumulate(store: DeltaStore, stream: torch.Tensor, writes: list[torch.Tensor], others: list[torch.Tensor],
               first: int, last: int) -> torch.Tensor:
    """Inputs of the downstream readers ``first:last``.

    stream: the residual stream they read, any shape holding ``rows × …`` values (rows = n_masks · batch).
    writes: per upstream group written so far, this run's outputs, [n_nodes, rows, seq, d_model] (a group the
    store does not keep may come as its sum alone, [1, …]: ``DeltaStore.stores``; a group written in a prefix the
    masks share, as one batch for all: ``fxcircuits.prefix``);
    others: the other run's outputs of the same groups, broadcastable to them.
    The mask is the store's: its block over those groups' nodes and these readers.
    Where the other run rides in the same pass (``store.ahead``), it is the first of 1 + n_masks blocks of rows
    and ``others`` is unused: see ``_alongside``.
    Returns [n_readers, *stream.shape]: a view of ``stream`` where no edge into the readers is patched."""
    with _unautocast(stream.device.type):
        if store.ahead:
            return _alongside(store, stream, writes, first, last)
        return _accumulate(store, stream, writes, others, first, last)


def _unautocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast off, where it is on: the sums run at the rows' precision, as the GPU kernels run them, rather than
    at autocast's (bf16 or fp16 products, some of which MKL's sparse CSR product has no kernel for)."""
    on = torch.is_autocast_enabled(device_type)
    return torch.autocast(device_type, enabled=False) if on else contextlib.nullcontext()


def _alongside(store: DeltaStore, stream: torch.Tensor, writes: list[torch.Tensor], first: int,
               last: int) -> torch.Tensor:
    """``accumulate`` in a pass that runs the other run and the patched ones side by side, as one batch: the
    other run's rows first (its readers read the stream as it is), then each mask's.

    Two passes in one halve the operations a patched call launches, which set its cost where the host sets the
    pace (a model this size on a GPU).  Such a pass needs no gradient (``DeltaStore``)."""
    n_readers = last - first
    if not store.moves(first, last):
        return stream.expand(n_readers, *stream.shape)
    lead, rest = stream.reshape(store.blocks, -1).split([1, store.blocks - 1])
    out = _read(store, rest, writes, writes, first, last)[0]  # the store finds the other run in the writes
    if out is None:
        return stream.expand(n_readers, *stream.shape)
    if out.stride(0) == 0:  # readers weighted alike share one value: join the blocks once
        return torch.cat([lead, out[0]]).view(1, *stream.shape).expand(n_readers, *stream.shape)
    return torch.cat([lead.expand(n_readers, 1, -1), out], 1).view(n_readers, *stream.shape)


def _accumulate(store: DeltaStore, stream: torch.Tensor, writes: list[torch.Tensor], others: list[torch.Tensor],
                first: int, last: int) -> torch.Tensor:
    """``accumulate`` with the other run given apart."""
    if not torch.is_grad_enabled():  # autograd's bookkeeping costs tens of µs a call, where the host sets the pace
        return _as_read(_read(store, stream, writes, others, first, last)[0], stream, last - first)
    keep = store.keep[:, :store.starts[len(writes)], first:last]
    return _Accumulate.apply(stream, keep, store, first, last, len(writes), *writes, *others)


def side_input(store: DeltaStore, run: torch.Tensor, other: torch.Tensor | None, reader: int) -> torch.Tensor:
    """A side input (``components.MLP.sides``: a value the ``input`` node's edge into ``reader`` carries beside the
    stream) as that reader sees it: ``run + (1 − keep[input, reader]) · (other − run)``, per mask, as the stream's
    share from ``input`` in ``accumulate``.

    run: this pass's value, [rows, …] with the rows mask after mask — or one batch for all, in a prefix the masks
    share, where no mask moves the edge; other: the other run's, [1, rows, …] with rows 1, one batch, or every
    mask's (None where that run leads this pass's rows, ``store.ahead``)."""
    if not store.moves(reader, reader + 1) and not store.keep.requires_grad:
        return run
    weight = 1 - store.keep[:, :store.classes, reader].to(run.dtype)  # the input node's rows, one per class
    if store.where is None:
        weight = weight[:, 0]
    else:  # [n_masks, batch, seq]: the value is [rows, seq, …] (``components.check_sides``)
        weight = torch.einsum("mc,mcbs->mbs", weight, store.where.to(run.dtype))
    if store.ahead:
        lead, rest = run.unflatten(0, (store.blocks, -1)).split([1, store.blocks - 1])
        return torch.cat([lead, _mixed(rest, lead, weight)]).flatten(0, 1)
    masks = weight.shape[0]
    other = other[0]
    if other.shape[0] not in (1, run.shape[0] // masks):  # each mask's own rows
        other = other.unflatten(0, (masks, -1))
    return _mixed(run.unflatten(0, (masks, -1)), other, weight).flatten(0, 1)


def _mixed(run: torch.Tensor, other: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``run + weight · (other − run)`` with ``run`` [n_masks, rows, …] and ``weight`` [n_masks], or
    [n_masks, rows, seq] where the masks patch some positions alone."""
    return run + weight.view(*weight.shape, *[1] * (run.dim() - weight.dim())) * (other.to(run.dtype) - run)


class Tap:
    """Edge attribution at any point of a run: ``scores(metric)[u, d] = Σ (a_u(clean) − a_u(other)) · ∂metric/∂x_d``.

    Gradient methods (EAP, EAP-IG, clean-corrupted) need the gradient of the metric with respect to every
    per-edge input x_d, at some point between the clean and the corrupted run, times each upstream node's
    clean-vs-other difference.  A tap sits on every group of readers in the patcher: the identity going forward,
    it gives that product as the gradient of a leaf of its own going backward (``part``), so one backward pass
    scores every edge and no gradient of size [n_downstream, batch, seq, d_model] is ever kept.  A leaf per group,
    not slices of one leaf: autograd would fill a zero gradient of the whole for every slice, which by position
    took most of the backward (SmolLM2, 8 IOI prompts: 8.6 s, against 2.5 s with a leaf per group).

    delta: ``a(other) − a(clean)`` per upstream node, [n_upstream, batch, seq, d_model] — the run may hold several
    points of one batch side by side (masks × batch rows); their gradients are summed.  sides: the same difference
    of each side input (``side_input``), [batch, …], whose gradient counts for the ``input`` node's edge.
    by_position: keep each prompt's positions apart, scores [n_upstream, n_downstream, batch · seq]: the score of
    each edge patched at one position (``fxcircuits.activation_patching``)."""

    def __init__(self, delta: torch.Tensor, n_downstream: int, sides: list[torch.Tensor] = (),
                 by_position: bool = False):
        self.delta, self.sides = delta.detach(), [s.detach() for s in sides]
        positions = (delta.shape[1] * delta.shape[2],) if by_position else ()
        self.shape = (delta.shape[0], n_downstream, *positions)
        self.dtype = wide_dtype(delta.dtype)  # a float64 model's scores keep its digits
        self.parts: list[tuple[int, int, torch.Tensor]] = []  # first and last reader, the leaf of their scores

    def part(self, n_upstream: int, first: int, last: int) -> torch.Tensor:
        """A leaf for the scores of the first ``n_upstream`` upstream nodes into readers ``first:last``."""
        leaf = torch.zeros(n_upstream, last - first, *self.shape[2:], device=self.delta.device, dtype=self.dtype,
                           requires_grad=True)
        self.parts.append((first, last, leaf))
        return leaf

    def scores(self, value: torch.Tensor) -> torch.Tensor:
        """Every edge's score, the gradient of ``value`` (the metric, summed) with respect to its weight: float32, or
        float64 in a float64 model, [n_upstream, n_downstream] (× batch · seq by position).  No gradient of the
        model's parameters is taken."""
        grads = torch.autograd.grad(value, [leaf for *_, leaf in self.parts], allow_unused=True)
        out = torch.zeros(self.shape, device=self.delta.device, dtype=self.dtype)
        for (first, last, leaf), grad in zip(self.parts, grads):
            if grad is not None:
                out[:leaf.shape[0], first:last] += grad
        return out


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs, weight, delta):
        ctx.delta, ctx.weight_dtype, ctx.positions = delta, weight.dtype, weight.shape[2:]
        return inputs.view_as(inputs)

    @staticmethod
    def backward(ctx, grad):
        """The scores summed over every value, or per position (``Tap``): the einsum of ``grad_keep`` batches over
        its second axis, the mask's there, the positions' here."""
        n_up, n_readers, points = ctx.delta.shape[0], grad.shape[0], math.prod(ctx.positions)
        rows = ctx.delta.reshape(n_up, points, -1)
        summed = grad.reshape(n_readers, -1, points, rows.shape[-1]).sum(1).to(rows.dtype)
        scores = products(rows).grad_keep(rows, summed)  # [points, n_up, n_readers]
        return grad, scores.permute(1, 2, 0).reshape(n_up, n_readers, *ctx.positions).to(ctx.weight_dtype), None


def patched_rows(store: DeltaStore, x: torch.Tensor) -> torch.Tensor:
    """``x`` [rows, …] without the other run's rows where that run rides in the same pass (``accumulate``)."""
    return x[x.shape[0] // store.blocks:] if store.ahead else x


def patched_rows_count(store: DeltaStore, n: int) -> int:
    """How many of ``n`` rows (or prompts) are the patched ones' (``patched_rows``)."""
    return n - n // store.blocks if store.ahead else n


def at_positions(x: torch.Tensor, positions: torch.Tensor | None, seq: int) -> torch.Tensor:
    """The stream ``x`` ([rows, seq, …] or flattened, [rows·seq, …]) at one position per row, in the same layout
    with a sequence of one: ``positions`` [batch] holds one per prompt, and the rows are the masks' prompts, mask
    after mask (``CircuitModel.patched``).  Unchanged where ``positions`` is None."""
    if positions is None:
        return x
    by_row = x.reshape(-1, seq, x.shape[-1])  # the stream's layout is [rows, seq, d] or [rows·seq, d]
    index = positions.repeat(by_row.shape[0] // positions.shape[0])
    picked = by_row[torch.arange(by_row.shape[0], device=x.device), index]
    return picked.unsqueeze(1) if x.dim() == by_row.dim() else picked


def sequence_length(positions: torch.Tensor | None, seq: int) -> int:
    """The readout's sequence length: 1 where it runs at one position per prompt (``at_positions``)."""
    return seq if positions is None else 1


def tap(t: Tap | None, inputs: torch.Tensor, n_upstream: int, first: int, last: int) -> torch.Tensor:
    """The readers ``first:last`` through ``t`` (see ``Tap``); unchanged when there is no tap."""
    if t is None:
        return inputs
    return _Tap.apply(inputs, t.part(n_upstream, first, last), t.delta[:n_upstream])


def tap_side(t: Tap | None, value: torch.Tensor, index: int, reader: int) -> torch.Tensor:
    """Side input ``index`` as ``reader`` reads it, through ``t`` (its gradient scores the edge ``input → reader``
    as the stream's does); unchanged when there is no tap."""
    if t is None:
        return value
    return _Tap.apply(value[None], t.part(1, reader, reader + 1), t.sides[index][None])[0]


def edge_vector(graph: CircuitGraph, edge_mask) -> torch.Tensor:
    """An ``edge_mask`` given as tensor, ``{edge: value}`` dict or ``Circuit`` → tensor [E] or [N, E]."""
    if isinstance(edge_mask, Circuit):
        return edge_mask.edge_mask(graph)
    return _vector(edge_mask, graph.edge_index, "edge", "cm.graph.edges", graph.not_an_edge, also=" or a Circuit")


def node_vector(graph: CircuitGraph, node_mask) -> torch.Tensor:
    """A ``node_mask`` given as tensor [U] / [N, U] over upstream nodes, or ``{node: value}`` dict."""
    return _vector(node_mask, graph.node_index, "node", "cm.graph.upstream", graph.not_a_node)


def _vector(mask, index: Mapping[str, int], what: str, listing: str, why: Callable[[str], str],
            also: str = "") -> torch.Tensor:
    """A mask by name (missing names = 1) or by position, checked against the ``index`` it refers to; ``why``
    says why a name is none of its names, ``also`` what else the caller takes."""
    if not isinstance(mask, (Mapping, torch.Tensor)):
        raise TypeError(f"{what}_mask must be a tensor or a dict of {what} names{also}, not {type(mask).__name__}")
    if isinstance(mask, Mapping):
        unknown = [name for name in mask if name not in index]
        if unknown:
            raise KeyError(f"unknown {what} name{'s' if len(unknown) > 1 else ''} in {what}_mask "
                           f"({len(unknown)} of {len(mask)}): {why(unknown[0])}")
        vector = torch.ones(len(index), dtype=torch.float64)  # the values as given: a float64 model reads them all
        if not any(isinstance(value, torch.Tensor) for value in mask.values()):
            for name, value in mask.items():
                vector[index[name]] = float(value)
            return vector
        # tensors are placed without leaving autograd's graph: a value that requires a gradient gets it
        at = torch.tensor([index[name] for name in mask], dtype=torch.long)
        return vector.index_put((at,), torch.stack([_one_value(v, name, what) for name, v in mask.items()]))
    if mask.dim() not in (1, 2) or mask.shape[-1] != len(index):
        raise ValueError(f"{what}_mask has shape {tuple(mask.shape)}; expected [{len(index)}] (one value per {what} "
                         f"in {listing} order) or [n_masks, {len(index)}]")
    return mask


def _one_value(value, name: str, what: str) -> torch.Tensor:
    """One mask value given by name, as a float64 scalar on the CPU (a tensor keeps its gradient)."""
    value = torch.as_tensor(value)
    if value.numel() != 1:
        raise ValueError(f"{what}_mask[{name!r}] holds {value.numel()} values; give one value a name")
    return value.reshape(()).to("cpu", torch.float64)


def position_weights(patch_positions, seq: int) -> torch.Tensor:
    """``patch_positions`` — where a call's masks apply — as weights over the ``seq`` positions: [seq],
    [batch, seq] or [n_masks, batch, seq] (each leading size may be 1), 1 where the masks patch, 0 where every edge
    is kept.

    Positions are given as indices (ints, a list of them, or an integer tensor, negative from the end), the same for
    every prompt; or as weights, a bool or float tensor over the positions, per prompt and per mask where it has
    those axes (between 0 and 1 they interpolate, as mask values do).  Indices count the sequence as given, padding
    included: with right padding, -1 is not each prompt's last token."""
    if isinstance(patch_positions, torch.Tensor) and (patch_positions.is_floating_point()
                                                       or patch_positions.dtype == torch.bool):
        weights = patch_positions
        if weights.dim() not in (1, 2, 3) or weights.shape[-1] != seq:
            raise ValueError(f"patch_positions has shape {tuple(weights.shape)}; expected weights over the {seq} "
                             f"positions: [{seq}], [batch, {seq}] or [n_masks, batch, {seq}]")
        return _finite_weights(weights, "patch_positions")
    try:
        index = torch.as_tensor(patch_positions)
    except (TypeError, ValueError, RuntimeError):
        index = torch.empty(0)
    if index.is_floating_point() or index.dtype == torch.bool or index.dim() > 1 or index.numel() == 0:
        raise ValueError(f"patch_positions must be position indices (an int or a list of them) or a bool or float "
                         f"tensor of weights over the positions; got {patch_positions!r}")
    outside = [int(i) for i in index.flatten() if not -seq <= int(i) < seq]
    if outside:
        raise IndexError(f"patch_positions {outside}: the prompts have positions 0 to {seq - 1} (or -{seq} to -1)")
    return torch.zeros(seq).index_fill_(0, index.flatten().long() % seq, 1.0)


def mask_weights(mask_positions, seq: int) -> torch.Tensor:
    """``mask_positions`` — where each class of a mask applies (``CircuitModel.forward``) — checked, as weights
    [classes, seq], [classes, batch, seq] or [n_masks, classes, batch, seq] over the ``seq`` positions (leading
    sizes but the classes' may be 1).  The classes need not cover the prompt: where none applies every edge is kept."""
    if not isinstance(mask_positions, torch.Tensor) or not (mask_positions.is_floating_point()
                                                            or mask_positions.dtype == torch.bool):
        raise ValueError("mask_positions must be a bool or float tensor of weights, one row of positions per class of "
                         f"the mask (see fxcircuits.data.position_classes); got {type(mask_positions).__name__}")
    if mask_positions.dim() not in (2, 3, 4) or mask_positions.shape[-1] != seq:
        raise ValueError(f"mask_positions has shape {tuple(mask_positions.shape)}; expected weights over the {seq} "
                         f"positions for each class of the mask: [classes, {seq}], [classes, batch, {seq}] or "
                         f"[n_masks, classes, batch, {seq}]")
    return _finite_weights(mask_positions, "mask_positions")


def _finite_weights(weights: torch.Tensor, name: str) -> torch.Tensor:
    """Position weights as a float tensor, refused where they need a gradient or hold NaN or ∞."""
    if weights.requires_grad:
        raise ValueError(f"{name} takes no gradient: detach it (a gradient with respect to each position is not "
                         "computed; a mask's gradient is, at the positions it patches)")
    weights = weights.to(torch.float32) if weights.dtype == torch.bool else weights
    if not weights.abs().amax().isfinite():
        raise ValueError(f"{name} contains NaN or infinite values")
    return weights


def where_per_mask(weights: torch.Tensor, keep: torch.Tensor, batch: int) -> torch.Tensor:
    """``position_weights`` (a mask of one class, ``keep`` [n_masks, up, down]) or ``mask_weights`` (``keep``
    [n_masks, classes, up, down]) expanded to every mask, class and prompt, [n_masks, classes, batch, seq], as
    ``DeltaStore`` reads them."""
    n_masks, classes = keep.shape[0], 1 if keep.dim() == 3 else keep.shape[1]
    name = "patch_positions" if keep.dim() == 3 else "mask_positions"
    if keep.dim() == 3:  # [seq], [batch, seq] or [n_masks, batch, seq]
        full = weights.reshape(*[1] * (3 - weights.dim()), *weights.shape).unsqueeze(1)
    else:  # [classes, seq], [classes, batch, seq] or [n_masks, classes, batch, seq]
        full = weights[None, :, None] if weights.dim() == 2 else weights[None] if weights.dim() == 3 else weights
    if full.shape[0] not in (1, n_masks) or full.shape[1] != classes or full.shape[2] not in (1, batch):
        raise ValueError(f"{name} has shape {tuple(weights.shape)} for {n_masks} mask(s) of {classes} class(es) of "
                         f"positions and {batch} prompt(s): its leading sizes must be the masks', the classes' and "
                         "the prompts' counts (the masks' and the prompts' may be 1)")
    return full.expand(n_masks, classes, batch, full.shape[3])


def dense_keep(graph: CircuitGraph, edge_mask=None, node_mask=None, *, device=None) -> torch.Tensor:
    """Edge and node masks combined into the [n_masks, n_upstream, n_downstream] block ``accumulate`` reads.

    A node mask multiplies the mask of every edge leaving that node.  Pairs that are not edges stay 1.  The block
    keeps the masks' dtype (the wider of the two; integer and boolean masks become float32, masks by name float64),
    and each use casts it to the values it weights: a float64 model reads a float64 mask as given."""
    edges = torch.ones(len(graph.edges), device=device) if edge_mask is None else edge_vector(graph, edge_mask)
    edges = edges.to(device) if edges.is_floating_point() else edges.to(device, torch.float32)
    if node_mask is not None:
        nodes = node_vector(graph, node_mask).to(edges.device)
        if edges.dim() == nodes.dim() == 2 and 1 not in (len(edges), len(nodes)) and len(edges) != len(nodes):
            raise ValueError(f"edge_mask holds {len(edges)} masks and node_mask {len(nodes)}: give both the same "
                             "number of masks, or either one mask for all")
        edges = edges * (nodes if nodes.is_floating_point() else nodes.float())[..., graph.src.to(edges.device)]
    edges = edges.reshape(-1, len(graph.edges))
    if not edges.detach().abs().amax().isfinite():  # the maximum carries NaN and ∞; isfinite().all() costs 10×
        raise ValueError("edge/node mask contains NaN or infinite values")
    keep = edges.new_ones(edges.shape[0], len(graph.upstream) * len(graph.downstream))
    return keep.index_copy_(1, graph.cells.to(edges.device), edges).view(-1, len(graph.upstream), len(graph.downstream))


def class_keep(graph: CircuitGraph, edge_mask, node_mask, classes: int, *, device=None) -> torch.Tensor:
    """Masks with one mask per class of positions (``mask_positions``) as the block ``DeltaStore`` reads,
    [n_masks, classes, n_upstream, n_downstream].  Each mask is a tensor [classes, …] or [n_masks, classes, …] over
    the edges or upstream nodes, or a list of ``classes`` masks as ``dense_keep`` takes them (a ``Circuit`` or a
    dict for each class)."""
    edges = _by_class(edge_mask, classes, "edge", lambda m: edge_vector(graph, m))
    nodes = _by_class(node_mask, classes, "node", lambda m: node_vector(graph, m))
    keep = dense_keep(graph, edges, nodes, device=device)
    return keep.view(-1, classes, *keep.shape[1:])


def _by_class(mask, classes: int, what: str, vector: Callable) -> torch.Tensor | None:
    """One of ``class_keep``'s masks as a tensor [n_masks · classes, size]."""
    if mask is None:
        return None
    if isinstance(mask, (list, tuple)):
        if len(mask) != classes:
            raise ValueError(f"{what}_mask lists {len(mask)} masks for mask_positions' {classes} classes of positions:"
                             " give one per class")
        parts = [vector(m) for m in mask]
        if any(p.dim() != 1 for p in parts):
            raise ValueError(f"each of the {what} masks listed is one mask; give many as a tensor "
                             f"[n_masks, {classes}, n_{what}s]")
        dtype = functools.reduce(torch.promote_types, (p.dtype for p in parts))
        return torch.stack([p.to(parts[0].device, dtype) for p in parts])
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (2, 3) or mask.shape[-2] != classes:
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{what}_mask is {shape}; with mask_positions of {classes} classes of positions, give "
                         f"[{classes}, n_{what}s], [n_masks, {classes}, n_{what}s] or a list of {classes} masks")
    return vector(mask.reshape(-1, mask.shape[-1]))
