"""Influence with kronfluence: the analysis settings (`AnalysisConfig`, which also names its outputs), the factor
stages, and the scoring backends that turn fitted factors into pairwise or self-influence scores. A backend is one
class in `BACKENDS`; analyze.py is the command line over this module."""

import contextlib
import dataclasses
import importlib.metadata
import logging
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.utils.common.factor_arguments import all_low_precision_factor_arguments
from kronfluence.utils.common.score_arguments import all_low_precision_score_arguments
from kronfluence.utils.constants import (
    ACTIVATION_COVARIANCE_MATRIX_NAME,
    COVARIANCE_FACTOR_NAMES,
    EIGENDECOMPOSITION_FACTOR_NAMES,
    GRADIENT_COVARIANCE_MATRIX_NAME,
    LAMBDA_FACTOR_NAMES,
    NUM_ACTIVATION_COVARIANCE_PROCESSED,
    NUM_GRADIENT_COVARIANCE_PROCESSED,
)
from safetensors import safe_open
from safetensors.torch import load_file
from torch.utils.data import DataLoader

import fp8
from formats import (
    LABELS,
    SCORES_FILE,
    SCORES_KEY,
    SELF_SCORES_FILE,
    TRAIN_FIT_FILE,
    save_fit,
    save_scores,
)
from fused_scores import fused_pairwise_scores, fused_self_scores, longest_first
from pipeline import decode_choices, model_logits
from source import source_pairwise_scores
from utils import GpuBusy, HookTimes, UserError, at_least, halving_on_oom, positive_float, seed_value

logger = logging.getLogger(__name__)

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]


FACTOR_STAGES = ["covariance", "eigendecomposition", "lambda"]  # kronfluence's, in order; then the scores

DROPOUT_RATE = 0.1  # --dropout_rate's default: the rate BERT-style models train with
QUERY_GRADIENT_ACCUMULATION = 10  # the original example's setting when --query_gradient_rank is used
# --fast fits EKFAC's lambda on at most this many random training rows (kronfluence's own cap is 100,000): at
# kronfluence's SWAG scale a fifteenth of the rows, and about half the lambda stage's time of 10,000 (8.8 s on an
# H200, results/benchmark_h200.json; its time grows with the rows, besides a fixed part). On the trained MiniLM,
# lambda from 1,000 or 2,000 random rows of 4,000 keeps a Pearson of 0.9993 with kronfluence's fp32 EKFAC and its LDS
# within 0.0005 (results/agreement_anetcap_minilm.sh); the error of a mean shrinks with the rows (2.5x the larger
# sample)
FAST_LAMBDA_ROWS = 5_000


