"""The fused scoring path (fused_scores.py) equals kronfluence's pairwise scores for the same factors."""

import copy
import threading
from contextlib import nullcontext

import kronfluence.factor.covariance
import kronfluence.factor.eigen
import numpy as np
import pytest
import torch
from datasets import Dataset, concatenate_datasets
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.config import FactorConfig
from kronfluence.module.tracked_module import TrackedModule
from kronfluence.module.tracker.factor import CovarianceTracker, LambdaTracker
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVALUES_NAME,
    ACTIVATION_EIGENVECTORS_NAME,
    GRADIENT_EIGENVALUES_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    LAMBDA_MATRIX_NAME,
)
from kronfluence.utils.dataset import DataLoaderKwargs

import fast_kernels
import fused_scores
import influence
from demo import build_demo_model, build_demo_tokenizer, make_demo_dataset
from fast_kernels import fast_factor_kernels, rotated_example_gradients, rotation_dtype
from formats import load_scores
from fused_scores import (
    AlignedEkfac,
    PerExampleGradients,
    fused_pairwise_scores,
    fused_self_scores,
    longest_first,
    micro_spans,
    row_lengths,
    tracked_linears,
    train_probes,
    with_bias_column,
)
from influence import AnalysisConfig, model_fit
from metrics import per_query_correlations
from pipeline import make_collator, tokenize
from task import MultipleChoiceTask
from utils import UserError


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    raw = make_demo_dataset(sizes={"train": 14, "validation": 5})
    tokenizer = build_demo_tokenizer(raw)
    torch.manual_seed(0)
    model = build_demo_model(tokenizer).double().eval()
    # varied lengths, so that length sorting really reorders rows and columns
    return model, tokenize(raw["train"], tokenizer), tokenize(raw["validation"], tokenizer), make_collator(tokenizer), \
        tmp_path_factory.mktemp("fused")


def fit(model, train, collator, strategy, out, dtype=torch.float64):
    task = MultipleChoiceTask()
    analyzer = Analyzer(analysis_name=strategy, model=prepare_model(copy.deepcopy(model), task), task=task,
                        output_dir=str(out), disable_tqdm=True, cpu=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator))
    torch.manual_seed(0)
    analyzer.fit_all_factors("f", dataset=train, per_device_batch_size=4, factor_args=FactorArguments(
        strategy=strategy, activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
        eigendecomposition_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype))
    return analyzer


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["identity", "diagonal", "kfac", "ekfac"])
@pytest.mark.parametrize("damping", [1e-8, None])
def test_fused_scores_equal_kronfluence(setup, strategy, damping):
    model, train, queries, collator, out = setup
    analyzer = fit(model, train, collator, strategy, out)
    dtype = torch.float64
    score_args = ScoreArguments(damping_factor=damping, per_sample_gradient_dtype=dtype, precondition_dtype=dtype,
                                score_dtype=dtype)
    analyzer.compute_pairwise_scores("s", factors_name="f", query_dataset=queries, train_dataset=train,
                                     per_device_query_batch_size=2, per_device_train_batch_size=3,
                                     score_args=score_args, overwrite_output_dir=True)
    reference = analyzer.load_pairwise_scores("s")["all_modules"].double()
    # a fresh, unprepared copy, 2 queries per pass (3 passes), odd batch sizes: the loops must not matter
    fused = fused_pairwise_scores(copy.deepcopy(model), MultipleChoiceTask(), analyzer.load_all_factors("f"), strategy,
                                  score_args, queries, train, collator, query_batch_size=3, train_batch_size=5,
                                  device=torch.device("cpu"), max_queries_per_pass=2, disable_tqdm=True)
    assert fused.shape == reference.shape == (5, 14)
    assert reference.abs().max() > 0
    # float64 throughout, but the two paths sum in other orders (choices inside the matmul, other batches), and the
    # preconditioner amplifies rounding by up to 1 / damping: ~1e-16 * 1e8 = 1e-8 relative at 1e-8, less with
    # kronfluence's heuristic damping (0.1 x mean eigenvalue, larger), well inside 1e-5
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["identity", "kfac", "ekfac"])
def test_fused_self_scores_equal_kronfluence(setup, strategy):
    model, train, _, collator, out = setup
    analyzer = fit(model, train, collator, strategy, out)
    dtype = torch.float64
    score_args = ScoreArguments(per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
    analyzer.compute_self_scores("self", factors_name="f", train_dataset=train, per_device_train_batch_size=3,
                                 score_args=score_args, overwrite_output_dir=True)
    reference = analyzer.load_self_scores("self")["all_modules"].double()
    fused = fused_self_scores(copy.deepcopy(model), MultipleChoiceTask(), analyzer.load_all_factors("f"), strategy,
                              score_args, train, collator, train_batch_size=5, device=torch.device("cpu"),
                              disable_tqdm=True)
    assert fused.shape == reference.shape == (14,)
    # a squared norm under a positive definite preconditioner: positive for every row
    assert (reference > 0).all()
    # the pairwise test's argument: float64, other summation orders, rounding amplified by at most 1 / damping
    # (~1e-8 relative) -- the float32 result vector adds its own 6e-8
    torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-6 * reference.abs().max().item())


