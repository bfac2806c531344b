"""Task metrics: how much of a behaviour a run shows, one number per example.

Every metric has the signature ``metric(logits, batch) -> Tensor[..., B]``: ``logits`` is ``[..., B, S, V]``
(leading dimensions, such as the ``n`` patched runs of one masked call, are kept) and ``batch`` is a batch dict
(see :mod:`fxcircuits.data`). Larger means more of the task's behaviour, so that an edge's attribution score
``metric(clean) - metric(patched)`` is positive when the edge helps. Metrics are differentiable and compute
in float32 or wider whatever the logits' dtype: bf16 logits would otherwise round the small differences that
attribution scores are made of.

Answer sets are ``[B, K]`` token ids padded with -1; each metric reads them at :func:`answer_position`.
Rows are expected to hold at least one valid id in each set, which :func:`fxcircuits.data.check_batch`
verifies once per batch rather than on every (hot-loop) metric call.
"""
from __future__ import annotations

from typing import Callable

import torch

Metric = Callable[[torch.Tensor, dict], torch.Tensor]


def answer_position(batch: dict) -> torch.Tensor:
    """The position whose next-token prediction is scored, LongTensor [B].

    ``batch["position"]`` when given; otherwise the last position where ``attention_mask`` is 1, which is the
    last real token under both left and right padding; ``S - 1`` when there is no mask.
    """
    if "position" in batch:
        return batch["position"]
    clean = batch["clean"]
    mask = batch.get("attention_mask")
    if mask is None:
        return torch.full((clean.shape[0],), clean.shape[1] - 1, dtype=torch.long, device=clean.device)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (mask.to(torch.long) * positions).argmax(-1)