def add_method_args(parser) -> None:
    """The flags of `AnalysisConfig` (analyze.py's method: strategy, precision, scoring backend, damping, ...)."""
    group = parser.add_argument_group("method")
    group.add_argument("--factor_strategy", choices=STRATEGIES, default="ekfac",
                       help="Hessian approximation used to precondition the gradients.")
    group.add_argument("--query_gradient_rank", type=int, default=-1,
                       help="Rank of the low-rank query-gradient approximation (-1: full rank).")
    group.add_argument("--use_half_precision", action="store_true",
                       help="bf16 for factors and scores (kronfluence's all_low_precision_* arguments).")
    group.add_argument("--fp32_accumulation", action="store_true",
                       help="With --use_half_precision: bf16 forward/backward and per-example gradients, but the "
                            "covariance and lambda factors in fp32 (their matmuls and sums; kronfluence's all-bf16 "
                            "sums lose precision over many batches).")
    group.add_argument("--lambda_max_examples", type=at_least(1), default=None,
                       help="Fit EKFAC's eigenvalue corrections (lambda) on N random training rows only "
                            f"(default: all rows, at most {FAST_LAMBDA_ROWS:,} with --fast).")
    group.add_argument("--covariance_max_examples", type=at_least(1), default=None,
                       help="Fit the covariance factors (and so the eigenbases) on N random training rows only "
                            "(default: all rows; kronfluence's covariance_max_examples, on random rows rather than "
                            "the first).")
    group.add_argument("--scoring", choices=list(BACKENDS), default=None,
                       help="kronfluence (default): its own pairwise-score loop (the reference); fused (default with "
                            "--fast): the same scores from the same factors, one training pass per chunk of queries "
                            "(fused_scores.py).")
    group.add_argument("--fast", action="store_true",
                       help="The fast path: --use_half_precision --fp32_accumulation --scoring fused, the covariance "
                            "and lambda factors fitted with faster kernels for the same sums (bf16-input matmuls "
                            "with float32 results, EKFAC's rotation before the example gradient is formed), and "
                            f"lambda on at most {FAST_LAMBDA_ROWS:,} random training rows (--lambda_max_examples).")
    group.add_argument("--fp8_contraction", action="store_true",
                       help="With --scoring fused (or --fast): the query × training contraction in fp8 e4m3, each row "
                            "with a scale of its own (fp8.py): half the bytes per query gradient, so fewer module "
                            "groups, in torch's one-scale fp8 kernels (those kernels faster than bf16's at most of a "
                            "pass's shapes; its end-to-end time and agreement on a GPU are not measured: "
                            "results/README.md); needs a GPU of compute capability 8.9 or above (Ada, Hopper), or a "
                            "CPU, which emulates it.")
    group.add_argument("--damping_factor", type=float, default=1e-8,
                       help="Damping added to the Hessian approximation (kronfluence's default 1e-8); "
                            "a negative value selects kronfluence's heuristic (0.1 × mean eigenvalue).")
    group.add_argument("--use_empirical_fisher", action="store_true",
                       help="Fit the factors with the dataset labels instead of labels sampled from the model "
                            "(deterministic: used to compare runs, e.g. 1 GPU against several).")
    group.add_argument("--seed", type=seed_value, default=0,
                       help="Seed for the sampled (true-Fisher) labels and the random lambda and covariance rows.")
    group.add_argument("--dropout_ensemble", type=at_least(2), default=None, metavar="K",
                       help="Average the scores of K copies of the model, each with its own random mask on the weights "
                            "of every nn.Linear (a fixed sub-network: the same mask for the query and the training "
                            "gradients); the factors are fitted once, on the unmasked model.")
    group.add_argument("--dropout_rate", type=float, default=None,
                       help="With --dropout_ensemble: the share of weights each mask drops (default 0.1; kept weights "
                            "are scaled by 1 / (1 - rate), as in dropout).")
    group.add_argument("--dropout_seed", type=seed_value, default=None,
                       help="With --dropout_ensemble: the seed of the masks (default 0); other masks reuse the factors.")
    group.add_argument("--source_horizon", type=positive_float, default=None, metavar="T",
                       help="SOURCE (source.py): EK-FAC's inverse replaced by the unrolled training's "
                            "(1 - exp(-c lambda)) / lambda, c = T x the segment's share of the run's learning rate / "
                            "the module's mean eigenvalue (T: the whole run's summed step; needs --factor_strategy "
                            "ekfac, scores with --scoring fused).")
    group.add_argument("--source_segments", type=at_least(1), default=1, metavar="N",
                       help="With --source_horizon: the run as N segments, the last ending at the analysed model and "
                            "the others at the epoch checkpoints train.py --save_epochs kept before it, each with its "
                            "own factors (fitted here, or reused from analyze.py --checkpoint_epoch) and its own "
                            "training gradients (default 1: the analysed model alone).")