def test_aligned_ekfac_preconditioning_equals_kronfluences():
    """The width padded to a multiple of ALIGN with zeros changes no sum: float64, each entry a sum of ~100 products,
    so the two agree to rounding (~1e-16 relative each), far inside 1e-12."""
    torch.manual_seed(0)
    d_out, width = 6, 11  # an odd width (d_in + 1 with the bias column): padded to 16
    f64 = dict(dtype=torch.float64)
    storage = {ACTIVATION_EIGENVECTORS_NAME: torch.linalg.qr(torch.randn(width, width, **f64))[0],
               GRADIENT_EIGENVECTORS_NAME: torch.linalg.qr(torch.randn(d_out, d_out, **f64))[0],
               LAMBDA_MATRIX_NAME: torch.rand(d_out, width, **f64) + 0.1}
    gradient = torch.randn(3, d_out, width, **f64)
    expected = FactorConfig.CONFIGS["ekfac"].precondition_gradient(gradient=gradient.clone(), storage=storage)
    aligned = AlignedEkfac({"m": storage})
    assert aligned.factors["m"][0].shape == (16, 16)
    got = aligned("m", gradient)
    assert got.shape == expected.shape == (3, d_out, width)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


def test_per_example_gradient_is_the_summed_choice_gradient(setup):
    """The hook's per-example gradient equals autograd's gradient of that example's loss."""
    model, train, _, collator, _ = setup
    batch = collator([train[i] for i in range(3)])
    task = MultipleChoiceTask()
    modules = tracked_linears(model, [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)])
    name, linear = next(iter(modules.items()))
    captured = {}
    with PerExampleGradients({name: linear}, torch.float64) as hooks:
        hooks.num_examples, hooks.callback = 3, lambda n, w, b: captured.setdefault(n, with_bias_column(w, b))
        task.compute_train_loss(batch, model).backward()
    for i in range(3):
        model.zero_grad()
        task.compute_train_loss({k: v[i:i + 1] for k, v in batch.items()}, model).backward()
        expected = torch.cat([linear.weight.grad, linear.bias.grad[:, None]], dim=1)
        torch.testing.assert_close(captured[name][i], expected)


def test_fused_rejects_modules_it_cannot_score(setup):
    model = setup[0]
    with pytest.raises(UserError, match="nn.Linear modules only"):
        tracked_linears(model, ["roberta.embeddings.word_embeddings"])


def test_longest_first_sorts_by_longest_choice():
    rows = Dataset.from_dict({"input_ids": [[[1] * 5, [1] * 2], [[1] * 3, [1]], [[1] * 9, [1]]]})
    assert list(longest_first(rows)) == [2, 0, 1]


class _NoRoomForCopies(torch.Tensor):
    """A full GPU's tensor: its index_select runs out of memory, its .cpu() is an ordinary tensor."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.index_select:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 562.00 MiB")
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return out.as_subclass(torch.Tensor) if func is torch.Tensor.cpu else out


@pytest.mark.parametrize("room", [True, False])
def test_scores_come_back_in_dataset_order_bitwise(room):
    """in_dataset_order: the scores of the length-sorted queries and training rows, put back in dataset order by a
    gather where they are, or on the CPU where that runs out of memory, are the scatter's numbers bitwise."""
    generator = torch.Generator().manual_seed(0)
    q_order, t_order = (torch.randperm(n, generator=generator).numpy() for n in (7, 33))
    scores = torch.randn(7, 33, generator=generator)
    expected = torch.empty_like(scores)
    expected[np.ix_(q_order, t_order)] = scores
    got = fused_scores.in_dataset_order(scores if room else scores.as_subclass(_NoRoomForCopies), q_order, t_order)
    assert type(got) is torch.Tensor and got.device.type == "cpu" and torch.equal(got, expected)


