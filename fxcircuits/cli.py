"""``fxcircuits`` on the command line: discover, evaluate, show, compare, submit, lens, direct, attention, patch and
check, each with ``--help``.

    fxcircuits discover --model smollm2-135m --task ioi --method eap-ig-inputs --edges 1% --out circuit.json
    fxcircuits evaluate circuit.json --model smollm2-135m --task ioi --plot curve.png
    fxcircuits show circuit.json --out circuit.svg
    fxcircuits compare eap.json eap-ig.json --out both.svg
    fxcircuits submit ioi.json mcqa.json --out submission/
    fxcircuits lens --model smollm2-135m --task ioi --out lens.png
    fxcircuits lens circuit.json --model smollm2-135m --task ioi
    fxcircuits direct --model smollm2-135m --task ioi --out direct.png
    fxcircuits attention --model smollm2-135m --task ioi --heads a9.h6,a10.h0 --out attention.png
    fxcircuits attention --model smollm2-135m --task ioi --heads a23.h0,a24.h4 --spans
    fxcircuits patch --model smollm2-135m --task ioi --out positions.png
    fxcircuits patch --model smollm2-135m --task ioi --spans --out spans.png
    fxcircuits patch --model smollm2-135m --task ioi --all-positions --out heads.png
    fxcircuits check --model ./my-model --task ioi
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import data
from . import metrics as metrics_
from . import tasks as tasks_
from .ablations import Ablation, mean_ablation, optimal_ablation
from .attribution import GRADIENT_METHODS, INTEGRATED, LEARNED, METHODS, attribute
from .circuit import FORMATS, Circuit
from .components import DecompositionError
from .draw import (SUFFIXES, draw_circuit, draw_comparison, draw_span_circuit, plot_faithfulness, plot_heatmap,
                   plot_nodes)
from .evaluation import Evaluator, mib_selection
from .graph import CircuitGraph
from .lens import direct_logits, logit_lens, source_logits
from .model import trace
from .models import load_model
from .patterns import attention_patterns
from .positional import SpanCircuit, SpanScores, attribute_by_span, load_circuit
from .activation_patching import DIRECTIONS, patch_by_position, patch_inputs, patch_nodes
from .activation_patching import METHODS as POSITION_METHODS  # beside attribution's METHODS
from .routes import METHOD as ROUTES
from .runs import ABLATIONS
from .scores import EdgeScores, method_apart
from .submission import FORMATS as SUBMISSION_FORMATS
from .submission import FORMS, folder_of, save_submission, submission_notes
from .verification import Verification, verify

CIRCUIT_FILE = "circuit file, .json or .pt (fxcircuits, EAP-IG or MIB)"


# What the library raises for input it cannot use (a missing file, an unknown node, a model it cannot decompose):
# the command says so in a line; a traceback would bury it.  Other exceptions are bugs, and keep theirs.
REFUSALS = (ValueError, KeyError, OSError, ImportError)


def main(argv: list[str] | None = None) -> int:
    """The ``fxcircuits`` command: runs ``argv`` (the process's arguments if None) and returns the exit status; a
    refusal prints one line (its traceback with ``--traceback``)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 1
    try:
        return args.run(args)
    except REFUSALS as error:
        if args.traceback:
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        parser.exit(1, f"fxcircuits {args.command}: error: {message}\n(fxcircuits --traceback {args.command} … shows "
                       "where it was raised)\n")


class _Parser(argparse.ArgumentParser):
    """argparse's parser, whose usage errors take one line, as every other refusal does: argparse prints the
    command's whole usage first (16 lines for discover), which buries the one line that says what is wrong."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists what it takes)\n")


def _parser() -> argparse.ArgumentParser:
    """The command line: one subcommand per step a researcher takes, each added by its own ``_add_…``."""
    parser = _Parser(prog="fxcircuits", description="Find, evaluate and draw circuits in any Hugging Face "
                     "decoder-only model.")
    parser.add_argument("--traceback", action="store_true", help="show where an error was raised, not just what")
    commands = parser.add_subparsers(dest="command", metavar="command")
    for add in (_add_discover, _add_evaluate, _add_show, _add_compare, _add_submit, _add_lens, _add_direct,
                _add_attention, _add_patch, _add_check):
        add(commands)
    return parser


def _add_discover(commands) -> None:
    """``fxcircuits discover``: score every edge on a task, keep the best, evaluate, draw."""
    discover = commands.add_parser("discover", help="score every edge on a task, keep the best, evaluate, draw",
                                   description="Score every edge on a task, select a circuit, evaluate its "
                                   "faithfulness, save it in EAP-IG/MIB's format and draw it.")
    _model_options(discover)
    _patching_options(discover)
    discover.add_argument("--method", default="eap-ig-inputs", choices=METHODS, help="how edges are scored "
                          "(default eap-ig-inputs; information-flow-routes reads the clean prompts alone, and --metric "
                          "and --ablation then only evaluate the circuit)")
    discover.add_argument("--steps", type=_positive, help="integration steps of the EAP-IG methods (default 5), or "
                          "the training steps of a learned mask (default: mask 200, ugs 100)")
    discover.add_argument("--warm-start", choices=GRADIENT_METHODS + ("none",),
                          help="the gradient method whose scores rank a learned mask's gates before it trains "
                          "(default eap-ig-inputs, with the EAP-IG default of 5 steps); none starts them alike")
    discover.add_argument("--penalty", type=_non_negative, help="ugs's lambda: the penalty on the expected number of "
                          "edges kept, in the metric's units; the least pull on the metric an edge needs to stay "
                          "(default 0.001)")
    discover.add_argument("--edges", type=_size,
                          help="circuit size for topn and greedy: a count (500) or a percentage (1%%; the default)")
    discover.add_argument("--nodes", type=_size,
                          help="circuit size for --selection nodes: a count of nodes (40) or a percentage of them")
    discover.add_argument("--selection", choices=("topn", "greedy", "nodes", "threshold"),
                          help="how the circuit is cut from the scores: the --edges best, grown greedily from the "
                          "logits, every edge among the --nodes best nodes (node patching), or every edge scoring at "
                          "least --threshold (default: topn; nodes when --nodes is given; for acdc, threshold: the "
                          "edges ACDC kept; for information-flow-routes, greedy, as MIB cuts its scores)")
    discover.add_argument("--faithfulness", type=_target,
                          help="size the circuit by what it must do: the smallest topn, greedy or nodes cut that "
                          "reaches this faithfulness (0.85 or 85%%), found by patched runs of many sizes at once "
                          "(Evaluator.smallest); instead of --edges or --nodes (a learned mask still trains to "
                          "--edges)")
    discover.add_argument("--threshold", type=float, help="ACDC's tau (default 0.01); with --selection threshold, "
                          "the least score an edge needs (|score|; for acdc, its signed score)")
    discover.add_argument("--spans", nargs="?", const="all", help="a positional circuit: score and keep each edge "
                          "at each span the task names (IOI: IO, S1, S2, END; your file's 'spans' field) and at the "
                          "rest of the prompt apart, as (edge, span) pairs; optionally the comma-separated spans.  "
                          "Any method; topn, greedy or threshold; --edges counts pairs; saved as JSON, one EAP-IG "
                          "circuit per span")
    discover.add_argument("--out", type=_circuit_path, default="circuit.json",
                          help="the circuit, in EAP-IG/MIB's format: .json, or .pt (torch.save, compact for large "
                          "models)")
    discover.add_argument("--draw", type=_picture, help="picture of the circuit (.svg or .png; default: next to --out)")
    discover.set_defaults(run=_discover)


def _add_evaluate(commands) -> None:
    """``fxcircuits evaluate``: faithfulness of a saved circuit; curve, CPR and CMD."""
    evaluate = commands.add_parser("evaluate", help="faithfulness of a saved circuit; curve, CPR and CMD",
                                   description="Faithfulness of a saved circuit on a task; with scores in the "
                                   "file, also MIB's faithfulness curve, CPR and CMD.")
    evaluate.add_argument("circuit", help=CIRCUIT_FILE)
    _model_options(evaluate)
    _patching_options(evaluate, recorded=True)
    evaluate.add_argument("--plot", type=_picture, help="faithfulness curve picture (.svg or .png)")
    evaluate.add_argument("--selection", choices=("topn", "greedy", "nodes"),
                          help="how the curve's circuits are cut from the file's scores, as MIB cuts them: the top "
                          "share of the edges (default), edges grown greedily from the logits (its apply_greedy; the "
                          "default for information-flow-routes), or the top share of the nodes with every edge among "
                          "them (its node level)")
    evaluate.set_defaults(run=_evaluate)


def _add_show(commands) -> None:
    """``fxcircuits show``: draw a saved circuit."""
    show = commands.add_parser("show", help="draw a saved circuit", description="Draw a saved circuit.")
    show.add_argument("circuit", help=CIRCUIT_FILE)
    show.add_argument("--out", required=True, type=_picture, help="the picture (.svg or .png)")
    show.add_argument("--title")
    show.add_argument("--edges", type=_size, help="draw only the circuit's N edges of largest |score|, or a share "
                      "of them (10%%), pruned: a thousand edges do not read")
    show.set_defaults(run=_show)


def _add_compare(commands) -> None:
    """``fxcircuits compare``: two saved circuits: shared edges and nodes, what each adds."""
    compare = commands.add_parser("compare", help="two saved circuits: shared edges and nodes, what each adds",
                                  description="Compare two saved circuits of one model (two methods, tasks, sizes or "
                                  "models of one architecture): the edges and nodes they share, their intersection "
                                  "over union, the strongest edges each holds alone, and a picture of both.")
    compare.add_argument("circuits", nargs=2, metavar="circuit", help=CIRCUIT_FILE)
    compare.add_argument("--top", type=_positive, default=5, help="how many of the edges each holds alone to list")
    compare.add_argument("--out", type=_picture,
                         help="picture of both, edges coloured by which holds them (.svg or .png)")
    compare.set_defaults(run=_compare)


def _add_submit(commands) -> None:
    """``fxcircuits submit``: saved circuits' scores laid out as a MIB leaderboard submission."""
    submit = commands.add_parser("submit", help="lay saved circuits' scores out as a MIB leaderboard submission",
                                 description="Lay the scores of saved circuits out as the MIB leaderboard's circuit "
                                 "track reads them: a folder per task and model (ioi_gpt2, mcqa_qwen2.5), holding "
                                 "every edge's score in one file, which the leaderboard ranks itself, or with --form "
                                 "circuits nine circuits of at most 0.1% … 50% of the edges, cut as --selection cuts "
                                 "them.  Names each folder from the task and model the file records, and says what "
                                 "the leaderboard would skip.")
    submit.add_argument("circuits", nargs="+", metavar="circuit", help=f"{CIRCUIT_FILE}, with scores (as discover "
                        "saves them); one per task and model")
    submit.add_argument("--out", required=True, help="the submission's folder (made if missing); each file's task "
                        "and model get a folder in it")
    submit.add_argument("--form", choices=FORMS, default="importances", help="importances: every edge's score in "
                        "one file (default); circuits: nine circuits, each as --selection cuts it")
    submit.add_argument("--selection", choices=("topn", "greedy"), help="with --form circuits, how each is cut "
                        "from the scores: the best edges, or grown greedily from the logits (default: as MIB cuts "
                        "the method: greedy for information-flow-routes, else topn)")
    submit.add_argument("--signed", action="store_true", help="with --form circuits, rank by signed score (what "
                        "CPR ranks by) rather than |score| (CMD's)")
    submit.add_argument("--format", choices=SUBMISSION_FORMATS, default="pt", help="file format (default pt, as "
                        "MIB's scripts write them)")
    submit.add_argument("--task", help="MIB's name of the task, for the folder (default: the one the file records)")
    submit.add_argument("--model", help="MIB's name of the model, for the folder (gpt2, qwen2.5, gemma2, llama3, "
                        "interpbench; default: the one the file records)")
    submit.set_defaults(run=_submit)


def _add_lens(commands) -> None:
    """``fxcircuits lens``: logit lens: what each layer's stream, or given nodes, predict."""
    lens = commands.add_parser("lens", help="logit lens: what each layer's stream, or given nodes, predict",
                               description="The logit lens on the batch of a task's examples that holds --example: "
                               "that example's top tokens after every layer (or of the given nodes, or of a saved "
                               "circuit's nodes), and the answer's probability over the batch's examples.")
    _node_options(lens, instead="the stream after each layer")
    lens.add_argument("--out", type=_picture, help="heatmap of the answer probability, rows × the examples of the "
                      "batch that holds --example, by their index in the task (.svg or .png)")
    lens.set_defaults(run=_lens)


def _add_direct(commands) -> None:
    """``fxcircuits direct``: direct logit attribution: what each node writes to the answer."""
    direct = commands.add_parser("direct", help="direct logit attribution: what each node writes to the answer",
                                 description="Direct logit attribution over a task: each node's share of "
                                 "logit(correct) − logit(incorrect) that it writes straight into the final stream, "
                                 "through the final norm as the whole stream scales it; the nodes of largest mean "
                                 "share, the tokens they push up most in one example, and what no node writes.")
    _node_options(direct, instead="every node")
    direct.add_argument("--rows", type=_positive, default=20, help="how many nodes to list, largest |share| first")
    direct.add_argument("--out", type=_picture,
                        help="heatmap of the listed nodes' shares, nodes × examples (.svg or .png)")
    direct.add_argument("--grid", type=_picture, help="every node's mean share laid out as the model is, layers × "
                        "heads and MLPs (.svg or .png)")
    direct.set_defaults(run=_direct)


def _add_attention(commands) -> None:
    """``fxcircuits attention``: where given heads look, and what they write from there."""
    attention = commands.add_parser("attention", help="where given heads look, and what they write from there",
                                    description="The attention patterns of given heads on one of a task's examples: "
                                    "the tokens each head attends to most from one query position (by default "
                                    "the last real token, whose prediction the task scores); then the tokens whose "
                                    "values each head writes most directly into logit(correct) − logit(incorrect) "
                                    "there (direct logit attribution split by key position).  With --spans, on "
                                    "average over every example, by the spans the task names (IOI: IO, S1, S2, END).")
    _model_options(attention)
    attention.add_argument("--heads", required=True, help="comma-separated heads, e.g. a9.h6,a10.h0")
    attention.add_argument("--example", type=int, help="which example to read (default 0)")
    attention.add_argument("--position", type=_position, default="last", help="query position: last, an index, or "
                           "with --spans a span's name (its last token)")
    attention.add_argument("--spans", action="store_true", help="the weight on each span and what each head writes "
                           "from it, averaged over all of the task's examples, instead of one example's tokens")
    attention.add_argument("--top", type=_positive, help="how many tokens to list per head (default 3)")
    attention.add_argument("--out", type=_picture, help="heatmap of the weights, heads × tokens (.svg or .png)")
    attention.add_argument("--direct-out", type=_picture, help="heatmap of what each head writes to the logit "
                           "difference from each token, heads × tokens (.svg or .png)")
    attention.set_defaults(run=_attention)


def _add_patch(commands) -> None:
    """``fxcircuits patch``: activation patching by position: which layer or node, at which token."""
    patch = commands.add_parser("patch", help="activation patching by position: which layer or node, at which token",
                                description="Activation patching by position on one of a task's examples: the "
                                "residual stream entering each layer (causal tracing), or each of given nodes' "
                                "outputs, patched at one token at a time; for each, the tokens where that moves the "
                                "task's metric most, as a fraction of its difference between the clean and the "
                                "corrupted prompt.  With --spans, at each named part of every example instead (IOI: "
                                "IO, S1, S2, END), on average over the task.  With --all-positions, each node at every "
                                "token at once (by default every head and MLP), on average over the task: which heads "
                                "and MLPs the behaviour needs, drawn as layers × heads.  With --inputs, heads' q, k "
                                "and v inputs and MLPs' inputs instead of outputs.")
    _node_options(patch, instead="the stream entering each layer")
    patch.add_argument("--direction", choices=DIRECTIONS, default="noising", help="noising: the clean prompt, "
                       "values of the corrupted one patched in (what the behaviour needs); denoising: the other way "
                       "round (what restores it)")
    patch.add_argument("--method", choices=POSITION_METHODS, default="exact", help="exact: one patched run per row "
                       "and token; attribution: all of them to first order, from one backward pass (attribution "
                       "patching: fast enough for every node, a first look); attribution-ig: from gradients "
                       "averaged over --steps points between the corrupted and the clean input")
    patch.add_argument("--steps", type=_positive, help="integration steps of attribution-ig (default 5)")
    patch.add_argument("--metric", choices=sorted(metrics_.METRICS), help="what scores the task (default: the "
                       "task's); kl, the divergence from the clean prompt's prediction, with noising alone")
    patch.add_argument("--spans", nargs="?", const="all", help="patch each span the task names, all of its tokens "
                       "at once, in every example, and average (IOI: IO, S1, S2, END; your file's 'spans' field); "
                       "optionally the comma-separated spans to patch")
    patch.add_argument("--all-positions", action="store_true", help="patch each node at every token at once, in "
                       "every example, and average (nodes: every head and MLP unless given)")
    patch.add_argument("--inputs", nargs="?", const="all", help="patch downstream inputs instead of outputs: "
                       "each head's q, k and v input and each MLP's input (through which of them a head matters; "
                       "with a circuit, the inputs its edges enter), or the comma-separated inputs, e.g. "
                       "'a23.h3<q>,a23.h3<k>,m20'")
    patch.add_argument("--receivers", help="comma-separated inputs each node is patched into alone, its other edges "
                       "left as they are (path patching: which heads move the name movers' queries), e.g. "
                       "'a23.h3<q>,a23.h0<q>'")
    patch.add_argument("--ablation", choices=ABLATIONS, help="with --all-positions: what a patched node's output "
                       "becomes — the corrupted prompt's, zero, its mean over the task's clean prompts (at each "
                       "position apart: mean-positional, for prompts of one length), or its "
                       "optimal ablation value there (the constant that keeps the model's predictions closest to its "
                       "own; default: corrupted)")
    _value_options(patch)
    patch.add_argument("--per-call", type=_positive, help="patched runs (exact) or integration points "
                       "(attribution-ig) per call (default: 16 by position; by node, what fits the device best)")
    patch.add_argument("--out", type=_picture, help="heatmap of the fractions, rows × tokens or spans, or layers × "
                       "heads with --all-positions (.svg or .png)")
    patch.set_defaults(run=_patch, example=None)  # None unless given: --spans and --all-positions refuse it


def _add_check(commands) -> None:
    """``fxcircuits check``: does fxcircuits compute this model exactly? traced against HF."""
    check = commands.add_parser("check", help="does fxcircuits compute this model exactly? traced against HF",
                                description="Trace the model and check it against the untouched HF model on "
                                "every batch of a task: the logits of a clean run, of runs with every edge (or every "
                                "edge into the logits) patched, and of masks run together; the attention weights; "
                                "and direct logit attribution's sums.  Prints each check's largest difference over "
                                "the batches, and exits 1 if any differs past the tolerance, naming the batches.")
    _model_options(check)
    check.add_argument("--tolerance", type=_non_negative, help="the largest difference that passes, as a fraction of "
                       "the largest |logit| (default: 1e-4 in float32, 32 units in the last place in bfloat16/float16)")
    check.set_defaults(run=_check)


def _node_options(parser: argparse.ArgumentParser, instead: str) -> None:
    """The options of a command that reads nodes (``_read_nodes``) — a saved circuit's, or ``--nodes``, else
    ``instead`` — and prints one example's top tokens; and the model's."""
    parser.add_argument("circuit", nargs="?", help=f"circuit file (.json or .pt) whose nodes to read (default: "
                        f"{instead})")
    _model_options(parser)
    parser.add_argument("--nodes", help=f"comma-separated nodes to read instead of {instead}, e.g. a23.h3,m20")
    parser.add_argument("--example", type=int, default=0, help="which example's top tokens to print")
    parser.add_argument("--top", type=_positive, default=5)


def _model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="hub id, local folder, or smollm2-135m (offline; the default, where no given "
                        "circuit names the model it was found on)")
    parser.add_argument("--task", type=_task, help=f"{', '.join(tasks_.TASKS)}, or a .csv/.jsonl file of your own "
                        "(default: the task a given circuit was found on, else ioi)")
    parser.add_argument("--size", type=_positive, help="number of examples of a built-in task (default 32; a task "
                        "file runs all of its rows)")
    parser.add_argument("--batch-size", type=_positive, default=8)
    parser.add_argument("--drop-mismatched", action="store_true", help="with a task file: drop the rows whose clean "
                        "and corrupted prompts tokenize to different lengths, with a warning naming their lines")
    parser.add_argument("--device", type=_device, default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16", "float64"))
    parser.add_argument("--seed", type=_seed, default=0)
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def _patching_options(parser: argparse.ArgumentParser, recorded: bool = False) -> None:
    """``--metric`` and ``--ablation``; ``recorded``: their defaults are what the circuit file says."""
    first = "the circuit file's, else " if recorded else ""
    parser.add_argument("--metric", choices=sorted(metrics_.METRICS),
                        help=f"what scores the task (default: {first}the task's)")
    parser.add_argument("--ablation", choices=ABLATIONS, help="what a patched edge carries instead: the corrupted "
                        "prompt's value, zero, the node's mean output over the task's clean prompts (at each "
                        "position apart: mean-positional, for prompts of one length), or its "
                        "optimal ablation value there (the constant that keeps the model's predictions closest to "
                        f"its own, learned first; default: {first}corrupted)")
    parser.add_argument("--per-call", type=_positive, help="patched runs or gradient points a call (default: what "
                        "the device runs fastest; fewer from a call on that runs out of an accelerator's memory)")
    _value_options(parser)


def _value_options(parser: argparse.ArgumentParser) -> None:
    """``--ablation-values`` and ``--optimal-steps``: ablation values computed before, or how long to learn them."""
    parser.add_argument("--ablation-values", type=_values_file, metavar="FILE", help="ablation values computed "
                        "before (Ablation.save; discover saves optimal ones beside the circuit, <out>.optimal.pt), "
                        "patched in instead of computing them again (optimal ones learned on a GPU, say); "
                        "--ablation is then their kind")
    parser.add_argument("--optimal-steps", type=_positive, help="Adam steps that learn --ablation optimal (default "
                        "100; a step costs about a forward and backward pass per node: on two CPU cores, about 2 "
                        "minutes for SmolLM2 on 8 prompts)")


def _patching(args, cm, task, recorded: dict) -> tuple[str, str, dict]:
    """The metric and ablation the command patches with — given on the command line, else as ``recorded`` (the
    circuit file's cfg) says (its metric where the task is the one it was found on), else the task's metric and the
    corrupted prompt — and the options that give them, with the runs a call (``--per-call``): an ablation's values
    computed once, over the task's clean prompts, for every run that reads them."""
    same_task = recorded.get("task") is None or _found_on(recorded) == _found_on(_task_info(args, task))
    metric = args.metric or (recorded.get("metric") if same_task else None)
    metric = metric if metric in metrics_.METRICS else metrics_.name_of(task.metric)
    ablation = _ablation_name(args, recorded.get("ablation"))
    values = (_recorded_values(args, recorded, ablation, same_task)
              or _ablation(args, cm, task, ablation, recorded.get("optimal_steps")))
    return metric, ablation, {"ablation": values, "masks_per_call": args.per_call}


def _ablation_name(args, recorded: str | None) -> str:
    """The ablation a command patches with: ``--ablation``, else the kind of ``--ablation-values``, else the one a
    circuit file ``recorded``, else the corrupted prompt; options that contradict it refused."""
    given = args.ablation_values
    if given is not None and args.ablation not in (None, given.name):
        raise SystemExit(f"--ablation-values holds {given.name} ablation values, and --ablation asks for "
                         f"{args.ablation}: leave one out")
    name = args.ablation or (given.name if given is not None else None) or recorded
    name = name if name in ABLATIONS else "corrupted"
    if args.optimal_steps is not None and (name != "optimal" or given is not None):
        raise SystemExit("--optimal-steps sets how long optimal ablation values are learned, and this command "
                         + ("reads them from --ablation-values" if given is not None else f"patches with {name}")
                         + ": leave it out")
    return name


def _ablation(args, cm, task, ablation: str, recorded_steps: int | None = None) -> str | Ablation:
    """``ablation`` as the library takes it: the values given (``--ablation-values``), by name, or where it is
    computed over the task, its values; optimal ones learned for ``--optimal-steps``, else the steps a circuit file
    ``recorded``, else the library's default."""
    if args.ablation_values is not None:
        return args.ablation_values
    if ablation == "optimal":
        steps = args.optimal_steps or recorded_steps
        return optimal_ablation(cm, task.batches, progress=not args.no_progress,
                                **({} if steps is None else {"steps": steps}))
    if ablation in ("mean", "mean-positional"):
        return mean_ablation(cm, task.batches, positional=ablation == "mean-positional")
    return ablation


def _recorded_values(args, recorded: dict, ablation: str, same_task: bool) -> Ablation | None:
    """The optimal ablation values discovery learned and saved beside the circuit (``ablation_values`` in its
    file), where they are what the command would learn again — on the same model and task, with no other values
    or steps given — and still there."""
    saved = recorded.get("ablation_values")
    if (ablation != "optimal" or saved is None or not same_task or recorded.get("model") != _model_info(args)
            or args.ablation_values is not None or args.optimal_steps is not None):
        return None
    return Ablation.load(saved) if Path(saved).is_file() else None


def _saved_values(args, patching: dict) -> dict:
    """Learned ablation values, saved beside the circuit file (``<out>.optimal.pt``), which ``evaluate`` and the
    other commands reading the circuit then reuse: what the file records of them."""
    values = patching["ablation"]
    if not isinstance(values, Ablation) or values.name != "optimal":
        return {}
    path = Path(args.out).with_suffix(".optimal.pt").resolve()
    values.save(path)
    return {"ablation_values": str(path), "optimal_steps": values.info.get("steps")}


def _setup(args, recorded: dict | None = None):
    """(model, tokenizer, traced model, task) from the shared options; the model and the task are ``--model`` and
    ``--task``, else those a circuit file was found on (``recorded``: its info), else SmolLM2 and IOI."""
    args.model = args.model or (recorded or {}).get("model") or "smollm2-135m"
    name = args.task or _recorded_task(recorded or {})
    if args.drop_mismatched and name in tasks_.TASKS:
        raise SystemExit("--drop-mismatched reads a task file; the built-in tasks draw only pairs of one length")
    if args.size is not None and name not in tasks_.TASKS:
        raise SystemExit(f"--size draws examples of a built-in task, and {name} is a task file, whose every row runs: "
                         "leave --size out (or keep the rows you want in the file)")
    torch.manual_seed(args.seed)
    print(f"loading {args.model} …", file=sys.stderr)
    model, tokenizer = load_model(args.model, device=args.device, dtype=getattr(torch, args.dtype),
                                  progress=not args.no_progress)
    cm = trace(model, progress=not args.no_progress)
    if name in tasks_.TASKS:
        task = tasks_.load(name, tokenizer, size=32 if args.size is None else args.size, seed=args.seed,
                           batch_size=args.batch_size)
    else:
        task = tasks_.from_file(name, tokenizer, batch_size=args.batch_size, drop_mismatched=args.drop_mismatched)
    return model, tokenizer, cm, task


def _recorded_task(recorded: dict) -> str:
    """The built-in task a circuit file says it was found on; IOI where it names none.  A task file must be given
    again (its rows may have changed since): a file named ``ioi.jsonl`` is no more the built-in IOI than any other."""
    name, file = recorded.get("task"), recorded.get("task_file")
    if file is None and (name is None or name in tasks_.TASKS):
        return name or "ioi"
    raise SystemExit(f"the circuit was found on the task file {file or name!r}, not a built-in task: give that file "
                     "with --task (or the task to run it on)")


def _task_info(args, task) -> dict[str, str]:
    """What a circuit file records of the task it was found on: its name and, for a task file, the file's path."""
    built_in = args.task is None or args.task in tasks_.TASKS  # None: the built-in task a circuit file named
    return {"task": task.name, **({} if built_in else {"task_file": str(Path(args.task).resolve())})}


def _model_info(args) -> str:
    """What a circuit file records of the model it was found on, which the commands that read it load by default:
    a hub id as given, a local folder as an absolute path (the file may be read from another folder)."""
    folder = Path(args.model).expanduser()
    return str(folder.resolve()) if folder.is_dir() else args.model


def _found_on(info: dict) -> tuple:
    """The task a circuit's ``info`` names, the built-in task or the file: which two circuits must share to be
    compared on one metric (a file's stem may be a built-in task's name)."""
    return info.get("task"), info.get("task_file")


def _carry(ablation: str) -> str:
    return {"corrupted": "carry the corrupted prompt's values", "zero": "carry zero",
            "mean": "carry their mean over the task",
            "mean-positional": "carry their mean at each position over the task",
            "optimal": "carry their optimal ablation value over the task"}[ablation]


def _task(text: str) -> str:
    """A built-in task's name (as ``tasks.load`` spells it) or a task file that exists, checked before the model
    loads."""
    name = text.lower().replace("_", "-")
    if name in tasks_.TASKS:
        return name
    if Path(text).suffix.lower() not in (".csv", ".jsonl"):
        raise argparse.ArgumentTypeError(f"unknown task {text!r}: use one of {', '.join(tasks_.TASKS)} or a "
                                         ".csv/.jsonl file")
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no task file {text!r}")
    return text


def _device(text: str) -> str:
    """``cpu`` or a device of this machine's accelerator (``cuda``, ``cuda:1``, ``mps``), checked before the model
    loads."""
    try:
        device = torch.device(text)
    except RuntimeError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is no device: {error}") from None
    if device.type == "cpu":
        return text
    accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
    if accelerator is None or accelerator.type != device.type:
        raise argparse.ArgumentTypeError(f"{text!r}: this machine's torch has no {device.type} device (its "
                                         f"accelerator: {accelerator.type if accelerator else 'none'}); use cpu")
    if device.index is not None and device.index >= torch.accelerator.device_count():
        raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.accelerator.device_count()} "
                                         f"{device.type} device(s), numbered from 0")
    return text


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return int(text)


