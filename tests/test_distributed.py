"""Two processes on CPU (torchrun, gloo): analysis and LDS runs split over ranks and agree with one process."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY, threads
from safetensors import safe_open

import analyze
import formats
import train
import training
from pipeline import load_checkpoint, load_raw, make_collator, prepare_data

pytestmark = pytest.mark.slow  # every test here trains, analyses or launches torchrun

ROOT = Path(__file__).resolve().parents[1]


def launch(script, *args, nproc=2, timeout=600):
    """SCRIPT under torchrun. Each rank's stderr lines come back prefixed "[defaultR]:" (--tee 2)."""
    with tempfile.TemporaryDirectory() as logs:  # --tee also writes each rank's log files
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
               "--tee", "2", "--log-dir", logs, str(ROOT / script), *args]
        return subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                              text=True, timeout=timeout)


def torchrun(script, *args, nproc=2):
    """launch(), which must succeed. A failure shows every rank's own last lines (not only the last rank's), then
    torchrun's own (its exit codes tell an error from a signal)."""
    result = launch(script, *args, nproc=nproc)
    if result.returncode != 0:
        lines = result.stderr.splitlines()
        report = [f"torchrun exited with {result.returncode}"]
        for r in range(nproc):
            report += [f"--- rank {r}:", *[line for line in lines if line.startswith(f"[default{r}]:")][-30:]]
        report += ["--- torchrun:", *[line for line in lines if not line.startswith("[default")][-12:]]
        pytest.fail("\n".join(report))
    return result


def test_fused_scores_split_over_torchrun_ranks_equal_one_process_bitwise(tiny_checkpoint, tmp_path):
    """The same factors, shared: each rank scores its share of the training batches (the same batches as one
    process) and the ranks sum a matrix whose columns are non-zero on one rank only, so the scores are equal."""
    common = ["--checkpoint_dir", str(tiny_checkpoint), "--scoring", "fused"]
    with threads(1):
        single = analyze.main([*common, "--output_dir", str(tmp_path / "one")])
    ddp = tmp_path / "two" / single.relative_to(tmp_path / "one")
    factors = next(single.parent.glob("factors_*"))
    shutil.copytree(factors, ddp.parent / factors.name)
    result = torchrun("analyze.py", *common, "--use_ddp", "--output_dir", str(tmp_path / "two"))
    assert "reusing the finished factor stages" in result.stderr
    a, b = (formats.load_scores(d) for d in (single, ddp))
    assert b[1]["num_processes"] == 2 and a[0].shape == b[0].shape == (12, 48)
    assert torch.equal(a[0], b[0])
    assert result.stdout.count("QUERY #0") == 1  # only rank 0 prints


def test_fused_analysis_under_torchrun_refitting_the_factors_agrees(tiny_checkpoint, tmp_path):
    """Refitted at another thread count, the factors differ by float32 rounding (relative ~1e-7). At the default
    damping of 1e-8 most EKFAC lambda entries lie below the damping and the preconditioner 1 / (lambda + damping)
    amplifies that rounding by up to 1e8 (one element was off by 0.0059 of 423). With damping 1e-3, far above
    that rounding, the scores' relative error stays near 1e-7 × max lambda / 1e-3, so a per-query Pearson of
    0.9999 leaves a wide margin."""
    common = ["--checkpoint_dir", str(tiny_checkpoint), "--scoring", "fused", "--damping_factor", "1e-3"]
    single = analyze.main([*common, "--output_dir", str(tmp_path / "one")])
    torchrun("analyze.py", *common, "--use_ddp", "--output_dir", str(tmp_path / "two"))
    a, b = (formats.load_scores(d)[0] for d in (single, tmp_path / "two" / single.relative_to(tmp_path / "one")))
    pearson = [np.corrcoef(x, y)[0, 1] for x, y in zip(a.double().numpy(), b.double().numpy())]
    assert min(pearson) >= 0.9999, pearson


