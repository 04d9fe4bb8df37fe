"""LDS: the score function, resumable retraining runs, input checks and an end-to-end run on the demo."""

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY
from safetensors import safe_open
from safetensors.torch import load_file
from scipy.stats import rankdata

import analyze
import evaluate_lds
import formats
import metrics
import retrain
import train
import training
from metrics import lds_per_query, summarize
from utils import UserError

LDS_TINY = [*TINY, "--num_train_epochs", "1", "--lds_num_masks", "3", "--lds_repeats", "2"]


def test_perfect_linear_datamodel_scores_one_and_sign_matters():
    rng = np.random.default_rng(0)
    masks = rng.random((40, 30)) < 0.5
    scores = rng.normal(size=(5, 30))
    margins = masks @ scores.T
    np.testing.assert_allclose(lds_per_query(masks, margins, scores), 1.0)
    np.testing.assert_allclose(lds_per_query(masks, -margins, scores), -1.0)
    # monotone but non-linear margins still rank perfectly
    np.testing.assert_allclose(lds_per_query(masks, np.exp(margins), scores), 1.0)


def test_constant_queries_are_reported_not_averaged():
    rng = np.random.default_rng(1)
    masks = rng.random((20, 10)) < 0.5
    scores = rng.normal(size=(3, 10))
    margins = masks @ scores.T
    margins[:, 1] = 0.7
    per_query = lds_per_query(masks, margins, scores)
    assert np.isnan(per_query[1]) and not np.isnan(per_query[[0, 2]]).any()
    summary = summarize(per_query, num_bootstrap=200)
    assert summary["constant_queries"] == [1] and summary["num_queries"] == 2
    assert summary["lds"] == pytest.approx(1.0) and summary["ci95"][0] <= 1.0 + 1e-12
    with pytest.raises(UserError, match="constant"):
        summarize(np.full(3, np.nan))
    margins[0, 0] = np.nan  # a diverged run is an error, not a "constant" query
    with pytest.raises(UserError, match="margins contain NaN"):
        lds_per_query(masks, margins, scores)


def test_runs_resume_after_interruption(tmp_path, monkeypatch):
    out = tmp_path / "lds"
    args = [*LDS_TINY, "--lds_output_dir", str(out)]
    real, calls = training.train_model, []

    def crash_on_fourth(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if killed mid-run
        return real(*a, **k)

    monkeypatch.setattr(training, "train_model", crash_on_fourth)
    with pytest.raises(KeyboardInterrupt):
        retrain.main(args)
    first = sorted(out.glob("run_*.safetensors"))
    assert len(first) == 3
    stamps = {p: p.stat().st_mtime_ns for p in first}
    first[0].write_bytes(first[0].read_bytes()[:50])  # a truncated file is redone, not trusted
    monkeypatch.setattr(training, "train_model", real)
    written = retrain.main(args)
    files = sorted(out.glob("run_*.safetensors"))
    assert len(files) == 6 and len(written) == 4  # 3 unfinished + 1 truncated
    assert all(p.stat().st_mtime_ns == stamps[p] for p in first[1:])
    runs = [load_file(str(p)) for p in files]
    assert torch.equal(runs[0]["mask"], runs[1]["mask"])  # repeats share their mask
    assert not torch.equal(runs[0]["mask"], runs[2]["mask"])
    assert runs[0]["mask"].sum() == 24 and runs[0]["margins"].shape == (12,)
    # shards of a job array / torchrun ranks never overlap
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "5")
    assert retrain.parse_args(args).lds_run_index == 5


def test_ranks_split_runs_without_overlap(tmp_path, monkeypatch):
    args = [*LDS_TINY, "--lds_num_masks", "2", "--lds_repeats", "1", "--lds_output_dir", str(tmp_path)]
    monkeypatch.setattr(training, "train_model", lambda model, *a, **k: (model, []))
    seen = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        seen.append([p.name for p in retrain.main(args)])
    assert seen == [["run_m0000_r00.safetensors"], ["run_m0001_r00.safetensors"]]


