"""Stage 2 — find components: the residual stream, its writers and its readers, by graph structure alone.

The residual stream is the chain of values that *dominate* the logits: every data path from the token
embedding to the output passes through each of them.  A stream value that is an addition of the previous
stream value and some other terms is a *residual step*; the other terms are written by the step's
writers.  A writer whose terms depend on an attention core (a ``scaled_dot_product_attention`` node, or a
matmul → softmax → matmul pattern) is an attention layer; any other writer is an MLP (an MoE block, or a
hybrid's convolution or linear-attention layer: one node, read and written whole).  Between steps the stream
may be scaled as a whole by a constant (Gemma 4's ``layer_scalar``).  A writer outside attention may also read a
*side input*: a value computed from the tokens beside the stream, before any attention (the per-layer inputs of
Gemma 4's E-models), which the ``input`` node's edge into that writer carries (``MLP.sides``); and an attention
layer may reuse the keys and values an earlier one computed (KV sharing), reading them at that layer's stream
(``Attention.reads``).  A writer outside attention may also add its output to the stream later than it reads it,
after other writers have read and written (a *delayed write*: LongCat-Flash's shortcut MoE), reading an earlier
step's stream (``MLP.read``).
Nothing here looks at module names, so new architectures need no new code.
"""
from __future__ import annotations

import operator
import os
import re
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from .ops import COPIES, EXPANDS, LAYOUTS, MATMULS, METADATA_CHECKS, RESHAPES, SDPA, SOFTMAXES

aten = torch.ops.aten


class DecompositionError(ValueError):
    """The graph does not have the residual-stream structure fxcircuits needs."""

    def __init__(self, model_name: str, node: Node | None, why: str):
        where = f" at graph node '{node.name}' ({node.target})" if node is not None else ""
        origin = _source(node) if node is not None else None
        told = f". The node comes from {origin}" if origin else ""
        super().__init__(f"cannot decompose {model_name}{where}: {why}{told}")


_TORCH = os.path.dirname(torch.__file__) + os.sep
_FRAME = re.compile(r'File "([^"]+)", line (\d+), in [^\n]*\n\s*([^\n]*)')


def _source(node: Node) -> str | None:
    """Where in the model's code ``node`` was traced — its module (path in the HF model, and class) and the line
    of the innermost frame export recorded outside torch itself (an ``nn.Linear`` is called from the model's
    line, which says more than ``F.linear``'s) — so that a refusal points at code a reader knows, not only at a
    graph node named by export.  None where export recorded neither (a node fxcircuits' own passes made).

    Export runs the model one attribute down inside ``capture``'s wrapper: that first component of the module
    path is dropped."""
    modules = list((node.meta.get("nn_module_stack") or {}).values())
    frames = [f for f in _FRAME.findall(node.meta.get("stack_trace") or "") if not f[0].startswith(_TORCH)]
    parts = []
    if modules:
        path, kind = modules[-1]
        inner = path.partition(".")[2]
        parts.append(f"{inner or 'the model'} ({kind.rsplit('.', 1)[-1]})")
    if frames:
        file, line, code = frames[-1]
        parts.append(f"{file.rsplit('/', 1)[-1]}:{line}: {code.strip()}")
    return ", ".join(parts) or None


# Ops that pass the residual stream through unchanged in value (some change its shape, e.g. OPT flattens
# batch and sequence around its MLP).
TRANSPARENT = COPIES | RESHAPES


def is_tensor_node(node: Node) -> bool:
    value = node.meta.get("val")
    if isinstance(value, (list, tuple)):
        return any(isinstance(v, torch.Tensor) for v in value)
    return isinstance(value, torch.Tensor)


def data_users(node: Node) -> list[Node]:
    return [n for n in node.users if n.op == "output" or (is_tensor_node(n) and n.target not in METADATA_CHECKS)]


def descendants(node: Node, held: frozenset[Node] = frozenset()) -> set[Node]:
    """Nodes on a data path from ``node``, along paths that do not pass through ``held``."""
    seen, stack = set(), [node]
    while stack:
        for user in data_users(stack.pop()):
            if user not in seen and user not in held:
                seen.add(user)
                stack.append(user)
    return seen


def ancestors(node: Node) -> set[Node]:
    seen, stack = set(), [node]
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def between(start: Node, ends: list[Node]) -> set[Node]:
    """Nodes on a data path from ``start`` to any of ``ends`` (ends included, start excluded).

    Both walks stay inside the window of the graph between ``start`` and the last end (fx nodes compare
    by their position in the graph), so this costs the size of the window, not of the graph."""
    above, stack = set(ends), list(ends)
    while stack:
        for parent in stack.pop().all_input_nodes:
            if parent > start and parent not in above:
                above.add(parent)
                stack.append(parent)
    reach, stack = set(), [start]
    while stack:
        for user in data_users(stack.pop()):
            if user in above and user not in reach:
                reach.add(user)
                stack.append(user)
    return reach


