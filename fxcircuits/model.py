"""``fxcircuits.trace``: the traced model, callable like the HF model, with edge and node masks.

    cm = fxcircuits.trace(model)
    cm(input_ids, attention_mask)                                    # == model(...).logits
    cm(input_ids, attention_mask, corrupted_input_ids=c, edge_mask=m) # edges at 0 see the corrupted run
    cm(input_ids, attention_mask, corrupted_input_ids=c, node_mask={"m3": 0}, patch_positions=[5])  # ... there alone
    cm(input_ids, attention_mask, corrupted_input_ids=c, edge_mask=[m_s2, m_rest], mask_positions=w)  # one per span

A patched call costs one pass over the corrupted input and one over the clean input, whatever the mask — on
a GPU and without a gradient, both in one batched pass; an ``edge_mask`` of shape [n_masks, n_edges] evaluates
many masks in one call, which run the layers before the first reader any of them patches once for all.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from .caller import warn_at_caller
from .capture import Lengths, dynamic_ropes, example_inputs, export
from .components import (MLP, Attention, Components, DecompositionError, Step, check_scales, check_sides,
                         find_components)
from .graph import CircuitGraph, Writer
from . import heads
from .heads import record_values
from .patching import Scratch, Tap, class_keep, dense_keep, mask_weights, position_weights, where_per_mask
from .prefix import share_prefix
from .rewrite import (build_patcher, build_patterns, build_plain, build_readout, build_recorder, build_sources,
                      build_streams, plan_attention)


def trace(model: nn.Module, *, progress: bool = False) -> "CircuitModel":
    """Capture ``model`` (a transformers causal LM, any device and dtype) and split it into edges.

    ``progress`` shows the stages (tens of seconds for a 30-layer model, most of it in ``torch.export``).  A model
    whose capture serves some prompt lengths only (``capture.Lengths``: a hybrid's chunked scan serves the lengths
    of one chunk) is captured again, on first use, for a length none of its captures serves."""
    name = type(model).__name__
    with tqdm(total=3, desc=f"trace {name}", disable=not progress) as bar:
        bar.set_postfix_str("torch.export")
        exported, lengths = export(model)
        bar.update()
        try:
            engine = _build_engine(model, exported, lengths, bar)
        except DecompositionError as error:
            raise _with_adapter_hint(model, error)
    weights = TracedWeights(model, next(engine.exported.parameters()).device)
    return CircuitModel(name, engine, functools.partial(_capture_at, model), weights)


def _with_adapter_hint(model: nn.Module, error: DecompositionError) -> DecompositionError:
    """A refusal of a model carrying PEFT adapters, with what to do.  LoRA adds a low-rank path beside each adapted
    projection, so an adapted attention layer reads the stream (or writes it) through two projections, which no
    per-head split follows.  Merged into the weights, the adapters give the same model with plain projections."""
    if callable(getattr(model, "merge_and_unload", None)):
        error.args = (f"{error.args[0]}. The model carries adapters: merge them into its weights first, "
                      "model = model.merge_and_unload(), which computes the same function",)
    return error


def _build_engine(model: nn.Module, exported: torch.fx.GraphModule, lengths: Lengths,
                  bar: tqdm | None = None) -> "Engine":
    """Find the components of one exported graph and build what runs it; the probes run prompts of the length it
    was traced at."""
    name, inputs = type(model).__name__, example_inputs(model, lengths.example)
    if bar is None:
        bar = tqdm(disable=True)
    bar.set_postfix_str("components")
    components = find_components(exported, name)
    values = record_values(exported, *inputs)
    check_scales(components, values)
    check_sides(components, values, next(iter(exported.graph.find_nodes(op="placeholder"))))
    plans = [plan_attention(step, w, values, name) for step in components.steps for w in step.writers
             if isinstance(w, Attention)]
    bar.update()
    bar.set_postfix_str("rewrite")
    writers = [Writer("attention", w.layer, w.n_heads, i, _read_step(components, w, step)) if isinstance(w, Attention)
               else Writer("mlp", w.layer, 0, i, _read_step(components, w, step))
               for i, step in enumerate(components.steps) for w in step.writers]
    graph = CircuitGraph(writers, len(components.steps), components.final.meta["val"].shape[-1])
    recorder, patcher = build_recorder(exported, components, plans), build_patcher(exported, components, plans)
    shares_prefix = share_prefix(patcher, recorder, *inputs)
    bar.update()
    return Engine(build_plain(exported, components), recorder, patcher, build_readout(exported, components),
                  build_streams(exported, components), build_patterns(exported, components),
                  build_sources(exported, components), graph, shares_prefix,
                  lengths, [tuple(values[side].shape[2:]) for side in components.sides],
                  model.get_input_embeddings().num_embeddings)


def _read_step(components: Components, writer: Attention | MLP, step: Step) -> int | None:
    """The earlier step at which ``writer`` (of ``step``) reads, if any: the keys and values of an attention layer
    that reuses an earlier one's (KV sharing), the input of an MLP whose write is delayed."""
    read = writer.reads["k"] if isinstance(writer, Attention) else writer.read or step
    return None if read is step else next(i for i, s in enumerate(components.steps) if s is read)


