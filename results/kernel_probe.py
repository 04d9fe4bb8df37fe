"""Kernel probe on one GPU: lambda's rotated sums of squares (TF32 against bf16) and the fused scores' contraction
(bf16 against fp8 with row-wise scales) at roberta-base's shapes, on random inputs; milliseconds per call.

    python results/kernel_probe.py results/kernel_probe_h200.json
"""
import json
import sys
import time

import torch

DEVICE = "cuda"


def milliseconds(fn, *args, reps=10):
    fn(*args)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn(*args)
    torch.cuda.synchronize()
    return round((time.perf_counter() - start) / reps * 1000, 3)


def lambda_tf32(a, g, qa, qg, lam):
    torch.backends.cuda.matmul.allow_tf32 = True
    rotated = (g.float() @ qg).transpose(1, 2) @ (a.float() @ qa)
    lam.add_(torch.linalg.vector_norm(rotated, dim=0).square_())
    torch.backends.cuda.matmul.allow_tf32 = False


def lambda_bf16(a, g, qa, qg, lam):
    rotated = (g @ qg.bfloat16()).transpose(1, 2) @ (a @ qa.bfloat16())
    lam.add_(torch.linalg.vector_norm(rotated, dim=0, dtype=torch.float32).square_())


def lambda_bf16_chunk64(a, g, qa, qg, lam):
    rotated_g, rotated_a = (g @ qg.bfloat16()).transpose(1, 2), a @ qa.bfloat16()
    for i in range(0, a.size(0), 64):
        lam.add_(torch.linalg.vector_norm(rotated_g[i:i + 64] @ rotated_a[i:i + 64], dim=0, dtype=torch.float32).square_())


def rotations_bf16(a, g, qa, qg, lam):
    return g @ qg.bfloat16(), a @ qa.bfloat16()


def lambda_float64(a, g, qa, qg):
    return ((g.double() @ qg.double()).transpose(1, 2) @ (a.double() @ qa.double())).square().sum(0)


def scores_bf16(q, t, block):
    block.add_((q @ t.T).float())


def scores_bf16_out32(q, t, block):
    block.add_(torch.mm(q, t.T, out_dtype=torch.float32))


def scores_fp8(q8, t, block, scale_q, scale_t):
    t8 = t.to(torch.float8_e4m3fn)  # the training side quantised per micro-batch
    block.add_(torch._scaled_mm(q8, t8.T, scale_a=scale_q, scale_b=scale_t, out_dtype=torch.bfloat16).float())


def main(path):
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    # lambda: fc1/fc2 (768 + bias padded to 776, 3072) and an attention module, 256 examples × 4 choices
    for d_in, d_out in [(776, 3072), (3072, 768), (776, 768)]:
        for tokens in (34, 128):
            a = torch.randn(256, 4 * tokens, d_in, device=DEVICE, dtype=torch.bfloat16)
            g = torch.randn(256, 4 * tokens, d_out, device=DEVICE, dtype=torch.bfloat16)
            qa = torch.linalg.qr(torch.randn(d_in, d_in, device=DEVICE))[0]
            qg = torch.linalg.qr(torch.randn(d_out, d_out, device=DEVICE))[0]
            lam = torch.zeros(d_out, d_in, device=DEVICE)
            row = {name: milliseconds(fn, a, g, qa, qg, lam) for name, fn in
                   [("tf32_ms", lambda_tf32), ("bf16_ms", lambda_bf16), ("bf16_chunk64_ms", lambda_bf16_chunk64),
                    ("bf16_rotations_only_ms", rotations_bf16)]}
            reference = lambda_float64(a[:32], g[:32], qa, qg)
            for name, fn in [("rel_err_tf32", lambda_tf32), ("rel_err_bf16", lambda_bf16)]:
                got = torch.zeros_like(lam)
                fn(a[:32], g[:32], qa, qg, got)
                row[name] = ((got.double() - reference).norm() / reference.norm()).item()
            out[f"lambda_{d_out}x{d_in}_T{4 * tokens}"] = row
            print(row, flush=True)
    # scores: 2,000 queries × one module (768 × 3072, 768 × 768) against a micro-batch of training rows
    for k in (768 * 3072, 768 * 768):
        for rows in (128, 256):
            q = torch.randn(2000, k, device=DEVICE, dtype=torch.bfloat16)
            t = torch.randn(rows, k, device=DEVICE, dtype=torch.bfloat16)
            block = torch.zeros(2000, rows, device=DEVICE)
            row = {"bf16_ms": milliseconds(scores_bf16, q, t, block),
                   "bf16_out32_ms": milliseconds(scores_bf16_out32, q, t, block),
                   "fp8_rowwise_ms": milliseconds(scores_fp8, q.to(torch.float8_e4m3fn), t, block,
                                                  torch.ones(2000, 1, device=DEVICE), torch.ones(1, rows, device=DEVICE))}
            out[f"scores_K{k}_B{rows}"] = row
            print(row, flush=True)
    json.dump(out, open(path, "w"), indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
