"""Ablation values: what a patched edge carries where the other run is no prompt but a value per node.

    values = fxcircuits.optimal_ablation(cm, task.batches)                   # learned once ...
    scores = fxcircuits.attribute(cm, task.batches, task.metric, method="eap", ablation=values)
    fxcircuits.Evaluator(cm, task.batches, task.metric, ablation=values)    # ... read by every method

Zero ablation sends zeros; mean ablation each node's mean output over a reference dataset; optimal ablation (Li &
Janson 2024, "Optimal ablation for interpretability"; MIB's "EAP (optimal ablation)" baseline) the constant that,
sent in place of that node's output alone at every token, keeps the model's loss on the reference prompts lowest.
Each is a constant per node, the same at every position and in every prompt, held as the patcher takes the other
run (``CircuitModel.patched``): per writer group [n, 1, 1, d_model], then per side input [1, 1, 1, …].  Positional
mean ablation (EAP-IG's and MIB's ``mean-positional``) is the mean at each position over prompts of one length,
[n, 1, seq, d_model]: it serves prompts of that length alone.
"""
from __future__ import annotations

import pickle
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from . import metrics
from .caller import gradients
from .data import attention_mask, batch_list, check_counts, check_prompts, fitting_call, served_lengths
from .model import CircuitModel
from .patching import dense_keep

NAMES = ("zero", "mean", "mean-positional", "optimal")
LOSSES = ("kl", "cross-entropy")
# Nodes ablated a call on CPU while learning optimal values: a call's stream bound, as for gradient points
# (``attribution.POINTS_CALL_STREAM``), since each such run is differentiated too.
CALL_STREAM = 2 ** 19


@dataclass(frozen=True, eq=False)
class Ablation:
    """Values that every patched edge carries from its source node: ``values`` as ``CircuitModel.patched`` takes the
    other run, computed once and read by every method and evaluation given ``ablation=`` this.  ``name``: how they
    were found (``"zero"``, ``"mean"``, ``"optimal"``); ``info``: what finding them measured.  Compared by identity
    (``==`` of lists of tensors has no one truth value)."""
    name: str
    values: list[torch.Tensor]
    info: dict = field(default_factory=dict)

    def __str__(self) -> str:
        return self.name

    @property
    def length(self) -> int | None:
        """The prompt length positional values serve (their seq axis); None for constants, which serve any."""
        seq = self.values[0].shape[2]
        return None if seq == 1 and self.name != "mean-positional" else seq

    def node(self, cm: CircuitModel, name: str) -> torch.Tensor:
        """The value node ``name`` (``cm.graph.upstream``) sends, [d_model]; positional ones, [seq, d_model]."""
        group, row = _place(cm, cm.graph.upstream.index(name) if name in cm.graph.upstream else -1, name)
        value = self.values[group][row, 0]
        return value[0] if self.length is None else value

    def save(self, path) -> None:
        """Write the values and ``info`` (``torch.save``): optimal ones take long to learn, and serve again."""
        torch.save({"name": self.name, "values": [v.cpu() for v in self.values], "info": self.info}, path)

    @classmethod
    def load(cls, path) -> Ablation:
        """Values ``save`` wrote, on the CPU; a patched run moves them to the model's device.  Any other file is
        refused by name (a circuit's ``.pt`` loads too, as a dict of other keys)."""
        try:
            saved = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
            raise ValueError(f"{path} is no file torch.save wrote: Ablation.save writes ablation values") from error
        if not isinstance(saved, dict) or not {"name", "values", "info"} <= saved.keys():
            raise ValueError(f"{path} holds no ablation values: Ablation.save writes them (discover saves optimal "
                             "ones beside the circuit, as <out>.optimal.pt)")
        return cls(saved["name"], saved["values"], saved["info"])

    def check(self, cm: CircuitModel) -> None:
        """Refuse values whose shapes are not ``cm``'s: found for another model, they would patch the wrong nodes."""
        seq = self.length or 1
        wanted = ([(n, 1, seq, cm.graph.d_model) for n in cm.graph.group_sizes]
                  + [(1, 1, seq, *shape) for shape in cm.side_shapes])
        given = [tuple(v.shape) for v in self.values]
        if given != wanted:
            raise ValueError(f"this {self.name} ablation holds values shaped {given[:3]}… ({len(given)} tensors), "
                             f"and {cm.model_name} takes {wanted[:3]}… ({len(wanted)}): it was found for another "
                             "model; compute it for this one")

    def check_prompts(self, attention_mask: torch.Tensor) -> None:
        """Refuse prompts that positional values do not serve: another length, or padded (a padded prompt's tokens
        are not at the positions the means were taken at)."""
        if self.length is None:
            return
        if attention_mask.shape[1] != self.length or not attention_mask.all():
            raise ValueError(f"positional mean ablation holds a mean for each of {self.length} positions, and a batch "
                             f"holds {_lengths(attention_mask)}: it serves unpadded prompts of {self.length} tokens "
                             "alone (prompts of one template), or use mean ablation")


