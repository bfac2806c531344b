"""Information flow routes (Ferrando & Voita 2024): every edge scored by its share of what its reader reads.

    scores = fxcircuits.attribute(cm, batches, method="information-flow-routes")
    circuit = scores.greedy(0.01)   # as MIB cuts these scores

No metric, no corrupted prompt and no gradient: one clean run.  A reader d reads the stream x_d, to which every
upstream node u written before it has added its output c_u.  The edge u → d scores u's proximity to x_d,
max(0, ‖x_d‖₁ − ‖x_d − c_u‖₁), as a share of all of d's sources' proximities at that token, then averaged over
the prompt's real tokens and over the examples: each reader's incoming scores add up to 1.  These are the
formula and the averaging of EAP-IG's reference implementation (``information-flow-routes``), which MIB
evaluates by ``greedy`` cuts (``apply_greedy``).  As there, x_d is the stream as the model holds it, with what no
node writes (an output projection's bias) in it, and c_u is in the stream's scale at d (``stream_scales``).
One node differs: ``input`` is everything written before the first layer, position embeddings included, where
EAP-IG's is the token embedding alone (``hook_embed``) and a learned position embedding stays in the stream
unattributed; so on models with learned absolute positions (GPT-2, OPT) the scores differ from EAP-IG's (by up to
0.2 on a tiny random GPT-2), and on rotary ones they agree (1.8e-7 in float32, run against EAP-IG's own code).
All of a layer's q, k and v inputs read one stream, so they score alike, as in the reference; an ``input`` edge
that also carries a side input (the per-layer embeddings of Gemma 4's E models) is scored on the stream.  By span,
the average runs over each class's real tokens instead, and over the prompts that hold some (``attribute_by_span``).
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from .data import attention_mask, batch_list, check_prompts, class_names, position_classes, served_lengths
from .metrics import wide
from .model import CircuitModel

METHOD = "information-flow-routes"  # EAP-IG's and MIB's name
BLOCK = 2 ** 24  # values of the nodes' outputs laid out for the distances at once: [tokens, nodes, d_model]


def route_scores(cm: CircuitModel, batches: dict | Iterable[dict], spans: Sequence[str] | None = None,
                 by_span: bool = False, progress: bool = True) -> tuple[torch.Tensor, list[str] | None, int]:
    """Scores [classes, E] — one class, the whole prompt, unless ``by_span`` (the spans named, every span of the
    batches where None, then the rest) — the class names (by span) and the number of examples."""
    batches = batch_list(batches)
    if not batches:
        raise ValueError("no batches given: pass at least one batch (see fxcircuits.data.make_batches)")
    for batch in batches:
        check_prompts(batch, vocab_size=cm.vocab)
    names = class_names(batches, spans) if by_span else None  # every batch's classes lined up with the first's
    total, count, examples = None, 0, 0
    for batch in tqdm(served_lengths(cm, batches), desc=METHOD, unit="batch", disable=not progress or len(batches) < 2):
        weights = _classes(batch, names)
        shares = _shares(cm, batch["clean"].to(cm.device), attention_mask(batch).to(cm.device), weights)
        total = shares if total is None else total + shares
        count += weights.any(-1).sum(-1)  # per class, the prompts that hold some of its tokens
        examples += batch["clean"].shape[0]
    per_stream = total / count.clamp(min=1).to(total)[:, None, None]  # [classes, streams, upstream]
    graph = cm.graph
    return per_stream[:, _stream_of(cm)[graph.dst], graph.src], names, examples


def _classes(batch: dict, names: list[str] | None) -> torch.Tensor:
    """The batch's classes of real positions, [classes, B, S]: all of them as one, or by span, ``names`` ending
    with the rest (padding in none)."""
    real = attention_mask(batch).bool()
    if names is None:
        return real[None]
    weights = position_classes(batch, names[:-1])[1]
    return weights.bool() & real.to(weights.device)


def _stream_of(cm: CircuitModel) -> torch.Tensor:
    """For each downstream input, the index in ``CircuitModel.streams`` of the stream it reads: the stream after
    the last writer group among its sources, which are a prefix of the upstream nodes ending at a group's end."""
    ends = torch.tensor(cm.graph.group_sizes).cumsum(0)
    sources = torch.tensor(cm.graph.n_sources)
    stream = torch.searchsorted(ends, sources)
    if not torch.equal(ends[stream], sources):
        raise RuntimeError("a reader's sources end within a writer group, which no graph has")
    return stream


@torch.no_grad()
def _shares(cm: CircuitModel, input_ids: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Σ over the batch's examples of each node's share of each stream, averaged over the tokens of each class:
    [classes, streams, upstream] (0 for a node written after the stream).  A token's shares depend on that token
    alone, so they are taken a block of tokens at a time, the nodes' outputs there laid out [tokens, nodes, d_model]
    for ``torch.cdist``, whose L1 distances are the proximities' (five times faster on CPU than the differences
    taken one by one, where they are bound by memory)."""
    outputs = wide(cm.activations(input_ids, mask)).flatten(1, 2)  # [U, tokens, D], in the first layer's scale
    streams, scales = (wide(t) for t in cm.streams_and_scales(input_ids, mask))
    streams, unscaled = streams.flatten(1, 2), scales.eq(1).all(-1).tolist()
    weights = weights.to(outputs.device, outputs.dtype)  # [classes, B, S]
    real = weights.any(0).flatten()
    # each of a prompt's tokens of a class weighs 1 / their number, [classes, tokens]: a class absent adds 0
    averaging = (weights / weights.sum(-1, keepdim=True).clamp(min=1)).flatten(1)
    ends = torch.tensor(cm.graph.group_sizes).cumsum(0).tolist()
    names = ["input"] + [w.name for w in cm.graph.writers]
    shares = outputs.new_zeros(len(weights), len(streams), len(outputs))
    block = max(1, BLOCK // (outputs.shape[0] * outputs.shape[2]))
    for rows in torch.arange(outputs.shape[1], device=outputs.device).split(block):
        nodes = outputs[:, rows].transpose(0, 1).contiguous()  # [block, U, D]
        for k, (stream, scale) in enumerate(zip(streams, scales)):
            x, n = stream[rows], ends[k]
            written = nodes[:, :n] if unscaled[k] else nodes[:, :n] * scale  # in the stream's scale
            proximity = (x.abs().sum(-1, keepdim=True) - torch.cdist(x[:, None], written, p=1)[:, 0]).clamp(min=0)
            total = proximity.sum(-1, keepdim=True)
            share = proximity / torch.where(total > 0, total, 1)  # a stream no node is near at a token: no shares
            if not share[real[rows]].isfinite().all():
                raise ValueError(f"the stream after {names[k]} is not finite at a real token: information flow "
                                 "routes need a finite clean run (a float16 model overflowing? run it in float32)")
            shares[:, k, :n] += averaging[:, rows] @ share.where(real[rows, None], 0)
    return shares
