"""Influence factors and pairwise (query × train) influence scores with kronfluence.

    python analyze.py --checkpoint_dir checkpoints/demo                        # the demo, CPU
    python analyze.py --checkpoint_dir checkpoints/swag --factor_strategy ekfac # the reference job
    python analyze.py --checkpoint_dir checkpoints/swag --use_half_precision --query_gradient_rank 32
    python analyze.py --checkpoint_dir checkpoints/swag --fast                  # the fast path
    python analyze.py --checkpoint_dir checkpoints/swag --fast --checkpoint_epoch 1   # train.py --save_epochs
    python analyze.py --checkpoint_dir checkpoints/swag --fast --dropout_ensemble 4   # 4 sub-networks, averaged
    python analyze.py --checkpoint_dir checkpoints/swag --fast --source_horizon 10 --source_segments 3   # SOURCE
    python analyze.py --combine scores/seed1/scores_ekfac_n73536_q2000 scores/seed2/scores_ekfac_n73536_q2000
    torchrun --standalone --nnodes=1 --nproc-per-node=2 analyze.py --checkpoint_dir checkpoints/swag --use_ddp

Data flags default to those the checkpoint was trained with. Factors go to
`<output_dir>/<checkpoint name>/factors_<name>/` and are reused when present; scores go to
`<output_dir>/<checkpoint name>/scores_<name>/pairwise_scores.safetensors` with `metadata.json`
beside them. Score rows are queries, columns training examples, both in dataset order; a positive
score means upweighting the training example raises the query's margin.

`--scoring fused` computes the same scores from the same kronfluence factors with fused_scores.py
(one pass over the training set per chunk of queries, length-sorted batches); `--scoring kronfluence`
(the default) is kronfluence's own loop. Each is a backend in influence.BACKENDS: a new scoring method is one
class there. `--fast` is `--use_half_precision --fp32_accumulation --scoring
fused` with kronfluence fitting the covariance and lambda factors through fast_kernels.fast_factor_kernels
(the same sums in faster GPU kernels).

`--dropout_ensemble K` averages the scores of K random sub-networks of the model (a fixed mask on the weights of
every nn.Linear per member, `--dropout_rate` of them dropped); the factors are the plain model's, fitted once.

`--source_horizon T [--source_segments N]` is SOURCE (source.py): EK-FAC's inverse replaced by unrolled training's
matrix function, over the last N segments of a train.py --save_epochs run, each with its own checkpoint's factors.

`--combine` averages the scores of several models (e.g. fine-tuned with different `train.py --seed`)
on the same data into `<output_dir>/ensembles/scores_<name>_ens<K><std|mean>_<id>/`: by default each
model's rows are first divided by their per-query standard deviation (`--combine_mode standardized`).
evaluate_lds.py evaluates the result like any single model's scores.
"""

import argparse
import dataclasses
import datetime
import hashlib
import logging
import os
import time
import uuid
from contextlib import ExitStack, nullcontext
from itertools import takewhile
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from filelock import FileLock, Timeout
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.factor.eigen import load_eigendecomposition, load_lambda_matrices
from kronfluence.utils.dataset import DataLoaderKwargs

from fast_kernels import fast_factor_kernels
from formats import (
    CHECKPOINTS_DIR,
    METADATA_FILE,
    QUERY_FIT_FILE,
    SCORES_DIR,
    SCORES_FILE,
    SELF_SCORES_FILE,
    TRAIN_FIT_FILE,
    TRAINING_ARGS_FILE,
    WEIGHTS_FILE,
    check_provenance,
    epoch_checkpoint,
    load_scores,
    load_self_scores,
    readable_safetensors,
    save_fit,
    save_scores,
)
from fused_scores import close_all, model_weights, pin_ahead
from influence import (
    BACKENDS,
    FACTOR_STAGES,
    FUSED_BREAKDOWN,
    FUSED_SECONDS,
    AnalysisConfig,
    ScoringJob,
    add_method_args,
    check_factor_files,
    compute_scores,
    fit_factors,
    model_fit,
    print_suspicious_rows,
    print_top_examples,
    resolve_method_args,
)
from pipeline import (
    add_data_args,
    data_args_dict,
    load_checkpoint,
    make_collator,
    prepare_data,
    require_labels,
    resolve_data_args,
)
from source import Segment, learning_rate_shares
from task import MultipleChoiceTask
from utils import (
    LOADER_WORKERS,
    ArgumentParser,
    GpuBusy,
    HookTimes,
    UserError,
    at_least,
    collector_paused,
    configure_attention,
    configure_cpu_threads,
    file_sha256,
    finish_interrupted_swaps,
    limit_gpu_memory,
    loader_workers,
    long_lived_frozen,
    positive_float,
    process_seconds,
    read_json,
    run_script,
    setup_logging,
    write_json,
)

