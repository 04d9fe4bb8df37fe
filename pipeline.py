"""Data and model for SWAG influence analysis.

Loading SWAG (from the hub, from local SWAG-schema files, or the embedded demo), selecting and fingerprinting
rows, tokenization, dynamic padding, model construction and checkpoints.

    python pipeline.py --dataset demo                  # print sizes and one decoded demo example
    python pipeline.py --train_file ../shared/data/anetcap/train.csv.gz \\
        --validation_file ../shared/data/anetcap/validation.csv.gz --max_train_samples 4000

Data flags (`add_data_args`) are shared by train.py, retrain.py, analyze.py, evaluate_lds.py and report.py; a
checkpoint records them, so later scripts reuse the exact data the model was trained on.
"""

import argparse
import hashlib
import logging
import os
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from datasets import Dataset, DatasetDict, Value, load_dataset
from tokenizers import Tokenizer
from transformers import (
    AutoModelForMultipleChoice,
    AutoTokenizer,
    DataCollatorForMultipleChoice,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from demo import build_demo_model, build_demo_tokenizer, make_demo_dataset
from formats import (
    CONTEXT_COLUMN,
    ENDING_COLUMNS,
    HEADER_COLUMN,
    LABEL_COLUMN,
    LABELS,
    MAX_LENGTH,
    METRICS_FILE,
    MIN_LENGTH,
    NUM_CHOICES,
    QUERY_SPLIT,
    REQUIRED_COLUMNS,
    TRAIN_SPLIT,
    TRAINING_ARGS_FILE,
    WEIGHTS_FILE,
)
from utils import (
    ArgumentParser,
    UserError,
    at_least,
    atomic_output,
    finish_interrupted_swaps,
    first_line,
    fraction_below_one,
    read_json,
    run_script,
    seed_value,
    setup_logging,
    write_json,
)

logger = logging.getLogger(__name__)

HUB_DATASET = ("allenai/swag", "regular")
DATASETS = ["swag", "demo", "files"]
DEFAULT_MODEL = "FacebookAI/roberta-base"
DEMO_MODEL = "tiny-roberta"  # built from a config; see `build_demo_model`
REFERENCE_NUM_TRAIN = 73_536  # kronfluence's examples/swag sizes
REFERENCE_NUM_QUERIES = 2_000


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


def add_data_args(parser: argparse.ArgumentParser) -> None:
    """Data flags shared by every script. Unset flags stay None: `resolve_data_args` fills them from
    a checkpoint's training arguments, then from the defaults."""
    group = parser.add_argument_group("data")
    group.add_argument("--dataset", choices=DATASETS, default=None,
                       help="swag: allenai/swag from the hub (default); demo: the embedded generated dataset; "
                            "files: --train_file/--validation_file (implied when they are given).")
    group.add_argument("--train_file", default=None,
                       help="Local SWAG-schema training file (csv, json, jsonl or parquet; .gz allowed).")
    group.add_argument("--validation_file", default=None,
                       help="Local SWAG-schema file whose first rows are the queries.")
    group.add_argument("--max_train_samples", type=at_least(0), default=None,
                       help=f"Use the first N training rows (default: {REFERENCE_NUM_TRAIN:,} for swag as in "
                            "kronfluence's example, all rows otherwise; 0 = all).")
    group.add_argument("--num_queries", type=at_least(0), default=None,
                       help=f"Use the first N validation rows as queries (default: {REFERENCE_NUM_QUERIES:,} for "
                            "swag, all rows otherwise; 0 = all).")
    group.add_argument("--max_length", type=at_least(MIN_LENGTH), default=None,
                       help=f"Truncate each context/ending pair to this many tokens (default {MAX_LENGTH}; at least "
                            f"{MIN_LENGTH}, room for the special tokens and some of both texts; at most what the "
                            "tokenizer allows).")
    group.add_argument("--pad_to_max_length", action="store_true", default=None,
                       help="Pad every sequence to --max_length like the original example, "
                            "instead of padding each batch to its longest sequence.")
    group.add_argument("--label_noise", type=fraction_below_one, default=None,
                       help="For measuring label-error detection: move the label of this fraction of the training "
                            "rows to another choice (default 0: the data as given); the rows changed are recorded.")
    group.add_argument("--label_noise_seed", type=seed_value, default=None,
                       help="Seed picking the rows --label_noise changes and their new labels (default 0).")
    group.add_argument("--exclude_rows", default=None, metavar="JSON_FILE",
                       help="Leave these training rows out: a JSON list of row indices (after --label_noise; e.g. a "
                            "method's 'flagged' rows in detect.py's detection.json). Recorded in the checkpoint, so "
                            "the later scripts use the rows the model was trained on; rows are then numbered among "
                            "those kept.")


DATA_ARG_NAMES = ["dataset", "train_file", "validation_file", "max_train_samples", "num_queries",
                  "max_length", "pad_to_max_length", "label_noise", "label_noise_seed", "exclude_rows"]
DATA_PATH_NAMES = ["train_file", "validation_file", "exclude_rows"]  # recorded resolved: later runs may start elsewhere


def data_args_dict(args: argparse.Namespace) -> dict:
    return {name: getattr(args, name) for name in DATA_ARG_NAMES}


def resolve_data_args(args: argparse.Namespace, checkpoint_dir: Optional[Path] = None) -> argparse.Namespace:
    """Fill unset data flags from the checkpoint's `training_args.json`, then from the defaults."""
    for name in DATA_PATH_NAMES:
        if getattr(args, name, None) is not None:
            setattr(args, name, str(Path(getattr(args, name)).resolve()))
    saved = {}
    if checkpoint_dir is not None:
        saved = read_json(Path(checkpoint_dir) / TRAINING_ARGS_FILE, what="training arguments").get("data", {})
    for name in DATA_ARG_NAMES:
        if getattr(args, name, None) is None:
            setattr(args, name, saved.get(name))
    if args.train_file or args.validation_file:
        args.dataset = "files"
    args.dataset = args.dataset or "swag"
    reference = args.dataset == "swag"
    if args.max_train_samples is None:
        args.max_train_samples = REFERENCE_NUM_TRAIN if reference else 0
    if args.num_queries is None:
        args.num_queries = REFERENCE_NUM_QUERIES if reference else 0
    args.max_length = MAX_LENGTH if args.max_length is None else args.max_length
    args.pad_to_max_length = bool(args.pad_to_max_length)
    args.label_noise = args.label_noise or 0.0
    args.label_noise_seed = args.label_noise_seed or 0
    return args


# --------------------------------------------------------------------------------------------
# Raw data
# --------------------------------------------------------------------------------------------
_FILE_BUILDERS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def _builder_for(path: str) -> str:
    suffixes = [s for s in Path(path).suffixes if s != ".gz"]
    builder = _FILE_BUILDERS.get(suffixes[-1] if suffixes else "")
    if builder is None:
        raise UserError(f"cannot read {path}: expected a .csv, .json, .jsonl or .parquet file (optionally .gz)")
    return builder


def column_values(split: Dataset, name: str) -> list:
    """A column's values as a list, read through Arrow (the selected rows, in order): `split[name]` formats them
    one row at a time, seconds for SWAG's 73,536 rows."""
    return split.with_format("arrow")[name].to_pylist()


def check_columns(split: Dataset, where: str, labels_required: bool) -> Dataset:
    """One-line errors for what would otherwise fail late or silently: missing SWAG columns, empty text (a file cut
    mid-row), and labels that are not integers 0..3. Training rows need labels; a query split without a label
    column gets label -1 (unlabelled), which only the commands that need no labels accept."""
    missing = [c for c in REQUIRED_COLUMNS if c not in split.column_names]
    if missing:
        raise UserError(f"{where} is missing the SWAG column(s) {', '.join(missing)}; "
                        f"it needs {', '.join(REQUIRED_COLUMNS)} and optionally {LABEL_COLUMN}")
    for column in REQUIRED_COLUMNS:
        if split.data.column(column).null_count:
            row = split[column].index(None)
            raise UserError(f"{where}: row {row} has no {column} (rows count from 0); is the file truncated?")
    if LABEL_COLUMN not in split.column_names:
        if labels_required:
            raise UserError(f"{where} has no {LABEL_COLUMN} column; training rows need labels 0 to {NUM_CHOICES - 1}")
        return split.add_column(LABEL_COLUMN, [-1] * len(split))
    allowed = range(NUM_CHOICES) if labels_required else range(-1, NUM_CHOICES)
    labels = [_as_label(value) for value in column_values(split, LABEL_COLUMN)]
    bad = next((row for row, label in enumerate(labels) if label not in allowed), None)
    if bad is not None:
        hint = "" if labels_required else " (or -1 for an unlabelled query)"
        raise UserError(f"{where}: row {bad} has label {split[bad][LABEL_COLUMN]!r} (rows count from 0); labels "
                        f"must be the integers 0 to {NUM_CHOICES - 1}{hint}")
    if split.features[LABEL_COLUMN] != Value("int64"):  # e.g. 1.0 from a float column, "1" from a text one
        split = split.remove_columns(LABEL_COLUMN).add_column(LABEL_COLUMN, labels)
    return split


def _as_label(value) -> Optional[int]:
    """The integer a label cell holds (2, 2.0 or "2"), or None (1.5, NaN, empty, "abc", True)."""
    if isinstance(value, str):
        value = value.strip()
        return int(value) if value.lstrip("-").isdigit() else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    return None


def require_labels(split: Dataset, what: str = "the query split") -> None:
    """Margins and losses need labels: fail before any work (on every rank, so none waits for one that failed)."""
    labels = column_values(split, LABELS if LABELS in split.column_names else LABEL_COLUMN)
    unlabelled = [row for row, label in enumerate(labels) if label < 0]
    if unlabelled:
        raise UserError(f"{what} has unlabelled rows (label -1), so margins cannot be measured; use a labelled split "
                        f"such as validation ({len(unlabelled)} of {len(labels)} rows, the first is row {unlabelled[0]})")


def load_local_files(train_file: Optional[str], validation_file: Optional[str]) -> DatasetDict:
    splits = {}
    for name, path in ((TRAIN_SPLIT, train_file), (QUERY_SPLIT, validation_file)):
        if path is None:
            continue
        if not os.path.isfile(path):
            raise UserError(f"{name} file {path} does not exist")
        try:
            split = load_dataset(_builder_for(path), data_files={name: path}, split=name)
        except UserError:
            raise
        except ValueError as exc:
            if "corresponds to no data" not in str(exc):  # the datasets library's word for an empty file
                raise UserError(f"cannot parse {path} ({first_line(exc)}); "
                                f"is the file truncated or not in the SWAG schema?") from None
            split = None
        except Exception as exc:  # pyarrow/pandas parse errors are long; keep the first line
            raise UserError(f"cannot parse {path} ({first_line(exc)}); "
                            f"is the file truncated or not in the SWAG schema?") from None
        if split is None or len(split) == 0:
            raise UserError(f"{name} file {path} has no rows (a header alone, or nothing); pass a file with data")
        splits[name] = check_columns(split, where=path, labels_required=name == TRAIN_SPLIT)
    return DatasetDict(splits)


def load_raw(args: argparse.Namespace) -> DatasetDict:
    """The raw train and validation splits named by the data flags."""
    if args.dataset == "files":
        if not (args.train_file and args.validation_file):
            raise UserError("local data needs both --train_file and --validation_file")
        return load_local_files(args.train_file, args.validation_file)
    if args.dataset == "demo":
        return make_demo_dataset()
    try:
        raw = load_dataset(*HUB_DATASET)
    except Exception as exc:  # offline, or no network: the datasets library's error is a long traceback
        raise UserError(f"cannot load {'/'.join(HUB_DATASET)} from the Hugging Face hub ({first_line(exc)}); "
                        f"pass local SWAG-schema files with --train_file/--validation_file, or --dataset demo") from None
    return DatasetDict({name: check_columns(raw[name], where=f"{HUB_DATASET[0]}:{name}",
                                            labels_required=name == TRAIN_SPLIT)
                        for name in (TRAIN_SPLIT, QUERY_SPLIT)})


def take_first(split: Dataset, n: Optional[int], what: str, flag: str) -> Dataset:
    if n is not None and n < 0:
        raise UserError(f"{flag} must be 0 (all rows) or positive, got {n}")
    if not n:
        return split
    if n > len(split):
        raise UserError(f"{flag} {n} asks for more {what} than the split holds ({len(split)}); "
                        f"pass {flag} {len(split)} or less")
    return split.select(range(n))


def raw_fingerprint(split: Dataset) -> str:
    """sha256 of the text and labels of a raw split, in order."""
    import pandas as pd

    frame = split.select_columns([*REQUIRED_COLUMNS, LABEL_COLUMN]).to_pandas()
    return hashlib.sha256(pd.util.hash_pandas_object(frame, index=False).values.tobytes()).hexdigest()


# --------------------------------------------------------------------------------------------
# Tokenization and batching
# --------------------------------------------------------------------------------------------
def tokenize(split: Dataset, tokenizer: PreTrainedTokenizerBase, max_length: int = MAX_LENGTH,
             pad_to_max_length: bool = False) -> Dataset:
    """Pair the context (×4) with "{sent2} {ending_i}"; nested lists of 4 choices per row."""
    encode_pairs = pair_encoder(tokenizer, max_length, pad_to_max_length)

    def encode(rows):
        first = list(chain.from_iterable([context] * NUM_CHOICES for context in rows[CONTEXT_COLUMN]))
        second = [f"{header} {rows[end][i]}" for i, header in enumerate(rows[HEADER_COLUMN]) for end in ENDING_COLUMNS]
        per_row = pa.array(np.arange(0, len(first) + 1, NUM_CHOICES, dtype=np.int32))  # the choices of each row
        out = {name: pa.ListArray.from_arrays(per_row, choices) for name, choices in encode_pairs(first, second).items()}
        return pa.table({**out, LABELS: pa.array(rows[LABEL_COLUMN], type=pa.int64())})  # no conversion from lists

    return split.map(encode, batched=True, batch_size=TOKENIZE_BATCH, remove_columns=split.column_names,
                     desc="tokenizing")


TOKENIZE_BATCH = 4_096  # rows per call: the Rust tokenizer's threads share each call's 16,384 pairs
# a fast tokenizer's outputs by their model input names (what `tokenizer(...)` returns for each), and the integer
# types datasets stores them in (its OptimizedTypedSequence's, for lists of Python ints)
ENCODING_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}
ENCODING_TYPES = {"input_ids": np.int32, "attention_mask": np.int8, "token_type_ids": np.int8}