def resolve_method_args(parser, args) -> None:
    """--fast's implied flags, the scoring backend's default, and the method flags' checks (parser errors)."""
    if args.fast and args.scoring == "kronfluence":
        parser.error("--fast scores with --scoring fused; drop --scoring kronfluence (or --fast)")
    if args.fast:
        args.use_half_precision = args.fp32_accumulation = True
    if args.source_horizon and args.scoring == "kronfluence":
        parser.error("--source_horizon scores with --scoring fused; drop --scoring kronfluence")
    args.scoring = args.scoring or ("fused" if args.fast or args.source_horizon else "kronfluence")
    if not np.isfinite(args.damping_factor) or args.damping_factor == 0:
        parser.error(f"argument --damping_factor: must be a positive number, or negative for the heuristic; "
                     f"got {args.damping_factor}")
    if args.query_gradient_rank == 0 or args.query_gradient_rank < -1:
        parser.error("--query_gradient_rank must be -1 (full rank) or a positive rank")
    if not args.dropout_ensemble and (args.dropout_rate is not None or args.dropout_seed is not None):
        parser.error("--dropout_rate and --dropout_seed shape the masks of --dropout_ensemble K; add it, or drop them")
    args.dropout_rate = DROPOUT_RATE if args.dropout_rate is None else args.dropout_rate
    args.dropout_seed = args.dropout_seed or 0
    if not 0 < args.dropout_rate < 1:
        parser.error(f"argument --dropout_rate: must be between 0 and 1 (exclusive); got {args.dropout_rate}")
    if args.source_segments > 1 and not args.source_horizon:
        parser.error("--source_segments splits SOURCE's run; add --source_horizon T (or drop it)")
    if args.source_horizon:
        for clash, given in (("--factor_strategy other than ekfac", args.factor_strategy != "ekfac"),
                             ("--damping_factor (SOURCE needs no damping)", args.damping_factor != 1e-8),
                             ("--dropout_ensemble", bool(args.dropout_ensemble))):
            if given:
                parser.error(f"--source_horizon is EK-FAC's, undamped, on the model itself: drop {clash}")
    self_influence = getattr(args, "self_influence", False)
    if args.fp8_contraction and (args.scoring != "fused" or self_influence):
        parser.error("--fp8_contraction is the fused pairwise scores' contraction: add --scoring fused (or --fast), "
                     "drop --self_influence, or drop it")
    if args.fp8_contraction and torch.cuda.is_available():
        # this process's GPU (torchrun's local rank over the visible ones, as utils.process_device), read without
        # making it current
        gpu = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        if not fp8.supported(gpu):
            parser.error(f"--fp8_contraction needs a GPU of compute capability 8.9 or above (Ada, Hopper) or no GPU; "
                         f"this one's is {'.'.join(map(str, torch.cuda.get_device_capability(gpu)))}: drop it")
    if args.fp32_accumulation and not args.use_half_precision:
        parser.error("--fp32_accumulation modifies --use_half_precision; add it (fp32 runs accumulate in fp32 anyway)")


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    """What an analysis computes (analyze.py's flags of the same names). Its outputs are named after it."""

    factor_strategy: str = "ekfac"  # one of STRATEGIES
    use_half_precision: bool = False
    fp32_accumulation: bool = False  # with use_half_precision: the factor sums in fp32
    fast: bool = False  # the fast factor kernels (fast_kernels.fast_factor_kernels)
    scoring: str = "kronfluence"  # a key of BACKENDS
    fp8_contraction: bool = False  # the fused scores' contraction in e4m3 with row scales (fp8.py)
    damping_factor: float = 1e-8  # negative: kronfluence's heuristic
    query_gradient_rank: int = -1  # -1: full rank
    lambda_max_examples: Optional[int] = None
    covariance_max_examples: Optional[int] = None
    use_empirical_fisher: bool = False
    seed: int = 0  # the sampled labels and the lambda and covariance rows
    self_influence: bool = False
    dropout_ensemble: Optional[int] = None  # members, each scored with its own weight mask
    dropout_rate: float = DROPOUT_RATE
    dropout_seed: int = 0
    source_horizon: Optional[float] = None  # SOURCE (source.py) in place of EK-FAC's damped inverse
    source_segments: int = 1

    @classmethod
    def from_args(cls, args) -> "AnalysisConfig":
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

    @property
    def fits_lambda(self) -> bool:
        """The strategies with a lambda stage (eigenvalue corrections: EKFAC's, or diagonal's own), by kronfluence."""
        return FactorConfig.CONFIGS[self.factor_strategy].requires_lambda_matrices

    @property
    def fits_covariance(self) -> bool:
        """The strategies with a covariance stage (the Kronecker factors: KFAC's and EKFAC's), by kronfluence."""
        return FactorConfig.CONFIGS[self.factor_strategy].requires_covariance_matrices

    @property
    def lambda_rows(self) -> Optional[int]:
        """The most training rows lambda is fitted on (None: all): --lambda_max_examples, else --fast's cap. The
        cap is part of --fast's recipe, so it adds nothing to the factors' name."""
        return self.lambda_max_examples or (FAST_LAMBDA_ROWS if self.fast else None)

    def factors_name(self, num_train: Optional[int]) -> str:
        """Factors depend on the strategy, the precision and the training rows they were fitted on (`num_train`:
        --max_train_samples, 0 or None for all)."""
        name = f"{self.factor_strategy}_n{num_train or 'all'}"
        precision = ("_fast" if self.fast else "_bf16acc32" if self.fp32_accumulation else "_bf16"
                     if self.use_half_precision else "")
        lam = f"_lam{self.lambda_max_examples}" if self.lambda_max_examples and self.fits_lambda else ""
        cov = f"_cov{self.covariance_max_examples}" if self.covariance_max_examples and self.fits_covariance else ""
        seed = f"_s{self.seed}" if self.seed else ""
        return name + precision + cov + lam + ("_empfisher" if self.use_empirical_fisher else "") + seed

    def scores_name(self, num_train: Optional[int], num_queries: Optional[int]) -> str:
        factors = self.factors_name(num_train)
        name = f"self_{factors}" if self.self_influence else f"{factors}_q{num_queries or 'all'}"
        if self.query_gradient_rank > 0:
            name += f"_qlr{self.query_gradient_rank}"
        if self.damping_factor != 1e-8:
            name += "_dampheur" if self.damping_factor < 0 else f"_damp{self.damping_factor:g}"
        if self.dropout_ensemble:
            name += f"_drop{self.dropout_ensemble}x{self.dropout_rate!r}" + (f"s{self.dropout_seed}"
                                                                            if self.dropout_seed else "")
        if self.source_horizon:
            name += f"_source{self.source_horizon!r}" + (f"x{self.source_segments}" if self.source_segments > 1 else "")
        name += "" if self.scoring == "kronfluence" else f"_{self.scoring}"  # the reference has no suffix
        return name + ("_fp8" if self.fp8_contraction else "")

    def factor_arguments(self, num_covariance_rows: int, num_lambda_rows: int) -> FactorArguments:
        """kronfluence's factor arguments. Its row caps (covariance_max_examples and lambda_max_examples, 100,000
        by default) are set to the rows given: the rows come length-sorted, so a cap below them would fit the
        factors on the longest rows only."""
        factor_args = (all_low_precision_factor_arguments(strategy=self.factor_strategy, dtype=torch.bfloat16)
                       if self.use_half_precision else FactorArguments(strategy=self.factor_strategy))
        factor_args.covariance_max_examples, factor_args.lambda_max_examples = num_covariance_rows, num_lambda_rows
        if self.use_half_precision and self.fp32_accumulation:
            factor_args.activation_covariance_dtype = factor_args.gradient_covariance_dtype = torch.float32
            factor_args.lambda_dtype = torch.float32
        factor_args.use_empirical_fisher = self.use_empirical_fisher
        return factor_args

    def score_arguments(self) -> ScoreArguments:
        damping = None if self.damping_factor < 0 else self.damping_factor
        score_args = (all_low_precision_score_arguments(dtype=torch.bfloat16, damping_factor=damping)
                      if self.use_half_precision else ScoreArguments(damping_factor=damping))
        if self.query_gradient_rank > 0:
            score_args.query_gradient_low_rank = self.query_gradient_rank
            score_args.query_gradient_accumulation_steps = QUERY_GRADIENT_ACCUMULATION
        return score_args


