"""Issue 5 diagnostic: does a second process, driving the other GPU, slow this one's kernel launches?

    torchrun --standalone --nproc-per-node=1 results/launch_probe.py OUT/launch_1.json   # GPU 0 alone
    torchrun --standalone --nproc-per-node=2 results/launch_probe.py OUT/launch_2.json   # both at once

Each process times, on its own GPU (its local rank), 100,000 launches of a one-element kernel (the host cost of a
launch: the GPU finishes each long before the next comes) and, for comparison, a pure-Python loop of 20 times as many
additions. Barriers start both processes together. The training steps here are bound by the host (README, issue 5), so if launches slow down when both GPUs
are driven at once, so does DDP training, whatever the communication costs.
"""

import json
import os
import sys
import time

import torch
import torch.distributed as dist

LAUNCHES = 100_000


def main():
    rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)
    x = torch.zeros(1, device=device)
    dist.init_process_group("gloo")  # only for the barriers: both processes time the same seconds
    result = {"rank": rank, "world": int(os.environ.get("LOCAL_WORLD_SIZE", 1))}
    for repeat in range(3):  # the first warms up
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(LAUNCHES):
            x.add_(1)
        torch.cuda.synchronize()
        result[f"launch_us_{repeat}"] = round((time.perf_counter() - start) / LAUNCHES * 1e6, 2)
        start, y = time.perf_counter(), 0
        dist.barrier()
        for i in range(LAUNCHES * 20):
            y += i
        result[f"python_loop_ms_{repeat}"] = round((time.perf_counter() - start) * 1e3, 1)
    path = f"{sys.argv[1]}.rank{rank}"
    with open(path, "w") as f:
        json.dump(result, f)
    print(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
