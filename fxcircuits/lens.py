"""The logit lens: what the residual stream, or one node's output, says about the next token.

``cm.streams`` gives the stream after each writer as the model holds it (with what no node writes, such as
an output projection's bias), ``cm.activations`` each node's output; ``cm.readout`` (the model's own final
norm and unembedding, cut out of the captured graph) turns either into logits.  Reading a circuit's nodes
this way is how the talk explains what they do (an MLP that "upweights years > YY"): ``nodes=circuit``.
"""
from __future__ import annotations

from dataclasses import dataclass
from numbers import Integral

import torch

from .circuit import Circuit
from .metrics import answer_position
from .model import CircuitModel


@dataclass
class Lens:
    """Logits read off ``labels`` (stream after a writer, or a node's output): [rows, batch, positions, vocab]."""
    labels: list[str]
    logits: torch.Tensor
    positions: torch.Tensor   # [batch, positions]: which token positions were read

    def probs(self) -> torch.Tensor:
        return self.logits.float().softmax(-1)

    def answer_probs(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Probability of each example's answer set ([batch, K] ids, -1 padded) per row and position:
        [rows, batch, positions]."""
        ids = token_ids.to(self.logits.device)
        valid = ids >= 0
        index = ids.clamp(min=0)[None, :, None, :].expand(*self.logits.shape[:3], -1)
        return (self.probs().gather(-1, index) * valid[None, :, None, :]).sum(-1)

    def top(self, tokenizer, k: int = 5, example: int = 0, position: int = -1) -> list[tuple[str, list]]:
        """For each row, the ``k`` likeliest tokens of one example at one of the read positions:
        ``[(label, [(token, probability), …]), …]``."""
        probs = self.probs()[:, example, position]
        values, ids = probs.topk(k, dim=-1)
        return [(label, [(tokenizer.decode([int(i)]), float(v)) for i, v in zip(row_ids, row_values)])
                for label, row_ids, row_values in zip(self.labels, ids, values)]

    def table(self, tokenizer, k: int = 5, example: int = 0, position: int = -1) -> str:
        """``top`` as aligned text, one row per label."""
        width = max(len(label) for label in self.labels)
        return "\n".join(f"{label:>{width}}  " + "  ".join(f"{token!r} {p:.2f}" for token, p in tops)
                         for label, tops in self.top(tokenizer, k, example, position))


@torch.no_grad()
def logit_lens(cm: CircuitModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
               nodes: list[str] | Circuit | None = None, positions: str | list[int] = "last") -> Lens:
    """Read the stream after every writer (``input``, ``a0``, ``m0``, ``a1``…) or, given ``nodes``, each node's
    own output, through the final norm and unembedding.  Given a ``Circuit``, its nodes that write (all but
    ``logits``), in graph order: what each part of the circuit pushes the prediction towards.

    ``positions``: ``"last"`` (each example's last real token, the one that predicts the answer), ``"all"``,
    or a list of positions."""
    if isinstance(nodes, Circuit):
        nodes = [n for n in nodes.nodes if n in nodes.graph.node_index]
    if nodes is not None and not len(nodes):
        raise ValueError("no nodes to read: give node names, or a circuit with edges (an empty circuit has no nodes)")
    if nodes is None:
        labels = ["input"] + [f"{'a' if w.kind == 'attention' else 'm'}{w.layer}" for w in cm.graph.writers]
        values = cm.streams(input_ids, attention_mask)
    else:
        unknown = [n for n in nodes if n not in cm.graph.node_index]
        if unknown:
            raise KeyError(f"unknown node{'s' if len(unknown) > 1 else ''} {unknown[:3]}: "
                           f"{cm.graph.not_a_node(unknown[0])}")
        labels = list(nodes)
        values = cm.activations(input_ids, attention_mask)[[cm.graph.node_index[n] for n in nodes]]
    read = _positions(input_ids, attention_mask, positions).to(values.device)
    rows = torch.arange(values.shape[1], device=values.device)[:, None]
    values = values[:, rows, read]  # [labels, batch, positions, d_model]
    return Lens(labels, torch.stack([cm.readout(v) for v in values]), read.cpu())


def _positions(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, positions) -> torch.Tensor:
    batch, seq = input_ids.shape
    if isinstance(positions, str) and positions == "last":  # the position the metrics score
        mask = {} if attention_mask is None else {"attention_mask": attention_mask.cpu()}
        return answer_position({"clean": input_ids.cpu(), **mask})[:, None]
    if isinstance(positions, str) and positions == "all":
        return torch.arange(seq).expand(batch, seq)
    positions = positions.tolist() if hasattr(positions, "tolist") else positions  # a tensor or an array
    if isinstance(positions, str) or not all(isinstance(p, Integral) and -seq <= p < seq for p in positions):
        raise ValueError(f"positions={positions!r}: give 'last', 'all' or a list of positions from {-seq} to "
                         f"{seq - 1} (the prompts are {seq} tokens)")
    return torch.tensor(list(positions)).expand(batch, -1)
