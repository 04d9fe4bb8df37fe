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

import argparse
import dataclasses
import hashlib
import json
import logging
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorForMultipleChoice

from pipeline import (
    CHECKPOINTS_DIR,
    DEFAULT_MODEL,
    DEMO_MODEL,
    LDS_DIR,
    REMOVAL_DIR,
    Data,
    ArgumentParser,
    UserError,
    add_data_args,
    at_least,
    atomic_output,
    finish_interrupted_swaps,
    configure_attention,
    configure_cpu_threads,
    data_args_dict,
    file_sha256,
    load_pretrained,
    load_raw,
    make_collator,
    margins,
    model_logits,
    non_negative_float,
    positive_float,
    prepare_data,
    seed_value,
    read_json,
    require_labels,
    resolve_data_args,
    save_checkpoint,
    seed_everything,
    setup_logging,
)

logger = logging.getLogger(__name__)

DEMO_RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 10, "per_device_train_batch_size": 16}
RECIPE_NAMES = ["learning_rate", "weight_decay", "num_train_epochs", "seed", "lr_scheduler"]
RUN_FILE = "run_m{mask:04d}_r{repeat:02d}.safetensors"
REMOVAL_FULL_FILE = "removal_full.safetensors"  # the control: the same recipe and seed on every row
REMOVAL_FILE = "removal_q{query:04d}_{condition}.safetensors"  # condition: random, or top_<scores id>
COMPILE_MODES = ["dynamic", "cudagraphs"]
LENGTH_BUCKET = 16  # with CUDA graphs, one graph per padded length: lengths are rounded up to a multiple of this


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


def autocast(device: torch.device):
    """bf16 autocast on CUDA only: on CPU it is slower than fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_model(model, dataset, collator, args, seed: int, device: torch.device, accelerator=None,
                quiet: bool = False, evaluate_each_epoch=None):
    """The fine-tuning loop. With an `accelerate.Accelerator` the model and data are sharded over
    its processes (DDP); without one the model trains on `device` alone (LDS runs)."""
    generator = torch.Generator().manual_seed(seed)
    compile_mode = args.torch_compile
    if compile_mode == "cudagraphs":
        collator = bucketed(collator)
    # workers are restarted every epoch: persistent ones would skip the generator draw that a new epoch's
    # iterator makes, and so change the shuffle order from epoch 2 on. Pinned batches copy without waiting for
    # the GPU (a blocking copy would make every step wait for the previous one to finish).
    loader = DataLoader(dataset, batch_size=args.per_device_train_batch_size, shuffle=True, drop_last=True,
                        collate_fn=collator, generator=generator, num_workers=args.dataloader_num_workers,
                        pin_memory=device.type == "cuda")
    if accelerator is None:
        model.to(device)
    # fused: one kernel per step for all parameters instead of a dozen passes over them (same update)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    total = args.num_train_epochs * len(loader)
    if total == 0:
        raise UserError(f"{len(dataset)} training rows make no batch of {args.per_device_train_batch_size}; "
                        f"lower --per_device_train_batch_size")
    lr_lambda = (lambda step: 1.0) if args.lr_scheduler == "constant" else (lambda step: 1 - step / total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
    if accelerator is not None:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        device = accelerator.device
    forward = model  # the compiled module shares the model's weights
    if compile_mode == "dynamic":
        forward = torch.compile(model, dynamic=True)
    elif compile_mode == "cudagraphs":
        forward = torch.compile(model, mode="reduce-overhead")
    history = []
    for epoch in range(args.num_train_epochs):
        epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{args.num_train_epochs}", disable=quiet, leave=False):
            batch = to_device(batch, device)
            with autocast(device):
                logits = model_logits(forward, batch)
            loss = F.cross_entropy(logits.float(), batch["labels"])
            (accelerator.backward(loss) if accelerator is not None else loss.backward())
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach() * len(logits)
            correct += (logits.argmax(-1) == batch["labels"]).sum()
            seen += len(logits)
        record = {"epoch": epoch + 1, "train_loss": loss_sum.item() / seen, "train_accuracy": correct.item() / seen,
                  "epoch_seconds": time.perf_counter() - epoch_start}  # .item() waited for the GPU; before evaluation
        if evaluate_each_epoch is not None:
            record.update(evaluate_each_epoch(model))
        history.append(record)
        if not quiet:
            logger.info("epoch %d: %s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in record.items() if k != "epoch"))
    return (accelerator.unwrap_model(model) if accelerator is not None else model), history


@torch.no_grad()
def evaluate(model, dataset, collator, batch_size: int, device: torch.device) -> dict:
    """Loss, accuracy and per-query margins (the measurement of task.py) on a labelled split."""
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    all_margins, losses, hits = [], [], []
    for batch in loader:
        batch = to_device(batch, device)
        logits = model_logits(model, batch).float()  # fp32: bf16 would quantise the margins
        labels = batch["labels"]
        all_margins.append(margins(logits, labels).cpu())
        losses.append(F.cross_entropy(logits, labels, reduction="none").cpu())
        hits.append((logits.argmax(-1) == labels).cpu())
    model.train()
    return {"loss": torch.cat(losses).mean().item(), "accuracy": torch.cat(hits).float().mean().item(),
            "margins": torch.cat(all_margins)}


def recipe(args, effective_batch_size: int) -> dict:
    """What must agree between the full model and its retraining runs (the model by its folder name)."""
    return {"model": Path(os.path.normpath(str(args.model_name_or_path))).name,
            "effective_batch_size": effective_batch_size, **{n: str(getattr(args, n)) for n in RECIPE_NAMES}}


def settings_hash(args, fingerprint: dict) -> str:
    """Identifies data, recipe and subset size (or the removal test's fraction): runs with equal hashes belong to
    one experiment."""
    settings = {"data": fingerprint, "recipe": recipe(args, args.per_device_train_batch_size),
                **({"removal_fraction": args.removal_fraction} if args.removal_scores is not None
                   else {"subset_fraction": args.lds_subset_fraction})}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def lds_mask(num_train: int, fraction: float, seed: int, mask: int) -> torch.Tensor:
    """The boolean training subset of mask `mask`, identical for all its repeats."""
    rng = np.random.default_rng([seed, mask])
    chosen = rng.choice(num_train, size=round(fraction * num_train), replace=False)
    out = torch.zeros(num_train, dtype=torch.bool)
    out[torch.from_numpy(chosen)] = True
    return out


def read_run(path: Path):
    """Tensors and metadata of one run file, or None when it is unreadable (then it is redone)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        logger.warning("unreadable run file %s (%s); it will be redone", path, exc)
        return None


def process_rank():
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) otherwise."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))