@pytest.mark.slow
def test_fast_path_agrees_with_fp32_reference_on_the_demo_model(demo_checkpoint, tmp_path):
    """bf16 compute with fp32 factor sums and fused scores tracks kronfluence's fp32 EKFAC on a trained
    model more closely than kronfluence's all-bf16 arguments; fitting lambda on a quarter of the rows
    costs some agreement (measured on the demo: Pearson 0.991, 0.958 and 0.956)."""
    from analyze import main

    common = ["--checkpoint_dir", str(demo_checkpoint), "--output_dir", str(tmp_path)]
    reference = load_scores(main(common))[0]
    fast = ["--use_half_precision", "--fp32_accumulation", "--scoring", "fused"]
    agreement = {name: per_query_correlations(load_scores(main(common + extra))[0], reference)
                 for name, extra in (("fast", fast), ("fast_lambda_quarter", [*fast, "--lambda_max_examples", "150"]),
                                     ("kronfluence_bf16", ["--use_half_precision"]), ("fast_flag", ["--fast"]))}
    # CPU, fixed seeds: each figure is deterministic; the thresholds sit below the measured values so that they
    # separate the configurations (bf16 rounds each product to 8 bits) rather than pin today's numbers
    assert all(a["undefined_rows"] == 0 and a["nonfinite_scores"] == 0 for a in agreement.values())
    assert agreement["fast"]["pearson"] >= 0.98, agreement
    assert agreement["fast_flag"]["pearson"] >= 0.98, agreement  # --fast: the combination, faster factor kernels
    assert agreement["fast"]["pearson"] > agreement["kronfluence_bf16"]["pearson"] + 0.01, agreement
    assert agreement["fast_lambda_quarter"]["pearson"] >= 0.9, agreement


def counting(monkeypatch, name):
    calls = []
    original = getattr(fast_kernels, name)
    monkeypatch.setattr(fast_kernels, name, lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


def assert_same_eigendecompositions(got: dict, expected: dict) -> None:
    """Two float64 eigendecompositions of the same covariances agree: eigenvalues and the matrices V diag(λ) Vᵀ they
    rebuild within 1e-12 of the largest eigenvalue (float64 rounding of sums of a few thousand terms). The vectors
    themselves are not compared: an eigenvector's sign and a degenerate eigenspace's basis are free, and nothing
    promises that eigh rounds alike in another thread or on another buffer."""
    pairs = ((ACTIVATION_EIGENVALUES_NAME, ACTIVATION_EIGENVECTORS_NAME),
             (GRADIENT_EIGENVALUES_NAME, GRADIENT_EIGENVECTORS_NAME))
    for values, vectors in pairs:
        assert got[values].keys() == expected[values].keys()
        for module, lam in expected[values].items():
            scale = lam.abs().max()
            assert (got[values][module] - lam).abs().max() <= 1e-12 * scale, (values, module)
            rebuilt = [v[vectors][module] @ torch.diag(v[values][module]) @ v[vectors][module].t() for v in (got, expected)]
            assert (rebuilt[0] - rebuilt[1]).abs().max() <= 1e-12 * scale, (vectors, module)


def float64_ekfac_analyzer(setup, tmp_path) -> tuple:
    """(kronfluence Analyzer of the demo model on the CPU, its training rows, float64 EKFAC factor arguments)."""
    model, train, _, collator, _ = setup
    task, dtype = MultipleChoiceTask(), torch.float64
    analyzer = Analyzer(analysis_name="fast", model=prepare_model(copy.deepcopy(model), task), task=task,
                        output_dir=str(tmp_path), disable_tqdm=True, cpu=True)
    analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator))
    args = FactorArguments(strategy="ekfac", activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
                           eigendecomposition_dtype=dtype, per_sample_gradient_dtype=dtype, lambda_dtype=dtype)
    return analyzer, train, args