def pair_encoder(tokenizer: PreTrainedTokenizerBase, max_length: int, pad_to_max_length: bool):
    """`(first, second) -> {input name: Arrow lists}`: `tokenizer(first, second, truncation=True, max_length=...)`'s
    input ids, attention masks (and token types where the model takes them). A fast tokenizer of transformers' own
    encoding (no padding, no Python-side encoding of its own class, a Rust tokenizer that can be copied) encodes
    through a copy of its Rust tokenizer with the same truncation and special-token splitting: the same ids, without
    the Python objects `tokenizer(...)` builds for each encoding (73,536 SWAG rows: about 11 s in one process), on
    every core unless TOKENIZERS_PARALLELISM is false. Any other goes through `tokenizer(...)` itself."""
    def through_tokenizer(first, second):
        encoded = tokenizer(first, second, truncation=True, max_length=max_length,
                            padding="max_length" if pad_to_max_length else False)
        return {name: pa.array(values, type=pa.list_(pa.from_numpy_dtype(ENCODING_TYPES.get(name, np.int64))))
                for name, values in encoded.items()}

    names = [name for name in tokenizer.model_input_names if name in ENCODING_FIELDS]
    if (not tokenizer.is_fast or pad_to_max_length or len(names) != len(tokenizer.model_input_names)
            or type(tokenizer)._encode_plus is not PreTrainedTokenizerFast._encode_plus):
        return through_tokenizer
    try:  # a copy: truncation set here leaves the user's tokenizer alone
        backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    except Exception:  # components written in Python cannot be serialized
        return through_tokenizer
    backend.enable_truncation(max_length, strategy="longest_first", direction=tokenizer.truncation_side)
    backend.no_padding()
    backend.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))

    encode_batch = getattr(backend, "encode_batch_fast", backend.encode_batch)  # without the offsets we do not use

    # the flag in the function's own defaults: datasets' cache fingerprints the function, and the Rust tokenizer's
    # pickled state leaves encode_special_tokens out (rows tokenized with and without it would share a cache entry)
    def encode_pairs(first, second, split_special_tokens=backend.encode_special_tokens):
        encodings = encode_batch(list(zip(first, second)))
        lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
        offsets, total = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)), int(lengths.sum())
        out = {}
        for name in names:
            if name == "attention_mask":  # no padding: every token is attended to
                values = np.ones(total, dtype=ENCODING_TYPES[name])
            else:
                field = ENCODING_FIELDS[name]
                values = np.fromiter(chain.from_iterable(getattr(e, field) for e in encodings),
                                     dtype=ENCODING_TYPES[name], count=total)
            out[name] = pa.ListArray.from_arrays(offsets, pa.array(values))
        return out
    return encode_pairs


