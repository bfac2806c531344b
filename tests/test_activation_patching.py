"""Masks that patch some positions alone (``patch_positions``): checked against hooks on the untouched HF model,
against the same masks over every position, and by finite differences."""
import pytest
import torch
from torch import nn

from fxcircuits import Circuit, attribute, metrics, trace
from fxcircuits.patching import position_weights
from fxcircuits.activation_patching import DIRECTIONS, _units, patch_by_position, patch_inputs, patch_nodes
from fxcircuits.runs import Prepared
from test_attribution import linear_gpt2
from test_patching import _capture_input, _capture_output, _close, _hooked_node_patch, _run_with
from zoo import CONFIGS, make, modules

NODE_NAMES = ["llama", "gpt2", "opt", "bloom", "gemma2", "falcon_new_arch", "gpt_neox", "mixtral"]


@pytest.mark.parametrize("name", NODE_NAMES)
def test_a_node_patched_at_some_positions_matches_hooks(traced, prompts, name):
    """One MLP and one head, patched at one position and at two, by index and by weights."""
    model, cm = traced(name)
    clean, corrupted, mask = prompts
    with torch.no_grad():
        for node in ("m0", "a0.h1"):
            for positions in ([4], [2, -1]):
                at = position_weights(positions, clean.shape[1])
                ours = cm(clean, mask, corrupted_input_ids=corrupted, node_mask={node: 0.0}, patch_positions=positions)
                reference = _hooked_node_patch(model, name, node, clean, corrupted, mask, at)
                _close(ours, reference, mask)
                _close(cm(clean, mask, corrupted_input_ids=corrupted, node_mask={node: 0.0}, patch_positions=at),
                       reference, mask)
            whole = cm(clean, mask, corrupted_input_ids=corrupted, node_mask={node: 0.0})
            assert (whole - ours)[mask.bool()].abs().max() > 1e-3 * whole.abs().max()  # the positions matter


def _layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: the model's longest ModuleList."""
    return max((m for m in model.modules() if isinstance(m, nn.ModuleList)), key=len)


def _hooked_stream_patch(model, layer: int, position: int | torch.Tensor, clean, corrupted, mask):
    """Reference: the stream entering decoder layer ``layer`` at ``position`` (an index, or 0/1 weights [batch,
    seq]), taken from the corrupted run (causal tracing's patch, on the unmodified HF model)."""
    block, saved = _layers(model)[layer], {}

    def hidden(args, kwargs):
        return args[0] if args else kwargs["hidden_states"]

    def record(module, args, kwargs):
        saved["x"] = hidden(args, kwargs).clone()

    def swap(module, args, kwargs):
        x = hidden(args, kwargs)
        at = position_weights([position], x.shape[1]) if isinstance(position, int) else position
        x = torch.where(at.bool()[..., None], saved["x"], x)
        return ((x, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": x})

    _run_with(model, block.register_forward_pre_hook(record, with_kwargs=True), corrupted, mask)
    return _run_with(model, block.register_forward_pre_hook(swap, with_kwargs=True), clean, mask)


def _hooked_effect(model, batch: dict, direction: str, hooked) -> torch.Tensor:
    """The reference effect [batch] of a patch made by hooks, ``hooked(run, other, mask)`` → logits: the HF model's
    metric unpatched minus patched (noising, the clean run), or patched minus unpatched (denoising, the corrupted
    run)."""
    run, other = (batch["clean"], batch["corrupted"]) if direction == "noising" else (batch["corrupted"],
                                                                                       batch["clean"])
    mask = batch["attention_mask"]
    unpatched = metrics.logit_diff(model(input_ids=run, attention_mask=mask).logits, batch)
    patched = metrics.logit_diff(hooked(run, other, mask), batch)
    return unpatched - patched if direction == "noising" else patched - unpatched


@pytest.mark.parametrize("name, layers", [("recurrent_gemma", {"into m0": 0, "into m2": 1, "into a0 m4": 2}),
                                           ("qwen3_5", {"into m0": 0, "into a0 m2": 1})])
def test_a_hybrids_stream_is_patched_entering_each_block_named_by_its_nodes(traced, name, layers):
    """A hybrid counts its attention layers and its other writers apart, so its units are its blocks, named by
    their nodes: RecurrentGemma's recurrent block and MLP (m0, m1) are decoder layer 0, its attention and MLP (a0,
    m4) layer 2; Qwen3.5's linear attention and MLP (m0, m1) layer 0.  The stream entering the block that opens a
    decoder layer is the stream entering that layer, against a hook on the HF model."""
    model, cm = traced(name)
    generator = torch.Generator().manual_seed(2)
    clean = torch.randint(0, 128, (2, 6), generator=generator)
    corrupted = torch.cat([clean[:, :3], torch.randint(0, 128, (2, 3), generator=generator)], 1)
    batch = {"clean": clean, "corrupted": corrupted, "attention_mask": torch.ones_like(clean),
             "correct": torch.tensor([[5], [9]]), "incorrect": torch.tensor([[7], [1]])}
    effects = patch_by_position(cm, batch, metrics.logit_diff)
    assert effects.units == [f"into {block.name}" for block in cm.graph.blocks] and set(layers) <= set(effects.units)
    with torch.no_grad():
        for unit, layer in layers.items():
            expected = torch.stack([_hooked_effect(model, batch, "noising", lambda *runs: _hooked_stream_patch(
                model, layer, position, *runs)) for position in range(6)], -1)
            torch.testing.assert_close(effects.effects[effects.units.index(unit)], expected, atol=1e-5, rtol=1e-4)
    cuts = _units(cm, None, None, None)[1]
    assert len({tuple(cut.tolist()) for cut in cuts}) == len(cuts)  # each block's cut is its own


def _crossing(cm, layer: int) -> dict[str, float]:
    """Every edge from a node written before decoder layer ``layer`` into one read at it or after: 0."""
    def index(node: str) -> float:
        return -1 if node == "input" else float("inf") if node == "logits" else int(node[1:].split(".")[0])
    return {e: 0.0 for e, u, d in zip(cm.graph.edges, cm.graph.src.tolist(), cm.graph.dst.tolist())
            if index(cm.graph.upstream[u]) < layer <= index(cm.graph.downstream[d].split("<")[0])}


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_the_stream_patched_at_one_position_matches_hooks(traced, prompts, name):
    """Causal tracing: the stream entering layer 1 at one position from the corrupted run is every edge crossing
    into layer 1, patched at that position."""
    model, cm = traced(name)
    clean, corrupted, mask = prompts
    with torch.no_grad():
        for position in (3, 6):
            ours = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=_crossing(cm, 1), patch_positions=position)
            _close(ours, _hooked_stream_patch(model, 1, position, clean, corrupted, mask), mask)


@pytest.mark.parametrize("name", ["llama", "gemma4_per_layer", "deepseek_v3"])
def test_positions_per_mask_in_one_call_equal_calls_one_by_one(traced, prompts, name, as_on_a_gpu):
    """Weights [n_masks, batch, seq] with one mask evaluate it at each; with as many masks, each at its own; the
    corrupted run recorded first and riding in the pass (as on a GPU) agree."""
    _, cm = traced(name)
    clean, corrupted, mask = prompts
    generator = torch.Generator().manual_seed(7)
    masks = torch.rand(3, len(cm.graph.edges), generator=generator)
    weights = torch.rand(3, 3, clean.shape[1], generator=generator)
    with torch.no_grad():
        patch = lambda m, w: cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m, patch_positions=w)  # noqa
        one_by_one = torch.stack([patch(m, w) for m, w in zip(masks, weights)])
        _close(patch(masks, weights), one_by_one, mask.expand(3, -1, -1))
        each = torch.eye(clean.shape[1])[:, None]
        _close(patch(masks[0], each), torch.stack([patch(masks[0], [p]) for p in range(clean.shape[1])]),
               mask.expand(clean.shape[1], -1, -1))
        as_on_a_gpu()
        _close(patch(masks, weights), one_by_one, mask.expand(3, -1, -1))