@pytest.mark.slow
def test_fast_factor_kernels_equal_kronfluence(setup, tmp_path, monkeypatch):
    """--fast's covariance and lambda kernels give kronfluence's EKFAC factors (float64; the demo's widths 64 and
    128 plus the bias column are padded to multiples of 8), and after the block kronfluence's own code is back.
    Lambda is compared on the same eigenvectors: eigh is free to rotate a degenerate eigenspace."""
    analyzer, train, args = float64_ekfac_analyzer(setup, tmp_path)

    def stage(name, seed, covariance=True):
        torch.manual_seed(seed)  # the same sampled labels on both sides
        fit, load = ((analyzer.fit_covariance_matrices, analyzer.load_covariance_matrices) if covariance
                     else (analyzer.fit_lambda_matrices, analyzer.load_lambda_matrices))
        fit(name, train, factor_args=args, per_device_batch_size=4, overwrite_output_dir=True)
        return load(name)

    copies = []  # each batch's copy to the device: kronfluence's blocking one, non-blocking inside the block
    for loop in (kronfluence.factor.covariance, kronfluence.factor.eigen):
        monkeypatch.setattr(loop, "send_to_device", lambda *args, send=loop.send_to_device, **kwargs:
                            copies.append(kwargs.get("non_blocking", False)) or send(*args, **kwargs))
    reference = stage("reference", 0)
    grams, rotations = counting(monkeypatch, "gram"), counting(monkeypatch, "rotated_example_gradients")
    set_ups = []  # kronfluence's storage and count set-up: once a module and factor, on its first batch
    for name in ("_update_activation_covariance_matrix", "_update_gradient_covariance_matrix"):
        monkeypatch.setattr(CovarianceTracker, name, lambda self, *a, original=getattr(CovarianceTracker, name), **k:
                            set_ups.append(1) or original(self, *a, **k))
    with fast_factor_kernels(num_choices=4):
        fast = stage("fast", 0)
    modules = len(reference["activation_covariance"])
    assert len(set_ups) == 2 * modules
    # two per module and batch (14 rows, 4 a batch), but one for the input an attention layer's query, key and value
    # share: computed for the query, reused for the other two
    shared = [name for name in reference["activation_covariance"] if name.endswith(("self.key", "self.value"))]
    assert shared and len(grams) == (2 * modules - len(shared)) * 4
    analyzer.perform_eigendecomposition("reference", factor_args=args, overwrite_output_dir=True)
    eigen = analyzer.load_eigendecomposition("reference")
    decompositions, fallbacks = counting(monkeypatch, "eigendecomposition"), counting(monkeypatch, "perform_eigendecomposition")
    with fast_factor_kernels(num_choices=4):  # several matrices at once: the same eigh of each
        analyzer.perform_eigendecomposition("reference", factor_args=args, overwrite_output_dir=True)
    assert len(decompositions) == 1 and not fallbacks  # the threads' decompositions, not kronfluence's loop's
    from kronfluence.computer import factor_computer
    assert factor_computer.perform_eigendecomposition is kronfluence.factor.eigen.perform_eigendecomposition  # back
    assert_same_eigendecompositions(analyzer.load_eigendecomposition("reference"), eigen)
    reference.update(stage("reference", 1, covariance=False))
    lambda_set_ups = []
    monkeypatch.setattr(LambdaTracker, "_update_lambda_matrix", lambda self, *a, original=LambdaTracker.
                        _update_lambda_matrix, **k: lambda_set_ups.append(1) or original(self, *a, **k))
    with fast_factor_kernels(num_choices=4):
        fast.update(stage("reference", 1, covariance=False))
    assert len(rotations) == modules * 4 and len(lambda_set_ups) == modules  # the set-up on the first batch only
    stage("after", 0)
    assert len(grams) == (2 * modules - len(shared)) * 4  # kronfluence's own code is back
    assert copies == [False] * 4 + [True] * 4 + [False] * 4 + [True] * 4 + [False] * 4  # and its own copies
    for factor in ("activation_covariance", "gradient_covariance", "lambda_matrix", "num_activation_covariance_processed",
                   "num_gradient_covariance_processed", "num_lambda_processed"):
        for module, expected in reference[factor].items():
            got = fast[factor][module]
            if not expected.is_floating_point():  # the rows and tokens counted
                assert torch.equal(got, expected), (factor, module)
                continue
            # float64 sums of the same terms in another order (lambda: rotated before the product): ~1e-16
            # relative per term over a few thousand terms; 1e-12 still catches any missing or doubled term
            assert (got - expected).abs().max() <= 1e-12 * expected.abs().max(), (factor, module)