@dataclass
class Gate:
    """An output gate computed from the stream (Qwen3-Next, AFMoE, Laguna): ``product = value · gate`` on the
    write path, ``gate`` computed from the step's stream alone.  A gate acts at the query's position, as q does:
    each query head's gate is computed from that head's q input."""
    product: Node                         # the multiplication on the write path
    value: Node                           # its operand computed from the core's output
    gate: Node                            # its operand computed from the stream


@dataclass
class Attention:
    """One attention layer: its core, the q/k/v inputs of the core, and the terms it writes."""
    layer: int
    core: list[Node]                      # the SDPA node, or the nodes from score matmul to output matmul
    inputs: dict[str, Node]               # "q" / "k" / "v" -> the core's input node ([B, heads, ...])
    output: Node                          # the core's output ([B, H, S, head_dim])
    terms: list[Node]                     # what it adds to the residual stream
    n_heads: int = 0
    gate: Gate | None = None
    reads: dict[str, "Step"] = field(default_factory=dict)  # role -> the step whose stream it reads (KV sharing)


@dataclass
class MLP:
    layer: int
    terms: list[Node]
    sides: list[Node] = field(default_factory=list)  # side inputs its block reads (``_side_inputs``)
    read: "Step | None" = None  # the earlier step whose stream it reads, for a delayed write; else its own


@dataclass
class Scale:
    """The whole stream scaled by a factor computed from the weights alone — one number, or one per channel of the
    model dimension: ``node = stream · factor``, or ``stream / factor``.  Between two residual steps (Gemma 4's
    ``layer_scalar``), or as the stream is carried into a step's sum (``Step.carry``).  The rewrite expresses
    every node's output in the stream's scale at the first layer, so that the stream still sums the nodes'
    outputs."""
    node: Node
    factor: Node | float
    divides: bool


@dataclass
class Step:
    """One residual step: ``end = start + Σ writer terms (+ constants)``, or ``start · α + Σ writer terms`` where
    the model scales the residual it carries by a constant, one per channel as Doge's learned ``input_residual``
    (Doge itself is refused for its attention; the zoo's ``scaled_residual`` is a Llama with that factor)."""
    start: Node                            # the stream value every writer of this step reads
    end: Node                              # the add node that yields the next stream value
    adds: list[Node]                       # the add nodes of the step's sum
    writers: list[Attention | MLP] = field(default_factory=list)
    carry: Scale | None = None             # the sum's term ``start · α``, where it is not ``start`` itself
    # terms of the sum computed from an earlier step's stream (delayed writes, ``_split_midway``), each with that step
    early: dict[Node, "Step"] = field(default_factory=dict)


@dataclass
class Components:
    model_name: str
    steps: list[Step]
    final: Node                            # the last stream value, read by the logits
    logits: Node                           # the logits tensor returned by the graph
    scales: list[Scale] = field(default_factory=list)  # in graph order, between the first and the last step
    # top-k key selections from the stream (``_key_selection``), taken as what they are where they keep every key
    selections: list[Node] = field(default_factory=list)

    @property
    def attentions(self) -> list[Attention]:
        return [w for s in self.steps for w in s.writers if isinstance(w, Attention)]

    @property
    def sides(self) -> list[Node]:
        """Every side input, in the order of the writers that read them."""
        return [n for s in self.steps for w in s.writers if isinstance(w, MLP) for n in w.sides]


def find_components(gm: GraphModule, model_name: str) -> Components:
    """Find the residual stream of ``gm`` and the attention and MLP layers that read and write it."""
    output = next(n for n in gm.graph.nodes if n.op == "output")
    logits = _logits_node(output, model_name)
    source = _token_embedding(gm, model_name)
    reach = descendants(source)
    selections = [n for n in gm.graph.nodes if n in reach and _key_selection(n)]
    chain = _dominator_chain(source, logits, _chosen(selections))
    cores = _cores(reach)
    steps, sides, held = _steps(chain, model_name, attending=bool(cores)), [], frozenset()
    stray = _stray_core(cores, steps) if steps else None
    if not steps or stray is not None:
        found = _held_stream(source, logits, chain, _chosen(selections), model_name)
        if found is not None:
            chain, steps, sides, held = found
            stray = _stray_core(cores, steps)
    if not steps:
        raise _no_attention(chain, model_name)
    if stray is not None:
        raise _stray_error(stray, chain, model_name)
    _assign_sides(sides, steps, model_name)
    _assign_reads(steps, reach if held else set(), model_name)
    return Components(model_name, steps, steps[-1].end, logits, _stream_scales(chain, steps, model_name), selections)


def _held_stream(source: Node, logits: Node, chain: list[Node], chosen: frozenset[Node],
                 model_name: str) -> tuple | None:
    """Where the layers read the tokens, or an earlier layer's keys and values, beside the stream: the stream found
    with those values held fixed — (chain, steps, side inputs, held values) — or None where that finds none either
    (the first attempt's refusal, on ``chain``, then stands).  ``chosen``: key selections' outputs, held too."""
    cores = _core_inputs(source)
    sides = _side_inputs(source, chain, cores)
    held = frozenset(sides) | cores
    chain = _dominator_chain(source, logits, held | chosen)
    try:
        steps = _steps(chain, model_name)
    except DecompositionError:
        return None
    return (chain, steps, sides, held) if steps else None


