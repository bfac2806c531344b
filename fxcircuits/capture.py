"""Stage 1 — capture: turn a Hugging Face causal LM into an exported ``torch.fx`` graph.

``torch.export`` (non-strict) records the model at the ATen level with a dynamic batch and sequence
dimension, so one capture serves every prompt length.  Where the model's code needs more of the length than a
symbol gives — a hybrid's chunked scan (Qwen3.5's linear attention, a Mamba-2 layer) loops over chunks of the
sequence in Python — export records what the code assumed (one chunk) as runtime assertions on it, and the
capture serves the lengths that satisfy them (``Lengths``); ``CircuitModel`` captures again for a length none
of its captures serves.  We check up front that the model is a decoder-only *causal* LM: everything
downstream assumes position t only sees tokens ≤ t.  Code that recomputes state from the prompt's values as it runs
(HF's dynamic NTK RoPE) is captured at the state it keeps for the prompts we serve (``ropes_held``).
"""
from __future__ import annotations

import contextlib
import io
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import sympy
import torch
from torch import nn

from .functional import additive_masks, functional


class CaptureError(ValueError):
    """The model cannot be captured as a causal decoder-only graph."""


class _LogitsOnly(nn.Module):
    """Calls the HF model the one way export understands: no KV cache, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        tupled = getattr(self.model.config, "return_dict", True) is False  # a config set to return tuples
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                            **({"return_dict": True} if tupled else {}))
        if getattr(output, "logits", None) is None:
            raise CaptureError(f"{type(self.model).__name__} returns {type(output).__name__}, without logits: it is "
                               "a base model, without the language-model head whose logits circuits explain; load "
                               "the model with AutoModelForCausalLM")
        return output.logits


def _check_causal_lm(model) -> None:
    """Refuse what is no loaded decoder-only causal LM, saying what to pass instead: the usual slips are a hub id,
    ``load_model``'s (model, tokenizer) pair and weights still on the meta device (a base model without its head
    is found as it runs: ``_LogitsOnly``)."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None:
        hint = {str: "; for a hub id or folder, load it first: model, tokenizer = fxcircuits.load_model(name)",
                tuple: "; fxcircuits.load_model returns (model, tokenizer): pass the model"}.get(type(model), "")
        raise CaptureError(f"{name} has no `.config`: fxcircuits.trace expects a transformers causal-LM object "
                           f"(e.g. from AutoModelForCausalLM.from_pretrained){hint}.")
    if getattr(config, "is_encoder_decoder", False):
        raise CaptureError(f"{name} is an encoder-decoder model; fxcircuits decomposes decoder-only causal LMs only. "
                           "Load a decoder-only checkpoint with AutoModelForCausalLM.")
    meta = [n for n, p in model.named_parameters() if p.is_meta]
    if meta:
        raise CaptureError(f"{name} holds {len(meta)} parameters on the meta device, e.g. {meta[0]}: its weights "
                           "were never loaded (from_config under init_empty_weights?); load them before tracing.")


EXAMPLE_LENGTH = 5


def example_inputs(model: nn.Module, length: int = EXAMPLE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, length), generator=generator).to(device)
    return input_ids, torch.ones_like(input_ids)


def _max_positions(config) -> int:
    """Longest sequence we export for: export needs a finite bound, and the model's whole context is the one it
    was built for (a model whose code guards a shorter length has export narrow the range to it).  ``config``:
    the language model's own (a multimodal model keeps it as its text config)."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 3:
            return value
    return 2**16


def dynamic_ropes(model: nn.Module) -> list[tuple[nn.Module, list[str]]]:
    """HF's dynamic NTK rotary embeddings in ``model``, each with the prefixes of its dynamic frequency buffers:
    ``""`` for a module of one RoPE type, ``"{layer_type}_"`` for each dynamic type of a module that keeps one per
    kind of layer (``rope_type`` a dict).  Found by HF's convention that every rotary module shares
    (``modeling_rope_utils.dynamic_rope_update`` reads ``rope_type``), not per model."""
    found = []
    for module in model.modules():
        kinds = getattr(module, "rope_type", None)
        kinds = kinds if isinstance(kinds, dict) else {None: kinds}
        prefixes = [f"{kind}_" if kind else "" for kind, rope in kinds.items() if "dynamic" in str(rope)]
        if prefixes and hasattr(module, "original_max_seq_len"):
            found.append((module, prefixes))
    return found


def _longest(model: nn.Module) -> tuple[int, str]:
    """The longest prompt we capture ``model`` for, and why: its context (``_max_positions``), or one token short
    of where a dynamic NTK RoPE rescales its frequencies.  From that length on, HF's dynamic RoPE rotates by the
    frequencies of the longest prompt the module has run (it keeps them, and resets them only for a shorter
    prompt), so its logits depend on the model's history; below it, always on the original frequencies."""
    high, why = _max_positions(model.config.get_text_config()), "its context (max_position_embeddings)"
    for module, _ in dynamic_ropes(model):
        if module.original_max_seq_len - 1 < high:
            high = module.original_max_seq_len - 1
            why = (f"below the {module.original_max_seq_len} from which its dynamic NTK RoPE rescales its frequencies "
                   "by the longest prompt the model has run")
    return high, why