def make_collator(tokenizer: PreTrainedTokenizerBase, pad_to_max_length: bool = False,
                  max_length: int = MAX_LENGTH) -> DataCollatorForMultipleChoice:
    return DataCollatorForMultipleChoice(tokenizer=tokenizer,
                                         padding="max_length" if pad_to_max_length else True,
                                         max_length=max_length if pad_to_max_length else None)


@dataclass
class Data:
    """Raw and tokenized train/query splits plus what identifies them."""

    raw_train: Dataset
    raw_queries: Dataset
    train: Dataset
    queries: Dataset
    fingerprint: dict
    corrupted_rows: list = field(default_factory=list)  # training rows whose label --label_noise moved
    excluded_rows: list = field(default_factory=list)  # rows --exclude_rows left out (numbered before leaving out)


def corrupt_labels(split: Dataset, fraction: float, seed: int) -> tuple:
    """`split` with the label of round(fraction × rows) rows, picked under `seed`, moved to another choice (also
    picked under it), and the rows changed, in order. Only for measuring label-error detection."""
    count = round(fraction * len(split))
    if count == 0:
        return split, []
    require_labels(split, "--label_noise's training rows")
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(split), count, replace=False))
    labels = np.array(column_values(split, LABEL_COLUMN), dtype=np.int64)
    labels[rows] = (labels[rows] + rng.integers(1, NUM_CHOICES, size=count)) % NUM_CHOICES
    feature = split.features[LABEL_COLUMN]
    return split.remove_columns(LABEL_COLUMN).add_column(LABEL_COLUMN, labels, feature=feature), rows.tolist()