def _capture_at(model: nn.Module, length: int) -> "Engine":
    return _build_engine(model, *export(model, length))


class TracedWeights:
    """The model's parameters, buffers and submodules as ``trace`` found them: whether they still are the ones the
    captures compute with.

    The captured graphs hold the model's own tensors, so a weight or buffer edited in place (``weight.mul_(0)``,
    ``weight.copy_(new)``) reaches every run.  A tensor replaced by another (a parameter assigned, or loaded with
    ``load_state_dict(..., assign=True)``; a buffer assigned; a submodule swapped, as ``merge_and_unload`` or
    pruning a layer does) does not: the captures would go on computing with the old one, a wrong answer with no
    error.  Nor does a model converted to another dtype (``.half()``, or its norms alone kept in fp32) or moved to
    another device: the captures keep the casts and device they were traced with.  ``check`` finds any of these
    before a run and names the tensor or module and what to do; it reads each slot and dtype (tens of µs a run),
    and the device the captures' own weights are on now: the model's, or copies of them where the
    ``CircuitModel`` itself was moved.  A buffer that is another tensor now (a forward that registers a buffer it
    recomputes afresh) is refused only where its values differ from those traced; a dynamic NTK RoPE's
    frequencies, which HF rescales for a prompt past the model's context, are not watched: the captures hold its
    original ones (``capture.ropes_held``).  ``device``: theirs at the trace."""

    def __init__(self, model: nn.Module, device: torch.device):
        self.model_name, self.device = type(model).__name__, device
        modules = list(model.named_modules())
        self.parameters = [(slot, slot[3].dtype, slot[3].device)
                           for slot in _slots(modules, "_parameters", "parameter")]
        rescaled = {(id(module._buffers), f"{prefix}inv_freq") for module, prefixes in dynamic_ropes(model)
                    for prefix in prefixes}
        self.buffers = [slot for slot in _slots(modules, "_buffers", "buffer")
                        if (id(slot[1]), slot[2]) not in rescaled]
        self.modules = _slots(modules, "_modules", "submodule")

    def check(self, device: torch.device) -> None:
        """Raise where the captures' weights are no longer on the device traced (they are on ``device``), or a
        submodule, parameter or buffer is no longer the one traced, or a parameter no longer in the dtype traced."""
        if device != self.device:
            raise RuntimeError(self._moved(self.device, device))
        for what, held, key, module in self.modules:
            if held.get(key) is not module:
                raise RuntimeError(self._replaced(what, "assigned, or swapped by merge_and_unload or a pruning tool"))
        for (what, held, key, tensor), dtype, traced_on in self.parameters:
            now = held.get(key)
            if now is not tensor or now.dtype is not dtype:
                raise RuntimeError(self._changed(what, now, dtype, traced_on))
        for what, held, key, tensor in self.buffers:
            now = held.get(key)
            if now is not tensor and not _same(now, tensor):
                raise RuntimeError(self._changed(what, now, tensor.dtype, tensor.device))

    def _changed(self, what: str, now: torch.Tensor | None, dtype: torch.dtype, device: torch.device) -> str:
        """What happened to ``what`` (a parameter or buffer, now ``now``, traced in ``dtype`` on ``device``), and
        what to do."""
        if now is not None and now.device != device:
            return self._moved(device, now.device, f" ({what})")
        if now is not None and now.dtype is not dtype:
            return (f"{self.model_name} was traced with its {what} in {dtype}, and it is now {now.dtype}; the "
                    "captured graphs keep the casts they were traced with, so call fxcircuits.trace(model) again "
                    "after converting the model (converting the traced model, cm.half() or cm.to(dtype), converts "
                    "the model too: they share their parameters)")
        return self._replaced(what, "assigned, or loaded with load_state_dict(..., assign=True)",
                              "change it in place (with torch.no_grad(): tensor.copy_(new)), or ")

    def _replaced(self, what: str, how: str, instead: str = "") -> str:
        return (f"{self.model_name}'s {what} is no longer the one fxcircuits.trace captured (it was replaced: {how}), "
                f"so the captured graphs would compute with the old one: {instead}call fxcircuits.trace(model) again")

    def _moved(self, traced: torch.device, now: torch.device, which: str = "") -> str:
        return (f"{self.model_name} was traced on {traced} and has since been moved to {now}{which}; the captured "
                "graphs keep their device, so call fxcircuits.trace(model) again on the device you want to run on")


def _slots(modules: list[tuple[str, nn.Module]], table: str, kind: str) -> list[tuple[str, dict, str, object]]:
    """Every entry of each module's ``table`` (``_parameters``, ``_buffers`` or ``_modules``): what it is (``kind``
    and its dotted name), the dict that holds it, its key there, and what it holds now."""
    return [(f"{kind} {prefix + '.' if prefix else ''}{key}", getattr(module, table), key, held)
            for prefix, module in modules for key, held in getattr(module, table).items() if held is not None]


