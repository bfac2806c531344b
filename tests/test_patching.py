"""Masks implement patching: checked against the untouched HF model and hook-based references on it."""
import copy
import warnings

import pytest
import torch

import fxcircuits
from fxcircuits.model import CircuitModel
from fxcircuits.patching import dense_keep
from fxcircuits.rewrite import flat_module
from zoo import CONFIGS, make, modules


def _close(ours: torch.Tensor, reference: torch.Tensor, valid: torch.Tensor | None = None, share: float = 1e-4):
    """max |difference| ≤ ``share`` (1e-4) of the logit scale, over the positions that are not padding."""
    if valid is not None:
        ours, reference = ours[valid.bool()], reference[valid.bool()]
    scale = reference.abs().max().item()
    difference = (ours - reference).abs().max().item()
    assert difference <= share * scale, f"max |difference| {difference:.3g} exceeds {share:g} × logit scale {scale:.3g}"


def _zeros_except(cm, ones: set[str] = frozenset()) -> torch.Tensor:
    return torch.tensor([1.0 if e in ones else 0.0 for e in cm.graph.edges])


@pytest.mark.parametrize("name", sorted(CONFIGS))
class TestEveryArchitecture:
    def test_no_mask_equals_hf(self, traced, prompts, name):
        model, cm = traced(name)
        clean, _, mask = prompts
        right = torch.ones_like(mask)
        right[1, -3:] = 0
        with torch.no_grad():
            _close(cm(clean), model(input_ids=clean).logits)
            _close(cm(clean, mask), model(input_ids=clean, attention_mask=mask).logits, mask)
            _close(cm(clean, right), model(input_ids=clean, attention_mask=right).logits, right)

    def test_all_edges_zero_is_the_corrupted_run(self, traced, prompts, name):
        model, cm = traced(name)
        clean, corrupted, mask = prompts
        with torch.no_grad():
            patched = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=torch.zeros(len(cm.graph.edges)))
            _close(patched, model(input_ids=corrupted, attention_mask=mask).logits, mask)
            kept = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=torch.ones(len(cm.graph.edges)))
            _close(kept, model(input_ids=clean, attention_mask=mask).logits, mask)

    def test_edges_into_logits_alone_give_the_corrupted_logits(self, traced, prompts, name):
        """Patching every edge into the logits and nothing else leaves all other nodes clean."""
        model, cm = traced(name)
        clean, corrupted, mask = prompts
        into_logits = {e: 0.0 for e in cm.graph.edges if e.endswith("->logits")}
        with torch.no_grad():
            patched = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=into_logits)
            _close(patched, model(input_ids=corrupted, attention_mask=mask).logits, mask)

    def test_node_patching_matches_hooks(self, traced, prompts, name):
        model, cm = traced(name)
        clean, corrupted, mask = prompts
        with torch.no_grad():
            for node in ("m0", "a0.h1") if cm.graph.n_heads else ("m0",):
                ours = cm(clean, mask, corrupted_input_ids=corrupted, node_mask={node: 0.0})
                _close(ours, _hooked_node_patch(model, name, node, clean, corrupted, mask), mask)

    def test_many_masks_in_one_call(self, traced, prompts, name):
        _, cm = traced(name)
        clean, corrupted, mask = prompts
        generator = torch.Generator().manual_seed(2)
        masks = torch.rand(3, len(cm.graph.edges), generator=generator)
        # in every mask, every layer's k input of head 0 and all its q inputs patched wholly: those heads read the
        # recording of one batch, repeated for each mask where read
        masks[:, torch.tensor([e.endswith((".h0<k>", "<q>")) for e in cm.graph.edges])] = 0.0
        with torch.no_grad():
            together = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
            for i in range(3):
                alone = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks[i])
                _close(together[i], alone, mask)

    def test_logits_at_positions_are_the_full_logits_there(self, traced, prompts, name):
        """``patched(..., positions=...)`` runs the readout on one position per prompt: two masks, a position
        each prompt of its own, as metrics that read the answer position take them (``runs.Prepared``)."""
        _, cm = traced(name)
        clean, corrupted, mask = prompts
        keep = dense_keep(cm.graph, torch.rand(2, len(cm.graph.edges), generator=torch.Generator().manual_seed(6)))
        positions, rows = torch.tensor([6, 2, 4]), torch.arange(3)
        with torch.no_grad():
            other, recorded = cm.recording(corrupted, mask)
            full = cm.patched(clean, mask, other, keep, recorded=recorded)
            at = cm.patched(clean, mask, other, keep, recorded=recorded, positions=positions)
        assert at.shape == (2, 3, 1, full.shape[-1])
        _close(at[:, :, 0], full[:, rows, positions])

    def test_the_corrupted_run_alongside_equals_it_recorded_first(self, traced, prompts, name, as_on_a_gpu):
        """On a GPU and without a gradient, ``cm(..., corrupted_input_ids=...)`` runs the corrupted prompts in the
        patched pass itself, ahead of the patched rows (``CircuitModel.patched_alongside``), with the norms in front
        of the heads' projections as captured (``heads.launch_bound``); on CPU, and in attribution and evaluation,
        the corrupted run is recorded first and patched from.  Both give the same logits: for a soft mask, a circuit
        (many heads read the corrupted run alone), one edge, and three masks in one call."""
        _, cm = traced(name)
        clean, corrupted, mask = prompts
        n, generator = len(cm.graph.edges), torch.Generator().manual_seed(3)
        masks = [torch.rand(n, generator=generator), (torch.rand(n, generator=generator) < 0.1).float(),
                 torch.ones(n).index_fill(0, torch.tensor([n // 2]), 0.0), torch.rand(3, n, generator=generator)]
        keeps = [dense_keep(cm.graph, edge_mask) for edge_mask in masks]
        with torch.no_grad():
            other, recorded = cm.recording(corrupted, mask)
            on_cpu = [cm.patched(clean, mask, other, keep, recorded=recorded) for keep in keeps]
            as_on_a_gpu()
            for edge_mask, keep, expected in zip(masks, keeps, on_cpu):
                alongside = cm.patched_alongside(clean, mask, corrupted, keep)
                valid = mask.expand(keep.shape[0], -1, -1)
                _close(alongside, expected, valid)
                _close(cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=edge_mask).reshape(alongside.shape),
                       alongside, valid)


@pytest.mark.parametrize("name", ["llama", "gpt2", "opt", "bloom", "gemma2", "falcon_new_arch", "gemma4_per_layer"])
def test_prompts_of_one_token(traced, prompts, name):
    """The HF model takes prompts of one token, and so does ``cm``, though no capture serves them (export
    specialises that size): the token runs at a second position too, which no earlier position of a causal model
    sees.  OPT and BLOOM compute positions (or ALiBi) from the attention mask; Gemma 4's E-models read per-layer
    inputs beside the stream."""
    model, cm = traced(name)
    clean, corrupted, _ = (p[:, 3:4] for p in prompts)
    mask, longer = torch.ones_like(clean), torch.cat([clean, corrupted], 1)
    zeros = torch.zeros(len(cm.graph.edges))
    with torch.no_grad():
        _close(cm(clean), model(input_ids=clean).logits)
        _close(cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=zeros), model(input_ids=corrupted).logits)
        for node in ("m0", "a0.h1"):
            _close(cm(clean, mask, corrupted_input_ids=corrupted, node_mask={node: 0.0}),
                   _hooked_node_patch(model, name, node, clean, corrupted, mask))
        torch.testing.assert_close(cm.activations(clean), cm.activations(longer)[:, :, :1])
        torch.testing.assert_close(cm.streams(clean, mask), cm.streams(longer)[:, :, :1])
        for side, of_longer in zip(cm.side_inputs(clean), cm.side_inputs(longer), strict=True):
            torch.testing.assert_close(side, of_longer[:, :1])
        assert [tuple(p.shape) for p in cm.patterns(clean)] == [(3, cm.graph.n_heads, 1, 1)] * cm.graph.n_layers
    with pytest.raises(ValueError, match=r"have shape \(3, 1\) but corrupted_input_ids have \(3, 2\)"):
        cm(clean, corrupted_input_ids=longer[:, :2], edge_mask=zeros)
    with pytest.raises(ValueError, match="no capture serves prompts of one token"):
        cm.recording(clean)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_mask_values_outside_0_1_extrapolate_along_the_line(traced, prompts, name):
    """An edge into the logits at mask m adds (1 − m)·(a_u(corrupted) − a_u(clean)) to the final stream, also for m
    outside [0, 1]: checked against the readout of that stream, built from the recorded outputs."""
    _, cm = traced(name)
    clean, corrupted, mask = prompts
    source = cm.graph.upstream[2]
    with torch.no_grad():
        final = cm.streams(clean, mask)[-1]
        delta = cm.activations(corrupted, mask)[2] - cm.activations(clean, mask)[2]
        values = torch.tensor([2.0, -0.5, 0.3])
        masks = torch.ones(len(values), len(cm.graph.edges))
        masks[:, cm.graph.edge_index[f"{source}->logits"]] = values
        patched = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
        for m, ours in zip(values, patched):  # [n_masks, batch, seq, vocab]
            _close(ours, cm.readout(final + (1 - m) * delta), mask)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma4", "gemma4_per_layer", "scaled_residual", "qwen3_5"])
def test_the_corrupted_run_recorded_once_serves_later_calls(traced, prompts, name):
    """``corrupted_activations=cm.activations(corrupted)`` (with the side inputs where the model reads them) gives
    the numbers ``corrupted_input_ids=corrupted`` gives, so a loop over masks can record the corrupted run once —
    also where the stream is rescaled (Gemma 4, a scaled residual) or a writer is no attention (Qwen3.5)."""
    _, cm = traced(name)
    clean, corrupted, mask = prompts
    masks = torch.rand(2, len(cm.graph.edges), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sides = cm.side_inputs(corrupted, mask)
        recorded = cm(clean, mask, corrupted_activations=cm.activations(corrupted, mask), edge_mask=masks,
                      **({"corrupted_side_inputs": sides} if sides else {}))
        for ours, reference in zip(recorded, cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)):
            _close(ours, reference, mask)


def test_one_batch_of_the_other_run_serves_every_mask(prompts):
    """``patched`` takes the other run as one batch for all masks (never copied per mask): the logits, and the
    gradients to the other run's outputs, equal those of the same batch repeated for each mask."""
    cm = fxcircuits.trace(make("llama"))
    clean, corrupted, mask = prompts
    generator = torch.Generator().manual_seed(4)
    keep = dense_keep(cm.graph, torch.rand(3, len(cm.graph.edges), generator=generator))
    weights = torch.randn(3, *clean.shape, 1, generator=generator)  # a metric over the masks' first logit
    with torch.no_grad():
        activations = cm.activations(corrupted, mask)
    grads = []
    for per_mask in (False, True):
        other = activations.clone().requires_grad_(True)
        groups = list((other.repeat(1, 3, 1, 1) if per_mask else other).split(cm.graph.group_sizes))
        logits = cm.patched(clean, mask, groups, keep)
        (logits[..., :1] * weights).sum().backward()
        grads.append((logits.detach(), other.grad))
    _close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-4, atol=1e-6)
    assert grads[0][1].abs().sum() > 0


# test reference: where each model computes head 2's query and output gate (module, columns per head, its slice)
GATED = {"qwen3_next": [("q_proj", slice(0, 16)), ("q_proj", slice(16, 32))],  # q_proj: per head [query | gate]
         "afmoe": [("q_proj", slice(0, 16)), ("gate_proj", slice(0, 16))]}


@pytest.mark.parametrize("name", sorted(GATED))
def test_an_output_gate_follows_its_heads_q_input(prompts, name):
    """An output gate acts at the query's position, as q does: every edge into ``a1.h2<q>`` patched equals HF with
    head 2's query and output gate both computed from the corrupted run — not its query alone.  Qwen3-Next's q_proj
    writes each head's query and gate side by side; AFMoE's gate has its own projection."""
    model = make(name)
    cm = fxcircuits.trace(model)
    clean, corrupted, mask = prompts

    def patched(parts):
        handles = []
        for module_name, columns in parts:
            module = model.get_submodule(f"model.layers.1.self_attn.{module_name}")
            saved = _capture_output(model, module, corrupted, mask)
            width = module.weight.shape[0] // model.config.num_attention_heads
            columns = slice(2 * width + columns.start, 2 * width + columns.stop)
            handles.append(module.register_forward_hook(
                lambda m, args, out, saved=saved, columns=columns: torch.cat(
                    [out[..., :columns.start], saved[..., columns], out[..., columns.stop:]], -1)))
        return _run_with(model, handles, clean, mask)

    with torch.no_grad():
        ours = cm(clean, mask, corrupted_input_ids=corrupted,
                  edge_mask={e: 0.0 for e in cm.graph.edges if e.endswith("->a1.h2<q>")})
        head = patched(GATED[name])
        query_alone = patched(GATED[name][:1])
    _close(ours, head, mask)
    assert (ours - query_alone)[mask.bool()].abs().max() > 1e-3 * head.abs().max()


def _hooked_node_patch(model, name, node, clean, corrupted, mask, at: torch.Tensor | None = None):
    """Reference on the unmodified HF model: replace one MLP's output, or one head's share of the attention
    output (``m1``, ``a0.h2``), by its value on the corrupted prompt — at the positions ``at`` weights ([seq] or
    [batch, seq]; all where None)."""
    layer = int(node[1:].split(".")[0])
    mlp_path, out_path, post_norm_path = (p and p.format(layer) for p in modules(name))
    at = torch.ones(clean.shape[1]) if at is None else at
    def mix(run, other):  # [batch, seq, features], or [batch · seq, features] (OPT's MLP)
        by_position = (other - run).reshape(*clean.shape, -1)
        return run + (at[..., None] * by_position).reshape(run.shape)
    if node.startswith("m"):
        module = model.get_submodule(mlp_path)
        saved = _capture_output(model, module, corrupted, mask)
        return _run_with(model, module.register_forward_hook(lambda m, i, o: mix(o, saved)), clean, mask)
    head = int(node.split("h")[-1])
    out_proj = model.get_submodule(out_path)
    width = out_proj.weight.shape[0] if hasattr(out_proj, "nf") else out_proj.weight.shape[1]
    cols = slice(head * width // 4, (head + 1) * width // 4)
    z_corrupted = _capture_input(model, out_proj, corrupted, mask)
    if post_norm_path is None:
        def swap_head(module, args):
            z = args[0].clone()
            z[..., cols] = mix(z[..., cols], z_corrupted[..., cols])
            return (z,)
        return _run_with(model, out_proj.register_forward_pre_hook(swap_head), clean, mask)
    # A norm after attention: a head's write keeps the normalisation scale of the whole write (heads.py).
    norm = model.get_submodule(post_norm_path)
    o_corrupted = _capture_input(model, norm, corrupted, mask)
    state = {}
    handles = [out_proj.register_forward_pre_hook(lambda m, a: state.update(z=a[0]))]

    def share(z, o):
        zh = torch.zeros_like(z)
        zh[..., cols] = z[..., cols]
        o_head = out_proj.forward(zh)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", 1e-6))
        rms = lambda x: torch.sqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)  # noqa: E731
        return norm.forward(o_head) * rms(o_head) / rms(o)  # forward(): not through the hook itself

    handles.append(norm.register_forward_hook(
        lambda m, a, out: mix(out, out + share(z_corrupted, o_corrupted) - share(state["z"], a[0]))))
    return _run_with(model, handles, clean, mask)


def _capture_output(model, module, ids, mask):
    saved = {}
    # cloned: Falcon adds the attention output into the MLP output in place
    handle = module.register_forward_hook(lambda m, i, o: saved.update(out=o.clone()))
    _run_with(model, handle, ids, mask)
    return saved["out"]


def _capture_input(model, module, ids, mask):
    saved = {}
    handle = module.register_forward_pre_hook(lambda m, a: saved.update(x=a[0]))
    _run_with(model, handle, ids, mask)
    return saved["x"]


def _run_with(model, handles, ids, mask):
    handles = handles if isinstance(handles, list) else [handles]
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("ablation", ["corrupted", "zero"])
def test_the_input_nodes_edge_carries_the_per_layer_input(traced, prompts, ablation):
    """Gemma 4's E-models compute a per-layer input from the tokens beside the stream and read it in a block after
    each MLP (m1 in layer 0).  Patching the edge input → m1 alone gives that block the other run's per-layer input,
    and its stream input the other run's embedding, and changes nothing else: checked against hooks on the
    unmodified HF model, for a corrupted prompt and for zero ablation."""
    model, cm = traced("gemma4_per_layer")
    clean, corrupted, mask = prompts
    layer, embed = model.model.layers[0], model.model.embed_tokens
    with torch.no_grad():
        embed_clean = _capture_output(model, embed, clean, mask)
        if ablation == "corrupted":
            kwargs = dict(corrupted_input_ids=corrupted)
            embed_other = _capture_output(model, embed, corrupted, mask)
            saved = {}
            _run_with(model, layer.register_forward_pre_hook(lambda m, a: saved.update(side=a[1])), corrupted, mask)
            side_other = saved["side"]
        else:
            kwargs = dict(corrupted_activations=torch.zeros(len(cm.graph.upstream), 1, 1, cm.graph.d_model),
                          corrupted_side_inputs=[torch.zeros(1, 1, *shape) for shape in cm.side_shapes])
            embed_other, side_other = 0.0, 0.0

        def reference(with_side: bool) -> torch.Tensor:
            hooks = [layer.per_layer_input_gate.register_forward_pre_hook(
                lambda m, a: (a[0] + embed_other - embed_clean,))]
            if with_side:
                hooks.append(layer.register_forward_pre_hook(lambda m, a: (a[0], a[1] * 0 + side_other, *a[2:])))
            return _run_with(model, hooks, clean, mask)

        ours = cm(clean, mask, edge_mask={"input->m1": 0.0}, **kwargs)
        _close(ours, reference(True), mask)
        assert not torch.allclose(ours, reference(False), atol=1e-3)  # the per-layer input matters here


def test_a_layer_that_reuses_keys_and_values_reads_them_at_the_layer_that_computed_them(traced, prompts):
    """Gemma 4's E-models reuse in their last layers the keys and values of an earlier layer (layer 2 those of
    layer 0): the k and v inputs of layer 2's heads read the stream where layer 0 reads it, so an edge from the
    input into them reaches them at layer 0.  Patching input → a2.h0<k> and input → a2.h1<k> (the two query heads of
    key head 0) gives layer 2 layer 0's keys of the corrupted run for that key head, and changes nothing else:
    checked against hooks on the unmodified HF model."""
    model, cm = traced("gemma4_kv_shared")
    clean, corrupted, mask = prompts
    attention = model.model.layers[2].self_attn
    assert not any(e.startswith(("a0.", "a1.", "m0", "m1")) and e.endswith("->a2.h0<k>") for e in cm.graph.edges)
    assert fxcircuits.CircuitGraph.from_config(cm.graph.cfg).edges == cm.graph.edges  # saved circuits load back
    with torch.no_grad():
        saved = {}
        hook = attention.register_forward_pre_hook(
            lambda m, a, kw: saved.update(kv=kw["shared_kv_states"][m.layer_type]), with_kwargs=True)
        _run_with(model, hook, corrupted, mask)
        corrupted_k = saved["kv"][0]

        def swap_key_head(module, args, kwargs):
            k, v = kwargs["shared_kv_states"][module.layer_type]
            k = k.clone()
            k[:, 0] = corrupted_k[:, 0]
            return args, {**kwargs, "shared_kv_states": {module.layer_type: (k, v)}}

        reference = _run_with(model, attention.register_forward_pre_hook(swap_key_head, with_kwargs=True), clean,
                              mask)
        ours = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask={"input->a2.h0<k>": 0.0,
                                                                        "input->a2.h1<k>": 0.0})
        _close(ours, reference, mask)
        assert not torch.allclose(ours, model(input_ids=clean, attention_mask=mask).logits, atol=1e-3)


