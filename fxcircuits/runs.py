"""Batches made ready to patch, shared by attribution and evaluation.

Preparing a batch runs what every later patched call reuses: the other run's activations (the corrupted
prompt's, or an ablation's values: ``fxcircuits.ablations``) and, for metrics that compare with the clean run
(KL), the clean logits.
"""
from __future__ import annotations

import gc
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TypeVar

import torch
from tqdm.auto import tqdm

from . import metrics
from .ablations import NAMES, Ablation, ablation_of
from .data import batch_list, check_batch, fitting_call, position_classes, served_lengths, to_device
from .model import CircuitModel
from .patching import Tap, class_keep, dense_keep

ABLATIONS = ("corrupted",) + NAMES  # by name
T = TypeVar("T")


@dataclass
class Prepared:
    """One batch on the model's device: its inputs, and the other run's outputs per writer group."""
    batch: dict
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    other: list[torch.Tensor]   # per writer group: [n, batch or 1, seq, d_model]; then per side input [1, …]
    recorded: list[torch.Tensor] | None = None  # the corrupted run's projections (CircuitModel.recording)
    positions: torch.Tensor | None = None  # [batch]: the one position the metric reads, where it reads one

    @property
    def size(self) -> int:
        return self.input_ids.shape[0]

    def classes(self, spans: list[str]) -> torch.Tensor:
        """The batch's classes of positions (``data.position_classes``: the spans named, then the rest) over its
        prompts as prepared, which a capture may have padded: [classes, batch, seq]."""
        return position_classes({**self.batch, "clean": self.input_ids}, spans)[1]

    def measure(self, cm: CircuitModel, metric, keep: torch.Tensor, *, input_ids: torch.Tensor | None = None,
                other: list[torch.Tensor] | None = None, tap: Tap | None = None,
                recorded: list[torch.Tensor] | None = None, where: torch.Tensor | None = None) -> torch.Tensor:
        """``metric`` of this batch's patched runs under ``keep`` (``CircuitModel.patched``; ``input_ids`` and
        ``other`` default to the batch's own; ``where``: the positions each mask patches), [n_masks, batch].  Where
        the metric reads the answer position alone, the logits are computed there alone, and the metric reads them
        as position 0."""
        logits = cm.patched(self.input_ids if input_ids is None else input_ids, self.attention_mask,
                            self.other if other is None else other, keep, tap, recorded, positions=self.positions,
                            where=where)
        batch = self.batch if self.positions is None else {**self.batch, "position": torch.zeros_like(self.positions)}
        return metrics.measured(metric, logits, batch)


def call_size(prepared: list[Prepared], given: int | None, *, cpu_stream: int, most: int,
              accelerator: int) -> int:
    """How many masks a patched call runs on ``prepared`` (``data.fitting_call``, for its largest batch)."""
    stream = max(p.input_ids.numel() * p.other[0].shape[-1] for p in prepared)
    return fitting_call(prepared[0].input_ids.device, stream, given, cpu_stream=cpu_stream, most=most,
                        accelerator=accelerator)


