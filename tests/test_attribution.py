"""Attribution methods against independent references: exact patching, finite differences, linear models."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import fxcircuits
from fxcircuits.attribution import INTEGRATED
from fxcircuits.metrics import logit_diff
from fxcircuits.patching import dense_keep
from fxcircuits.runs import prepare
from zoo import DELAYED_WRITE_EDGES, make


def _batch(vocab: int = 128, seed: int = 1) -> dict:
    generator = torch.Generator().manual_seed(seed)
    clean = torch.randint(0, vocab, (3, 7), generator=generator)
    corrupted = torch.randint(0, vocab, (3, 7), generator=generator)
    mask = torch.ones_like(clean)
    mask[0, :2] = 0  # left padding in the first row
    return {"clean": clean, "corrupted": corrupted, "attention_mask": mask,
            "correct": torch.tensor([[5], [6], [7]]), "incorrect": torch.tensor([[8, 9], [9, -1], [10, -1]])}


def steps_of(method: str, steps: int) -> dict:
    """``steps=`` for the methods that read it (the EAP-IG methods), which the others refuse."""
    return {"steps": steps} if method in INTEGRATED else {}


def linear_gpt2() -> GPT2LMHeadModel:
    """A GPT-2 whose logits are affine in its input embeddings: identity MLP activation, q and k weights zero
    (uniform causal attention), and layer norms with an epsilon so large that they only subtract the mean
    (their weight undoes the 1/sqrt(eps) scale).  Then the metric is affine in each edge mask on its own, so
    a first-order attribution is exact."""
    config = GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=128, n_positions=64,
                        activation_function="linear", layer_norm_epsilon=1e12, initializer_range=0.3,
                        bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config).double().eval()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.fill_(1e6)
            if name.endswith("attn.c_attn"):
                module.weight[:, :2 * config.n_embd] = 0.0
                module.bias[:2 * config.n_embd] = 0.0
    return model


@pytest.fixture(scope="module")
def linear():
    return fxcircuits.trace(linear_gpt2())


@pytest.fixture(scope="module")
def llama64():
    return fxcircuits.trace(make("llama", dtype=torch.float64))


def _exact_reference(cm, batch, edges) -> torch.Tensor:
    """m(clean) − m(clean with one edge patched), one unbatched call per edge, averaged over examples."""
    clean = logit_diff(cm(batch["clean"], batch["attention_mask"]), batch).mean()
    return torch.stack([clean - logit_diff(cm(batch["clean"], batch["attention_mask"],
                                              corrupted_input_ids=batch["corrupted"], edge_mask={e: 0.0}), batch).mean()
                        for e in edges])


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "eap-ig-activations", "clean-corrupted"])
def test_gradient_methods_equal_exact_patching_on_a_linear_model(linear, method):
    batch = _batch()
    exact = fxcircuits.attribute(linear, [batch], "logit_diff", "exact", progress=False)
    scores = fxcircuits.attribute(linear, [batch], "logit_diff", method, progress=False, **steps_of(method, 3))
    assert exact.tensor.abs().max() > 1e-3  # the task is not trivial
    torch.testing.assert_close(scores.tensor, exact.tensor, atol=1e-5 * exact.tensor.abs().max(), rtol=1e-5)


def test_zero_ablation_eap_equals_exact_on_a_linear_model(linear):
    batch = _batch()
    exact = fxcircuits.attribute(linear, [batch], "logit_diff", "exact", ablation="zero", progress=False)
    eap = fxcircuits.attribute(linear, [batch], "logit_diff", "eap", ablation="zero", progress=False)
    torch.testing.assert_close(eap.tensor, exact.tensor, atol=1e-5 * exact.tensor.abs().max(), rtol=1e-5)


def test_eap_ig_inputs_from_an_all_zero_input_is_refused(linear):
    """EAP-IG-inputs under zero ablation starts its path at an all-zero stream, where the norms' gradients blow up
    (scores of 3e2 on a 2-layer GPT-2, 1e27 on others): refused by name wherever it runs — attribution, a learned
    mask's warm start, attribution by position — and zero ablation still scores with the other methods."""
    batch = _batch()
    says = "eap-ig-inputs integrates from the other run's input, here all zero"
    with pytest.raises(ValueError, match=says):
        fxcircuits.attribute(linear, [batch], "logit_diff", "eap-ig-inputs", ablation="zero", progress=False)
    with pytest.raises(ValueError, match=says):
        fxcircuits.attribute(linear, [batch], "logit_diff", "mask", ablation="zero", progress=False, mask_steps=1)
    with pytest.raises(ValueError, match="'attribution-ig' integrates from the other run's input, all zero"):
        fxcircuits.patch_nodes(linear, [batch], "logit_diff", method="attribution-ig", ablation="zero")
    scores = fxcircuits.attribute(linear, [batch], "logit_diff", "eap-ig-activations", ablation="zero",
                                  progress=False)
    assert scores.tensor.isfinite().all() and scores.tensor.abs().max() > 0