FORKED_RUN = """
import sys, torch, retrain, training
real = training.train_model
def checked(*a, **k):  # inherited by the forked workers
    if torch.cuda._is_in_bad_fork():
        raise RuntimeError("this worker cannot initialise CUDA: the parent touched it before forking")
    return real(*a, **k)
training.train_model = checked
print(sorted(p.name for p in retrain.main(sys.argv[1:])))
"""


def run_forked(args):
    """train.py's LDS runs with these arguments in a fresh interpreter, as from the shell."""
    return subprocess.run([sys.executable, "-c", FORKED_RUN, *args], cwd=Path(train.__file__).parent,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_forked_workers_split_the_runs_and_can_use_cuda(tmp_path):
    """--lds_processes 2: two workers forked after loading write the same runs as one process, each its own share,
    and neither is in a "bad fork" (the command never touches CUDA before forking, so on a GPU each worker can set
    it up). The forked command runs in a fresh interpreter, as from the shell: this test process has used CUDA."""
    from conftest import threads

    args = [*LDS_TINY, "--lds_repeats", "1"]
    with threads(1):  # a forked worker trains on one thread (training._forked_worker): the same kernels, the same bits
        one = retrain.main([*args, "--lds_output_dir", str(tmp_path / "one")])
    forked = [*args, "--lds_processes", "2", "--lds_output_dir", str(tmp_path / "forked")]
    result = run_forked(forked)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == str(sorted(p.name for p in one))
    assert "rank 0 wrote 2 runs" in result.stderr and "rank 1 wrote 1 runs" in result.stderr
    for a in one:
        b = tmp_path / "forked" / a.name
        run_a, run_b = load_file(str(a)), load_file(str(b))
        assert torch.equal(run_a["mask"], run_b["mask"])
        assert torch.equal(run_a["margins"], run_b["margins"])
        with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
            assert fa.metadata()["settings_hash"] == fb.metadata()["settings_hash"]
            assert fa.metadata()["process"] == "0/1" and fb.metadata()["process"] in ("0/2", "1/2")
    rerun = run_forked(forked)
    assert "rank 0 wrote 0 runs, skipped 2" in rerun.stderr and "rank 1 wrote 0 runs, skipped 1" in rerun.stderr
    assert str(pickle.loads(pickle.dumps(UserError("bad")))) == "error: bad"  # as a worker's error comes back
    with pytest.raises(SystemExit, match="^2$"):  # argparse's status; the message: tests/test_reliability.py
        retrain.parse_args([*args, "--lds_processes", "0"])


@pytest.mark.slow
def test_runs_and_scores_must_match(tiny_checkpoint, tmp_path):
    lds_dir = tmp_path / "lds"
    retrain.main([*LDS_TINY, "--lds_repeats", "1", "--lds_output_dir", str(lds_dir)])
    other = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                          "--num_queries", "10", "--output_dir", str(tmp_path / "s")])
    with pytest.raises(UserError, match=r"differ in num_queries \(10 in the scores, 12 in the runs\)"):
        evaluate_lds.main(["--scores", str(other), "--lds_dir", str(lds_dir), "--no_plots"])
    with pytest.raises(UserError, match="no run files"):
        evaluate_lds.main(["--scores", str(other), "--lds_dir", str(tmp_path / "empty"), "--no_plots"])
    # runs of another recipe are refused, naming what differs
    other_lr = tmp_path / "lds_lr"
    retrain.main([*LDS_TINY, "--lds_num_masks", "2", "--lds_repeats", "1", "--learning_rate", "0.002",
                "--lds_output_dir", str(other_lr)])
    same_queries = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                                 "--output_dir", str(tmp_path / "s")])
    with pytest.raises(UserError, match=r"learning_rate \(0.001 for the scored model, 0.002 in the runs\)"):
        evaluate_lds.main(["--scores", str(same_queries), "--lds_dir", str(other_lr), "--no_plots"])
    # other training settings in the same directory are refused by train.py
    with pytest.raises(UserError, match="other data or training settings"):
        retrain.main([*LDS_TINY, "--lds_repeats", "1", "--learning_rate", "0.5", "--lds_output_dir", str(lds_dir)])