def test_a_failing_eigendecomposition_falls_back_to_kronfluences_loop(setup, tmp_path, monkeypatch, caplog):
    """fast_kernels.eigendecomposition: a RuntimeError in one of its decompositions (CUDA's, cuSOLVER's, running out of
    memory) leaves the stage to kronfluence's own loop, with a warning, and the same factors; another error raises."""
    analyzer, train, args = float64_ekfac_analyzer(setup, tmp_path)
    analyzer.fit_covariance_matrices("f", train, factor_args=args, per_device_batch_size=4)
    analyzer.perform_eigendecomposition("f", factor_args=args)
    expected = analyzer.load_eigendecomposition("f")
    eigh, failures, failures_as = torch.linalg.eigh, [], [RuntimeError]

    def failing_once(matrix):
        if not failures:
            failures.append(1)
            raise failures_as[0]("cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR")
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", failing_once)
    with fast_factor_kernels(num_choices=4):
        analyzer.perform_eigendecomposition("f", factor_args=args, overwrite_output_dir=True)
    assert "RuntimeError (cusolver error: CUSOLVER_STATUS_INTERNAL_ERROR); kronfluence's loop instead" in caplog.text
    assert_same_eigendecompositions(analyzer.load_eigendecomposition("f"), expected)
    failures.clear()
    failures_as[0] = ValueError  # not the GPU's: a fault of the code, raised
    with fast_factor_kernels(num_choices=4), pytest.raises(ValueError, match="CUSOLVER_STATUS"):
        analyzer.perform_eigendecomposition("f", factor_args=args, overwrite_output_dir=True)


def test_threaded_eigendecompositions_make_torchs_first_linear_algebra_call_in_the_calling_thread(
        setup, tmp_path, monkeypatch, caplog):
    """torch loads its GPU linear algebra lazily on the first eigh, and two threads making that first call at once
    fail ("lazy wrapper should be called at most once", seen on an H100, where the stage then fell back to
    kronfluence's loop). The first decomposition runs in the calling thread, the rest in the pool: here the threads
    are forced on the CPU and an eigh that fails unless its first call comes from the calling thread stands in."""
    analyzer, train, args = float64_ekfac_analyzer(setup, tmp_path)
    analyzer.fit_covariance_matrices("f", train, factor_args=args, per_device_batch_size=4)
    analyzer.perform_eigendecomposition("f", factor_args=args)
    expected = analyzer.load_eigendecomposition("f")
    eigh, callers, caller = torch.linalg.eigh, [], threading.get_ident()

    def lazily_loaded(matrix):
        if not callers and threading.get_ident() != caller:
            raise RuntimeError("lazy wrapper should be called at most once")
        callers.append(threading.get_ident())
        return eigh(matrix)

    monkeypatch.setattr(torch.linalg, "eigh", lazily_loaded)
    monkeypatch.setattr(fast_kernels, "eigen_threads", lambda device: 4)
    with fast_factor_kernels(num_choices=4):
        analyzer.perform_eigendecomposition("f", factor_args=args, overwrite_output_dir=True)
    assert "kronfluence's loop instead" not in caplog.text
    assert callers[0] == caller and set(callers[1:]) - {caller}  # the rest in the pool's threads
    assert_same_eigendecompositions(analyzer.load_eigendecomposition("f"), expected)


@pytest.mark.slow
def test_fast_lambda_applies_the_gradient_scale_as_kronfluence(setup, tmp_path):
    """kronfluence scales each per-sample gradient by the module's gradient_scale (fp16 loss scaling) before
    squaring; the fast lambda scales the squares by its square: the same lambda in float64."""
    analyzer, train, args = float64_ekfac_analyzer(setup, tmp_path)
    for module in analyzer.model.modules():
        if isinstance(module, TrackedModule):
            module.gradient_scale = 0.37
    analyzer.fit_covariance_matrices("s", train, factor_args=args, per_device_batch_size=4, overwrite_output_dir=True)
    analyzer.perform_eigendecomposition("s", factor_args=args, overwrite_output_dir=True)
    lambdas = []
    for kernels in (nullcontext(), fast_factor_kernels(num_choices=4)):
        torch.manual_seed(1)  # the same sampled labels
        with kernels:
            analyzer.fit_lambda_matrices("s", train, factor_args=args, per_device_batch_size=4, overwrite_output_dir=True)
        lambdas.append(analyzer.load_lambda_matrices("s")["lambda_matrix"])
    for name, expected in lambdas[0].items():  # float64 sums in another order: ~1e-16 relative per term
        assert (lambdas[1][name] - expected).abs().max() <= 1e-12 * expected.abs().max(), name


