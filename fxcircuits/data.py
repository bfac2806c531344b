"""Batches of clean/corrupted prompt pairs, in the one format every attribution function reads.

A batch is a dict of tensors:

- ``"clean"`` LongTensor [B, S] and ``"corrupted"`` LongTensor [B, S]: token ids, aligned token by token
  (patching swaps activations position by position, so the two prompts of a pair must have equal lengths);
- ``"attention_mask"`` [B, S], 1 on real tokens (left or right padding), shared by clean and corrupted;
- ``"correct"`` LongTensor [B, K] and ``"incorrect"`` LongTensor [B, K']: answer token ids padded with -1;
- optionally ``"position"`` LongTensor [B], the position whose next-token prediction is scored (default: the
  last real token, see :func:`fxcircuits.metrics.answer_position`), and ``"clean_logits"`` [B, V] for metrics
  that compare with the clean run. Other keys are allowed and ignored; :func:`make_batches` adds ``"index"``
  LongTensor [B], each row's example number in its input lists (so dropped examples can be traced);
- optionally ``"spans"``, a dict from a name to a LongTensor [B, 2]: each example's token range [start, stop) that
  plays that role (IOI's ``"S2"``, the subject's second mention).  Prompts of different templates put a role at
  different positions; spans line them up, so that effects by position can be compared and averaged across a
  batch (``fxcircuits.patch_by_position(..., spans=True)``).
"""
from __future__ import annotations

from typing import Iterable, Mapping, Sequence

import torch

from . import heads
from .caller import warn_at_caller
from .graph import names as name_list

Answers = Sequence[Sequence[str]] | Sequence[str]
Spans = Mapping[str, tuple[int, int]]  # a name → the character range [start, stop) of a prompt it covers