@pytest.fixture(scope="module")
def gpt2_64():
    return fxcircuits.trace(make("gpt2", dtype=torch.float64))


@pytest.mark.parametrize("method", ["exact", "acdc"])
def test_exact_equals_one_edge_at_a_time(gpt2_64, method):
    """In the model's float64 (GPT-2's: Llama's runs its norms in float32): a small score is the difference of two
    large metrics, which float32 would round (scores of 2e-9 came out 7e-9, or 0).  ACDC's first destination, the
    logits, judges its edges one at a time from the full model, as exact does, while each costs less than τ."""
    batch = _batch()
    options = {"threshold": 1e9} if method == "acdc" else {}
    scores = fxcircuits.attribute(gpt2_64, [batch], "logit_diff", method, masks_per_call=7, progress=False, **options)
    edges = gpt2_64.graph.edges[::9] if method == "exact" else [gpt2_64.graph.edges[-1]]
    reference = _exact_reference(gpt2_64, batch, edges)
    assert scores.tensor.dtype == torch.float64
    torch.testing.assert_close(torch.tensor([scores[e] for e in edges], dtype=torch.float64), reference,
                               atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("method", ["exact", "acdc"])
def test_patched_runs_are_measured_against_a_run_of_their_own_call(method):
    """A call runs every reader any of its masks moves on the patched path, which rounds otherwise than the model's
    fused pass; each call carries the run its masks are measured against.  Where the corrupted prompt is the clean
    one, an edge out of ``input`` (the same embeddings in both runs) changes nothing, and in bfloat16 scores exactly
    0 (against the model's own run, −3.5e-4: the rounding of its reader's path)."""
    cm = fxcircuits.trace(make("llama", dtype=torch.bfloat16))
    batch = {**_batch(), "corrupted": _batch()["clean"]}
    scores = fxcircuits.attribute(cm, [batch], "logit_diff", method, progress=False, masks_per_call=7,
                                  **({"threshold": 1e-3} if method == "acdc" else {}))
    judged = [e for e in cm.graph.edges if e.startswith("input->")]
    judged = judged if method == "exact" else [e for e in judged if e.endswith("->logits")]
    assert [scores[e] for e in judged] == [0.0] * len(judged)


@pytest.mark.parametrize("method, most", [("exact", 64), ("acdc", 12)])  # ACDC: a destination's 11 candidates
def test_patched_runs_per_call_default_to_what_the_device_runs_fastest(llama64, method, most, as_on_a_gpu,
                                                                       monkeypatch):
    """Exact and ACDC calls on CPU hold as many masks as keep the stream within ``EXACT_CALL_STREAM`` (64 at most:
    the tiny model), 32 where launches set the pace, a count given as given, the run they are measured against
    among them; the scores do not depend on it."""
    batch, sizes = _batch(), []
    values = fxcircuits.attribution.metric_values
    monkeypatch.setattr(fxcircuits.attribution, "metric_values",
                        lambda cm, prepared, metric, masks, *args: sizes.append(len(masks)) or values(
                            cm, prepared, metric, masks, *args))

    def calls(**options):
        sizes.clear()
        scores = fxcircuits.attribute(llama64, [batch], "kl", method, progress=False, **options).tensor
        return scores, max(sizes)

    default, largest = calls()
    width = make("llama").config.hidden_size
    monkeypatch.setattr(fxcircuits.attribution, "EXACT_CALL_STREAM", 3 * batch["clean"].numel() * width)
    three, size = calls()
    assert (largest, size) == (most, 3) and calls(masks_per_call=5)[1] == 5
    torch.testing.assert_close(three, default, atol=1e-6, rtol=1e-5)
    as_on_a_gpu()
    assert calls()[1] == min(32, most)


def test_gradient_points_per_call_default_to_what_the_device_runs_fastest(llama64, as_on_a_gpu, monkeypatch):
    """EAP-IG's points on CPU: as many a call as keep the stream within ``POINTS_CALL_STREAM`` (the tiny model: all
    five steps in one call), 32 where launches set the pace, a count given as given; the scores do not depend on
    it.  A learned mask's warm start takes its points the same way."""
    batch, sizes = _batch(), []
    measure = fxcircuits.runs.Prepared.measure
    monkeypatch.setattr(fxcircuits.runs.Prepared, "measure",
                        lambda self, cm, metric, keep, **options: sizes.append(len(keep)) or measure(
                            self, cm, metric, keep, **options))

    def calls(method="eap-ig-inputs", **options):
        sizes.clear()
        scores = fxcircuits.attribute(llama64, [batch], "logit_diff", method, progress=False, **steps_of(method, 5),
                                      **options)
        return scores.tensor, sizes[:]

    default, used = calls()
    width = make("llama").config.hidden_size
    monkeypatch.setattr(fxcircuits.attribution, "POINTS_CALL_STREAM", 2 * batch["clean"].numel() * width + 1)
    two, used_two = calls()
    assert used == [5] and used_two == [2, 2, 1] and calls(masks_per_call=3)[1] == [3, 2]
    torch.testing.assert_close(two, default, atol=1e-6, rtol=1e-5)
    # the clean and the fully patched run checked first, then the warm start's points, then the mask's own step
    assert calls("mask", mask_steps=1, density=0.5)[1][:4] == [2, 2, 2, 1]
    as_on_a_gpu()
    assert calls()[1] == [5]


def test_gradient_points_back_off_where_the_accelerator_runs_out_of_memory(llama64, monkeypatch):
    """A call of more points than the device's memory holds is run again at half as many, and the batches after it
    keep that count; the scores are those of the calls that fit.  Where one point of a batch is too many, the
    error names the batch and asks for smaller ones (an accelerator's out-of-memory error, simulated here)."""
    batches, tried = [_batch(seed=1), _batch(seed=2)], []
    tapped = fxcircuits.attribution.tapped

    def fits(most):
        def run(cm, p, metric, method, steps, per_call, by_position=False):
            tried.append(per_call)
            if per_call > most:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            return tapped(cm, p, metric, method, steps, per_call, by_position)
        monkeypatch.setattr(fxcircuits.attribution, "tapped", run)

    def attribute(**options):
        return fxcircuits.attribute(llama64, batches, "logit_diff", "eap-ig-inputs", steps=5, progress=False,
                                    **options).tensor

    fits(2)
    with pytest.warns(UserWarning, match="out of memory at 5 masks a call: running 2"):
        backed_off = attribute(masks_per_call=8)
    assert tried == [5, 2, 2]  # 8 capped at the 5 steps that share their inputs; the second batch starts at 2
    fits(5)
    torch.testing.assert_close(backed_off, attribute(masks_per_call=5), atol=1e-6, rtol=1e-5)
    fits(0)
    with pytest.raises(torch.OutOfMemoryError, match="batch of 3 prompts of 7 tokens.*smaller batches"), \
            pytest.warns(UserWarning, match="out of memory"):
        attribute()

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(fxcircuits.attribution, "_mask_gradient", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="smaller batches"):  # EAP: one point, nothing to halve
        fxcircuits.attribute(llama64, batches, "logit_diff", "eap", progress=False)


def test_prompts_of_one_token(llama64):
    """No capture serves one token (export specialises that size): attribution pads such batches on the right
    (``data.served_lengths``).  Exact scores equal one-edge-at-a-time patching through ``cm(...)``, which takes one
    token itself, and EAP equals EAP on the same batch padded by hand."""
    batch = {key: value[:, -1:] for key, value in _batch().items() if key in ("clean", "corrupted")}
    batch.update(correct=torch.tensor([[5], [6], [7]]), incorrect=torch.tensor([[8], [9], [10]]),
                 attention_mask=torch.ones(3, 1, dtype=torch.long))
    exact = fxcircuits.attribute(llama64, [batch], "logit_diff", "exact", progress=False)
    edges = [e for e in llama64.graph.edges if "<q>" not in e][::7]  # a query that sees one key changes nothing
    reference = _exact_reference(llama64, batch, edges)
    assert reference.abs().max() > 1e-3
    torch.testing.assert_close(torch.tensor([exact[e] for e in edges]), reference.float(), atol=1e-5, rtol=1e-4)
    padded = {**batch, **{key: torch.nn.functional.pad(batch[key], (0, 2))
                          for key in ("clean", "corrupted", "attention_mask")}}
    eap = [fxcircuits.attribute(llama64, [b], "logit_diff", "eap", progress=False).tensor for b in (batch, padded)]
    torch.testing.assert_close(eap[0], eap[1], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["llama", "gemma4", "afmoe", "gemma4_per_layer", "gemma4_kv_shared", "longcat_flash"])
def test_eap_is_the_derivative_of_the_metric_in_each_edge_mask(request, name):
    """score(e) = ∂ mean metric / ∂ m_e at m = 1, checked by central finite differences (steps of 1e-3: HF runs
    some norms in float32 even in a float64 model, rounding the metric at ~1e-7).  Gemma 4 scales its whole
    stream between layers (node outputs and reader inputs in one scale); AFMoE gates each head's output by a value
    computed from its q input; Gemma 4's E-models read per-layer inputs, which the input node's edges into the
    blocks after the MLPs (m1, m3) carry, and reuse keys and values (layer 2's are read at layer 0); LongCat-Flash's
    shortcut MoE (m2, m5) reads the stream before its layer's second attention and MLP and writes after them."""
    cm = request.getfixturevalue("llama64") if name == "llama" else fxcircuits.trace(make(name, dtype=torch.float64))
    # LongCat-Flash also routes its experts in float32: at steps of 1e-3 that rounding moves the smallest edges'
    # differences by 3% (a1.h2 → logits: 2.30e-4 against 2.378e-4 at 1e-2 and 2.383e-4 at 1e-1; EAP 2.385e-4)
    batch, h = _batch(), 1e-2 if name == "longcat_flash" else 1e-3
    eap = fxcircuits.attribute(cm, [batch], "logit_diff", "eap", progress=False)
    slack = 1e-4 * eap.tensor.abs().max()
    picks = cm.graph.edges[3::17] + [cm.graph.edges[int(eap.tensor.abs().argmax())]]
    if name.startswith("gemma4_"):  # its float32 norms round the metric below the smallest edges' scores: the
        # edges that carry the per-layer inputs, and edges into the k and v inputs of layers that reuse them
        picks = picks[-1:] + ["input->m1", "input->m3"] + (["input->a2.h0<k>", "a0.h1->a3.h2<v>", "m1->a3.h0<k>"]
                                                           if name == "gemma4_kv_shared" else [])
    if name == "longcat_flash":
        picks += list(DELAYED_WRITE_EDGES)
    with torch.no_grad():
        for e in picks:
            values = [logit_diff(cm(batch["clean"], batch["attention_mask"], corrupted_input_ids=batch["corrupted"],
                                    edge_mask={e: 1 + s}), batch).mean() for s in (h, -h)]
            numeric = float((values[0] - values[1]) / (2 * h))
            assert abs(eap[e] - numeric) <= slack + 2e-3 * abs(numeric), (e, eap[e], numeric)


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "exact", "acdc"])
def test_metrics_that_read_the_answer_alone_score_as_on_full_logits(llama64, method):
    """A built-in metric reads the answer position alone, and patched runs compute the logits there alone
    (``metrics.reads_answer_alone``); the same metric wrapped, so that it says nothing, is given every position.
    Right padding puts each prompt's answer at a position of its own."""
    batch = _batch()
    batch["attention_mask"] = torch.tensor([[1] * 7, [1] * 5 + [0] * 2, [1] * 3 + [0] * 4])
    scores = [fxcircuits.attribute(llama64, [batch], metric, method, progress=False)
              for metric in (logit_diff, lambda logits, b: logit_diff(logits, b))]
    torch.testing.assert_close(scores[0].tensor, scores[1].tensor, rtol=1e-6, atol=1e-9)