def _non_negative(text: str) -> float:
    """A finite number of 0 or more (a tolerance, a penalty)."""
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not 0 <= number < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of 0 or more, as 1e-4")
    return number


def _seed(text: str) -> int:
    if not text.lstrip("-").isdigit() or not -2 ** 63 <= int(text) < 2 ** 64:  # what torch.manual_seed takes
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number from -2**63 to 2**64 - 1")
    return int(text)


def _position(text: str) -> int | str:
    """``"last"``, a position in the prompts (negative counts from their end), or a span's name (IOI's ``S2``)."""
    if text.lstrip("-").isdigit():
        return int(text)
    if not (text[:1].isalpha() and text.replace("+", "").replace("_", "").isalnum()):
        raise argparse.ArgumentTypeError(f"{text!r}: give 'last', a position (an integer) or, with --spans, a "
                                         "span's name")
    return text


def _circuit_path(text: str) -> str:
    """A path a circuit can be saved to (``.json`` or ``.pt``, in a folder that exists), checked before the run
    rather than after it."""
    if Path(text).suffix.lower() not in FORMATS:
        raise argparse.ArgumentTypeError(f"{text!r}: a circuit file ends in {' or '.join(FORMATS)}")
    return _in_a_folder(text)


def _values_file(text: str) -> Ablation:
    """Ablation values a file holds (``Ablation.load``), read before the model loads."""
    try:
        return Ablation.load(text)
    except (OSError, ValueError) as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _picture(text: str) -> str:
    """A path a picture can be saved to (``.svg`` or ``.png``, in a folder that exists), checked before the run."""
    if Path(text).suffix.lower() not in SUFFIXES:
        raise argparse.ArgumentTypeError(f"{text!r}: a picture ends in {' or '.join(SUFFIXES)}")
    return _in_a_folder(text)


