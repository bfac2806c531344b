"""MIB submissions: edge scores laid out as the MIB leaderboard's circuit localization track reads them.

The leaderboard reads one folder per task and model, named ``{task}_{model}`` with its short names (``ioi_gpt2``,
``arc-easy_llama3``; an underscore parts the two, so a task's own underscores become hyphens).  A folder holds
either one file of importance scores over every edge, which the leaderboard cuts into circuits itself (top-n by
|score| for CMD, by signed score for CPR), or several circuits, no larger than 0.1, 0.2, 0.5, 1, 2, 5, 10, 20 and
50% of the edges, which it runs as they are: the way to submit circuits cut otherwise than by top-n, such as the
greedy cuts MIB's paper uses for information flow routes.  It tells the two apart by the number of files, so a
folder holds its circuits and nothing else.  A submission spans two tasks and two models at least.

Files are EAP-IG/MIB circuit files (``Circuit.save``), ``.pt`` as MIB's own scripts write them or ``.json``.
"""
from __future__ import annotations

from pathlib import Path

from .evaluation import MIB_FRACTIONS, mib_selection
from .scores import EdgeScores

FRACTIONS = MIB_FRACTIONS[:-1]  # the circuits a folder of several holds: at most 0.1% … 50% of the edges
FORMS = ("importances", "circuits")
FORMATS = ("pt", "json")
# MIB's short model names, each with the hub id of the model it evaluates
MODELS = {"gpt2": "openai-community/gpt2", "qwen2.5": "Qwen/Qwen2.5-0.5B", "gemma2": "google/gemma-2-2b",
          "llama3": "meta-llama/Llama-3.1-8B", "interpbench": "mib-bench/interpbench"}
ALIASES = {"gpt2-small": "gpt2"}  # other names those models go by (TransformerLens's, here)
# the task and model pairs the leaderboard evaluates
PAIRS = {"ioi": ("gpt2", "qwen2.5", "gemma2", "llama3", "interpbench"), "mcqa": ("qwen2.5", "gemma2", "llama3"),
         "arithmetic-addition": ("llama3",), "arithmetic-subtraction": ("llama3",), "arc-easy": ("gemma2", "llama3"),
         "arc-challenge": ("llama3",)}


def save_submission(scores: EdgeScores, root: str | Path, *, task: str | None = None, model: str | None = None,
                    form: str = "importances", selection: str | None = None, absolute: bool = True,
                    format: str = "pt") -> Path:
    """Write ``scores`` into ``root``'s folder for their task and model (``folder_name``) and return that folder.
    By default the task and model are those the scores' ``info`` records: scores read from a circuit file that
    ``discover`` saved record both, ``attribute``'s own neither (name them).

    ``form="importances"``: every edge's score in one file, ``importances.pt`` (or ``.json``), which MIB ranks
    itself.  ``form="circuits"``: nine circuits, ``edges_{p}pct.pt`` for each share p% in ``FRACTIONS``, each
    cut by ``selection`` (``"topn"`` or ``"greedy"``; None: as MIB cuts the scores' method, greedy for information
    flow routes) to int(p% · E) edges (MIB's count), ranked by |score| (``absolute``, what CMD ranks by) or signed
    score (CPR's), then pruned, which only removes edges.  The leaderboard measures CPR and CMD on those same nine.

    A folder holding files other than these is refused, as the leaderboard would read them too; these files are
    overwritten."""
    if not isinstance(scores, EdgeScores):
        raise TypeError(f"a MIB submission holds edge scores (EdgeScores, as attribute gives them), not a "
                        f"{type(scores).__name__}: MIB's circuits are plain edge circuits")
    _choice("form", form, FORMS)
    _choice("format", format, FORMATS)
    if form == "importances" and (selection is not None or not absolute):
        raise ValueError("importances hold every score, and the leaderboard ranks them itself (by |score| and by "
                         "signed score): selection and absolute are for form='circuits'")
    folder = Path(root) / folder_of(scores, task, model)
    files = _files(form, format)
    _only(folder, files)
    if form == "importances":
        folder.mkdir(parents=True, exist_ok=True)
        scores.save(folder / files[0])
        return folder
    selection = mib_selection(scores.method) if selection is None else selection
    cut = scores.cuts(selection, absolute)  # refuses a selection it has not, before anything is written
    folder.mkdir(parents=True, exist_ok=True)
    for fraction, name in zip(FRACTIONS, files):
        cut(fraction).save(folder / name, selection=selection, absolute=absolute, fraction=fraction)
    return folder