def _steps(chain: list[Node], model_name: str, attending: bool = True) -> list[Step]:
    """The residual steps along ``chain`` that have writers; none where the model has attention (``attending``)
    and no attention layer writes to them."""
    counts = {"attention": 0, "mlp": 0}
    steps = []
    for step in _residual_steps(chain, model_name):
        step.writers = _writers(step, counts, model_name)
        if step.writers:
            steps.append(step)
    return steps if counts["attention"] or not attending else []


def _side_inputs(source: Node, chain: list[Node], cores: frozenset[Node]) -> list[Node]:
    """Values computed from the token embedding before the first attention core, not on its way to that core, and
    read after it other than as a core's input (``cores``): what the layers take from the tokens beside the stream
    (Gemma 4's per-layer inputs, one slice per layer).  Looked for only where the stream alone leaves an attention
    layer off the chain, so no model whose stream is found without them changes.  Whether each is read by one
    writer's block alone is checked later (``_assign_sides``)."""
    reach = descendants(source)
    first = next((n for n in source.graph.nodes if n in reach and _scores(n, reach) is not None), None)
    if first is None:
        return []
    after = descendants(first) | {first}
    before = (reach | {source}) - after
    feeding = ancestors(first)
    return [n for n in source.graph.nodes if n in before and n not in feeding and n not in chain and n not in cores
            and any(u in after for u in data_users(n))]


def _stray_core(cores: list[Node], steps: list[Step]) -> Node | None:
    """Of the model's attention ``cores``, one outside every residual step, if any: one that reaches the later layers
    other than through the stream, so that the stream's chain skipped it."""
    spans = [(s.start, s.end) for s in steps]
    return next((n for n in cores if not any(start < n <= end for start, end in spans)), None)


def _cores(reach: set[Node]) -> list[Node]:
    """Every attention core among ``reach`` (what the tokens reach), in graph order: an SDPA call, or a softmax
    over q·k scores (not a router's, which scores no keys)."""
    return [n for n in sorted(reach) if n.target in SDPA | SOFTMAXES and _scores(n, reach) is not None]


def _core_inputs(source: Node) -> frozenset[Node]:
    """The q, k and v inputs of every SDPA core: a later layer may read an earlier one's keys and values."""
    return frozenset(a for n in descendants(source) if n.target in SDPA for a in n.args[:3] if isinstance(a, Node))


def _stray_error(stray: Node, chain: list[Node], model_name: str) -> DecompositionError:
    """Why an attention core lies outside every residual step: its keys are another core's too (KV sharing that
    only ``scaled_dot_product_attention`` is followed through), the stream around it is scaled by something other
    than a constant as it is carried into the sum, or else the values computed from the tokens run along more than
    one path around it, named by the stream's nodes before and after it."""
    reach = descendants(chain[0])
    keys = _key_root(stray, reach)
    cores = (n for n in reach if n is not stray and _scores(n, reach) is not None)
    if any(_key_root(core, reach) is keys for core in cores):
        return DecompositionError(model_name, stray, "this attention layer's keys and values are reused by another "
                                  "layer beside the residual stream, which the engine follows into "
                                  "scaled_dot_product_attention alone: load the model with "
                                  "attn_implementation='sdpa'")
    before = max(n for n in chain if n < stray)
    after = min(n for n in chain if n > stray)
    rescaled = _rescaled_residual([before, after])
    if rescaled is not None:
        return DecompositionError(model_name, rescaled, f"an attention layer lies in no residual step: {RESCALED}")
    return DecompositionError(model_name, stray, "this attention layer lies where the values computed from the "
                              f"tokens run along more than one path, between graph nodes '{before.name}' and "
                              f"'{after.name}' (a second stream, or a state carried beside the residual stream "
                              "from one pass over the layers to the next, as in a recurrent model): it is in no "
                              "residual step, so no per-edge input could patch it")


def _key_root(core: Node, reach: set[Node]) -> Node:
    """The tensor a core's keys are reshaped from (before transposes, repeats over query-head groups and views),
    which a layer that reuses an earlier layer's keys shares with that layer's core."""
    scores = _scores(core, reach)
    key = scores.args[1] if scores.target in SDPA else _score_operands(scores, reach)[1]
    while key.target in LAYOUTS | EXPANDS or _whole_slice(key):
        key = key.args[0]
    return key