logger = logging.getLogger(__name__)

FACTOR_BATCH = 64  # rows per factor batch (kronfluence's example)
# --fast's batches: larger ones spread each batch's fixed cost (hooks and kernel launches over every module), and
# benchmark.py times --fast at this size; a card that cannot hold it loses one failed batch (longest rows first)
FAST_FACTOR_BATCH = 256
LOCK_WAIT = datetime.timedelta(hours=12)  # the longest wait for another analysis writing the same directories
PROCESS_GROUP_TIMEOUT = LOCK_WAIT + datetime.timedelta(hours=1)  # collectives outlast that wait and the work after


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint_dir", type=Path, default=CHECKPOINTS_DIR / "swag",
                        help="A train.py checkpoint (save_pretrained directory).")
    parser.add_argument("--checkpoint_epoch", type=at_least(1), default=None,
                        help="Analyze the model train.py --save_epochs saved after this epoch of the run in "
                             "--checkpoint_dir instead of its final model (outputs under <checkpoint name>_epoch<K>).")
    add_method_args(parser)
    parser.add_argument("--use_ddp", action="store_true",
                        help="Distribute over the processes started by torchrun (kronfluence wraps the model).")
    parser.add_argument("--factor_batch_size", type=at_least(1), default=None,
                        help=f"Per-device batch size for fitting factors (default {FACTOR_BATCH}, {FAST_FACTOR_BATCH} "
                             f"with --fast; halved while it does not fit in memory).")
    parser.add_argument("--query_batch_size", type=at_least(1), default=100,
                        help="Per-device batch size for query gradients (halved while it does not fit in memory).")
    parser.add_argument("--train_batch_size", type=at_least(1), default=128,
                        help="Per-device batch size for training gradients (halved while it does not fit in memory).")
    parser.add_argument("--max_memory_gb", type=positive_float, default=None,
                        help="Cap on the GPU memory this analysis may use, per device, in GiB (default: what is "
                             "free; on a GPU shared with other jobs, give each its share).")
    parser.add_argument("--dataloader_num_workers", type=at_least(0), default=None,
                        help=f"Worker processes that collate batches ahead of the GPU (default {LOADER_WORKERS} on a "
                             "GPU, 0 on a CPU; the results are the same for any value).")
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
    resolve_method_args(parser, args)
    if args.factor_batch_size is None:
        args.factor_batch_size = FAST_FACTOR_BATCH if args.fast else FACTOR_BATCH
    if args.use_ddp and "LOCAL_RANK" not in os.environ:
        raise UserError("--use_ddp needs the processes torchrun starts: "
                        "torchrun --standalone --nproc-per-node=N analyze.py ... --use_ddp")
    if args.max_memory_gb is not None and not torch.cuda.is_available():
        parser.error("--max_memory_gb caps GPU memory, and this machine has no GPU; drop it")
    if args.self_influence and args.source_horizon:
        parser.error("--source_horizon scores queries against training rows; drop --self_influence")
    if args.combine and args.source_horizon:
        parser.error("--combine reads scores directories; drop --source_horizon")
    if args.self_influence and args.query_gradient_rank > 0:
        parser.error("--self_influence uses full-rank gradients; drop --query_gradient_rank")
    if args.combine and args.checkpoint_epoch:
        parser.error("--combine reads scores directories, not a checkpoint; drop --checkpoint_epoch")
    backend = BACKENDS[args.scoring]
    if args.query_gradient_rank > 0 and not backend.low_rank_queries:
        parser.error(f"--scoring {args.scoring} uses full-rank query gradients; drop --query_gradient_rank")
    if args.use_ddp and not torch.cuda.is_available() and not backend.cpu_processes:
        able = " or ".join(name for name, other in BACKENDS.items() if other.cpu_processes)
        raise UserError(f"--scoring {args.scoring} under torchrun needs CUDA; on CPU use --use_ddp with "
                        f"--scoring {able} (gloo)")
    return args


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


