"""make_batches and check_batch on SmolLM2's real tokenizer."""
import copy
import re

import pytest
import torch

from fxcircuits import metrics
from fxcircuits.data import check_batch, example, make_batches, to_device
from test_models import smollm2_tokenizer

IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Paul gave a drink to"
SHORT = "The keys on the cabinet"


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


def decode(tokenizer, row):
    return [tokenizer.decode([t]) for t in row.tolist() if t >= 0]


def test_pairs_are_aligned_and_right_padded(tokenizer):
    (batch,) = make_batches(tokenizer, [IOI, SHORT], [IOI_CORRUPTED, "The key on the cabinet"],
                            [" Mary", [" are", " were"]], [" John", [" is"]])
    n_ioi, n_short = len(tokenizer(IOI).input_ids), len(tokenizer(SHORT).input_ids)
    assert batch["clean"].shape == batch["corrupted"].shape == batch["attention_mask"].shape == (2, n_ioi)
    assert batch["attention_mask"].sum(-1).tolist() == [n_ioi, n_short]
    assert batch["clean"][0].tolist() == tokenizer(IOI).input_ids  # the tokenizer's own (no) BOS
    assert batch["clean"][1, :n_short].tolist() == tokenizer(SHORT).input_ids
    assert decode(tokenizer, batch["correct"][0]) == [" Mary"] and decode(tokenizer, batch["incorrect"][0]) == [" John"]
    assert decode(tokenizer, batch["correct"][1]) == [" are", " were"] and batch["correct"][0, 1] == -1
    assert metrics.answer_position(batch).tolist() == [n_ioi - 1, n_short - 1]


def test_left_padding_scores_the_last_token(tokenizer):
    (batch,) = make_batches(tokenizer, [IOI, SHORT], [IOI_CORRUPTED, "The key on the cabinet"],
                            [" Mary", " are"], [" John", " is"], padding_side="left")
    assert batch["attention_mask"][1, 0] == 0 and batch["clean"][1, -1].item() == tokenizer(SHORT).input_ids[-1]
    assert metrics.answer_position(batch).tolist() == [batch["clean"].shape[1] - 1] * 2


def test_multi_token_answers_use_their_first_token_once(tokenizer):
    (batch,) = make_batches(tokenizer, [IOI], [IOI_CORRUPTED], [[" Mary Ann", " Mary", " Marie"]], [" John"])
    assert decode(tokenizer, batch["correct"][0]) == [" Mary", " Marie"]


def test_batch_size_splits_and_index_records_examples(tokenizer):
    batches = make_batches(tokenizer, [IOI] * 5, [IOI_CORRUPTED] * 5, [" Mary"] * 5, [" John"] * 5, batch_size=2)
    assert [b["clean"].shape[0] for b in batches] == [2, 2, 1]
    assert torch.cat([b["index"] for b in batches]).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("side", ["left", "right"])
def test_one_example_as_a_batch_of_its_own_loses_its_padding(tokenizer, side):
    (batch,) = make_batches(tokenizer, [IOI, SHORT], [IOI_CORRUPTED, "The key on the cabinet"],
                            [" Mary", [" are", " were"]], [" John", [" is"]], padding_side=side)
    short = example(batch, 1)
    assert short["clean"].tolist() == [tokenizer(SHORT).input_ids] and short["attention_mask"].all()
    assert short["corrupted"].tolist() == [tokenizer("The key on the cabinet").input_ids]
    assert short["correct"].tolist() == batch["correct"][1:].tolist()
    assert metrics.answer_position(short).tolist() == [len(tokenizer(SHORT).input_ids) - 1]
    second_last = int(batch["attention_mask"][1].nonzero()[-2])
    pinned = example({**batch, "position": torch.tensor([3, second_last])}, 1)
    assert pinned["position"].tolist() == [len(tokenizer(SHORT).input_ids) - 2]  # a given position moves with them
    with pytest.raises(IndexError, match="holds 2 examples"):
        example(batch, 2)


def test_mismatched_lengths_name_the_example_counts_tokens_and_the_fix(tokenizer):
    corrupted = "When Mary and John went to the store, Bartholomew gave a drink to"
    with pytest.raises(ValueError) as error:
        make_batches(tokenizer, [IOI, IOI], [IOI_CORRUPTED, corrupted], [" Mary"] * 2, [" John"] * 2)
    message = str(error.value)
    n_clean, n_corrupted = len(tokenizer(IOI).input_ids), len(tokenizer(corrupted).input_ids)
    assert message.startswith(f"example 1: the clean prompt is {n_clean} tokens but the corrupted prompt is "
                              f"{n_corrupted} tokens")
    assert "' John'" in message and "' Barth', 'olome'" in message  # the tokens themselves
    assert "rephrase" in message and "drop_mismatched=True" in message