def _same(now: torch.Tensor | None, traced: torch.Tensor) -> bool:
    """Whether a buffer that is another tensor now holds what the traced one holds (dtype, device, values)."""
    return (now is not None and now.dtype == traced.dtype and now.device == traced.device
            and now.shape == traced.shape and torch.equal(now, traced))


class Engine(nn.Module):
    """What runs one exported graph: the graph itself, the recording pass, the patcher, the readout (final norm
    and unembedding), the stepper (the stream after each writer, ``rewrite.build_streams``), the attention
    patterns (``rewrite.build_patterns``) and the heads' writes by key position (``rewrite.build_sources``); its
    ``graph`` of nodes and edges; ``shares_prefix``: whether its patcher can run the prefix that masks share once
    (``fxcircuits.prefix``); ``lengths``: the prompt sizes it serves; ``side_shapes``: each side input's shape after
    [batch, seq] (``components.MLP.sides``); ``vocab``: how many token ids its embedding holds."""

    def __init__(self, exported: nn.Module, recorder: nn.Module, patcher: nn.Module, readout: nn.Module,
                 stepper: nn.Module, patterns: nn.Module, sources: nn.Module, graph: CircuitGraph, shares_prefix: bool,
                 lengths: Lengths, side_shapes: list[tuple[int, ...]], vocab: int):
        super().__init__()
        self.exported, self.recorder, self.patcher, self.readout = exported, recorder, patcher, readout
        self.stepper, self.patterns, self.sources, self.graph = stepper, patterns, sources, graph
        self.shares_prefix, self.lengths = shares_prefix, lengths
        self.side_shapes, self.vocab = side_shapes, vocab


def _one_token_too(cut: Callable):
    """A method that takes prompts of one token, as the HF model does.  Export specialises sizes 0 and 1, so the
    captures serve prompts of two tokens and more: a batch of one-token prompts runs with its token (and its
    corrupted token, and its attention mask) repeated at a second position, which no earlier position of a causal
    model sees, and ``cut`` takes the first position of what the method returns.  Anything else — inconsistent
    shapes included, whose errors then name the shapes given — goes to the method as it is."""
    def wrap(method: Callable) -> Callable:
        @functools.wraps(method)
        def run(self, input_ids, attention_mask=None, **kwargs):
            given = (input_ids, attention_mask, kwargs.get("corrupted_input_ids"))
            if not (_one_token(input_ids) and all(t is None or _one_token(t) and t.shape == input_ids.shape
                                                  for t in given[1:])):
                return method(self, input_ids, attention_mask, **kwargs)
            twice = [None if t is None else torch.cat([t, t], 1) for t in given]
            if twice[2] is not None:
                kwargs["corrupted_input_ids"] = twice[2]
            for name, check in (("patch_positions", position_weights), ("mask_positions", mask_weights)):
                if kwargs.get(name) is not None:  # the second position is never patched
                    weights = check(kwargs[name], 1)
                    kwargs[name] = torch.cat([weights, torch.zeros_like(weights)], -1)
            return cut(method(self, twice[0], twice[1], **kwargs))
        return run
    return wrap


def _one_token(t) -> bool:
    return isinstance(t, torch.Tensor) and t.dim() == 2 and t.shape[1] == 1


def _first_position(out: torch.Tensor) -> torch.Tensor:
    """[…, seq, features] → […, 1, features]."""
    return out[..., :1, :]