def test_a_delayed_write_is_patched_where_it_reads_and_where_it_writes(traced, prompts):
    """LongCat-Flash's shortcut MoE (m2) reads the stream after layer 0's first attention and writes at the end of
    decoder layer 0, after the second attention and MLP (m1).  Patching the node m2 gives every later reader its
    corrupted output, as replacing the module's output does on the unmodified HF model; patching the edge
    input → m2 gives the shortcut alone the corrupted token embedding in the stream it reads, as a hook that rebuilds
    its input that way does — while the first MLP, which reads the same normed stream, keeps the clean one."""
    model, cm = traced("longcat_flash")
    clean, corrupted, mask = prompts
    layer = model.model.layers[0]
    with torch.no_grad():
        shortcut = _capture_output(model, layer.mlp, corrupted, mask)
        reference = _run_with(model, layer.mlp.register_forward_hook(lambda m, a, out: shortcut.clone()), clean, mask)
        _close(cm(clean, mask, corrupted_input_ids=corrupted, node_mask={"m2": 0.0}), reference, mask)

        embed = model.get_input_embeddings()
        swap = embed(corrupted) - embed(clean)
        seen = {}
        norm = layer.post_attention_layernorm[0]
        handles = [norm.register_forward_pre_hook(lambda m, a: seen.update(stream=a[0])),
                   layer.mlp.register_forward_pre_hook(lambda m, a: (norm.forward(seen["stream"] + swap),))]
        reference = _run_with(model, handles, clean, mask)
        ours = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask={"input->m2": 0.0})
        _close(ours, reference, mask)
        assert not torch.allclose(ours, model(input_ids=clean, attention_mask=mask).logits, atol=1e-3)


