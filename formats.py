"""The on-disk formats: every output's name, the readers and writers of scores, fits, metadata and run files,
and the checks that an output belongs to the weights and data it is used with. Scripts and libraries read and
write their outputs through this module alone."""

import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from utils import UserError, atomic_output, file_sha256, finish_interrupted_swaps, read_json

logger = logging.getLogger(__name__)

# the data: SWAG's schema (local files in it too), and the tokenized batches' label key
NUM_CHOICES = 4
CONTEXT_COLUMN = "sent1"
HEADER_COLUMN = "sent2"
ENDING_COLUMNS = [f"ending{i}" for i in range(NUM_CHOICES)]
LABEL_COLUMN = "label"
REQUIRED_COLUMNS = [CONTEXT_COLUMN, HEADER_COLUMN, *ENDING_COLUMNS]
TRAIN_SPLIT = "train"
QUERY_SPLIT = "validation"
LABELS = "labels"  # the model's inputs are all the other keys
MAX_LENGTH = 128  # tokens per context/ending pair (--max_length), as kronfluence's example
MIN_LENGTH = 16  # room for the special tokens and some of both texts

# where the scripts put their outputs by default
CHECKPOINTS_DIR = Path("checkpoints")
SCORES_DIR = Path("scores")
LDS_DIR = Path("lds")
REMOVAL_DIR = Path("removal")

# a checkpoint (train.py): the model and tokenizer's save_pretrained files and these
TRAINING_ARGS_FILE = "training_args.json"  # every flag, the data fingerprint, the recipe
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "model.safetensors"


def epoch_checkpoint_dir(checkpoint_dir: Path, epoch: int) -> Path:
    """Where train.py --save_epochs puts the model after `epoch` (beside the final checkpoint, named after it, so
    that its analyses get their own directories under analyze.py's --output_dir)."""
    return checkpoint_dir.with_name(f"{checkpoint_dir.name}_epoch{epoch}")


def epoch_checkpoint(checkpoint_dir: Path, epoch: int) -> Path:
    """The checkpoint train.py --save_epochs wrote after `epoch` of the run in `checkpoint_dir`, checked to be
    that run's (the same run_id) when the final checkpoint is there too."""
    checkpoint_dir = checkpoint_dir.resolve()
    path = epoch_checkpoint_dir(checkpoint_dir, epoch)
    finish_interrupted_swaps(path)  # a train.py killed while swapping it in
    final = checkpoint_dir / TRAINING_ARGS_FILE
    run = read_json(final, "training arguments") if final.exists() else {}
    epochs = run.get("num_train_epochs")
    if epochs is not None and epoch >= epochs:
        raise UserError(f"{checkpoint_dir} was trained for {epochs} epochs: --checkpoint_epoch takes 1 to {epochs - 1} "
                        f"(epoch {epochs} is the checkpoint itself; drop the flag for it)")
    if not (path / WEIGHTS_FILE).exists():
        raise UserError(f"no epoch-{epoch} checkpoint of {checkpoint_dir} ({path} has no {WEIGHTS_FILE}): its run "
                        f"was trained without --save_epochs; retrain with --save_epochs --overwrite_output_dir")
    kept = read_json(path / TRAINING_ARGS_FILE, "training arguments")
    if kept.get("epoch") != epoch or (run and run.get("run_id") != kept.get("run_id")):
        raise UserError(f"{path} is not the epoch-{epoch} model of the run in {checkpoint_dir} (another training run "
                        f"wrote one of them); retrain with --save_epochs --overwrite_output_dir")
    return path


# an analysis (analyze.py): factors_<name>/ and scores_<name>/, each with its metadata
METADATA_FILE = "metadata.json"  # what the directory was computed from, and whether it is complete
SCORES_FILE = "pairwise_scores.safetensors"  # kronfluence's name: queries × training rows
SCORES_KEY = "all_modules"
SELF_SCORES_FILE = "self_scores.safetensors"  # kronfluence's name for self-influence scores
TRAIN_FIT_FILE = "train_fit.safetensors"  # per training row: loss, the model's preferred choice, the label
QUERY_FIT_FILE = "query_fit.safetensors"  # the same per query, beside pairwise scores (report.py shows them)
# retraining runs (retrain.py --lds_num_masks, --removal_scores): one file each
RUN_FILE = "run_m{mask:04d}_r{repeat:02d}.safetensors"
REMOVAL_FULL_FILE = "removal_full.safetensors"  # the control: the same recipe and seed on every row
REMOVAL_FILE = "removal_q{query:04d}_{condition}.safetensors"  # condition: random, or top_<scores id>
# evaluations (evaluate_lds.py, detect.py) and reports (report.py), beside the scores by default
RESULTS_FILE = "lds.json"
REMOVAL_RESULTS_FILE = "removal.json"
DETECTION_FILE = "detection.json"
CEILING_FILE = "noise_ceiling.json"
HISTOGRAM_FILE = "lds_histogram.png"
SCATTER_FILE = "lds_median_query.png"
REPORT_FILE = "report.html"