def factor_rows(train, lambda_max_examples=None, seed: int = 0, covariance_max_examples=None):
    """(covariance rows, lambda rows): each all rows or N random ones (drawn independently), longest first. Factors
    are sums over rows, so their order is free: length-sorted batches pad little, and a batch size that does not fit
    fails at once."""
    def rows(cap, stream):
        if not cap or cap >= len(train):
            return train
        return train.select(np.sort(np.random.default_rng(stream).choice(len(train), cap, replace=False)))
    # lambda's draw takes the seed alone, so factors fitted without a covariance cap keep their lambda rows
    covariance, lam = rows(covariance_max_examples, [seed, 1]), rows(lambda_max_examples, seed)
    return covariance.select(longest_first(covariance)), lam.select(longest_first(lam))


def factor_stages(analyzer, f_name: str, covariance_rows, lambda_rows, factor_args, overwrite: bool) -> dict:
    """kronfluence's three factor stages, in order, as callables of the per-device `factor_batch_size` (benchmark.py times
    them one by one; the eigendecomposition takes no batches)."""
    return {
        "covariance": lambda factor_batch_size=None: analyzer.fit_covariance_matrices(
            f_name, covariance_rows, factor_args=factor_args, per_device_batch_size=factor_batch_size,
            overwrite_output_dir=overwrite),
        "eigendecomposition": lambda factor_batch_size=None: analyzer.perform_eigendecomposition(
            f_name, factor_args=factor_args, overwrite_output_dir=overwrite),
        "lambda": lambda factor_batch_size=None: analyzer.fit_lambda_matrices(
            f_name, lambda_rows, factor_args=factor_args, per_device_batch_size=factor_batch_size,
            overwrite_output_dir=overwrite),
    }


def stage_seed(seed: int, stage: str, rank: int = 0) -> int:
    """Each stage (and rank) draws its sampled labels from a seed of its own: a stage redone after a kill draws
    what it drew in an uninterrupted run, whatever ran before it in this process."""
    return int(np.random.default_rng([seed, [*FACTOR_STAGES, "scores"].index(stage), rank]).integers(2**31))

STAGE_FILES = dict(zip(FACTOR_STAGES, (COVARIANCE_FACTOR_NAMES, EIGENDECOMPOSITION_FACTOR_NAMES, LAMBDA_FACTOR_NAMES)))