def _in_a_folder(text: str) -> str:
    folder = Path(text).parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r}: there is no folder {str(folder)!r} to write it in")
    return text


def _size(text: str) -> int | float:
    """``"1%"`` → 0.01 (a fraction of all edges or nodes), ``"500"`` → 500; anything else, none included (an empty
    circuit), is a usage error."""
    try:
        count = float(text[:-1]) / 100 if text.endswith("%") else int(text)
    except ValueError:
        count = None
    if count is None or not 0 < count < float("inf") or (text.endswith("%") and count > 1):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count (500) or a percentage above 0%, up to 100% (1%)")
    return count


def _target(text: str) -> float:
    """``"85%"`` or ``"0.85"`` → 0.85, a faithfulness above 0; anything else is a usage error.  A plain number above
    1 is refused before the run: ``85`` is a share of 85 times the model's, no search reaches it, and it most often
    means 85%; a target past the model's own is written as a percentage (105%)."""
    try:
        target = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        target = None
    if target is None or not 0 < target < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: give a faithfulness above 0, as 0.85 or 85%")
    if target > 1 and not text.endswith("%"):
        meant = f"give {target / 100:g} or {text.strip()}%; past" if target >= 10 else "past"
        raise argparse.ArgumentTypeError(f"{text!r}: a faithfulness is a share of the model's own (1 is all of it): "
                                         f"{meant} the model's own, write a percentage ({target * 100:g}%)")
    return target


