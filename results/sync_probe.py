"""Where `--fast`'s stages make the host wait for the GPU: the factor stages (kronfluence's loops with the fast kernels)
and the fused scores, run on one GPU under torch.cuda.set_sync_debug_mode("warn"), which warns at each operation that
synchronises (`.item()`, copies to the host, ...). A wait inside a batch stops the host from queueing the next kernels
while the GPU works; the GPU then idles while the host launches them. The roberta-base architecture (random weights),
anetcap's real text through the roberta-base BPE, as results/boundaries_paired.py.

    python results/sync_probe.py OUT.json --tokenizer_dir ../shared/tokenizers/roberta-base \
        --data_dir ../shared/data/anetcap --num_train 1024 --num_queries 64

Writes OUT.json: per stage its seconds, its batches and each place that synchronised (the Python stack's last frames
and how often), most frequent first.
"""
import json
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.utils.dataset import DataLoaderKwargs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from anetcap_roberta import anetcap_rows, driver_parser  # noqa: E402

import fused_scores  # noqa: E402
from benchmark import load_tokenizer, random_roberta  # noqa: E402
from fast_kernels import fast_factor_kernels  # noqa: E402
from influence import AnalysisConfig, factor_rows, factor_stages  # noqa: E402
from pipeline import make_collator  # noqa: E402
from task import MultipleChoiceTask  # noqa: E402
from utils import configure_attention  # noqa: E402

FACTOR_BATCH = 256  # analyze.py --fast's


def parse_args(argv=None):
    return driver_parser(__doc__, "output", num_train=1024, num_queries=64).parse_args(argv)


def synchronisations(fn) -> tuple:
    """(seconds, [{"count", "stack"}]) of fn() run with every synchronising CUDA operation reported."""
    sites = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchronizing" in str(message):
            frames = [f for f in traceback.extract_stack()[:-1] if Path(f.filename).name != "warnings.py"]
            sites[tuple(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in frames[-6:])] += 1

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        torch.cuda.synchronize()
        started = time.perf_counter()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
    return time.perf_counter() - started, [{"count": n, "stack": list(s)} for s, n in sites.most_common()]


def main(argv=None):
    args = parse_args(argv)
    configure_attention()  # as analyze.py
    device = torch.device("cuda")
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train, queries = anetcap_rows(args, tokenizer)
    collator, task = make_collator(tokenizer), MultipleChoiceTask()
    model = prepare_model(random_roberta(tokenizer), task).to(device)
    config = AnalysisConfig(use_half_precision=True, fp32_accumulation=True, fast=True, scoring="fused")
    analyzer = Analyzer(analysis_name="sync", model=model, task=task, output_dir="/tmp/sync_probe", disable_tqdm=True,
                        log_level=None)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator, pin_memory=True))
    covariance_rows, lambda_rows = factor_rows(train, config.lambda_rows)
    stages = factor_stages(analyzer, "f", covariance_rows, lambda_rows,
                           config.factor_arguments(len(covariance_rows), len(lambda_rows)), overwrite=True)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python results/sync_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "num_train": args.num_train, "num_queries": args.num_queries, "stages": {}}
    batches = -(-args.num_train // FACTOR_BATCH)
    with fast_factor_kernels(task.num_choices):
        for name, stage in stages.items():
            seconds, sites = synchronisations(lambda stage=stage: stage(FACTOR_BATCH))
            out["stages"][name] = {"seconds": round(seconds, 2), "batches": None if name == "eigendecomposition"
                                   else batches, "synchronisations": sum(s["count"] for s in sites), "sites": sites}
            print(name, out["stages"][name]["synchronisations"], flush=True)
    score_args = config.score_arguments()
    seconds, sites = synchronisations(lambda: fused_scores.fused_pairwise_scores(
        model, task, analyzer.load_all_factors("f"), "ekfac", score_args, queries, train, collator, 100, 128, device,
        disable_tqdm=True))
    out["stages"]["scores"] = {"seconds": round(seconds, 2), "synchronisations": sum(s["count"] for s in sites),
                               "sites": sites}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v["synchronisations"] for k, v in out["stages"].items()}), flush=True)


if __name__ == "__main__":
    main()