def check_factor_files(directory: Path, stages: list, fix: str) -> None:
    """The files of the finished stages are whole (their headers and sizes agree) and hold finite numbers, or one
    line names the damaged file or the module whose factor is NaN or infinite (scores from them would be NaN).
    (An unfinished stage's files are about to be replaced.)"""
    for stage in stages:
        for name in STAGE_FILES[stage]:
            file = directory / f"{name}.safetensors"
            if not file.exists():  # a stage writes only what its strategy needs
                continue
            try:
                with safe_open(str(file), framework="pt") as f:
                    tensors = {module: f.get_tensor(module) for module in f.keys()}
            except Exception as exc:
                raise UserError(f"cannot read {file} ({type(exc).__name__}: {exc}); is it truncated? {fix}") from None
            for module, tensor in tensors.items():
                if not torch.isfinite(tensor).all():
                    raise UserError(f"the {stage} factor {name} of module {module} holds NaN or infinite values "
                                    f"({file}); the model's gradients overflow there (a diverged checkpoint, or bf16: "
                                    f"drop --use_half_precision); {fix}")


def failing_eigendecomposition(directory: Path, device: torch.device) -> str:
    """The first module (in kronfluence's order) whose covariance torch.linalg.eigh cannot decompose, prepared as
    kronfluence prepares it: divided by the rows counted, symmetrised, float64."""
    pairs = [(ACTIVATION_COVARIANCE_MATRIX_NAME, NUM_ACTIVATION_COVARIANCE_PROCESSED),
             (GRADIENT_COVARIANCE_MATRIX_NAME, NUM_GRADIENT_COVARIANCE_PROCESSED)]
    files = {name: load_file(str(directory / f"{name}.safetensors")) for pair in pairs for name in pair}
    for module in sorted(files[ACTIVATION_COVARIANCE_MATRIX_NAME]):
        for matrices, counts in pairs:
            matrix = files[matrices][module].to(device, torch.float64) / files[counts][module].to(device)
            try:
                torch.linalg.eigh((matrix + matrix.T) / 2)
            except torch.linalg.LinAlgError:
                return f"{module} ({matrices})"
    return "no module when retried alone"


@dataclasses.dataclass
class ScoringJob:
    """What a backend scores with: kronfluence's analyzer (its fitted factors under `factors_name`), the prepared
    model before kronfluence's DDP wrapper (under torch.distributed the fused pass scores each rank's share of the
    rows), the tokenized data and the batch sizes."""

    analyzer: object
    model: torch.nn.Module
    config: AnalysisConfig
    factors_name: str
    scores_name: str
    data: object  # pipeline.Data
    collator: object
    train_batch_size: int
    query_batch_size: int
    rank: int = 0
    num_workers: int = 0  # DataLoader processes collating the training batches (utils.loader_workers)
    segments: Optional[list] = None  # with --source_horizon: source.Segment per segment, the analysed model's last
    # fused_scores.pin_ahead's host memory for the first fused pairwise run (which takes it over and closes it)
    boundary_memory: Optional[object] = None

    @property
    def device(self) -> torch.device:
        return self.analyzer.state.device

    def factors(self) -> dict:
        return self.analyzer.load_all_factors(self.factors_name) if self.config.factor_strategy != "identity" else {}


class KronfluenceBackend:
    """kronfluence's own score loops (the reference); kronfluence writes the scores files itself."""

    writes_scores = False
    low_rank_queries = True  # --query_gradient_rank
    cpu_processes = False  # torchrun on CPU (gloo): kronfluence's DDP needs CUDA

    def pairwise(self, job: ScoringJob) -> tuple:
        def scores(train_batch_size, query_batch_size):
            torch.manual_seed(stage_seed(job.config.seed, "scores", job.rank))
            job.analyzer.compute_pairwise_scores(
                scores_name=job.scores_name, factors_name=job.factors_name, query_dataset=job.data.queries,
                train_dataset=job.data.train, per_device_query_batch_size=query_batch_size,
                per_device_train_batch_size=train_batch_size, score_args=job.config.score_arguments(),
                overwrite_output_dir=True)
        sizes = halving_on_oom("scores", scores, {"train_batch_size": job.train_batch_size,
                                                  "query_batch_size": job.query_batch_size}, job.device)
        return job.analyzer.load_pairwise_scores(job.scores_name)[SCORES_KEY], sizes

    def self_influence(self, job: ScoringJob) -> tuple:
        def scores(train_batch_size):
            torch.manual_seed(stage_seed(job.config.seed, "scores", job.rank))
            job.analyzer.compute_self_scores(
                scores_name=job.scores_name, factors_name=job.factors_name, train_dataset=job.data.train,
                per_device_train_batch_size=train_batch_size, score_args=job.config.score_arguments(),
                overwrite_output_dir=True)
        sizes = halving_on_oom("self-influence", scores, {"train_batch_size": job.train_batch_size}, job.device)
        return job.analyzer.load_self_scores(job.scores_name)[SCORES_KEY].float(), sizes


