"""Built-in tasks and from_file: well-formed answers, aligned pairs, and (slow) positive baselines on SmolLM2."""
import csv
import json
import re

import pytest
import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from fxcircuits import metrics, tasks
from fxcircuits.data import position_classes
from test_models import smollm2, smollm2_tokenizer

SIZE = 24


@pytest.fixture(scope="module")
def tokenizer():
    return smollm2_tokenizer()


@pytest.fixture(scope="module")
def built(tokenizer):
    return {name: tasks.load(name, tokenizer, size=SIZE, seed=0, batch_size=8) for name in tasks.TASKS}


def rows(task, key):
    """Every batch row of ``key`` as a list of real (non-padding) ids, in example order."""
    out = []
    for batch in task.batches:
        for values, mask in zip(batch[key], batch["attention_mask"]):
            out.append(values[mask.bool()].tolist() if key in ("clean", "corrupted") else values[values >= 0].tolist())
    return out


def first_tokens(tokenizer, prompt, answers):
    return [tokenizer(prompt + answer).input_ids[len(tokenizer(prompt).input_ids)] for answer in answers]


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_examples_batches_and_answers_agree(built, tokenizer, name):
    task = built[name]
    assert len(task.examples) == SIZE and task.notes
    assert sum(b["clean"].shape[0] for b in task.batches) == SIZE
    for example, clean, corrupted, correct, incorrect in zip(task.examples, rows(task, "clean"),
                                                             rows(task, "corrupted"), rows(task, "correct"),
                                                             rows(task, "incorrect")):
        assert clean == tokenizer(example.clean).input_ids and corrupted == tokenizer(example.corrupted).input_ids
        assert len(clean) == len(corrupted)
        assert correct == first_tokens(tokenizer, example.clean, example.correct)
        assert incorrect == first_tokens(tokenizer, example.clean, example.incorrect)
        assert [tokenizer.decode([t]) for t in correct + incorrect] == list(example.correct + example.incorrect)


@pytest.mark.parametrize("name, differing", [("ioi", 1), ("ioi-abc", 3), ("sva", 1), ("greater-than", 2),
                                             ("induction", 1)])
def test_corruption_changes_only_the_task_tokens(built, name, differing):
    task = built[name]
    for clean, corrupted in zip(rows(task, "clean"), rows(task, "corrupted")):
        assert sum(a != b for a, b in zip(clean, corrupted)) == differing


def test_ioi_abc_is_ioi_with_every_name_of_the_corrupted_prompt_replaced(built):
    """The same clean prompts and answers as ``ioi``; the corrupted prompt names none of the clean prompt's names."""
    for s2, abc in zip(built["ioi"].examples, built["ioi-abc"].examples):
        assert (abc.clean, abc.correct, abc.incorrect) == (s2.clean, s2.correct, s2.incorrect)
        assert abc.corrupted.split()[-2:] == s2.corrupted.split()[-2:]
        assert not {name.strip() for name in abc.correct + abc.incorrect} & set(abc.corrupted.replace(",", " ").split())
    with pytest.raises(ValueError, match="unknown IOI corruption 'xyz'; choose one of s2, abc"):
        tasks.ioi(smollm2_tokenizer(), size=2, corruption="xyz")


def test_seed_decides_the_examples(tokenizer, built):
    assert tasks.load("ioi", tokenizer, size=SIZE, seed=0).examples == built["ioi"].examples
    assert tasks.load("ioi", tokenizer, size=SIZE, seed=1).examples != built["ioi"].examples


def test_ioi_answers_are_the_indirect_object_and_the_subject(built):
    for example in built["ioi"].examples:
        (io,), (subject,) = example.correct, example.incorrect
        assert example.clean.count(io) == 1 and example.clean.count(subject) == 2
        assert example.corrupted.count(subject) == 1 and example.corrupted.count(io) == 1


def test_sva_correct_verbs_agree_with_the_clean_subject(built):
    plurals = {plural for _, plural in tasks._NOUNS}
    for example in built["sva"].examples:
        subject = example.clean.split(" that the ")[1].split()[0]
        assert set(example.correct) == ({" are", " were", " have"} if subject in plurals else {" is", " was", " has"})


