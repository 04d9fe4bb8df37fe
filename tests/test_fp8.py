"""The fused scoring's fp8 contraction (fp8.py, --fp8_contraction): each e4m3 rounding within its bound, and the
scores within the bound those roundings give of kronfluence's float64 scores."""

import copy

import pytest
import torch
from kronfluence.arguments import ScoreArguments
from test_fused import fit, setup  # noqa: F401 (the fixture)

import analyze
import fp8
import fused_scores
from fused_scores import FusedScorer, fused_pairwise_scores, in_dataset_order, longest_first, order_of, row_lengths
from influence import AnalysisConfig
from task import MultipleChoiceTask

U = 2**-4 + 2**-24  # e4m3's unit roundoff (3 mantissa bits), plus float64 -> float32 -> e4m3's double rounding
ETA = 2**-10  # half e4m3's subnormal spacing (2^-9): the absolute error below its normal range, in scaled units
BF16_U = 2**-8  # bf16's unit roundoff
RESULT_U = 3 * 2**-24  # fp8.product's float32 result, then its two row scales' float32 products


def rounding_bound(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Per entry of x (rows × K, float64, unscaled), how far its e4m3 rounding at the row `scales` may fall from it."""
    return U * x.abs() + ETA * scales[:, None]


def test_rows_scale_to_e4m3s_largest_value_and_round_within_the_bound():
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(6, 64, dtype=torch.float64, generator=generator) * torch.logspace(-8, 3, 6, dtype=torch.float64)[:, None]
    x[2, 5] = 1e4  # one large entry: the rest of its row falls below e4m3's normal range
    x[4] = 0  # a row of zeros keeps a scale of 1
    out = torch.empty(6, 64, dtype=fp8.E4M3)
    scales = fp8.scaled_rows(x, out)
    assert scales[4] == 1 and not out[4].float().any()
    assert torch.equal(out.float().abs().amax(dim=1)[[0, 1, 2, 3, 5]], torch.full((5,), fp8.E4M3_MAX))
    assert ((out.double() * scales.double()[:, None] - x).abs() <= rounding_bound(x, scales.double())).all()


@pytest.mark.parametrize("tokens", [1, 40])
def test_the_cauchy_schwarz_scales_keep_per_example_gradients_in_e4m3s_range(tokens):
    """Scaled by gradient_scales, Σₜ gₜ aₜᵀ stays below E4M3_MAX (e4m3 has no infinity); with one token the bound is
    the largest entry itself, which lands on BOUND_TARGET (within bf16's rounding of the inputs and the result)."""
    generator = torch.Generator().manual_seed(tokens)
    g = (torch.randn(5, tokens, 24, generator=generator) * 30).bfloat16()
    a = (torch.randn(5, tokens, 40, generator=generator) * 0.01).bfloat16()
    scales = fp8.gradient_scales(g, a).bfloat16()
    weight = torch.bmm((g / scales[:, None, None]).transpose(1, 2), a)
    largest = weight.flatten(1).abs().amax(dim=1).float()
    assert (largest < fp8.E4M3_MAX).all()
    if tokens == 1:
        torch.testing.assert_close(largest, torch.full_like(largest, fp8.BOUND_TARGET), rtol=3 * BF16_U, atol=0)
    assert not torch.isnan(weight.to(fp8.E4M3).float()).any()


def test_fp8_fused_scores_are_within_the_roundings_bound_of_kronfluence(setup, monkeypatch):  # noqa: F811
    """EKFAC in float64 with the contraction in fp8: each score within the bound its e4m3 roundings (both sides),
    _scaled_mm's float32 sums and result and the scales' products allow, of kronfluence's float64 score (+ the
    float64 test's 1e-5)."""
    model, train, queries, collator, out = setup
    analyzer = fit(model, train, collator, "ekfac", out)
    dtype = torch.float64
    score_args = ScoreArguments(per_sample_gradient_dtype=dtype, precondition_dtype=dtype, score_dtype=dtype)
    analyzer.compute_pairwise_scores("s8", factors_name="f", query_dataset=queries, train_dataset=train,
                                     per_device_query_batch_size=2, per_device_train_batch_size=3,
                                     score_args=score_args, overwrite_output_dir=True)
    reference = analyzer.load_pairwise_scores("s8")["all_modules"].double()
    bound = torch.zeros(len(queries), len(train), dtype=dtype)  # in the passes' order (longest first)
    add_scores = FusedScorer._add_scores

    def recording(self, name, weight, bias):
        w, _, scales = self.query_grads[name]
        view, n = self.hooks.block, weight.size(0)
        q_hat = w[:view.size(0)].double() * scales[:view.size(0), None].double()
        q_error = U * (q_hat.abs() + ETA * scales[:view.size(0), None]) / (1 - U) + ETA * scales[:view.size(0), None]
        t_scales = self.hooks.scales.double()
        t = weight.flatten(1).double() * t_scales[:, None]  # the training rows before rounding, unscaled
        t_hat = weight.flatten(1).to(fp8.E4M3).double() * t_scales[:, None]
        contraction = (q_error + q_hat.abs()) @ rounding_bound(t, t_scales).T + q_error @ t.abs().T
        sums = t.size(1) * 2**-24 * (q_hat.abs() @ t_hat.abs().T)  # float32 sums of K products
        result = (q_hat @ t_hat.T).abs() + contraction + sums
        row, column = divmod(view.storage_offset(), view.stride(0))
        bound[row:row + view.size(0), column:column + n] += contraction + sums + RESULT_U * result / (1 - RESULT_U)
        add_scores(self, name, weight, bias)
    monkeypatch.setattr(FusedScorer, "_add_scores", recording)
    got = fused_pairwise_scores(copy.deepcopy(model), MultipleChoiceTask(), analyzer.load_all_factors("f"), "ekfac",
                                score_args, queries, train, collator, query_batch_size=3, train_batch_size=len(train),
                                device=torch.device("cpu"), disable_tqdm=True, fp8_contraction=True).double()
    bound = in_dataset_order(bound, longest_first(queries), order_of(row_lengths(train)))
    slack = 1e-5 * reference.abs() + 1e-6 * reference.abs().max()  # test_fused_scores_equal_kronfluence's
    assert bound.gt(0).all() and ((got - reference).abs() <= bound + slack).all()
    assert not torch.allclose(got, reference, rtol=1e-4, atol=0)  # the contraction did round to e4m3


def test_the_flag_names_the_scores_and_is_refused_where_it_does_not_apply(capsys, monkeypatch):
    monkeypatch.setattr(fp8, "supported", lambda device: True)  # whatever GPU runs the tests
    args = analyze.parse_args(["--scoring", "fused", "--fp8_contraction"])
    assert args.fp8_contraction
    assert analyze.parse_args(["--fast", "--fp8_contraction"]).fp8_contraction
    assert not analyze.parse_args(["--fast"]).fp8_contraction  # opt-in: no GPU agreement measured
    names = [AnalysisConfig.from_args(analyze.parse_args(["--fast", *flag])).scores_name(None, 5)
             for flag in ([], ["--fp8_contraction"])]
    assert names == ["ekfac_nall_fast_q5_fused", "ekfac_nall_fast_q5_fused_fp8"]
    for extra, message in ((["--fp8_contraction"], "--fp8_contraction is the fused pairwise scores' contraction"),
                           (["--fast", "--self_influence", "--fp8_contraction"], "drop --self_influence")):
        with pytest.raises(SystemExit):
            analyze.parse_args(extra)
        assert message in capsys.readouterr().err


def test_a_gpu_without_fp8_is_refused_in_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(SystemExit):
        analyze.parse_args(["--fast", "--fp8_contraction"])
    assert "compute capability 8.9 or above (Ada, Hopper) or no GPU; this one's is 8.0: drop it" in capsys.readouterr().err


def test_query_gradient_bytes_count_e4m3_weights_padded_to_the_kernels_width_and_their_scales():
    modules = {"a": torch.nn.Linear(64, 32), "b": torch.nn.Linear(63, 5, bias=False)}
    assert fused_scores.query_gradient_bytes(modules, torch.bfloat16) == {"a": 32 * 65 * 2, "b": 5 * 63 * 2}
    assert fused_scores.query_gradient_bytes(modules, torch.bfloat16, True) == {"a": 32 * 64 + 32 * 2 + 4,
                                                                                "b": 320 + 4}
