"""The patcher's cheaper norm copies (``fxcircuits.norms``): what is found in the graph, and the run-time helpers
against the plain computation.  That whole patched runs give the same numbers with and without them is checked
on six architectures by ``test_patching.test_every_read_path_gives_the_same_numbers`` ("norms as captured")."""
import pytest
import torch

import fxcircuits
from fxcircuits.heads import apply_columns
from fxcircuits.components import DecompositionError
from fxcircuits.norms import Norm, freeze_statistics, mean_square, row_scale
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


@pytest.mark.parametrize("dim, keepdim", [([-1], True), ([-1], False), ([1, 2], False), ([0, 2], True)])
def test_mean_square_has_the_gradient_of_the_mean_of_squares(dim, keepdim):
    """Its own backward (one pass over the rows) against finite differences, and against autograd through
    pow and mean; rows of norm 0 get gradient 0, as they do through pow."""
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    x[1] = 0.0
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: mean_square(t, dim, keepdim), (x,))
    assert torch.autograd.gradgradcheck(lambda t: mean_square(t, dim, keepdim), (x,))
    weights = torch.randn(x.pow(2).mean(dim, keepdim=keepdim).shape, dtype=torch.float64)
    ours, = torch.autograd.grad((mean_square(x, dim, keepdim) * weights).sum(), x)
    theirs, = torch.autograd.grad((x.pow(2).mean(dim, keepdim=keepdim) * weights).sum(), x)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=0)


class _Readout(torch.nn.Module):
    """A final norm and unembedding as a model might write them."""

    def __init__(self, norm, after=None):
        super().__init__()
        self.norm, self.after = norm, after
        self.weight = torch.nn.Parameter(torch.randn(8) + 1)
        self.unembed = torch.nn.Parameter(torch.randn(5, 8))

    def forward(self, stream):
        logits = torch.nn.functional.linear(self.norm(stream, self.weight), self.unembed)
        return logits if self.after is None else self.after(logits)


def _written_layer_norm(x, w):
    centred = x - x.mean(-1, keepdim=True)
    return centred * torch.rsqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5) * w


def _exported(readout, stream):
    """``readout`` as an ATen graph whose output is a tuple of one, as ``torch.export`` gives it."""
    return torch.export.export(readout, (stream,)).module()


FROZEN = {  # norm, and its statistic computed from the stream: the reference scale
    "layer norm written out": (_written_layer_norm, lambda x: torch.rsqrt(x.var(-1, False, keepdim=True) + 1e-5)),
    "F.layer_norm": (lambda x, w: torch.nn.functional.layer_norm(x, (8,), w, w / 2, 1e-5),
                     lambda x: torch.rsqrt(x.var(-1, False, keepdim=True) + 1e-5)),
    "F.rms_norm": (lambda x, w: torch.nn.functional.rms_norm(x, (8,), w),
                   lambda x: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + torch.finfo(x.dtype).eps)),
    "rms norm written out": (lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w,
                             lambda x: torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)),
}


@pytest.mark.parametrize("kind", sorted(FROZEN))
def test_frozen_statistics_make_the_readout_linear_in_a_part(kind):
    """With the norm's statistics frozen, a part of the stream maps to the logits through its scale at the whole
    stream: a LayerNorm still centres the part (its mean is linear, so it stays live), an RMSNorm does not; fused
    norms are written out so, and the primal output stays the readout's own."""
    norm, statistic = FROZEN[kind]
    readout = _Readout(norm)
    stream, part = torch.randn(2, 2, 3, 8, generator=torch.Generator().manual_seed(0))
    frozen, linear = freeze_statistics(_exported(readout, stream), "readout")
    (out,), (direct,) = torch.func.jvp(frozen, (stream,), (part,))
    centred = part - part.mean(-1, keepdim=True) if "layer" in kind else part
    expected = torch.nn.functional.linear(centred * statistic(stream) * readout.weight, readout.unembed)
    assert linear
    torch.testing.assert_close(out, readout(stream))
    torch.testing.assert_close(direct, expected)


def test_soft_capping_is_taken_to_first_order_and_mixing_is_refused():
    """An elementwise function after the norm (soft-capping), or before it (a prediction head's activation), leaves
    the readout not linear, and its slope at the whole stream scales each part; a function that mixes a row's
    values other than a norm's statistic kept as a column is refused."""
    plain = _Readout(FROZEN["rms norm written out"][0])
    capped = _Readout(plain.norm, lambda logits: 3 * torch.tanh(logits / 3))
    capped.load_state_dict(plain.state_dict())
    stream, part = torch.randn(2, 2, 3, 8, generator=torch.Generator().manual_seed(1))
    frozen, linear = freeze_statistics(_exported(capped, stream), "capped")
    uncapped, _ = freeze_statistics(_exported(plain, stream), "plain")
    with torch.no_grad():
        slope = 1 - torch.tanh(plain(stream) / 3) ** 2
        (direct,) = torch.func.jvp(frozen, (stream,), (part,))[1]
        torch.testing.assert_close(direct, slope * torch.func.jvp(uncapped, (stream,), (part,))[1][0])
    assert not linear
    dense = torch.randn(8, 8, generator=torch.Generator().manual_seed(2))
    head = _Readout(lambda x, w: torch.nn.functional.layer_norm(torch.nn.functional.gelu(x @ dense), (8,), w))
    frozen, linear = freeze_statistics(_exported(head, stream), "head")
    with torch.no_grad():  # a prediction head before the norm (ModernBERT's decoder): its activation to first order
        z = stream @ dense
        rstd = torch.rsqrt(torch.nn.functional.gelu(z).var(-1, False, keepdim=True) + 1e-5)
        tangent = torch.func.jvp(torch.nn.functional.gelu, (z,), (part @ dense,))[1]
        expected = torch.nn.functional.linear((tangent - tangent.mean(-1, keepdim=True)) * rstd * head.weight,
                                              head.unembed)
        torch.testing.assert_close(torch.func.jvp(frozen, (stream,), (part,))[1][0], expected)
    assert not linear
    dropped = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1) + 1e-6).unsqueeze(-1) * w  # noqa: E731
    for mixing in (lambda x, w: x.softmax(-1) * w, dropped):  # a softmax; a statistic whose dimension is dropped
        with pytest.raises(DecompositionError, match="neither a statistic of the row nor elementwise"):
            freeze_statistics(_exported(_Readout(mixing), stream), "mixing")
