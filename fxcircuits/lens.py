"""The logit lens: what the residual stream, or one node's output, says about the next token.

``cm.streams`` gives the stream after each writer as the model holds it (with what no node writes, such as
an output projection's bias), ``cm.activations`` each node's output; ``cm.readout`` (the model's own final
norm and unembedding, cut out of the captured graph) turns either into logits.  Reading a circuit's nodes
this way is how the talk explains what they do (an MLP that "upweights years > YY"): ``nodes=circuit``.

Direct logit attribution (``direct_logits``) reads each node's output as the whole stream's final norm scales it:
the norm's statistics come from the whole stream and are held fixed (``norms.freeze_statistics``), so the
readout is linear in what the nodes write, and their direct logits, plus what no node writes (``rest``: biases),
add up to the model's logits.  The lens on a node normalises that node's output by itself instead.
``source_logits`` splits a head's direct logits by the key position it reads (``cm.sources``): which token's value
it moves into the answer.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from numbers import Integral
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch.func import jvp, vjp, vmap

from .circuit import Circuit
from .data import check_counts, real_tokens, span_sums
from .draw import plot_heatmap
from .graph import names
from .metrics import answer_mean, answer_position, answer_sum, wide
from .model import CircuitModel
from .norms import freeze_statistics
from .patterns import check_index, check_read, check_real, head_indices
from .runs import nan_logits_advice


@dataclass
class Readings:
    """Logits read off ``labels``: [rows, batch, positions, vocab], and which token positions were read
    ([batch, positions]).  ``top`` and ``table`` rank each row's tokens by ``values``."""
    labels: list[str]
    logits: torch.Tensor
    positions: torch.Tensor
    number = "{:.2f}"  # how ``table`` writes a value

    def values(self) -> torch.Tensor:
        return self.logits

    def token_ids(self, example: int) -> torch.Tensor:
        """The vocabulary ids of ``logits``' last dimension for one example (-1: a column that reads nothing)."""
        return torch.arange(self.logits.shape[-1])

    def top(self, tokenizer, k: int = 5, example: int = 0, position: int = -1) -> list[tuple[str, list]]:
        """For each row, the ``k`` tokens of largest value for one example at one of the read positions:
        ``[(label, [(token, value), …]), …]``."""
        check_counts(k=k)
        check_read(example, position, self.positions.shape)
        ids = self.token_ids(example).to(self.logits.device)
        real = ids >= 0
        values, columns = self.values()[:, example, position][:, real].topk(min(k, int(real.sum())), dim=-1)
        ids = ids[real][columns]
        return [(label, [(tokenizer.decode([int(i)]), float(v)) for i, v in zip(row_ids, row_values)])
                for label, row_ids, row_values in zip(self.labels, ids, values)]

    def table(self, tokenizer, k: int = 5, example: int = 0, position: int = -1) -> str:
        """``top`` as aligned text, one row per label."""
        width = max(len(label) for label in self.labels)
        return "\n".join(f"{label:>{width}}  " + "  ".join(f"{token!r} {self.number.format(v)}" for token, v in tops)
                         for label, tops in self.top(tokenizer, k, example, position))