def _discover(args) -> int:
    start = time.perf_counter()
    selection, options = _selection(args), _method_options(args)  # both refuse what they cannot use, before the run
    if args.spans:
        return _discover_by_span(args, selection, options, start)
    _, _, cm, task = _setup(args)
    _fits(args, cm.graph)
    metric, ablation, patching = _patching(args, cm, task, {})
    scores = attribute(cm, task.batches, method=args.method, progress=not args.no_progress, seed=args.seed,
                       **_read(args, metric, patching), **options)
    evaluator = Evaluator(cm, task.batches, metric, **patching)
    circuit, faithfulness = _select(scores, selection, args, evaluator)
    _kept_some(circuit, selection)
    # the metric and ablation it was evaluated with, which evaluate then takes (information flow routes read neither)
    values = _saved_values(args, patching)
    circuit.save(args.out, model=_model_info(args), **_task_info(args, task), metric=metric, ablation=ablation,
                 faithfulness=faithfulness, **values)
    picture = _drawn_at(args)
    draw_circuit(circuit, picture, title=f"{args.model} · {task.name} · {args.method} · f = {faithfulness:.2f}")
    _table({**_run_rows(args, task, metric, ablation, evaluator),
            "method": args.method, "circuit": f"{len(circuit)} of {len(cm.graph.edges)} edges, "
            f"{len(circuit.nodes)} nodes", "faithfulness": f"{faithfulness:.3f}{_reached(args)}",
            "time": f"{time.perf_counter() - start:.1f} s",
            "saved": ", ".join(p for p in (args.out, picture, values.get("ablation_values")) if p)})
    return 0