@pytest.mark.parametrize("alongside", [False, True])
def test_masks_that_move_late_edges_share_the_per_layer_inputs_of_the_prefix(traced, prompts, monkeypatch,
                                                                           alongside):
    """Masks that move edges into the last layers alone run the layers before once for all (``fxcircuits.prefix``);
    the per-layer inputs, computed there, are repeated for every mask where the masks part — recorded first or
    (as on a GPU) alongside."""
    monkeypatch.setattr(fxcircuits.CircuitModel, "runs_alongside", lambda self: alongside)
    _, cm = traced("gemma4_per_layer")
    clean, corrupted, mask = prompts
    edges = ["input->m3", "input->m1", "a0.h1->m3", "m1->m3"]
    masks = torch.ones(len(edges), len(cm.graph.edges))
    for i, edge in enumerate(edges):
        masks[i, cm.graph.edge_index[edge]] = 0.0
    assert cm.shares_prefix
    with torch.no_grad():
        together = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)
        for i in range(len(edges)):
            _close(together[i], cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks[i]), mask)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_bfloat16_models(name, prompts):
    """Any dtype: a bf16 model traces, runs as HF runs it, and an all-zero mask gives its corrupted run."""
    model = make(name, dtype=torch.bfloat16)
    cm = fxcircuits.trace(model)
    clean, corrupted, mask = prompts
    with torch.no_grad():
        assert cm(clean, mask).dtype == torch.bfloat16
        torch.testing.assert_close(cm(clean, mask), model(input_ids=clean, attention_mask=mask).logits)
        patched = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=torch.zeros(len(cm.graph.edges)))
        reference = model(input_ids=corrupted, attention_mask=mask).logits
    # bf16 keeps ~3 significant digits; the patched run adds the same terms in another order
    difference = (patched.float() - reference.float())[mask.bool()].abs().max()
    assert difference <= 2e-2 * reference.float().abs().max()


