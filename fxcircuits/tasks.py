"""Circuit-discovery tasks: clean/corrupted prompt pairs, their answers, and the metric that scores them.

A task is built *for a tokenizer*: words that must occupy one token (IOI's names, SVA's verbs) and words
whose clean and corrupted forms must occupy as many tokens as each other (SVA's nouns) are chosen by
tokenizing them, and greater-than adapts to how the tokenizer splits years. What was filtered or chosen is
recorded in ``Task.notes``, never silently::

    task = fxcircuits.tasks.load("ioi", tokenizer, size=64, seed=0)
    task.baseline(cm)            # mean metric on the clean prompts; > 0 when the model does the task
    for batch in task.batches: ...

Built-in tasks: ``greater-than`` (Hanna et al. 2023), ``sva`` (subject-verb agreement), ``ioi`` and ``ioi-abc``
(Wang et al. 2023; two corruptions), ``induction`` (a repeated sequence of words).  Your own data:
:func:`from_file` (CSV or JSONL).
"""
from __future__ import annotations

import csv
import json
import random
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from transformers import PreTrainedModel

from . import metrics as _metrics
from .data import continuations, is_count, make_batches, to_device
from .metrics import Metric


@dataclass(frozen=True)
class Example:
    """One prompt pair and its answers, as text (answers are continuations, leading space included), and the
    parts of the clean prompt named by their role: ``spans`` maps a name to a character range [start, stop)."""
    clean: str
    corrupted: str
    correct: tuple[str, ...]
    incorrect: tuple[str, ...]
    spans: dict[str, tuple[int, int]] = field(default_factory=dict, compare=False)


@dataclass
class Task:
    """A named dataset of prompt pairs, batched for one tokenizer, and the metric that scores it.

    ``examples[i]`` is row ``i`` of the concatenated ``batches``; ``notes`` says how the data was adapted
    to the tokenizer (which words were kept, which mode was chosen, what was dropped).
    """
    name: str
    examples: list[Example] = field(repr=False)
    batches: list[dict] = field(repr=False)
    metric: Metric
    notes: list[str] = field(default_factory=list)

    def locate(self, index: int) -> tuple[dict, int]:
        """The batch holding ``examples[index]`` and its row there."""
        if not 0 <= index < len(self.examples):
            raise IndexError(f"example {index}: the task has {len(self.examples)} examples (0 to "
                             f"{len(self.examples) - 1})")
        for batch in self.batches:
            if index < len(batch["clean"]):
                return batch, index
            index -= len(batch["clean"])
        raise AssertionError("examples and batches disagree")

    def baseline(self, model: Callable, *, corrupted: bool = False) -> float:
        """The mean metric over all examples when ``model`` runs the clean (or the corrupted) prompts.

        ``model`` is a Hugging Face causal LM or any callable ``logits = model(input_ids, attention_mask)``,
        such as a traced ``CircuitModel``. A task is only worth a circuit when its clean baseline is clearly
        positive and its corrupted one clearly lower: the circuit is what carries that difference.
        """
        device, total = _device(model), 0.0
        with torch.no_grad():
            for batch in self.batches:
                batch = to_device(batch, device)
                logits = _logits(model, batch["corrupted" if corrupted else "clean"], batch["attention_mask"])
                if _metrics.needs_clean_logits(self.metric):
                    clean = _logits(model, batch["clean"], batch["attention_mask"]) if corrupted else logits
                    batch["clean_logits"] = _metrics.logits_at_answer(clean, batch)
                total += _metrics.measured(self.metric, logits, batch).sum().item()
        return total / len(self.examples)


def _device(model) -> torch.device:
    parameter = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return parameter.device if parameter is not None else torch.device("cpu")


def _logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # Keywords for HF models: their second positional parameter is not attention_mask in every family (GPT-2).
    if isinstance(model, PreTrainedModel):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    return model(input_ids, attention_mask)


# ---------------------------------------------------------------------------------------------------------
# Shared machinery: word filters for a tokenizer, sampling aligned examples, batching into a Task.

def _token_counts(tokenizer, words: Sequence[str], context: str = "The") -> list[int | None]:
    """How many tokens ``" " + word`` adds after ``context`` (None if it merges into the context)."""
    tokens = continuations(tokenizer, [context] * len(words), [" " + word for word in words])
    return [None if ids is None else len(ids) for ids in tokens]


