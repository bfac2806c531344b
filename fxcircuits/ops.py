"""The ATen operations the stages name, by what they do to a value: one vocabulary for every pass over the graph.

Each stage composes these into what it needs (``components.TRANSPARENT``: what passes the residual stream on;
``norms.VIEWS``: what a norm's statistic may be read through), so an operation export starts to emit is taught here
once, under what it does.
"""
import torch

aten = torch.ops.aten

COPIES = frozenset({aten.clone.default, aten.contiguous.default, aten.alias.default,
                    aten._to_copy.default})  # the same values (``_to_copy`` may cast them)
RESHAPES = frozenset({aten.view.default, aten.reshape.default, aten._unsafe_view.default})  # the same values, reshaped
PERMUTES = frozenset({aten.transpose.int, aten.permute.default})  # the same values, dimensions reordered
EXPANDS = frozenset({aten.expand.default, aten.unsqueeze.default})  # the same values, broadcast
LAYOUTS = RESHAPES | PERMUTES | {aten.clone.default, aten.contiguous.default}  # reshaped, reordered, or laid out anew
METADATA_CHECKS = frozenset({aten._assert_tensor_metadata.default})  # no value: an assertion export records
SOFTMAXES = frozenset({aten.softmax.int, aten._softmax.default})
MATMULS = frozenset({aten.matmul.default, aten.bmm.default, aten.mm.default})
SDPA = frozenset({aten.scaled_dot_product_attention.default})
REDUCTIONS = frozenset({aten.mean.dim, aten.sum.dim_IntList})