def ablation_of(cm: CircuitModel, ablation: str | Ablation, reference: Iterable[dict] | None) -> Ablation | None:
    """``ablation`` as values (None for ``"corrupted"``: the corrupted prompt's run, recorded per batch); by name,
    computed over ``reference`` where the ablation reads one (mean, optimal)."""
    if isinstance(ablation, Ablation):
        if reference is not None:
            raise ValueError(f"this {ablation.name} ablation's values are computed already: drop reference=")
        ablation.check(cm)
        return ablation
    if ablation not in ("corrupted",) + NAMES:
        raise ValueError(f"unknown ablation {ablation!r}; choose one of corrupted, {', '.join(NAMES)}, or pass "
                         "values (fxcircuits.optimal_ablation(cm, batches), mean_ablation)")
    if reference is not None and ablation not in ("mean", "mean-positional", "optimal"):
        raise ValueError(f"reference= is the data mean and optimal ablation are computed over, and {ablation} "
                         "ablation does not read it: drop it, or pass ablation='mean' or 'optimal'")
    if ablation == "corrupted":
        return None
    if ablation == "zero":
        return zero_ablation(cm)
    if reference is None:
        raise ValueError(f"ablation={ablation!r} is computed over a reference dataset: pass reference=batches")
    if ablation == "optimal":
        return optimal_ablation(cm, reference)
    return mean_ablation(cm, reference, positional=ablation == "mean-positional")


def zero_ablation(cm: CircuitModel) -> Ablation:
    """Zeros for every node and side input."""
    wide = metrics.wide_dtype(cm.dtype)
    groups = [torch.zeros(n, 1, 1, cm.graph.d_model, dtype=wide) for n in cm.graph.group_sizes]
    return Ablation("zero", groups + [torch.zeros(1, 1, 1, *shape, dtype=wide) for shape in cm.side_shapes])


def mean_ablation(cm: CircuitModel, reference: dict | Iterable[dict], positional: bool = False) -> Ablation:
    """Every node's output and every side input averaged over the real tokens of ``reference``'s clean prompts, in
    float32 or the model's wider dtype.  ``positional``: averaged at each position apart, over prompts that must
    all be of one length and unpadded (EAP-IG's ``mean-positional``: a task's template puts each role at one
    position), [n, 1, seq, d_model]; it then serves prompts of that length alone (``Ablation.check_prompts``)."""
    prompts = _prompts(cm, reference)
    return _positional_mean(cm, prompts) if positional else _mean(cm, prompts)