def _keep(items: Sequence, ok: Sequence[bool], what: str, notes: list[str], minimum: int) -> list:
    """The items that suit the tokenizer, noting how many did; fewer than ``minimum`` is an error."""
    kept = [item for item, good in zip(items, ok) if good]
    notes.append(f"kept {len(kept)} of {len(items)} {what}")
    if len(kept) < minimum:
        raise ValueError(f"only {len(kept)} of {len(items)} {what} for this tokenizer; the task needs {minimum}")
    return kept


def _pair_counts(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[int | None, int | None]]:
    counts = _token_counts(tokenizer, [word for pair in pairs for word in pair])
    return list(zip(counts[::2], counts[1::2]))


def _n_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=True)["input_ids"])


def _sample(tokenizer, draw: Callable[[random.Random], Example], size: int, seed: int,
            notes: list[str]) -> list[Example]:
    """``size`` examples from ``draw``, redrawing those whose clean and corrupted prompts differ in length.

    The word filters make such pairs rare; redrawing (and saying how often) keeps ``size`` exact.
    """
    rng = random.Random(seed)
    examples, redrawn = [], 0
    while len(examples) < size:
        example = draw(rng)
        if _n_tokens(tokenizer, example.clean) == _n_tokens(tokenizer, example.corrupted):
            examples.append(example)
            continue
        redrawn += 1
        if redrawn > 10 * size + 100:
            raise ValueError(f"{redrawn} drawn examples had clean and corrupted prompts of different token "
                             f"lengths (e.g. {example.clean!r} / {example.corrupted!r}); this tokenizer does "
                             "not suit the task's templates")
    if redrawn:
        notes.append(f"redrew {redrawn} examples whose clean and corrupted prompts differ in token count")
    return examples


def _task(name: str, tokenizer, examples: list[Example], metric: str, batch_size: int, notes: list[str],
          labels: Sequence[str] | None = None, drop_mismatched: bool = False) -> Task:
    spans = [e.spans for e in examples] if any(e.spans for e in examples) else None
    batches = make_batches(tokenizer, [e.clean for e in examples], [e.corrupted for e in examples],
                           [e.correct for e in examples], [e.incorrect for e in examples],
                           batch_size=batch_size, labels=labels, drop_mismatched=drop_mismatched, spans=spans)
    kept = [examples[i] for batch in batches for i in batch["index"].tolist()]
    return Task(name, kept, batches, _metrics.get(metric), notes)


def _fill(template: str, values: dict[str, str], roles: dict[str, str]) -> tuple[str, dict[str, tuple[int, int]]]:
    """``template.format(**values)``, and the character range of each field named in ``roles`` (field → span
    name), with ``"END"``, the prompt's last character (the token whose next-token prediction is scored), unless a
    role names the field that ends the prompt ``"END"`` itself: then END is that whole field (SVA's attractor
    noun, all its tokens), as a position belongs to one span alone."""
    text, spans = "", {}
    for literal, name, _, _ in string.Formatter().parse(template):
        text += literal
        if name is not None:
            if name in roles:
                spans[roles[name]] = (len(text), len(text) + len(values[name]))
            text += values[name]
    end = {} if "END" in spans else {"END": (len(text) - 1, len(text))}
    return text, {**{role: spans[role] for role in roles.values()}, **end}


# ---------------------------------------------------------------------------------------------------------
# greater-than

_EVENTS = ("war", "expedition", "reign", "siege", "journey", "voyage", "dynasty", "trial", "campaign", "conflict",
           "occupation", "rebellion", "crisis", "treaty", "alliance", "marriage", "famine", "plague", "project",
           "pilgrimage", "quest", "rivalry", "friendship", "empire", "tradition", "construction", "investigation",
           "negotiation", "insurgency", "epidemic")


_YEARS_TEMPLATE = "The {event} lasted from {century}{start} to {century}"


