"""fxcircuits: find circuits in any Hugging Face decoder-only model.

The pipeline, one module per stage: capture (torch.export) → components (residual stream, heads, MLPs) → rewrite
(per-edge inputs) → patching (masks over edges, at all positions or some; ``activation_patching`` patches each node
or each head's q, k, v input, or sweeps them or layers over the positions; ``ablations``: what a patched edge
carries where the other run is no prompt — zeros, means, optimal constants) → attribution (edge scores) →
scores/circuit (selection, save/load; ``positional``: edges scored and kept per span of the prompt; ``submission``:
MIB leaderboard folders) → evaluation (faithfulness, CPR/CMD) → lens, patterns and draw (what the circuit does and
what each node writes straight into the logits, and each head from which token; where its heads look, and a
picture of it); verification (a traced model checked against the HF model it was traced from, on one's own
prompts). Data: models (load_model), tasks, data (batches), metrics.
"""
from . import data, metrics, tasks
from .ablations import Ablation, mean_ablation, optimal_ablation, zero_ablation
from .attribution import METHODS, attribute
from .capture import CaptureError
from .circuit import Circuit
from .components import DecompositionError
from .evaluation import Evaluation, Evaluator, evaluate
from .graph import CircuitGraph
from .lens import DirectLogits, Lens, SourceLogits, direct_logits, logit_lens, source_logits
from .model import CircuitModel, trace
from .models import load_model
from .patterns import Patterns, attention_patterns
from .positional import SpanCircuit, SpanScores, attribute_by_span
from .activation_patching import NodeEffects, PositionEffects, patch_by_position, patch_inputs, patch_nodes
from .scores import EdgeScores
from .submission import save_submission
from .verification import Verification, verify

__all__ = ["trace", "CircuitModel", "CircuitGraph", "Circuit", "EdgeScores", "attribute", "METHODS", "evaluate",
           "Evaluator", "Evaluation", "logit_lens", "Lens", "direct_logits", "DirectLogits", "source_logits",
           "SourceLogits", "attention_patterns", "Patterns", "patch_by_position", "PositionEffects",
           "patch_nodes", "patch_inputs", "NodeEffects",
           "attribute_by_span", "SpanScores", "SpanCircuit", "verify", "Verification", "load_model",
           "save_submission", "Ablation", "zero_ablation", "mean_ablation", "optimal_ablation", "data", "metrics",
           "tasks", "CaptureError", "DecompositionError"]