def excluded_rows(path, num_train: int) -> list:
    """The distinct training rows listed in the JSON file `path`, sorted, or one line saying what is wrong."""
    rows = read_json(path, "--exclude_rows")
    if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows):
        raise UserError(f"--exclude_rows {path} must hold a JSON list of integer row indices")
    outside = [r for r in rows if not 0 <= r < num_train]
    if outside:
        raise UserError(f"--exclude_rows {path} lists rows outside the {num_train} training rows "
                        f"({len(outside)}, e.g. {outside[0]}); pass indices from 0 to {num_train - 1}")
    if len(set(rows)) == num_train:
        raise UserError(f"--exclude_rows {path} lists every training row; nothing would be left to train on")
    return sorted(set(rows))


def select_rows(args: argparse.Namespace, raw: DatasetDict) -> tuple:
    """The training rows (labels moved by --label_noise, then rows left out by --exclude_rows, if asked), the
    queries, the rows whose label moved (numbered among the rows kept) and the rows left out."""
    raw_train = take_first(raw[TRAIN_SPLIT], args.max_train_samples, "training rows", "--max_train_samples")
    raw_queries = take_first(raw[QUERY_SPLIT], args.num_queries, "queries", "--num_queries")
    raw_train, corrupted = corrupt_labels(raw_train, args.label_noise, args.label_noise_seed)
    excluded = excluded_rows(args.exclude_rows, len(raw_train)) if getattr(args, "exclude_rows", None) else []
    if excluded:
        kept = np.setdiff1d(np.arange(len(raw_train)), excluded)
        raw_train = raw_train.select(kept)
        corrupted = np.flatnonzero(np.isin(kept, corrupted)).tolist()
    return raw_train, raw_queries, corrupted, excluded