def greater_than(tokenizer, size: int = 64, seed: int = 0, batch_size: int = 8) -> Task:
    """"The war lasted from 1741 to 17" → a year after 1741 (Hanna et al. 2023); corrupted start year XX01.

    Metric ``prob_diff``: Σ p(years > YY) − Σ p(years ≤ YY), over what the tokenizer lets the next token be.

    - Tokenizers with two-digit year tokens (GPT-2: " 17" + "41"): the answers are the tokens "00".."99",
      correct "YY+1".."99", incorrect "00".."YY", with YY in 02..98 as in the paper.
    - Digit-by-digit tokenizers (SmolLM2, Llama 2: "1","7","4","1"): the next token is the end year's tens
      digit d. It decides "greater" only when d ≠ the start year's tens digit, so the start year's units digit
      is always 9 (YY ∈ 19, 29, .., 89): then every end year with tens digit d ≤ YY's is ≤ YY, and every one
      with d above is > YY, and Σ_{d > tens(YY)} p(d) − Σ_{d ≤ tens(YY)} p(d) *is* the paper's metric with the
      second digit marginalised out, not an approximation of it.

    The case is found by tokenizing years, not from the model's name; other year splits raise ``ValueError``.
    Spans: ``YY`` (the start year's last two digits, which the corruption changes) and ``END`` (the last token).
    """
    notes: list[str] = []
    digits = _year_token_digits(tokenizer)
    notes.append(f"years tokenize {'as century + two-digit tokens' if digits == 2 else 'digit by digit'}: the "
                 f"answers are {digits}-digit tokens")
    answers = [f"{value:0{digits}d}" for value in range(10 ** digits)]
    scale = 10 ** (2 - digits)  # the smallest two-digit year an answer token can start

    def draw(rng: random.Random) -> Example:
        event, century = rng.choice(_EVENTS), rng.randint(11, 17)
        yy = rng.randint(2, 98) if digits == 2 else 10 * rng.randint(1, 8) + 9
        values = dict(event=event, century=str(century))
        clean, spans = _fill(_YEARS_TEMPLATE, {**values, "start": f"{yy:02d}"}, {"start": "YY"})
        corrupted = _YEARS_TEMPLATE.format(**values, start="01")
        return Example(clean, corrupted, tuple(a for a in answers if int(a) * scale > yy),
                       tuple(a for a in answers if int(a) * scale <= yy), spans)

    return _task("greater-than", tokenizer, _sample(tokenizer, draw, size, seed, notes), "prob_diff",
                 batch_size, notes)


def _year_token_digits(tokenizer) -> int:
    """2 if the tokens after "… to 17" can be two-digit years, 1 if they are single digits."""
    prompt = "The war lasted from 1741 to 17"
    for digits in (2, 1):
        values = [f"{value:0{digits}d}" for value in range(10 ** digits)]
        if all(ids is not None and len(ids) == 1 for ids in continuations(tokenizer, [prompt] * len(values), values)):
            return digits
    raise ValueError(f"greater-than needs years that tokenize as century + two-digit tokens (GPT-2) or digit by "
                     f"digit (SmolLM2); this tokenizer splits {prompt + '42'!r} as "
                     f"{[tokenizer.decode([t]) for t in tokenizer(prompt + '42')['input_ids']]}")


# ---------------------------------------------------------------------------------------------------------
# subject-verb agreement

_NOUNS = (("key", "keys"), ("dog", "dogs"), ("cat", "cats"), ("teacher", "teachers"), ("doctor", "doctors"),
          ("student", "students"), ("car", "cars"), ("house", "houses"), ("book", "books"), ("table", "tables"),
          ("cabinet", "cabinets"), ("window", "windows"), ("friend", "friends"), ("farmer", "farmers"),
          ("painter", "painters"), ("author", "authors"), ("manager", "managers"), ("girl", "girls"),
          ("boy", "boys"), ("bird", "birds"), ("tree", "trees"), ("box", "boxes"), ("child", "children"),
          ("man", "men"), ("woman", "women"), ("lady", "ladies"), ("city", "cities"), ("church", "churches"),
          ("knife", "knives"), ("chair", "chairs"), ("door", "doors"), ("bottle", "bottles"),
          ("picture", "pictures"), ("letter", "letters"), ("road", "roads"), ("river", "rivers"),
          ("computer", "computers"), ("phone", "phones"), ("lawyer", "lawyers"), ("nurse", "nurses"),
          ("singer", "singers"), ("player", "players"), ("officer", "officers"), ("pilot", "pilots"))
_VERBS = (("is", "are"), ("was", "were"), ("has", "have"))  # (singular, plural), like _NOUNS
_PREPOSITIONS = ("near", "behind", "beside", "with", "next to", "of", "under", "on")
# A clause frame makes a verb the likely next token: after a bare "The keys on the cabinet" small models
# spread their mass over commas, possessives and modals (SmolLM2-135M: 8% on these verbs, vs 28% here).
_SVA_FRAMES = ("We know that the", "You can see that the", "Everyone knows that the", "We all know that the",
               "It is clear that the", "It is true that the")


