"""Influence factors and pairwise (query × train) influence scores with kronfluence.

    python analyze.py --checkpoint_dir checkpoints/demo                        # the demo, CPU
    python analyze.py --checkpoint_dir checkpoints/swag --factor_strategy ekfac # the reference job
    python analyze.py --checkpoint_dir checkpoints/swag --use_half_precision --query_gradient_rank 32
    python analyze.py --checkpoint_dir checkpoints/swag --fast                  # the fast path
    python analyze.py --combine scores/seed1/scores_ekfac_n73536_q2000 scores/seed2/scores_ekfac_n73536_q2000
    torchrun --standalone --nnodes=1 --nproc-per-node=2 analyze.py --checkpoint_dir checkpoints/swag --use_ddp

Data flags default to those the checkpoint was trained with. Factors go to
`<output_dir>/<checkpoint name>/factors_<name>/` and are reused when present; scores go to
`<output_dir>/<checkpoint name>/scores_<name>/pairwise_scores.safetensors` with `metadata.json`
beside them. Score rows are queries, columns training examples, both in dataset order; a positive
score means upweighting the training example raises the query's margin.

`--scoring fused` computes the same scores from the same kronfluence factors with fused_scores.py
(one pass over the training set per chunk of queries, length-sorted batches); `--scoring kronfluence`
(the default) is kronfluence's own loop. `--fast` is `--use_half_precision --fp32_accumulation --scoring
fused` with kronfluence fitting the covariance and lambda factors through fused_scores.fast_factor_kernels
(the same sums in faster GPU kernels).

`--combine` averages the scores of several models (e.g. fine-tuned with different `train.py --seed`)
on the same data into `<output_dir>/ensembles/scores_<name>_ens<K><std|mean>_<id>/`: by default each
model's rows are first divided by their per-query standard deviation (`--combine_mode standardized`).
evaluate_lds.py evaluates the result like any single model's scores.
"""

import datetime
import hashlib
import importlib.metadata
import logging
import os
import time
import uuid
from contextlib import ExitStack, nullcontext
from itertools import takewhile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate.utils.memory import clear_device_cache, should_reduce_batch_size
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
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
from kronfluence.utils.dataset import DataLoaderKwargs
from filelock import FileLock, Timeout
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

from fused_scores import fast_factor_kernels, fused_pairwise_scores, fused_self_scores, longest_first
from pipeline import (
    CHECKPOINTS_DIR,
    LABELS,
    SCORES_DIR,
    TRAINING_ARGS_FILE,
    WEIGHTS_FILE,
    ArgumentParser,
    UserError,
    add_data_args,
    at_least,
    atomic_output,
    configure_attention,
    configure_cpu_threads,
    data_args_dict,
    decode_choices,
    file_sha256,
    limit_gpu_memory,
    load_checkpoint,
    make_collator,
    model_logits,
    out_of_memory_detail,
    positive_float,
    prepare_data,
    read_json,
    readable_safetensors,
    require_labels,
    resolve_data_args,
    seed_value,
    setup_logging,
    write_json,
)
from task import MultipleChoiceTask

logger = logging.getLogger(__name__)