def test_eap_ig_inputs_converges_to_patching_the_input(llama64):
    """Integrated gradients are complete: the input's edges sum to m(clean) − m(corrupted) as steps grow."""
    batch = _batch()
    with torch.no_grad():
        clean = logit_diff(llama64(batch["clean"], batch["attention_mask"]), batch).mean()
        corrupted = logit_diff(llama64(batch["corrupted"], batch["attention_mask"]), batch).mean()
    target = float(clean - corrupted)
    inputs = [i for i, e in enumerate(llama64.graph.edges) if e.startswith("input->")]
    errors = [abs(float(fxcircuits.attribute(llama64, [batch], "logit_diff", "eap-ig-inputs", steps=steps,
                                             progress=False).tensor[inputs].sum()) - target)
              for steps in (1, 8, 64)]
    # a left Riemann sum: the error falls as 1/steps (measured 0.31, 0.033, 0.0041 of a target of 0.16)
    assert errors[2] < errors[1] / 4 < errors[0] / 16, (errors, target)
    assert errors[2] < 0.05 * abs(target), (errors, target)


def test_batches_average_over_examples(llama64):
    """Two batches give the example-weighted mean of their scores."""
    a, b = _batch(seed=1), _batch(seed=2)
    both = fxcircuits.attribute(llama64, [a, b], "logit_diff", "eap", progress=False).tensor
    each = [fxcircuits.attribute(llama64, [x], "logit_diff", "eap", progress=False).tensor for x in (a, b)]
    torch.testing.assert_close(both, (each[0] + each[1]) / 2)