def test_every_position_is_the_plain_mask_and_none_is_the_clean_run(traced, prompts):
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    edge_mask = torch.rand(len(cm.graph.edges), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        patch = lambda w: cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=edge_mask, patch_positions=w)  # noqa
        _close(patch(torch.ones(clean.shape[1], dtype=torch.bool)),
               cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=edge_mask), mask)
        _close(patch(torch.zeros(clean.shape[1])), cm(clean, mask), mask)
        later = patch([5])
        torch.testing.assert_close(later[:, :5], cm(clean, mask)[:, :5])  # a causal model: earlier positions unmoved


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma4_per_layer"])
def test_mask_gradients_at_some_positions_match_finite_differences(name, prompts):
    model = make(name, dtype=torch.float64)
    cm = trace(model)
    clean, corrupted, mask = prompts
    generator = torch.Generator().manual_seed(9)
    edge_mask = torch.rand(len(cm.graph.edges), generator=generator, dtype=torch.float64)
    weights = torch.rand(3, clean.shape[1], generator=generator, dtype=torch.float64)

    def metric(m):
        logits = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=m, patch_positions=weights)
        return logits[:, -1, :5].sum()

    edge_mask.requires_grad_(True)
    (grad,) = torch.autograd.grad(metric(edge_mask), edge_mask)
    picks = grad.abs().topk(4).indices.tolist() + torch.randperm(len(grad), generator=generator)[:4].tolist()
    # HF rounds some norms and softmaxes in float32 (~1e-7 of the metric): the slack is 2e-4 of the largest gradient
    eps, slack = 1e-3, 2e-4 * grad.abs().max()
    with torch.no_grad():
        for i in picks:
            up, down = edge_mask.detach().clone(), edge_mask.detach().clone()
            up[i] += eps
            down[i] -= eps
            numeric = (metric(up) - metric(down)) / (2 * eps)
            assert abs(numeric - grad[i]) <= slack + 2e-3 * abs(numeric), (cm.graph.edges[i], numeric, grad[i])
    everywhere = torch.autograd.grad(cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=edge_mask)[:, -1, :5]
                                     .sum(), edge_mask)[0]
    assert (grad - everywhere).abs().max() > 1e-3 * everywhere.abs().max()  # the weights matter


def test_the_per_layer_input_is_patched_at_the_positions_alone(traced, prompts):
    """Gemma 4's per-layer input (a side input the ``input`` node's edges carry) mixes at those positions only:
    patching input → m1 at one position equals patching it everywhere with the other run equal to the clean one
    elsewhere."""
    _, cm = traced("gemma4_per_layer")
    clean, corrupted, mask = prompts
    hybrid = clean.clone()
    hybrid[:, 4] = corrupted[:, 4]
    with torch.no_grad():
        ours = cm(clean, mask, corrupted_input_ids=corrupted, edge_mask={"input->m1": 0.0}, patch_positions=[4])
        reference = cm(clean, mask, corrupted_input_ids=hybrid, edge_mask={"input->m1": 0.0})
    _close(ours, reference, mask)


def test_one_token_prompts_take_positions(traced):
    _, cm = traced("llama")
    clean, corrupted = torch.tensor([[5], [9]]), torch.tensor([[7], [3]])
    with torch.no_grad():
        for positions in ([0], [-1], torch.ones(1)):
            torch.testing.assert_close(cm(clean, corrupted_input_ids=corrupted, node_mask={"m0": 0.0},
                                          patch_positions=positions),
                                       cm(clean, corrupted_input_ids=corrupted, node_mask={"m0": 0.0}))


@pytest.mark.parametrize("positions, error", [
    ([7], "positions 0 to 6"),
    ([-8], "positions 0 to 6"),
    (torch.ones(5), "weights over the 7 positions"),
    (torch.ones(2, 2, 2, 7), "weights over the 7 positions"),
    (torch.tensor([1.0, float("nan"), 0, 0, 0, 0, 0]), "NaN"),
    (torch.ones(7, requires_grad=True), "takes no gradient"),
    ("last", "position indices"),
    ([], "position indices"),
    (torch.ones(4, 3, 7), "leading sizes"),
    (torch.ones(2, 7), "leading sizes"),
])
def test_bad_positions_are_refused_by_name(traced, prompts, positions, error):
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    with pytest.raises((ValueError, IndexError), match=error):
        cm(clean, mask, corrupted_input_ids=corrupted, edge_mask=torch.rand(2, len(cm.graph.edges)),
           patch_positions=positions)


def test_positions_without_a_mask_are_refused(traced, prompts):
    _, cm = traced("llama")
    clean, corrupted, mask = prompts
    with pytest.raises(ValueError, match="no edge_mask or node_mask"):
        cm(clean, mask, patch_positions=[3])


def _batch(prompts) -> dict:
    clean, corrupted, mask = prompts
    corrupted = corrupted.clone()
    corrupted[:, :3] = clean[:, :3]  # the first three tokens shared: patching them changes nothing
    return {"clean": clean, "corrupted": corrupted, "attention_mask": mask,
            "correct": torch.tensor([[5], [9], [3]]), "incorrect": torch.tensor([[7], [1], [2]])}


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_patching_the_stream_by_position_matches_hooks(traced, prompts, direction):
    """Causal tracing over every layer and position against the stream swapped by a hook on the HF model."""
    model, cm = traced("llama")
    batch = _batch(prompts)
    effects = patch_by_position(cm, batch, metrics.logit_diff, direction=direction, masks_per_call=5)
    assert effects.units == [f"layer {layer}" for layer in range(cm.graph.n_layers)]
    assert effects.effects.shape == (cm.graph.n_layers, 3, 7)
    mask = batch["attention_mask"]
    with torch.no_grad():
        for layer in range(cm.graph.n_layers):
            for position in range(7):
                expected = _hooked_effect(model, batch, direction, lambda *runs: _hooked_stream_patch(
                    model, layer, position, *runs))
                real = mask[:, position].bool()
                torch.testing.assert_close(effects.effects[layer, real, position], expected[real], atol=1e-5,
                                           rtol=1e-4)
                assert effects.effects[layer, ~real, position].isnan().all()  # padding
        ends = [metrics.logit_diff(model(input_ids=batch[k], attention_mask=mask).logits, batch)
                for k in ("clean", "corrupted")]
    torch.testing.assert_close([effects.clean, effects.corrupted], ends)
    assert effects.effects[:, 1:, :3].abs().max() < 1e-5  # tokens the prompts share
    torch.testing.assert_close(effects.normalized, effects.effects / (ends[0] - ends[1])[None, :, None],
                               equal_nan=True)


