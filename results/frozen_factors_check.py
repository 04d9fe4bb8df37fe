"""`--fast`'s factor stages with and without parameter gradients (fast_kernels.input_gradients_only) on one GPU: the
covariance and lambda factors must be the same bits (the same outputs and output gradients under bf16 autocast),
and the seconds of each stage show what the weight-gradient matmuls cost. The roberta-base architecture (random
weights), anetcap's real text through the roberta-base BPE, as results/sync_probe.py; after a warm-up the two sides
take turns, twice, with the same seeds.

    python results/frozen_factors_check.py OUT.json --tokenizer_dir ../shared/tokenizers/roberta-base \
        --data_dir ../shared/data/anetcap --num_train 16384

Writes OUT.json: per side and turn the seconds of each stage, and whether every factor of every module is bitwise
equal (the second turn's).
"""
import json
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.utils.dataset import DataLoaderKwargs

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from anetcap_roberta import anetcap_rows, driver_parser  # noqa: E402

from benchmark import load_tokenizer, random_roberta  # noqa: E402
from fast_kernels import fast_factor_kernels, input_gradients_only  # noqa: E402
from influence import AnalysisConfig, factor_rows, factor_stages, stage_seed  # noqa: E402
from pipeline import make_collator  # noqa: E402
from task import MultipleChoiceTask  # noqa: E402
from utils import configure_attention  # noqa: E402

FACTOR_BATCH = 256  # analyze.py --fast's


def parse_args(argv=None):
    return driver_parser(__doc__, "output", num_train=16384, num_queries=1).parse_args(argv)


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def fit(analyzer, model, name: str, train, frozen: bool) -> tuple:
    """({stage: seconds}, {factor: {module: tensor}}) of the three stages under `name`."""
    config = AnalysisConfig(use_half_precision=True, fp32_accumulation=True, fast=True, scoring="fused")
    covariance_rows, lambda_rows = factor_rows(train, config.lambda_rows)
    stages = factor_stages(analyzer, name, covariance_rows, lambda_rows,
                           config.factor_arguments(len(covariance_rows), len(lambda_rows)), overwrite=True)
    seconds = {}
    with fast_factor_kernels(4), input_gradients_only(model) if frozen else nullcontext():
        for stage, run in stages.items():
            torch.manual_seed(stage_seed(0, stage))
            synchronize()
            started = time.perf_counter()
            run(FACTOR_BATCH)
            synchronize()
            seconds[stage] = round(time.perf_counter() - started, 3)
    factors = {**analyzer.load_covariance_matrices(name), **analyzer.load_lambda_matrices(name)}
    return seconds, factors


def main(argv=None):
    args = parse_args(argv)
    configure_attention()  # as analyze.py
    tokenizer = load_tokenizer(args.tokenizer_dir)
    train, _ = anetcap_rows(args, tokenizer)
    task = MultipleChoiceTask()
    model = prepare_model(random_roberta(tokenizer), task)
    analyzer = Analyzer(analysis_name="frozen", model=model, task=task, output_dir="/tmp/frozen_factors_check",
                        disable_tqdm=True, log_level=None, cpu=not torch.cuda.is_available())
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=make_collator(tokenizer), pin_memory=True))
    warmup = train.select(range(min(FACTOR_BATCH, len(train))))
    fit(analyzer, model, "warmup", warmup, frozen=True)
    fit(analyzer, model, "warmup", warmup, frozen=False)
    runs = {f"{side} {turn}": fit(analyzer, model, side, train, frozen=side == "frozen")
            for turn in (1, 2) for side in ("trainable", "frozen")}  # taking turns: drift hits both sides alike
    (_, trainable), (_, frozen) = runs["trainable 2"], runs["frozen 2"]
    differing = [f"{factor} {module}" for factor, modules in trainable.items() for module, tensor in modules.items()
                 if not torch.equal(frozen[factor][module], tensor)]
    out = {"gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d"),
           "command": "python results/frozen_factors_check.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "num_train": args.num_train, "factor_batch_size": FACTOR_BATCH,
           "seconds": {side: seconds for side, (seconds, _) in runs.items()},
           "factors_compared": sum(len(modules) for modules in trainable.values()),
           "bitwise_equal": not differing, "differing": differing[:10]}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1), flush=True)


if __name__ == "__main__":
    main()