_SVA_TEMPLATE = "{frame} {subject} {preposition} the {attractor}"


def sva(tokenizer, size: int = 64, seed: int = 0, batch_size: int = 8) -> Task:
    """"We know that the keys on the cabinet" → a verb agreeing with "keys"; corrupted "… the key on the …".

    The subject's number is random per example and the attractor noun ("cabinet") has the other number, the
    case where agreement is not just copying the nearest noun. Metric ``prob_diff``: Σ p(verbs agreeing with
    the clean subject) − Σ p(the others), over the pairs is/are, was/were, has/have that are single tokens.
    Only nouns whose singular and plural are as many tokens as each other are used (so the prompts align).
    Spans: ``subject`` and ``END``, the attractor noun that ends the prompt (all its tokens), where the verb is
    predicted.
    """
    notes: list[str] = []
    nouns = _keep(_NOUNS, [a is not None and a == b for a, b in _pair_counts(tokenizer, _NOUNS)],
                  "noun pairs whose singular and plural are equally many tokens", notes, minimum=2)
    verbs = _keep(_VERBS, [a == b == 1 for a, b in _pair_counts(tokenizer, _VERBS)],
                  "verb pairs whose two forms are single tokens", notes, minimum=1)

    def draw(rng: random.Random) -> Example:
        subject, attractor = rng.sample(nouns, 2)
        number = rng.randrange(2)  # the clean subject's: 0 singular, 1 plural (the index into each pair)
        frame, preposition = rng.choice(_SVA_FRAMES), rng.choice(_PREPOSITIONS)
        values = dict(frame=frame, preposition=preposition, attractor=attractor[1 - number])
        roles = {"subject": "subject", "attractor": "END"}
        clean, spans = _fill(_SVA_TEMPLATE, {**values, "subject": subject[number]}, roles)
        corrupted = _SVA_TEMPLATE.format(**values, subject=subject[1 - number])
        return Example(clean, corrupted, tuple(" " + pair[number] for pair in verbs),
                       tuple(" " + pair[1 - number] for pair in verbs), spans)

    return _task("sva", tokenizer, _sample(tokenizer, draw, size, seed, notes), "prob_diff", batch_size, notes)


# ---------------------------------------------------------------------------------------------------------
# indirect object identification

_NAMES = ("Aaron", "Adam", "Alan", "Alex", "Alice", "Amy", "Andrew", "Anna", "Anthony", "Arthur", "Austin", "Brian",
          "Charles", "Charlie", "Christopher", "Daniel", "David", "Edward", "Elizabeth", "Emily", "Eric", "Frank",
          "George", "Grace", "Henry", "Ian", "Jack", "Jacob", "James", "Jane", "Jason", "Jennifer", "Jessica",
          "John", "Jonathan", "Joseph", "Kate", "Kelly", "Kevin", "Laura", "Lisa", "Luke", "Maria", "Mark",
          "Martin", "Mary", "Matthew", "Max", "Michael", "Michelle", "Patrick", "Paul", "Peter", "Rachel",
          "Richard", "Robert", "Rose", "Ruby", "Ryan", "Sarah", "Scott", "Simon", "Stephen", "Steven", "Thomas",
          "Tom", "Victoria", "William")
_PLACES = ("store", "garden", "restaurant", "school", "hospital", "office", "house", "station", "park", "market")
_OBJECTS = ("drink", "ring", "book", "bone", "basketball", "computer", "necklace", "snack", "letter", "flower")
# {A} and {B} are the two names introduced (IO and S in either order), {S} the subject's second mention.
_IOI_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were working at the {place}, {S} gave a {object} to",
    "Then, {A} and {B} went to the {place}. {S} gave a {object} to",
    "Friends {A} and {B} found a {object} at the {place}. {S} gave it to",
    "When {A} and {B} got a {object} at the {place}, {S} decided to give it to",
    "The {place} {A} and {B} went to had a {object}. {S} gave it to",
    "Afterwards, {A} and {B} went to the {place}. {S} gave a {object} to",
)


_IOI_SPANS = ("IO", "S1", "S2", "END")  # the indirect object, the subject's two mentions, the last token


