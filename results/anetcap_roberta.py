"""What the GPU drivers that run the roberta-base architecture on anetcap share (boundaries_paired.py,
sync_probe.py): their data arguments and the tokenized rows."""
import argparse
from pathlib import Path

from datasets import load_dataset

from pipeline import tokenize


def driver_parser(doc: str, output: str, num_train: int, num_queries: int) -> argparse.ArgumentParser:
    """An argument parser with the positional `output` and the tokenizer, data and row-count flags."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(output, type=Path)
    parser.add_argument("--tokenizer_dir", type=Path, required=True, help="roberta-base's vocab.json and merges.txt")
    parser.add_argument("--data_dir", type=Path, required=True, help="anetcap's train.csv.gz and validation.csv.gz")
    parser.add_argument("--num_train", type=int, default=num_train, help="the first N training rows")
    parser.add_argument("--num_queries", type=int, default=num_queries, help="the first N validation rows")
    return parser


def anetcap_rows(args, tokenizer) -> tuple:
    """(training rows, queries): the first --num_train and --num_queries rows of anetcap, tokenized."""
    raw = load_dataset("csv", data_files={split: str(args.data_dir / f"{split}.csv.gz")
                                          for split in ("train", "validation")})
    return (tokenize(raw["train"].select(range(args.num_train)), tokenizer),
            tokenize(raw["validation"].select(range(args.num_queries)), tokenizer))