STRATEGIES = ["identity", "diagonal", "kfac", "ekfac"]
SCORING = ["kronfluence", "fused"]
FACTOR_STAGES = ["covariance", "eigendecomposition", "lambda"]  # kronfluence's, in order; then the scores
METADATA_FILE = "metadata.json"
SCORES_FILE = "pairwise_scores.safetensors"
SCORES_KEY = "all_modules"
SELF_SCORES_FILE = "self_scores.safetensors"  # kronfluence's name for self-influence scores
TRAIN_FIT_FILE = "train_fit.safetensors"  # per training row: loss, the model's preferred choice, the label
QUERY_FIT_FILE = "query_fit.safetensors"  # the same per query, beside pairwise scores (report.py shows them)
QUERY_GRADIENT_ACCUMULATION = 10  # the original example's setting when --query_gradient_rank is used
LOCK_WAIT = datetime.timedelta(hours=12)  # the longest wait for another analysis writing the same directories
PROCESS_GROUP_TIMEOUT = LOCK_WAIT + datetime.timedelta(hours=1)  # collectives outlast that wait and the work after


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint_dir", type=Path, default=CHECKPOINTS_DIR / "swag",
                        help="A train.py checkpoint (save_pretrained directory).")
    parser.add_argument("--factor_strategy", choices=STRATEGIES, default="ekfac",
                        help="Hessian approximation used to precondition the gradients.")
    parser.add_argument("--query_gradient_rank", type=int, default=-1,
                        help="Rank of the low-rank query-gradient approximation (-1: full rank).")
    parser.add_argument("--use_half_precision", action="store_true",
                        help="bf16 for factors and scores (kronfluence's all_low_precision_* arguments).")
    parser.add_argument("--fp32_accumulation", action="store_true",
                        help="With --use_half_precision: bf16 forward/backward and per-example gradients, but the "
                             "covariance and lambda factors in fp32 (their matmuls and sums; kronfluence's all-bf16 "
                             "sums lose precision over many batches).")
    parser.add_argument("--lambda_max_examples", type=at_least(1), default=None,
                        help="Fit EKFAC's eigenvalue corrections (lambda) on N random training rows only "
                             "(default: all rows; the covariance always uses all).")
    parser.add_argument("--scoring", choices=SCORING, default=None,
                        help="kronfluence (default): its own pairwise-score loop (the reference); fused (default with "
                             "--fast): the same scores from the same factors, one training pass per chunk of queries "
                             "(fused_scores.py).")
    parser.add_argument("--fast", action="store_true",
                        help="The fast path: --use_half_precision --fp32_accumulation --scoring fused, the covariance "
                             "and lambda factors fitted with faster kernels for the same sums (bf16-input matmuls "
                             "with float32 results, EKFAC's rotation before the example gradient is formed).")
    parser.add_argument("--use_ddp", action="store_true",
                        help="Distribute over the processes started by torchrun (kronfluence wraps the model).")
    parser.add_argument("--factor_batch_size", type=at_least(1), default=64,
                        help="Per-device batch size for fitting factors (halved while it does not fit in memory).")
    parser.add_argument("--query_batch_size", type=at_least(1), default=100,
                        help="Per-device batch size for query gradients (halved while it does not fit in memory).")
    parser.add_argument("--train_batch_size", type=at_least(1), default=128,
                        help="Per-device batch size for training gradients (halved while it does not fit in memory).")
    parser.add_argument("--max_memory_gb", type=positive_float, default=None,
                        help="Cap on the GPU memory this analysis may use, per device, in GiB (default: what is "
                             "free; on a GPU shared with other jobs, give each its share).")
    parser.add_argument("--damping_factor", type=float, default=1e-8,
                        help="Damping added to the Hessian approximation (kronfluence's default 1e-8); "
                             "a negative value selects kronfluence's heuristic (0.1 × mean eigenvalue).")
    parser.add_argument("--use_empirical_fisher", action="store_true",
                        help="Fit the factors with the dataset labels instead of labels sampled from the model "
                             "(deterministic: used to compare runs, e.g. 1 GPU against several).")
    parser.add_argument("--seed", type=seed_value, default=0, help="Seed for the sampled (true-Fisher) labels.")
    parser.add_argument("--profile", action="store_true", help="Print kronfluence's per-stage timing profile.")
    parser.add_argument("--output_dir", type=Path, default=SCORES_DIR, help="Where factors and scores go.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Recompute factors and scores even if present (an interrupted run resumes without it).")
    parser.add_argument("--allow_other_train_rows", action="store_true",
                        help="Score training rows other than those the checkpoint was trained on (by default refused: "
                             "the scores would attribute the model to rows it never saw).")
    parser.add_argument("--query_index", type=at_least(0), default=0,
                        help="Query whose top influential examples are printed.")
    parser.add_argument("--top_k", type=at_least(1), default=3, help="Proponents and opponents to print.")
    parser.add_argument("--self_influence", action="store_true",
                        help="Instead of pairwise scores: each training row's self-influence (the influence of its "
                             "gradient on its own loss, large for rows the model finds surprising, such as wrong "
                             "labels), with each row's training loss and preferred choice beside it; prints the "
                             "--num_suspicious rows with the largest.")
    parser.add_argument("--num_suspicious", type=at_least(1), default=10,
                        help="With --self_influence: the suspicious rows printed.")
    parser.add_argument("--combine", type=Path, nargs="+", default=None, metavar="SCORES_DIR",
                        help="Instead of analysing: combine these scores directories (one per model) into one.")
    parser.add_argument("--combine_mode", choices=["standardized", "mean"], default="standardized",
                        help="standardized: divide each model's rows by their per-query standard deviation, "
                             "then average; mean: plain average.")
    add_data_args(parser)
    args = parser.parse_args(argv)
    if args.fast and args.scoring == "kronfluence":
        parser.error("--fast scores with --scoring fused; drop --scoring kronfluence (or --fast)")
    if args.fast:
        args.use_half_precision = args.fp32_accumulation = True
    args.scoring = args.scoring or ("fused" if args.fast else "kronfluence")
    if not np.isfinite(args.damping_factor) or args.damping_factor == 0:
        parser.error(f"argument --damping_factor: must be a positive number, or negative for the heuristic; "
                     f"got {args.damping_factor}")
    if args.query_gradient_rank == 0 or args.query_gradient_rank < -1:
        parser.error("--query_gradient_rank must be -1 (full rank) or a positive rank")
    if args.use_ddp and "LOCAL_RANK" not in os.environ:
        raise UserError("--use_ddp needs the processes torchrun starts: "
                        "torchrun --standalone --nproc-per-node=N analyze.py ... --use_ddp")
    if args.max_memory_gb is not None and not torch.cuda.is_available():
        parser.error("--max_memory_gb caps GPU memory, and this machine has no GPU; drop it")
    if args.fp32_accumulation and not args.use_half_precision:
        parser.error("--fp32_accumulation modifies --use_half_precision; add it (fp32 runs accumulate in fp32 anyway)")
    if args.self_influence and args.query_gradient_rank > 0:
        parser.error("--self_influence uses full-rank gradients; drop --query_gradient_rank")
    if args.scoring == "fused" and args.query_gradient_rank > 0:
        parser.error("--scoring fused uses full-rank query gradients; drop --query_gradient_rank")
    if args.use_ddp and not torch.cuda.is_available() and args.scoring != "fused":
        raise UserError("kronfluence's DDP needs CUDA; on CPU use --use_ddp with --scoring fused (gloo)")
    return args