def _assign_reads(steps: list[Step], tokens: set[Node], model_name: str) -> None:
    """The step at whose stream each attention input is read (``Attention.reads``): the layer's own, or — where a
    layer reuses the keys and values an earlier layer computed (KV sharing: Gemma 4's E-models) — that layer's.
    Its q must be its own, and its k and v read at one step.  Where the stream was found with values held fixed,
    an input may read nothing else computed from the tokens (``tokens``: an earlier layer's values mixed into
    its own, say), which no edge would carry."""
    for i, step in enumerate(steps):
        for attention in (w for w in step.writers if isinstance(w, Attention)):
            for role, node in attention.inputs.items():
                paths = ((s, between(s.start, [node])) for s in reversed(steps[:i + 1]))
                read, path = next(((s, path) for s, path in paths if path), (None, None))
                if read is None:
                    raise DecompositionError(model_name, node, f"the attention {role} input is not computed from the "
                                             "residual stream")
                foreign = next((a for n in path for a in n.all_input_nodes
                                if a in tokens and a not in path and a is not read.start), None)
                if foreign is not None:
                    raise DecompositionError(model_name, foreign, f"the attention {role} input reads this value, "
                                             "computed from the tokens apart from the stream it reads (e.g. an "
                                             "earlier layer's values), which the per-edge inputs cannot patch")
                attention.reads[role] = read
            if attention.reads["q"] is not step or attention.reads["k"] is not attention.reads["v"]:
                raise DecompositionError(model_name, attention.output, "this attention layer reads its query from "
                                         "another layer's stream, or its keys and values from two different ones")


def _assign_sides(sides: list[Node], steps: list[Step], model_name: str) -> None:
    """Give each side input to the one writer outside attention whose block reads it; refuse one read anywhere
    else (by attention, by the stream's sums, by the readout): no per-edge input would carry it there."""
    for side in sides:
        readers = [w for s in steps for w in s.writers if isinstance(w, MLP)
                   and all(u in between((w.read or s).start, w.terms) for u in data_users(side))]
        if len(readers) != 1:
            raise DecompositionError(model_name, side, "a value computed from the tokens beside the residual stream "
                                     "(a side input, such as Gemma 4's per-layer inputs) is read other than by one "
                                     "MLP-like block, which the per-edge inputs cannot patch")
        readers[0].sides.append(side)


def _logits_node(output: Node, model_name: str) -> Node:
    flat = [a for a in torch.utils._pytree.tree_leaves(output.args) if isinstance(a, Node)]
    if len(flat) != 1:
        raise DecompositionError(model_name, output, f"expected the graph to return one logits tensor, got {len(flat)}")
    return flat[0]


def _token_embedding(gm: GraphModule, model_name: str) -> Node:
    """The first floating-point tensor computed from ``input_ids``."""
    input_ids = next(n for n in gm.graph.nodes if n.op == "placeholder")
    reach = descendants(input_ids)
    for node in gm.graph.nodes:
        if node in reach and isinstance(node.meta.get("val"), torch.Tensor) and node.meta["val"].is_floating_point():
            return node
    raise DecompositionError(model_name, input_ids, "no floating-point value is computed from input_ids")


def _dominator_chain(source: Node, sink: Node, held: frozenset[Node] = frozenset()) -> list[Node]:
    """Nodes through which every data path from ``source`` to ``sink`` passes, in order; paths through ``held``
    (side inputs, taken as given) do not count."""
    live = descendants(source, held) & (ancestors(sink) | {sink})
    idom: dict[Node, Node | None] = {source: None}
    depth = {source: 0}

    def meet(a: Node, b: Node) -> Node:
        while a is not b:
            if depth[a] >= depth[b]:
                a = idom[a]
            else:
                b = idom[b]
        return a

    for node in source.graph.nodes:  # fx graphs are topologically ordered
        if node not in live:
            continue
        parents = [p for p in node.all_input_nodes if p in idom]
        dom = parents[0]
        for parent in parents[1:]:
            dom = meet(dom, parent)
        idom[node], depth[node] = dom, depth[dom] + 1
    if sink not in idom:  # every path runs through ``held``
        return []
    chain, node = [], sink
    while node is not None:
        chain.append(node)
        node = idom[node]
    return chain[::-1]


def _sum_terms(node: Node, inside: set[Node]) -> tuple[list[Node], list[Node]]:
    """Flatten a tree of ``aten.add.Tensor`` nodes into its terms; returns (terms, add nodes)."""
    if node in inside and node.target in TRANSPARENT:
        terms, adds = _sum_terms(node.args[0], inside)
        return terms, [node] + adds
    if node.target is aten.add.Tensor and node in inside and node.kwargs.get("alpha", 1) == 1 \
            and all(isinstance(a, Node) for a in node.args):
        terms, adds = [], [node]
        for arg in node.args:
            t, a = _sum_terms(arg, inside)
            terms += t
            adds += a
        return terms, adds
    return [node], []


def _residual_steps(chain: list[Node], model_name: str) -> list[Step]:
    steps = []
    for previous, node in zip(chain, chain[1:]):
        if node.target is aten.add.Tensor:
            terms, adds = _sum_terms(node, between(previous, [node]) | {node})
            if terms.count(previous) == 1:
                steps += _split_midway(Step(previous, node, adds), model_name)
            elif previous not in terms and (carry := _carried(previous, terms, adds)) is not None:
                steps.append(Step(previous, node, adds, carry=carry))
    return steps