def folder_of(scores: EdgeScores, task: str | None = None, model: str | None = None) -> str:
    """The folder of ``scores``: ``folder_name`` of ``task`` and ``model``, by default those their ``info``
    records."""
    return folder_name(_named(scores, "task", task), _named(scores, "model", model))


def folder_name(task: str, model: str) -> str:
    """The folder of ``task`` on ``model`` (a hub id, a local folder or MIB's short name): ``{task}_{model}``,
    MIB's short names where it has them (``model_name``)."""
    return f"{task_name(task)}_{model_name(model)}"


def task_name(task: str) -> str:
    """``task`` as a folder name spells it: lower case, hyphens for underscores (MIB's ``arc_easy`` is
    ``arc-easy``)."""
    return _plain(task)


def model_name(model: str) -> str:
    """MIB's short name of ``model`` — a hub id or a local folder, matched by its last part (``Qwen/Qwen2.5-0.5B``
    or ``/models/qwen2.5-0.5b`` is ``qwen2.5``) — or, for a model MIB does not evaluate, that last part in lower case
    with hyphens for underscores."""
    last = _plain(Path(str(model)).name)
    for short, hub_id in MODELS.items():
        if last in (short, _plain(hub_id.split("/")[-1])):
            return short
    return ALIASES.get(last, last)


def submission_notes(root: str | Path) -> list[str]:
    """What the leaderboard would take from ``root`` differently than its writer may expect, a line each: folders
    it would skip (no task and model it evaluates), folders that hold neither one importance file nor several
    circuits, fewer than two tasks or two models; none for a submission it reads whole."""
    folders = sorted(p for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
    notes, tasks, models = [], set(), set()
    for folder in folders:
        task, _, model = folder.name.partition("_")
        if model not in PAIRS.get(task, ()):
            notes.append(f"{folder.name}: the leaderboard evaluates no {task} on {model or 'no model'} and skips it")
            continue
        tasks.add(task)
        models.add(model)
        circuits = [p.name for p in folder.iterdir() if p.suffix in (".pt", ".json")]
        if not circuits:
            notes.append(f"{folder.name}: holds no circuit file (.pt or .json)")
    if any(note.endswith("skips it") for note in notes):
        notes.append(f"the leaderboard evaluates {_pairs()}")
    for what, found in (("tasks", tasks), ("models", models)):
        if len(found) < 2:
            notes.append(f"MIB takes submissions for two {what} at least; this one has {len(found)}"
                         + (f" ({', '.join(sorted(found))})" if found else ""))
    return notes


def _named(scores: EdgeScores, key: str, given: str | None) -> str:
    """The task or model (``key``) ``given``, else the one the scores' ``info`` records."""
    name = given if given is not None else scores.info.get(key)
    if not name:
        raise ValueError(f"these scores do not record their {key}, which names the submission's folder: name it "
                         f"({key}=…, or --{key}; MIB's: {', '.join(PAIRS if key == 'task' else MODELS)})")
    return str(name)


def _files(form: str, format: str) -> list[str]:
    """The files a folder of ``form`` holds."""
    if form == "importances":
        return [f"importances.{format}"]
    return [f"edges_{100 * p:g}pct.{format}" for p in FRACTIONS]


def _only(folder: Path, files: list[str]) -> None:
    """Refuse a ``folder`` that holds anything but ``files``: the leaderboard reads every file there."""
    others = sorted(p.name for p in folder.iterdir() if p.name not in files) if folder.is_dir() else []
    if others:
        raise ValueError(f"{folder} already holds {', '.join(others[:4])}{' …' if len(others) > 4 else ''}, and the "
                         f"leaderboard reads every file in a task's folder: remove them, or write the submission to "
                         f"another root")


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")


def _plain(text: str) -> str:
    return text.lower().replace("_", "-")


def _pairs() -> str:
    return "; ".join(f"{task} on {', '.join(models)}" for task, models in PAIRS.items())