def _discover_by_span(args, selection: str, options: dict, start: float) -> int:
    """``discover --spans``: a positional circuit and, for the gradient methods, whose classes add up to each edge's
    plain score, beside its faithfulness that of the plain circuit of as many edges cut from those sums."""
    if selection == "nodes":
        raise SystemExit("--spans keeps (edge, span) pairs: use --selection topn, greedy or threshold, not nodes")
    if Path(args.out).suffix.lower() != ".json":
        raise SystemExit(f"a positional circuit is saved as JSON: --out {args.out} does not end in .json")
    _, _, cm, task = _setup(args)
    _spans_named(task)
    spans = None if args.spans == "all" else args.spans.split(",")
    _fits(args, cm.graph, classes=len(data.position_classes(task.batches[0], spans)[0]))  # the spans and the rest
    metric, ablation, patching = _patching(args, cm, task, {})
    scores = attribute_by_span(cm, task.batches, method=args.method, spans=spans, progress=not args.no_progress,
                               seed=args.seed, **_read(args, metric, patching), **options)
    evaluator = Evaluator(cm, task.batches, metric, **patching)
    circuit, faithfulness = _select(scores, selection, args, evaluator)
    _kept_some(circuit, selection)
    values = _saved_values(args, patching)
    circuit.info.update(model=_model_info(args), **_task_info(args, task), metric=metric, ablation=ablation,
                        faithfulness=faithfulness, **values)
    circuit.save(args.out)
    picture = _drawn_at(args)
    union = circuit.union()
    draw_span_circuit(circuit, picture, title=f"{args.model} · {task.name} · {args.method} by span · "
                      f"f = {faithfulness:.2f}")
    rows = {**_run_rows(args, task, metric, ablation, evaluator), "method": f"{args.method}, by span",
            "circuit": f"{_extent(circuit)}; {len(union)} edges and "
            f"{len(union.nodes)} nodes in all", "faithfulness": f"{faithfulness:.3f}{_reached(args)}"}
    if args.method in GRADIENT_METHODS:
        plain = scores.total().topn(min(len(circuit), len(cm.graph.edges)))  # more pairs than edges: every edge
        rows["plain circuit"] = (f"{len(plain)} edges at every token: faithfulness "
                                 f"{evaluator.evaluate(plain).faithfulness:.3f}")
    _table({**rows, "time": f"{time.perf_counter() - start:.1f} s",
            "saved": ", ".join(p for p in (args.out, picture, values.get("ablation_values")) if p)})
    return 0


def _kept_some(circuit: Circuit | SpanCircuit, selection: str) -> None:
    """Refuse to save a cut that kept nothing: its edges all dangled once pruned."""
    if not circuit.in_graph.any():
        raise SystemExit(f"the {selection} cut keeps no edge once pruned: its edges reach no logits (information flow "
                         "routes' strongest feed the first layers); cut greedily (--selection greedy) or keep more")


def _read(args, metric: str, patching: dict) -> dict:
    """What ``--method`` scores with of the metric and the patching options: all of them, but information flow
    routes score the clean run alone, so there they only evaluate the circuit."""
    return {} if args.method == ROUTES else {"metric": metric, **patching}


def _drawn_at(args) -> str:
    """Where discovery draws its circuit: ``--draw``, else beside ``--out`` as SVG."""
    return args.draw or str(Path(args.out).with_suffix(".svg"))


def _run_rows(args, task, metric: str, ablation: str, evaluator: Evaluator) -> dict[str, str]:
    """The rows a discovery's table opens with: what was run, on what, and the metric's two ends (the model's own
    value and every edge patched), between which faithfulness is measured."""
    return {"model": args.model, "task": f"{task.name} ({len(task.examples)} examples)",
            "metric": f"{metric}, patched edges {_carry(ablation)}",
            "baseline metric": f"{evaluator.full.mean():.3f} clean, {evaluator.empty.mean():.3f} all edges patched"}


def _fits(args, graph: CircuitGraph, classes: int | None = None) -> None:
    """Refuse a count of edges or nodes past what the model has, or a share of them that keeps none (as
    ``scores.count_of`` rounds it), once it is traced and before the run; by span (``classes``: the spans and the
    rest), of (edge, span) pairs, the edges times the classes."""
    sizes = (("edges", len(graph.edges), "edges"), ("nodes", len(graph.upstream), "nodes")) if classes is None else \
        (("edges", len(graph.edges) * classes, f"(edge, span) pairs ({len(graph.edges):,} edges at {classes} spans, "
                                                "the rest included)"),)
    for option, total, what in sizes:
        count = getattr(args, option)
        if isinstance(count, int) and count > total:
            raise SystemExit(f"--{option} {count}: {args.model} has {total:,} {what}; give fewer, or a percentage")
        if isinstance(count, float) and int(count * total) == 0:
            raise SystemExit(f"--{option} {count * 100:g}%: that share of {args.model}'s {total:,} {what} keeps none; "
                             "give a larger one, or a count")


def _reached(args) -> str:
    """What the faithfulness row adds when the circuit was sized by ``--faithfulness``."""
    return "" if args.faithfulness is None else f" (the smallest cut that reaches {args.faithfulness:g})"


def _method_options(args) -> dict:
    """What ``args.method`` takes from the command line: the EAP-IG methods their steps, ACDC its τ, a learned
    mask (Edge Pruning) its steps, its warm start and the circuit's size (--edges, 1% by default), which it is
    trained to keep, and UGS its steps and its penalty."""
    if args.warm_start is not None and args.method != "mask":
        raise SystemExit("--warm-start starts a learned mask's gates: add --method mask, or leave it out")
    if args.penalty is not None and args.method != "ugs":
        raise SystemExit("--penalty is the lambda of uniform gradient sampling: add --method ugs, or leave it out")
    if args.steps is not None and args.method not in INTEGRATED + LEARNED:
        raise SystemExit(f"--steps counts the integration steps of {' and '.join(INTEGRATED)}, or a learned mask's "
                         f"training steps ({' and '.join(LEARNED)}); {args.method} takes none: leave it out")
    if args.threshold is not None and args.method != "acdc" and args.selection != "threshold":
        raise SystemExit("--threshold is ACDC's tau, or the least score of --selection threshold: add one of them, "
                         "or leave it out")
    if args.method == "mask":
        return {"density": 0.01 if args.edges is None else args.edges,
                **({} if args.warm_start is None else {"warm_start": None if args.warm_start == "none"
                                                       else args.warm_start}),
                **({} if args.steps is None else {"mask_steps": args.steps})}
    if args.method == "ugs":
        return {**({} if args.steps is None else {"mask_steps": args.steps}),
                **({} if args.penalty is None else {"penalty": args.penalty})}
    tau = {"threshold": args.threshold} if args.method == "acdc" and args.threshold is not None else {}
    return {**({} if args.steps is None else {"steps": args.steps}), **tau}


def _extent(circuit: Circuit | SpanCircuit) -> str:
    """How much a circuit keeps: its edges, or its (edge, span) pairs, per span."""
    return f"{len(circuit)} edges" if isinstance(circuit, Circuit) else circuit.extent()


def _selection(args) -> str:
    """``--selection``, or its default for the options and method; a size that does not size it is refused
    before the run, as is a threshold cut without a threshold."""
    default = ("nodes" if args.nodes is not None else "threshold" if args.method == "acdc"
               and args.faithfulness is None else mib_selection(args.method))
    selection = args.selection or default
    if args.faithfulness is not None:
        _sized_by_faithfulness(args, selection)
        return selection
    sizes = {"topn": "edges", "greedy": "edges", "nodes": "nodes", "threshold": None}
    given = [o for o in ("edges", "nodes") if getattr(args, o) is not None
             and not (o == "edges" and args.method == "mask")]  # a learned mask trains to --edges
    if len(given) == 2:
        raise SystemExit("--edges and --nodes both size the circuit: give one of them (--nodes for node patching)")
    for option in given:
        if sizes[selection] != option:
            instead = (f"give --{sizes[selection]} instead" if sizes[selection] else "ACDC's own cut keeps the edges "
                       "it kept; add --selection topn to cut its scores by size" if args.selection is None
                       else "give --threshold instead")
            raise SystemExit(f"--{option} does not size a {selection} circuit: {instead}")
    if selection == "nodes" and args.nodes is None:
        raise SystemExit("--selection nodes needs --nodes: how many nodes to keep (40) or what share of them (10%)")
    if selection == "threshold" and args.threshold is None and args.method != "acdc":
        raise SystemExit(f"--selection threshold needs --threshold: the |score| an edge of {args.method} must reach")
    return selection


def _sized_by_faithfulness(args, selection: str) -> None:
    """Refuses what ``--faithfulness`` cannot size, or a second size beside it (a learned mask's --edges is the
    density it trains to, not the cut)."""
    if selection == "threshold":
        raise SystemExit("--faithfulness sizes a topn, greedy or nodes circuit: leave out --selection threshold, or "
                         "--faithfulness")
    given = [f"--{o}" for o in ("edges", "nodes") if getattr(args, o) is not None
             and not (o == "edges" and args.method == "mask")]
    if given:
        raise SystemExit(f"{given[0]} and --faithfulness both size the circuit: give one of them")


def _select(scores: EdgeScores | SpanScores, selection: str, args,
            evaluator: Evaluator) -> tuple[Circuit | SpanCircuit, float]:
    """The circuit ``selection`` cuts from ``scores`` (by span: topn, greedy or threshold), with its faithfulness
    on the evaluator's batches: of the size asked for, or the smallest that reaches ``--faithfulness``, whose
    faithfulness the search measured already."""
    if args.faithfulness is not None:
        circuit = evaluator.smallest(scores, args.faithfulness, selection, progress=not args.no_progress)
        return circuit, circuit.info["faithfulness"]
    circuit = _cut(scores, selection, args)
    return circuit, evaluator.evaluate(circuit).faithfulness


def _cut(scores: EdgeScores | SpanScores, selection: str, args) -> Circuit | SpanCircuit:
    """The circuit of the size asked for.  A method's own circuit is cut unpruned, as the method measured it
    (``EdgeScores.topn``): ACDC's at its τ on the signed score, the edges it kept; a learned mask's top edges at
    the density it trained to (``--edges``), the circuit it trained."""
    if selection == "nodes":
        return scores.topn_nodes(args.nodes)
    if selection != "threshold":
        return getattr(scores, selection)(0.01 if args.edges is None else args.edges,
                                          prune=not (args.method == "mask" and selection == "topn"))
    if args.method == "acdc":
        return scores.threshold(scores.info["threshold"], absolute=False, prune=False)
    return scores.threshold(args.threshold)