def _split_midway(step: Step, model_name: str) -> list[Step]:
    """``step`` as one step per stream value its sum passes through and a later writer reads: a sum read part-way,
    after some of its terms, is the stream at that point.  A term computed from the stream before such a point is a
    delayed write (LongCat-Flash's shortcut MoE reads the stream after a layer's first attention and adds its output
    at the layer's end, after two more writers): ``Step.early`` holds it, with the step whose stream it reads.  The
    dominator chain passes over those points, since the delayed write runs beside them."""
    midway = _read_midway(step)
    if not midway:
        return [step]
    window = between(step.start, [step.end])
    steps: list[Step] = []
    for start, end in zip([step.start, *midway], [*midway, step.end]):
        inside = between(start, [end]) | {end}
        terms, adds = _sum_terms(end, inside)
        part = Step(start, end, adds)
        for term in terms:
            if term is not start and term not in inside and term in window:
                part.early[term] = next(s for s in reversed(steps) if between(s.start, [term]))
        steps.append(part)
    _check_midway(steps, window | {step.start}, model_name)
    return steps


def _read_midway(step: Step) -> list[Node]:
    """The partial sums of ``step`` that carry its start and that something beside the sum reads, in order."""
    adds = set(step.adds)
    return sorted(n for n in adds if n is not step.end and any(u not in adds for u in data_users(n))
                  and step.start in _sum_terms(n, between(step.start, [n]) | {n})[0])


def _check_midway(steps: list[Step], stream: set[Node], model_name: str) -> None:
    """Each block of a step split midway (``_split_midway``) reads the stream at one point alone — a delayed write
    at the step it reads, every other at its own — and a delayed write is no attention layer: the engine gives a
    head its q, k and v at its own step.  A value computed from the stream at another point would reach the block
    from the unpatched run whatever the mask: refused rather than patched wrongly.  ``stream``: the split step's
    start and every value computed from it up to its end."""
    # (where it reads, what it computes, its sum's adds, which may read the delayed writes' outputs); a delayed
    # write's block has no sum of its own
    blocks = [(s.start, between(s.start, [s.end]), s.adds, s.early) for s in steps]
    blocks += [(read.start, between(read.start, [term]), [], {}) for s in steps for term, read in s.early.items()]
    for start, region, adds, early in blocks:
        for node in sorted(region):
            stray = next((a for a in node.all_input_nodes if a in stream and a not in region and a is not start
                          and not (a in early and node in adds)), None)
            if stray is not None:
                raise DecompositionError(model_name, node, "this block reads the residual stream at two points of one "
                                         f"residual sum (here through '{stray.name}', computed from it before later "
                                         "writers added to it), which no per-edge input can give")
        core = None if adds else next((n for n in sorted(region) if _scores(n, region) is not None), None)
        if core is not None:
            raise DecompositionError(model_name, core, "this attention layer's output is added to the stream after "
                                     "later writers read it (a delayed write); fxcircuits takes delayed writes from "
                                     "blocks without attention alone")


def _carried(stream: Node, terms: list[Node], adds: list[Node]) -> Scale | None:
    """The one term of a sum that is ``stream`` scaled by a constant and read by the sum alone, else None."""
    scales = [s for t in terms if (s := _constant_scale(stream, t)) is not None
              and all(u in adds for u in data_users(t))]
    return scales[0] if len(scales) == 1 else None


def _no_attention(chain: list[Node], model_name: str) -> DecompositionError:
    """Why no attention layer writes to the stream, as far as the chain tells."""
    why = ("found no attention layer (scaled_dot_product_attention, or matmul → softmax → matmul over q and k) "
           "writing to a residual stream between the token embedding and the logits")
    rescaled = _rescaled_residual(chain)
    if rescaled is not None:
        return DecompositionError(model_name, rescaled, f"{why}; {RESCALED}")
    for previous, node in zip(chain, chain[1:]):
        gap = between(previous, [node])
        if any(_scores(n, gap) is not None for n in gap):
            return DecompositionError(model_name, previous, why + "; from this value on, the attention layers are "
                                      "reached along more than one path (a side input computed from the tokens "
                                      "besides the stream, such as Gemma 3n's per-layer inputs, that is not one "
                                      "block's own), which the per-edge inputs cannot patch")
    return DecompositionError(model_name, None, why)


RESCALED = ("the stream reaches an addition only through this operation, which changes it: fxcircuits needs residual "
            "additions x + f(x), or x·α + f(x) with α computed from the weights alone, one number or one per channel")


def _rescaled_residual(chain: list[Node]) -> Node | None:
    """Where the stream is added to but not carried by the addition: the first such sum's term that reads the
    previous stream value (a multiplication by a residual scale, say), or None."""
    for previous, node in zip(chain, chain[1:]):
        if node.target is aten.add.Tensor:
            terms, _ = _sum_terms(node, between(previous, [node]) | {node})
            if previous not in terms:
                return next((t for t in terms if previous in t.all_input_nodes), None)
    return None


