"""Learned masks: edge masks trained by gradient descent to keep the model's behaviour on few edges.

* ``edge_pruning`` (method ``"mask"``; Bhaskar et al. 2024): a hard-concrete gate per edge, whose expected
  fraction open is held at a density while the gates learn which edges to keep;
* ``uniform_gradient_sampling`` (method ``"ugs"``; Li & Janson 2024, one of MIB's baselines): each edge kept with
  a learned probability, sampled through a uniform window that gives the probability a gradient, with a penalty
  on the expected number of edges kept.

Both train on the distance from the metric under sampled masks to the model's own (``Distances``; for ``"kl"``,
the KL divergence to the model) and score each edge by its probability of being kept.  ``attribution.attribute``
runs them; the model's parameters are never trained.
"""
from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm

from .caller import gradients
from .circuit import count_of, undangled
from .model import CircuitModel
from .runs import Calls, Prepared, clean_values, differentiable, examples, keep_of, mask_shape, not_finite

UGS_START = 1.0  # every edge's logit at the start: kept in σ(1) = 73% of samples, as UGS starts
UGS_CLIP = 5.0  # the largest norm of a step's gradient, as UGS clips it


class Distances:
    """Each example's |metric − the model's own| under masks [n_masks, classes, E], batch by batch: what both
    learned masks train on.  ``spans`` as ``attribution.scored`` reads them: None for one class, the whole prompt."""

    def __init__(self, cm: CircuitModel, prepared: list[Prepared], metric, spans: list[str] | None):
        self.cm, self.prepared, self.metric, self.spans = cm, prepared, metric, spans
        self.model = clean_values(cm, prepared, metric).to(cm.device).split([p.size for p in prepared])

    def __call__(self, i: int, masks: torch.Tensor) -> torch.Tensor:
        """[n_masks, batch] on batch ``i``."""
        cm, p = self.cm, self.prepared[i]
        keep = keep_of(cm, masks[:, 0] if self.spans is None else masks, self.spans)
        where = None if self.spans is None else p.classes(self.spans)
        found = (p.measure(cm, self.metric, keep, where=where) - self.model[i]).abs()
        if not found.isfinite().all():
            raise not_finite(cm, self.prepared, self.metric)
        return found


# ---------------------------------------------------------------- Edge Pruning

