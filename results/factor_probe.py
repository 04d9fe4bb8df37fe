"""`--fast`'s factor kernels on one GPU at roberta-base's shapes: the covariance products (fast_kernels.gram) for a
factor batch's tokens, one product against the symmetric one (fast_kernels.SYMMETRIC_FROM), milliseconds per call and
how far apart (float32 results of bf16 inputs); and the eigendecomposition of roberta-base's 144 covariances
(random, positive definite), kronfluence's loop against fast_kernels.eigendecomposition's threads, seconds and the
largest difference of the eigenvalues.

    python results/factor_probe.py OUT.json
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


def eigendecompositions() -> dict:
    """kronfluence's perform_eigendecomposition against fast_kernels.eigendecomposition on the covariances of
    roberta-base's 72 linear modules (random, positive definite, float32 on the CPU as kronfluence loads them)."""
    from kronfluence.arguments import FactorArguments
    from kronfluence.factor.eigen import perform_eigendecomposition
    from kronfluence.utils.constants import (
        ACTIVATION_COVARIANCE_MATRIX_NAME,
        ACTIVATION_EIGENVALUES_NAME,
        GRADIENT_COVARIANCE_MATRIX_NAME,
        GRADIENT_EIGENVALUES_NAME,
        NUM_ACTIVATION_COVARIANCE_PROCESSED,
        NUM_GRADIENT_COVARIANCE_PROCESSED,
    )
    shapes = {f"layer.{i}.{name}": shape for i in range(12) for name, shape in (
        ("query", (769, 768)), ("key", (769, 768)), ("value", (769, 768)), ("attention_output", (769, 768)),
        ("intermediate", (769, 3072)), ("output", (3073, 768)))}
    factors = {name: {} for name in (ACTIVATION_COVARIANCE_MATRIX_NAME, GRADIENT_COVARIANCE_MATRIX_NAME,
                                      NUM_ACTIVATION_COVARIANCE_PROCESSED, NUM_GRADIENT_COVARIANCE_PROCESSED)}
    for module, (d_in, d_out) in shapes.items():
        for covariance, count, d in ((ACTIVATION_COVARIANCE_MATRIX_NAME, NUM_ACTIVATION_COVARIANCE_PROCESSED, d_in),
                                     (GRADIENT_COVARIANCE_MATRIX_NAME, NUM_GRADIENT_COVARIANCE_PROCESSED, d_out)):
            x = torch.randn(d, d, device="cuda")
            factors[covariance][module] = (x @ x.t() + d * torch.eye(d, device="cuda")).cpu()
            factors[count][module] = torch.tensor([1])

    class Model(torch.nn.Module):  # get_tracked_module_names reads the names of the TrackedModules
        pass

    class State:
        device, is_main_process = torch.device("cuda"), True

    from kronfluence.module import utils as module_utils
    names = list(shapes)
    original = module_utils.get_tracked_module_names
    fast_kernels.get_tracked_module_names = lambda model: names
    import kronfluence.factor.eigen as eigen
    eigen.get_tracked_module_names = lambda model: names
    fell_back = []  # the threads' stage handed to kronfluence's loop (fast_kernels' fallback): the timing is not theirs
    fallback = fast_kernels.perform_eigendecomposition
    fast_kernels.perform_eigendecomposition = lambda *args: fell_back.append(1) or fallback(*args)
    try:
        seconds, results = {}, {}
        for name, function in (("kronfluence_loop", perform_eigendecomposition),
                               ("threads", fast_kernels.eigendecomposition)):
            function(factors, Model(), State(), FactorArguments(), True)  # warm-up: cuSOLVER's handles, workspaces
            torch.cuda.synchronize()
            start = time.perf_counter()
            results[name] = function(factors, Model(), State(), FactorArguments(), True)
            seconds[name] = round(time.perf_counter() - start, 3)
    finally:
        fast_kernels.get_tracked_module_names = eigen.get_tracked_module_names = original
        fast_kernels.perform_eigendecomposition = fallback
    difference = max((results["threads"][values][m] - results["kronfluence_loop"][values][m]).abs().max().item()
                     / results["kronfluence_loop"][values][m].abs().max().item()
                     for values in (ACTIVATION_EIGENVALUES_NAME, GRADIENT_EIGENVALUES_NAME) for m in names)
    return {"matrices": 2 * len(names), "threads": fast_kernels.EIGEN_THREADS, "fell_back": bool(fell_back),
            "seconds": seconds,
            "largest_relative_eigenvalue_difference": difference}


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
    results["eigendecomposition"] = eigendecompositions()
    Path(out_path).write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