def _evaluate(args) -> int:
    circuit = load_circuit(args.circuit)
    for option, given in (("--plot", args.plot), ("--selection", args.selection)):
        if given and circuit.scores is None:
            raise SystemExit(f"{option} is for the faithfulness curve of the circuit's scores, and {args.circuit} "
                             f"holds none: leave {option} out")
    if args.selection == "nodes" and isinstance(circuit, SpanCircuit):
        raise SystemExit(f"--selection nodes cuts a share of the nodes, and {args.circuit} scores (edge, span) pairs: "
                         "use topn or greedy")
    _, _, cm, task = _setup(args, circuit.info)
    metric, ablation, patching = _patching(args, cm, task, circuit.info)
    evaluator = Evaluator(cm, task.batches, metric, **patching)
    result = evaluator.evaluate(circuit)
    found = _found_on(circuit.info)
    rows = {"model": args.model, "task": f"{task.name} ({len(task.examples)} examples)"
            + (f"; the circuit was found on {found[1] or found[0]}"
               if found[0] is not None and found != _found_on(_task_info(args, task)) else ""),
            "circuit": _extent(circuit), "metric": f"{metric}, patched edges {_carry(ablation)}",
            "faithfulness": f"{result.faithfulness:.3f}",
            "completeness": f"{evaluator.completeness(circuit):.3f} (faithfulness with the circuit knocked out)"}
    if circuit.scores is not None:
        method = circuit.info.get("method", "")
        scores = (EdgeScores(circuit.graph, circuit.scores, method) if isinstance(circuit, Circuit)
                  else SpanScores(circuit.graph, circuit.spans, circuit.scores, method))
        selection = args.selection or mib_selection(method)  # MIB's: greedy for information flow routes
        mib = evaluator.mib(scores, progress=not args.no_progress, selection=selection)
        curve = mib["cpr_curve"]
        rows.update({"CPR": f"{mib['cpr']:.3f}", "CMD": f"{mib['cmd']:.3f}", f"curve ({selection})":
                     " ".join(f"{p:g}:{f:.2f}" for p, f in zip(curve.fractions, curve.faithfulness))})
        if args.plot:
            _plot_curves(mib, scores.tensor.numel(), args.plot)
            rows["plot"] = args.plot
    _table(rows)
    return 0


def _plot_curves(mib: dict, total: int, path: str) -> None:
    """MIB's two faithfulness curves (``Evaluator.mib``), each circuit at the fraction of the ``total`` edges (or
    (edge, span) pairs) it keeps after pruning, as the axis says, not at the fraction asked for, which pruning cuts
    down (a few strong edges no kept edge feeds keep nothing); a circuit pruned to nothing has no place on the log
    axis and is left out."""
    figure = None
    for curve, label, save in ((mib["cmd_curve"], "|score|", None), (mib["cpr_curve"], "signed score", path)):
        kept = [(n / total, f) for n, f in zip(curve.edges, curve.faithfulness) if n > 0]
        sizes, faithfulness = zip(*kept) if kept else ((), ())
        figure = plot_faithfulness(sizes, faithfulness, save, ax=figure.axes[0] if figure else None, label=label)


def _show(args) -> int:
    circuit = load_circuit(args.circuit)
    if isinstance(circuit, SpanCircuit):
        if args.edges:
            raise SystemExit("--edges cuts a plain circuit: a positional one is drawn whole, by span")
        draw_span_circuit(circuit, args.out, title=args.title)
        print(f"{_extent(circuit)}; {len(circuit.union())} edges, {len(circuit.union().nodes)} nodes → {args.out}")
        return 0
    if args.edges and circuit.scores is None:
        raise SystemExit(f"--edges draws the circuit's strongest edges, and {args.circuit} holds no scores to rank "
                         "them by: leave --edges out")
    if args.edges:
        strongest = circuit.strongest(args.edges)
        core = strongest.pruned()
        if not len(core):
            raise SystemExit(f"the {len(strongest)} strongest of the circuit's {len(circuit)} edges keep no edge once "
                             "pruned (nothing they feed reaches the logits; information flow routes' strongest feed "
                             "the first layers): give more, or draw it whole")
        circuit = core
    draw_circuit(circuit, args.out, title=args.title)
    print(f"{len(circuit)} edges, {len(circuit.nodes)} nodes → {args.out}")
    return 0


def _compare(args) -> int:
    first, second = (_plain_circuit(path, "compare") for path in args.circuits)
    labels = _labels(args.circuits)
    try:
        overlap = first.overlap(second)
    except ValueError as error:
        raise SystemExit(f"{args.circuits[1]} is no circuit of {args.circuits[0]}'s model: {error}") from None
    rows = {label: ", ".join([f"{len(c)} edges, {len(c.nodes)} nodes", *_recorded(c.info)])
            for label, c in zip(labels, (first, second))}
    rows.update({"shared edges": f"{overlap['shared_edges']} (IoU {overlap['edge_iou']:.3f})",
                 "shared nodes": f"{overlap['shared_nodes']} heads and MLPs (IoU {overlap['node_iou']:.3f})"})
    for label, mine, theirs in ((labels[0], first, second), (labels[1], second, first)):
        alone = mine - theirs
        rows[f"only in {label}"] = "\n".join([f"{len(alone)} edges", *_strongest(mine, alone, args.top)])
    _table(rows)
    if args.out:
        draw_comparison(first, second, args.out, labels=labels)
        print(f"picture → {args.out}")
    return 0


def _submit(args) -> int:
    if args.form == "importances" and (args.selection or args.signed):
        raise SystemExit("--selection and --signed cut --form circuits; importances hold every score, which the "
                         "leaderboard ranks itself")
    scores = [_scores_of(path) for path in args.circuits]
    names = {}
    for path, s in zip(args.circuits, scores):  # every folder named before any is written
        name = folder_of(s, args.task, args.model)
        if name in names:
            raise SystemExit(f"{names[name]} and {path} both go to {name}: a folder holds one task on one model")
        names[name] = path
    options = {"form": args.form, "format": args.format}
    if args.form == "circuits":
        options.update(selection=args.selection, absolute=not args.signed)
    rows = {}
    for path, s in zip(args.circuits, scores):
        folder = save_submission(s, args.out, task=args.task, model=args.model, **options)
        files = sorted(p.name for p in folder.iterdir())
        rows[path] = f"{folder}: {files[0] if len(files) == 1 else f'{len(files)} circuits'}"
    _table(rows)
    for note in submission_notes(args.out):
        print(f"note: {note}")
    return 0


def _scores_of(path: str) -> EdgeScores:
    """The edge scores a saved circuit holds, refused where it holds none."""
    circuit = _plain_circuit(path, "submit")
    if circuit.scores is None:
        raise SystemExit(f"{path} holds a circuit without scores, and a MIB submission is cut from every edge's "
                         "score: submit the file discover saves")
    return EdgeScores(circuit.graph, circuit.scores, *method_apart(circuit.info))


def _recorded(info: dict) -> list[str]:
    """How a circuit file says its circuit was found and how it did: ``method eap``, ``faithfulness 0.466``."""
    return [f"{key} {info[key]:.3f}" if isinstance(info[key], float) else f"{key} {info[key]}"
            for key in ("method", "task", "faithfulness") if key in info]


def _labels(paths: list[str]) -> tuple[str, str]:
    """The files' names as short as tells them apart: their stems, their paths when the stems agree, or first and
    second for one file given twice."""
    for labels in (tuple(Path(p).stem for p in paths), tuple(paths)):
        if labels[0] != labels[1]:
            return labels
    return "first", "second"


def _strongest(circuit: Circuit, subset: Circuit, n: int) -> list[str]:
    """``subset``'s ``n`` edges of largest |score| in ``circuit``'s scores, strongest first, each with its score
    (the first ``n`` in graph order when ``circuit`` has none)."""
    if circuit.scores is None:
        return subset.edges[:n]
    score = {e: float(circuit.scores[circuit.graph.edge_index[e]]) for e in
             Circuit(circuit.graph, subset.in_graph, circuit.scores).strongest(n).edges}
    return [f"{e} {s:+.4g}" for e, s in sorted(score.items(), key=lambda item: -abs(item[1]))]


def _read_nodes(args) -> Circuit | list[str] | None:
    """The nodes ``lens`` and ``direct`` read: a circuit file's, ``--nodes``, or None."""
    if args.circuit and args.nodes:
        raise SystemExit("give a circuit or --nodes, not both")
    return _plain_circuit(args.circuit, args.command) if args.circuit else args.nodes.split(",") if args.nodes else None


def _plain_circuit(path: str, command: str) -> Circuit:
    """The plain circuit a file holds, a positional one refused as the command line says it."""
    circuit = load_circuit(path)
    if isinstance(circuit, SpanCircuit):
        raise SystemExit(f"{path} holds a positional circuit, and {command} reads a plain one (show and evaluate "
                         "take either)")
    return circuit