@pytest.mark.slow
def test_demo_lds_ekfac_beats_identity(tmp_path, capsys):
    """End to end on the demo: full model, 20 half-data retrains, EKFAC and identity scores, LDS."""
    data = ["--dataset", "demo", "--max_train_samples", "400", "--num_queries", "100"]
    checkpoint, lds_dir = tmp_path / "ckpt", tmp_path / "lds"
    train.main([*data, "--output_dir", str(checkpoint)])
    retrain.main([*data, "--lds_num_masks", "20", "--lds_output_dir", str(lds_dir)])
    results = {}
    for strategy in ("identity", "ekfac"):
        scores_dir = analyze.main(["--checkpoint_dir", str(checkpoint), "--factor_strategy", strategy,
                                   "--output_dir", str(tmp_path / "scores")])
        results[strategy] = evaluate_lds.main(["--scores", str(scores_dir), "--lds_dir", str(lds_dir)])
        assert (scores_dir / formats.HISTOGRAM_FILE).stat().st_size > 1000
        assert (scores_dir / formats.SCATTER_FILE).stat().st_size > 1000
        saved = json.loads((scores_dir / formats.RESULTS_FILE).read_text())
        assert saved["num_masks"] == 20 and len(saved["per_query"]) == 100
    out = capsys.readouterr().out
    assert "Top proponents" in out
    print({k: (round(v["lds"], 3), [round(x, 3) for x in v["ci95"]]) for k, v in results.items()})
    assert results["ekfac"]["lds"] > results["identity"]["lds"]
    # floor: with 20 masks a query without signal has Spearman s.d. ~ 1/sqrt(19) = 0.23, so the mean over
    # 100 queries has s.e. ~ 0.023; 0.15 is > 6 s.e. above "no signal" (measured: 0.246, identity 0.078)
    assert results["ekfac"]["lds"] > 0.15

    # kronfluence's masks.pt / margins.pt format gives the same number
    masks, margins, _ = evaluate_lds.load_runs(lds_dir)
    torch.save(masks.astype(np.float32), tmp_path / "masks.pt")
    torch.save(margins, tmp_path / "margins.pt")
    again = evaluate_lds.main(["--scores", str(scores_dir / formats.SCORES_FILE), "--no_plots",
                               "--kronfluence_masks", str(tmp_path / "masks.pt"),
                               "--kronfluence_margins", str(tmp_path / "margins.pt"),
                               "--output_dir", str(tmp_path / "kf")])
    assert again["lds"] == pytest.approx(results["ekfac"]["lds"])


def test_cost_plot_reads_nested_entries_and_rejects_files_without_any(tmp_path):
    results = {"ekfac": {"lds": 0.19, "gpu_minutes": 1.9, "ci95": [0.18, 0.2]}, "identity": {"lds": 0.09},
               "ensembles": {"ekfac_K4": {"lds": 0.25, "gpu_minutes": 6.2}, "_note": "text"}}
    assert evaluate_lds.cost_entries(results) == {"ekfac": (1.9, 0.19, [0.18, 0.2]),
                                                  "ensembles/ekfac_K4": (6.2, 0.25, None)}
    (tmp_path / "r.json").write_text(json.dumps(results))
    assert evaluate_lds.main(["--cost_plot", str(tmp_path / "r.json")]) == tmp_path / "r_cost.png"
    assert (tmp_path / "r_cost.png").stat().st_size > 0
    (tmp_path / "empty.json").write_text(json.dumps({"identity": {"lds": 0.09}}))
    with pytest.raises(UserError, match="no entries with both"):
        evaluate_lds.main(["--cost_plot", str(tmp_path / "empty.json")])