def test_acdc_batched_equals_sequential(llama64):
    batch = _batch()
    sequential = fxcircuits.attribute(llama64, [batch], "kl", "acdc", threshold=1e-3, masks_per_call=1, progress=False)
    batched = fxcircuits.attribute(llama64, [batch], "kl", "acdc", threshold=1e-3, masks_per_call=16, progress=False)
    torch.testing.assert_close(batched.tensor, sequential.tensor, atol=1e-6, rtol=1e-5)
    kept = sequential.threshold(1e-3, absolute=False)
    assert 0 < len(kept) < len(llama64.graph.edges)


@pytest.mark.parametrize("ablation", ["zero", "corrupted"])
def test_acdcs_kept_edges_are_its_circuit_its_costs_adding_up_to_the_metrics_change(gpt2_64, ablation):
    """Each removal's score is what it cost the metric at its turn, and an edge removed at no cost changes
    nothing, so the metric of the edges ACDC kept (its scores at τ, signed and unpruned) is the model's less the
    removed edges' scores.  Pruned, the circuit also loses the edges out of MLPs whose inputs ACDC removed later:
    under zero ablation such an MLP writes what it computes from zeros, which ACDC measured, and pruning changes
    the metric (on this model, of these edges)."""
    batches, tau = [_batch(seed=1), _batch(seed=3)], 1e-4
    scores = fxcircuits.attribute(gpt2_64, batches, "logit_diff", "acdc", threshold=tau, ablation=ablation,
                                  progress=False)
    evaluator = fxcircuits.Evaluator(gpt2_64, batches, "logit_diff", ablation=ablation)
    kept = scores.threshold(tau, absolute=False, prune=False)
    assert bool((scores.tensor[kept.in_graph] >= tau).all()) and bool((scores.tensor[~kept.in_graph] < tau).all())
    result = evaluator.evaluate(kept)
    expected = result.full.mean() - scores.tensor[~kept.in_graph].sum()
    assert abs(float(result.circuit.mean() - expected)) <= 1e-9 * float(result.full.abs().max())
    pruned = scores.threshold(tau, absolute=False)
    if ablation == "zero":
        assert len(pruned) < len(kept)
        assert abs(float(evaluator.evaluate(pruned).circuit.mean() - expected)) > 1e-3 * float(result.full.abs().max())
    with pytest.raises(ValueError, match=r"threshold=0: ACDC's τ is a positive number"):
        fxcircuits.attribute(gpt2_64, batches, "logit_diff", "acdc", threshold=0, progress=False)