def test_no_pairs_or_no_room_in_a_batch_is_refused(tokenizer):
    with pytest.raises(ValueError, match="no prompt pairs given"):
        make_batches(tokenizer, [], [], [], [])
    with pytest.raises(ValueError, match="batch_size must be at least 1, got 0"):
        make_batches(tokenizer, [IOI], [IOI_CORRUPTED], [" Mary"], [" John"], batch_size=0)
    with pytest.raises(TypeError, match="lists of prompts, one per example; got a single string"):
        make_batches(tokenizer, IOI, IOI_CORRUPTED, " Mary", " John")
    for correct, incorrect in (("Paris", ["Tokyo"] * 5), ([" Paris"] * 5, "Tokyo")):  # five prompts, five letters
        with pytest.raises(TypeError, match="lists of answers, one per example .*got a single string"):
            make_batches(tokenizer, [IOI] * 5, [IOI_CORRUPTED] * 5, correct, incorrect)
    with pytest.raises(ValueError, match=r"must have one entry per example; got lengths 2, 2, 2, 2, 1 \(labels\)"):
        make_batches(tokenizer, [IOI] * 2, [IOI_CORRUPTED] * 2, [" Mary"] * 2, [" John"] * 2, labels=["one"])
    for answer in (None, [" Mary", 3]):  # a missing value read from a table, a number among strings
        with pytest.raises(TypeError, match=r"answers are a string or a list of strings \(' Mary' or"):
            make_batches(tokenizer, [IOI], [IOI_CORRUPTED], [answer], [" John"])


def test_drop_mismatched_warns_with_count_and_which(tokenizer):
    corrupted = "When Mary and John went to the store, Bartholomew gave a drink to"
    with pytest.warns(UserWarning, match=re.escape("dropped 1 of 3 prompt pairs") + ".*example 1") as caught:
        batches = make_batches(tokenizer, [IOI] * 3, [IOI_CORRUPTED, corrupted, IOI_CORRUPTED], [" Mary"] * 3,
                               [" John"] * 3, drop_mismatched=True)
    assert [w.filename for w in caught] == [__file__]  # the line that called, not one inside the package
    assert batches[0]["index"].tolist() == [0, 2]


def test_answers_that_merge_into_the_prompt_or_overlap_are_errors(tokenizer):
    with pytest.raises(ValueError, match="example 0: the correct answer 's' does not tokenize as a continuation"):
        make_batches(tokenizer, ["The cat"], ["The dog"], ["s"], [" is"])
    with pytest.raises(ValueError, match="both correct and incorrect"):
        make_batches(tokenizer, [IOI], [IOI_CORRUPTED], [" Mary Ann"], [" Mary Lou"])
    with pytest.raises(ValueError, match="example 0: it has no incorrect answer"):
        make_batches(tokenizer, [IOI], [IOI_CORRUPTED], [" Mary"], [[]])


def test_tokenizer_without_pad_token_pads_with_eos(tokenizer):
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    (batch,) = make_batches(no_pad, [IOI, SHORT], [IOI_CORRUPTED, "The key on the cabinet"], [" Mary", " are"],
                            [" John", " is"])
    assert batch["clean"][1, -1].item() == no_pad.eos_token_id


def test_a_pad_token_added_past_the_vocabulary_is_not_written(tokenizer):
    """A pad token added to the tokenizer alone (id 49152 of SmolLM2's 49152) has no embedding in the model: the
    masked padding is written with EOS instead, an id every model of that tokenizer embeds."""
    added = copy.deepcopy(tokenizer)
    added.add_special_tokens({"pad_token": "<pad>"})
    assert added.pad_token_id >= added.vocab_size
    (batch,) = make_batches(added, [IOI, SHORT], [IOI_CORRUPTED, "The key on the cabinet"], [" Mary", " are"],
                            [" John", " is"])
    assert batch["clean"][1, -1].item() == added.eos_token_id and batch["clean"].max() < added.vocab_size


def test_a_tokenizer_that_ends_every_text_with_eos_is_refused_naming_it(tokenizer):
    """Every prompt would end with EOS, and the answer be scored after it: refused naming the token, not the
    answers (which then fail to continue any prompt)."""
    from tokenizers import processors
    appends = copy.deepcopy(tokenizer)
    eos = appends.eos_token
    appends._tokenizer.post_processor = processors.TemplateProcessing(single=f"$A {eos}",
                                                                      special_tokens=[(eos, appends.eos_token_id)])
    with pytest.raises(ValueError, match=f"the tokenizer appends {re.escape(repr(eos))} to every text it encodes"):
        make_batches(appends, [IOI], [IOI_CORRUPTED], [" Mary"], [" John"])


def good_batch():
    return {"clean": torch.tensor([[1, 2, 3], [4, 5, 0]]), "corrupted": torch.tensor([[1, 9, 3], [4, 8, 0]]),
            "attention_mask": torch.tensor([[1, 1, 1], [1, 1, 0]]),
            "correct": torch.tensor([[7, -1], [8, 9]]), "incorrect": torch.tensor([[6], [5]])}


def test_check_batch_accepts_a_good_batch():
    check_batch(good_batch(), vocab_size=10)
    check_batch({**good_batch(), "position": torch.tensor([2, 1]), "clean_logits": torch.zeros(2, 10)})