@pytest.mark.parametrize("width", [37, 48])
def test_wide_covariances_are_symmetric_products_of_the_same_sums(width, monkeypatch):
    """gram from SYMMETRIC_FROM columns: xᵀx as two products, the first half's rows (all columns) and the second half's
    diagonal block, the block below the diagonal the transpose of the one above, equal to one product in float64
    (each entry a sum of 300 products, perhaps in another order: within 1e-13 of the largest entry); an unaligned
    width (37: padded to 40, split at 16) too."""
    x = torch.randn(300, width, dtype=torch.float64, generator=torch.Generator().manual_seed(width))
    expected = x.t() @ x
    products, mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kwargs: products.append((a.shape, b.shape)) or mm(a, b, **kwargs))
    monkeypatch.setattr(fast_kernels, "SYMMETRIC_FROM", 16)
    got = fast_kernels.gram(x, torch.float64)
    padded_width = width + -width % fast_kernels.ALIGN
    half = padded_width // 2 // fast_kernels.ALIGN * fast_kernels.ALIGN
    assert products == [((half, 300), (300, padded_width)), ((padded_width - half, 300), (300, padded_width - half))]
    assert got.shape == (width, width) and torch.equal(got[half:, :half], got[:half, half:].t())
    assert (got - expected).abs().max() <= 1e-13 * expected.abs().max()
    products.clear()
    monkeypatch.setattr(fast_kernels, "SYMMETRIC_FROM", width + 1)  # narrower: one product of the padded x
    padded = torch.nn.functional.pad(x, (0, -width % fast_kernels.ALIGN))
    assert torch.equal(fast_kernels.gram(x, torch.float64), (padded.t() @ padded)[:width, :width])
    assert products == [((padded_width, 300), (300, padded_width))]


def test_rotated_example_gradients_identity():
    """(Gout Q_g)ᵀ (A Q_a) summed over an example's choices is Q_gᵀ (Σ_c Σ_t g aᵀ) Q_a, for odd widths."""
    torch.manual_seed(0)
    a, g = torch.randn(8, 5, 13, dtype=torch.float64), torch.randn(8, 5, 6, dtype=torch.float64)
    qa = torch.linalg.qr(torch.randn(13, 13, dtype=torch.float64))[0]
    qg = torch.linalg.qr(torch.randn(6, 6, dtype=torch.float64))[0]
    per_sequence = torch.einsum("sto,sti->soi", g, a)
    expected = qg.t() @ per_sequence.view(2, 4, 6, 13).sum(dim=1) @ qa
    got = rotated_example_gradients(a, g, qa, qg, group=4)
    assert got.shape == (2, 6, 13)
    assert torch.allclose(got, expected, rtol=0, atol=1e-12)


def test_lambda_rotations_in_bf16():
    """On a GPU a float32 lambda is rotated in bf16 (rotation_dtype); its sums of squares stay near float64's. Each
    rotated value carries seven bf16 roundings (the four inputs a, Q_a, g, Q_g, the two rotated factors and the
    result) of at most u = 2⁻⁸ relative each; independent roundings add in quadrature, √7 · u for the value and twice
    that, 0.021, for its square. That estimate is the tolerance (not a bound: a sum that cancels has no relative
    bound, and small lambda entries are off by more than large ones; measured here: 2.7e-3, relative Frobenius)."""
    assert rotation_dtype(torch.float32, torch.device("cuda")) == torch.bfloat16
    assert rotation_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert rotation_dtype(torch.float64, torch.device("cuda")) == torch.float64
    torch.manual_seed(0)
    a, g = torch.randn(64, 20, 40, dtype=torch.float64), torch.randn(64, 20, 24, dtype=torch.float64)
    qa = torch.linalg.qr(torch.randn(40, 40, dtype=torch.float64))[0]
    qg = torch.linalg.qr(torch.randn(24, 24, dtype=torch.float64))[0]
    expected = rotated_example_gradients(a, g, qa, qg, group=4).square().sum(dim=0)
    rotated = rotated_example_gradients(a.float(), g.float(), qa.float(), qg.float(), group=4, dtype=torch.bfloat16)
    assert rotated.dtype == torch.bfloat16
    got = torch.linalg.vector_norm(rotated, dim=0, dtype=torch.float32).square().double()
    error = ((got - expected).norm() / expected.norm()).item()
    assert 0 < error <= 2 * 7**0.5 * 2**-8, error


