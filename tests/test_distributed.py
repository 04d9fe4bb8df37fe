"""Two processes on CPU (torchrun, gloo): analysis and LDS runs split over ranks and agree with one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import analyze
import train
from conftest import TINY
from pipeline import load_checkpoint, load_raw, make_collator, prepare_data

ROOT = Path(__file__).resolve().parents[1]


def torchrun(script, *args, nproc=2):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(ROOT / script), *args]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fused_analysis_under_torchrun_equals_one_process(tiny_checkpoint, tmp_path):
    common = ["--checkpoint_dir", str(tiny_checkpoint), "--scoring", "fused"]
    single = analyze.main([*common, "--output_dir", str(tmp_path / "one")])
    result = torchrun("analyze.py", *common, "--use_ddp", "--output_dir", str(tmp_path / "two"))
    ddp = tmp_path / "two" / single.relative_to(tmp_path / "one")
    a, b = (analyze.load_scores(d) for d in (single, ddp))
    assert b[1]["num_processes"] == 2 and a[0].shape == b[0].shape == (12, 48)
    torch.testing.assert_close(b[0], a[0], rtol=1e-4, atol=1e-5 * a[0].abs().max().item())
    assert result.stdout.count("QUERY #0") == 1  # only rank 0 prints


def test_lds_runs_split_over_torchrun_ranks(tmp_path):
    out = tmp_path / "lds"
    result = torchrun("train.py", *TINY, "--num_train_epochs", "1", "--lds_num_masks", "3", "--lds_repeats", "1",
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
    full = train.evaluate(model, data.queries, make_collator(tokenizer), 64, torch.device("cpu"))
    assert abs(metrics["validation_accuracy"] - full["accuracy"]) < 1e-6
    assert abs(metrics["validation_loss"] - full["loss"]) < 1e-6