def _found(nodes: Circuit | list[str] | None) -> dict | None:
    """What a circuit read for its nodes says of how it was found (its model and task), where one was read."""
    return nodes.info if isinstance(nodes, Circuit) else None


def _lens(args) -> int:
    nodes = _read_nodes(args)
    _, tokenizer, cm, task = _setup(args, _found(nodes))
    batch, row = _example(task, args.example)
    lens = logit_lens(cm, batch["clean"], batch["attention_mask"], nodes=nodes)
    print(f"example {args.example}: {task.examples[args.example].clean!r}")
    print(lens.table(tokenizer, k=args.top, example=row))
    answers = lens.answer_probs(batch["correct"])[:, :, 0]
    push = answers - lens.answer_probs(batch["incorrect"])[:, :, 0]
    examples = range(args.example - row, args.example - row + answers.shape[1])  # the batch's, as the task numbers them
    for what, values, fmt in (("p(correct answer)", answers, "{:.2f}"),
                              ("p(correct) − p(incorrect)", push, "{:+.2f}")):
        print(f"\n{what} per row, mean over examples {examples[0]} to {examples[-1]} (the batch of example "
              f"{args.example}):")
        print(_columns([f"{label} {fmt.format(p)}" for label, p in zip(lens.labels, values.mean(1).tolist())]))
    if args.out:
        plot_heatmap(answers, lens.labels, [str(i) for i in examples], args.out,
                     title=f"p(correct) through the layers · {task.name}")
        print(f"heatmap → {args.out}")
    return 0


def _direct(args) -> int:
    nodes = _read_nodes(args)
    _, tokenizer, cm, task = _setup(args, _found(nodes))
    batch, row = _example(task, args.example)
    labels, shares, whole, linear = _direct_shares(cm, task, nodes)
    order = shares.mean(1).abs().argsort(descending=True)[:args.rows].tolist()
    one = slice(row, row + 1)  # its top tokens are read vocab-wide: of that example alone
    strongest = direct_logits(cm, batch["clean"][one], batch["attention_mask"][one],
                              nodes=[labels[i] for i in order])
    print(f"example {args.example}: {task.examples[args.example].clean!r}")
    print(strongest.table(tokenizer, k=args.top))
    print(f"\ndirect share of logit(correct) − logit(incorrect), mean over {shares.shape[1]} examples, "
          f"largest first:")
    print(_columns([f"{labels[i]} {float(shares[i].mean()):+.3f}" for i in order]))
    read = float(shares.sum(0).mean())
    _table({"the model's logit difference": f"{whole['total']:+.3f}",
            f"the {len(labels)} node{'s' * (len(labels) > 1)} read": f"{read:+.3f}",
            "the other nodes": f"{whole['total'] - whole['rest'] - read:+.3f}",
            "what no node writes": f"{whole['rest']:+.3f}" + ("" if linear else " (and what first order leaves out)")})
    if args.out:
        plot_heatmap(shares[order], [labels[i] for i in order], [str(i) for i in range(shares.shape[1])], args.out,
                     title=f"direct logit difference · {task.name}")
        print(f"heatmap → {args.out}")
    if args.grid:
        plot_nodes(cm.graph, labels, shares.mean(1), args.grid,
                   title=f"direct logit difference, mean of {shares.shape[1]} · {task.name}")
        print(f"grid → {args.grid}")
    return 0


def _direct_shares(cm, task, nodes) -> tuple[list[str], torch.Tensor, dict[str, float], bool]:
    """Over every batch of ``task``: the nodes read, each one's direct share of the logit difference per example
    [nodes, examples], the mean ``rest`` and ``total`` shares, and whether the readout is linear.  Only the
    answers' logits are read."""
    shares, whole = [], {"rest": [], "total": []}
    for batch in task.batches:
        answers = batch["correct"], batch["incorrect"]
        direct = direct_logits(cm, batch["clean"], batch["attention_mask"], nodes=nodes, tokens=torch.cat(answers, 1))
        shares.append(direct.logit_diff(*answers)[..., 0])
        for of, values in whole.items():
            values.append(direct.logit_diff(*answers, of=of)[..., 0])
    means = {of: float(torch.cat(values).mean()) for of, values in whole.items()}
    return direct.labels, torch.cat(shares, 1), means, direct.linear


def _attention(args) -> int:
    if args.position != "last" and isinstance(args.position, str) and not args.spans:
        raise SystemExit(f"--position {args.position!r} names a span: add --spans")
    if args.spans and (args.example is not None or args.top is not None):
        raise SystemExit("--example and --top pick one example's tokens, and --spans averages every example by "
                         "span: leave them out")
    _, tokenizer, cm, task = _setup(args)
    if args.spans:
        return _attention_by_span(args, cm, task)
    index = args.example or 0
    batch, row = _example(task, index)
    position = args.position
    patterns = attention_patterns(cm, batch["clean"], batch["attention_mask"], heads=args.heads.split(","))
    print(f"example {index}: {task.examples[index].clean!r}")
    try:
        print(patterns.table(tokenizer, k=args.top or 3, example=row, position=position))
    except IndexError as error:
        raise SystemExit(f"--{error}") from None
    one = slice(row, row + 1)
    answers = batch["correct"][one], batch["incorrect"][one]
    print("\nwhat each head writes to logit(correct) − logit(incorrect) directly, by the token it reads "
          "(token@position), largest first:")
    try:
        sources = source_logits(cm, batch["clean"][one], batch["attention_mask"][one], heads=patterns.heads,
                                positions="last" if position == "last" else [position], tokens=torch.cat(answers, 1))
    except DecompositionError as error:  # the patterns stand without it
        sources = None
        print(f"(not split: {error})")
    else:
        print(sources.table(tokenizer, *answers, k=args.top or 3))
    if args.out:
        where = "the last token" if position == "last" else f"position {position}"
        patterns.plot(tokenizer, args.out, example=row, position=position,
                      title=f"attention from {where} · {task.name}")
        print(f"heatmap → {args.out}")
    if args.direct_out and sources is not None:
        sources.plot(tokenizer, *answers, args.direct_out,
                     title=f"direct logit difference by token read · {task.name}")
        print(f"heatmap → {args.direct_out}")
    return 0


def _attention_by_span(args, cm, task) -> int:
    """``attention --spans``: per head, the mean weight on each span and its mean direct share of the logit
    difference from each, over every example of the task."""
    _spans_named(task)
    heads, names = args.heads.split(","), list(task.batches[0]["spans"])
    weights, shares = [], []
    for batch in tqdm(task.batches, desc="attention by span", unit="batch", disable=args.no_progress):
        patterns = attention_patterns(cm, batch["clean"], batch["attention_mask"], heads=heads)
        weights.append(patterns.by_span(batch["spans"], args.position))
        answers = batch["correct"], batch["incorrect"]
        sources = source_logits(cm, batch["clean"], batch["attention_mask"], heads=heads, tokens=torch.cat(answers, 1))
        shares.append(sources.by_span(batch["spans"], *answers))
    weight, share = torch.cat(weights, 1).mean(1), torch.cat(shares, 1).mean(1)
    where = "the last token" if args.position == "last" else f"{args.position}"
    print(f"{len(task.examples)} examples; mean attention weight on each span from {where}:")
    print(_span_table(heads, names, weight, "{:.2f}"))
    print("\nmean direct share of logit(correct) − logit(incorrect) from each span, at the last token:")
    print(_span_table(heads, names, share, "{:+.2f}"))
    if args.out:
        plot_heatmap(weight, heads, names, args.out, cmap="Blues", limits=(0.0, 1.0),
                     title=f"mean attention from {where}, by span · {task.name}")
        print(f"heatmap → {args.out}")
    if args.direct_out:
        plot_heatmap(share, heads, names, args.direct_out, fmt="{:+.2f}",
                     title=f"mean direct logit difference by span read · {task.name}")
        print(f"heatmap → {args.direct_out}")
    return 0


def _spans_named(task) -> None:
    """Refuse ``--spans`` on a task that names no spans, saying how a task file names them."""
    if not all("spans" in batch for batch in task.batches):
        raise SystemExit(f"--spans: the task {task.name!r} names no spans (give your file a 'spans' field)")


def _span_table(rows: list[str], names: list[str], values: torch.Tensor, fmt: str) -> str:
    """``values`` [rows, spans] as aligned text, one line per row, each value after its span's name."""
    width = max(map(len, rows))
    return "\n".join(f"{row:>{width}}  " + "  ".join(f"{name} {fmt.format(float(v))}" for name, v in zip(names, line))
                     for row, line in zip(rows, values))