@pytest.mark.parametrize("change, message", [
    (lambda b: b.pop("incorrect"), r"missing 'incorrect'"),
    (lambda b: b.update(clean=b["clean"].int()), r"batch\['clean'\] must be token ids \[B, S\] of dtype torch.int64"),
    (lambda b: b.update(corrupted=b["corrupted"][:, :2]), r"batch\['corrupted'\] must be token ids aligned"),
    (lambda b: b.update(attention_mask=b["attention_mask"] * 2), r"attention_mask.*only 0 and 1"),
    (lambda b: b.update(attention_mask=torch.tensor([[1, 1, 1], [0, 0, 0]])), r"attention_mask.*no real token"),
    (lambda b: b.update(correct=torch.tensor([[7, -1], [-1, -1]])), r"batch\['correct'\] has a row with no answer"),
    (lambda b: b.update(incorrect=torch.tensor([[6]])), r"batch\['incorrect'\] has 1 rows but batch\['clean'\] has 2"),
    (lambda b: b.update(clean=b["clean"] + 7), r"batch\['clean'\] must hold token ids >= 0 < 10; it ranges over 7..12"),
    (lambda b: b.update(correct=torch.tensor([[7, -2], [8, 9]])), r"batch\['correct'\] must hold answer token ids"),
    (lambda b: b.update(position=torch.tensor([2, 2])), r"batch\['position'\] points at a padded token"),
    (lambda b: b.update(position=torch.tensor([2, 3])), r"batch\['position'\] must lie in 0..2"),
    (lambda b: b.update(clean_logits=torch.full((2, 10), float("nan"))), r"clean_logits.*NaN"),
    (lambda b: b.update(clean_logits=torch.zeros(3, 10)), r"clean_logits.*\[B=2, V\]"),
])
def test_check_batch_names_the_key_and_what_is_expected(change, message):
    batch = good_batch()
    change(batch)
    with pytest.raises(ValueError, match=message):
        check_batch(batch, vocab_size=10)


def _span(prompt: str, word: str, last: bool = False) -> tuple[int, int]:
    start = prompt.rindex(word) if last else prompt.index(word)
    return start, start + len(word)


SPANS = [{"IO": _span(IOI, "Mary"), "S2": _span(IOI, "John", last=True)},
         {"IO": _span(SHORT, "keys"), "S2": _span(SHORT, "the cabinet")}]


@pytest.mark.parametrize("side", ["left", "right"])
def test_spans_become_the_tokens_they_overlap_wherever_padding_puts_them(tokenizer, side):
    (batch,) = make_batches(tokenizer, [IOI, SHORT], [IOI_CORRUPTED, "The key on the cabinet"], [" Mary", " are"],
                            [" John", " is"], padding_side=side, spans=SPANS)
    assert list(batch["spans"]) == ["IO", "S2"]
    words = {name: [tokenizer.decode(row[a:b]) for row, (a, b) in zip(batch["clean"], ranges.tolist())]
             for name, ranges in batch["spans"].items()}
    assert words == {"IO": [" Mary", " keys"], "S2": [" John", " the cabinet"]}
    shift = batch["clean"].shape[1] - len(tokenizer(SHORT).input_ids) if side == "left" else 0
    assert batch["spans"]["IO"][1].tolist() == [1 + shift, 2 + shift]
    short = example(batch, -1)
    assert short["spans"]["S2"].tolist() == [[3, 5]] and tokenizer.decode(short["clean"][0, 3:5]) == " the cabinet"
    moved = to_device(batch, "meta")
    assert moved["spans"]["IO"].device.type == "meta" and batch["spans"]["IO"].device.type == "cpu"


def test_bad_spans_are_refused_by_name(tokenizer):
    def batches(spans, prompts=(IOI, SHORT)):
        return make_batches(tokenizer, list(prompts), [IOI_CORRUPTED, "The key on the cabinet"][:len(prompts)],
                            [" Mary", " are"][:len(prompts)], [" John", " is"][:len(prompts)], spans=spans)
    with pytest.raises(ValueError, match=r"example 1 names the spans \['IO'\] but example 0 names \['IO', 'S2'\]"):
        batches([SPANS[0], {"IO": SPANS[1]["IO"]}])
    with pytest.raises(ValueError, match=r"example 1: span 'S2' is \(20, 99\); .*<= 23"):
        batches([SPANS[0], {**SPANS[1], "S2": (20, 99)}])
    with pytest.raises(ValueError, match="name no part"):
        batches([{}, {}])
    with pytest.raises(ValueError, match="and spans, if given"):
        batches(SPANS[:1])
    (batch,) = batches(SPANS)
    for spans, problem in [({"IO": torch.tensor([1, 2])}, "LongTensor \\[B=2, 2\\]"),
                           ({"IO": torch.tensor([[1, 1], [0, 2]])}, "0 <= start < stop"),
                           ({"IO": torch.tensor([[1, 2], [0, 14]])}, "covers padded tokens"), ({}, "a dict")]:
        with pytest.raises(ValueError, match=problem):
            check_batch({**batch, "spans": spans})