def test_induction_repeats_the_sequence_up_to_a_and_answers_the_word_after_its_first_occurrence(built):
    """By token: the prompt ends with the first j words again, A's first occurrence is the last token's, B follows
    it and is the answer, and the corrupted prompt's B, a word the sequence lacks, is the incorrect answer."""
    task, lengths = built["induction"], set()
    for batch in task.batches:
        for row, (clean, corrupted) in enumerate(zip(batch["clean"].tolist(), batch["corrupted"].tolist())):
            (a, _), (b, _), (end, _) = (batch["spans"][name][row].tolist() for name in ("A", "B", "END"))
            first = 2  # "Words:" is two tokens
            j = b - first  # B is word j
            assert b == a + 1 and clean[end] == clean[a] and clean[end - j + 1:end + 1] == clean[first:first + j]
            assert len(set(clean[first:b + 1])) == b + 1 - first and len(clean[first:end + 1]) == 10 + j
            assert batch["correct"][row, 0] == clean[b] and batch["incorrect"][row, 0] == corrupted[b]
            assert corrupted[b] not in clean[first:end + 1]
            lengths.add(j)
    assert lengths <= set(range(2, 10)) and len(lengths) > 3


def test_induction_takes_the_sequence_length(tokenizer):
    task = tasks.induction(tokenizer, size=4, length=3)
    assert all(len(example.clean.split()) - 1 == 3 + 2 for example in task.examples)  # j = 2 alone
    with pytest.raises(ValueError, match="at least 3 words .* got length=2"):
        tasks.induction(tokenizer, size=4, length=2)


def test_greater_than_digit_by_digit_is_the_exact_two_digit_metric(built):
    """SmolLM2 splits years into digits: the start year ends in 9, so the tens digit decides."""
    assert "digit by digit" in built["greater-than"].notes[0]
    for example in built["greater-than"].examples:
        year = re.search(r"from (\d{4})", example.clean).group(1)
        tens = int(year[2])
        assert year[3] == "9" and example.corrupted.replace(f"from {year[:2]}01", f"from {year}") == example.clean
        assert example.correct == tuple(str(d) for d in range(tens + 1, 10))
        assert example.incorrect == tuple(str(d) for d in range(tens + 1))


def toy_tokenizer(pattern):
    """A word-level tokenizer for the greater-than prompts whose pre-tokenizer decides how years split."""
    words = ["[UNK]", "The", " lasted", " from", " to"] + [" " + event for event in tasks._EVENTS]
    words += [f" {c}" for c in range(11, 19)] + [f"{v:02d}" for v in range(100)] + [str(d) for d in range(10)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="[UNK]")


# The span each task's corruption changes: the tokens where its clean and corrupted prompts differ lie there.
CHANGED = {"ioi": ["S2"], "ioi-abc": ["IO", "S1", "S2"], "greater-than": ["YY"], "sva": ["subject"],
           "induction": ["B"]}


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_built_in_tasks_name_their_spans_in_every_example(built, tokenizer, name):
    task = built[name]
    for batch in task.batches:
        assert list(batch["spans"]) == {"ioi": ["IO", "S1", "S2", "END"], "ioi-abc": ["IO", "S1", "S2", "END"],
                                        "greater-than": ["YY", "END"],
                                        "sva": ["subject", "END"], "induction": ["A", "B", "END"]}[name]
        last = batch["attention_mask"].sum(-1)
        assert (batch["spans"]["END"][:, 1] == last).all()  # SVA's END: the attractor noun, all its tokens
        assert name == "sva" or (batch["spans"]["END"][:, 0] == last - 1).all()
        for row, index in enumerate(batch["index"].tolist()):
            example, ids = task.examples[index], batch["clean"][row]
            for span, (start, stop) in example.spans.items():
                (a, b) = batch["spans"][span][row].tolist()
                words = tokenizer.decode(ids[a:b]).strip()  # END's last character lies in its last word
                assert words == example.clean[start:stop] or (span == "END" and b - a == 1 and
                                                              words.endswith(example.clean[start:stop]))
            differ = (ids != batch["corrupted"][row]).nonzero().flatten().tolist()
            changed = [p for span in CHANGED[name] for p in range(*batch["spans"][span][row].tolist())]
            assert differ and differ == sorted(changed)


