"""Batches made ready to patch (``fxcircuits.runs``)."""
import pytest
import torch

from fxcircuits import metrics
from fxcircuits.model import CircuitModel
from fxcircuits.runs import clean_values, metric_values, prepare


def test_batches_no_capture_serves_are_padded_to_one_length(traced, monkeypatch):
    """Granite 4.0's first capture serves 2 to 15 tokens (a Mamba-2 chunk): a batch of 12 runs as it is, batches of
    18 and 20 are padded on the right to 20 and share one new capture, and every metric equals the unpadded HF
    model's (all edges at 0: the corrupted run's)."""
    model, traced_cm = traced("granite_hybrid")
    cm = CircuitModel(traced_cm.model_name, traced_cm.first, traced_cm.capture_at,  # the first capture alone
                      traced_cm.weights)
    asked = []
    monkeypatch.setattr(cm, "capture_at", lambda length: asked.append(length) or traced_cm.capture_at(length))
    generator = torch.Generator().manual_seed(5)
    batches = []
    for length in (12, 18, 20):
        clean, corrupted = torch.randint(3, 128, (2, 2, length), generator=generator)
        batches.append({"clean": clean, "corrupted": corrupted, "correct": torch.tensor([[4], [5]]),
                        "incorrect": torch.tensor([[6], [7]])})
    metric = metrics.get("logit_diff")
    with pytest.warns(UserWarning, match="captured GraniteMoeHybridForCausalLM again for prompts of 20 tokens"):
        prepared = prepare(cm, batches, metric)
    assert [p.input_ids.shape[1] for p in prepared] == [12, 20, 20] and asked == [20]
    with torch.no_grad():
        clean = torch.cat([metric(model(input_ids=b["clean"]).logits, b) for b in batches])
        corrupted = torch.cat([metric(model(input_ids=b["corrupted"]).logits, {**b, "clean": b["corrupted"]})
                               for b in batches])
    torch.testing.assert_close(clean_values(cm, prepared, metric), clean, atol=1e-5, rtol=1e-4)
    patched = metric_values(cm, prepared, metric, torch.zeros(1, len(cm.graph.edges)))[0]
    torch.testing.assert_close(patched, corrupted, atol=1e-5, rtol=1e-4)


def test_padding_to_one_length_does_not_hide_prompts_of_different_lengths(traced):
    """The batches are checked before they are padded: padding both prompts to the longest would align them."""
    _, cm = traced("granite_hybrid")
    ids = lambda length: torch.randint(3, 128, (2, length))  # noqa: E731
    answers = {"correct": torch.tensor([[4], [5]]), "incorrect": torch.tensor([[6], [7]])}
    batches = [{"clean": ids(17), "corrupted": ids(18), **answers}, {"clean": ids(19), "corrupted": ids(19), **answers}]
    with pytest.raises(ValueError, match="aligned with batch\\['clean'\\]"):
        prepare(cm, batches, metrics.get("logit_diff"))