def test_a_float64_models_gradients_points_and_means_keep_float64s_digits(llama64):
    """The masks that gradients are taken in (EAP's scores are their gradient; EAP-IG-inputs sets its points
    k/steps in them) and mean ablation's means are in the model's float64: a float32 mask left every EAP score a
    float32 number, 1/3 off by 1e-8, and means summed in float32 moved exact scores by 1e-8."""
    from fxcircuits import ablations, attribution
    batch = _batch()
    eap = fxcircuits.attribute(llama64, [batch], "logit_diff", "eap", progress=False).tensor
    assert eap.dtype == torch.float64 and not torch.equal(eap, eap.float().double())
    p = prepare(llama64, [batch], logit_diff)[0]
    clean, delta, sides = attribution.differences(llama64, p)
    (_, keep, *_), = attribution._points(llama64, p, clean, delta, sides, "eap-ig-inputs", 5)
    assert keep.dtype == torch.float64 and torch.equal(keep[:, 0, 0], torch.tensor([0, 1, 2, 3, 4.0]).double() / 5)
    mask = batch["attention_mask"].double()
    recorded = llama64.recording(batch["clean"], batch["attention_mask"])[0]
    for mean, values in zip(ablations.mean_ablation(llama64, [batch]).values, recorded):
        weights = mask.view(1, *mask.shape, *[1] * (values.dim() - 3))
        assert mean.dtype == torch.float64
        torch.testing.assert_close(mean, (values * weights).sum((1, 2), keepdim=True) / mask.sum(), rtol=1e-13, atol=0)