FUSED_PLAN_SIZES = ("train_micro_batch", "train_growth", "query_micro_batch", "queries_per_pass", "module_groups",
                    "passes", "boundary_gib")  # its plan, and the host memory its layer-output gradients took
# a fused run's time planning its passes, on query gradients and on training passes, and in those passes waiting for
# host memory to be pinned
FUSED_SECONDS = ("planning_seconds", "query_seconds", "train_seconds", "boundary_wait_seconds")
FUSED_BREAKDOWN = ("pass_seconds", "hooks")  # each training pass's seconds, and where the passes' time went


class FusedBackend:
    """The same scores from the same factors in passes over the training set, one per module group of each chunk of
    queries (fused_scores.py); the passes are planned from the memory available."""

    writes_scores = True
    low_rank_queries = False
    cpu_processes = True

    def pairwise(self, job: ScoringJob) -> tuple:
        torch.manual_seed(stage_seed(job.config.seed, "scores", job.rank))
        plan, ahead, job.boundary_memory = {}, job.boundary_memory, None
        scores = fused_pairwise_scores(job.model.to(job.device), job.analyzer.task, job.factors(),
                                       job.config.factor_strategy, job.config.score_arguments(), job.data.queries,
                                       job.data.train, job.collator, job.query_batch_size, job.train_batch_size,
                                       device=job.device, timings=plan, num_workers=job.num_workers,
                                       boundary_memory=ahead, fp8_contraction=job.config.fp8_contraction)
        return scores, {key: plan[key] for key in FUSED_PLAN_SIZES + FUSED_SECONDS + FUSED_BREAKDOWN}

    def self_influence(self, job: ScoringJob) -> tuple:
        scores = fused_self_scores(job.model.to(job.device), job.analyzer.task, job.factors(),
                                   job.config.factor_strategy, job.config.score_arguments(), job.data.train,
                                   job.collator, job.train_batch_size, job.device, num_workers=job.num_workers)
        return scores, {"train_batch_size": job.train_batch_size}


BACKENDS = {"kronfluence": KronfluenceBackend(), "fused": FusedBackend()}  # --scoring's choices


def dropout_masks(model: torch.nn.Module, rate: float, seed: int, member: int) -> dict:
    """One member's masks: for every nn.Linear weight (by parameter name), the scale each entry gets, 0 for a
    dropped weight and 1 / (1 - rate) for a kept one, drawn on the CPU from (seed, member) so that every device
    and rank draws the same sub-network."""
    generator = torch.Generator().manual_seed(int(np.random.default_rng([seed, member]).integers(2**63)))
    masks = {}
    for name, module in sorted(model.named_modules()):
        if isinstance(module, torch.nn.Linear):
            keep = torch.rand(module.weight.shape, generator=generator) >= rate
            masks[name] = keep.to(module.weight.dtype) / (1 - rate)
    return masks


@contextlib.contextmanager
def masked_weights(model: torch.nn.Module, masks: dict):
    """The model with its nn.Linear weights multiplied by `masks` (dropout_masks), restored bitwise on exit."""
    modules = dict(model.named_modules())
    saved = {name: modules[name].weight.detach().clone() for name in masks}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                modules[name].weight.mul_(mask.to(modules[name].weight.device))
        yield model
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                modules[name].weight.copy_(weight)


def score(job: ScoringJob) -> tuple:
    """The job's pairwise or self-influence scores and the batch sizes that fitted: by its backend, or with
    --dropout_ensemble the mean of the members' scores, each member the backend's scores of a masked model."""
    if job.config.source_horizon:
        return source_scores(job)
    backend = BACKENDS[job.config.scoring]
    run = backend.self_influence if job.config.self_influence else backend.pairwise
    members = job.config.dropout_ensemble
    if not members:
        return run(job)
    total, seconds = None, dict.fromkeys(FUSED_SECONDS, 0.0)
    for member in range(members):
        logger.info("dropout ensemble: member %d of %d (rate %g)", member + 1, members, job.config.dropout_rate)
        masks = dropout_masks(job.model, job.config.dropout_rate, job.config.dropout_seed, member)
        with masked_weights(job.model, masks):
            scores, sizes = run(job)
        total = scores.double() if total is None else total.add_(scores.double())
        for key in seconds:  # the fused backend's time split, summed over the members
            seconds[key] += sizes.pop(key, 0.0)
        for key in FUSED_BREAKDOWN:  # per pass and part of one member's run: not recorded for the ensemble
            sizes.pop(key, None)
        # kronfluence's loop: the next member starts from the batch sizes that fitted, not from a full size that ran
        # out of memory (the fused backend plans each pass from the memory free at the time)
        job = dataclasses.replace(job, **{k: v for k, v in sizes.items() if k in ("train_batch_size", "query_batch_size")})
    return (total / members).float(), {**sizes, **{key: value for key, value in seconds.items() if value}}


