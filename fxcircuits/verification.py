"""Check a traced model against the HF model it was traced from, on the prompts a study will run.

The tests check every architecture they build on tiny random weights; a researcher's model has its own weights,
dtype, device and prompts, and perhaps code of its own.  ``verify`` asks the untouched model itself where it can
answer — its logits on the clean and on the corrupted prompts (every edge patched, or every edge into the logits),
its attention weights under eager attention — and, where it cannot, checks identities that must hold: masks run
in one call equal each run alone, patching every input of a head equals patching the head, every node's direct
logits and what no node writes add up to the logits, and so do a head's direct logits split by key.  Each check
is a largest difference over the real (unpadded) positions, in units of the largest |logit| (attention weights in
their own units), against a tolerance that follows the dtype.  ``Verification.merge`` makes one answer of several
batches' (``fxcircuits check`` checks every batch of a task: a batch of another length may be captured otherwise).
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .capture import evaluating
from .components import DecompositionError
from .graph import QKV
from .lens import direct_logits, source_logits
from .model import CircuitModel
from .rewrite import SourceWrites

FLOAT32_TOLERANCE = 1e-4  # what the tests hold every architecture to in float32, as a fraction of the logit scale
HALF_ULPS = 32  # bfloat16, float16: a patched run rounds at other places than the model does (see ``verify``)


@dataclass
class Check:
    """One check: ``difference`` (None where it could not run, ``skipped`` saying why); in a merged Verification,
    ``worst`` names the part (batch) whose difference it is."""
    name: str
    what: str
    difference: float | None = None
    skipped: str = ""
    worst: str = ""

    def passed(self, tolerance: float) -> bool:
        """Ran, and within ``tolerance`` (a NaN difference is not)."""
        return self.difference is not None and self.difference <= tolerance


@dataclass
class Verification:
    """``verify``'s answer: each check's largest difference, and whether all that ran are within ``tolerance``.
    ``readout``: how direct logit attribution reads this model — ``"linear"`` (exactly), ``"first order"``
    (soft-capped logits), or ``"refused: …"`` with the reason (patching does not need it).  ``parts``: in a merged
    Verification (``merge``), the ones merged, by the label naming each (a batch); empty for one ``verify``."""
    model: str
    checks: list[Check]
    tolerance: float
    readout: str
    parts: dict[str, Verification] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: dict[str, Verification]) -> Verification:
        """One Verification of several of one model under one tolerance (``verify`` on each batch of a task), by
        labels that name them: each check's largest difference over the parts that ran it, with the label of the
        part it came from (``Check.worst``), as a check is as wrong as its worst batch; a NaN anywhere is the
        difference, so that it fails rather than lose to a number in ``max``.  A check no part ran is skipped for
        the first part's reason.  The parts are kept, so ``failed_in`` can name every one a check failed in."""
        if not parts:
            raise ValueError("nothing to merge: give at least one Verification")
        first, *rest = parts.values()
        kind = (first.model, first.tolerance, [c.name for c in first.checks])
        if any((p.model, p.tolerance, [c.name for c in p.checks]) != kind for p in rest):
            raise ValueError("Verification.merge merges one model's checks under one tolerance; these differ in "
                             "model, tolerance or checks")
        checks = []
        for i, check in enumerate(first.checks):
            ran = [(label, p.checks[i].difference) for label, p in parts.items() if p.checks[i].difference is not None]
            if ran:
                label, difference = max(ran, key=lambda found: math.inf if math.isnan(found[1]) else found[1])
                checks.append(Check(check.name, check.what, difference, worst=label))
            else:
                checks.append(replace(check))
        return cls(first.model, checks, first.tolerance, first.readout, dict(parts))

    def failed_in(self, name: str) -> list[str]:
        """The labels of the parts (``merge``) in which check ``name`` failed: where to look for the prompts that
        it is wrong on."""
        return [label for label, part in self.parts.items() if any(c.name == name for c in part.failed)]

    @property
    def ok(self) -> bool:
        """Every check that ran is within the tolerance (a skipped check neither passes nor fails)."""
        return not self.failed

    @property
    def failed(self) -> list[Check]:
        """The checks that ran and differ by more than the tolerance (a difference that is NaN among them)."""
        return [c for c in self.checks if c.difference is not None and not c.passed(self.tolerance)]

    def table(self) -> str:
        """One line per check — its largest difference, ok / WRONG / skip, and what it compares; merged from
        several parts, the part it is largest in — as ``fxcircuits check`` prints it."""
        rows = [f"{'check':10s} {'difference':>10s}  {'':6s} what is compared"]
        for c in self.checks:
            if c.difference is None:
                rows.append(f"{c.name:10s} {'—':>10s}  {'skip':6s} {c.what} ({c.skipped})")
            else:
                verdict = "ok" if c.passed(self.tolerance) else "WRONG"
                where = f"; largest in {c.worst}" if len(self.parts) > 1 else ""
                rows.append(f"{c.name:10s} {c.difference:10.2e}  {verdict:6s} {c.what}{where}")
        rows.append(f"(the largest difference at real positions, in units of the largest |logit|, attention weights "
                    f"in their own; tolerance {self.tolerance:.2g})")
        return "\n".join(rows)