def logits_at_answer(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The float32 logits at each example's answer position: [..., B, S, V] → [..., B, V].

    This is also what :func:`kl_divergence` expects in ``batch["clean_logits"]`` (from the clean run).
    """
    position = answer_position(batch).to(logits.device)
    rows = torch.arange(position.shape[0], device=logits.device)
    return wide(logits[..., rows, position, :])


def wide(values: torch.Tensor) -> torch.Tensor:
    """``values`` in float32, or in their own dtype where it is wider: a float64 model's metrics, scores and
    differences between them keep float64's digits (a small score is a difference of two large values), and bf16's
    are not rounded again."""
    return values.to(wide_dtype(values.dtype))


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """What ``wide`` turns ``dtype`` into: the dtype of a model's scores."""
    return torch.promote_types(dtype, torch.float32)


def _gather(values: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``values[..., b, ids[b, k]]`` → [..., B, K], and which entries are real answers (ids ≥ 0), [B, K]."""
    ids = ids.to(values.device)
    valid = ids >= 0
    index = ids.clamp(min=0).expand(*values.shape[:-1], ids.shape[-1])
    return values.gather(-1, index), valid


def answer_mean(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The mean of ``values`` [..., B, V] over each example's answer ids [B, K] (-1 padded): [..., B]."""
    picked, valid = _gather(values, ids)
    return (picked * valid).sum(-1) / valid.sum(-1)


def answer_sum(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The sum of ``values`` [..., B, V] over each example's answer ids [B, K] (-1 padded): [..., B]."""
    picked, valid = _gather(values, ids)
    return (picked * valid).sum(-1)


def _at_answer(metric: Metric) -> Metric:
    """Mark ``metric`` as reading the answer position alone (:func:`reads_answer_alone`)."""
    metric.reads_answer_alone = True
    return metric


@_at_answer
def logit_diff(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Mean logit of the correct answers minus mean logit of the incorrect ones (IOI's metric)."""
    values = logits_at_answer(logits, batch)
    return answer_mean(values, batch["correct"]) - answer_mean(values, batch["incorrect"])


@_at_answer
def prob_diff(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """Σ p(correct) − Σ p(incorrect); greater-than's Σ_{y>YY} p(y) − Σ_{y≤YY} p(y), and SVA's."""
    probs = logits_at_answer(logits, batch).softmax(-1)
    return answer_sum(probs, batch["correct"]) - answer_sum(probs, batch["incorrect"])


@_at_answer
def logprob(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """log Σ p(correct): the log-probability of the correct set as a whole, computed stably."""
    values = logits_at_answer(logits, batch)
    picked, valid = _gather(values, batch["correct"])
    return picked.masked_fill(~valid, float("-inf")).logsumexp(-1) - values.logsumexp(-1)


@_at_answer
def kl_divergence(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """−KL(p_clean ‖ p) at the answer position: 0 for the clean run itself, more negative the further away.

    Needs the clean run's logits at the answer position in ``batch["clean_logits"]`` [B, V]; the attribution
    functions fill it in for any metric with ``needs_clean_logits``. Answer sets are not read.
    """
    if "clean_logits" not in batch:
        raise KeyError("the 'kl' metric compares a run with the unpatched clean run, so the batch needs "
                       "batch['clean_logits'] [B, V]: set it to "
                       "fxcircuits.metrics.logits_at_answer(model(batch['clean'], batch['attention_mask']), batch)"
                       ".detach() before calling the metric (attribution functions do this for you)")
    log_p = logits_at_answer(logits, batch).log_softmax(-1)
    log_clean = batch["clean_logits"].to(log_p.device, log_p.dtype).log_softmax(-1)
    return -(log_clean.exp() * (log_clean - log_p)).sum(-1)


kl_divergence.needs_clean_logits = True

METRICS: dict[str, Metric] = {"logit_diff": logit_diff, "prob_diff": prob_diff, "logprob": logprob,
                              "kl": kl_divergence}


def get(name: str | Metric) -> Metric:
    """The metric called ``name`` (one of :data:`METRICS`); a callable is returned unchanged."""
    if callable(name):
        return name
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; the metrics are {', '.join(sorted(METRICS))}, "
                         "or pass any callable metric(logits, batch) -> Tensor[B]")
    return METRICS[name]


def measured(metric: Metric, logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """``metric(logits, batch)``, refused unless it gives one value per example (and per run, where ``logits``
    hold several runs): ``logits.shape[:-2]``.  A metric that returns the batch's mean is the usual slip, and it
    would pass unseen — scores scaled by 1/B, batches of other sizes weighed wrongly — where it did not fail.
    The value comes ``wide``."""
    value = metric(logits, batch)
    expected = list(logits.shape[:-2])
    if not isinstance(value, torch.Tensor) or list(value.shape) != expected:
        got = f"shape {list(value.shape)}" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise ValueError(f"the metric {name_of(metric)!r} gave {got} for logits of shape {list(logits.shape)}; a "
                         f"metric gives one value per example (and per run), {expected} here: return each "
                         "example's value, not their mean (fxcircuits averages them)")
    return wide(value)


def name_of(metric: Metric) -> str:
    """The name :func:`get` knows ``metric`` by (``"kl"``, not the function's ``kl_divergence``), so that a saved
    circuit says which metric found it in a form that loads again; another callable's own ``__name__``."""
    return next((name for name, known in METRICS.items() if known is metric), getattr(metric, "__name__", str(metric)))


def needs_clean_logits(metric: Metric) -> bool:
    """Whether ``metric`` reads ``batch["clean_logits"]``, which the caller must then fill in."""
    return bool(getattr(metric, "needs_clean_logits", False))


def check_gradient_at_clean(metric: Metric, method: str, instead: str) -> None:
    """Refuse a metric that compares with the clean run (KL) for ``method``, which takes its gradient at the clean
    run, where such a metric is smallest: every value would be 0.  ``instead``: the methods to use."""
    if needs_clean_logits(metric):
        raise ValueError(f"{name_of(metric)} is smallest at the clean run, where {method} takes its gradient: every "
                         f"value would be 0; use {instead}, or a metric of the answers (logit_diff, prob_diff, "
                         "logprob)")


def reads_answer_alone(metric: Metric) -> bool:
    """Whether ``metric`` reads the logits at :func:`answer_position` and nowhere else (every metric here does;
    a callable may say so with ``metric.reads_answer_alone = True``): patched runs then compute the logits there
    alone, a fifth of a small model's forward saved."""
    return bool(getattr(metric, "reads_answer_alone", False))
