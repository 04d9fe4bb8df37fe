"""benchmark.py end to end on a tiny architecture (CPU), and its length sorting keeps score order."""

import argparse
import json

import pytest
from datasets import Dataset

import benchmark
from demo import build_demo_tokenizer, make_demo_dataset
from influence import FAST_LAMBDA_ROWS, AnalysisConfig
from utils import UserError


@pytest.fixture
def swag_files(tmp_path):
    from test_pipeline import swag_frame

    frame = swag_frame(24)
    frame["sent1"] = [f"Someone opens door {'and walks ' * (i % 5)}{i}." for i in range(24)]  # varied lengths
    frame.to_csv(tmp_path / "train.csv", index=False)
    return str(tmp_path / "train.csv")


@pytest.mark.slow
def test_benchmark_runs_and_reports(tmp_path, swag_files):
    tok = tmp_path / "tokenizer"  # the demo's byte-level BPE stands in for roberta-base's
    build_demo_tokenizer(make_demo_dataset()).save_pretrained(tok)
    out = tmp_path / "bench.json"
    result = benchmark.main(["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files,
                             "--num_train", "16", "--fit_rows", "8", "--num_queries", "4", "--num_fast_queries", "8",
                             "--train_steps", "1", "--architecture", "tiny", "--configs", "reference_fp32", "fast",
                             "--output", str(out), "--work_dir", str(tmp_path / "w")])
    saved = json.loads(out.read_text())
    assert saved["reference_fp32_full_scale_s"] == result["configs"]["reference_fp32"]["full_scale_seconds"] > 0

    def line(r, value, target=73_536):  # the line through the two subset sizes, at `target` rows (a negative slope
        big, small = value(r), value(r["fit_subset"])  # counts as 0)
        return big + max(0.0, (big - small) / (16 - 8)) * (target - 16)

    for name, lambda_rows in (("reference_fp32", 73_536), ("fast", FAST_LAMBDA_ROWS)):  # --fast: lambda up to its cap
        r = saved["configs"][name]
        assert r["num_train"] == 16 and r["fit_subset"]["num_train"] == 8
        assert r["settings"]["full_scale_lambda_rows"] == lambda_rows and r["settings"]["lambda_rows"] == 16
        factors = line(r, lambda x: x["covariance"]["seconds"]) \
            + line(r, lambda x: x["lambda"]["seconds"], lambda_rows) + r["eigendecomposition"]["seconds"]
        assert r["full_scale"]["factors"] == pytest.approx(factors, abs=0.1)
    fp32 = saved["configs"]["reference_fp32"]
    assert fp32["kronfluence_passes"]["full_scale_passes"] == 20  # 2,000 queries in passes of 100
    assert fp32["full_scale"]["scores"] == pytest.approx(20 * line(fp32, lambda x: x["kronfluence_passes"]["pass_s"]),
                                                         abs=0.1)
    for r in saved["configs"].values():
        assert r["warm_up_seconds"] > 0  # an untimed run of each configuration before its timed ones
        stages = r["full_scale"]["stages"]  # the extrapolation per stage, which a direct run is compared with
        assert list(stages) == ["covariance", "lambda", "eigendecomposition", "scores"]
        assert sum(stages.values()) == pytest.approx(r["full_scale"]["seconds"], abs=0.3)  # each rounded to 0.1
        assert stages["covariance"] == pytest.approx(line(r, lambda x: x["covariance"]["seconds"]), abs=0.1)
    fast = saved["configs"]["fast"]
    assert fast["settings"]["scoring"] == "fused" and fast["fused"]["passes"] == 1  # CPU: all 8 queries in one pass
    f, full = fast["fused"], fast["full_scale"]["fused"]
    assert (full["chunks"], full["queries_per_chunk"], full["module_groups"]) == (1, 2_000, 1)  # CPU: no limit known
    fixed = line(fast, lambda x: x["fused"]["chunk_fixed_s"])
    scores = f["query_seconds"] * 2_000 / 8 + fixed + f["chunk_per_query_s"] * 73_536 / 16 * 2_000
    assert fast["full_scale"]["scores"] == pytest.approx(scores, abs=0.1)
    agreement = fast["vs_reference_fp32"]  # the headline agreement is the fast configuration's, against fp32
    assert saved["mean_query_pearson_vs_fp32"] == agreement["pearson"] and -1 <= agreement["pearson"] <= 1
    assert agreement["nonfinite_scores"] == 0
    assert saved["subset"]["mean_tokens_per_choice"] > 5  # the rows' real text, not a few special tokens
    assert saved["training"]["eager"]["retrain_50pct_swag_steps"] == 3 * (36_768 // 16)
    assert saved["retrain_50pct_swag_s"] == saved["training"]["eager"]["retrain_50pct_swag_seconds"]


@pytest.mark.slow
def test_a_killed_benchmark_goes_on_from_its_finished_configurations(tmp_path, swag_files, monkeypatch):
    tok = tmp_path / "tokenizer"
    build_demo_tokenizer(make_demo_dataset()).save_pretrained(tok)
    out = tmp_path / "bench.json"
    argv = ["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files, "--num_train", "16",
            "--num_queries", "4", "--num_fast_queries", "8", "--train_steps", "1", "--architecture", "tiny",
            "--configs", "reference_fp32", "fast", "--output", str(out), "--work_dir", str(tmp_path / "w")]
    original, ran = benchmark.run_config_at_full_scale, []

    def killed_at_fast(name, *args):
        if name == "fast":
            raise RuntimeError("killed")
        return original(name, *args)
    monkeypatch.setattr(benchmark, "run_config_at_full_scale", killed_at_fast)
    with pytest.raises(RuntimeError, match="killed"):
        benchmark.main(argv)
    first = json.loads(out.read_text())
    assert list(first["configs"]) == ["reference_fp32"]

    def counting(name, *args):
        ran.append(name)
        return original(name, *args)
    monkeypatch.setattr(benchmark, "run_config_at_full_scale", counting)
    monkeypatch.setattr(benchmark, "time_training_variants", lambda *args: pytest.fail("the training was timed again"))
    result = benchmark.main(argv)
    assert ran == ["fast"]  # reference_fp32 and the training come from the killed invocation
    assert result["training"] == first["training"]
    assert result["configs"]["reference_fp32"]["full_scale"] == first["configs"]["reference_fp32"]["full_scale"]
    # fast's agreement is computed against the kept fp32 scores of the same (kept) weights
    assert result["configs"]["fast"]["vs_reference_fp32"]["nonfinite_scores"] == 0
    assert json.loads(out.read_text())["configs"].keys() == {"reference_fp32", "fast"}


def test_only_the_same_command_on_the_same_gpu_and_software_is_resumed(tmp_path):
    out = {"command": "python benchmark.py --x", "gpu": "H200", "torch": "2", "transformers": "5", "kronfluence": "1"}
    path = tmp_path / "bench.json"
    assert benchmark.earlier_results(path, out) == {}  # none
    path.write_text("{")
    assert benchmark.earlier_results(path, out) == {}  # unreadable
    path.write_text(json.dumps({**out, "configs": {"fast": {}}}))
    assert benchmark.earlier_results(path, out)["configs"] == {"fast": {}}
    for key, other in (("command", "python benchmark.py --y"), ("gpu", "H100"), ("kronfluence", "2")):
        assert benchmark.earlier_results(path, {**out, key: other}) == {}


def test_extrapolation_counts_a_fixed_cost_once():
    """Along the rows: proportional to one size; with two, the fixed cost once and the per-row cost times the rows."""
    assert benchmark.along_rows(2.0, 1_000) == pytest.approx(2.0 * 73.536)
    # 1 s fixed + 1 ms a row, timed at 1,000 and 500 rows
    assert benchmark.along_rows(2.0, 1_000, 1.5, 500) == pytest.approx(1.0 + 0.001 * 73_536)
    assert benchmark.along_rows(2.0, 1_000, 2.5, 500) == 2.0  # noise: the smaller subset slower


def test_lambda_is_extrapolated_to_the_rows_it_is_fitted_on_at_full_scale():
    """--fast fits lambda on at most FAST_LAMBDA_ROWS rows: at full scale the line through the subsets' lambda times
    reaches that many rows, not 73,536, while the covariance goes on along all of them; a fraction keeps its share."""
    def result(rows, lambda_rows, full_lambda_rows, lam_s):
        return {"num_train": rows, "covariance": {"seconds": 1.0 + 0.001 * rows}, "eigendecomposition": {"seconds": 5.0},
                "lambda": {"seconds": lam_s}, "settings": {"lambda_rows": lambda_rows,
                                                           "full_scale_lambda_rows": full_lambda_rows},
                "kronfluence_passes": {"full_scale_passes": 0, "pass_s": 0.0}}
    cap = FAST_LAMBDA_ROWS  # 1 s fixed + 1 ms a lambda row, timed on 2,048 and 512 rows (all of them under the cap)
    out = benchmark.full_scale(result(2_048, 2_048, cap, 1.0 + 2.048), result(512, 512, cap, 1.0 + 0.512))
    assert out["stages"]["lambda"] == pytest.approx(1.0 + 0.001 * cap, abs=0.05)
    assert out["stages"]["covariance"] == pytest.approx(1.0 + 0.001 * 73_536, abs=0.05)
    quarter = benchmark.full_scale(result(2_048, 512, 18_384, 1.0 + 0.512), result(512, 128, 18_384, 1.0 + 0.128))
    assert quarter["stages"]["lambda"] == pytest.approx(1.0 + 0.001 * 18_384, abs=0.05)
    assert AnalysisConfig(fast=True).lambda_rows == cap and AnalysisConfig().lambda_rows is None
    assert AnalysisConfig(fast=True, lambda_max_examples=50).lambda_rows == 50
    assert AnalysisConfig(fast=True).factors_name(0) == "ekfac_nall_fast"  # the cap is --fast's recipe


def test_a_direct_run_is_compared_with_the_extrapolation_stage_by_stage():
    direct = {"stages": {"covariance": {"seconds": 53.4}, "eigendecomposition": {"seconds": 5.4},
                         "lambda": {"seconds": 106.5}, "scores": {"seconds": 203.1}}, "stages_seconds": 368.4}
    extrapolated = {"seconds": 344.2, "stages": {"covariance": 21.2, "lambda": 136.0, "eigendecomposition": 6.7,
                                                 "scores": 180.3}}
    assert benchmark.measured_over_extrapolated(direct, extrapolated) == {
        "covariance": 2.52, "lambda": 0.78, "eigendecomposition": 0.81, "scores": 1.13, "stages": 1.07}
    direct.update(wall_seconds=216.4, reused_stages=[])
    fast, reference = {"full_scale": extrapolated}, {"full_scale_seconds": 5275.0}
    assert benchmark.compared_with_extrapolations(direct, {"reference_bf16": reference, "fast": fast}) == {
        "wall_speedup_vs_reference_bf16": 24.4,  # 5275 / 216.4 = 24.38 (the wall clock, not the stages)
        "measured_over_extrapolated": benchmark.measured_over_extrapolated(direct, extrapolated)}
    assert benchmark.compared_with_extrapolations(direct, {"reference_bf16": reference}) == {
        "wall_speedup_vs_reference_bf16": 24.4}
    assert benchmark.compared_with_extrapolations(direct, {}) == {}
    # an fp8 contraction's stages are not `fast`'s (bf16) to compare with; its wall clock is the job's
    assert benchmark.compared_with_extrapolations({**direct, "fp8_contraction": True},
                                                  {"reference_bf16": reference, "fast": fast}) == {
        "wall_speedup_vs_reference_bf16": 24.4}
    # a resumed run's wall clock lacks the stages it reused: no speed-up from it
    direct["reused_stages"] = ["covariance"]
    assert "wall_speedup_vs_reference_bf16" not in benchmark.compared_with_extrapolations(
        direct, {"reference_bf16": reference})


def test_each_configuration_is_warmed_up_untimed_before_its_timed_runs(monkeypatch):
    calls = []

    def run_config(name, model, tokenizer, raw_train, raw_queries, raw_queries_fast, args, plan_rows=None):
        calls.append((name, len(raw_train), len(raw_queries_fast), args.profile))
        return {"num_train": len(raw_train)}, None
    monkeypatch.setattr(benchmark, "run_config", run_config)
    monkeypatch.setattr(benchmark, "full_scale", lambda result, small: {"seconds": 1.0})
    rows = Dataset.from_dict({"x": list(range(1_000))})
    result, _ = benchmark.run_config_at_full_scale("fast", None, None, rows, rows, rows,
                                                   argparse.Namespace(fit_rows=8, profile=True))
    # two factor batches of 256 and 4 queries, never profiled; then the timed runs on --fit_rows and all rows
    assert calls == [("fast", 512, 4, False), ("fast", 8, 1_000, True), ("fast", 1_000, 1_000, True)]
    assert result["warm_up_seconds"] >= 0 and result["fit_subset"] == {"num_train": 8}


def test_tokenizer_from_vocab_and_merges(tmp_path):
    """A directory with vocab.json and merges.txt alone (as ../shared/tokenizers/roberta-base) gives the tokenizer
    those files define, and one whose vocabulary lacks ordinary words is refused in one line."""
    demo = build_demo_tokenizer(make_demo_dataset())
    demo.backend_tokenizer.model.save(str(tmp_path))  # vocab.json, merges.txt
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merges.txt", "vocab.json"]
    text = "Someone opens the door and walks in."
    loaded = benchmark.load_tokenizer(tmp_path)
    assert loaded(text)["input_ids"] == demo(text)["input_ids"] and len(loaded) == len(demo)
    (tmp_path / "vocab.json").write_text('{"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}')
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    with pytest.raises(UserError, match="maps 'A man is sitting on a horse' to unknown tokens"):
        benchmark.load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="is not a directory"):
        benchmark.load_tokenizer(tmp_path / "missing")