def process_device(local_rank: Optional[int] = None) -> torch.device:
    """This process's device for independent runs: local ranks (torchrun's, or a forked worker's) share the visible
    GPUs round-robin (so several processes may share one GPU), made current so that pinned memory and CUDA state
    land on it."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = process_rank()[2] if local_rank is None else local_rank
    device = torch.device(f"cuda:{local_rank % torch.cuda.device_count()}")
    torch.cuda.set_device(device)
    return device


def bucketed(collator):
    """The collator with lengths rounded up to a multiple of LENGTH_BUCKET (one CUDA graph per length)."""
    return dataclasses.replace(collator, pad_to_multiple_of=LENGTH_BUCKET)


@dataclasses.dataclass
class Run:
    """One retraining run: the training rows it keeps, its seed, its file, and what its metadata says of it."""

    file: str
    keep: torch.Tensor  # bool, one per training row
    seed: int
    meta: dict


@dataclasses.dataclass
class LdsJob:
    """What every retraining run of one command shares: loaded once, before any worker is forked."""

    args: argparse.Namespace
    data: Data
    model: torch.nn.Module  # on the CPU until a run moves it
    initial_state: dict  # the weights every run starts from
    collator: DataCollatorForMultipleChoice
    settings_hash: str
    runs: list  # the Runs this command may do
    output_dir: Path


_FORKED_JOB: Optional[LdsJob] = None  # set before --lds_processes forks its workers, which inherit it


def lds_runs(args, data: Data) -> list:
    """The LDS runs: every mask's random subset, once per repeat, each repeat with a seed of its own."""
    runs = []
    for m in range(args.lds_num_masks):
        keep = lds_mask(len(data.train), args.lds_subset_fraction, args.seed, m)
        for r in range(args.lds_repeats):
            runs.append(Run(RUN_FILE.format(mask=m, repeat=r), keep,
                            int(np.random.default_rng([args.seed, m, r]).integers(2**31)),
                            {"mask": str(m), "repeat": str(r)}))
    return runs


def removal_runs(args, data: Data) -> list:
    """The removal test's runs, all with the full model's seed: every row (the control), then for each query
    every row but its top k proponents by the scores, and every row but k random ones (k = --removal_fraction of
    the rows). The random runs do not depend on the scores, so several score sets share them."""
    from analyze import load_scores

    scores, meta = load_scores(args.removal_scores)
    if meta is None or meta.get("data_fingerprint", {}).get("train") != data.fingerprint["train"]:
        raise UserError(f"{args.removal_scores} scores other training rows than these flags select (or has no "
                        f"metadata); pass the scores of the model trained with these data flags")
    num_queries = min(args.removal_num_queries, scores.shape[0])
    k = max(1, round(args.removal_fraction * len(data.train)))
    ident = removal_scores_id(args.removal_scores)
    everything = torch.ones(len(data.train), dtype=torch.bool)
    runs = [Run(REMOVAL_FULL_FILE, everything, args.seed, {"condition": "full"})]
    for q in range(num_queries):
        for condition, removed in (
                (f"top_{ident}", torch.argsort(scores[q], descending=True, stable=True)[:k]),
                ("random", torch.from_numpy(np.random.default_rng([args.seed, q]).choice(len(data.train), k,
                                                                                          replace=False)))):
            keep = everything.clone()
            keep[removed] = False
            runs.append(Run(REMOVAL_FILE.format(query=q, condition=condition), keep, args.seed,
                            {"condition": condition.split("_")[0], "query": str(q), "removed": str(k),
                             "scores": str(args.removal_scores)}))
    return runs


