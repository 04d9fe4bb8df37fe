"""SOURCE (source.py, analyze.py --source_horizon): its matrix functions against dense unrolling, its scores against
per-example gradients taken by autograd at each segment's weights, and its command line."""

import copy
import json

import numpy as np
import pytest
import scipy.linalg
import torch
from conftest import TINY
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.utils.constants import (
    ACTIVATION_EIGENVECTORS_NAME,
    GRADIENT_EIGENVECTORS_NAME,
    LAMBDA_MATRIX_NAME,
    NUM_LAMBDA_PROCESSED,
)
from kronfluence.utils.dataset import DataLoaderKwargs
from test_memory import failing_backward

import analyze
import formats
import train
from demo import build_demo_model, build_demo_tokenizer, make_demo_dataset
from fused_scores import linear_module_names, model_weights, tracked_linears, with_bias_column
from pipeline import make_collator, tokenize
from source import Segment, SourcePreconditioner, eigenvalue_functions, learning_rate_shares, source_pairwise_scores
from task import MultipleChoiceTask
from utils import UserError

F64 = torch.float64


def random_factors(generator, d_out: int, d_in: int, name: str = "m") -> dict:
    """One module's EK-FAC factors: random orthogonal eigenbases, eigenvalues spread over six decades (some 0)."""
    q_out = torch.linalg.qr(torch.randn(d_out, d_out, generator=generator, dtype=F64))[0]
    q_in = torch.linalg.qr(torch.randn(d_in, d_in, generator=generator, dtype=F64))[0]
    lam = 10 ** (6 * torch.rand(d_out, d_in, generator=generator, dtype=F64) - 4)
    lam[0, 0] = 0.0
    return {GRADIENT_EIGENVECTORS_NAME: {name: q_out}, ACTIVATION_EIGENVECTORS_NAME: {name: q_in},
            LAMBDA_MATRIX_NAME: {name: lam * 7}, NUM_LAMBDA_PROCESSED: {name: torch.tensor(7.0, dtype=F64)}}


def dense(factors: dict, name: str = "m"):
    """EK-FAC's Hessian as a dense matrix on row-major vec(G): U diag(lambda) U^T, U = Q_out kron Q_in."""
    u = torch.kron(factors[GRADIENT_EIGENVECTORS_NAME][name], factors[ACTIVATION_EIGENVECTORS_NAME][name])
    lam = (factors[LAMBDA_MATRIX_NAME][name] / factors[NUM_LAMBDA_PROCESSED][name]).flatten()
    return (u * lam) @ u.T, lam


def unrolled(hessian: np.ndarray, c: float) -> tuple:
    """(I - exp(-cH)) H^-1 and exp(-cH) by scipy's expm alone: the top-right block of expm([[-cH, I], [0, 0]]) is
    (-cH)^-1 (exp(-cH) - I), so c times it is (I - exp(-cH)) H^-1 without inverting a singular H."""
    n = len(hessian)
    block = np.zeros((2 * n, 2 * n))
    block[:n, :n], block[:n, n:] = -c * hessian, np.eye(n)
    return c * scipy.linalg.expm(block)[:n, n:], scipy.linalg.expm(-c * hessian)


def test_learning_rate_shares():
    assert learning_rate_shares(3, 3, 3, "constant") == pytest.approx([1 / 3] * 3)
    assert learning_rate_shares(3, 3, 1, "linear") == [1.0]
    assert learning_rate_shares(3, 3, 3, "linear") == pytest.approx([5 / 9, 3 / 9, 1 / 9])  # 1 - t/T, per epoch
    assert learning_rate_shares(3, 3, 2, "constant") == pytest.approx([2 / 3, 1 / 3])  # the first takes epochs 1-2
    assert learning_rate_shares(3, 2, 2, "linear") == pytest.approx([5 / 8, 3 / 8])  # up to the epoch-2 model
    with pytest.raises(ValueError):
        learning_rate_shares(3, 2, 3, "constant")


def test_eigenvalue_functions_limits():
    lam = torch.tensor([0.0, 1e-12, 1.0, 3.0, 1e4], dtype=F64)
    f, s = eigenvalue_functions(lam, horizon=2.0, share=0.5)
    c = 2.0 * 0.5 / lam.mean()
    assert f[0] == c and s[0] == 1  # the limit at 0: c steps of size 1, nothing decays
    torch.testing.assert_close(f[1], c * (1 - c * 1e-12 / 2), rtol=1e-15, atol=0)  # no cancellation near 0
    # the naive 1 - exp(-x) loses ~1e-16 / x relative to cancellation (x = c * lam >= 5e-4 here): within 1e-12
    torch.testing.assert_close(f[2:], (1 - torch.exp(-c * lam[2:])) / lam[2:], rtol=1e-12, atol=0)
    torch.testing.assert_close(s, torch.exp(-c * lam), rtol=0, atol=0)
    f, s = eigenvalue_functions(torch.zeros(3, dtype=F64), 2.0, 1.0)  # a module without gradient adds nothing
    assert (f == 0).all() and (s == 1).all()