def scores_file(path: Path, name: str = SCORES_FILE) -> Path:
    """A scores argument names a scores directory or the file itself: the file either way."""
    path = Path(path)
    return path / name if path.is_dir() else path


def scores_directory(path: Path) -> Path:
    """The directory of a scores argument (a directory, or a file in one)."""
    path = Path(path)
    return path if path.is_dir() else path.parent


def readable_safetensors(path: Path) -> bool:
    """Whether `path` is a whole safetensors file (its header read and every tensor's bytes present)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return True
    except Exception:  # missing, truncated, or not safetensors at all
        return False


def check_provenance(output_dir: Path, expected: dict, overwrite: bool, fix: str) -> dict:
    """Factors and scores belong to one set of weights and data: refuse to reuse them for others. Returns the
    directory's metadata ({} when there is none to reuse)."""
    record = output_dir / METADATA_FILE
    if overwrite or not output_dir.exists():
        return {}
    if not record.exists():
        raise UserError(f"{output_dir} has no {METADATA_FILE}, so nothing says what it was computed from; "
                        f"{fix}")
    saved = read_json(record, "metadata")
    differs = [key for key, value in expected.items() if saved.get(key) != value]
    if differs:
        raise UserError(f"{output_dir} was computed from other {' and '.join(differs)} than this run's; {fix}")
    return saved


def load_scores(path: Path):
    """Scores (queries × train, float32) and the metadata analyze.py wrote beside them (None if absent)."""
    file = scores_file(path)
    if not file.is_file():
        hint = (" (it holds self-influence scores: pass it to --self_scores of detect.py or report.py)"
                if (file.parent / SELF_SCORES_FILE).is_file() else "")
        raise UserError(f"no scores at {path}{hint}; run analyze.py first, or pass the scores directory it printed")
    meta_file = file.parent / METADATA_FILE
    meta = read_json(meta_file, "scores metadata") if meta_file.exists() else None
    if meta is not None and not meta.get("complete", True):
        raise UserError(f"the scores in {file.parent} are from an analyze.py run that has not finished; "
                        f"rerun it to complete them")
    try:
        scores = load_file(str(file))[SCORES_KEY].float()
    except Exception as exc:
        raise UserError(f"cannot read scores {file} ({type(exc).__name__}); is it truncated? rerun analyze.py") from None
    return scores, meta


def save_scores(directory: Path, scores: torch.Tensor, file_name: str = SCORES_FILE) -> None:
    """Scores in kronfluence's file layout, written atomically."""
    with atomic_output(directory / file_name) as tmp:
        save_file({SCORES_KEY: scores.contiguous()}, str(tmp))


def save_fit(path: Path, fit: dict) -> None:
    with atomic_output(path) as tmp:
        save_file(fit, str(tmp))


def load_self_scores(path: Path):
    """Self-influence scores (train,), the training rows' fit (`model_fit`) and the metadata analyze.py wrote."""
    file = scores_file(path, SELF_SCORES_FILE)
    scores, meta = load_scores(file) if file.is_file() else (None, None)
    if meta is None or meta.get("kind") != "self_influence":
        raise UserError(f"{path} holds no self-influence scores; make them with analyze.py --self_influence")
    return scores, load_file(str(file.parent / TRAIN_FIT_FILE)), meta  # beside the scores, wherever they moved


def read_run(path: Path):
    """Tensors and metadata of one run file, or None when it is unreadable (then it is redone)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as exc:
        logger.warning("unreadable run file %s (%s); it will be redone", path, exc)
        return None


def removal_scores_id(scores: Path) -> str:
    """A short name for a score set: the top runs of several score sets share one directory."""
    return file_sha256(scores_file(scores))[:10]
