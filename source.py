"""SOURCE (Bae, Lin, Lorraine and Grosse, 2024, "Training Data Attribution via Approximate Unrolled Differentiation"):
influence through the training run's segments, each with the EK-FAC factors of its own checkpoint.

    python train.py --output_dir checkpoints/swag --save_epochs
    python analyze.py --checkpoint_dir checkpoints/swag --fast --source_horizon 10                      # 1 segment
    python analyze.py --checkpoint_dir checkpoints/swag --fast --source_horizon 10 --source_segments 3  # 3 epochs

Training is split into L segments, the l-th ending at checkpoint theta_l (here: the model train.py --save_epochs
kept after an epoch; the last segment ends at the analysed model). Within a segment SOURCE takes the Hessian H_l and
the training gradients as constant, so K_l steps of gradient descent at learning rate eta_l move a downweighted
example's contribution by (I - exp(-eta_l K_l H_l)) H_l^-1 g_l(z_m), and each later segment multiplies it by
exp(-eta_l K_l H_l). The score of query z_q and training example z_m is

    sum_l  g_q(theta_L)^T  S_L ... S_{l+1}  F_l  g_m(theta_l),    S_l = exp(-c_l H_l),  F_l = (I - S_l) H_l^-1,

with the query gradient g_q at the analysed model and g_m at each segment's checkpoint. H_l is the EK-FAC
approximation fitted on theta_l, so every matrix function acts on its corrected eigenvalues in its eigenbasis:
F_l has eigenvalues (1 - exp(-c_l lambda)) / lambda (finite at lambda = 0, where it is c_l: no damping is needed)
and S_l has exp(-c_l lambda). One segment is EK-FAC with this eigenvalue function in place of 1 / (lambda + damping);
as the horizon grows it tends to the undamped inverse.

c_l = eta_l K_l assumes SGD. These models train with AdamW, whose per-coordinate step sizes have no single eta, so
the horizon is a setting: `--source_horizon T` is the whole run's summed step in units of each module's mean
eigenvalue (c_l = T * share_l / mean(lambda) for each module; kronfluence's heuristic damping is scaled the same way,
0.1 * mean(lambda)), and segment l gets its share of the run's summed learning rate (equal shares under a constant
rate). Scores are linear in each g_m, so the segments' scores add: one fused scoring pass (fused_scores.py) per
segment, its queries preconditioned by S_L ... S_{l+1} F_l.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVECTORS_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)
from torch import nn

from fused_scores import fused_pairwise_scores, load_weights, model_weights


@dataclass
class Segment:
    """One segment of the run: the model at its end, the EK-FAC factors fitted on that model, and its share of the
    run's summed learning rate (the shares of a run's segments add to 1)."""

    weights: Optional[dict]  # parameter name (model_weights's names) -> tensor; None: the analysed model's own
    factors: dict  # kronfluence's factor dict: factor name -> module name -> tensor
    share: float


def learning_rate_shares(epochs: int, analysed_epoch: int, segments: int, scheduler: str) -> list:
    """Each segment's share of the learning rate summed over epochs 1..analysed_epoch, where the last `segments` - 1
    segments are one epoch each and the first takes the epochs before them. train.py's schedules: constant, or
    linear decay to 0 over the run's `epochs`, under which epoch e holds (2E - 2e + 1) / E^2 of the run's sum
    (equal steps per epoch)."""
    if not 1 <= segments <= analysed_epoch <= epochs:
        raise ValueError(f"{segments} segments of {analysed_epoch} epochs (of {epochs})")
    if scheduler not in ("constant", "linear"):
        raise ValueError(f"unknown learning-rate schedule {scheduler!r}")
    mass = [1.0 if scheduler == "constant" else (2 * epochs - 2 * e + 1) / epochs**2
            for e in range(1, analysed_epoch + 1)]
    first = analysed_epoch - segments + 1  # the first segment ends after this epoch
    per_segment = [sum(mass[:first])] + mass[first:]
    total = sum(per_segment)
    return [m / total for m in per_segment]


def eigenvalue_functions(lam: torch.Tensor, horizon: float, share: float) -> tuple:
    """(F, S) on EK-FAC's corrected eigenvalues `lam` of one module: (1 - exp(-c lam)) / lam and exp(-c lam), with
    c = horizon * share / mean(lam). A module whose eigenvalues are all 0 has no gradient: F = 0 and S = 1."""
    mean = lam.mean()
    if mean <= 0:
        return torch.zeros_like(lam), torch.ones_like(lam)
    c = horizon * share / mean
    x = c * lam
    # -expm1(-x) / lam keeps full precision where x is small; at lam == 0 the limit is c
    f = torch.where(lam > 0, -torch.expm1(-x) / torch.where(lam > 0, lam, 1), c)
    return f, torch.exp(-x)


class SourcePreconditioner:
    """The query side of SOURCE: per segment l, g -> S_L ... S_{l+1} F_l g per module, in `dtype` (at least
    float32: the products of several segments' rotations would lose too much in bf16)."""

    def __init__(self, segments: list, horizon: float, names, device: torch.device, dtype: torch.dtype):
        if horizon <= 0:
            raise ValueError(f"the SOURCE horizon must be positive, got {horizon}")
        self.dtype = torch.promote_types(dtype, torch.float32)
        self.bases = []  # per segment: module -> (gradient eigenvectors, activation eigenvectors, F, S)
        for segment in segments:
            factors = segment.factors
            per_module = {}
            for name in names:
                lam = (factors[LAMBDA_MATRIX_NAME][name].to(device, torch.float64)
                       / factors[NUM_LAMBDA_PROCESSED][name].to(device, torch.float64))
                f, s = eigenvalue_functions(lam, horizon, segment.share)
                per_module[name] = tuple(t.to(device, self.dtype).contiguous() for t in (
                    factors[GRADIENT_EIGENVECTORS_NAME][name], factors[ACTIVATION_EIGENVECTORS_NAME][name], f, s))
            self.bases.append(per_module)

    @staticmethod
    def _apply(gradient, basis, which: int):
        q_out, q_in = basis[0], basis[1]
        rotated = q_out.t() @ gradient @ q_in
        return q_out @ (rotated * basis[which]) @ q_in.t()

    def __call__(self, segment: int, name: str, gradient: torch.Tensor) -> torch.Tensor:
        """S_L ... S_{segment+1} F_segment applied to (examples, out, in [+ bias]) gradients of module `name`."""
        g = gradient.to(self.dtype)
        for later in range(len(self.bases) - 1, segment, -1):
            g = self._apply(g, self.bases[later][name], 3)
        return self._apply(g, self.bases[segment][name], 2)


def source_pairwise_scores(model: nn.Module, task, segments: list, horizon: float, score_args, query_dataset,
                           train_dataset, collator, query_batch_size: int, train_batch_size: int,
                           device: torch.device, timings: dict = None, **fused) -> torch.Tensor:
    """(queries × train) float32 SOURCE scores. The query gradients come from `model` as it is (the analysed
    model, the end of the last segment, whose Segment.weights may be None); the training gradients of segment l
    from segments[l].weights. One fused scoring pass per segment; `model` is left with its own weights.
    `fused`: fused_pairwise_scores's options."""
    names = sorted(next(iter(segments[-1].factors.values())))
    precondition = SourcePreconditioner(segments, horizon, names, device, score_args.precondition_dtype)
    query_weights = {name: p.detach().clone() for name, p in model_weights(model).items()}
    total, plans = None, []
    try:
        for index, segment in enumerate(segments):
            # the last segment ends at the analysed model: both sides at its weights, nothing to swap
            swap = index < len(segments) - 1
            # on the device once: each pass puts them back after its query side
            train_weights = {name: w.to(device) for name, w in segment.weights.items()} if swap else None
            load_weights(model, train_weights if swap else query_weights)
            plan = {}
            scores = fused_pairwise_scores(
                model, task, segments[-1].factors, "ekfac", score_args, query_dataset, train_dataset, collator,
                query_batch_size, train_batch_size, device=device, timings=plan,
                query_weights=query_weights if swap else None, train_weights=train_weights,
                precondition=lambda name, gradient, index=index: precondition(index, name, gradient), **fused)
            plans.append(plan)
            total = scores.double() if total is None else total.add_(scores.double())
    finally:
        load_weights(model, query_weights)
    if timings is not None:
        timings.update(plans[-1], segments=plans)
    return total.float()