def factors_name(args) -> str:
    """Factors depend on the strategy, the precision and the training data they were fitted on."""
    name = f"{args.factor_strategy}_n{args.max_train_samples or 'all'}"
    precision = ("_fast" if args.fast else "_bf16acc32" if args.fp32_accumulation else "_bf16"
                 if args.use_half_precision else "")
    lam = (f"_lam{args.lambda_max_examples}" if args.lambda_max_examples
           and args.factor_strategy in ("diagonal", "ekfac") else "")  # the strategies that fit lambda
    seed = f"_s{args.seed}" if args.seed else ""  # sampled labels and the lambda rows
    return name + precision + lam + ("_empfisher" if args.use_empirical_fisher else "") + seed


def scores_name(args) -> str:
    name = f"self_{factors_name(args)}" if args.self_influence else f"{factors_name(args)}_q{args.num_queries or 'all'}"
    if args.query_gradient_rank > 0:
        name += f"_qlr{args.query_gradient_rank}"
    if args.damping_factor != 1e-8:
        name += "_dampheur" if args.damping_factor < 0 else f"_damp{args.damping_factor:g}"
    return name + ("_fused" if args.scoring == "fused" else "")


def factor_arguments(args, num_covariance_rows: int, num_lambda_rows: int) -> FactorArguments:
    """kronfluence's factor arguments for these flags. Its row caps (covariance_max_examples and
    lambda_max_examples, 100,000 by default) are set to the rows given: the rows come length-sorted, so a cap
    below them would fit the factors on the longest rows only."""
    factor_args = (all_low_precision_factor_arguments(strategy=args.factor_strategy, dtype=torch.bfloat16)
                   if args.use_half_precision else FactorArguments(strategy=args.factor_strategy))
    factor_args.covariance_max_examples, factor_args.lambda_max_examples = num_covariance_rows, num_lambda_rows
    if args.use_half_precision and args.fp32_accumulation:
        factor_args.activation_covariance_dtype = factor_args.gradient_covariance_dtype = torch.float32
        factor_args.lambda_dtype = torch.float32
    factor_args.use_empirical_fisher = args.use_empirical_fisher
    return factor_args


def factor_rows(train, lambda_max_examples=None, seed: int = 0):
    """(covariance rows, lambda rows): all rows, and N random ones, each longest first. Factors are sums over rows,
    so their order is free: length-sorted batches pad little, and a batch size that does not fit fails at once."""
    lambda_rows = train
    if lambda_max_examples and lambda_max_examples < len(train):
        pick = np.sort(np.random.default_rng(seed).choice(len(train), lambda_max_examples, replace=False))
        lambda_rows = train.select(pick)
    return train.select(longest_first(train)), lambda_rows.select(longest_first(lambda_rows))


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