def ioi(tokenizer, size: int = 64, seed: int = 0, batch_size: int = 8, corruption: str = "s2") -> Task:
    """"When Mary and John went to the store, John gave a drink to" → " Mary" (Wang et al. 2023).

    Corruption ``"s2"`` (task ``ioi``): the subject's second mention is replaced by a third name ("…, Paul gave a
    drink to"), so the corrupted prompt no longer says which of the two first names is the indirect object while
    keeping both in context; this is the corruption whose difference is exactly the duplicated-subject signal that
    IOI circuits carry, and the tokens before S2 are the same in both prompts.  Corruption ``"abc"`` (task
    ``ioi-abc``): all three mentions replaced by three other names ("When Paul and Kate went to the store, Luke gave
    a drink to"), Wang et al.'s ABC distribution: the IO's and S1's positions differ too. Names are drawn from
    those that are single tokens for the tokenizer, the order of the two first names (IO first or subject first)
    is random, and 8 templates are used. Metric ``logit_diff``: logit(IO) − logit(subject). Spans (Wang et al.'s positions): ``IO``, ``S1`` and ``S2`` (the subject's two
    mentions) and ``END`` (the last token).
    """
    if corruption not in _IOI_CORRUPTIONS:
        raise ValueError(f"unknown IOI corruption {corruption!r}; choose one of {', '.join(_IOI_CORRUPTIONS)}")
    notes: list[str] = []
    names = _keep(_NAMES, [count == 1 for count in _token_counts(tokenizer, _NAMES, context="When")],
                  "names that are a single token", notes, minimum=3 if corruption == "s2" else 5)
    others = random.Random(f"abc {seed}")  # ABC's names apart: the same seed draws the same clean prompts as ioi's

    def draw(rng: random.Random) -> Example:
        io, subject, other = rng.sample(names, 3)
        first, second = (io, subject) if rng.random() < 0.5 else (subject, io)
        template = rng.choice(_IOI_TEMPLATES)
        fill = dict(A=first, B=second, place=rng.choice(_PLACES), object=rng.choice(_OBJECTS))
        roles = {"A": "IO", "B": "S1"} if first == io else {"B": "IO", "A": "S1"}
        clean, spans = _fill(template, {**fill, "S": subject}, {**roles, "S": "S2"})
        if corruption == "s2":
            corrupted = template.format(S=other, **fill)
        else:
            a, b, c = others.sample([name for name in names if name not in (io, subject)], 3)
            corrupted = template.format(**{**fill, "A": a, "B": b, "S": c})
        return Example(clean, corrupted, (" " + io,), (" " + subject,), {name: spans[name] for name in _IOI_SPANS})

    name = "ioi" if corruption == "s2" else f"ioi-{corruption}"
    return _task(name, tokenizer, _sample(tokenizer, draw, size, seed, notes), "logit_diff", batch_size, notes)


_IOI_CORRUPTIONS = ("s2", "abc")


def ioi_abc(tokenizer, size: int = 64, seed: int = 0, batch_size: int = 8) -> Task:
    """IOI with Wang et al.'s ABC corruption: every name of the corrupted prompt replaced (see :func:`ioi`)."""
    return ioi(tokenizer, size, seed, batch_size, corruption="abc")


# ---------------------------------------------------------------------------------------------------------
# induction

_WORDS = ("anchor", "apple", "basket", "bottle", "bread", "bridge", "bucket", "button", "cactus", "camera",
          "candle", "carpet", "castle", "chair", "clock", "cloud", "coffee", "cotton", "desert", "dinner", "doctor",
          "donkey", "dragon", "eagle", "engine", "falcon", "farmer", "feather", "flower", "forest", "garden",
          "glass", "glove", "goose", "gravel", "guitar", "hammer", "harbor", "helmet", "honey", "horse", "insect",
          "iron", "island", "jacket", "jelly", "jewel", "jungle", "kettle", "kitchen", "ladder", "lamp", "lemon",
          "letter", "lizard", "magnet", "marble", "market", "mirror", "monkey", "mountain", "napkin", "needle",
          "nest", "nickel", "ocean", "onion", "orange", "oven", "paper", "parrot", "pencil", "piano", "pillow",
          "planet", "queen", "rabbit", "ribbon", "river", "robot", "rocket", "saddle", "shadow", "sheep", "shirt",
          "silver", "soap", "spider", "stone", "sugar", "table", "tent", "tiger", "tomato", "train", "truck",
          "tunnel", "umbrella", "uncle", "valley", "vase", "velvet", "violin", "wagon", "walnut", "whale", "wheel",
          "window", "winter", "yellow", "zebra")