def on_rank_zero(step):
    """step() on rank 0 alone, the others waiting for its outcome, which every rank returns. Rank 0 alone reads and
    writes the output directories' metadata, so no rank reads what another is writing. If the step fails, every
    rank stops with rank 0's error: a UserError as it is; anything else with its traceback on rank 0 and as one
    line on the others."""
    failure = result = None
    if not dist.is_initialized() or dist.get_rank() == 0:
        try:
            result = step()
        except Exception as exc:  # a UserError too: it reaches the other ranks as it is
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


def shown_path(path: Path) -> str:
    """`path` relative to the working directory when it lies below it (kronfluence makes its paths absolute)."""
    relative = os.path.relpath(path)
    return str(path) if relative.startswith("..") else relative


def check_trained_rows(checkpoint_dir: Path, data) -> None:
    """Refuse training rows other than those the checkpoint was trained on: scores for them would attribute the
    model to rows it never saw (the files its data flags name may have changed, or flags given here differ)."""
    trained = read_json(checkpoint_dir / TRAINING_ARGS_FILE, "training arguments")
    recorded = trained.get("data_fingerprint", {})
    if trained.get("excluded_rows") and "excluded_rows" not in recorded:
        raise UserError(f"{checkpoint_dir} was trained without {len(trained['excluded_rows'])} rows by an older train.py "
                        f"that recorded the fingerprint of all rows; retrain it with --exclude_rows, or pass "
                        f"--allow_other_train_rows to score every row")
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


@dataclasses.dataclass
class Outputs:
    """An analysis's factors and scores directories: their locks, what they were computed from (provenance), and
    their completeness records (the finished factor stages, the fit id, whether the scores are complete)."""

    factors_dir: Path
    scores_dir: Path
    factors_name: str  # kronfluence's names: the directories are factors_<factors_name> and scores_<scores_name>
    scores_name: str
    checkpoint: str
    factor_provenance: dict  # weights, training rows, max length: what the factors were fitted on
    provenance: dict  # the same, and the queries (or the self-influence kind): what the scores were computed from
    self_influence: bool
    completed: list = dataclasses.field(default_factory=list)  # finished factor stages, in order
    fit: dict = dataclasses.field(default_factory=lambda: {"fit_id": None, "stages": {}})  # new id on each refit

    def record_factors(self, stage=None, how=None) -> None:
        """After each finished stage: the factors directory's completeness record."""
        if stage is not None:
            self.fit["stages"][stage] = how
        write_json(self.factors_dir / METADATA_FILE, {"checkpoint": self.checkpoint, **self.factor_provenance,
                                                      "completed_stages": self.completed, **self.fit})

    def claim(self, stack: ExitStack, overwrite: bool, scores: bool = True) -> tuple:
        """Lock both directories (the factors' alone without `scores`), check what they were computed from, and
        record this run's provenance before any work. Returns (finished factor stages, whether the scores can be
        reused)."""
        output_lock(self.factors_dir, stack)
        if scores:
            output_lock(self.scores_dir, stack)
        saved = check_provenance(self.factors_dir, self.factor_provenance, overwrite,
                                 "pass --overwrite to recompute it (or delete it)")
        finished = saved.get("completed_stages", [])
        self.completed[:] = takewhile(lambda stage: stage in finished, FACTOR_STAGES)  # each needs those before it
        if self.completed:
            logger.info("reusing the finished factor stages in %s: %s", self.factors_dir, ", ".join(self.completed))
        # a fit keeps its id when resumed; a new fit (or stages refitted under a record without an id) gets a new one
        resumed_id = saved.get("fit_id") if self.completed else None
        if resumed_id is None and self.completed != FACTOR_STAGES:
            resumed_id = uuid.uuid4().hex
        self.fit = {"fit_id": resumed_id,
                    "stages": {stage: saved.get("stages", {}).get(stage) for stage in self.completed}}
        check_factor_files(self.factors_dir, self.completed,
                           f"delete {self.factors_dir} or pass --overwrite to refit the factors")
        if not scores:
            self.record_factors()
            return list(self.completed), False
        saved = check_provenance(self.scores_dir, self.provenance, overwrite,
                                 "delete it to recompute the scores alone, or pass --overwrite to refit the factors too")
        reuse = self.reusable_scores(saved)
        self.record_factors()
        if not reuse:
            write_json(self.scores_dir / METADATA_FILE, {"checkpoint": self.checkpoint, **self.provenance,
                                                         "complete": False})
        return list(self.completed), reuse

    def reusable_scores(self, saved: dict) -> bool:
        """Complete scores of these factors (this fit), with their files whole."""
        if saved.get("complete") is not True or self.completed != FACTOR_STAGES:
            return False
        if saved.get("factors_fit_id") != self.fit["fit_id"]:
            logger.warning("the scores in %s come from an earlier fit of these factors (refitted since); "
                           "recomputing them", self.scores_dir)
            return False
        # the queries' fit, cheap, is redone alone when it is missing
        files = [SELF_SCORES_FILE, TRAIN_FIT_FILE] if self.self_influence else [SCORES_FILE]
        missing = [file for file in files if not readable_safetensors(self.scores_dir / file)]
        if missing:
            logger.warning("%s is missing or damaged in %s; recomputing the scores (the factors are kept)",
                           " and ".join(missing), self.scores_dir)
            return False
        return True