@dataclass
class Lens(Readings):
    """The logit lens: logits read off the stream after each writer, or off nodes' outputs; ``top`` ranks tokens
    by probability."""

    def values(self) -> torch.Tensor:
        return self.probs()

    def probs(self) -> torch.Tensor:
        return wide(self.logits).softmax(-1)  # a float64 model's in float64

    def answer_probs(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Probability of each example's answer set ([batch, K] ids, -1 padded) per row and position:
        [rows, batch, positions]."""
        return _per_example(answer_sum, self.probs(), token_ids)


@dataclass
class DirectLogits(Readings):
    """Direct logit attribution: ``logits[i]`` is what node ``labels[i]`` adds to the logits straight through the
    final norm, scaled as the whole stream is; ``top`` ranks the tokens each node pushes up most.

    ``total`` [batch, positions, vocab]: the model's logits.  ``rest``: ``total`` less every node's direct logits
    (those not read too) — what no node writes (an output projection's bias, the final norm's and unembedding's
    biases), and nothing more where ``linear``.  ``linear``: whether the frozen readout is affine in the stream;
    where it is not (soft-capped logits), each node's direct logits are taken to first order at the whole stream,
    and ``rest`` also holds what that leaves out.

    ``tokens`` [batch, K]: where only some tokens were read (``direct_logits(tokens=…)``), the vocabulary id of
    each example's columns of ``logits``, ``total`` and ``rest`` (-1: padding, which reads 0); ``None``: the whole
    vocabulary."""
    total: torch.Tensor
    rest: torch.Tensor
    linear: bool
    tokens: torch.Tensor | None = field(default=None, kw_only=True)
    number = "{:+.2f}"

    def token_ids(self, example: int) -> torch.Tensor:
        return super().token_ids(example) if self.tokens is None else self.tokens[example]

    def logit_diff(self, correct: torch.Tensor, incorrect: torch.Tensor, of: str = "nodes") -> torch.Tensor:
        """The ``logit_diff`` metric — mean logit of the correct answers ([batch, K] ids, -1 padded, or [batch])
        less that of the incorrect ones — of each node's direct logits (``of="nodes"``: [rows, batch, positions]),
        of ``rest`` or of ``total`` ([batch, positions]).  Every node's and the rest's add up to the total."""
        choices = {"nodes": self.logits, "rest": self.rest[None], "total": self.total[None]}
        if of not in choices:
            raise ValueError(f"of={of!r}: give one of {', '.join(map(repr, choices))}")
        diff = _logit_diff(choices[of], self.tokens, correct, incorrect)
        return diff if of == "nodes" else diff[0]


@dataclass
class SourceLogits:
    """Direct logit attribution of heads, split by the key position each reads: ``logits[i, b, p, k]`` is what
    head ``heads[i]`` writes into the logits (as ``direct_logits`` reads them) at example b's read position p from
    its attention weight on key position k times its value there.  Summed over the keys, a head's direct logits.

    ``logits`` [heads, batch, positions, keys, vocab or K]; ``positions`` [batch, positions] read; ``input_ids``
    and ``attention_mask`` [batch, keys]: the prompts, whose tokens the keys are; ``tokens`` as for
    ``DirectLogits``; ``linear`` whether the frozen readout is affine in the stream."""
    heads: list[str]
    logits: torch.Tensor
    positions: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    linear: bool
    tokens: torch.Tensor | None = field(default=None, kw_only=True)

    def logit_diff(self, correct: torch.Tensor, incorrect: torch.Tensor) -> torch.Tensor:
        """Each key's share of each head's direct ``logit_diff`` (answers [batch, K] ids, -1 padded):
        [heads, batch, positions, keys]."""
        return _logit_diff(self.logits, self.tokens, correct, incorrect)

    def by_span(self, spans: dict[str, torch.Tensor], correct: torch.Tensor, incorrect: torch.Tensor,
                position: int = -1) -> torch.Tensor:
        """Each head's direct share of the logit difference from each span it reads (``batch["spans"]``), at one
        read position of every example: [heads, batch, spans] — IOI's name movers write for the IO from the IO."""
        check_index("position", position, self.positions.shape[1])
        self._check_real(torch.arange(len(self.positions)), position)
        return span_sums(self.logit_diff(correct, incorrect)[:, :, position], spans)

    def top(self, tokenizer, correct: torch.Tensor, incorrect: torch.Tensor, k: int = 3, example: int = 0,
            position: int = -1) -> list[tuple[str, list]]:
        """For each head, the ``k`` key tokens of largest share (either sign) of its direct logit difference for one
        example at one read position: ``[(head, [(token, key position, share), …]), …]``."""
        check_counts(k=k)
        shares, keys = self._at_keys(correct, incorrect, example, position)
        order = shares.abs().topk(min(k, len(keys)), dim=-1).indices
        ids = self.input_ids[example, keys]
        return [(head, [(tokenizer.decode([int(ids[i])]), int(keys[i]), float(row[i])) for i in picks])
                for head, row, picks in zip(self.heads, shares, order.tolist())]

    def plot(self, tokenizer, correct: torch.Tensor, incorrect: torch.Tensor, path: str | Path | None = None, *,
             example: int = 0, position: int = -1, ax: Axes | None = None, title: str | None = None) -> Figure:
        """A heatmap of heads × the example's real tokens, each cell a head's direct share of the logit difference
        from its weight on that token times its value there (0 white, the signs apart)."""
        shares, keys = self._at_keys(correct, incorrect, example, position)
        tokens = [tokenizer.decode([int(i)]) for i in self.input_ids[example, keys]]
        return plot_heatmap(shares, self.heads, tokens, path, ax=ax, title=title, fmt="{:+.2f}")

    def _at_keys(self, correct: torch.Tensor, incorrect: torch.Tensor, example: int,
                 position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each head's shares over one example's real keys at one read position, [heads, keys], and those keys."""
        check_read(example, position, self.positions.shape)
        self._check_real(torch.tensor([example]), position)
        keys = self.attention_mask[example].bool().nonzero().flatten()
        return self.logit_diff(correct, incorrect)[:, example, position][:, keys.to(self.logits.device)], keys

    def _check_real(self, examples: torch.Tensor, position: int) -> None:
        """Refuse a read position that is padding in some of ``examples`` (``patterns.check_real``): a head's
        weights from a padding query are no token's, and neither is what it writes from them."""
        tokens = self.positions[examples, position]
        shared = f" (token {int(tokens[0])})" if len(tokens.unique()) == 1 else ""
        check_real(self.attention_mask, examples, tokens, f"read position {position}{shared}")

    def table(self, tokenizer, correct: torch.Tensor, incorrect: torch.Tensor, k: int = 3, example: int = 0,
              position: int = -1) -> str:
        """``top`` as aligned text, one row per head, each token with its key position."""
        width = max(len(head) for head in self.heads)
        return "\n".join(f"{head:>{width}}  " + "  ".join(f"{token!r}@{key} {v:+.2f}" for token, key, v in tops)
                         for head, tops in self.top(tokenizer, correct, incorrect, k, example, position))


def _logit_diff(values: torch.Tensor, tokens: torch.Tensor | None, correct: torch.Tensor,
                incorrect: torch.Tensor) -> torch.Tensor:
    """The ``logit_diff`` metric of ``values`` [rows, batch, …, vocab or K] (read at ``tokens``, or vocab-wide)."""
    return (_per_example(answer_mean, values, _columns(tokens, correct))
            - _per_example(answer_mean, values, _columns(tokens, incorrect)))


def _columns(tokens: torch.Tensor | None, token_ids: torch.Tensor) -> torch.Tensor:
    """Answer ids [batch, K] (-1 padded) as columns of logits read at ``tokens`` [batch, K'] (the ids themselves
    where the whole vocabulary was read): where each example's ``tokens`` hold them; an answer not read is refused."""
    if tokens is None:
        return token_ids
    ids = _answer_ids(token_ids, tokens.shape[0], tokens.device)
    found = (ids[:, :, None] == tokens[:, None, :]) & (ids[:, :, None] >= 0)
    missing = ((ids >= 0) & ~found.any(-1)).nonzero().tolist()
    if missing:
        example, k = missing[0]
        raise ValueError(f"token {int(ids[example, k])} (an answer of example {example}) was not read: "
                         "only the tokens given as tokens= were; give it there too")
    return torch.where(ids >= 0, found.int().argmax(-1), -1)


def _per_example(reduce, values: torch.Tensor, token_ids) -> torch.Tensor:
    """``reduce`` (``metrics.answer_mean`` or ``answer_sum``) of ``values`` [rows, batch, …, vocab] over each
    example's answer ids: [rows, batch, …], the batch moved next to the vocabulary, where the metrics keep it."""
    ids = _answer_ids(token_ids, values.shape[1], values.device)
    if (ids >= values.shape[-1]).any():
        raise ValueError(f"answer id {int(ids.max())} is past the vocabulary, which has {values.shape[-1]} tokens")
    return reduce(values.movedim(1, -2), ids).movedim(-1, 1)


def _answer_ids(token_ids, batch: int, device: torch.device) -> torch.Tensor:
    """Answer ids as [batch, K]: one answer per example may come as [batch] (a batch's ``correct[:, 0]``)."""
    ids = torch.as_tensor(token_ids, device=device)
    if ids.dim() not in (1, 2) or ids.shape[0] != batch or ids.is_floating_point():
        raise ValueError(f"answer ids of shape {list(ids.shape)} ({ids.dtype}): give the {batch} examples' token ids, "
                         "[batch] or [batch, K] (-1 padded), as a batch's correct and incorrect hold them")
    return ids[:, None] if ids.dim() == 1 else ids


@torch.no_grad()
def logit_lens(cm: CircuitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               nodes: list[str] | Circuit | None = None, positions: str | list[int] | torch.Tensor = "last") -> Lens:
    """Read the stream after every writer (``input``, ``a0``, ``m0``, ``a1``…) or, given ``nodes``, each node's
    own output, through the final norm and unembedding.  Given a ``Circuit``, its nodes that write (all but
    ``logits``), in graph order: what each part of the circuit pushes the prediction towards.

    ``positions``: ``"last"`` (each example's last real token, the one that predicts the answer), ``"all"``,
    a list of positions, or each example's own, [batch, positions] (IOI's S2: ``spans["S2"][:, 1:] - 1``)."""
    nodes = node_names(cm, nodes)
    if nodes is None:
        labels = ["input"] + [w.name for w in cm.graph.writers]
        values = cm.streams(input_ids, attention_mask)
    else:
        labels = nodes
        values = cm.activations(input_ids, attention_mask)[[cm.graph.node_index[n] for n in nodes]]
    read = _positions(input_ids, attention_mask, positions).to(values.device)
    values = _at(values, read)  # [labels, batch, positions, d_model]
    return Lens(labels, torch.stack([cm.readout(v) for v in values]), read.cpu())


@torch.no_grad()
def direct_logits(cm: CircuitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  nodes: list[str] | Circuit | None = None, positions: str | list[int] | torch.Tensor = "last",
                  tokens: list[int] | torch.Tensor | None = None, chunk_size: int = 16) -> DirectLogits:
    """Direct logit attribution: the logits each node (every upstream node, or ``nodes``; a ``Circuit``'s
    writing nodes) adds through the final norm, whose statistics — a row's mean square or variance — come from
    the whole stream and are held fixed.  Each node's output is taken in the final stream's scale (a model
    that rescales its stream, such as Gemma 4, has scaled it since).  ``positions`` as for ``logit_lens``.

    ``tokens``: read only these vocabulary ids — a list for every example, or [batch, K] ids per example, -1
    padded (a task's answers: ``torch.cat([batch["correct"], batch["incorrect"]], 1)``).  The readout is then
    pulled back once per token to the direction it reads in the stream, and each node's logit is its output's
    dot product with that direction: K backward passes through the unembedding instead of one forward per node.
    ``chunk_size``: how many nodes (or tokens) are taken through the readout at once."""
    labels = node_names(cm, nodes) or list(cm.graph.upstream)
    final = _FinalStream(cm, input_ids, attention_mask, positions, tokens)
    outputs = _at(cm.activations(input_ids, attention_mask), final.read.to(cm.device)) * final.scales[-1]
    picked = outputs[[cm.graph.node_index[n] for n in labels]]
    logits = final.through(torch.cat([picked, outputs.sum(0, keepdim=True)]), chunk_size)
    return DirectLogits(labels, logits[:-1], final.read, final.total, final.total - logits[-1], final.linear,
                        tokens=final.tokens)


@torch.no_grad()
def source_logits(cm: CircuitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                  heads: list[str] | Circuit | None, positions: str | list[int] | torch.Tensor = "last",
                  tokens: list[int] | torch.Tensor | None = None, chunk_size: int = 16) -> SourceLogits:
    """Direct logit attribution of ``heads`` (``"a23.h3"``…; a ``Circuit``'s heads, in graph order; every head where
    None), split by the key position each reads: which token's value a head moves into the answer.  A head's output
    is its attention weights times its values, summed over the keys, and its path to the logits is linear once the
    norms' statistics are frozen, so each key's part adds up to the head's direct logits (``direct_logits``).
    ``positions`` and ``tokens`` as for ``direct_logits``; each head takes one pass through its layer's output path
    per key (``cm.sources``)."""
    heads, picks = head_indices(cm, heads)
    final = _FinalStream(cm, input_ids, attention_mask, positions, tokens)
    wanted: dict[int, list[int]] = {}
    for layer, head in picks:
        wanted.setdefault(layer, []).append(head)
    writes = cm.sources(input_ids, attention_mask, heads=wanted)
    at = {w.layer: 1 + i for i, w in enumerate(cm.graph.writers) if w.kind == "attention"}  # its stream's scale
    parts = torch.stack([writes[layer][wanted[layer].index(head)] * (final.scales[-1] / final.scales[at[layer]])
                         for layer, head in picks])  # [heads, keys, batch, seq, d_model]
    logits = final.through(_at(parts.flatten(0, 1), final.read.to(cm.device)), chunk_size)
    logits = logits.unflatten(0, parts.shape[:2]).movedim(1, 3)  # [heads, batch, positions, keys, …]
    mask = real_tokens(input_ids, attention_mask)
    return SourceLogits(heads, logits, final.read, input_ids.cpu(), mask.cpu(), final.linear, tokens=final.tokens)


class _FinalStream:
    """The final stream at the positions read, with the readout frozen there (``norms.freeze_statistics``): what
    turns parts of the stream into their direct logits, vocab-wide or at each example's ``tokens``.

    ``read`` [batch, positions]; ``scales``: the stream's scales after each writer (``cm.stream_scales``);
    ``total``: the model's logits there (at ``tokens``, 0 at padding); ``tokens``: the [batch, K] table, or None."""

    def __init__(self, cm: CircuitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions,
                 tokens):
        cm.inputs(input_ids, attention_mask)  # refused by name (a prompt not batched…) before they are read here
        self.frozen, self.linear = freeze_statistics(cm.readout, cm.model_name)
        self.read = _positions(input_ids, attention_mask, positions)
        streams, self.scales = cm.streams_and_scales(input_ids, attention_mask)
        self.stream = _at(streams[-1:], self.read.to(cm.device))[0]
        bad = (~torch.isfinite(self.stream)).flatten(1).any(1).nonzero().flatten().tolist()
        if bad:  # the norm's statistics would be NaN, and with them every node's direct logits
            causes, remedies = nan_logits_advice(cm)
            raise ValueError(f"the final stream is NaN or infinite at the positions read in examples {bad[:8]}: the "
                             f"model's own logits are too (check cm(ids, mask); {causes}); {remedies}")
        self.total = cm.readout(self.stream)
        self.tokens = None if tokens is None else _token_table(tokens, batch=self.total.shape[0],
                                                               vocab=self.total.shape[-1])
        if self.tokens is not None:
            columns = self.tokens.to(cm.device)[:, None].expand(-1, self.stream.shape[1], -1)
            self.total = self.total.gather(-1, columns.clamp(min=0)) * (columns >= 0)

    def through(self, parts: torch.Tensor, chunk_size: int) -> torch.Tensor:
        """Direct logits of ``parts`` [rows, batch, positions, d_model] (in the final stream's scale):
        [rows, batch, positions, vocab or K].  At ``tokens``, each part's dot product with each token's direction."""
        if self.tokens is None:
            return vmap(lambda part: jvp(self.frozen, (self.stream,), (part,))[1], chunk_size=chunk_size)(parts)
        directions = _directions(self.frozen, self.stream, self.tokens.to(self.stream.device), chunk_size)
        common = torch.promote_types(parts.dtype, directions.dtype)  # an MoE's float32 write in a bf16 stream
        return torch.einsum("rbpd,kbpd->rbpk", parts.to(common), directions.to(common))


def _directions(frozen, stream: torch.Tensor, tokens: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """The direction in the stream that the frozen readout reads each example's k-th token along (the readout's
    row for it, pulled back through the frozen norm): [K, batch, positions, d_model]; padding reads nothing."""
    logits, pull = vjp(frozen, stream)
    vocab = torch.arange(logits.shape[-1], device=stream.device)

    def direction(ids: torch.Tensor) -> torch.Tensor:  # ids [batch]: one token per example
        return pull((vocab == ids[:, None, None]).to(logits.dtype).expand_as(logits))[0]

    return vmap(direction, chunk_size=chunk_size)(tokens.T)


def _token_table(tokens, batch: int, vocab: int) -> torch.Tensor:
    """``tokens`` as given to ``direct_logits`` — ids for every example, or [batch, K] per example, -1 padded —
    as a [batch, K] tensor, each id checked against the vocabulary."""
    table = torch.as_tensor(tokens)
    if table.dtype.is_floating_point or table.dtype == torch.bool or table.dim() not in (1, 2) or not table.numel():
        raise ValueError(f"tokens of shape {tuple(table.shape)} and dtype {table.dtype}: give vocabulary ids, a list "
                         f"for every example or [batch, K] per example (-1 padded)")
    if table.dim() == 1:
        table = table.expand(batch, -1)
    if table.shape[0] != batch:
        raise ValueError(f"tokens has {table.shape[0]} rows for {batch} examples: give one row per example, or a "
                         "list of ids for every example")
    bad = ((table < -1) | (table >= vocab)).nonzero().tolist()
    if bad:
        raise ValueError(f"token {int(table[tuple(bad[0])])} is not in the vocabulary of {vocab} tokens (-1 pads)")
    return table.long().cpu()


def node_names(cm: CircuitModel, nodes: list[str] | Circuit | None) -> list[str] | None:
    """Node names to read: as given (each checked), or a circuit's writing nodes in graph order."""
    if isinstance(nodes, Circuit):
        nodes.check_graph(cm.graph)
        nodes = [n for n in nodes.nodes if n in nodes.graph.node_index]
    if nodes is None:
        return None
    nodes = names(nodes, "node")
    if not nodes:
        raise ValueError("no nodes to read: give node names, or a circuit with edges (an empty circuit has no nodes)")
    unknown = [n for n in nodes if n not in cm.graph.node_index]
    if unknown:
        raise KeyError(f"unknown node{'s' if len(unknown) > 1 else ''} {unknown[:3]}: "
                       f"{cm.graph.not_a_node(unknown[0])}")
    return list(nodes)


def _at(values: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """[rows, batch, seq, d] at each example's read positions [batch, positions]: [rows, batch, positions, d]."""
    rows = torch.arange(values.shape[1], device=values.device)[:, None]
    return values[:, rows, read]


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions) -> torch.Tensor:
    batch, seq = input_ids.shape
    if isinstance(positions, str) and positions == "last":  # the position the metrics score
        mask = {} if attention_mask is None else {"attention_mask": attention_mask.cpu()}
        return answer_position({"clean": input_ids.cpu(), **mask})[:, None]
    if isinstance(positions, str) and positions == "all":
        return torch.arange(seq).expand(batch, seq)
    if isinstance(positions, torch.Tensor) and positions.dim() == 2:  # each example's own: a span's last token
        indices = not (positions.is_floating_point() or positions.dtype == torch.bool)
        if positions.shape[0] != batch or not indices or ((positions < -seq) | (positions >= seq)).any():
            raise ValueError(f"positions of shape {tuple(positions.shape)}: per-example positions are integers "
                             f"[batch={batch}, positions] from {-seq} to {seq - 1}")
        return positions.cpu()
    positions = positions.tolist() if hasattr(positions, "tolist") else positions  # a tensor or an array
    positions = [positions] if isinstance(positions, Integral) else positions
    listed = list(positions) if isinstance(positions, Iterable) and not isinstance(positions, str) else []
    if not listed or not all(isinstance(p, Integral) and not isinstance(p, bool) and -seq <= p < seq for p in listed):
        raise ValueError(f"positions={positions!r}: give 'last', 'all', a position or a list of positions from "
                         f"{-seq} to {seq - 1} (the prompts are {seq} tokens), or each example's own as a tensor "
                         f"[batch={batch}, positions]")
    return torch.tensor(listed).expand(batch, -1)