_WORDS_PREFIX = "Words:"  # so that every word, the first too, is the same token in both passes (" word")


def induction(tokenizer, size: int = 64, seed: int = 0, batch_size: int = 8, length: int = 10) -> Task:
    """"Words: river lamp tiger cloud … river lamp" → " tiger": a sequence repeats, and the model predicts the
    next word from its first pass ([A][B] … [A] → [B]; Olsson et al. 2022, the induction task of Conmy et al.
    2023, in words rather than random tokens, so that every tokenizer reads them alike).

    ``length`` distinct words, drawn from those that are a single token, are followed by their first ``j``
    again, ``j`` from 2 to ``length`` − 1 at random, so the prompt ends at A (word ``j`` − 1) and the answer
    is B (word ``j``).  The corrupted prompt replaces B's first occurrence by a word the sequence lacks, whose
    repeat would then be the answer; the two prompts differ at that one token.  Metric ``logit_diff``:
    logit(B) − logit(the replacement).  Spans: ``A`` (the last word's first occurrence), ``B`` (the word after
    it, where the corruption changes the prompt), ``END`` (the last token, A's second occurrence): an induction
    head attends from ``END`` to ``B``, a previous-token head from ``B`` to ``A``.
    """
    if length < 3:
        raise ValueError(f"induction needs a sequence of at least 3 words (A, B and one before A's repeat), got "
                         f"length={length}")
    notes: list[str] = []
    words = _keep(_WORDS, [count == 1 for count in _token_counts(tokenizer, _WORDS)],
                  "words that are a single token", notes, minimum=length + 1)

    def draw(rng: random.Random) -> Example:
        *sequence, other = rng.sample(words, length + 1)
        j = rng.randrange(2, length)
        clean, starts = _WORDS_PREFIX, []
        for word in sequence + sequence[:j]:
            starts.append(len(clean) + 1)
            clean += " " + word
        a, b = [(starts[i], starts[i] + len(sequence[i])) for i in (j - 1, j)]
        corrupted = clean[:b[0]] + other + clean[b[1]:]
        return Example(clean, corrupted, (" " + sequence[j],), (" " + other,),
                       {"A": a, "B": b, "END": (len(clean) - 1, len(clean))})

    return _task("induction", tokenizer, _sample(tokenizer, draw, size, seed, notes), "logit_diff", batch_size,
                 notes)


TASKS: dict[str, Callable[..., Task]] = {"greater-than": greater_than, "sva": sva, "ioi": ioi, "ioi-abc": ioi_abc,
                                         "induction": induction}


