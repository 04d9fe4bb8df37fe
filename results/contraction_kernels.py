"""The fused scoring's contraction as one kernel on this GPU: (queries × K) @ (K × rows) in bf16
(torch.matmul); in fp8 e4m3 with row scales, through torch._scaled_mm's row-scaled kernels (product_rowwise, `fp8`)
and its one-scale kernels with the row scales applied to the result (as fp8.product runs it, `fp8_tensorwise`); in
bf16 as matmuls over 768 × 768-wide slices of K (split_product), as one batched matmul over 2-16 slices of K
(batched_split, split-K) and through cuBLASLt; at roberta-base's module widths K (768 × 768 and 768 × 3072) and the
training micro-batch sizes of a pass, with the e4m3 cast of the training rows (what FusedScorer._train_rows adds)
beside them.

    python results/contraction_kernels.py OUT.json [--queries 2000]

Writes OUT.json: per (K, rows), the seconds of each kernel (CUDA events, the mean of --repeats after a warm-up) and the
TFLOP/s of the matmuls.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
import fp8  # noqa: E402
from influence import library_versions  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--queries", type=int, default=2000, help="rows of the query side (SWAG's 2,000)")
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 272, 512, 1024],
                        help="training rows of a micro-batch (multiples of fp8.ROWS_ALIGN)")
    parser.add_argument("--repeats", type=int, default=10)
    return parser.parse_args(argv)


def seconds(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats / 1e3


def product_rowwise(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor) -> torch.Tensor:
    """fp8.product's sums through _scaled_mm's row-scaled kernels (the scales applied inside the kernel), bf16
    results."""
    return torch._scaled_mm(a, b.t(), scale_a=a_scales[:, None], scale_b=b_scales[None, :], out_dtype=torch.bfloat16)


def split_product(queries: torch.Tensor, train: torch.Tensor, parts: int) -> torch.Tensor:
    """queries @ train.T as `parts` matmuls over consecutive slices of K (each at a width cuBLAS runs well), their
    results summed in float32."""
    width = queries.size(1) // parts
    out = torch.zeros(queries.size(0), train.size(0), device=queries.device,
                      dtype=torch.promote_types(queries.dtype, torch.float32))
    for i in range(parts):
        out += queries[:, i * width:(i + 1) * width] @ train[:, i * width:(i + 1) * width].T
    return out


def batched_split(queries: torch.Tensor, train: torch.Tensor, parts: int, out_dtype=None) -> torch.Tensor:
    """queries @ train.T as one batched matmul over `parts` slices of K (split-K: parts times the output tiles for
    the GPU's multiprocessors, the slices read in place through strides), the partial products summed after; with
    `out_dtype` (float32, on a GPU) the partial products are not rounded to bf16."""
    k = queries.size(1) // parts
    q = queries.view(queries.size(0), parts, k).transpose(0, 1)  # (parts, queries, k), no copy
    t = train.view(train.size(0), parts, k).permute(1, 2, 0)  # (parts, k, rows)
    return (torch.bmm(q, t) if out_dtype is None else torch.bmm(q, t, out_dtype=out_dtype)).sum(0)


def lt_matmul(queries: torch.Tensor, train: torch.Tensor) -> torch.Tensor:
    """queries @ train.T through cuBLASLt (torch's preferred BLAS library switched for the call)."""
    default = torch.backends.cuda.preferred_blas_library()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    try:
        return queries @ train.T
    finally:
        torch.backends.cuda.preferred_blas_library(default)


def timed(queries: torch.Tensor, q8: torch.Tensor, q_scales: torch.Tensor, rows: int, repeats: int) -> dict:
    """One (K, rows) case: each kernel's seconds and the matmuls' TFLOP/s."""
    train = torch.randn(rows, queries.size(1), device="cuda", dtype=torch.bfloat16)
    t8 = torch.empty(rows, queries.size(1), device="cuda", dtype=fp8.E4M3)
    t_scales = fp8.scaled_rows(train, t8)
    flops = 2 * queries.size(0) * queries.size(1) * rows
    row = {"K": queries.size(1), "rows": rows,
           "bf16_s": seconds(lambda: queries @ train.T, repeats),
           "fp8_s": seconds(lambda: product_rowwise(q8, q_scales, t8, t_scales), repeats),
           "bf16_split_s": seconds(lambda: split_product(queries, train, queries.size(1) // 768 ** 2), repeats),
           "fp8_tensorwise_s": seconds(lambda: fp8.product(q8, q_scales, t8, t_scales), repeats),
           "e4m3_cast_s": seconds(lambda: t8.copy_(train), repeats),
           "bf16_lt_s": seconds(lambda: lt_matmul(queries, train), repeats)}
    for parts in (2, 4, 8, 16):
        row[f"bmm{parts}_s"] = seconds(lambda p=parts: batched_split(queries, train, p), repeats)
        row[f"bmm{parts}_f32_s"] = seconds(lambda p=parts: batched_split(queries, train, p, torch.float32), repeats)
    row.update({f"{k[:-2]}_tflops": round(flops / v / 1e12, 1) for k, v in list(row.items())
                if k.endswith("_s") and k != "e4m3_cast_s"})
    print(json.dumps(row), flush=True)
    return row


def main(argv=None):
    args = parse_args(argv)
    if not torch.cuda.is_available() or not fp8.supported(torch.device("cuda")):
        sys.exit("this driver times GPU kernels: it needs a GPU of compute capability 8.9 or above")
    torch.manual_seed(0)
    cases = []
    for width in (768 * 768, 768 * 3072):
        queries = torch.randn(args.queries, width, device="cuda", dtype=torch.bfloat16)
        q8 = torch.empty(args.queries, width, device="cuda", dtype=fp8.E4M3)
        q_scales = fp8.scaled_rows(queries, q8)
        cases += [timed(queries, q8, q_scales, rows, args.repeats) for rows in args.rows]
    out = {"command": "python results/contraction_kernels.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "gpu": torch.cuda.get_device_name(), "versions": library_versions(), "date": time.strftime("%Y-%m-%d"),
           "queries": args.queries, "cases": cases}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
