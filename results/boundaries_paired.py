"""Paired timing of the fused scoring's passes on one GPU, with and without the layer-output gradients kept between
module groups (fused_scores.BoundaryGradients): the roberta-base architecture (random weights), anetcap's real text
through the roberta-base BPE, every module, the passes planned from the free memory, identity preconditioning (the
training side's work does not depend on the factors). Both runs in one process, after a warm-up.

    python results/boundaries_paired.py OUT_DIR --tokenizer_dir ../shared/tokenizers/roberta-base \
        --data_dir ../shared/data/anetcap --num_train 16384 --num_queries 2000

Writes OUT_DIR/boundaries_paired.json: each run's seconds (wall, query side, training passes), plan and peak
memory, and how far the two score matrices are apart (bitwise equal, the largest difference over the largest
score, metrics.per_query_correlations).
"""
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from kronfluence.analyzer import prepare_model

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from anetcap_roberta import anetcap_rows, driver_parser  # noqa: E402

import fused_scores  # noqa: E402
from benchmark import load_tokenizer, random_roberta  # noqa: E402
from influence import AnalysisConfig  # noqa: E402
from metrics import per_query_correlations  # noqa: E402
from pipeline import make_collator  # noqa: E402
from task import MultipleChoiceTask  # noqa: E402
from utils import configure_attention, loader_workers  # noqa: E402


def parse_args(argv=None):
    return driver_parser(__doc__, "out_dir", num_train=16384, num_queries=2000).parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    configure_attention()  # as analyze.py
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out_file = args.out_dir / "boundaries_paired.json"
    device = torch.device("cuda")
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train, queries = anetcap_rows(args, tokenizer)
    collator, task = make_collator(tokenizer), MultipleChoiceTask()
    model = prepare_model(random_roberta(tokenizer), task).to(device)
    names = fused_scores.linear_module_names(model)
    score_args = AnalysisConfig(use_half_precision=True, fp32_accumulation=True, fast=True).score_arguments()
    workers = loader_workers(None, device)
    res = {"gpu": torch.cuda.get_device_name(), "cpu_cores": os.cpu_count(), "torch": torch.__version__,
           "transformers": transformers.__version__, "kronfluence": importlib.metadata.version("kronfluence"),
           "date": time.strftime("%Y-%m-%d"),
           "command": "python results/boundaries_paired.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "num_train": args.num_train, "num_queries": args.num_queries, "dataloader_workers": workers, "runs": {}}

    def run(label, rows, boundaries):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        timings, started = {}, time.perf_counter()
        scores = fused_scores.fused_pairwise_scores(
            model, task, {"identity": dict.fromkeys(names)}, "ekfac", score_args, queries, rows, collator, 100, 128,
            device, disable_tqdm=True, timings=timings, num_workers=workers,
            precondition=lambda name, gradient: gradient, boundaries=boundaries)
        torch.cuda.synchronize()
        res["runs"][label] = {"boundaries": boundaries, "wall_seconds": round(time.perf_counter() - started, 2),
                              **{k: (round(float(v), 3) if isinstance(v, (float, np.floating)) else v)
                                 for k, v in timings.items()},
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)}
        print(label, res["runs"][label], flush=True)
        out_file.write_text(json.dumps(res, indent=1) + "\n")
        return scores

    run("warm-up", train.select(range(min(1024, len(train)))), True)
    from_loss = run("from_the_loss", train, False)
    kept = run("boundaries", train, True)
    res["agreement"] = {"bitwise_equal": bool(torch.equal(kept, from_loss)),
                        "max_difference_over_max_score": float((kept - from_loss).abs().max() / from_loss.abs().max()),
                        **per_query_correlations(kept, from_loss)}
    res["train_seconds_ratio"] = round(res["runs"]["boundaries"]["train_seconds"]
                                       / res["runs"]["from_the_loss"]["train_seconds"], 3)
    print(res["agreement"], res["train_seconds_ratio"], flush=True)
    out_file.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
