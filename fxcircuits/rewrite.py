"""Stage 3 — rewrite: split every residual read into per-edge inputs.

Two graphs are built from the captured one by copying it node by node and replacing the readers of the
stream:

* the **recorder** runs the model unchanged up to the last writer and returns every upstream node's output
  (``input``, each head's write, each MLP's write), one tensor [n_nodes, batch, seq, d_model] per writer, then
  each side input the ``input`` node's edges carry (``components.MLP.sides``) as [1, batch, …] — not the logits,
  which no caller of the other run needs — and the output of every attention layer's q, k and v projections (and
  of its output gate's).  Where the heads' writes sum to what attention adds (no output bias, no
  norm after it), both graphs add that sum and never run the output projection itself;
* the **patcher** takes those outputs from another run (or runs that run itself, as the first rows of its
  batch) plus a mask, and gives every downstream input its own value through
  :func:`fxcircuits.patching.accumulate`.  Each downstream input then runs its own copy of
  the reading computation: an MLP's whole block (reading its side inputs through
  :func:`fxcircuits.patching.side_input`); for attention, the norm and projection of each query head's
  q, k and v separately (see :mod:`fxcircuits.heads`; the norm's trailing factors cross the projection, see
  :mod:`fxcircuits.norms`), the attention core over the per-head tensors, and the unchanged output path.
  A layer that reuses the keys and values an earlier layer computed (KV sharing) has its heads' k and v computed
  at that layer's step, from their own copies of the stream there, and kept until its core runs.
  Where the mask weights every edge into a layer (or into one role's readers) alike and no gradient is asked
  for, its heads all read one stream, and the plain projections serve them; a head whose every edge the mask
  patches from a recorded run reads that run's projection (both decided at run time, per call).

Beside them, copies that read the model rather than patch it: the captured graph as it is (``build_plain``), the
stream after each writer (``build_streams``), the attention patterns (``build_patterns``), the heads' writes split by
key position (``build_sources``) and the readout alone (``build_readout``).

Copies of the original nodes that end up unused are removed by dead-code elimination.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from .components import (Attention, Components, DecompositionError, MLP, Scale, Step, ancestors, between,
                         descendants, is_tensor_node)
from .heads import (RELAYOUT, HeadGate, Post, Projection, Ranges, broadcasts, columns_read, columns_written,
                    distinct_rows, first_projection, gather_heads, head_elements, head_writes, heads_sum,
                    last_projection, norm_share, place_columns, project_columns, project_rounds, region_module,
                    repeated_heads, role_input, role_parts, role_shared, shared_input, to_ranges, wholly_patched)
from .norms import FUSED_NORMS, FusedNorm, Norm, freeze_statistics
from .ops import MATMULS, METADATA_CHECKS, RESHAPES, SDPA, SOFTMAXES
from .patching import (DeltaStore, accumulate, at_positions, patched_rows, patched_rows_count, sequence_length,
                       side_input, tap, tap_side)

aten = torch.ops.aten
QKV = ("q", "k", "v")


def _dropped(node: Node) -> bool:
    """Export's input guards (a submodule call) and metadata asserts: left out of every graph built here."""
    return node.op == "call_module" or node.target in METADATA_CHECKS


@dataclass
class ReadPlan:
    """How each query head gets its own q (k, v) from its own copy of the stream."""
    projection: Projection
    norm: list[Node]          # from the stream to the projection's input
    post: Post                # from the projection's output to the core input, over all rounds at once
    core_input: Node          # the core's input, or the heads its copies per query head come from
    rounds: tuple[tuple[tuple[int, Ranges | None], ...], ...]  # per round: (query head, its columns, or None for all)
    picks: tuple[tuple[int, int], ...]                         # per query head: (round, head of the core input)
    width: int
    stacked: bool             # all heads' norms and projections can run as one batched computation
    stacked_norm: Norm | None  # the norm as run on all heads' rows at once (see ``norms``); None without a norm


@dataclass
class WritePlan:
    """How the attention output splits into one write per head."""
    projection: Projection
    region: list[Node]        # everything from the core output to the terms added to the stream
    after: list[Node]         # the part of ``region`` after the projection
    ranges: tuple[Ranges, ...]
    gate: ReadPlan | None = None       # an output gate (``components.Gate``) as each query head reads it from its
    head_gate: HeadGate | None = None  # own q input, and how the heads' gates multiply the value


@dataclass
class AttentionPlan:
    reads: dict[str, ReadPlan]
    write: WritePlan


def plan_attention(step: Step, attention: Attention, values: dict, name: str) -> AttentionPlan:
    """How the heads of ``attention`` (a writer of ``step``) read and write: each role from the stream of the step it
    reads at (``Attention.reads``: an earlier one for keys and values an earlier layer computed)."""
    reads = {role: _plan_read(attention.reads[role], attention, role, values, name) for role in QKV}
    return AttentionPlan(reads, _plan_write(step, attention, values, name))


