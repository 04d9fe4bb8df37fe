"""Fast factor kernels (analyze.py --fast): kronfluence's covariance and lambda updates computed as the same sums
in faster GPU kernels. Covariance products take bf16 inputs with float32 results; EKFAC's lambda rotates the
activations and output gradients into the eigenbases before the per-example gradient is formed, in bf16 with
float32 sums of squares; matmul widths are padded to a multiple of ALIGN; the eigendecompositions run several at a
time. `fast_factor_kernels` patches kronfluence's trackers and its eigendecomposition while it is open
(process-wide, not thread-safe); tests/test_fused.py checks the factors
against kronfluence's in float64 (on a CPU, where nothing is rounded to bf16)."""

import logging
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from functools import partial, wraps
from itertools import chain

import torch
from kronfluence.factor.config import FactorConfig
from kronfluence.factor.eigen import perform_eigendecomposition
from kronfluence.module.utils import get_tracked_module_names
from kronfluence.utils.constants import (
    ACTIVATION_COVARIANCE_MATRIX_NAME,
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    EIGENDECOMPOSITION_FACTOR_NAMES,
    GRADIENT_COVARIANCE_MATRIX_NAME,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    LAMBDA_MATRIX_NAME,
    NUM_ACTIVATION_COVARIANCE_PROCESSED,
    NUM_GRADIENT_COVARIANCE_PROCESSED,
    NUM_LAMBDA_PROCESSED,
)
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

logger = logging.getLogger(__name__)

ALIGN = 8  # matmul widths are padded to a multiple of this: the bias column's odd width (d_in + 1) selects
# cuBLAS kernels for unaligned memory, several times slower
# covariances this wide or wider are computed as symmetric products (gram): roberta-base's 3072-wide ones (a quarter
# of their multiply-adds saved); its 768-wide ones stay one product
SYMMETRIC_FROM = 2048
# covariance matrices eigendecomposed at once on a GPU, each thread on a CUDA stream of its own
EIGEN_THREADS = 4


def _pad_last(x: torch.Tensor, *dims: int) -> torch.Tensor:
    """x with zeros appended to its last len(dims) dimensions up to the next multiple of ALIGN (for matmuls)."""
    pad = []
    for size in reversed(dims):
        pad += [0, -size % ALIGN]
    return F.pad(x, pad) if any(pad) else x