@contextlib.contextmanager
def ropes_held(model: nn.Module):
    """Dynamic NTK RoPE at its original frequencies while export runs.  HF's dynamic RoPE compares the prompt's
    largest position with the length it last rescaled for, a branch on the positions' values that export cannot
    follow; on the prompts we capture for (``_longest``) it always lands on the original frequencies.  So for the
    capture each dynamic module reads as the ``"default"`` type, which the update leaves alone, with its original
    frequencies in place; both given back afterwards."""
    held = []
    for module, prefixes in dynamic_ropes(model):
        held.append((module, module.rope_type, {p: getattr(module, f"{p}inv_freq") for p in prefixes}))
        kinds = module.rope_type
        module.rope_type = ({kind: "default" if "dynamic" in str(rope) else rope for kind, rope in kinds.items()}
                            if isinstance(kinds, dict) else "default")
        for prefix in prefixes:
            setattr(module, f"{prefix}inv_freq", getattr(module, f"{prefix}original_inv_freq"))
    try:
        yield
    finally:
        for module, rope_type, frequencies in held:
            module.rope_type = rope_type
            for prefix, inv_freq in frequencies.items():
                setattr(module, f"{prefix}inv_freq", inv_freq)


@dataclass(frozen=True)
class Lengths:
    """The prompt sizes one capture serves: the example length it was traced at, and what export recorded of the
    sequence dimension — a symbol in a range, with the conditions the model's code put on it (none for most
    models; "one chunk" for a chunked scan), or the example length alone where the code fixed it.  The graphs the
    rewrite builds drop export's runtime assertions, so a run checks here first which capture serves it."""
    example: int
    batch: sympy.Symbol | None
    seq: sympy.Symbol | None
    low: int
    high: int
    conditions: tuple[sympy.Basic, ...]

    def serve(self, batch: int, length: int) -> bool:
        if self.seq is None:
            return length == self.example
        if not self.low <= length <= self.high:
            return False
        sizes = {self.seq: sympy.Integer(length)}
        if self.batch is not None:
            sizes[self.batch] = sympy.Integer(batch)
        return all(condition.xreplace(sizes) is sympy.true for condition in self.conditions)


def export(model: nn.Module, length: int | None = None) -> tuple[torch.fx.GraphModule, Lengths]:
    """Export ``model`` to an ATen-level GraphModule ``(input_ids, attention_mask) -> logits``, traced on prompts
    of ``length`` tokens (``EXAMPLE_LENGTH`` by default), with the prompt lengths it serves."""
    _check_causal_lm(model)
    length = length or EXAMPLE_LENGTH
    high, why = _longest(model)
    if not 2 <= length <= high:
        raise ValueError(f"prompts of {length} tokens: fxcircuits captures {type(model).__name__} for prompts of "
                         f"up to {high} tokens, {why}")
    try:
        with evaluating(model), attributes_kept(model), ropes_held(model), partial_graph_unprinted():
            program = _export(model, length, high)
    except CaptureError:
        raise
    except Exception as error:  # export raises many exception types; all mean "not traceable"
        raise _untraceable(model, error) from error
    module = additive_masks(functional(program))
    _check_causal(module, model, length)
    return module, _lengths(module, program, length)


