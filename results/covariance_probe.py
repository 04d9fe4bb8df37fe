"""What bounds `--fast`'s covariance stage on a GPU: the stage (kronfluence's loop with the fast kernels) at each
factor batch size, timed, with the seconds the GPU spent in kernels (torch.profiler, CUDA activity) against the
wall clock, and the fast hooks' host and device seconds (utils.HookTimes). A busy share well below 1 means the host
(its Python per module and batch) bounds the stage, and larger batches, which amortise that Python over more rows,
run faster; near 1, the kernels bound it (the profiler's own host time lowers the share a little; kernels
overlapping on several streams could raise it). The roberta-base architecture (random weights), anetcap's real text through
the roberta-base BPE, as results/sync_probe.py; each batch size after a warm-up on its first batch.

    python results/covariance_probe.py OUT.json --tokenizer_dir ../shared/tokenizers/roberta-base \
        --data_dir ../shared/data/anetcap --num_train 8192 --factor_batch_sizes 256 512

Writes OUT.json: per factor batch size the seconds, rows a second, peak GiB, kernel seconds and busy share, the
hooks' parts, and the kernels with the most device seconds (--top_kernels).
"""
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.utils.dataset import DataLoaderKwargs
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from anetcap_roberta import anetcap_rows, driver_parser  # noqa: E402

from benchmark import load_tokenizer, random_roberta  # noqa: E402
from fast_kernels import fast_factor_kernels  # noqa: E402
from influence import AnalysisConfig, factor_stages  # noqa: E402
from pipeline import make_collator  # noqa: E402
from task import MultipleChoiceTask  # noqa: E402
from utils import HookTimes, configure_attention, loader_workers  # noqa: E402


def parse_args(argv=None):
    parser = driver_parser(__doc__, "output", num_train=8192, num_queries=1)
    parser.add_argument("--factor_batch_sizes", type=int, nargs="+", default=[256, 512],
                        help="the covariance stage's factor batch sizes to time, in turn")
    parser.add_argument("--top_kernels", type=int, default=30,
                        help="the profile's kernels (and copies) with the most device seconds to list, per batch size")
    return parser.parse_args(argv)


def kernel_seconds(prof) -> float:
    """The seconds of the CUDA kernels and copies the profile recorded (each event's own device time)."""
    return sum(e.self_device_time_total for e in prof.key_averages()) / 1e6


def top_kernels(prof, count: int) -> list:
    """The `count` profile entries with the most device seconds: name (cut to 120 characters), calls, seconds."""
    events = sorted(prof.key_averages(), key=lambda e: e.self_device_time_total, reverse=True)[:count]
    return [{"name": e.key[:120], "calls": e.count, "device_seconds": round(e.self_device_time_total / 1e6, 3)}
            for e in events if e.self_device_time_total > 0]


def main(argv=None):
    args = parse_args(argv)
    configure_attention()  # as analyze.py
    cuda = torch.cuda.is_available()
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train, _ = anetcap_rows(args, tokenizer)
    task = MultipleChoiceTask()
    model = prepare_model(random_roberta(tokenizer), task)
    analyzer = Analyzer(analysis_name="covariance", model=model, task=task, disable_tqdm=True, log_level=None,
                        output_dir=tempfile.mkdtemp(prefix="covariance_probe_"), cpu=not cuda)
    device = analyzer.state.device
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=make_collator(tokenizer),
                                                    num_workers=loader_workers(None, device), pin_memory=cuda))
    config = AnalysisConfig(use_half_precision=True, fp32_accumulation=True, fast=True, scoring="fused")
    factor_args = config.factor_arguments(len(train), len(train))
    out = {"gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"),
           "command": "python results/covariance_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "num_train": args.num_train, "batches": {}}
    for batch in args.factor_batch_sizes:
        times = HookTimes()
        with fast_factor_kernels(task.num_choices, times):
            warm = factor_stages(analyzer, "warm", train.select(range(min(batch, len(train)))), train, factor_args,
                                 overwrite=True)["covariance"]
            warm(batch)
            times.take()
            stage = factor_stages(analyzer, "f", train, train, factor_args, overwrite=True)["covariance"]
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            with profile(activities=[ProfilerActivity.CUDA] if cuda else [ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                stage(batch)
                if cuda:
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
        busy = kernel_seconds(prof) if cuda else None
        out["batches"][str(batch)] = {
            "seconds": round(seconds, 3), "rows_per_second": round(len(train) / seconds, 1),
            "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if cuda else None,
            "kernel_seconds": None if busy is None else round(busy, 3),
            "busy_share": None if busy is None else round(busy / seconds, 3), "hooks": times.take(),
            "top_kernels": top_kernels(prof, args.top_kernels) if cuda else []}
        print(batch, json.dumps({k: v for k, v in out["batches"][str(batch)].items() if k != "hooks"}), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
