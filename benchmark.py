"""Time EKFAC influence for the roberta-base architecture: the original example's settings against faster ones.

    python benchmark.py --tokenizer_dir ../shared/tokenizers/roberta-base \\
        --train_file ../shared/data/anetcap/train.csv.gz --validation_file ../shared/data/anetcap/validation.csv.gz \\
        --output results/benchmark_h200.json

On one GPU and one subset (default 2,048 train × 100 queries, real text through the real roberta-base
BPE, random roberta-base weights: timing does not depend on the weights) it runs each configuration
stage by stage (covariance, eigendecomposition, lambda, scores), records time and peak GPU memory,
extrapolates to kronfluence's full SWAG scale (73,536 train × 2,000 queries) and compares every
configuration's scores with the fp32 reference (mean per-query Pearson and Spearman). It also times
fine-tuning steps and extrapolates one LDS retraining run on 50% of SWAG (36,768 rows × 3 epochs).

Scaling used: covariance and lambda are linear in the training rows; the eigendecomposition does not
depend on them; scores are linear in training rows × query batches (every query batch makes one pass
over the training set).
"""

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.utils.dataset import DataLoaderKwargs
from scipy.stats import rankdata
from transformers import AutoModelForMultipleChoice, AutoTokenizer, RobertaConfig, RobertaTokenizerFast

from analyze import QUERY_GRADIENT_ACCUMULATION, SCORES_KEY, factor_arguments, score_arguments
from pipeline import (
    REFERENCE_NUM_QUERIES,
    REFERENCE_NUM_TRAIN,
    load_local_files,
    make_collator,
    setup_logging,
    tokenize,
    write_json,
)
from task import MultipleChoiceTask

logger = logging.getLogger(__name__)

