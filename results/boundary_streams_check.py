"""A GPU check of fused_scores.BoundaryGradients' copies on their own streams: passes of micro-batches that load the
gradient the pass before stored, transform it on the passes' stream and store the result, with the copies delayed
(torch.cuda._sleep on the copy streams) and each stored gradient's memory handed out again at once and filled with
NaN. Every load must see exactly what the pass before stored. A control with Tensor.record_stream disabled (the
allocator then hands the gradient's memory out before its copy to the host is done) must fail, so the check can.

    python results/boundary_streams_check.py OUT.json

Writes OUT.json: per run whether every load matched, and the first mismatch.
"""
import json
import sys
import time
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
from fused_scores import BoundaryGradients  # noqa: E402

PASSES, MICRO_BATCHES, ELEMENTS = 5, 24, 4 * 2**20  # 16 MiB of float32 a micro-batch
DELAY = 2_000_000  # cycles of torch.cuda._sleep before each copy (about a millisecond)


def run(device: torch.device) -> dict:
    """Every load against what the pass before stored: x -> 2x + 1 of whole numbers, exact in float32."""
    store = BoundaryGradients(device, MICRO_BATCHES * ELEMENTS * 4)
    mismatches = []
    try:
        for p in range(PASSES):
            for i in range(MICRO_BATCHES):
                if p == 0:
                    value = torch.full((ELEMENTS,), float(i), device=device)
                else:
                    with torch.cuda.stream(store.streams[1]):
                        torch.cuda._sleep(DELAY)  # the fetch of the next micro-batch comes late
                    loaded = store.load(i)
                    expected = float(i)
                    for _ in range(p - 1):
                        expected = 2 * expected + 1
                    mismatches.append((p, i, (loaded != expected).sum()))
                    value = loaded * 2 + 1
                if p < PASSES - 1:
                    with torch.cuda.stream(store.streams[0]):
                        torch.cuda._sleep(DELAY)  # the copy to the host comes late
                    store.store(i, value)
                    del value
                    torch.full((ELEMENTS,), float("nan"), device=device)  # the freed memory handed out and overwritten
            torch.cuda.synchronize(device)  # as _Clock.lap at the end of each side of a pass
        store.reset()
    finally:
        store.close()
    bad = [(p, i, int(n)) for p, i, n in mismatches if int(n)]
    return {"loads": len(mismatches), "all_matched": not bad, "first_mismatch": bad[0] if bad else None}


def main(argv=None):
    out_file = Path((sys.argv[1:] if argv is None else argv)[0])
    device = torch.device("cuda")
    started = time.perf_counter()
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python results/boundary_streams_check.py " + str(out_file),
           "passes": PASSES, "micro_batches": MICRO_BATCHES, "bytes_per_micro_batch": ELEMENTS * 4}
    out["streams"] = run(device)
    with mock.patch.object(torch.Tensor, "record_stream", lambda *args: None):
        out["control_without_record_stream"] = run(device)
    out["check_can_fail"] = not out["control_without_record_stream"]["all_matched"]
    out["seconds"] = round(time.perf_counter() - started, 1)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
