"""Time EKFAC influence for the roberta-base architecture: the original example's settings against the fast path.

    python benchmark.py --tokenizer_dir ../shared/tokenizers/roberta-base \\
        --train_file ../shared/data/anetcap/train.csv.gz --validation_file ../shared/data/anetcap/validation.csv.gz \\
        --fit_rows 512 --output results/benchmark_h200_extrapolated.json
    python benchmark.py ... --num_train 512 --num_queries 50 --configs fused_acc32 fast --train_steps 0 --profile \\
        --output results/benchmark_profile_h200.json

On one GPU and one subset (default 2,048 train × 100 queries, real text through the real roberta-base
BPE, roberta-base weights briefly fine-tuned from random initialisation so that the gradients are not
degenerate; timing does not depend on the weights) it first times fine-tuning steps, then runs each
configuration stage by stage (covariance, eigendecomposition, lambda, scores), records time and peak
GPU memory, extrapolates to kronfluence's full SWAG scale (73,536 train × 2,000 queries) and compares
every configuration's scores with the fp32 reference (mean per-query Pearson and Spearman).

Configurations: `reference_fp32` and `reference_bf16` are the original example's defaults (padding to
128, kronfluence's loop, 100 queries per pass over the training set); `fast` is `analyze.py --fast`
(length-sorted, dynamically padded rows; kronfluence fits the factors through fused_scores.py's fast
kernels, fused_scores.py scores); `fused_acc32` is the same without the fast kernels (`--use_half_precision
--fp32_accumulation --scoring fused`). No configuration enables TF32 beyond what analyze.py does.

Training: `--train_variants` times train.py's own loop (`train_model`) under each variant's flags and
extrapolates one 50%-SWAG retraining run (36,768 rows × 3 epochs). Several retraining runs sharing one GPU:

    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc-per-node=4 benchmark.py ... --configs --train_variants cudagraphs

Scaling used (`full_scale`): the covariance is linear in the training rows, lambda in the rows it is fitted on
(all, a fraction, or --fast's cap); the eigendecomposition does not depend on them. kronfluence's scores are one
pass over the training set per query batch. The fused path's query side is linear in the queries; a pass over the
training set holds as many queries as fit in GPU memory and costs a fixed part plus a part per query, timed with a
full chunk of queries (--num_fast_queries, capped at what fits) and a quarter of one. With `--fit_rows N` every
configuration also runs on N rows and each linear cost follows the line through both sizes, so that fixed costs are
counted once; otherwise it is proportional to --num_train. `--profile` records the ten most expensive GPU
operations of each stage (torch.profiler) instead of timing alone, and for each training variant a third, profiled
pass with the GPU's busy time (a step far longer than it is overhead-bound).

Killed, a rerun of the same command (on the same GPU and software) goes on from where it stopped: the timed
training's weights and each finished configuration's scores are kept under --work_dir, its timings in --output. To
measure anew, pass another --output or --work_dir.

`--direct` measures instead of extrapolating: it runs `analyze.py --fast` in a process of its own, as a user
does, on the benchmark's weights and the training file's rows repeated to --direct_train (default 73,536) ×
--direct_queries (default 2,000) queries, and records the wall clock, the start-up, each stage's seconds and peak
memory (analyze.py's own records) and the rest of the wall clock in parts (`outside_stages`, where no stage was
reused); with --direct_fp8_contraction analyze.py contracts in fp8 (--fp8_contraction). At that default scale, beside
`reference_bf16` the wall clock's speed-up over it, beside `fast` each stage over its extrapolation. Killed, it
resumes: a rerun reuses the finished factor stages and sums the times.

    python benchmark.py --tokenizer_dir ../shared/tokenizers/roberta-base --train_file ... --validation_file ... \\
        --fit_rows 512 --configs reference_bf16 --train_variants eager --train_steps 20 --direct \\
        --output results/benchmark_h200.json
"""

import copy
import gc
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import socket
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import transformers
from datasets import concatenate_datasets
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.utils.dataset import DataLoaderKwargs
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForMultipleChoice,
    AutoTokenizer,
    RobertaConfig,
    RobertaTokenizerFast,
)

from fast_kernels import fast_factor_kernels
from formats import METADATA_FILE, SCORES_KEY, TRAINING_ARGS_FILE, WEIGHTS_FILE
from fused_scores import fused_pairwise_scores, longest_first, release_pending
from influence import (
    FUSED_BREAKDOWN,
    FUSED_SECONDS,
    QUERY_GRADIENT_ACCUMULATION,
    AnalysisConfig,
    factor_rows,
    factor_stages,
)
from metrics import per_query_correlations
from pipeline import (
    REFERENCE_NUM_QUERIES,
    REFERENCE_NUM_TRAIN,
    load_local_files,
    make_collator,
    take_first,
    tokenize,
)
from task import MultipleChoiceTask
from training import TrainingRecipe, train_model
from utils import (
    ArgumentParser,
    UserError,
    atomic_output,
    configure_attention,
    halving_on_oom,
    loader_workers,
    process_device,
    process_rank,
    read_json,
    run_script,
    setup_logging,
    write_json,
)

logger = logging.getLogger(__name__)