@gradients("attribution by a learned mask (method='mask')")
def edge_pruning(cm: CircuitModel, prepared: list[Prepared], metric, progress: bool, seed: int,
                 spans: list[str] | None, *, prior: Callable[[], torch.Tensor] | None, mask_steps: int,
                 density: int | float,
                 lr: float = 0.5, warmup: float = 0.75) -> tuple[torch.Tensor, float | None]:
    """Edge Pruning: a hard-concrete gate per edge (by span, per edge and class of positions), trained so that each
    example's metric under the sampled gates stays the model's own (the loss is their mean distance, which for
    ``"kl"`` is Edge Pruning's KL to the model) while the expected fraction of open gates falls from all of them
    to ``density`` (a fraction, or an int count of gates) over the first ``warmup`` of the steps; then it holds.

    Edge Pruning holds that fraction with a Lagrangian; here every step ends with a projection instead, which
    shifts all gates' log-odds alike until the fraction is the target (``_held``).  A multiplier of the mean over
    the gates pulls on each gate 1/E as hard, so it must grow to about E times the loss's pull on a gate, which at
    Adam's pace takes thousands of steps on a model of 10⁵ edges (SmolLM2 kept 48% of them after 200, against a
    density of 5%); the projection holds the fraction from the first step.  The loss matches the model rather
    than maximising the metric: a mask that maximises it finds runs far past the model's own value.

    The gates start ranked by the scores ``prior()`` gives (a gradient method's on the same batches, the warm
    start, run once the settings are checked; None starts them all alike).  Gates that start alike and fully open
    get no gradient (the hard-concrete clamps them at 1), so the first closures are blind: on greater-than, where
    patching the year's path anywhere flips the answer, they cut it and left the mask where no gate has a gradient
    (faithfulness 0.000 at 1%), and on eight IOI prompts the same befell it (0.001); started from EAP-IG's ranking,
    it kept 0.85 and 1.33 (bench/RESULTS.md).

    Once the gates are held at the density, the steps train the circuit that will be kept rather than samples
    around it: the ``density`` gates most surely open, shut hard, with the gradient of their probabilities
    (``_circuit_gates``).  Samples open gates that the circuit leaves shut and shut gates that it keeps, and
    the two part ways: on those eight IOI prompts the samples' distance ended at 2.2 (the fully patched run's is
    3.6) while the circuit overshot the model by a third (1.33).  A circuit's gradient is taken where it stands,
    and a whole gate's swap can undo it (on a model of 110 edges two circuits traded places every few steps), so
    each held step runs its circuit on every batch, and the gates returned are those of the best circuit run.  On
    32 SmolLM2 prompts at 1% this took IOI's faithfulness from 1.27 to 1.06 and greater-than's from 0.80 to 0.96.

    The scores are each gate's probability of being open: they average to ``density``, and ``topn`` of that
    many, unpruned, keeps the held circuit.  Also returns that circuit's distance (None where no step was held).  The
    steps are passes over one batch; the held ones are rounded up to whole passes over the batches."""
    if mask_steps < 1 or not 0 <= warmup <= 1:
        raise ValueError(f"a learned mask needs mask_steps of at least 1 and a warmup from 0 to 1 (the fraction of its "
                         f"steps over which its gates close to density), got {mask_steps} and {warmup}")
    generator = torch.Generator().manual_seed(seed)
    shape, n = mask_shape(cm, spans), len(prepared)
    kept = count_of(density, shape[0] * shape[1], "gates")
    goal = kept / (shape[0] * shape[1])
    distances = Distances(cm, prepared, metric, spans)
    beta, gamma, zeta = 2 / 3, -0.1, 1.1  # the hard-concrete's temperature and stretch (Louizos et al. 2018)
    shift = beta * math.log(-gamma / zeta)  # log-odds of a gate being open = log_alpha - shift
    log_alpha = torch.full(shape, 6.0)  # each gate fully open in 99% of samples: the first steps run the model
    if prior is not None:
        log_alpha += _rank_log_odds(prior().abs())
    log_alpha.requires_grad_(True)
    start = torch.sigmoid(log_alpha.detach() - shift).mean().item()  # the expected fraction open, falling to goal
    gates = torch.optim.Adam([log_alpha], lr=lr)
    closing = math.ceil(warmup * mask_steps)
    held = math.ceil((mask_steps - closing) / n)
    bar = tqdm(total=closing + held * n, desc="mask", disable=not progress)
    for step in range(closing):  # the sampled gates close to the density
        u = torch.rand(shape, generator=generator).clamp(1e-6, 1 - 1e-6)
        z = (torch.sigmoid((u.log() - (1 - u).log() + log_alpha) / beta) * (zeta - gamma) + gamma).clamp(0, 1)
        distance = differentiable(distances(step % n, z[None]).mean(), "mask")
        # gradients for the gates only: the model's parameters stay untouched
        log_alpha.grad, = torch.autograd.grad(distance, [log_alpha])
        gates.step()
        bar.update()
        bar.set_postfix(distance=f"{distance.item():.3g}", refresh=False)
        with torch.no_grad():
            done = min(1.0, (step + 1) / max(1.0, warmup * mask_steps))
            log_alpha -= _held(log_alpha - shift, start + (goal - start) * done)
    with torch.no_grad():
        log_alpha -= _held(log_alpha - shift, goal)
    best, lowest = log_alpha.detach().clone(), None
    for _ in range(held):  # the circuit itself, on every batch
        log_alpha.grad, total = torch.zeros_like(log_alpha), 0.0
        for i in range(n):
            distance = distances(i, _circuit_gates(log_alpha - shift, kept)[None]).sum() / examples(prepared)
            log_alpha.grad += torch.autograd.grad(distance, [log_alpha])[0]
            total += distance.item()
            bar.update()
        if lowest is None or total < lowest:
            best, lowest = log_alpha.detach().clone(), total
        gates.step()
        bar.set_postfix(distance=f"{total:.3g}", best=f"{lowest:.3g}", refresh=False)
        with torch.no_grad():
            log_alpha -= _held(log_alpha - shift, goal)
    bar.close()
    return torch.sigmoid(best - shift), lowest


