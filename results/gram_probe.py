"""The covariance products of `--fast` (fast_kernels.gram) on one GPU, at roberta-base's widths and a factor batch's
tokens: one product against the symmetric one (fast_kernels.SYMMETRIC_FROM), milliseconds per call, and how far
the two are apart (float32 results of bf16 inputs; the same dot products in another order).

    python results/gram_probe.py OUT.json
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
import fast_kernels  # noqa: E402

TOKENS = 256 * 4 * 34  # a factor batch of 256 rows, 4 choices of 34 tokens (anetcap's mean through the real BPE)


def milliseconds(x: torch.Tensor, symmetric_from: int, reps: int = 50) -> tuple:
    fast_kernels.SYMMETRIC_FROM = symmetric_from
    out = fast_kernels.gram(x, torch.float32)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fast_kernels.gram(x, torch.float32)
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / reps * 1000, 3), out


def main(out_path: str) -> None:
    torch.manual_seed(0)
    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": TOKENS, "widths": {}}
    for width in (768, 3072):
        x = torch.randn(TOKENS, width, device="cuda", dtype=torch.bfloat16)
        one_ms, one = milliseconds(x, width + 1)
        symmetric_ms, symmetric = milliseconds(x, width)
        results["widths"][width] = {
            "one_product_ms": one_ms, "symmetric_ms": symmetric_ms,
            "relative_difference": ((symmetric - one).norm() / one.norm()).item(),
            "symmetric_exactly": bool(torch.equal(symmetric, symmetric.t())),
        }
    Path(out_path).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