def source_scores(job: ScoringJob) -> tuple:
    """SOURCE's pairwise scores over the job's segments (one fused pass per segment)."""
    torch.manual_seed(stage_seed(job.config.seed, "scores", job.rank))
    plan = {}
    scores = source_pairwise_scores(job.model.to(job.device), job.analyzer.task, job.segments, job.config.source_horizon,
                                    job.config.score_arguments(), job.data.queries, job.data.train, job.collator,
                                    job.query_batch_size, job.train_batch_size, job.device, timings=plan,
                                    num_workers=job.num_workers, fp8_contraction=job.config.fp8_contraction)
    return scores, {key: plan[key] for key in FUSED_PLAN_SIZES}


def compute_scores(job: ScoringJob, scores_dir: Path) -> tuple:
    """Pairwise or self-influence scores by the job's backend, written to `scores_dir` (whatever a killed run left
    there is replaced), and the batch sizes that fitted in memory. With self-influence, rank 0 also writes each
    training row's loss and preferred choice."""
    backend = BACKENDS[job.config.scoring]
    scores, sizes = score(job)
    check_finite(scores)
    if job.rank == 0:
        if backend.writes_scores or job.config.dropout_ensemble:  # kronfluence's file holds the last member
            save_scores(scores_dir, scores, SELF_SCORES_FILE if job.config.self_influence else SCORES_FILE)
        if job.config.self_influence:
            save_fit(scores_dir / TRAIN_FIT_FILE, model_fit(job.model.to(job.device), job.data.train, job.collator,
                                                             job.train_batch_size, job.device))
    return scores, sizes


def check_finite(scores: torch.Tensor) -> None:
    bad = int((~torch.isfinite(scores)).sum())
    if bad:  # the factors are finite (checked), so the scoring itself overflowed
        raise UserError(f"{bad} of the {scores.numel()} scores are NaN or infinite (a bf16 overflow?); rerun without "
                        f"--use_half_precision")


@torch.no_grad()
def model_fit(model, rows, collator, batch_size: int, device: torch.device) -> dict:
    """Per row under the model, in the rows' order: its loss (cross-entropy on its label), the choice the model
    prefers, the label. The forward runs in the model's own precision over batches of similar lengths (longest
    first), which pad little: 2,000 anetcap queries in batches of 100 pad to 2.2 times fewer tokens than in the
    rows' order."""
    model.eval()
    order = longest_first(rows)
    fit = {"loss": [], "prediction": [], "label": []}
    for batch in DataLoader(rows.select(order), batch_size=batch_size, collate_fn=collator):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model_logits(model, batch).float()
        fit["loss"].append(F.cross_entropy(logits, batch[LABELS], reduction="none").cpu())
        fit["prediction"].append(logits.argmax(-1).cpu())
        fit["label"].append(batch[LABELS].cpu())
    back = torch.from_numpy(np.argsort(order))  # the rows' own order again
    return {k: torch.cat(v)[back].contiguous() for k, v in fit.items()}