class CircuitModel(nn.Module):
    """A traced causal LM whose edges can be patched.

    ``graph`` lists nodes and edges; ``activations`` returns every upstream node's output; calling the module
    with a mask runs the edge-patched model; ``readout`` maps a residual stream [B, S, d_model] to logits (the
    final norm and unembedding alone, for the logit lens); ``streams`` gives the stream itself after each writer;
    ``scratch`` keeps the memory patched runs on CPU write their rows and products into (``patching.Scratch``:
    ``cm.scratch.clear()`` frees it); ``side_shapes``: per side input (a value computed from the tokens beside the
    stream, which the ``input`` node's edge into its reader carries: Gemma 4's per-layer inputs), its shape after
    [batch, seq] — none for most models; ``shares_prefix``: whether masks evaluated in one call run the layers before
    the first reader they patch once for all (``fxcircuits.prefix``); ``weights``: the model's parameters as traced,
    checked before every run (``TracedWeights``: one replaced or converted since is refused with what to do).

    ``engines``: the captures, keyed by the prompt length each was traced at — one, unless the model's code
    needs more of the length than export's symbol (``capture.Lengths``); ``capture_at(length)`` captures it
    again, for prompts of a length no capture serves.  ``exported``, ``recorder``, ``patcher`` and ``readout`` are
    the modules of the first capture."""

    def __init__(self, model_name: str, engine: Engine, capture_at: Callable[[int], Engine], weights: TracedWeights):
        super().__init__()
        self.model_name, self.capture_at, self.weights = model_name, capture_at, weights
        self.engines = nn.ModuleDict({str(engine.lengths.example): engine})
        self._served: dict[tuple[int, int], Engine] = {}
        self.graph, self.shares_prefix, self.side_shapes = engine.graph, engine.shares_prefix, engine.side_shapes
        self.vocab = engine.vocab
        self.scratch = Scratch()

    def __repr__(self) -> str:
        return f"CircuitModel({self.model_name}, {self.graph})"

    @property
    def first(self) -> Engine:
        """The first capture: what any prompt length shares (the weights, the graph, the readout)."""
        return next(iter(self.engines.values()))

    @property
    def exported(self) -> nn.Module:
        """The program ``torch.export`` captured (the first capture's), unmodified: it holds the weights."""
        return self.first.exported

    @property
    def recorder(self) -> nn.Module:
        """The rewritten graph that returns every upstream node's output (``activations``), first capture's."""
        return self.first.recorder

    @property
    def patcher(self) -> nn.Module:
        """The rewritten graph that assembles every downstream input from its edges under a mask, first capture's."""
        return self.first.patcher

    @property
    def readout(self) -> nn.Module:
        """Logits from a residual stream [batch, seq, d_model]: the final norm and unembedding alone, which act on
        each position by itself, so the first capture's serve any number of positions (the logit lens reads one)."""
        return self.first.readout

    @property
    def device(self) -> torch.device:
        """Where the weights are, and so where inputs are taken to."""
        return next(self.exported.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype, which the model computes in."""
        return next(self.exported.parameters()).dtype

    def serving(self, input_ids: torch.Tensor) -> Engine | None:
        """The capture that serves a batch of ``input_ids``' shape, if one does."""
        size = tuple(input_ids.shape)
        if size not in self._served:
            engine = next((e for e in self.engines.values() if e.lengths.serve(*size)), None)
            if engine is None:
                return None
            self._served[size] = engine
        return self._served[size]

    def engine(self, input_ids: torch.Tensor) -> Engine:
        """What runs a batch of ``input_ids``' shape: the capture that serves its length, or a new one, captured
        here at that length (with a warning: that took about as long as ``trace``)."""
        engine = self.serving(input_ids)
        if engine is not None:
            return engine
        length = input_ids.shape[1]
        if length < 2:
            raise ValueError("no capture serves prompts of one token (export specialises that size): cm(...) and "
                             "the methods that give values per position (activations, streams, patterns, …) take "
                             "them, running the token at a second position too; elsewhere, pad them on the right "
                             "to two tokens, with attention_mask 0")
        engine = self.capture_at(length)
        if engine.graph.edges != self.graph.edges:
            raise RuntimeError(f"{self.model_name} captured at {length} tokens has other nodes or edges than at "
                               f"{self.first.lengths.example}: pad the prompts to a length a capture serves")
        if not engine.lengths.serve(*input_ids.shape):
            raise RuntimeError(f"{self.model_name} captured at {length} tokens does not serve a batch of "
                               f"{input_ids.shape[0]} prompts of that length")
        warn_at_caller(f"captured {self.model_name} again for prompts of {length} tokens, which no capture so far "
                        "served (its code loops over the sequence in Python, by chunks or by positions), in about the "
                        "time trace took; attribution and evaluation pad a dataset's batches to a length one capture "
                        "serves")
        self.engines[str(length)] = engine
        self._served[tuple(input_ids.shape)] = engine
        return engine

    def inputs(self, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids and attention mask as the capture takes them — int64, on its device, the mask all ones where
        None — checked: what every run of this model, and every attribution batch, goes through."""
        self.weights.check(self.device)
        input_ids = self._tokens(input_ids, "input_ids")
        if input_ids.dim() != 2 or 0 in input_ids.shape:
            raise ValueError(f"input_ids must be [batch, seq] with at least one prompt of one token, got shape "
                             f"{tuple(input_ids.shape)}")
        self._check_vocab(input_ids, "input_ids")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}")
        # as HF reads a [batch, seq] mask of any dtype (non-zero: attended), and as the capture took it (int64)
        attention_mask = attention_mask.to(self.device)
        return input_ids, attention_mask if attention_mask.dtype == torch.long else attention_mask.bool().long()

    def _tokens(self, ids, name: str) -> torch.Tensor:
        """Token ids on the capture's device and in its dtype (int64: a tokenizer may hand int32)."""
        if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(f"{name} must be a tensor of token ids, [batch, seq], as tokenizer(..., "
                            f"return_tensors='pt') gives; got {type(ids).__name__}"
                            f"{f' of {ids.dtype}' if isinstance(ids, torch.Tensor) else ''}")
        return ids.to(self.device, torch.long)

    def _check_vocab(self, ids: torch.Tensor, name: str) -> None:
        """Token ids the embedding holds: the embedding's own error (an IndexError deep in the captured graph, or a
        device assert on CUDA) says neither which ids nor why, and the likely cause is another model's tokenizer."""
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one wait for the device
        if low < 0 or high >= self.vocab:
            raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside {self.model_name}'s vocabulary "
                             f"of {self.vocab} ids (0 to {self.vocab - 1}): were the prompts tokenized by this "
                             "model's tokenizer?")

    def activations(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Every upstream node's output, [n_upstream, batch, seq, d_model] in ``graph.upstream`` order: what it adds
        to the stream, in the stream's scale at the first layer where the model rescales it (``stream_scales``)."""
        return torch.cat(self.groups(input_ids, attention_mask))

    @_one_token_too(lambda groups: [_first_position(g) for g in groups])
    def groups(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Upstream outputs as the patcher takes them: one tensor per writer (``input``, a layer's heads, an MLP)."""
        return self.recording(input_ids, attention_mask)[0][:len(self.graph.group_sizes)]

    @_one_token_too(lambda sides: [s[:, :1] for s in sides])
    def side_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Each side input's value, [batch, seq, …] (``side_shapes``): what the ``input`` node's edge into its reader
        carries beside the stream.  Empty for a model without side inputs."""
        return [s[0] for s in self.recording(input_ids, attention_mask)[0][len(self.graph.group_sizes):]]

    def streams(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream after ``input`` and after each writer (a layer's heads, an MLP), as the model holds
        it: [1 + n_writers, batch, seq, d_model].  Partial sums of ``activations`` miss what the stream carries and
        no node writes (an output projection's bias)."""
        return self.streams_and_scales(input_ids, attention_mask)[0]

    def stream_scales(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[1 + n_writers, d_model]: how far the model has scaled its whole stream, per channel, at each of
        ``streams`` — ones, unless it rescales the stream between layers (Gemma 4's ``layer_scalar``) or scales the
        residual it carries into a sum by a constant (``x·α + f(x)``, α one number or one per channel).  Node outputs
        (``activations``) are in the stream's scale at the first layer, so the stream after a writer is its scale
        times the outputs of the nodes so far plus what no node writes."""
        return self.streams_and_scales(input_ids, attention_mask)[1]

    @_one_token_too(lambda both: (_first_position(both[0]), both[1]))
    def streams_and_scales(self, input_ids: torch.Tensor,
                           attention_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``streams`` and ``stream_scales`` from one pass (the stepper computes both)."""
        input_ids, attention_mask = self.inputs(input_ids, attention_mask)
        return self.engine(input_ids).stepper(input_ids, attention_mask)

    @_one_token_too(lambda layers: [None if w is None else w[..., :1, :1] for w in layers])
    def patterns(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 layers: Iterable[int] | None = None) -> list[torch.Tensor | None]:
        """Where every head's queries attend: per attention layer ``a{l}``, [batch, heads, seq_q, seq_k], head h
        being ``a{l}.h{h}`` — the softmax over the keys of the model's own run, as HF's ``output_attentions`` gives
        it (``rewrite.build_patterns``).  A padding query that may attend to nothing gets a row of zeros.
        ``layers``: the attention layers to give (all where None; the others are None), since each takes seq²
        values a head."""
        input_ids, attention_mask = self.inputs(input_ids, attention_mask)
        wanted = self._attention_layers(range(self.graph.n_layers) if layers is None else layers)
        return list(self.engine(input_ids).patterns(input_ids, attention_mask, wanted))

    @torch.no_grad()
    @_one_token_too(lambda layers: [None if w is None else w[:, :1, :, :1] for w in layers])
    def sources(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                heads: dict[int, list[int]]) -> list[torch.Tensor | None]:
        """What heads write from each key position: per attention layer ``a{l}`` in ``heads`` (layer → head indices),
        [len(heads[l]), seq_k, batch, seq, d_model] — head ``heads[l][i]``'s write made of its attention weight on
        key position k times its value there, in the stream's scale at that layer; they sum over k to the head's
        write (``rewrite.build_sources``).  None for the other layers.  Each head takes seq_k passes through its
        layer's output path."""
        input_ids, attention_mask = self.inputs(input_ids, attention_mask)
        self._attention_layers(heads)
        counts = {w.layer: w.n_heads for w in self.graph.writers if w.kind == "attention"}
        for layer, indices in heads.items():
            n = counts.get(layer, 0)
            unknown = [h for h in indices if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < n]
            if unknown:
                has = f"its heads are 0 to {n - 1} (a{layer}.h0 to a{layer}.h{n - 1})" if n else "it has no heads"
                raise ValueError(f"no head {unknown[0]!r} in a{layer}: {has}")
        return list(self.engine(input_ids).sources(input_ids, attention_mask, dict(heads)))

    def _attention_layers(self, layers: Iterable[int]) -> set[int]:
        """``layers`` as a set, each checked to be one of the attention layers (an int)."""
        wanted = set(layers)
        unknown = sorted(wanted - set(range(self.graph.n_layers)), key=repr)
        if unknown:
            raise ValueError(f"no attention layer {unknown[0]!r}: {self.model_name} has {self.graph.n_layers}, "
                             f"numbered 0 to {self.graph.n_layers - 1} (a0 to a{self.graph.n_layers - 1})")
        return wanted

    def recording(self, input_ids: torch.Tensor,
                  attention_mask: torch.Tensor | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The recording pass: the other run as ``patched`` takes it — ``groups()`` followed by ``side_inputs()``,
        each as [1, batch, …] — and the output of every attention layer's q, k and v projections (and of its output
        gate's), which a patched run reads for the heads whose every edge it patches from this run."""
        input_ids, attention_mask = self.inputs(input_ids, attention_mask)
        return self.engine(input_ids).recorder(input_ids, attention_mask)

    @_one_token_too(_first_position)
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                corrupted_input_ids: torch.Tensor | None = None, edge_mask=None, node_mask=None,
                corrupted_activations: torch.Tensor | None = None,
                corrupted_side_inputs: list[torch.Tensor] | None = None, patch_positions=None,
                mask_positions=None) -> torch.Tensor:
        """Logits; with ``edge_mask``/``node_mask``, logits of the edge-patched run.

        ``edge_mask``: tensor in ``graph.edges`` order ([E], or [n_masks, E] to evaluate several masks at once,
        giving logits [n_masks, batch, seq, vocab]), ``{edge_name: value}`` (missing edges = 1), or a ``Circuit``.
        ``node_mask``: tensor over ``graph.upstream`` or ``{node_name: value}``; a node at 0 sends its other-run
        output along all its outgoing edges.  The other run is ``corrupted_input_ids`` (same shape as
        ``input_ids``), or ``corrupted_activations`` (e.g. zeros or means of ``activations(...)`` for zero or mean
        ablation, [n_upstream, batch or 1, seq or 1, d_model]); with ``corrupted_activations``, a model with side
        inputs (``side_shapes``) takes their values too, ``corrupted_side_inputs`` (e.g. zeros, or means of
        ``side_inputs(...)``), each broadcastable to [batch, seq, …].  The corrupted prompt's run is recorded
        without a gradient, a constant as patching takes it (a backward through it would double the cost of every
        mask gradient): a gradient for the model's weights comes through the clean run alone, and one through both
        takes ``corrupted_activations=activations(corrupted)`` recorded with gradients.

        ``patch_positions``: where the masks apply (elsewhere every edge is kept): position indices, the same for
        every prompt, or bool/float weights over the positions, [seq], [batch, seq] or [n_masks, batch, seq]
        (``patching.position_weights``).  Weights per mask with one mask given evaluate it at each of them: a
        node's effect position by position, in one call.

        ``mask_positions``: a mask with one class per part of the prompt — a positional circuit, whose edges are kept
        at some tokens and patched at others.  Weights [classes, seq], [classes, batch, seq] or [n_masks, classes,
        batch, seq] say where each class applies (``data.position_classes`` makes them from a batch's spans);
        ``edge_mask``/``node_mask`` then hold one mask per class: [classes, n], [n_masks, classes, n], or a list of
        ``classes`` masks of any form above.  At a position, an edge's mask is 1 − Σ_c w_c · (1 − m_c)."""
        input_ids, attention_mask = self.inputs(input_ids, attention_mask)
        given = corrupted_input_ids, corrupted_activations, patch_positions, mask_positions
        if edge_mask is None and node_mask is None:
            if any(g is not None for g in given):
                raise ValueError("a corrupted run or positions were given but no edge_mask or node_mask says what "
                                 "to patch (the run would be the clean one): pass edge_mask= (0 patches an edge) or "
                                 "node_mask=, or drop them for the clean logits")
            return self.engine(input_ids).exported(input_ids, attention_mask)
        keep, where = self._keep(edge_mask, node_mask, patch_positions, mask_positions, input_ids.shape[1])
        if corrupted_input_ids is not None and corrupted_activations is None and self.runs_alongside():
            logits = self.patched_alongside(input_ids, attention_mask, self._corrupted(input_ids, corrupted_input_ids),
                                            keep, where)
        else:
            other, recorded = self._other_run(input_ids, attention_mask, corrupted_input_ids, corrupted_activations,
                                              corrupted_side_inputs)
            logits = self.patched(input_ids, attention_mask, other, keep, recorded=recorded, where=where)
        masks = 2 if mask_positions is None else 3  # a mask tensor's dimensions when it holds many masks
        batched = (any(isinstance(m, torch.Tensor) and m.dim() == masks for m in (edge_mask, node_mask))
                   or where is not None and where.dim() == masks + 1)
        return logits if batched else logits[0]

    def _keep(self, edge_mask, node_mask, patch_positions, mask_positions,
              seq: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward``'s masks as the patcher's block, and the weights of the positions where they apply."""
        if mask_positions is not None:
            if patch_positions is not None:
                raise ValueError("give patch_positions (where every mask applies) or mask_positions (where each class "
                                 "of a positional mask applies), not both: a class weighted by some positions alone "
                                 "does what patch_positions does")
            where = mask_weights(mask_positions, seq).to(self.device)
            classes = where.shape[0 if where.dim() == 2 else -3]
            keep = class_keep(self.graph, edge_mask, node_mask, classes, device=self.device)
        else:
            keep = dense_keep(self.graph, edge_mask, node_mask, device=self.device)
            where = None if patch_positions is None else position_weights(patch_positions, seq).to(self.device)
        if where is not None and where.dim() == keep.dim() and keep.shape[0] == 1:  # weights per mask: one mask each
            keep = keep.expand(where.shape[0], *keep.shape[1:])
        return keep, where

    def patched(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, other: list[torch.Tensor],
                keep: torch.Tensor, tap: Tap | None = None, recorded: list[torch.Tensor] | None = None,
                positions: torch.Tensor | None = None, where: torch.Tensor | None = None) -> torch.Tensor:
        """The patcher as attribution methods drive it: logits [n_masks, batch, seq, vocab].

        ``other``: the other run's outputs per writer group (``groups()``), [n, batch or 1, seq, d_model] (one
        batch serves every mask, and is never copied per mask), or [n, n_masks·batch, …] where each mask has its
        own, followed by its side inputs as [1, batch, …] likewise (``recording()[0]`` is such a list); ``keep``:
        [n_masks, n_upstream, n_downstream] as ``patching.dense_keep`` builds it (or with a class axis after the
        masks', ``patching.class_keep``); ``tap``: a
        ``patching.Tap`` to score every edge in the backward pass; ``recorded``: where ``other`` is a recorded run
        of this batch, its projections (``recording()[1]``), from which the heads that read that run alone take
        theirs instead of computing them again; ``positions``: LongTensor [batch], one position per prompt, for
        the logits there alone, [n_masks, batch, 1, vocab] — the final norm and unembedding (a fifth of SmolLM2's
        forward) then run on one position per prompt, all that a metric reading one position needs; ``where``: the
        positions the masks patch (``patching.position_weights``), or each class of them (``patching.mask_weights``),
        all of them where None."""
        if positions is not None:
            _check_positions(positions, input_ids)
        n, prefix = keep.shape[0], self._prefix(keep, input_ids)
        where = None if where is None else where_per_mask(where, keep, input_ids.shape[0])
        if n > 1 and not prefix:
            input_ids, attention_mask = input_ids.repeat(n, 1), attention_mask.repeat(n, 1)
        return self._patch(input_ids, attention_mask, other, keep, tap, recorded, positions=positions, prefix=prefix,
                           where=where)

    def _prefix(self, keep: torch.Tensor, input_ids: torch.Tensor) -> bool:
        """Whether a call with ``keep`` runs its shared prefix once (``fxcircuits.prefix``): for several masks, unless
        the mask needs a gradient — that is one per mask, from every mask's own rows.  A tap sums its gradients over
        the masks, so it reads the shared rows as it reads every mask's (EAP-IG-activations moves one writer at a
        time: the layers before it are shared by its integration steps)."""
        return (self.shares_prefix and self.engine(input_ids).shares_prefix and keep.shape[0] > 1
                and not keep.requires_grad)

    def runs_alongside(self) -> bool:
        """Whether a patched call runs the corrupted prompts in the patched pass itself (``patched_alongside``):
        without a gradient, on an accelerator.  There a model this size is bound by launches, and one pass for
        both runs halves them.  On CPU arithmetic sets the pace, and the corrupted run recorded apart serves
        better: the heads that read it alone (in a circuit, a third to a half of the q, k and v inputs) take its
        projections instead of computing their own, and no head computes its own q, k and v for it."""
        return not torch.is_grad_enabled() and heads.launch_bound(self.device)

    def patched_alongside(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          corrupted_input_ids: torch.Tensor, keep: torch.Tensor,
                          where: torch.Tensor | None = None) -> torch.Tensor:
        """``patched`` with the corrupted run computed in the same pass, without gradient: the corrupted prompts
        ride in the batch ahead of the patched ones, and every operation serves both runs.  Where the host sets
        the pace (a model this size on a GPU) that halves the operations a patched call launches; ``forward``
        takes this path where ``runs_alongside()``."""
        copies = 1 if self._prefix(keep, input_ids) else keep.shape[0]
        where = None if where is None else where_per_mask(where, keep, input_ids.shape[0])
        input_ids = torch.cat([corrupted_input_ids, input_ids.repeat(copies, 1)])
        return self._patch(input_ids, attention_mask.repeat(copies + 1, 1), None, keep, None, None, ahead=True,
                           prefix=copies < keep.shape[0], where=where)

    def _patch(self, input_ids, attention_mask, other, keep, tap, recorded, ahead: bool = False,
               positions: torch.Tensor | None = None, prefix: bool = False,
               where: torch.Tensor | None = None) -> torch.Tensor:
        with self.scratch.lend() as scratch:
            logits = self.engine(input_ids).patcher(input_ids, attention_mask, other, keep, tap, recorded, scratch,
                                                    ahead, positions, prefix, where)
        return logits.reshape(keep.shape[0], -1, *logits.shape[1:])

    def _other_run(self, input_ids, attention_mask, corrupted_input_ids, corrupted_activations,
                   corrupted_side_inputs) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if (corrupted_input_ids is None) == (corrupted_activations is None):
            raise ValueError("a masked run needs exactly one of corrupted_input_ids (patch from a corrupted prompt) or "
                             "corrupted_activations (zero / mean ablation values)")
        if corrupted_activations is not None:
            if not isinstance(corrupted_activations, torch.Tensor):
                raise TypeError("corrupted_activations is one tensor [n_upstream, batch, seq, d_model], as "
                                f"activations() returns, not a {type(corrupted_activations).__name__}")
            shape, (batch, seq) = tuple(corrupted_activations.shape), input_ids.shape
            n, width = len(self.graph.upstream), self.graph.d_model
            fits = len(shape) == 4 and (shape[0], shape[3]) == (n, width)
            if not (fits and shape[1] in (1, batch) and shape[2] in (1, seq)):
                raise ValueError(f"corrupted_activations have shape {shape}; expected [{n}, {batch} (the batch) or 1, "
                                 f"{seq} (the sequence) or 1, {width}] as activations() returns")
            if not torch.isfinite(corrupted_activations).all():
                raise ValueError("corrupted_activations contain NaN or infinite values")
            groups = list(corrupted_activations.to(self.device).split(self.graph.group_sizes))
            return groups + self._side_values(corrupted_side_inputs, input_ids), None
        if corrupted_side_inputs is not None:
            raise ValueError("corrupted_side_inputs go with corrupted_activations; a corrupted prompt brings its own")
        with torch.no_grad():
            return self.recording(self._corrupted(input_ids, corrupted_input_ids), attention_mask)

    def _side_values(self, values: list[torch.Tensor] | None, input_ids: torch.Tensor) -> list[torch.Tensor]:
        """The side inputs' ablation values, checked, in the layout ``patched`` takes ([1, …])."""
        if not self.side_shapes:
            if values:
                raise ValueError(f"{self.model_name} reads no side inputs: drop corrupted_side_inputs")
            return []
        if values is None:
            raise ValueError(f"{self.model_name} reads {len(self.side_shapes)} side input(s) computed from the tokens "
                             "beside the residual stream (such as Gemma 4's per-layer inputs), which the input node's "
                             "edges carry: with corrupted_activations, pass corrupted_side_inputs too (e.g. zeros, or "
                             "means of cm.side_inputs(...))")
        batch, seq = input_ids.shape
        if len(values) != len(self.side_shapes):
            raise ValueError(f"corrupted_side_inputs holds {len(values)} tensors; {self.model_name} reads "
                             f"{len(self.side_shapes)} side inputs (cm.side_shapes)")
        for value, shape in zip(values, self.side_shapes):
            expected = (batch, seq, *shape)
            if value.dim() != len(expected) or any(v not in (1, e) for v, e in zip(value.shape, expected)):
                raise ValueError(f"a corrupted side input has shape {tuple(value.shape)}; expected one broadcastable "
                                 f"to {expected} as side_inputs() returns")
            if not torch.isfinite(value).all():
                raise ValueError("corrupted_side_inputs contain NaN or infinite values")
        return [value.to(self.device)[None] for value in values]

    def _corrupted(self, input_ids: torch.Tensor, corrupted_input_ids: torch.Tensor) -> torch.Tensor:
        corrupted_input_ids = self._tokens(corrupted_input_ids, "corrupted_input_ids")
        if corrupted_input_ids.shape != input_ids.shape:
            raise ValueError(f"clean input_ids have shape {tuple(input_ids.shape)} but corrupted_input_ids have "
                             f"{tuple(corrupted_input_ids.shape)}: patching needs clean and corrupted prompts of the "
                             "same token length; pad them to a common length (and pass the attention_mask) or drop "
                             "the pairs that tokenize differently")
        self._check_vocab(corrupted_input_ids, "corrupted_input_ids")
        return corrupted_input_ids


def _check_positions(positions: torch.Tensor, input_ids: torch.Tensor) -> None:
    """Shape, dtype and device; not the values, which would wait for the device on every call (``runs.prepare``
    checks them once per batch)."""
    batch = input_ids.shape[0]
    if positions.shape != (batch,) or positions.dtype != torch.long:
        raise ValueError(f"positions must be a LongTensor [{batch}] (one position per prompt), got "
                         f"{positions.dtype} {tuple(positions.shape)}")
    if positions.device != input_ids.device:
        raise ValueError(f"positions are on {positions.device} but input_ids on {input_ids.device}")