def _patch(args) -> int:
    nodes = _read_nodes(args)
    if args.all_positions and args.spans is not None:
        raise SystemExit("--all-positions patches every token at once: leave out --spans")
    if (args.ablation or args.ablation_values or args.optimal_steps) and not args.all_positions:
        raise SystemExit("--ablation, --ablation-values and --optimal-steps knock nodes out at every token: add "
                         "--all-positions")
    if args.inputs and (args.nodes or (args.circuit and args.inputs != "all")):
        raise SystemExit("--inputs patches inputs, not nodes: leave out --nodes (with a circuit, a bare --inputs "
                         "patches the inputs its edges enter)")
    if args.example is not None and (args.all_positions or args.spans is not None):
        raise SystemExit("--example picks the example patched token by token, and --all-positions and --spans "
                         "average every example: leave it out")
    if args.steps is not None and args.method != "attribution-ig":
        raise SystemExit(f"--steps counts the integration steps of --method attribution-ig; {args.method} takes none: "
                         "leave it out")
    if args.per_call is not None and args.method == "attribution":
        raise SystemExit("--per-call counts the patched runs of --method exact or the points of attribution-ig; "
                         "attribution takes one backward pass: leave it out")
    if _ablation_name(args, None) == "zero" and args.method == "attribution-ig":
        raise SystemExit("--method attribution-ig integrates from the other run's input, all zero under --ablation "
                         "zero, where the norms' gradients blow up: use --method attribution or exact, or --ablation "
                         "mean")
    if args.metric and args.method == "attribution":  # refused before the model loads
        try:
            metrics_.check_gradient_at_clean(metrics_.get(args.metric), "--method attribution",
                                             "--method exact or attribution-ig")
        except ValueError as error:
            raise SystemExit(f"--metric {error}") from None
    if args.metric and args.direction == "denoising" and metrics_.needs_clean_logits(metrics_.get(args.metric)):
        raise SystemExit(f"--metric {args.metric} compares with the run being patched, which denoising runs on the "
                         "corrupted prompts: use a metric of the answers (logit_diff, prob_diff, logprob), or noising")
    receivers = args.receivers.split(",") if args.receivers else None
    if receivers and (args.inputs or (nodes is None and not args.all_positions)):
        raise SystemExit("--receivers patches nodes' outputs into them: give --nodes (or a circuit), or "
                         "--all-positions for every head and MLP, and leave out --inputs")
    _, tokenizer, cm, task = _setup(args, _found(nodes))
    inputs = _read_inputs(args, nodes, cm.graph)
    nodes = None if inputs is not None else nodes
    steps, index = args.steps or 5, args.example or 0
    metric = metrics_.get(args.metric or task.metric)
    how = args.direction + {"exact": "", "attribution": " (to first order)",
                            "attribution-ig": f" (by integrated gradients, {steps} steps)"}[args.method] + \
        (f", into {', '.join(receivers)} alone" if receivers else "")
    sweep = {"direction": args.direction, "method": args.method, "steps": steps, "progress": not args.no_progress,
             **({} if args.per_call is None else {"masks_per_call": args.per_call})}
    if args.all_positions:
        units = {"inputs": inputs} if inputs is not None else {"nodes": nodes, "receivers": receivers}
        return _patch_everywhere(args, cm, task, metric, units, how, sweep)
    spans = None if args.spans is None else True if args.spans == "all" else args.spans.split(",")
    if spans is not None:
        _spans_named(task)
    batches = task.batches if spans is not None else data.example(*_example(task, index))
    effects = patch_by_position(cm, batches, metric, nodes=nodes, inputs=inputs, receivers=receivers,
                                spans=spans, **sweep)
    if spans is None:
        print(f"example {index}: {task.examples[index].clean!r}")
        print(f"{metrics_.name_of(metric)}: {float(effects.clean[0]):+.3f} on the clean prompt, "
              f"{float(effects.corrupted[0]):+.3f} on the corrupted one; {how}, the tokens where patching each row "
              "moves it most, as a fraction of that difference:")
    else:
        print(f"{len(task.examples)} examples; {metrics_.name_of(metric)}: {float(effects.clean.mean()):+.3f} on "
              f"the clean prompts, {float(effects.corrupted.mean()):+.3f} on the corrupted ones (means); {how}, the "
              "spans where patching each row moves it most, as a fraction of that difference, on average:")
    example = None if spans is not None else 0
    print(effects.table(tokenizer, k=args.top, example=example, normalized=True))
    if args.out:
        what = "each input" if inputs is not None else "the stream entering each layer" if nodes is None else \
            "each node"
        by = "by token" if spans is None else f"by span, mean of {len(task.examples)}"
        effects.plot(tokenizer, args.out, example=example, title=f"{args.direction} {what}, {by} · {task.name}")
        print(f"heatmap → {args.out}")
    return 0


def _read_inputs(args, nodes: Circuit | list[str] | None, graph: CircuitGraph) -> Circuit | list[str] | None:
    """What ``patch --inputs`` patches: the inputs listed; with a bare ``--inputs``, a circuit's (those its edges
    enter) or every head's q, k and v and every MLP's input; None without ``--inputs``."""
    if args.inputs is None:
        return None
    if args.inputs != "all":
        return args.inputs.split(",")
    return nodes if isinstance(nodes, Circuit) else graph.downstream[:-1]


def _patch_everywhere(args, cm, task, metric, units: dict, how: str, sweep: dict) -> int:
    """``patch --all-positions``: each node (``units``: ``nodes`` and ``receivers``) or input (``inputs``) patched
    at every token, over the whole task."""
    ablation = _ablation_name(args, None)
    if "inputs" in units:
        patch, what, patched = patch_inputs, "input", "input"
    else:
        patch, what, patched = patch_nodes, "node", "node's output"
    effects = patch(cm, task.batches, metric, **units, **sweep, ablation=_ablation(args, cm, task, ablation))
    other = {"corrupted": "on the corrupted ones", "zero": f"with every {patched} zero",
             "mean": f"with every {patched} at its mean",
             "mean-positional": f"with every {patched} at its mean at each position",
             "optimal": f"with every {patched} at its optimal ablation value"}[ablation]
    how = how if ablation == "corrupted" else f"{how}, {ablation} ablation"
    print(f"{len(task.examples)} examples; {metrics_.name_of(metric)}: {float(effects.clean.mean()):+.3f} on "
          f"the clean prompts, {float(effects.corrupted.mean()):+.3f} {other} (means); {how}, the {what}s whose "
          "patching at every token moves it most, as a fraction of that difference, on average:")
    print(effects.table(k=args.top, normalized=True))
    if args.out:
        effects.plot(args.out, title=f"{how}: each {what} at every token, mean of {len(task.examples)} · {task.name}")
        print(f"heatmap → {args.out}")
    return 0


def _check(args) -> int:
    """``fxcircuits check``: ``verify`` on every batch of the task, as a batch of another length may be captured
    otherwise and any batch may hold the prompts the model is computed wrong on; one table of each check's largest
    difference over the batches (``Verification.merge``), and a failure names the batches it is in."""
    model, _, cm, task = _setup(args)
    batches, parts = task.batches, {}
    for i, batch in enumerate(tqdm(batches, desc="check", unit="batch", disable=args.no_progress or len(batches) < 2)):
        parts[f"batch {i} ({batch['clean'].shape[1]} tokens)"] = verify(
            cm, model, batch["clean"], batch["attention_mask"], batch["corrupted"], tolerance=args.tolerance)
    result = Verification.merge(parts)
    shortest, longest = min(b["clean"].shape[1] for b in batches), max(b["clean"].shape[1] for b in batches)
    graph = cm.graph
    _table({"model": f"{cm.model_name} ({args.model}), {args.dtype} on {cm.device}",
            "graph": f"{len(graph.upstream)} nodes ({sum(n[0] == 'a' for n in graph.upstream)} heads), "
                     f"{len(graph.downstream)} inputs, {len(graph.edges):,} edges",
            "prompts": f"{task.name}: {sum(len(b['clean']) for b in batches)} prompts in {len(batches)} "
                       f"{'batch' if len(batches) == 1 else 'batches'} of "
                       f"{shortest if shortest == longest else f'{shortest}–{longest}'} tokens, and their corrupted "
                       "prompts"})
    print(f"\n{result.table()}\n")
    if result.failed:
        failed_in = {c.name: result.failed_in(c.name) for c in result.failed}
        where = "; ".join(f"{name} in " + ("every batch" if len(labels) == len(batches) > 1 else ", ".join(labels))
                          for name, labels in failed_in.items())
        print(f"WRONG: {where} differ by more than {result.tolerance:.2g}")
        return 1
    print(f"ok: every check within {result.tolerance:.2g}" +
          ("" if cm.dtype.itemsize >= 4 else f" ({args.dtype} rounds; --dtype float32 checks to the last digit)"))
    return 0


def _example(task, index: int) -> tuple[dict, int]:
    """``task.locate(index)``, an index beyond the task refused as a usage error."""
    try:
        return task.locate(index)
    except IndexError as error:
        raise SystemExit(f"--{error}") from None


def _columns(items: list[str]) -> str:
    """``items`` in aligned columns as wide as the terminal: a lens over a whole circuit has a hundred rows."""
    width = max(map(len, items)) + 2
    per_line = max(1, shutil.get_terminal_size().columns // width)
    return "\n".join("".join(f"{item:>{width}}" for item in items[i:i + per_line])
                     for i in range(0, len(items), per_line))


def _table(rows: dict[str, str]) -> None:
    """``key  value`` lines, values aligned, a value's further lines under its first."""
    width = max(map(len, rows))
    print("\n".join(f"{key:<{width}}  " + value.replace("\n", "\n" + " " * (width + 2)) for key, value in rows.items()))


if __name__ == "__main__":
    sys.exit(main())