def fit_factors(analyzer, config: AnalysisConfig, train, f_name: str, factors_dir: Path, completed: list, record,
                factor_batch_size: int, hook_times: HookTimes = None) -> Optional[int]:
    """Fit the factor stages not in `completed` (appending each, and calling `record(stage, how)` on rank 0), each
    checked for NaN and infinite values before it counts as finished. Returns the factor batch size that fitted in
    memory (None if no stage ran here). `train`: the tokenized training rows. `hook_times`: the HookTimes the factor
    kernels report to (fast_factor_kernels); each stage's record holds its parts as "hooks"."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    kronfluence_ddp = analyzer.state.use_distributed
    # kronfluence's DDP: every rank fits together; gloo/CPU: rank 0 alone fits while the others wait, then loads
    single_fitter = dist.is_initialized() and not kronfluence_ddp
    if single_fitter and rank != 0:
        dist.barrier()
    covariance_rows, lambda_rows = factor_rows(train, config.lambda_rows, config.seed, config.covariance_max_examples)
    stages = factor_stages(analyzer, f_name, covariance_rows, lambda_rows,
                           config.factor_arguments(len(covariance_rows), len(lambda_rows)),
                           overwrite=True)  # only unfinished stages run, and they replace what a killed run left
    batch_size, fitted = factor_batch_size, None
    for name, stage in stages.items():
        if name in completed or not (kronfluence_ddp or rank == 0):
            continue
        logger.info("%s: %s factors", name, config.factor_strategy)

        def run(factor_batch_size=None, name=name, stage=stage):  # called at once, in this iteration
            if analyzer.state.device.type == "cuda":  # the peak of the attempt that fits
                torch.cuda.reset_peak_memory_stats(analyzer.state.device)
            torch.manual_seed(stage_seed(config.seed, name, rank))
            stage(factor_batch_size)
        batched = name != "eigendecomposition"  # which takes no batches: nothing to halve
        if hook_times is not None:
            hook_times.take()  # nothing from an earlier stage
        started = time.perf_counter()
        try:
            with GpuBusy(analyzer.state.device) as busy:
                sizes = halving_on_oom(name, run, {"factor_batch_size": batch_size} if batched else {},
                                       analyzer.state.device)
            batch_size = sizes.get("factor_batch_size", batch_size)
        except torch.linalg.LinAlgError as exc:
            module = failing_eigendecomposition(factors_dir, analyzer.state.device)
            raise UserError(f"eigendecomposition failed for {module}: {str(exc).splitlines()[0]}; refit without "
                            f"--use_half_precision, or use --factor_strategy diagonal") from None
        fitted = batch_size if batched else fitted
        seconds = time.perf_counter() - started  # with out-of-memory retries
        peak = (torch.cuda.max_memory_allocated(analyzer.state.device) / 2**30
                if analyzer.state.device.type == "cuda" else None)
        if rank == 0:
            check_factor_files(factors_dir, [name], f"delete {factors_dir} and refit")
        completed.append(name)
        if rank == 0:
            record(name, {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                          "factor_batch_size": batch_size if batched else None, "cpu_threads": torch.get_num_threads(),
                          "device": str(analyzer.state.device), "versions": library_versions(),
                          "seconds": round(seconds, 2),
                          "peak_gpu_memory_gib": None if peak is None else round(peak, 2),
                          "gpu_busy_share": busy.share,
                          **({"hooks": hook_times.take()} if hook_times is not None else {})})
    if single_fitter and rank == 0:
        dist.barrier()
    return fitted


def library_versions() -> dict:
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers", "kronfluence")}


def print_top_examples(scores: torch.Tensor, data, tokenizer, query_index: int, top_k: int) -> None:
    """The query and its strongest proponents and opponents as text."""
    row = scores[query_index].float()

    def show(title, example):
        label = example["labels"]
        texts = decode_choices(tokenizer, example)
        print(f"{title}\n    {texts[label] if label >= 0 else texts[0] + '  (unlabelled)'}")

    print("=" * 100)
    show(f"QUERY #{query_index} (correct choice)", data.queries[query_index])
    order = torch.argsort(row, descending=True)
    print("-" * 100 + "\nTop proponents (training examples that most raise this query's margin):")
    for i in order[:top_k].tolist():
        show(f"  + train #{i}  score {row[i].item():+.4g}", data.train[i])
    print("-" * 100 + "\nTop opponents (training examples that most lower it):")
    for i in order.flip(0)[:top_k].tolist():
        show(f"  - train #{i}  score {row[i].item():+.4g}", data.train[i])
    print("=" * 100)


def print_suspicious_rows(scores: torch.Tensor, fit: dict, meta: dict, data, tokenizer, count: int) -> None:
    """The training rows with the largest self-influence, as text: the labelled ending and the one the model
    prefers."""
    corrupted = set(meta.get("label_noise_rows") or [])
    print("=" * 100 + f"\nMost suspicious training rows (largest self-influence, {meta['factor_strategy']}):")
    for i in torch.argsort(scores, descending=True)[:count].tolist():
        texts = decode_choices(tokenizer, data.train[i])
        label, preferred = int(fit["label"][i]), int(fit["prediction"][i])
        note = "  [label moved by --label_noise]" if i in corrupted else ""
        print(f"  train #{i}  self-influence {scores[i].item():.4g}  loss {fit['loss'][i].item():.3f}{note}\n"
              f"      labelled:  {texts[label]}")
        print(f"      preferred: {texts[preferred]}" if preferred != label else "      (the model prefers the label)")
    print("=" * 100)
