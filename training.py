"""Fine-tuning and retraining: the training loop, evaluation, the recipe that identifies a model, and the
retraining runs of the LDS ground truth and the removal test (each run one file, resumable, split over ranks or
forked workers). train.py and retrain.py are the command lines over it."""

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
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import DataCollatorForMultipleChoice

from formats import (
    REMOVAL_FILE,
    REMOVAL_FULL_FILE,
    RUN_FILE,
    load_scores,
    read_run,
    removal_scores_id,
)
from pipeline import (
    DEFAULT_MODEL,
    DEMO_MODEL,
    Data,
    load_pretrained,
    load_raw,
    make_collator,
    margins,
    model_logits,
    prepare_data,
    require_labels,
)
from utils import (
    UserError,
    at_least,
    atomic_output,
    non_negative_float,
    positive_float,
    process_device,
    process_rank,
    seed_everything,
    seed_value,
)

logger = logging.getLogger(__name__)


DEMO_RECIPE = {"learning_rate": 1e-3, "num_train_epochs": 10, "per_device_train_batch_size": 16}


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    """The model and training-recipe flags of train.py and retrain.py: a retraining run must be trained as the
    model it stands in for."""
    group = parser.add_argument_group("model and training recipe")
    group.add_argument("--model_name_or_path", default=None,
                       help=f"Hub id or local directory (default {DEFAULT_MODEL}; {DEMO_MODEL} for --dataset demo).")
    group.add_argument("--learning_rate", type=positive_float, default=None,
                       help=f"AdamW learning rate (default 1e-5; {DEMO_RECIPE['learning_rate']} for the demo).")
    group.add_argument("--weight_decay", type=non_negative_float, default=0.001, help="AdamW weight decay (>= 0).")
    group.add_argument("--per_device_train_batch_size", type=at_least(1), default=None,
                       help="Examples per optimizer step on each device (default 16).")
    group.add_argument("--num_train_epochs", type=at_least(1), default=None,
                       help=f"Epochs (default 3; {DEMO_RECIPE['num_train_epochs']} for the demo).")
    group.add_argument("--lr_scheduler", choices=["constant", "linear"], default="constant",
                       help="constant (kronfluence's recipe) or linear decay to 0.")
    group.add_argument("--eval_batch_size", type=at_least(1), default=64, help="Examples per evaluation batch.")
    group.add_argument("--torch_compile", nargs="?", const="dynamic", choices=COMPILE_MODES, default=None,
                       help="Compile the training forward/backward with torch.compile: 'dynamic' (the bare flag; "
                            "dynamic shapes) or 'cudagraphs' (mode reduce-overhead: CUDA graphs replayed per "
                            f"padded length, training batches padded to a multiple of {LENGTH_BUCKET} tokens). "
                            "GPU only in effect; see the README for measured step times.")
    group.add_argument("--dataloader_num_workers", type=at_least(0), default=0,
                       help="Worker processes that collate training batches (the batches and their order are the "
                            "same for any value).")
    group.add_argument("--seed", type=seed_value, default=1004, help="Seeds the head initialisation and data order.")


def resolve_recipe_args(args: argparse.Namespace) -> argparse.Namespace:
    """The model and recipe defaults, which differ for the demo (after `resolve_data_args`)."""
    demo = args.dataset == "demo"
    args.model_name_or_path = args.model_name_or_path or (DEMO_MODEL if demo else DEFAULT_MODEL)
    for name, default in (("learning_rate", 1e-5), ("num_train_epochs", 3), ("per_device_train_batch_size", 16)):
        if getattr(args, name) is None:
            setattr(args, name, DEMO_RECIPE[name] if demo else default)
    return args


@dataclasses.dataclass(frozen=True)
class TrainingRecipe:
    """The training loop's settings (the flags of the same names of train.py and retrain.py)."""

    learning_rate: float = 1e-5
    weight_decay: float = 0.001
    per_device_train_batch_size: int = 16
    num_train_epochs: int = 3
    lr_scheduler: str = "constant"  # or "linear" decay to 0
    torch_compile: Optional[str] = None  # None, or one of COMPILE_MODES
    dataloader_num_workers: int = 0

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "TrainingRecipe":
        return cls(**{field.name: getattr(args, field.name) for field in dataclasses.fields(cls)})

RECIPE_NAMES = ["learning_rate", "weight_decay", "num_train_epochs", "seed", "lr_scheduler"]

COMPILE_MODES = ["dynamic", "cudagraphs"]

LENGTH_BUCKET = 16  # with CUDA graphs, one graph per padded length: lengths are rounded up to a multiple of this


def autocast(device: torch.device):
    """bf16 autocast on CUDA only: on CPU it is slower than fp32."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def train_model(model, dataset, collator, recipe: TrainingRecipe, seed: int, device: torch.device, accelerator=None,
                quiet: bool = False, evaluate_each_epoch=None):
    """The fine-tuning loop. With an `accelerate.Accelerator` the model and data are sharded over
    its processes (DDP); without one the model trains on `device` alone (LDS runs)."""
    generator = torch.Generator().manual_seed(seed)
    compile_mode = recipe.torch_compile
    if compile_mode == "cudagraphs":
        collator = bucketed(collator)
    # workers are restarted every epoch: persistent ones would skip the generator draw that a new epoch's
    # iterator makes, and so change the shuffle order from epoch 2 on. Pinned batches copy without waiting for
    # the GPU (a blocking copy would make every step wait for the previous one to finish).
    loader = DataLoader(dataset, batch_size=recipe.per_device_train_batch_size, shuffle=True, drop_last=True,
                        collate_fn=collator, generator=generator, num_workers=recipe.dataloader_num_workers,
                        pin_memory=device.type == "cuda")
    if accelerator is None:
        model.to(device)
    # fused: one kernel per step for all parameters instead of a dozen passes over them (same update)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=recipe.weight_decay, fused=True)
    total = recipe.num_train_epochs * len(loader)
    if total == 0:
        raise UserError(f"{len(dataset)} training rows make no batch of {recipe.per_device_train_batch_size}; "
                        f"lower --per_device_train_batch_size")
    lr_lambda = (lambda step: 1.0) if recipe.lr_scheduler == "constant" else (lambda step: 1 - step / total)
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
    for epoch in range(recipe.num_train_epochs):
        epoch_start = time.perf_counter()
        model.train()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device)
        seen = 0
        for batch in tqdm(loader, desc=f"epoch {epoch + 1}/{recipe.num_train_epochs}", disable=quiet, leave=False):
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
                        "used CUDA; run retrain.py as a command of its own")
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
        model, _ = train_model(model, subset, job.collator, TrainingRecipe.from_args(args), seed=run.seed, device=device,
                               quiet=True)
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
