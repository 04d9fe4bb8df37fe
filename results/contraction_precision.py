"""How much the fused scoring's contraction (each pass's query gradients, EKFAC-preconditioned, with every training
row's per-example gradient) loses in lower precision, on a fine-tuned model: one analyze.py run (`--scoring fused`,
float32 gradients) whose contraction is computed three times over the same gradients, in float64, in bf16 (float32
sums: what `--fast` runs) and in fp8 e4m3 with one scale per row (fp8.product: torch._scaled_mm, float32 results; the
bias parts in bf16). Runs on a CPU (torch's _scaled_mm emulates fp8 there; a GPU's kernels may round the sums differently).

    python results/contraction_precision.py OUT.json --checkpoint_dir CHECKPOINT --train_file TRAIN \
        --validation_file VALIDATION --max_train_samples 256 --num_queries 50 --work_dir /tmp/contraction

Writes OUT.json: per precision, the mean and the lowest per-query Pearson with the float64 contraction's scores
(metrics.per_query_correlations, rows in the scoring's order), and the mean over queries of ‖error‖ / ‖scores‖.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository root
import analyze  # noqa: E402
import fp8  # noqa: E402
import fused_scores  # noqa: E402
from influence import library_versions  # noqa: E402
from metrics import correlation, per_query_correlations  # noqa: E402

PRECISIONS = ["float64", "bf16", "fp8"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output", type=Path)
    parser.add_argument("--checkpoint_dir", type=Path, required=True, help="a train.py checkpoint")
    parser.add_argument("--train_file", required=True)
    parser.add_argument("--validation_file", required=True)
    parser.add_argument("--max_train_samples", type=int, default=256)
    parser.add_argument("--num_queries", type=int, default=50)
    parser.add_argument("--work_dir", type=Path, default=Path("/tmp/contraction_precision"),
                        help="analyze.py's outputs (its finished factors are reused)")
    return parser.parse_args(argv)


def fp8_rows(x: torch.Tensor) -> tuple:
    """x (rows × K) in e4m3 with one float32 scale per row (x ≈ q * scale; fp8.scaled_rows), the scales as a column."""
    q = torch.empty(x.shape, dtype=fp8.E4M3, device=x.device)
    return q, fp8.scaled_rows(x, q)[:, None]


def contract(queries: torch.Tensor, train: torch.Tensor, precision: str) -> torch.Tensor:
    """queries (Q × K) · train (N × K)ᵀ in `precision`, as float32."""
    if precision == "float64":
        return (queries.double() @ train.double().T).float()
    if precision == "bf16":
        return (queries.bfloat16() @ train.bfloat16().T).float()
    q, q_scale = fp8_rows(queries)
    t, t_scale = fp8_rows(train)
    return fp8.product(q, q_scale[:, 0], t, t_scale[:, 0]).float()


def main(argv=None):
    args = parse_args(argv)
    blocks = {}  # precision -> the (queries × training rows) scores, in the scoring's order

    def add_scores(self, name, weight, bias):  # FusedScorer._add_scores, once per precision
        w, b, _ = self.query_grads[name]
        view = self.hooks.block  # rows of the (queries × training rows) scores, and a micro-batch's columns of them
        row, column = divmod(view.storage_offset(), view.stride(0))
        where = (slice(row, row + view.size(0)), slice(column, column + view.size(1)))
        for precision in PRECISIONS:
            block = contract(w, weight.flatten(1), precision)
            if b is not None:
                block += contract(b, bias, "float64" if precision == "float64" else "bf16")
            if precision not in blocks:
                blocks[precision] = torch.zeros(args.num_queries, view.stride(0))
            blocks[precision][where] += block
            if precision == "float64":
                view.add_(block)  # the run's own scores

    fused_scores.FusedScorer._add_scores = add_scores
    started = time.perf_counter()
    analyze.main(["--checkpoint_dir", str(args.checkpoint_dir), "--train_file", args.train_file,
                  "--validation_file", args.validation_file, "--max_train_samples", str(args.max_train_samples),
                  "--num_queries", str(args.num_queries), "--scoring", "fused", "--output_dir", str(args.work_dir)])
    if not blocks:
        sys.exit(f"analyze.py reused the scores in {args.work_dir}: pass a --work_dir without them")
    reference = blocks["float64"]
    out = {"command": "python results/contraction_precision.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "hardware": f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
           "versions": library_versions(),
           "date": time.strftime("%Y-%m-%d"), "seconds": round(time.perf_counter() - started, 1),
           "queries": reference.size(0), "training_rows": reference.size(1), "precisions": {}}
    for precision in PRECISIONS[1:]:
        scores = blocks[precision]
        pearson = correlation(scores.double().numpy(), reference.double().numpy(), axis=1)
        relative = ((scores - reference).norm(dim=1) / reference.norm(dim=1)).double().numpy()
        out["precisions"][precision] = {**per_query_correlations(scores, reference),
                                        "lowest_pearson": float(np.nanmin(pearson)),
                                        "mean_relative_error": float(relative.mean())}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["precisions"], indent=1))


if __name__ == "__main__":
    main()