def test_lds_runs_split_over_torchrun_ranks(tmp_path):
    out = tmp_path / "lds"
    result = torchrun("retrain.py", *TINY, "--num_train_epochs", "1", "--lds_num_masks", "3", "--lds_repeats", "1",
                      "--lds_output_dir", str(out))
    files = sorted(out.glob("run_*.safetensors"))
    assert [f.name for f in files] == [f"run_m{m:04d}_r00.safetensors" for m in range(3)]
    masks = []
    for f in files:
        with safe_open(str(f), "pt") as handle:
            masks.append(handle.get_tensor("mask").numpy())
    assert len({m.tobytes() for m in masks}) == 3 and all(m.sum() == 24 for m in masks)
    logs = result.stderr
    assert "rank 0 wrote" in logs and "rank 1 wrote" in logs, logs[-2000:]


@pytest.mark.parametrize("num_queries", [13, 1])
def test_finetuning_under_torchrun_validates_on_every_query_once(num_queries, tmp_path):
    """DDP fine-tuning through accelerate: the effective batch is stated; the per-epoch validation is split over
    the ranks (6 and 7 of 13 queries; 0 and 1 of 1) and gives the figures of one process evaluating the saved
    model (a query dropped or counted twice would move the accuracy)."""
    out = tmp_path / "ckpt"
    args = [*TINY, "--num_queries", str(num_queries), "--num_train_epochs", "1", "--output_dir", str(out)]
    logs = torchrun("train.py", *args).stderr
    first = num_queries // 2
    assert f"rank 0 validates {first} of {num_queries} queries" in logs
    assert f"rank 1 validates {num_queries - first} of {num_queries} queries" in logs
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["effective_batch_size"] == 2 * 16
    model, tokenizer = load_checkpoint(out)
    parsed = train.parse_args(args)
    data = prepare_data(parsed, tokenizer, load_raw(parsed))
    full = training.evaluate(model, data.queries, make_collator(tokenizer), 64, torch.device("cpu"))
    # the same predictions: the same number of correct queries
    assert round(metrics["validation_accuracy"] * num_queries) == round(full["accuracy"] * num_queries)
    # a mean of float32 losses over at most 13 queries: summation rounding <= 13 * 2^-24 relative, and a batch of
    # another size may round each logit differently (relative ~1e-7), so 1e-5 relative holds with margin
    assert metrics["validation_loss"] == pytest.approx(full["loss"], rel=1e-5)


ON_RANK_ZERO = """
import sys, torch.distributed as dist
sys.path.insert(0, sys.argv[1])
from analyze import on_rank_zero
from utils import UserError
dist.init_process_group("gloo")
def claim():
    print(f"claimed by rank {dist.get_rank()}", file=sys.stderr)
    raise ERROR("the output directory was interrupted")
try:
    on_rank_zero(claim)
except (UserError, Exception) as exc:  # torchrun stops the other ranks once one exits: print, then exit together
    print(f"rank {dist.get_rank()} raised {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    dist.barrier()
    if isinstance(exc, UserError):
        sys.exit(str(exc))  # as a script's entry point ends on one (utils.run_script)
    raise
"""


@pytest.mark.parametrize("error,rank1_sees", [("UserError", "error: the output directory was interrupted"),
                                               ("OSError", "error: rank 0 failed: OSError: the output directory")])
def test_on_rank_zero_runs_the_step_once_and_every_rank_raises_its_error(error, rank1_sees, tmp_path):
    """analyze.py checks and claims its output directories on rank 0 alone (no rank reads what rank 0 is writing).
    A refusal there stops every rank with rank 0's one-line error; any other failure keeps its traceback on rank 0
    and reaches the other ranks as one line, instead of leaving them waiting."""
    script = tmp_path / "claim.py"
    script.write_text(ON_RANK_ZERO.replace("ERROR", error))
    result = launch(script, str(ROOT), timeout=180)
    lines = result.stderr.splitlines()
    rank0, rank1 = ("\n".join(line for line in lines if line.startswith(f"[default{r}]:")) for r in range(2))
    assert result.returncode != 0 and result.stderr.count("claimed by rank") == 1, result.stderr[-2000:]
    assert "claimed by rank 0" in rank0 and f"rank 1 raised UserError: {rank1_sees}" in rank1
    if error == "UserError":
        assert "rank 0 raised UserError: error: the output directory was interrupted" in rank0
        assert "Traceback" not in rank0 + rank1
    else:
        assert "rank 0 raised OSError: the output directory was interrupted" in rank0 and "Traceback" in rank0
