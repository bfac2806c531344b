"""Metrics against hand computations: positions under padding, -1-padded answer sets, bf16, KL."""
import math

import pytest
import torch

from fxcircuits import metrics


def batch(**extra):
    """Two examples, S = 3, V = 4; row 1 is right-padded (its last real token is at position 1)."""
    return {
        "clean": torch.zeros(2, 3, dtype=torch.long),
        "corrupted": torch.zeros(2, 3, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
        "correct": torch.tensor([[0, 1], [2, -1]]),
        "incorrect": torch.tensor([[3, -1], [0, 1]]),
        **extra,
    }


def logits():
    """Distinct values at the scored positions (0, 2) and (1, 1); anything else there would show."""
    values = torch.full((2, 3, 4), 100.0)
    values[0, 2] = torch.tensor([1.0, 2.0, 0.0, -1.0])
    values[1, 1] = torch.tensor([0.5, -0.5, 3.0, 0.0])
    return values


def probs(row):
    exps = [math.exp(x) for x in row]
    return [e / sum(exps) for e in exps]


def test_answer_position_right_left_explicit_and_unmasked():
    assert metrics.answer_position(batch()).tolist() == [2, 1]
    assert metrics.answer_position(batch(attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))).tolist() == [2, 2]
    assert metrics.answer_position(batch(position=torch.tensor([0, 1]))).tolist() == [0, 1]
    unmasked = batch()
    del unmasked["attention_mask"]
    assert metrics.answer_position(unmasked).tolist() == [2, 2]


def test_logit_diff_means_each_set_ignoring_padding():
    expected = [(1.0 + 2.0) / 2 - (-1.0), 3.0 - (0.5 - 0.5) / 2]
    assert metrics.logit_diff(logits(), batch()).tolist() == pytest.approx(expected)


def test_prob_diff_sums_each_set():
    p0, p1 = probs([1.0, 2.0, 0.0, -1.0]), probs([0.5, -0.5, 3.0, 0.0])
    expected = [p0[0] + p0[1] - p0[3], p1[2] - p1[0] - p1[1]]
    assert metrics.prob_diff(logits(), batch()).tolist() == pytest.approx(expected, abs=1e-6)


def test_logprob_is_log_of_the_correct_mass():
    p0, p1 = probs([1.0, 2.0, 0.0, -1.0]), probs([0.5, -0.5, 3.0, 0.0])
    expected = [math.log(p0[0] + p0[1]), math.log(p1[2])]
    assert metrics.logprob(logits(), batch()).tolist() == pytest.approx(expected, abs=1e-6)


def test_leading_dimensions_are_kept():
    stacked = torch.stack([logits(), 2 * logits()])  # [n=2, B, S, V], as a masked call with n runs returns
    values = metrics.logit_diff(stacked, batch())
    assert values.shape == (2, 2)
    assert values[1].tolist() == pytest.approx((2 * metrics.logit_diff(logits(), batch())).tolist())


def test_bf16_logits_are_scored_in_float32():
    low = (logits() + 1000.0).bfloat16()  # large offset: a bf16 softmax / subtraction would lose the signal
    for metric in (metrics.logit_diff, metrics.prob_diff, metrics.logprob):
        value = metric(low, batch())
        assert value.dtype == torch.float32
        assert value.tolist() == pytest.approx(metric(low.float(), batch()).tolist(), abs=1e-6)


def test_metrics_are_differentiable():
    x = logits().requires_grad_()
    for metric in (metrics.logit_diff, metrics.prob_diff, metrics.logprob):
        (gradient,) = torch.autograd.grad(metric(x, batch()).sum(), x)
        assert gradient[0, 2].abs().sum() > 0 and gradient[0, 0].abs().sum() == 0  # only the scored position


def test_kl_is_zero_at_clean_and_negative_elsewhere():
    clean = logits()
    with_clean = batch(clean_logits=metrics.logits_at_answer(clean, batch()))
    assert metrics.kl_divergence(clean, with_clean).abs().max() < 1e-6
    other = clean.clone()
    other[0, 2] = torch.tensor([0.0, 0.0, 0.0, 0.0])
    p = torch.tensor(probs([1.0, 2.0, 0.0, -1.0]))
    expected = -(p * (p.log() - math.log(0.25))).sum().item()
    assert metrics.kl_divergence(other, with_clean).tolist() == pytest.approx([expected, 0.0], abs=1e-6)


def test_kl_without_clean_logits_says_what_to_do():
    with pytest.raises(KeyError, match=r"clean_logits.*logits_at_answer"):
        metrics.kl_divergence(logits(), batch())


def test_registry():
    assert metrics.get("logit_diff") is metrics.logit_diff
    assert metrics.get("kl") is metrics.kl_divergence
    assert metrics.get(metrics.prob_diff) is metrics.prob_diff
    with pytest.raises(ValueError, match="kl, logit_diff, logprob, prob_diff"):
        metrics.get("accuracy")
    assert metrics.needs_clean_logits(metrics.get("kl"))
    assert not metrics.needs_clean_logits(metrics.logit_diff)


def test_a_metric_is_named_as_the_registry_knows_it():
    """What a saved circuit records as its metric loads again by that name."""
    for name, metric in metrics.METRICS.items():
        assert metrics.name_of(metric) == name and metrics.get(metrics.name_of(metric)) is metric

    def accuracy(logits, batch):
        return logits[..., -1, 0]
    assert metrics.name_of(accuracy) == "accuracy"
