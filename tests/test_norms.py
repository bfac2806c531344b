"""The patcher's cheaper norm copies (``fxcircuits.norms``): what is found in the graph, and the run-time helpers
against the plain computation.  That whole patched runs give the same numbers with and without them is checked
on six architectures by ``test_patching.test_every_read_path_gives_the_same_numbers`` ("norms as captured")."""
import pytest
import torch

import fxcircuits
from fxcircuits.heads import apply_columns
from fxcircuits.norms import Norm, mean_square, row_scale
from zoo import make

aten = torch.ops.aten


def _targets(gm) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _norms(cm) -> list[Norm]:
    return [t for t in _targets(cm.patcher) if isinstance(t, Norm)]


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_rms_norm_factors_cross_the_projection(name):
    """An RMSNorm's per-row scale and per-column weight move across every attention projection of the patcher,
    and on stacked rows its mean of squares never writes the squares; run whole, it is the captured norm."""
    model = make(name)
    cm = fxcircuits.trace(model)
    norms = _norms(cm)
    assert len(norms) == model.config.num_hidden_layers
    for norm in norms:
        assert len(norm.factors.rows) == 1 and len(norm.factors.columns) == 1 and len(norm.column_at) == 1
        assert aten.pow.Tensor_Scalar not in _targets(norm.factored) and mean_square in _targets(norm.factored)
        assert aten.pow.Tensor_Scalar in _targets(norm.whole) and mean_square not in _targets(norm.whole)


def test_a_cast_that_rounds_stops_the_peeling():
    """In bf16 the norm casts its fp32 product to bf16 before the weight: the weight is folded, the scale (before
    the cast) stays in the norm, and the squares (fp32) are still fused."""
    for norm in _norms(fxcircuits.trace(make("llama", dtype=torch.bfloat16))):
        assert not norm.factors.rows and len(norm.factors.columns) == 1 and mean_square in _targets(norm.factored)


def test_layer_norm_is_left_whole():
    for norm in _norms(fxcircuits.trace(make("gpt2"))):
        assert norm.factors.rows == norm.factors.columns == () and aten.layer_norm.default in _targets(norm.factored)


def test_shared_rows_run_the_norm_as_captured():
    """One shared row: the captured norm's output exactly, and no factors; stacked rows: the core, the scale and
    the weight."""
    model = make("llama")
    norm = _norms(fxcircuits.trace(model))[0]
    layer = model.model.layers[0].input_layernorm
    rows = torch.randn(3, 2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    externals = [layer.weight]
    whole, no_scale, no_columns = norm(rows[:1], True, *externals)
    assert no_scale is None and no_columns == () and torch.equal(whole, layer(rows[:1]))
    core, scale, (weight,) = norm(rows, False, *externals)
    assert weight is layer.weight
    torch.testing.assert_close(core * scale * weight, layer(rows))


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("rows", [2, 5])
def test_column_factors_go_to_the_smaller_side(layout, rows):
    """Two rows of 8 (16 values) take the factors themselves; five (40) leave them to the 8 × 3 weight."""
    generator = torch.Generator().manual_seed(0)
    x, g, w = (torch.randn(*s, generator=generator, dtype=torch.float64) for s in ((rows, 8), (8,), (8, 3)))
    weight = w.t() if layout == "out_in" else w
    x_applied, weight_applied = apply_columns(x, weight, layout, (g, 1 + g))
    assert (x_applied is x) == (rows == 5) and (weight_applied is weight) == (rows == 2)
    weight_applied = weight_applied.t() if layout == "out_in" else weight_applied
    torch.testing.assert_close(x_applied @ weight_applied, (x * g * (1 + g)) @ w)


def test_row_scale_and_mean_square():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, generator=generator, dtype=torch.float64)
    torch.testing.assert_close(mean_square(x, [-1], True), x.pow(2).mean(-1, keepdim=True))
    torch.testing.assert_close(mean_square(x, [1, 2]), x.pow(2).mean([1, 2]))
    a, b = x[..., :1], x[..., 1:2]
    torch.testing.assert_close(row_scale(a, b), a * b)
    assert row_scale(a) is a
