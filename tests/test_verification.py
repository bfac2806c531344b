"""``fxcircuits.verify`` and ``fxcircuits check``: a traced model checked against the HF model it was traced from,
each check able to fail."""
import copy
import math

import pytest
import torch

import fxcircuits
from fxcircuits import DecompositionError, Verification, verify
from fxcircuits.cli import main
from zoo import make

CHECKS = ["clean", "corrupted", "logits", "masks", "heads", "patterns", "direct", "tokens", "sources"]


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2", "falcon_new_arch", "mamba"])
def test_a_traced_model_passes_every_check(traced, prompts, name):
    model, cm = traced(name)
    clean, corrupted, mask = prompts
    found = verify(cm, model, clean, mask, corrupted)
    assert [c.name for c in found.checks] == CHECKS
    skipped = {c.name: c.skipped for c in found.checks if c.difference is None}
    assert skipped == ({} if cm.graph.n_heads else {"patterns": "no attention layers", "heads": "no attention heads",
                                                    "sources": "no attention heads"})
    assert found.ok and found.tolerance == 1e-4, found.table()
    assert found.readout == ("first order" if name == "gemma2" else "linear")  # Gemma 2 soft-caps its logits


def test_another_models_trace_fails_what_the_hf_model_answers(traced, prompts):
    """A trace of other weights matches the model nowhere its own answers are asked; what it checks against
    itself (direct logits read by token and by key) still holds."""
    model, _ = traced("llama")
    clean, corrupted, mask = prompts
    found = verify(fxcircuits.trace(make("llama", seed=1)), model, clean, mask, corrupted)
    assert [c.name for c in found.failed] == ["clean", "corrupted", "logits", "masks", "patterns", "direct"]
    assert not found.ok and found.table().count("WRONG") == 6


@pytest.mark.parametrize("row", [0, 1])
def test_masks_run_together_must_equal_each_alone(traced, prompts, monkeypatch, row):
    """Off in a call of two masks: the first (one edge patched), checked against itself run alone, or the second
    (all ones), checked against HF's logits."""
    model, cm = traced("llama")
    clean, corrupted, mask = prompts
    forward = cm.forward

    def off_together(*args, edge_mask=None, **kwargs):
        out = forward(*args, edge_mask=edge_mask, **kwargs)
        if torch.is_tensor(edge_mask) and edge_mask.dim() == 2:
            out[row] += 1e-3 * out.abs().max()
        return out
    monkeypatch.setattr(cm, "forward", off_together)
    assert [c.name for c in verify(cm, model, clean, mask, corrupted).failed] == ["masks"]


def test_heads_fed_each_others_inputs_fail(prompts, monkeypatch):
    """A trace whose heads each read another head's q, k and v columns (a wrong per-head split of the inputs) runs
    the clean and the corrupted prompts as HF does, and every mask in one call as alone; patching one head's
    inputs then moves another head's write, which only the heads check sees."""
    columns_read = fxcircuits.rewrite.columns_read
    monkeypatch.setattr(fxcircuits.rewrite, "columns_read", lambda *a, **k: columns_read(*a, **k)[::-1])
    model = make("llama")
    clean, corrupted, mask = prompts
    found = verify(fxcircuits.trace(model), model, clean, mask, corrupted)
    assert [c.name for c in found.failed] == ["heads"] and found.failed[0].difference > 0.1, found.table()
    assert "WRONG  every edge into a head's q, k, v patched = the head patched" in found.table()


@pytest.mark.parametrize("name", ["gemma4_kv_shared", "recurrent_gemma", "qwen3_next", "granite_swa",
                                  "falcon_multi_query"])
