"""Profile a project script's whole run with torch.profiler (a diagnostic): top host and device operations.

    PROFILE_OUT=out/p1 python results/profile_run.py train ARGS...
    PROFILE_OUT=out/p2 torchrun --standalone --nproc-per-node=2 results/profile_run.py train ARGS...

Writes PROFILE_OUT_rank<R>_cpu.txt (by self host time) and PROFILE_OUT_rank<R>_device.txt (by self device
time) for every rank.
"""

import importlib
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the project's scripts

if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    out = os.environ.get("PROFILE_OUT", "profile")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as profiler:
        importlib.import_module(sys.argv[1]).main(sys.argv[2:])
    rank = os.environ.get("RANK", "0")
    table = profiler.key_averages()
    Path(f"{out}_rank{rank}_cpu.txt").write_text(table.table(sort_by="self_cpu_time_total", row_limit=40))
    Path(f"{out}_rank{rank}_device.txt").write_text(table.table(sort_by="self_device_time_total", row_limit=30))
