"""Stage 1 — capture: turn a Hugging Face causal LM into an exported ``torch.fx`` graph.

``torch.export`` (non-strict) records the model at the ATen level with a dynamic batch and sequence
dimension, so one capture serves every prompt length.  Some models need a concrete sequence length to be
traced at all — linear-attention layers (Qwen3.5, Qwen3-Next, Kimi Linear, OLMo hybrid, Nemotron-H) loop over
chunks of the sequence in Python — and those are captured once per length, each capture exact for its length
(``CircuitModel`` builds them as prompts of new lengths arrive).  We check up front that the model is a
decoder-only *causal* LM: everything downstream assumes position t only sees tokens ≤ t.
"""
from __future__ import annotations

import torch
from torch import nn


class CaptureError(ValueError):
    """The model cannot be captured as a causal decoder-only graph."""


class _LogitsOnly(nn.Module):
    """Calls the HF model the one way export understands: no KV cache, logits out."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _check_decoder_only(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    name = type(model).__name__
    if config is None:
        raise CaptureError(f"{name} has no `.config`: fxcircuits.trace expects a transformers causal-LM object "
                           "(e.g. from AutoModelForCausalLM.from_pretrained).")
    if getattr(config, "is_encoder_decoder", False):
        raise CaptureError(f"{name} is an encoder-decoder model; fxcircuits decomposes decoder-only causal LMs only. "
                           "Load a decoder-only checkpoint with AutoModelForCausalLM.")


EXAMPLE_LENGTH = 5


def example_inputs(model: nn.Module, length: int = EXAMPLE_LENGTH) -> tuple[torch.Tensor, torch.Tensor]:
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, vocab, (2, length), generator=generator).to(device)
    return input_ids, torch.ones_like(input_ids)


def _max_positions(config) -> int:
    """Longest sequence we export for: export needs a finite bound, and some models (GPT-Neo) guard against
    exactly ``max_position_embeddings``, so we stop one short of it.  ``config``: the language model's own (a
    multimodal model keeps it as its text config)."""
    for key in ("max_position_embeddings", "n_positions", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 3:
            return value - 1
    return 2**16


def export(model: nn.Module, length: int | None = None) -> tuple[torch.fx.GraphModule, int | None]:
    """Export ``model`` to an ATen-level GraphModule ``(input_ids, attention_mask) -> logits``.

    Returns it with the sequence length it is fixed to: ``None`` where one graph serves every length.  With
    ``length`` None the sequence dimension is dynamic if export can trace it so, and else fixed to
    ``EXAMPLE_LENGTH``; a given ``length`` fixes it there."""
    _check_decoder_only(model)
    model.eval()
    try:
        program = _export(model, length)
    except Exception as error:  # export raises many exception types; all mean "not traceable"
        if length is not None:
            raise _untraceable(model, error) from error
        try:  # the model's code needs a concrete sequence length (a Python loop over chunks of it)
            program, length = _export(model, EXAMPLE_LENGTH), EXAMPLE_LENGTH
        except Exception:
            raise _untraceable(model, error) from error
    # Functionalise (no in-place ops, no dropout) but keep linear/SDPA/layer_norm as single nodes.
    module = program.run_decompositions({}).module()
    _check_causal(module, model, length or EXAMPLE_LENGTH)
    return module, length


def _export(model: nn.Module, length: int | None) -> torch.export.ExportedProgram:
    batch = torch.export.Dim("batch", min=1, max=2**16)
    seq = torch.export.Dim("seq", min=2, max=_max_positions(model.config.get_text_config()))
    shapes = ({0: batch, 1: seq}, {0: batch, 1: seq}) if length is None else ({0: batch}, {0: batch})
    with torch.no_grad():
        # Guards that hold for every size but that export's solver cannot prove (CUDA stride checks, e.g.
        # Min(64*seq, 192*seq) == 64*seq) become runtime asserts instead of failing the capture.
        return torch.export.export(_LogitsOnly(model), example_inputs(model, length or EXAMPLE_LENGTH), strict=False,
                                   dynamic_shapes=shapes, prefer_deferred_runtime_asserts_over_guards=True)


def _untraceable(model: nn.Module, error: Exception) -> CaptureError:
    return CaptureError(f"torch.export could not trace {type(model).__name__}: {type(error).__name__}: "
                        f"{str(error).splitlines()[0] if str(error) else ''}. fxcircuits needs a model that "
                        "torch.export handles with use_cache=False.")


def _check_causal(module: torch.fx.GraphModule, model: nn.Module, length: int) -> None:
    """Changing the last token must leave every earlier position's logits untouched."""
    input_ids, attention_mask = example_inputs(model, length)
    changed = input_ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.get_input_embeddings().num_embeddings
    with torch.no_grad():
        before, after = module(input_ids, attention_mask), module(changed, attention_mask)
    if not torch.allclose(before[:, :-1], after[:, :-1], atol=1e-5, rtol=1e-4):
        raise CaptureError(f"{type(model).__name__} is not causal: changing the last token changed the logits at "
                           "earlier positions. fxcircuits decomposes causal (decoder-only) language models.")