def outputs_of(args, data, analyzer, config: AnalysisConfig, source: dict = None) -> Outputs:
    f_name = config.factors_name(args.max_train_samples)
    s_name = config.scores_name(args.max_train_samples, args.num_queries)
    factor_provenance = {"weights_sha256": file_sha256(args.checkpoint_dir / WEIGHTS_FILE),
                         "train_fingerprint": data.fingerprint["train"], "max_length": args.max_length}
    if config.fits_lambda and config.fast and not config.lambda_max_examples and config.lambda_rows < len(data.train):
        # --fast's lambda cap is not in the factors' name: factors fitted with lambda on other rows are refused
        factor_provenance["lambda_rows"] = config.lambda_rows
    kind = {"kind": "self_influence"} if args.self_influence else {"query_fingerprint": data.fingerprint["queries"]}
    if source:  # SOURCE's scores depend on its horizon and on the earlier segments' models and factors too
        kind["source"] = {"horizon": args.source_horizon, "shares": source["shares"],
                          "weights_sha256": [file_sha256(Path(d) / WEIGHTS_FILE) for d in source["checkpoints"]],
                          "factors_fit_ids": source["fit_ids"]}
    return Outputs(analyzer.factors_output_dir(f_name), analyzer.scores_output_dir(s_name), f_name, s_name,
                   str(args.checkpoint_dir.resolve()), factor_provenance, {**factor_provenance, **kind},
                   args.self_influence)


def scores_metadata(args, data, outputs: Outputs, trained: dict, scores, timings: dict) -> dict:
    """What a finished scores directory records: provenance, data, settings, shape, time and memory."""
    return {"checkpoint": outputs.checkpoint, **outputs.provenance, "complete": True,
            "factors_fit_id": outputs.fit["fit_id"], "recipe": trained.get("recipe"),
            "data": data_args_dict(args), "data_fingerprint": data.fingerprint,
            "factors_name": outputs.factors_name, "scores_name": outputs.scores_name,
            "scores_file": str(outputs.scores_dir / (SELF_SCORES_FILE if args.self_influence else SCORES_FILE)),
            "label_noise_rows": data.corrupted_rows, "excluded_rows": data.excluded_rows,
            "shape": list(scores.shape), "factor_strategy": args.factor_strategy,
            "use_half_precision": args.use_half_precision, "query_gradient_rank": args.query_gradient_rank,
            "damping_factor": args.damping_factor, "scoring": args.scoring, "fast": args.fast,
            "dropout_ensemble": args.dropout_ensemble, **({"dropout_rate": args.dropout_rate,
                                                           "dropout_seed": args.dropout_seed} if args.dropout_ensemble else {}),
            "source_horizon": args.source_horizon, "source_segments": args.source_segments,
            "num_processes": dist.get_world_size() if dist.is_initialized() else 1,
            "batch_sizes": {"factor": args.factor_batch_size, "query": args.query_batch_size,
                            "train": args.train_batch_size},
            **timings}