def test_patched_runs_under_autocast_sum_at_the_rows_precision(traced, prompts):
    """Under CPU autocast (bf16) every route runs — a single edge and a circuit take sparse products, which MKL's
    CSR has no bf16 kernel for (they raised NotImplementedError) — with the sums in the rows' float32, so the runs
    match the same masks outside autocast to bf16's precision, all edges patched HF's corrupted run under autocast,
    and the mask's gradient flows."""
    model, cm = traced("llama")
    clean, corrupted, mask = prompts
    n = len(cm.graph.edges)
    one_edge = torch.ones(n).index_fill(0, torch.tensor([5]), 0.0)
    circuit = (torch.rand(n, generator=torch.Generator().manual_seed(5)) > 0.1).float()
    soft = torch.rand(n, generator=torch.Generator().manual_seed(6))
    patch = lambda m: cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m)  # noqa: E731
    with torch.no_grad():
        plain = [patch(m) for m in (one_edge, circuit, soft)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            cast = [patch(m) for m in (one_edge, circuit, soft)]
            patched, reference = patch(torch.zeros(n)), model(input_ids=corrupted, attention_mask=mask).logits
    for a, b in [*zip(cast, plain), (patched, reference)]:
        assert (a.float() - b.float())[mask.bool()].abs().max() <= 2e-2 * b.float().abs().max()
    edge_mask = one_edge.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        patch(edge_mask)[:, -1].float().sum().backward()
    assert edge_mask.grad.isfinite().all() and edge_mask.grad.abs().sum() > 0


def test_a_float64_model_reads_masks_by_name_and_node_masks_as_given(prompts):
    """A mask value of 1/3 by name, or a float64 node mask of 1/3, is the float64 tensor mask of 1/3 on those
    edges, to the last bit (both were rounded to float32 once: 1.6e-9 and 3.1e-8 off on this Llama)."""
    cm = fxcircuits.trace(make("llama", dtype=torch.float64))
    clean, corrupted, mask = prompts
    edge, node = cm.graph.edges[40], cm.graph.upstream[3]
    by_tensor = torch.ones(len(cm.graph.edges), dtype=torch.float64).index_fill(0, torch.tensor([40]), 1 / 3)
    out_of_node = torch.ones(len(cm.graph.edges), dtype=torch.float64).masked_fill(cm.graph.src == 3, 1 / 3)
    node_mask = torch.ones(len(cm.graph.upstream), dtype=torch.float64).index_fill(0, torch.tensor([3]), 1 / 3)
    with torch.no_grad():
        patch = lambda **masks: cm(clean, mask, corrupted_input_ids=corrupted, **masks)
        assert torch.equal(patch(edge_mask={edge: 1 / 3}), patch(edge_mask=by_tensor))
        assert torch.equal(patch(node_mask=node_mask), patch(edge_mask=out_of_node))
        assert torch.equal(patch(node_mask={node: 1 / 3}), patch(edge_mask=out_of_node))



def test_a_stream_kept_wider_than_the_model_sums_the_rows_in_its_dtype(prompts):
    """Ergo keeps its stream in float32 in a bf16 model: the input node writes the bf16 embedding, every layer a
    write normed in float32.  The rows of a patched run are held in the stream's dtype (``DeltaStore.widen``;
    soft masks and node masks crashed, mixing the two), and match the same weights in float32 to bf16's
    precision (1.0e-2 of the logit scale measured, 0.65% for the mask's gradient)."""
    low = make("ergo", dtype=torch.bfloat16)
    ours, reference = fxcircuits.trace(low), fxcircuits.trace(copy.deepcopy(low).float())
    clean, corrupted, mask = prompts
    valid = mask.expand(3, -1, -1)
    masks = torch.rand(3, len(ours.graph.edges), generator=torch.Generator().manual_seed(4))
    patch = lambda cm, **masks: cm(clean, mask, corrupted_input_ids=corrupted, **masks).float()
    with torch.no_grad():
        _close(patch(ours, edge_mask=masks), patch(reference, edge_mask=masks), valid, 3e-2)
        _close(patch(ours, node_mask={"m0": 0.0}), patch(reference, node_mask={"m0": 0.0}), mask, 3e-2)
    gradients = []
    for cm in (ours, reference):
        edge_mask = masks[0].clone().requires_grad_(True)
        patch(cm, edge_mask=edge_mask)[mask.bool()][:, 5].sum().backward()
        gradients.append(edge_mask.grad)
    torch.testing.assert_close(gradients[0], gradients[1], rtol=0, atol=3e-2 * float(gradients[1].abs().max()))

def _never(*args) -> bool:
    return False


# Ways to run the per-head reads that must give the same numbers as the default (stacked norms and projections,
# the post-projection path run once with the rounds folded into the batch, one shared row where nothing is patched
# into a layer):
READ_PATHS = {
    # each head's norm and projection on its own row, as where a norm cannot run on all rows at once
    "per-head copies": [("fxcircuits.rewrite.broadcasts", _never)],
    # the rounds of the post-projection path one after another, as where they cannot be folded into the batch
    "rounds apart": [("fxcircuits.heads.Post._folds", _never)],
    # every layer and role split per head even where the mask weights all edges into it alike
    "never shared": [("fxcircuits.rewrite.shared_input", _never), ("fxcircuits.rewrite.role_shared", _never)],
    # every head projected, even those that read the recorded corrupted run alone
    "never recorded": [("fxcircuits.rewrite.wholly_patched", lambda *args: ())],
    # every norm run whole, as captured: no factor moved across the projection, x² written out
    "norms as captured": [("fxcircuits.norms.Norm.__call__",
                           lambda norm, rows, _, *e: (norm.whole(rows, *e)[0], None, ()))],
    # every layer's heads' writes computed apart, even where the pass reads only their sum
    "writes apart": [("fxcircuits.patching.DeltaStore.stores", lambda store, group: True)],
}


def _read_path_masks(cm) -> torch.Tensor:
    """Masks that exercise every read path: patched everywhere; one edge (most layers read the stream
    unpatched); one node's edges all patched (every later layer's readers alike); only q edges patched (the k
    and v readers of every layer alike); a circuit in which every layer's q input of head 0, k input of head 1
    and v input of head 2 keep no edge (they read the corrupted run alone)."""
    n_edges, generator = len(cm.graph.edges), torch.Generator().manual_seed(5)
    masks = torch.rand(5, n_edges, generator=generator)
    masks[1] = 1.0
    masks[1, n_edges // 2] = 0.0
    masks[2] = (cm.graph.src != cm.graph.node_index["a0.h1"]).float()
    masks[3] = torch.where(torch.tensor([e.endswith("<q>") for e in cm.graph.edges]), masks[3], 1.0)
    masks[4] = (masks[4] < 0.5).float() * torch.tensor([not e.endswith(WHOLLY_PATCHED) for e in cm.graph.edges])
    return masks


WHOLLY_PATCHED = (".h0<q>", ".h1<k>", ".h2<v>")  # the readers mask 4 of ``_read_path_masks`` leaves no edge


@pytest.mark.parametrize("path", READ_PATHS)
@pytest.mark.parametrize("name", ["llama", "gpt2", "olmo2", "falcon_new_arch", "gemma", "deepseek_v3"])
def test_every_read_path_gives_the_same_numbers(name, path, prompts, monkeypatch):
    """Each mask of ``_read_path_masks`` on its own (sharing is decided per call, over all of its masks)."""
    model = make(name)
    default = fxcircuits.trace(model)
    for target, replacement in READ_PATHS[path]:
        monkeypatch.setattr(target, replacement)
    variant = fxcircuits.trace(model)
    clean, corrupted, mask = prompts
    for edge_mask in _read_path_masks(default):
        with torch.no_grad():
            ours = [cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=edge_mask) for cm in (default, variant)]
        _close(ours[0], ours[1])


def test_readers_weighted_alike_read_through_the_plain_projection(prompts, monkeypatch):
    """Only q edges patched: every layer's k and v readers see one value, and take the plain projection."""
    from fxcircuits import rewrite
    seen, role_shared = [], rewrite.role_shared
    monkeypatch.setattr(rewrite, "role_shared", lambda *args: seen.append(role_shared(*args)) or seen[-1])
    model = make("llama")
    cm = fxcircuits.trace(model)
    seen.clear()  # tracing runs the patcher too (``prefix``)
    clean, corrupted, mask = prompts
    with torch.no_grad():
        cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=_read_path_masks(cm)[3])
    assert len(seen) == 3 * model.config.num_hidden_layers
    assert not any(seen[0::3]) and all(seen[1::3]) and all(seen[2::3])


