"""Fine-tune a multiple-choice model on SWAG, and run the LDS retraining runs.

Fine-tune (kronfluence's recipe: AdamW, lr 1e-5, weight decay 0.001, batch 16, 3 epochs, seed 1004):

    python train.py --output_dir checkpoints/swag                       # roberta-base on SWAG (hub)
    python train.py --dataset demo                                     # tiny model, offline, CPU
    python train.py --model_name_or_path ../shared/models/all-MiniLM-L6-v2-fp16 \\
        --train_file ../shared/data/anetcap/train.csv.gz --validation_file ../shared/data/anetcap/validation.csv.gz \\
        --max_train_samples 4000 --num_queries 500 --learning_rate 5e-5 --per_device_train_batch_size 32 \\
        --output_dir checkpoints/anetcap
    torchrun --standalone --nproc-per-node=2 train.py ...               # DDP (or: accelerate launch train.py ...)
    python train.py ... --torch_compile cudagraphs --dataloader_num_workers 2   # CUDA graphs per length bucket (GPU)

LDS ground truth: models retrained from the same initial weights on random halves of the training
set. Give the same data and recipe flags as the full model, plus:

    python train.py --dataset demo --lds_num_masks 100 --lds_repeats 1 --lds_subset_fraction 0.5 \\
        --lds_output_dir lds/demo
    torchrun --standalone --nproc-per-node=2 train.py ... --lds_num_masks 100   # runs split over ranks
    python train.py ... --lds_num_masks 100 --lds_processes 16          # or over 16 workers forked after loading
    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc-per-node=4 train.py ... --lds_num_masks 100 \\
        --torch_compile cudagraphs --dataloader_num_workers 2           # 4 runs sharing one GPU
    sbatch --array=0-99 --wrap "python train.py ... --lds_run_index \\$SLURM_ARRAY_TASK_ID"

Each run writes one file, atomically; finished runs are skipped when the command is rerun.
"""

import logging
import os
import time
from pathlib import Path

import torch

from formats import CHECKPOINTS_DIR, LDS_DIR, REMOVAL_DIR
from pipeline import (
    DEFAULT_MODEL,
    DEMO_MODEL,
    add_data_args,
    data_args_dict,
    load_pretrained,
    load_raw,
    make_collator,
    prepare_data,
    require_labels,
    resolve_data_args,
    save_checkpoint,
)
from training import (
    COMPILE_MODES,
    LENGTH_BUCKET,
    TrainingRecipe,
    evaluate,
    recipe,
    run_lds,
    train_model,
)
from utils import (
    ArgumentParser,
    UserError,
    at_least,
    configure_attention,
    configure_cpu_threads,
    finish_interrupted_swaps,
    non_negative_float,
    positive_float,
    run_script,
    seed_everything,
    seed_value,
    setup_logging,
)

logger = logging.getLogger(__name__)