# --------------------------------------------------------------------------------------------
# Noise ceiling and paired comparison
# --------------------------------------------------------------------------------------------
def test_noise_ceiling_recovers_the_known_ceiling():
    """Margins = signal + noise, repeats independent: signal N(0, 1) per mask and query, noise s.d. 1, R = 4
    repeats. The ceiling must equal the LDS of an oracle whose predictions are the signal itself (the best any
    score can do against the averaged margins). The split-half Pearson is 1 / (1 + 1 / 2) = 2/3, whose
    Spearman for normal data is (6 / pi) asin(1/3) = 0.6490, stepped up to 0.7871 (Pearson reliability: 0.8).
    Tolerance: with 4,000 masks a Spearman has s.e. ~ (1 - rho^2) / sqrt(4000) < 0.01 per query, and 20 queries
    average it to < 0.003; 0.01 leaves room for the estimator's small-sample bias."""
    rng = np.random.default_rng(0)
    signal = rng.normal(size=(4000, 20))
    repeats = signal[:, None, :] + rng.normal(size=(4000, 4, 20))
    ceiling = metrics.noise_ceiling(repeats)
    assert ceiling["repeats"] == 4
    assert ceiling["split_half_spearman"] == pytest.approx(6 / np.pi * np.arcsin(1 / 3), abs=0.01)
    k_r = 2 * 6 / np.pi * np.arcsin(1 / 3)
    assert ceiling["reliability"] == pytest.approx(k_r / (1 + k_r / 2), abs=0.01)
    oracle = metrics.correlation(rankdata(signal, axis=0), rankdata(repeats.mean(1), axis=0), axis=0).mean()
    assert ceiling["ceiling"] == pytest.approx(oracle, abs=0.01)
    # the same repeats, stepped down to a target of one repeat: the oracle against repeat 0 alone (Pearson
    # reliability 0.5), with the same tolerance
    single = metrics.noise_ceiling(repeats, target_repeats=1)
    assert single["target_repeats"] == 1 and single["reliability"] == pytest.approx(k_r / 4 / (1 - k_r / 4), abs=0.01)
    oracle_1 = metrics.correlation(rankdata(signal, axis=0), rankdata(repeats[:, 0], axis=0), axis=0).mean()
    assert single["ceiling"] == pytest.approx(oracle_1, abs=0.01)
    # noise-free repeats: a ceiling of 1; odd R uses the first and last floor(R/2) repeats
    exact = metrics.noise_ceiling(np.repeat(signal[:, None, :], 3, axis=1))
    assert exact["reliability"] == pytest.approx(1.0) and exact["ceiling"] == pytest.approx(1.0)


def test_paired_difference_sees_what_unpaired_intervals_miss():
    """Two methods whose per-query LDS differ by 0.02 on every query, on queries whose LDS spreads widely: the
    per-method intervals overlap, the paired interval excludes zero; identical scores differ by exactly 0."""
    rng = np.random.default_rng(0)
    base = rng.uniform(-0.5, 0.9, size=200)
    better = base + 0.02 + rng.normal(scale=0.005, size=200)
    a, b = summarize(better), summarize(base)
    assert a["ci95"][0] < b["ci95"][1]  # unpaired: overlapping
    paired = metrics.paired_difference(better, base)
    assert paired["difference"] == pytest.approx(0.02, abs=0.002) and paired["ci95"][0] > 0.015
    same = metrics.paired_difference(base, base.copy())
    assert same["difference"] == 0 and same["ci95"] == [0, 0]
    with pytest.raises(UserError, match="no query has a defined LDS under both"):
        metrics.paired_difference(np.full(3, np.nan), base[:3])