def test_heads_whose_writes_no_edge_moves_write_their_sum_alone(prompts, monkeypatch):
    """One edge out of a head of layer 1 patched: that layer's heads' writes are computed apart (the pass keeps
    their differences), every other layer's heads give their sum alone, as the plain output projection does.  With
    a gradient to the mask, every layer's are apart."""
    from fxcircuits import rewrite
    seen, head_writes = [], rewrite.head_writes
    monkeypatch.setattr(rewrite, "head_writes", lambda *args: seen.append(args[-1]) or head_writes(*args))
    model = make("llama")
    cm = fxcircuits.trace(model)
    clean, corrupted, mask = prompts
    edge = next(i for i, e in enumerate(cm.graph.edges) if e.startswith("a1.h1->"))
    one_edge = torch.ones(len(cm.graph.edges)).index_fill(0, torch.tensor([edge]), 0.0)
    with torch.no_grad():
        other, recorded = cm.recording(corrupted, mask)  # the recorder keeps every head's write
        seen.clear()
        cm.patched(clean, mask, other, dense_keep(cm.graph, one_edge), recorded=recorded)
    assert seen == [layer == 1 for layer in range(model.config.num_hidden_layers)]
    seen.clear()
    keep = dense_keep(cm.graph, one_edge.requires_grad_(True))
    cm.patched(clean, mask, other, keep, recorded=recorded).sum().backward()
    assert seen == [True] * model.config.num_hidden_layers