DEMO_RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 10, "per_device_train_batch_size": 16}


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_data_args(parser)
    parser.add_argument("--model_name_or_path", default=None,
                        help=f"Hub id or local directory (default {DEFAULT_MODEL}; {DEMO_MODEL} for --dataset demo).")
    parser.add_argument("--output_dir", type=Path, default=None,
                        help=f"Where the checkpoint goes (default {CHECKPOINTS_DIR}/<dataset>).")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace an existing checkpoint in --output_dir (without it, train.py refuses).")
    parser.add_argument("--learning_rate", type=positive_float, default=None,
                        help=f"AdamW learning rate (default 1e-5; {DEMO_RECIPE['learning_rate']} for the demo).")
    parser.add_argument("--weight_decay", type=non_negative_float, default=0.001, help="AdamW weight decay (>= 0).")
    parser.add_argument("--per_device_train_batch_size", type=at_least(1), default=None,
                        help="Examples per optimizer step on each device (default 16).")
    parser.add_argument("--num_train_epochs", type=at_least(1), default=None,
                        help=f"Epochs (default 3; {DEMO_RECIPE['num_train_epochs']} for the demo).")
    parser.add_argument("--lr_scheduler", choices=["constant", "linear"], default="constant",
                        help="constant (kronfluence's recipe) or linear decay to 0.")
    parser.add_argument("--eval_batch_size", type=at_least(1), default=64, help="Examples per evaluation batch.")
    parser.add_argument("--torch_compile", nargs="?", const="dynamic", choices=COMPILE_MODES, default=None,
                        help="Compile the training forward/backward with torch.compile: 'dynamic' (the bare flag; "
                             "dynamic shapes) or 'cudagraphs' (mode reduce-overhead: CUDA graphs replayed per "
                             f"padded length, training batches padded to a multiple of {LENGTH_BUCKET} tokens). "
                             "GPU only in effect; see the README for measured step times.")
    parser.add_argument("--dataloader_num_workers", type=at_least(0), default=0,
                        help="Worker processes that collate training batches (the batches and their order are the "
                             "same for any value).")
    parser.add_argument("--seed", type=seed_value, default=1004, help="Seeds the head initialisation and data order.")
    lds = parser.add_argument_group("LDS retraining runs")
    lds.add_argument("--lds_num_masks", type=at_least(1), default=None,
                     help="Number of random training subsets: given, train.py does the retraining runs instead of "
                          "fine-tuning.")
    lds.add_argument("--lds_repeats", type=at_least(1), default=1, help="Retraining seeds per subset.")
    lds.add_argument("--lds_subset_fraction", type=float, default=0.5, help="Fraction of the training set per subset.")
    lds.add_argument("--lds_output_dir", type=Path, default=None, help=f"Run files (default {LDS_DIR}/<dataset>).")
    lds.add_argument("--lds_processes", type=at_least(1), default=1,
                     help="Worker processes this command forks once it has loaded the model and data; they split "
                          "its runs and share the visible GPUs round-robin. Several runs per GPU without each "
                          "process paying the imports and tokenizing (an alternative to torchrun's "
                          "--nproc-per-node on one host; combined with torchrun, each rank forks its own).")
    lds.add_argument("--lds_run_index", type=at_least(0), default=None,
                     help="Do only this run (mask-major: index = mask * repeats + repeat); "
                          "defaults to $SLURM_ARRAY_TASK_ID when set.")
    removal = parser.add_argument_group("Removal test (retrain without each query's top proponents)")
    removal.add_argument("--removal_scores", type=Path, default=None, metavar="SCORES_DIR",
                         help="Scores (analyze.py) of the model these flags train: given, train.py retrains from the "
                              "same initial weights without each query's top proponents, and without as many random "
                              "rows, instead of fine-tuning (--lds_processes and --lds_run_index apply).")
    removal.add_argument("--removal_num_queries", type=at_least(1), default=50, help="Queries tested (the first N).")
    removal.add_argument("--removal_fraction", type=float, default=0.05,
                         help="Training rows removed per run, as a fraction of the training set.")
    removal.add_argument("--removal_output_dir", type=Path, default=None,
                         help=f"Run files (default {REMOVAL_DIR}/<dataset>); several score sets may share one.")
    args = parser.parse_args(argv)
    args = resolve_data_args(args)
    demo = args.dataset == "demo"
    args.model_name_or_path = args.model_name_or_path or (DEMO_MODEL if demo else DEFAULT_MODEL)
    for name, default in (("learning_rate", 1e-5), ("num_train_epochs", 3), ("per_device_train_batch_size", 16)):
        if getattr(args, name) is None:
            setattr(args, name, DEMO_RECIPE[name] if demo else default)
    args.output_dir = args.output_dir or CHECKPOINTS_DIR / args.dataset
    args.lds_output_dir = args.lds_output_dir or LDS_DIR / args.dataset
    args.removal_output_dir = args.removal_output_dir or REMOVAL_DIR / args.dataset
    if args.exclude_rows is not None and (args.removal_scores is not None or args.lds_num_masks is not None):
        parser.error("--exclude_rows applies to fine-tuning; the LDS and removal runs choose their own rows")
    if args.removal_scores is not None and args.lds_num_masks is not None:
        parser.error("--removal_scores and --lds_num_masks start different retraining runs; give one")
    if not 0 < args.removal_fraction < 1:
        parser.error(f"argument --removal_fraction: must lie in (0, 1), got {args.removal_fraction}")
    removal_only = [f"--{name}" for name in ("removal_num_queries", "removal_fraction")
                    if getattr(args, name) != parser.get_default(name)]
    if args.removal_scores is None and removal_only:
        parser.error(f"{', '.join(removal_only)} only apply to the removal test; add --removal_scores SCORES_DIR")
    if not 0 < args.lds_subset_fraction < 1:
        parser.error(f"argument --lds_subset_fraction: must lie in (0, 1), got {args.lds_subset_fraction}")
    lds_only = [f"--{name}" for name in ("lds_repeats", "lds_processes", "lds_run_index", "lds_subset_fraction")
                if getattr(args, name) != parser.get_default(name)
                and not (args.removal_scores is not None and name in ("lds_processes", "lds_run_index"))]
    if args.lds_num_masks is None and lds_only:
        parser.error(f"{', '.join(lds_only)} only apply to the LDS runs; add --lds_num_masks N")
    if args.lds_run_index is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        args.lds_run_index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    return args