def test_the_models_fit_runs_length_sorted_batches_and_keeps_the_rows_order(setup, monkeypatch):
    """model_fit pads each batch to its own rows' longest choice, longest first, and returns each row's loss,
    preferred choice and label in the rows' order: those of each row run alone (float64; the losses to 1e-12
    relative: the same products summed in another order over widths of at most 128, through two layers, each
    rounding at 2.2e-16)."""
    model, train, _, collator, _ = setup
    widths, logits = [], influence.model_logits
    monkeypatch.setattr(influence, "model_logits",
                        lambda m, batch: widths.append(batch["input_ids"].size(-1)) or logits(m, batch))
    fit = model_fit(model, train, collator, 4, torch.device("cpu"))
    longest = sorted(row_lengths(train).tolist(), reverse=True)
    assert longest != row_lengths(train).tolist()  # the rows' own order is not longest first
    assert widths == [max(longest[i:i + 4]) for i in range(0, len(longest), 4)]
    alone = [model_fit(model, train.select([i]), collator, 1, torch.device("cpu")) for i in range(len(train))]
    assert torch.equal(fit["label"], torch.tensor(train["labels"]))
    assert torch.equal(fit["prediction"], torch.cat([row["prediction"] for row in alone]))
    torch.testing.assert_close(fit["loss"], torch.cat([row["loss"] for row in alone]), rtol=1e-12, atol=0)


def test_a_batchs_mask_is_cast_and_counted_once_for_all_its_modules():
    """masked_rows: the modules of a batch share its attention mask, so the covariance hooks take its cast and count
    from the first module's call; another batch's mask (another tensor, even with the same values) or another dtype
    is cast and counted again; rows that are not the mask's tokens (one a sequence) have none."""
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    first, second = (type("Tracked", (), {"attention_mask": mask})() for _ in range(2))
    shared = {}
    cast, count = fast_kernels.masked_rows(first, 6, torch.float64, shared)
    assert torch.equal(cast, mask.reshape(-1, 1).double()) and int(count) == 3
    again = fast_kernels.masked_rows(second, 6, torch.float64, shared)
    assert again[0] is cast and again[1] is count
    second.attention_mask = mask.clone()  # the next batch's
    assert fast_kernels.masked_rows(second, 6, torch.float64, shared)[0] is not cast
    assert fast_kernels.masked_rows(second, 6, torch.float32, shared)[0].dtype == torch.float32
    assert fast_kernels.masked_rows(second, 2, torch.float32, shared) == (None, 2)


def test_row_lengths_are_the_longest_choice_of_each_row():
    rows = Dataset.from_dict({"input_ids": [[[1] * 5, [1] * 2], [[1] * 3, [1]], [[1] * 9, [1]]]})
    assert row_lengths(rows).tolist() == [5, 3, 9]
    assert row_lengths(rows.select([2, 0])).tolist() == [9, 5]  # through an indices mapping
    assert row_lengths(rows.select([])).tolist() == []
    with pytest.raises(ValueError, match="a row without choices"):
        row_lengths(Dataset.from_dict({"input_ids": [[[1] * 5], [], [[1] * 2]]}))


def test_micro_spans_grow_within_the_longest_micro_batch_tokens():
    """Rows of 40 tokens then shorter: micro-batches of 2 rows at 40-21 tokens, 4 at 20-14, 6 at 13-11, 8 (GROWTH × 2)
    below; ranks take units of batches in turn, and a unit's end cuts a micro-batch short."""
    lengths = np.array([40, 40, 30, 21, 20, 20, 15, 14, 13, 12, 11, 11, 10, 9, 5, 5, 5, 5, 5, 5, 5, 5, 5, 5])
    spans = micro_spans(lengths, batch_size=3, micro=2)
    assert spans == [(0, 2), (2, 4), (4, 8), (8, 14), (14, 22), (22, 24)]  # one rank: all 8 batches one unit
    # two ranks: units of 4 batches of 3 rows (each rank one unit), the micro-batch of 6 rows at row 8 cut at 12
    assert micro_spans(lengths, 3, 2, 0, 2) == [(0, 2), (2, 4), (4, 8), (8, 12)]
    assert micro_spans(lengths, 3, 2, 1, 2) == [(12, 20), (20, 24)]
    for start, stop in spans:  # never more tokens than the first micro-batch (2 × 40), never more than 4 × 2 rows
        assert (stop - start) * lengths[start] <= 2 * 40 and stop - start <= fused_scores.GROWTH * 2
    ranks = [micro_spans(lengths, 3, micro, rank, 2) for rank, micro in ((0, 2), (1, 1))]  # ranks may differ in micro
    rows = sorted(row for spans in ranks for start, stop in spans for row in range(start, stop))
    assert rows == list(range(len(lengths)))  # every row once
    ranks = [micro_spans(lengths, 3, 1 + rank % 3, rank, 8) for rank in range(8)]  # 8 batches: a unit each
    assert all(ranks) and sorted(row for spans in ranks for a, b in spans for row in range(a, b)) == list(range(24))
    # ranks plan their own growth too: the units are the same whatever it is, so every row is still scored once
    ranks = [micro_spans(lengths, 3, micro, rank, 2, growth) for rank, micro, growth in ((0, 2, 4), (1, 2, 1))]
    assert sorted(row for spans in ranks for a, b in spans for row in range(a, b)) == list(range(24))
    assert train_probes(lengths, 2) == [(0, 2), (4, 8), (8, 14), (12, 20)]  # the first micro-batch of each size
    # without growth: micro-batches of 2 rows
    assert micro_spans(lengths, 3, 2, growth=1) == [(m, m + 2) for m in range(0, 24, 2)]
    with pytest.raises(ValueError, match="each needs >= 1"):
        micro_spans(lengths, 3, 0)