@pytest.mark.parametrize("name", ["llama", *sorted(GATED)])
def test_heads_reading_the_corrupted_run_alone_take_its_projections(name, prompts, monkeypatch):
    """The circuit of ``_read_path_masks``: in every layer, q of head 0, k of head 1 and v of head 2 read the
    recorded corrupted run alone, and take their projections from it — head 0 its output gate's too, which it
    computes from its q input — with the logits of a run that computes every projection.  Nothing is read from a
    recording where the other run is given as values (zero ablation) or the mask needs a gradient."""
    from fxcircuits import rewrite
    seen, wholly_patched = [], rewrite.wholly_patched
    monkeypatch.setattr(rewrite, "wholly_patched", lambda *args: seen.append(wholly_patched(*args)) or seen[-1])
    model = make(name)
    cm = fxcircuits.trace(model)
    clean, corrupted, mask = prompts
    circuit = _read_path_masks(cm)[4]
    roles = ["q", "k", "v", "gate"] if name in GATED else ["q", "k", "v"]
    with torch.no_grad():
        other, recorded = cm.recording(corrupted, mask)
        keep = dense_keep(cm.graph, circuit)
        computed = cm.patched(clean, mask, other, keep)
        seen.clear()  # tracing runs the patcher too (``prefix``), and so did the run that computes every projection
        _close(cm.patched(clean, mask, other, keep, recorded=recorded), computed, mask.expand_as(computed[..., 0]))
    assert len(seen) == len(roles) * model.config.num_hidden_layers
    assert all(head in heads for i, heads in enumerate(seen) for head in [[0, 1, 2, 0][i % len(roles)]])
    seen.clear()
    zeros = torch.zeros_like(cm.activations(clean, mask))
    with torch.no_grad():
        cm(clean, mask, corrupted_activations=zeros, edge_mask=circuit)
    cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=circuit.clone().requires_grad_(True)).sum().backward()
    assert len(seen) == 2 * len(roles) * model.config.num_hidden_layers and not any(seen)


