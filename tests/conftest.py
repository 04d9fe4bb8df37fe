"""Shared fixtures: offline, CPU, and two demo checkpoints trained once per session."""

import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one CPU thread, whatever the machine's load: PyTorch's default (a thread per core) runs many times slower when
# another busy process shares the cores, and results depend on the thread count
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import train  # noqa: E402

TINY = ["--dataset", "demo", "--max_train_samples", "48", "--num_queries", "12"]


@pytest.fixture(scope="session")
def demo_checkpoint(tmp_path_factory):
    """The README's demo model: the full demo recipe."""
    out = tmp_path_factory.mktemp("ckpt") / "demo"
    train.main(["--dataset", "demo", "--output_dir", str(out)])
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A barely trained demo model on 48 rows, for fast end-to-end runs."""
    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    train.main([*TINY, "--num_train_epochs", "1", "--output_dir", str(out)])
    return out


@contextmanager
def threads(n):
    """This process at n CPU threads (torchrun's ranks in the tests and forked LDS workers run at 1): CPU kernels
    may split, and so round, a sum differently at another thread count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


SLOW_FIXTURES = {"demo_checkpoint", "noisy", "uninterrupted"}  # each trains or analyses a full demo model


def pytest_collection_modifyitems(items):
    """A test that needs one of the expensive fixtures belongs to the slow tier, marked or not."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