CONFIGS = {  # scoring, bf16 (acc32: fp32 factor sums; fast: analyze.py --fast), pad to 128, query rank, batch sizes,
    # length-sorted rows, lambda on a fraction of the rows
    "reference_fp32": dict(scoring="kronfluence", half=False, pad=True, rank=-1, factor_bs=128, query_bs=100,
                           train_bs=128, sort=False),
    "reference_bf16": dict(scoring="kronfluence", half=True, pad=True, rank=-1, factor_bs=128, query_bs=100,
                           train_bs=128, sort=False),
    "fast": dict(scoring="fused", half=True, acc32=True, fast=True, pad=False, rank=-1, factor_bs=256, query_bs=100,
                 train_bs=128, sort=True),
    "fused_acc32": dict(scoring="fused", half=True, acc32=True, pad=False, rank=-1, factor_bs=256, query_bs=100,
                        train_bs=128, sort=True),
    "fused_acc32_lambda_quarter": dict(scoring="fused", half=True, acc32=True, lambda_fraction=0.25, pad=False, rank=-1,
                                       factor_bs=256, query_bs=100, train_bs=128, sort=True),
    "fused_allbf16": dict(scoring="fused", half=True, pad=False, rank=-1, factor_bs=256, query_bs=100, train_bs=128,
                          sort=True),
    "kronfluence_qlr32": dict(scoring="kronfluence", half=True, pad=False, rank=32, factor_bs=256, query_bs=100,
                              train_bs=512, sort=True),
}
DEFAULT_CONFIGS = ["reference_fp32", "reference_bf16", "fused_acc32", "fast"]
SWAG_HALF = REFERENCE_NUM_TRAIN // 2
RECIPE_BATCH = 16
TOKENIZER_PROBE = "A man is sitting on a horse"  # ordinary words that any English tokenizer knows
TRAIN_VARIANTS = {  # the training recipe's settings (train.py's flags of the same names) of each timed variant
    "eager": {},
    "workers2": {"dataloader_num_workers": 2},
    "compiled": {"torch_compile": "dynamic"},
    "cudagraphs": {"torch_compile": "cudagraphs", "dataloader_num_workers": 2},
}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--tokenizer_dir", required=True,
                        help="Directory with the roberta-base vocab.json and merges.txt (or any saved tokenizer).")
    parser.add_argument("--train_file", required=True, help="SWAG-schema file for the training rows.")
    parser.add_argument("--validation_file", required=True, help="SWAG-schema file for the queries.")
    parser.add_argument("--num_train", type=int, default=2048, help="Training rows in the timed subset.")
    parser.add_argument("--fit_rows", type=int, default=None,
                        help="Also time every configuration on the first N (< --num_train) training rows and "
                             "extrapolate each stage along the line through both sizes, so that a fixed cost (saving "
                             "the factors, a pass's set-up) is not multiplied (default: proportional to one size).")
    parser.add_argument("--num_queries", type=int, default=100, help="Queries compared across configurations.")
    parser.add_argument("--num_fast_queries", type=int, default=1000,
                        help="Queries for the configurations that score many per pass (fused; query rank); "
                             "their first --num_queries rows are compared with the reference.")
    parser.add_argument("--configs", nargs="*", choices=list(CONFIGS), default=DEFAULT_CONFIGS,
                        help="Configurations to run (none: time training only).")
    parser.add_argument("--train_variants", nargs="+", choices=list(TRAIN_VARIANTS), default=None,
                        help="Training variants to time (default: all on GPU, eager on CPU); the first one trains "
                             "the weights that the configurations score.")
    parser.add_argument("--train_steps", type=int, default=100,
                        help="Fine-tuning steps (batch 16) timed per training variant after an untimed warm-up pass "
                             "over the same batches; they also move the weights that the configurations score away "
                             "from their random initialisation (0: skip).")
    parser.add_argument("--architecture", choices=["roberta-base", "tiny"], default="roberta-base",
                        help="roberta-base or a 2-layer model for smoke tests on CPU.")
    parser.add_argument("--profile", action="store_true",
                        help="Record each stage's and each training variant's top GPU operations and device-busy time.")
    parser.add_argument("--direct", action="store_true",
                        help="Also run analyze.py --fast itself, as a user does, on --direct_train training rows (the "
                             "training file's rows repeated to reach them) × --direct_queries queries, scoring the "
                             "benchmark's weights: wall clock to scores on disk, each stage's seconds and peak GPU "
                             "memory. Killed, a rerun resumes the finished factor stages; the stage times are summed.")
    parser.add_argument("--direct_train", type=int, default=REFERENCE_NUM_TRAIN,
                        help="Training rows of the direct run (default: kronfluence's SWAG example).")
    parser.add_argument("--direct_queries", type=int, default=REFERENCE_NUM_QUERIES,
                        help="Queries of the direct run (default: kronfluence's SWAG example).")
    parser.add_argument("--direct_fp8_contraction", action="store_true",
                        help="The direct run with analyze.py's --fp8_contraction (the contraction in fp8 e4m3).")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark.json"), help="Results JSON.")
    parser.add_argument("--work_dir", type=Path, default=Path("scores/benchmark"), help="Factors and scores go here.")
    args = parser.parse_args(argv)
    if args.train_variants is None:
        args.train_variants = list(TRAIN_VARIANTS) if torch.cuda.is_available() else ["eager"]
    if min(args.num_train, args.num_queries, args.num_fast_queries, args.direct_train, args.direct_queries) <= 0:
        parser.error("--num_train, --num_queries, --num_fast_queries, --direct_train and --direct_queries must be "
                     "positive")
    if args.fit_rows is not None and not 0 < args.fit_rows < args.num_train:
        parser.error(f"--fit_rows must be between 0 and --num_train ({args.num_train}), exclusive; got {args.fit_rows}")
    if args.direct_fp8_contraction and not args.direct:
        parser.error("--direct_fp8_contraction sets the direct run's contraction; pass --direct as well")
    if process_rank()[1] > 1 and args.configs:
        parser.error("under torchrun the benchmark times concurrent training only; pass --configs with no names")
    return args


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, profile: bool = False):
    """{"seconds", "peak_gib"[, "top_ops"]} of fn()."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA]
                                                         if torch.cuda.is_available() else [])
    # with the inputs' shapes: which matmul an `mm` is (a forward's, a per-example gradient's, the scores' contraction)
    profiler = torch.profiler.profile(activities=activities, record_shapes=True) if profile else None
    sync()
    start = time.perf_counter()
    if profiler:
        with profiler:
            fn()
    else:
        fn()
    sync()
    result = {"seconds": round(time.perf_counter() - start, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0, 2)}
    if profiler:
        result["top_ops"], busy = top_operations(profiler)
        result["device_busy_seconds"] = round(busy, 3)  # device-side time; far below "seconds": the GPU waits
    return result


def top_operations(profiler, k: int = 25) -> tuple:
    """The k operators or kernels with the most self device time (CPU time on CPU), per input shapes, with their
    share of the stage's device time. An operator's self device time is that of the kernels it launched, which are
    listed too (without shapes), so the share's total counts the device-side events (kernels, copies) alone."""
    attr = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    events = [e for e in profiler.key_averages(group_by_input_shape=True) if getattr(e, attr, 0) > 0]
    device_side = [e for e in events if e.device_type != torch.autograd.DeviceType.CPU] or events
    total = sum(getattr(e, attr) for e in device_side) or 1
    events.sort(key=lambda e: getattr(e, attr), reverse=True)
    return ([{"op": e.key[:80], "shapes": str(e.input_shapes)[:120], "ms": round(getattr(e, attr) / 1e3, 1),
              "share": round(getattr(e, attr) / total, 3), "calls": e.count} for e in events[:k]], total / 1e6)