def make_batches(tokenizer, clean: Sequence[str], corrupted: Sequence[str], correct: Answers,
                 incorrect: Answers, *, batch_size: int = 8, padding_side: str = "right",
                 drop_mismatched: bool = False, labels: Sequence[str] | None = None,
                 spans: Sequence[Spans] | None = None) -> list[dict]:
    """Tokenize prompt pairs and their answers into batch dicts of at most ``batch_size`` examples.

    ``correct[i]`` / ``incorrect[i]`` are the answers of example ``i``: one string or a list of strings.
    An answer is scored as the next token after the clean prompt, so it is written as the text that follows
    the prompt, leading space included (``" Mary"``, not ``"Mary"``). It is tokenized *in context* (prompt +
    answer, minus the prompt's tokens), which gets the leading space right for byte-level BPE tokenizers
    (SmolLM2, GPT-2) and SentencePiece ones alike. An answer that tokenizes to several tokens is scored by its
    first token only; answers sharing a first token are counted once, and a first token that is both correct
    and incorrect is an error, since no next-token metric could tell them apart.

    Prompts are tokenized with the tokenizer's own special tokens (a BOS where the tokenizer adds one;
    SmolLM2's GGUF tokenizer adds none), as the model saw them in training. Tokenizers without a pad token
    (or with one added past their vocabulary, which the model may not embed) pad with EOS; padded positions are
    masked, so the id does not matter. Right padding (the default) keeps
    every real token at the position it has unpadded, so models that number positions from the first slot
    give exactly the unpadded logits.

    A pair whose clean and corrupted prompts tokenize to different lengths raises ``ValueError`` naming the
    example, both token counts and tokens; with ``drop_mismatched=True`` such pairs are dropped and reported
    in a warning instead. ``labels[i]`` names example ``i`` in messages (default ``"example i"``).

    ``spans[i]``, if given, names parts of example ``i``'s clean prompt by their character ranges, ``{"S2": (37,
    41)}``; every example names the same parts.  Each becomes the tokens it overlaps, ``batch["spans"]`` (see the
    module's docstring).  It needs a tokenizer that reports offsets (a fast one).
    """
    if isinstance(clean, str) or isinstance(corrupted, str):
        raise TypeError("clean and corrupted are lists of prompts, one per example; got a single string (for one "
                        "pair: [clean], [corrupted], [correct], [incorrect])")
    if isinstance(correct, str) or isinstance(incorrect, str):  # else read as one answer per character
        raise TypeError("correct and incorrect are lists of answers, one per example (each a string or a list of "
                        "strings); got a single string (the same answers for every example: [answer] * n)")
    n = len(clean)
    if n == 0:
        raise ValueError("no prompt pairs given: a task needs at least one example")
    if not is_count(batch_size):
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    optional = {name: len(given) for name, given in (("labels", labels), ("spans", spans)) if given is not None}
    if not (len(corrupted) == len(correct) == len(incorrect) == n) or any(k != n for k in optional.values()):
        raise ValueError(f"clean, corrupted, correct, incorrect (and labels and spans, if given) must have one entry "
                         f"per example; got lengths {n}, {len(corrupted)}, {len(correct)}, {len(incorrect)}"
                         + "".join(f", {k} ({name})" for name, k in optional.items()))
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    labels = list(labels) if labels is not None else [f"example {i}" for i in range(n)]
    _check_appends_nothing(tokenizer)
    clean_ids, corrupted_ids = _encode(tokenizer, clean), _encode(tokenizer, corrupted)
    keep = _aligned(tokenizer, clean_ids, corrupted_ids, labels, drop_mismatched)
    if not keep:
        raise ValueError(f"no prompt pairs to batch ({n} given, {n - len(keep)} dropped as mismatched)")
    prompts, labels = [clean[i] for i in keep], [labels[i] for i in keep]
    clean_ids, corrupted_ids = [clean_ids[i] for i in keep], [corrupted_ids[i] for i in keep]
    correct_ids, incorrect_ids = (
        _answer_ids(tokenizer, prompts, [_as_list(answers[i]) for i in keep], labels, kind)
        for answers, kind in ((correct, "correct"), (incorrect, "incorrect")))
    _check_disjoint(tokenizer, labels, correct_ids, incorrect_ids)
    token_spans = _token_spans(tokenizer, prompts, [spans[i] for i in keep], labels) if spans is not None else None
    pad = _pad_id(tokenizer)
    batches = []
    for start in range(0, len(prompts), batch_size):
        rows = slice(start, start + batch_size)
        batch = {
            "clean": _pad(clean_ids[rows], pad, padding_side),
            "corrupted": _pad(corrupted_ids[rows], pad, padding_side),
            "attention_mask": _pad([[1] * len(ids) for ids in clean_ids[rows]], 0, padding_side),
            "correct": _pad(correct_ids[rows], -1, "right"),
            "incorrect": _pad(incorrect_ids[rows], -1, "right"),
            "index": torch.tensor(keep[rows], dtype=torch.long),
        }
        if token_spans is not None:
            batch["spans"] = _padded_spans(token_spans[rows], clean_ids[rows], padding_side)
        check_batch(batch, vocab_size=len(tokenizer))
        batches.append(batch)
    return batches


def _encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return tokenizer(list(texts), add_special_tokens=True)["input_ids"]


def _check_appends_nothing(tokenizer) -> None:
    """Refuse a tokenizer that ends every text it encodes with a special token (an EOS its post-processor adds):
    each prompt would end with it, the model would be scored on what follows an end of text, and no answer could
    continue a prompt."""
    plain, special = (tokenizer("The", add_special_tokens=add)["input_ids"] for add in (False, True))
    if special[-1] != plain[-1] and special[-1] in tokenizer.all_special_ids:
        raise ValueError(f"the tokenizer appends {tokenizer.convert_ids_to_tokens(special[-1])!r} to every text it "
                         "encodes, so each prompt would end with it and the answer is scored as the token after "
                         "it: load the tokenizer without it (add_eos_token=False where it takes that option), or "
                         "drop it from its post-processor")


def _as_list(answers: Sequence[str] | str) -> list[str]:
    """An example's answers as a list: one string, or a list of strings."""
    answers = [answers] if isinstance(answers, str) else answers
    if not isinstance(answers, Sequence) or not all(isinstance(answer, str) for answer in answers):
        raise TypeError(f"an example's answers are a string or a list of strings (' Mary' or [' Mary', ' Anna']), "
                        f"got {answers!r}")
    return list(answers)


def _show(tokenizer, ids: Sequence[int]) -> list[str]:
    """Token ids as the strings they decode to, one per token, for error messages."""
    return [tokenizer.decode([t]) for t in ids]