@pytest.mark.slow
def test_evaluate_reports_the_ceiling_and_a_paired_comparison(tiny_checkpoint, tmp_path, capsys):
    lds_dir = tmp_path / "lds"
    retrain.main([*LDS_TINY, "--lds_output_dir", str(lds_dir)])  # 3 masks x 2 repeats
    scores = {s: analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", s,
                               "--output_dir", str(tmp_path / "s")]) for s in ("identity", "ekfac")}
    result = evaluate_lds.main(["--scores", str(scores["ekfac"]), "--lds_dir", str(lds_dir), "--no_plots",
                                "--compare", str(scores["identity"])])
    assert result["noise_ceiling"]["repeats"] == 2 and len(result["noise_ceiling"]["per_query_reliability"]) == 12
    assert result["paired"]["other"] == str(scores["identity"])
    agreement = result["paired"]["score_agreement"]  # identity against EKFAC scores: related, far from equal
    assert agreement["undefined_rows"] == 0 and 0 < agreement["pearson"] < 0.999
    itself = metrics.per_query_correlations(*[formats.load_scores(scores["ekfac"])[0]] * 2)
    assert itself["pearson"] == pytest.approx(1, abs=1e-12) and itself["spearman"] == pytest.approx(1, abs=1e-12)
    saved = json.loads((scores["ekfac"] / formats.RESULTS_FILE).read_text())
    assert saved["noise_ceiling"] == result["noise_ceiling"] and saved["paired"] == result["paired"]
    out = capsys.readouterr().out
    assert "noise ceiling " in out and f"LDS - LDS({scores['identity'].name}) = " in out
    assert "mean per-query Pearson of the scores " in out
    # a target of the first repeat alone: the LDS against repeat 0's margins, the ceiling stepped down to it
    first = evaluate_lds.main(["--scores", str(scores["ekfac"]), "--lds_dir", str(lds_dir), "--no_plots",
                               "--num_repeats", "1", "--output_dir", str(tmp_path / "r1")])
    _, _, runs = evaluate_lds.load_runs(lds_dir)
    masks = evaluate_lds.load_runs(lds_dir)[0]
    expected = metrics.lds_per_query(masks, runs["per_repeat_margins"][:, 0],
                                          formats.load_scores(scores["ekfac"])[0].numpy())
    np.testing.assert_array_equal(np.array(first["per_query"], dtype=float), expected)
    assert first["target_repeats"] == 1 and first["noise_ceiling"]["target_repeats"] == 1
    # Spearman–Brown from the 2 repeats down to 1 (k = 1/2): rel_1 = rel_2 / (2 - rel_2), query by query
    full, single = (np.array(x["noise_ceiling"]["per_query_reliability"], dtype=float) for x in (result, first))
    np.testing.assert_allclose(single, full / (2 - full), rtol=1e-12)
    # the runs alone: the ceiling for every target size, the same numbers as beside the scores
    alone = evaluate_lds.main(["--lds_dir", str(lds_dir), "--output_dir", str(tmp_path / "gt")])
    by_target = alone["noise_ceiling_by_target_repeats"]
    assert sorted(by_target) == ["1", "2"] and alone["num_masks"] == 3
    assert by_target["2"]["ceiling"] == result["noise_ceiling"]["ceiling"]
    assert by_target["1"]["ceiling"] == first["noise_ceiling"]["ceiling"]
    assert json.loads((tmp_path / "gt" / formats.CEILING_FILE).read_text()) == alone
    with pytest.raises(SystemExit):  # the ground truth alone reports every number of repeats: the flag has no use
        evaluate_lds.parse_args(["--lds_dir", str(lds_dir), "--num_repeats", "1"])
    assert "--num_repeats picks the target of an LDS against --lds_dir runs" in capsys.readouterr().err
    with pytest.raises(UserError, match="--num_repeats 3 needs every mask to have at least that many repeats"):
        evaluate_lds.main(["--scores", str(scores["ekfac"]), "--lds_dir", str(lds_dir), "--num_repeats", "3"])