def test_patching_nodes_by_position_matches_hooks(traced, prompts):
    model, cm = traced("gpt2")
    batch = _batch(prompts)
    nodes = ["a0.h1", "m0"]
    effects = patch_by_position(cm, batch, metrics.logit_diff, nodes=nodes, masks_per_call=3)
    clean, corrupted, mask = batch["clean"], batch["corrupted"], batch["attention_mask"]
    with torch.no_grad():
        unpatched = metrics.logit_diff(model(input_ids=clean, attention_mask=mask).logits, batch)
        for row, node in enumerate(nodes):
            for position in (3, 5, 6):
                at = position_weights([position], 7)
                hooked = metrics.logit_diff(_hooked_node_patch(model, "gpt2", node, clean, corrupted, mask, at), batch)
                torch.testing.assert_close(effects.effects[row, :, position], unpatched - hooked, atol=1e-5,
                                           rtol=1e-4)
    one_at_a_time = patch_by_position(cm, batch, "logit_diff", nodes=nodes, masks_per_call=1)  # a metric by name
    torch.testing.assert_close(one_at_a_time.effects, effects.effects, equal_nan=True)


def test_the_effects_read_as_a_table_and_a_heatmap(traced, prompts, tmp_path):
    _, cm = traced("llama")
    effects = patch_by_position(cm, _batch(prompts), metrics.logit_diff, nodes=["m0", "a1.h0"])
    tokenizer = _Tokens()
    values, positions = effects.example(0)
    assert positions.tolist() == [2, 3, 4, 5, 6]  # example 0 is left-padded by two
    (unit, tops), _ = effects.top(tokenizer, k=2, example=0)
    assert unit == "m0" and len(tops) == 2
    assert abs(tops[0][2]) == float(values[0].abs().max()) and tops[0][0] == f"t{int(effects.input_ids[0, tops[0][1]])}"
    assert effects.table(tokenizer, k=2).splitlines()[1].lstrip().startswith("a1.h0")
    torch.testing.assert_close(effects.mean(), effects.effects.nanmean(1))
    figure = effects.plot(tokenizer, tmp_path / "positions.png", example=1)
    assert (tmp_path / "positions.png").stat().st_size > 0
    assert len(figure.axes[0].get_yticklabels()) == 2 and len(figure.axes[0].get_xticklabels()) == 7


def test_the_mean_by_token_names_each_position_once(traced, prompts):
    """Averaged over the prompts, a position by token is no one prompt's token: ``table`` writes its ``@position``
    label once, not quoted with the position again (``'@2'@2``)."""
    _, cm = traced("llama")
    effects = patch_by_position(cm, _batch(prompts), metrics.logit_diff, nodes=["m0", "a1.h0"])
    (unit, tops), _ = effects.top(k=2, example=None)
    row = effects.table(k=2, example=None).splitlines()[0].split()
    assert row == [unit, *(word for label, _, value in tops for word in (label, f"{value:+.2f}"))]
    assert row[1] == f"@{tops[0][1]}"


@pytest.mark.parametrize("sweep", [patch_by_position, patch_inputs])
def test_bad_inputs_are_refused_by_name(traced, prompts, sweep):
    """An input named as its head, as a node, as one string or not at all; and nodes and inputs at once."""
    _, cm = traced("llama")
    batch = _batch(prompts)
    for inputs, error in [(["a0.h1"], "a0.h1 is a head, read through three inputs: name one, a0.h1<q>"),
                          (["a9.h0<q>"], r"unknown input.*'a9.h0<q>' is not a downstream input"),
                          (["input"], "'input' is not a downstream input"), ([3], "is no input name"),
                          ("a0.h1<q>", r"inputs are a list of names, not one string: \['a0.h1<q>'\]"),
                          ([], "an empty list names no input")]:
        with pytest.raises((KeyError, TypeError, ValueError), match=error):
            sweep(cm, batch, metrics.logit_diff, inputs=inputs)
    with pytest.raises(ValueError, match=r"nodes' outputs \(nodes=\) or downstream inputs \(inputs=\), not both"):
        patch_by_position(cm, batch, metrics.logit_diff, nodes=["m0"], inputs=["m0"])
    with pytest.raises(ValueError, match=r"receivers= keeps each patched node's edges into them alone.*\(nodes=\) too"):
        patch_by_position(cm, batch, metrics.logit_diff, receivers=["m1"])
    with pytest.raises(KeyError, match="a1.h0 is a head, read through three inputs"):
        patch_nodes(cm, batch, metrics.logit_diff, receivers=["a1.h0"])
    with pytest.raises(TypeError, match="inputs are a list of names, not one string"):
        patch_nodes(cm, batch, metrics.logit_diff, receivers="m1")


class _Tokens:
    def decode(self, ids):
        return "".join(f"t{i}" for i in ids)


@pytest.mark.parametrize("sweep", [patch_by_position, patch_nodes])
def test_bad_sweeps_are_refused(traced, prompts, sweep):
    _, cm = traced("llama")
    batch = _batch(prompts)
    with pytest.raises(ValueError, match="unknown direction"):
        sweep(cm, batch, metrics.logit_diff, direction="forwards")
    with pytest.raises(ValueError, match="unknown method 'eap'"):
        sweep(cm, batch, metrics.logit_diff, method="eap")
    with pytest.raises(ValueError, match="denoising"):
        sweep(cm, batch, metrics.kl_divergence, direction="denoising")
    with pytest.raises(ValueError, match="kl is smallest at the clean run, where method 'attribution' takes"):
        sweep(cm, batch, metrics.kl_divergence, method="attribution")
    with pytest.raises(ValueError, match="masks_per_call"):
        sweep(cm, batch, metrics.logit_diff, masks_per_call=0)
    with pytest.raises(KeyError, match="unknown node.*'a9.h0' is not an upstream node"):
        sweep(cm, batch, metrics.logit_diff, nodes=["a9.h0"])
    with pytest.raises(ValueError, match="no batches"):
        sweep(cm, [], metrics.logit_diff)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_the_input_node_patched_at_one_position_is_the_prompt_with_that_token_swapped(traced, prompts, name):
    """What is written before the first layer at a position depends on its token alone, so the ``input`` node
    patched at position 4 is the HF model on the clean prompts with token 4 taken from the corrupted ones."""
    model, cm = traced(name)
    clean, corrupted, mask = prompts
    hybrid = clean.clone()
    hybrid[:, 4] = corrupted[:, 4]
    with torch.no_grad():
        ours = cm(clean, mask, corrupted_input_ids=corrupted, node_mask={"input": 0.0}, patch_positions=[4])
        _close(ours, model(input_ids=hybrid, attention_mask=mask).logits, mask)