def test_a_heads_inputs_patched_are_the_head_patched(traced, prompts, name):
    """Exact where heads share keys and values (grouped, multi-query, or an earlier layer's), an output gate reads
    the q input, a sink scales the core's output, and in a hybrid, whose attention layers are numbered apart; where
    a norm of the whole write scales every head's write (Gemma 4), a layer's heads are patched together."""
    model, cm = traced(name)
    clean, corrupted, mask = prompts
    found = verify(cm, model, clean, mask, corrupted)
    heads = next(c for c in found.checks if c.name == "heads")
    assert heads.difference is not None and heads.passed(found.tolerance), found.table()
    coupled = fxcircuits.verification._norm_coupled(cm)
    assert coupled == (set(range(cm.graph.n_layers)) if name == "gemma4_kv_shared" else set())


def test_padding_is_not_compared(traced, prompts, monkeypatch):
    """Logits and attention weights at padded positions are no part of the model's answer."""
    model, cm = traced("llama")
    clean, corrupted, mask = prompts
    forward, patterns = cm.forward, cm.patterns
    pad = ~mask.bool()
    monkeypatch.setattr(cm, "forward", lambda *a, **k: forward(*a, **k).masked_fill(pad[..., None], 1e3))
    monkeypatch.setattr(cm, "patterns", lambda *a, **k: [w.masked_fill(pad[:, None, :, None], 0.5)
                                                         for w in patterns(*a, **k)])
    found = verify(cm, model, clean, mask, corrupted)
    assert found.ok and None not in [c.difference for c in found.checks], found.table()


def test_patterns_must_equal_hfs(traced, prompts, monkeypatch):
    model, cm = traced("llama")
    clean, corrupted, mask = prompts
    patterns = cm.patterns
    monkeypatch.setattr(cm, "patterns", lambda *a, **k: [w if w is None else w.roll(1, -1) for w in patterns(*a, **k)])
    assert [c.name for c in verify(cm, model, clean, mask, corrupted).failed] == ["patterns"]


def test_the_model_is_run_as_it_computes_and_given_back(prompts):
    """A model in training mode is checked without dropout (GPT-2's would make HF's logits random), and its
    modes and attention implementation are as they were afterwards."""
    model = make("gpt2")
    cm = fxcircuits.trace(model)
    model.train()
    before = model.config._attn_implementation
    clean, _, mask = prompts
    found = verify(cm, model, clean, mask)  # the corrupted prompts: each prompt reversed
    assert found.ok, found.table()
    assert all(m.training for m in model.modules()) and model.config._attn_implementation == before != "eager"


@pytest.mark.parametrize("name, dtype", [("llama", torch.bfloat16), ("mixtral", torch.bfloat16),
                                         ("mixtral", torch.float16)])
def test_half_precision_is_held_to_its_own(prompts, name, dtype):
    """Mixtral's experts write in float32 into a half-precision stream: direct logits read at some tokens take
    both in float32 (they were refused by einsum's dtype check)."""
    model = make(name, dtype=dtype)
    clean, corrupted, mask = prompts
    found = verify(fxcircuits.trace(model), model, clean, mask, corrupted)
    assert found.tolerance == 32 * torch.finfo(dtype).eps
    assert found.ok and 0 < max(c.difference for c in found.checks) < found.tolerance, found.table()
    assert all(c.difference is not None for c in found.checks if c.name in ("direct", "tokens")), found.table()


def test_what_cannot_run_is_skipped_with_the_reason(traced, prompts, monkeypatch):
    model, cm = traced("llama")
    clean, corrupted, mask = prompts

    def no_eager(_):
        raise ValueError("this model has no eager attention")

    def refused(*args, **kwargs):
        raise DecompositionError("Tiny", None, "its readout mixes rows")
    monkeypatch.setattr(model, "set_attn_implementation", no_eager)
    monkeypatch.setattr(fxcircuits.verification, "direct_logits", refused)
    found = verify(cm, model, clean, mask, corrupted)
    skipped = {c.name: c.skipped for c in found.checks if c.difference is None}
    assert set(skipped) == {"patterns", "direct", "tokens", "sources"} and found.ok
    assert "no eager attention" in skipped["patterns"] and "its readout mixes rows" in found.readout
    assert found.table().count("skip") == 4