def test_the_preconditioner_is_dense_unrolling_through_later_segments():
    """S_3 S_2 F_1 g (and S_3 F_2 g, F_3 g) from the eigenbases equal scipy's expm of the dense EK-FAC Hessians."""
    generator = torch.Generator().manual_seed(0)
    d_out, d_in, horizon, shares = 3, 4, 5.0, [0.5, 0.3, 0.2]
    segments = [Segment({}, random_factors(generator, d_out, d_in), share) for share in shares]
    precondition = SourcePreconditioner(segments, horizon, ["m"], torch.device("cpu"), F64)
    gradients = torch.randn(2, d_out, d_in, generator=generator, dtype=F64)
    matrices = []
    for segment in segments:
        hessian, lam = dense(segment.factors)
        matrices.append(unrolled(hessian.numpy(), horizon * segment.share / lam.mean().item()))
    for index in range(3):
        expected = matrices[index][0]
        for later in range(index + 1, 3):
            expected = expected @ matrices[later][1]  # symmetric: g^T S_3 S_2 F_1 = (F_1 S_2 S_3 g)^T
        expected = torch.from_numpy(gradients.flatten(1).numpy() @ expected.T).reshape_as(gradients)
        # float64; expm's Pade approximant is accurate to ~1e-15 relative of its largest entries, which here reach c
        # (up to 1e4 over the smallest mean eigenvalue), so compare at 1e-10 of the largest
        torch.testing.assert_close(precondition(index, "m", gradients), expected, rtol=0,
                                   atol=1e-10 * expected.abs().max().item())


@pytest.fixture(scope="module")
def three_checkpoints(tmp_path_factory):
    """A float64 demo model and two perturbed copies (three segments' ends), each with EK-FAC factors fitted on it by
    kronfluence."""
    raw = make_demo_dataset(sizes={"train": 10, "validation": 4})
    tokenizer = build_demo_tokenizer(raw)
    torch.manual_seed(0)
    model = build_demo_model(tokenizer).double().eval()
    train_rows, queries = tokenize(raw["train"], tokenizer), tokenize(raw["validation"], tokenizer)
    collator = make_collator(tokenizer)
    out = tmp_path_factory.mktemp("source")
    ends = []
    for index in range(3):
        end = copy.deepcopy(model)
        with torch.no_grad():
            for p in end.parameters():
                p.add_(0.05 * index * torch.randn_like(p))
        task = MultipleChoiceTask()
        analyzer = Analyzer(analysis_name=f"end{index}", model=prepare_model(copy.deepcopy(end), task), task=task,
                            output_dir=str(out), disable_tqdm=True, cpu=True)
        analyzer.set_dataloader_kwargs(DataLoaderKwargs(collate_fn=collator))
        torch.manual_seed(0)
        analyzer.fit_all_factors("f", dataset=train_rows, per_device_batch_size=4, factor_args=FactorArguments(
            strategy="ekfac", activation_covariance_dtype=F64, gradient_covariance_dtype=F64,
            eigendecomposition_dtype=F64, per_sample_gradient_dtype=F64, lambda_dtype=F64))
        ends.append((end, analyzer.load_all_factors("f")))
    return ends, train_rows, queries, collator


def example_gradients(model, rows, collator, measurement: bool) -> list:
    """Per row, autograd's gradient of its loss (or the query's measurement) for every nn.Linear, bias as a column."""
    task = MultipleChoiceTask()
    modules = tracked_linears(model, linear_module_names(model))
    gradients = []
    for i in range(len(rows)):
        model.zero_grad()
        batch = collator([rows[i]])
        (task.compute_measurement(batch, model) if measurement else task.compute_train_loss(batch, model)).backward()
        gradients.append({name: with_bias_column(m.weight.grad, m.bias.grad) for name, m in modules.items()})
    return gradients


def score_args():
    return ScoreArguments(per_sample_gradient_dtype=F64, precondition_dtype=F64, score_dtype=F64)


def source_scores(ends, train_rows, queries, collator, horizon, shares, **kwargs):
    final = copy.deepcopy(ends[-1][0])
    segments = [Segment({n: p.detach().clone() for n, p in model_weights(m).items()}, factors, share)
                for (m, factors), share in zip(ends, shares)]
    return source_pairwise_scores(final, MultipleChoiceTask(), segments, horizon, score_args(), queries, train_rows,
                                  collator, 3, 4, torch.device("cpu"), disable_tqdm=True, **kwargs), final