def test_sva_spans_are_the_subject_and_the_attractor_noun_that_ends_the_prompt(built, tokenizer):
    """SVA's END is its attractor, the noun the verb is predicted after (all its tokens), so that its spans cut the
    prompts into disjoint classes, as positional circuits need: a span of the attractor beside END overlapped it."""
    task = built["sva"]
    for batch in task.batches:
        assert position_classes(batch)[0] == ["subject", "END", "rest"]
        for row, index in enumerate(batch["index"].tolist()):
            clean, spans = task.examples[index].clean, task.examples[index].spans
            subject, attractor = re.fullmatch(r".* that the (\w+) .* the (\w+)", clean).groups()
            assert clean[slice(*spans["END"])] == attractor and spans["END"][1] == len(clean)  # the word, whole
            for span, noun in (("subject", subject), ("END", attractor)):
                start, stop = batch["spans"][span][row].tolist()
                assert tokenizer.decode(batch["clean"][row, start:stop]) == " " + noun


@pytest.mark.parametrize("name", ["ioi", "ioi-abc"])
def test_ioi_spans_are_the_names_answers_are_made_of(built, name):
    for batch in built[name].batches:
        at = {name: ranges[:, 0] for name, ranges in batch["spans"].items()}
        token = lambda name: batch["clean"].gather(1, at[name][:, None])[:, 0]  # noqa: E731
        assert (token("IO") == batch["correct"][:, 0]).all() and (token("S2") == batch["incorrect"][:, 0]).all()
        assert (token("S1") == token("S2")).all() and (at["S1"] < at["S2"]).all() and (at["IO"] < at["S2"]).all()


def test_greater_than_with_two_digit_year_tokens():
    """GPT-2 style (" 17" + "41"): the answers are the tokens "00".."99", correct above YY."""
    tokenizer = toy_tokenizer(r" ?[A-Za-z]+| ?\d\d|\d| ")
    task = tasks.load("greater-than", tokenizer, size=SIZE)
    assert "two-digit" in task.notes[0]
    for example, correct, incorrect in zip(task.examples, rows(task, "correct"), rows(task, "incorrect")):
        yy = int(re.search(r"from \d\d(\d\d)", example.clean).group(1))
        assert [tokenizer.decode([t]) for t in correct] == [f"{y:02d}" for y in range(yy + 1, 100)]
        assert [tokenizer.decode([t]) for t in incorrect] == [f"{y:02d}" for y in range(yy + 1)]


def test_greater_than_refuses_other_year_splits():
    with pytest.raises(ValueError, match="century \\+ two-digit tokens .* or digit by digit"):
        tasks.load("greater-than", toy_tokenizer(r" ?[A-Za-z]+| ?\d+| "), size=4)


def test_an_unknown_task_or_no_examples_is_refused(tokenizer):
    for size in (0, 2.5):  # 2.5 made three examples
        with pytest.raises(ValueError, match=f"size={size}: a task's size is a count of examples, an int of at"):
            tasks.load("ioi", tokenizer, size=size)
    with pytest.raises(ValueError, match="greater-than, sva, ioi, ioi-abc.*from_file"):
        tasks.load("docstring", tokenizer)


def write_csv(path, rows):
    with path.open("w", newline="", encoding="utf-8") as file:
        csv.writer(file).writerows(rows)
    return path


IOI = "When Mary and John went to the store, John gave a drink to"
IOI_CORRUPTED = "When Mary and John went to the store, Paul gave a drink to"
SVA = ["The keys on the cabinet", "The key on the cabinet", " are", " is"]
HEADER = ["clean", "corrupted", "correct", "incorrect"]