def _aligned(tokenizer, clean_ids, corrupted_ids, labels, drop_mismatched: bool) -> list[int]:
    """Indices of the pairs whose prompts have equal token counts; the others raise or warn."""
    mismatched = [i for i, (a, b) in enumerate(zip(clean_ids, corrupted_ids)) if len(a) != len(b)]
    if mismatched and not drop_mismatched:
        i = mismatched[0]
        raise ValueError(
            f"{labels[i]}: the clean prompt is {len(clean_ids[i])} tokens but the corrupted prompt is "
            f"{len(corrupted_ids[i])} tokens ({len(mismatched)} pair(s) mismatched in all).\n"
            f"  clean:     {_show(tokenizer, clean_ids[i])}\n  corrupted: {_show(tokenizer, corrupted_ids[i])}\n"
            "Patching swaps activations position by position, so both prompts must tokenize to the same length: "
            "rephrase the corrupted prompt (e.g. use a word that is as many tokens as the one it replaces), "
            "drop the example, or pass drop_mismatched=True (--drop-mismatched on the command line) to drop such "
            "pairs with a warning.")
    if mismatched:
        warn_at_caller(f"dropped {len(mismatched)} of {len(clean_ids)} prompt pairs whose clean and corrupted "
                       f"prompts tokenize to different lengths: {', '.join(labels[i] for i in mismatched)}")
    dropped = set(mismatched)
    return [i for i in range(len(clean_ids)) if i not in dropped]


def _token_spans(tokenizer, prompts: Sequence[str], spans: Sequence[Spans], labels) -> list[dict]:
    """Each example's spans as the token ranges [start, stop) their characters overlap, in its unpadded tokens."""
    names = list(spans[0])
    for named, label in zip(spans, labels):
        if list(named) != names:
            raise ValueError(f"{label} names the spans {list(named)} but {labels[0]} names {names}: spans line "
                             "examples up by role, so every example must name the same ones, in the same order")
    if not names:
        raise ValueError("spans were given but name no part of any prompt; give spans=None for none")
    result = []
    for prompt, named, label in zip(prompts, spans, labels):
        try:
            offsets = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)["offset_mapping"]
        except (NotImplementedError, KeyError, TypeError) as error:
            raise ValueError(f"spans need a tokenizer that reports character offsets (a fast tokenizer); "
                             f"{type(tokenizer).__name__} does not ({error})") from None
        result.append({name: _overlapped(offsets, named[name], prompt, f"{label}: span {name!r}") for name in names})
    return result


def _overlapped(offsets, span, prompt: str, what: str) -> tuple[int, int]:
    """The range [first, last + 1) of the tokens whose characters overlap ``span``, [start, stop) of ``prompt``."""
    if not (isinstance(span, (tuple, list)) and len(span) == 2 and all(isinstance(c, int) for c in span)
            and 0 <= span[0] < span[1] <= len(prompt)):
        raise ValueError(f"{what} is {span!r}; a span is a character range (start, stop) with 0 <= start < stop "
                         f"<= {len(prompt)}, the prompt's length")
    start, stop = span
    tokens = [i for i, (a, b) in enumerate(offsets) if a < stop and b > start]
    if not tokens:
        raise ValueError(f"{what} covers the characters {prompt[start:stop]!r}, which no token holds")
    return tokens[0], tokens[-1] + 1


def _padded_spans(spans: list[dict], ids: list[list[int]], side: str) -> dict[str, torch.Tensor]:
    """Token ranges moved to where padding puts their tokens: a left-padded row's tokens start later."""
    width = max(len(row) for row in ids)
    shifts = [width - len(row) if side == "left" else 0 for row in ids]
    return {name: torch.tensor([[a + shift, b + shift] for (a, b), shift in zip((s[name] for s in spans), shifts)],
                               dtype=torch.long) for name in spans[0]}


def continuations(tokenizer, prompts: Sequence[str], texts: Sequence[str]) -> list[list[int] | None]:
    """The tokens ``texts[i]`` adds after ``prompts[i]`` when tokenized together, or None where it does not
    (the prompt's own tokens change, or nothing is added).

    Tokenizing in context is what makes a leading space right for every tokenizer family: byte-level BPE
    folds it into the word (``" Mary"`` is one token), SentencePiece marks it on the word (``"▁Mary"``).
    """
    unique = list(dict.fromkeys(prompts))
    prefixes = dict(zip(unique, _encode(tokenizer, unique)))
    result = []
    for prompt, full in zip(prompts, _encode(tokenizer, [p + t for p, t in zip(prompts, texts)])):
        prefix = prefixes[prompt]
        result.append(full[len(prefix):] if full[:len(prefix)] == prefix and len(full) > len(prefix) else None)
    return result