def _circuit_gates(log_odds: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` gates of highest log-odds open and every other gate shut, ties taken in order as
    ``EdgeScores.topn`` takes them, with the gradient of each gate's probability of being open (straight-through):
    the forward pass runs the circuit itself, and the backward pass tells each gate which way it should move."""
    open_ = torch.sigmoid(log_odds)
    chosen = torch.zeros(log_odds.numel())
    chosen[log_odds.detach().flatten().argsort(descending=True, stable=True)[:count]] = 1.0
    return chosen.reshape(log_odds.shape) + (open_ - open_.detach())  # exactly 0 or 1 forward


def _rank_log_odds(importance: torch.Tensor) -> torch.Tensor:
    """The log-odds of each entry's quantile in ``importance``, ties sharing their mean quantile (edges that no
    run tells apart, such as those at a class of positions the prompts never change, stay alike): spread
    evenly, whatever the scores' scale, from about -log(n) for the least to +log(n) for the most."""
    flat = importance.flatten().to(torch.float64)
    ordered = flat.sort().values
    below, through = torch.searchsorted(ordered, flat), torch.searchsorted(ordered, flat, right=True)
    quantile = (below + through) / (2 * flat.numel())
    return (quantile.log() - (-quantile).log1p()).to(torch.float32).reshape(importance.shape)


def _held(log_odds: torch.Tensor, fraction: float) -> float:
    """The shift c for which sigmoid(log_odds - c) averages to ``fraction``, by bisection (the mean falls as c
    grows); 50 halvings of [-100, 100] leave it within 1e-13."""
    low, high = -100.0, 100.0
    for _ in range(50):
        middle = (low + high) / 2
        low, high = (middle, high) if torch.sigmoid(log_odds - middle).mean() > fraction else (low, middle)
    return (low + high) / 2


# ---------------------------------------------------------------- uniform gradient sampling

@gradients("attribution by uniform gradient sampling (method='ugs')")
def uniform_gradient_sampling(cm: CircuitModel, prepared: list[Prepared], metric, progress: bool, seed: int,
                              spans: list[str] | None, calls: Calls, *, mask_steps: int, samples: int,
                              penalty: float, lr: float) -> torch.Tensor:
    """UGS (Li & Janson 2024): each edge (by span, each edge and class of positions) is kept with probability
    p = σ(θ), and θ learns to lower the mean distance to the model (``Distances``) plus ``penalty`` · Σ p, the
    expected number of edges kept times λ.  Each step draws ``samples`` masks (``_window_samples``) and runs each
    on one batch, in turn, ``calls.size`` masks a call; its gradient is clipped to norm 5, and AdamW takes it
    (β₂ = 0.995, no decay), as UGS does.

    As UGS does, a sample keeps only edges that lie on a path from the input to the logits through its kept
    edges (a dangling edge's mask is 0, ``circuit.undangled``; by span, through the edges it keeps in any class, as
    ``SpanCircuit.pruned`` tests): circuits cut from the scores are pruned so too, so the steps learn on such
    circuits.

    The penalty pulls every edge alike, λ·p(1 − p) on its logit, and the distance pulls each edge by how much
    keeping it moves the model, so λ is the least pull, in the metric's units, that an edge needs to stay: past
    it, edges drift shut.  The scores are each edge's p (float64, which tells logits apart up to about 36 where
    float32 rounds p to 1 past 17): the ranking that MIB cuts at each size."""
    if mask_steps < 1 or samples < 1 or not penalty >= 0 or not lr > 0:
        raise ValueError(f"uniform gradient sampling needs mask_steps and samples of at least 1, a penalty of at "
                         f"least 0 and a positive lr, got {mask_steps}, {samples}, {penalty} and {lr}")
    generator = torch.Generator().manual_seed(seed)
    distances = Distances(cm, prepared, metric, spans)
    logits = torch.full(mask_shape(cm, spans), UGS_START, requires_grad=True)
    optimizer = torch.optim.AdamW([logits], lr=lr, betas=(0.9, 0.995), weight_decay=0.0)
    bar = tqdm(range(mask_steps), desc="ugs", disable=not progress)
    for step in bar:
        i, total = step % len(prepared), []
        masks = _window_samples(logits, torch.rand((samples, *logits.shape), generator=generator))
        masks = masks * undangled(cm.graph, (masks.detach() > 0).any(1))[:, None]

        def pull(chunk: torch.Tensor) -> torch.Tensor:
            """The mean distance's gradient in ``chunk``'s masks."""
            chunk = chunk.detach().requires_grad_(True)
            distance = distances(i, chunk).sum() / (samples * prepared[i].size)
            total.append(distance.item())
            return torch.autograd.grad(differentiable(distance, "ugs"), chunk)[0]

        pulls = calls.split(masks.detach(), pull, prepared)
        torch.autograd.backward([masks, penalty * torch.sigmoid(logits).sum()], [pulls, None])
        torch.nn.utils.clip_grad_norm_([logits], UGS_CLIP)
        optimizer.step()
        optimizer.zero_grad()
        ran = total[-math.ceil(samples / calls.size):]  # the calls that ran to the end, after any out of memory
        bar.set_postfix(distance=f"{sum(ran):.3g}", kept=f"{torch.sigmoid(logits).mean().item():.3f}",
                        refresh=False)
    return torch.sigmoid(logits.detach().double())


def _window_samples(logits: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """Masks [samples, …] drawn from ``uniform`` noise so that each edge is kept (1) with probability p = σ(θ),
    patched (0) otherwise, and lies between where the noise falls in a window of width w = p(1 − p) about p:
    1 − clamp((u − p)/w + ½, 0, 1).  A mask's mean over the noise is p, and in the window its gradient in θ is
    p(1 − p) (the window's width is a constant, and p's gradient scaled by it), so d/dθ of a loss linear in the
    mask is the derivative of its mean over Bernoulli(p) masks.

    Few samples fall in an edge's window, so each edge's gradient is the mean over those that do, not over all
    the samples (zero where none do), as UGS weighs them.  A window that has shrunk to nothing (p rounded to 0 or
    1) gives its edge no gradient: its width is floored to keep the division finite."""
    p = torch.sigmoid(logits)
    width = (p * (1 - p)).detach().clamp(min=1e-12)
    p = width * p - (width - 1) * p.detach()  # p's value, with p's gradient scaled by the window's width
    masks = 1 - ((uniform - p) / width + 0.5).clamp(0, 1)
    inside = ((masks > 0) & (masks < 1)).sum(0)
    weight = torch.where(inside > 0, uniform.shape[0] / inside.clamp(min=1), 0.0)
    return weight * masks + (1 - weight) * masks.detach()