@pytest.mark.slow
def test_benchmark_times_concurrent_training_under_torchrun(tmp_path, swag_files, monkeypatch, capsys):
    """Two processes train at once (as several retraining runs sharing one GPU); rank 0 reports both and
    charges one run the slowest process's time divided by the number of processes."""
    from test_distributed import torchrun

    tok = tmp_path / "tokenizer"
    build_demo_tokenizer(make_demo_dataset()).save_pretrained(tok)
    out = tmp_path / "bench.json"
    torchrun("benchmark.py", "--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files,
             "--num_train", "16", "--num_queries", "4", "--num_fast_queries", "4", "--train_steps", "1",
             "--architecture", "tiny", "--configs", "--train_variants", "eager",
             "--output", str(out))
    eager = json.loads(out.read_text())["training"]["eager"]
    per_process = eager["seconds_per_step_each_process"]
    assert len(per_process) == 2 and eager["steps_timed"] == 1
    assert eager["devices"] == 1 and eager["processes_per_device"] == 2  # both on this host's CPU
    assert eager["retrain_50pct_swag_seconds"] == pytest.approx(max(per_process) * 3 * (36_768 // 16) / 2, rel=0.01)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files])
    assert "--configs with no names" in capsys.readouterr().err


def test_benchmark_profiles_training(tmp_path, swag_files):
    """--profile adds a profiled training pass: its top operations and the device's busy time."""
    tok = tmp_path / "tokenizer"
    build_demo_tokenizer(make_demo_dataset()).save_pretrained(tok)
    out = benchmark.main(["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files,
                          "--num_train", "16", "--num_queries", "4", "--num_fast_queries", "4", "--train_steps", "1",
                          "--architecture", "tiny", "--configs", "--train_variants", "eager", "--profile",
                          "--output", str(tmp_path / "bench.json")])
    profile = out["training"]["eager"]["profile"]
    assert profile["steps"] == 1 and profile["top_ops"] and profile["device_busy_seconds"] > 0
    assert 0 < sum(op["share"] for op in profile["top_ops"]) <= 1 + 1e-3  # shares of one total
    assert any(op["op"].endswith("mm") and op["shapes"].startswith("[[") for op in profile["top_ops"])  # which matmul


@pytest.mark.slow
def test_the_direct_run_is_analyze_fast_as_a_user_runs_it_and_resumes(tmp_path, swag_files, capsys):
    """--direct runs analyze.py --fast in its own process on the training rows repeated to --direct_train, and
    reports the stage times analyze.py recorded; a rerun reuses what the first run finished."""
    tok = tmp_path / "tokenizer"
    build_demo_tokenizer(make_demo_dataset()).save_pretrained(tok)
    common = ["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files,
              "--num_train", "16", "--num_queries", "4", "--num_fast_queries", "8", "--train_steps", "0",
              "--architecture", "tiny", "--configs", "--direct",
              "--direct_train", "40", "--direct_queries", "6", "--work_dir", str(tmp_path / "w")]
    first = benchmark.main([*common, "--output", str(tmp_path / "a.json")])["direct"]
    assert (first["num_train"], first["num_queries"]) == (40, 6)
    assert list(first["stages"]) == ["covariance", "eigendecomposition", "lambda", "scores"]
    assert first["stages_seconds"] == pytest.approx(sum(s["seconds"] for s in first["stages"].values()), abs=0.1)
    # the wall clock holds the process's start-up (imports, the checkpoint, tokenizing), its stages and its end; 0.2 s
    # covers the roundings (wall and stages_seconds to 0.1 s, each stage and startup to 0.01 s) and the kernel's
    # 10 ms clock steps
    assert first["wall_seconds"] + 0.2 > first["startup_seconds"] + first["stages_seconds"]
    assert first["startup_seconds"] > 0 and first["reused_stages"] == []
    assert all(stage["gpu_busy_share"] is None for stage in first["stages"].values())  # analyze.py's (no GPU here)
    outside = first["outside_stages"]  # the rest of the wall clock, in parts that add up to it
    assert min(outside.values()) >= -0.02 and outside["end"] > 0
    assert first["wall_seconds"] == pytest.approx(first["startup_seconds"] + first["stages_seconds"]
                                                  + sum(outside.values()), abs=0.2)
    import formats
    import utils
    scores, meta = formats.load_scores(next((tmp_path / "w" / "direct" / "scores" / "checkpoint").glob("scores_*")))
    assert scores.shape == (6, 40) and meta["fast"] and meta["data_fingerprint"]["num_train"] == 40
    again = benchmark.main([*common, "--output", str(tmp_path / "b.json")])["direct"]
    assert again["stages"] == first["stages"]  # everything reused: the recorded times are the first run's
    assert json.loads((tmp_path / "b.json").read_text())["direct"] == again
    assert again["reused_stages"] == ["covariance", "eigendecomposition", "lambda", "scores"]
    assert again["outside_stages"] is None  # the recorded parts are the first run's, not this one's
    # a killed run's claim ("complete": false) is not complete scores: they are computed again
    scores_dir = next((tmp_path / "w" / "direct" / "scores" / "checkpoint").glob("scores_*"))
    utils.write_json(scores_dir / formats.METADATA_FILE,
                     {**json.loads((scores_dir / formats.METADATA_FILE).read_text()), "complete": False})
    redone = benchmark.main([*common, "--output", str(tmp_path / "e.json")])["direct"]
    assert redone["reused_stages"] == ["covariance", "eigendecomposition", "lambda"]
    # the fp8 contraction: the same factors, scores of its own name from analyze.py --fp8_contraction
    fp8 = benchmark.main([*common, "--direct_fp8_contraction", "--output", str(tmp_path / "d.json")])["direct"]
    assert fp8["command"].endswith("--fp8_contraction") and "scores" not in fp8["reused_stages"]
    assert fp8["reused_stages"] == ["covariance", "eigendecomposition", "lambda"]
    assert formats.load_scores(next((tmp_path / "w" / "direct" / "scores" / "checkpoint").glob("scores_*_fp8")))[0] \
        .shape == (6, 40)
    assert fp8["fp8_contraction"] and not first["fp8_contraction"]
    with pytest.raises(SystemExit):  # the flag sets the direct run's contraction: without --direct, a parser error
        benchmark.parse_args([*common[:-7], "--direct_fp8_contraction"])
    assert "pass --direct as well" in capsys.readouterr().err
    with pytest.raises(UserError, match="holds a direct run of other settings"):  # other rows: not silently reused
        benchmark.main([*common[:-6], "--direct_train", "48", "--direct_queries", "6", "--work_dir", str(tmp_path / "w"),
                        "--output", str(tmp_path / "c.json")])


def test_the_subsets_probe_memory_with_every_training_row_of_the_full_run(swag_files):
    """full_run_rows: the full run's longest queries, and all its training rows longest first, so that the probes of
    every micro-batch size the full run makes (fused_scores.train_probes) find rows of that length."""
    from datasets import DatasetDict

    from fused_scores import row_lengths
    from pipeline import load_local_files, tokenize

    raw = load_local_files(swag_files, swag_files)
    raw = DatasetDict(train=raw["train"], validation=raw["validation"])
    tokenizer = build_demo_tokenizer(make_demo_dataset())
    queries, train = benchmark.full_run_rows(raw, tokenizer, rows=5)
    assert len(queries) == 5 and len(train) == len(raw["train"])
    lengths = row_lengths(train)
    assert (lengths[:-1] >= lengths[1:]).all()  # longest first
    every_query = row_lengths(tokenize(raw["validation"], tokenizer))
    assert sorted(row_lengths(queries)) == sorted(every_query)[-5:]


def test_the_memory_budget_driver_stops_when_its_memory_holder_dies(tmp_path):
    """results/memory_h200.sh budgets: another process holds all but B GiB of the GPU; where it cannot (no GPU here,
    or a python without torch), the driver says so and exits instead of waiting for it forever."""
    import os
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "results").mkdir()
    for name in ("memory_h200.sh", "anetcap_minilm_common.sh"):
        shutil.copy(root / "results" / name, tmp_path / "results" / name)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", "results/memory_h200.sh", "budgets", "22", "model", "data", "tokenizer", "out"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1
    assert "the process holding GPU memory exited before holding it" in done.stderr
    assert not (tmp_path / "logs" / "memory_22.log").exists()  # no benchmark ran


def results_driver(monkeypatch, name: str):
    """results/NAME.py imported as when it runs as a script (its helpers beside it on the path)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "results" / f"{name}.py"
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_covariance_probe_lists_the_kernels_with_the_most_device_time(monkeypatch):
    """results/covariance_probe.py's top_kernels: the profile's entries by their own device seconds, most first, the
    count asked for, entries without device time left out, names cut to 120 characters."""
    from types import SimpleNamespace

    probe = results_driver(monkeypatch, "covariance_probe")
    events = [SimpleNamespace(key="gemm" + "x" * 200, count=4, self_device_time_total=2_500_000),  # microseconds
              SimpleNamespace(key="cast", count=9, self_device_time_total=0),
              SimpleNamespace(key="add", count=3, self_device_time_total=1_000),
              SimpleNamespace(key="norm", count=2, self_device_time_total=700_000)]
    profile = SimpleNamespace(key_averages=lambda: events)
    assert probe.top_kernels(profile, 2) == [{"name": ("gemm" + "x" * 200)[:120], "calls": 4, "device_seconds": 2.5},
                                             {"name": "norm", "calls": 2, "device_seconds": 0.7}]
    assert [k["name"] for k in probe.top_kernels(profile, 10)][1:] == ["norm", "add"]  # no entry without device time


def test_the_contraction_precision_driver_rounds_each_row_to_e4m3_at_its_own_scale(monkeypatch):
    """results/contraction_precision.py: each row's largest magnitude maps to e4m3's largest value (448), every entry
    within e4m3's rounding (3 mantissa bits: half a unit in the last place, 2**-4 relative, for entries at least
    e4m3's smallest normal, 2**-6, after scaling); the float64 contraction is the exact product; the fp8 one is that of
    the rounded rows, within its float32 sums of 64 terms (64 · 2**-24 · Σ|terms|) and the float32 result's and two
    scales' roundings (3 · 2**-24 < 2**-22 relative)."""
    import torch

    driver = results_driver(monkeypatch, "contraction_precision")
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(4, 64, generator=generator) * torch.tensor([[1e-3], [1.0], [50.0], [1e4]])  # row scales
    train = torch.randn(3, 64, generator=generator)
    q, scale = driver.fp8_rows(queries)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (4, 1)
    assert torch.equal(q.float().abs().amax(dim=1), torch.full((4,), 448.0))
    scaled = queries / scale
    normal = scaled.abs() >= 2 ** -6
    assert ((q.float() - scaled).abs() <= scaled.abs() * 2 ** -4)[normal].all()
    exact = queries.double() @ train.double().T
    assert torch.equal(driver.contract(queries, train, "float64"), exact.float())
    t, t_scale = driver.fp8_rows(train)
    rounded = (q.double() * scale.double()) @ (t.double() * t_scale.double()).T
    fp8 = driver.contract(queries, train, "fp8").double()
    sums = 64 * 2**-24 * (q.double().abs() * scale.double()) @ (t.double().abs() * t_scale.double()).T
    assert ((fp8 - rounded).abs() <= sums + 2**-22 * rounded.abs()).all()


def test_the_contraction_kernels_drivers_variants_compute_the_same_product(monkeypatch):
    """results/contraction_kernels.py's candidates: the K-sliced products equal one matmul (float64 operands here, so
    only the summation order differs: 1e-12 of the terms' magnitudes), fp8.product (one-scale kernels) and the
    row-scaled product equal the exact product of the e4m3 operands within their float32 sums (and the row-scaled
    kernel's bf16 result); the driver refuses a machine without an fp8 GPU in one line."""
    import torch

    import fp8

    driver = results_driver(monkeypatch, "contraction_kernels")
    generator = torch.Generator().manual_seed(0)
    queries, train = (torch.randn(n, 4 * 48, dtype=torch.float64, generator=generator) for n in (20, 12))
    torch.testing.assert_close(driver.split_product(queries, train, 4), queries @ train.T, rtol=0, atol=1e-12 * 4 * 48)
    for parts in (2, 4, 8):
        torch.testing.assert_close(driver.batched_split(queries, train, parts), queries @ train.T, rtol=0,
                                   atol=1e-12 * 4 * 48)
    q8, t8 = (torch.empty(x.shape, dtype=fp8.E4M3) for x in (queries, train))
    q_scales, t_scales = fp8.scaled_rows(queries, q8), fp8.scaled_rows(train, t8)
    q, t = q8.double() * q_scales[:, None].double(), t8.double() * t_scales[:, None].double()
    exact, sums = q @ t.T, 4 * 48 * 2**-24 * (q.abs() @ t.abs().T)  # float32 sums of K products: γ_K Σ|terms|
    # fp8.product: float32 sums and result, then the two scales' float32 products (3 roundings of 2^-24 < 2^-22)
    assert ((fp8.product(q8, q_scales, t8, t_scales).double() - exact).abs() <= sums + 2**-22 * exact.abs()).all()
    # the row-scaled kernel also rounds its result to bf16 (2^-8)
    rowwise = driver.product_rowwise(q8, q_scales, t8, t_scales).double()
    assert ((rowwise - exact).abs() <= sums + 2**-8 * (exact.abs() + sums)).all()
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="needs a GPU of compute capability 8.9"):
            driver.main(["/tmp/unused.json"])
