"""Probe of the fused scoring's passes on one GPU: the roberta-base architecture (random weights), anetcap's real text
through the roberta-base BPE, identity preconditioning (the training side's work does not depend on the factors).

    python results/fused_pass_probe.py OUT_DIR --tokenizer_dir ROBERTA_DIR --data_dir ANETCAP_DIR --mode breakdown
    python results/fused_pass_probe.py OUT_DIR ... --mode planned --num_train 16384

`breakdown`: the top layer's 6 modules, every query in one pass: the pass as it is, then without the contraction
with the query gradients, then without the per-example gradients too (forward and backward alone), the DataLoader
alone and a forward alone; then a profile of 2,048 rows (top kernels, and by input shapes). `planned`: every module,
the passes planned from the free memory by fused_scores (plan_passes), then the same with the micro-batch the former
per-row estimate (7.3 query-gradient reads a training row a pass) chose. Writes OUT_DIR/fused_pass_probe_<mode>.json
(and the profile tables).
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from datasets import load_dataset
from kronfluence.analyzer import prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import fused_scores as fs  # noqa: E402
from benchmark import load_tokenizer, random_roberta  # noqa: E402
from influence import AnalysisConfig  # noqa: E402
from pipeline import make_collator, tokenize  # noqa: E402
from task import MultipleChoiceTask  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--tokenizer_dir", type=Path, required=True, help="roberta-base's vocab.json and merges.txt")
    parser.add_argument("--data_dir", type=Path, required=True, help="anetcap's train.csv.gz and validation.csv.gz")
    parser.add_argument("--mode", choices=["breakdown", "planned"], required=True)
    parser.add_argument("--num_train", type=int, default=8192, help="the first N training rows")
    parser.add_argument("--num_queries", type=int, default=2000, help="the first N validation rows")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers (analyze.py's default on a GPU)")
    return parser.parse_args(argv)


def former_cost(plan, lengths, num_queries, plan_queries=0):
    """The estimate fewer_passes used before the per-micro-batch floor: 7.3 query-gradient reads a row a pass."""
    spans = fs.micro_spans(lengths, max(len(lengths), 1), plan.train_micro, growth=plan.growth)
    return (fs.pass_count(plan, num_queries, plan_queries) * 7.3
            + max(num_queries, plan_queries) * len(spans) / max(len(lengths), 1))


def main(argv=None):
    args = parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_file = args.out_dir / f"fused_pass_probe_{args.mode}.json"
    device = torch.device("cuda")
    res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python results/fused_pass_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "num_train": args.num_train, "num_queries": args.num_queries, "runs": {}}
    tokenizer = load_tokenizer(args.tokenizer_dir)
    raw = load_dataset("csv", data_files={split: str(args.data_dir / f"{split}.csv.gz")
                                          for split in ("train", "validation")})
    train = tokenize(raw["train"].select(range(args.num_train)), tokenizer)
    queries = tokenize(raw["validation"].select(range(args.num_queries)), tokenizer)
    lengths = fs.row_lengths(train)
    res.update(mean_tokens_per_choice=round(float(lengths.mean()), 1), max_tokens_per_choice=int(lengths.max()))
    collator, task = make_collator(tokenizer), MultipleChoiceTask()
    model = prepare_model(random_roberta(tokenizer), task).to(device)
    every = fs.linear_module_names(model)
    top = [name for name in every if ".layer.11." in name]
    score_args = AnalysisConfig(use_half_precision=True, fp32_accumulation=True, fast=True).score_arguments()

    def run(label, rows=train, names=top, planned=False):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before, timings = torch.cuda.memory_stats(), {}
        started = time.perf_counter()
        fs.fused_pairwise_scores(model, task, {"identity": dict.fromkeys(names)}, "ekfac", score_args, queries, rows,
                                 collator, 100, 128, device, disable_tqdm=True, timings=timings, num_workers=args.workers,
                                 precondition=lambda name, gradient: gradient,
                                 max_queries_per_pass=0 if planned else len(queries))
        torch.cuda.synchronize()
        after = torch.cuda.memory_stats()
        spans = fs.micro_spans(fs.row_lengths(rows)[fs.order_of(fs.row_lengths(rows))], 128,
                               timings["train_micro_batch"], growth=timings["train_growth"])
        res["runs"][label] = {"wall_seconds": round(time.perf_counter() - started, 2),
                              **{k: (round(float(v), 3) if isinstance(v, (float, np.floating)) else v)
                                 for k, v in timings.items()},
                              "micro_batches_per_pass": len(spans), "modules": len(names),
                              "allocator_retries": after.get("num_alloc_retries", 0) - before.get("num_alloc_retries", 0),
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        print(label, res["runs"][label], flush=True)
        out_file.write_text(json.dumps(res, indent=1) + "\n")

    run("warm-up", rows=train.select(range(min(1024, len(train)))))
    if args.mode == "planned":
        run("planned", names=every, planned=True)
        estimate = fs.estimated_cost
        fs.estimated_cost = former_cost
        try:
            run("planned_former_estimate", names=every, planned=True)
        finally:
            fs.estimated_cost = estimate
        return
    run("pass")
    add_scores, gradient = fs.FusedScorer._add_scores, fs.PerExampleGradients.gradient
    fs.FusedScorer._add_scores = lambda self, name, weight, bias: None
    run("no_contraction")
    # no per-example gradients on the training side (the query side keeps its own: the training side's hook only)
    fs.PerExampleGradients.gradient = lambda self, a, g, has_bias: (
        gradient(self, a, g, has_bias) if self.callback.__name__ == "_keep_query" else (None, None))
    run("forward_backward_only")
    fs.FusedScorer._add_scores, fs.PerExampleGradients.gradient = add_scores, gradient
    scorer = fs.FusedScorer(model, task, {"identity": dict.fromkeys(top)}, "ekfac", score_args, collator, device,
                            args.workers, precondition=lambda name, gradient: gradient)
    rows, _ = scorer.sorted_rows(train)
    started = time.perf_counter()
    count = sum(1 for _ in scorer.train_batches(rows, 128, 128, "", True))
    res["runs"]["loader_only"] = {"wall_seconds": round(time.perf_counter() - started, 2), "micro_batches": count}
    started = time.perf_counter()
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        for _, _, batch in scorer.train_batches(rows, 128, 128, "", True):
            task.compute_train_loss({k: v.to(device, non_blocking=True) for k, v in batch.items()}, model)
    torch.cuda.synchronize()
    res["runs"]["forward_only"] = {"wall_seconds": round(time.perf_counter() - started, 2), "micro_batches": count}
    print(res["runs"]["loader_only"], res["runs"]["forward_only"], flush=True)
    out_file.write_text(json.dumps(res, indent=1) + "\n")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        run("profiled_2048_rows", rows=train.select(range(min(2048, len(train)))))
    (args.out_dir / "fused_pass_probe_kernels.txt").write_text(
        prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=100))
    (args.out_dir / "fused_pass_probe_shapes.txt").write_text(prof.key_averages(group_by_input_shape=True).table(
        sort_by="cuda_time_total", row_limit=40, max_name_column_width=50, max_shapes_column_width=150))
    res["runs"]["profiled_2048_rows"]["device_busy_seconds"] = round(
        sum(e.self_device_time_total for e in prof.key_averages()) / 1e6, 2)
    out_file.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