# --------------------------------------------------------------------------------------------
# Removal test
# --------------------------------------------------------------------------------------------
def test_removal_effect_arithmetic():
    runs = {"queries": [0, 1, 2, 3], "removed": 5, "full": np.array([1.0, 2.0, -0.5, 0.3]),
            "top": np.array([0.5, -1.0, -0.7, 0.1]), "random": np.array([1.1, 1.9, -0.4, 0.3])}
    effect = metrics.removal_effect(runs, num_bootstrap=100)
    assert effect["margin_change_top"] == pytest.approx(np.mean([-0.5, -3.0, -0.2, -0.2]))
    assert effect["margin_change_random"] == pytest.approx(np.mean([0.1, -0.1, 0.1, 0.0]))
    assert effect["top_minus_random"]["difference"] == pytest.approx(effect["margin_change_top"]
                                                                     - effect["margin_change_random"])
    assert effect["flipped_top"] == 0.25 and effect["flipped_random"] == 0.0  # query 1: 2.0 -> -1.0


@pytest.mark.slow
def test_removal_runs_leave_out_each_querys_top_proponents_and_resume(tiny_checkpoint, tmp_path, capsys):
    scores_dir = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                               "--output_dir", str(tmp_path / "s")])
    out = tmp_path / "removal"
    flags = [*TINY, "--num_train_epochs", "1", "--removal_scores", str(scores_dir), "--removal_num_queries", "2",
             "--removal_fraction", "0.25", "--removal_output_dir", str(out)]
    written = retrain.main(flags)
    assert len(written) == 5  # the control, then top and random for each of 2 queries
    scores = formats.load_scores(scores_dir)[0]
    ident = formats.removal_scores_id(scores_dir)
    for q in range(2):
        kept = load_file(str(out / formats.REMOVAL_FILE.format(query=q, condition=f"top_{ident}")))["mask"].bool()
        assert set(torch.nonzero(~kept).flatten().tolist()) == set(torch.argsort(scores[q], descending=True)[:12].tolist())
        kept = load_file(str(out / formats.REMOVAL_FILE.format(query=q, condition="random")))["mask"].bool()
        assert (~kept).sum() == 12
    assert load_file(str(out / formats.REMOVAL_FULL_FILE))["mask"].all()
    assert retrain.main(flags) == []  # finished runs are skipped
    result = evaluate_lds.main(["--scores", str(scores_dir), "--removal_dir", str(out)])
    assert result["num_queries"] == 2 and result["removed_rows"] == 12 and result["queries"] == [0, 1]
    assert json.loads((scores_dir / formats.REMOVAL_RESULTS_FILE).read_text()) == result
    assert "removing each query's top 12 proponents changes its margin by " in capsys.readouterr().out
    other = analyze.main(["--checkpoint_dir", str(tiny_checkpoint), "--factor_strategy", "identity",
                          "--max_train_samples", "40", "--allow_other_train_rows", "--output_dir", str(tmp_path / "s40")])
    with pytest.raises(UserError, match="scores other training rows than these flags select"):
        retrain.main([*flags[:-2], "--removal_scores", str(other), "--removal_output_dir", str(tmp_path / "r40")])
    with pytest.raises(UserError, match="has no removal runs for"):
        evaluate_lds.main(["--scores", str(other), "--removal_dir", str(out)])


@pytest.mark.parametrize("flags,message", [
    (["--removal_num_queries", "5"], "--removal_num_queries only apply to the removal test; add --removal_scores"),
    (["--removal_scores", "s", "--removal_fraction", "0"], "argument --removal_fraction: must lie in (0, 1), got 0.0"),
    (["--removal_scores", "s", "--lds_num_masks", "2"], "--removal_scores and --lds_num_masks start different"),
])
def test_removal_flags_are_checked(flags, message, capsys):
    with pytest.raises(SystemExit):
        retrain.parse_args(["--dataset", "demo", *flags])
    assert message in capsys.readouterr().err