# name: (use_half_precision, pad_to_max_length, query_gradient_rank, factor batch, query batch, train batch,
#        sort rows by length)
CONFIGS = {
    "reference_fp32": (False, True, -1, 128, 100, 128, False),
    "reference_bf16": (True, True, -1, 128, 100, 128, False),
    "fastest": (True, False, 32, 256, 100, 512, True),
}
SWAG_HALF = REFERENCE_NUM_TRAIN // 2


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer_dir", required=True,
                        help="Directory with the roberta-base vocab.json and merges.txt (or any saved tokenizer).")
    parser.add_argument("--train_file", required=True, help="SWAG-schema file for the training rows.")
    parser.add_argument("--validation_file", required=True, help="SWAG-schema file for the queries.")
    parser.add_argument("--num_train", type=int, default=2048, help="Training rows in the timed subset.")
    parser.add_argument("--num_queries", type=int, default=100, help="Queries in the timed subset.")
    parser.add_argument("--num_fast_queries", type=int, default=1000,
                        help="Queries for configurations with a query rank (one pass of 100 × 10 accumulated); "
                             "their first --num_queries rows are compared with the reference.")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS), help="Configurations to run.")
    parser.add_argument("--train_steps", type=int, default=100, help="Fine-tuning steps timed for the retraining estimate (0: skip).")
    parser.add_argument("--architecture", choices=["roberta-base", "tiny"], default="roberta-base",
                        help="roberta-base (random weights) or a 2-layer model for smoke tests on CPU.")
    parser.add_argument("--output", type=Path, default=Path("results/benchmark.json"), help="Results JSON.")
    parser.add_argument("--work_dir", type=Path, default=Path("scores/benchmark"), help="Factors and scores go here.")
    return parser.parse_args(argv)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    """(seconds, peak GiB) of fn()."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    sync()
    start = time.perf_counter()
    fn()
    sync()
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    return time.perf_counter() - start, peak


def per_query_correlations(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.double().numpy(), b.double().numpy()

    def pearson(x, y):
        x, y = x - x.mean(1, keepdims=True), y - y.mean(1, keepdims=True)
        return (x * y).sum(1) / np.sqrt((x * x).sum(1) * (y * y).sum(1))

    with np.errstate(invalid="ignore", divide="ignore"):
        p, s = pearson(a, b), pearson(rankdata(a, axis=1), rankdata(b, axis=1))
    return {"pearson": float(np.nanmean(p)) if not np.isnan(p).all() else None,
            "spearman": float(np.nanmean(s)) if not np.isnan(s).all() else None,
            "undefined_rows": int(np.isnan(p).sum())}


def length_order(dataset) -> np.ndarray:
    """Row order by longest choice, so that dynamically padded batches hold similar lengths."""
    return np.argsort([max(len(ids) for ids in row) for row in dataset["input_ids"]], kind="stable")


def run_config(name, model, tokenizer, raw_train, raw_queries, raw_queries_fast, args):
    half, pad, rank, factor_bs, query_bs, train_bs, sort = CONFIGS[name]
    train = tokenize(raw_train, tokenizer, pad_to_max_length=pad)
    queries = tokenize(raw_queries if rank < 0 else raw_queries_fast, tokenizer, pad_to_max_length=pad)
    train_order = length_order(train) if sort else np.arange(len(train))
    query_order = length_order(queries) if sort else np.arange(len(queries))
    train, queries = train.select(train_order), queries.select(query_order)
    options = argparse.Namespace(factor_strategy="ekfac", use_half_precision=half, query_gradient_rank=rank,
                                 damping_factor=1e-8)
    task = MultipleChoiceTask()
    analyzer = Analyzer(analysis_name=name, model=prepare_model(copy.deepcopy(model), task), task=task,
                        output_dir=str(args.work_dir), disable_tqdm=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=make_collator(tokenizer, pad)))
    factor_args, score_args = factor_arguments(options), score_arguments(options)
    per_pass = query_bs * (QUERY_GRADIENT_ACCUMULATION if rank > 0 else 1)  # queries per pass over the train set
    if len(queries) < per_pass:
        logger.warning("%s: %d queries fill only part of a %d-query pass; the query side is under-measured",
                       name, len(queries), per_pass)
    query_bs = min(query_bs, len(queries))
    stages = {
        "covariance": lambda: analyzer.fit_covariance_matrices("f", train, factor_args=factor_args,
                                                              per_device_batch_size=factor_bs, overwrite_output_dir=True),
        "eigendecomposition": lambda: analyzer.perform_eigendecomposition("f", factor_args=factor_args,
                                                                          overwrite_output_dir=True),
        "lambda": lambda: analyzer.fit_lambda_matrices("f", train, factor_args=factor_args,
                                                       per_device_batch_size=factor_bs, overwrite_output_dir=True),
        "scores": lambda: analyzer.compute_pairwise_scores("s", factors_name="f", query_dataset=queries,
                                                           train_dataset=train, per_device_query_batch_size=query_bs,
                                                           per_device_train_batch_size=train_bs, score_args=score_args,
                                                           overwrite_output_dir=True),
    }
    result = {"settings": {"use_half_precision": half, "pad_to_max_length": pad, "query_gradient_rank": rank,
                           "factor_batch_size": factor_bs, "query_batch_size": query_bs, "train_batch_size": train_bs,
                           "queries_per_train_pass": per_pass, "sorted_by_length": sort,
                           "num_queries_timed": len(queries)}}
    for stage, fn in stages.items():
        seconds, peak = timed(fn)
        result[stage] = {"seconds": round(seconds, 2), "peak_gib": round(peak, 2)}
        logger.info("%s %s: %.1f s, peak %.1f GiB", name, stage, seconds, peak)
    scale_train = REFERENCE_NUM_TRAIN / len(train)
    query_passes_full = -(-REFERENCE_NUM_QUERIES // per_pass)
    query_passes_here = -(-len(queries) // per_pass)
    result["full_scale_seconds"] = round(
        (result["covariance"]["seconds"] + result["lambda"]["seconds"]) * scale_train
        + result["eigendecomposition"]["seconds"]
        + result["scores"]["seconds"] * scale_train * query_passes_full / query_passes_here, 1)
    scores = torch.empty(len(queries), len(train))
    scores[np.ix_(query_order, train_order)] = analyzer.load_pairwise_scores("s")[SCORES_KEY].float().cpu()
    return result, scores  # rows and columns back in dataset order


def time_training(model, tokenizer, raw_train, steps: int, batch_size: int = 16) -> dict:
    """Seconds per fine-tuning step (bf16 autocast, dynamic padding) and one 50%-SWAG run extrapolated."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = copy.deepcopy(model).to(device).train()
    data = tokenize(raw_train, tokenizer)
    collator = make_collator(tokenizer)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True, collate_fn=collator, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.001)
    batches = list(loader)

    def step(batch):
        batch = {k: v.to(device) for k, v in batch.items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = torch.nn.functional.cross_entropy(
                model(**{k: v for k, v in batch.items() if k != "labels"}).logits.float(), batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for b in batches[:5]:
        step(b)
    seconds, peak = timed(lambda: [step(b) for b in batches[5:]])
    per_step = seconds / steps
    full_steps = 3 * (SWAG_HALF // batch_size)
    return {"seconds_per_step": round(per_step, 4), "batch_size": batch_size, "peak_gib": round(peak, 2),
            "retrain_50pct_swag_steps": full_steps, "retrain_50pct_swag_seconds": round(per_step * full_steps, 1)}


def main(argv=None):
    setup_logging()
    args = parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    tok = Path(args.tokenizer_dir)
    tokenizer = (RobertaTokenizerFast(vocab_file=str(tok / "vocab.json"), merges_file=str(tok / "merges.txt"),
                                      model_max_length=128)
                 if (tok / "merges.txt").is_file() and not (tok / "tokenizer.json").is_file()
                 else AutoTokenizer.from_pretrained(tok))
    raw = load_local_files(args.train_file, args.validation_file)
    raw_train = raw["train"].select(range(args.num_train))
    raw_queries = raw["validation"].select(range(args.num_queries))
    raw_queries_fast = raw["validation"].select(range(max(args.num_queries, args.num_fast_queries)))
    torch.manual_seed(0)
    size = {} if args.architecture == "roberta-base" else dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                                intermediate_size=64)
    model = AutoModelForMultipleChoice.from_config(RobertaConfig(vocab_size=len(tokenizer), max_position_embeddings=514,
                                                                 type_vocab_size=1, pad_token_id=tokenizer.pad_token_id,
                                                                 **size))
    results, scores = {}, {}
    for name in args.configs:
        results[name], scores[name] = run_config(name, model, tokenizer, raw_train, raw_queries, raw_queries_fast, args)
    if "reference_fp32" in scores:
        for name in scores:
            results[name]["vs_reference_fp32"] = per_query_correlations(scores[name][: args.num_queries],
                                                                        scores["reference_fp32"])
    out = {"configs": results,
           "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
           "torch": torch.__version__, "subset": {"num_train": args.num_train, "num_queries": args.num_queries},
           "full_scale": {"num_train": REFERENCE_NUM_TRAIN, "num_queries": REFERENCE_NUM_QUERIES},
           "command": "python benchmark.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])}
    for key, name in (("reference_fp32_full_scale_s", "reference_fp32"), ("reference_bf16_full_scale_s", "reference_bf16"),
                      ("fastest_full_scale_s", "fastest")):
        if name in results:
            out[key] = results[name]["full_scale_seconds"]
    if {"reference_bf16", "fastest"} <= set(results):
        out["speedup_vs_reference_bf16"] = round(out["reference_bf16_full_scale_s"] / out["fastest_full_scale_s"], 2)
    if "fastest" in results and "vs_reference_fp32" in results["fastest"]:
        out["mean_query_pearson_vs_fp32"] = results["fastest"]["vs_reference_fp32"]["pearson"]
    if args.train_steps:
        out["training"] = time_training(model, tokenizer, raw["train"].select(range(min(len(raw["train"]), 16 * (args.train_steps + 5)))),
                                        args.train_steps)
    write_json(args.output, out)
    logger.info("results in %s", args.output)
    print(json.dumps({k: v for k, v in out.items() if k != "configs"}, indent=1))
    return out


if __name__ == "__main__":
    main()