def halving_on_oom(stage: str, run, sizes: dict, device: torch.device) -> dict:
    """run(**sizes) until it fits in memory: after each out-of-memory error the next of `sizes` (by turns) is
    halved and the stage reruns. Returns the sizes that fit. Not under torch.distributed, where the other ranks
    would wait in a collective: there the error names the flag to halve. kronfluence's own batch-size search
    is not used: it probes the first rows, which are the shortest in length order, and not under DDP."""
    sizes, turn = dict(sizes), 0
    while True:
        try:
            run(**sizes)
            return sizes
        except Exception as exc:  # the error's frames hold tensors: leave the except block before freeing them
            if not should_reduce_batch_size(exc):
                raise
            detail = out_of_memory_detail(exc, device)
        clear_device_cache(garbage_collection=True)
        names = [name for name in sizes if sizes[name] > 1]
        flags = ", ".join(f"--{name} {sizes[name]}" for name in sizes)
        if not names:
            raise UserError(f"{stage}: out of GPU memory at {flags} ({detail}); free memory on the GPU (other jobs, "
                            f"a larger --max_memory_gb) or lower --max_length")
        name = names[turn % len(names)]
        if dist.is_initialized():
            raise UserError(f"{stage}: out of GPU memory at {flags} ({detail}); pass --{name} {sizes[name] // 2}")
        logger.warning("%s: out of GPU memory at %s (%s); retrying with --%s %d", stage, flags, detail, name,
                       sizes[name] // 2)
        sizes[name] //= 2
        turn += 1


def score_arguments(args) -> ScoreArguments:
    damping = None if args.damping_factor < 0 else args.damping_factor
    score_args = (all_low_precision_score_arguments(dtype=torch.bfloat16, damping_factor=damping)
                  if args.use_half_precision else ScoreArguments(damping_factor=damping))
    if args.query_gradient_rank > 0:
        score_args.query_gradient_low_rank = args.query_gradient_rank
        score_args.query_gradient_accumulation_steps = QUERY_GRADIENT_ACCUMULATION
    return score_args


def stage_seed(seed: int, stage: str, rank: int = 0) -> int:
    """Each stage (and rank) draws its sampled labels from a seed of its own: a stage redone after a kill draws
    what it drew in an uninterrupted run, whatever ran before it in this process."""
    return int(np.random.default_rng([seed, [*FACTOR_STAGES, "scores"].index(stage), rank]).integers(2**31))


def check_provenance(output_dir: Path, expected: dict, overwrite: bool, fix: str) -> dict:
    """Factors and scores belong to one set of weights and data: refuse to reuse them for others. Returns the
    directory's metadata ({} when there is none to reuse)."""
    record = output_dir / METADATA_FILE
    if overwrite or not output_dir.exists():
        return {}
    if not record.exists():
        raise UserError(f"{output_dir} has no {METADATA_FILE}, so nothing says what it was computed from; "
                        f"{fix}")
    saved = read_json(record, "metadata")
    differs = [key for key, value in expected.items() if saved.get(key) != value]
    if differs:
        raise UserError(f"{output_dir} was computed from other {' and '.join(differs)} than this run's; {fix}")
    return saved


def output_lock(directory: Path, stack: ExitStack) -> None:
    """Hold a lock on `directory` (a file beside it) until `stack` closes: a second analyze.py writing the same
    directory waits, then finds this run's finished outputs (and their provenance) instead of mixing its own in."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(directory.with_name(f".{directory.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.warning("another analyze.py is writing %s; waiting for it to finish", directory)
        try:
            lock.acquire(timeout=LOCK_WAIT.total_seconds())
        except Timeout:
            raise UserError(f"another analyze.py has been writing {directory} for {LOCK_WAIT}; wait for it or stop "
                            f"it, or pass another --output_dir") from None
    stack.callback(lock.release)


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


def on_rank_zero(step):
    """step() on rank 0 alone, the others waiting for its outcome, which every rank returns. Rank 0 alone reads and
    writes the output directories' metadata, so no rank reads what another is writing. If the step fails, every
    rank stops with rank 0's error: a UserError as it is; anything else with its traceback on rank 0 and as one
    line on the others."""
    failure = result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = step()
        except (UserError, Exception) as exc:  # a UserError is a SystemExit, not an Exception
            failure = exc
    if dist.is_initialized():
        verdict = [failure if failure is None or isinstance(failure, UserError)
                   else UserError(f"rank 0 failed: {type(failure).__name__}: {failure}"), result]
        dist.broadcast_object_list(verdict, src=0)
        failure = failure if dist.get_rank() == 0 else verdict[0]
        result = verdict[1]
    if failure is not None:
        raise failure
    return result


def load_scores(path: Path):
    """Scores (queries × train, float32) and the metadata analyze.py wrote beside them (None if absent)."""
    file = path / SCORES_FILE if path.is_dir() else path
    if not file.is_file():
        hint = (" (it holds self-influence scores: pass it to --self_scores)"
                if (file.parent / SELF_SCORES_FILE).is_file() else "")
        raise UserError(f"no scores at {path}{hint}; run analyze.py first, or pass the scores directory it printed")
    meta_file = file.parent / METADATA_FILE
    meta = read_json(meta_file, "scores metadata") if meta_file.exists() else None
    if meta is not None and not meta.get("complete", True):
        raise UserError(f"the scores in {file.parent} are from an analyze.py run that has not finished; "
                        f"rerun it to complete them")
    try:
        scores = load_file(str(file))[SCORES_KEY].float()
    except Exception as exc:
        raise UserError(f"cannot read scores {file} ({type(exc).__name__}); is it truncated? rerun analyze.py") from None
    return scores, meta


def combine_scores(dirs: list, mode: str, output_dir: Path) -> Path:
    """Average several models' scores on the same training rows and queries (an ensemble)."""
    members = [load_scores(Path(d)) for d in dirs]
    first_scores, first_meta = members[0]
    for d, (scores, meta) in zip(dirs, members):
        if meta is None:
            raise UserError(f"{d} has no {METADATA_FILE}; combine only scores written by analyze.py")
        if scores.shape != first_scores.shape:
            raise UserError(f"{d} has {tuple(scores.shape)} scores but {dirs[0]} has {tuple(first_scores.shape)}")
        for key in ("train", "queries"):
            if meta["data_fingerprint"][key] != first_meta["data_fingerprint"][key]:
                raise UserError(f"{d} scores other {key} rows than {dirs[0]}; combine scores of the same data only")
    if mode == "standardized":
        stds = [s.std(dim=1, keepdim=True) for s, _ in members]
        if any((std == 0).any() for std in stds):
            raise UserError("a model has a query whose scores are all equal; use --combine_mode mean")
        combined = torch.stack([s / std for (s, _), std in zip(members, stds)]).mean(0)
    else:
        combined = torch.stack([s for s, _ in members]).mean(0)
    ident = hashlib.sha256("\n".join(str(Path(d).resolve()) for d in dirs).encode()).hexdigest()[:8]
    name = f"{first_meta['scores_name']}_ens{len(dirs)}{'std' if mode == 'standardized' else 'mean'}_{ident}"
    out = Path(output_dir) / "ensembles" / f"scores_{name}"
    save_scores(out, combined)
    recipes = [m.get("recipe") or {} for _, m in members]
    shared_recipe = {k: v for k, v in recipes[0].items() if all(r.get(k) == v for r in recipes)}  # seeds differ
    write_json(out / METADATA_FILE, {
        "scores_name": name, "combine_mode": mode, "members": [str(Path(d).resolve()) for d in dirs],
        "checkpoint": first_meta.get("checkpoint"), "data": first_meta.get("data"),
        "data_fingerprint": first_meta["data_fingerprint"], "recipe": shared_recipe or None,
        "shape": list(combined.shape)})
    logger.info("combined %d models (%s) into %s", len(dirs), mode, out)
    return out


def save_scores(directory: Path, scores: torch.Tensor, file_name: str = SCORES_FILE) -> None:
    """Scores in kronfluence's file layout, written atomically."""
    with atomic_output(directory / file_name) as tmp:
        save_file({SCORES_KEY: scores.contiguous()}, str(tmp))


def compute_scores(analyzer, model, args, f_name: str, s_name: str, scores_dir: Path, data, collator,
                   rank: int) -> tuple:
    """The pairwise scores by kronfluence's loop or the fused pass, written to `scores_dir` (whatever a killed run
    left there is replaced), and the batch sizes that fitted in memory. `model` is the prepared model before
    kronfluence's DDP wrapper: under torch.distributed every rank of the fused pass scores its share of the rows."""
    device = analyzer.state.device
    if args.self_influence:
        return compute_self_scores(analyzer, model, args, f_name, s_name, scores_dir, data, collator, rank)
    sizes = {"train_batch_size": args.train_batch_size, "query_batch_size": args.query_batch_size}
    if args.scoring == "kronfluence":
        def kronfluence_scores(train_batch_size, query_batch_size):
            torch.manual_seed(stage_seed(args.seed, "scores", rank))
            analyzer.compute_pairwise_scores(scores_name=s_name, factors_name=f_name, query_dataset=data.queries,
                                             train_dataset=data.train, per_device_query_batch_size=query_batch_size,
                                             per_device_train_batch_size=train_batch_size,
                                             score_args=score_arguments(args), overwrite_output_dir=True)
        sizes = halving_on_oom("scores", kronfluence_scores, sizes, device)
        scores = analyzer.load_pairwise_scores(s_name)[SCORES_KEY]
    else:
        torch.manual_seed(stage_seed(args.seed, "scores", rank))
        factors = analyzer.load_all_factors(f_name) if args.factor_strategy != "identity" else {}
        plan = {}
        scores = fused_pairwise_scores(model.to(device), analyzer.task, factors, args.factor_strategy,
                                       score_arguments(args), data.queries, data.train, collator,
                                       args.query_batch_size, args.train_batch_size, device=device, timings=plan)
        sizes = {"train_micro_batch": plan["train_micro_batch"], "query_micro_batch": plan["query_micro_batch"],
                 "queries_per_pass": plan["queries_per_pass"]}
    check_finite(scores)
    if args.scoring == "fused" and rank == 0:
        save_scores(scores_dir, scores)
    return scores, sizes


def check_finite(scores: torch.Tensor) -> None:
    bad = int((~torch.isfinite(scores)).sum())
    if bad:  # the factors are finite (checked), so the scoring itself overflowed
        raise UserError(f"{bad} of the {scores.numel()} scores are NaN or infinite (a bf16 overflow?); rerun without "
                        f"--use_half_precision")


def compute_self_scores(analyzer, model, args, f_name: str, s_name: str, scores_dir: Path, data, collator,
                        rank: int) -> tuple:
    """compute_scores for --self_influence: every training row's self-influence, by kronfluence's loop or the fused
    pass, and (rank 0) each row's loss and preferred choice, written to `scores_dir`."""
    device = analyzer.state.device
    if args.scoring == "kronfluence":
        def kronfluence_scores(train_batch_size):
            torch.manual_seed(stage_seed(args.seed, "scores", rank))
            analyzer.compute_self_scores(scores_name=s_name, factors_name=f_name, train_dataset=data.train,
                                         per_device_train_batch_size=train_batch_size,
                                         score_args=score_arguments(args), overwrite_output_dir=True)
        sizes = halving_on_oom("self-influence", kronfluence_scores, {"train_batch_size": args.train_batch_size},
                               device)
        scores = analyzer.load_self_scores(s_name)[SCORES_KEY].float()
    else:
        factors = analyzer.load_all_factors(f_name) if args.factor_strategy != "identity" else {}
        scores = fused_self_scores(model.to(device), analyzer.task, factors, args.factor_strategy,
                                   score_arguments(args), data.train, collator, args.train_batch_size, device)
        sizes = {"train_batch_size": args.train_batch_size}
    check_finite(scores)
    if rank == 0:
        if args.scoring == "fused":
            save_scores(scores_dir, scores, SELF_SCORES_FILE)
        save_fit(scores_dir / TRAIN_FIT_FILE, model_fit(model.to(device), data.train, collator, args.train_batch_size,
                                                         device))
    return scores, sizes


@torch.no_grad()
def model_fit(model, rows, collator, batch_size: int, device: torch.device) -> dict:
    """Per row under the model: its loss (cross-entropy on its label), the choice the model prefers, the label."""
    model.eval()
    fit = {"loss": [], "prediction": [], "label": []}
    for batch in DataLoader(rows, batch_size=batch_size, collate_fn=collator):
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model_logits(model, batch).float()
        fit["loss"].append(F.cross_entropy(logits, batch[LABELS], reduction="none").cpu())
        fit["prediction"].append(logits.argmax(-1).cpu())
        fit["label"].append(batch[LABELS].cpu())
    return {k: torch.cat(v).contiguous() for k, v in fit.items()}


def save_fit(path: Path, fit: dict) -> None:
    with atomic_output(path) as tmp:
        save_file(fit, str(tmp))


def load_self_scores(path: Path):
    """Self-influence scores (train,), the training rows' fit (`model_fit`) and the metadata analyze.py wrote."""
    file = path / SELF_SCORES_FILE if path.is_dir() else path
    scores, meta = load_scores(file) if file.is_file() else (None, None)
    if meta is None or meta.get("kind") != "self_influence":
        raise UserError(f"{path} holds no self-influence scores; make them with analyze.py --self_influence")
    return scores, load_file(str(file.parent / TRAIN_FIT_FILE)), meta  # beside the scores, wherever they moved


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


def fit_factors(analyzer, args, data, f_name: str, factors_dir: Path, completed: list, record) -> Optional[int]:
    """Fit the factor stages not in `completed` (appending each, and calling `record(stage, how)` on rank 0), each
    checked for NaN and infinite values before it counts as finished. Returns the factor batch size that fitted in
    memory (None if no stage ran here)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    kronfluence_ddp = analyzer.state.use_distributed
    # kronfluence's DDP: every rank fits together; gloo/CPU: rank 0 alone fits while the others wait, then loads
    single_fitter = dist.is_initialized() and not kronfluence_ddp
    if single_fitter and rank != 0:
        dist.barrier()
    covariance_rows, lambda_rows = factor_rows(data.train, args.lambda_max_examples, args.seed)
    stages = factor_stages(analyzer, f_name, covariance_rows, lambda_rows,
                           factor_arguments(args, len(covariance_rows), len(lambda_rows)),
                           overwrite=True)  # only unfinished stages run, and they replace what a killed run left
    batch_size, fitted = args.factor_batch_size, None
    for name, stage in stages.items():
        if name in completed or not (kronfluence_ddp or rank == 0):
            continue
        logger.info("%s: %s factors", name, args.factor_strategy)

        def run(factor_batch_size=None):
            torch.manual_seed(stage_seed(args.seed, name, rank))
            stage(factor_batch_size)
        batched = name != "eigendecomposition"  # which takes no batches: nothing to halve
        try:
            sizes = halving_on_oom(name, run, {"factor_batch_size": batch_size} if batched else {},
                                   analyzer.state.device)
            batch_size = sizes.get("factor_batch_size", batch_size)
        except torch.linalg.LinAlgError as exc:
            raise UserError(f"eigendecomposition failed for {failing_eigendecomposition(factors_dir, analyzer.state.device)}: "
                            f"{str(exc).splitlines()[0]}; refit without --use_half_precision, or use --factor_strategy "
                            f"diagonal") from None
        fitted = batch_size if batched else fitted
        if rank == 0:
            check_factor_files(factors_dir, [name], f"delete {factors_dir} and refit")
        completed.append(name)
        if rank == 0:
            record(name, {"world_size": dist.get_world_size() if dist.is_initialized() else 1,
                          "factor_batch_size": batch_size if batched else None, "cpu_threads": torch.get_num_threads(),
                          "device": str(analyzer.state.device), "versions": library_versions()})
    if single_fitter and rank == 0:
        dist.barrier()
    return fitted


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (kronfluence makes its paths absolute)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def library_versions() -> dict:
    return {name: importlib.metadata.version(name) for name in ("torch", "transformers", "kronfluence")}


def check_trained_rows(checkpoint_dir: Path, data) -> None:
    """Refuse training rows other than those the checkpoint was trained on: scores for them would attribute the
    model to rows it never saw (the files its data flags name may have changed, or flags given here differ)."""
    recorded = read_json(checkpoint_dir / TRAINING_ARGS_FILE, "training arguments").get("data_fingerprint", {})
    if recorded.get("train") not in (None, data.fingerprint["train"]):
        raise UserError(f"these {data.fingerprint['num_train']} training rows (fingerprint "
                        f"{data.fingerprint['train'][:8]}) are not the {recorded.get('num_train')} rows "
                        f"{checkpoint_dir} was trained on (fingerprint {recorded['train'][:8]}); drop the data flags "
                        f"given here (the checkpoint's own apply), restore the files it was trained on, or pass "
                        f"--allow_other_train_rows to score these rows anyway")


def init_process_group() -> None:
    """torchrun's process group, with a timeout that outlasts the longest wait of one rank for the others: rank 0
    may wait up to LOCK_WAIT for another analysis's lock while the other ranks wait in a collective (NCCL's own
    default, 10 minutes, would abort them). On CUDA, NCCL (kronfluence then reuses this group); on CPU, gloo, and
    kronfluence stays single-process (rank 0 fits while the others wait) while the fused scores are split."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group("nccl", timeout=PROCESS_GROUP_TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=PROCESS_GROUP_TIMEOUT)