def test_from_csv_and_jsonl(tmp_path, tokenizer):
    csv_path = write_csv(tmp_path / "mine.csv", [HEADER + ["metric"], [IOI, IOI_CORRUPTED, " Mary| Marie", " John",
                                                                        "prob_diff"], [*SVA, "prob_diff"]])
    jsonl_path = tmp_path / "mine.jsonl"
    jsonl_path.write_text(json.dumps({"clean": IOI, "corrupted": IOI_CORRUPTED, "correct": [" Mary", " Marie"],
                                      "incorrect": " John"}) + "\n\n", encoding="utf-8")
    from_csv, from_jsonl = tasks.from_file(csv_path, tokenizer), tasks.from_file(jsonl_path, tokenizer)
    assert from_csv.name == "mine" and from_csv.metric is metrics.prob_diff and from_jsonl.metric is metrics.logit_diff
    assert from_csv.examples[0] == from_jsonl.examples[0] == tasks.Example(IOI, IOI_CORRUPTED, (" Mary", " Marie"),
                                                                            (" John",))
    assert rows(from_csv, "correct")[:1] == rows(from_jsonl, "correct")
    assert tasks.from_file(csv_path, tokenizer, metric="logprob").metric is metrics.logprob
    piped = tmp_path / "piped.jsonl"  # in JSONL a string is one answer: "|" is no separator there
    piped.write_text(json.dumps({"clean": IOI, "corrupted": IOI_CORRUPTED, "correct": " Mary| Marie",
                                 "incorrect": " |"}) + "\n", encoding="utf-8")
    assert tasks.from_file(piped, tokenizer).examples[0] == tasks.Example(IOI, IOI_CORRUPTED, (" Mary| Marie",),
                                                                          (" |",))
    for path in (csv_path, jsonl_path):  # saved by a spreadsheet or an editor with a byte-order mark: the same task
        marked = path.with_name("marked" + path.suffix)
        marked.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
        assert tasks.from_file(marked, tokenizer).examples == tasks.from_file(path, tokenizer).examples


def test_from_file_reads_spans_as_character_ranges(tmp_path, tokenizer):
    spans = {"IO": [5, 9], "S2": [IOI.rindex("John"), IOI.rindex("John") + 4]}
    jsonl = tmp_path / "spans.jsonl"
    jsonl.write_text(json.dumps({"clean": IOI, "corrupted": IOI_CORRUPTED, "correct": " Mary", "incorrect": " John",
                                 "spans": spans}) + "\n", encoding="utf-8")
    csv_path = write_csv(tmp_path / "spans.csv", [HEADER + ["spans"], [IOI, IOI_CORRUPTED, " Mary", " John",
                                                                      json.dumps(spans)]])
    for path in (jsonl, csv_path):
        task = tasks.from_file(path, tokenizer)
        assert task.examples[0].spans == {"IO": (5, 9), "S2": tuple(spans["S2"])}
        (batch,) = task.batches
        assert [tokenizer.decode(batch["clean"][0, a:b]) for (a, b) in
                (r[0].tolist() for r in batch["spans"].values())] == [" Mary", " John"]
    bad = write_csv(tmp_path / "bad_spans.csv", [HEADER + ["spans"], [IOI, IOI_CORRUPTED, " Mary", " John", "[5, 9]"],
                                                 [IOI, IOI_CORRUPTED, " Mary", " John", '{"IO": [5, "9"]}']])
    with pytest.raises(ValueError, match=r"(?s)line 2: spans must be.*line 3: spans must be"):
        tasks.from_file(bad, tokenizer)