def _plan_read(step: Step, attention: Attention, role: str, values: dict, name: str) -> ReadPlan:
    core_input = repeated_heads(attention.inputs[role], values)
    proj = last_projection(step.start, core_input, name)
    columns = columns_read(proj.node, core_input, values)
    n_heads, n_core = attention.n_heads, len(columns)
    if n_heads % n_core:
        raise DecompositionError(name, core_input, f"{n_core} {role} heads cannot serve {n_heads} query heads")
    return _read_plan(step, proj, core_input, columns, [h * n_core // n_heads for h in range(n_heads)], values)


def _read_plan(step: Step, proj: Projection, target: Node, columns: list[frozenset[int]], core_head: list[int],
               values: dict) -> ReadPlan:
    """How each query head h computes ``target`` from its own copy of the stream, reading ``columns[core_head[h]]``
    of the projection ``proj``: only those columns, where the heads' columns are disjoint or equal; the full width
    otherwise (e.g. a norm over all heads)."""
    n_heads = len(core_head)
    norm = between(step.start, [proj.x]) if proj.x is not step.start else set()
    post = between(proj.node, [target])
    separable = all(c and (c == d or not c & d) for c in columns for d in columns)
    if separable:
        rank, seen = [], {}
        for h in range(n_heads):
            key = columns[core_head[h]]
            rank.append(seen.get(key, 0))
            seen[key] = rank[-1] + 1
        rounds = tuple(tuple((h, to_ranges(columns[core_head[h]])) for h in range(n_heads) if rank[h] == r)
                       for r in range(max(rank) + 1))
        picks = tuple((rank[h], core_head[h]) for h in range(n_heads))
    else:  # heads share columns: each head projects the full width
        rounds = tuple(((h, None),) for h in range(n_heads))
        picks = tuple((h, core_head[h]) for h in range(n_heads))
    width = values[proj.node].shape[-1]
    stacked = separable and len({len(c) for c in columns}) == 1 and broadcasts(step.start, proj.x, values)
    stacked_norm = Norm(sorted(norm), step.start, proj.x, values) if norm and stacked else None
    return ReadPlan(proj, sorted(norm), Post(sorted(post), proj.node, target, values), target, rounds, picks,
                    width, stacked, stacked_norm)


def _plan_write(step: Step, attention: Attention, values: dict, name: str) -> WritePlan:
    proj = first_projection(attention.output, attention.terms, name)
    region = between(attention.output, attention.terms)
    before = between(attention.output, [proj.x]) | ({proj.x} if proj.x is attention.output else set())
    after = between(proj.node, attention.terms)
    if not region <= before | after | {proj.node, attention.output}:
        raise DecompositionError(name, proj.node, "the attention output reaches the stream other than through its "
                                 "output projection")
    columns = columns_written(attention.output, proj.x, values)
    width = values[proj.x].shape[-1]
    covered = sorted(c for cols in columns for c in cols)
    if covered != list(range(width)):
        raise DecompositionError(name, proj.node, "the heads do not map one-to-one onto the output projection's "
                                 "input columns")
    plan = WritePlan(proj, sorted(region), sorted(after), tuple(to_ranges(c) for c in columns))
    if attention.gate is not None:
        gate = attention.gate
        masks = head_elements(attention.output, gate.value, values)
        if masks is None:
            raise DecompositionError(name, gate.product, "the output gate multiplies values that mix several heads' "
                                     "outputs, so no head's gate can follow its own q input")
        proj = last_projection(step.start, gate.gate, name)
        plan.gate = _read_plan(step, proj, gate.gate, columns_read(proj.node, gate.gate, values, masks),
                               list(range(attention.n_heads)), values)
        plan.head_gate = HeadGate(masks, tuple(r for r, _ in plan.gate.picks))
    return plan


def flat_module(root: torch.nn.Module, graph: Graph) -> GraphModule:
    """``graph`` as a module holding each weight it reads (from ``root``) under one flat name.

    A weight read by its path (``model.layers.0.self_attn.q_proj.weight``) costs an attribute lookup per module
    on the way: about 1,600 per patched run of a 30-layer model, where the host sets the pace."""
    weights = {}
    for node in graph.find_nodes(op="get_attr"):
        weight, flat = _weight(root, node.target), node.target.replace(".", "_")
        while flat in weights and weights[flat] is not weight:  # another path flattened to the same name
            flat += "_"
        node.target, weights[flat] = flat, weight
    return GraphModule(weights, graph)


def _weight(root: torch.nn.Module, path: str):
    *modules, name = path.split(".")
    return getattr(root.get_submodule(".".join(modules)), name)


def copy_node(graph: Graph, node: Node, lookup) -> Node:
    """``node`` copied into ``graph``, its arguments mapped by ``lookup``, in the layout our graphs run (RELAYOUT)."""
    new = graph.node_copy(node, lookup)
    new.target = RELAYOUT.get(new.target, new.target)
    return new


def other_group(other: list[torch.Tensor] | None, index: int) -> torch.Tensor | None:
    """One writer group's outputs in the other run; None where that run rides in the patched pass itself."""
    return None if other is None else other[index]


def recorded_at(recorded: list[torch.Tensor] | None, index: int) -> torch.Tensor | None:
    """One attention read's projection output in the recorded other run, or None where the other run was given
    as values (zero or mean ablation) rather than recorded."""
    return None if recorded is None else recorded[index]


def from_sizes(block: set[Node]) -> set[Node]:
    """The tensors ``block`` reads that are computed from sizes alone (an MoE block's index over its tokens,
    ``arange(batch · seq · k)``), with the tensors they are computed from: copied with the block, they follow the
    sizes where it runs.  A shared prefix (``fxcircuits.prefix``) widens the batch between an MLP's read and its
    block, and an index built before that, from one copy of the batch, repeated for every mask, is no index over
    the widened tokens."""
    found: dict[Node, bool] = {}

    def sized(node: Node) -> bool:
        if node not in found:
            found[node] = node.op == "call_function" and is_tensor_node(node) and all(
                sized(a) for a in node.all_input_nodes if is_tensor_node(a))
        return found[node]
    read = {a for node in block for a in node.all_input_nodes if a not in block and sized(a)}
    return read | {n for a in read for n in ancestors(a) if found.get(n)}


def as_rows(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Upstream outputs in the stream's canonical layout: [n, *like.shape] (n = 1 where a patched pass takes a
    layer's heads' writes as their sum alone: ``heads.head_writes``)."""
    return t.reshape(-1, *like.shape)


def reshape_heads(t: torch.Tensor, shape: list) -> torch.Tensor:
    """``t`` [heads or 1, …] reshaped to ``shape`` behind its leading axis (a view of the write carried per head)."""
    return t.reshape(t.shape[0], *shape)


def _writer_sizes(step: Step) -> list[int]:
    """Per writer of ``step``, how many upstream nodes it writes: one per query head, or one."""
    return [w.n_heads if isinstance(w, Attention) else 1 for w in step.writers]


Reads = list[tuple[Attention | MLP, tuple[str, ...]]]


def step_reads(components: Components) -> dict[int, Reads]:
    """Per step (by id), the writers whose inputs read its stream, in the order of ``graph.CircuitGraph``'s
    downstream inputs: its own writers (an attention layer with the roles it reads here, an MLP with none), then the
    later writers that read here — attention layers that reuse keys and values computed here (KV sharing), with k
    and v; MLPs whose write is delayed, with none."""
    reads: dict[int, Reads] = {id(s): [] for s in components.steps}
    for step in components.steps:
        for writer in step.writers:
            if isinstance(writer, Attention):
                for at in {id(writer.reads[role]): role for role in QKV}:  # its own step first: q reads there
                    reads[at].append((writer, tuple(r for r in QKV if id(writer.reads[r]) == at)))
            else:
                reads[id(writer.read or step)].append((writer, ()))
    return reads


def _read_size(writer: Attention | MLP, roles: tuple[str, ...]) -> int:
    return len(roles) * writer.n_heads if isinstance(writer, Attention) else 1


class _Builder:
    """Copies the captured graph into a new one, replacing the stream's readers."""

    def __init__(self, gm: GraphModule, components: Components, plans: list[AttentionPlan], patched: bool):
        self.gm, self.components, self.patched = gm, components, patched
        self.inputs = next(iter(gm.graph.find_nodes(op="placeholder")))  # input_ids [batch, seq]
        self.plans = dict(zip(map(id, components.attentions), plans))
        self.graph = Graph()
        self.env: dict[Node, Node] = {}
        self.acts: list[Node] = []       # per writer group: [n, *stream.shape]
        self.others: list[Node] = []     # the patcher's other run, per writer group
        self.n_upstream = 0
        self.sizes = [1] + [n for s in components.steps for n in _writer_sizes(s)]
        self.step_reads = step_reads(components)
        self.readers = [sum(_read_size(*r) for r in self.step_reads[id(s)]) for s in components.steps] + [1]  # logits
        self.shared: dict[int, dict[str, Node]] = {}  # per attention layer, the k and v it reads at an earlier step
        self.delayed: dict[int, tuple[Node, int]] = {}  # per delayed MLP, its input read at an earlier step, its reader
        written = [sum(_writer_sizes(s)) for s in components.steps]
        self.reads = [1 + sum(written[:i]) for i in range(len(written) + 1)]  # upstream nodes each reader group reads
        # the projection outputs of every attention read (q, k, v, and an output gate's), which the recorder returns
        # and the patcher takes back
        self.recorded = [(id(a), role, read.projection.node) for a, plan in zip(components.attentions, plans)
                         for role, read in [*plan.reads.items(), ("gate", plan.write.gate)] if read is not None]
        self.sides = components.sides    # read by MLP blocks; their other-run values follow the writer groups
        self.n_downstream = 0
        self.name = components.model_name
        self.scales = {scale.node: scale for scale in components.scales}
        self.selections = set(components.selections) if patched else set()
        self.frame: Node | None = None  # the product of the stream's scales so far (``components.Scale``), or 1

    def call(self, fn, *args, **kwargs) -> Node:
        return self.graph.call_function(fn, args, kwargs)

    def copy(self, node: Node, lookup) -> Node:
        return copy_node(self.graph, node, lookup)

    def clone(self, region: list[Node], substitute: dict[Node, Node]) -> dict[Node, Node]:
        """Copy ``region`` (in graph order), reading ``substitute`` in place of the original nodes."""
        local = dict(substitute)
        for node in region:
            local[node] = self.copy(node, lambda a: local[a] if a in local else self.env[a])
        return local

    def build(self) -> GraphModule:
        steps = {s.end: s for s in self.components.steps}
        sums = {n for s in self.components.steps for n in s.adds}
        for node in self.gm.graph.nodes:
            if node.op == "placeholder":
                self.env[node] = self.graph.placeholder(node.name)
                if node.next.op != "placeholder":
                    self._extra_placeholders()
            elif node.op == "output":
                self._finish()
            elif _dropped(node):
                continue
            elif node in steps:  # a step's writers are emitted just before the sum that adds them
                self._step(steps[node])
                for add in sorted(set(steps[node].adds)):
                    self.env[add] = self.copy(add, self.env.__getitem__)
            elif node not in sums:
                self.env[node] = self.copy(node, self.env.__getitem__)
                if node in self.scales:
                    self._rescale(self.scales[node])
                if node in self.selections:  # computed once, from this run's stream: right where it keeps every key
                    self.env[node] = self.call(keeps_every_key, self.env[node], self.env[node.args[0]], self.name)
        # the captured run is in eval mode: a random op (attention with dropout_p = 0) left unused is dead too
        self.graph.eliminate_dead_code(is_impure_node=lambda n: n.is_impure(impure_random=False))
        return flat_module(self.gm, self.graph)

    def _extra_placeholders(self) -> None:
        if self.patched:
            self.other = self.graph.placeholder("other")   # per writer: [n_nodes, rows, seq, d_model]
            self.keep = self.graph.placeholder("keep")     # [n_masks, n_upstream, n_downstream]
            self.tap = self.graph.placeholder("tap", default_value=None)  # a patching.Tap, or None
            self.recording = self.graph.placeholder("recorded", default_value=None)  # the recorder's projections
            scratch = self.graph.placeholder("scratch", default_value=None)  # a patching.Scratch, or None
            ahead = self.graph.placeholder("ahead", default_value=False)  # the other run leads the batch (no other)
            self.positions = self.graph.placeholder("positions", default_value=None)  # [batch]: logits only there
            prefix = self.graph.placeholder("prefix", default_value=False)  # the masks share a prefix (``prefix``)
            where = self.graph.placeholder("where", default_value=None)  # [n_masks, classes, batch, seq]: positions
            self.store = self.call(DeltaStore, self.keep, self.sizes, self.readers, self.reads, scratch, ahead, prefix,
                                   where)

    def _rescale(self, scale: Scale) -> None:
        """Carry the stream's scale so far past one more ``scale``."""
        self.frame = rescaled(self.graph, self.env, 1.0 if self.frame is None else self.frame, scale)

    def _in_frame(self, value: Node) -> Node:
        """``value`` (the stream, or what a writer adds to it) in the stream's scale at the first layer, where
        every node's output is expressed: the stream then sums them, however the model scales it."""
        return value if self.frame is None else self.call(operator.truediv, value, self.frame)

    def _add_group(self, act: Node, n: int) -> None:
        act = self._in_frame(act)
        self.acts.append(act)
        if self.patched:
            self.others.append(self.call(other_group, self.other, len(self.others)))
        self.n_upstream += n

    def _readers(self, stream: Node, n: int) -> Node:
        """The inputs of the next ``n`` downstream readers, stacked: [n, *stream.shape]."""
        first, self.n_downstream = self.n_downstream, self.n_downstream + n
        inputs = self.call(accumulate, self.store, self._in_frame(self.env[stream]), list(self.acts),
                           list(self.others), first, self.n_downstream)
        inputs = self.call(tap, self.tap, inputs, self.n_upstream, first, self.n_downstream)
        return inputs if self.frame is None else self.call(operator.mul, inputs, self.frame)

    def _split(self, stacked: Node, sizes: list[int]) -> list[Node]:
        """``stacked``'s rows in consecutive parts of ``sizes``, by one split: its gradient is one concatenation,
        where a slice per part would zero-fill the whole stack for each part, and sum the parts' fills."""
        if len(sizes) == 1:
            return [stacked]
        parts = self.call(torch.split, stacked, sizes)
        return [self.call(operator.getitem, parts, i) for i in range(len(sizes))]

    def _step(self, step: Step) -> None:
        if not self.acts:
            self.reference = self.env[step.start]
            self._add_group(self.call(as_rows, self.reference, self.reference), 1)
        if self.patched:
            reads = self.step_reads[id(step)]
            sizes = [_read_size(*r) for r in reads]
            inputs, first = self._split(self._readers(step.start, sum(sizes)), sizes), 0
            group = self.n_downstream - sum(sizes)  # the first reader of this step
            for (writer, roles), size, rows in zip(reads, sizes, inputs):
                if isinstance(writer, MLP) and writer.read is None:
                    self._patched_mlp(step, writer, self.call(torch.squeeze, rows, 0), group + first)
                elif isinstance(writer, MLP):  # its write is delayed: its block runs where it writes
                    self.delayed[id(writer)] = (self.call(torch.squeeze, rows, 0), group + first)
                elif "q" in roles:  # a layer of this step: its q reads here
                    self._patched_attention(step, writer, roles, rows, group + first)
                else:  # a later layer's keys and values, read here: kept until its core runs
                    self.shared[id(writer)] = self._read_roles(step, writer, roles, rows, group + first)
                first += size
            for writer in step.writers:
                if id(writer) in self.delayed:  # after its block's nodes, which may follow the step it read at
                    self._patched_mlp(writer.read, writer, *self.delayed.pop(id(writer)))
        if step.carry is not None:  # the writers add to the stream as scaled after their reads
            self._rescale(step.carry)
        for writer in step.writers:
            if isinstance(writer, Attention):
                self._add_group(self._head_writes(writer), writer.n_heads)
            else:
                self._add_group(self._sum_as_rows([self.env[t] for t in writer.terms]), 1)

    def _patched_mlp(self, step: Step, mlp: MLP, x: Node, reader: int) -> None:
        """The block of ``mlp`` on its input ``x`` (reader ``reader``), read at ``step``'s stream, with its side inputs
        as that reader sees them."""
        substitute = {step.start: x}
        for side in mlp.sides:
            index = self.sides.index(side)
            other = self.call(other_group, self.other, len(self.sizes) + index)
            value = self.call(side_input, self.store, self.env[side], other, reader)
            substitute[side] = self.call(tap_side, self.tap, value, index, reader)
        block = between(step.start, mlp.terms)
        local = self.clone(sorted(block | from_sizes(block)), substitute)
        for term in mlp.terms:
            self.env[term] = local[term]

    def _patched_attention(self, step: Step, attention: Attention, roles: tuple[str, ...], rows: Node,
                           reader: int) -> None:
        """``rows`` are the layer's readers of ``roles`` (q first), ``reader`` the first one's position among all
        readers; the other roles were read at an earlier step (``shared``)."""
        plan, h = self.plans[id(attention)], attention.n_heads
        core_inputs = {**self.shared.pop(id(attention), {}), **self._read_roles(step, attention, roles, rows, reader)}
        output = self._core(attention, core_inputs)
        local = {attention.output: output}
        for node in plan.write.region:
            if attention.gate is not None and node is attention.gate.product:
                gates = self._gates(step, attention, self.call(operator.getitem, rows, slice(0, h)), reader)
                local[node] = self.call(plan.write.head_gate, local[attention.gate.value], gates)
            else:
                local[node] = self.copy(node, lambda a: local[a] if a in local else self.env[a])
        for term in attention.terms:
            self.env[term] = local[term]
        self.env.update({n: local[n] for n in plan.write.region})
        self.env[attention.output] = output

    def _read_roles(self, step: Step, attention: Attention, roles: tuple[str, ...], rows: Node,
                    reader: int) -> dict[str, Node]:
        """The core inputs of ``roles`` from their readers' ``rows``, heads per role (``reader``: the first one's
        position)."""
        h, reads = attention.n_heads, [self.plans[id(attention)].reads[role] for role in roles]
        if all(r.stacked for r in reads):
            nodes = self._read_stacked(attention, roles, rows, reader)
        else:
            parts = self._split(rows, [h] * len(reads))
            nodes = [self._read_apart(step, read, part) for read, part in zip(reads, parts)]
        return dict(zip(roles, nodes))

    def _gates(self, step: Step, attention: Attention, rows: Node, reader: int) -> Node:
        """The output gate as each query head computes it from its own q input (``rows``: the layer's q readers,
        the first at reader ``reader``), the way its q is computed: each head projects only the columns its gate
        reads; a head whose every edge the mask patches from a recorded run takes its gate from that run's recording,
        as its q.  [rounds, *gate shape], as ``HeadGate`` takes them."""
        read = self.plans[id(attention)].write.gate
        if not read.stacked:
            return self._run_post(read, self._rounds_apart(step, read, rows))
        shared = self.call(shared_input, self.store, self.tap, rows)
        x, s, columns = self._stacked_norm(read, self.call(distinct_rows, rows, shared), shared)
        rounds, _ = self._project(read, x, s, columns, shared, reader, attention.n_heads,
                                  self._recorded_index(attention, "gate"))
        return self._run_post(read, rounds)

    def _read_stacked(self, attention: Attention, roles: tuple[str, ...], rows: Node,
                      reader: int) -> list[Node]:
        """The core's inputs of ``roles`` (q, k and v, or some) from a layer's rows, heads per role: norms over all
        rows at once, one batched matmul per role, the post-projection path once over all rounds.  Where the mask weights every edge into
        the layer (or into one role's readers) alike and no gradient is asked for, one row and the plain
        projection serve every head (of that role); heads whose every edge is patched from a recorded run take
        their projection from that run's recording.  The norms' last factors are applied across the projection
        (``norms``)."""
        n_heads, reads = attention.n_heads, [self.plans[id(attention)].reads[role] for role in roles]
        shared = self.call(shared_input, self.store, self.tap, rows)
        rows = self.call(distinct_rows, rows, shared)
        one_norm = len({(tuple(r.norm), r.projection.x) for r in reads}) == 1
        rows, scale, columns = self._stacked_norm(reads[0], rows, shared) if one_norm else (rows, None, ())
        core_inputs = []
        parts = [self.call(role_parts, t, shared, n_heads, len(roles)) for t in (rows, scale)]
        for i, read in enumerate(reads):
            x, s = (self.call(operator.getitem, p, i) for p in parts)
            if not one_norm:
                x, s, columns = self._stacked_norm(read, x, shared)
            rounds, alike = self._project(read, x, s, columns, shared, reader + i * n_heads, n_heads,
                                          self._recorded_index(attention, roles[i]))
            core_inputs.append(self._post(read, rounds, alike))
        return core_inputs

    def _project(self, read: ReadPlan, x: Node, s: Node, columns, shared: Node, reader: int, n: int,
                 recorded: int | None = None) -> tuple[Node, Node]:
        """The projection's rounds for ``n`` readers' normed rows ``x`` (from reader ``reader``), and whether they
        all read one value.  ``recorded``: the index of the projection's output among the recorder's, whose heads
        the mask patches wholly then take (``wholly_patched``)."""
        alike = self.call(role_shared, self.store, self.tap, shared, reader, n)
        wholly, taken = (), None
        if recorded is not None:
            taken = self.call(recorded_at, self.recording, recorded)
            wholly = self.call(wholly_patched, self.store, x, reader, n, taken)
        x, s = (self.call(role_input, t, alike, shared) for t in (x, s))
        proj = read.projection
        ranges = tuple(r for _, r in sorted(pair for heads in read.rounds for pair in heads))  # by query head
        rounds = self.call(project_rounds, x, self.env[proj.weight], self._bias(proj), proj.layout, ranges,
                           read.rounds, read.width, alike, wholly, taken, s, columns)
        return rounds, alike

    def _stacked_norm(self, read: ReadPlan, x: Node, shared: Node) -> tuple[Node, Node | None, Node | tuple]:
        """The norm of the stacked rows ``x``, and the per-row scale and per-column factors the projection applies
        (None and none where the norm ran whole: ``norms.Norm``)."""
        if read.stacked_norm is None:
            return x, None, ()
        out = self.call(read.stacked_norm, x, shared, *(self.env[e] for e in read.stacked_norm.externals))
        return tuple(self.call(operator.getitem, out, i) for i in range(3))

    def _recorded_index(self, attention: Attention, role: str) -> int:
        return next(i for i, (a, r, _) in enumerate(self.recorded) if a == id(attention) and r == role)

    def _bias(self, proj: Projection) -> Node | None:
        return self.env[proj.bias] if proj.bias is not None else None

    def _norm(self, step: Step, read: ReadPlan, x: Node) -> Node:
        return self.clone(read.norm, {step.start: x})[read.projection.x] if read.norm else x

    def _post(self, read: ReadPlan, rounds: Node, shared: Node | bool) -> Node:
        return self.call(gather_heads, self._run_post(read, rounds), read.picks, shared)

    def _run_post(self, read: ReadPlan, rounds: Node) -> Node:
        return self.call(read.post, rounds, *[self.env[e] for e in read.post.externals])

    def _read_apart(self, step: Step, read: ReadPlan, inputs: Node) -> Node:
        """The core's q (k, v) input with each query head's norm and projection run on its own row of ``inputs``."""
        return self._post(read, self._rounds_apart(step, read, inputs), False)

    def _rounds_apart(self, step: Step, read: ReadPlan, inputs: Node) -> Node:
        """The projection's rounds with each query head's norm and projection run on its own row of ``inputs``."""
        proj, rounds = read.projection, []
        for heads in read.rounds:
            parts = []
            for head, ranges in heads:
                x = self._norm(step, read, self.call(operator.getitem, inputs, head))
                if ranges is None:
                    parts.append(self.clone([proj.node], {proj.x: x})[proj.node])
                else:
                    parts.append(self.call(project_columns, x, self.env[proj.weight], self._bias(proj), proj.layout,
                                           ranges))
            if heads[0][1] is None:
                rounds.append(parts[0])
            else:
                rounds.append(self.call(place_columns, parts, [r for _, r in heads], read.width))
        return self.call(torch.stack, rounds)

    def _core(self, attention: Attention, inputs: dict[str, Node]) -> Node:
        originals = {attention.inputs[role]: node for role, node in inputs.items()}
        if attention.core[0].target in SDPA:
            sdpa = attention.core[0]
            args = list(torch.fx.node.map_arg(sdpa.args, lambda a: originals[a] if a in originals else self.env[a]))
            kwargs = dict(torch.fx.node.map_arg(sdpa.kwargs, self.env.__getitem__))
            if len(args) > 7:
                args[7] = False
            kwargs.pop("enable_gqa", None)  # every query head now has its own k and v
            return self.graph.call_function(sdpa.target, tuple(args), kwargs)
        return self.clone(attention.core, originals)[attention.output]

    def _head_writes(self, attention: Attention) -> Node:
        """Each head's write to the stream, [n_heads, *stream.shape], from this graph's (patched) values."""
        values, plan = self.env, self.plans[id(attention)].write
        proj = plan.projection
        # a patched pass that stores none of this layer's writes takes their sum alone (``DeltaStore.stores``)
        each = self.call(DeltaStore.stores, self.store, len(self.acts)) if self.patched else True
        shares = {proj.node: self.call(head_writes, values[proj.x], values[proj.weight], proj.layout, plan.ranges,
                                       each)}
        whole = {proj.node} if proj.bias is None else set()  # nodes whose heads' shares sum to them
        dependent = descendants(attention.output)
        for node in plan.after:
            if any(a in shares for a in node.all_input_nodes):
                share = linear_share(self, node, shares, values, dependent)
                if share is not None:
                    shares[node] = share
                    if sums_to_whole(node, whole, dependent):
                        whole.add(node)
        missing = [t for t in attention.terms if t not in shares]
        if missing:
            raise DecompositionError(self.name, missing[0], "this attention write is not linear in the heads' outputs")
        for term in attention.terms:  # the stream adds the heads' writes: the output projection itself is dead
            if term in whole:
                self.env[term] = self.call(heads_sum, shares[term])
        return self._sum_as_rows([shares[t] for t in attention.terms])

    def _sum_as_rows(self, terms: list[Node]) -> Node:
        """A writer's terms summed in the stream's layout, [n, *stream.shape]: a term may be shaped otherwise (an MoE
        block's routed experts [batch·seq, d] beside its shared expert [batch, seq, d]) and reshaped only as it
        joins the stream."""
        total = self.call(as_rows, terms[0], self.reference)
        for term in terms[1:]:
            total = self.call(operator.add, total, self.call(as_rows, term, self.reference))
        return total

    def _finish(self) -> None:
        if self.patched:  # the readout runs on the patched rows alone (at the positions asked for), at their sizes
            x = self.call(operator.getitem, self._readers(self.components.final, 1), 0)
            seq = self.call(aten.sym_size.int, self.env[self.inputs], 1)
            x = self.call(at_positions, self.call(patched_rows, self.store, x), self.positions, seq)
            self.graph.output(_readout(self.graph, self.components, x, self._input_size))
        else:  # no logits: the recording pass skips the final norm and unembedding (a fifth of SmolLM2's forward)
            sides = [self.call(as_rows, self.env[side], self.env[side]) for side in self.sides]
            self.graph.output((list(self.acts) + sides, [self.env[node] for _, _, node in self.recorded]))

    def _input_size(self, node: Node, dim: int) -> Node:
        """The patched rows' batch (``dim`` 0) or sequence length where the readout reads the inputs' sizes."""
        if dim == 0:
            return self.call(patched_rows_count, self.store, self.env[node])
        return self.call(sequence_length, self.positions, self.env[node])


def _shift(dim, by: int = 1):
    if isinstance(dim, (list, tuple)):
        return type(dim)(_shift(d, by) for d in dim)
    return dim + by if isinstance(dim, int) and dim >= 0 else dim


# Ops that act on one linear argument (arg 0), with the positions of their dimension arguments.
UNARY_LINEAR = {aten.neg.default: (), aten.clone.default: (), aten.type_as.default: (), aten.contiguous.default: (),
                aten.alias.default: (), aten._to_copy.default: (), aten.transpose.int: (1, 2),
                aten.permute.default: (1,),
                aten.unsqueeze.default: (1,), aten.squeeze.dim: (1,), aten.mean.dim: (1,),
                aten.sum.dim_IntList: (1,), aten.slice.Tensor: (1,), aten.select.int: (1,)}
SHAPES = RESHAPES | {aten.expand.default}  # the same values in another shape, or broadcast


def linear_share(builder: _Builder, node: Node, shares: dict, values: dict, dependent: set[Node]) -> Node | None:
    """Carry per-head parts through ``node`` linearly: additive constants drop out, and any factor computed
    from the whole write (a norm's scale) is taken from the whole write.  Returns None for a node that is
    not linear in its input; it may then only serve as such a factor."""
    call, target, args = builder.call, node.target, node.args
    arg_value = lambda a: values[a] if isinstance(a, Node) else a  # noqa: E731
    first = args[0]
    if target in (aten.add.Tensor, aten.sub.Tensor):
        a, b = (shares.get(x) if isinstance(x, Node) else None for x in args[:2])
        if a is not None and b is not None:
            return call(target, a, b)
        other = args[1] if a is not None else args[0]
        if isinstance(other, Node) and other in dependent:
            raise DecompositionError(builder.name, node, "adds a term computed non-linearly from the attention output")
        if a is not None:
            return a
        return call(aten.neg.default, b)
    if target in (aten.mul.Tensor, aten.div.Tensor):
        a, b = (shares.get(x) if isinstance(x, Node) else None for x in args[:2])
        if a is not None and b is None:
            return call(target, a, arg_value(args[1]))
        if target is aten.mul.Tensor and b is not None and a is None:
            return call(target, arg_value(args[0]), b)
        raise DecompositionError(builder.name, node, "multiplies or divides by the attention output itself")
    if first not in shares:
        return None
    if target in UNARY_LINEAR:
        new_args = [shares[first]] + [_shift(a) if i in UNARY_LINEAR[target] else arg_value(a)
                                      for i, a in enumerate(args[1:], start=1)]
        return builder.graph.call_function(target, tuple(new_args), dict(node.kwargs))
    if target in SHAPES:
        return call(reshape_heads, shares[first], [arg_value(s) for s in args[1]])
    if target in FUSED_NORMS:  # over the last dimension: a factor from the whole write
        norm = FusedNorm.of(node)
        if len(norm.shape) != 1:
            return None
        return call(norm_share, shares[first], values[first], arg_value(norm.weight), norm.eps, norm.centre)
    if target is aten.linear.default:
        return call(aten.linear.default, shares[first], arg_value(args[1]))
    if target in (aten.matmul.default, aten.mm.default) and args[1] not in dependent:
        return call(aten.matmul.default, shares[first], arg_value(args[1]))
    return None  # a non-linear statistic of the whole write (e.g. a norm's variance): used as a whole


def sums_to_whole(node: Node, whole: set[Node], dependent: set[Node]) -> bool:
    """Whether the heads' shares of ``node`` (``linear_share``) sum to its value with nothing else: its inputs from
    the attention output are such nodes (``whole``), it adds no constant (a bias, which the shares drop) and takes
    no factor computed from the whole write (a norm's scale, which needs the whole write computed anyway)."""
    inputs = [a for a in node.all_input_nodes if a in dependent]
    if not inputs or not all(a in whole for a in inputs):
        return False
    if node.target in (aten.add.Tensor, aten.sub.Tensor):
        return all(isinstance(a, Node) and a in whole for a in node.args[:2])
    if node.target is aten.linear.default:
        return len(node.args) < 3 or node.args[2] is None
    return node.target in UNARY_LINEAR or node.target in SHAPES or node.target in (
        aten.mul.Tensor, aten.div.Tensor, aten.matmul.default, aten.mm.default)


def keeps_every_key(selection: tuple[torch.Tensor, torch.Tensor], scores: torch.Tensor,
                    model_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A top-k key selection computed from the stream (``components._key_selection``), checked to keep every key:
    only then is it the same set whatever the per-edge inputs, and one computed from the patched run's own stream
    serves every head."""
    indices = selection[1]  # the scores' shape, but k along the dimension chosen over
    if indices.numel() < scores.numel():
        kept, keys = next((k, n) for k, n in zip(indices.shape, scores.shape) if k != n)
        raise ValueError(f"{model_name}'s attention keeps the {kept} keys per query that a top-k selection computed "
                         f"from the hidden states chooses (a sparse-attention indexer); prompts of {keys} tokens are "
                         "longer, so which keys it keeps depends on the stream, which per-edge inputs cannot patch: "
                         f"patch prompts of at most {kept} tokens")
    return selection


def build_recorder(gm: GraphModule, components: Components, plans: list[AttentionPlan]) -> GraphModule:
    return _Builder(gm, components, plans, patched=False).build()


def build_patcher(gm: GraphModule, components: Components, plans: list[AttentionPlan]) -> GraphModule:
    return _Builder(gm, components, plans, patched=True).build()


def build_plain(gm: GraphModule, components: Components) -> GraphModule:
    """The captured graph itself, ``(input_ids, attention_mask) → logits``, run as the graphs built here run:
    without export's input guards and metadata asserts (the capture's lengths are checked before a call), each
    weight under one flat name (``flat_module``).  Where the host sets the pace, a clean run of the exported
    module as it comes cost a third more than HF's own forward (1.32× against 0.94×, 30 layers, 4 tokens), in those
    lookups and asserts."""
    graph = Graph()
    env: dict[Node, Node] = {}
    graph.graph_copy(gm.graph, env)
    graph.output(env[components.logits])
    return _pruned(gm, graph)


def build_streams(gm: GraphModule, components: Components) -> GraphModule:
    """The residual stream itself, where the model holds it: ``(input_ids, attention_mask) → (streams, scales)``,
    ``streams`` [1 + writers, …] in the layout of the first step's stream ([B, S, d]), the stream before the first
    writer and after each; ``scales`` [1 + writers, d], the factor each carries beyond the nodes' outputs, per
    channel (all ones unless the model scales its whole stream, ``components.Scale``).

    The nodes' outputs do not sum to it: an output projection's bias (GPT-2, OPT, BLOOM, Phi) is no head's write,
    as the field counts heads, yet the stream carries it.  The logit lens reads the stream as the model holds it.
    Where a step's writers add to the stream together (parallel attention and MLP), the stream after one of them
    is the step's start plus what that one and those before it add."""
    graph = Graph()
    env: dict[Node, Node] = {}
    graph.graph_copy(gm.graph, env)
    first = env[components.steps[0].start]

    def rows(node: Node) -> Node:  # OPT holds the stream as [B·S, d] at times, an MoE term too
        return graph.call_function(as_rows, (env[node], first))

    streams, scales, frame, pending = [rows(components.steps[0].start)], [1.0], 1.0, list(components.scales)
    for step in components.steps:
        while pending and not step.start < pending[0].node:  # the scales applied before this step reads
            frame = rescaled(graph, env, frame, pending.pop(0))
        running = rows(step.start)
        if step.carry is not None:  # the step's writers add to the stream as its sum carries it
            running, frame = rows(step.carry.node), rescaled(graph, env, frame, step.carry)
        for writer in step.writers[:-1]:
            for term in writer.terms:
                running = graph.call_function(operator.add, (running, rows(term)))
            streams.append(running)
        streams.append(rows(step.end))
        scales += [frame] * len(step.writers)
    graph.output((graph.call_function(torch.cat, (streams,)), graph.call_function(as_scales, (scales, first))))
    return _pruned(gm, graph)


def build_patterns(gm: GraphModule, components: Components) -> GraphModule:
    """Where each attention layer's queries attend: ``(input_ids, attention_mask, layers) → patterns``, one tensor
    [B, heads, S_q, S_k] per attention layer in ``components.attentions`` order (head h being ``a{layer}.h{h}``),
    None for a layer not in ``layers``: a layer's weights take S² values a head, so only those asked for are made.

    A core written out (matmul → softmax → matmul) gives the weights it multiplies the values by, as they reach
    that product: past an attention sink's column, dropped after the softmax.  A fused core
    (``scaled_dot_product_attention``) holds its weights inside; they are computed from its own arguments
    (``sdpa_pattern``).  A sink applied beside the core, as a factor on its output (GraniteSWA, Laguna:
    ``sigmoid(logsumexp(scores) − sink)``), is left out, as HF's ``output_attentions`` leaves it."""
    graph, env, layers = _copy_taking(gm, "layers")
    inputs = list(graph.find_nodes(op="placeholder"))
    patterns = []
    for index, attention in enumerate(components.attentions):
        core = attention.core[0]
        wanted = graph.call_function(operator.contains, (layers, index))
        if core.target in SDPA:
            args, kwargs = torch.fx.node.map_arg((core.args, core.kwargs), env.__getitem__)
            patterns.append(graph.call_function(sdpa_pattern, args, {**kwargs, "wanted": wanted}))
        else:
            weights = env[_weights_of_values(attention)]
            patterns.append(graph.call_function(as_pattern, (weights, inputs[0], wanted)))
    graph.output(tuple(patterns))
    return _pruned(gm, graph)


def _copy_taking(gm: GraphModule, name: str) -> tuple[Graph, dict[Node, Node], Node]:
    """A copy of ``gm``'s graph (without its output), the map from its nodes to the copy's, and one more input,
    ``name``, after the model's: what a reading of the model is asked for."""
    graph = Graph()
    env: dict[Node, Node] = {}
    graph.graph_copy(gm.graph, env)
    with graph.inserting_after(list(graph.find_nodes(op="placeholder"))[-1]):
        return graph, env, graph.placeholder(name)


def _weights_of_values(attention: Attention) -> Node:
    """The operand of a written-out core's last product that comes from its softmax: the attention weights."""
    softmax = next(n for n in attention.core if n.target in SOFTMAXES)
    product = max(n for n in attention.core if n.target in MATMULS)
    return next(a for a in product.args[:2] if a is softmax or softmax in ancestors(a))


def as_pattern(weights: torch.Tensor, input_ids: torch.Tensor, wanted: bool = True) -> torch.Tensor | None:
    """A core's weights as [B, heads, S_q, S_k], whether it laid heads out on their own axis or with the batch;
    None where not ``wanted`` (a layer the caller did not ask for)."""
    if not wanted:
        return None
    return weights.reshape(input_ids.shape[0], -1, *weights.shape[-2:])


def sdpa_pattern(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
                 dropout_p: float = 0.0, is_causal: bool = False, *, scale: float | None = None,
                 enable_gqa: bool = False, wanted: bool = True) -> torch.Tensor | None:
    """The weights ``scaled_dot_product_attention`` takes with these arguments (as its reference implementation
    spells them), [B, heads, S_q, S_k]; a query that may attend to no key (a padding row) gets zeros.  None where
    not ``wanted`` (a layer the caller did not ask for)."""
    if not wanted:
        return None
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    if enable_gqa:
        key = key.repeat_interleave(query.shape[-3] // key.shape[-3], -3)
    scores = query @ key.transpose(-2, -1)
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scale  # float32, float64 kept
    n_q, n_k = scores.shape[-2:]
    if is_causal:
        attn_mask = torch.ones(n_q, n_k, dtype=torch.bool, device=scores.device).tril()
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask
    return scores.softmax(-1).nan_to_num(0.0).to(query.dtype)


def build_sources(gm: GraphModule, components: Components) -> GraphModule:
    """What each head writes from each source position: ``(input_ids, attention_mask, heads) → writes``, one per
    attention layer in ``components.attentions`` order — [len(heads[layer]), S_k, B, S, d] in the stream's layout,
    the write of head ``heads[layer][i]`` (``a{layer}.h{h}``) made of what it reads at key position k — and None for
    a layer not in ``heads`` (a dict, layer → head indices): each head takes S_k passes through the output path.

    A head's output at a query position is its attention weights times its values, summed over the key positions,
    so it is the sum of one term per key position; the output path after the core (output gate, output
    projection, a norm of the write) is linear in the core's output once a norm's statistics are taken from the
    whole write (``SourceWrites``), so the head's write is the sum of the terms' writes."""
    graph, env, wanted = _copy_taking(gm, "heads")
    like = env[components.steps[0].start]
    writes = []
    for index, attention in enumerate(components.attentions):
        product = attention.core[0]  # where the weights multiply the values
        if product.target in SDPA:
            args, kwargs = torch.fx.node.map_arg((product.args, product.kwargs), env.__getitem__)
            weights, values = graph.call_function(sdpa_pattern, args, kwargs), args[2]
        else:
            weights, product = _weights_of_values(attention), max(n for n in attention.core if n.target in MATMULS)
            values = next(a for a in product.args[:2] if a is not weights)
            weights, values = env[weights], env[values]
        # from the product on (a sink's factor on the core's output, GraniteSWA's, is a constant of this path)
        write, externals = region_module(sorted(between(product, attention.terms)), product, tuple(attention.terms))
        split = SourceWrites(write, index, attention.n_heads, components.model_name, product)
        writes.append(graph.call_function(split, (wanted, weights, values, env[product], like,
                                                  *(env[n] for n in externals))))
    graph.output(tuple(writes))
    return _pruned(gm, graph)


class SourceWrites:
    """One attention layer's heads' writes, split by key position (``build_sources``).

    The product of the core's weights and values is split into one term per key position k,
    ``weights[..., k] · values[k]`` (their sum is checked against the product: a core that computes anything else
    is refused).  ``write``, the layer's path from the product to what it adds to the stream, has its norms'
    statistics frozen at the whole product (``norms.freeze_statistics``), so it is linear in the product beside its
    constants (the bias), and forward-mode differentiation at the whole product takes each term of one head through
    it alone.  A path that cannot be frozen is refused when a head of the layer is asked for, not before: patching
    does not need it."""

    def __init__(self, write: GraphModule, layer: int, n_heads: int, model_name: str, core: Node,
                 chunk_size: int = 64):
        self.__name__ = "source_writes"  # how FX names the node that calls it
        self.layer, self.n_heads, self.chunk_size = layer, n_heads, chunk_size
        self.model_name, self.core = model_name, core
        self.write, self.refusal = write, None
        try:
            self.write, _ = freeze_statistics(write, model_name, "the attention output's path to the stream")
        except DecompositionError as error:
            self.refusal = error

    def __call__(self, wanted: dict[int, list[int]], weights: torch.Tensor, values: torch.Tensor,
                 output: torch.Tensor, like: torch.Tensor, *externals) -> torch.Tensor | None:
        """The writes of the heads ``wanted[layer]`` asks for, by key position; None where it asks for none."""
        heads = wanted.get(self.layer)
        if heads is None:
            return None
        if self.refusal is not None:
            raise self.refusal
        if values.dim() == weights.dim() and values.shape[-3] != weights.shape[-3]:  # grouped keys and values
            values = values.repeat_interleave(weights.shape[-3] // values.shape[-3], -3)
        terms = weights.to(values.dtype).movedim(-1, 0)[..., None] * values.movedim(-2, 0)[..., None, :]
        self._check(terms, output)
        terms = terms.expand(-1, *output.shape).to(output.dtype)
        by_head = terms.reshape(terms.shape[0], like.shape[0], self.n_heads, -1)  # [S_k, B, heads, …]
        head_ids = torch.arange(self.n_heads, device=output.device)

        def one(key: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
            part = (by_head[key] * (head_ids == head).to(output.dtype)[:, None]).reshape(output.shape)
            written = torch.func.jvp(lambda out: self.write(out, *externals), (output,), (part,))[1]
            return sum(as_rows(term, like)[0] for term in written)

        keys, picks = torch.meshgrid(torch.arange(terms.shape[0]), torch.tensor(heads), indexing="xy")
        parts = torch.func.vmap(one, chunk_size=self.chunk_size)(keys.flatten().to(output.device),
                                                                 picks.flatten().to(output.device))
        return parts.reshape(len(heads), terms.shape[0], *like.shape)

    def _check(self, terms: torch.Tensor, output: torch.Tensor) -> None:
        """Refuse a core whose output is not the sum of ``terms`` [S_k, …]."""
        if terms.dim() - 1 > output.dim() or any(t not in (1, o) for t, o in zip(terms.shape[1:][::-1],
                                                                                  output.shape[::-1])):
            raise DecompositionError(self.model_name, self.core, f"the attention core's output {tuple(output.shape)} "
                                     f"is not laid out as its weights times its values {tuple(terms.shape[1:])}, so "
                                     "its heads' writes do not split by key position")
        scale = float(output.abs().max()) or 1.0
        error = float((terms.sum(0, dtype=torch.float64) - output).abs().max())
        if not error <= max(1e-3, 4 * torch.finfo(output.dtype).eps) * scale:  # bfloat16 rounds each term apart
            raise DecompositionError(self.model_name, self.core, f"the attention core's output is not its weights "
                                     f"times its values (they differ by {error:.2g} of {scale:.2g}), so its heads' "
                                     "writes do not split by key position")


def _pruned(gm: GraphModule, graph: Graph) -> GraphModule:
    """``graph``, a copy of ``gm``'s with an output of its own, without export's guards and asserts (``_dropped``)
    and what its output does not read, as a module with flat weights."""
    for node in [n for n in graph.nodes if _dropped(n)]:
        graph.erase_node(node)
    graph.eliminate_dead_code()
    return flat_module(gm, graph)


def rescaled(graph: Graph, env: dict[Node, Node], frame: Node | float, scale: Scale) -> Node:
    """``frame`` (the stream's scale so far, in ``graph``) carried past one more ``scale``."""
    factor = env[scale.factor] if isinstance(scale.factor, Node) else scale.factor
    return graph.call_function(operator.truediv if scale.divides else operator.mul, (frame, factor))


def as_scales(factors: list, like: torch.Tensor) -> torch.Tensor:
    """Numbers, one-element tensors and per-channel factors as [len(factors), d], in ``like``'s dtype and device
    (``like``: a stream, [..., d])."""
    return torch.stack([torch.as_tensor(f, dtype=like.dtype, device=like.device).reshape(-1).expand(like.shape[-1])
                        for f in factors])


def build_readout(gm: GraphModule, components: Components) -> GraphModule:
    """The stream's last reader alone — final norm, unembedding, soft-capping: ``stream [B, S, d] → logits``.

    The logit lens runs partial sums of the stream, or one node's output, through it.  What the readout takes
    from outside the stream (weights, and values computed from weights alone, such as Gemma's 1 + norm weight)
    is copied in.  The inputs' batch and sequence sizes (GPT-2 and OPT reshape by them) are the stream's own;
    a readout that needs anything else from the model's inputs cannot run on the stream and is refused."""
    graph = Graph()
    stream = graph.placeholder("stream")
    graph.output(_readout(graph, components, stream, lambda _, dim: graph.call_function(aten.sym_size.int,
                                                                                       (stream, dim))))
    return flat_module(gm, graph)


def _readout(graph: Graph, components: Components, stream: Node, input_size) -> Node:
    """Copy the final norm and unembedding into ``graph``, reading ``stream`` in place of the final residual
    stream; returns the logits.  Where they read the inputs' batch or sequence size (a node of the captured
    graph), ``input_size(node, dim)`` gives it; any other read of the inputs is refused (``build_readout``)."""
    env = {components.final: stream}

    def lookup(node: Node) -> Node:
        if node not in env:
            if node.target is aten.sym_size.int and node.args[0].op == "placeholder" and node.args[1] in (0, 1):
                env[node] = input_size(node, node.args[1])
            elif node.op == "placeholder":
                raise DecompositionError(components.model_name, node, "the final norm and unembedding read the "
                                         "model's inputs, not only the residual stream")
            else:
                env[node] = copy_node(graph, node, lookup)
        return env[node]

    for node in sorted(between(components.final, [components.logits])):
        env[node] = copy_node(graph, node, lookup)
    return env[components.logits]