def run_analysis(args, model, tokenizer, data, stack: ExitStack) -> Path:
    """Fit the factors and compute the scores, resuming what an interrupted run with the same settings finished;
    the output directories stay locked (by rank 0) until `stack` closes."""
    task = MultipleChoiceTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=args.checkpoint_dir.resolve().name, model=model, task=task,
                        profile=args.profile, output_dir=str(args.output_dir),
                        log_level=None)  # its default INFO would set the root logger's level too: setup_logging
    collator = make_collator(tokenizer, args.pad_to_max_length, args.max_length)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator))
    rank = dist.get_rank() if dist.is_initialized() else 0

    checkpoint = str(args.checkpoint_dir.resolve())
    f_name, s_name = factors_name(args), scores_name(args)
    factors_dir, scores_dir = analyzer.factors_output_dir(f_name), analyzer.scores_output_dir(s_name)
    factor_provenance = {"weights_sha256": file_sha256(args.checkpoint_dir / WEIGHTS_FILE),
                         "train_fingerprint": data.fingerprint["train"], "max_length": args.max_length}
    provenance = {**factor_provenance, **({"kind": "self_influence"} if args.self_influence
                                          else {"query_fingerprint": data.fingerprint["queries"]})}

    fit = {"fit_id": None, "stages": {}}  # the fit id changes whenever the factors are fitted anew

    def record_factors(stage=None, how=None):  # after each finished stage: the directory's completeness record
        if stage is not None:
            fit["stages"][stage] = how
        write_json(factors_dir / METADATA_FILE, {"checkpoint": checkpoint, **factor_provenance,
                                                 "completed_stages": completed, **fit})

    def claim_output_dirs():
        """Lock, check what the directories were computed from, and write this run's provenance before any work."""
        output_lock(factors_dir, stack)
        output_lock(scores_dir, stack)
        refit = "pass --overwrite to recompute it (or delete it)"
        saved = check_provenance(factors_dir, factor_provenance, args.overwrite, refit)
        finished = saved.get("completed_stages", [])
        completed[:] = takewhile(lambda stage: stage in finished, FACTOR_STAGES)  # each needs those before it
        if completed:
            logger.info("reusing the finished factor stages in %s: %s", factors_dir, ", ".join(completed))
            fit["fit_id"] = saved.get("fit_id")
            fit["stages"] = {stage: saved.get("stages", {}).get(stage) for stage in completed}
        else:
            fit["fit_id"] = uuid.uuid4().hex
        check_factor_files(factors_dir, completed, f"delete {factors_dir} or pass --overwrite to refit the factors")
        saved = check_provenance(scores_dir, provenance, args.overwrite,
                                 "delete it to recompute the scores alone, or pass --overwrite to refit the factors too")
        reuse = saved.get("complete") is True and completed == FACTOR_STAGES
        if reuse and saved.get("factors_fit_id") != fit["fit_id"]:
            logger.warning("the scores in %s come from an earlier fit of these factors (refitted since); "
                           "recomputing them", scores_dir)
            reuse = False
        missing = [file for file in scores_files() if not readable_safetensors(scores_dir / file)]
        if reuse and missing:
            logger.warning("%s is missing or damaged in %s; recomputing the scores (the factors are kept)",
                           " and ".join(missing), scores_dir)
            reuse = False
        record_factors()
        if not reuse:
            write_json(scores_dir / METADATA_FILE, {"checkpoint": checkpoint, **provenance, "complete": False})
        return list(completed), reuse

    def scores_files():
        """The files the scores are reused from (the queries' fit, cheap, is redone alone when it is missing)."""
        return [SELF_SCORES_FILE, TRAIN_FIT_FILE] if args.self_influence else [SCORES_FILE]

    completed = []  # the finished factor stages, filled by claim_output_dirs on rank 0
    completed[:], reuse_scores = on_rank_zero(claim_output_dirs)
    trained = read_json(args.checkpoint_dir / TRAINING_ARGS_FILE, "training arguments")

    if args.max_memory_gb and analyzer.state.device.type == "cuda":
        limit_gpu_memory(args.max_memory_gb, analyzer.state.device)
    started = time.perf_counter()
    with fast_factor_kernels(task.num_choices) if args.fast else nullcontext():
        factor_batch_size = fit_factors(analyzer, args, data, f_name, factors_dir, completed, record_factors)
    factors_seconds = time.perf_counter() - started
    cuda = analyzer.state.device.type == "cuda"
    factors_peak = torch.cuda.max_memory_allocated(analyzer.state.device) if cuda else 0  # the fused plan resets it

    if reuse_scores:
        logger.info("reusing the scores in %s", scores_dir)
        scores, sizes = load_scores(scores_dir / SELF_SCORES_FILE if args.self_influence else scores_dir)[0], {}
    else:
        logger.info("scores: %s (%s)", f"self-influence of {len(data.train)} training rows" if args.self_influence
                    else f"{len(data.queries)} queries × {len(data.train)} training rows", args.scoring)
        scores, sizes = compute_scores(analyzer, model, args, f_name, s_name, scores_dir, data, collator, rank)
    if rank == 0 and not reuse_scores:
        write_json(scores_dir / METADATA_FILE, {
            "checkpoint": checkpoint, **provenance, "complete": True, "factors_fit_id": fit["fit_id"],
            "recipe": trained.get("recipe"),
            "data": data_args_dict(args), "data_fingerprint": data.fingerprint,
            "factors_name": f_name, "scores_name": s_name,
            "scores_file": str(scores_dir / (SELF_SCORES_FILE if args.self_influence else SCORES_FILE)),
            "label_noise_rows": data.corrupted_rows, "excluded_rows": data.excluded_rows,
            "shape": list(scores.shape), "factor_strategy": args.factor_strategy,
            "use_half_precision": args.use_half_precision, "query_gradient_rank": args.query_gradient_rank,
            "damping_factor": args.damping_factor, "scoring": args.scoring, "fast": args.fast,
            "seconds": {"factors": round(factors_seconds, 2),  # ~0 when reused; wall time on this rank
                        "scores": round(time.perf_counter() - started - factors_seconds, 2)},
            "num_processes": dist.get_world_size() if dist.is_initialized() else 1,
            "batch_sizes": {"factor": args.factor_batch_size, "query": args.query_batch_size,
                            "train": args.train_batch_size},
            "fitted_in_memory": {"factor_batch_size": factor_batch_size, **sizes},  # after out-of-memory halving
            "peak_gpu_memory_gib": round(max(factors_peak, torch.cuda.max_memory_allocated(analyzer.state.device))
                                         / 2**30, 2) if cuda else None})
    if rank == 0 and args.self_influence:
        logger.info("self-influence of %d training rows in %s", len(scores), scores_dir)
        print_suspicious_rows(*load_self_scores(scores_dir), data, tokenizer, args.num_suspicious)
    elif rank == 0:
        if not reuse_scores or not readable_safetensors(scores_dir / QUERY_FIT_FILE):
            device = analyzer.state.device
            save_fit(scores_dir / QUERY_FIT_FILE, model_fit(model.to(device), data.queries, collator,
                                                            args.query_batch_size, device))
        logger.info("scores %s (queries × train) in %s", tuple(scores.shape), shown_path(scores_dir))
        print_top_examples(scores, data, tokenizer, args.query_index, args.top_k)
    return scores_dir


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose or args.profile)  # kronfluence logs its profile at INFO
    configure_cpu_threads()
    configure_attention()
    if args.combine:
        return combine_scores(args.combine, args.combine_mode, args.output_dir)
    args = resolve_data_args(args, args.checkpoint_dir if (args.checkpoint_dir / "config.json").exists() else None)
    model, tokenizer = load_checkpoint(args.checkpoint_dir)
    data = prepare_data(args, tokenizer)
    require_labels(data.queries)  # the measurement is the query's margin; before any work, and on every rank
    if not 0 <= args.query_index < len(data.queries):
        raise UserError(f"--query_index {args.query_index} is outside the {len(data.queries)} queries; "
                        f"pass one from 0 to {len(data.queries) - 1}")
    if not args.allow_other_train_rows:
        check_trained_rows(args.checkpoint_dir, data)

    external_group = dist.is_initialized()  # a caller's process group is left alone at the end
    if args.use_ddp and not dist.is_initialized():
        init_process_group()
    with ExitStack() as locks:
        scores_dir = run_analysis(args, model, tokenizer, data, locks)
    if dist.is_initialized() and not external_group:  # leave together: a rank that exits while another is still
        dist.barrier()                                 # in a gloo collective can abort it. (kronfluence's State
        dist.destroy_process_group()                   # still counts the ranks: main runs once per process.)
    return scores_dir


if __name__ == "__main__":
    main()