def removal_scores_id(scores_dir: Path) -> str:
    """A short name for a score set: the top runs of several score sets share one directory."""
    from analyze import SCORES_FILE

    path = Path(scores_dir) / SCORES_FILE if Path(scores_dir).is_dir() else Path(scores_dir)
    return file_sha256(path)[:10]


def run_lds(args) -> list:
    """Train the LDS (or removal-test) runs assigned to this process, itself or (--lds_processes N) in N forked
    workers that split them; returns the paths of the runs written."""
    rank, world, local = process_rank()
    raw = load_raw(args)
    model, tokenizer = load_pretrained(args.model_name_or_path, raw, seed=args.seed)
    data = prepare_data(args, tokenizer, raw)
    require_labels(data.queries)
    removal = args.removal_scores is not None
    runs = removal_runs(args, data) if removal else lds_runs(args, data)
    if args.lds_run_index is not None:
        if not 0 <= args.lds_run_index < len(runs):
            raise UserError(f"--lds_run_index {args.lds_run_index} is outside the {len(runs)} runs of this command")
        runs = [runs[args.lds_run_index]]
    job = LdsJob(args, data, model, {k: v.detach().clone() for k, v in model.state_dict().items()},
                 make_collator(tokenizer, args.pad_to_max_length, args.max_length),
                 settings_hash(args, data.fingerprint), runs,
                 Path(args.removal_output_dir if removal else args.lds_output_dir))
    n = min(args.lds_processes, len(runs))  # no worker without a run
    if n <= 1:
        return train_runs(job, rank, world, local)
    if torch.cuda.is_initialized():
        raise UserError("--lds_processes forks its workers before CUDA is set up, but this process has already "
                        "used CUDA; run train.py as a command of its own")
    # Forked workers start from this process's imports, model and tokenized data instead of loading their own
    # (most of a process's start-up). Nothing here has touched CUDA, so each worker can set it up for itself.
    global _FORKED_JOB
    _FORKED_JOB = job
    logger.info("forking %d workers for this process's runs", n)
    try:
        # n shares for n workers: a share waits only while every worker is busy (shares go by argument, not worker)
        with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("fork")) as pool:
            shares = [pool.submit(_forked_worker, rank * n + j, world * n, local * n + j) for j in range(n)]
            return [path for share in shares for path in share.result()]
    except BrokenProcessPool as exc:
        raise UserError(f"an LDS worker process died ({exc}), and the others were stopped; finished runs are kept "
                        f"(each file is written whole), rerun the command to do the rest (with fewer "
                        f"--lds_processes if memory ran out)") from None
    finally:
        _FORKED_JOB = None


def _forked_worker(rank: int, world: int, local: int) -> list:
    torch.set_num_threads(1)  # as DataLoader workers do: the parent's CPU thread pool does not survive a fork
    return train_runs(_FORKED_JOB, rank, world, local)


def train_runs(job: LdsJob, rank: int, world: int, local: int) -> list:
    """Train every world-th of the job's runs from the rank-th on, skipping finished ones."""
    args, data, model = job.args, job.data, job.model
    device = process_device(local)
    mine = job.runs[rank::world]
    out_dir = job.output_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    progress = tqdm(mine, desc=f"retraining runs (rank {rank}/{world})", position=rank)
    for run in progress:
        path = out_dir / run.file
        if path.exists():
            existing = read_run(path)
            if existing is not None:
                if existing[1].get("settings_hash") != job.settings_hash:
                    raise UserError(f"{path} was made with other data or training settings; "
                                    f"use another output directory or delete the old runs")
                continue
        start = time.time()
        model.load_state_dict(job.initial_state)
        subset = data.train.select(torch.nonzero(run.keep).flatten().tolist())
        seed_everything(run.seed)
        model, _ = train_model(model, subset, job.collator, args, seed=run.seed, device=device, quiet=True)
        result = evaluate(model, data.queries, job.collator, args.eval_batch_size, device)
        meta = {"settings_hash": job.settings_hash, "data": json.dumps(data.fingerprint),
                "recipe": json.dumps(recipe(args, args.per_device_train_batch_size)), **run.meta,
                "seed": str(run.seed), "accuracy": f"{result['accuracy']:.6f}",
                "seconds": f"{time.time() - start:.2f}", "started": f"{start:.2f}",  # started: Unix time
                "process": f"{rank}/{world}"}
        with atomic_output(path) as tmp:
            save_file({"mask": run.keep.to(torch.uint8), "margins": result["margins"].float()}, str(tmp),
                      metadata=meta)
        written.append(path)
        progress.set_postfix(accuracy=f"{result['accuracy']:.3f}", seconds=meta["seconds"])
    logger.info("rank %d wrote %d runs, skipped %d finished ones, in %s", rank, len(written),
                len(mine) - len(written), out_dir)
    return written


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
    model, history = train_model(model, data.train, collator, args, seed=args.seed, device=device,
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
    main()
