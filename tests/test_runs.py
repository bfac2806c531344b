"""Batches made ready to patch (``fxcircuits.runs``)."""
import pytest
import torch

from fxcircuits import metrics
from fxcircuits.runs import clean_values, metric_values, prepare


def test_a_model_captured_per_length_runs_every_batch_at_one_length(traced, monkeypatch):
    """Qwen3.5 is captured once per prompt length: batches of 6 and 8 tokens are padded on the right to 8, the
    6-token length is never captured, and every metric equals the unpadded HF model's (all edges at 0: the
    corrupted run's)."""
    model, cm = traced("qwen3_5")
    capture_at, asked = cm.capture_at, []
    monkeypatch.setattr(cm, "capture_at", lambda length: asked.append(length) or capture_at(length))
    generator = torch.Generator().manual_seed(5)
    batches = []
    for length in (6, 8):
        clean, corrupted = torch.randint(3, 128, (2, 2, length), generator=generator)
        batches.append({"clean": clean, "corrupted": corrupted, "correct": torch.tensor([[4], [5]]),
                        "incorrect": torch.tensor([[6], [7]])})
    metric = metrics.get("logit_diff")
    prepared = prepare(cm, batches, metric)
    assert [p.input_ids.shape[1] for p in prepared] == [8, 8] and 6 not in asked
    with torch.no_grad():
        clean = torch.cat([metric(model(input_ids=b["clean"]).logits, b) for b in batches])
        corrupted = torch.cat([metric(model(input_ids=b["corrupted"]).logits, {**b, "clean": b["corrupted"]})
                               for b in batches])
    torch.testing.assert_close(clean_values(cm, prepared, metric), clean, atol=1e-5, rtol=1e-4)
    patched = metric_values(cm, prepared, metric, torch.zeros(1, len(cm.graph.edges)))[0]
    torch.testing.assert_close(patched, corrupted, atol=1e-5, rtol=1e-4)


def test_padding_to_one_length_does_not_hide_prompts_of_different_lengths(traced):
    """The batches are checked before they are padded: padding both prompts to the longest would align them."""
    _, cm = traced("qwen3_5")
    ids = lambda length: torch.randint(3, 128, (2, length))  # noqa: E731
    answers = {"correct": torch.tensor([[4], [5]]), "incorrect": torch.tensor([[6], [7]])}
    batches = [{"clean": ids(6), "corrupted": ids(7), **answers}, {"clean": ids(8), "corrupted": ids(8), **answers}]
    with pytest.raises(ValueError, match="aligned with batch\\['clean'\\]"):
        prepare(cm, batches, metrics.get("logit_diff"))