@torch.no_grad()
def verify(cm: CircuitModel, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
           corrupted_input_ids: torch.Tensor | None = None, *, tolerance: float | None = None) -> Verification:
    """Check ``cm`` (``trace(model)``) against ``model`` on these prompts, [batch, seq], padded either side.

    ``corrupted_input_ids``: the prompts patched in (a task's corrupted ones; default: each prompt's tokens in
    reverse order, run under the same attention mask).  ``tolerance``: the largest difference that passes; by
    default 1e-4 in float32 and float64, the tests' bound, and 32 units in the last place of bfloat16 or float16
    (0.25, 0.031), in which a patched run, summing its inputs in another order, matches the model only to their
    precision: on SmolLM2 (IOI's 32 prompts) it differs from HF by up to 9.2e-2 and 7.4e-3, as HF's own run in those
    dtypes differs from its float32 run (by 4.9e-2 and 4.1e-3 of the logits, 0.15 and 0.013 of the attention
    weights, on 8 of them).  So loose a tolerance can pass a small model traced wrong (a tiny GPT-2 without one
    head: 2.8e-2); float32 checks to the last digit.  The model
    is run in eval mode, each module's mode given back afterwards."""
    input_ids, attention_mask = cm.inputs(input_ids, attention_mask)
    corrupted = input_ids.flip(-1) if corrupted_input_ids is None else cm.inputs(corrupted_input_ids)[0]
    if corrupted.shape != input_ids.shape:
        raise ValueError(f"clean and corrupted prompts differ in shape ({tuple(input_ids.shape)} and "
                         f"{tuple(corrupted.shape)}): give the corrupted prompts padded as the clean ones")
    if tolerance is None:
        tolerance = FLOAT32_TOLERANCE if cm.dtype.itemsize >= 4 else HALF_ULPS * torch.finfo(cm.dtype).eps
    with evaluating(model):
        real = attention_mask.bool()
        clean, hf_corrupted = (_hf_logits(model, ids, attention_mask, real) for ids in (input_ids, corrupted))
        scale = clean[real].abs().max().item()

        def difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
            return ((ours.float() - reference.float())[real].abs().max() / scale).item()

        checks = _runs(cm, input_ids, attention_mask, corrupted, clean, hf_corrupted, difference)
        checks.append(_patterns(cm, model, input_ids, attention_mask))
    readings, readout = _readout(cm, input_ids, attention_mask, clean, scale)
    return Verification(cm.model_name, checks + readings, tolerance, readout)