def run_config(name, model, tokenizer, raw_train, raw_queries, raw_queries_fast, args, plan_rows: tuple = None):
    """One configuration on these rows: each stage's time and peak memory, its passes' costs, and its scores.
    `plan_rows`: the full-scale run's longest rows (full_run_rows), which the fused scoring plans its memory with."""
    c = CONFIGS[name]
    many = c["scoring"] == "fused" or c["rank"] > 0  # configurations that score many queries per pass
    train = tokenize(raw_train, tokenizer, pad_to_max_length=c["pad"])
    queries = tokenize(raw_queries_fast if many else raw_queries, tokenizer, pad_to_max_length=c["pad"])
    collator = make_collator(tokenizer, c["pad"])
    fast = c.get("fast", False)  # as analyze.py --fast: half precision with fp32 sums
    config = AnalysisConfig(factor_strategy="ekfac", query_gradient_rank=c["rank"], use_half_precision=c["half"] or fast,
                            fp32_accumulation=c.get("acc32", False) or fast, fast=fast)
    lambda_n = int(c["lambda_fraction"] * len(train)) if c.get("lambda_fraction") else config.lambda_rows
    cov_rows, lambda_rows = factor_rows(train, lambda_n) if c["sort"] else (train, train)
    factor_args, score_args = config.factor_arguments(len(cov_rows), len(lambda_rows)), config.score_arguments()
    task = MultipleChoiceTask()
    prepared = prepare_model(copy.deepcopy(model), task)
    analyzer = Analyzer(analysis_name=name, model=prepared, task=task, output_dir=str(args.work_dir), disable_tqdm=True,
                        log_level=None)  # see analyze.py
    device = process_device()
    # the configurations of analyze.py (length-sorted rows) collate in its default worker processes; the reference
    # configurations are kronfluence's example, which collates in the main process
    workers = loader_workers(None, device) if c["sort"] else 0
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator, num_workers=workers,
                                                    pin_memory=bool(workers) and device.type == "cuda"))
    full_lambda_rows = (int(c["lambda_fraction"] * REFERENCE_NUM_TRAIN) if c.get("lambda_fraction")
                        else min(config.lambda_rows or REFERENCE_NUM_TRAIN, REFERENCE_NUM_TRAIN))
    result = {"settings": {**c, "num_queries_timed": len(queries), "dataloader_num_workers": workers,
                           "lambda_rows": len(lambda_rows), "full_scale_lambda_rows": full_lambda_rows}}
    fitted = {}  # per stage: the sizes that fitted in memory (analyze.py halves them after an out-of-memory error)

    def batched(stage, fn, sizes):
        return lambda: fitted.__setitem__(stage, halving_on_oom(stage, fn, sizes, device))
    stages = {stage: batched(stage, fn, {} if stage == "eigendecomposition" else {"factor_batch_size": c["factor_bs"]})
              for stage, fn in factor_stages(analyzer, "f", cov_rows, lambda_rows, factor_args, overwrite=True).items()}
    holder, fused_timings = {}, {}
    if c["scoring"] == "fused":
        def fused(rows=queries, timings=fused_timings, key="scores"):
            holder[key] = fused_pairwise_scores(
                prepared.to(device), task, analyzer.load_all_factors("f"), "ekfac", score_args, rows, train, collator,
                c["query_bs"], c["train_bs"], device, disable_tqdm=True, timings=timings, num_workers=workers,
                plan_queries=REFERENCE_NUM_QUERIES, plan_rows=plan_rows)  # the module groups of the full-scale run
            release_pending()  # the pinned host memory given back within the stage that took it, as each is timed
        small_timings = {}  # a pass with a quarter of the queries: separates the pass's fixed cost from the matmuls
        stages["scores"] = fused
        stages["scores_quarter_pass"] = lambda: fused(
            queries.select(range(max(1, fused_timings["queries_per_pass"] // 4))), small_timings, "quarter")
    else:
        def kronfluence_scores(train_batch_size, query_batch_size):
            analyzer.compute_pairwise_scores(
                "s", factors_name="f", query_dataset=queries, train_dataset=train,
                per_device_query_batch_size=query_batch_size, per_device_train_batch_size=train_batch_size,
                score_args=score_args, overwrite_output_dir=True)
        stages["scores"] = batched("scores", kronfluence_scores, {"train_batch_size": c["train_bs"],
                                                                  "query_batch_size": min(c["query_bs"], len(queries))})
    with fast_factor_kernels(task.num_choices) if c.get("fast") else nullcontext():
        result.update(time_stages(name, stages, len(train), args.profile))
    for stage, sizes in fitted.items():
        result[stage]["fitted_in_memory"] = sizes
    result["num_train"] = len(train)
    if c["scoring"] == "fused":
        result["fused"] = fused_pass_costs(fused_timings, small_timings, len(queries))
        scores = holder["scores"]
    else:
        result["kronfluence_passes"] = kronfluence_pass_costs(c, fitted["scores"]["query_batch_size"], len(queries),
                                                              result["scores"]["seconds"])
        scores = analyzer.load_pairwise_scores("s")[SCORES_KEY].float().cpu()
    return result, scores  # rows and columns in dataset order


def time_stages(name: str, stages: dict, num_train: int, profile: bool) -> dict:
    """stage -> its `timed` result, run in order."""
    result = {}
    for stage, fn in stages.items():
        torch.manual_seed(0)  # the sampled (true-Fisher) labels: the same draws in every configuration
        result[stage] = timed(fn, profile)
        logger.info("%s %s (%d rows): %.1f s, peak %.1f GiB", name, stage, num_train, result[stage]["seconds"],
                    result[stage]["peak_gib"])
    return result


def fused_pass_costs(timings: dict, quarter: dict, num_queries: int) -> dict:
    """The fused path's timings, and a chunk's passes over the training rows (one per module group, the groups of the
    full-scale run) as fixed + per_query × queries: the line through the quarter chunk (`quarter`'s timings) and
    the mean full chunk."""
    chunks = math.ceil(num_queries / timings["queries_per_pass"])
    q_small, q_big = quarter["queries_per_pass"], num_queries / chunks
    t_small, t_big = quarter["train_seconds"], timings["train_seconds"] / chunks
    per_query = max(0.0, (t_big - t_small) / (q_big - q_small)) if q_big > q_small else 0.0
    return {**{k: round(v, 2) if isinstance(v, float) else v for k, v in timings.items()},
            "chunk_fixed_s": round(t_big - per_query * q_big, 3), "chunk_per_query_s": round(per_query, 6)}


def kronfluence_pass_costs(settings: dict, query_bs: int, num_queries: int, seconds: float) -> dict:
    """kronfluence's queries per pass over the training rows, its passes at full scale and its seconds per pass,
    from the query batch that fitted in memory and the scores stage's time."""
    if query_bs == min(settings["query_bs"], num_queries):  # at full scale as here, unless this subset has fewer queries
        query_bs = settings["query_bs"]
    per_pass = query_bs * (QUERY_GRADIENT_ACCUMULATION if settings["rank"] > 0 else 1)
    return {"queries_per_pass": per_pass, "full_scale_passes": math.ceil(REFERENCE_NUM_QUERIES / per_pass),
            "pass_s": round(seconds / math.ceil(num_queries / per_pass), 3)}


def along_rows(seconds: float, rows: int, small: Optional[float] = None, small_rows: Optional[int] = None,
               target: int = REFERENCE_NUM_TRAIN) -> float:
    """A time linear in the rows, at `target` rows (the full scale's): proportional to `rows`, or, with a time on
    fewer rows, on the line through both (a fixed cost counted once; a negative slope from timing noise counts as 0)."""
    if small is None or small_rows == rows:
        return seconds * target / rows
    return seconds + max(0.0, (seconds - small) / (rows - small_rows)) * (target - rows)


def full_scale(result: dict, small: Optional[dict] = None) -> dict:
    """{"seconds", "factors", "scores"[, "fused"]} at 73,536 rows × 2,000 queries from one configuration's stage
    times (`small`: the same configuration on fewer rows, for the line through both sizes). The covariance is
    linear in the rows, lambda in its own rows (at full scale: all, a fraction or --fast's cap), the
    eigendecomposition constant; kronfluence's scores are one pass over the rows per
    query batch; the fused path's query side is linear in the queries, its passes over the rows hold as many
    queries as fit in memory, each pass a fixed cost plus a cost per query, both linear in the rows."""
    rows, small_rows = result["num_train"], small and small["num_train"]

    def line(value):
        return along_rows(value(result), rows, value(small) if small else None, small_rows)

    stages = {"covariance": line(lambda r: r["covariance"]["seconds"])}
    # lambda is linear in its own rows: all of them, a fraction, or up to a cap (--fast's)
    lam = [r and (r["lambda"]["seconds"], r["settings"].get("lambda_rows", r["num_train"])) for r in (result, small)]
    stages["lambda"] = along_rows(*lam[0], *(lam[1] or (None, None)),
                                  target=result["settings"].get("full_scale_lambda_rows", REFERENCE_NUM_TRAIN))
    stages["eigendecomposition"] = result["eigendecomposition"]["seconds"]
    factors = sum(stages.values())
    out = {}
    if "fused" in result:
        f = result["fused"]
        per_chunk = min(REFERENCE_NUM_QUERIES, f["chunk_capacity"] or REFERENCE_NUM_QUERIES)
        chunks = math.ceil(REFERENCE_NUM_QUERIES / per_chunk)
        fixed = line(lambda r: r["fused"]["chunk_fixed_s"])
        per_query = f["chunk_per_query_s"] * REFERENCE_NUM_TRAIN / rows  # no fixed part: a matmul per query and row
        scores = f["query_seconds"] * REFERENCE_NUM_QUERIES / result["settings"]["num_queries_timed"] \
            + chunks * fixed + per_query * REFERENCE_NUM_QUERIES
        out["fused"] = {"queries_per_chunk": per_chunk, "chunks": chunks, "module_groups": f["module_groups"],
                        "chunk_fixed_s": round(fixed, 1), "train_chunk_s": round(fixed + per_query * per_chunk, 1)}
    else:
        k = result["kronfluence_passes"]
        scores = k["full_scale_passes"] * line(lambda r: r["kronfluence_passes"]["pass_s"])
    stages["scores"] = scores
    return {"seconds": round(factors + scores, 1), "factors": round(factors, 1), "scores": round(scores, 1),
            "stages": {stage: round(seconds, 1) for stage, seconds in stages.items()}, **out}


def measured_over_extrapolated(direct: dict, extrapolated: dict) -> dict:
    """Per stage (and for all stages), the direct run's seconds over the `fast` configuration's extrapolation to the
    same scale (its full_scale["stages"]): how far the benchmark's prediction is from what a user's run takes."""
    ratios = {stage: round(direct["stages"][stage]["seconds"] / seconds, 2)
              for stage, seconds in extrapolated["stages"].items() if seconds > 0 and stage in direct["stages"]}
    ratios["stages"] = round(direct["stages_seconds"] / extrapolated["seconds"], 2)
    return ratios


def compared_with_extrapolations(direct: dict, results: dict) -> dict:
    """What a direct run at the reference scale adds beside this invocation's extrapolated configurations: its wall
    clock's speed-up over the bf16 reference's (with `reference_bf16`, where the run reused no stage: a resumed
    run's wall clock lacks the reused stages) and its stages against `fast`'s (with `fast`, where the run
    contracted in bf16 as `fast` does: measured_over_extrapolated)."""
    out = {}
    if "reference_bf16" in results and not direct["reused_stages"]:
        out["wall_speedup_vs_reference_bf16"] = round(results["reference_bf16"]["full_scale_seconds"]
                                                      / direct["wall_seconds"], 1)
    if "fast" in results and not direct.get("fp8_contraction"):  # `fast` extrapolates the bf16 contraction
        out["measured_over_extrapolated"] = measured_over_extrapolated(direct, results["fast"]["full_scale"])
    return out


def warm_up(name, model, tokenizer, raw_train, raw_queries, args) -> float:
    """One untimed run of configuration `name` on a few rows before its timed ones: one-time costs (the first use of
    its kernels, its worker processes, CUDA's start-up if nothing ran before) would otherwise fall into its first
    timed stage, the smaller subset's covariance, and flatten the line through both subset sizes. Returns its
    seconds."""
    started = time.perf_counter()
    rows = min(len(raw_train), 2 * CONFIGS[name]["factor_bs"])
    queries = raw_queries.select(range(min(len(raw_queries), 4)))
    untimed = copy.copy(args)
    untimed.profile = False
    run_config(name, model, tokenizer, raw_train.select(range(rows)), queries, queries, untimed)
    free_memory()
    return round(time.perf_counter() - started, 1)


def time_training(model, tokenizer, data, variant: str, profile: bool = False) -> tuple:
    """Seconds per step of train.py's own loop (`training.train_model`: batch 16, AdamW, bf16 autocast on GPU,
    dynamic padding, collation included) on the tokenized rows `data` under one variant's flags, and one
    50%-SWAG run (36,768 rows × 3 epochs) extrapolated; returns (result, trained model). The loop runs
    twice over the same rows in the same order: the first pass compiles and records CUDA graphs for every
    padded length, the second is timed. Under torchrun every process trains its own copy at the same time
    (several retraining runs sharing a GPU, as `torchrun --nproc-per-node=P retrain.py --lds_num_masks ...`
    does with CUDA_VISIBLE_DEVICES set)."""
    _, world, _ = process_rank()
    device = process_device()
    model = copy.deepcopy(model).to(device).train()
    recipe = TrainingRecipe(per_device_train_batch_size=RECIPE_BATCH, num_train_epochs=1, learning_rate=2e-5,
                            **TRAIN_VARIANTS[variant])
    collator = make_collator(tokenizer)

    def one_pass():
        train_model(model, data, collator, recipe, seed=0, device=device, quiet=True)

    warmup = timed(one_pass)["seconds"]
    if world > 1:
        torch.distributed.barrier()  # every process is compiled and warm before any is timed
    measured = timed(one_pass)
    steps = len(data) // RECIPE_BATCH
    per_step = measured["seconds"] / steps
    full_steps = 3 * (SWAG_HALF // RECIPE_BATCH)
    flags = " ".join(f"--{name} {value}" for name, value in TRAIN_VARIANTS[variant].items())
    result = {"flags": flags, "seconds_per_step": round(per_step, 4),
              "batch_size": RECIPE_BATCH, "steps_timed": steps, "peak_gib": measured["peak_gib"],
              "warmup_pass_seconds": warmup, "retrain_50pct_swag_steps": full_steps,
              "retrain_50pct_swag_seconds": round(per_step * full_steps, 1)}
    if profile:  # a third, profiled pass: where a step's time goes, and how much of it the GPU is busy
        result["profile"] = {**timed(one_pass, profile=True), "steps": steps}
    if world > 1:  # P processes on G devices finish P runs in the slowest one's time: G × that / P device-seconds a run
        gathered = [None] * world
        torch.distributed.all_gather_object(gathered, (per_step, socket.gethostname(), str(device)))
        devices = len({(host, dev) for _, host, dev in gathered})
        slowest = max(s for s, _, _ in gathered)
        result.update(devices=devices, processes_per_device=math.ceil(world / devices),
                      seconds_per_step_each_process=[round(s, 4) for s, _, _ in gathered],
                      retrain_50pct_swag_seconds=round(slowest * full_steps * devices / world, 1))
    return result, model.eval()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def load_tokenizer(path: Path):
    """The tokenizer saved in `path`, or the byte-level BPE of its vocab.json and merges.txt alone (as
    ../shared/tokenizers/roberta-base holds). Refuses one that maps ordinary words to unknown tokens: transformers 5
    ignores `RobertaTokenizerFast(vocab_file=..., merges_file=...)` and builds an empty vocabulary, which would
    time every choice as a handful of special tokens."""
    if not path.is_dir():
        raise UserError(f"--tokenizer_dir {path} is not a directory; pass the roberta-base tokenizer directory")
    bpe_files = (path / "merges.txt").is_file() and not (path / "tokenizer.json").is_file()
    tokenizer = (RobertaTokenizerFast.from_pretrained(path, model_max_length=128) if bpe_files
                 else AutoTokenizer.from_pretrained(path))
    ids = tokenizer(TOKENIZER_PROBE, add_special_tokens=False)["input_ids"]
    if not ids or tokenizer.unk_token_id in ids:
        raise UserError(f"the tokenizer in {path} maps {TOKENIZER_PROBE!r} to unknown tokens ({len(tokenizer)} in its "
                        f"vocabulary); pass a directory with a complete vocab.json and merges.txt or tokenizer.json")
    return tokenizer


def token_lengths(rows) -> dict:
    """Mean and largest tokens per choice of tokenized rows: what the timed work is made of."""
    lengths = np.array([[len(ids) for ids in row] for row in rows["input_ids"]])
    return {"mean_tokens_per_choice": round(float(lengths.mean()), 1), "max_tokens_per_choice": int(lengths.max())}


def random_roberta(tokenizer, **size):
    """The roberta-base architecture (or `size` overrides) with random weights, seeded."""
    torch.manual_seed(0)
    return AutoModelForMultipleChoice.from_config(RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=514,
                                                                type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                                                                **size))


def describe_run(args, argv, tokenizer, raw_train) -> dict:
    """The results file's head: the software, the GPU, the subset and its token lengths, the command."""
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "transformers": transformers.__version__, "kronfluence": importlib.metadata.version("kronfluence"),
           "gpu_memory_free_gib_at_start": round(torch.cuda.mem_get_info()[0] / 2**30, 2)
           if torch.cuda.is_available() else None,
           "subset": {"num_train": args.num_train, "num_queries": args.num_queries},
           "full_scale": {"num_train": REFERENCE_NUM_TRAIN, "num_queries": REFERENCE_NUM_QUERIES},
           "command": "python benchmark.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    out["subset"].update(token_lengths(tokenize(raw_train, tokenizer)))
    return out


def time_training_variants(model, tokenizer, raw_all_train, args, out: dict, rank: int):
    """Times each of --train_variants on --train_steps batches into out["training"] (written after each one by rank
    0) and the fastest 50%-SWAG retraining run into out["retrain_50pct_swag_s"]; returns the first variant's
    trained weights."""
    rows = tokenize(raw_all_train.select(range(min(len(raw_all_train), RECIPE_BATCH * args.train_steps))), tokenizer)
    out["training"] = {}
    for i, variant in enumerate(args.train_variants):
        out["training"][variant], trained = time_training(model, tokenizer, rows, variant, args.profile)
        logger.info("training %s: %s", variant, out["training"][variant])
        if i == 0:
            model = trained  # the configurations score these (no longer random) weights
        if rank == 0:
            write_json(args.output, out)
    out["retrain_50pct_swag_s"] = min(v["retrain_50pct_swag_seconds"] for v in out["training"].values())
    return model


def full_run_rows(raw, tokenizer, rows: int = 512) -> tuple:
    """The `rows` longest queries and every training row of the full-scale run (the first REFERENCE_NUM_QUERIES
    validation rows, and the training file, whose rows the full run repeats), longest first, tokenized as the fused
    configurations' are (no padding): the subsets' fused scoring plans its memory with them, as the full run does with
    its first micro-batches of each size (fused_scores.train_probes). A subset's own longest rows can be shorter (the
    first 2,048 anetcap rows: 104 tokens a choice at most, the file: 128), and so plan fewer module groups than the
    full run."""
    splits = take_first(raw["validation"], min(REFERENCE_NUM_QUERIES, len(raw["validation"])), "queries",
                        "--num_queries"), raw["train"]
    queries, train = (tokenize(split, tokenizer) for split in splits)
    return queries.select(longest_first(queries)[:rows]), train.select(longest_first(train))


def run_config_at_full_scale(name, model, tokenizer, raw_train, raw_queries, raw_queries_fast, args,
                             plan_rows: tuple = None) -> tuple:
    """`run_config` on the subset (and first on --fit_rows rows, when given), with the extrapolation to full scale."""
    warm_up_seconds = warm_up(name, model, tokenizer, raw_train, raw_queries, args)
    small = None
    if args.fit_rows:
        small = run_config(name, model, tokenizer, raw_train.select(range(args.fit_rows)), raw_queries,
                           raw_queries_fast, args, plan_rows)[0]
        free_memory()
    result, scores = run_config(name, model, tokenizer, raw_train, raw_queries, raw_queries_fast, args, plan_rows)
    free_memory()
    result["warm_up_seconds"] = warm_up_seconds
    if small:
        result["fit_subset"] = small
    result["full_scale"] = full_scale(result, small)
    result["full_scale_seconds"] = result["full_scale"]["seconds"]
    return result, scores


def compare_configs(out: dict, results: dict, scores: dict, num_queries: int) -> None:
    """Adds each configuration's agreement with reference_fp32's scores, the full-scale times and the speed-ups."""
    if "reference_fp32" in scores:
        for name in scores:
            results[name]["vs_reference_fp32"] = per_query_correlations(scores[name][:num_queries],
                                                                        scores["reference_fp32"])
    for name in results:
        out[f"{name}_full_scale_s"] = results[name]["full_scale_seconds"]
    if "reference_bf16" in results:
        out["speedup_vs_reference_bf16"] = {name: round(out["reference_bf16_full_scale_s"] / r["full_scale_seconds"], 2)
                                            for name, r in results.items()}
    if "fast" in results and "vs_reference_fp32" in results["fast"]:
        out["mean_query_pearson_vs_fp32"] = results["fast"]["vs_reference_fp32"]["pearson"]
        out["mean_query_spearman_vs_fp32"] = results["fast"]["vs_reference_fp32"]["spearman"]


DIRECT_DIR = "direct"  # under --work_dir: the checkpoint, the training file and analyze.py's outputs
# the direct run's process starts from the user's environment, not from one in which the configurations' loaders have
# switched the tokenizers' parallelism off (it would tokenize the 73,536 + 2,000 rows on one thread)
USER_ENVIRONMENT = dict(os.environ)


def direct_run(model, tokenizer, raw, args) -> dict:
    """analyze.py --fast in a process of its own, as a user runs it: the benchmark's weights saved as a checkpoint,
    the training rows repeated to --direct_train. Returns the wall clock of this invocation and each stage's seconds
    and peak GPU memory as analyze.py recorded them; a stage finished by an earlier, killed invocation keeps its own
    time (`stages_seconds` sums them; `reused_stages` names them, "scores" where complete scores were reused)."""
    work = (args.work_dir / DIRECT_DIR).resolve()
    checkpoint, train_file = work / "checkpoint", work / "train.csv"
    manifest = {"direct_train": args.direct_train, "architecture": args.architecture, "train_steps": args.train_steps,
                "tokenizer_dir": str(Path(args.tokenizer_dir).resolve()), "train_file": str(Path(args.train_file).resolve())}
    if (checkpoint / WEIGHTS_FILE).exists():
        saved = read_json(checkpoint / TRAINING_ARGS_FILE, "the direct run's checkpoint record").get("benchmark")
        if saved != manifest:
            raise UserError(f"{work} holds a direct run of other settings ({saved}); pass another --work_dir or "
                            f"delete {work}")
    else:
        rows = raw["train"]
        repeated = concatenate_datasets([rows] * math.ceil(args.direct_train / len(rows))).select(range(args.direct_train))
        with atomic_output(train_file) as tmp:
            repeated.to_csv(str(tmp), index=False)
        with atomic_output(checkpoint) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / TRAINING_ARGS_FILE, {"data": {}, "recipe": None, "benchmark": manifest})
    config = AnalysisConfig(use_half_precision=True, fp32_accumulation=True, fast=True, scoring="fused",
                            fp8_contraction=args.direct_fp8_contraction)
    factors_dir = work / "scores" / checkpoint.name / f"factors_{config.factors_name(0)}"
    scores_dir = work / "scores" / checkpoint.name / f"scores_{config.scores_name(0, args.direct_queries)}"
    reused = (read_json(factors_dir / METADATA_FILE, "analyze.py's record").get("completed_stages", [])
              if (factors_dir / METADATA_FILE).exists() else [])
    # the scores' record as it stood: complete scores that analyze.py reuses leave it as it is (a killed run's claim,
    # "complete": false, is rewritten)
    scores_before = read_json(scores_dir / METADATA_FILE, "analyze.py's record") if (scores_dir / METADATA_FILE).exists() \
        else None
    command = [sys.executable, str(Path(__file__).with_name("analyze.py")), "--checkpoint_dir", str(checkpoint),
               "--fast", "--train_file", str(train_file), "--validation_file", str(Path(args.validation_file).resolve()),
               "--num_queries", str(args.direct_queries), "--allow_other_train_rows", "--output_dir", str(work / "scores"),
               *(["--fp8_contraction"] if args.direct_fp8_contraction else [])]
    logger.info("direct run: %s", " ".join(command))
    model.to("cpu")  # the GPU is the analysis's alone, as in a user's run
    free_memory()
    started = time.perf_counter()
    subprocess.run(command, check=True, env=USER_ENVIRONMENT)
    wall = time.perf_counter() - started
    factors, scores = (read_json(d / METADATA_FILE, "analyze.py's record") for d in (factors_dir, scores_dir))
    reused += ["scores"] if scores_before is not None and scores_before.get("complete") is True \
        and scores == scores_before else []
    stages = {name: {key: how.get(key) for key in ("seconds", "peak_gpu_memory_gib", "gpu_busy_share", "factor_batch_size",
                                                   "hooks")}
              for name, how in factors["stages"].items()}
    stages["scores"] = {"seconds": scores["seconds"]["scores"], "peak_gpu_memory_gib": scores["peak_gpu_memory_gib"],
                        "gpu_busy_share": scores.get("gpu_busy_share"),
                        **{key: scores["seconds"].get(f"scores_{key}") for key in FUSED_SECONDS + FUSED_BREAKDOWN},
                        **{k: v for k, v in scores["fitted_in_memory"].items() if k != "factor_batch_size"}}
    return {"command": " ".join(command[1:]), "num_train": args.direct_train, "num_queries": args.direct_queries,
            "wall_seconds": round(wall, 1), "reused_stages": reused,
            # the process's start-up: imports, the checkpoint, tokenizing (the earlier process's, where the scores
            # are reused)
            "startup_seconds": scores["seconds"].get("startup"), "startup_parts": scores["seconds"].get("startup_parts"),
            "stages": stages,
            "stages_seconds": round(sum(stage["seconds"] for stage in stages.values()), 1),
            # the parts are this invocation's only where it ran every stage
            "outside_stages": None if reused else outside_stages(wall, scores["seconds"], stages),
            "fp8_contraction": args.direct_fp8_contraction,
            "peak_gpu_memory_gib": max((stage["peak_gpu_memory_gib"] or 0) for stage in stages.values()) or None}


def outside_stages(wall: float, seconds: dict, stages: dict) -> dict:
    """Where a direct run's wall clock goes besides its start-up and its stages, from analyze.py's `seconds`: `setup`
    (before the factors), `between_factor_stages` (the factors' wall time less their stages': each finished stage's
    file check and record) and `end` (after the scores' record: the queries' fit, the printed examples, closing the
    outputs and the pinned host memory, the exit)."""
    factor_stages = sum(how["seconds"] for name, how in stages.items() if name != "scores")
    return {"setup": seconds["setup"], "between_factor_stages": round(seconds["factors"] - factor_stages, 2),
            "end": round(wall - seconds["startup"] - seconds["setup"] - seconds["factors"] - seconds["scores"], 2)}


RESUME_DIR = "resume"  # under --work_dir, per command: the timed weights and each finished configuration's scores


def earlier_results(path: Path, out: dict) -> dict:
    """The results an interrupted invocation of the same command on the same GPU and software left in --output, which
    this one goes on from (its finished configurations are reused); {} otherwise, and the file is written anew."""
    try:
        earlier = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    same = all(earlier.get(key) == out[key] for key in ("command", "gpu", "torch", "transformers", "kronfluence"))
    return earlier if same else {}


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    configure_attention()  # as analyze.py: no TF32 (fp32 means fp32; --fast chooses its own kernels)
    tokenizer = load_tokenizer(Path(args.tokenizer_dir))
    raw = load_local_files(args.train_file, args.validation_file)
    raw_train = take_first(raw["train"], args.num_train, "training rows", "--num_train")
    raw_queries = take_first(raw["validation"], args.num_queries, "queries", "--num_queries")
    raw_queries_fast = take_first(raw["validation"], max(args.num_queries, args.num_fast_queries), "queries",
                                  "--num_fast_queries")
    size = {} if args.architecture == "roberta-base" else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                                intermediate_size=64)
    model = random_roberta(tokenizer, **size).eval()
    out = describe_run(args, argv, tokenizer, raw_train)
    rank, world, _ = process_rank()
    if world > 1:
        torch.distributed.init_process_group("gloo")  # barrier and gather only; each process trains alone
        out["processes"] = world
    earlier = earlier_results(args.output, out) if world == 1 else {}
    resume_dir = args.work_dir / RESUME_DIR / hashlib.sha256(out["command"].encode()).hexdigest()[:12]  # per command
    weights_dir = resume_dir / "trained"
    reuse = bool(earlier) and (not args.train_steps or ("retrain_50pct_swag_s" in earlier
                                                        and (weights_dir / WEIGHTS_FILE).exists()))
    if args.train_steps and reuse:  # the timed weights of the interrupted invocation, which its configurations scored
        out["training"], out["retrain_50pct_swag_s"] = earlier["training"], earlier["retrain_50pct_swag_s"]
        model = AutoModelForMultipleChoice.from_pretrained(weights_dir).eval()
        logger.info("resuming %s: its training timings and weights (%s) are reused", args.output, weights_dir)
    elif args.train_steps:
        model = time_training_variants(model, tokenizer, raw["train"], args, out, rank)
        if rank == 0:
            with atomic_output(weights_dir) as tmp:
                model.save_pretrained(tmp, safe_serialization=True)
    if world > 1:
        torch.distributed.destroy_process_group()
    if rank > 0:
        return out
    results, scores, plan_rows = {}, {}, None
    out["configs"] = results
    for name in args.configs:
        saved = resume_dir / f"scores_{name}.safetensors"
        if reuse and name in (earlier.get("configs") or {}) and saved.exists():
            results[name], scores[name] = earlier["configs"][name], load_file(str(saved))[SCORES_KEY]
            logger.info("%s: reusing the interrupted invocation's timings and scores", name)
        else:
            if plan_rows is None and CONFIGS[name]["scoring"] == "fused":
                plan_rows = full_run_rows(raw, tokenizer)
            results[name], scores[name] = run_config_at_full_scale(name, model, tokenizer, raw_train, raw_queries,
                                                                   raw_queries_fast, args, plan_rows)
            with atomic_output(saved) as tmp:
                save_file({SCORES_KEY: scores[name].contiguous()}, str(tmp))
        write_json(args.output, out)  # an interrupted benchmark keeps what it measured; a rerun goes on from here
    compare_configs(out, results, scores, args.num_queries)
    write_json(args.output, out)
    if args.direct:
        out["direct"] = direct_run(model, tokenizer, raw, args)
        if (args.direct_train, args.direct_queries) == (REFERENCE_NUM_TRAIN, REFERENCE_NUM_QUERIES):
            out["direct"].update(compared_with_extrapolations(out["direct"], results))
        write_json(args.output, out)
    logger.info("results in %s", args.output)
    print(json.dumps({k: v for k, v in out.items() if k not in ("configs", "training")}, indent=1))
    return out


if __name__ == "__main__":
    run_script(main)