def _stream_scales(chain: list[Node], steps: list[Step], model_name: str) -> list[Scale]:
    """Between the first and the last residual step the stream may only be added to, passed through, or scaled
    as a whole by a constant (``Scale``); returns the scales."""
    ends = {s.end for s in steps}
    first, last = chain.index(steps[0].start), chain.index(steps[-1].end)
    scales = []
    for previous, node in zip(chain[first:last], chain[first + 1:last]):
        if node in ends or node.target is aten.add.Tensor or node.target in TRANSPARENT or _whole_slice(node):
            continue
        scale = _constant_scale(previous, node)
        if scale is None:
            raise DecompositionError(model_name, node, "the residual stream is transformed between two residual "
                                     "additions by an operation that is neither a plain pass-through nor a scaling "
                                     "by a constant")
        scales.append(scale)
    return scales


def _whole_slice(node: Node) -> bool:
    """A slice that keeps everything (Gemma 4 slices its stream to the positions whose logits it keeps, before the
    layers that reuse keys and values: all of them, as traced)."""
    if node.target is not aten.slice.Tensor:
        return False
    _, _, start, end, step = (*node.args, *[None] * (5 - len(node.args)))  # slice(x, dim=0, start, end, step=1)
    step = 1 if step is None else step
    return start in (None, 0) and (end is None or isinstance(end, int) and end >= 2 ** 62) and step == 1


def _constant_scale(stream: Node, node: Node) -> Scale | None:
    """``node`` as ``stream`` times (or over) a factor computed from the weights alone, one number or one per
    channel of the model dimension (the stream's last), else None."""
    if node.target not in (aten.mul.Tensor, aten.div.Tensor) or len(node.args) != 2 or node.kwargs:
        return None
    first, factor = node.args
    if node.target is aten.mul.Tensor and factor is stream:
        first, factor = factor, first
    if first is not stream or factor is stream:
        return None
    if isinstance(factor, Node):
        value = factor.meta.get("val")
        if not isinstance(value, torch.Tensor) or not _per_channel(value.shape, _meta_shape(stream)) \
                or any(n.op == "placeholder" for n in ancestors(factor) | {factor}):
            return None
    elif not isinstance(factor, (int, float)) or isinstance(factor, bool):
        return None
    return Scale(node, factor, node.target is aten.div.Tensor)


def _per_channel(shape: tuple, stream: tuple) -> bool:
    """Whether a factor of ``shape`` scales a stream of shape ``stream`` by one number, or one per channel."""
    return len(shape) <= len(stream) and all(size == 1 for size in shape[:-1]) \
        and (not shape or shape[-1] in (1, stream[-1]))


def check_scales(components: Components, values: dict) -> None:
    """A stream scaled by zero loses what the nodes before it wrote: their outputs have no first-layer scale."""
    carried = [s.carry for s in components.steps if s.carry is not None]
    for scale in components.scales + carried:
        factor = values[scale.factor] if isinstance(scale.factor, Node) else scale.factor
        if not bool(torch.as_tensor(factor).ne(0).all()):
            raise DecompositionError(components.model_name, scale.node, "the residual stream is scaled by zero "
                                     "here, so the nodes written before cannot be told apart after it")


def check_sides(components: Components, values: dict, input_ids: Node) -> None:
    """A side input is mixed per prompt (``patching.side_input``): it must hold the prompts along its first axis
    and the positions along its second, as the tokens do."""
    tokens = tuple(values[input_ids].shape)
    for side in components.sides:
        if tuple(values[side].shape[:2]) != tokens:
            raise DecompositionError(components.model_name, side, f"a side input has shape {tuple(values[side].shape)}"
                                     f" for tokens of shape {tokens}; fxcircuits needs it laid out as [batch, seq, …]")


def _writers(step: Step, counts: dict[str, int], model_name: str) -> list[Attention | MLP]:
    inside = between(step.start, [step.end])
    terms, _ = _sum_terms(step.end, inside | {step.end})
    carry = step.carry.node if step.carry else None
    terms = [t for t in terms if t is not step.start and t is not carry and t in inside]  # terms that read the stream
    cores = _attention_cores(inside, model_name)
    attention_terms: dict[int, list[Node]] = {i: [] for i in range(len(cores))}
    mlp_terms = []
    for term in terms:
        above = ancestors(term) | {term}
        owners = [i for i, core in enumerate(cores) if core[1] in above]
        if len(owners) > 1:
            raise DecompositionError(model_name, term, "one residual term depends on two attention cores")
        (attention_terms[owners[0]] if owners else mlp_terms).append(term)
    writers: list[Attention | MLP] = []
    for i, (core_nodes, out, inputs) in enumerate(cores):
        if not attention_terms[i]:
            raise DecompositionError(model_name, out, "attention output never reaches the residual stream")
        gate = _gate(step.start, set(core_nodes) | set(inputs.values()), out, attention_terms[i], inside, model_name)
        writers.append(Attention(counts["attention"], core_nodes, inputs, out, attention_terms[i],
                                 n_heads=_meta_shape(inputs["q"])[1], gate=gate))
        _check_reads(core_nodes, inputs, step.start, inside, model_name)
        counts["attention"] += 1
    if mlp_terms:
        writers.append(MLP(counts["mlp"], mlp_terms))
        counts["mlp"] += 1
    # delayed writes, after this step's own writers: one block per stream they read
    for read in {id(r): r for r in step.early.values()}.values():
        writers.append(MLP(counts["mlp"], [t for t, r in step.early.items() if r is read], read=read))
        counts["mlp"] += 1
    return writers