@pytest.mark.parametrize("name, nodes", [("llama", None), ("llama", ["a1.h2", "m0"]), ("gpt2", ["a0.h1", "m1"]),
                                         ("gemma4_per_layer", ["input", "m1"])])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_attribution_by_position_is_the_slope_of_patching_there(prompts, name, nodes, direction):
    """Attribution patching by position is the first-order effect of each unit at each position: the slope of the
    metric as the unit's mask there moves from 1, by central differences of patched runs (float64)."""
    model = make(name, dtype=torch.float64)
    cm = trace(model)
    batch = _batch(prompts)
    estimate = patch_by_position(cm, batch, metrics.logit_diff, nodes=nodes, direction=direction,
                                 method="attribution")
    assert estimate.method == "attribution"
    run, other = (batch["clean"], batch["corrupted"]) if direction == "noising" else (batch["corrupted"],
                                                                                       batch["clean"])
    _, masks = _units(cm, nodes, None)
    h, mask = 1e-3, batch["attention_mask"]
    scale = float(estimate.effects.nan_to_num().abs().max())  # HF rounds some steps in float32: ~1e-7 of the metric
    with torch.no_grad():
        def metric(unit: int, position: int, value: float) -> torch.Tensor:
            edge_mask = torch.where(masks[unit].bool(), 1.0, value).double()
            logits = cm(run, mask, corrupted_input_ids=other, edge_mask=edge_mask, patch_positions=[position])
            return metrics.logit_diff(logits, batch)
        for unit in range(len(masks)):
            for position in (3, 4, 6):
                slope = (metric(unit, position, 1 + h) - metric(unit, position, 1 - h)) / (2 * h)
                expected = slope if direction == "noising" else -slope
                real = mask[:, position].bool()
                torch.testing.assert_close(estimate.effects[unit, real, position], expected[real],
                                           atol=1e-4 * scale, rtol=2e-3)
    assert estimate.effects[:, 1:, :3].abs().max() < 1e-6  # tokens the prompts share