def longest_choices(split: Dataset) -> np.ndarray:
    """Per tokenized row, the token count of its longest choice (padding left out)."""
    import pyarrow.compute as pc

    choices = pc.list_flatten(split.data.column("attention_mask").combine_chunks())  # one list of 0/1 per choice
    offsets = choices.offsets.to_numpy()
    tokens = np.add.reduceat(pc.list_flatten(choices).to_numpy(zero_copy_only=False).astype(np.int64),
                             offsets[:-1] - offsets[0])  # no choice is empty: it holds the special tokens
    return tokens.reshape(-1, NUM_CHOICES).max(axis=1)


def prepare_data(args: argparse.Namespace, tokenizer: PreTrainedTokenizerBase, raw: Optional[DatasetDict] = None) -> Data:
    limit = tokenizer.model_max_length
    if limit < 1_000_000 and args.max_length > limit:  # transformers uses a huge sentinel for "no limit known"
        raise UserError(f"--max_length {args.max_length} is longer than the {limit} tokens the model "
                        f"{Path(str(tokenizer.name_or_path)).name} takes; pass --max_length {limit} or less")
    raw_train, raw_queries, corrupted, excluded = select_rows(args, raw if raw is not None else load_raw(args))
    kwargs = dict(tokenizer=tokenizer, max_length=args.max_length, pad_to_max_length=args.pad_to_max_length)
    fingerprint = {"train": raw_fingerprint(raw_train), "queries": raw_fingerprint(raw_queries),
                   "num_train": len(raw_train), "num_queries": len(raw_queries),
                   "tokenizer": Path(str(tokenizer.name_or_path)).name, "vocab_size": len(tokenizer),
                   "max_length": args.max_length}
    if excluded:  # only then: the fingerprints of runs made without it stay as they were
        fingerprint["excluded_rows"] = len(excluded)
    data = Data(raw_train, raw_queries, tokenize(raw_train, **kwargs), tokenize(raw_queries, **kwargs), fingerprint,
                corrupted, excluded)
    duplicates = int(raw_train.select_columns([*REQUIRED_COLUMNS, LABEL_COLUMN]).to_pandas().duplicated().sum())
    cut = [int((longest_choices(split) >= args.max_length).sum()) for split in (data.train, data.queries)]
    if duplicates or any(cut):
        logger.info("data: %d training rows repeat an earlier row; %d training and %d query rows reach --max_length "
                    "%d tokens in a choice (their text is cut there)", duplicates, *cut, args.max_length)
    return data