def gram(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """xᵀx for the (tokens × d) matrix x, in `dtype`: kronfluence's covariance update. On a GPU a float32 result
    is computed from bf16 inputs (torch.mm's out_dtype: bf16 products are exact in float32 and summed in float32;
    the inputs are the numbers the autocast forward and backward multiply), elsewhere in `dtype`. From a width of
    SYMMETRIC_FROM it is two products: the rows of the first half of the columns, then the second half's block on the
    diagonal, the block below the diagonal the transpose of the one above (3/4 of the multiply-adds of one product;
    each entry the same dot product, the off-diagonal blocks exactly each other's transpose)."""
    d = x.size(1)
    if x.is_cuda and dtype == torch.float32:
        x, product = _pad_last(x.bfloat16(), d), partial(torch.mm, out_dtype=torch.float32)
    else:
        x, product = _pad_last(x.to(dtype), d), torch.mm
    if d < SYMMETRIC_FROM:
        return product(x.t(), x)[:d, :d]
    half = x.size(1) // 2 // ALIGN * ALIGN  # both halves' columns start at aligned addresses
    top = product(x[:, :half].t(), x)
    out = torch.empty(x.size(1), x.size(1), dtype=top.dtype, device=x.device)
    out[:half] = top
    out[half:, half:] = product(x[:, half:].t(), x[:, half:])
    out[half:, :half] = top[:, half:].t()
    return out[:d, :d]


def rotation_dtype(lambda_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype EKFAC's lambda rotations compute in: bf16 on a GPU for a float32 lambda, else the lambda's own
    dtype. bf16 tensor cores run at twice TF32's rate on half the bytes (results/kernel_probe.py: 2.3-2.9x faster on
    roberta-base's shapes), with float32 sums inside each product and for the sum of squares; the lambda is within
    0.15% of float64's in relative Frobenius norm on random inputs, its small entries less closely, and on the
    trained MiniLM `--fast`'s scores keep a Pearson of 0.9997 with kronfluence's fp32 EKFAC
    (results/agreement_anetcap_minilm.sh)."""
    return torch.bfloat16 if device.type == "cuda" and lambda_dtype == torch.float32 else lambda_dtype


def rotated_example_gradients(activation: torch.Tensor, output_gradient: torch.Tensor, activation_eigenvectors,
                              gradient_eigenvectors, group: int, dtype: torch.dtype = None) -> torch.Tensor:
    """Q_gᵀ G Q_a for each example's gradient G = Σ_t g_t a_tᵀ, where an example is `group` consecutive sequences
    of the (sequences, tokens, ·) inputs, without forming G: (Gout Q_g)ᵀ (A Q_a) over the tokens of the example's
    sequences. kronfluence forms G (tokens·d_in·d_out multiply-adds) and rotates it (d_in·d_out·(d_in + d_out));
    rotating first costs tokens·(d_in² + d_out² + d_in·d_out), less while an example has fewer tokens than its
    layer is wide (roberta-base: 768; an example here has at most 4 × 128). Computed in `dtype` (default: the
    eigenvectors'), inputs and result; the matmuls sum in float32 at least."""
    dtype = dtype or activation_eigenvectors.dtype
    sequences, tokens, d_in = activation.shape
    examples = sequences // group
    a = _pad_last(activation.reshape(examples, group * tokens, d_in).to(dtype), d_in)
    g = output_gradient.reshape(examples, group * tokens, -1).to(dtype)
    q_a = _pad_last(activation_eigenvectors.to(dtype), d_in, d_in)
    rotated = (g @ gradient_eigenvectors.to(dtype)).transpose(1, 2) @ (a @ q_a)
    return rotated[..., :d_in]


def token_mask(module, rows: int):
    """kronfluence's rule for a tracked module's flattened (rows × d) activations or gradients: its attention mask
    as a (rows, 1) column when there is one per row (token rows), else None (one row per sequence, no mask)."""
    mask = module.attention_mask
    return mask.reshape(-1, 1) if mask is not None and rows == mask.numel() else None


def masked_rows(module, rows: int, dtype: torch.dtype, shared: dict) -> tuple:
    """(token_mask in `dtype` or None, the count of rows it keeps: a tensor, or `rows` without a mask). Every module
    of a batch has the same attention mask: `shared` keeps the last mask's cast and count, so that they are computed
    once a batch and not once a module."""
    mask = token_mask(module, rows)
    if mask is None:
        return None, rows
    last = shared.get("mask")
    if last is None or last[0]() is not module.attention_mask or last[1] != dtype:
        last = (weakref.ref(module.attention_mask), dtype, mask.to(dtype), mask.sum())
        shared["mask"] = last
    return last[2], last[3]


def _timed(hook, times, name: str):
    """`hook` inside `times.part(name)` (utils.HookTimes), or `hook` itself where `times` is None. A forward hook's
    last argument is the module's output, a tensor hook's the gradient: where the part's kernels run."""
    if times is None:
        return hook

    @wraps(hook)
    def timed(*args):
        with times.part(name, args[-1].is_cuda):
            return hook(*args)
    return timed


def _covariance_hooks(original_register, shared: dict, times=None):
    """A replacement for kronfluence's CovarianceTracker.register_hooks: for nn.Linear, each batch's xᵀx by `gram`
    from the activations and output gradients as the forward and backward hand them over, kronfluence's bias column
    (ones, masked like the activations) added as the activations' column sums and the count of rows, without its
    float32 copies of the activations (masked, with the column appended) and output gradients; anything else goes to
    kronfluence's own hooks. kronfluence's set-up of the storage and counts runs on an empty batch the first time;
    later batches add their counts themselves. Modules that read the same input one after another (an attention
    layer's query, key and value) share its products: `shared` holds the last input's (the same sums kronfluence
    computes for each), and the batch's mask and count (masked_rows). The hooks launch about 15% fewer operations a
    batch than with kronfluence's bookkeeping every time (3,396 against 3,986 a batch of a 12-layer RoBERTa, counted
    on a CPU): on an H100 the GPU idles through 15% of the covariance of 8,192 anetcap rows
    (results/covariance_probe_h100.json).
    `times`: a utils.HookTimes the hooks report to."""

    def register_hooks(self):
        module = self.module
        if not isinstance(module.original_module, nn.Linear):
            return original_register(self)
        args, has_bias = module.factor_args, module.original_module.bias is not None

        def activation_products(source: torch.Tensor, dtype: torch.dtype) -> tuple:
            """(xᵀx, the column sums of x or None without a bias, the count of rows) for the masked input x."""
            last = shared.get("activation")
            if (last is not None and last[0]() is source and last[1] == source._version
                    and last[2] is module.attention_mask and last[3] == (dtype, has_bias)):
                return last[4]
            activation = source.detach().flatten(0, -2)
            if activation.is_cuda and dtype == torch.float32:
                activation = activation.bfloat16()  # what the autocast matmul multiplies; gram's products are exact
            else:
                activation = activation.to(dtype)
            mask, count = masked_rows(module, activation.size(0), activation.dtype, shared)
            if mask is not None:
                activation = activation * mask
            # Σ_t [a_t, m_t]ᵀ[a_t, m_t] with m_t ∈ {0, 1}: the masked sums of a, and Σ m_t = the count
            products = (gram(activation, dtype), activation.sum(dim=0, dtype=dtype) if has_bias else None, count)
            # a weak reference: the input is not kept beyond its batch (nor through the stages after the covariance)
            shared["activation"] = (weakref.ref(source), source._version, module.attention_mask, (dtype, has_bias),
                                    products)
            return products

        @torch.no_grad()
        def forward_hook(_, inputs, outputs):
            # the storage's dtype: kronfluence allocates it like the empty batch below
            product, sums, count = activation_products(inputs[0], args.activation_covariance_dtype)
            d = product.size(0)
            if self._activation_covariance_initialized:
                module.storage[NUM_ACTIVATION_COVARIANCE_PROCESSED].add_(count)
            else:  # kronfluence's set-up of the storage and counts, on an empty batch
                self._update_activation_covariance_matrix(product.new_empty(0, d + has_bias), count)
            storage = module.storage[ACTIVATION_COVARIANCE_MATRIX_NAME]
            storage[:d, :d].add_(product)
            if has_bias:
                storage[:d, d].add_(sums)
                storage[d, :d].add_(sums)
                storage[d, d].add_(count)
            self.cached_hooks.append(outputs.register_hook(backward_hook))

        @torch.no_grad()
        def backward_hook(output_gradient):
            self.cached_hooks.pop().remove()
            gradient = output_gradient.detach().flatten(0, -2)
            count = masked_rows(module, gradient.size(0), gradient.dtype, shared)[1]
            if self._gradient_covariance_initialized:
                module.storage[NUM_GRADIENT_COVARIANCE_PROCESSED].add_(count)
            else:  # kronfluence's set-up of the storage and counts, on an empty batch
                empty = gradient.new_empty(0, gradient.size(1), dtype=args.gradient_covariance_dtype)
                self._update_gradient_covariance_matrix(empty, count)
            storage = module.storage[GRADIENT_COVARIANCE_MATRIX_NAME]
            scale = module.gradient_scale ** 2 if module.gradient_scale != 1.0 else 1
            storage.add_(gram(gradient, storage.dtype), alpha=scale)

        forward_hook = _timed(forward_hook, times, "covariance: activations")
        backward_hook = _timed(backward_hook, times, "covariance: gradients")
        self.registered_hooks.append(module.register_forward_hook(forward_hook))

    return register_hooks


def _lambda_hooks(original_register, group: int, times=None):
    """A replacement for kronfluence's LambdaTracker.register_hooks: for EKFAC on nn.Linear, the rotated example
    gradients of `rotated_example_gradients`, squared and summed into its lambda storage; anything else (shared
    parameters, offloaded activations, diagonal, other modules) goes to kronfluence's own hooks. kronfluence's
    set-up of the storage runs on an empty batch the first time (where it would then add a zero lambda). `times`: a
    utils.HookTimes the hooks report to."""

    def register_hooks(self):
        module, args = self.module, self.module.factor_args
        if (args.has_shared_parameters or args.offload_activations_to_cpu
                or not FactorConfig.CONFIGS[args.strategy].requires_eigendecomposition_for_lambda
                or not isinstance(module.original_module, nn.Linear)):
            return original_register(self)
        per_example = group if module.per_sample_gradient_process_fnc is not None else 1

        @torch.no_grad()
        def forward_hook(_, inputs, outputs):
            self.cached_activations = inputs[0].detach().to(dtype=args.per_sample_gradient_dtype, copy=True)
            self.cached_hooks.append(outputs.register_hook(backward_hook))

        @torch.no_grad()
        def backward_hook(output_gradient):
            self.cached_hooks.pop().remove()
            activation = module._flatten_input_activation(input_activation=self.cached_activations)
            self.clear_all_cache()
            output_gradient = output_gradient.detach().to(dtype=args.per_sample_gradient_dtype)
            if activation.dim() == 2:  # no token dimension: one token per sequence
                activation, output_gradient = activation[:, None], output_gradient[:, None]
            examples = activation.size(0) // per_example
            storage = module.storage
            if storage[NUM_LAMBDA_PROCESSED] is None:  # kronfluence's set-up (storage, eigenvectors): the first batch
                empty = torch.empty(0, output_gradient.size(-1), activation.size(-1), dtype=args.lambda_dtype,
                                    device=output_gradient.device)
                self._update_lambda_matrix(per_sample_gradient=empty)
            lam = storage[LAMBDA_MATRIX_NAME]
            rotated = rotated_example_gradients(activation, output_gradient, storage[ACTIVATION_EIGENVECTORS_NAME],
                                                storage[GRADIENT_EIGENVECTORS_NAME], per_example,
                                                rotation_dtype(lam.dtype, lam.device))
            storage[NUM_LAMBDA_PROCESSED].add_(examples)
            # the sum of squares over the examples in one read of the rotated gradients (squaring them in place,
            # then summing, reads them twice and writes them once: the batch's largest memory traffic), summed in the
            # lambda's dtype; the same sum to rounding (a square root, then its square: about one float32 ulp)
            squares = torch.linalg.vector_norm(rotated, dim=0, dtype=lam.dtype).square_()
            lam.add_(squares, alpha=module.gradient_scale ** 2 if module.gradient_scale != 1.0 else 1)

        forward_hook = _timed(forward_hook, times, "lambda: activations")
        backward_hook = _timed(backward_hook, times, "lambda: rotated squares")
        self.registered_hooks.append(module.register_forward_hook(forward_hook))

    return register_hooks


def eigen_threads(device: torch.device) -> int:
    """Threads for `eigendecomposition`: EIGEN_THREADS on a GPU; none on a CPU, whose eigh already runs on every core
    (another thread's would get another OpenMP pool)."""
    return EIGEN_THREADS if device.type == "cuda" else 0


def eigendecomposition(covariance_factors: dict, model: nn.Module, state, factor_args, disable_tqdm: bool = False) -> dict:
    """kronfluence's perform_eigendecomposition with EIGEN_THREADS matrices decomposed at once, each thread on a CUDA
    stream of its own: per module and factor the same `eigh` of the same normalised, symmetrised matrix in the
    eigendecomposition dtype, the results in the covariance's dtype on the CPU. A GPU
    eigendecomposition waits on the host between its steps (cuSOLVER), one matrix after another, 144 for
    roberta-base; several at once fill those waits. Each thread holds a few copies of its matrix (the copy, the
    symmetrised one, the eigenvectors, cuSOLVER's workspace: about 0.3 GiB at 3072 wide in float64); a RuntimeError
    in a decomposition (CUDA's and cuSOLVER's errors, running out of memory) leaves the stage to kronfluence's own
    loop, which retries after running out of memory. On a CPU one matrix after another, in the calling thread."""
    jobs = [(module, names) for module in get_tracked_module_names(model=model) for names in (
        (ACTIVATION_COVARIANCE_MATRIX_NAME, NUM_ACTIVATION_COVARIANCE_PROCESSED, ACTIVATION_EIGENVECTORS_NAME,
         ACTIVATION_EIGENVALUES_NAME),
        (GRADIENT_COVARIANCE_MATRIX_NAME, NUM_GRADIENT_COVARIANCE_PROCESSED, GRADIENT_EIGENVECTORS_NAME,
         GRADIENT_EIGENVALUES_NAME))]
    streams = threading.local()

    def decompose(job) -> tuple:
        module, (covariance, count, _, _) = job
        if state.device.type == "cuda" and not hasattr(streams, "stream"):
            streams.stream = torch.cuda.Stream(state.device)
        with torch.cuda.stream(streams.stream) if state.device.type == "cuda" else nullcontext():
            dtype = covariance_factors[covariance][module].dtype
            # a copy on the CPU too, where kronfluence's loop divides the covariance itself: the fallback below
            # decomposes the matrices as they came
            matrix = covariance_factors[covariance][module].to(device=state.device, copy=True,
                                                               dtype=factor_args.eigendecomposition_dtype)
            matrix.div_(covariance_factors[count][module].to(device=state.device))
            matrix = matrix + matrix.t()  # as kronfluence: numerically not quite symmetric
            matrix.mul_(0.5)
            values, vectors = torch.linalg.eigh(matrix)
            return (values.contiguous().to(dtype=dtype, device="cpu"),
                    vectors.contiguous().to(dtype=dtype, device="cpu"))  # blocking: done on this stream

    factors = {name: {} for name in EIGENDECOMPOSITION_FACTOR_NAMES}
    threads = eigen_threads(state.device)
    try:
        with ThreadPoolExecutor(threads) if threads else nullcontext() as pool, \
                tqdm(total=len(jobs), desc="Performing Eigendecomposition",
                     disable=not state.is_main_process or disable_tqdm) as bar:
            # the first in this thread: torch loads its GPU linear algebra lazily on the first call, and two threads
            # making that call at once fail ("lazy wrapper should be called at most once")
            first = [decompose(job) for job in jobs[:1]]
            decomposed = chain(first, pool.map(decompose, jobs[1:]) if pool else map(decompose, jobs[1:]))
            for (module, (_, _, vectors, values)), results in zip(jobs, decomposed):
                factors[values][module], factors[vectors][module] = results
                bar.update(1)
    except RuntimeError as exc:  # kronfluence's own loop instead (and its retry after running out of memory)
        logger.warning("eigendecomposition: %s (%s); kronfluence's loop instead", type(exc).__name__,
                       str(exc).splitlines()[0] if str(exc) else "")
        return perform_eigendecomposition(covariance_factors, model, state, factor_args, disable_tqdm)
    return factors


@contextmanager
def fast_factor_kernels(num_choices: int = 1, times=None):
    """Inside the block kronfluence fits covariance and lambda factors with faster kernels for the same sums
    (analyze.py --fast): each batch's covariance xᵀx by `gram` (bf16 inputs, float32 result, on a GPU) and
    EKFAC's lambda from `rotated_example_gradients` (rotated before the example gradient is formed; bf16 with
    float32 sums on a GPU, `rotation_dtype`), and the eigendecomposition runs several matrices at once
    (`eigendecomposition`, the same decompositions). Widths are padded to multiples of ALIGN. `num_choices`: the sequences
    per example that the task's per-sample-gradient post-processing sums (MultipleChoiceTask). `times`: a
    utils.HookTimes that the covariance and lambda hooks report their seconds to. tests/test_fused.py checks that
    the factors equal kronfluence's in float64.

    The factor loops also copy each batch to the GPU without waiting: kronfluence's blocking copy first waits for the
    previous batch's work to finish, so the host's Python for the next batch (its hooks run once per module) cannot
    run ahead of the GPU. The loader's pinned memory is held until its copy is done (PyTorch's host allocator)."""
    from kronfluence.computer import factor_computer
    from kronfluence.factor import covariance, eigen
    from kronfluence.module.tracker.factor import CovarianceTracker, LambdaTracker

    saved = (CovarianceTracker.register_hooks, LambdaTracker.register_hooks, factor_computer.perform_eigendecomposition)
    loops = [(module, module.send_to_device) for module in (covariance, eigen)]  # the covariance and lambda loops
    shared = {}  # the last input's covariance products, for the next module reading the same input
    CovarianceTracker.register_hooks = _covariance_hooks(saved[0], shared, times)
    LambdaTracker.register_hooks = _lambda_hooks(saved[1], num_choices, times)
    factor_computer.perform_eigendecomposition = eigendecomposition
    for module, send in loops:
        module.send_to_device = partial(send, non_blocking=True)
    try:
        yield
    finally:
        shared.clear()
        CovarianceTracker.register_hooks, LambdaTracker.register_hooks, factor_computer.perform_eigendecomposition = saved
        for module, send in loops:
            module.send_to_device = send