def _answer_ids(tokenizer, prompts, answers, labels, kind: str) -> list[list[int]]:
    """The first token of each answer as a continuation of its prompt, deduplicated in order."""
    for label, example in zip(labels, answers):
        if not example:
            raise ValueError(f"{label}: it has no {kind} answer; every example needs at least one")
    pairs = [(prompt, answer) for prompt, example in zip(prompts, answers) for answer in example]
    tokens = iter(continuations(tokenizer, [p for p, _ in pairs], [a for _, a in pairs]))
    result = []
    for prompt, example, label in zip(prompts, answers, labels):
        firsts = []
        for answer in example:
            ids = next(tokens)
            if ids is None:
                raise ValueError(
                    f"{label}: the {kind} answer {answer!r} does not tokenize as a continuation of the prompt "
                    f"{prompt!r}; answers are scored as the next token after the prompt, so an answer must start "
                    "a new token, usually with its leading space (' Mary')")
            if ids[0] not in firsts:
                firsts.append(ids[0])
        result.append(firsts)
    return result


def _check_disjoint(tokenizer, labels, correct_ids, incorrect_ids) -> None:
    for label, right, wrong in zip(labels, correct_ids, incorrect_ids):
        both = set(right) & set(wrong)
        if both:
            raise ValueError(f"{label}: the answers' first tokens {_show(tokenizer, both)} are both correct and "
                             "incorrect; a next-token metric cannot separate them, so pick answers that differ in "
                             "their first token")


def _pad_id(tokenizer) -> int:
    """The id padding is written with: the pad token, else EOS, else 0.  Padded positions are masked out, so any
    id the model can embed will do; a token added to the tokenizer past its own vocabulary (``add_special_tokens(
    {"pad_token": ...})`` without resizing the model's embeddings) may have no row in the model, so it is passed
    over."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None and token_id < tokenizer.vocab_size:
            return token_id
    return 0


def _pad(rows: list[list[int]], value: int, side: str) -> torch.Tensor:
    width = max(len(row) for row in rows)
    padded = [row + [value] * (width - len(row)) if side == "right" else [value] * (width - len(row)) + row
              for row in rows]
    return torch.tensor(padded, dtype=torch.long)


def is_count(n) -> bool:
    """Whether ``n`` is a count: an int of at least 1.  A bool is none, although Python's bool is an int, and a
    float none either: it would fail later, deep in a split or a range, or count a fraction of something."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1


def check_counts(**counts: int | None) -> None:
    """Refuse a count that is no int of at least 1 (``is_count``), by its name (None, where a default stands in,
    passes)."""
    for name, n in counts.items():
        if n is not None and not is_count(n):
            raise ValueError(f"{name} is a count, an int of at least 1; got {n!r}")