PRODUCTS = {torch.ops.aten.linear.default, torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
            torch.ops.aten.matmul.default}


@pytest.mark.parametrize("name, summed", [("llama", True), ("gptj", True), ("gpt2", False), ("gemma2", False)])
def test_the_recorder_adds_the_heads_writes_and_skips_the_unembedding(name, summed):
    """Where the heads' writes sum to what attention adds (no output bias, no norm after it), the recording pass
    adds their sum and runs no output projection of its own; it never computes the logits (nobody reads them).
    A bias (gpt2) or a norm after attention (gemma2) keeps the output projection."""
    model = make(name)
    cm = fxcircuits.trace(model)
    products = lambda gm: sum(n.op == "call_function" and n.target in PRODUCTS for n in gm.graph.nodes)  # noqa: E731
    assert products(cm.recorder) == products(cm.exported) - 1 - (model.config.num_hidden_layers if summed else 0)


def test_the_rewritten_graphs_hold_each_weight_under_one_flat_name():
    """``rewrite.flat_module``: each weight under one attribute, the model's own tensor; two paths that flatten
    to one name keep apart."""
    root, graph = torch.nn.Module(), torch.fx.Graph()
    root.a, root.a_b = torch.nn.Module(), torch.nn.Module()
    root.a.b_c, root.a_b.c = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.zeros(2))
    graph.output((graph.get_attr("a.b_c"), graph.get_attr("a_b.c")))
    module = flat_module(root, graph)
    first, second = module()
    assert first is root.a.b_c and second is root.a_b.c
    assert [n.target for n in module.graph.nodes if n.op == "get_attr"] == ["a_b_c", "a_b_c_"]