def run_analysis(args, model, tokenizer, data, stack: ExitStack, source: dict = None,
                 factors_only: bool = False, startup_seconds: Optional[float] = None,
                 startup_parts: Optional[dict] = None) -> Path:
    """Fit the factors and compute the scores, resuming what an interrupted run with the same settings finished;
    the output directories stay locked (by rank 0) until `stack` closes. Returns the scores directory (the factors
    directory with `factors_only`). `source`: SOURCE's earlier segments and shares (earlier_segments).
    `startup_seconds`: the process's start-up before this analysis, recorded with the scores, and `startup_parts`
    its parts (the interpreter and imports, the checkpoint, the data)."""
    entered = time.perf_counter()
    task = MultipleChoiceTask()
    model = prepare_model(model, task)
    analyzer = Analyzer(analysis_name=args.checkpoint_dir.resolve().name, model=model, task=task,
                        profile=args.profile, output_dir=str(args.output_dir),
                        log_level=None)  # its default INFO would set the root logger's level too: setup_logging
    collator = make_collator(tokenizer, args.pad_to_max_length, args.max_length)
    device = analyzer.state.device
    workers = loader_workers(args.dataloader_num_workers, device)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator, num_workers=workers,
                                                    pin_memory=device.type == "cuda"))
    rank = dist.get_rank() if dist.is_initialized() else 0
    config = AnalysisConfig.from_args(args)
    outputs = outputs_of(args, data, analyzer, config, source)
    f_name, s_name = outputs.factors_name, outputs.scores_name
    outputs.completed[:], reuse_scores = on_rank_zero(lambda: outputs.claim(stack, args.overwrite, not factors_only))
    if args.max_memory_gb and device.type == "cuda":
        limit_gpu_memory(args.max_memory_gb, device)

    # 1. the factors: the stages a killed or earlier run left unfinished (meanwhile, host memory for the fused
    # passes' layer-output gradients is pinned: pinning it as the first pass stores into it holds that pass up)
    boundary_memory = None
    if (args.scoring == "fused" and not (factors_only or reuse_scores or args.self_influence or config.source_horizon)):
        boundary_memory = pin_ahead(model, collator, data.train, data.queries, args.train_batch_size,
                                    args.query_batch_size, config.score_arguments().score_dtype, device,
                                    config.fp8_contraction)
        if boundary_memory is not None:
            stack.callback(close_all, boundary_memory)  # where the scores never take it over
    started = time.perf_counter()
    hook_times = HookTimes() if args.fast else None  # where the fast kernels' stages spend their time
    with fast_factor_kernels(task.num_choices, hook_times) if args.fast else nullcontext():
        factor_batch_size = fit_factors(analyzer, config, data.train, f_name, outputs.factors_dir, outputs.completed,
                                        outputs.record_factors, args.factor_batch_size, hook_times)
    scores_started = time.perf_counter()
    factors_seconds = scores_started - started
    if factors_only:
        return outputs.factors_dir
    # each stage records its own peak (and resets the counter); the fused plan resets it too
    factors_peak = max([torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0,
                        *(how["peak_gpu_memory_gib"] * 2**30 for how in outputs.fit["stages"].values()
                          if how and how.get("peak_gpu_memory_gib") is not None)])

    # 2. the scores, by the chosen backend (or the complete ones of this fit)
    scores_dir = outputs.scores_dir
    if reuse_scores:
        logger.info("reusing the scores in %s", scores_dir)
        scores = load_scores(scores_dir / SELF_SCORES_FILE if args.self_influence else scores_dir)[0]
    else:
        logger.info("scores: %s (%s)", f"self-influence of {len(data.train)} training rows" if args.self_influence
                    else f"{len(data.queries)} queries × {len(data.train)} training rows", args.scoring)
        segments = None
        if config.source_horizon:  # the earlier segments, then the analysed model's own
            segments = [*(Segment(w, load_factors(directory), share) for w, directory, share in
                          zip(source["weights"], source["factors_dirs"], source["shares"])),
                        Segment(None, analyzer.load_all_factors(f_name), source["shares"][-1])]
        job = ScoringJob(analyzer, model, config, f_name, s_name, data, collator, args.train_batch_size,
                         args.query_batch_size, rank, workers, segments, boundary_memory)
        with GpuBusy(device) as busy:
            scores, sizes = compute_scores(job, scores_dir)
        split = {f"scores_{key}": round(float(sizes.pop(key)), 2) for key in FUSED_SECONDS if key in sizes}
        split.update({f"scores_{key}": sizes.pop(key) for key in FUSED_BREAKDOWN if key in sizes})
        if rank == 0:
            peak = max(factors_peak, torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None
            timings = {"seconds": {**({"startup": round(startup_seconds, 2)} if startup_seconds is not None else {}),
                                   **({"startup_parts": startup_parts} if startup_parts else {}),
                                   # the model's preparation, the output directories' claim, hashing the
                                   # weights, pinning ahead: from here to the factors
                                   "setup": round(started - entered, 2),
                                   "factors": round(factors_seconds, 2),  # ~0 when reused; wall time on this rank
                                   "scores": round(time.perf_counter() - scores_started, 2), **split,
                                   # SOURCE: the earlier segments' factors, fitted before this model's (~0 if reused)
                                   **({"source_factors": round(source["factor_seconds"], 2)} if source else {})},
                       "fitted_in_memory": {"factor_batch_size": factor_batch_size, **sizes},  # after OOM halving
                       "peak_gpu_memory_gib": round(peak / 2**30, 2) if peak is not None else None,
                       "gpu_busy_share": busy.share}  # the scores stage's (utils.GpuBusy)
            trained = read_json(args.checkpoint_dir / TRAINING_ARGS_FILE, "training arguments")
            if source:
                timings["source_checkpoints"] = [*map(str, source["checkpoints"]), outputs.checkpoint]  # segments' ends
            write_json(scores_dir / METADATA_FILE, scores_metadata(args, data, outputs, trained, scores, timings))

    # 3. what the user reads: the suspicious rows, or a query's top proponents and opponents
    if rank == 0 and args.self_influence:
        logger.info("self-influence of %d training rows in %s", len(scores), scores_dir)
        print_suspicious_rows(*load_self_scores(scores_dir), data, tokenizer, args.num_suspicious)
    elif rank == 0:
        if not reuse_scores or not readable_safetensors(scores_dir / QUERY_FIT_FILE):
            save_fit(scores_dir / QUERY_FIT_FILE, model_fit(model.to(device), data.queries, collator,
                                                            args.query_batch_size, device))
        logger.info("scores %s (queries × train) in %s", tuple(scores.shape), shown_path(scores_dir))
        print_top_examples(scores, data, tokenizer, args.query_index, args.top_k)
    return scores_dir


def load_factors(factors_dir: Path) -> dict:
    """EK-FAC's factors as fitted in `factors_dir` (its eigendecomposition and lambda matrices)."""
    return {**load_eigendecomposition(factors_dir), **load_lambda_matrices(factors_dir)}


def earlier_segments(args, run_dir: Path, tokenizer, data) -> dict:
    """SOURCE's segments before the analysed model: for each epoch checkpoint that ends one, its weights and its
    factors (fitted here as analyze.py --checkpoint_epoch would fit them, or reused), and every segment's share of
    the run's summed learning rate (source.learning_rate_shares)."""
    source = {"checkpoints": [], "weights": [], "factors_dirs": [], "fit_ids": [], "shares": [1.0],
              "factor_seconds": 0.0}
    if args.source_segments == 1:
        return source
    trained = read_json(run_dir / TRAINING_ARGS_FILE, "training arguments")
    epochs = trained.get("num_train_epochs")
    if trained.get("epoch") is not None:  # an epoch checkpoint given as the run
        raise UserError(f"{run_dir} is the epoch-{trained['epoch']} model of a run: pass the run's final checkpoint "
                        f"with --checkpoint_epoch {trained['epoch']} (its earlier epochs are found beside it)")
    if epochs is None:
        raise UserError(f"{run_dir} does not record its number of epochs (an older train.py); retrain it with "
                        f"--save_epochs to use --source_segments")
    analysed = args.checkpoint_epoch or epochs
    if args.source_segments > analysed:
        raise UserError(f"--source_segments {args.source_segments}: the analysed model ends epoch {analysed} of its "
                        f"run in {run_dir}, so it has at most {analysed} segments; lower --source_segments")
    scheduler = (trained.get("recipe") or {}).get("lr_scheduler", "constant")
    source["shares"] = learning_rate_shares(epochs, analysed, args.source_segments, scheduler)
    directories = [epoch_checkpoint(run_dir, epoch) for epoch in range(analysed - args.source_segments + 1, analysed)]
    for directory in directories if not args.allow_other_train_rows else ():  # all checked before any work
        check_trained_rows(directory, data)
    for directory in directories:
        model, _ = load_checkpoint(directory)
        logger.info("SOURCE: the factors of segment %d of %d (%s)", len(source["checkpoints"]) + 1,
                    args.source_segments, shown_path(directory))
        started = time.perf_counter()
        with ExitStack() as locks:
            factors_dir = run_analysis(argparse.Namespace(**{**vars(args), "checkpoint_dir": directory}), model,
                                       tokenizer, data, locks, factors_only=True)
        source["factor_seconds"] += time.perf_counter() - started
        source["checkpoints"].append(directory)
        source["weights"].append({name: p.detach().cpu().clone() for name, p in model_weights(model).items()})
        source["factors_dirs"].append(factors_dir)
        # a refit of these factors (a new fit id) makes SOURCE's scores stale: it is part of their provenance
        source["fit_ids"].append(read_json(factors_dir / METADATA_FILE, "the factors' record").get("fit_id"))
    return source


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose or args.profile)  # kronfluence logs its profile at INFO
    configure_cpu_threads()
    configure_attention()
    if args.combine:
        return combine_scores(args.combine, args.combine_mode, args.output_dir)
    finish_interrupted_swaps(args.checkpoint_dir)  # a train.py killed while swapping its checkpoint in
    run_dir = args.checkpoint_dir
    if args.checkpoint_epoch:
        args.checkpoint_dir = epoch_checkpoint(args.checkpoint_dir, args.checkpoint_epoch)
    args = resolve_data_args(args, args.checkpoint_dir if (args.checkpoint_dir / "config.json").exists() else None)
    imported = process_seconds()  # the interpreter, the imports and the arguments
    with collector_paused():
        started = time.perf_counter()
        model, tokenizer = load_checkpoint(args.checkpoint_dir)
        loaded = time.perf_counter()
        data = prepare_data(args, tokenizer)
    startup_parts = {"imports": round(imported, 2), "checkpoint": round(loaded - started, 2),
                     "data": round(time.perf_counter() - loaded, 2)}
    require_labels(data.queries)  # the measurement is the query's margin; before any work, and on every rank
    if not 0 <= args.query_index < len(data.queries):
        raise UserError(f"--query_index {args.query_index} is outside the {len(data.queries)} queries; "
                        f"pass one from 0 to {len(data.queries) - 1}")
    if not args.allow_other_train_rows:
        check_trained_rows(args.checkpoint_dir, data)

    external_group = dist.is_initialized()  # a caller's process group is left alone at the end
    if args.use_ddp and not dist.is_initialized():
        init_process_group()
    # imports, the checkpoint and the data: before SOURCE's factors (source_factors) and any wait for a lock
    startup_seconds = process_seconds()
    with long_lived_frozen():  # the data and the model live to the end: no collection walks them
        # SOURCE's earlier segments first: their factors, each as its own analysis would fit them
        source = earlier_segments(args, run_dir, tokenizer, data) if args.source_horizon else None
        with ExitStack() as locks:
            scores_dir = run_analysis(args, model, tokenizer, data, locks, source, startup_seconds=startup_seconds,
                                      startup_parts=startup_parts)
    if dist.is_initialized() and not external_group:  # leave together: a rank that exits while another is still
        dist.barrier()                                 # in a gloo collective can abort it. (kronfluence's State
        dist.destroy_process_group()                   # still counts the ranks: main runs once per process.)
    return scores_dir


if __name__ == "__main__":
    run_script(main)
