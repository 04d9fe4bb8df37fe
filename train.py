"""Fine-tune a multiple-choice model on SWAG.

Fine-tune (kronfluence's recipe: AdamW, lr 1e-5, weight decay 0.001, batch 16, 3 epochs, seed 1004):

    python train.py --output_dir checkpoints/swag                       # roberta-base on SWAG (hub)
    python train.py --dataset demo                                     # tiny model, offline, CPU
    python train.py --model_name_or_path ../shared/models/all-MiniLM-L6-v2-fp16 \\
        --train_file ../shared/data/anetcap/train.csv.gz --validation_file ../shared/data/anetcap/validation.csv.gz \\
        --max_train_samples 4000 --num_queries 500 --learning_rate 5e-5 --per_device_train_batch_size 32 \\
        --output_dir checkpoints/anetcap
    torchrun --standalone --nproc-per-node=2 train.py ...               # DDP (or: accelerate launch train.py ...)
    python train.py ... --torch_compile cudagraphs --dataloader_num_workers 2   # CUDA graphs per length bucket (GPU)
    python train.py ... --output_dir checkpoints/s1 --save_epochs   # also checkpoints/s1_epoch1, s1_epoch2, ...

The retraining runs of the LDS ground truth and the removal test are retrain.py's.
"""

import logging
import time
import uuid
from pathlib import Path

import torch

from formats import CHECKPOINTS_DIR, epoch_checkpoint_dir
from pipeline import (
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
    TrainingRecipe,
    add_recipe_args,
    evaluate,
    recipe,
    resolve_recipe_args,
    train_model,
)
from utils import (
    ArgumentParser,
    UserError,
    configure_attention,
    configure_cpu_threads,
    finish_interrupted_swaps,
    run_script,
    seed_everything,
    setup_logging,
)

logger = logging.getLogger(__name__)



def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_data_args(parser)
    add_recipe_args(parser)
    parser.add_argument("--output_dir", type=Path, default=None,
                        help=f"Where the checkpoint goes (default {CHECKPOINTS_DIR}/<dataset>).")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace an existing checkpoint in --output_dir, and with --save_epochs its epoch "
                             "checkpoints (without it, train.py refuses).")
    parser.add_argument("--save_epochs", action="store_true",
                        help="Also keep the model after each earlier epoch, as checkpoints beside --output_dir "
                             "(<output_dir>_epoch1, ...; a checkpoint ensemble: analyze each, then analyze.py "
                             "--combine). The final model is the same with or without it.")
    args = resolve_recipe_args(resolve_data_args(parser.parse_args(argv)))
    if args.save_epochs and args.num_train_epochs < 2:
        parser.error("--save_epochs keeps the epochs before the last, and one epoch has none; drop it or train longer")
    args.output_dir = args.output_dir or CHECKPOINTS_DIR / args.dataset
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

    epoch_states = []  # with --save_epochs: the weights after each epoch but the last, on the CPU (main process)

    def validate(m):
        """Loss and accuracy on the queries, each rank evaluating its own share (and the epoch's weights kept)."""
        if args.save_epochs and accelerator.is_main_process and len(epoch_states) < args.num_train_epochs - 1:
            epoch_states.append({k: v.detach().to("cpu", copy=True)
                                 for k, v in accelerator.unwrap_model(m).state_dict().items()})
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
        model = model.to("cpu")
        training_args["run_id"] = uuid.uuid4().hex  # shared by the final checkpoint and its epoch checkpoints
        try:
            save_epoch_checkpoints(model, tokenizer, args, epoch_states, training_args, metrics)
        finally:  # the final model is written even if an epoch checkpoint could not be
            save_checkpoint(model, tokenizer, Path(args.output_dir), training_args, metrics,
                            overwrite=args.overwrite_output_dir)
        logger.info("validation accuracy %.4f; checkpoint in %s", history[-1]["validation_accuracy"], args.output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return history[-1]


def save_epoch_checkpoints(model, tokenizer, args, epoch_states: list, training_args: dict, metrics: dict) -> None:
    """--save_epochs: the weights after each earlier epoch as checkpoints of their own (with the final one's
    run_id), written before the final one; `model` is left with its own (final) weights, whatever happens."""
    if not epoch_states:
        return
    final_state = {k: v.clone() for k, v in model.state_dict().items()}
    history = metrics["history"]
    try:
        for epoch, state in enumerate(epoch_states, 1):
            model.load_state_dict(state)
            save_checkpoint(model, tokenizer, epoch_checkpoint_dir(Path(args.output_dir), epoch),
                            {**training_args, "epoch": epoch},
                            {**history[epoch - 1], "history": history[:epoch],
                             "num_processes": metrics["num_processes"],
                             "effective_batch_size": metrics["effective_batch_size"]},
                            overwrite=args.overwrite_output_dir)
    finally:
        model.load_state_dict(final_state)


def check_output_dir(args) -> None:
    """Refuse before any work to replace a checkpoint (Hugging Face's --overwrite_output_dir convention)."""
    out = Path(args.output_dir)
    epochs = range(1, args.num_train_epochs) if args.save_epochs else []
    for path in [*(epoch_checkpoint_dir(out, epoch) for epoch in epochs), out]:
        finish_interrupted_swaps(path)  # a checkpoint whose swap a kill interrupted is still a checkpoint
        if path.exists() and (not path.is_dir() or any(path.iterdir())) and not args.overwrite_output_dir:
            raise UserError(f"{path} already holds a checkpoint (or other files); pass --overwrite_output_dir to "
                            f"replace it, or choose another --output_dir")


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    configure_cpu_threads()
    configure_attention()
    check_output_dir(args)
    return run_finetune(args)


if __name__ == "__main__":
    run_script(main)