@pytest.mark.slow
def test_source_scores_are_the_segments_preconditioned_query_gradients_against_their_training_gradients(
        three_checkpoints):
    ends, train_rows, queries, collator = three_checkpoints
    horizon, shares = 4.0, [0.2, 0.3, 0.5]
    scores, final = source_scores(ends, train_rows, queries, collator, horizon, shares, max_queries_per_pass=3)
    # the model is handed back with its own (the query side's) weights, bitwise
    assert all(torch.equal(p, q) for p, q in zip(final.parameters(), ends[-1][0].parameters()))
    # the reference: query gradients at the last end, each segment's training gradients at its own end
    query_grads = example_gradients(copy.deepcopy(ends[-1][0]), queries, collator, measurement=True)
    segments = [Segment({}, factors, share) for (_, factors), share in zip(ends, shares)]
    names = sorted(query_grads[0])
    precondition = SourcePreconditioner(segments, horizon, names, torch.device("cpu"), F64)
    expected = torch.zeros(len(queries), len(train_rows), dtype=F64)
    for index, (end, _) in enumerate(ends):
        train_grads = example_gradients(copy.deepcopy(end), train_rows, collator, measurement=False)
        for name in names:
            q = precondition(index, name, torch.stack([g[name] for g in query_grads]))
            t = torch.stack([g[name] for g in train_grads])
            expected += q.flatten(1) @ t.flatten(1).T
    assert expected.abs().max() > 0
    # float64 both ways, summed in other orders (choices inside the fused matmul, other batches), the result rounded
    # to float32 (6e-8 relative); the preconditioner's entries reach c / (smallest eigenvalue scale), so compare at
    # 1e-6 of the largest score
    torch.testing.assert_close(scores.double(), expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


@pytest.mark.slow
# each segment's fused pass: one query's backward (the modules' order), 2 query batches, 3 training batches
@pytest.mark.parametrize("fail_on", [{2}, {5}, {16}], ids=["first query side", "first training side", "third segment"])
def test_an_out_of_memory_pass_is_redone_with_the_weights_in_place(three_checkpoints, monkeypatch, fail_on):
    """An out-of-memory error on the query side (at the swapped-in query weights) or the training side of any segment:
    the pass is halved and redone, and the scores and the model's weights come out as without it."""
    ends, train_rows, queries, collator = three_checkpoints
    clean, _ = source_scores(ends, train_rows, queries, collator, 4.0, [0.2, 0.3, 0.5], max_queries_per_pass=4)
    calls = failing_backward(monkeypatch, fail_on)
    scores, final = source_scores(ends, train_rows, queries, collator, 4.0, [0.2, 0.3, 0.5], max_queries_per_pass=4)
    assert calls[0] > max(fail_on)
    assert all(torch.equal(p, q) for p, q in zip(final.parameters(), ends[-1][0].parameters()))
    # float64 sums over other query groupings after the halving; the float32 result rounds them alike (6e-8)
    torch.testing.assert_close(scores, clean, rtol=1e-6, atol=1e-7 * clean.abs().max().item())


@pytest.mark.slow
def test_identical_segments_telescope_into_one(three_checkpoints):
    """sum_l S^(L-l) F_l over segments of one model is (I - exp(-c_total H)) H^-1: one segment of the whole horizon."""
    ends, train_rows, queries, collator = three_checkpoints
    same = [ends[1]] * 3
    split, _ = source_scores(same, train_rows, queries, collator, 6.0, [0.5, 0.25, 0.25])
    whole, _ = source_scores(same[:1], train_rows, queries, collator, 6.0, [1.0])
    # float64 sums of other products of the same matrices, rounded to float32 at the end
    torch.testing.assert_close(split, whole, rtol=1e-5, atol=1e-6 * whole.abs().max().item())
    assert not torch.allclose(whole, source_scores(same[:1], train_rows, queries, collator, 3.0, [1.0])[0])


@pytest.mark.parametrize("flags, message", [
    (["--source_segments", "2"], "add --source_horizon T"),
    (["--source_horizon", "1", "--scoring", "kronfluence"], "--source_horizon scores with --scoring fused"),
    (["--source_horizon", "1", "--damping_factor", "0.1"], "drop --damping_factor"),
    (["--source_horizon", "1", "--factor_strategy", "kfac"], "drop --factor_strategy other than ekfac"),
    (["--source_horizon", "1", "--dropout_ensemble", "2"], "drop --dropout_ensemble"),
    (["--source_horizon", "1", "--self_influence"], "drop --self_influence"),
    (["--source_horizon", "0"], "argument --source_horizon: must be a number > 0, got 0"),
])
def test_source_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        analyze.parse_args(flags)
    assert message in capsys.readouterr().err


def test_source_defaults_to_fused_scoring_and_names_its_outputs():
    args = analyze.parse_args(["--source_horizon", "10", "--source_segments", "3"])
    assert args.scoring == "fused"
    config = analyze.AnalysisConfig.from_args(args)
    assert config.scores_name(100, 10) == "ekfac_n100_q10_source10.0x3_fused"
    # the horizon exactly (repr): nearby horizons never share a directory
    names = {analyze.AnalysisConfig.from_args(analyze.parse_args(["--source_horizon", t])).scores_name(None, None)
             for t in ("0.5", "1234567", "1234568", "10.000001")}
    assert names == {"ekfac_nall_qall_source0.5_fused", "ekfac_nall_qall_source1234567.0_fused",
                     "ekfac_nall_qall_source1234568.0_fused", "ekfac_nall_qall_source10.000001_fused"}


@pytest.mark.slow
def test_source_over_epoch_checkpoints_reuses_their_analyses_factors(tmp_path):
    run = tmp_path / "run"
    train.main([*TINY, "--num_train_epochs", "3", "--save_epochs", "--output_dir", str(run)])
    common = ["--output_dir", str(tmp_path / "scores")]
    epoch1 = analyze.main(["--checkpoint_dir", str(run), "--checkpoint_epoch", "1", "--scoring", "fused", *common])
    factors = epoch1.parent / "factors_ekfac_n48"
    before = {p.name: p.stat().st_mtime_ns for p in factors.glob("*.safetensors")}
    scores_dir = analyze.main(["--checkpoint_dir", str(run), "--source_horizon", "3", "--source_segments", "3",
                               *common])
    assert {p.name: p.stat().st_mtime_ns for p in factors.glob("*.safetensors")} == before  # reused, not refitted
    assert (tmp_path / "scores" / "run_epoch2" / "factors_ekfac_n48" / formats.METADATA_FILE).exists()
    assert not list((tmp_path / "scores" / "run_epoch2").glob("scores_*"))  # its factors alone
    meta = json.loads((scores_dir / formats.METADATA_FILE).read_text())
    assert meta["source"]["shares"] == pytest.approx([1 / 3] * 3) and meta["source"]["horizon"] == 3
    assert [p.rsplit("/", 1)[-1] for p in meta["source_checkpoints"]] == ["run_epoch1", "run_epoch2", "run"]
    assert len(meta["source"]["weights_sha256"]) == len(meta["source"]["factors_fit_ids"]) == 2
    assert meta["scores_name"] == "ekfac_n48_q12_source3.0x3_fused" and meta["seconds"]["source_factors"] > 0
    scores = formats.load_scores(scores_dir)[0]
    assert scores.shape == (12, 48) and torch.isfinite(scores).all()
    source = ["--checkpoint_dir", str(run), "--source_horizon", "3", "--source_segments", "3", *common]
    assert analyze.main(source) == scores_dir  # reused as it is
    assert torch.equal(formats.load_scores(scores_dir)[0], scores)
    # epoch 1's factors refitted: the SOURCE scores built on the old ones are refused, not reused
    analyze.main(["--checkpoint_dir", str(run), "--checkpoint_epoch", "1", "--scoring", "fused", "--overwrite", *common])
    with pytest.raises(UserError, match="was computed from other source than this run's; delete it"):
        analyze.main(source)
    # an epoch checkpoint given as the run
    with pytest.raises(UserError, match=r"run_epoch2 is the epoch-2 model of a run: pass the run's final checkpoint "
                                        r"with --checkpoint_epoch 2"):
        analyze.main(["--checkpoint_dir", str(run) + "_epoch2", "--source_horizon", "3", "--source_segments", "2",
                      *common])
    # the analysed epoch-2 model has two segments at most
    with pytest.raises(UserError, match=r"ends epoch 2 of its run .* at most 2 segments; lower --source_segments"):
        analyze.main(["--checkpoint_dir", str(run), "--checkpoint_epoch", "2", "--source_horizon", "3",
                      "--source_segments", "3", *common])


@pytest.mark.slow
def test_source_segments_need_the_runs_epoch_checkpoints(tmp_path):
    run = tmp_path / "run"
    train.main([*TINY, "--num_train_epochs", "2", "--output_dir", str(run)])
    with pytest.raises(UserError, match="trained without --save_epochs; retrain with --save_epochs"):
        analyze.main(["--checkpoint_dir", str(run), "--source_horizon", "3", "--source_segments", "2",
                      "--output_dir", str(tmp_path / "scores")])
    assert not (tmp_path / "scores").exists()  # refused before any work