def test_runs_without_a_gradient_write_their_rows_into_the_kept_scratch(traced, prompts):
    """Two runs in a row write their rows into the same memory and give the numbers of a run with memory of its
    own; a run that needs a gradient keeps its own rows, so a run in between cannot change its gradient."""
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    masks = torch.rand(2, len(cm.graph.edges), generator=torch.Generator().manual_seed(3))
    patched = lambda m: cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m)  # noqa: E731
    with torch.no_grad():
        cm.scratch.clear()
        first = patched(masks[0])
        held = dict(cm.scratch._buffers)
        second = patched(masks[1])
        assert held.keys() == {"rows", "sums"} and all(cm.scratch._buffers[use] is held[use] for use in held)
        with cm.scratch.lend() as taken:  # held elsewhere: the run gets memory of its own
            assert taken is cm.scratch
            torch.testing.assert_close(patched(masks[0]), first, rtol=0, atol=0)
            torch.testing.assert_close(patched(masks[1]), second, rtol=0, atol=0)
            with cm.scratch.lend() as other:
                assert other is None

    def gradient(between):
        edge_mask = masks[0].clone().requires_grad_(True)
        logits = patched(edge_mask)
        with torch.no_grad():
            between()
        logits[:, -1].sum().backward()
        return edge_mask.grad

    torch.testing.assert_close(gradient(lambda: patched(masks[1])), gradient(lambda: None), rtol=0, atol=0)


def test_a_run_under_inference_mode_leaves_a_scratch_that_later_runs_can_write(traced, prompts):
    """Memory made under ``torch.inference_mode()`` cannot be written outside it: the scratch is made outside it, so
    a patched run there does not break every later run without a gradient (they raised "Inplace update to
    inference tensor outside InferenceMode"), and the numbers are the same in both modes."""
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    masks = torch.rand(3, len(cm.graph.edges), generator=torch.Generator().manual_seed(4))
    patched = lambda: cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=masks)  # noqa: E731
    cm.scratch.clear()
    with torch.inference_mode():
        inferred = patched()
    assert not any(held.is_inference() for held in cm.scratch._buffers.values())
    with torch.no_grad():
        torch.testing.assert_close(patched(), inferred, rtol=0, atol=0)


def test_a_capture_serves_the_lengths_its_code_allows_and_others_are_captured_on_first_use(traced, monkeypatch):
    """Granite 4.0's Mamba-2 layer scans chunks of 16 positions in a Python loop: torch.export keeps the length a
    symbol and asserts what the loop assumed, so the capture at 5 tokens serves 2 to 15.  Other lengths are
    captured on first use, with a warning, and each of those serves what its own assertions allow (not 16 alone,
    here, but 17 to 63 save multiples of 16); every length patches exactly."""
    model, traced_cm = traced("granite_hybrid")
    cm = CircuitModel(traced_cm.model_name, traced_cm.first, traced_cm.capture_at,  # the first capture alone
                      traced_cm.weights)
    assert [n for n in range(2, 64) if cm.first.lengths.serve(2, n)] == list(range(2, 16))
    generator = torch.Generator().manual_seed(3)
    for length in (5, 9, 16, 20, 40):
        clean, corrupted = torch.randint(0, 128, (2, 2, length), generator=generator)
        mask = torch.ones_like(clean)
        mask[0, :2] = 0
        new = cm.serving(clean) is None
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            logits = model(input_ids=clean, attention_mask=mask).logits
            _close(cm(clean, mask), logits, mask)
            _close(cm.readout(cm.streams(clean, mask)[-1]), logits, mask)  # the first capture's, at every length
            patched = cm(clean, mask, corrupted_input_ids=corrupted, node_mask={"m0": 0.0})
            _close(patched, _hooked_node_patch(model, "granite_hybrid", "m0", clean, corrupted, mask), mask)
        again = [w for w in caught if "captured GraniteMoeHybridForCausalLM again" in str(w.message)]
        assert bool(again) == new
        assert all(w.filename == __file__ for w in again)  # the line that called, not one inside the package
    assert list(cm.engines) == ["5", "16", "20"]
    monkeypatch.setattr(cm, "capture_at", None)  # a length served before is not captured again
    with torch.no_grad():
        assert cm.activations(clean, mask).shape[2] == 40