def _positional_mean(cm: CircuitModel, prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> Ablation:
    """``mean_ablation(positional=True)`` over prompts already checked."""
    lengths = sorted({mask.shape[1] for _, mask in prompts})
    masks = torch.cat([mask for _, mask in prompts if mask.shape[1] == lengths[-1]])
    if len(lengths) > 1 or not masks.all():
        found = (f"batches of {', '.join(map(str, lengths))} tokens" if len(lengths) > 1
                 else f"padded {_lengths(masks)}")
        raise ValueError(f"positional mean ablation averages each position over prompts of one length, and the "
                         f"reference holds {found}: give unpadded prompts of one template's length, or use mean "
                         "ablation")
    with torch.no_grad():
        sums = None
        for ids, mask in prompts:
            batch_sums = [metrics.wide(v).sum(1, keepdim=True) for v in cm.recording(ids, mask)[0]]
            sums = batch_sums if sums is None else [t + s for t, s in zip(sums, batch_sums)]
    count = sum(len(ids) for ids, _ in prompts)
    return Ablation("mean-positional", [t / count for t in sums], {"prompts": count})


def _lengths(attention_mask: torch.Tensor) -> str:
    """How long the prompts of a batch's ``attention_mask`` are, in real tokens: "prompts of 12 to 17 tokens"."""
    real = attention_mask.sum(1)
    low, high = int(real.min()), int(real.max())
    return f"prompts of {low} tokens" if low == high else f"prompts of {low} to {high} tokens"


def _mean(cm: CircuitModel, prompts: list[tuple[torch.Tensor, torch.Tensor]]) -> Ablation:
    """``mean_ablation`` over prompts already checked; ``info["spread"]``: per value, the root mean square of its
    outputs about their mean, over the tokens and features, [n, 1, 1, 1] (the scale of an optimal ablation's
    steps)."""
    sums, squares, count = None, None, 0
    with torch.no_grad():
        for ids, mask in prompts:
            values = [metrics.wide(v) * mask.view(1, *mask.shape, *[1] * (v.dim() - 3))
                      for v in cm.recording(ids, mask)[0]]
            batch_sums = [v.sum((1, 2), keepdim=True) for v in values]
            batch_squares = [v.square().sum((1, 2), keepdim=True) for v in values]
            sums = batch_sums if sums is None else [t + s for t, s in zip(sums, batch_sums)]
            squares = batch_squares if squares is None else [t + s for t, s in zip(squares, batch_squares)]
            count += int(mask.sum())
    means = [t / count for t in sums]
    spread = [(q / count - m.square()).clamp(min=0).flatten(1).mean(1).sqrt().view(-1, *[1] * (m.dim() - 1))
              for q, m in zip(squares, means)]
    return Ablation("mean", means, {"tokens": count, "spread": spread})


def optimal_ablation(cm: CircuitModel, reference: dict | Iterable[dict], *, loss: str = "kl",
                     steps: int = 100, lr: float = 0.1, masks_per_call: int | None = None,
                     progress: bool = True) -> Ablation:
    """Each node's optimal ablation value: the constant which, sent along all of that node's edges at every token
    while every other node runs as it does, gives the lowest ``loss`` on ``reference``'s clean prompts.

    ``loss``: ``"kl"``, the divergence of the ablated model's next-token distributions from the model's own at
    every real token (Li & Janson's measure on IOI), or ``"cross-entropy"`` of the next token there (MIB's
    ``oa.py``).  The divergence is least at the model itself; the cross-entropy is not, and on a task's templated
    prompts a constant can learn the template — SmolLM2 with one of its MLPs replaced by a constant learned on IOI
    prompts predicts them better than the model does (``bench/RESULTS.md``): information the ablation puts in
    rather than takes out.

    Found by Adam from the mean ablation, every node at once: ``steps`` steps, each over all of ``reference``.  A
    value moves in units of its node's spread (the root mean square of its outputs about their mean), about ``lr``
    of one a step at most, so that one ``lr`` serves heads that write 1e-3 and MLPs that write 1e2.  A call ablates
    ``masks_per_call`` nodes (default: 32 on an accelerator; on CPU as many as keep a call's stream within
    ``CALL_STREAM`` values); each node's loss depends on its own value alone, so one backward pass gives each its
    own gradient.  Each node keeps the value of its lowest loss seen: its mean where no step did better.

    ``info``: the loss of the model itself (``"model"``), and per node in ``graph.upstream`` order its loss under
    mean ablation (``"mean"``) and under the values returned (``"optimal"``); a node's optimal loss less the
    model's is Li & Janson's Δ, its importance.  Deterministic."""
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    check_counts(steps=steps, masks_per_call=masks_per_call)
    if not lr > 0:
        raise ValueError(f"lr={lr!r}: Adam's learning rate is a positive number")
    prompts = _prompts(cm, reference)
    start = _mean(cm, prompts)
    targets = [_targets(cm, ids, mask, loss) for ids, mask in prompts]
    tokens = sum(int(weights.sum()) for _, weights in targets)
    if not tokens:
        raise ValueError("optimal ablation learns from each prompt's next tokens, and no prompt of reference has two "
                         "real tokens: give longer prompts")
    moved = [torch.zeros_like(v, requires_grad=True) for v in start.values]  # in units of each node's spread
    best, lowest = [v.clone() for v in start.values], None
    optimizer = torch.optim.Adam(moved, lr=lr)
    chunks = torch.arange(len(cm.graph.upstream)).split(_per_call(cm, prompts, masks_per_call))
    for step in tqdm(range(steps + 1), desc="optimal ablation", disable=not progress):
        learning = step < steps  # the last pass measures the last values alone
        values = [m + s * d.detach() for m, s, d in zip(start.values, start.info["spread"], moved)]
        losses, grads = _pass(cm, prompts, targets, values, chunks, loss, tokens, learning)
        lowest = losses if lowest is None else lowest
        _keep_better(cm, best, values, losses <= lowest)
        lowest = torch.minimum(lowest, losses)
        if step == 0:
            info = {"loss": loss, "steps": steps, "lr": lr, "mean": losses,
                    "model": _model_loss(cm, prompts, targets, loss) / tokens}
        if learning:
            for d, s, g in zip(moved, start.info["spread"], grads):
                d.grad = s * g
            optimizer.step()
    return Ablation("optimal", best, {**info, "optimal": lowest.cpu()})


def _prompts(cm: CircuitModel, reference: dict | Iterable[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``reference``'s clean prompts and their masks, checked and on the model's device, at lengths a capture
    serves; a list, which a value ablation reads more than once."""
    batches = batch_list(reference)
    for batch in batches:
        check_prompts(batch, vocab_size=cm.vocab)
    prompts = [cm.inputs(batch["clean"], attention_mask(batch)) for batch in served_lengths(cm, batches)]
    if not prompts:
        raise ValueError("a mean or optimal ablation is computed over reference batches, but reference holds none")
    return prompts


def _targets(cm: CircuitModel, ids: torch.Tensor, mask: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor]:
    """What a prompt's loss compares with at each position but the last — the next token, or the model's own
    next-token log-probabilities — and the weight of each position: 1 where it and the next are real tokens."""
    weights = (mask[:, :-1] * mask[:, 1:]).to(metrics.wide_dtype(cm.dtype))
    if loss == "cross-entropy":
        return ids[:, 1:], weights
    with torch.no_grad():
        return metrics.wide(cm(ids, mask)[:, :-1]).log_softmax(-1), weights


def _token_losses(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    """Per position, the loss of ``logits`` [..., batch, seq − 1, vocab] against ``target``, [..., batch,
    seq − 1]."""
    logprobs = metrics.wide(logits).log_softmax(-1)
    if loss == "cross-entropy":
        return -logprobs.gather(-1, target.expand(*logprobs.shape[:-1])[..., None])[..., 0]
    return (target.exp() * (target - logprobs)).sum(-1)


def _pass(cm: CircuitModel, prompts, targets, values: list[torch.Tensor], chunks: tuple[torch.Tensor, ...],
          loss: str, tokens: int, learning: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One pass over the reference: each node's loss with it alone ablated to its value, averaged over the
    ``tokens``, [n_upstream]; where ``learning``, each value's gradient, which only its own node's loss moves.  One
    call's graph is held at a time, and the model's weights are given no gradient."""
    losses = torch.zeros(len(cm.graph.upstream), dtype=values[0].dtype)
    grads = [torch.zeros_like(v) for v in values]
    leaves = [v.detach().requires_grad_(learning) for v in values]
    for (ids, mask), (target, weights) in zip(prompts, targets):
        for chunk in chunks:
            with gradients("optimal ablation") if learning else torch.no_grad():
                summed = _losses(cm, ids, mask, target, weights, leaves, chunk, loss) / tokens
                if learning:
                    for grad, found in zip(grads, torch.autograd.grad(summed.sum(), leaves, allow_unused=True)):
                        if found is not None:
                            grad += found
            losses.index_add_(0, chunk, summed.detach().cpu())
    return losses, grads


def _losses(cm: CircuitModel, ids: torch.Tensor, mask: torch.Tensor, target: torch.Tensor, weights: torch.Tensor,
            values: list[torch.Tensor], chunk: torch.Tensor, loss: str) -> torch.Tensor:
    """One batch's token losses summed with each node of ``chunk`` ablated alone to its value, [len(chunk)]."""
    node_mask = torch.ones(len(chunk), len(cm.graph.upstream), device=cm.device)
    node_mask[torch.arange(len(chunk)), chunk.to(cm.device)] = 0.0
    keep = dense_keep(cm.graph, node_mask=node_mask, device=cm.device)
    logits = cm.patched(ids, mask, [v.to(cm.device, cm.dtype) for v in values], keep)[:, :, :-1]
    return (_token_losses(logits, target, loss) * weights).sum((1, 2))


def _model_loss(cm: CircuitModel, prompts, targets, loss: str) -> float:
    """The summed token losses of the model itself: what no value can beat, where the node does its job."""
    with torch.no_grad():
        return sum(float((_token_losses(cm(ids, mask)[:, :-1], target, loss) * weights).sum())
                   for (ids, mask), (target, weights) in zip(prompts, targets))


def _keep_better(cm: CircuitModel, best: list[torch.Tensor], values: list[torch.Tensor], better: torch.Tensor) -> None:
    """Copy into ``best`` the values of the nodes whose loss is no higher than their lowest before; the side
    inputs go with the ``input`` node, whose edges carry them."""
    with torch.no_grad():
        first = 0
        for group, size in enumerate(cm.graph.group_sizes):
            rows = better[first:first + size].to(best[group].device)
            best[group][rows] = values[group].detach()[rows]
            first += size
        if better[0]:
            for side in range(len(cm.graph.group_sizes), len(values)):
                best[side].copy_(values[side].detach())


def _place(cm: CircuitModel, index: int, name: str) -> tuple[int, int]:
    """The writer group and row of upstream node ``index``."""
    if index < 0:
        raise ValueError(f"no node {name!r} in {cm.model_name}'s graph: its nodes are cm.graph.upstream "
                         f"({', '.join(cm.graph.upstream[:3])}, …)")
    for group, size in enumerate(cm.graph.group_sizes):
        if index < size:
            return group, index
        index -= size
    raise AssertionError("group sizes add up to the upstream nodes")


def _per_call(cm: CircuitModel, prompts, given: int | None) -> int:
    """Nodes ablated a call (``data.fitting_call``): 32 at most, each a stream [batch, seq, d_model]."""
    stream = max(ids.numel() for ids, _ in prompts) * cm.graph.d_model
    return fitting_call(cm.device, stream, given, cpu_stream=CALL_STREAM, most=32, accelerator=32)