@contextlib.contextmanager
def evaluating(model: nn.Module):
    """``model`` in eval mode (no dropout in the capture), each module's own mode given back afterwards: the user's
    model is theirs, perhaps in the middle of training."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def attributes_kept(model: nn.Module):
    """The tensors ``model``'s modules hold as plain attributes, as they were before: code that caches a tensor on
    a module as it runs (HF's LongRoPE keeps ``long_inv_freq``) caches a fake one under export, which every later
    run of the model, and a second capture, would read."""
    kept = [(module, {k: v for k, v in vars(module).items() if isinstance(v, torch.Tensor)})
            for module in model.modules()]
    try:
        yield
    finally:
        for module, tensors in kept:
            now = {k for k, v in vars(module).items() if isinstance(v, torch.Tensor)}
            for key in now - tensors.keys():
                del module.__dict__[key]
            module.__dict__.update(tensors)


@contextlib.contextmanager
def partial_graph_unprinted():
    """What export writes to stderr, less the partial graph it prints when it fails: thousands of lines for a real
    model, above the one error that names the model's line to change."""
    written = io.StringIO()
    try:
        with contextlib.redirect_stderr(written):
            yield
    except Exception as error:
        graph = getattr(error, "partial_fx_graph", None)
        sys.stderr.write(written.getvalue().replace(f"{graph}\n", "") if graph else written.getvalue())
        raise
    sys.stderr.write(written.getvalue())


def _export(model: nn.Module, length: int, high: int) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=2**16)
    # AUTO: where the code needs more of the length than a symbol (a loop over chunks of it), export keeps the
    # symbol and asserts what the code assumed, or fixes the length, instead of failing
    seq = torch.export.Dim.AUTO(min=2, max=high)
    with torch.no_grad():
        # Guards that hold for every size but that export's solver cannot prove (CUDA stride checks, e.g.
        # Min(64*seq, 192*seq) == 64*seq) become runtime asserts instead of failing the capture.
        return torch.export.export(_LogitsOnly(model), example_inputs(model, length), strict=False,
                                   dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}),
                                   prefer_deferred_runtime_asserts_over_guards=True)


def _lengths(module: torch.fx.GraphModule, program: torch.export.ExportedProgram, example: int) -> Lengths:
    """What ``module`` assumes of its inputs' sizes: the symbols of ``input_ids``' shape, the sequence symbol's
    range, and every runtime assertion on the sizes alone that mentions it (one on a value computed from the data
    cannot be checked before the run)."""
    input_ids = next(n for n in module.graph.nodes if n.op == "placeholder")
    batch, seq = (size.node.expr if isinstance(size, torch.SymInt) else None for size in input_ids.meta["val"].shape)
    if seq is None:
        return Lengths(example, batch, None, example, example, ())
    bounds = program.range_constraints[seq]
    asserted = (node.args[0].meta.get("val") for node in module.graph.nodes
                if node.target is torch.ops.aten._assert_scalar.default)
    conditions = tuple(value.node.expr for value in asserted if isinstance(value, torch.SymBool)
                       and seq in (symbols := value.node.expr.free_symbols) and symbols <= {seq, batch})
    return Lengths(example, batch, seq, int(bounds.lower), int(bounds.upper), conditions)


def _untraceable(model: nn.Module, error: Exception) -> CaptureError:
    """Export's failure, with what to do where the cause is likely the attention kernel a model was loaded with
    (flex attention guards on data; flash attention's kernels are no ATen ops): SDPA and eager are the two that
    export traces and the engine reads."""
    implementation = getattr(model.config, "_attn_implementation", None)
    hint = "" if implementation in (None, "sdpa", "eager") else (
        f" It runs its attention with {implementation!r}: switch to 'sdpa' (or 'eager') before tracing, "
        "model.set_attn_implementation('sdpa'), or load it with attn_implementation='sdpa'.")
    calls = re.findall(r'File "([^"]+)", line (\d+), in (\S+)\n\s*(.*)', str(error))
    if calls:  # the model's own line export stopped at, which its message quotes (a branch on data, say)
        path, line, function, code = calls[-1]
        hint = f" It stopped at {Path(path).name}:{line} in {function}: `{code.strip()}`.{hint}"
    return CaptureError(f"torch.export could not trace {type(model).__name__}: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}. fxcircuits needs a model that "
                        f"torch.export handles with use_cache=False.{hint}")


def _check_causal(module: torch.fx.GraphModule, model: nn.Module, length: int) -> None:
    """Changing the last token must leave every earlier position's logits untouched.  Logits that are not finite
    (float16 overflowing) show nothing, and the probes that find the model's parts run on such prompts too: they
    are refused as what they are."""
    input_ids, attention_mask = example_inputs(model, length)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        before, after = module(input_ids, attention_mask), module(changed, attention_mask)
    if not (before.isfinite().all() and after.isfinite().all()):
        raise CaptureError(f"{type(model).__name__}'s logits are NaN or infinite on random prompts of {length} tokens "
                           f"in {next(model.parameters()).dtype} (float16 overflows where activations grow large), so "
                           "fxcircuits cannot probe its parts: load it in float32 or bfloat16, and trace it again")
    if not torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5, rtol=1e-4):
        raise CaptureError(f"{type(model).__name__} is not causal: changing the last token changed the logits at "
                           "earlier positions. fxcircuits decomposes causal (decoder-only) language models.")