class Calls:
    """How many masks — patched runs, or gradient points — a call runs: ``size`` (``call_size``), halved for that
    call and every later one where a call runs out of the accelerator's memory.  A patched call keeps each of its
    masks' differences from every upstream node, and a point's backward every reader's input, so on a large model a
    few masks can need more memory than the device has (EAP-IG's reference runs out on 8B models on an 80 GB GPU);
    where even one is too many, smaller batches are the way, and the error says so."""

    def __init__(self, size: int):
        self.size = size

    def run(self, calls: Callable[[int], T], prepared: list[Prepared]) -> T:
        """``calls(n)`` with n = ``size``: what it returns, or, where it ran out of memory, ``calls`` again at half."""
        while True:
            try:
                return calls(self.size)
            except torch.OutOfMemoryError as error:
                if self.size == 1:
                    largest = max(prepared, key=lambda p: p.input_ids.numel())
                    raise torch.OutOfMemoryError(
                        f"one patched run of a batch of {largest.size} prompts of {largest.input_ids.shape[1]} tokens "
                        f"takes more memory than {largest.input_ids.device} has free ({error}); give smaller batches "
                        "(batch_size of make_batches or tasks.load, --batch-size on the command line)") from error
            warnings.warn(f"out of memory at {self.size} masks a call: running {max(1, self.size // 2)} a call from "
                          "here on (masks_per_call=, or --per-call, starts there)", stacklevel=2)
            self.size = max(1, self.size // 2)
            gc.collect()  # the failed call's tensors, held by its traceback until now
            if torch.accelerator.is_available():
                torch.accelerator.empty_cache()

    def split(self, masks: torch.Tensor, call: Callable[[torch.Tensor], torch.Tensor], prepared: list[Prepared],
              desc: str | None = None) -> torch.Tensor:
        """``call`` on ``masks`` [n, …], ``size`` of them a call, the results joined along the first dimension; with
        a progress bar over the calls where ``desc`` names it."""
        def calls(n: int) -> torch.Tensor:
            chunks = masks.split(n)
            bar = tqdm(chunks, desc=desc, disable=desc is None or len(chunks) < 2)
            return torch.cat([call(chunk) for chunk in bar])
        return self.run(calls, prepared)


def prepare(cm: CircuitModel, batches: dict | Iterable[dict], metric, ablation: str | Ablation = "corrupted",
            reference: Iterable[dict] | None = None) -> list[Prepared]:
    """Check and prepare every batch; ``ablation`` picks the other run: the corrupted prompt, or values
    (``fxcircuits.ablations``: by name, computed over ``reference`` where they read one)."""
    values = ablation_of(cm, ablation, reference)
    batches = batch_list(batches)
    for batch in batches:  # before padding, which would hide clean and corrupted prompts of different lengths
        check_batch(batch, vocab_size=cm.vocab)  # answers index the logits: an id past them fails deep in a metric
    prepared = [_prepare(cm, batch, metric, values) for batch in served_lengths(cm, batches)]
    if not prepared:
        raise ValueError("no batches given: pass at least one batch (see fxcircuits.data.make_batches)")
    return prepared


def _prepare(cm: CircuitModel, batch: dict, metric, values: Ablation | None) -> Prepared:
    batch = to_device(batch, cm.device)
    ids, mask = cm.inputs(batch["clean"], batch.get("attention_mask"))
    with torch.no_grad():
        if metrics.needs_clean_logits(metric):
            batch["clean_logits"] = metrics.logits_at_answer(cm(ids, mask), batch)
        recorded = None
        if values is None:
            other, recorded = cm.recording(batch["corrupted"], mask)
        else:
            values.check_prompts(mask)
            other = [v.to(cm.device, cm.dtype) for v in values.values]
    positions = metrics.answer_position(batch) if metrics.reads_answer_alone(metric) else None
    return Prepared(batch, ids, mask, other, recorded, positions)


def examples(prepared: list[Prepared]) -> int:
    return sum(p.size for p in prepared)


def metric_values(cm: CircuitModel, prepared: list[Prepared], metric, masks: torch.Tensor,
                  spans: list[str] | None = None) -> torch.Tensor:
    """The metric of every example under every edge mask [n, E], patched in one call per batch: [n, examples].
    With ``spans``, the masks are positional, [n, classes, E]: one per class of positions, the spans named and
    the rest (``data.position_classes``), each applied at its class's tokens of each prompt."""
    keep = keep_of(cm, masks, spans)
    with torch.no_grad():
        values = [p.measure(cm, metric, keep, recorded=p.recorded, where=None if spans is None else p.classes(spans))
                  for p in prepared]
    return torch.cat(values, -1).cpu()


def keep_of(cm: CircuitModel, masks: torch.Tensor, spans: list[str] | None) -> torch.Tensor:
    """Edge masks [n, E], or with ``spans`` positional ones [n, classes, E], as the block a patched call reads,
    on the model's device."""
    masks = masks.to(cm.device)
    if spans is None:
        return dense_keep(cm.graph, masks, device=cm.device)
    return class_keep(cm.graph, masks, None, masks.shape[1], device=cm.device)


def ends(graph) -> torch.Tensor:
    """The two masks faithfulness is measured between, [2, E]: every edge kept (the model), every edge patched."""
    return torch.stack([torch.ones(len(graph.edges)), torch.zeros(len(graph.edges))])


def check_finite(cm: CircuitModel, prepared: list[Prepared], metric, values: torch.Tensor | None = None) -> None:
    """Raise naming the examples where the metric is NaN or infinite on the clean run or with every edge patched
    (``values``: those two runs' metric [2, examples], when already computed).  A score or a faithfulness averaged
    over such an example is NaN too, and would not say why; the model's own logits are the usual cause."""
    if values is None:
        values = metric_values(cm, prepared, metric, ends(cm.graph))
    for row, run in zip(values, ("the clean run", "the run with every edge patched")):
        bad = (~torch.isfinite(row)).nonzero().flatten().tolist()
        if bad:
            causes, remedies = nan_logits_advice(cm)
            raise ValueError(f"the metric is NaN or infinite on {run} of {len(bad)} of {row.numel()} examples "
                             f"(counting from 0 over the batches: {', '.join(map(str, bad[:8]))}"
                             f"{' …' if len(bad) > 8 else ''}), and so would every score and faithfulness be. The "
                             f"model's own logits are the usual cause: check cm(ids, mask) there ({causes}), then "
                             f"{remedies}")


def nan_logits_advice(cm: CircuitModel) -> tuple[str, str]:
    """Where the model's own logits are NaN or infinite, the usual causes for ``cm``'s model and dtype, and the ways
    out: one advice for every error that meets them (``check_finite``, the lens's final stream)."""
    return (f"{cm.model_name} in {cm.dtype}: float16 can overflow, and some HF models return NaN in float64 under "
            "padding", "run the model in float32, pad on the other side, or leave those examples out")


def clean_values(cm: CircuitModel, prepared: list[Prepared], metric) -> torch.Tensor:
    """The metric of every example on the unpatched model: [examples]."""
    with torch.no_grad():
        return torch.cat([metrics.measured(metric, cm(p.input_ids, p.attention_mask), p.batch)
                          for p in prepared]).cpu()


def mask_shape(cm: CircuitModel, spans: list[str] | None) -> tuple[int, int]:
    """Scores' and masks' shape: [classes, E], one class where ``spans`` is None."""
    return (1 if spans is None else len(spans) + 1), len(cm.graph.edges)


def not_finite(cm: CircuitModel, prepared: list[Prepared], metric) -> ValueError:
    """Why scores came out NaN or infinite: the examples where the clean or the fully patched run is (raised by
    ``check_finite``), else a run between the two."""
    check_finite(cm, prepared, metric)
    return ValueError("some edges' scores are NaN or infinite, although the metric is finite on the clean run and "
                      "with every edge patched: a run between the two (an integration step, a candidate mask) or "
                      "its gradient overflowed; run the model in float32")


WITHOUT_GRADIENTS = "method='exact' or 'acdc'"  # attribute's methods that only run the metric


def differentiable(value: torch.Tensor, method: str, instead: str = WITHOUT_GRADIENTS) -> torch.Tensor:
    """``value``, a metric's (or what a learned mask trains on), if it carries a gradient.  A metric read through
    ``argmax``, a comparison or an integer cast (accuracy, say) carries none, and autograd's own error ("element 0
    of tensors does not require grad") would name neither the metric nor what to do instead: ``method``, as the
    caller named it, and ``instead``, the caller's methods that only run the metric."""
    if not value.requires_grad:
        raise ValueError(f"{method!r} takes the metric's gradient, and this metric's value carries none (computed "
                         "through argmax, a comparison, an integer cast or .detach(), as accuracy is): give a "
                         f"differentiable metric (logit_diff, prob_diff, logprob, kl), or score with {instead}, "
                         "without gradients")
    return value
