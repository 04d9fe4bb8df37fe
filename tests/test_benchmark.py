"""benchmark.py end to end on a tiny architecture (CPU), and its length sorting keeps score order."""

import json

import pytest

import benchmark
from pipeline import build_demo_tokenizer, make_demo_dataset


@pytest.fixture
def swag_files(tmp_path):
    from test_pipeline import swag_frame

    frame = swag_frame(24)
    frame["sent1"] = [f"Someone opens door {'and walks ' * (i % 5)}{i}." for i in range(24)]  # varied lengths
    frame.to_csv(tmp_path / "train.csv", index=False)
    return str(tmp_path / "train.csv")


def test_benchmark_runs_and_reports(tmp_path, swag_files):
    tok = tmp_path / "tokenizer"  # the demo's byte-level BPE stands in for roberta-base's
    build_demo_tokenizer(make_demo_dataset()).save_pretrained(tok)
    out = tmp_path / "bench.json"
    result = benchmark.main(["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files,
                             "--num_train", "16", "--num_queries", "4", "--num_fast_queries", "8", "--train_steps", "1",
                             "--architecture", "tiny", "--configs", "reference_fp32", "fastest",
                             "--output", str(out), "--work_dir", str(tmp_path / "w")])
    saved = json.loads(out.read_text())
    assert saved["reference_fp32_full_scale_s"] == result["configs"]["reference_fp32"]["full_scale_seconds"] > 0
    fp32 = saved["configs"]["reference_fp32"]
    scale = 73_536 / 16
    expected = (fp32["covariance"]["seconds"] + fp32["lambda"]["seconds"]) * scale + fp32["eigendecomposition"]["seconds"] \
        + fp32["scores"]["seconds"] * scale * 20  # 2,000 queries in passes of 100, 4 queries in one pass here
    assert fp32["full_scale_seconds"] == pytest.approx(expected, rel=0.01, abs=0.2)
    fast = saved["configs"]["fastest"]
    assert fast["settings"]["scoring"] == "fused" and fast["fused"]["passes"] == 1  # CPU: all 8 queries in one pass
    f = fast["fused"]
    pass_s = (f["pass_fixed_s"] + f["pass_per_query_s"] * 2_000) * scale  # CPU: all 2,000 queries fit one pass
    assert f["full_scale_passes"] == 1 and f["full_scale_train_pass_s"] == pytest.approx(pass_s, rel=0.02, abs=0.5)
    expected = (fast["covariance"]["seconds"] + fast["lambda"]["seconds"]) * scale + fast["eigendecomposition"]["seconds"] \
        + f["query_seconds"] * 2_000 / 8 + pass_s
    assert fast["full_scale_seconds"] == pytest.approx(expected, rel=0.02, abs=1.0)
    agreement = fast["vs_reference_fp32"]  # the headline agreement is the fast configuration's, against fp32
    assert saved["mean_query_pearson_vs_fp32"] == agreement["pearson"] and -1 <= agreement["pearson"] <= 1
    assert agreement["nonfinite_scores"] == 0
    assert saved["subset"]["mean_tokens_per_choice"] > 5  # the rows' real text, not a few special tokens
    assert saved["training"]["eager"]["retrain_50pct_swag_steps"] == 3 * (36_768 // 16)
    assert saved["retrain_50pct_swag_s"] == saved["training"]["eager"]["retrain_50pct_swag_seconds"]


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
    with pytest.raises(SystemExit, match="maps 'A man is sitting on a horse' to unknown tokens"):
        benchmark.load_tokenizer(tmp_path)
    with pytest.raises(SystemExit, match="is not a directory"):
        benchmark.load_tokenizer(tmp_path / "missing")


def test_benchmark_times_concurrent_training_under_torchrun(tmp_path, swag_files, monkeypatch):
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
    with pytest.raises(SystemExit, match="--configs with no names"):
        benchmark.parse_args(["--tokenizer_dir", str(tok), "--train_file", swag_files, "--validation_file", swag_files])


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