def test_from_file_reports_every_bad_row_by_line(tmp_path, tokenizer):
    path = write_csv(tmp_path / "bad.csv", [HEADER, [IOI, IOI_CORRUPTED, " Mary", " John"],
                                            [IOI, "", " Mary", " John"], [IOI, IOI_CORRUPTED, " Mary||x", " John"],
                                            [IOI, IOI_CORRUPTED], [*SVA, "extra"]])
    with pytest.raises(ValueError) as error:
        tasks.from_file(path, tokenizer)
    assert "4 malformed row(s)" in str(error.value)
    for expected in ("line 3: missing or empty corrupted", "line 4: missing or empty correct",
                     "line 5: missing or empty correct, incorrect", "line 6: more fields than the header"):
        assert expected in str(error.value)
    spread = write_csv(tmp_path / "spread.csv", [HEADER, [IOI + "\nand on", "", " Mary", " John"], [*SVA]])
    with pytest.raises(ValueError, match="line 2: missing or empty corrupted"):  # where the record starts
        tasks.from_file(spread, tokenizer)
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(f'{{"clean": "{IOI}"}}\n[1]\nnot json\n"hello"\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"(?s)line 1: missing or empty corrupted, correct, incorrect.*"
                                         r"line 2: not a JSON object.*line 3: not valid JSON.*line 4: not a JSON "
                                         r"object"):  # a string, not taken for its own error
        tasks.from_file(jsonl, tokenizer)
    listed = tmp_path / "listed.jsonl"
    listed.write_text(json.dumps({"clean": IOI, "corrupted": IOI_CORRUPTED, "correct": " Mary", "incorrect": " John",
                                  "metric": ["kl"]}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"the metric field names a metric, such as \"kl\"; got \['kl'\]"):
        tasks.from_file(listed, tokenizer)
    with pytest.raises(ValueError, match="lacks the column"):
        tasks.from_file(write_csv(tmp_path / "header.csv", [["clean", "corrupted", "answer"], ["a", "b", "c"]]),
                        tokenizer)


def test_from_file_mismatched_rows_error_or_drop_with_a_warning(tmp_path, tokenizer):
    long = "When Mary and John went to the store, Bartholomew gave a drink to"
    path = write_csv(tmp_path / "mixed.csv", [HEADER, [IOI, long, " Mary", " John"],
                                              [IOI, IOI_CORRUPTED, " Mary", " John"]])
    with pytest.raises(ValueError, match="line 2: the clean prompt is 14 tokens but the corrupted prompt is 16"):
        tasks.from_file(path, tokenizer)
    with pytest.warns(UserWarning, match="dropped 1 of 2 .*: line 2") as caught:
        task = tasks.from_file(path, tokenizer, drop_mismatched=True)
    assert [w.filename for w in caught] == [__file__]  # through tasks too, not a frame inside the package
    assert [e.corrupted for e in task.examples] == [IOI_CORRUPTED]


def test_baseline_runs_any_callable_and_fills_clean_logits_for_kl(tmp_path, tokenizer):
    path = write_csv(tmp_path / "two.csv", [HEADER, [IOI, IOI_CORRUPTED, " Mary", " John"], SVA])
    task = tasks.from_file(path, tokenizer)
    correct = {tuple(row) for row in rows(task, "clean")}

    def model(input_ids, attention_mask):
        """Logit 3 on every example's correct answer in clean runs, 1 in corrupted ones."""
        logits = torch.zeros(*input_ids.shape, len(tokenizer))
        for b, batch_row in enumerate(task.batches[0]["correct"]):
            real = input_ids[b][attention_mask[b].bool()]
            logits[b, :, batch_row[0]] = 3.0 if tuple(real.tolist()) in correct else 1.0
        return logits

    assert task.baseline(model) == pytest.approx(3.0)
    assert task.baseline(model, corrupted=True) == pytest.approx(1.0)
    task.metric = metrics.get("kl")
    assert task.baseline(model) == pytest.approx(0.0, abs=1e-6)
    assert task.baseline(model, corrupted=True) < 0


# Measured on SmolLM2-135M-Instruct (float32, CPU), size 16, seed 0: clean IOI 4.28, greater-than 0.911,
# SVA 0.234; over seeds 0-3 the per-example standard deviations are 2.1, 0.076 and 0.17, so each floor below
# is > 4 standard errors of a 16-example mean under its measurement. Corrupted runs measured lower in all three
# (size 64: IOI 0.64, greater-than -0.79, SVA -0.28). Induction (measured 2026-12-06): clean 6.70 at seed 0, 6.43
# to 8.49 over seeds 0-3, per-example standard deviation 2.1 to 3.1; corrupted -7.0 to -8.3.
FLOORS = {"ioi": 2.0, "ioi-abc": 2.0, "greater-than": 0.7, "sva": 0.1, "induction": 4.0}


@pytest.mark.slow
def test_smollm2_does_every_task():
    model, tokenizer = smollm2()
    measured = {}
    for name in FLOORS:
        task = tasks.load(name, tokenizer, size=16, seed=0, batch_size=16)
        measured[name] = (task.baseline(model), task.baseline(model, corrupted=True))
    summary = ", ".join(f"{name} clean {clean:.3f} corrupted {bad:.3f}" for name, (clean, bad) in measured.items())
    assert all(measured[name][0] > floor for name, floor in FLOORS.items()), summary
    assert all(clean > bad for clean, bad in measured.values()), summary