def test_prompts_of_different_shapes_are_refused(traced, prompts):
    model, cm = traced("llama")
    clean, corrupted, mask = prompts
    with pytest.raises(ValueError, match="differ in shape"):
        verify(cm, model, clean, mask, corrupted[:, :-1])


def test_a_model_whose_own_logits_overflow_is_refused(prompts):
    model = make("llama")
    cm = fxcircuits.trace(model)
    clean, corrupted, mask = prompts
    with torch.no_grad():
        model.lm_head.weight[:5] = float("inf")  # an edit in place, which the trace computes with too
    with pytest.raises(ValueError, match=r"own logits are NaN or infinite on prompts \[0, 1, 2\]"):
        verify(cm, model, clean, mask, corrupted)


def test_merged_verifications_hold_each_checks_largest_difference(traced, prompts):
    """``Verification.merge`` of two batches, one of a trace of other weights (which fails): each check's
    difference is the largest of the batches' own, named by the batch it is from, and a failure names the batches
    it is in; a check skipped in one batch is the other's, and one skipped in both stays skipped."""
    model, cm = traced("llama")
    clean, corrupted, mask = prompts
    parts = {"short": verify(cm, model, clean[1:, 2:], mask[1:, 2:], corrupted[1:, 2:]),
             "other": verify(fxcircuits.trace(make("llama", seed=1)), model, clean, mask, corrupted)}
    for part, name in [(parts["short"], "patterns"), (parts["short"], "sources"), (parts["other"], "sources")]:
        part.checks[CHECKS.index(name)].difference, part.checks[CHECKS.index(name)].skipped = None, "none"
    merged = Verification.merge(parts)
    assert [c.name for c in merged.checks] == CHECKS and merged.tolerance == 1e-4
    for i, check in enumerate(merged.checks[:-1]):
        differences = [part.checks[i].difference for part in parts.values()]
        assert check.difference == max(d for d in differences if d is not None)
        assert parts[check.worst].checks[i].difference == check.difference
    assert merged.checks[CHECKS.index("patterns")].worst == "other"
    assert merged.checks[-1].difference is None and merged.checks[-1].skipped == "none"
    assert [c.name for c in merged.failed] == [c.name for c in parts["other"].failed] == \
        ["clean", "corrupted", "logits", "masks", "patterns", "direct"]
    assert all(merged.failed_in(c.name) == ["other"] for c in merged.failed) and merged.failed_in("tokens") == []
    assert "; largest in other" in merged.table() and "; largest in" not in Verification.merge(
        {"short": parts["short"]}).table()


def test_a_nan_in_any_batch_fails_the_merged_check(traced, prompts):
    """``max`` would keep a number over a NaN after it: the merged check is NaN, and fails, in that batch."""
    model, cm = traced("llama")
    clean, corrupted, mask = prompts
    first = verify(cm, model, clean, mask, corrupted)
    second = copy.deepcopy(first)
    second.checks[0].difference = math.nan
    merged = Verification.merge({"first": first, "second": second})
    assert first.ok and math.isnan(merged.checks[0].difference) and merged.checks[0].worst == "second"
    assert [c.name for c in merged.failed] == ["clean"] and merged.failed_in("clean") == ["second"]
    assert "WRONG" in merged.table().splitlines()[1]
    second.tolerance = 1e-3
    with pytest.raises(ValueError, match="one model's checks under one tolerance"):
        Verification.merge({"first": first, "second": second})


def test_check_on_the_command_line(tiny_folder, capsys):
    common = ["check", "--model", str(tiny_folder), "--task", "ioi", "--size", "4", "--no-progress"]
    assert main(common) == 0
    printed = capsys.readouterr().out
    assert "ioi: 4 prompts in 1 batch of" in printed and all(f"\n{name} " in printed for name in CHECKS)
    assert printed.strip().endswith("ok: every check within 0.0001") and "largest in" not in printed
    assert main([*common, "--tolerance", "0"]) == 1  # every patched run rounds a little
    assert "WRONG: corrupted in batch 0 (" in capsys.readouterr().out