def run_finetune(args):
    from accelerate import Accelerator, DataLoaderConfiguration

    # cpu: without it accelerate ignores torchrun on a CPU-only machine, and every process trains alone
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              dataloader_config=DataLoaderConfiguration(non_blocking=True))  # see train_model
    device = accelerator.device
    raw = load_raw(args)
    model, tokenizer = load_pretrained(args.model_name_or_path, raw, seed=args.seed)
    data = prepare_data(args, tokenizer, raw)
    collator = make_collator(tokenizer, args.pad_to_max_length, args.max_length)
    seed_everything(args.seed)
    world = accelerator.num_processes
    logger.info("fine-tuning %s on %d rows: %d process(es) × batch %d = effective batch %d, %d epochs, lr %g",
                args.model_name_or_path, len(data.train), world, args.per_device_train_batch_size,
                world * args.per_device_train_batch_size, args.num_train_epochs, args.learning_rate)

    require_labels(data.queries)
    rank, n = accelerator.process_index, len(data.queries)
    share = data.queries.select(range(rank * n // world, (rank + 1) * n // world))  # contiguous, maybe empty
    logger.info("rank %d validates %d of %d queries", rank, len(share), n)

    def validate(m):
        """Loss and accuracy on the queries, each rank evaluating its own share."""
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # loss sum, correct, count
        if len(share):
            result = evaluate(accelerator.unwrap_model(m), share, collator, args.eval_batch_size, device)
            totals += torch.tensor([result["loss"], result["accuracy"], 1.0], dtype=torch.float64,
                                   device=device) * len(share)
        loss, correct, count = accelerator.reduce(totals, reduction="sum").tolist()
        return {"validation_loss": loss / count, "validation_accuracy": correct / count}

    accelerator.wait_for_everyone()  # start the clock together: a rank may still be loading (and NCCL sets up here)
    start = time.time()
    model, history = train_model(model, data.train, collator, TrainingRecipe.from_args(args), seed=args.seed, device=device,
                                 accelerator=accelerator, quiet=not accelerator.is_main_process,
                                 evaluate_each_epoch=validate)
    if accelerator.is_main_process:
        metrics = {**history[-1], "history": history, "train_seconds": time.time() - start,
                   "train_loop_seconds": sum(h["epoch_seconds"] for h in history),  # without the evaluations
                   "num_processes": world, "effective_batch_size": world * args.per_device_train_batch_size,
                   "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        training_args = {"data": data_args_dict(args), "data_fingerprint": data.fingerprint,
                         "recipe": recipe(args, world * args.per_device_train_batch_size),
                         "label_noise_rows": data.corrupted_rows, "excluded_rows": data.excluded_rows,
                         **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
        save_checkpoint(model.to("cpu"), tokenizer, Path(args.output_dir), training_args, metrics,
                        overwrite=args.overwrite_output_dir)
        logger.info("validation accuracy %.4f; checkpoint in %s", history[-1]["validation_accuracy"], args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return history[-1]


def check_output_dir(args) -> None:
    """Refuse before any work to replace a checkpoint (Hugging Face's --overwrite_output_dir convention)."""
    out = Path(args.output_dir)
    finish_interrupted_swaps(out)  # a checkpoint whose swap a kill interrupted is still a checkpoint
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.overwrite_output_dir:
        raise UserError(f"{out} already holds a checkpoint (or other files); pass --overwrite_output_dir to replace "
                        f"it, or choose another --output_dir")


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    configure_cpu_threads()
    configure_attention()
    if args.lds_num_masks is not None or args.removal_scores is not None:
        return run_lds(args)
    check_output_dir(args)
    return run_finetune(args)


if __name__ == "__main__":
    run_script(main)
