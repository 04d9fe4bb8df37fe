"""Retrain from the same initial weights on chosen training rows: the LDS ground truth and the removal test.

LDS ground truth: models retrained on random halves of the training set. Give the same data and recipe flags as
the full model (train.py), plus:

    python retrain.py --dataset demo --lds_num_masks 100 --lds_repeats 1 --lds_subset_fraction 0.5 \\
        --lds_output_dir lds/demo
    torchrun --standalone --nproc-per-node=2 retrain.py ... --lds_num_masks 100   # runs split over ranks
    python retrain.py ... --lds_num_masks 100 --lds_processes 16          # or over 16 workers forked after loading
    CUDA_VISIBLE_DEVICES=0 torchrun --standalone --nproc-per-node=4 retrain.py ... --lds_num_masks 100 \\
        --torch_compile cudagraphs --dataloader_num_workers 2             # 4 runs sharing one GPU
    sbatch --array=0-99 --wrap "python retrain.py ... --lds_num_masks 100 --lds_run_index \\$SLURM_ARRAY_TASK_ID"

Removal test: retrained without each query's top proponents by some scores, and without as many random rows:

    python retrain.py --dataset demo --removal_scores scores/demo/scores_ekfac_nall_qall --removal_num_queries 50

Each run writes one file, atomically; finished runs are skipped when the command is rerun. evaluate_lds.py reads
them (--lds_dir, --removal_dir).
"""

import logging
import os
from pathlib import Path

from formats import LDS_DIR, REMOVAL_DIR
from pipeline import add_data_args, resolve_data_args
from training import add_recipe_args, resolve_recipe_args, run_lds
from utils import ArgumentParser, at_least, configure_attention, configure_cpu_threads, run_script, setup_logging

logger = logging.getLogger(__name__)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_data_args(parser)
    add_recipe_args(parser)
    lds = parser.add_argument_group("LDS retraining runs")
    lds.add_argument("--lds_num_masks", type=at_least(1), default=None,
                     help="Number of random training subsets (this or --removal_scores).")
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
                         help="Scores (analyze.py) of the model these flags train: retrain from the same initial "
                              "weights without each query's top proponents, and without as many random rows "
                              "(--lds_processes and --lds_run_index apply).")
    removal.add_argument("--removal_num_queries", type=at_least(1), default=50, help="Queries tested (the first N).")
    removal.add_argument("--removal_fraction", type=float, default=0.05,
                         help="Training rows removed per run, as a fraction of the training set.")
    removal.add_argument("--removal_output_dir", type=Path, default=None,
                         help=f"Run files (default {REMOVAL_DIR}/<dataset>); several score sets may share one.")
    args = resolve_recipe_args(resolve_data_args(parser.parse_args(argv)))
    args.lds_output_dir = args.lds_output_dir or LDS_DIR / args.dataset
    args.removal_output_dir = args.removal_output_dir or REMOVAL_DIR / args.dataset
    check_args(parser, args)
    if args.lds_run_index is None and os.environ.get("SLURM_ARRAY_TASK_ID"):
        args.lds_run_index = int(os.environ["SLURM_ARRAY_TASK_ID"])
    return args


def check_args(parser, args) -> None:
    """The flags of one kind of run, with that kind named."""
    removal = args.removal_scores is not None
    if args.exclude_rows is not None:
        parser.error("--exclude_rows applies to fine-tuning (train.py); the LDS and removal runs choose their own rows")
    if removal and args.lds_num_masks is not None:
        parser.error("--removal_scores and --lds_num_masks start different retraining runs; give one")
    if not 0 < args.removal_fraction < 1:
        parser.error(f"argument --removal_fraction: must lie in (0, 1), got {args.removal_fraction}")
    removal_only = [f"--{name}" for name in ("removal_num_queries", "removal_fraction")
                    if getattr(args, name) != parser.get_default(name)]
    if not removal and removal_only:
        parser.error(f"{', '.join(removal_only)} only apply to the removal test; add --removal_scores SCORES_DIR")
    if not 0 < args.lds_subset_fraction < 1:
        parser.error(f"argument --lds_subset_fraction: must lie in (0, 1), got {args.lds_subset_fraction}")
    lds_only = [f"--{name}" for name in ("lds_repeats", "lds_subset_fraction")
                if getattr(args, name) != parser.get_default(name)]
    if removal and lds_only:
        parser.error(f"{', '.join(lds_only)} only apply to the LDS runs; drop them with --removal_scores")
    if args.lds_num_masks is None and not removal:
        parser.error("give --lds_num_masks N (the LDS runs) or --removal_scores SCORES_DIR (the removal test)")


def main(argv=None):
    args = parse_args(argv)
    setup_logging(args.verbose)
    configure_cpu_threads()
    configure_attention()
    return run_lds(args)


if __name__ == "__main__":
    run_script(main)
