"""Does pinning host memory in a background thread hold up the GPU work of the main thread?

    python results/pin_probe.py results/pin_probe_h100.json

One GPU. The main thread times bf16 8192² matmuls (launched from Python, synchronised every 10) alone, and while a
thread pins 8 blocks of 1 GiB three ways: `pinned`, torch's pinned allocator (cudaHostAlloc); `registered`, ordinary
memory written with zeros, then cudaHostRegister (what fused_scores.BoundaryGradients does, there in mappings that
forked processes do not inherit); `torch_register`, torch's allocator with `pinned_use_cuda_host_register` (8
threads fault the pages in, then cudaHostRegister). Writes the pinning seconds, the matmuls a second during it, and
the seconds to free the blocks.
"""
import json
import os
import sys
import threading
import time

import torch

out = sys.argv[1]
dev = torch.device("cuda")
GiB, N = 2**30, 8
res = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)


def matmuls(seconds):
    torch.cuda.synchronize()
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        n += 10
    return n / (time.perf_counter() - t0)


def pin_blocks(kind, store):
    t0 = time.perf_counter()
    for _ in range(N):
        if kind in ("pinned", "torch_register"):
            store.append(torch.empty(GiB, dtype=torch.uint8, pin_memory=True))
        else:  # pageable, touched, then registered
            t = torch.empty(GiB, dtype=torch.uint8)
            t.zero_()
            rc = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel(), 0)
            store.append((t, rc))
    store.append(time.perf_counter() - t0)


def free(store, kind):
    t0 = time.perf_counter()
    for s in store[:-1]:
        if kind == "registered":
            torch.cuda.cudart().cudaHostUnregister(s[0].data_ptr())
    store.clear()
    if hasattr(torch._C, "_host_emptyCache"):
        torch._C._host_emptyCache()
    return time.perf_counter() - t0


matmuls(2)
res["matmuls_per_s_alone"] = matmuls(4)
for kind in ("pinned", "registered", "torch_register"):
    if kind == "torch_register":  # torch's own: malloc, pages touched by 8 threads, cudaHostRegister
        torch.cuda.memory._set_allocator_settings("pinned_use_cuda_host_register:True,pinned_num_register_threads:8")
    store = []
    pin_blocks(kind, store)
    res[f"{kind}_alone_s_per_{N}GiB"] = store[-1]
    res[f"{kind}_free_s"] = free(store, kind)
    store = []
    th = threading.Thread(target=pin_blocks, args=(kind, store))
    th.start()
    t0, n = time.perf_counter(), 0
    torch.cuda.synchronize()
    while th.is_alive():
        for _ in range(10):
            a @ a
        torch.cuda.synchronize()
        n += 10
    res[f"{kind}_background_matmuls_per_s"] = n / (time.perf_counter() - t0)
    res[f"{kind}_background_s_per_{N}GiB"] = store[-1]
    res[f"{kind}_free_s_2"] = free(store, kind)
res["matmuls_per_s_alone_after"] = matmuls(3)
print(json.dumps(res, indent=1))
json.dump(res, open(out if out.endswith(".json") else os.path.join(out, "pinprobe.json"), "w"), indent=1)