def fitting_call(device: torch.device, stream: int, given: int | None, *, cpu_stream: int, most: int,
                 accelerator: int) -> int:
    """How many masks — patched runs, gradient points, ablated nodes — a call runs, when one mask's stream
    [batch, seq, d_model] for the largest batch holds ``stream`` values: ``given`` where given; ``accelerator`` where
    launches set the pace (``heads.launch_bound``: a call's masks ride in one batch); on CPU as many as keep the
    call's stream within ``cpu_stream`` values, 1 to ``most``: past that the working set outgrows the caches and
    each mask costs more."""
    if given is not None:
        check_counts(masks_per_call=given)
        return given
    if heads.launch_bound(device):
        return accelerator
    return max(1, min(most, cpu_stream // stream))


def attention_mask(batch: dict) -> torch.Tensor:
    """``batch["attention_mask"]``, or where the batch gives none, ones shaped like its clean prompts
    (``real_tokens``)."""
    return real_tokens(batch["clean"], batch.get("attention_mask"))


def real_tokens(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """``attention_mask``, or where none is given, ones shaped like ``input_ids``: every token real, as the model
    reads prompts without a mask."""
    return torch.ones_like(input_ids) if attention_mask is None else attention_mask


def served_lengths(cm, batches: Iterable[dict]) -> list[dict]:
    """``batches``, with those whose length no capture of ``cm`` (a ``CircuitModel``) serves (``capture.Lengths``: a
    hybrid's chunked scan serves the lengths of one chunk; none serves one token) padded on the right to the
    longest prompt, and to two tokens at least, so that one more capture at most serves them all.  The padded
    positions are masked, and a causal model's outputs at the real tokens do not depend on them."""
    batches = list(batches)
    if not batches:
        return batches
    longest = max(2, *(batch["clean"].shape[1] for batch in batches))
    return [batch if cm.serving(batch["clean"]) is not None else _padded(batch, longest) for batch in batches]


def _padded(batch: dict, length: int) -> dict:
    extra = length - batch["clean"].shape[1]
    if not extra:
        return batch
    padded = {key: batch[key] for key in ("clean", "corrupted") if key in batch}
    padded["attention_mask"] = attention_mask(batch)
    return {**batch, **{key: torch.nn.functional.pad(value, (0, extra)) for key, value in padded.items()}}


def batch_list(batches: dict | Iterable[dict]) -> list[dict]:
    """``batches`` as a list: one batch dict given alone is one batch, where ``list()`` would take its keys."""
    return [batches] if isinstance(batches, dict) else list(batches)


def check_prompts(batch: dict, vocab_size: int | None = None) -> None:
    """``check_batch``'s checks of the clean prompts and their mask alone, for what reads nothing else
    (information flow routes): ids [B, S] in range, a 0/1 mask of their shape with a real token in every row."""
    _a_dict(batch)
    if "clean" not in batch:
        raise ValueError("batch is missing 'clean', the prompts: a LongTensor [B, S] (see "
                         "fxcircuits.data.make_batches)")
    clean = batch["clean"]
    _expect(batch, "clean", dim=2, dtype=torch.long, what="token ids [B, S]")
    if clean.numel() == 0:
        raise ValueError(f"batch['clean'] is empty (shape {tuple(clean.shape)}); expected at least one token")
    limit = f" < {vocab_size}" if vocab_size is not None else ""
    _ids_in_range(batch, "clean", 0, vocab_size, f"token ids >= 0{limit}")
    mask = batch.get("attention_mask")
    if mask is not None:
        _expect(batch, "attention_mask", shape=clean.shape, what="a 0/1 mask shaped like batch['clean']")
        if ((mask != 0) & (mask != 1)).any():
            raise ValueError("batch['attention_mask'] must hold only 0 and 1 (1 = real token)")
        if (mask.sum(-1) == 0).any():
            raise ValueError("batch['attention_mask'] has a row with no real token (all zeros)")


def check_batch(batch: dict, vocab_size: int | None = None) -> None:
    """Raise ``ValueError`` naming the key and what is expected if ``batch`` is not a well-formed batch.

    Checks shapes, dtypes, that clean and corrupted align, that the mask is 0/1 with a real token in every
    row, that every row has at least one correct and one incorrect answer, that positions point at real
    tokens, that ``clean_logits`` is finite, and, given ``vocab_size``, that every token id is in range.
    """
    _a_dict(batch)
    for key in ("clean", "corrupted", "correct", "incorrect"):
        if key not in batch:
            raise ValueError(f"batch is missing {key!r}; a batch needs 'clean' and 'corrupted' LongTensors [B, S] "
                             "and 'correct' and 'incorrect' LongTensors [B, K] (see fxcircuits.data.make_batches)")
    check_prompts(batch, vocab_size)
    clean = batch["clean"]
    _expect(batch, "corrupted", shape=clean.shape, dtype=torch.long, what="token ids aligned with batch['clean']")
    limit = f" < {vocab_size}" if vocab_size is not None else ""
    _ids_in_range(batch, "corrupted", 0, vocab_size, f"token ids >= 0{limit}")
    for key in ("correct", "incorrect"):
        _expect(batch, key, dim=2, dtype=torch.long, what="answer token ids [B, K] padded with -1")
        if batch[key].shape[0] != clean.shape[0]:
            raise ValueError(f"batch[{key!r}] has {batch[key].shape[0]} rows but batch['clean'] has {clean.shape[0]}")
        _ids_in_range(batch, key, -1, vocab_size, f"answer token ids{limit} or -1 for padding")
        if ((batch[key] >= 0).sum(-1) == 0).any():
            raise ValueError(f"batch[{key!r}] has a row with no answer (all -1); every example needs at least one")
    if "position" in batch:
        _check_position(batch)
    if "clean_logits" in batch:
        _check_clean_logits(batch)
    if "spans" in batch:
        _check_spans(batch["spans"], *clean.shape, batch.get("attention_mask"))


def _expect(batch: dict, key: str, *, what: str, dim: int | None = None, shape=None, dtype=None) -> None:
    value = batch[key]
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"batch[{key!r}] must be a torch.Tensor of {what}, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"batch[{key!r}] must be {what}, got shape {tuple(value.shape)}")
    if shape is not None and value.shape != shape:
        raise ValueError(f"batch[{key!r}] must be {what}, shape {tuple(shape)}; got shape {tuple(value.shape)}")
    if dtype is not None and value.dtype != dtype:
        raise ValueError(f"batch[{key!r}] must be {what} of dtype {dtype}, got {value.dtype}")


def _a_dict(batch) -> None:
    if not isinstance(batch, dict):
        raise TypeError(f"a batch is a dict of tensors, {{'clean': ids [B, S], 'attention_mask': …}} (more for "
                        f"patching: fxcircuits.data.make_batches), not a {type(batch).__name__}: pass {{'clean': ids}}")


def class_names(batches: list[dict], spans: Sequence[str] | None) -> list[str]:
    """The classes of positions of scores by span: ``spans`` (the first batch's, where None) and the rest, checked
    on every batch, so that each batch's classes line up with the first's."""
    names = spans
    for batch in batches:
        names = position_classes(batch, names)[0][:-1]
    return names + [REST]


def _ids_in_range(batch: dict, key: str, low: int, vocab_size: int | None, what: str) -> None:
    ids = batch[key]
    if (ids < low).any() or (vocab_size is not None and (ids >= vocab_size).any()):
        raise ValueError(f"batch[{key!r}] must hold {what}; it ranges over {ids.min().item()}..{ids.max().item()}")


def _check_position(batch: dict) -> None:
    clean, position = batch["clean"], batch["position"]
    _expect(batch, "position", shape=clean.shape[:1], dtype=torch.long, what="one position per example [B]")
    if ((position < 0) | (position >= clean.shape[1])).any():
        raise ValueError(f"batch['position'] must lie in 0..{clean.shape[1] - 1}, got {position.tolist()}")
    mask = batch.get("attention_mask")
    if mask is not None and (mask.gather(1, position[:, None]) == 0).any():
        raise ValueError("batch['position'] points at a padded token (attention_mask 0) in some row")


def _check_clean_logits(batch: dict) -> None:
    logits = batch["clean_logits"]
    _expect(batch, "clean_logits", dim=2, what="the clean run's logits at the answer position [B, V]")
    if logits.shape[0] != batch["clean"].shape[0] or not logits.is_floating_point():
        raise ValueError(f"batch['clean_logits'] must be floating point [B={batch['clean'].shape[0]}, V], got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if not torch.isfinite(logits).all():
        raise ValueError("batch['clean_logits'] holds NaN or infinite values")


def _check_spans(spans, size: int, seq: int, mask: torch.Tensor | None = None) -> None:
    """``spans`` as ``batch["spans"]`` holds them for ``size`` prompts of ``seq`` tokens: ranges within the prompts,
    and (given the ``mask``) on real tokens."""
    if not isinstance(spans, dict) or not spans:
        raise ValueError("batch['spans'] must be a dict from a name to token ranges [B, 2] (see make_batches)")
    for name, ranges in spans.items():
        if not isinstance(ranges, torch.Tensor) or ranges.shape != (size, 2) or ranges.dtype != torch.long:
            raise ValueError(f"batch['spans'][{name!r}] must be a LongTensor [B={size}, 2] of token ranges [start, "
                             f"stop), got {getattr(ranges, 'dtype', type(ranges).__name__)} "
                             f"{tuple(getattr(ranges, 'shape', ()))}")
        start, stop = ranges.unbind(-1)
        if ((start < 0) | (stop <= start) | (stop > seq)).any():
            raise ValueError(f"batch['spans'][{name!r}] must hold ranges 0 <= start < stop <= {seq}, got "
                             f"{ranges.tolist()}")
        if mask is not None and (span_weights(ranges, seq).bool() & ~mask.bool()).any():
            raise ValueError(f"batch['spans'][{name!r}] covers padded tokens (attention_mask 0) in some row")


def span_weights(ranges: torch.Tensor, seq: int) -> torch.Tensor:
    """Token ranges [B, 2] as 0/1 weights over the ``seq`` positions, [B, seq]: 1 on each row's span."""
    positions = torch.arange(seq, device=ranges.device)
    return ((positions >= ranges[:, :1]) & (positions < ranges[:, 1:])).float()


REST = "rest"  # the class of the positions no named span covers (``position_classes``)


def position_classes(batch: dict, names: Sequence[str] | None = None) -> tuple[list[str], torch.Tensor]:
    """The prompt cut into classes of positions by its spans: the spans ``names`` (every span of the batch where
    None), then ``"rest"`` for the positions none of them covers (padding included).  Returns the class names and
    0/1 weights [classes, B, S], one class at each position: the ``mask_positions`` of a positional mask, one mask per
    class (``CircuitModel.forward``), and the classes positional scores and circuits are kept by."""
    spans = batch.get("spans") or {}
    names = list(spans) if names is None else name_list(names, "span")
    if not names:
        raise ValueError("no spans to cut the prompts by: pass batches with 'spans' (fxcircuits.data.make_batches, "
                         "or a built-in task), or name some")
    unknown = [n for n in names if n not in spans]
    if unknown:
        raise KeyError(f"no span {unknown[0]!r} in the batch; it has {sorted(spans)}")
    if REST in names:
        raise ValueError(f"a span named {REST!r} would be taken for the positions no span covers: rename it")
    seq = batch["clean"].shape[1]
    cover = torch.stack([span_weights(spans[n], seq) for n in names])
    overlap = cover.sum(0) > 1
    if overlap.any():
        row, position = (int(i) for i in overlap.nonzero()[0])
        both = [n for n, c in zip(names, cover[:, row, position]) if c]
        raise ValueError(f"spans {both} overlap at position {position} of example {row}: a position belongs to one "
                         "class alone; name disjoint spans")
    return names + [REST], torch.cat([cover, 1 - cover.sum(0, keepdim=True)])


def span_sums(values: torch.Tensor, spans: dict[str, torch.Tensor]) -> torch.Tensor:
    """``values`` [..., batch, seq] summed over each span's tokens (``batch["spans"]``): [..., batch, spans], in the
    order ``spans`` names them — what a head puts on IOI's IO, wherever each prompt has it."""
    if not spans:
        raise ValueError("no spans given: pass a batch's 'spans' (see fxcircuits.data.make_batches)")
    _check_spans(spans, *values.shape[-2:])
    cover = torch.stack([span_weights(r.to(values.device), values.shape[-1]) for r in spans.values()], -1)
    return torch.einsum("...bs,bsn->...bn", values, cover.to(values.dtype))


def example(batch: dict, row: int) -> dict:
    """Example ``row`` of ``batch`` as a batch of its own, its padding cut away: a sweep over its positions
    (``fxcircuits.patch_by_position``) then runs on its tokens alone.  A given answer ``position`` moves with them."""
    if not -len(batch["clean"]) <= row < len(batch["clean"]):
        raise IndexError(f"row {row}: the batch holds {len(batch['clean'])} examples")
    row %= len(batch["clean"])  # a slice from -1 to 0 would be empty
    real = attention_mask(batch)[row].bool().nonzero().flatten()
    start, stop = int(real[0]), int(real[-1]) + 1
    one = {key: value[row:row + 1] for key, value in batch.items() if key != "spans"}
    for key in ("clean", "corrupted", "attention_mask"):
        if key in one:
            one[key] = one[key][:, start:stop]
    if "position" in one:
        one["position"] = one["position"] - start
    if "spans" in batch:
        one["spans"] = {name: ranges[row:row + 1] - start for name, ranges in batch["spans"].items()}
    return one


def to_device(batch: dict, device: torch.device | str) -> dict:
    """A copy of ``batch`` with every tensor on ``device`` (``spans``' too)."""
    moved = {key: value.to(device) if isinstance(value, torch.Tensor) else value for key, value in batch.items()}
    if "spans" in batch:
        moved["spans"] = {name: ranges.to(device) for name, ranges in batch["spans"].items()}
    return moved