def test_units_hold_whole_micro_batches_of_every_growth():
    """One rank: a unit of rows g times as long as the rest, then the rest; every micro-batch of the rest has g × micro
    rows (none cut short by a unit's end), for every growth g: a unit holds a whole number of micro-batches of each.
    Several ranks take turns over units of GROWTH batches (the first ranks, which take the longer rows each round, get
    at most a unit's more rows than the others)."""
    batch, micro = 4, 2
    unit = batch * fused_scores.UNIT_BATCHES
    for g in range(1, fused_scores.GROWTH + 1):
        lengths = np.array([12 * g] * unit + [12] * (unit * 6))
        grown = [(a, b) for a, b in micro_spans(lengths, batch, micro) if a >= unit]
        assert grown and all(b - a == g * micro for a, b in grown), g
    lengths = np.full(batch * 40, 12)
    ranks = [micro_spans(lengths, batch, micro, rank, 3) for rank in range(3)]
    assert [spans[0][0] for spans in ranks] == [r * batch * fused_scores.GROWTH for r in range(3)]


def test_probes_bound_every_span():
    """Every micro-batch micro_spans makes has at most the rows and the tokens of one of train_probes' micro-batches
    (the memory of a micro-batch grows with both), for random lengths, batches and micro-batches."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        lengths = np.sort(rng.integers(1, 130, size=rng.integers(1, 200)))[::-1]
        batch, micro = int(rng.integers(1, 9)), int(rng.integers(1, 9))
        micro = min(micro, batch)
        probes = [(stop - start, lengths[start]) for start, stop in train_probes(lengths, micro)]
        for start, stop in micro_spans(lengths, batch, micro):
            assert (stop - start) * lengths[start] <= micro * lengths[0]
            assert any(stop - start <= rows and lengths[start] <= length for rows, length in probes), (start, stop)


def test_grown_micro_batches_give_the_same_scores(setup, monkeypatch):
    """micro_spans' larger micro-batches of shorter rows are the same sums (float64: rounding only). One row's
    choices are repeated three times (66-72 tokens against the others' 21-24), so the others may take twice the rows."""
    model, train, queries, collator = setup[:4]
    long = train.select([0]).map(lambda row: {key: [ids * 3 for ids in row[key]] for key in ("input_ids", "attention_mask")})
    train = concatenate_datasets([train, long])
    args = AnalysisConfig(factor_strategy="identity").score_arguments()
    args.per_sample_gradient_dtype = args.precondition_dtype = args.score_dtype = torch.float64

    def run():
        return fused_pairwise_scores(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, queries, train,
                                     collator, query_batch_size=4, train_batch_size=2, device=torch.device("cpu"),
                                     disable_tqdm=True)
    calls = []
    original = fused_scores.micro_spans
    monkeypatch.setattr(fused_scores, "micro_spans", lambda *a: calls.append(original(*a)) or calls[-1])
    grown = run()
    assert any(stop - start > 2 for start, stop in calls[-1])  # the demo's short rows took larger micro-batches
    fused_self_scores(copy.deepcopy(model), MultipleChoiceTask(), {}, "identity", args, train, collator,
                      train_batch_size=2, device=torch.device("cpu"), disable_tqdm=True)
    assert all(stop - start <= 2 for start, stop in calls[-1])  # self-influence keeps the planned micro-batch
    monkeypatch.setattr(fused_scores, "GROWTH", 1)
    plain = run()
    assert all(stop - start <= 2 for start, stop in calls[-1])
    torch.testing.assert_close(grown, plain, rtol=1e-12, atol=1e-12 * plain.abs().max().item())
