"""Stage 1, second half — functionalise: the exported program as the functional ATen graph the later stages
read, where possible without the second trace that decomposition costs (``functional``), with each boolean
attention mask made additive once for all layers (``additive_masks``)."""
from __future__ import annotations

import bisect
import contextlib
import itertools
import operator
import sys

import torch
from torch._export.utils import _is_cia_op, _is_preservable_cia_op
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten
CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout}
KEPT_VIEWS = {aten.reshape.default, aten.contiguous.default}  # kept: a view, or a copy where it must


def functional(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The program as a functional ATen graph (no in-place op, no dropout) that keeps linear, SDPA and layer_norm
    as single nodes.

    ``run_decompositions({})`` makes one by tracing the program a second time, which costs more than the export
    itself (a random Llama of SmolLM2's shape: 39 s after 15 s; Pythia-160M's: 12 s after 8 s).  Most programs
    hold only a few nodes it would change, each of which one small rewrite spells as decomposition would
    (``_respelling``): such a program is used as exported, with those nodes rewritten.  Any other program is
    decomposed."""
    module = program.module()
    _retake_written_views(module.graph)
    position = {node: index for index, node in enumerate(module.graph.nodes)}
    respellings = []
    for node in module.graph.nodes:
        if node.op != "call_function" or _functional_as_is(node):
            continue
        respell = _respelling(node, position)
        if respell is None:
            return program.run_decompositions({}).module()
        respellings.append((node, respell))
    for node, respell in respellings:
        respell(module.graph, node)
    module.recompile()
    return module


def additive_masks(module: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Each boolean mask that ``scaled_dot_product_attention`` takes, made additive (0 where a query attends, −inf
    where it does not) once, where the mask is made.

    SDPA turns a boolean mask into exactly that on every call, three launches a layer; a model builds one mask
    (or one per kind of layer) for all its layers, and where the host sets the pace (a model this size on a GPU,
    one pass for all heads' patched inputs) those launches add up.  The values SDPA sees are the same."""
    graph, made = module.graph, {}
    for node in list(graph.find_nodes(op="call_function", target=aten.scaled_dot_product_attention.default)):
        at = 3 if len(node.args) > 3 else "attn_mask"
        mask = node.args[3] if at == 3 else node.kwargs.get(at)
        value = mask.meta.get("val") if isinstance(mask, torch.fx.Node) else None
        if not isinstance(value, torch.Tensor) or value.dtype != torch.bool:
            continue
        dtype = node.args[0].meta["val"].dtype
        if (mask, dtype) not in made:
            made[mask, dtype] = _additive(graph, mask, dtype)
        if at == 3:
            node.update_arg(3, made[mask, dtype])
        else:
            node.update_kwarg(at, made[mask, dtype])
    module.recompile()
    return module


def _additive(graph: torch.fx.Graph, mask: torch.fx.Node, dtype: torch.dtype) -> torch.fx.Node:
    """``where(mask, 0, −inf)`` in ``dtype``, as SDPA would make it, placed after ``mask``."""
    with graph.inserting_after(mask), torch._guards.detect_fake_mode([mask.meta["val"]]) or contextlib.nullcontext():
        additive = graph.call_function(aten.where.Scalar, (mask, 0.0, float("-inf")))
        additive.meta["val"] = torch.where(mask.meta["val"], 0.0, float("-inf"))
        if dtype == additive.meta["val"].dtype:
            return additive
        with graph.inserting_after(additive):
            cast = graph.call_function(aten._to_copy.default, (additive,), {"dtype": dtype})
        cast.meta["val"] = additive.meta["val"].to(dtype)
        return cast


def _functional_as_is(node: torch.fx.Node) -> bool:
    """Whether ``run_decompositions({})`` would leave the call ``node`` as it is."""
    op = node.target
    if not isinstance(op, torch._ops.OperatorBase):
        return _size_arithmetic(op)
    if not isinstance(op, torch._ops.OpOverload) or op._schema.is_mutable:
        return False  # a higher-order op (a nested graph), or an in-place op
    if op in CASTS or op is aten.dropout.default:
        return False
    return not _is_cia_op(op) or _is_preservable_cia_op(op) or op in KEPT_VIEWS


def _size_arithmetic(fn) -> bool:
    """Python arithmetic on sizes (``operator``, ``math``, ``torch.sym_*``), which decomposition keeps; any other
    call (one that switches grad mode, say) is left to decomposition."""
    module = getattr(fn, "__module__", None)
    return module in ("_operator", "math") or (module == "torch" and fn.__name__.startswith("sym_"))


def _respelling(node: torch.fx.Node, position: dict[torch.fx.Node, int]):
    """How to rewrite ``node`` as decomposition would, as a function ``(graph, node) -> None``; None where no small
    rewrite is known to be exact (the program is then decomposed)."""
    op = node.target
    if op in CASTS:  # to(dtype, device), made contiguous or not: no forced copy, no change of layout
        kwargs = _arguments(node)
        simple = (not kwargs.get("copy") and not kwargs.get("pin_memory")
                  and kwargs.get("layout") in (None, torch.strided))
        layout = kwargs.get("memory_format")
        if simple and layout in (None, torch.preserve_format, torch.contiguous_format):
            return _cast(contiguous=layout == torch.contiguous_format)
        return None
    if op is aten.dropout.default:
        return None if _arguments(node)["train"] else _drop  # an inference-mode dropout is the identity
    if op in COMPOSITES:  # composite ops that decomposition spells out
        return COMPOSITES[op](node)
    return _out_of_place(node, position) or _write_into_view(node, position)


def _arguments(node: torch.fx.Node) -> dict:
    return normalize_function(node.target, node.args, node.kwargs, normalize_to_only_use_kwargs=True).kwargs


def _drop(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
    node.replace_all_uses_with(node.args[0])
    graph.erase_node(node)


def _cast(contiguous: bool):
    """A cast is its input where it changes no dtype or device, else ``_to_copy``.  One that asks for contiguous
    memory (Qwen3.5's scan) is made contiguous, as a later ``view`` may rely on the layout (ATen's own cast may
    return a non-contiguous input as it is: the values are the same either way)."""
    def respell(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        source, value = node.args[0], node.meta["val"]
        before = source.meta["val"]
        if (value.dtype, value.device) != (before.dtype, before.device):
            layout = {"memory_format": torch.contiguous_format} if contiguous else {}
            _replace(graph, node, aten._to_copy.default, (source,),
                     {"dtype": value.dtype, "device": value.device, **layout})
        elif contiguous:
            _replace(graph, node, aten.contiguous.default, (source,))
        else:
            _drop(graph, node)
    return respell


def _replace(graph: torch.fx.Graph, node: torch.fx.Node, op, args: tuple, kwargs: dict | None = None) -> None:
    with graph.inserting_before(node):
        new = graph.call_function(op, args, kwargs or {})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    graph.erase_node(node)


def _rewrite_as(op, *args):
    return lambda graph, node: _replace(graph, node, op, (node.args[0], *args))


def _chunk(node: torch.fx.Node):
    """``chunk`` is ``split`` into pieces of ceil(size / chunks), where the size is known."""
    kwargs = _arguments(node)
    size = node.args[0].meta["val"].shape[kwargs["dim"]]
    if not isinstance(size, int) or size == 0:
        return None
    return _rewrite_as(aten.split.Tensor, -(-size // kwargs["chunks"]), kwargs["dim"])


def _flatten(node: torch.fx.Node):
    """``flatten`` is a ``reshape`` to the sizes kept, with the merged ones as -1; a symbolic size kept is read
    from the graph node that already holds it (none: no rewrite)."""
    kwargs = _arguments(node)
    shape = node.args[0].meta["val"].shape
    if len(shape) == 0:
        return None
    start, end = kwargs["start_dim"] % len(shape), kwargs["end_dim"] % len(shape)
    sizes = [*shape[:start], -1, *shape[end + 1:]]
    if any(isinstance(size, torch.SymInt) for size in sizes):
        holders = {value.node.expr: holder for holder in itertools.takewhile(lambda earlier: earlier is not node,
                                                                             node.graph.nodes)
                   if isinstance(value := holder.meta.get("val"), torch.SymInt)}
        sizes = [holders.get(size.node.expr) if isinstance(size, torch.SymInt) else size for size in sizes]
    if None in sizes:
        return None
    return _rewrite_as(aten.reshape.default, sizes)


def _numpy_t(node: torch.fx.Node):
    return _rewrite_as(aten.permute.default, list(reversed(range(node.args[0].meta["val"].dim()))))


def _tensor_split(node: torch.fx.Node):
    """``tensor_split`` at indices is one ``slice`` per piece, between consecutive indices (Qwen3.5's scan splits
    its sequence where the whole chunks end); each piece read is sliced where it is read."""
    if not all(user.target is operator.getitem for user in node.users):
        return None
    kwargs = _arguments(node)
    ends = [0, *kwargs["indices"], sys.maxsize]  # slice clamps its end to the size, as the last piece needs

    def respell(graph: torch.fx.Graph, node: torch.fx.Node) -> None:
        for piece in list(node.users):
            at = piece.args[1]
            _replace(graph, piece, aten.slice.Tensor, (node.args[0], kwargs["dim"], ends[at], ends[at + 1]))
        graph.erase_node(node)
    return respell


COMPOSITES = {aten.chunk.default: _chunk, aten.flatten.using_ints: _flatten, aten.numpy_T.default: _numpy_t,
              aten.tensor_split.indices: _tensor_split,
              aten.broadcast_to.default: lambda node: _rewrite_as(aten.expand.default, _arguments(node)["size"])}


def _out_of_place(node: torch.fx.Node, position: dict[torch.fx.Node, int]):
    """An in-place op whose target is fresh memory that nothing reads after it is its out-of-place twin: export
    points every later use at the in-place node, so only a view taken before it could see the write."""
    twin = _twin(node.target)
    target = node.args[0] if node.args else None
    if (twin is None or not _fresh(target, position)
            or any(user is not node and (position[user] > position[node] or _aliases(user))
                   for user in target.users)):
        return None
    return lambda graph, node: _replace(graph, node, twin, node.args, node.kwargs)


def _twin(op):
    """The out-of-place op of an in-place ``op`` (``add.Tensor`` for ``add_.Tensor``), or None."""
    if not isinstance(op, torch._ops.OpOverload) or not op._schema.is_mutable:
        return None
    twin = getattr(getattr(aten, op._schema.name.split("::")[-1].rstrip("_"), None), op._overloadname, None)
    return None if twin is None or twin._schema.is_mutable else twin


SCATTERS = {aten.slice.Tensor: aten.slice_scatter.default, aten.select.int: aten.select_scatter.default}


def _retake_written_views(graph: torch.fx.Graph) -> None:
    """Take each slice or select of memory written through such views again just before each node that reads it.

    A view aliases its memory whenever it is taken, so this changes nothing the graph computes.  But after it
    every view is read by one node and taken after the writes before that node, which is the order in which
    ``_write_into_view`` can scatter the writes back (Qwen3.5's rotary embedding writes through one select of
    its frequencies three times, then returns it)."""
    roots = {_view_root(node.args[0]) for node in graph.nodes if _twin(node.target) is not None} - {None}
    for root in roots:
        views, tree = [root], []
        while views:
            taken = [user for user in views.pop().users if user.target in SCATTERS]
            views += taken
            tree += taken
        for view in tree:
            for reader in [user for user in view.users if user.target not in SCATTERS]:
                with graph.inserting_before(reader):
                    reader.replace_input_with(view, _retaken(graph, view))
        for view in sorted(tree, reverse=True):
            graph.erase_node(view)


def _view_root(view) -> torch.fx.Node | None:
    """The tensor that ``view``, a chain of slices and selects, is taken of; None if ``view`` is not one."""
    if not isinstance(view, torch.fx.Node) or view.target not in SCATTERS:
        return None
    while view.target in SCATTERS:
        view = view.args[0]
    return view


def _retaken(graph: torch.fx.Graph, view: torch.fx.Node) -> torch.fx.Node:
    """``view``'s chain of slices and selects, taken again from its root at the graph's insertion point."""
    source = _retaken(graph, view.args[0]) if view.args[0].target in SCATTERS else view.args[0]
    again = graph.call_function(view.target, (source, *view.args[1:]), view.kwargs)
    again.meta = dict(view.meta)
    return again


def _write_into_view(node: torch.fx.Node, position: dict[torch.fx.Node, int]):
    """An in-place op on slices or selects of fresh memory (DeepSeek's ``k[..., :n].copy_(x)``, a row of Qwen3.5's
    triangular solve) is its out-of-place twin on the view, scattered back into the memory, as functionalisation
    spells it (``copy``, then ``slice_scatter``); what reads the memory after the write reads the scattered tensor.
    Exact where the writes and the views read keep their order (``_writes_in_order``)."""
    twin = _twin(node.target)
    views = _view_chain(node.args[0]) if twin is not None and not node.users else None
    if views is None or not _fresh(views[0].args[0], position) or not _writes_in_order(views[0].args[0], position):
        return None
    return lambda graph, node: _scatter_back(graph, node, twin)


def _view_chain(view) -> list[torch.fx.Node] | None:
    """The slices and selects from a tensor down to ``view``, each read by the next alone; None if ``view`` is not
    one."""
    chain = []
    while isinstance(view, torch.fx.Node) and view.target in SCATTERS and len(view.users) == 1:
        chain.append(view)
        view = view.args[0]
    return chain[::-1] or None


def _writes_in_order(base: torch.fx.Node, position: dict[torch.fx.Node, int]) -> bool:
    """Whether each write into views of ``base`` takes its views after the write before it, and each view of
    ``base`` read is read before the next write: then every view sees the scatters made before it and no later
    one.  A write to ``base`` itself is left to decomposition."""
    writes, reads = [], []
    for user in base.users:
        write = _written_through(user)
        if write is not None:
            writes.append((position[user], position[write]))
        elif _twin(user.target) is not None:
            return False
        elif _aliases(user):
            reads.append((position[user], _last_read(user, position)))
    ends = sorted(end for _, end in writes)  # a write strictly inside a span: bisect finds it
    return not any(bisect.bisect_right(ends, start) < bisect.bisect_left(ends, last)
                   for start, last in writes + reads)


def _written_through(view: torch.fx.Node) -> torch.fx.Node | None:
    """The in-place op at the end of a chain of slices and selects from ``view``, each read by the next alone."""
    node = view
    while node.target in SCATTERS and len(node.users) == 1:
        node, previous = next(iter(node.users)), node
        if _twin(node.target) is not None and node.args[0] is previous:
            return node
    return None


def _last_read(node: torch.fx.Node, position: dict[torch.fx.Node, int]) -> int:
    """Where ``node``'s value is last read, through the views taken of it."""
    return max((_last_read(user, position) if _aliases(user) else position[user] for user in node.users),
               default=position[node])


def _scatter_back(graph: torch.fx.Graph, node: torch.fx.Node, twin) -> None:
    views = _view_chain(node.args[0])
    base = views[0].args[0]  # the latest scatter into the memory, where an earlier write was rewritten
    with graph.inserting_before(node):
        value = graph.call_function(twin, node.args, node.kwargs)
        value.meta = {**node.meta, "val": views[-1].meta["val"]}
        for view in reversed(views):
            value = graph.call_function(SCATTERS[view.target], (view.args[0], value, *view.args[1:]), view.kwargs)
            value.meta = {**view.meta, "val": view.args[0].meta["val"]}
    base.replace_all_uses_with(value, delete_user_cb=lambda user: user > node)
    graph.erase_node(node)


def _fresh(node, position: dict[torch.fx.Node, int]) -> bool:
    """Whether ``node`` is a tensor in memory of its own: the output of an op that returns no alias of its
    inputs (or an item of one), or of an in-place op that ``_out_of_place`` rewrites.  An input or a weight is
    not: writing to it is a side effect."""
    if not isinstance(node, torch.fx.Node):
        return False
    if node.target is operator.getitem:
        node = node.args[0]
    op = node.target
    if not isinstance(op, torch._ops.OpOverload):
        return False
    if op._schema.is_mutable:
        return _out_of_place(node, position) is not None
    return not _aliases(node)


def _aliases(node: torch.fx.Node) -> bool:
    op = node.target
    return not isinstance(op, torch._ops.OpOverload) or any(r.alias_info is not None for r in op._schema.returns)