def _hf_logits(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               real: torch.Tensor) -> torch.Tensor:
    """HF's logits, which the checks measure against: finite at every real position, or nothing to check."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    bad = (~logits.isfinite()).any(-1).logical_and(real).any(-1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the HF model's own logits are NaN or infinite on prompts {bad} (float16 overflowing?): "
                         "nothing to check against; run it in float32 or bfloat16")
    return logits


def _runs(cm: CircuitModel, input_ids, attention_mask, corrupted, clean, hf_corrupted,
          difference: Callable[[torch.Tensor, torch.Tensor], float]) -> list[Check]:
    """The checks of ``cm``'s own runs against the HF model's logits on the clean and on the corrupted prompts,
    and against each other where HF has no answer (masks in one call, a head's inputs against the head)."""
    edges = cm.graph.edges
    into_logits = torch.tensor([0.0 if e.endswith("->logits") else 1.0 for e in edges])

    def patched(**masks) -> torch.Tensor:
        return cm(input_ids, attention_mask, corrupted_input_ids=corrupted, **masks)

    return [Check("clean", "no mask = HF's logits", difference(cm(input_ids, attention_mask), clean)),
            Check("corrupted", "every edge patched = HF's logits on the corrupted prompts",
                  difference(patched(edge_mask=torch.zeros(len(edges))), hf_corrupted)),
            Check("logits", "every edge into the logits patched = HF's logits on the corrupted prompts",
                  difference(patched(edge_mask=into_logits), hf_corrupted)),
            Check("masks", "masks run in one call = each alone; an all-ones mask beside them = HF's logits",
                  _masks(cm, patched, clean, difference)),
            _heads(cm, patched, difference)]


def _masks(cm: CircuitModel, patched: Callable[..., torch.Tensor], clean: torch.Tensor,
           difference: Callable[[torch.Tensor, torch.Tensor], float]) -> float:
    """The largest difference of a mask run beside an all-ones one from the same mask alone, and of the all-ones
    mask from the clean logits; each mask patches the edge from ``input`` into the q input of a first, middle or
    last attention layer, or into a first, middle or last MLP.  A call's masks share the layers below the first
    reader they patch (``fxcircuits.prefix``), so each reader tried moves where that sharing ends."""
    graph, worst = cm.graph, 0.0
    for ports in ([p for p in graph.downstream if p.endswith(".h0<q>")], [p for p in graph.downstream if p[0] == "m"]):
        for port in _first_middle_last(ports):
            masks = torch.ones(2, len(graph.edges))
            masks[0, graph.edge_index[f"input->{port}"]] = 0.0
            together, alone = patched(edge_mask=masks), patched(edge_mask=masks[0])
            worst = max(worst, difference(together[0], alone), difference(together[1], clean))
    return worst


def _heads(cm: CircuitModel, patched: Callable[..., torch.Tensor],
           difference: Callable[[torch.Tensor, torch.Tensor], float]) -> Check:
    """Every edge into a head's q, k and v inputs patched against the head itself patched (``node_mask``), for the
    first and last head of a first, middle and last attention layer: the largest difference.

    The runs checked against HF cannot see how the heads' inputs are split: every edge patched, none, or those into
    the logits is the same run whichever head each q (k, v) input feeds, and ``masks`` compares the split with
    itself.  Here one head's inputs are patched alone, so they must reach that head's write, which the node mask
    takes from the exported graph's own per-head output split (``sources`` checks that one).  Exact, as a head
    computes its write from its q, k and v inputs alone — an output gate from its q input, which carries it; grouped
    keys and values from its own copy of the projection; keys and values an earlier layer computed read where that
    layer reads them, as its k and v inputs are — so with all three from the other run its write is the other run's,
    which the node mask sends, and nothing else changes.  Not so where a norm after attention (Gemma 2–4, OLMo 2)
    scales every head's write by a statistic of the layer's whole write: one head's inputs then move all of the
    layer's writes, which no node mask does, and no patched run gives one head other inputs than the rest of its
    layer without that.  There the layer's heads are patched together (``_head_groups``), which checks their reads
    but not which head each input feeds."""
    check = Check("heads", "every edge into a head's q, k, v patched = the head patched (where a norm couples "
                           "a layer's heads: all of them)")
    groups = _head_groups(cm)
    if not groups:
        check.skipped = "no attention heads"
        return check
    check.difference = max(difference(patched(edge_mask=_inputs_patched(cm, group)),
                                      patched(node_mask=dict.fromkeys(group, 0.0))) for group in groups)
    return check


def _inputs_patched(cm: CircuitModel, heads: list[str]) -> torch.Tensor:
    """An edge mask that patches every edge into ``heads``' q, k and v inputs and keeps the others."""
    ports = torch.tensor([cm.graph.port_index[f"{head}<{role}>"] for head in heads for role in QKV])
    return torch.isin(cm.graph.dst, ports).logical_not().float()


def _head_groups(cm: CircuitModel) -> list[list[str]]:
    """The heads ``_heads`` patches together: the first and the last head of a first, middle and last attention
    layer, one at a time, or all of a layer's heads at once where a norm couples them (``_norm_coupled``)."""
    coupled, groups = _norm_coupled(cm), []
    for writer in _first_middle_last([w for w in cm.graph.writers if w.kind == "attention" and w.n_heads]):
        heads = writer.nodes
        groups += [heads] if writer.layer in coupled else [[head] for head in _first_middle_last(heads, middle=False)]
    return groups


def _norm_coupled(cm: CircuitModel) -> set[int]:
    """The attention layers whose write path takes a statistic of the whole write (a norm's scale), read from the
    trace's own copy of that path with its statistics frozen for ``source_logits`` (``rewrite.SourceWrites``: a
    detached statistic) rather than found a second time; every capture has the same layers.  A path it refuses to
    freeze counts as coupled, since what it refuses mixes the write's values.  Not measured from runs: a coupled
    layer's node outputs look like those of heads that each write alone, and the runs that would differ (one head's
    inputs patched) are those under check."""
    detach = torch.ops.aten.detach.default
    writes = [n.target for n in cm.first.sources.graph.nodes if isinstance(n.target, SourceWrites)]
    return {w.layer for w in writes
            if w.refusal is not None or any(n.target is detach for n in w.write.graph.nodes)}


def _first_middle_last(items: list, middle: bool = True) -> list:
    """The first, middle and last of ``items`` (or the first and last), each once: where a check tries a few."""
    return list(dict.fromkeys(items[i] for i in ((0, len(items) // 2, -1) if middle else (0, -1)))) if items else []


def _patterns(cm: CircuitModel, model: nn.Module, input_ids, attention_mask) -> Check:
    """``cm.patterns`` against the weights HF gives under eager attention (``output_attentions``), at real query
    positions; the model's attention implementation is given back afterwards."""
    check = Check("patterns", "attention weights = HF's under eager attention")
    if not cm.graph.n_heads:
        check.skipped = "no attention layers"
        return check
    try:
        with _eager_attention(model):
            reference = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True,
                              use_cache=False).attentions
    except Exception as error:  # a model without eager attention, or whose outputs hold no weights
        check.skipped = f"HF gives no eager weights: {type(error).__name__}: {_first_line(error)}"
        return check
    reference = [a for a in reference or () if a is not None]
    ours = [w for w in cm.patterns(input_ids, attention_mask) if w is not None]
    if len(reference) != len(ours) or any(a.shape != b.shape for a, b in zip(ours, reference)):
        check.skipped = "HF's weights are not one per attention layer [batch, heads, query, key]"
        return check
    real = attention_mask.bool()
    check.difference = max((a.float() - b.float()).abs().amax(-1).amax(1)[real].max().item()
                           for a, b in zip(ours, reference))
    return check


@contextlib.contextmanager
def _eager_attention(model: nn.Module):
    """``model`` running eager attention, whose weights HF gives (``output_attentions``); its own given back."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        yield
    finally:
        model.set_attn_implementation(before)


def _readout(cm: CircuitModel, input_ids, attention_mask, clean: torch.Tensor,
             scale: float) -> tuple[list[Check], str]:
    """Direct logit attribution's identities: every node's direct logits and the rest add up to HF's logits at each
    prompt's last real token; read for a few tokens they equal the vocabulary-wide ones; the first and last heads'
    direct logits split by key position add up to theirs; and how the readout is read (``Verification.readout``)."""
    checks = [Check("direct", "every node's direct logits + the rest = HF's logits at the last token"),
              Check("tokens", "direct logits read for some tokens = the vocabulary-wide ones there"),
              Check("sources", "the first and last heads' direct logits by key position add up to theirs")]
    tokens = input_ids[:, -3:].cpu()  # ids the vocabulary surely holds
    heads = [n for n in cm.graph.upstream if n.startswith("a")]
    try:
        direct = direct_logits(cm, input_ids, attention_mask)
        some = direct_logits(cm, input_ids, attention_mask, tokens=tokens)
        sources = source_logits(cm, input_ids, attention_mask, heads=heads[:1] + heads[-1:]) if heads else None
    except DecompositionError as error:  # a readout the engine cannot freeze: patching does not need it
        for check in checks:
            check.skipped = "the readout is refused"
        return checks, f"refused: {_first_line(error)}"
    last = clean.float().cpu()[torch.arange(len(clean)), direct.positions[:, 0]]
    checks[0].difference = ((direct.logits.sum(0) + direct.rest)[:, 0] - last).abs().max().item() / scale
    read = direct.logits.gather(-1, tokens[None, :, None].expand(len(direct.labels), -1, direct.logits.shape[2], -1))
    checks[1].difference = (some.logits - read).abs().max().item() / scale
    if sources is None:
        checks[2].skipped = "no attention heads"
    else:
        split = sources.logits.sum(3) - direct.logits[[direct.labels.index(h) for h in sources.heads]]
        checks[2].difference = split.abs().max().item() / scale
    return checks, "linear" if direct.linear else "first order"


def _first_line(error: Exception) -> str:
    return (str(error).strip().splitlines() or [""])[0][:300]