def _meta_shape(node: Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _attention_cores(inside: set[Node], model_name: str) -> list[tuple[list[Node], Node, dict]]:
    """Each core as (its nodes, its output, its q/k/v inputs), in graph order.

    Core inputs and output are per-head tensors [batch, heads, ...]; where an eager implementation folds
    the heads into the batch for ``bmm`` (BLOOM), the core starts and ends at the last 4-d tensors."""
    cores = []
    for node in sorted(inside):
        if node.target in SDPA:
            q, k, v = node.args[:3]
            cores.append(([node], node, {"q": q, "k": k, "v": v}))
        elif (score := _scores(node, inside)) is not None:
            out = _nearest(node, descendants, lambda n: n.target in MATMULS)
            if out is None or out.args[0] not in descendants(node) | {node}:
                raise DecompositionError(model_name, node, "attention softmax is not followed by a matmul with values")
            q, k = _score_operands(score, inside)
            inputs = {"q": _per_head(q, True), "k": _per_head(k, True), "v": _per_head(out.args[1], True)}
            output, core = _joined(_per_head(out, False), inputs, inside)
            cores.append((sorted(core), output, inputs))
    for _, _, inputs in cores:
        for role, node in inputs.items():
            shape = _meta_shape(node)
            if len(shape) != 4:
                raise DecompositionError(model_name, node, f"the attention {role} input has shape {shape}; fxcircuits "
                                         "needs per-head tensors laid out as [batch, heads, ...] (load the model with "
                                         "attn_implementation='sdpa' or 'eager')")
    return cores


def _joined(output: Node, inputs: dict[str, Node], inside: set[Node]) -> tuple[Node, set[Node]]:
    """The core's output and nodes, the output taken past factors computed beside it from its own q and k: an
    attention sink applied as ``out · sigmoid(logsumexp(scores) − sink)`` (GraniteSWA, Laguna) belongs to the
    head's attention, so every head computes it from its own q and k.  A factor that reads the stream any other
    way (an output gate from the hidden states) is left outside, where ``_gate`` takes it as an output gate or
    refuses it."""
    core = set().union(*(between(i, [output]) for i in inputs.values()))
    while len(users := data_users(output)) == 1 and len(_meta_shape(users[0])) == 4:
        user = users[0]
        if not any(a is not output and a in inside for a in user.all_input_nodes):
            break  # a reshape or a constant factor: the write path's, as before
        wider = set().union(*(between(i, [user]) for i in inputs.values()))
        if any(a in inside and a not in wider and a not in inputs.values() for n in wider for a in n.all_input_nodes):
            break
        output, core = user, wider
    return output, core


def _check_reads(core: list[Node], inputs: dict[str, Node], start: Node, inside: set[Node], model_name: str) -> None:
    """The core may read the residual stream through its q, k and v inputs only: those get edges of their own.  A
    score bias computed from the stream (a relative-position projection of the hidden states) would reach every
    head from the clean stream alone, whatever the mask — refused rather than patched wrongly.  One exception: a
    mask that depends on the stream only through the set of keys a top-k selection keeps (``_key_selection``),
    which is the same whatever the stream where it keeps every key."""
    within = set(core) | set(inputs.values())
    foreign = [read for node in core for read in node.all_input_nodes if read not in within and read in inside]
    reach = descendants(start, _chosen([n for n in inside if _key_selection(n)])) if foreign else set()
    stray = next((read for read in foreign if read in reach), None)
    if stray is not None:
        raise DecompositionError(model_name, stray, "the attention core reads the residual stream other than "
                                 "through its q, k and v inputs (e.g. a score bias computed from the hidden "
                                 "states), which the per-edge inputs cannot patch")


def _chosen(selections: list[Node]) -> frozenset[Node]:
    """The outputs of top-k key selections, taken as given: what they choose is every key, whatever the stream."""
    return frozenset(u for s in selections for u in s.users)


FROM_METADATA = {aten.new_ones.default, aten.new_zeros.default, aten.new_full.default, aten.new_empty.default}
# what an attention mask passes through on its way to the scores: reshapes, and combining with other masks
MASKING = COPIES | LAYOUTS | EXPANDS | {
    aten.slice.Tensor, aten.select.int, aten.bitwise_not.default, aten.logical_not.default,
    aten.__and__.Tensor, aten.bitwise_and.Tensor, aten.logical_and.default, aten.__or__.Tensor,
    aten.bitwise_or.Tensor, aten.logical_or.default, aten.masked_fill.Scalar, aten.masked_fill.Tensor,
    aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar, aten.add.Tensor,
    aten.sub.Tensor, aten.mul.Tensor}


def _key_selection(node: Node) -> bool:
    """Whether ``node`` is a top-k whose indices are used only as a set, each position marked with one value in a
    tensor along the dimension it chose over — a sparse-attention indexer (DeepSeek V3.2, GLM-5) marking the keys
    each query keeps.  Where k is that dimension's size every position is marked, whatever the scores: the rewrite
    checks so at run time (``rewrite.keeps_every_key``)."""
    if node.target is not aten.topk.default:
        return False
    rank = len(_meta_shape(node.args[0]))
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", -1)) % rank
    outputs = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    if 1 not in outputs or (0 in outputs and data_users(outputs[0])):
        return False
    frontier = [outputs[1]]
    while frontier:
        indices = frontier.pop()
        for user in data_users(indices):
            if user.target in COPIES:
                frontier.append(user)
            elif user.target in FROM_METADATA and user.args[0] is indices and indices not in user.args[1:]:
                continue  # a fresh tensor that takes only the dtype and device
            elif not (user.target is aten.scatter.value and user.args[2] is indices and user.args[0] is not indices
                      and user.args[1] % len(_meta_shape(user)) == dim and _masks_scores(user)):
                return False
    return True


def _masks_scores(marks: Node) -> bool:
    """Whether ``marks`` reaches attention scores alone, as a mask: through ``MASKING`` operations to the mask of
    ``scaled_dot_product_attention`` or to a softmax.  A top-k over groups of MoE experts, marked the same way,
    goes on to choose experts, and is no key selection."""
    frontier, seen = [marks], {marks}
    while frontier:
        node = frontier.pop()
        for user in data_users(node):
            as_mask = len(user.args) > 3 and user.args[3] is node or user.kwargs.get("attn_mask") is node
            if user.target in SDPA and as_mask and node not in user.args[:3]:
                continue
            if user.target in SOFTMAXES or user in seen:
                continue
            if user.target not in MASKING:
                return False
            seen.add(user)
            frontier.append(user)
    return True


def _gate(start: Node, core: set[Node], output: Node, terms: list[Node], inside: set[Node],
          model_name: str) -> Gate | None:
    """The path from the core's output to the stream may read the stream only through that output, or through one
    output gate (``Gate``) that multiplies it and is computed from the step's stream alone.  Anything else — a
    per-head factor taken from the scores beside the core, a gate computed from the core or its q, k or v inputs,
    a second gate — would reach every head from the unpatched run whatever the mask: refused rather than patched
    wrongly."""
    region = between(output, terms)
    foreign = [(node, read) for node in sorted(region) for read in node.all_input_nodes
               if read in inside and read not in region and read is not output]
    if not foreign:
        return None
    product, gate = foreign[0]
    gate_region = between(start, [gate]) | {gate}
    value = next((a for a in product.args if a is not gate), None)
    if len(foreign) > 1 or product.target is not aten.mul.Tensor or len(product.args) != 2 \
            or value not in region | {output} or gate_region & (core | region):
        raise DecompositionError(model_name, gate, "the attention output is combined with a value computed from "
                                 "the residual stream apart from the core's output, other than as one output gate "
                                 "computed from the stream (e.g. a per-head factor from the attention scores), which "
                                 "the per-edge inputs cannot patch")
    return Gate(product, value, gate)


def _scores(node: Node, inside: set[Node]) -> Node | None:
    """For an SDPA node, itself; for a softmax over attention scores (a product of two tensors computed from the
    stream inside the window), the product; else None: a softmax over one projection (an MoE router) is not
    attention."""
    if node.target in SDPA:
        return node
    if node.target not in SOFTMAXES:
        return None
    return _nearest(node, ancestors, lambda n: _score_operands(n, inside) is not None)


def _score_operands(node: Node, inside: set[Node]) -> tuple[Node, Node] | None:
    """(q, k) if ``node`` multiplies two stream-dependent tensors: ``matmul``/``bmm``, or ``baddbmm``."""
    if node.target in MATMULS:
        operands = node.args[:2]
    elif node.target is aten.baddbmm.default:
        operands = node.args[1:3]
    else:
        return None
    return tuple(operands) if all(a in inside for a in operands) else None


def _per_head(node: Node, upward: bool) -> Node:
    """Follow reshapes from ``node`` (to its input, or to its only reshaping user) to the nearest 4-d tensor."""
    while len(_meta_shape(node)) != 4:
        if upward and node.target in LAYOUTS:
            node = node.args[0]
            continue
        users = [u for u in node.users if u.target in LAYOUTS]
        if upward or len(users) != 1:
            break
        node = users[0]
    return node


def _nearest(node: Node, direction, wanted) -> Node | None:
    """The closest node (in graph order) in ``direction(node)`` that satisfies ``wanted``."""
    candidates = sorted(n for n in direction(node) if n.op == "call_function" and wanted(n))
    if not candidates:
        return None
    return candidates[-1] if candidates[-1] < node else candidates[0]

