"""Attention patterns: where a circuit's heads look.

A circuit says which heads carry a behaviour; their patterns say what those heads read.  In IOI, the name movers
attend from the last token to the indirect object, and that is how the talk tells them from other heads.
``cm.patterns`` gives every head's weights as the model's own run computes them; ``attention_patterns`` picks
heads by their node names and reads them from one query position, by default the one the metrics score.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .circuit import Circuit
from .data import check_counts, real_tokens, span_sums
from .draw import plot_heatmap
from .graph import names
from .metrics import answer_position
from .model import CircuitModel


@dataclass
class Patterns:
    """The attention weights of ``heads`` (node names, ``a{layer}.h{head}``): [heads, batch, seq_q, seq_k], with
    the prompts they were computed on (``attention_mask`` [batch, seq], 0 at padding)."""
    heads: list[str]
    weights: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def __getitem__(self, head: str) -> torch.Tensor:
        """One head's weights, [batch, seq_q, seq_k]."""
        if head not in self.heads:
            raise KeyError(f"{head!r} is not among these patterns' heads ({', '.join(self.heads[:4])}…)")
        return self.weights[self.heads.index(head)]

    def query(self, example: int = 0, position: int | str = "last") -> tuple[torch.Tensor, torch.Tensor]:
        """Every head's weights from one query position of one example over that example's real tokens,
        [heads, keys], and those tokens' positions.  ``position``: ``"last"`` (the example's last real token, the
        one that predicts the answer) or an index into the sequence."""
        check_index("example", example, len(self.input_ids))
        if isinstance(position, str) and position == "last":
            position = int(answer_position({"clean": self.input_ids, "attention_mask": self.attention_mask})[example])
        else:
            check_index("position", position, self.input_ids.shape[1], also=", 'last' for the last real token")
        check_real(self.attention_mask, torch.tensor([example]), torch.tensor([position]), f"position {position}")
        keys = self.attention_mask[example].bool().nonzero().flatten()
        return self.weights[:, example, position][:, keys], keys

    def top(self, tokenizer, k: int = 3, example: int = 0, position: int | str = "last") -> list[tuple[str, list]]:
        """For each head, the ``k`` tokens it attends to most from one query position:
        ``[(head, [(token, weight), …]), …]`` (tokens as the tokenizer decodes them, one by one)."""
        check_counts(k=k)
        weights, keys = self.query(example, position)
        values, order = weights.topk(min(k, len(keys)), dim=-1)
        ids = self.input_ids[example, keys.to(self.input_ids.device)]
        return [(head, [(tokenizer.decode([int(ids[i])]), float(v)) for i, v in zip(row, row_values)])
                for head, row, row_values in zip(self.heads, order.tolist(), values)]

    def table(self, tokenizer, k: int = 3, example: int = 0, position: int | str = "last") -> str:
        """``top`` as aligned text, one row per head."""
        width = max(len(head) for head in self.heads)
        return "\n".join(f"{head:>{width}}  " + "  ".join(f"{token!r} {w:.2f}" for token, w in tops)
                         for head, tops in self.top(tokenizer, k, example, position))

    def by_span(self, spans: dict[str, torch.Tensor], query: int | str = "last") -> torch.Tensor:
        """The weight each head puts on each span's tokens (``batch["spans"]``) from one query position of every
        example, [heads, batch, spans]: prompts of different templates, lined up by role.  ``query``: ``"last"``,
        an index, or a span's name (its last token: IOI's ``"S2"``)."""
        if isinstance(query, str) and query != "last":
            if query not in spans:
                raise KeyError(f"no span named {query!r} to query from; the spans are {', '.join(spans)}")
            positions = spans[query][:, 1].cpu() - 1
        elif query == "last":
            positions = answer_position({"clean": self.input_ids, "attention_mask": self.attention_mask})
        else:
            seq = self.input_ids.shape[1]
            check_index("query position", query, seq, also=", 'last' for the last real token, or a span's name")
            positions = torch.full((len(self.input_ids),), query % seq)
        check_real(self.attention_mask, torch.arange(len(positions)), positions, f"query {query!r}")
        rows = self.weights[:, torch.arange(len(positions)), positions.to(self.weights.device)]  # [heads, batch, keys]
        return span_sums(rows, spans)

    def plot(self, tokenizer, path: str | Path | None = None, *, example: int = 0, position: int | str = "last",
             ax: Axes | None = None, title: str | None = None) -> Figure:
        """A heatmap of ``query``: heads × the example's tokens, each cell the weight one head puts on one token, on
        a scale from 0 to 1."""
        weights, keys = self.query(example, position)
        tokens = [tokenizer.decode([int(i)]) for i in self.input_ids[example, keys.to(self.input_ids.device)]]
        return plot_heatmap(weights, self.heads, tokens, path, ax=ax, cmap="Blues", limits=(0.0, 1.0),
                            title=title)