def test_runs_that_would_move_nothing_are_not_made(traced, prompts, monkeypatch):
    """Where a unit's nodes agree in both runs (the three tokens the prompts share, in every layer of a causal
    model) patching it changes nothing: the effect is 0 without a patched run, and the rest is as when every run is
    made."""
    _, cm = traced("llama")
    batch, made = _batch(prompts), []
    measure = Prepared.measure

    def counted(self, cm, metric, keep, **kwargs):
        if kwargs.get("where") is not None:
            made.append(keep.shape[0])
        return measure(self, cm, metric, keep, **kwargs)

    monkeypatch.setattr(Prepared, "measure", counted)
    skipping = patch_by_position(cm, batch, metrics.logit_diff, nodes=["a0.h1", "m1"])
    assert sum(made) == 2 * 4 and (skipping.effects[:, 1:, :3] == 0).all()  # row 0: padding there
    monkeypatch.setattr("fxcircuits.activation_patching._moving",
                        lambda cm, p, masks: torch.ones(len(masks), 7, dtype=bool))
    every = patch_by_position(cm, batch, metrics.logit_diff, nodes=["a0.h1", "m1"])
    assert sum(made) == 2 * 4 + 2 * 7
    torch.testing.assert_close(skipping.effects, every.effects, equal_nan=True, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", ["exact", "attribution-ig"])
def test_sweeps_that_run_out_of_memory_run_again_at_half(traced, prompts, method, monkeypatch):
    """A call of more masks (or gradient points) than the accelerator's memory holds — simulated: more than one —
    runs again at half as many; the effects are those of calls that fit."""
    _, cm = traced("llama")
    batch, measure = _batch(prompts), Prepared.measure
    sweep = dict(nodes=["a0.h1", "m0", "m1"], method=method, steps=3)
    expected = patch_by_position(cm, batch, metrics.logit_diff, masks_per_call=1, **sweep)

    def one_at_a_time(self, cm, metric, keep, **kwargs):
        if keep.shape[0] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return measure(self, cm, metric, keep, **kwargs)

    monkeypatch.setattr(Prepared, "measure", one_at_a_time)
    with pytest.warns(UserWarning, match="out of memory at"):
        backed_off = patch_by_position(cm, batch, metrics.logit_diff, masks_per_call=4, **sweep)
    torch.testing.assert_close(backed_off.effects, expected.effects, equal_nan=True, rtol=1e-5, atol=1e-6)


SPANS = {"A": torch.tensor([[3, 5], [4, 5], [2, 4]]), "B": torch.tensor([[6, 7], [5, 7], [6, 7]])}  # per prompt


def _spanned(prompts) -> dict:
    return {**_batch(prompts), "spans": dict(SPANS)}


def _covered(ranges: torch.Tensor) -> torch.Tensor:
    """[3, 7]: 1 on each prompt's tokens [start, stop), written out for the references."""
    at = torch.zeros(3, 7)
    for row, (start, stop) in enumerate(ranges.tolist()):
        at[row, start:stop] = 1.0
    return at


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_patching_the_stream_by_span_matches_hooks(traced, prompts, direction):
    """Each span patched whole, at each prompt's own tokens (they differ from prompt to prompt), against the stream
    swapped there by a hook on the HF model; a span of one token is that token's effect."""
    model, cm = traced("llama")
    batch = _spanned(prompts)
    effects = patch_by_position(cm, batch, metrics.logit_diff, spans=True, direction=direction, masks_per_call=3)
    assert effects.spans == ["A", "B"] and effects.effects.shape == (cm.graph.n_layers, 3, 2)
    with torch.no_grad():
        for layer in range(cm.graph.n_layers):
            for column, name in enumerate(effects.spans):
                expected = _hooked_effect(model, batch, direction, lambda *runs: _hooked_stream_patch(
                    model, layer, _covered(SPANS[name]), *runs))
                torch.testing.assert_close(effects.effects[layer, :, column], expected, atol=1e-5, rtol=1e-4)
    by_token = patch_by_position(cm, batch, metrics.logit_diff, direction=direction)
    torch.testing.assert_close(effects.effects[:, 0, 1], by_token.effects[:, 0, 6])  # prompt 0's B is token 6
    assert effects.effects[:, 1:, 0].abs().max() > 1e-4  # A holds tokens the prompts do not share


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_patching_nodes_by_span_matches_hooks_and_attribution_sums_its_tokens(traced, prompts, direction):
    """A node patched over a span is the hook reference there; attributed over a span, the sum of its tokens'
    first-order effects (attribution is linear in the positions patched)."""
    model, cm = traced("gpt2")
    batch, nodes = _spanned(prompts), ["a0.h1", "m0"]
    effects = patch_by_position(cm, batch, metrics.logit_diff, nodes=nodes, spans=["B", "A"], direction=direction)
    assert effects.spans == ["B", "A"]
    with torch.no_grad():
        for row, node in enumerate(nodes):
            for column, name in enumerate(effects.spans):
                expected = _hooked_effect(model, batch, direction, lambda *runs: _hooked_node_patch(
                    model, "gpt2", node, *runs, _covered(SPANS[name])))
                torch.testing.assert_close(effects.effects[row, :, column], expected, atol=1e-5, rtol=1e-4)
    attributed = patch_by_position(cm, batch, metrics.logit_diff, nodes=nodes, spans=True, direction=direction,
                                   method="attribution")
    by_token = patch_by_position(cm, batch, metrics.logit_diff, nodes=nodes, direction=direction,
                                 method="attribution").effects.nan_to_num()
    for column, name in enumerate(attributed.spans):
        summed = (by_token * _covered(SPANS[name])).sum(-1)
        torch.testing.assert_close(attributed.effects[..., column], summed, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("spans", [False, True])
def test_several_batches_are_the_batches_swept_alone_one_after_the_other(traced, prompts, spans):
    """Batches of different lengths: their effects side by side, by token padded with NaN."""
    _, cm = traced("llama")
    first = _spanned(prompts)
    second = {key: value[1:] for key, value in first.items() if key != "spans"}
    second = {**second, "clean": second["clean"][:, :5], "corrupted": second["corrupted"][:, :5],
              "attention_mask": second["attention_mask"][:, :5],
              "spans": {"A": torch.tensor([[4, 5], [2, 4]]), "B": torch.tensor([[3, 5], [4, 5]])}}
    both = patch_by_position(cm, [first, second], metrics.logit_diff, spans=spans, nodes=["m0", "a1.h1"])
    alone = [patch_by_position(cm, batch, metrics.logit_diff, spans=spans, nodes=["m0", "a1.h1"])
             for batch in (first, second)]
    width = 2 if spans else 7
    assert both.effects.shape == (2, 5, width)
    torch.testing.assert_close(both.effects[:, :3], alone[0].effects, equal_nan=True)
    torch.testing.assert_close(both.effects[:, 3:, :alone[1].effects.shape[2]], alone[1].effects, equal_nan=True)
    assert spans or (both.effects[:, 3:, 5:].isnan().all() and (both.attention_mask[3:, 5:] == 0).all())
    torch.testing.assert_close(both.clean, torch.cat([alone[0].clean, alone[1].clean]))


def test_effects_by_span_read_by_name_and_on_average(traced, prompts, tmp_path):
    _, cm = traced("llama")
    effects = patch_by_position(cm, _spanned(prompts), metrics.logit_diff, nodes=["m0", "a1.h0"], spans=True)
    values, positions = effects.example(1)
    assert values.shape == (2, 2) and positions.tolist() == [0, 1]
    (unit, tops), _ = effects.top(k=2, example=None)
    mean = effects.mean()
    assert unit == "m0" and {name for name, _, _ in tops} == {"A", "B"}
    assert tops[0][2] == float(mean[0, mean[0].abs().argmax()])
    assert effects.table(k=1, example=None).splitlines()[0].split()[1] == tops[0][0]
    figure = effects.plot(path=tmp_path / "spans.png", example=None)
    assert [label.get_text() for label in figure.axes[0].get_xticklabels()] == ["A", "B"]
    whole = effects.clean - effects.corrupted  # normalized means are ratios of means, over the prompts holding each
    torch.testing.assert_close(effects.mean(normalized=True), effects.effects.mean(1) / whole.mean())
    by_token = patch_by_position(cm, _batch(prompts), metrics.logit_diff, nodes=["m0"])
    torch.testing.assert_close(by_token.mean(normalized=True)[:, :2], by_token.effects[:, 1:, :2].mean(1)
                               / whole[1:].mean())  # prompt 0 is padded there
    assert [label.get_text() for label in by_token.plot(example=None).axes[0].get_xticklabels()] == [
        f"@{p}" for p in range(7)]
    with pytest.raises(ValueError, match="tokenizer"):
        by_token.table(example=0)


def test_bad_span_sweeps_are_refused(traced, prompts):
    _, cm = traced("llama")
    with pytest.raises(ValueError, match="name their spans"):
        patch_by_position(cm, _batch(prompts), metrics.logit_diff, spans=True)
    with pytest.raises(ValueError, match="no span named 'C'"):
        patch_by_position(cm, _spanned(prompts), metrics.logit_diff, spans=["A", "C"])
    with pytest.raises(ValueError, match="names no span"):
        patch_by_position(cm, _spanned(prompts), metrics.logit_diff, spans=[])
    with pytest.raises(ValueError, match="names 'A' more than once"):
        patch_by_position(cm, _spanned(prompts), metrics.logit_diff, spans=["A", "A"])
    with pytest.raises(ValueError, match="no batches"):
        patch_by_position(cm, [], metrics.logit_diff)
    outside = {**_spanned(prompts), "spans": {"A": torch.tensor([[1, 3], [4, 5], [2, 4]])}}  # row 0: padding
    with pytest.raises(ValueError, match="covers padded tokens"):
        patch_by_position(cm, outside, metrics.logit_diff, spans=True)


def test_attribution_ig_by_position_adds_up_to_eap_ig_inputs(traced, prompts):
    """Each node's integrated-gradient scores by position, summed over the positions and averaged over the prompts,
    are its outgoing edges' EAP-IG-inputs scores (``attribute``, which keeps no position)."""
    _, cm = traced("llama")
    batch, nodes = _batch(prompts), cm.graph.upstream
    by_position = patch_by_position(cm, batch, metrics.logit_diff, nodes=nodes, method="attribution-ig", steps=3,
                                    masks_per_call=2)
    scores = attribute(cm, [batch], "logit_diff", "eap-ig-inputs", steps=3, progress=False).tensor
    per_node = torch.zeros(len(nodes)).index_add_(0, cm.graph.src, scores)
    torch.testing.assert_close(by_position.effects.nansum(-1).mean(1), per_node, atol=1e-6, rtol=1e-4)
    assert by_position.method == "attribution-ig" and by_position.effects[:, 0, :2].isnan().all()  # padding


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_attribution_ig_by_position_is_complete_as_its_steps_grow(prompts, name):
    """Integrated gradients add up to the whole: the input node's effects over every position, to patching the
    input everywhere (float64), with an error falling as 1/steps."""
    cm = trace(make(name, dtype=torch.float64))
    batch = _batch(prompts)
    clean, corrupted, mask = batch["clean"], batch["corrupted"], batch["attention_mask"]
    with torch.no_grad():
        whole = metrics.logit_diff(cm(clean, mask), batch) - metrics.logit_diff(
            cm(clean, mask, corrupted_input_ids=corrupted, node_mask={"input": 0.0}), batch)
    errors = [(patch_by_position(cm, batch, metrics.logit_diff, nodes=["input"], method="attribution-ig",
                                 steps=steps).effects[0].nansum(-1).double() - whole).abs().max() for steps in (16, 64)]
    assert errors[1] < 0.05 * whole.abs().max() and errors[1] < errors[0] / 3


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_patching_each_node_everywhere_matches_hooks(traced, prompts, name, direction):
    """Every head and MLP, its output patched at every token: against the HF model with that output swapped by a
    hook, in both directions; the runs' own metrics are HF's."""
    model, cm = traced(name)
    batch = _batch(prompts)
    effects = patch_nodes(cm, batch, "logit_diff", direction=direction, masks_per_call=3)
    assert effects.units == cm.graph.upstream[1:] and effects.effects.shape == (len(effects.units), 3)
    with torch.no_grad():
        expected = torch.stack([_hooked_effect(model, batch, direction, lambda run, other, mask: _hooked_node_patch(
            model, name, node, run, other, mask)) for node in effects.units])
        ends = [metrics.logit_diff(model(input_ids=batch[k], attention_mask=batch["attention_mask"]).logits, batch)
                for k in ("clean", "corrupted")]
    torch.testing.assert_close(effects.effects, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close([effects.clean, effects.corrupted], ends)
    assert effects.effects.abs().max() > 1e-3  # the patches move the metric
    one_at_a_time = patch_nodes(cm, [batch], "logit_diff", direction=direction, masks_per_call=1)
    torch.testing.assert_close(one_at_a_time.effects, effects.effects)


def _reference(ablation: str, batch: dict) -> list[dict] | None:
    """The reference batches mean ablation averages over (zero ablation reads none, and refuses them)."""
    return [batch] if ablation == "mean" else None


@pytest.mark.parametrize("ablation", ["zero", "mean"])
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_knocking_each_node_out_matches_hooks(traced, prompts, name, ablation):
    """Zero and mean ablation of each node in the clean run, against hooks on the HF model that set each MLP's
    output, or each head's columns of its output projection's input, to zero or to their mean over the prompts' real
    tokens (the projection's bias is no head's: it stays, as the engine keeps it)."""
    model, cm = traced(name)
    batch = _batch(prompts)
    effects = patch_nodes(cm, batch, "logit_diff", ablation=ablation, reference=_reference(ablation, batch))
    mlp_path, out_path, _ = modules(name)
    clean, mask = batch["clean"], batch["attention_mask"]

    def fill(values: torch.Tensor) -> torch.Tensor:  # [batch, seq, features]
        real = mask.bool()
        return torch.zeros_like(values) if ablation == "zero" else values[real].mean(0).expand_as(values)

    def knocked_out(node: str):
        layer = int(node[1:].split(".")[0])
        if node.startswith("m"):
            mlp = model.get_submodule(mlp_path.format(layer))
            filled = fill(_capture_output(model, mlp, clean, mask))
            return mlp.register_forward_hook(lambda m, i, o: filled)
        out_proj, head = model.get_submodule(out_path.format(layer)), int(node.split("h")[-1])
        width = (out_proj.weight.shape[0] if hasattr(out_proj, "nf") else out_proj.weight.shape[1]) // 4
        cols = slice(head * width, (head + 1) * width)
        filled = fill(_capture_input(model, out_proj, clean, mask)[..., cols])

        def set_head(module, args):
            z = args[0].clone()
            z[..., cols] = filled
            return (z,)
        return out_proj.register_forward_pre_hook(set_head)

    with torch.no_grad():
        unpatched = metrics.logit_diff(model(input_ids=clean, attention_mask=mask).logits, batch)
        expected = torch.stack([unpatched - metrics.logit_diff(_run_with(model, knocked_out(n), clean, mask), batch)
                                for n in effects.units])
    torch.testing.assert_close(effects.effects, expected, atol=1e-5, rtol=1e-4)
    assert effects.ablation == ablation and effects.effects.abs().max() > 1e-3
    with pytest.raises(ValueError, match=f"{ablation} ablation has none to patch in"):
        patch_nodes(cm, batch, "logit_diff", ablation=ablation, reference=[batch], direction="denoising")


UNITS = {"nodes": ["input", "a0.h1", "m0", "a1.h3", "m1"], "inputs": ["a0.h1<q>", "a0.h2<k>", "a1.h3<v>", "m0",
                                                                    "logits"]}


@pytest.mark.parametrize("method", ["attribution", "attribution-ig"])
@pytest.mark.parametrize("direction", DIRECTIONS)
@pytest.mark.parametrize("kind", UNITS)
def test_node_attribution_sums_the_attribution_at_each_token(traced, prompts, method, direction, kind):
    """A node's (or an input's) effect everywhere, estimated from gradients, is its estimated effects at each token
    added up (they are linear in the patch); attribution by position is checked against finite differences above."""
    _, cm = traced("llama")
    batch, units, sweep = _batch(prompts), UNITS[kind], patch_nodes if kind == "nodes" else patch_inputs
    everywhere = sweep(cm, batch, metrics.logit_diff, **{kind: units}, direction=direction, method=method)
    by_token = patch_by_position(cm, batch, metrics.logit_diff, **{kind: units}, direction=direction, method=method)
    assert everywhere.method == method and everywhere.units == by_token.units == units
    torch.testing.assert_close(everywhere.effects, by_token.effects.nansum(-1), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("method", ["attribution", "attribution-ig"])
@pytest.mark.parametrize("sweep", [patch_nodes, patch_inputs])
def test_node_attribution_is_exact_where_the_model_is_affine(prompts, method, sweep):
    """On a GPT-2 whose logits are affine in every node's output (``linear_gpt2``) first order is exact: the
    estimates are the patched runs' effects (in the model's float64, as every metric value is); so for its inputs."""
    cm = trace(linear_gpt2())
    exact, estimate = (sweep(cm, _batch(prompts), metrics.logit_diff, method=m) for m in ("exact", method))
    scale = float(exact.effects.abs().max())
    assert scale > 1e-2
    torch.testing.assert_close(estimate.effects, exact.effects, atol=1e-9 * scale, rtol=0)


def test_node_effects_read_as_a_table_and_a_layer_by_head_grid(traced, prompts, tmp_path):
    _, cm = traced("llama")
    nodes = ["input", "a1.h2", "m0", "a0.h0"]
    effects = patch_nodes(cm, _batch(prompts), metrics.logit_diff, nodes=nodes)
    whole = effects.clean - effects.corrupted
    torch.testing.assert_close(effects.normalized, effects.effects / whole)
    torch.testing.assert_close(effects.mean(normalized=True), effects.effects.mean(1) / whole.mean())
    torch.testing.assert_close(effects.values(example=2), effects.effects[:, 2])
    top = effects.top(k=2, example=None)
    strongest = int(effects.mean().abs().argmax())
    assert len(top) == 2 and top[0] == (nodes[strongest], float(effects.mean()[strongest]))
    assert effects.table(k=3).splitlines()[0].split() == [top[0][0], f"{top[0][1]:+.3f}"]
    figure = effects.plot(tmp_path / "nodes.png", example=1, normalized=False)
    assert (tmp_path / "nodes.png").stat().st_size > 0
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_yticklabels()] == ["input", "L0", "L1"]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["h0", "h1", "h2", "h3", "mlp"]
    grid = axes.images[0].get_array()
    cells = {"input": (0, 0), "a1.h2": (2, 2), "m0": (1, 4), "a0.h0": (1, 0)}
    for node, (row, col) in cells.items():
        assert grid[row, col] == pytest.approx(float(effects.effects[nodes.index(node), 1]))
    assert int(grid.mask.sum()) == 15 - len(nodes)  # nodes not patched stay blank, and unannotated
    assert len(axes.texts) == len(nodes)
    with pytest.raises(IndexError, match="the effects hold 3 prompts"):
        effects.top(example=3)


def test_counts_of_effects_to_list_are_refused_by_name(traced, prompts):
    """``top`` and ``table`` of both kinds of effects refuse a count below 1 by name: ``k=0`` failed in ``max`` of
    no widths, ``k=-1`` in torch's ``topk``."""
    _, cm = traced("llama")
    batch = _batch(prompts)
    by_position = patch_by_position(cm, batch, metrics.logit_diff, nodes=["m0"])
    by_node = patch_nodes(cm, batch, metrics.logit_diff, nodes=["m0", "a1.h0"])
    for read in (lambda k: by_position.top(_Tokens(), k=k), lambda k: by_position.table(_Tokens(), k=k),
                 lambda k: by_node.top(k=k), lambda k: by_node.table(k=k)):
        for k in (0, -1):
            with pytest.raises(ValueError, match=f"k is a count, an int of at least 1; got {k}"):
                read(k)


PROJECTIONS = {"gpt2": "transformer.h.{}.attn.c_attn", "llama": "model.layers.{}.self_attn.{}_proj",
               "gemma2": "model.layers.{}.self_attn.{}_proj"}
NORMS = {"gpt2": ("transformer.h.{}.ln_1", "transformer.h.{}.ln_2"),  # what attention and the MLP read through
         "llama": ("model.layers.{}.input_layernorm", "model.layers.{}.post_attention_layernorm")}


def _hooked_input_patch(model, name: str, port: str, run, mask, instead, at: torch.Tensor | None = None):
    """Reference on the HF model: one head's query, key or value input (``a1.h2<k>``) or one MLP's input (``m0``)
    read from another stream, the rest of the run as it is.  ``instead(module, mlp)`` gives what the reader then
    computes: the MLP's input, or the whole output of the head's projection (q, k and v fused in GPT-2), of which
    the head's columns are swapped in.  A key or value head serves several query heads (grouped-query attention),
    so the patched head's output is taken from a run with its key or value head swapped, and swapped alone into
    the output projection's input of the run.  ``at``: the positions swapped, 0/1 [seq] (all where None)."""
    at = torch.ones(run.shape[1], dtype=torch.bool) if at is None else at.bool()
    layer = int(port[1:].split("<")[0].split(".")[0])
    mlp_path, out_path, _ = modules(name)
    if not port.endswith(">"):
        mlp = model.get_submodule(mlp_path.format(layer))
        replaced = instead(mlp, True)
        return _run_with(model, mlp.register_forward_pre_hook(lambda m, a: (torch.where(at[:, None], replaced, a[0]),)),
                         run, mask)
    head, role = int(port.split(".h")[1][:-3]), port[-2]
    config, fused = model.config, name == "gpt2"
    width = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    group = config.num_attention_heads // getattr(config, "num_key_value_heads", config.num_attention_heads)
    projection = model.get_submodule(PROJECTIONS[name].format(layer, role))
    start = (head if role == "q" else head // group) * width + fused * "qkv".index(role) * config.hidden_size
    cols, z_cols = slice(start, start + width), slice(head * width, (head + 1) * width)
    replaced, out_proj, swapped = instead(projection, False), model.get_submodule(out_path.format(layer)), {}

    def swap(module, args, out):
        out = out.clone()
        out[..., cols] = torch.where(at[:, None], replaced[..., cols], out[..., cols])
        return out

    def set_head(module, args):
        z = args[0].clone()
        z[..., z_cols] = swapped["z"][..., z_cols]
        return (z,)

    _run_with(model, [projection.register_forward_hook(swap),
                      out_proj.register_forward_pre_hook(lambda m, a: swapped.update(z=a[0].clone()))], run, mask)
    return _run_with(model, out_proj.register_forward_pre_hook(set_head), run, mask)


def _from_the_other_run(model, other, mask):
    """``instead`` for ``_hooked_input_patch``: what the reader computes on the other prompt."""
    return lambda module, mlp: (_capture_input if mlp else _capture_output)(model, module, other, mask)


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
@pytest.mark.parametrize("direction", DIRECTIONS)
def test_patching_each_input_everywhere_matches_hooks(traced, prompts, name, direction):
    """Every head's q, k and v input and every MLP's input, read from the other run at every token: against the HF
    model with the head's projection columns (or the MLP's input) swapped by hooks, in both directions; the logits'
    input patched is the whole difference."""
    model, cm = traced(name)
    batch = _batch(prompts)
    effects = patch_inputs(cm, batch, "logit_diff", direction=direction, masks_per_call=5)
    assert effects.units == cm.graph.downstream[:-1] and effects.inputs
    with torch.no_grad():
        expected = torch.stack([_hooked_effect(model, batch, direction, lambda run, other, mask: _hooked_input_patch(
            model, name, port, run, mask, _from_the_other_run(model, other, mask))) for port in effects.units])
    torch.testing.assert_close(effects.effects, expected, atol=1e-5, rtol=1e-4)
    for role in ("q", "k", "v"):  # each role moves the metric somewhere, past 5× the tolerance (random GPT-2's
        assert effects.effects[[u.endswith(f"<{role}>") for u in effects.units]].abs().max() > 5e-5  # q: 9e-5)
    logits = patch_inputs(cm, batch, "logit_diff", inputs=["logits"], direction=direction)
    torch.testing.assert_close(logits.effects[0], logits.clean - logits.corrupted)


@pytest.mark.parametrize("name, ablation", [("gpt2", "mean"), ("llama", "mean"), ("llama", "zero")])
def test_knocking_each_input_out_matches_hooks(traced, prompts, name, ablation):
    """Zero and mean ablation of each input in the clean run: against the HF model whose reader reads, through its
    own norm, a stream set to zero or to its mean over the prompts' real tokens.  (Zero on Llama alone: GPT-2's
    projection biases are no node's, and stay in an input whose every edge carries zero.)"""
    model, cm = traced(name)
    batch = _batch(prompts)
    clean, mask = batch["clean"], batch["attention_mask"]
    effects = patch_inputs(cm, batch, "logit_diff", ablation=ablation, reference=_reference(ablation, batch))

    def knocked_out(port: str):
        layer = int(port[1:].split("<")[0].split(".")[0])
        norm = model.get_submodule(NORMS[name][not port.endswith(">")].format(layer))
        stream = _capture_input(model, norm, clean, mask)
        filled = torch.zeros_like(stream) if ablation == "zero" else stream[mask.bool()].mean(0).expand_as(stream)
        return lambda module, mlp: norm(filled) if mlp else module(norm(filled))

    with torch.no_grad():
        unpatched = metrics.logit_diff(model(input_ids=clean, attention_mask=mask).logits, batch)
        expected = torch.stack([unpatched - metrics.logit_diff(_hooked_input_patch(
            model, name, port, clean, mask, knocked_out(port)), batch) for port in effects.units])
    torch.testing.assert_close(effects.effects, expected, atol=1e-5, rtol=1e-4)
    assert effects.ablation == ablation and effects.effects.abs().max() > 1e-3


def test_patching_inputs_by_position_matches_hooks(traced, prompts):
    """A head's q, k and v input and an MLP's input, each read from the corrupted run at one token: the keys and
    values there reach every later query, the query there only its own token."""
    model, cm = traced("llama")
    batch, inputs = _batch(prompts), ["a0.h1<q>", "a0.h3<k>", "a0.h2<v>", "m0", "a1.h0<k>"]
    effects = patch_by_position(cm, batch, "logit_diff", inputs=inputs)
    assert effects.units == inputs
    with torch.no_grad():
        for i, port in enumerate(inputs):
            for position in (3, 5):
                at = position_weights([position], batch["clean"].shape[1])
                expected = _hooked_effect(model, batch, "noising", lambda run, other, mask: _hooked_input_patch(
                    model, "llama", port, run, mask, _from_the_other_run(model, other, mask), at))
                torch.testing.assert_close(effects.effects[i, :, position], expected, atol=1e-5, rtol=1e-4)
    assert effects.effects[:, :, 3:].abs().amax(-1).gt(1e-4).all()  # every input moves the metric somewhere


def test_input_effects_plot_by_layer_and_role(traced, prompts, tmp_path):
    _, cm = traced("llama")
    inputs = ["a1.h2<k>", "m0", "a0.h0<q>", "logits"]
    effects = patch_inputs(cm, _batch(prompts), metrics.logit_diff, inputs=inputs)
    axes = effects.plot(tmp_path / "inputs.png", example=2, normalized=False).axes[0]
    assert (tmp_path / "inputs.png").stat().st_size > 0
    assert [t.get_text() for t in axes.get_yticklabels()] == ["L0", "L1", "logits"]
    grid = axes.images[0].get_array()
    for port, cell in zip(inputs, [(1, 6), (0, 12), (0, 0), (2, 0)]):
        assert grid[cell] == pytest.approx(float(effects.effects[inputs.index(port), 2]))
    assert effects.table(k=1).split()[0] == effects.top(1)[0][0]


@pytest.mark.parametrize("direction", DIRECTIONS)
def test_path_patching_into_one_input_matches_hooks(traced, prompts, direction):
    """Each of a0.h1 and m0 patched on its edge into one input alone (path patching): against the HF model whose
    reader alone reads the stream plus the sender's change (the other run's output minus the run's: a head's
    columns of o_proj's input through o_proj, which has no bias in Llama), the rest of the run as it is."""
    model, cm = traced("llama")
    batch, senders = _batch(prompts), ["a0.h1", "m0"]
    mlp_path, out_path, _ = modules("llama")

    def change(sender, run, other, mask):  # [batch, seq, d]: what the sender writes in the other run, less the run's
        if sender.startswith("m"):
            mlp = model.get_submodule(mlp_path.format(0))
            return _capture_output(model, mlp, other, mask) - _capture_output(model, mlp, run, mask)
        out_proj, cols = model.get_submodule(out_path.format(0)), slice(16, 32)  # head 1 of 4, 16 wide
        z = _capture_input(model, out_proj, other, mask) - _capture_input(model, out_proj, run, mask)
        return out_proj(torch.zeros_like(z).index_copy(-1, torch.arange(16, 32), z[..., cols]))

    def reading(port, sender, run, other, mask):  # ``instead`` for _hooked_input_patch
        norm = model.get_submodule(NORMS["llama"][not port.endswith(">")].format(1))
        stream = _capture_input(model, norm, run, mask) + change(sender, run, other, mask)
        return lambda module, mlp: norm(stream) if mlp else module(norm(stream))

    with torch.no_grad():
        for port in ("m1", "a1.h2<q>", "a1.h0<k>", "a1.h3<v>"):
            effects = patch_nodes(cm, batch, "logit_diff", nodes=senders, receivers=[port], direction=direction)
            assert effects.receivers == [port] and effects.units == senders
            for sender, ours in zip(senders, effects.effects):
                expected = _hooked_effect(model, batch, direction, lambda run, other, mask: _hooked_input_patch(
                    model, "llama", port, run, mask, reading(port, sender, run, other, mask)))
                torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-4)
                assert ours.abs().max() > 1e-4
        everything = patch_nodes(cm, batch, "logit_diff", receivers=cm.graph.downstream, direction=direction)
        plain = patch_nodes(cm, batch, "logit_diff", direction=direction)
        torch.testing.assert_close(everything.effects, plain.effects)
        late = patch_nodes(cm, batch, "logit_diff", nodes=["a1.h0", "m0", "m1"], receivers=["a1.h2<q>"])
        assert late.effects[[0, 2]].eq(0).all() and late.effects[1].ne(0).all()  # a1.h0 and m1 write after it reads
        with pytest.raises(ValueError, match="no edge from a1.h0, m1 enters the receivers: a node that writes after"):
            patch_by_position(cm, batch, "logit_diff", nodes=["a1.h0", "m0", "m1"], receivers=["a1.h2<q>"])
    receivers = ["a1.h2<q>", "m1"]  # to first order, a path's effect everywhere sums its effects at each token
    everywhere = patch_nodes(cm, batch, "logit_diff", nodes=senders, receivers=receivers, method="attribution")
    by_token = patch_by_position(cm, batch, "logit_diff", nodes=senders, receivers=receivers, method="attribution")
    torch.testing.assert_close(everywhere.effects, by_token.effects.nansum(-1), atol=1e-6, rtol=1e-4)
    assert everywhere.effects.abs().min() > 0


def test_a_circuit_names_the_inputs_its_edges_enter(traced, prompts):
    """``inputs=`` and ``receivers=`` take a circuit: the inputs its edges enter, in graph order."""
    _, cm = traced("llama")
    batch = _batch(prompts)
    circuit = Circuit(cm.graph, ["a0.h1->m1", "input->a1.h2<k>", "m0->a1.h2<k>", "a1.h0->logits"])
    entered = ["a1.h2<k>", "m1", "logits"]
    by_circuit = patch_inputs(cm, batch, metrics.logit_diff, inputs=circuit)
    assert by_circuit.units == entered
    torch.testing.assert_close(by_circuit.effects, patch_inputs(cm, batch, metrics.logit_diff, inputs=entered).effects)
    paths = patch_nodes(cm, batch, metrics.logit_diff, nodes=["a0.h1", "m0"], receivers=circuit)
    assert paths.receivers == entered
    torch.testing.assert_close(paths.effects, patch_nodes(cm, batch, metrics.logit_diff, nodes=["a0.h1", "m0"],
                                                          receivers=entered).effects)
