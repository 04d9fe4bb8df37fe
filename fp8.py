"""The fused scoring's contraction in fp8 e4m3: rows of one operand each scaled to e4m3's range by a float32 scale of
their own, the product in torch._scaled_mm (float32 sums and results), so a pass's query gradients take half the bytes
of bf16 ones (analyze.py --fp8_contraction). fp8's peak matmul rate is twice bf16's; at the contraction's shapes
(2,000 query rows × a micro-batch of a few hundred training rows, K up to 2.4M) torch's one-scale kernels run at
0.8-1.8× bf16's rate on an H100, before the training side's e4m3 cast (results/contraction_kernels_h100.json).

e4m3 keeps 3 bits of mantissa: a value's rounding error is at most 2⁻⁴ of it (above 2⁻⁶ × its row's scale, where the
format stops being normal; below, at most 2⁻¹⁰ × the scale). A query gradient's row is scaled by its largest
magnitude. A training row's per-example gradient Σₜ gₜ aₜᵀ (output gradients g, inputs a, over its tokens) is scaled
before it is formed, by the Cauchy-Schwarz bound max_o ‖g[:, o]‖ · max_i ‖a[:, i]‖ on its largest entry: the output
gradients are divided by it, so the bf16 product comes out in e4m3's range and is rounded to e4m3 in one pass, with no
pass over it to find its largest entry. The bound may exceed that entry many times over at no cost in precision: the
entries stay normal down to 2⁻⁶ / BOUND_TARGET (1 / 28,000) of the bound, and those below keep an absolute error of
2⁻¹⁰ of the row's scale, far below the larger entries' errors.
"""

import torch

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# torch._scaled_mm's GPU kernels take operands whose row counts (and shared width) are multiples of this
ROWS_ALIGN = 16
# Where a training row's bound maps: below E4M3_MAX by more than the rounding of the scaled bf16 output gradients
# (2⁻⁹ relative), of the per-example gradient's bf16 result (2⁻⁹) and of its float32 sums, so that no entry overflows
# e4m3 (which has no infinity)
BOUND_TARGET = E4M3_MAX * (1 - 2**-5)


def supported(device: torch.device) -> bool:
    """Whether torch._scaled_mm runs fp8 here: on a CPU (emulated) and on GPUs of compute capability 8.9 and above
    (Ada, Hopper and later)."""
    return device.type == "cpu" or (device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9))


def aligned(rows: int) -> int:
    """`rows` rounded up to a multiple of ROWS_ALIGN (the padding rows are zeros, their products discarded)."""
    return -(-rows // ROWS_ALIGN) * ROWS_ALIGN


def scaled_rows(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """x (rows × K) rounded to e4m3 into `out` (the same shape), each row divided by its largest magnitude over
    E4M3_MAX; returns those scales (float32, x ≈ out × scale; 1 for a row of zeros)."""
    amax = x.abs().amax(dim=1).float()
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    out.copy_(x.float() / scale[:, None])
    return scale


def gradient_scales(output_grad: torch.Tensor, activation: torch.Tensor) -> torch.Tensor:
    """Per example (output_grad: examples × tokens × d_out, activation: examples × tokens × d_in), the float32 scale
    that maps the Cauchy-Schwarz bound on its per-example gradient's largest entry to BOUND_TARGET (1 for a zero
    bound)."""
    norms = [torch.linalg.vector_norm(x, dim=1, dtype=torch.promote_types(x.dtype, torch.float32)).amax(dim=1)
             for x in (output_grad, activation)]  # float32 sums (float64 ones for float64 gradients)
    bound = (norms[0] * norms[1]).float()
    return torch.where(bound > 0, bound / BOUND_TARGET, torch.ones_like(bound))


def product(a: torch.Tensor, a_scales: torch.Tensor, b: torch.Tensor, b_scales: torch.Tensor) -> torch.Tensor:
    """(a × a_scales) @ (b × b_scales)ᵀ in float32, from e4m3 rows a (m × K) and b (n × K), m, n and K multiples of
    ROWS_ALIGN on a GPU, and their float32 row scales: the e4m3 product in torch._scaled_mm's one-scale kernels
    (float32 sums and result; on an H100 0.9-4.2× the rate of its row-scaled kernels at the contraction's shapes,
    results/contraction_kernels_h100.json), the row scales applied to the result. Unscaled, the sums stay far inside
    float32's range: each product is at most 448², K of them."""
    one = torch.ones((), device=a.device)
    return torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32) \
        .mul_(a_scales[:, None]).mul_(b_scales[None, :])