@torch.no_grad()
def attention_patterns(cm: CircuitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       heads: list[str] | Circuit | None = None) -> Patterns:
    """The attention patterns of ``heads`` (node names such as ``"a9.h6"``; a ``Circuit``'s heads, in graph order;
    every head where None) on a batch."""
    heads, picks = head_indices(cm, heads)
    layers = cm.patterns(input_ids, attention_mask, layers={layer for layer, _ in picks})
    weights = torch.stack([layers[layer][:, head] for layer, head in picks])
    mask = real_tokens(input_ids, attention_mask)
    return Patterns(heads, weights, input_ids.cpu(), mask.cpu())


def check_read(example, position, read: torch.Size) -> None:
    """Refuse an example or a read position out of the ``read`` [batch, positions] range by name: a bare index
    error would not say which."""
    check_index("example", example, read[0])
    check_index("position", position, read[1])


def check_index(what: str, index, size: int, also: str = "") -> None:
    """Refuse ``index`` where it is no int from -``size`` to ``size`` - 1, naming ``what`` it indexes (``also``:
    what else it may be): a bare IndexError would not say which, and a float or a string fails deeper, in torch."""
    if isinstance(index, bool) or not isinstance(index, Integral) or not -size <= index < size:
        given = "" if isinstance(index, Integral) else f"; give an int ({type(index).__name__} given)"
        raise IndexError(f"{what}={index!r}: {size} {what}s were read, {what} 0 to {size - 1} (or -1 for the "
                         f"last{also}){given}")


def check_real(attention_mask: torch.Tensor, examples: torch.Tensor, positions: torch.Tensor, what: str) -> None:
    """Refuse a query position (``positions``, of ``examples``) that is padding, naming the examples: a padding
    query attends to nothing, so what is read there — its weights, what a head writes from them — is no token's
    behaviour, only what the implementation fills in."""
    padding = ~attention_mask[examples, positions].bool()
    if padding.any():
        bad = examples[padding].tolist()
        raise ValueError(f"{what} of example{'s' * (len(bad) > 1)} {', '.join(map(str, bad[:8]))} is padding: it "
                         "attends to nothing; query one of the prompt's real tokens (attention_mask 1)")


def head_indices(cm: CircuitModel, heads: list[str] | Circuit | None) -> tuple[list[str], list[tuple[int, int]]]:
    """Head node names (every head where None; a circuit's heads, in graph order), each checked, and their
    (layer, head) indices."""
    every = [n for n in cm.graph.upstream if n.startswith("a")]
    if isinstance(heads, Circuit):  # as the lens reads a circuit's nodes (``lens.node_names``)
        heads.check_graph(cm.graph)
        heads = [n for n in heads.nodes if n in every]
        if not heads:
            raise ValueError("the circuit has no heads (no edge leaves or enters an a{layer}.h{head} node): give "
                             f"head names{f', e.g. {every[0]!r}' if every else ''}")
    heads = every if heads is None else names(heads, "head")
    unknown = [h for h in heads if h not in every]
    if not heads:
        raise ValueError(f"no heads given: name some, e.g. {every[0]!r} (see cm.graph.upstream)")
    if unknown:
        raise KeyError(f"unknown head(s) {unknown[:3]}; heads are named a{{layer}}.h{{head}}, e.g. {every[0]!r} "
                       "(see cm.graph.upstream)")
    return heads, [(int(layer[1:]), int(head[1:])) for layer, head in (h.split(".") for h in heads)]
