"""A diagnostic: the speed and the error of the matmuls that fit EKFAC's factors, in each precision.

    python results/gemm_probe.py results/gemm_probe_h200.json

Covariance: the (tokens × d)ᵀ(tokens × d) product of one factor batch (256 rows × 4 choices × 64 tokens) for
roberta-base's two widths; lambda: the rotation Q_gᵀ G Q_a of a batch of per-example gradients (64 × 3072 × 768).
Each is timed in fp32 (TF32 off), in TF32, with bf16 inputs and an fp32 result (torch.mm's out_dtype: products
of bf16 numbers are exact in fp32 and summed in fp32), and in bf16. Inputs are bf16-representable (the autocast
forward's activations and gradients are bf16), so every variant multiplies the same numbers; the error is the
largest entry's relative difference from float64.
"""

import json
import sys
import time

import torch


def timed(fn, repeats: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def variants(a, b):
    """Callables computing a @ b in each precision (a, b float32 holding bf16-representable numbers)."""
    a16, b16 = a.bfloat16(), b.bfloat16()

    def fp32():
        torch.backends.cuda.matmul.allow_tf32 = False
        return a @ b

    def tf32():
        torch.backends.cuda.matmul.allow_tf32 = True
        return a @ b

    return {"fp32": fp32, "tf32": tf32, "bf16_in_fp32_out": lambda: (torch.mm if a16.dim() == 2 else torch.bmm)(
                a16, b16, out_dtype=torch.float32), "bf16": lambda: a16 @ b16}


def measure(name, a, b, flops):
    exact = (a.double() @ b.double())
    rows = {}
    for variant, fn in variants(a, b).items():
        try:
            seconds = timed(fn)
            err = ((fn().double() - exact).abs().max() / exact.abs().max()).item()
            rows[variant] = {"ms": round(seconds * 1e3, 3), "tflops": round(flops / seconds / 1e12, 1),
                             "max_rel_error": float(f"{err:.3g}")}
        except Exception as exc:  # e.g. out_dtype unsupported by this build
            rows[variant] = {"error": f"{type(exc).__name__}: {str(exc)[:120]}"}
        print(name, variant, rows[variant], flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return rows


def main():
    torch.manual_seed(0)
    out = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": "python results/gemm_probe.py " + " ".join(sys.argv[1:])}
    tokens = 256 * 4 * 64
    for d in (768, 3072):
        x = torch.randn(tokens, d, device="cuda").bfloat16().float()
        out[f"covariance_d{d}"] = measure(f"covariance d={d}", x.t().contiguous(), x, 2 * tokens * d * d)
    g = torch.randn(64, 3072, 768, device="cuda").bfloat16().float()
    qa, qg = (torch.linalg.qr(torch.randn(n, n, device="cuda"))[0].bfloat16().float() for n in (768, 3072))
    out["lambda_rotate_input"] = measure("lambda G Q_a", g, qa.expand(64, -1, -1).contiguous(), 2 * 64 * 3072 * 768 * 768)
    out["lambda_rotate_output"] = measure("lambda Q_g^T (G Q_a)", qg.t().expand(64, -1, -1).contiguous(), g,
                                          2 * 64 * 3072 * 3072 * 768)
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