@pytest.mark.parametrize("method, setting", [("eap", {"steps": 50}), ("exact", {"steps": 5}),
                                             ("eap-ig-inputs", {"threshold": 0.3}), ("mask", {"threshold": 0.01})])
def test_a_setting_the_method_does_not_read_is_refused(llama64, method, setting):
    """EAP run with steps=50 gave the scores of the defaults, and recorded neither: the setting changed nothing."""
    (name, value), = setting.items()
    with pytest.raises(TypeError, match=rf"{name}={value} is read by method .*, not by '{method}': leave it out"):
        fxcircuits.attribute(llama64, [_batch()], "logit_diff", method, progress=False, **setting)
    with pytest.raises(TypeError, match=rf"{name}={value} is read by method"):
        fxcircuits.attribute_by_span(llama64, [_batch()], "logit_diff", method, progress=False, **setting)


@pytest.mark.parametrize("method", ["eap-ig-inputs", "exact", "mask"])
def test_methods_are_deterministic_and_leave_the_callers_random_state_alone(llama64, method):
    """The same scores twice; and torch's global generator as the caller left it, so that a study drawing prompts
    between runs does not draw the same ones each time."""
    batch, options = _batch(), {"mask_steps": 3} if method == "mask" else {}
    state = torch.random.get_rng_state()
    first, second = (fxcircuits.attribute(llama64, [batch], "logit_diff", method, progress=False, **options)
                     for _ in range(2))
    assert torch.equal(first.tensor, second.tensor)
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("method", ["eap", "eap-ig-inputs", "clean-corrupted", "mask"])
def test_gradient_methods_run_under_no_grad_and_refuse_inference_mode_by_name(llama64, method):
    """A study run under ``torch.no_grad()`` as a whole gets the same scores; inference mode, whose tensors can
    never be saved for backward, is refused with the method's name rather than autograd's own error."""
    options = {"mask_steps": 4} if method == "mask" else {}
    batch = _batch()
    scores = fxcircuits.attribute(llama64, [batch], "logit_diff", method, progress=False, **options)
    with torch.no_grad():
        assert torch.equal(fxcircuits.attribute(llama64, [batch], "logit_diff", method, progress=False,
                                                **options).tensor, scores.tensor)
    with torch.inference_mode(), pytest.raises(RuntimeError, match=rf"attribution by .*'{method}'.* takes gradients, "
                                                                   r"which torch.inference_mode\(\) rules out"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", method, progress=False, **options)


@pytest.mark.parametrize("name, edge", [("llama", 40), ("gemma4_per_layer", "input->m1")])
def test_mean_ablation_uses_the_reference_means(request, name, edge):
    """The mean over the reference's real tokens of every node's output — and of every side input (Gemma 4's
    per-layer inputs, which the input node's edge into m1 carries)."""
    cm = request.getfixturevalue("llama64") if name == "llama" else fxcircuits.trace(make(name, dtype=torch.float64))
    batch = _batch()
    weights = batch["attention_mask"][:, :, None].double()
    mean = lambda v: ((v * weights).sum((-3, -2), keepdim=True) / weights.sum())  # noqa: E731
    means = mean(cm.activations(batch["clean"], batch["attention_mask"]))
    sides = [mean(v) for v in cm.side_inputs(batch["clean"], batch["attention_mask"])]
    edge = cm.graph.edges[edge] if isinstance(edge, int) else edge
    with torch.no_grad():
        patched = cm(batch["clean"], batch["attention_mask"], corrupted_activations=means, edge_mask={edge: 0.0},
                     corrupted_side_inputs=sides or None)
        expected = (logit_diff(cm(batch["clean"], batch["attention_mask"]), batch).mean()
                    - logit_diff(patched, batch).mean())
    scores = fxcircuits.attribute(cm, [batch], "logit_diff", "exact", ablation="mean", reference=[batch],
                                  progress=False)
    assert scores[edge] == pytest.approx(float(expected), abs=1e-5)


def _tap_reference(cm, batch: dict, method: str, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The scores of the EAP-IG methods from the gradient of the metric in the edge masks, and which edges it
    covers.  Taps score an edge u → d by Σ (a_u(other) − a_u(clean)) · ∂metric/∂x_d at each point; where the point
    runs u itself on the clean input (the edges a point moves), the gradient of the metric in the edge's mask there
    is an independent reference."""
    prepared = prepare(cm, [batch], logit_diff)[0]
    n_up, sizes = len(cm.graph.upstream), cm.graph.group_sizes
    points = []  # (node mask per step, the upstream nodes whose edges the point scores)
    if method == "eap-ig-inputs":  # the input node's edges at k/steps, k = 0 … steps−1
        node_masks = torch.ones(steps, n_up)
        node_masks[:, 0] = torch.arange(steps) / steps
        points.append((node_masks, torch.arange(n_up) == 0))
    else:  # each writer's edges at k/steps, k = 1 … steps (the input's carry its side inputs); its edges scored
        for first, size in zip(torch.tensor([0, *sizes]).cumsum(0).tolist(), sizes):
            node_masks, scored = torch.ones(steps, n_up), torch.zeros(n_up, dtype=torch.bool)
            node_masks[:, first:first + size] = (torch.arange(1, steps + 1) / steps)[:, None]
            scored[first:first + size] = True
            points.append((node_masks, scored))
    total = torch.zeros(n_up, len(cm.graph.downstream), dtype=torch.float64)
    scored_nodes = torch.zeros(n_up, dtype=torch.bool)
    for node_masks, scored in points:
        keep = dense_keep(cm.graph, node_mask=node_masks).double().requires_grad_(True)
        value = prepared.measure(cm, logit_diff, keep).sum()
        total += torch.autograd.grad(value, keep)[0].sum(0) * scored[:, None]
        scored_nodes |= scored
    return total[cm.graph.src, cm.graph.dst] / (prepared.size * steps), scored_nodes[cm.graph.src]


def _assert_scores_the_reference(cm, batch: dict, method: str, steps: int) -> None:
    scores = fxcircuits.attribute(cm, [batch], "logit_diff", method, steps=steps, progress=False)
    expected, scored = _tap_reference(cm, batch, method, steps)
    torch.testing.assert_close(scores.tensor.double()[scored], expected[scored], rtol=1e-4,
                               atol=1e-6 * float(expected[scored].abs().max()))


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_taps_score_the_per_layer_inputs_with_the_input_nodes_edges(method):
    """For the input node's edges into the blocks that read Gemma 4's per-layer inputs, the taps and the mask's
    gradient (``_tap_reference``) agree only if the tap scores the per-layer input as well."""
    _assert_scores_the_reference(fxcircuits.trace(make("gemma4_per_layer", dtype=torch.float64)), _batch(), method, 3)


@pytest.mark.parametrize("method", ["eap-ig-inputs", "eap-ig-activations"])
def test_the_default_five_steps_score_as_the_masks_gradient(llama64, method):
    """Five steps run as five masks, and a batch's values at a reader (3 × 7 × 64) do not split into five: the
    backward pass of the layers the steps share (``fxcircuits.prefix``) reshaped their gradient by mask anyway, and
    EAP-IG-activations at its default steps crashed, as it would on SmolLM2 wherever batch × length is no
    multiple of five."""
    _assert_scores_the_reference(llama64, _batch(), method, 5)


def test_bad_arguments(llama64):
    batch = _batch()
    with pytest.raises(ValueError, match="unknown method"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "magic")
    with pytest.raises(ValueError, match="needs a metric"):
        fxcircuits.attribute(llama64, [batch], None, "eap")
    with pytest.raises(TypeError, match=r"options of a learned mask \(method 'mask' or 'ugs'\), not of 'eap'"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "eap", density=0.1)
    with pytest.raises(ValueError, match="reference"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "eap", ablation="mean")
    with pytest.raises(ValueError, match="steps is a count, an int of at least 1; got 0"):
        fxcircuits.attribute(llama64, [batch], "logit_diff", "eap-ig-inputs", steps=0)
    with pytest.raises(ValueError, match="corrupted"):
        fxcircuits.attribute(llama64, [{**batch, "corrupted": batch["corrupted"][:, :5]}], "logit_diff", "eap")
    answers = batch["correct"].clone()
    answers[0, 0] = 300  # past the model's 128 ids: the metric's gather failed with an IndexError naming no batch
    for evaluate in (lambda b: fxcircuits.attribute(llama64, [b], "logit_diff", "eap"),
                     lambda b: fxcircuits.Evaluator(llama64, [b], "logit_diff")):
        with pytest.raises(ValueError, match=r"batch\['correct'\] must hold answer token ids < 128 or -1"):
            evaluate({**batch, "correct": answers})


def test_bf16_models_attribute_like_fp32(traced):
    """bf16 runs the same computation with 8-bit mantissas: the scores agree with fp32's up to that rounding."""
    batch = _batch()
    fp32 = fxcircuits.attribute(traced("llama")[1], [batch], "logit_diff", "eap", progress=False).tensor
    bf16 = fxcircuits.attribute(fxcircuits.trace(make("llama", dtype=torch.bfloat16)), [batch], "logit_diff", "eap",
                                progress=False).tensor
    assert bf16.dtype == torch.float32 and torch.isfinite(bf16).all()
    assert torch.corrcoef(torch.stack([fp32, bf16]))[0, 1] > 0.95