def load(name: str, tokenizer, *, size: int = 64, seed: int = 0, batch_size: int = 8) -> Task:
    """The built-in task ``name`` (one of :data:`TASKS`), ``size`` examples drawn with ``seed``."""
    key = name.lower().replace("_", "-")
    if not is_count(size):
        raise ValueError(f"size={size!r}: a task's size is a count of examples, an int of at least 1")
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; the built-in tasks are {', '.join(TASKS)}; for your own data "
                         "use fxcircuits.tasks.from_file(path, tokenizer)")
    return TASKS[key](tokenizer, size=size, seed=seed, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------------
# custom data

_COLUMNS = ("clean", "corrupted", "correct", "incorrect")


def from_file(path: str | Path, tokenizer, *, metric: str | Metric | None = None, batch_size: int = 8,
              drop_mismatched: bool = False) -> Task:
    """A task from a CSV or JSONL file with fields ``clean``, ``corrupted``, ``correct``, ``incorrect``.

    Answers are continuations of the clean prompt, leading space included; several answers are separated by
    ``|`` in CSV and are a list in JSONL (where a string is one answer, ``|`` and all). The metric is ``metric`` if given, else the file's ``metric`` field
    (one value for the whole file), else ``logit_diff``. Malformed rows (missing fields, empty strings, bad
    JSON) raise ``ValueError`` listing the rows by line number. Rows whose clean and corrupted prompts
    tokenize to different lengths raise too, or with ``drop_mismatched=True`` are dropped with a warning
    naming their lines. An optional field ``spans`` names parts of the clean prompt by their character ranges,
    ``{"S2": [37, 41]}`` (in CSV, that JSON as text), the same names in every row (see ``data.make_batches``).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".jsonl"):
        raise ValueError(f"{path}: expected a .csv or .jsonl file")
    rows = _read_csv(path) if suffix == ".csv" else _read_jsonl(path)
    parsed = [(line, _parse_row(row, separated=suffix == ".csv")) for line, row in rows]
    problems = [f"line {line}: {result}" for line, result in parsed if isinstance(result, str)]
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError(f"{path}: {len(problems)} malformed row(s); every row needs non-empty "
                         f"{', '.join(_COLUMNS)}:\n  " + "\n  ".join(shown))
    if not parsed:
        raise ValueError(f"{path}: the file holds no rows")
    metric = metric if metric is not None else _file_metric(path, [row for _, row in rows])
    return _task(path.stem, tokenizer, [example for _, example in parsed], metric, batch_size,
                 [f"read {len(parsed)} rows from {path}"], labels=[f"line {line}" for line, _ in parsed],
                 drop_mismatched=drop_mismatched)


def _read_csv(path: Path) -> list[tuple[int, dict]]:
    with path.open(newline="", encoding="utf-8-sig") as file:  # -sig: a spreadsheet's byte-order mark
        reader = csv.DictReader(file)
        missing = [column for column in _COLUMNS if column not in (reader.fieldnames or ())]
        if missing:
            raise ValueError(f"{path}: the header (line 1) lacks the column(s) {', '.join(missing)}; expected "
                             f"{', '.join(_COLUMNS)} and optionally metric")
        rows, first = [], 2  # the line each record starts on: a quoted field may span several
        for row in reader:
            rows.append((first, row))
            first = reader.line_num + 1
        return rows


def _read_jsonl(path: Path) -> list[tuple[int, dict | str]]:
    """(line number, object) per non-blank line; a line that is not a JSON object is kept as its error."""
    rows = []
    for line, text in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as error:
            rows.append((line, f"not valid JSON ({error.msg})"))
            continue
        rows.append((line, row if isinstance(row, dict) else "not a JSON object"))  # a JSON string is no row either
    return rows


def _parse_row(row: dict | str, separated: bool) -> Example | str:
    """The row as an Example, or a description of what is wrong with it; ``separated``: its answers are strings
    of answers separated by ``|`` (CSV's)."""
    if isinstance(row, str):
        return row
    if None in row:  # csv.DictReader's key for fields beyond the header's
        return "more fields than the header has (quote fields that contain commas)"
    prompts = {key: row.get(key) for key in ("clean", "corrupted")}
    answers = {key: _answers(row.get(key), separated) for key in ("correct", "incorrect")}
    bad = [key for key, value in prompts.items() if not (isinstance(value, str) and value.strip())]
    bad += [key for key, value in answers.items() if value is None]
    if bad:
        return f"missing or empty {', '.join(bad)}"
    spans = _spans(row.get("spans"))
    if spans is None:
        return 'spans must be an object from names to character ranges, {"S2": [37, 41]}'
    return Example(prompts["clean"], prompts["corrupted"], answers["correct"], answers["incorrect"], spans)


def _spans(value) -> dict[str, tuple[int, int]] | None:
    """A spans field (an object in JSONL, its JSON text in CSV) as name → (start, stop); {} if absent, None if
    malformed."""
    if value is None or value == "":
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return None
    ranges = value.values() if isinstance(value, dict) else None
    if ranges is None or not all(isinstance(r, list) and len(r) == 2 and all(type(c) is int for c in r)
                                 for r in ranges):
        return None
    return {str(name): (r[0], r[1]) for name, r in value.items()}


def _answers(value, separated: bool) -> tuple[str, ...] | None:
    """An answer field's strings ("a|b" in CSV, where ``separated``; a list, or one string, in JSONL: " |" is an
    answer there), or None if missing or any part is empty."""
    parts = (value.split("|") if separated else [value]) if isinstance(value, str) else value
    if not isinstance(parts, list) or not parts or not all(isinstance(p, str) and p.strip() for p in parts):
        return None
    return tuple(parts)


def _file_metric(path: Path, rows: list[dict]) -> str:
    given = [row["metric"] for row in rows if row.get("metric")]
    wrong = [name for name in given if not isinstance(name, str)]
    if wrong:
        raise ValueError(f"{path}: the metric field names a metric, such as \"kl\"; got {wrong[0]!r}")
    names = set(given)
    if len(names) > 1:
        raise ValueError(f"{path}: the metric field holds several metrics ({', '.join(sorted(names))}); a task "
                         "has one metric, so use one value throughout or pass metric=")
    return names.pop() if names else "logit_diff"
