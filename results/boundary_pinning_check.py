"""fused_scores.BoundaryGradients on a GPU: its blocks pinned ahead by a thread (each an anonymous mapping marked
MADV_DONTFORK, written, then registered with CUDA), the gradients back bitwise, DataLoader workers forked while
the blocks are pinned (their resident memory shows whether the pinned pages were copied into them), and close()
unregistering every block.

    python results/boundary_pinning_check.py OUT.json [GIB]
"""
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
import fused_scores  # noqa: E402


def resident_kib(_):
    """This process's resident memory (VmRSS), in KiB."""
    with open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS")).split()[1])


def main(out: str, gib: int = 4) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    per_slot = 100 * 2**20  # 100 MiB of float32 a micro-batch
    slots = gib * 2**30 // per_slot
    gradients = [torch.randn(per_slot // 4, device=device) for _ in range(min(slots, 8))]
    started = time.perf_counter()
    store = fused_scores.BoundaryGradients(device, expected=slots * per_slot)
    for i in range(slots):
        store.store(i, gradients[i % len(gradients)])
    torch.cuda.synchronize()
    stored = time.perf_counter() - started
    bitwise = all(torch.equal(store.load(i), gradients[i % len(gradients)]) for i in range(slots))
    pinned = [block.is_pinned() for block in store.blocks]
    parent = resident_kib(None)
    started = time.perf_counter()
    children = list(DataLoader(range(4), batch_size=1, num_workers=4, collate_fn=resident_kib))
    forked = time.perf_counter() - started
    registered = len(store.pinned)
    store.close()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "slots": slots,
              "slot_mib": per_slot / 2**20, "blocks": registered, "all_blocks_pinned": all(pinned),
              "pinning_failed": not store.pin, "bitwise": bitwise, "store_seconds": round(stored, 3),
              "waited_seconds": round(store.waited, 3), "parent_rss_gib": round(parent / 2**20, 2),
              "worker_rss_gib": [round(c / 2**20, 2) for c in children], "fork_seconds": round(forked, 3),
              "unregistered_all": not store.pinned}
    print(json.dumps(result, indent=1))
    with open(out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