# --------------------------------------------------------------------------------------------
# Models and checkpoints
# --------------------------------------------------------------------------------------------
def model_logits(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """(batch, choices) logits; every key but the labels goes to the model (RoBERTa has no
    token_type_ids, BERT-style encoders such as MiniLM do)."""
    return model(**{k: v for k, v in batch.items() if k != LABELS}).logits


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-example margin: correct logit − logsumexp of the other logits (task.py's measurement, and what
    the retraining runs record)."""
    correct = logits.gather(1, labels[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(labels, logits.size(1)).bool(), float("-inf"))
    return correct - others.logsumexp(dim=-1)


def load_pretrained(model_name_or_path: str, raw: Optional[DatasetDict] = None, seed: int = 0):
    """Model and tokenizer to fine-tune. The classifier head is initialised under `seed`, so every
    run with the same seed (the full model and all LDS retrains) starts from identical weights."""
    torch.manual_seed(seed)
    if model_name_or_path == DEMO_MODEL:
        tokenizer = build_demo_tokenizer(raw if raw is not None else make_demo_dataset())
        return build_demo_model(tokenizer), tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForMultipleChoice.from_pretrained(model_name_or_path, dtype=torch.float32)
    except OSError as exc:  # not on the hub, no network, or HF_HUB_OFFLINE=1 without a cached copy
        raise UserError(f"cannot load the model {model_name_or_path} ({first_line(exc)}); pass a local model "
                        f"directory with --model_name_or_path DIR (the hub needs a network), or use --dataset demo") from None
    return model, tokenizer


def save_checkpoint(model, tokenizer, output_dir: Path, training_args: dict, metrics: dict,
                    overwrite: bool = False) -> None:
    """Write into a temporary directory, then swap it in: a crash never leaves a half-written checkpoint. An
    existing checkpoint is replaced only when the caller allows it (train.py's --overwrite_output_dir), also when
    it appeared while this one was being trained: then the new one is kept beside it."""
    try:
        with atomic_output(output_dir, replace=overwrite) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            write_json(tmp / TRAINING_ARGS_FILE, training_args)
            write_json(tmp / METRICS_FILE, metrics)
    except FileExistsError as exc:
        raise UserError(f"{exc}; move it where you want it, or train again with --overwrite_output_dir") from None


def load_checkpoint(checkpoint_dir: Path):
    """Model and tokenizer of a `train.py` checkpoint, with a clear error when it is missing."""
    checkpoint_dir = Path(checkpoint_dir)
    finish_interrupted_swaps(checkpoint_dir)  # a train.py killed while swapping its checkpoint in
    if not (checkpoint_dir / "config.json").is_file() or not (checkpoint_dir / WEIGHTS_FILE).is_file():
        raise UserError(f"no checkpoint in {checkpoint_dir} (config.json and {WEIGHTS_FILE} expected); "
                        f"train one with: python train.py --output_dir {checkpoint_dir}")
    tokenizer = AutoTokenizer.from_pretrained(checkpoint_dir)
    model = AutoModelForMultipleChoice.from_pretrained(checkpoint_dir, dtype=torch.float32)
    return model, tokenizer


def decode_choices(tokenizer: PreTrainedTokenizerBase, row: dict) -> list:
    """The choices of a tokenized row as "context | ending" text, without padding or special tokens."""
    texts = []
    for ids in row["input_ids"]:
        text = tokenizer.decode([i for i in ids if i != tokenizer.pad_token_id])
        text = text.replace(tokenizer.cls_token or "\0", "")
        texts.append(" | ".join(part.strip() for part in text.split(tokenizer.sep_token) if part.strip()))
    return texts


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_data_args(parser)
    parser.add_argument("--model_name_or_path", default=None,
                        help=f"Tokenizer to use (default: {DEMO_MODEL} for the demo, else {DEFAULT_MODEL}).")
    return parser.parse_args(argv)


def main(argv=None):
    args = resolve_data_args(parse_args(argv))
    setup_logging(args.verbose)
    raw = load_raw(args)
    name = args.model_name_or_path or (DEMO_MODEL if args.dataset == "demo" else DEFAULT_MODEL)
    _, tokenizer = load_pretrained(name, raw)
    data = prepare_data(args, tokenizer, raw)
    logger.info("train %d rows, queries %d rows", len(data.train), len(data.queries))
    row = data.queries[0]
    for i, text in enumerate(decode_choices(tokenizer, row)):
        print(f"{'*' if i == row['labels'] else ' '} {i}: {text}")


if __name__ == "__main__":
    run_script(main)


